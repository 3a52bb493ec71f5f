"""Teacher weights in the formats people have, and constructor/adapter mistakes as named GraftErrors.

Weights files: graftnet's safetensors and torch.save state dicts (.pth/.pt/.bin), read only through
``torch.load(weights_only=True)``, unwrapped from training checkpoints and DDP/torch.compile prefixes.
"""

from __future__ import annotations

import pickle
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import graftnet
from graftnet import AdapterError, ModelSourceError, SpecError
from graftnet.models import build_model, load_weights

REF = "graftnet:cnn1d"
KWARGS: dict[str, Any] = {"channels": [4, 8], "num_classes": 3, "length": 16}


def _trained() -> nn.Module:
    """A cnn1d whose every tensor, buffers included, differs from a fresh build's."""
    model = build_model(REF, KWARGS)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn_like(tensor))
            elif name.endswith("num_batches_tracked"):
                tensor.fill_(7)
    return model


def _assert_same_weights(expected: nn.Module, got: nn.Module) -> None:
    want, have = expected.state_dict(), got.state_dict()
    assert want.keys() == have.keys()
    for key in want:
        assert torch.equal(want[key], have[key]), key


def _prefixed(prefix: str) -> Callable[[dict[str, torch.Tensor]], object]:
    return lambda sd: {prefix + k: v for k, v in sd.items()}


# (file name, how the state dict is wrapped before torch.save; None: written with safetensors)
FORMATS: list[tuple[str, Callable[[dict[str, torch.Tensor]], object] | None]] = [
    ("plain.pth", lambda sd: sd),
    ("checkpoint.pth", lambda sd: {"state_dict": sd, "epoch": 3, "optimizer": {"lr": 0.1}}),
    ("model.pt", lambda sd: {"model": sd}),
    ("model_state_dict.pt", lambda sd: {"model_state_dict": sd, "epoch": 3}),
    ("net.pth", lambda sd: {"net": sd, "best_acc": 0.9}),
    ("ddp.pth", _prefixed("module.")),
    ("compiled.pth", _prefixed("_orig_mod.")),
    ("ddp_of_compiled.pth", _prefixed("module._orig_mod.")),
    ("wrapped_ddp.pth", lambda sd: {"state_dict": {"module." + k: v for k, v in sd.items()}, "epoch": 3}),
    ("pytorch_model.bin", lambda sd: sd),
    ("unknown_suffix.ckpt", lambda sd: {"state_dict": sd, "epoch": 1}),
    ("student.safetensors", None),
    ("prefixed.safetensors", None),
]


@pytest.mark.parametrize(("name", "wrap"), FORMATS, ids=[name for name, _ in FORMATS])
def test_weights_load_exactly_from_every_format(
    tmp_path: Path, name: str, wrap: Callable[[dict[str, torch.Tensor]], object] | None
) -> None:
    trained = _trained()
    sd = {k: v.contiguous() for k, v in trained.state_dict().items()}
    path = tmp_path / name
    if wrap is None:
        save_file({("module." + k if name.startswith("prefixed") else k): v for k, v in sd.items()}, str(path))
    else:
        torch.save(wrap(sd), path)
    fresh = build_model(REF, KWARGS)
    assert not all(torch.equal(v, fresh.state_dict()[k]) for k, v in sd.items())  # the load below has work to do
    _assert_same_weights(trained, build_model(REF, KWARGS, path, where="teachers.related"))
    load_weights(fresh, path)
    _assert_same_weights(trained, fresh)


def test_a_real_submodule_named_module_is_not_stripped(tmp_path: Path) -> None:
    """The ``module.`` prefix is a wrapper only when the model's own keys do not all carry it too."""

    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.module = nn.Linear(3, 2)

    trained = Holder()
    path = tmp_path / "holder.pth"
    torch.save(trained.state_dict(), path)
    fresh = Holder()
    load_weights(fresh, path)
    _assert_same_weights(trained, fresh)


