"""The paper's Table 4 setup (``specs/paper/mnist_distill_2x800.yaml``) on built-in data: digits, 300 labels.

A 2×1200 MLP teacher with dropout learns scikit-learn's digits from the whole training split; a 2×800 student
learns the same task from 300 labels, by these methods on equal terms: alone (scratch), Hinton KD from the
teacher (T = 20, α = 0.9, as the paper), and knowledge flow with the teacher's hidden layers mapped into the
student's by learned linear adapters — and, as ``knowledge_flow_output``, the student's logits mixed with the
teacher's as well (the ``output`` site), and as ``knowledge_flow_kd`` with KD's loss as its task loss
(``train.kd.with_knowledge_flow``). Batch 32 × 100 epochs. Each method's learning rate is chosen on
validation by ``graftnet tune``, under SGD (the spec's optimizer) and under Adam, then rerun with 3 seeds.

Run:  python examples/table4_digits.py [--out runs/table4] [--seeds 3] [--jobs 2]
Writes OUT/results.md (the table, with the command and versions) and every tune's folder.
"""

from __future__ import annotations

import argparse
import json
import statistics
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import graftnet
from graftnet.provenance import command_line, versions
from graftnet.spec import override_spec, parse_overrides

STUDENT = {"model": "graftnet:mlp", "kwargs": {"in_features": 64, "hidden": [800, 800], "num_classes": 10}}
TEACHER = {"model": "graftnet:mlp",
           "kwargs": {"in_features": 64, "hidden": [1200, 1200], "num_classes": 10, "dropout": 0.5}}  # fmt: skip
LRS = {"sgd": [0.01, 0.05, 0.1], "adam": [1e-3, 3e-3, 1e-2]}
METHODS = {"scratch": "student alone", "kd": "KD (T = 20, α = 0.9)", "knowledge_flow": "knowledge flow",
           "knowledge_flow_output": "knowledge flow, hidden layers and the output",
           "knowledge_flow_kd": "knowledge flow + KD loss (T = 20, α = 0.9)"}
HIDDEN_SITES = [{"student": "body.2", "taps": ["big:body.2"]}, {"student": "body.4", "taps": ["big:body.5"]}]
# The paper's student "benefits not only from the output layer behavior of the teacher but also from intermediate
# layer representations": its logits mix with the teacher's too (the `output` site).
OUTPUT_SITE = {"student": "output", "taps": ["big:output"]}


def _data(train_size: int | None) -> dict[str, Any]:
    return {"dataset": "digits", "train_size": train_size, "val_size": 300, "batch_size": 32}


def teacher(out: Path) -> Path:
    run_dir = out / "teacher"
    if not (run_dir / "results.json").is_file():
        spec = {"student": TEACHER, "data": _data(None),
                "train": {"method": "scratch", "epochs": 60, "optimizer": "sgd", "lr": 0.05, "threads": 1}}  # fmt: skip
        r = graftnet.train(spec, run_dir, overwrite=True, progress=False, tensorboard=False)
        print(f"teacher: test error {r.test_error:.2f}%", flush=True)
    return run_dir / "student.safetensors"


def run(method: str, optimizer: str, out: str, weights: str, seeds: int, kf_settings: dict[str, Any],
        lrs: list[float], choose_seeds: int = 1) -> dict[str, Any]:  # fmt: skip
    train = {"method": method, "epochs": 100, "optimizer": optimizer, "threads": 1}
    spec: dict[str, Any] = {"student": STUDENT, "data": _data(300), "train": train}
    if method != "scratch":
        spec["teachers"] = {"big": {**TEACHER, "weights": weights}}
    if method in ("kd", "knowledge_flow_kd"):
        spec["train"]["kd"] = {"teacher": "big", "temperature": 20.0, "alpha": 0.9,
                               "with_knowledge_flow": method == "knowledge_flow_kd"}  # fmt: skip
    if method.startswith("knowledge_flow"):
        spec["train"]["method"] = "knowledge_flow"
        spec["sites"] = HIDDEN_SITES + ([OUTPUT_SITE] if method == "knowledge_flow_output" else [])
        spec = override_spec(spec, kf_settings).model_dump(mode="json")
    r = graftnet.tune(spec, {"train.lr": lrs}, Path(out) / optimizer / method, seeds=seeds, choose_seeds=choose_seeds,
                      label=METHODS[method], log=lambda _: None)  # fmt: skip
    pw = [t.result.min_p_w_student for t in r.seeds if t.result.min_p_w_student is not None]
    return {"method": method, "optimizer": optimizer, "chosen": r.chosen["train.lr"], "test": r.errors("test_error"),
            "val": r.errors("val_error"), "min_p_w": min(pw) if pw else None, "forced": r.forced_exports,
            "diverged": [t.setting["train.lr"] for t in r.trials if t.failed], "at_edge": bool(r.at_edge)}  # fmt: skip


def _ms(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.2f} ± {sd:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/table4")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--choose-seeds", type=int, default=1, metavar="N",
                        help="choose each learning rate on the mean validation error of N seeds (graftnet tune)")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--optimizers", nargs="+", choices=list(LRS), default=list(LRS))
    for name, default in LRS.items():
        parser.add_argument(f"--{name}-lrs", type=float, nargs="+", default=default, metavar="LR",
                            help=f"the learning rates tune tries with {name} (default: {default})")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a spec override for the knowledge-flow runs: a variant of the defaults, in its own --out")
    args = parser.parse_args()
    kf_settings = parse_overrides(args.set)[0]
    out = Path(args.out)
    weights = str(teacher(out))
    jobs = [(m, o) for o in args.optimizers for m in args.methods]
    lrs = {name: getattr(args, f"{name}_lrs") for name in LRS}
    with ProcessPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(run, *zip(*jobs, strict=True), [str(out)] * len(jobs), [weights] * len(jobs),
                             [args.seeds] * len(jobs), [kf_settings] * len(jobs),
                             [lrs[o] for _, o in jobs], [args.choose_seeds] * len(jobs)))  # fmt: skip
    stamp = ", ".join(f"{k} {v}" for k, v in versions().items())
    lines = [f"Command: `{command_line()}`; {stamp}.", "",
             f"Test error (%) on digits (300 labels), exported student alone, mean ± std over {args.seeds} seeds; "
             "learning rate chosen on validation" + (f" (mean of {args.choose_seeds} seeds)" if args.choose_seeds > 1
                                                    else "") + " by graftnet tune over "
             + "; ".join(f"{o} {lrs[o]}" for o in args.optimizers) + " (edge: the grid's smallest or largest value, "
             "so the best may lie beyond it).", "",
             "| optimizer | method | chosen lr | test error (%) | val error (%) | min p_w(student) | forced exports "
             "| diverged in the grid |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in rows:
        pw = "-" if r["min_p_w"] is None else f"{r['min_p_w']:.4f}"
        counts = {v: r["diverged"].count(v) for v in r["diverged"]}  # a learning rate per diverged run (seed)
        diverged = ", ".join(f"lr {v:g}" + (f" ({n} seeds)" if n > 1 else "") for v, n in counts.items()) or "-"
        lr = f"{r['chosen']:g}" + (" (edge)" if r.get("at_edge") else "")
        lines.append(f"| {r['optimizer']} | {METHODS[r['method']]} | {lr} | {_ms(r['test'])} | "
                     f"{_ms(r['val'])} | {pw} | {r['forced']} | {diverged} |")  # fmt: skip
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
