"""An incremental safetensors writer: the header first, then each tensor's bytes as they come.

A safetensors header only needs names, dtypes and shapes, all known before
any data, so a shard can be written tensor by tensor (or chunk by chunk)
without ever holding it in memory. The bytes on disk are what
``safetensors.torch.save_file`` writes for the same tensors in the same
order: an 8-byte little-endian header length, compact UTF-8 JSON with
``__metadata__`` first and the tensors in data order, padded with spaces to a
multiple of 8, then the raw little-endian data.

The writer is a small state machine: tensors must arrive in header order and
each must receive exactly its byte count; ``close`` refuses an incomplete file.
Optionally one background thread does the disk writes, in order, so that
they overlap the caller's work on the next bytes.
"""

from __future__ import annotations

import errno
import json
import math
import os
import struct
from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

#: safetensors dtype name -> (bytes per element, torch dtype)
ST_DTYPES: dict[str, tuple[int, torch.dtype | None]] = {
    "F64": (8, torch.float64), "F32": (4, torch.float32), "F16": (2, torch.float16), "BF16": (2, torch.bfloat16),
    "I64": (8, torch.int64), "I32": (4, torch.int32), "I16": (2, torch.int16), "I8": (1, torch.int8),
    "U8": (1, torch.uint8), "BOOL": (1, torch.bool), "U16": (2, getattr(torch, "uint16", None)),
    "U32": (4, getattr(torch, "uint32", None)), "U64": (8, getattr(torch, "uint64", None)),
    "F8_E4M3": (1, getattr(torch, "float8_e4m3fn", None)), "F8_E5M2": (1, getattr(torch, "float8_e5m2", None)),
}
TORCH_TO_ST = {dt: name for name, (_, dt) in ST_DTYPES.items() if dt is not None}
#: The float dtypes of the table: what can be merged, converted or exported.
FLOAT_ST_DTYPES = ("F64", "F32", "F16", "BF16")

#: Bytes moved per system call when copying raw tensor data between files.
COPY_CHUNK = 64 * 1024 * 1024
_ALIGN = 8  # safetensors pads the header so that the data starts 8-byte aligned


@dataclass(frozen=True)
class TensorSpec:
    """A tensor as the header announces it: name, safetensors dtype name and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ST_DTYPES[self.dtype][0]


def header_bytes(specs: Sequence[TensorSpec], metadata: Mapping[str, str] | None = None) -> bytes:
    """The header block (length prefix, JSON, padding) for tensors stored in ``specs`` order.

    Example::

        header_bytes([TensorSpec("w", "BF16", (2, 3))], {"format": "pt"})[:8]   # b'h\\x00\\x00...'
    """
    header: dict = {}
    if metadata is not None:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for spec in specs:
        if spec.name in header:
            raise ValueError(f"tensor {spec.name!r} appears twice in one safetensors file")
        header[spec.name] = {
            "dtype": spec.dtype,
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % _ALIGN)
    return struct.pack("<Q", len(raw)) + raw


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor (little-endian, C order) without a copy when it is contiguous on the CPU."""
    t = tensor.detach().cpu().contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


