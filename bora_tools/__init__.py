"""bora-tools: ship BoRA adapters wherever LoRA goes.

The public Python API, one name per job (``import bora_tools as bt``)::

    adapter = bt.load_adapter("my-bora")                       # read and validate (docs/format.md)
    print(bt.inspect_adapter("my-bora"))                       # every command returns a report
    bt.merge_adapter("my-bora", "base-model", "merged")        # W + dW, streamed
    bt.to_lora("my-bora", "my-lora", rank="full")              # a PEFT LoRA adapter
    bt.export_gguf("merged", "merged.gguf", outtype="q8_0")    # GGUF for llama.cpp
    bt.push(path="my-bora", repo_id="me/my-bora")              # the Hugging Face Hub
    bt.verify("merged", "my-bora", base="base-model").passed   # the output gives the adapter's outputs
    bt.train("base-model", "data.jsonl", "my-bora", r=8, blocks=4)   # fine-tune a BoRA adapter (Trainer)

Each report has ``to_dict()`` (what ``--json`` prints) and a text form (``str(report)``).
Every error a user can cause is a ``bt.BoraError`` with a one-line message.
Names are imported on first use, so ``import bora_tools`` stays cheap.
"""

from __future__ import annotations

import importlib
from importlib import metadata
from typing import TYPE_CHECKING, Any

try:
    __version__ = metadata.version("bora-tools")
except metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

#: public name -> the module that defines it
_EXPORTS = {
    # the adapter format
    "BoraConfig": "bora_tools.core.config",
    "BoraAdapter": "bora_tools.core.adapter",
    "BoraModule": "bora_tools.core.adapter",
    "load_adapter": "bora_tools.core.adapter",
    "save_adapter": "bora_tools.core.adapter",
    # the math
    "delta_weight": "bora_tools.core.factors",
    "exact_lora_factors": "bora_tools.core.factors",
    "RankPolicy": "bora_tools.core.lowrank",
    # the commands and their reports
    "inspect_adapter": "bora_tools.inspection",
    "InspectReport": "bora_tools.inspection",
    "merge_adapter": "bora_tools.merge",
    "MergeReport": "bora_tools.merge",
    "merged_weight": "bora_tools.core.row_merge",
    "combine_adapters": "bora_tools.combine",
    "CombineReport": "bora_tools.combine",
    "to_lora": "bora_tools.conversion",
    "ToLoraReport": "bora_tools.conversion",
    "export_gguf": "bora_tools.gguf.export",
    "ExportReport": "bora_tools.gguf.report",
    "push": "bora_tools.hub.push",
    "PushReport": "bora_tools.hub.push",
    "build_model_card": "bora_tools.hub.card",
    "verify": "bora_tools.verification",
    "VerifyReport": "bora_tools.verification",
    # training
    "add_bora": "bora_tools.training",
    "save_bora": "bora_tools.training",
    "load_bora": "bora_tools.training",
    "bora_modules": "bora_tools.training",
    "BoraLinear": "bora_tools.training",
    "randomize_bora": "bora_tools.training",
    "bora_adapter": "bora_tools.training",
    "merge_bora": "bora_tools.training",
    "unload_bora": "bora_tools.training",
    "disable_bora": "bora_tools.training",
    "trainable_parameters": "bora_tools.training",
    "train": "bora_tools.training",
    "TrainReport": "bora_tools.training",
    # errors
    "BoraError": "bora_tools.errors",
    "ConfigError": "bora_tools.errors",
    "CheckpointError": "bora_tools.errors",
    "ShapeError": "bora_tools.errors",
    "ModelDirError": "bora_tools.errors",
    "UnsafePathError": "bora_tools.errors",
    "OutputExistsError": "bora_tools.errors",
    "OutputWriteError": "bora_tools.errors",
    "UnsupportedError": "bora_tools.errors",
    "HubError": "bora_tools.errors",
    "ValidationError": "bora_tools.errors",
}

__all__ = [
    "__version__",
    "BoraConfig", "BoraAdapter", "BoraModule", "load_adapter", "save_adapter", "delta_weight",
    "exact_lora_factors", "RankPolicy", "inspect_adapter", "InspectReport", "merge_adapter", "MergeReport",
    "merged_weight", "to_lora", "ToLoraReport", "export_gguf", "ExportReport", "push", "PushReport",
    "build_model_card", "add_bora", "save_bora", "load_bora", "bora_modules", "BoraLinear", "randomize_bora",
    "bora_adapter", "merge_bora", "unload_bora", "disable_bora", "trainable_parameters", "train", "TrainReport",
    "verify", "VerifyReport",
    "BoraError",
    "ConfigError", "CheckpointError", "ShapeError", "ModelDirError", "UnsafePathError", "OutputExistsError",
    "OutputWriteError", "UnsupportedError", "HubError", "ValidationError",
    "combine_adapters", "CombineReport",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'bora_tools' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from bora_tools.combine import CombineReport, combine_adapters
    from bora_tools.conversion import ToLoraReport, to_lora
    from bora_tools.core.adapter import BoraAdapter, BoraModule, load_adapter, save_adapter
    from bora_tools.core.config import BoraConfig
    from bora_tools.core.factors import delta_weight, exact_lora_factors
    from bora_tools.core.lowrank import RankPolicy
    from bora_tools.core.row_merge import merged_weight
    from bora_tools.errors import (
        BoraError,
        CheckpointError,
        ConfigError,
        HubError,
        ModelDirError,
        OutputExistsError,
        OutputWriteError,
        ShapeError,
        UnsafePathError,
        UnsupportedError,
        ValidationError,
    )
    from bora_tools.gguf.export import export_gguf
    from bora_tools.gguf.report import ExportReport
    from bora_tools.hub.card import build_model_card
    from bora_tools.hub.push import PushReport, push
    from bora_tools.inspection import InspectReport, inspect_adapter
    from bora_tools.merge import MergeReport, merge_adapter
    from bora_tools.training import (
        BoraLinear,
        TrainReport,
        add_bora,
        bora_adapter,
        bora_modules,
        disable_bora,
        load_bora,
        merge_bora,
        randomize_bora,
        save_bora,
        train,
        trainable_parameters,
        unload_bora,
    )
    from bora_tools.verification import VerifyReport, verify
