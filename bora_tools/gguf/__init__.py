"""``export-gguf``: models, merged models and LoRA adapters as GGUF files for llama.cpp.

- ``export``: the command (its checks, once; full model, one-pass ``--merge``), ``lora``: the LoRA adapter GGUF.
- ``plan``: a full GGUF's tensors: named (checkpoint -> llama.cpp), checked, typed, and how their rows are made.
- ``architectures``: one registry entry per Hugging Face architecture (llama.cpp arch, hooks, tensor transforms).
- ``hparams``: ``config.json`` -> llama.cpp hyperparameters; ``vocab``: the tokenizer.
- ``defaults``: what ``config.json`` omits, from the family's transformers config class.
- ``shapes``: every tensor's shape against what ``config.json`` implies (per family), before the first byte.
- ``writer``: tensor types and the streaming tensor writer.
- ``outtypes``: the ``--outtype`` table; ``quantize``: llama.cpp's quantizer (k-quants) on our intermediate GGUF.
- ``llama_run``: a GGUF run in llama.cpp (``llama-cpp-python``): the proof of the demo, the tests and ``verify``.

``export_gguf`` is imported on first use, so that the CLI reads ``outtypes`` without loading torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["export_gguf"]


def __getattr__(name: str) -> Any:
    if name == "export_gguf":
        from bora_tools.gguf.export import export_gguf

        return export_gguf
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
