"""What an output is, and the program that runs it: transformers, PEFT or llama.cpp (vLLM: ``vllm_engine``).

``find_output`` recognises the output kinds as ``io.kinds`` recognises inputs: a merged model directory, a
PEFT LoRA directory, a GGUF model, a GGUF LoRA adapter (``general.type = adapter``, run on ``base_gguf``),
and split GGUFs (``NAME-00001-of-0000N.gguf``: llama.cpp opens the first and finds the others). Each engine
gets the prompts' token ids and returns one ``(tokens, vocab)`` float64 array of logits per prompt.
"""

from __future__ import annotations

import json
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bora_tools.errors import UnsupportedError, ValidationError
from bora_tools.gguf.outtypes import OUTTYPES
from bora_tools.io.kinds import input_kind
from bora_tools.verification.reference import (
    OVERHEAD,
    Prompts,
    check_memory,
    free_model,
    quiet_transformers,
    run_logits,
    weights_bytes,
)

#: output kind -> the engine that runs it
NATURAL = {"merged": "transformers", "lora": "peft", "gguf": "llama.cpp", "gguf-lora": "llama.cpp"}
SPLIT = re.compile(r"^(?P<stem>.*)-(?P<part>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE)
_FILE_TYPES = {spec.file_type: name for name, spec in OUTTYPES.items()}


@dataclass
class Output:
    """A recognised output: its ``kind``, the file or folder an engine opens, its type (``float32``,
    ``gguf-q8_0``, ...) and, for a PEFT LoRA, what to-lora recorded about it."""

    path: Path
    kind: str  # merged | lora | gguf | gguf-lora
    type: str
    detail: str = ""
    predicted: dict | None = None  # a LoRA: to-lora's record (policy, max_rel_error, per-module errors)
    base_gguf: Path | None = None  # a GGUF LoRA: the base model's GGUF it runs on


def find_output(path: str | Path, *, base_gguf: str | Path | None = None) -> Output:
    """Recognise ``path`` as one of the output kinds.

    Raises:
        ValidationError: a path that is no output kind (a BoRA adapter, an empty folder, ...), a GGUF LoRA
            without ``base_gguf``, a split GGUF whose first file is missing.
    """
    path = Path(path)
    kind, detail = input_kind(path)
    if kind == "model":
        return Output(path, "merged", _dir_dtype(path), "model directory (transformers)")
    if kind == "peft":
        if detail != "LORA":
            raise UnsupportedError(f"{path} is a PEFT {detail} adapter; verify runs PEFT LoRA adapters")
        return _lora(path)
    if kind == "gguf":
        return _gguf(path, base_gguf)
    what = {"missing": "no such file or directory", "bora": "a BoRA adapter: give it as --adapter, and the output "
            "made from it (merged model, LoRA, GGUF) as OUTPUT", "gguf-dir": "a folder of GGUF files: give the .gguf "
            "file (the first of a split)", "empty": "an empty folder"}.get(kind, "not a model directory, PEFT LoRA "
                                                                            "adapter or GGUF file")
    raise ValidationError(f"{path}: {what}")


def _dir_dtype(path: Path) -> str:
    """The dtype most matrices of a model directory are stored in (``float32``, ``bfloat16``, ...)."""
    from bora_tools.io.model_dir import ModelDir

    counts = Counter(e.torch_dtype for e in ModelDir.open(path).entries.values() if len(e.shape) == 2)
    return str(counts.most_common(1)[0][0]).removeprefix("torch.") if counts else "float32"


def _lora(path: Path) -> Output:
    from safetensors import safe_open

    from bora_tools.conversion import PREDICTED_KEY

    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        raise ValidationError(f"{path}: no adapter_model.safetensors (verify reads safetensors LoRA adapters)")
    with safe_open(weights, "pt") as f:
        meta = f.metadata() or {}
        dtypes = Counter(f.get_slice(k).get_dtype() for k in f.keys() if ".lora_" in k)
    record = json.loads(meta[PREDICTED_KEY]) if PREDICTED_KEY in meta else None
    dtype = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}.get(
        dtypes.most_common(1)[0][0] if dtypes else "F32", "float32")
    return Output(path, "lora", dtype, "PEFT LoRA adapter", predicted=record)


