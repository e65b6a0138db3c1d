"""``train --load-in-4bit`` / ``--load-in-8bit``: BoRA on a base quantized by bitsandbytes at load (QLoRA-style).

The base is read in full precision and quantized as it loads (transformers'
``BitsAndBytesConfig``): 4-bit is NF4 with double quantization, as QLoRA trains,
computing in the ``--dtype`` of the run (``auto``: the dtype the base is stored in);
8-bit is LLM.int8 (``Linear8bitLt``). bitsandbytes' ``Linear4bit`` and ``Linear8bitLt``
are ``nn.Linear`` subclasses, so ``add_bora`` wraps them like any linear layer; the
factors stay float32. The adapter written records the full-precision base as
``base_model_name_or_path``: merge it into that base (``bora-tools merge``,
``export-gguf --merge``), never into the quantized one.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from bora_tools.errors import UnsupportedError, raise_if_problems

#: what to install for ``load_in_4bit`` / ``load_in_8bit``
INSTALL_HINT = "pip install 'bora-tools[qlora]' (bitsandbytes)"


def problems(load_in_4bit: bool, load_in_8bit: bool) -> list[str]:
    """One line when both are asked for."""
    if load_in_4bit and load_in_8bit:
        return ["`load_in_4bit` and `load_in_8bit` together: choose one"]
    return []


def check(options) -> None:
    """Raise when ``options`` quantize the base and bitsandbytes is missing, or ask for both widths."""
    raise_if_problems("train", problems(options.load_in_4bit, options.load_in_8bit))
    if options.load_in_4bit or options.load_in_8bit:
        require_bitsandbytes("load_in_4bit" if options.load_in_4bit else "load_in_8bit")


def require_bitsandbytes(flag: str) -> None:
    """Raise one line naming bitsandbytes when it is not installed."""
    # bitsandbytes logs a warning per layer and step on CPU (an optional kernel missing, int8 inputs cast to
    # float16): what they say is in docs/training.md; errors still show.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UnsupportedError(f"`{flag}` needs bitsandbytes, which is not installed", hint=INSTALL_HINT) from None


def quantization_config(*, load_in_4bit: bool, compute_dtype: torch.dtype):
    """transformers' ``BitsAndBytesConfig``: NF4 + double quantization computing in ``compute_dtype``, or int8."""
    from transformers import BitsAndBytesConfig

    if load_in_4bit:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


def load_base(base, options, *, dtype: torch.dtype | None, device: torch.device):
    """The base for training: quantized at load when ``options`` say so, else as transformers loads it."""
    if options.load_in_4bit or options.load_in_8bit:
        return load_quantized(base, load_in_4bit=options.load_in_4bit, dtype=dtype, device=device)
    from bora_tools.training.base_model import load_model

    return load_model(base, dtype)


def load_quantized(base, *, load_in_4bit: bool, dtype: torch.dtype | None, device: torch.device):
    """The base model quantized at load on ``device``; non-quantized tensors (embeddings, norms, head) in ``dtype``.

    ``dtype`` None (``auto``) computes in the dtype the base is stored in (float32 when it says none).
    """
    from transformers import AutoConfig

    require_bitsandbytes("load_in_4bit" if load_in_4bit else "load_in_8bit")
    config = AutoConfig.from_pretrained(base)
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32"
    compute = dtype or (stored if isinstance(stored, torch.dtype) else getattr(torch, str(stored)))
    from bora_tools.training.base_model import load_model

    return load_model(base, compute, device_map={"": str(device)},
                      quantization_config=quantization_config(load_in_4bit=load_in_4bit, compute_dtype=compute))


def is_quantized_layer(module: nn.Module) -> bool:
    """bitsandbytes' ``Linear4bit`` or ``Linear8bitLt``, recognised by name (bitsandbytes need not be importable)."""
    return type(module).__name__ in ("Linear4bit", "Linear8bitLt")


def prepare_for_training(model: nn.Module) -> nn.Module:
    """Let ``transformers.Trainer`` train the BoRA layers of a quantized model (others are left as they are).

    The Trainer refuses a quantized model without adapters it knows; transformers' own flag for
    "adapters attached" (``_hf_peft_config_loaded``) says they are, and also makes gradient
    checkpointing give the embeddings' output a gradient, as PEFT's ``prepare_model_for_kbit_training`` does.
    """
    if getattr(model, "is_quantized", False):
        model._hf_peft_config_loaded = True
    return model
