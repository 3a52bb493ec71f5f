"""Model references: ``timm:NAME``, ``torchvision:NAME``, ``graftnet:NAME``, ``package.module:callable``.

Nothing here downloads weights: timm and torchvision models are always built with random weights
(``pretrained``/``weights`` are refused), and trained weights come from a local file: graftnet's own
``.safetensors``, or a state dict saved with ``torch.save`` (``.pth``, ``.pt``, ``.bin``), read with
``torch.load(weights_only=True)`` only.
"""

from __future__ import annotations

import importlib
import numbers
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from graftnet.errors import GraftError, ModelSourceError
from graftnet.models.a3c import A3CNet, ActorCriticMLP, a3c, a3c_minatar, actor_critic_mlp
from graftnet.models.convnets import Convnet, cnn1d, convnet, densenet_cifar
from graftnet.models.mlp import MLP, mlp
from graftnet.models.wide_resnet import WideResNet, wide_resnet_cifar
from graftnet.registry import Registry
from graftnet.spec import clip, short_repr

__all__ = [
    "A3CNet",
    "ActorCriticMLP",
    "Convnet",
    "MLP",
    "MODELS",
    "MODEL_SOURCES",
    "WideResNet",
    "build_model",
    "load_weights",
    "register_model",
]

ModelFactory = Callable[..., nn.Module]
MODEL_SOURCES: Registry[Callable[[str, dict[str, Any]], nn.Module]] = Registry("model source", ModelSourceError)
MODELS: Registry[ModelFactory] = Registry("graftnet model", ModelSourceError)
MODELS.add("a3c", a3c)
MODELS.add("a3c_minatar", a3c_minatar)
MODELS.add("actor_critic_mlp", actor_critic_mlp)
MODELS.add("mlp", mlp)
MODELS.add("cnn1d", cnn1d)
MODELS.add("convnet", convnet)
MODELS.add("densenet_cifar", densenet_cifar)
MODELS.add("wide_resnet_cifar", wide_resnet_cifar)


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Make ``graftnet:NAME`` build a model with the decorated factory."""
    return MODELS.register(name)


def _no_download(ref: str, kwargs: dict[str, Any], *keys: str) -> None:
    for key in keys:
        if kwargs.get(key) not in (None, False):
            raise ModelSourceError(
                f"{ref}: {key}={short_repr(kwargs[key])} would download weights, and graftnet never downloads; "
                "give trained weights as a local .safetensors or .pth file in 'weights'"
            )


@MODEL_SOURCES.register("timm")
def _timm(name: str, kwargs: dict[str, Any]) -> nn.Module:
    import timm

    _no_download(f"timm:{name}", kwargs, "pretrained", "pretrained_cfg_overlay")
    if not timm.is_model(name):
        raise ModelSourceError(
            f"timm has no model {name!r}; list them with `python -c 'import timm; print(timm.list_models())'`"
        )
    return timm.create_model(name, pretrained=False, **kwargs)


@MODEL_SOURCES.register("torchvision")
def _torchvision(name: str, kwargs: dict[str, Any]) -> nn.Module:
    from torchvision import models

    _no_download(f"torchvision:{name}", kwargs, "weights", "weights_backbone")
    try:
        return models.get_model(name, weights=None, **kwargs)
    except ValueError as e:
        raise ModelSourceError(f"torchvision: {e}; see torchvision.models.list_models()") from e


# --- argument checks for graftnet's own models ---------------------------------------------------------------
# torch's own errors for these (``Trying to create tensor with negative dimension``, a zero-width Linear that
# silently returns empty logits) name neither the argument nor the model, so the common mistakes are caught first.


def _bad(ref: str, key: str, value: object, want: str) -> ModelSourceError:
    return ModelSourceError(f"{ref}: {key} must be {want}, got {short_repr(value)}")


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _positive_ints(ref: str, kwargs: dict[str, Any], *keys: str, minimum: int = 1) -> None:
    for key in keys:
        if key in kwargs and not (_is_int(kwargs[key]) and kwargs[key] >= minimum):
            raise _bad(ref, key, kwargs[key], "a positive integer" if minimum == 1 else f"an integer ≥ {minimum}")


def _widths(ref: str, kwargs: dict[str, Any], key: str, *, allow_empty: bool) -> None:
    if key not in kwargs or kwargs[key] is None and allow_empty:
        return
    value = kwargs[key]
    want = "a list of positive integers" + ("" if allow_empty else " with at least one entry")
    if isinstance(value, str | bytes) or not isinstance(value, list | tuple):
        raise _bad(ref, key, value, want)
    if not value and not allow_empty or not all(_is_int(v) and v >= 1 for v in value):
        raise _bad(ref, key, value, want)


def _rate(ref: str, kwargs: dict[str, Any], key: str) -> None:
    value = kwargs.get(key, 0.0)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value < 1.0:
        raise _bad(ref, key, value, "a probability in [0, 1)")


def _six_n_plus_4(ref: str, kwargs: dict[str, Any]) -> None:
    depth = kwargs.get("depth", 10)
    if not (_is_int(depth) and depth >= 10 and (depth - 4) % 6 == 0):
        raise _bad(ref, "depth", depth, "6n + 4 with n ≥ 1 (10, 16, 22, 28, 40, 100 …)")


def _check_mlp(ref: str, kwargs: dict[str, Any]) -> None:
    _positive_ints(ref, kwargs, "in_features", "num_classes")
    _widths(ref, kwargs, "hidden", allow_empty=True)
    _rate(ref, kwargs, "dropout")


def _check_cnn1d(ref: str, kwargs: dict[str, Any]) -> None:
    _positive_ints(ref, kwargs, "in_channels", "num_classes", "kernel_size", "length")
    _widths(ref, kwargs, "channels", allow_empty=False)


def _check_convnet(ref: str, kwargs: dict[str, Any]) -> None:
    _positive_ints(ref, kwargs, "in_channels", "num_classes", "image_size")
    _widths(ref, kwargs, "channels", allow_empty=False)
    if kwargs.get("strides") is not None:
        _widths(ref, kwargs, "strides", allow_empty=False)
        channels = kwargs.get("channels", (32, 64, 128))
        if len(kwargs["strides"]) != len(channels):
            raise ModelSourceError(
                f"{ref}: strides has {len(kwargs['strides'])} entries but channels has {len(channels)}; "
                "give one stride per convolution, or leave strides out (1, then 2 for each further layer)"
            )


def _check_densenet(ref: str, kwargs: dict[str, Any]) -> None:
    _six_n_plus_4(ref, kwargs)
    _positive_ints(ref, kwargs, "growth_rate", "num_classes")
    _rate(ref, kwargs, "drop_rate")


def _check_wide_resnet(ref: str, kwargs: dict[str, Any]) -> None:
    _six_n_plus_4(ref, kwargs)
    _positive_ints(ref, kwargs, "widen_factor", "num_classes", "in_channels")
    _rate(ref, kwargs, "drop_rate")


def _check_a3c(smallest_input: int) -> Callable[[str, dict[str, Any]], None]:
    def check(ref: str, kwargs: dict[str, Any]) -> None:
        _positive_ints(ref, kwargs, "num_actions", "in_channels")
        # The convolutions have no padding: a smaller board leaves nothing for the dense layer.
        _positive_ints(ref, kwargs, "input_size", minimum=smallest_input)

    return check


def _check_actor_critic_mlp(ref: str, kwargs: dict[str, Any]) -> None:
    _positive_ints(ref, kwargs, "in_features", "num_actions")
    _widths(ref, kwargs, "hidden", allow_empty=True)


# Keyed by factory, not by name: a model registered over a built-in name with overwrite=True is not checked
# against the built-in's arguments.
_ARGUMENT_CHECKS: dict[Callable[..., nn.Module], Callable[[str, dict[str, Any]], None]] = {
    mlp: _check_mlp,
    cnn1d: _check_cnn1d,
    convnet: _check_convnet,
    densenet_cifar: _check_densenet,
    wide_resnet_cifar: _check_wide_resnet,
    a3c: _check_a3c(20),  # 8×8 stride 4, then 4×4 stride 2
    a3c_minatar: _check_a3c(3),  # 3×3 stride 1
    actor_critic_mlp: _check_actor_critic_mlp,
}


@MODEL_SOURCES.register("graftnet")
def _graftnet(name: str, kwargs: dict[str, Any]) -> nn.Module:
    factory = MODELS.get(name)
    check = _ARGUMENT_CHECKS.get(factory)
    if check is not None:
        check(f"graftnet:{name}", kwargs)
    return factory(**kwargs)


def _import_callable(module_name: str, attr: str, kwargs: dict[str, Any]) -> nn.Module:
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ModelSourceError(f"cannot import {module_name!r} for model {module_name}:{attr}: {e}") from e
    factory = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise ModelSourceError(f"module {module_name!r} has no attribute {attr!r}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise ModelSourceError(f"{module_name}:{attr} is not callable")
    return factory(**kwargs)


# What constructors raise for arguments they reject (nn.Linear with a negative width raises RuntimeError, a
# factory's own check ValueError or AssertionError, a lookup table KeyError …). GraftError is a RuntimeError, so
# it is handled before these and passes through as the error it is.
_CONSTRUCTOR_ERRORS = (TypeError, ValueError, RuntimeError, AssertionError, KeyError, IndexError, ZeroDivisionError)


def build_model(
    ref: str,
    kwargs: dict[str, Any] | None = None,
    weights: str | Path | None = None,
    *,
    where: str | None = None,
) -> nn.Module:
    """Build the model ``ref`` names, with random weights or those in ``weights`` (strict; see :func:`load_weights`).

    ``package.module:callable`` imports and calls user code: a spec is as trusted as a script.

    Args:
        ref: ``timm:NAME``, ``torchvision:NAME``, ``graftnet:NAME`` or ``package.module:callable``.
        kwargs: keyword arguments for the constructor.
        weights: a local weights file (``.safetensors``, or a ``torch.save`` state dict as ``.pth``/``.pt``/``.bin``).
        where: the spec path of this model entry (``teachers.related``, ``student``), put in front of every error.

    Returns:
        The model, in training mode as the constructor left it.

    Raises:
        ModelSourceError: the reference is unknown, the constructor rejects the kwargs, or the weights file is
            missing, unreadable, or does not fit. Other GraftErrors a factory raises pass through as they are.

    Examples:
        >>> net = build_model("graftnet:mlp", {"in_features": 784, "hidden": [800, 800], "num_classes": 10})
        >>> type(net).__name__
        'MLP'
    """
    at = f"{where}: " if where else ""
    kwargs = dict(kwargs or {})
    source, sep, name = ref.partition(":")
    if not sep or not name:
        raise ModelSourceError(f"{at}model reference {ref!r} must look like 'SOURCE:NAME', e.g. 'timm:resnet18'")
    try:
        if source in MODEL_SOURCES:
            model = MODEL_SOURCES.get(source)(name, kwargs)
        elif "." in source or source.isidentifier():
            model = _import_callable(source, name, kwargs)
        else:
            MODEL_SOURCES.get(source)  # raises with the list of valid sources
            raise ModelSourceError(f"unknown model source {source!r}")  # not reached: get() raised
    except GraftError as e:
        if where is None or type(e) is not ModelSourceError:
            raise
        raise ModelSourceError(f"{at}{e}") from e
    except _CONSTRUCTOR_ERRORS as e:
        fix = f"fix {where}.kwargs" if where else "fix the kwargs"
        raise ModelSourceError(
            f"{at}cannot build {ref} with kwargs {short_repr(kwargs)}: {type(e).__name__}: {clip(str(e))}; {fix} "
            "(they are passed to the constructor as keyword arguments)"
        ) from e
    if not isinstance(model, nn.Module):
        raise ModelSourceError(f"{at}{ref} returned a {type(model).__name__}, not a torch.nn.Module")
    if weights is not None:
        load_weights(model, weights, ref=ref, where=where)
    return model


# --- weights files --------------------------------------------------------------------------------------------

_TORCH_SUFFIXES = (".pth", ".pt", ".bin")
# Top-level keys that training scripts wrap a state dict in (timm, torchvision references, Lightning, plain loops).
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "net")
# Key prefixes of a wrapped model: DataParallel/DistributedDataParallel, and torch.compile's OptimizedModule.
_KEY_PREFIXES = ("module.", "_orig_mod.")
_SHOWN = 5  # keys listed per kind of mismatch


def _first(keys: list[str]) -> str:
    more = f", … ({len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more


def _read_safetensors(path: Path, what: str) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelSourceError(f"{what} is not a readable safetensors file: {e}") from e


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _refused(e: BaseException) -> bool:
    """Whether torch.load(weights_only=True) refused what the file holds, not its container format."""
    return type(e).__name__ == "UnpicklingError"


def _read_torch(path: Path, what: str) -> object:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, EOFError, OSError … for a file it cannot read
        if not _refused(e):
            raise ModelSourceError(f"{what} is not a readable torch.save file: {type(e).__name__}: {e}") from e
        # torch puts what it refused (``Unsupported global: GLOBAL __main__.Net``) in the chained error.
        detail = _first_line(e.__context__ or e)
        raise ModelSourceError(
            f"{what} was refused by torch.load(weights_only=True) ({detail}): it holds serialized Python objects "
            "other than tensors and plain containers (a model object, a class, a function), or is not a "
            "torch.save file at all, and graftnet does not run code from weights files. Re-save the weights "
            "alone with `torch.save(model.state_dict(), path)`, or as .safetensors"
        ) from e


def _read(path: Path, what: str) -> object:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return _read_safetensors(path, what)
    if suffix in _TORCH_SUFFIXES:
        return _read_torch(path, what)
    try:
        return _read_safetensors(path, what)
    except ModelSourceError as not_safetensors:
        try:
            return _read_torch(path, what)
        except ModelSourceError as not_torch:
            if not_torch.__cause__ is not None and _refused(not_torch.__cause__):
                raise  # a torch.save file with objects in it: why it was refused is the message to read
            reasons = (
                _first_line(not_safetensors.__cause__ or not_safetensors),
                _first_line(not_torch.__cause__ or not_torch),
            )
            raise ModelSourceError(
                f"{what} has the suffix {suffix!r}, which graftnet does not know, and reads neither as safetensors "
                f"({reasons[0]}) nor with torch.load(weights_only=True) ({reasons[1]}). "
                f"Supported: .safetensors, and torch.save state dicts as {', '.join(_TORCH_SUFFIXES)}"
            ) from not_torch


def _non_tensor(mapping: Mapping[Any, Any]) -> tuple[object, object] | None:
    import torch

    for key, value in mapping.items():
        # ``*._extra_state`` is where torch keeps a module's get_extra_state(), which need not be a tensor.
        if not isinstance(key, str) or not isinstance(value, torch.Tensor) and not key.endswith("_extra_state"):
            return key, value
    return None


def _unwrap(obj: object, what: str) -> tuple[Mapping[str, Any], list[str]]:
    """The state dict inside what the file holds, and what was stripped to get it (for error messages)."""
    if not isinstance(obj, Mapping):
        raise ModelSourceError(
            f"{what} holds a {type(obj).__name__}, not a state dict (a mapping of parameter names to tensors); "
            "re-save it with `torch.save(model.state_dict(), path)`"
        )
    bad = _non_tensor(obj)
    if bad is None:
        return obj, []
    wrappers = [k for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)]
    if len(wrappers) > 1:
        raise ModelSourceError(
            f"{what} holds several state dicts ({', '.join(map(repr, wrappers))}), and graftnet cannot tell which "
            "one is the model; re-save the one you mean with `torch.save(checkpoint[KEY], path)`"
        )
    if not wrappers:
        key, value = bad
        raise ModelSourceError(
            f"{what} holds {type(value).__name__} {short_repr(value)} under {short_repr(key)}, but a state dict maps "
            f"parameter names to tensors only (graftnet unwraps a checkpoint with exactly one of "
            f"{', '.join(map(repr, _WRAPPER_KEYS))} beside other entries); re-save the weights alone with "
            "`torch.save(model.state_dict(), path)`"
        )
    wrapper = wrappers[0]
    state = obj[wrapper]
    inner = _non_tensor(state)
    if inner is not None:
        key, value = inner
        raise ModelSourceError(
            f"{what}: its {wrapper!r} entry holds {type(value).__name__} {short_repr(value)} under {short_repr(key)}, "
            "but a state dict maps parameter names to tensors only; re-save the weights alone with "
            "`torch.save(model.state_dict(), path)`"
        )
    rest = [repr(k) for k in obj if k != wrapper]
    return state, [f"the {wrapper!r} entry was taken and the other top-level entries left out ({_first(rest)})"]


def _strip_prefixes(state: Mapping[str, Any], model_keys: list[str], stripped: list[str]) -> Mapping[str, Any]:
    """``state`` without the wrapper prefixes every key carries (repeatedly: DDP around a compiled model).

    A prefix stays when the model's own keys all carry it too: then it is a real submodule name.
    """
    while state:
        prefix = next(
            (
                p
                for p in _KEY_PREFIXES
                if all(k.startswith(p) for k in state) and not all(k.startswith(p) for k in model_keys)
            ),
            None,
        )
        if prefix is None:
            break
        # An OrderedDict, as torch's own state dicts are: a plain dict cannot carry ``_metadata``.
        renamed: OrderedDict[str, Any] = OrderedDict((k[len(prefix) :], v) for k, v in state.items())
        metadata = getattr(state, "_metadata", None)
        if metadata is not None:
            # Per-module versions (BatchNorm's, for one) let old state dicts load; they are keyed by module path.
            renamed._metadata = OrderedDict(  # type: ignore[attr-defined]
                (k[len(prefix) :] if k.startswith(prefix) else "", v) for k, v in metadata.items()
            )
        state = renamed
        stripped.append(f"the key prefix {prefix!r} was stripped from every key")
    return state


def _mismatch(model: nn.Module, state: Mapping[str, Any]) -> list[str]:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} (file {list(state[k].shape)}, model {list(expected[k].shape)})"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if keys:
            parts.append(f"{label} ({len(keys)}): {_first(keys)}")
    return parts


def load_weights(model: nn.Module, path: str | Path, *, ref: str = "the model", where: str | None = None) -> None:
    """Load a weights file into ``model`` with ``strict=True``.

    Reads graftnet's own ``.safetensors`` (an exported student) and timm/torchvision-style state dicts saved
    with ``torch.save`` as ``.pth``, ``.pt`` or ``.bin``, only through ``torch.load(weights_only=True)``: a file
    holding anything but tensors and plain containers is refused, never run. A checkpoint that wraps the
    state dict under one of ``state_dict``, ``model``, ``model_state_dict`` or ``net`` is unwrapped (its other
    entries, such as ``epoch``, are left out), and a ``module.`` (DataParallel/DDP) or ``_orig_mod.``
    (torch.compile) prefix that every key carries is stripped. Another suffix is tried as safetensors, then with
    ``torch.load``.

    Args:
        model: the module to load into.
        path: the weights file, relative to the working directory unless absolute.
        ref: the model reference, for error messages.
        where: the spec path of the model entry (``teachers.related``); errors then start ``where.weights:``.

    Raises:
        ModelSourceError: the file is missing or unreadable, holds something other than a state dict, or does
            not fit ``model``; the message lists the missing, unexpected and mis-shaped keys and what was
            stripped. On a mismatch ``model`` may already hold some of the file's tensors.
    """
    path = Path(path)
    at = f"{where}.weights: " if where else ""
    what = f"{at}weights file {str(path)!r} for {ref}"
    if not path.exists():
        raise ModelSourceError(
            f"{what} does not exist (paths are relative to the working directory, here {Path.cwd()})"
        )
    if not path.is_file():
        raise ModelSourceError(f"{what} is a directory, not a weights file")
    state, stripped = _unwrap(_read(path, what), what)
    state = _strip_prefixes(state, list(model.state_dict()), stripped)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        parts = _mismatch(model, state) or [str(e)]
        how = "; ".join(stripped) if stripped else "nothing was stripped: the file is a plain state dict"
        raise ModelSourceError(
            f"{at}weights file {str(path)!r} does not fit {ref}: {'; '.join(parts)}. ({how}.) Check that the "
            "model reference and kwargs are the ones these weights were trained with"
        ) from e
