"""What a path holds, for ``push`` and its model cards: the kind of source, its base models, details.

A path holds one of: a BoRA adapter (``adapter_config.json`` with
``"peft_type": "BORA"``), a PEFT adapter (LoRA or another ``peft_type``), a
full or merged model (``config.json`` and weights), or GGUF files (a full
model or a LoRA adapter, told apart by ``general.type``). Files are read with
the project's checked readers, never trusted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bora_tools.core.adapter import SUFFIX_A
from bora_tools.errors import ConfigError
from bora_tools.io.json import read_json
from bora_tools.io.model_dir import read_header

# What each kind of source writes into the card's metadata. base_model_relation uses the Hub's
# four values: adapters are "adapter"; a full model made by merging one adapter into one base is a
# "finetune" of that base ("merge" is the Hub's word for combining several models, as mergekit
# does); a GGUF conversion of a model is "quantized" (the Hub's own choice for GGUF files).
KINDS: dict[str, dict[str, Any]] = {
    "bora": {"label": "BoRA adapter", "library_name": "peft", "relation": "adapter",
             "tags": ["bora", "peft", "bora-tools"]},
    "lora": {"label": "PEFT LoRA adapter", "library_name": "peft", "relation": "adapter",
             "tags": ["lora", "peft", "bora-tools"]},
    "peft": {"label": "PEFT adapter", "library_name": "peft", "relation": "adapter", "tags": ["peft", "bora-tools"]},
    "model": {"label": "model", "library_name": "transformers", "relation": "finetune", "tags": ["bora-tools"]},
    "gguf-model": {"label": "GGUF model", "library_name": "gguf", "relation": "quantized",
                   "tags": ["gguf", "llama.cpp", "bora-tools"]},
    "gguf-lora": {"label": "GGUF LoRA adapter", "library_name": "gguf", "relation": "adapter",
                  "tags": ["gguf", "lora", "llama.cpp", "bora-tools"]},
    "unknown": {"label": "files", "library_name": None, "relation": None, "tags": ["bora-tools"]},
}


@dataclass
class Source:
    """What a path holds: its kind, its base models as the files name them, and details for the card body."""

    kind: str
    base_refs: list[str] = field(default_factory=list)  # as written in the files: maybe local paths
    details: dict[str, Any] = field(default_factory=dict)
    relation: str | None = None  # overrides KINDS[kind]["relation"] when the evidence says otherwise
    base_from: str = "base model"  # where base_refs were found, for warnings

    @property
    def label(self) -> str:
        return KINDS[self.kind]["label"]


def describe_source(path: Path) -> Source:
    """Tell what ``path`` (a directory or one ``.gguf`` file) holds; the files are read, never checked.

    Example: ``describe_source(Path("out/adapter")).kind`` -> ``"bora"``.
    """
    path = Path(path)
    if path.is_file():
        return _describe_gguf([path]) if path.suffix == ".gguf" else Source("unknown")
    adapter_config = path / "adapter_config.json"
    if adapter_config.is_file():
        return _describe_adapter(path, _read_json(adapter_config))
    config = path / "config.json"
    weights = sorted(p.name for p in path.glob("*.safetensors")) + sorted(p.name for p in path.glob("*.bin"))
    if config.is_file() and weights:
        data = _read_json(config)
        arch = data.get("architectures")
        if arch is not None and not (isinstance(arch, list) and all(isinstance(a, str) for a in arch)):
            raise ConfigError(f"{config}: architectures: expected a list of names, found {type(arch).__name__}")
        return _describe_model(data, weights)
    ggufs = sorted(path.glob("*.gguf"))
    if ggufs:
        return _describe_gguf(ggufs)
    return Source("unknown")


def _read_json(path: Path) -> dict[str, Any]:
    data = read_json(path, error=ConfigError)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _describe_adapter(path: Path, config: dict[str, Any]) -> Source:
    peft_type = str(config.get("peft_type", "")).upper()
    kind = {"BORA": "bora", "LORA": "lora"}.get(peft_type, "peft")
    base = _text(config.get("base_model_name_or_path"))
    details = {k: config[k] for k in ("peft_type", "r", "bora_blocks", "lora_alpha", "use_rslora", "target_modules",
                                      "rank_pattern", "alpha_pattern", "modules_to_save", "task_type") if k in config}
    if "peft_type" in config and not isinstance(config["peft_type"], str):
        raise ConfigError(f"{path / 'adapter_config.json'}: peft_type: expected a string, "
                          f"found {type(config['peft_type']).__name__}")
    weights = path / "adapter_model.safetensors"
    if weights.is_file():
        details.update(_adapter_counts(_safetensors_shapes(weights)))
    return Source(kind, [base] if base else [], details, base_from="adapter_config.json base_model_name_or_path")


def _safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor shapes from a safetensors header, checked as every reader checks it; no tensor is read."""
    return {name: list(e.shape) for name, e in read_header(path).entries.items()}


