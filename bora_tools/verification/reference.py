"""The reference ``verify`` compares with: the BoRA adapter on its base in transformers, on the prompts.

The prompts come from ``--prompts`` (JSONL records with a ``text`` field, or a text file with one prompt a line)
or a built-in set, tokenized with the base's tokenizer and cut to ``tokens`` tokens; every engine then gets
these token ids, so a tokenizer difference never hides in the comparison. The reference model is loaded
once, in float32 (float64 when ``precise``), after a check that it fits in the memory available.
"""

from __future__ import annotations

import gc
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bora_tools.errors import UnsupportedError, ValidationError
from bora_tools.io.model_dir import ModelDir
from bora_tools.report import human_bytes

#: The built-in prompts: prose, code, numbers and a chat turn, a few dozen tokens each.
BUILTIN_PROMPTS = [
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.",
    "BoRA splits every adapted weight into blocks and gives each pair of blocks its own diagonal mixing.",
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
    "Numbers like 3.14159, 2718 and 42 appear too, as do symbols: (a + b) * c = d; x -> y.",
    "User: How vexingly quick do daft zebras jump?\nAssistant: Sphinx of black quartz, judge my vow.",
]
#: Bytes per parameter beyond the weights that a transformers model takes while it runs (activations, buffers).
OVERHEAD = 1.2


@dataclass
class Prompts:
    """The prompts' texts, their token ids (one list each) and where they came from."""

    texts: list[str]
    ids: list[list[int]]
    source: str


def read_prompts(path: str | Path | None) -> tuple[list[str], str]:
    """The texts of a prompts file (``.jsonl``: the ``text`` of each record; else one prompt a line), or the
    built-in set when ``path`` is None.

    Raises:
        ValidationError: an unreadable file, a record without a string ``text``, no prompt at all.
    """
    if path is None:
        return list(BUILTIN_PROMPTS), "built-in"
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValidationError(f"`prompts` {path}: cannot be read ({e.__class__.__name__}: {e})") from e
    texts = []
    if path.suffix.lower() in (".jsonl", ".json"):
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValidationError(f"`prompts` {path}, line {number}: not JSON ({e.msg})") from e
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValidationError(f"`prompts` {path}, line {number}: expected a record with a string 'text'")
            texts.append(record["text"])
    else:
        texts = [line for line in lines if line.strip()]
    if not texts:
        raise ValidationError(f"`prompts` {path}: no prompt in the file")
    return texts, str(path)


def tokenize(base: Path, texts: list[str], *, tokens: int, source: str) -> Prompts:
    """Token ids of ``texts`` with the base's tokenizer (its BOS as it adds it), each cut to ``tokens``."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(base)
    except (OSError, ValueError) as e:
        raise ValidationError(f"{base}: no tokenizer to read the prompts with ({' '.join(str(e).split())[:200]})",
                              hint="verify tokenizes the prompts with the base model's tokenizer") from e
    ids = [list(tokenizer(text)["input_ids"])[:tokens] for text in texts]
    empty = [i + 1 for i, row in enumerate(ids) if not row]
    if empty:
        raise ValidationError(f"`prompts` {source}: prompt {empty[0]} has no token")
    return Prompts(texts, ids, source)


def available_memory() -> int:
    """Bytes of memory available to a new allocation (Linux ``MemAvailable``; else the free pages)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def weights_bytes(model: Path, *, itemsize: int) -> int:
    """The bytes of a model directory's weights once loaded with ``itemsize`` bytes per value."""
    entries = ModelDir.open(model).entries.values()
    return sum(int(np.prod(e.shape, dtype=np.int64)) for e in entries) * itemsize


def check_memory(needed: int, what: str, *, device: torch.device) -> None:
    """Refuse before loading when ``needed`` bytes do not fit (RAM on CPU, free GPU memory on CUDA).

    Raises:
        UnsupportedError: ``needed`` exceeds what is available, naming both.
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        where = f"is free on {device}"
    else:
        free, where = available_memory(), "of RAM is available"
    if needed > free:
        raise UnsupportedError(f"{what} needs about {human_bytes(needed)}, and only {human_bytes(free)} {where}",
                               hint="free memory, use `device` cuda, or verify on a larger machine")


def free_model(model: torch.nn.Module | None) -> None:
    """Drop a model's weights now (before the next one is loaded)."""
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def quiet_transformers() -> None:
    """No loading bars from transformers (the CLI shows its own progress)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def run_logits(model: torch.nn.Module, prompts: Prompts, *, device: torch.device) -> list[np.ndarray]:
    """A transformers model's logits, one ``(tokens, vocab)`` float64 array per prompt (one prompt at a time)."""
    out = []
    with torch.no_grad():
        for ids in prompts.ids:
            logits = model(torch.tensor([ids], device=device)).logits[0]
            out.append(logits.double().cpu().numpy())
    return out


def reference_logits(adapter: Path, base: Path, prompts: Prompts, *, dtype: torch.dtype, device: torch.device
                     ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The BoRA model's logits and the base's (the adapter switched off) on every prompt.

    Raises:
        UnsupportedError: the model does not fit in memory.
        ShapeError, ConfigError: the adapter does not fit the base.
    """
    from transformers import AutoModelForCausalLM

    from bora_tools.training import disable_bora, load_bora

    quiet_transformers()
    itemsize = torch.tensor([], dtype=dtype).element_size()
    name = str(dtype).removeprefix("torch.")
    check_memory(int(weights_bytes(base, itemsize=itemsize) * OVERHEAD), f"the reference ({base} in {name})",
                 device=device)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype).to(device).eval()
    load_bora(model, adapter)
    model.to(device=device, dtype=dtype)
    ref = run_logits(model, prompts, device=device)
    with disable_bora(model):
        plain = run_logits(model, prompts, device=device)
    free_model(model)
    return ref, plain
