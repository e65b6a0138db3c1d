"""The names a user chooses from for dtypes and devices: plain data, no torch.

The library checks values against these tables (``core.dtypes``, ``core.devices``)
and the command line lists them in ``--help``, which therefore does not load torch.
"""

from __future__ import annotations

#: ``device``: where tensors are computed; ``auto`` picks CUDA when present.
DEVICE_CHOICES = ("auto", "cpu", "cuda")

#: The float dtypes a user names, in their canonical spelling.
DTYPE_NAMES = ("float32", "float16", "bfloat16")

#: Every spelling users bring from torch, transformers, PEFT, mergekit and llama.cpp -> the name above.
#: Matched case-insensitively (``FP16``, ``BF16`` and ``Float32`` are fine too).
DTYPE_ALIASES = {
    "float32": "float32", "fp32": "float32", "f32": "float32", "float": "float32",
    "float16": "float16", "fp16": "float16", "f16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
}

#: The GGUF names (``--outtype``) of the three float dtypes.
GGUF_FLOAT_NAMES = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}

#: ``verify --engine``: where an output runs; ``auto`` picks the program that consumes it.
VERIFY_ENGINES = ("auto", "transformers", "peft", "llama.cpp", "vllm")
