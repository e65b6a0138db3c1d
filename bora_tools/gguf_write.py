"""Shared pieces of the GGUF writers: architectures, output types, tensor layout, streaming.

A GGUF file is written in one pass with gguf-py's ``GGUFWriter``: every tensor
info (name, shape, type, byte size) is declared first, then the header, the
key-value data and the tensor infos are written, and finally the tensors one
at a time, each produced by a loader just before it is written and dropped
right after. Memory therefore holds one tensor (and its converted copy), never
the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import gguf
import numpy as np
import torch

from bora_tools.errors import UnsupportedError
from bora_tools.progress import Progress, no_progress

Q = gguf.GGMLQuantizationType


@dataclass(frozen=True)
class ArchSpec:
    """How one Hugging Face architecture maps onto a llama.cpp architecture."""

    arch: gguf.MODEL_ARCH
    permute_qk: bool  # llama.cpp's llama graph expects q/k rows in its own rotary layout

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.arch]


ARCHS: dict[str, ArchSpec] = {
    "LlamaForCausalLM": ArchSpec(gguf.MODEL_ARCH.LLAMA, True),
    "MistralForCausalLM": ArchSpec(gguf.MODEL_ARCH.LLAMA, True),  # llama.cpp runs Mistral as llama
    "Qwen2ForCausalLM": ArchSpec(gguf.MODEL_ARCH.QWEN2, False),  # Qwen2 uses the HF (NeoX) rotary layout
}


def arch_spec(architecture: str | None, *, source: str) -> ArchSpec:
    """The llama.cpp mapping of ``architecture``.

    Raises:
        UnsupportedError: naming the architecture and the supported ones.
    """
    spec = ARCHS.get(architecture or "")
    if spec is None:
        raise UnsupportedError(f"{source}: architecture {architecture!r} is not supported for GGUF export "
                               f"(supported: {', '.join(ARCHS)})")
    return spec


#: --outtype -> (general.file_type, tensor type of the big matrices)
OUTTYPES: dict[str, tuple[gguf.LlamaFileType, Q]] = {
    "f32": (gguf.LlamaFileType.ALL_F32, Q.F32),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, Q.F16),
    "bf16": (gguf.LlamaFileType.MOSTLY_BF16, Q.BF16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, Q.Q8_0),
}
#: The torch dtype a tensor is brought to before it becomes bytes of a GGUF type.
_TORCH_FOR = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16, Q.Q8_0: torch.float32}
#: Elements quantised at a time: bounds the float32 temporaries of gguf.quants.
_Q8_CHUNK_ELEMENTS = 1 << 22


def tensor_type(gguf_name: str, shape: tuple[int, ...], outtype: str) -> tuple[Q, str | None]:
    """The GGUF type of one tensor, and why it differs from ``outtype`` if it must.

    As llama.cpp expects: 1-D tensors and norms stay F32; Q8_0 needs rows
    (the last dimension) that are a multiple of its 32-element block, and falls
    back to F16 otherwise.
    """
    want = OUTTYPES[outtype][1]
    if len(shape) <= 1 or gguf_name.endswith("_norm.weight"):
        return Q.F32, None
    if want == Q.Q8_0:
        block = gguf.GGML_QUANT_SIZES[Q.Q8_0][0]
        if shape[-1] % block:
            return Q.F16, f"row of {shape[-1]} is not a multiple of {block}"
    return want, None


def tensor_nbytes(shape: tuple[int, ...], qtype: Q) -> int:
    return math.prod(gguf.quant_shape_to_byte_shape(shape, qtype))


def torch_dtype_for(qtype: Q) -> torch.dtype:
    """The dtype a loader may produce directly for ``qtype`` (float32 for quantised types)."""
    return _TORCH_FOR[qtype]


def to_gguf_array(t: torch.Tensor, qtype: Q) -> np.ndarray:
    """The bytes of ``t`` as GGUF type ``qtype`` (a contiguous numpy array to write as is).

    F32/F16/BF16 are plain casts (torch rounds to nearest even, as ggml does);
    Q8_0 goes through gguf-py's bit-exact quantiser, a bounded number of rows
    at a time so its float32 temporaries stay small.
    """
    t = t.detach().cpu()
    if qtype in (Q.F32, Q.F16):
        return t.to(_TORCH_FOR[qtype]).contiguous().numpy()
    if qtype == Q.BF16:
        return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint8)
    if qtype != Q.Q8_0:
        raise UnsupportedError(f"GGUF type {qtype.name} is not supported")
    rows = t.reshape(-1, t.shape[-1])
    out = np.empty(gguf.quant_shape_to_byte_shape(tuple(rows.shape), qtype), dtype=np.uint8)
    step = max(1, _Q8_CHUNK_ELEMENTS // rows.shape[1])
    for start in range(0, rows.shape[0], step):
        chunk = rows[start:start + step].to(torch.float32).numpy()
        out[start:start + step] = gguf.quants.quantize(chunk, qtype)
    return out


def qk_row_order(rows: int, n_head: int) -> torch.Tensor:
    """Row order that turns HF q/k rows into llama.cpp's rotary layout.

    HF stores each head's rotary pairs as two halves (all first components,
    then all second ones); llama.cpp's llama graph rotates adjacent pairs, so
    the halves of every head are interleaved. ``W_gguf = W_hf[order]``; it
    applies to weights, biases and a LoRA's ``lora_b`` alike (they all index
    output rows).
    """
    return torch.arange(rows).reshape(n_head, 2, rows // n_head // 2).transpose(1, 2).reshape(-1)


def qk_heads(gguf_name: str, hparams: "Any") -> int | None:
    """Heads whose rows ``qk_row_order`` permutes for this tensor, or None (no permutation)."""
    part = gguf_name.split(".")[2] if gguf_name.startswith("blk.") else ""
    if part == "attn_q":
        return hparams.n_head
    if part == "attn_k":
        return hparams.n_head_kv
    return None


@dataclass
class PlannedTensor:
    """One tensor to write: its GGUF name, shape (torch order), type, and how to produce it."""

    name: str
    shape: tuple[int, ...]
    qtype: Q
    load: Callable[[], torch.Tensor]
    source: str = ""  # the tensor(s) it comes from, for reports
    fallback: str | None = None  # why qtype is not the requested type

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.shape, self.qtype)


def write_streaming(writer: gguf.GGUFWriter, path: Path, plan: list[PlannedTensor], *,
                    progress: Progress = no_progress, label: str = "writing GGUF") -> None:
    """Write ``writer``'s key-values and ``plan``'s tensors to ``path``, one tensor in memory at a time."""
    for p in plan:
        # The dtype argument only matters without raw_dtype; the shape is the logical one.
        writer.add_tensor_info(p.name, p.shape, np.dtype(np.float32), p.nbytes, raw_dtype=p.qtype)
    try:
        writer.write_header_to_file(path=Path(path))
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for p in progress(plan, total=len(plan), label=label):
            data = to_gguf_array(p.load(), p.qtype)
            if data.nbytes != p.nbytes:
                raise AssertionError(f"{p.name}: produced {data.nbytes} bytes, declared {p.nbytes}")
            writer.write_tensor_data(data)
            del data
        writer.flush()
    finally:
        writer.close()


def add_general(writer: gguf.GGUFWriter, *, kind: str, name: str, outtype: str) -> None:
    """``general.*`` keys common to models and adapters."""
    writer.add_type(kind)
    writer.add_name(name)
    writer.add_file_type(OUTTYPES[outtype][0])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
