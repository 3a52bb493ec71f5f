"""Untrusted input ends in a named GraftError, never a raw traceback: one test per case a probe found.

Spec files that are not UTF-8, nested too deeply, or YAML alias bombs; teacher names Python or torch cannot use;
``--set`` overrides that are malformed, index lists, or name a field that does not exist; dataset options the
builder does not take; negative labels; seeds and input shapes out of range; ``graft()`` arguments of the wrong
kind; and what the command line prints when the file system refuses.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import graftnet
from graftnet import AdapterError, DataError, GraftError, ModelSourceError, SpecError
from graftnet.cli import main
from graftnet.data import make_splits
from graftnet.spec import MAX_SEED, load_spec, short_repr, teacher_name_problem

MLP = {"model": "graftnet:mlp", "kwargs": {"in_features": 8, "hidden": [4, 4], "num_classes": 3}}


def spec_with_teacher(name: str) -> dict[str, Any]:
    return {"student": MLP, "teachers": {name: MLP}, "input_shape": [8],
            "sites": [{"student": "body.2", "taps": [f"{name}:body.2"]}]}  # fmt: skip


def spec_error(data: Any) -> str:
    with pytest.raises(SpecError) as info:
        load_spec(data)
    return str(info.value)


# --- spec files -------------------------------------------------------------------------------------------------


def test_a_spec_file_that_is_not_utf8_names_the_byte_and_its_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("student: {model: 'graftnet:mlp'}\ntrain: {label: café}\n".encode("latin-1"))
    msg = spec_error(path)
    assert "not UTF-8" in msg and "byte 0xe9 at line 2, column 19" in msg and "save the file as UTF-8" in msg


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_a_deeply_nested_spec_file_is_refused(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"deep{suffix}"
    path.write_text('{"student": {"model": "graftnet:mlp", "kwargs": {"x": ' + "[" * 50_000 + "]" * 50_000 + "}}}")
    assert "nested too deeply" in spec_error(path)
    shallow_enough_to_parse = tmp_path / f"deep2{suffix}"  # parses, but deeper than a spec needs
    shallow_enough_to_parse.write_text('{"train": {"label": ' + "[" * 150 + "]" * 150 + "}}")
    assert "nested more than 100 levels deep (at train.label[0]" in spec_error(shallow_enough_to_parse)


def test_a_yaml_alias_bomb_is_refused_quickly(tmp_path: Path) -> None:
    lines = ["student:", "  model: 'graftnet:mlp'", "  kwargs:", "    l0: &l0 [" + ", ".join(["lol"] * 9) + "]"]
    lines += [f"    l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 9)]  # 9**9 values
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    start = time.perf_counter()
    for call in (lambda: load_spec(path), lambda: graftnet.graft(None, None, path), lambda: main(["check", str(path)])):
        try:
            assert call() == 2  # main() prints the error and exits 2; the others raise
        except SpecError as e:
            assert "more than 200000 values once its YAML aliases" in str(e) and "student.kwargs.l" in str(e)
    assert time.perf_counter() - start < 5
    path.write_text("a: &a [1, *a]\n")  # an alias inside its own anchor: a list that contains itself
    assert "contains itself (at a[1])" in spec_error(path)


def test_huge_values_are_cut_short_in_messages() -> None:
    huge = list(range(1_000_000))
    with pytest.raises(ModelSourceError) as info:
        graftnet.build_model("graftnet:mlp", {"nonsense": huge}, where="student")
    assert "nonsense" in str(info.value) and len(str(info.value)) < 1000
    assert len(short_repr({"a": [[huge] * 10] * 10})) <= 300


# --- teacher names ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["class", "None", "training", "to", "forward", "keys", "__init__", "ﬁ"])
def test_a_teacher_name_python_or_torch_cannot_use_is_refused_by_the_spec(name: str, tmp_path: Path) -> None:
    msg = spec_error(spec_with_teacher(name))
    assert f"teachers: teacher name {name!r}" in msg
    assert "keyword" in msg or "taken" in msg or "identifier" in msg
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec_with_teacher(name)))
    assert main(["check", str(path)]) == 2  # `graftnet check` no longer passes a spec that cannot run
    with pytest.raises(SpecError, match="graft\\(teachers=…\\): teacher name"):  # the modules given directly
        graftnet.graft(graftnet.build_model(MLP["model"], MLP["kwargs"]),
                       {name: graftnet.build_model(MLP["model"], MLP["kwargs"])}, {"input_shape": [8]})  # fmt: skip


def test_the_list_of_taken_names_covers_every_module_attribute() -> None:
    """The spec keeps a static list (it never imports torch): it must cover the installed torch's attributes."""
    taken = {n for n in set(dir(nn.Module())) | set(dir(nn.ModuleDict())) if not n.startswith("__")}
    uncovered = sorted(n for n in taken if teacher_name_problem(n) is None)
    assert not uncovered, f"add to graftnet.spec._MODULE_ATTRIBUTES: {uncovered}"
    g = graftnet.graft(None, None, spec_with_teacher("teacher_1"))  # an ordinary name still grafts and runs
    assert g(torch.randn(2, 8)).shape == (2, 3)


