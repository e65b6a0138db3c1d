"""The BoRA adapter itself: its config, its format, its math. No command lives here.

- ``config``: ``BoraConfig`` and PEFT's pattern rules (``target_modules``, ``rank_pattern``).
- ``adapter``: the adapter directory format (docs/format.md): read, validate, write.
- ``factors``: pure tensor math on ``A``, ``B``, ``sigma`` (no I/O).
- ``lowrank``: rank policies; one module as an exact or optimally truncated LoRA.
- ``row_merge``: what replaces which base tensor; ``W + dW`` a slice of rows at a time; the one row chunker.
- ``dtypes``, ``devices``: the user's dtype names and the one checked narrowing cast; ``--device``.
"""

from bora_tools.core.adapter import BoraAdapter, BoraModule, load_adapter, save_adapter
from bora_tools.core.config import BoraConfig

__all__ = ["BoraAdapter", "BoraConfig", "BoraModule", "load_adapter", "save_adapter"]
