"""BoRA for training: layers on ``transformers`` models, Trainer checkpoints, in-memory merge, ``bora-tools train``.

Example::

    from bora_tools.core.config import BoraConfig
    from bora_tools.training import add_bora, save_bora

    cfg = BoraConfig(r=4, bora_blocks=2, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    model = add_bora(model, cfg)            # base frozen; a new adapter is a no-op
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ...                                     # train as usual, or hand the model to transformers.Trainer
    save_bora(model, "out/my-adapter")      # the adapter format of docs/format.md

Modules, as ``peft/tuners/lora/`` lays out a tuner: ``layers`` (BoraLinear), ``model``
(the life of an adapted model: add, load, save, merge, unload, disable, count),
``checkpoints`` (the hooks that make ``transformers.Trainer`` checkpoints adapter-only
and resumable), ``data`` (JSONL datasets), ``options`` (``TrainOptions``: every
hyperparameter of ``train``, light to import), ``sft`` (``train``, what ``bora-tools train`` runs),
``fsdp`` (``train --fsdp``: FSDP2 sharding and whole-adapter checkpoints), ``quantized`` (4-bit and 8-bit
bases through bitsandbytes) and ``reporting`` (``train --report-to tensorboard``).

Names are imported on first use, so that the command line reads ``options`` without loading torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: public name -> the module that defines it
_EXPORTS = {
    "BoraLinear": "layers", "bora_adapter": "layers", "bora_modules": "layers",
    "add_bora": "model", "linear_modules": "model", "load_bora": "model", "randomize_bora": "model",
    "save_bora": "model",
    "disable_bora": "model", "merge_bora": "model", "unload_bora": "model",
    "TrainableParameters": "model", "trainable_parameters": "model",
    "TrainOptions": "options",
    "TrainReport": "sft", "FinishedRun": "sft", "default_target_modules": "sft", "train": "sft",
}

__all__ = [
    "BoraLinear", "add_bora", "save_bora", "load_bora", "randomize_bora", "bora_modules", "bora_adapter",
    "linear_modules", "trainable_parameters", "TrainableParameters", "merge_bora", "unload_bora", "disable_bora",
    "train", "TrainOptions", "TrainReport", "FinishedRun", "default_target_modules",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from bora_tools.training.layers import BoraLinear, bora_adapter, bora_modules
    from bora_tools.training.model import (
        TrainableParameters,
        add_bora,
        disable_bora,
        linear_modules,
        load_bora,
        merge_bora,
        randomize_bora,
        save_bora,
        trainable_parameters,
        unload_bora,
    )
    from bora_tools.training.options import TrainOptions
    from bora_tools.training.sft import FinishedRun, TrainReport, default_target_modules, train
