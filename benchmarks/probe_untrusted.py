"""Probe graftnet the way an attacker or a careless user would, and count how each case ends.

    python benchmarks/probe_untrusted.py [--out DIR]

Every case runs the real command line (``graftnet.cli.main``) or the public API on small runs this script
trains first (digits, a few epochs), and ends in one of: ``named`` (a graftnet error: exit 2 with one line),
``ok`` (the command succeeded, where it should), or ``raw`` (any other exception: a traceback). For the cases
that touch a finished run, the script also checks that no good file was lost: the exported student and
``results.json`` must be byte-identical afterwards. The table it prints is the one in the issue notes.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import pickle
import shutil
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from graftnet.cli import main

STUDENT = {"model": "graftnet:mlp", "kwargs": {"in_features": 64, "hidden": [32], "num_classes": 10}}


def _spec(**train: Any) -> dict[str, Any]:
    return {"student": STUDENT, "data": {"dataset": "digits", "val_size": 200, "batch_size": 64},
            "train": {"method": "scratch", "epochs": 2, "threads": 1, **train}}  # fmt: skip


class Probe:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.rows: list[tuple[str, str, str, bool]] = []  # (group, case, outcome, data lost)

    def cli(self, *argv: str) -> tuple[str, str]:
        """Run the command line; return the outcome and the last line it printed to stderr."""
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                code = main(list(argv))
        except SystemExit as e:  # argparse
            return ("named" if e.code == 2 else "raw"), err.getvalue().strip()[-200:]
        except BaseException:  # noqa: BLE001 - this is what the probe counts
            return "raw", traceback.format_exc().strip().splitlines()[-1]
        text = err.getvalue()
        last = (text.strip().splitlines() or [""])[-1]
        if code == 0:
            return "ok", last
        return ("named" if code == 2 and ": error: " in text and "Traceback" not in text else "raw"), last

    def case(self, group: str, name: str, outcome: str, lost: bool = False, expect: str = "named") -> None:
        mark = "" if outcome == expect else "   <-- expected " + expect
        print(f"  [{outcome:5}] {group}: {name}{' (DATA LOST)' if lost else ''}{mark}")
        self.rows.append((group, name, outcome if outcome != expect or outcome != "ok" else "ok", lost))

    def write(self, name: str, spec: dict[str, Any]) -> str:
        path = self.root / name
        path.write_text(json.dumps(spec))
        return str(path)

    def finished_run(self, name: str) -> tuple[Path, str]:
        spec = self.write(f"{name}.json", _spec())
        run = self.root / name
        outcome, last = self.cli("train", spec, "--out", str(run), "--no-progress", "--no-tensorboard")
        assert outcome == "ok", last
        return run, spec


def _damage_tensor(path: Path, how: str) -> None:
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    key = next(k for k in tensors if k.startswith("student.") and k.endswith("weight"))
    if how == "missing key":
        del tensors[key]
    elif how == "int64 weights":
        tensors[key] = tensors[key].to(torch.int64)
    elif how == "NaN weights":
        tensors[key] = tensors[key].clone().fill_(float("nan"))
    elif how == "missing optimizer slot":
        del tensors[next(k for k in tensors if ".optim." in k)]
    save_file(tensors, str(path), metadata=meta)


def _flip(path: Path, offset: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def run_probe(root: Path) -> Probe:
    p = Probe(root)
    os.chdir(root)
    print("security")
    # S1: a checkpoint whose metadata names code as the student model
    run, spec = p.finished_run("s1")
    ckpt = run / "checkpoint.safetensors"
    with safe_open(str(ckpt), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    inner = json.loads(meta["graftnet"])
    marker = root / "s1_ran"
    inner["spec"]["student"] = {"model": "os:system", "kwargs": {"command": f"touch {marker}"}}
    save_file(tensors, str(ckpt), metadata={"graftnet": json.dumps(inner)})
    outcome, _ = p.cli("export", str(run), "--out", str(root / "s1_out.safetensors"))
    p.case("security", "checkpoint metadata names os:system (export)", outcome, marker.exists())
    # S2: a planted CIFAR pickle with download off
    cifar = root / "cifar" / "cifar-10-batches-py"
    cifar.mkdir(parents=True)
    marker2 = root / "s2_ran"

    class Payload:
        def __reduce__(self) -> tuple[Any, ...]:
            return (open, (str(marker2), "w"))

    for name in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch",
                 "batches.meta"):  # fmt: skip
        (cifar / name).write_bytes(pickle.dumps(Payload()))
    s2 = p.write("s2.json", {**_spec(), "student": {"model": "graftnet:convnet", "kwargs": {"in_channels": 3}},
                             "data": {"dataset": "cifar10", "kwargs": {"root": str(root / "cifar")}}})  # fmt: skip
    outcome, _ = p.cli("train", s2, "--out", str(root / "s2run"), "--no-progress", "--no-tensorboard")
    p.case("security", "planted CIFAR pickle, download false", outcome, marker2.exists())

    print("silent corruption")
    for how in ("missing key", "int64 weights", "flipped byte", "NaN weights"):
        run, spec = p.finished_run("fin_" + how.replace(" ", "_"))
        before = (run / "student.safetensors").read_bytes(), (run / "results.json").read_bytes()
        if how == "flipped byte":
            _flip(run / "checkpoint.safetensors")
        else:
            _damage_tensor(run / "checkpoint.safetensors", how)
        outcome, _ = p.cli("train", spec, "--out", str(run), "--resume", "--no-progress", "--no-tensorboard")
        lost = ((run / "student.safetensors").read_bytes(), (run / "results.json").read_bytes()) != before
        p.case("corruption", f"--resume of a finished run, {how}", outcome, lost)
        outcome, _ = p.cli("export", str(run), "--out", str(root / f"exp_{how[:4]}.safetensors"))
        p.case("corruption", f"export of it, {how}", outcome, (root / f"exp_{how[:4]}.safetensors").exists())
    for how in ("missing key", "missing optimizer slot", "int64 weights", "flipped byte"):
        spec = p.write(f"mid_{how[:4]}.json", _spec(epochs=3))
        run = root / f"mid_{how.replace(' ', '_')}"
        p.cli("train", spec, "--out", str(run), "--no-progress", "--no-tensorboard")
        state = json.loads(run.joinpath("results.json").read_text())
        assert state["epochs"] == 3
        if how == "flipped byte":
            _flip(run / "checkpoint.safetensors")
        else:
            _damage_tensor(run / "checkpoint.safetensors", how)
        outcome, _ = p.cli("train", spec, "--out", str(run), "--resume", "--no-progress", "--no-tensorboard")
        p.case("corruption", f"resume from a checkpoint with a {how}", outcome)
    convnet = {"model": "graftnet:convnet", "kwargs": {"in_channels": 1, "num_classes": 10}}  # with BatchNorm
    spec = p.write("sgd.json", {**_spec(optimizer="sgd", lr=1e6, momentum=0.0, epochs=3), "student": convnet})
    outcome, _ = p.cli("train", spec, "--out", str(root / "sgd"), "--no-progress", "--no-tensorboard")
    p.case("corruption", "SGD at lr 1e6", outcome, (root / "sgd" / "student.safetensors").exists())

    print("raw tracebacks before")
    bad = root / "latin1.yaml"
    bad.write_bytes("student: {model: 'graftnet:mlp'}  # caf\xe9\n".encode("latin-1"))
    p.case("input", "spec file not UTF-8", p.cli("check", str(bad))[0])
    (root / "deep.yaml").write_text("a: " + "[" * 3000 + "]" * 3000 + "\n")
    p.case("input", "deeply nested YAML", p.cli("check", str(root / "deep.yaml"))[0])
    (root / "deep.json").write_text('{"a": ' + "[" * 3000 + "]" * 3000 + "}")
    p.case("input", "deeply nested JSON", p.cli("check", str(root / "deep.json"))[0])
    bomb = "student: {model: 'graftnet:mlp', kwargs: {l0: &a0 [x, x, x, x, x, x, x, x, x, x]"
    for i in range(1, 9):
        bomb += f", l{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]"
    (root / "bomb.yaml").write_text(bomb + "}}\n")
    p.case("input", "YAML alias bomb in kwargs", p.cli("check", str(root / "bomb.yaml"))[0])
    for name in ("class", "None", "training", "to", "forward"):
        s = p.write(f"t_{name}.json", {"student": STUDENT, "input_shape": [64], "teachers": {name: STUDENT},
                                       "sites": [{"student": "body.1", "taps": [f"{name}:body.1"]}]})  # fmt: skip
        p.case("input", f"teacher named {name!r}", p.cli("check", s)[0])
    base = p.write("base.json", _spec())
    for override in ("train.lr=[", "sites.0.student=x", "train.epoch=3"):
        p.case("input", f"--set {override}", p.cli("train", base, "--out", str(root / "x"), "--set", override)[0])
    for name, data in (("unknown data.kwargs", {"dataset": "digits", "kwargs": {"sampels": 3}}),
                       ("negative label_map", {"dataset": "digits", "classes": [0, 1], "label_map": {0: -1, 1: 0}})):
        s = p.write(f"{name[:5]}.json", {**_spec(), "data": data})
        p.case("input", name, p.cli("train", s, "--out", str(root / name.replace(" ", "_")), "--no-progress")[0])
    s = p.write("seed.json", _spec(seed=2**63))
    p.case("input", "seed 2**63", p.cli("train", s, "--out", str(root / "seed"), "--no-progress")[0])
    for name, step in (("conv1x1 out_channels 0", {"adapter": "conv1x1", "kwargs": {"out_channels": 0}}),
                       ("resize on a 1-D signal", {"adapter": "resize", "kwargs": {"size": [3]}}),
                       ("resize with a bad mode", {"adapter": "resize", "kwargs": {"size": [3, 3], "mode": "x"}}),
                       ("normalize with strings", {"adapter": "normalize", "kwargs": {"mean": ["a"], "std": ["b"]}})):
        cnn = {"model": "graftnet:cnn1d", "kwargs": {"num_classes": 3, "channels": [4]}}
        s = p.write(f"ia_{name[:6]}.json", {"student": cnn, "input_shape": [1, 40],
                                            "teachers": {"t": {**cnn, "input": [step]}},
                                            "sites": [{"student": "features.act1", "taps": ["t:features.act1"]}]})
        p.case("input", f"input adapter {name}", p.cli("check", s)[0])
    for name, model in (("num_classes -1", {"model": "graftnet:cnn1d", "kwargs": {"num_classes": -1}}),
                        ("channels []", {"model": "graftnet:cnn1d", "kwargs": {"channels": []}}),
                        ("DenseNet depth 7", {"model": "graftnet:densenet_cifar", "kwargs": {"depth": 7}})):
        s = p.write(f"m_{name[:5]}.json", {"student": model, "input_shape": [1, 40]})
        p.case("input", f"model {name}", p.cli("check", s)[0])
    s = p.write("huge.json", {"student": STUDENT, "input_shape": [100000, 100000, 1000]})
    p.case("input", "input_shape of terabytes", p.cli("check", s)[0])
    run, spec = p.finished_run("meta")
    for name, value in (("a JSON list", "[1, 2]"), ("a JSON string", '"x"')):
        target = root / f"meta_{name[-4:]}.safetensors"
        shutil.copy(run / "checkpoint.safetensors", target)
        with safe_open(str(target), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        save_file(tensors, str(target), metadata={"graftnet": value})
        outcome = p.cli("export", str(target), "--out", str(root / "m.st"))[0]
        p.case("input", f"checkpoint metadata is {name}", outcome)
    for key in ("spec", "train_state"):
        target = root / f"meta_no_{key}.safetensors"
        with safe_open(str(run / "checkpoint.safetensors"), framework="pt") as f:
            meta, tensors = json.loads(f.metadata()["graftnet"]), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        meta.pop(key)
        save_file(tensors, str(target), metadata={"graftnet": json.dumps(meta)})
        outcome = p.cli("export", str(target), "--out", str(root / "m.st"))[0]
        p.case("input", f"checkpoint metadata lacks {key}", outcome)
    before = (run / "student.safetensors").read_bytes()
    for name, out in (("a directory", root), ("under a file", run / "results.json" / "x.safetensors")):
        p.case("input", f"export --out {name}", p.cli("export", str(run), "--out", str(out), "--overwrite")[0],
               (run / "student.safetensors").read_bytes() != before)
    (run / "spec.json").write_text((run / "spec.json").read_text()[:40])
    p.case("input", "truncated spec.json, --resume", p.cli("train", spec, "--out", str(run), "--resume",
                                                           "--no-progress")[0])
    run2, _ = p.finished_run("garbage")
    with open(run2 / "metrics.csv", "a") as f:
        f.write("garbage,row,!!\n")
    p.case("input", "garbage row in metrics.csv (plot)", p.cli("plot", str(run2), "--out", str(root / "plots"))[0])
    # a run killed in its first epoch: spec.json and run.json only
    run3, spec3 = p.finished_run("killed")
    for name in ("checkpoint.safetensors", "student.safetensors", "results.json", "metrics.csv"):
        (run3 / name).unlink()
    p.case("input", "a run killed in its first epoch, --resume",
           p.cli("train", spec3, "--out", str(run3), "--resume", "--no-progress", "--no-tensorboard")[0],
           expect="ok")  # fmt: skip
    return p


def main_(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="work folder (default: a temporary one)")
    args = parser.parse_args(argv)
    root = Path(args.out or tempfile.mkdtemp(prefix="graftnet_probe_")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    probe = run_probe(root)
    groups: dict[str, list[tuple[str, str, str, bool]]] = {}
    for row in probe.rows:
        groups.setdefault(row[0], []).append(row)
    print("\n| group | cases | named errors | ok (as expected) | raw tracebacks | data lost |")
    print("| --- | --- | --- | --- | --- | --- |")
    for group, rows in groups.items():
        counts = [sum(r[2] == k for r in rows) for k in ("named", "ok", "raw")]
        print(f"| {group} | {len(rows)} | {counts[0]} | {counts[1]} | {counts[2]} | {sum(r[3] for r in rows)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main_())
