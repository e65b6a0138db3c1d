"""``export-gguf``: models, merged models and LoRA adapters as GGUF files for llama.cpp.

- ``export``: the command (full model, one-pass ``--merge``), ``lora``: the LoRA adapter GGUF.
- ``hparams``: ``config.json`` -> llama.cpp hyperparameters; ``vocab``: the tokenizer.
- ``writer``: architectures, tensor names and types, the streaming tensor writer.
"""

from bora_tools.gguf.export import export_gguf

__all__ = ["export_gguf"]