def _adapter_counts(shapes: dict[str, list[int]]) -> dict[str, int]:
    modules = {k[: -len(SUFFIX_A)] for k in shapes if k.endswith(SUFFIX_A)}
    params = 0
    for shape in shapes.values():
        count = 1
        for dim in shape:
            count *= dim
        params += count
    return {"modules": len(modules), "parameters": params}


def _describe_model(config: dict[str, Any], weights: list[str]) -> Source:
    # bora-tools merge records the base it merged into as base_model_name_or_path (PEFT's name for it):
    # only that makes the folder a merge. Otherwise _name_or_path (older transformers saved the model a
    # fine-tune started from there; transformers 5 saves none) names what it derives from, if anything.
    merged = _text(config.get("base_model_name_or_path"))
    base = merged or _text(config.get("_name_or_path"))
    details = {"architectures": config.get("architectures") or [],
               "model_type": _text(config.get("model_type")),
               "dtype": _text(config.get("dtype") or config.get("torch_dtype")), "weights": weights,
               "merged": merged is not None}
    return Source("model", [base] if base else [], details,
                  base_from=f"config.json {'base_model_name_or_path' if merged else '_name_or_path'}")


def _text(value: Any) -> str | None:
    """``value`` when it is a non-empty string (what the card may print as a name), else None."""
    return value if isinstance(value, str) and value else None


def _describe_gguf(files: list[Path]) -> Source:
    entries = [_read_gguf(f) for f in files]
    adapters = all(e["type"] == "adapter" for e in entries)
    # A GGUF model names the model it was converted from (general.source.*), of which it is the
    # "quantized" form, and that model's own bases (general.base_model.*); when only the bases are
    # known, the file is a fine-tune of them. An adapter's general.base_model.* is what it applies to.
    refs = [ref for e in entries for ref in (e["bases"] if adapters else e["source"] or e["bases"])]
    finetune = not adapters and any(e["derived"] and not e["source"] for e in entries)
    merged = not adapters and any({"bora", "merged"} <= set(e["tags"]) for e in entries)
    return Source("gguf-lora" if adapters else "gguf-model", refs, {"files": entries, "merged": merged},
                  "finetune" if finetune else None, base_from="GGUF base model")


def _read_gguf(path: Path) -> dict[str, Any]:
    import gguf  # lazy: only GGUF sources need it

    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # GGUFReader raises ValueError, struct errors, ... on foreign files
        raise ConfigError(f"{path}: not a readable GGUF file: {e}") from e

    def value(key: str) -> Any:
        f = reader.get_field(key)
        return f.contents() if f is not None else None

    general = gguf.Keys.General
    kind = value(general.TYPE) or ("adapter" if value(gguf.Keys.Adapter.TYPE) else "model")
    count = value(general.BASE_MODEL_COUNT) or 0
    bases = [value(general.BASE_MODEL_REPO_URL.format(id=i)) for i in range(count)]
    file_type = value(general.FILE_TYPE)
    try:
        type_name = gguf.LlamaFileType(file_type).name.split("_", 1)[-1] if file_type is not None else None
    except ValueError:
        type_name = str(file_type)
    return {"file": path.name, "type": kind, "architecture": value(general.ARCHITECTURE),
            "name": value(general.NAME), "file_type": type_name, "lora_alpha": value(gguf.Keys.Adapter.LORA_ALPHA),
            "source": [s for s in [value(general.SOURCE_REPO_URL)] if s], "bases": [b for b in bases if b],
            # derived: names a base model, even one known only by name: a fine-tune of it
            "derived": count > 0, "tags": list(value(general.TAGS) or [])}
