"""Born-again networks on MNIST-1D: teacher vs BAN, BAN+L, CWTM, DKPP, ensembles, and born-again knowledge flow.

    python examples/ban_mnist1d.py [--out runs/ban_mnist1d] [--seeds 3]

Every run is an ordinary ``graftnet train`` run of a ``ban`` spec (printed below, and saved as
``spec.json`` in each run folder). Generation 0's learning rate is chosen on the validation split with
seed 0; every generation of every sequence then uses it (the paper reuses the teacher's schedule). The
table reports mean ± std test error (%) over seeds of each exported student, evaluated alone; ensembles
average the members' predicted distributions per test sample (eq. 4).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from graftnet.data import task_splits
from graftnet.launch import train
from graftnet.spec import load_spec

STUDENT = {"model": "graftnet:cnn1d", "kwargs": {"num_classes": 10, "channels": [32, 32, 32]}}
DATA = {"dataset": "mnist1d", "kwargs": {"samples": 5000}, "val_size": 500, "batch_size": 64}
LRS = (1e-3, 3e-3, 1e-2)
LAMBDA1 = (10.0, 100.0)  # born-again knowledge flow's dependency weight, chosen on validation too


def spec(method: str, lr: float, seed: int, lambda1: float = 10.0, **ban: Any) -> dict[str, Any]:
    train_section = {"method": method, "epochs": 30, "lr": lr, "seed": seed, "threads": 1}
    train_section["lambda1"] = {"final": lambda1}
    if method == "ban":
        train_section["ban"] = ban
    return {"student": STUDENT, "data": DATA, "train": train_section}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/ban_mnist1d")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    out = Path(args.out)
    started = time.perf_counter()
    splits = task_splits(load_spec(spec("scratch", LRS[0], 0)))  # one copy of the data for every run

    def run(s: dict[str, Any], folder: Path) -> dict[str, Any]:
        t0 = time.perf_counter()
        result = train(s, folder, overwrite=True, progress=False, tensorboard=False, splits=splits)
        print(f"  {folder}: {time.perf_counter() - t0:.0f} s", flush=True)
        summary = folder / "results.json"
        return json.loads(summary.read_text()) if s["train"]["method"] == "ban" else {"val": result.val_error}

    print("choosing generation 0's learning rate on validation (seed 0)")
    val = {lr: run(spec("scratch", lr, 0), out / f"select_lr{lr:g}")["val"] for lr in LRS}
    lr = min(val, key=val.__getitem__)
    print(f"  validation error by lr: {val}; chosen lr = {lr:g}")
    print("choosing born-again knowledge flow's lambda1 on validation (seed 0, generation 1)")
    kf_val = {}
    for l1 in LAMBDA1:
        r = run(spec("ban", lr, 0, l1, generations=1, knowledge_flow=True), out / f"select_l1_{l1:g}")
        kf_val[l1] = r["generations"][1]["val_error"]
    lambda1 = min(kf_val, key=kf_val.__getitem__)
    print(f"  validation error by lambda1: {kf_val}; chosen lambda1 = {lambda1:g}")

    rows: dict[str, list[float]] = {}
    val_rows: dict[str, list[float]] = {}

    def add(name: str, test: float, valid: float) -> None:
        rows.setdefault(name, []).append(test)
        val_rows.setdefault(name, []).append(valid)

    for seed in range(args.seeds):
        print(f"seed {seed}")
        for treatment, generations in (("ban", 3), ("ban_l", 1), ("cwtm", 1), ("dkpp", 1)):
            r = run(spec("ban", lr, seed, generations=generations, treatment=treatment), out / f"{treatment}_s{seed}")
            gens = r["generations"]
            if treatment == "ban":
                add("teacher (generation 0)", gens[0]["test_error"], gens[0]["val_error"])
                for g in gens[1:]:
                    add(f"BAN generation {g['generation']}", g["test_error"], g["val_error"])
                for e in r["ensembles"]:
                    add(f"BAN ensemble of generations 1-{e['members'][-1]}", e["test_error"], e["val_error"])
            else:
                label = {"ban_l": "BAN+L", "cwtm": "CWTM", "dkpp": "DKPP"}[treatment]
                add(f"{label} generation 1", gens[1]["test_error"], gens[1]["val_error"])
        r = run(spec("ban", lr, seed, lambda1, generations=3, knowledge_flow=True), out / f"bakf_s{seed}")
        for g in r["generations"][1:]:
            add(f"born-again knowledge flow, generation {g['generation']}", g["test_error"], g["val_error"])
        for e in r["ensembles"]:
            add(f"born-again KF ensemble of generations 1-{e['members'][-1]}", e["test_error"], e["val_error"])

    lines = [
        f"MNIST-1D (10 classes, 3500 training samples), cnn1d, lr {lr:g} and born-again knowledge flow's "
        f"lambda1 {lambda1:g} chosen on validation; "
        f"test error (%) mean ± std over {args.seeds} seeds:",
        "",
        "| model | test error | val error |",
        "| --- | --- | --- |",
    ]
    for name, values in rows.items():
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        lines.append(f"| {name} | {statistics.mean(values):.2f} ± {std:.2f} | {statistics.mean(val_rows[name]):.2f} |")
    table = "\n".join(lines)
    print(table)
    (out / "results.md").write_text(table + "\n")
    print(f"finished in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
