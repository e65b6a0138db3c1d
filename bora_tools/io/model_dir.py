"""Hugging Face model directories: config, shards, index, lazy tensor access (docs/format.md, section 3).

Headers are parsed and checked here (sizes, offsets, dtypes) so that a file
that lies about itself is refused before any work. Tensors are read with plain
positional reads, not a memory map, so a reader's resident memory holds one
tensor at a time whatever the shard size.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from bora_tools.errors import ModelDirError, UnsafePathError, raise_if_problems
from bora_tools.io.json import read_json
from bora_tools.io.kinds import wrong_kind
from bora_tools.io.safetensors import ST_DTYPES
from bora_tools.progress import logger

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
#: Files holding weights in some format; only the model's own shards are used.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt", ".gguf", ".h5", ".msgpack")



@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: shard file, dtype, shape and absolute byte range."""

    name: str
    shard: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def torch_dtype(self) -> torch.dtype:
        return ST_DTYPES[self.dtype][1]


@dataclass
class ShardHeader:
    path: Path
    data_start: int  # 8 + header length
    entries: dict[str, TensorEntry]  # in file order
    metadata: dict[str, str] | None


def read_header(path: str | Path) -> ShardHeader:
    """Parse and check a safetensors header without reading tensor data.

    Raises:
        ModelDirError: the header is truncated, not JSON, or lies about sizes,
            offsets or dtypes; the message names the file and the tensor.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelDirError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise ModelDirError(
                f"{path}: corrupt safetensors header: header length {n} exceeds the file ({size} bytes)"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelDirError(f"{path}: corrupt safetensors header: not JSON ({e})") from e
    except RecursionError:
        raise ModelDirError(f"{path}: corrupt safetensors header: JSON nested too deeply") from None
    if not isinstance(header, dict):
        raise ModelDirError(f"{path}: corrupt safetensors header: expected a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict)
                                     and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise ModelDirError(f"{path}: corrupt safetensors header: __metadata__ is not an object of strings")
    for text in [*header, *(metadata or {}), *(metadata or {}).values()]:
        if not _encodable(text):  # a lone surrogate (JSON "\ud800") cannot be written back as UTF-8
            raise ModelDirError(f"{path}: corrupt safetensors header: name {text!r} is not valid Unicode")
    data_start, data_size = 8 + n, size - 8 - n
    entries = [_entry(path, name, info, data_start, data_size) for name, info in header.items()]
    entries.sort(key=lambda e: (e.start, e.end))
    for prev, cur in zip(entries, entries[1:]):
        if cur.start < prev.end:
            raise ModelDirError(f"{path}: corrupt safetensors header: tensors {prev.name} and {cur.name} overlap")
    return ShardHeader(path, data_start, {e.name: e for e in entries}, metadata)


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _entry(path: Path, name: str, info: Any, data_start: int, data_size: int) -> TensorEntry:
    def bad(why: str) -> ModelDirError:
        return ModelDirError(f"{path}: corrupt safetensors header: tensor {name}: {why}")

    if not isinstance(info, dict):
        raise bad("entry is not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in ST_DTYPES or ST_DTYPES[dtype][1] is None:
        raise bad(f"unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise bad(f"shape {shape!r} is not a list of non-negative integers")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise bad(f"data_offsets {offsets!r} is not a pair of integers")
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        raise bad(f"data_offsets {offsets} fall outside the {data_size} data bytes of the file (truncated?)")
    want = math.prod(shape) * ST_DTYPES[dtype][0]
    if end - begin != want:
        raise bad(f"{end - begin} bytes for a {dtype} tensor of shape {tuple(shape)} (expected {want})")
    return TensorEntry(name, path, dtype, tuple(shape), data_start + begin, data_start + end)


def read_tensor(entry: TensorEntry, *, device: torch.device | str = "cpu") -> torch.Tensor:
    """Read one tensor with a positional read (no memory map), then move it to ``device``."""
    buf = bytearray(entry.nbytes)
    with open(entry.shard, "rb") as f:
        f.seek(entry.start)
        got = f.readinto(buf)
    if got != entry.nbytes:
        raise ModelDirError(f"{entry.shard}: truncated: tensor {entry.name} needs {entry.nbytes} bytes, found {got}")
    if entry.nbytes == 0:
        t = torch.empty(entry.shape, dtype=entry.torch_dtype)
    else:
        t = torch.frombuffer(buf, dtype=entry.torch_dtype).reshape(entry.shape)
    return t.to(device) if torch.device(device).type != "cpu" else t


def safe_member(directory: Path, name: str, *, what: str = "file") -> Path:
    """``directory/name`` for a plain file name that stays inside ``directory``.

    Refuses path separators, ``..``, absolute paths and symlinks that resolve
    outside the directory, except, in a Hugging Face cache snapshot
    (``models--org--name/snapshots/<revision>/``), links into that cache's own
    ``blobs/``, which is how the hub stores every file.

    Example: ``safe_member(Path("base"), "config.json")`` -> ``Path("base/config.json")``;
    ``safe_member(Path("base"), "../x")`` raises ``UnsafePathError``.
    """
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name:
        raise UnsafePathError(f"{directory}: {what} name {name!r} is not a plain file name inside the directory")
    path = directory / name
    resolved, root = path.resolve(), directory.resolve()
    if path.is_symlink() and root not in resolved.parents and _hub_blobs(root) not in resolved.parents:
        raise UnsafePathError(f"{path}: symlink leads outside {directory} (to {resolved})")
    return path


def _hub_blobs(root: Path) -> Path | None:
    # huggingface_hub keeps each file once in <repo>/blobs/<hash>; a snapshot
    # directory <repo>/snapshots/<revision>/ holds only symlinks to them.
    return root.parent.parent / "blobs" if root.parent.name == "snapshots" else None


def read_rows(entry: TensorEntry, start: int, stop: int, *, fd: int, buf: torch.Tensor | None = None) -> torch.Tensor:
    """Stored rows ``start:stop`` of a 2-D tensor, read positionally from ``fd`` (open on ``entry.shard``).

    ``buf``, a uint8 tensor of at least the rows' bytes, receives them (reusing
    one across chunks spares an allocation per chunk); the result is a view of it.

    Example: ``fd = os.open(e.shard, os.O_RDONLY); head = read_rows(e, 0, 16, fd=fd)``
    """
    row_bytes = entry.nbytes // max(entry.shape[0], 1)
    n = (stop - start) * row_bytes
    if buf is None:
        buf = torch.empty(n, dtype=torch.uint8)
    if n and os.preadv(fd, [buf[:n].numpy()], entry.start + start * row_bytes) != n:
        raise ModelDirError(f"{entry.shard}: truncated: tensor {entry.name} ends early")
    return buf[:n].view(entry.torch_dtype).reshape(stop - start, *entry.shape[1:])


class ModelDir:
    """A Hugging Face model directory, opened lazily and checked before use.

    Example::

        base = ModelDir.open("models/tiny-llama")
        base.shape_of("model.layers.0.self_attn.q_proj.weight")   # (64, 64)
        w = base.load("lm_head.weight")
    """

    def __init__(self, path: Path, config: dict[str, Any], shard_names: list[str], index: dict[str, Any] | None):
        self.path = path
        self.config = config
        self.shard_names = shard_names
        self.index = index

    @classmethod
    def open(cls, path: str | Path) -> ModelDir:
        """Open and validate a model directory (config, index, shard names, headers).

        Raises:
            ModelDirError: missing config or weights, an index naming missing shards.
            UnsafePathError: a shard name or symlink that leaves the directory.
        """
        path = Path(path)
        wrong = wrong_kind(path, expected="model")
        if wrong is not None:
            raise ModelDirError(wrong)
        config = read_json(safe_member(path, "config.json"), error=ModelDirError)
        if not isinstance(config, dict):
            raise ModelDirError(f"{path / 'config.json'}: expected a JSON object")
        quantization = config.get("quantization_config")
        if isinstance(quantization, dict):  # packed weights (bitsandbytes, GPTQ...): not the float W that W + dW needs
            method = quantization.get("quant_method", "quantized")
            raise ModelDirError(f"{path}: a quantized model ({method}); an adapter merges into full-precision weights",
                                hint="give the full-precision base the quantized one was made from (the adapter's "
                                     "base_model_name_or_path)")
        index_path = path / INDEX_FILE
        if index_path.is_file():
            index = read_json(safe_member(path, INDEX_FILE), error=ModelDirError)
            shard_names = _index_shards(index_path, index)
        elif (path / SINGLE_FILE).is_file():
            index, shard_names = None, [SINGLE_FILE]
        else:
            raise ModelDirError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE} (only safetensors weights are supported)")
        problems = []
        for name in shard_names:
            if not safe_member(path, name, what="shard").is_file():
                problems.append(f"shard {name} is missing")
        raise_if_problems(str(path), problems, cls=ModelDirError)
        model = cls(path, config, shard_names, index)
        model._check_index_against_headers()
        return model

    @cached_property
    def headers(self) -> dict[str, ShardHeader]:
        return {name: read_header(self.path / name) for name in self.shard_names}

    @cached_property
    def entries(self) -> dict[str, TensorEntry]:
        """Every tensor by name; with an index, the shard it names is authoritative."""
        out: dict[str, TensorEntry] = {}
        for name, header in self.headers.items():
            for tname, entry in header.entries.items():
                if self.index is None or self.index["weight_map"].get(tname) == name:
                    out[tname] = entry
        return out

    def _check_index_against_headers(self) -> None:
        if self.index is None:
            self.entries  # noqa: B018 - parse every header now, before any work
            return
        problems = []
        for tname, shard in self.index["weight_map"].items():
            if tname not in self.headers[shard].entries:
                problems.append(f"index names {tname} in {shard}, which does not hold it")
        raise_if_problems(str(self.path / INDEX_FILE), problems, cls=ModelDirError)

    def entry(self, name: str) -> TensorEntry | None:
        return self.entries.get(name)

    def shape_of(self, name: str) -> tuple[int, ...] | None:
        e = self.entries.get(name)
        return e.shape if e else None

    def load(self, name: str, *, device: torch.device | str = "cpu") -> torch.Tensor:
        e = self.entries.get(name)
        if e is None:
            raise ModelDirError(f"{self.path}: no tensor {name}")
        return read_tensor(e, device=device)

    def shard_entries(self, shard: str) -> list[TensorEntry]:
        """Tensors of one shard, in file order."""
        return [e for e in self.headers[shard].entries.values() if self.entries.get(e.name) is e]

    def other_files(self) -> list[Path]:
        """Every top-level file that is not this model's weights or index (config, tokenizer, ...).

        Other weight files (``consolidated.safetensors``, ``pytorch_model*.bin``,
        ``*.pth``, ``*.gguf``, a ``model.safetensors`` beside an index, ...) are
        not the model's shards: copied next to changed weights they would be
        stale copies, so they are left out, with one warning naming them.

        Example: ``[p.name for p in ModelDir.open("base").other_files()]`` -> ``["config.json", ...]``
        """
        skip = set(self.shard_names) | {INDEX_FILE}
        keep, stale = [], []
        for p in sorted(self.path.iterdir()):
            if p.name in skip or p.name.startswith(".") or not p.is_file():
                continue
            (stale if _is_weights(p.name) else keep).append(p.name)
        if stale:
            logger.warning(
                "%s: not copied, weight files that are not this model's shards: %s", self.path, ", ".join(stale)
            )
        return [safe_member(self.path, name) for name in keep]

    @property
    def architecture(self) -> str | None:
        arch = self.config.get("architectures")
        return arch[0] if isinstance(arch, list) and arch else None


def _is_weights(name: str) -> bool:
    # An index of other weights (pytorch_model.bin.index.json) names files that are not copied either.
    name = name.lower().removesuffix(".index.json")
    return name.endswith(WEIGHT_SUFFIXES)


def _index_shards(index_path: Path, index: Any) -> list[str]:
    wm = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(wm, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
        raise ModelDirError(f"{index_path}: expected a 'weight_map' object mapping tensor names to shard file names")
    for shard in wm.values():
        safe_member(index_path.parent, shard, what="shard")
    return sorted(set(wm.values()))
