"""Every user mistake raises the right GraftError subclass, saying what is wrong, where, and how to fix it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import graftnet
import graftnet._trace
from graftnet import AdapterError, GraftError, ModelSourceError, NameResolutionError, SpecError, TraceError


def resnet18(source: str = "timm") -> nn.Module:
    return graftnet.build_model(f"{source}:resnet18", {"num_classes": 10})


def spec(*sites: tuple[str, list[str]], **extra: Any) -> dict[str, Any]:
    return {"input_shape": [3, 32, 32], "sites": [{"student": s, "taps": taps} for s, taps in sites], **extra}


def graft_error(student: nn.Module, teachers: dict[str, nn.Module], s: Any, error: type[GraftError]) -> str:
    with pytest.raises(error) as info:
        graftnet.graft(student, teachers, s)
    return str(info.value)


def test_every_error_is_a_graft_error_and_a_runtime_error() -> None:
    for error in (SpecError, NameResolutionError, AdapterError, TraceError, ModelSourceError):
        assert issubclass(error, GraftError) and issubclass(error, RuntimeError)


# --- names ----------------------------------------------------------------------------------------------------


def test_unknown_site_lists_closest_names_and_the_nodes_command() -> None:
    msg = graft_error(resnet18(), {"t": resnet18()}, spec(("layer1.0.act3", ["t:act1"])), NameResolutionError)
    assert "sites[0].student" in msg and "'layer1.0.act3'" in msg and "the student" in msg
    assert "Closest valid names: layer1.0.act2, layer1.0.act1" in msg
    assert "graftnet nodes" in msg


def test_unknown_tap_names_the_teacher_and_lists_closest_names() -> None:
    msg = graft_error(resnet18(), {"t": resnet18()}, spec(("act1", ["t:layer9.0.act1"])), NameResolutionError)
    assert "sites[0].taps[0]" in msg and "'layer9.0.act1'" in msg and "teacher 't'" in msg
    assert "layer4.0.act1" in msg.split("Closest valid names:")[1]
    assert "graftnet nodes" in msg


def test_tap_naming_an_unknown_teacher() -> None:
    msg = graft_error(resnet18(), {"teacher": resnet18()}, spec(("act1", ["teachr:act1"])), SpecError)
    assert "sites[0].taps[0]" in msg and "'teachr'" in msg
    assert "Did you mean 'teacher'?" in msg and "Teachers: teacher" in msg


@pytest.mark.parametrize("where", ["student", "tap"])
def test_a_module_that_is_not_an_activation(where: str) -> None:
    sites = ("layer1.0.conv1", ["t:act1"]) if where == "student" else ("act1", ["t:layer1.0.conv1"])
    msg = graft_error(resnet18(), {"t": resnet18()}, spec(sites), NameResolutionError)
    assert "'layer1.0.conv1'" in msg and "Conv2d module" in msg and "no activation" in msg
    assert ("sites[0].student" if where == "student" else "sites[0].taps[0]") in msg
    assert "graftnet nodes" in msg


def test_a_graph_node_that_is_not_an_activation() -> None:
    # timm's BasicBlock does `x += shortcut`, traced as the node 'add'.
    msg = graft_error(resnet18(), {"t": resnet18()}, spec(("add", ["t:act1"])), NameResolutionError)
    assert "'add'" in msg and "graph node" in msg and "not an activation" in msg


@pytest.mark.parametrize("where", ["student", "tap"])
def test_an_activation_module_called_twice_is_ambiguous(where: str) -> None:
    tv, timm = resnet18("torchvision"), resnet18()
    if where == "student":
        msg = graft_error(tv, {"t": timm}, spec(("layer1.0.relu", ["t:act1"])), NameResolutionError)
    else:
        msg = graft_error(timm, {"t": tv}, spec(("act1", ["t:layer1.0.relu"])), NameResolutionError)
    assert "'layer1.0.relu'" in msg and "called 2 times" in msg
    assert "layer1.0.relu@0, layer1.0.relu@1" in msg


def test_an_ambiguous_name_points_to_the_nodes_command() -> None:
    s = spec(("layer1.0.relu", ["t:act1"]))
    msg = graft_error(resnet18("torchvision"), {"t": resnet18()}, s, NameResolutionError)
    assert "graftnet nodes" in msg


def test_the_same_site_string_twice_fails_in_load_spec() -> None:
    with pytest.raises(SpecError) as info:
        graftnet.load_spec(spec(("act1", ["t:act1"]), ("act1", ["t:layer1"])))
    msg = str(info.value)
    assert "sites[1].student" in msg and "'act1'" in msg and "listed twice" in msg and "sites[0]" in msg


def test_two_names_for_the_same_activation_are_duplicate_sites() -> None:
    s = spec(("layer1", ["t:act1"]), ("layer1.1.act2", ["t:layer1"]))
    graftnet.load_spec(s)  # different strings: only resolution can tell
    msg = graft_error(resnet18(), {"t": resnet18()}, s, SpecError)
    assert "sites[1].student" in msg and "'layer1.1.act2'" in msg and "sites[0] already mixes" in msg


def test_two_names_for_the_same_tap_of_one_site() -> None:
    msg = graft_error(resnet18(), {"t": resnet18()}, spec(("act1", ["t:layer1", "t:layer1.1.act2"])), SpecError)
    assert "sites[0].taps[1]" in msg and "same activation as another tap" in msg


# --- adapters -------------------------------------------------------------------------------------------------


def test_identity_adapter_with_different_shapes() -> None:
    s = spec(("layer1", ["t:layer2"]))
    s["sites"][0]["adapter"] = "identity"
    msg = graft_error(resnet18(), {"t": resnet18()}, s, AdapterError)
    assert "sites[0].taps[0]" in msg and "t:layer2.1.act2 → layer1.1.act2" in msg
    assert "(128, 4, 4)" in msg and "(64, 8, 8)" in msg
    assert "valid: auto, conv1x1, identity, linear" in msg


def test_auto_adapter_cannot_map_a_vector_onto_a_feature_map() -> None:
    mlp = graftnet.build_model("graftnet:mlp", {"in_features": 3 * 32 * 32})
    msg = graft_error(resnet18(), {"t": mlp}, spec(("layer1", ["t:body.2"])), AdapterError)
    assert "adapter 'auto'" in msg and "(800,)" in msg and "(64, 8, 8)" in msg
    assert "'linear'" in msg  # the way out


def test_unknown_adapter_key() -> None:
    msg = graft_error(resnet18(), {"t": resnet18()}, spec(("layer1", ["t:layer2"]), adapter="conv1x2"), AdapterError)
    assert "unknown adapter 'conv1x2'" in msg and "conv1x1" in msg and "Valid adapters:" in msg


def _minatar(channels: int) -> nn.Module:
    return graftnet.build_model("graftnet:a3c_minatar", {"in_channels": channels})


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        ({"adapter": "resiz", "kwargs": {"size": [10, 10]}},
         ["unknown input adapter 'resiz'", "Did you mean 'resize'"]),
        ({"adapter": "conv1x1", "kwargs": {"out_chanels": 7}}, ["input adapter 'conv1x1'", "out_chanels"]),
        ({"adapter": "resize", "kwargs": {"size": [10]}}, ["'resize'", "must have 2 entries"]),
    ],
)  # fmt: skip
def test_bad_teacher_input_adapter(step: dict[str, Any], expected: list[str]) -> None:
    s = {"input_shape": [4, 10, 10], "sites": [{"student": "act", "taps": ["t:act"]}],
         "teachers": {"t": {"input": [step]}}}  # fmt: skip
    msg = graft_error(_minatar(4), {"t": _minatar(7)}, s, AdapterError)
    assert all(part in msg for part in expected), msg


# --- tracing --------------------------------------------------------------------------------------------------


class Gate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: FX cannot trace it
            return x
        return -x


class Gated(nn.Module):
    def __init__(self, gate: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.gate = gate
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.gate(self.conv(x)))


class BranchyTop(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if x.sum() > 0:
            x = -x
        return self.act(x)


GATED_SPEC = {"input_shape": [3, 16, 16], "sites": [{"student": "act", "taps": ["t:act"]}]}


@pytest.mark.parametrize("role", ["student", "teacher"])
def test_untraceable_module_is_named_with_the_leaf_hint(role: str) -> None:
    bad, good = Gated(Gate()), Gated(nn.Identity())
    student, teacher = (bad, good) if role == "student" else (good, bad)
    msg = graft_error(student, {"t": teacher}, GATED_SPEC, TraceError)
    assert ("the student" if role == "student" else "teacher 't'") in msg
    assert "module 'gate'" in msg and "Gate" in msg
    assert "graftnet.register_leaf_module(Gate)" in msg
    assert "control flow" in msg


@pytest.mark.parametrize(("role", "dtype"), [("teacher", torch.bfloat16), ("teacher", torch.float64),
                                             ("student", torch.float16)])  # fmt: skip
def test_a_model_in_another_dtype_than_its_input_is_named(role: str, dtype: torch.dtype) -> None:
    other = resnet18("torchvision").to(dtype)
    student, teacher = (other, resnet18("torchvision")) if role == "student" else (resnet18("torchvision"), other)
    msg = graft_error(student, {"t": teacher}, spec(("layer1", ["t:layer1"])), TraceError)
    name = "the student" if role == "student" else "teacher 't'"
    assert f"failed: the weights of {name} are {dtype} but its input is torch.float32" in msg
    assert "give them one dtype (model.float(), say; train.precision bf16 or fp16 autocasts them instead)" in msg


def test_a_teacher_on_another_device_than_its_input_is_named() -> None:
    msg = graft_error(resnet18(), {"t": resnet18().to("meta")}, spec(("layer1", ["t:layer1"])), TraceError)
    assert "the weights of teacher 't' are meta but its input is cpu" in msg and "give them one device" in msg


def test_untraceable_top_level_forward() -> None:
    msg = graft_error(BranchyTop(), {"t": Gated(nn.Identity())}, GATED_SPEC, TraceError)
    assert "the student" in msg and "top-level forward" in msg and "control flow" in msg


def test_untraceable_model_in_sites() -> None:
    with pytest.raises(TraceError, match=r"module 'gate'.*register_leaf_module\(Gate\)"):
        graftnet.sites(Gated(Gate()), input_shape=(3, 16, 16))


def test_registering_the_leaf_fixes_it(monkeypatch: pytest.MonkeyPatch) -> None:
    class LeafGate(Gate):
        pass

    monkeypatch.setattr(graftnet._trace, "_LEAVES", set(graftnet._trace._LEAVES))  # undone after the test
    graftnet.register_leaf_module(LeafGate)
    g = graftnet.graft(Gated(LeafGate()), {"t": Gated(nn.Identity())}, GATED_SPEC)
    assert list(g.mixers) == ["act"]
    assert g(torch.randn(2, 3, 16, 16)).shape == (2, 8, 14, 14)


def test_wrong_input_shape_says_which_shape_failed() -> None:
    s = dict(spec(("act1", ["t:act1"])), input_shape=[3, 32])
    msg = graft_error(resnet18(), {"t": resnet18()}, s, TraceError)
    assert "(2, 3, 32)" in msg and "input_shape" in msg and "example_input" in msg


def test_teacher_that_rejects_the_input_is_named() -> None:
    s = {"input_shape": [4, 10, 10], "sites": [{"student": "act", "taps": ["t:act"]}]}
    msg = graft_error(_minatar(4), {"t": _minatar(7)}, s, TraceError)
    assert "teacher 't'" in msg


# --- spec files -----------------------------------------------------------------------------------------------


def test_malformed_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "graft.yaml"
    path.write_text("input_shape: [3, 32, 32]\nsites:\n  - student: act1\n    taps: [t:act1\n  - student: layer1\n")
    with pytest.raises(SpecError) as info:
        graftnet.load_spec(path)
    msg = str(info.value)
    assert "malformed YAML" in msg and str(path) in msg and "line 5" in msg
    assert info.value.__cause__ is not None


def test_badly_indented_yaml(tmp_path: Path) -> None:
    path = tmp_path / "graft.yml"
    path.write_text("sites:\n  - student: act1\n   taps: ['t:act1']\n")
    with pytest.raises(SpecError, match=r"malformed YAML .* at line 3"):
        graftnet.load_spec(str(path))


def test_malformed_json_names_file_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "graft.json"
    path.write_text('{"input_shape": [3, 32, 32],\n "sites": [{"student": "act1", "taps": ["t:act1"],}]\n}\n')
    with pytest.raises(SpecError) as info:
        graftnet.load_spec(path)
    msg = str(info.value)
    assert "malformed JSON" in msg and str(path) in msg and "line 2, column" in msg
    assert isinstance(info.value.__cause__, json.JSONDecodeError)


def test_json_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "graft.json"
    path.write_text(json.dumps([{"student": "act1", "taps": ["t:act1"]}]))
    with pytest.raises(SpecError, match="top level must be a mapping, got list"):
        graftnet.load_spec(path)


def test_valid_files_load(tmp_path: Path) -> None:
    """The error tests above fail for the right reason: the same specs, well-formed, load."""
    s = spec(("act1", ["t:act1"]))
    (tmp_path / "graft.json").write_text(json.dumps(s))
    (tmp_path / "graft.yaml").write_text("input_shape: [3, 32, 32]\nsites:\n  - student: act1\n    taps: ['t:act1']\n")
    assert graftnet.load_spec(tmp_path / "graft.json") == graftnet.load_spec(tmp_path / "graft.yaml")


def test_missing_spec_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(SpecError) as info:
        graftnet.load_spec(str(path))
    assert "cannot read spec" in str(info.value) and str(path) in str(info.value)
    assert isinstance(info.value.__cause__, FileNotFoundError)


def test_graft_reports_a_missing_spec_file(tmp_path: Path) -> None:
    msg = graft_error(resnet18(), {"t": resnet18()}, str(tmp_path / "nope.json"), SpecError)
    assert "nope.json" in msg


# --- spec contents (pydantic, extra="forbid") ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        # unknown keys: typos must not vanish silently
        ({"input_shape": [3, 32, 32], "site": [{"student": "act1", "taps": ["t:act1"]}]},
         ["site: Extra inputs are not permitted"]),
        ({"sites": [{"student": "act1", "taps": ["t:act1"], "adaptor": "auto"}]},
         ["sites[0].adaptor: Extra inputs are not permitted"]),
        ({"mixing": {"rescale_tap": False}}, ["mixing.rescale_tap: Extra inputs are not permitted"]),
        ({"teachers": {"t": {"model": "timm:resnet18", "weight": "a.safetensors"}}},
         ["teachers.t.weight: Extra inputs are not permitted"]),
        # wrong types, with the path to the field
        ({"sites": [{"student": "act1", "taps": "t:act1"}]}, ["sites[0].taps: Input should be a valid list"]),
        ({"sites": [{"student": "act1", "taps": [3]}]}, ["sites[0].taps[0]: Input should be a valid string"]),
        ({"sites": [{"student": "act1", "taps": ["t:a"]}, {"student": ["x"], "taps": ["t:a"]}]},
         ["sites[1].student: Input should be a valid string"]),
        ({"input_shape": "3x32x32"}, ["input_shape: Input should be a valid list"]),
        ({"input_shape": [3, 0, 32]}, ["input_shape", "positive sizes"]),
        ({"mixing": {"init": 1.5}}, ["mixing.init", "strictly between 0 and 1"]),
        ({"mixing": {"calibration_batches": 0}}, ["mixing.calibration_batches", "greater than or equal to 1"]),
        # values the validators check
        ({"sites": [{"student": "act1", "taps": []}]}, ["sites[0].taps", "at least 1 item"]),
        ({"sites": [{"student": "act1", "taps": ["act1"]}]}, ["sites[0].taps", "'teacher:name'"]),
        ({"sites": [{"student": "act1", "taps": ["t:a", "t:a"]}]}, ["sites[0].taps", "tap listed twice: t:a"]),
        ({"teachers": {"my-teacher": {}}}, ["teachers", "'my-teacher'", "identifier"]),
        ({"student": {"model": "resnet18"}}, ["student.model", "'SOURCE:NAME'", "timm:resnet18"]),
    ],
    ids=["typo-site", "typo-adaptor", "typo-mixing", "typo-weights", "taps-not-list", "tap-not-str",
         "student-not-str", "input_shape-str", "input_shape-zero", "init-range", "calibration-zero", "no-taps",
         "tap-without-teacher", "tap-twice", "teacher-name", "model-ref"],
)  # fmt: skip
def test_invalid_spec_contents(data: dict[str, Any], expected: list[str]) -> None:
    with pytest.raises(SpecError) as info:
        graftnet.load_spec(data)
    msg = str(info.value)
    assert msg.startswith("invalid spec given as a dict:")
    assert all(part in msg for part in expected), msg


def test_invalid_spec_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "graft.yaml"
    path.write_text("sites:\n  - student: act1\n    taps: ['t:act1']\n    adaptor: auto\n")
    with pytest.raises(SpecError) as info:
        graftnet.load_spec(path)
    assert f"invalid spec {path}" in str(info.value) and "sites[0].adaptor" in str(info.value)


def test_teacher_model_reference_is_validated_like_the_students() -> None:
    with pytest.raises(SpecError, match=r"teachers\.t\.model"):
        graftnet.load_spec({"teachers": {"t": {"model": "resnet18"}}})


def test_spec_declares_a_teacher_graft_was_not_given() -> None:
    s = spec(("act1", ["t:act1"]), teachers={"t": {}, "u": {}})
    msg = graft_error(resnet18(), {"t": resnet18()}, s, SpecError)
    assert "teachers.u" in msg and "got no module" in msg


def test_input_shape_missing_without_example_input() -> None:
    s = {"sites": [{"student": "act1", "taps": ["t:act1"]}]}
    msg = graft_error(resnet18(), {"t": resnet18()}, s, SpecError)
    assert "example_input" in msg and "input_shape" in msg
    with pytest.raises(SpecError, match="input_shape"):
        graftnet.sites(resnet18())
    # ... and the same spec works once an example input is given
    g = graftnet.graft(resnet18(), {"t": resnet18()}, s, example_input=torch.randn(2, 3, 32, 32))
    assert list(g.mixers) == ["act1"]


# --- model sources and weights ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ref", "kwargs"),
    [("timm:resnet18", {"pretrained": True}), ("torchvision:resnet18", {"weights": "DEFAULT"}),
     ("torchvision:resnet18", {"weights": "IMAGENET1K_V1"})],
)  # fmt: skip
def test_references_that_would_download_are_refused(ref: str, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ModelSourceError) as info:
        graftnet.build_model(ref, kwargs)
    msg = str(info.value)
    assert ref in msg and "download" in msg and ".safetensors" in msg


def test_spec_teacher_that_would_download_is_refused() -> None:
    s = spec(("act1", ["t:act1"]), teachers={"t": {"model": "timm:resnet18", "kwargs": {"pretrained": True}}})
    msg = graft_error(resnet18(), None, s, ModelSourceError)  # type: ignore[arg-type]
    assert "pretrained=True" in msg and "download" in msg


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("timm:resnet18x", ["timm has no model 'resnet18x'", "list_models"]),
        ("torchvision:resnet18x", ["resnet18x", "list_models"]),
        ("graftnet:a3cx",
         ["unknown graftnet model 'a3cx'", "Did you mean 'a3c'", "models: a3c, a3c_minatar, actor_critic_mlp, cnn1d"]),
        ("no_such_package_xyz:build", ["cannot import 'no_such_package_xyz'"]),
        ("resnet18", ["'resnet18'", "'SOURCE:NAME'"]),
    ],
)
def test_unknown_models(ref: str, expected: list[str]) -> None:
    with pytest.raises(ModelSourceError) as info:
        graftnet.build_model(ref)
    assert all(part in str(info.value) for part in expected), str(info.value)


def test_bad_model_kwargs() -> None:
    with pytest.raises(ModelSourceError, match=r"timm:resnet18 .*num_clases"):
        graftnet.build_model("timm:resnet18", {"num_clases": 10})


def test_missing_weights_file(tmp_path: Path) -> None:
    path = tmp_path / "teacher.safetensors"
    with pytest.raises(ModelSourceError) as info:
        graftnet.build_model("graftnet:a3c_minatar", {}, path)
    assert str(path) in str(info.value) and "does not exist" in str(info.value)
    s = {"input_shape": [4, 10, 10], "sites": [{"student": "act", "taps": ["t:act"]}],
         "teachers": {"t": {"model": "graftnet:a3c_minatar", "weights": str(path)}}}  # fmt: skip
    msg = graft_error(_minatar(4), None, s, ModelSourceError)  # type: ignore[arg-type]
    assert str(path) in msg and "does not exist" in msg


def test_corrupt_weights_file(tmp_path: Path) -> None:
    path = tmp_path / "teacher.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(ModelSourceError) as info:
        graftnet.build_model("graftnet:a3c_minatar", {}, path)
    assert str(path) in str(info.value) and "not a readable safetensors file" in str(info.value)
    assert info.value.__cause__ is not None


def test_weights_that_do_not_fit(tmp_path: Path) -> None:
    path = tmp_path / "other.safetensors"
    save_file(_minatar(7).state_dict(), str(path))  # 7 input channels, loaded into a 4-channel net
    with pytest.raises(ModelSourceError) as info:
        graftnet.build_model("graftnet:a3c_minatar", {"in_channels": 4}, path)
    assert "does not fit graftnet:a3c_minatar" in str(info.value) and "features.0.weight" in str(info.value)


def test_weights_that_fit_load(tmp_path: Path) -> None:
    """The weight errors above fail for the right reason: a good file for the same model loads exactly."""
    model = _minatar(4)
    path = tmp_path / "good.safetensors"
    save_file(model.state_dict(), str(path))
    loaded = graftnet.build_model("graftnet:a3c_minatar", {"in_channels": 4}, path)
    expected, got = model.state_dict(), loaded.state_dict()
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
