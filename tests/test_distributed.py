"""Data-parallel training under torchrun: 2 CPU processes (gloo, loopback) take the step one process takes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from graftnet.checkpoint import read_checkpoint
from graftnet.launch import train
from graftnet.models import build_model

MLP = {"model": "graftnet:mlp", "kwargs": {"in_features": 64, "hidden": [32, 32], "num_classes": 4}}


def _spec(tmp_path: Path, epochs: int = 1) -> dict[str, Any]:
    torch.manual_seed(7)
    weights = tmp_path / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in build_model(MLP["model"], MLP["kwargs"]).state_dict().items()}, weights)
    return {
        "student": MLP,
        "teachers": {"t": {**MLP, "weights": str(weights)}},
        "sites": [{"student": "body.2", "taps": ["t:body.2"]}, {"student": "body.4", "taps": ["t:body.4"]}],
        # no augmentation, no BatchNorm, no dropout: nothing random or per-process in the step
        "data": {"dataset": "digits", "classes": [0, 1, 2, 3], "train_size": 64, "val_size": 40, "batch_size": 32,
                 "augment": False},
        "train": {"method": "knowledge_flow", "epochs": epochs, "lr": 1e-2, "lambda2": 0.5, "threads": 1,
                  "lambda1": {"final": 10.0, "start": 0.0, "end": 1.0}, "cut_teachers_at": None},
    }  # fmt: skip


def _torchrun(spec_path: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "graftnet",
           "train", str(spec_path), "--out", str(out), "--no-progress", "--no-tensorboard", *extra]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-4, msg=k)


def _model_tensors(run: Path) -> dict[str, torch.Tensor]:
    tensors, _ = read_checkpoint(run)
    return {k: v for k, v in tensors.items() if not k.startswith("train_state.")}


def test_two_processes_take_the_one_process_step(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    train(spec, tmp_path / "one", progress=False, tensorboard=False)  # 2 steps of the global batch of 32
    done = _torchrun(path, tmp_path / "two")
    assert done.returncode == 0, done.stderr[-3000:]
    # student, mixer logits, adapters and tap scales: the same after two steps (the second with a real θ_old)
    _assert_same(_model_tensors(tmp_path / "one"), _model_tensors(tmp_path / "two"))
    students = [load_file(tmp_path / run / "student.safetensors") for run in ("one", "two")]
    _assert_same(*students)
    # rank 0 alone wrote: one checkpoint, one exported student, one metrics row, no leftovers
    files = sorted(p.name for p in (tmp_path / "two").iterdir())
    assert files == ["checkpoint.safetensors", "metrics.csv", "results.json", "run.json", "spec.json",
                     "student.safetensors"]  # fmt: skip
    assert len((tmp_path / "two" / "metrics.csv").read_text().splitlines()) == 2
    one, two = (json.loads((tmp_path / r / "results.json").read_text()) for r in ("one", "two"))
    assert one["test_error"] == pytest.approx(two["test_error"])
    header, row = (tmp_path / "two" / "metrics.csv").read_text().splitlines()
    ref = (tmp_path / "one" / "metrics.csv").read_text().splitlines()[1]
    cols = header.split(",")
    for name in ("loss", "task_loss", "dep_loss", "kl_loss", "train_acc", "lambda1"):  # summed over both processes
        i = cols.index(name)
        assert float(row.split(",")[i]) == pytest.approx(float(ref.split(",")[i]), rel=1e-4, abs=1e-6), name


def test_resume_a_one_process_checkpoint_with_two_processes(tmp_path: Path) -> None:
    spec = _spec(tmp_path, epochs=3)
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    train(spec, tmp_path / "one", progress=False, tensorboard=False)

    def stop_after_first_epoch(step: int) -> None:
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    stopped = train(spec, tmp_path / "mixed", progress=False, tensorboard=False, on_step=stop_after_first_epoch)
    assert stopped.interrupted == "SIGINT"
    done = _torchrun(path, tmp_path / "mixed", "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_same(_model_tensors(tmp_path / "one"), _model_tensors(tmp_path / "mixed"))
    assert len((tmp_path / "mixed" / "metrics.csv").read_text().splitlines()) == 4
