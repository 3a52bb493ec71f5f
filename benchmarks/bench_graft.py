"""Cost of graftnet's machinery on a training step (issue: grafting core, point 10).

Times, in one run and interleaved (median of rounds):
  * grafted step  — forward, cross-entropy, backward, SGD step of a timm resnet18 grafted with a resnet50
                    teacher tapped at layer1 and layer2;
  * student step  — the same on the plain student;
  * teacher→layer2 — a hand-written eager forward of the resnet50 stem, layer1 and layer2 under no_grad;
  * full teacher  — the whole resnet50 forward under no_grad.
Prints overhead = grafted / (student + teacher→layer2), target ≤ 1.10, and what truncation saves.

Run:  python benchmarks/bench_graft.py [--batch 64] [--rounds 15] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import timm
import torch
import torch.nn.functional as F

import graftnet


def _time(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    student = timm.create_model("resnet18", num_classes=10)
    plain = timm.create_model("resnet18", num_classes=10)
    plain.load_state_dict(student.state_dict())
    teacher = timm.create_model("resnet50", num_classes=100)
    spec = {
        "input_shape": [3, 32, 32],
        "sites": [
            {"student": "layer1", "taps": ["r50:layer1"]},
            {"student": "layer2", "taps": ["r50:layer2"]},
        ],
    }
    g = graftnet.graft(student, {"r50": teacher}, spec).train()
    plain.train()
    x = torch.randn(args.batch, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch,))
    opt_g = torch.optim.SGD([p for p in g.parameters() if p.requires_grad], lr=1e-3)
    opt_s = torch.optim.SGD(plain.parameters(), lr=1e-3)

    def grafted_step() -> None:
        opt_g.zero_grad(set_to_none=True)
        F.cross_entropy(g(x), y).backward()
        opt_g.step()

    def student_step() -> None:
        opt_s.zero_grad(set_to_none=True)
        F.cross_entropy(plain(x), y).backward()
        opt_s.step()

    @torch.no_grad()
    def teacher_to_layer2() -> None:
        t = teacher
        t.layer2(t.layer1(t.maxpool(t.act1(t.bn1(t.conv1(x))))))

    @torch.no_grad()
    def teacher_full() -> None:
        teacher(x)

    def truncated_teacher() -> None:
        g.teachers["r50"](x)

    cases = {
        "grafted step": grafted_step,
        "student step": student_step,
        "teacher to layer2 (eager)": teacher_to_layer2,
        "teacher, graftnet-truncated": truncated_teacher,
        "teacher, full forward": teacher_full,
    }
    for _ in range(args.warmup):
        for fn in cases.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, fn in cases.items():
            times[name].append(_time(fn))
    med = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, 3x32x32, "
          f"median of {args.rounds} interleaved rounds")
    for name, t in med.items():
        print(f"  {name:<30} {t * 1e3:8.1f} ms")
    overhead = med["grafted step"] / (med["student step"] + med["teacher to layer2 (eager)"])
    print(f"overhead = grafted / (student + teacher to layer2) = {overhead:.3f}  (target <= 1.10)")
    saved = med["teacher, full forward"] - med["teacher, graftnet-truncated"]
    print(f"truncation: teacher forward {med['teacher, graftnet-truncated'] * 1e3:.1f} ms instead of "
          f"{med['teacher, full forward'] * 1e3:.1f} ms, saving {saved * 1e3:.1f} ms per step "
          f"({saved / med['teacher, full forward']:.0%} of the teacher)")


if __name__ == "__main__":
    main()