class SafetensorsWriter:
    """Write one safetensors file incrementally.

    With ``background=True`` the disk writes run on one I/O thread, in order,
    while the caller prepares the next bytes; ``write`` then returns a future
    that completes once the data it was given may be reused. At most
    ``max_pending`` writes wait in line, which bounds the memory they hold.

    Example::

        specs = [TensorSpec("a", "F32", (2,)), TensorSpec("b", "BF16", (4, 4))]
        with SafetensorsWriter(path, specs, metadata={"format": "pt"}) as w:
            w.write("a", torch.ones(2))
            w.copy_range("b", src_fd, offset, 32)     # raw bytes from another file
    """

    def __init__(
        self,
        path: str | os.PathLike,
        specs: Sequence[TensorSpec],
        *,
        metadata: Mapping[str, str] | None = None,
        background: bool = False,
        max_pending: int = 4,
    ):
        self.path = Path(path)
        self.specs = list(specs)
        self._header = header_bytes(self.specs, metadata)
        self._index = 0  # the tensor now receiving bytes
        self._left = self.specs[0].nbytes if self.specs else 0
        self._fd: int | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="st-writer") if background else None
        self._pending: deque[Future] = deque()
        self._max_pending = max(1, max_pending)

    def __enter__(self) -> SafetensorsWriter:
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(self._fd, self._header)
        except BaseException:
            self._release()  # __exit__ never runs when __enter__ raises
            raise
        self._skip_empty()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.close()
        finally:
            self._release()

    def _release(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)  # never close the fd under a running write
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _skip_empty(self) -> None:
        while self._index < len(self.specs) and self._left == 0:
            self._index += 1
            self._left = self.specs[self._index].nbytes if self._index < len(self.specs) else 0

    def _take(self, name: str, n: int) -> None:
        """Check that ``n`` more bytes of ``name`` are what the file expects now, and count them."""
        if self._fd is None:
            raise RuntimeError(f"{self.path}: writer is not open")
        if n == 0:  # an empty tensor (or chunk) has nothing to place
            return
        expected = self.specs[self._index].name if self._index < len(self.specs) else None
        if name != expected:
            raise RuntimeError(f"{self.path}: got bytes for {name!r} but the next tensor is {expected!r}")
        if n > self._left:
            raise RuntimeError(f"{self.path}: tensor {name!r} would get {n} bytes with only {self._left} left")
        self._left -= n
        self._skip_empty()

    def _run(self, fn, *args) -> Future | None:
        if self._pool is None:
            fn(*args)
            return None
        while self._pending and (self._pending[0].done() or len(self._pending) >= self._max_pending):
            self._pending.popleft().result()  # re-raises an I/O error as soon as it is seen
        future = self._pool.submit(fn, *args)
        self._pending.append(future)
        return future

    def write(self, name: str, data: torch.Tensor | bytes | memoryview) -> Future | None:
        """Append bytes (or a tensor's bytes) to tensor ``name``, which must be the current one.

        In the background mode, ``data`` must stay unchanged until the returned future is done.
        """
        view = tensor_bytes(data) if isinstance(data, torch.Tensor) else memoryview(data).cast("B")
        self._take(name, view.nbytes)
        return self._run(_write_all, self._fd, view)

    def copy_range(self, name: str, src_fd: int, offset: int, nbytes: int) -> Future | None:
        """Append ``nbytes`` raw bytes read from ``src_fd`` at ``offset`` to tensor ``name``.

        Uses ``os.copy_file_range`` (the kernel moves the bytes; nothing passes
        through this process's memory) and falls back to positional reads.
        """
        self._take(name, nbytes)
        return self._run(_copy, src_fd, self._fd, offset, nbytes)

    def close(self) -> None:
        """Wait for every write; refuse to finish a file whose tensors did not all receive their bytes."""
        while self._pending:
            self._pending.popleft().result()
        if self._index < len(self.specs):
            spec = self.specs[self._index]
            raise RuntimeError(f"{self.path}: incomplete: tensor {spec.name!r} is missing {self._left} bytes")


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view.nbytes:
        n = os.write(fd, view)
        view = view[n:]


def _copy(src: int, dst: int, offset: int, nbytes: int) -> None:
    done = 0
    use_kernel = hasattr(os, "copy_file_range")
    while done < nbytes:
        n = min(COPY_CHUNK, nbytes - done)
        if use_kernel:
            try:
                got = os.copy_file_range(src, dst, n, offset + done)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
                    raise
                use_kernel = False
                continue
        else:
            chunk = os.pread(src, n, offset + done)
            got = len(chunk)
            _write_all(dst, chunk)
        if got == 0:
            raise OSError(errno.EIO, f"unexpected end of source file at byte {offset + done}")
        done += got


def st_dtype(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype (``torch.bfloat16`` -> ``"BF16"``)."""
    return TORCH_TO_ST[dtype]


def save_tensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str]) -> None:
    """``safetensors.torch.save_file`` with a reproducible header: tensors by name, ``metadata`` in its given order
    (safetensors' own writer orders several metadata keys differently from run to run)."""
    names = sorted(tensors)
    specs = [TensorSpec(n, st_dtype(tensors[n].dtype), tuple(tensors[n].shape)) for n in names]
    with SafetensorsWriter(path, specs, metadata=metadata) as w:
        for n in names:
            w.write(n, tensors[n])
