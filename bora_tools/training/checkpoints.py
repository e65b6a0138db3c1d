"""``transformers.Trainer`` with no extra argument: adapter-only checkpoints that resume.

``add_bora`` calls ``attach`` on the model it prepares:

- ``model.save_pretrained(dir)`` writes the adapter (``adapter_config.json`` +
  ``adapter_model.safetensors``, the format of docs/format.md), as a PEFT model
  does. ``Trainer`` saves every ``checkpoint-N`` and ``save_model()`` through it,
  so checkpoints hold the adapter and the trainer's own state files, never the
  frozen base.
- Next to the adapter goes ``model.safetensors.index.json``, a few hundred bytes
  that map the model's adapter parameters to ``adapter_model.safetensors``: it is
  what ``Trainer.train(resume_from_checkpoint=...)`` reads to reload a checkpoint
  that has no full weights file. A load pre-hook on the model renames the adapter
  file's keys to the model's parameter names, and ``_keys_to_ignore_on_save``
  lists the frozen base tensors, which the trainer then expects to be absent.

``detach`` undoes all three (``merge_bora`` and ``unload_bora`` call it).
"""

from __future__ import annotations

import json
import types
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from bora_tools.core.adapter import PREFIX, WEIGHTS_NAME, adapter_from_tensors
from bora_tools.core.config import CONFIG_NAME
from bora_tools.errors import UnsupportedError
from bora_tools.io.atomic import atomic_output
from bora_tools.training.layers import adapter_keys, bora_adapter, model_key

#: the file ``Trainer`` reads to resume from a checkpoint without full weights
RESUME_MAP_NAME = "model.safetensors.index.json"


def attach(model: nn.Module) -> None:
    """Make ``model.save_pretrained`` write the adapter and let ``Trainer`` resume from such a directory."""
    keys = adapter_keys(model)
    model._bora_restore = {  # what detach puts back
        "keys_to_ignore_on_save": model.__dict__.get("_keys_to_ignore_on_save", _MISSING),
    }
    model._keys_to_ignore_on_save = {k for k in model.state_dict() if k not in keys}
    model.save_pretrained = types.MethodType(save_pretrained, model)
    model._bora_load_hook = model.register_load_state_dict_pre_hook(_adapter_keys_to_model_keys)


def detach(model: nn.Module) -> None:
    """Undo ``attach``: ``save_pretrained`` and loading are the model class's own again."""
    restore = model.__dict__.pop("_bora_restore", None)
    if restore is None:
        return
    model.__dict__.pop("save_pretrained", None)
    model.__dict__.pop("_bora_load_hook").remove()
    old = restore["keys_to_ignore_on_save"]
    if old is _MISSING:
        model.__dict__.pop("_keys_to_ignore_on_save", None)
    else:
        model._keys_to_ignore_on_save = old


_MISSING = object()


def save_pretrained(
    self: nn.Module,
    save_directory: str | Path,
    *,
    is_main_process: bool = True,
    state_dict: dict[str, torch.Tensor] | None = None,
    push_to_hub: bool = False,
    **_ignored: Any,
) -> None:
    """Write the BoRA adapter into ``save_directory`` (created if needed), as ``PeftModel.save_pretrained`` does.

    Bound to a model by ``add_bora``. Only ``is_main_process`` writes; ``state_dict``
    (gathered by the trainer under DeepSpeed or FSDP) is read instead of the
    parameters when given. Each file is written atomically; other files in the
    directory (the trainer's state) are left alone.
    """
    if push_to_hub:
        raise UnsupportedError("save_pretrained(push_to_hub=True): save, then run `bora-tools push`")
    if is_main_process:
        write_adapter_files(self, save_directory, state_dict=state_dict)


def write_adapter_files(model: nn.Module, directory: str | Path, *, state_dict=None) -> Path:
    """``adapter_config.json``, ``adapter_model.safetensors`` and the resume map into ``directory``, atomically."""
    adapter = bora_adapter(model, state_dict=state_dict)
    tensors = adapter.state_dict()
    adapter_from_tensors(adapter.config, tensors, source=PREFIX.rstrip("."))  # a saved adapter always loads back
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_output(directory / WEIGHTS_NAME, overwrite=True, record=False) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    with atomic_output(directory / CONFIG_NAME, overwrite=True, record=False) as tmp:
        tmp.write_text(json.dumps(adapter.config.to_dict(), indent=2, sort_keys=True) + "\n")
    resume_map = {
        "metadata": {
            "total_size": sum(t.numel() * t.element_size() for t in tensors.values()),
            "bora_tools": "lets transformers.Trainer resume from this adapter-only checkpoint",
        },
        "weight_map": {model_key(k): WEIGHTS_NAME for k in sorted(tensors)},
    }
    with atomic_output(directory / RESUME_MAP_NAME, overwrite=True, record=False) as tmp:
        tmp.write_text(json.dumps(resume_map, indent=2) + "\n")
    return directory


def _adapter_keys_to_model_keys(module, state_dict, prefix, *_args) -> None:
    """Load pre-hook: ``base_model.model.P.lora_A.weight`` -> ``P.lora_A`` (and the other adapter keys)."""
    for key in [k for k in state_dict if k.startswith(prefix + PREFIX)]:
        name = model_key(key[len(prefix):])
        if name is not None:
            state_dict[prefix + name] = state_dict.pop(key)
