"""A plain PEFT LoRA adapter read as a BoRA adapter with ``b = 1`` and ``sigma = 1`` (docs/format.md, section 1).

With one block, ``dW = s * B @ diag(sigma) @ A`` is PEFT's ``s * B @ A`` when ``sigma`` is all ones, and
``s`` is PEFT's own scaling: ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA), with ``rank_pattern`` and
``alpha_pattern`` overrides matched as PEFT matches them. What a LoRA file can mean beyond ``s * B @ A``
(DoRA's magnitude vector, trained biases, embedding or convolution adapters, other PEFT types) has no
BoRA form: it is refused in one line, never dropped silently.

``read_adapter`` is the one reader of the several-adapter commands (``merge A B``, ``combine``): a BoRA
directory goes to ``load_adapter``, a LoRA directory comes here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from bora_tools.core.adapter import (
    PREFIX,
    SUFFIX_A,
    SUFFIX_SIGMA,
    BoraAdapter,
    adapter_from_tensors,
    load_adapter,
    read_tensors,
)
from bora_tools.core.config import CONFIG_NAME, BoraConfig
from bora_tools.errors import ConfigError, UnsupportedError
from bora_tools.io.json import read_json
from bora_tools.io.kinds import input_kind

#: LoRA config keys carried into the BoRA reading (the others only steer training or placement).
_CARRIED = ("r", "lora_alpha", "use_rslora", "target_modules", "rank_pattern", "alpha_pattern", "fan_in_fan_out",
            "modules_to_save", "base_model_name_or_path", "task_type")


def read_adapter(path: str | Path) -> BoraAdapter:
    """A BoRA adapter directory, or a PEFT LoRA one read as BoRA with ``b = 1`` and ``sigma = 1``.

    Example::

        read_adapter("my-lora").modules[name].b      # 1
        read_adapter("my-bora").modules[name].b      # the adapter's bora_blocks

    Raises:
        UnsupportedError: DoRA, LoRA biases, embedding/convolution LoRA modules or another PEFT type.
        ConfigError, CheckpointError: as ``load_adapter``.
    """
    path = Path(path)
    kind, detail = input_kind(path)
    if kind != "peft":
        return load_adapter(path)
    if detail != "LORA":
        raise UnsupportedError(f"{path} is a PEFT {detail} adapter (peft_type {detail}), not BoRA nor a plain LoRA; "
                               "only those can be merged or combined")
    return lora_as_bora(read_json(path / CONFIG_NAME), read_tensors(path), source=path)


def lora_as_bora(config: dict[str, Any], tensors: dict[str, torch.Tensor], *, source: str | Path) -> BoraAdapter:
    """PEFT LoRA ``config`` (parsed JSON) and ``tensors`` as a validated ``BoraAdapter`` (``b = 1``, ``sigma = 1``)."""
    where = f"{source}/{CONFIG_NAME}"
    refused = []
    if config.get("use_dora"):
        refused.append("use_dora: DoRA rescales every column of W + dW by a learned magnitude, which no sum of "
                       "low-rank updates expresses")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        refused.append(f"bias {config.get('bias')!r} / lora_bias {config.get('lora_bias')!r}: trained biases "
                       "are not part of the update")
    for key in ("layer_replication", "target_parameters", "megatron_config"):
        if config.get(key):
            refused.append(f"{key}: not a plain LoRA of linear layers")
    odd = sorted(k for k in tensors if k.endswith(".lora_B.bias") or "lora_embedding" in k or "lora_magnitude" in k)
    if odd:
        refused.append(f"{odd[0]}: only linear LoRA modules (lora_A/lora_B weights) can be read")
    sigmas = sorted(k for k in tensors if k.endswith(SUFFIX_SIGMA))
    if sigmas:
        refused.append(f"{sigmas[0]}: a BoRA tensor in an adapter whose config says peft_type LORA")
    if refused:
        raise UnsupportedError(f"{where}: {refused[0]}", hint="merge this adapter with PEFT's merge_and_unload")
    if "r" not in config:
        raise ConfigError(f"{where}: missing required key r")
    data = {k: config[k] for k in _CARRIED if config.get(k) is not None}
    bora = BoraConfig.from_dict({**data, "peft_type": "BORA", "bora_blocks": 1}, source=where)
    bora.extra["source_peft_type"] = "LORA"
    with_sigma = dict(tensors)
    for key, tensor in tensors.items():
        if key.startswith(PREFIX) and key.endswith(SUFFIX_A) and tensor.ndim == 2:
            with_sigma[key[: -len(SUFFIX_A)] + SUFFIX_SIGMA] = torch.ones(1, 1, tensor.shape[0], dtype=tensor.dtype)
    return adapter_from_tensors(bora, with_sigma, source=source)


def is_lora(adapter: BoraAdapter) -> bool:
    """Whether ``adapter`` was read from a PEFT LoRA directory (``read_adapter``)."""
    return adapter.config.extra.get("source_peft_type") == "LORA"