def test_extra_state_beside_tensors_loads(tmp_path: Path) -> None:
    """``*._extra_state`` (a module's get_extra_state()) is part of a state dict even when it is not a tensor."""

    class WithExtra(nn.Linear):
        def __init__(self) -> None:
            super().__init__(3, 2)
            self.note = {"calibrated": False}

        def get_extra_state(self) -> dict[str, bool]:
            return self.note

        def set_extra_state(self, state: dict[str, bool]) -> None:
            self.note = state

    trained = WithExtra()
    trained.note = {"calibrated": True}
    path = tmp_path / "extra.pth"
    torch.save({"model": trained.state_dict(), "epoch": 2}, path)
    fresh = WithExtra()
    load_weights(fresh, path)
    assert fresh.note == {"calibrated": True} and torch.equal(fresh.weight, trained.weight)


# --- what a weights file may not hold ---------------------------------------------------------------------------


class WritesMarker:
    """Unpickling it opens ``marker`` for writing, creating the file: proof that the file's code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("name", ["checkpoint.pth", "checkpoint.ckpt"])
def test_a_file_with_code_in_it_is_refused_and_nothing_runs(tmp_path: Path, name: str) -> None:
    marker = tmp_path / "code_ran"
    path = tmp_path / name
    torch.save({"state_dict": _trained().state_dict(), "obj": WritesMarker(marker)}, path)
    with pytest.raises(ModelSourceError) as info:
        build_model(REF, KWARGS, path, where="teachers.related")
    msg = str(info.value)
    assert msg.startswith("teachers.related.weights: ") and repr(str(path)) in msg
    assert "weights_only=True" in msg and "does not run code" in msg
    assert "torch.save(model.state_dict(), path)" in msg and ".safetensors" in msg
    assert not marker.exists()
    # The control: a loader that does run the file's code creates the marker, so the check above can fail.
    torch.load(path, map_location="cpu", weights_only=False)
    assert marker.exists()


def _a_function() -> None:
    """Only here to be pickled."""


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")  # torch's note on protocol ≥ 3
@pytest.mark.parametrize("protocol", [2, pickle.DEFAULT_PROTOCOL])
def test_a_plain_pickle_of_a_function_is_refused(tmp_path: Path, protocol: int) -> None:
    path = tmp_path / "function.pth"
    path.write_bytes(pickle.dumps(_a_function, protocol=protocol))
    with pytest.raises(ModelSourceError, match=r"refused by torch\.load\(weights_only=True\).*does not run code"):
        build_model(REF, KWARGS, path)


def test_non_tensor_entries_are_an_error_unless_beside_a_wrapper(tmp_path: Path) -> None:
    sd = _trained().state_dict()
    path = tmp_path / "epoch.pth"
    torch.save({**sd, "epoch": 3}, path)
    with pytest.raises(ModelSourceError, match=r"teachers\.t\.weights: .*int 3 under 'epoch'.*tensors only"):
        build_model(REF, KWARGS, path, where="teachers.t")
    torch.save({"state_dict": {**sd, "note": "best"}, "epoch": 3}, path)
    with pytest.raises(ModelSourceError, match=r"'state_dict' entry holds str 'best' under 'note'"):
        build_model(REF, KWARGS, path)
    torch.save({"state_dict": sd, "model": sd}, path)
    with pytest.raises(ModelSourceError, match=r"several state dicts \('state_dict', 'model'\)"):
        build_model(REF, KWARGS, path)
    torch.save([sd], path)
    with pytest.raises(ModelSourceError, match="holds a list, not a state dict"):
        build_model(REF, KWARGS, path)
    torch.save({"state_dict": sd, "epoch": 3}, path)  # the same entries beside a wrapper are fine
    build_model(REF, KWARGS, path)


def test_unreadable_files_say_what_they_are_not(tmp_path: Path) -> None:
    (tmp_path / "junk.pth").write_bytes(b"PK\x03\x04 not a zip archive")
    with pytest.raises(ModelSourceError, match="is not a readable torch.save file"):
        build_model(REF, KWARGS, tmp_path / "junk.pth")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(ModelSourceError, match="is not a readable safetensors file"):
        build_model(REF, KWARGS, tmp_path / "junk.safetensors")
    (tmp_path / "junk.weights").write_bytes(b"junk")
    with pytest.raises(ModelSourceError) as info:
        build_model(REF, KWARGS, tmp_path / "junk.weights")
    msg = str(info.value)
    assert "'.weights'" in msg and "neither as safetensors" in msg and "Supported: .safetensors" in msg
    assert ".pth, .pt, .bin" in msg
    with pytest.raises(ModelSourceError, match="is a directory"):
        build_model(REF, KWARGS, tmp_path)


# --- where the error is ------------------------------------------------------------------------------------------


def _spec(teacher: dict[str, Any], student_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "input_shape": [1, 16],
        "student": {"model": REF, "kwargs": student_kwargs or KWARGS},
        "teachers": {"related": {"model": REF, "kwargs": KWARGS, **teacher}},
        "sites": [{"student": "features.act1", "taps": ["related:features.act1"]}],
    }


def test_a_missing_weights_file_names_the_spec_path_and_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelSourceError) as info:
        graftnet.graft(None, None, _spec({"weights": "runs/related/student.pth"}))
    msg = str(info.value)
    assert msg.startswith("teachers.related.weights: weights file 'runs/related/student.pth'")
    assert "does not exist" in msg and "relative to the working directory" in msg and str(tmp_path) in msg
    # The same file once it is there: the error above was about the path alone.
    (tmp_path / "runs" / "related").mkdir(parents=True)
    torch.save(_trained().state_dict(), tmp_path / "runs" / "related" / "student.pth")
    grafted = graftnet.graft(None, None, _spec({"weights": "runs/related/student.pth"}))
    assert list(grafted.mixers) == ["features.act1"]


def test_student_errors_name_the_student() -> None:
    spec = _spec({}, {**KWARGS, "num_classes": 0})
    with pytest.raises(ModelSourceError, match=r"^student: graftnet:cnn1d: num_classes must be a positive integer"):
        graftnet.graft(None, None, spec)


def test_weights_that_do_not_fit_list_the_keys_and_what_was_stripped(tmp_path: Path) -> None:
    other = build_model(REF, {"channels": [4, 8, 8], "num_classes": 5, "length": 16})
    path = tmp_path / "other.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in other.state_dict().items()}, "epoch": 9}, path)
    with pytest.raises(ModelSourceError) as info:
        build_model(REF, KWARGS, path, where="teachers.related")
    msg = str(info.value)
    assert msg.startswith("teachers.related.weights: ") and "does not fit graftnet:cnn1d" in msg
    assert "unexpected (6): features.conv3.weight, features.bn3.weight" in msg and "(1 more)" in msg
    assert "shape mismatch (2): head.weight (file [5, 8], model [3, 8]), head.bias (file [5], model [3])" in msg
    assert "'state_dict' entry was taken" in msg and "('epoch')" in msg and "prefix 'module.' was stripped" in msg
    plain = tmp_path / "plain.pth"
    smaller = build_model(REF, {"channels": [4], "num_classes": 3, "length": 16}).state_dict()
    torch.save(smaller, plain)
    with pytest.raises(ModelSourceError) as info:
        build_model(REF, KWARGS, plain)
    msg = str(info.value)
    assert "missing (6): features.conv2.weight" in msg and "head.weight (file [3, 4], model [3, 8])" in msg
    assert "nothing was stripped" in msg


# --- constructors ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ref", "kwargs", "expected"),
    [
        ("graftnet:cnn1d", {"num_classes": -1}, "num_classes must be a positive integer, got -1"),
        ("graftnet:cnn1d", {"channels": []}, "channels must be a list of positive integers with at least one entry"),
        ("graftnet:convnet", {"channels": [8, 8], "strides": [1]}, "strides has 1 entries but channels has 2"),
        ("graftnet:mlp", {"hidden": [8, 0]}, "hidden must be a list of positive integers, got [8, 0]"),
        ("graftnet:mlp", {"dropout": 1.5}, "dropout must be a probability in [0, 1)"),
        ("graftnet:densenet_cifar", {"depth": 7}, "depth must be 6n + 4"),
        ("graftnet:wide_resnet_cifar", {"widen_factor": 0}, "widen_factor must be a positive integer"),
        ("graftnet:a3c", {"input_size": 10}, "input_size must be an integer ≥ 20, got 10"),
        (
            "timm:resnet18",
            {"drop_rate": 2.0, "num_classes": 3, "block_args": {"nope": 1}},
            "cannot build timm:resnet18",
        ),
        ("torchvision:resnet18", {"num_classes": -1}, "cannot build torchvision:resnet18"),
    ],
)
def test_constructor_mistakes_are_model_source_errors(ref: str, kwargs: dict[str, Any], expected: str) -> None:
    with pytest.raises(ModelSourceError) as info:
        build_model(ref, kwargs, where="teachers.related")
    msg = str(info.value)
    assert msg.startswith("teachers.related: ") and ref in msg and expected in msg, msg


def _write_factories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "user_factories.py").write_text(
        "from graftnet.errors import SpecError\n"
        "def value_error(**kwargs):\n    raise ValueError('width must be even')\n"
        "def assertion_error(**kwargs):\n    assert kwargs['depth'] > 0\n"
        "def key_error(**kwargs):\n    return {'a': 1}[kwargs['variant']]\n"
        "def zero_division(**kwargs):\n    return 1 // kwargs['groups']\n"
        "def graft_error(**kwargs):\n    raise SpecError('my own spec complaint')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "user_factories", raising=False)


@pytest.mark.parametrize(
    ("factory", "kwargs", "expected"),
    [
        ("value_error", {}, "ValueError: width must be even"),
        ("assertion_error", {"depth": 0}, "AssertionError"),
        ("key_error", {"variant": "b"}, "KeyError: 'b'"),
        ("zero_division", {"groups": 0}, "ZeroDivisionError"),
    ],
)
def test_user_constructor_errors_are_wrapped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, factory: str, kwargs: dict[str, Any], expected: str
) -> None:
    _write_factories(tmp_path, monkeypatch)
    with pytest.raises(ModelSourceError) as info:
        build_model(f"user_factories:{factory}", kwargs, where="teachers.mine")
    msg = str(info.value)
    assert msg.startswith(f"teachers.mine: cannot build user_factories:{factory} with kwargs {kwargs}: ")
    assert expected in msg and "fix teachers.mine.kwargs" in msg
    assert info.value.__cause__ is not None


def test_a_graft_error_from_a_factory_passes_through_unchanged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_factories(tmp_path, monkeypatch)
    with pytest.raises(SpecError) as info:
        build_model("user_factories:graft_error", {}, where="teachers.mine")
    assert str(info.value) == "my own spec complaint" and not isinstance(info.value, ModelSourceError)


# --- teacher input adapters --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        ([{"adapter": "conv1x1", "kwargs": {"out_channels": 0}}], r"input\[0\]: .*out_channels must be a positive"),
        ([{"adapter": "identity"}, {"adapter": "resize", "kwargs": {"size": [8]}}],
         r"input\[1\]: .*mode 'bilinear' does not resize an input with 1 spatial dim.*'linear'"),
        ([{"adapter": "resize", "kwargs": {"size": [8], "mode": "cubic"}}], r"input\[0\]: .*mode 'cubic'"),
        ([{"adapter": "resize", "kwargs": {"size": [0]}}], r"input\[0\]: .*size must be a list of 1 positive"),
        ([{"adapter": "normalize", "kwargs": {"mean": ["a"], "std": [1.0]}}],
         r"input\[0\]: .*mean must be a list of numbers"),
        ([{"adapter": "normalize", "kwargs": {"mean": [0.5], "std": [0.0]}}], r"input\[0\]: .*std must be positive"),
        ([{"adapter": "conv1x1", "kwargs": {"channels": 4}}], r"input\[0\]: .*bad arguments.*takes out_channels"),
        ([{"adapter": "resise", "kwargs": {"size": [8]}}], r"input\[0\]: unknown input adapter 'resise'"),
    ],
)  # fmt: skip
def test_input_adapter_mistakes_name_the_teacher_step(steps: list[dict[str, Any]], expected: str) -> None:
    with pytest.raises(AdapterError, match=r"^teachers\.related\." + expected):
        graftnet.graft(None, None, _spec({"input": steps}))


def test_good_input_adapters_graft() -> None:
    """The mistakes above fail for the reason named: the same steps with good arguments graft."""
    steps = [
        {"adapter": "normalize", "kwargs": {"mean": [0.5], "std": [0.25]}},
        {"adapter": "resize", "kwargs": {"size": [8], "mode": "linear"}},
        {"adapter": "conv1x1", "kwargs": {"out_channels": 1}},
    ]
    grafted = graftnet.graft(None, None, _spec({"input": steps}))
    assert grafted(torch.randn(2, 1, 16)).shape == (2, 3)
