"""The life of a model with BoRA layers, as ``peft/tuners/lora/model.py`` holds a LoRA model's.

``add_bora`` wraps the target modules in ``BoraLinear`` layers (``load_bora`` adds
them with an adapter's values, ``save_bora`` writes the adapter in the format of
docs/format.md); ``merge_bora`` folds every adapter into its base weight exactly
as ``bora-tools merge`` does (float32, rounded once to the weight's dtype) and
gives back a plain transformers model; ``unload_bora`` gives back the untouched
base; ``disable_bora`` runs the base for a while (a reference forward in
DPO-style training) without changing anything; ``trainable_parameters`` counts
as PEFT's ``print_trainable_parameters`` does. Every module swap, in and out,
goes through ``_replace``; the Trainer hooks live in ``checkpoints``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bora_tools.core.adapter import BoraModule, check_against_base, load_adapter, save_adapter
from bora_tools.core.config import BoraConfig, matches_target
from bora_tools.core.row_merge import MERGEABLE_DTYPES, merged_weight
from bora_tools.errors import ConfigError, UnsupportedError
from bora_tools.progress import logger
from bora_tools.report import Report
from bora_tools.training import checkpoints
from bora_tools.training.layers import BoraLinear, SavedModule, bora_adapter, bora_modules, is_conv1d, saved_modules


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


def save_bora(model: nn.Module, path: str | Path, *, overwrite: bool = False, state_dict=None,
              tokenizer: Any = None) -> Path:
    """Save the model's BoRA adapter in the format of docs/format.md (atomically: ``path`` appears complete).

    ``state_dict``: the adapter's tensors gathered from shards (FSDP), read instead of the parameters.
    ``tokenizer`` (a transformers tokenizer): its files are saved beside the adapter, as PEFT and TRL do.
    """
    extra = tokenizer.save_pretrained if tokenizer is not None else None
    return save_adapter(bora_adapter(model, state_dict=state_dict), path, overwrite=overwrite, extra=extra)


def load_bora(model: nn.Module, path: str | Path, *, dropout: float = 0.0, token: str | None = None) -> nn.Module:
    """Add the BoRA layers of the adapter at ``path`` (a folder, or a Hub id ``owner/name[@revision]`` read
    with ``token``) to ``model`` and load their values.

    Raises:
        ShapeError: the adapter does not fit this model (another base model).
    """
    adapter = load_adapter(path, token=token)
    shapes = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    # a quantized layer (bitsandbytes' Linear4bit) stores its weight packed: its shape is the layer's
    shapes.update({f"{n}.weight": (m.out_features, m.in_features) for n, m in linear_modules(model).items()
                   if isinstance(m, nn.Linear)})
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


@dataclasses.dataclass
class TrainableParameters(Report):
    """How many parameters train, PEFT's ``print_trainable_parameters`` line as text."""

    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"trainable": self.trainable, "total": self.total, "percent": self.percent}

    def to_text(self) -> str:
        return f"trainable params: {self.trainable:,d} || all params: {self.total:,d} || trainable%: {self.percent:.4f}"


def trainable_parameters(model: nn.Module) -> TrainableParameters:
    """Trainable and total parameter counts (``print(trainable_parameters(model))`` prints PEFT's line).

    Shared (tied) tensors count once; a 4-bit weight (bitsandbytes' ``Params4bit``, two values a byte)
    counts its values, as PEFT counts it.
    """
    seen: dict[int, nn.Parameter] = {}
    for p in model.parameters():
        seen.setdefault(id(p), p)

    def values(p: nn.Parameter) -> int:
        return p.numel() * 2 if type(p).__name__ == "Params4bit" else p.numel()

    return TrainableParameters(
        trainable=sum(values(p) for p in seen.values() if p.requires_grad),
        total=sum(values(p) for p in seen.values()),
    )


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
    """Put the base modules back (``modules_to_save``: the trained copy or the original) and undo ``add_bora``."""
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
    """Put ``new`` where the module named ``name`` is: every swap, in (``add_bora``) and out (``_unwrap``)."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
