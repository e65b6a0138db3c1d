"""Add BoRA layers to a model, save and load its adapter (the format of docs/format.md)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from bora_tools.core.adapter import check_against_base, load_adapter, save_adapter
from bora_tools.core.config import BoraConfig, matches_target
from bora_tools.errors import ConfigError
from bora_tools.progress import logger
from bora_tools.training import checkpoints
from bora_tools.training.layers import BoraLinear, SavedModule, bora_adapter, bora_modules, is_conv1d


def linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every module BoRA can adapt (``nn.Linear`` or transformers' ``Conv1D``), by dotted name."""
    return {n: m for n, m in model.named_modules() if n and (isinstance(m, nn.Linear) or is_conv1d(m))}


def add_bora(model: nn.Module, config: BoraConfig, *, dropout: float = 0.0) -> nn.Module:
    """Wrap every module matched by ``config.target_modules`` in a ``BoraLinear``, in place.

    The base is frozen; ``modules_to_save`` get trainable copies. A GPT-2
    ``Conv1D`` needs ``fan_in_fan_out`` (set with a warning, as PEFT does).
    Afterwards ``model.save_pretrained(dir)`` writes the adapter, so
    ``transformers.Trainer`` writes adapter-only checkpoints and resumes from them.

    Raises:
        ConfigError: no target module matched, a matched module is not linear,
            ``bora_blocks`` does not divide one of its dimensions, or the model has BoRA layers already.
    """
    if config.target_modules is None:
        raise ConfigError("target_modules: required to add BoRA layers (a list of names or one regex)")
    if getattr(model, "bora_config", None) is not None:
        raise ConfigError(f"this {type(model).__name__} has BoRA layers already (merge_bora or unload_bora first)")
    names = [n for n, _ in model.named_modules() if n]
    linear = linear_modules(model)
    targets = [n for n in linear if matches_target(config.target_modules, n)]
    if not targets:
        raise ConfigError(
            f"target_modules {config.target_modules!r} matched no linear module of {type(model).__name__}"
        )
    both = [n for n in targets if config.is_module_to_save(n)]
    if both:  # PEFT would wrap it twice; the format keeps either the update or the whole module
        raise ConfigError(f"modules_to_save: {both[0]} is also matched by target_modules; a module is either "
                          f"adapted or saved whole")
    conv = [n for n in targets if is_conv1d(linear[n])]
    if conv and not config.fan_in_fan_out:  # a copy: the caller's config is never modified
        logger.warning(f"{conv[0]} is a Conv1D (weight stored (in, out)): setting fan_in_fan_out=True")
        config = dataclasses.replace(config, fan_in_fan_out=True)
    nonconv = [n for n in targets if isinstance(linear[n], nn.Linear)]
    if nonconv and config.fan_in_fan_out:
        raise ConfigError(f"{nonconv[0]}: fan_in_fan_out=True but the module is nn.Linear (weight stored (out, in))")
    saved = [n for n in names if config.is_module_to_save(n) and n not in targets]
    nested = [n for n in saved if any(True for _ in model.get_submodule(n).children())]
    if nested:  # the format stores P.weight / P.bias only: a container's inner tensors have no key
        raise ConfigError(f"modules_to_save: {nested[0]} holds submodules; list its leaf modules instead")
    layers = {  # built before anything is replaced: a refused module leaves the model untouched
        name: BoraLinear(linear[name], r=config.rank_for(name), blocks=config.bora_blocks,
                         scaling=config.scaling_for(name), dropout=dropout, name=name)
        for name in targets
    }
    model._bora_requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for name, layer in layers.items():
        for p in layer.parameters(recurse=False):
            p.requires_grad_(True)
        _replace(model, name, layer)
    for name in saved:
        _replace(model, name, SavedModule(model.get_submodule(name)))
    model.bora_config = config
    checkpoints.attach(model)
    return model


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def save_bora(model: nn.Module, path: str | Path, *, overwrite: bool = False) -> Path:
    """Save the model's BoRA adapter in the format of docs/format.md (atomically: ``path`` appears complete)."""
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
