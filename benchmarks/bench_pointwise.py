"""The conv1x1 input adapter as a batched matrix product against ``nn.Conv2d``: forward, and forward + backward.

oneDNN's 1×1 convolution is slow for the few channels of an input (Atari frames, MinAtar boards, RGB), which is
why ``graftnet.adapters.PointwiseConv2d`` computes it with ``torch.baddbmm``; for wide feature maps the convolution
can be the faster one, which is why the tap adapters stay convolutions. Medians of ``--repeats`` calls.

Run:  python benchmarks/bench_pointwise.py [--threads 1] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from graftnet.adapters import PointwiseConv2d
from graftnet.provenance import command_line, versions

SHAPES = {  # (batch, channels in, size, channels out)
    "Atari update: 80 × 4×84×84 → 4": (80, 4, 84, 4),
    "Atari step: 16 × 4×84×84 → 4": (16, 4, 84, 4),
    "MinAtar update: 80 × 6×10×10 → 4": (80, 6, 10, 4),
    "RGB: 32 × 3×224×224 → 3": (32, 3, 224, 3),
    "feature map: 64 × 64×56×56 → 256": (64, 64, 56, 256),
    "feature map: 64 × 256×8×8 → 512": (64, 256, 8, 512),
}


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # oneDNN builds its primitive on the first call
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _forward_and_backward(module: torch.nn.Module, x: torch.Tensor, repeats: int) -> tuple[float, float]:
    params = list(module.parameters())
    forward = _median_ms(lambda: module(x), repeats)
    both = _median_ms(lambda: torch.autograd.grad(module(x).sum(), params), repeats)
    return forward, both


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(command_line())
    print(", ".join(f"{k} {v}" for k, v in versions().items()), f"| {torch.get_num_threads()} thread(s)")
    print(f"  {'input → out channels':<36} {'conv fwd':>9} {'product':>9} {'conv f+b':>9} {'product':>9}  (ms)")
    for name, (b, c, size, o) in SHAPES.items():
        torch.manual_seed(0)
        conv = torch.nn.Conv2d(c, o, kernel_size=1)
        pointwise = PointwiseConv2d(c, o)
        pointwise.load_state_dict(conv.state_dict())
        x = torch.randn(b, c, size, size)
        (cf, cb), (pf, pb) = (_forward_and_backward(m, x, args.repeats) for m in (conv, pointwise))
        print(f"  {name:<36} {cf:9.2f} {pf:9.2f} {cb:9.2f} {pb:9.2f}")


if __name__ == "__main__":
    main()
