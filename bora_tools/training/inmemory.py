"""Merge, unload or switch off the BoRA layers of a model in memory.

``merge_bora`` folds every adapter into its base weight exactly as ``bora-tools
merge`` does (float32, rounded once to the weight's dtype) and gives back a plain
transformers model; ``unload_bora`` gives back the untouched base;
``disable_bora`` runs the base for a while (a reference forward in DPO-style
training) without changing anything.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from bora_tools.core.adapter import BoraModule
from bora_tools.core.row_merge import MERGEABLE_DTYPES, merged_weight
from bora_tools.errors import ConfigError, UnsupportedError
from bora_tools.training import checkpoints
from bora_tools.training.layers import BoraLinear, bora_modules, saved_modules


def merge_bora(model: nn.Module) -> nn.Module:
    """Fold every BoRA layer into its base weight; returns ``model``, now a plain transformers model.

    Each weight becomes ``W + dW`` computed in float32 on the weight's device and
    rounded once to its dtype, the arithmetic of ``bora-tools merge`` (so the logits
    equal those of the merged directory loaded with transformers). ``modules_to_save``
    keep their trained copy. Everything is checked before the first weight changes.

    Raises:
        ConfigError: the model has no BoRA layers.
        UnsupportedError: a base weight is shared with another module (tied) or not a float
            tensor, or the merged weight would hold non-finite values (float16 overflow, NaN factors).
    """
    layers = _layers_of(model)
    shared = _shared_weights(model)
    problems = []
    for name, layer in layers.items():
        w = layer.base_layer.weight
        if id(w) in shared:
            others = [n for n in shared[id(w)] if n != f"{name}.base_layer.weight"]
            problems.append(f"{name}: its weight is shared with {', '.join(others)} (tied); merging would change both")
        elif w.dtype not in MERGEABLE_DTYPES:
            problems.append(f"{name}: weight dtype {w.dtype} cannot be merged (quantized?); only float weights")
    if problems:
        raise UnsupportedError("; ".join(problems), hint="unload_bora gives the base back instead")
    fan_in_fan_out = model.bora_config.fan_in_fan_out
    with torch.no_grad():
        for name, layer in layers.items():  # a first pass: nothing changes before everything is known to fit
            if not torch.isfinite(_merged(name, layer, fan_in_fan_out)).all():
                raise UnsupportedError(f"{name}: the merged weight holds non-finite values "
                                       f"({layer.base_layer.weight.dtype} overflow or non-finite factors)")
        for name, layer in layers.items():
            layer.base_layer.weight.copy_(_merged(name, layer, fan_in_fan_out))
    return _unwrap(model, keep_trained=True)


def _merged(name: str, layer: BoraLinear, fan_in_fan_out: bool) -> torch.Tensor:
    module = BoraModule(name, layer.lora_A.detach(), layer.lora_B.detach(), layer.bora_sigma.detach(), layer.scaling)
    w = layer.base_layer.weight.detach()
    return merged_weight(w, module, fan_in_fan_out=fan_in_fan_out, device=w.device, out_dtype=w.dtype)


def unload_bora(model: nn.Module) -> nn.Module:
    """Remove every BoRA layer; returns ``model`` with its base modules, weights and ``requires_grad`` as before.

    Raises:
        ConfigError: the model has no BoRA layers.
    """
    _layers_of(model)
    return _unwrap(model, keep_trained=False)


@contextlib.contextmanager
def disable_bora(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model inside the block: BoRA layers add nothing, ``modules_to_save`` use the originals.

    Example::

        with torch.no_grad(), disable_bora(model):
            ref_logits = model(**batch).logits      # the base model's logits (DPO's reference)

    With gradient checkpointing, a backward pass recomputes the forward: run the
    backward of a forward made inside the block inside the block too.
    """
    switches = [*bora_modules(model).values(), *saved_modules(model).values()]
    before = [m.disabled for m in switches]
    for m in switches:
        m.disabled = True
    try:
        yield model
    finally:
        for m, was in zip(switches, before):
            m.disabled = was


def _layers_of(model: nn.Module) -> dict[str, BoraLinear]:
    if getattr(model, "bora_config", None) is None:
        raise ConfigError(f"this {type(model).__name__} has no BoRA layers (call add_bora or load_bora first)")
    return bora_modules(model)


def _shared_weights(model: nn.Module) -> dict[int, list[str]]:
    """``id(parameter) -> every name`` for the parameters reachable under more than one name (tied weights)."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return {k: v for k, v in names.items() if len(v) > 1}


def _unwrap(model: nn.Module, *, keep_trained: bool) -> nn.Module:
    for name, layer in bora_modules(model).items():
        _replace(model, name, layer.base_layer)
    for name, saved in saved_modules(model).items():
        _replace(model, name, saved.module if keep_trained else saved.original_module)
    checkpoints.detach(model)
    flags = model.__dict__.pop("_bora_requires_grad", {})
    for name, p in model.named_parameters():
        p.requires_grad_(flags.get(name, p.requires_grad))
    del model.bora_config
    return model


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)

