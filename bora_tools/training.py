"""BoRA layers for ``transformers`` models: add, train with any optimiser, save, load.

Example::

    from bora_tools.core.config import BoraConfig
    from bora_tools.training import add_bora, save_bora

    cfg = BoraConfig(r=4, bora_blocks=2, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    model = add_bora(model, cfg)            # base frozen; a new adapter is a no-op
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ...                                     # train as usual
    save_bora(model, "out/my-adapter")      # the adapter format of docs/format.md
"""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import torch
from torch import nn

from bora_tools.core.adapter import BoraAdapter, BoraModule, check_against_base, load_adapter, save_adapter
from bora_tools.core.config import BoraConfig, matches_target
from bora_tools.core.factors import bora_forward_update, check_blocks
from bora_tools.errors import ConfigError
from bora_tools.progress import logger


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' Conv1D (GPT-2) stores the weight as (in, out); imported lazily by name
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


class BoraLinear(nn.Module):
    """A frozen linear layer plus a BoRA update, computed without forming ``dW``.

    ``forward(x) = base(x) + s * BoRA(dropout(x))`` where the BoRA path costs a
    LoRA of rank ``r`` plus ``b*b*r`` multiply-adds per token (docs/format.md, section 1).
    """

    def __init__(
        self, base: nn.Module, *, r: int, blocks: int, scaling: float, dropout: float = 0.0, name: str = "module"
    ):
        super().__init__()
        if isinstance(base, nn.Linear):
            m, n = base.out_features, base.in_features
        elif _is_conv1d(base):
            n, m = base.weight.shape  # Conv1D stores (in, out)
        else:
            raise ConfigError(f"{name}: BoRA adapts nn.Linear or transformers Conv1D, found {type(base).__name__}")
        try:
            check_blocks(m, n, blocks, name=name)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.base_layer = base
        self.r, self.blocks, self.scaling = r, blocks, scaling
        dev = base.weight.device
        # Factors train in float32 whatever the base dtype: small, and stable under any optimiser.
        self.lora_A = nn.Parameter(torch.empty(r, n, device=dev, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(m, r, device=dev, dtype=torch.float32))
        self.bora_sigma = nn.Parameter(torch.ones(blocks, blocks, r, device=dev, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as PEFT initialises lora_A
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base_layer(x, *args, **kwargs)
        x_in = self.dropout(x).to(self.lora_A.dtype)
        delta = bora_forward_update(x_in, self.lora_A, self.lora_B, self.bora_sigma, self.scaling)
        return y + delta.to(y.dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, blocks={self.blocks}, scaling={self.scaling:g}"


class _SavedModule(nn.Module):
    """A trainable copy of a ``modules_to_save`` module; the original stays untouched."""

    def __init__(self, original: nn.Module):
        super().__init__()
        self.module = copy.deepcopy(original)
        for p in self.module.parameters():
            p.requires_grad_(True)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def add_bora(model: nn.Module, config: BoraConfig, *, dropout: float = 0.0) -> nn.Module:
    """Wrap every module matched by ``config.target_modules`` in a ``BoraLinear``, in place.

    The base is frozen; ``modules_to_save`` get trainable copies. A GPT-2
    ``Conv1D`` needs ``fan_in_fan_out`` (set with a warning, as PEFT does).

    Raises:
        ConfigError: no target module matched, a matched module is not linear,
            or ``bora_blocks`` does not divide one of its dimensions.
    """
    if config.target_modules is None:
        raise ConfigError("target_modules: required to add BoRA layers (a list of names or one regex)")
    for p in model.parameters():
        p.requires_grad_(False)
    names = [n for n, _ in model.named_modules() if n]
    targets = [
        n
        for n in names
        if matches_target(config.target_modules, n)
        and (isinstance(model.get_submodule(n), nn.Linear) or _is_conv1d(model.get_submodule(n)))
    ]
    if not targets:
        raise ConfigError(
            f"target_modules {config.target_modules!r} matched no linear module of {type(model).__name__}"
        )
    both = [n for n in targets if config.is_module_to_save(n)]
    if both:  # PEFT would wrap it twice; the format keeps either the update or the whole module
        raise ConfigError(f"modules_to_save: {both[0]} is also matched by target_modules; a module is either "
                          f"adapted or saved whole")
    conv = [n for n in targets if _is_conv1d(model.get_submodule(n))]
    if conv and not config.fan_in_fan_out:  # a copy: the caller's config is never modified
        logger.warning(f"{conv[0]} is a Conv1D (weight stored (in, out)): setting fan_in_fan_out=True")
        config = dataclasses.replace(config, fan_in_fan_out=True)
    for name in targets:
        base = model.get_submodule(name)
        if isinstance(base, nn.Linear) and config.fan_in_fan_out:
            raise ConfigError(f"{name}: fan_in_fan_out=True but the module is nn.Linear (weight stored (out, in))")
        layer = BoraLinear(
            base,
            r=config.rank_for(name),
            blocks=config.bora_blocks,
            scaling=config.scaling_for(name),
            dropout=dropout,
            name=name,
        )
        _replace(model, name, layer)
    saved = [n for n in names if config.is_module_to_save(n) and n not in targets]
    nested = [n for n in saved if any(True for _ in model.get_submodule(n).children())]
    if nested:  # the format stores P.weight / P.bias only: a container's inner tensors have no key
        raise ConfigError(f"modules_to_save: {nested[0]} holds submodules; list its leaf modules instead")
    for name in saved:
        _replace(model, name, _SavedModule(model.get_submodule(name)))
    model.bora_config = config
    return model


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def bora_modules(model: nn.Module) -> dict[str, BoraLinear]:
    """Every BoRA layer of ``model`` by the dotted name of the module it adapts."""
    return {n: m for n, m in model.named_modules() if isinstance(m, BoraLinear)}


def bora_adapter(model: nn.Module) -> BoraAdapter:
    """The adapter held by ``model`` as a ``BoraAdapter`` (detached float32 CPU tensors)."""
    config = getattr(model, "bora_config", None)
    if config is None:
        raise ConfigError("this model has no BoRA layers (call add_bora or load_bora first)")

    def cpu(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to("cpu", torch.float32).contiguous()

    modules = {
        n: BoraModule(n, cpu(m.lora_A), cpu(m.lora_B), cpu(m.bora_sigma), m.scaling)
        for n, m in bora_modules(model).items()
    }
    saved = {}
    for name, mod in model.named_modules():
        if isinstance(mod, _SavedModule):
            for pname, p in mod.module.named_parameters(recurse=False):
                saved[f"{name}.{pname}"] = p.detach().cpu().contiguous()
    return BoraAdapter(config=config, modules=modules, saved=saved)


def save_bora(model: nn.Module, path: str | Path, *, overwrite: bool = False) -> Path:
    """Save the model's BoRA adapter in the format of docs/format.md (atomically)."""
    return save_adapter(bora_adapter(model), path, overwrite=overwrite)


def load_bora(model: nn.Module, path: str | Path, *, dropout: float = 0.0) -> nn.Module:
    """Add the BoRA layers of the adapter at ``path`` to ``model`` and load their values.

    Raises:
        ShapeError: the adapter does not fit this model (another base model).
    """
    adapter = load_adapter(path)
    shapes = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    check_against_base(adapter, shapes.get, source=str(path))
    add_bora(model, adapter.config, dropout=dropout)
    layers = bora_modules(model)
    missing = sorted(set(adapter.modules) - set(layers))
    if missing:
        raise ConfigError(f"{path}: modules {', '.join(missing)} are not matched by target_modules")
    with torch.no_grad():
        for name, mod in adapter.modules.items():
            layer = layers[name]
            layer.lora_A.copy_(mod.A)
            layer.lora_B.copy_(mod.B)
            layer.bora_sigma.copy_(mod.sigma)
        for key, tensor in adapter.saved.items():
            module_name, _, pname = key.rpartition(".")
            getattr(model.get_submodule(module_name).module, pname).copy_(tensor)
    return model


def randomize_bora(model: nn.Module, *, seed: int = 0, std: float = 0.1) -> nn.Module:
    """Give every BoRA layer non-zero ``B`` and a non-trivial ``sigma`` (for tests and demos).

    A fresh adapter is a no-op (``B = 0``); this makes its effect visible.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in bora_modules(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * std)
            layer.bora_sigma.copy_(1.0 + 0.5 * torch.randn(layer.bora_sigma.shape, generator=gen))
    return model
