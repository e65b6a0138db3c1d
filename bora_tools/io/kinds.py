"""What kind of input a path is, and one line for a user who gave the wrong kind.

Used as the first check where a BoRA adapter (``core.adapter.load_adapter``)
or a base model (``io.model_dir.ModelDir.open``) is read, so that every
command answers ``this is a PEFT LoRA adapter (peft_type LORA), not BoRA; ...``
rather than a missing key. Only names and ``peft_type`` are read here; the
readers check everything else.
"""

from __future__ import annotations

from pathlib import Path

from bora_tools.errors import BoraError
from bora_tools.io.json import read_json

ADAPTER_LAYOUT = "adapter_config.json + adapter_model.safetensors"
MODEL_LAYOUT = "config.json + model.safetensors, or shards + model.safetensors.index.json"


def input_kind(path: Path) -> tuple[str, str]:
    """``(kind, detail)``: ``missing``, ``gguf``, ``file``, ``empty``, ``bora``, ``peft`` (detail: its
    ``peft_type``), ``adapter?`` (an unreadable ``adapter_config.json``), ``model``, ``gguf-dir`` or ``other``.

    Example: ``input_kind(Path("my-lora"))`` -> ``("peft", "LORA")``.
    """
    path = Path(path)
    if not path.exists():
        return "missing", ""
    if path.is_file():
        return ("gguf" if path.suffix.lower() == ".gguf" or _gguf_magic(path) else "file"), ""
    names = sorted(p.name for p in path.iterdir() if not p.name.startswith("."))
    if not names:
        return "empty", ""
    if "adapter_config.json" in names:
        try:
            peft_type = read_json(path / "adapter_config.json").get("peft_type")
        except (BoraError, OSError, AttributeError):  # unreadable: the adapter reader reports it precisely
            return "adapter?", ""
        if isinstance(peft_type, str) and peft_type.upper() != "BORA":
            return "peft", peft_type.upper()
        return "bora", ""
    if "config.json" in names:
        return "model", ""
    if any(n.lower().endswith(".gguf") for n in names):
        return "gguf-dir", ""
    return "other", ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")


def _gguf_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def wrong_kind(path: Path, *, expected: str) -> str | None:
    """The line for ``path`` given where ``expected`` (``"adapter"`` or ``"model"``) belongs; ``None`` when it
    may be one (the reader then checks it in full).

    Example: ``wrong_kind(Path("base"), expected="adapter")`` ->
    ``"base is a model directory (config.json), not an adapter; ..."``.
    """
    kind, detail = input_kind(path)
    if expected == "adapter":
        return {
            "missing": f"{path}: not an adapter directory (no such file or directory)",
            "gguf": f"{path} is a GGUF file, not a BoRA adapter directory; bora-tools reads adapters saved in "
                    f"PEFT's layout ({ADAPTER_LAYOUT})",
            "file": f"{path} is a file, not an adapter directory; give the folder that holds {ADAPTER_LAYOUT}",
            "empty": f"{path} is an empty folder; give the folder a BoRA adapter was saved to ({ADAPTER_LAYOUT})",
            "peft": f"{path} is a PEFT {'LoRA' if detail == 'LORA' else detail} adapter (peft_type {detail}), not "
                    "BoRA; bora-tools converts BoRA adapters: load this one with peft (PeftModel.from_pretrained), "
                    "or merge it with PEFT's merge_and_unload",
            "model": f"{path} is a model directory (config.json, no adapter_config.json), not an adapter; "
                     "give it as --base and the BoRA adapter as ADAPTER",
            "gguf-dir": f"{path} holds GGUF files, not a BoRA adapter ({ADAPTER_LAYOUT})",
            "other": f"{path} has no adapter_config.json, so it is not an adapter directory (it holds {detail})",
        }.get(kind)
    if kind != "missing" and (Path(path) / "config.json").is_file():
        return None  # a model directory, even with an adapter_config.json beside it
    return {
        "missing": f"{path}: not a model directory (no such file or directory)",
        "gguf": f"{path} is a GGUF file; bora-tools reads Hugging Face model directories ({MODEL_LAYOUT})",
        "file": f"{path} is a file; give a Hugging Face model directory ({MODEL_LAYOUT})",
        "empty": f"{path} is an empty folder; expected a Hugging Face model directory ({MODEL_LAYOUT})",
        "bora": f"{path} is a BoRA adapter (adapter_config.json), not a model directory; give the base model it was "
                "trained on here, and the adapter as ADAPTER",
        "peft": f"{path} is a PEFT {'LoRA' if detail == 'LORA' else detail} adapter (peft_type {detail}), not a model "
                "directory; give the base model it was trained on",
        "gguf-dir": f"{path} holds GGUF files, not a Hugging Face model directory ({MODEL_LAYOUT})",
        "other": f"{path} has no config.json, so it is not a Hugging Face model directory (it holds {detail})",
    }.get(kind)
