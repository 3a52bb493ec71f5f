"""Model references: ``timm:NAME``, ``torchvision:NAME``, ``graftnet:NAME``, ``package.module:callable``.

Nothing here downloads weights: timm and torchvision models are always built with random weights
(``pretrained``/``weights`` are refused), and trained weights come from a local ``.safetensors`` file.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from graftnet.errors import ModelSourceError
from graftnet.models.a3c import A3CNet, ActorCriticMLP, a3c, a3c_minatar, actor_critic_mlp
from graftnet.models.convnets import Convnet, cnn1d, convnet, densenet_cifar
from graftnet.models.mlp import MLP, mlp
from graftnet.models.wide_resnet import WideResNet, wide_resnet_cifar
from graftnet.registry import Registry

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
                f"{ref}: {key}={kwargs[key]!r} would download weights, and graftnet never downloads; "
                "give trained weights as a local .safetensors file in 'weights'"
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


@MODEL_SOURCES.register("graftnet")
def _graftnet(name: str, kwargs: dict[str, Any]) -> nn.Module:
    return MODELS.get(name)(**kwargs)


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


def build_model(ref: str, kwargs: dict[str, Any] | None = None, weights: str | Path | None = None) -> nn.Module:
    """Build the model ``ref`` names, with random weights or those in ``weights`` (safetensors, strict).

    ``package.module:callable`` imports and calls user code: a spec is as trusted as a script.

    Examples:
        >>> net = build_model("graftnet:mlp", {"in_features": 784, "hidden": [800, 800], "num_classes": 10})
        >>> type(net).__name__
        'MLP'
    """
    kwargs = dict(kwargs or {})
    source, sep, name = ref.partition(":")
    if not sep or not name:
        raise ModelSourceError(f"model reference {ref!r} must look like 'SOURCE:NAME', e.g. 'timm:resnet18'")
    try:
        if source in MODEL_SOURCES:
            model = MODEL_SOURCES.get(source)(name, kwargs)
        elif "." in source or source.isidentifier() and source not in ("timm", "torchvision", "graftnet"):
            model = _import_callable(source, name, kwargs)
        else:
            MODEL_SOURCES.get(source)  # raises with the list of valid sources
            raise AssertionError
    except TypeError as e:
        raise ModelSourceError(f"cannot build {ref} with kwargs {kwargs}: {e}") from e
    if not isinstance(model, nn.Module):
        raise ModelSourceError(f"{ref} returned a {type(model).__name__}, not a torch.nn.Module")
    if weights is not None:
        load_weights(model, weights, ref=ref)
    return model


def load_weights(model: nn.Module, path: str | Path, *, ref: str = "the model") -> None:
    """Load a safetensors file into ``model`` with ``strict=True``; errors name the missing/unexpected keys."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ModelSourceError(f"weights file {str(path)!r} for {ref} does not exist")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelSourceError(f"weights file {str(path)!r} for {ref} is not a readable safetensors file: {e}") from e
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelSourceError(f"weights file {str(path)!r} does not fit {ref}: {e}") from e
