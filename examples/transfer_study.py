"""When does knowledge flow pay off? A transfer study on built-in data (examples/README.md, "Transfer study").

Target task: MNIST-1D digits 0-4 with few labels (``--labels``, default 50 and 250), a 1-D convnet student.
Teachers, trained here on the source digits 5-9 (or 3-9), each a scenario:

- ``related``: the student's own architecture, trained on digits 5-9 (fine-tuning can start from it);
- ``other_arch``: a wider and deeper convnet (4 layers of 64 channels, kernel 3) trained on digits 5-9:
  fine-tuning cannot start from it, knowledge flow maps its layers into the student's through 1×1 adapters;
- ``other_labels``: the student's architecture trained on the 7 digits 3-9 (another label space that
  overlaps the target's 3 and 4): fine-tuning needs a new head, KD has no matching outputs;
- ``good_and_misleading``: ``related`` beside a teacher trained on shuffled labels, both at every site.

Methods per scenario: scratch (shared), fine-tune with a new head (where the architecture matches), knowledge
flow, and knowledge flow from untrained teachers of the same architectures (the control: extra width while
training, no knowledge). KD needs the teacher's output space, which none of these scenarios has; the Table 4
analogue (examples/README.md) covers it. Every method's learning rate is chosen on validation by ``graftnet tune``
(seed 0 over ``--lrs``), then rerun with ``--seeds`` seeds; the table reports the test error of the exported
student alone, and p_w(student) per site when the teachers were cut.

Run:  python examples/transfer_study.py [--out runs/transfer] [--labels 50 250] [--seeds 3] [--jobs 2]
      python examples/transfer_study.py --out runs/transfer_sgd --optimizer sgd --lrs 0.01 0.03 0.1
      python examples/transfer_study.py --out runs/transfer_nofloor --teachers-from runs/transfer \
          --methods knowledge_flow --set train.p_w_floor=null      # a variant of the defaults
Writes OUT/results.md (and a copy of the table to stdout), OUT/results.json, and every tune's folder.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import graftnet
from graftnet.provenance import command_line, versions
from graftnet.spec import override_spec, parse_overrides

SITES = ["features.act1", "features.act2", "features.act3"]
CNN = {"model": "graftnet:cnn1d", "kwargs": {"num_classes": 5, "channels": [32, 32, 32]}}
WIDE = {"model": "graftnet:cnn1d", "kwargs": {"num_classes": 5, "channels": [64, 64, 64, 64], "kernel_size": 3}}
CNN7 = {"model": "graftnet:cnn1d", "kwargs": {"num_classes": 7, "channels": [32, 32, 32]}}
# teacher name → (architecture, source classes, shuffled labels)
TEACHERS = {
    "related": (CNN, [5, 6, 7, 8, 9], False),
    "shuffled": (CNN, [5, 6, 7, 8, 9], True),
    "other_arch": (WIDE, [5, 6, 7, 8, 9], False),
    "other_labels": (CNN7, [3, 4, 5, 6, 7, 8, 9], False),
}
# scenario → (its teachers, whether the student can be fine-tuned from the first)
SCENARIOS = {
    "related": (["related"], True),
    "other_arch": (["other_arch"], False),
    "other_labels": (["other_labels"], True),
    "good_and_misleading": (["related", "shuffled"], False),  # its fine-tune is the related scenario's
}


@dataclass(frozen=True)
class Job:
    """One ``graftnet tune``: a method of a scenario at a label count."""

    scenario: str
    method: str  # scratch, finetune, knowledge_flow, control
    labels: int

    @property
    def name(self) -> str:
        return f"n{self.labels}/{self.scenario}/{self.method}"


def _data(classes: list[int], train_size: int | None, shuffle: bool, samples: int) -> dict[str, Any]:
    return {"dataset": "mnist1d", "kwargs": {"samples": samples}, "classes": classes, "train_size": train_size,
            "val_size": 500, "shuffle_labels": shuffle, "batch_size": 32}  # fmt: skip


def _teacher_weights(out: Path, name: str) -> str:
    return str(out / "teachers" / name / "student.safetensors")


def train_teachers(out: Path, samples: int, epochs: int) -> None:
    for name, (arch, classes, shuffle) in TEACHERS.items():
        run_dir = out / "teachers" / name
        if (run_dir / "results.json").is_file():
            continue
        spec = {"student": arch, "data": _data(classes, None, shuffle, samples),
                "train": {"method": "scratch", "epochs": epochs, "lr": 3e-3, "threads": 1, "label": name}}  # fmt: skip
        r = graftnet.train(spec, run_dir, overwrite=True, progress=False, tensorboard=False)
        print(f"teacher {name}: test error {r.test_error:.2f}% on its source task", flush=True)


def job_spec(job: Job, out: Path, samples: int, epochs: int, optimizer: str = "adam") -> dict[str, Any]:
    spec: dict[str, Any] = {"student": CNN, "data": _data([0, 1, 2, 3, 4], job.labels, False, samples)}
    train: dict[str, Any] = {"method": job.method, "epochs": epochs, "optimizer": optimizer, "threads": 1}
    teachers = SCENARIOS[job.scenario][0] if job.method != "scratch" else []
    if job.method == "finetune":
        spec["teachers"] = {"t": {**TEACHERS[teachers[0]][0], "weights": _teacher_weights(out, teachers[0])}}
        train["finetune"] = {"teacher": "t", "reinit": ["head"]}
    elif job.method in ("knowledge_flow", "control"):
        trained = job.method == "knowledge_flow"
        weights = {name: _teacher_weights(out, name) if trained else None for name in teachers}
        spec["teachers"] = {name: {**TEACHERS[name][0], "weights": weights[name]} for name in teachers}
        spec["sites"] = [{"student": s, "taps": [f"{name}:{s}" for name in teachers]} for s in SITES]
        train["method"] = "knowledge_flow"
    spec["train"] = train
    return spec


def run_job(
    job: Job,
    out: str,
    samples: int,
    epochs: int,
    lrs: list[float],
    seeds: int,
    kf_settings: dict[str, Any],
    optimizer: str = "adam",
    choose_seeds: int = 1,
) -> dict[str, Any]:
    out_dir = Path(out)
    spec = job_spec(job, out_dir, samples, epochs, optimizer)
    if job.method in ("knowledge_flow", "control") and kf_settings:
        spec = override_spec(spec, kf_settings).model_dump(mode="json")
    r = graftnet.tune(spec, {"train.lr": lrs}, out_dir / job.name, seeds=seeds, choose_seeds=choose_seeds,
                      label=job.method, log=lambda _: None)  # fmt: skip
    return {"job": job.__dict__, "chosen": r.chosen, "test": r.errors("test_error"), "val": r.errors("val_error"),
            "forced": r.forced_exports, "p_w": [p_w_at_cut(t.result.run_dir) for t in r.seeds if t.failed is None],
            "failed": r.failures, "at_edge": bool(r.at_edge)}  # fmt: skip


def p_w_at_cut(run_dir: Path) -> dict[str, float]:
    """p_w(student) per site in the last epoch before the teachers were cut (from the run's metrics.csv)."""
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    before = [row for row in rows if row.get("teachers_cut") in ("0", "0.0")] or rows
    last = before[-1]
    return {k.split("/")[1]: float(v) for k, v in last.items() if k.startswith("p_w/") and k.endswith("/student")}


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.2f} ± {sd:.2f}"


