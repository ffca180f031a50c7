"""Which modules of a model gradwatch looks at, what kind each one is, and what it is called."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .kinds import (  # noqa: F401
    ACTIVATION,
    ATTENTION,
    CONV,
    EMBEDDING,
    LINEAR,
    MATRIX_KINDS,
    NORM,
    OTHER,
    RECURRENT,
    RELU,
    SATURATING_KINDS,
    SIGMOID,
    TANH,
    UNIT_ROW_KINDS,
)

# The kinds are torch-free strings (gradwatch.kinds); re-exported here, where they began.
from .wording import with_class

_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def module_kind(module: nn.Module) -> str:
    """Classify a module.

    >>> module_kind(nn.Linear(2, 3)), module_kind(nn.ReLU()), module_kind(nn.GELU())
    ('linear', 'relu', 'activation')
    >>> module_kind(nn.LSTM(2, 3)), module_kind(nn.GRUCell(2, 3))
    ('recurrent', 'recurrent')
    """
    if isinstance(module, nn.Linear):
        return LINEAR
    if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
        return CONV
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return EMBEDDING
    if isinstance(module, _NORM_TYPES):
        return NORM
    if isinstance(module, nn.MultiheadAttention):
        return ATTENTION
    if isinstance(module, (nn.RNNBase, nn.RNNCellBase)):
        return RECURRENT
    if isinstance(module, (nn.ReLU, nn.ReLU6)):
        return RELU
    if isinstance(module, nn.Sigmoid):
        return SIGMOID
    if isinstance(module, nn.Tanh):
        return TANH
    if isinstance(
        module,
        (
            nn.LeakyReLU,
            nn.PReLU,
            nn.RReLU,
            nn.ELU,
            nn.SELU,
            nn.CELU,
            nn.GELU,
            nn.SiLU,
            nn.Mish,
            nn.Softplus,
            nn.Hardswish,
            nn.Hardsigmoid,
            nn.Hardtanh,
        ),
    ):
        return ACTIVATION
    return OTHER


def unwrap(model: nn.Module) -> nn.Module:
    """Strip wrappers that only add a name prefix: DDP/DataParallel (``module.``),
    ``torch.compile`` (``_orig_mod.``) and Lightning Fabric's ``fabric.setup()`` wrapper
    (``_forward_module.``; recognised by its attributes, without importing Lightning)."""
    seen = 0
    while seen < 8:
        seen += 1
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        elif (fabric := _fabric_inner(model)) is not None:
            model = fabric
        else:
            break
    return model


def _fabric_inner(model: nn.Module) -> nn.Module | None:
    """The module inside Lightning Fabric's ``_FabricModule``: the user's own module when
    Fabric kept it, else the one its strategy wrapped (DDP, unwrapped next)."""
    if type(model).__name__ != "_FabricModule":
        return None
    for name in ("_original_module", "_forward_module"):
        inner = getattr(model, name, None)
        if isinstance(inner, nn.Module) and inner is not model:
            return inner
    return None


def is_compiled(model: nn.Module) -> bool:
    """True for a ``torch.compile``\\ d module (an ``OptimizedModule``) or a wrapper of one."""
    for _ in range(8):
        if hasattr(model, "_orig_mod"):
            return True
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return False
        model = inner
    return False


@dataclass
class LayerInfo:
    """A module gradwatch watches: its name, kind and trainable parameters."""

    index: int
    name: str
    module: nn.Module
    kind: str
    params: list[tuple[str, nn.Parameter]] = field(default_factory=list)
    is_leaf: bool = True
    probe: bool = False  # gets forward hooks (signals, activation statistics)

    @property
    def numel(self) -> int:
        return sum(p.numel() for _, p in self.params)

    def __post_init__(self) -> None:
        weight = dict(self.params).get("weight")
        #: inputs per output unit of the main weight (None where that has no meaning)
        self.fan_in: int | None = None
        if weight is not None and weight.dim() >= 2 and self.kind in UNIT_ROW_KINDS:
            self.fan_in = weight[0].numel()

    @property
    def display_name(self) -> str:
        """The name as shown to the user: ``<root>``, or ``0 (Linear)`` for a bare index."""
        return with_class(self.name, type(self.module).__name__)


def discover(
    root: nn.Module,
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> list[LayerInfo]:
    """List the modules to watch, in registration order.

    A module is watched when it owns trainable parameters itself, or when it is a
    ReLU-family or sigmoid/tanh activation (for dead-unit and saturation statistics).
    Activations inside a fully frozen sub-network are skipped: nothing can be trained
    there. ``include``/``exclude`` are glob patterns on module names (``"encoder.*"``).
    """
    frozen_subtrees = _frozen_subtree_names(root)
    layers: list[LayerInfo] = []
    for name, module in root.named_modules():
        if include and not any(_matches(name, pat) for pat in include):
            continue
        if exclude and any(_matches(name, pat) for pat in exclude):
            continue
        kind = module_kind(module)
        params = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        is_leaf = next(iter(module.children()), None) is None
        if not params and (
            kind not in (RELU, SIGMOID, TANH)
            # a frozen sub-network (a teacher, a frozen backbone): nothing is trained
            # there, so its activations are neither measured nor listed
            or any(_is_inside(name, frozen) for frozen in frozen_subtrees)
        ):
            continue
        layers.append(LayerInfo(len(layers), name, module, kind, params, is_leaf, True))
    return layers


def _matches(name: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(name, pattern) or name == pattern or name.startswith(pattern + ".")


def _is_inside(name: str, prefix: str) -> bool:
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


def _frozen_subtree_names(root: nn.Module) -> list[str]:
    frozen: list[str] = []
    for name, module in root.named_modules():
        if any(_is_inside(name, f) for f in frozen):
            continue
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            frozen.append(name)
    return frozen


def has_parameters(model: nn.Module) -> bool:
    return next(iter(model.parameters()), None) is not None


def trainable_parameters(model: nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]
