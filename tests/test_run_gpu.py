"""benchmarks/run_gpu.sh stays ready for the day a GPU is lent: each of its commands is one its benchmark accepts and
runs on CUDA, the time limits fit the 5 minutes it promises, and without CUDA it stops at once, saying why."""

from __future__ import annotations

import importlib
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "run_gpu.sh"
sys.path.insert(0, str(ROOT / "benchmarks"))


def _runs() -> list[tuple[str, int, list[str]]]:
    """(name, time limit in seconds, command) of each ``run NAME LIMIT COMMAND...`` line."""
    runs = []
    for line in SCRIPT.read_text().splitlines():
        if line.startswith("run "):
            _, name, limit, *command = shlex.split(line)
            runs.append((name, int(limit), command))
    return runs


def test_the_gpu_script_is_valid_bash() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_every_benchmark_of_the_gpu_script_parses_its_arguments_and_runs_on_cuda() -> None:
    runs = _runs()
    seen = set()
    for name, _, command in runs:
        assert command[0] == "python" and command[1].startswith("benchmarks/"), (name, command)
        module = importlib.import_module(Path(command[1]).stem)  # bench_speed or bench_rl: their own parsers
        args = module.parse_args(command[2:])
        assert args.device == "cuda", name
        seen.add((Path(command[1]).stem, getattr(args, "precision", None), getattr(args, "compile", None)))
    # every ratio of the fast-path issue: fp32, bf16, fp16 and compiled speed, and the RL cases
    assert {("bench_speed", p, False) for p in ("fp32", "bf16", "fp16")} | {("bench_speed", "fp32", True)} <= seen
    assert any(stem == "bench_rl" for stem, *_ in seen)
    assert sum(limit for _, limit, _ in runs) <= 300  # the limits themselves keep it under 5 minutes


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the script would run the benchmarks")
def test_without_cuda_the_gpu_script_stops_before_any_benchmark(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # this python
    done = subprocess.run(["bash", str(SCRIPT), str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode != 0
    assert "run_gpu.sh: torch sees no CUDA device" in done.stderr
    assert "==" not in done.stdout  # no benchmark started
    (out,) = tmp_path.iterdir()
    assert [p.name for p in out.iterdir()] == ["device.txt"]
