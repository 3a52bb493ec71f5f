"""The command line: ``graftnet nodes``, ``check``, ``schema`` and their error handling."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from graftnet.cli import main

ROOT = Path(__file__).parent.parent


def test_nodes_lists_names_and_shapes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["nodes", "graftnet:a3c"]) == 0
    out = capsys.readouterr().out
    assert "(4, 84, 84)" in out
    lines = [line.split()[:1] for line in out.splitlines()[2:]]
    assert lines == [["features.1"], ["features.3"], ["act"]]
    assert "(16, 20, 20)" in out and "(32, 9, 9)" in out and "(256,)" in out


def test_nodes_with_input_shape_and_kwargs(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["nodes", "timm:resnet18", "--input-shape", "3", "32", "32", "--kwargs", "{num_classes: 10}"]) == 0
    out = capsys.readouterr().out
    assert "17 graftable activations" in out
    assert "layer4.1.act2" in out and "(512, 1, 1)" in out and "in-place" in out


def test_check_prints_the_plan(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(ROOT / "specs" / "resnet18_two_teachers.yaml")]) == 0
    out = capsys.readouterr().out
    assert "layer1.1.act2" in out and "r50:layer1.2.act3" in out
    assert "cut:  layer3, layer4, global_pool, fc" in out
    assert "MapAdapter" in out and "total added for training" in out


def test_errors_exit_2_with_a_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("student: {model: 'graftnet:mlp'}\ninput_shape: [784]\nsites: [{student: nope, taps: ['t:x']}]\n")
    assert main(["check", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "graftnet check: error:" in err and "nope" in err and "graftnet nodes" in err
    assert main(["nodes", "mypkg_that_does_not_exist.models:net"]) == 2
    assert "cannot import" in capsys.readouterr().err


def test_schema_command_prints_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema"]) == 0
    assert json.loads(capsys.readouterr().out)["title"] == "Spec"


def test_console_script_runs_as_module() -> None:
    result = subprocess.run([sys.executable, "-m", "graftnet", "--version"], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "0.1.0"


def test_export_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    import graftnet

    spec = {
        "student": {"model": "graftnet:a3c_minatar", "kwargs": {"in_channels": 4}},
        "teachers": {"t": {"model": "graftnet:a3c_minatar", "kwargs": {"in_channels": 4}}},
        "input_shape": [4, 10, 10],
        "sites": [{"student": "act", "taps": ["t:act"]}],
    }
    g = graftnet.graft(None, None, spec)
    graftnet.save_checkpoint(g, tmp_path / "run" / "checkpoint.safetensors")
    out = tmp_path / "student.safetensors"
    assert main(["export", str(tmp_path / "run"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "act: p_w(student) = 0.500000" in err and not out.exists()
    with torch.no_grad():
        g.mixers["act"].logits.copy_(torch.tensor([30.0, 0.0]))
    graftnet.save_checkpoint(g, tmp_path / "run" / "checkpoint.safetensors")
    assert main(["export", str(tmp_path / "run"), "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "argmax agreement = 100.0%" in stdout and out.exists()
    assert main(["export", str(tmp_path / "run"), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "run"), "--out", str(out), "--overwrite", "--tol", "0.1"]) == 0


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["schema"], ["check"], ["check", "/nonexistent/spec.yaml"], ["check", "{bad_spec}"]],
    ids=["help", "schema", "check-no-argument", "check-missing-file", "check-invalid-spec"],
)
def test_commands_that_need_no_model_start_without_importing_torch(argv: list[str], tmp_path: Path) -> None:
    # torch and timm take seconds to import; these answers must come at once (issue 15: start-up <= 1.5 s)
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {lr: -1}\n")
    argv = [str(bad) if a == "{bad_spec}" else a for a in argv]
    probe = ("import sys\nfrom graftnet.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
             "print('IMPORTED', sorted(m for m in ('torch', 'timm', 'torchvision') if m in sys.modules))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, timeout=120).stdout
    assert "IMPORTED []" in out, out[-500:]
