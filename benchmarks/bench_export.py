"""Exported student vs the original (issue: detacher and export, point 6).

Grafts a timm resnet18 with a resnet50 teacher, makes it independent, exports it through a checkpoint
with `graftnet.export`, loads the file into a fresh resnet18, and times the forward pass of that
exported student against the original student's (interleaved, median), plus file sizes.

Run:  python benchmarks/bench_export.py [--batch 64] [--rounds 30] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file, save_file

import graftnet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    spec = {
        "student": {"model": "timm:resnet18", "kwargs": {"num_classes": 10}},
        "teachers": {"r50": {"model": "timm:resnet50", "kwargs": {"num_classes": 100}}},
        "input_shape": [3, 32, 32],
        "sites": [{"student": "layer1", "taps": ["r50:layer1"]}, {"student": "layer2", "taps": ["r50:layer2"]}],
    }
    g = graftnet.graft(None, None, spec)
    for mixer in g.mixers.values():
        with torch.no_grad():
            mixer.logits.copy_(torch.tensor([30.0] + [0.0] * len(mixer.taps)))
    original = timm.create_model("resnet18", num_classes=10)
    original.load_state_dict(g.student.state_dict())
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = graftnet.save_checkpoint(g, Path(tmp) / "checkpoint.safetensors")
        out = Path(tmp) / "student.safetensors"
        report = graftnet.export(tmp, out)
        exported = timm.create_model("resnet18", num_classes=10)
        exported.load_state_dict(load_file(str(out)), strict=True)
        plain = Path(tmp) / "original.safetensors"
        save_file({k: v.contiguous() for k, v in original.state_dict().items()}, str(plain))
        sizes = {p.name: p.stat().st_size for p in (out, plain, ckpt)}
    x = torch.randn(args.batch, 3, 32, 32)
    original.eval()
    exported.eval()
    times: dict[str, list[float]] = {"original": [], "exported": []}
    with torch.no_grad():
        for _ in range(5):
            original(x)
            exported(x)
        for _ in range(args.rounds):
            for name, model in (("original", original), ("exported", exported)):
                start = time.perf_counter()
                model(x)
                times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, eval forward, batch {args.batch}, 3x32x32, "
          f"median of {args.rounds} interleaved rounds")
    print(f"  original student forward  {med['original'] * 1e3:7.2f} ms")
    print(f"  exported student forward  {med['exported'] * 1e3:7.2f} ms")
    print(f"  latency ratio exported / original = {med['exported'] / med['original']:.3f}")
    print(f"  probe: max |grafted - detached| = {report.max_abs_diff:.2e}, "
          f"argmax agreement {report.argmax_agreement:.0%}")
    exported_size, original_size = sizes["student.safetensors"], sizes["original.safetensors"]
    print(f"  exported file {exported_size:,} B; original student's weights {original_size:,} B "
          f"(ratio {exported_size / original_size:.4f}); grafted checkpoint {sizes['checkpoint.safetensors']:,} B")


if __name__ == "__main__":
    main()