# --- --set ------------------------------------------------------------------------------------------------------


@pytest.fixture
def spec_file(tmp_path: Path) -> Path:
    path = tmp_path / "run.json"
    path.write_text(json.dumps({**spec_with_teacher("t"), "train": {"method": "scratch"}}))
    return path


def check(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """``graftnet check ARGV``: the exit code, and stderr when it failed or stdout when it passed."""
    code = main(["check", *argv])
    out, err = capsys.readouterr()
    return code, out if code == 0 else err


def test_set_with_malformed_yaml_names_the_override(spec_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = check(capsys, str(spec_file), "--set", "train.lr=[")
    assert code == 2 and "malformed YAML in --set 'train.lr=['" in err and "Traceback" not in err


def test_set_indexes_lists(spec_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = check(capsys, str(spec_file), "--set", "sites.0.student=body.4", "--set", "sites.0.taps.0=t:body.4")
    assert code == 0 and "with --set sites.0.student=body.4 --set sites.0.taps.0=t:body.4: OK" in out
    assert "body.4" in out and "t:body.4" in out
    code, err = check(capsys, str(spec_file), "--set", "sites.3.student=x")
    assert code == 2 and "sites is a list of 1, so '3' must be an index from 0 to 0" in err
    code, err = check(capsys, str(spec_file), "--set", "sites.student=x")
    assert code == 2 and "(e.g. --set sites.0.student=…)" in err
    code, err = check(capsys, str(spec_file), "--set", "train.method.x=1")
    assert code == 2 and "train.method is 'scratch', not a section or a list" in err


def test_set_of_an_unknown_field_names_the_override_and_the_file(
    spec_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = check(capsys, str(spec_file), "--set", "train.epoch=3")
    assert code == 2
    assert f"invalid spec {spec_file} with --set 'train.epoch=3'" in err
    assert "train.epoch: Extra inputs are not permitted (from --set 'train.epoch=3')" in err
    assert "given as a dict" not in err


# --- data -------------------------------------------------------------------------------------------------------


def test_unknown_or_mistyped_data_kwargs_name_data_kwargs_and_the_options() -> None:
    with pytest.raises(DataError) as info:
        make_splits("digits", {"sampels": 3})
    msg = str(info.value)
    assert msg.startswith("data.kwargs: dataset 'digits' does not take {'sampels': 3}")
    assert "its options are test_fraction=0.25, split_seed=0" in msg
    with pytest.raises(DataError, match="data.kwargs: dataset 'digits' cannot be built with {'test_fraction': 'x'}"):
        make_splits("digits", {"test_fraction": "x"})


@pytest.mark.parametrize("label_map", [{0: -1, 1: 0}, {-1: 0}])
def test_negative_labels_in_label_map_are_refused(label_map: dict[int, int]) -> None:
    msg = spec_error({"data": {"dataset": "digits", "classes": [0, 1], "label_map": label_map}})
    assert "data.label_map: label_map {" in msg and "labels are class indices >= 0" in msg
    assert "data.classes: classes are class indices >= 0" in spec_error({"data": {"dataset": "d", "classes": [-1]}})


# --- seeds and shapes -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [-1, 2**32, 2**63, 2**64])
def test_seeds_are_bounded_so_that_derived_seeds_fit(seed: int) -> None:
    msg = spec_error({"train": {"seed": seed}, "data": {"dataset": "digits", "seed": seed}})
    assert "train.seed" in msg and "data.seed" in msg
    with pytest.raises(DataError, match="data.seed must be an integer from 0 to 4294967295"):
        make_splits("digits", seed=seed)
    # what training derives from the largest seed still fits torch's generators
    torch.Generator().manual_seed((MAX_SEED * 1000 + 99) * 1_000_003 + 10_000)


def test_a_ban_seed_leaves_room_for_every_generation() -> None:
    ban = {"student": MLP, "train": {"method": "ban", "ban": {"generations": 3}}}
    load_spec({**ban, "train": {**ban["train"], "seed": 4_294_967}})
    msg = spec_error({**ban, "train": {**ban["train"], "seed": 4_294_968}})
    assert "train.seed * 1000 + k" in msg and "at most 4294967" in msg


def test_input_shapes_that_would_allocate_too_much_or_nothing_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    msg = spec_error({"input_shape": [100_000, 100_000, 1000]})
    assert "input_shape [100000, 100000, 1000] has 10000000000000 elements per sample" in msg and "2**28" in msg
    assert "positive sizes" in spec_error({"input_shape": [3, 0, 32]})
    assert "positive sizes" in spec_error({"input_shape": [-3]})
    assert main(["nodes", "graftnet:mlp", "--input-shape", "100000", "100000"]) == 2
    assert "--input-shape: input_shape [100000, 100000] has 10000000000" in capsys.readouterr().err
    with pytest.raises(SpecError, match="graftnet.sites: input_shape"):
        graftnet.sites(nn.Linear(2, 2), input_shape=(2**20, 2**20))


# --- graft() ----------------------------------------------------------------------------------------------------


def test_graft_arguments_of_the_wrong_kind_are_named() -> None:
    """What the graft fuzzer (tests/test_fuzz.py) found: each raised AttributeError or ran out of memory."""
    spec = spec_with_teacher("t")
    for example in ([torch.randn(2, 8)], torch.randn(2, 8).numpy(), 3.0, (), torch.tensor(1.0)):
        with pytest.raises(GraftError, match="example_input"):
            graftnet.graft(None, None, spec, example_input=example)  # type: ignore[arg-type]
    with pytest.raises(GraftError, match="must map teacher names to modules, got a list"):
        graftnet.graft(None, [nn.Linear(8, 8)], spec)  # type: ignore[arg-type]
    with pytest.raises(GraftError, match="the model is a str"):
        graftnet.sites("timm:resnet18", input_shape=(3, 8, 8))  # type: ignore[arg-type]
    big = {"model": "graftnet:convnet", "kwargs": {"channels": [64], "image_size": 96}}
    dense = {"student": big, "teachers": {"t": big}, "input_shape": [1, 96, 96],
             "sites": [{"student": "features.act1", "taps": ["t:features.act1"], "adapter": "linear"}]}  # fmt: skip
    with pytest.raises(AdapterError, match="dense matrix would hold 347892350976 weights"):
        graftnet.graft(None, None, dense)
    conv = {"model": "graftnet:convnet", "kwargs": {"channels": [4], "image_size": 8}}
    huge = [{"adapter": "resize", "kwargs": {"size": [10**6, 10**6]}}]
    resize = {"student": conv, "teachers": {"t": {**conv, "input": huge}}, "input_shape": [1, 8, 8],
              "sites": [{"student": "features.act1", "taps": ["t:features.act1"]}]}  # fmt: skip
    with pytest.raises(AdapterError, match=r"teachers.t.input\[0\]: input adapter 'resize' would make samples"):
        graftnet.graft(None, None, resize)


# --- the command line -------------------------------------------------------------------------------------------


def test_unreadable_spec_files_are_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, err = check(capsys, str(tmp_path))
    assert code == 2 and "it is a directory; give the YAML or JSON spec file in it" in err
    path = tmp_path / "locked.yaml"
    path.write_text("{}")

    def refuse(self: Path, *args: Any, **kwargs: Any) -> Any:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "open", refuse)  # as chmod 000 would, even when the tests run as root
    code, err = check(capsys, str(path))
    assert code == 2 and "permission denied; check the file's permissions" in err


def test_the_cli_names_os_errors_and_never_prints_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import graftnet.cli

    def full_disk(args: Any) -> None:
        raise OSError(28, "No space left on device", "runs/x/metrics.csv")

    monkeypatch.setattr(graftnet.cli, "_schema", full_disk)
    assert main(["schema"]) == 2
    err = capsys.readouterr().err
    assert "graftnet schema: error: No space left on device: 'runs/x/metrics.csv'" in err
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"\xff\xfe")
    done = subprocess.run([sys.executable, "-m", "graftnet", "check", str(bad)], capture_output=True, text=True)
    assert done.returncode == 2 and "not UTF-8" in done.stderr and "Traceback" not in done.stderr


def test_export_passes_spec_and_allow_unverified_through(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import graftnet.checkpoint

    seen: list[dict[str, Any]] = []

    def spy(source: Any, out: Any, *, tol: float, force: bool, overwrite: bool, spec: Any = None,
            allow_unverified: bool = False) -> Any:  # fmt: skip
        seen.append({"spec": spec, "allow_unverified": allow_unverified})
        raise graftnet.CheckpointError("stop here")

    monkeypatch.setattr(graftnet.checkpoint, "export", spy)
    assert main(["export", "run", "--out", str(tmp_path / "s.safetensors"), "--spec", "trusted.yaml"]) == 2
    assert main(["export", "run", "--out", str(tmp_path / "s.safetensors"), "--allow-unverified"]) == 2
    assert seen == [{"spec": "trusted.yaml", "allow_unverified": False}, {"spec": None, "allow_unverified": True}]
    assert "stop here" in capsys.readouterr().err
