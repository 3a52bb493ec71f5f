"""The speed benchmark stays runnable, and its hand-written model stays the model graftnet builds."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_speed  # noqa: E402


@pytest.mark.parametrize("case", ["mlp", "a3c"])
def test_benchmark_case_runs_and_reports_every_ratio(case: str, capsys: pytest.CaptureFixture[str]) -> None:
    ratios = bench_speed.run_case(case, bench_speed.CASES[case], torch.device("cpu"), rounds=2, warmup=1)
    assert set(ratios) == {
        "machinery", "machinery without adapters", "vs hand-written", "KL extra / student forward",
        "exported / original", "hint extra / student forward",
    }  # fmt: skip
    import math

    # Ratios of two timings are positive; the KL term's extra time is a difference of two timings, which two
    # noisy rounds on a busy machine can make negative, so it only has to be a number.
    for extra in (ratios.pop("KL extra / student forward"), ratios.pop("hint extra / student forward")):
        assert math.isfinite(extra.median)
    assert all(r.median > 0 for r in ratios.values()), ratios
    assert "peak memory of a step" in capsys.readouterr().out


def test_benchmark_reports_mixed_precision(capsys: pytest.CaptureFixture[str]) -> None:
    ratios = bench_speed.run_case("mlp", bench_speed.CASES["mlp"], torch.device("cpu"), rounds=2, warmup=1,
                                  precision="bf16")  # fmt: skip
    assert ratios["vs hand-written"].median > 0
    assert "batch 128, bf16" in capsys.readouterr().out


@pytest.mark.slow
def test_benchmark_reports_compiled_ratios_and_compile_times(capsys: pytest.CaptureFixture[str]) -> None:
    ratios = bench_speed.run_case("mlp", bench_speed.CASES["mlp"], torch.device("cpu"), rounds=2, warmup=1,
                                  compile=True)  # fmt: skip
    assert {"graftnet compiled / eager", "compiled graftnet / compiled hand-written"} <= set(ratios)
    assert "first call of graftnet step (compiled)" in capsys.readouterr().out
