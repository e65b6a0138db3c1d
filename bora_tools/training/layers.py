"""The BoRA layer and what a model holding BoRA layers is made of.

``BoraLinear`` wraps a frozen linear layer; ``SavedModule`` holds a trainable
copy of a ``modules_to_save`` module next to the untouched original. The
adapter a model holds (``bora_adapter``) and the names its tensors have in the
model's ``state_dict`` versus the adapter file (``model_key``) live here too,
so that saving, resuming and merging read one definition.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping

import torch
from torch import nn

from bora_tools.core.adapter import PREFIX, SUFFIX_A, SUFFIX_B, SUFFIX_SIGMA, BoraAdapter, BoraModule
from bora_tools.core.factors import bora_forward_update, check_blocks
from bora_tools.errors import ConfigError

#: parameter names inside a BoraLinear, by adapter-file suffix
_PARAM_OF_SUFFIX = {SUFFIX_A: "lora_A", SUFFIX_B: "lora_B", SUFFIX_SIGMA: "bora_sigma"}


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2), which stores the weight as ``(in, out)``; recognised by name."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


class BoraLinear(nn.Module):
    """A frozen linear layer plus a BoRA update, computed without forming ``dW``.

    ``forward(x) = base(x) + s * BoRA(dropout(x))`` where the BoRA path costs a
    LoRA of rank ``r`` plus ``b*b*r`` multiply-adds per token (docs/format.md, section 1).
    The factors are float32 whatever the base dtype; under autocast the BoRA path
    runs in the autocast dtype like any matmul. ``disabled = True`` (see
    ``disable_bora``) runs the base layer alone.
    """

    def __init__(
        self, base: nn.Module, *, r: int, blocks: int, scaling: float, dropout: float = 0.0, name: str = "module"
    ):
        super().__init__()
        if isinstance(base, nn.Linear):
            m, n = base.out_features, base.in_features
        elif is_conv1d(base):
            n, m = base.weight.shape  # Conv1D stores (in, out)
        else:
            raise ConfigError(f"{name}: BoRA adapts nn.Linear or transformers Conv1D, found {type(base).__name__}")
        try:
            check_blocks(m, n, blocks, name=name)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.base_layer = base
        self.r, self.blocks, self.scaling = r, blocks, scaling
        self.disabled = False
        dev = base.weight.device
        # Factors train in float32 whatever the base dtype: small, and stable under any optimiser.
        self.lora_A = nn.Parameter(torch.empty(r, n, device=dev, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(m, r, device=dev, dtype=torch.float32))
        self.bora_sigma = nn.Parameter(torch.ones(blocks, blocks, r, device=dev, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as PEFT initialises lora_A
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return y
        x_in = self.dropout(x)
        if not _autocast_on(x.device.type):
            # Without autocast the path runs in the factors' float32; under autocast the matmuls take the
            # autocast dtype anyway, and an upcast copy of x would only be kept for backward.
            x_in = x_in.to(self.lora_A.dtype)
        delta = bora_forward_update(x_in, self.lora_A, self.lora_B, self.bora_sigma, self.scaling)
        return y + delta.to(y.dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, blocks={self.blocks}, scaling={self.scaling:g}"


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: one flag per device type
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


class SavedModule(nn.Module):
    """A trainable copy of a ``modules_to_save`` module (``module``) next to the frozen original."""

    def __init__(self, original: nn.Module):
        super().__init__()
        self.module = copy.deepcopy(original)
        for p in self.module.parameters():
            p.requires_grad_(True)
        self.original_module = original
        for p in self.original_module.parameters():
            p.requires_grad_(False)
        self.disabled = False

    def forward(self, *args, **kwargs):
        return (self.original_module if self.disabled else self.module)(*args, **kwargs)


def bora_modules(model: nn.Module) -> dict[str, BoraLinear]:
    """Every BoRA layer of ``model`` by the dotted name of the module it adapts."""
    return {n: m for n, m in model.named_modules() if isinstance(m, BoraLinear)}


def saved_modules(model: nn.Module) -> dict[str, SavedModule]:
    """Every ``modules_to_save`` wrapper of ``model`` by the dotted name of the module it replaces."""
    return {n: m for n, m in model.named_modules() if isinstance(m, SavedModule)}


def model_key(adapter_key: str) -> str | None:
    """The ``state_dict`` name of an adapter-file tensor in a model prepared by ``add_bora`` (None if not one).

    Example: ``model_key("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")``
    -> ``"model.layers.0.self_attn.q_proj.lora_A"``; a saved ``P.weight`` -> ``"P.module.weight"``.
    """
    if not adapter_key.startswith(PREFIX):
        return None
    rest = adapter_key[len(PREFIX):]
    for suffix, param in _PARAM_OF_SUFFIX.items():
        if rest.endswith(suffix):
            return f"{rest[:-len(suffix)]}.{param}"
    module, _, pname = rest.rpartition(".")
    return f"{module}.module.{pname}" if module else None


def adapter_keys(model: nn.Module) -> dict[str, str]:
    """``{state_dict name: adapter-file key}`` for every tensor of the adapter ``model`` holds."""
    out = {}
    for name in bora_modules(model):
        for suffix, param in _PARAM_OF_SUFFIX.items():
            out[f"{name}.{param}"] = PREFIX + name + suffix
    for name, mod in saved_modules(model).items():
        for pname, _ in mod.module.named_parameters(recurse=False):
            out[f"{name}.module.{pname}"] = f"{PREFIX}{name}.{pname}"
    return out


def bora_adapter(model: nn.Module, *, state_dict: Mapping[str, torch.Tensor] | None = None) -> BoraAdapter:
    """The adapter held by ``model`` as a ``BoraAdapter`` (detached float32 CPU tensors).

    ``state_dict`` (the model's, as a trainer gathered it: DeepSpeed, FSDP) is read
    instead of the modules' own parameters when given.
    """
    config = getattr(model, "bora_config", None)
    if config is None:
        raise ConfigError("this model has no BoRA layers (call add_bora or load_bora first)")

    def value(name: str, t: torch.Tensor) -> torch.Tensor:
        return (state_dict[name] if state_dict is not None else t).detach().cpu().contiguous()

    modules = {
        n: BoraModule(
            n,
            value(f"{n}.lora_A", m.lora_A).float(),
            value(f"{n}.lora_B", m.lora_B).float(),
            value(f"{n}.bora_sigma", m.bora_sigma).float(),
            m.scaling,
        )
        for n, m in bora_modules(model).items()
    }
    saved = {}
    for name, mod in saved_modules(model).items():
        for pname, p in mod.module.named_parameters(recurse=False):
            saved[f"{name}.{pname}"] = value(f"{name}.module.{pname}", p)
    return BoraAdapter(config=config, modules=modules, saved=saved)
