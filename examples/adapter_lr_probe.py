"""A probe, not a graftnet setting: run a study script with the adapters' learning rate at a fraction of train.lr.

`train.lr_adapters` is absolute, so a learning-rate grid cannot keep it at a fixed fraction of `train.lr`; this
wraps the optimizer groups so that, where `lr_adapters` is unset, the adapters get `train.lr × ADAPTER_RATIO`
instead of their default (`TrainSpec.adapter_lr`: lr under Adam, lr / 10 under SGD, chosen with this probe:
examples/README.md, "The adapters' learning rate under SGD"). Runs in forked workers inherit it.

Run:  ADAPTER_RATIO=0.1 python examples/adapter_lr_probe.py examples/transfer_study.py --out runs/adam_oa_r01 \\
          --scenarios other_arch --methods knowledge_flow --lrs 0.003 0.01 0.03 --choose-seeds 3
"""

from __future__ import annotations

import os
import runpy
import sys
from typing import Any

from graftnet.training import objectives, optim

RATIO = float(os.environ.get("ADAPTER_RATIO", "1"))
_param_groups = optim.param_groups


def param_groups(model: Any, settings: Any, total_steps: int | None = None) -> list[dict[str, Any]]:
    groups = _param_groups(model, settings, total_steps)
    if settings.lr_adapters is None:
        for group in groups:
            if group["name"] == "adapters":
                group["lr"] = settings.lr * RATIO
    return groups


if __name__ == "__main__":
    objectives.param_groups = param_groups  # type: ignore[attr-defined]
    script = sys.argv[1]
    sys.argv = [script, *sys.argv[2:]]
    runpy.run_path(script, run_name="__main__")
