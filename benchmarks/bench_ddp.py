"""Throughput of data-parallel training: torchrun with 2 processes against 1 process, on this machine.

    python benchmarks/bench_ddp.py [--epochs 3]

Trains the same knowledge-flow spec (MNIST-1D, a 1-D convnet student with one teacher of the same
architecture mixed in at every layer, global batch 128 by default) three ways and prints training samples per second,
from the ``seconds`` column of ``metrics.csv`` (training and validation time, without process start-up):
one process with 1 thread, one process with 2 threads, and ``torchrun --nproc_per_node 2`` with 1 thread each.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from graftnet.models import build_model

MODEL = {"model": "graftnet:cnn1d", "kwargs": {"num_classes": 10, "channels": [64, 64, 64]}}


def spec(teacher: Path, epochs: int, threads: int, batch: int) -> dict[str, object]:
    return {
        "student": MODEL,
        "teachers": {"t": {**MODEL, "weights": str(teacher)}},
        "sites": [{"student": f"features.act{i}", "taps": [f"t:features.act{i}"]} for i in (1, 2, 3)],
        "data": {"dataset": "mnist1d", "kwargs": {"samples": 10000}, "val_size": 500, "batch_size": batch},
        "train": {"method": "knowledge_flow", "epochs": epochs, "lr": 3e-3, "threads": threads},
    }


def samples_per_second(run: Path, train_samples: int) -> float:
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    # skip the first epoch (warm-up); seconds is cumulative
    seconds = float(rows[-1]["seconds"]) - float(rows[0]["seconds"])
    return train_samples * (len(rows) - 1) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch", type=int, default=128, help="global batch size")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        torch.manual_seed(0)
        teacher = root / "teacher.safetensors"
        state = build_model(MODEL["model"], MODEL["kwargs"]).state_dict()  # type: ignore[arg-type]
        save_file({k: v.contiguous() for k, v in state.items()}, teacher)
        train_samples = 8000 - 500
        results = {}
        for label, threads, procs in (("1 process, 1 thread", 1, 1), ("1 process, 2 threads", 2, 1),
                                      ("torchrun, 2 processes × 1 thread", 1, 2)):  # fmt: skip
            path = root / f"spec_{threads}_{procs}.json"
            path.write_text(json.dumps(spec(teacher, args.epochs, threads, args.batch)))
            out = root / f"run_{threads}_{procs}"
            launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)]
            launcher = launcher if procs > 1 else []
            cmd = [sys.executable, *launcher, "-m", "graftnet", "train", str(path), "--out", str(out),
                   "--no-progress", "--no-tensorboard"]  # fmt: skip
            subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
            results[label] = samples_per_second(out, train_samples)
            print(f"{label:36s} {results[label]:8.0f} samples/s", flush=True)
        base = results["1 process, 1 thread"]
        for label, value in results.items():
            print(f"{label:36s} speed-up {value / base:.2f}×")


if __name__ == "__main__":
    main()
