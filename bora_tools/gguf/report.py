"""The report of ``export-gguf``: what was written, its tensor types, its tokenizer, warnings and notes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bora_tools.report import Report, human_bytes, human_seconds

#: Fields that only some kinds of export have; absent from ``to_dict()`` when unset.
_OPTIONAL = ("merged_tensors", "vocab", "alpha", "rank", "modules", "adapter", "notes", "bits_per_weight",
             "intermediate", "peak_disk_bytes", "phases", "threads", "shards", "modelfile")


@dataclass
class ExportReport(Report):
    """One GGUF file written: a full model (``kind`` ``model``), a merged model (``merged``) or a LoRA adapter."""

    kind: str
    out: str
    architecture: str  # llama.cpp's name
    hf_architecture: str  # config.json's name
    outtype: str
    tensors: int
    types: dict[str, int]  # GGUF tensor type -> count
    fallbacks: list[dict[str, str]]  # tensor, type, reason
    bytes: int
    merged_tensors: int | None = None  # full models: adapted weights merged in the one pass
    vocab: dict[str, Any] | None = None  # full models: tokenizer model, pre-tokenizer, tokens, padding, source
    alpha: float | None = None  # LoRA: adapter.lora.alpha
    rank: int | str | None = None  # LoRA: the rank asked for
    modules: list[dict[str, Any]] | None = None  # LoRA: one row per module
    adapter: str | None = None  # merged and LoRA exports: the adapter directory
    notes: list[str] | None = None  # LoRA: per-module notes (zero updates)
    # Types made by llama.cpp's quantizer (q4_k_m, ...): ``types`` and ``tensors`` are read back from the final file.
    bits_per_weight: float | None = None  # tensor data bits per element, over the whole file
    intermediate: dict[str, Any] | None = None  # the intermediate GGUF: its tensor types and bytes
    peak_disk_bytes: int | None = None  # intermediate + output, on disk together while quantizing
    phases: dict[str, float] | None = None  # seconds: write_intermediate, quantize
    threads: int | None = None  # quantizer threads
    modelfile: str | None = None  # --modelfile: the Ollama Modelfile written beside the file
    shards: list[str] | None = None  # --split-max-size: every file of the split, first (``out``) first
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in super().to_dict().items() if not (k in _OPTIONAL and v is None)}

    def to_text(self) -> str:
        """A few human-readable lines."""
        return _lines(self.to_dict())


@dataclass
class ExportSetReport(Report):
    """Several GGUF files from one pass over the source (``export_gguf_many``): one report per file."""

    files: list[ExportReport]
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"files": [f.to_dict() for f in self.files], "seconds": self.seconds}

    def to_text(self) -> str:
        """Each file's lines, a blank line between them, then the total."""
        return "\n\n".join(f.to_text() for f in self.files) + (
            f"\n{len(self.files)} files from one read of the source in {human_seconds(self.seconds)}"
            if len(self.files) > 1 else "")


_KINDS = {"model": "a full model", "merged": "the merged model, as a full model", "lora": "a LoRA adapter"}


def _lines(report: dict[str, Any]) -> str:
    """Details first, per-module rows next, the ``wrote ...`` summary last (it stays on screen)."""
    types = ", ".join(f"{n} {t}" for t, n in sorted(report.get("types", {}).items()))
    lines = [f"tensors: {report['tensors']} ({types})"]
    if "bits_per_weight" in report:
        inter = report["intermediate"]
        phases = ", ".join(f"{k.replace('_', ' ')} {human_seconds(v)}" for k, v in report["phases"].items())
        lines.append(f"quantized by llama.cpp: {report['bits_per_weight']:.2f} bits per weight, from an intermediate "
                     f"of {human_bytes(inter['bytes'])} ({', '.join(sorted(inter['types']))}); peak disk "
                     f"{human_bytes(report['peak_disk_bytes'])}; {phases} on {report['threads']} thread(s)")
    if "vocab" in report:
        v = report["vocab"]
        lines.append(f"tokenizer: {v['model']} / pre-tokenizer {v['pre']}, {v['tokens']} tokens"
                     + (f" ({v['padded']} padding)" if v["padded"] else "") + f" from {v['source']}")
    if report.get("merged_tensors"):
        lines.append(f"merged: {report['merged_tensors']} adapted weights merged in one pass from {report['adapter']}")
    modules = report.get("modules", [])
    if modules:
        ranks = sorted({m["rank"] for m in modules})
        worst = max(modules, key=lambda m: m["relative_error"])
        for m in modules if len(modules) <= 16 else []:
            lines.append(f"  {m['gguf_name']:<28} rank {m['rank']:>4} / {m['max_rank']:<4} "
                         f"rel. error {m['relative_error']:.2e}")
        error = (f"largest relative error {worst['relative_error']:.2e} ({worst['gguf_name']})"
                 if worst["relative_error"] > 0 else "exact (relative error 0)")
        lines.append(f"LoRA: {len(modules)} modules, rank {'/'.join(map(str, ranks))}, adapter.lora.alpha "
                     f"{report['alpha']:g} (each module's scaling folded into lora_b); {error}")
    lines.extend(f"note: {note}" for note in report.get("notes", []))
    if report.get("fallbacks"):
        kept = sorted({f["type"] for f in report["fallbacks"]})
        lines.append(f"{len(report['fallbacks'])} tensor(s) kept as {'/'.join(kept)}: "
                     f"{report['fallbacks'][0]['reason']} (see fallbacks)")
    if report.get("shards"):
        lines.append(f"split: {len(report['shards'])} files, llama.cpp loads them from the first: "
                     + ", ".join(Path(s).name for s in report["shards"]))
    if report.get("modelfile"):
        lines.append(f"Ollama: ollama create NAME -f {report['modelfile']}")
    lines.append(f"wrote {report['out']} ({human_bytes(report['bytes'])}, {_KINDS.get(report['kind'], report['kind'])}"
                 f" for llama.cpp, architecture {report['architecture']}) in {human_seconds(report.get('seconds', 0))}")
    return "\n".join(lines)

