"""Shared test setup: every test starts from the same random state, on one intra-op thread."""

from __future__ import annotations

import pytest
import torch

# The test models are tiny (32×32 inputs, batches of 2–4): one thread is as fast as two on an idle 2-core
# machine, and when another process shares the cores, OpenMP's thread barriers made the model tests ~10×
# slower with two threads (measured: 15 s → 145 s for the DenseNet tests beside one busy process).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
