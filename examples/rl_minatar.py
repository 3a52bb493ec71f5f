"""Knowledge flow in reinforcement learning on MinAtar SpaceInvaders: the comparison in examples/README.md.

Trains the teachers (two non-experts from other games, Breakout and Asterix, and an expert on SpaceInvaders
itself) unless their runs exist, then, for each seed, four A2C students on the same frame budget:
scratch, fine-tuned from the Breakout teacher, knowledge flow from the two non-expert teachers, and knowledge
flow from the expert. Two runs at a time (one thread each), each its own ``graftnet train`` process.
Writes ``RUNS/results.md`` (the detached students' evaluation returns, mean ± std over seeds) and the return
and p_w plots (mean ± std over seeds) into ``RUNS/plots``.

Run:  python examples/rl_minatar.py [--runs runs/rl] [--seeds 0 1 2] [--frames 2000000] [--jobs 2] [--methods ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from graftnet.provenance import command_line, versions

SPECS = Path(__file__).resolve().parents[1] / "specs" / "rl"
TEACHERS = {
    "teacher_breakout": "minatar_teacher_breakout.yaml",
    "teacher_asterix": "minatar_teacher_asterix.yaml",
    "expert_spaceinvaders": "minatar_expert_spaceinvaders.yaml",
}
STUDENTS = {  # label: (spec, method)
    "scratch": ("minatar_spaceinvaders_kf.yaml", "scratch"),
    "fine-tune from Breakout": ("minatar_spaceinvaders_kf.yaml", "finetune"),
    "knowledge flow, Breakout + Asterix (non-experts)": ("minatar_spaceinvaders_kf.yaml", "knowledge_flow"),
    "knowledge flow, SpaceInvaders expert": ("minatar_spaceinvaders_kf_expert.yaml", "knowledge_flow"),
}


def _teacher_weights(spec: str, runs: Path) -> list[str]:
    """``--set`` items that point the spec's teacher weights (written for ``runs/rl``) into ``runs``."""
    import yaml

    teachers = yaml.safe_load((SPECS / spec).read_text()).get("teachers") or {}
    return [f"teachers.{name}.weights={runs / Path(t['weights']).parent.name / 'student.safetensors'}"
            for name, t in teachers.items() if t.get("weights")]  # fmt: skip


def _train(spec: str, out: Path, *overrides: str) -> dict:
    if not (out / "results.json").is_file():
        cmd = [sys.executable, "-m", "graftnet", "train", str(SPECS / spec), "--out", str(out), "--no-progress",
               "--overwrite"]  # fmt: skip
        for item in overrides:
            cmd += ["--set", item]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        print(f"  done: {out}", flush=True)
    return json.loads((out / "results.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="runs/rl")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--frames", type=int, default=2_000_000)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--methods", nargs="+", choices=list(STUDENTS), default=list(STUDENTS), metavar="LABEL",
                        help="the students to train (default all): " + "; ".join(STUDENTS))  # fmt: skip
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a spec override for the knowledge-flow students, e.g. --set train.feature_hint=0.3: a "
                        "variant, in its own --runs")  # fmt: skip
    args = parser.parse_args()
    students = {label: STUDENTS[label] for label in args.methods}
    experts = any("expert" in spec for spec, _ in students.values())
    teachers = {k: v for k, v in TEACHERS.items() if experts or not k.startswith("expert")}
    runs = Path(args.runs)
    with ThreadPoolExecutor(args.jobs) as pool:  # threads only wait on the training processes
        print("teachers", flush=True)
        list(pool.map(lambda kv: _train(kv[1], runs / kv[0]), teachers.items()))
        print(f"students: {len(students)} methods x seeds {args.seeds}, {args.frames:,} frames each", flush=True)
        jobs = {
            (label, seed): pool.submit(
                _train, spec, runs / f"{method}_{Path(spec).stem.split('_')[-1]}_seed{seed}",
                f"train.method={method}", f"train.seed={seed}", f"rl.frames={args.frames}",
                f"train.label={label}", *(_teacher_weights(spec, runs) if method != "scratch" else []),
                *(args.set if method == "knowledge_flow" else []),
            )
            for seed in args.seeds
            for label, (spec, method) in students.items()
        }  # fmt: skip
        results = {key: job.result() for key, job in jobs.items()}
    stamp = ", ".join(f"{k} {v}" for k, v in versions().items())
    lines = [
        f"Command: `{command_line()}`; {stamp}.",
        "",
        f"Detached students on MinAtar SpaceInvaders-v1 after {args.frames:,} frames: mean return of "
        f"{len(next(iter(results.values()))['eval_returns'])} evaluation episodes, then mean ± std over seeds "
        f"{args.seeds}.",
        "",
        "| method | return | per seed | min p_w(student) at cut | training time |",
        "| --- | --- | --- | --- | --- |",
    ]
    for label in students:
        per_seed = [results[(label, s)]["eval_mean"] for s in args.seeds]
        spread = statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0
        p_w = [results[(label, s)]["min_p_w_student"] for s in args.seeds]
        p_w_text = "-" if p_w[0] is None else f"{min(p_w):.4f}"
        seconds = statistics.fmean(results[(label, s)]["seconds"] for s in args.seeds)
        lines.append(f"| {label} | {statistics.fmean(per_seed):.2f} ± {spread:.2f} | "
                     f"{', '.join(f'{v:.1f}' for v in per_seed)} | {p_w_text} | {seconds:.0f} s |")  # fmt: skip
    (runs / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    every = [str(runs / f"{m}_{Path(sp).stem.split('_')[-1]}_seed{s}")
             for sp, m in students.values() for s in args.seeds]  # fmt: skip
    subprocess.run([sys.executable, "-m", "graftnet", "plot", *every, "--out", str(runs / "plots")], check=True)


if __name__ == "__main__":
    main()
