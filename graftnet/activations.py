"""Which graph nodes are activations, and which of them work in place.

An activation is recognised in three forms (README "Names"): a module (``nn.ReLU``), a function
(``F.relu``, ``torch.relu``) or a Tensor method (``x.relu()``). More can be registered with
:func:`register_activation`; fused norm+act modules (timm's ``BatchNormAct2d``) with :func:`register_fused`.
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

__all__ = [
    "activation_attr_of_fused",
    "is_activation",
    "mutates_input",
    "register_activation",
    "register_fused",
]

_MODULES: set[type[nn.Module]] = {
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish,
    nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.PReLU, nn.RReLU, nn.LogSigmoid,
    nn.Softsign, nn.Tanhshrink,
}  # fmt: skip
_FUNCTIONS: set[Callable[..., Any]] = {
    F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.leaky_relu, F.leaky_relu_, F.elu, F.elu_, F.selu,
    torch.selu, torch.selu_, F.celu, torch.celu, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid, F.hardtanh,
    F.hardtanh_, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.softplus, F.logsigmoid, F.softsign,
    F.tanhshrink, F.prelu, F.rrelu,
}  # fmt: skip
_METHODS: set[str] = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_"}
# Fused norm+act modules: class -> name of the activation submodule their forward applies last.
_FUSED: dict[type[nn.Module], str] = {}
# In-place Python operators: ``a += b`` traces to operator.iadd and writes into ``a``.
_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.iand, operator.ior}


def register_activation(activation: type[nn.Module] | Callable[..., Any] | str) -> None:
    """Recognise one more activation: a module class, a function, or a Tensor method name.

    Examples:
        >>> import graftnet.activations as acts
        >>> acts.register_activation("hardswish")   # x.hardswish() now counts as a site
    """
    if isinstance(activation, str):
        _METHODS.add(activation)
    elif isinstance(activation, type) and issubclass(activation, nn.Module):
        _MODULES.add(activation)
    elif callable(activation):
        _FUNCTIONS.add(activation)
    else:
        raise TypeError(f"cannot register {activation!r} as an activation: give a module class, function or str")


def register_fused(cls: type[nn.Module], act_attr: str = "act") -> None:
    """Declare ``cls`` a fused norm+act module whose forward ends with ``self.<act_attr>(x)``.

    Such modules stay leaves when tracing (so their own forward keeps BatchNorm buffer updates exact);
    graftnet splits them into "everything but the activation" and the activation when a site or tap
    needs their pre-activation.
    """
    _FUSED[cls] = act_attr


def _register_timm() -> None:
    try:
        from timm.layers import activations as timm_acts
        from timm.layers import norm_act
    except ImportError:  # timm is optional for users who bring their own models
        return
    for name in ("Swish", "Mish", "Sigmoid", "Tanh", "HardSwish", "HardSigmoid", "HardMish", "PReLU", "GELU",
                 "GELUTanh", "QuickGELU"):  # fmt: skip
        cls = getattr(timm_acts, name, None)
        if isinstance(cls, type):
            _MODULES.add(cls)
    for name in ("BatchNormAct2d", "SyncBatchNormAct", "FrozenBatchNormAct2d", "GroupNormAct", "GroupNorm1Act",
                 "LayerNormAct", "LayerNormAct2d"):  # fmt: skip
        cls = getattr(norm_act, name, None)
        if isinstance(cls, type):
            _FUSED[cls] = "act"


_register_timm()


def activation_modules() -> tuple[type[nn.Module], ...]:
    return tuple(_MODULES)


def activation_attr_of_fused(module: nn.Module) -> str | None:
    """The activation submodule's attribute name if ``module`` is a registered fused norm+act module."""
    for cls in type(module).__mro__:
        if cls in _FUSED:
            attr = _FUSED[cls]
            act = getattr(module, attr, None)
            return attr if isinstance(act, nn.Module) and not isinstance(act, nn.Identity) else None
    return None


def is_activation(node: fx.Node, root: nn.Module) -> bool:
    """Whether ``node`` applies a recognised activation to its first argument."""
    if node.op == "call_module":
        return isinstance(root.get_submodule(str(node.target)), tuple(_MODULES))
    if node.op == "call_function":
        return node.target in _FUNCTIONS
    if node.op == "call_method":
        return node.target in _METHODS
    return False


def _inplace_flag(fn: Callable[..., Any], node: fx.Node) -> bool:
    if node.kwargs.get("inplace") is True:
        return True
    try:
        bound = inspect.signature(fn).bind_partial(*node.args, **node.kwargs)
    except (TypeError, ValueError):  # builtins without signatures take no inplace flag
        return False
    return bound.arguments.get("inplace") is True


def mutates_input(node: fx.Node, root: nn.Module) -> bool:
    """Whether ``node`` writes into its first argument (``ReLU(inplace=True)``, ``relu_``, ``+=`` …)."""
    if node.op == "call_module":
        return getattr(root.get_submodule(str(node.target)), "inplace", False) is True
    if node.op == "call_method":
        return str(node.target).endswith("_") and not str(node.target).startswith("_")
    if node.op == "call_function":
        if node.target in _INPLACE_OPERATORS:
            return True
        name = getattr(node.target, "__name__", "")
        if name.endswith("_") and not name.startswith("_"):
            return True
        return callable(node.target) and _inplace_flag(node.target, node)
    return False
