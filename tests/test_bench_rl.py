"""The RL benchmarks stay runnable and print every figure the docs quote from them (examples/README.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("minatar")
BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _check_rows(out: str) -> None:
    lines = out.splitlines()
    in_loop = lines.index(next(line for line in lines if "timed in the loop" in line))
    for case in ("KF, taps at conv and fc", "KF fixed, conv and fc", "KF fixed, taps not cached"):
        row = next(line for line in lines if line.strip().startswith(case) and " ms " in line)
        ratio, limit, of_limit = (float(v) for v in row.split()[len(case.split()):][:3])
        assert 0 < ratio <= 1.5 and 0 < limit <= 1 and 0 < of_limit <= 2
        row = next(line for line in lines[in_loop:] if line.strip().startswith(case))
        slower, limit, of_limit = (float(v) for v in row.split()[len(case.split()):][:3])
        assert 0.5 < slower < 5 and 0 < limit <= 1 and 0 < of_limit <= 2  # the calls in the loop, and that limit


def test_bench_rl_reports_ratio_limit_and_of_limit_for_every_case() -> None:
    _check_rows(_run("bench_rl.py", "--rounds", "1", "--updates", "2"))


@pytest.mark.slow
def test_bench_rl_runs_the_cases_on_atari_frames() -> None:
    pytest.importorskip("ale_py")
    out = _run("bench_rl.py", "--rounds", "1", "--updates", "2", "--env", "ALE/Pong-v5")
    assert "ALE/Pong-v5" in out
    _check_rows(out)


def test_the_overhead_probe_times_every_variant(tmp_path: Path) -> None:
    baseline = tmp_path / "mixer.py"
    baseline.write_text((BENCH.parent / "graftnet" / "mixer.py").read_text())  # a copy stands in for another version
    out = _run("probe_rl_overhead.py", "--rounds", "1", "--updates", "2", "--baseline-mixer", str(baseline))
    rows = [line.split() for line in out.splitlines() if line.startswith("  KF ")]
    variants = {(" ".join(r[:-3]), r[-3]) for r in rows}
    assert variants == {(case, v) for case in ("KF fixed, conv and fc", "KF learned, conv and fc")
                        for v in ("graftnet", "oracle", "baseline")}  # fmt: skip
    assert all(float(r[-2]) > 0 and float(r[-1]) > 0 for r in rows)
    assert "torch " in out  # the versions it ran with