def _gguf(path: Path, base_gguf: str | Path | None) -> Output:
    import gguf

    split = SPLIT.match(path.name)
    detail = "GGUF model"
    if split:
        first = path.with_name(f"{split['stem']}-00001-of-{split['count']}.gguf")
        if not first.is_file():
            raise ValidationError(f"{path} is part {int(split['part'])} of a split GGUF whose first file {first.name} "
                                  "is missing")
        path, detail = first, f"GGUF model split in {int(split['count'])} files"
    reader = gguf.GGUFReader(path)
    general_type = _field(reader, "general.type") or "model"
    file_type = _field(reader, "general.file_type")
    name = _FILE_TYPES.get(gguf.LlamaFileType(file_type).name) if file_type is not None else None
    out_type = f"gguf-{name or 'f32'}"
    if general_type == "adapter":
        if base_gguf is None:
            raise ValidationError(f"{path} is a GGUF LoRA adapter: give the base model's GGUF as `base_gguf`",
                                  hint="llama.cpp applies a LoRA GGUF on its base GGUF (--lora)")
        base = _gguf(Path(base_gguf), None)
        if base.kind != "gguf":
            raise ValidationError(f"`base_gguf` {base_gguf} is a GGUF LoRA adapter, not a model")
        return Output(path, "gguf-lora", _looser(out_type, base.type), f"GGUF LoRA adapter on {base.path}",
                      base_gguf=base.path)
    return Output(path, "gguf", out_type, detail)


def _field(reader, key: str):
    field = reader.get_field(key)
    return None if field is None else field.contents()


def _looser(lora_type: str, base_type: str) -> str:
    """A LoRA GGUF on a base GGUF: the base's quantization rules, else the wider of the two float types."""
    order = ["gguf-f32", "gguf-f16", "gguf-bf16"]
    if base_type not in order:
        return base_type
    return max(lora_type, base_type, key=lambda t: order.index(t) if t in order else len(order))


def pick_engine(output: Output, engine: str) -> str:
    """The engine for ``output`` (``auto``: the program that consumes it).

    Raises:
        UnsupportedError: an engine that does not run this kind of output (``vllm`` runs PEFT LoRA adapters).
    """
    natural = NATURAL[output.kind]
    if engine == "vllm" and output.kind == "lora":
        return engine
    if engine not in ("auto", natural):
        raise UnsupportedError(f"`engine` {engine} does not run a {output.detail} ({output.path}); it runs in "
                               f"{natural}")
    return natural


def run_output(output: Output, engine: str, prompts: Prompts, *, base: Path, dtype: torch.dtype,
               device: torch.device) -> list[np.ndarray]:
    """The output's logits on every prompt, in ``engine`` (transformers and PEFT in ``dtype`` on ``device``)."""
    if engine == "llama.cpp":
        lora = output.path if output.kind == "gguf-lora" else None
        model_file = output.base_gguf if lora else output.path
        return _llama_logits(model_file, prompts, lora=lora)
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    itemsize = torch.tensor([], dtype=dtype).element_size()
    source = output.path if output.kind == "merged" else base
    name = str(dtype).removeprefix("torch.")
    check_memory(int(weights_bytes(source, itemsize=itemsize) * OVERHEAD), f"running {output.path} in {name}",
                 device=device)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    if output.kind == "lora":
        from peft import PeftModel

        with warnings.catch_warnings():  # PEFT 0.21 calls a transformers 5 API that warns of its own deprecation
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = PeftModel.from_pretrained(model, output.path)
    model.to(device=device, dtype=dtype).eval()
    logits = run_logits(model, prompts, device=device)
    free_model(model)
    return logits


def _llama_logits(model_file: Path, prompts: Prompts, *, lora: Path | None) -> list[np.ndarray]:
    from bora_tools.gguf.llama_run import open_llama

    size = model_file.stat().st_size + (lora.stat().st_size if lora else 0)
    check_memory(size, f"running {model_file} in llama.cpp", device=torch.device("cpu"))
    longest = max(len(ids) for ids in prompts.ids)
    llm = open_llama(model_file, lora_path=lora, n_ctx=max(256, -(-longest // 256) * 256))
    try:
        out = []
        for ids in prompts.ids:
            llm.reset()
            llm.eval([int(i) for i in ids])
            out.append(np.array(llm.scores[: len(ids)], dtype=np.float64))
        return out
    finally:
        llm.close()
