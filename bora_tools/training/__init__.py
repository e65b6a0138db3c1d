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
and resumable), ``data`` (JSONL datasets), ``sft`` (``train``, what ``bora-tools train`` runs).
"""

from __future__ import annotations

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
from bora_tools.training.sft import TrainReport, default_target_modules, train

__all__ = [
    "BoraLinear", "add_bora", "save_bora", "load_bora", "randomize_bora", "bora_modules", "bora_adapter",
    "linear_modules", "trainable_parameters", "TrainableParameters", "merge_bora", "unload_bora", "disable_bora",
    "train", "TrainReport", "default_target_modules",
]
