"""BoRA for training: layers on ``transformers`` models, the Trainer, in-memory merge, ``bora-tools train``.

Example::

    from bora_tools.core.config import BoraConfig
    from bora_tools.training import add_bora, save_bora

    cfg = BoraConfig(r=4, bora_blocks=2, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    model = add_bora(model, cfg)            # base frozen; a new adapter is a no-op
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ...                                     # train as usual, or hand the model to transformers.Trainer
    save_bora(model, "out/my-adapter")      # the adapter format of docs/format.md

Modules: ``layers`` (BoraLinear), ``model`` (add, save, load), ``trainer`` (adapter-only
Trainer checkpoints), ``inmemory`` (merge, unload, disable), ``data`` (JSONL datasets),
``options`` (``TrainOptions``: every hyperparameter of ``train``, light to import),
``sft`` (``train``, what ``bora-tools train`` runs).

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
    "disable_bora": "inmemory", "merge_bora": "inmemory", "unload_bora": "inmemory",
    "TrainableParameters": "trainer", "trainable_parameters": "trainer",
    "TrainOptions": "options",
    "TrainReport": "sft", "default_target_modules": "sft", "train": "sft",
}

__all__ = [
    "BoraLinear", "add_bora", "save_bora", "load_bora", "randomize_bora", "bora_modules", "bora_adapter",
    "linear_modules", "trainable_parameters", "TrainableParameters", "merge_bora", "unload_bora", "disable_bora",
    "train", "TrainOptions", "TrainReport", "default_target_modules",
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
    from bora_tools.training.inmemory import disable_bora, merge_bora, unload_bora
    from bora_tools.training.layers import BoraLinear, bora_adapter, bora_modules
    from bora_tools.training.model import add_bora, linear_modules, load_bora, randomize_bora, save_bora
    from bora_tools.training.options import TrainOptions
    from bora_tools.training.sft import TrainReport, default_target_modules, train
    from bora_tools.training.trainer import TrainableParameters, trainable_parameters