LABELS = {"scratch": "scratch", "finetune": "fine-tune, new head", "kd": "KD", "knowledge_flow": "knowledge flow",
          "control": "knowledge flow, untrained teachers (control)"}  # fmt: skip


def table(results: list[dict[str, Any]], label_counts: list[int]) -> list[str]:
    by = {(r["job"]["labels"], r["job"]["scenario"], r["job"]["method"]): r for r in results}
    lines = ["| labels | scenario | method | chosen lr | test error (%) | val error (%) | p_w(student) at cut, "
             "per site (min over seeds) | forced exports |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for n in label_counts:
        for scenario in ["-", *SCENARIOS]:
            for method in LABELS:
                r = by.get((n, scenario, method))
                if r is None:
                    continue
                pw = "-"
                if r["p_w"] and r["p_w"][0]:
                    pw = ", ".join(f"{min(p[s] for p in r['p_w']):.4f}" for s in r["p_w"][0])
                lr = f"{r['chosen']['train.lr']:g}" + (" (edge)" if r.get("at_edge") else "")
                lines.append(f"| {n} | {scenario} | {LABELS[method]} | {lr} | "
                             f"{mean_std(r['test'])} | {mean_std(r['val'])} | {pw} | {r['forced']} |")  # fmt: skip
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/transfer")
    parser.add_argument("--labels", type=int, nargs="+", default=[50, 250])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--teacher-epochs", type=int, default=20)
    parser.add_argument("--samples", type=int, default=10000, help="MNIST-1D samples generated")
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-3, 1e-2, 3e-2])
    parser.add_argument("--optimizer", choices=["adam", "sgd"], default="adam",
                        help="every student's optimizer (the teachers are trained with Adam either way); with sgd "
                        "pass larger --lrs, e.g. 0.01 0.03 0.1")  # fmt: skip
    parser.add_argument("--jobs", type=int, default=2, help="tunes at a time (one thread each)")
    parser.add_argument("--choose-seeds", type=int, default=1, metavar="N",
                        help="choose each learning rate on the mean validation error of N seeds (graftnet tune)")
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    parser.add_argument("--methods", nargs="+", default=list(LABELS), choices=[m for m in LABELS if m != "kd"])
    parser.add_argument("--teachers-from", metavar="OUT", help="use the teachers of an earlier study's --out")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a spec override for the knowledge-flow runs (and their control), e.g. "
                        "--set train.p_w_floor=null: a variant of the defaults, in its own --out")  # fmt: skip
    args = parser.parse_args()
    kf_settings = parse_overrides(args.set)[0]
    out = Path(args.out)
    if args.teachers_from:  # a variant reuses the main study's teachers
        (out / "teachers").parent.mkdir(parents=True, exist_ok=True)
        if not (out / "teachers").exists():
            (out / "teachers").symlink_to(Path(args.teachers_from).resolve() / "teachers")
    train_teachers(out, args.samples, args.teacher_epochs)
    jobs = [Job("-", "scratch", n) for n in args.labels if "scratch" in args.methods]
    for n in args.labels:
        for scenario in args.scenarios:
            _, can_finetune = SCENARIOS[scenario]
            methods = (["finetune"] if can_finetune else []) + ["knowledge_flow", "control"]
            jobs += [Job(scenario, m, n) for m in methods if m in args.methods]
    with ProcessPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(run_job, j, str(out), args.samples, args.epochs, args.lrs, args.seeds, kf_settings,
                               args.optimizer, args.choose_seeds)
                   for j in jobs]  # fmt: skip
        results = []
        for job, future in zip(jobs, futures, strict=True):
            results.append(future.result())
            print(f"done {job.name}: test {mean_std(results[-1]['test'])}", flush=True)
    stamp = ", ".join(f"{k} {v}" for k, v in versions().items())
    chosen_on = f" (mean of {args.choose_seeds} seeds)" if args.choose_seeds > 1 else ""
    header = [f"Command: `{command_line()}`", "", f"Versions: {stamp}", "",
              f"Test error (%) of the exported student alone, mean ± std over {args.seeds} seeds; {args.optimizer}, "
              f"learning rate chosen on validation{chosen_on} by graftnet tune over {args.lrs} (edge: the grid's "
              "smallest or largest value, so the best may lie beyond it).", ""]  # fmt: skip
    lines = header + table(results, args.labels)
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
