"""Shared helpers of the GGUF tests: tiny models, their transformers logits, llama.cpp runs."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from bora_tools.demo.tiny import TEXT, build_model_dir
from bora_tools.gguf.llama_run import correlation, gguf_logits, gguf_tokenize, llama_cpp_available, relative_error

#: For test modules that run llama.cpp: it is in the test extra; skip (not fail) where absent.
needs_llama_cpp = pytest.mark.skipif(not llama_cpp_available(), reason="llama-cpp-python is not installed")

#: Texts llama.cpp must tokenize exactly like the HF tokenizer.
SAMPLES = [
    TEXT,
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces, trailing spaces   ",
    "tabs\tand\nnew\n\nlines\r\n end",
    "Numbers 3.14159, 2718 and 42; symbols (a + b) * c = d -> y!",
    "unicode: café naïve über 東京 🦙",
    "",
]
#: A fixed token sequence (ids inside the tokenizer's 300 tokens; 0 is <s>).
IDS = [0] + [3 + (7 * i) % 290 for i in range(40)]

F32_RTOL = 3e-3  # the bound for float32 files
F16_RTOL = 1e-2
BF16_RTOL = 3e-2
Q8_MIN_CORR = 0.99


def hf_logits(model_dir: Path, ids=IDS) -> np.ndarray:
    """The transformers float32 logits of ``model_dir`` on ``ids``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


_shared_base: Callable[..., Path] | None = None


def use_shared_builds(base: Callable[..., Path] | None) -> None:
    """Make ``tiny_dir`` copy what ``base(arch, **kwargs)`` built once (conftest's ``tiny.base``); None: build."""
    global _shared_base
    _shared_base = base


def tiny_dir(root: Path, arch: str, **kwargs) -> Path:
    """A tiny ``arch`` model directory of one's own at ``root / arch`` (``kwargs`` as for ``build_model_dir``).

    In a test session it is a copy of the session's shared build of the same arguments: write into it freely.
    """
    if _shared_base is None:
        return build_model_dir(root / arch, arch, **kwargs)
    return Path(shutil.copytree(_shared_base(arch, **kwargs), Path(root) / arch))


def set_config(model_dir: Path, **changes) -> None:
    path = model_dir / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config, indent=2))


__all__ = ["SAMPLES", "IDS", "F32_RTOL", "F16_RTOL", "BF16_RTOL", "Q8_MIN_CORR", "hf_logits", "tiny_dir",
           "use_shared_builds", "set_config", "gguf_logits", "gguf_tokenize", "relative_error", "correlation",
           "needs_llama_cpp"]


#: A tiny Llama whose every row is a multiple of 256 (what the k-quants need).
QUANT_SHAPE = dict(hidden=256, intermediate=512, layers=2, heads=4, kv_heads=2)


def llama_with_adapter(root: Path) -> tuple[Path, Path]:
    """A float32 Llama of ``QUANT_SHAPE`` saved under ``root/llama``, and a random BoRA adapter for it
    (``root/adapter``, b=2, r=4)."""
    from bora_tools.core.config import BoraConfig
    from bora_tools.demo.tiny import build_model, default_targets, save_model_dir
    from bora_tools.training import add_bora, randomize_bora, save_bora

    llama = build_model("llama", **QUANT_SHAPE)
    base = save_model_dir(llama, root / "llama")
    add_bora(llama, BoraConfig(r=4, bora_blocks=2, target_modules=default_targets("llama")))
    randomize_bora(llama, std=0.1)
    return base, save_bora(llama, root / "adapter")
