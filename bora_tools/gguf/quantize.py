"""k-quants and legacy quants through llama.cpp's own quantizer, without building llama.cpp.

``llama-cpp-python`` (the ``llama`` extra) ships llama.cpp's ``llama_model_quantize``:
the code behind ``llama-quantize``, with its per-tensor recipes (Q4_K_M keeps
``output.weight`` and part of ``attn_v`` / ``ffn_down`` in Q6_K, ...). The
pipeline of a quantized export (``bora_tools.gguf.export._write_models``):

1. our streaming writer writes an intermediate GGUF into a hidden scratch
   sibling of the final temporary (``io.atomic.scratch_sibling``). Its tensor
   types hold the values exactly, so that only the quantizer rounds: the
   stored dtype of each weight (bf16 stays bf16, f16 stays f16, f32 stays
   f32), and f32 for merged weights (``W + dW`` is computed in float32; rounding
   it to the base dtype first would round twice). The quantizer converts every
   tensor to float32 before quantizing anyway, so nothing is gained by a wider
   type and nothing is lost by this one;
2. ``llama_model_quantize`` (``quantize_file``) writes the final temporary of ``atomic_output``, once
   per quantized type asked for (one intermediate serves them all);
3. the intermediate is removed, and ``atomic_output`` renames the results into place.

A failure removes both files; a killed run leaves both hidden, and the next run
on the same target removes them (they carry the dead process's id).

llama.cpp's log lines never reach the terminal: ``llama_log_set`` routes them
to the ``bora_tools`` logger at debug level (shown by ``--debug``), and its
per-tensor lines (``[  3/ 21] blk.0.attn_k.weight - ...``) drive the progress bar.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import queue
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bora_tools.errors import UnsupportedError, ValidationError
from bora_tools.gguf.outtypes import OUTTYPES
from bora_tools.io.atomic import remove_scratch, scratch_sibling
from bora_tools.progress import Progress, logger, no_progress

INSTALL_HINT = "pip install 'bora-tools[llama]'"

# ggml's log levels (ggml.h): NONE, DEBUG, INFO, WARN, ERROR, CONT (continues the previous line).
_ERROR, _CONT = 4, 5
#: llama.cpp's line for each tensor it writes: "[   3/  21] blk.0.attn_k.weight - [...], type = f32, ..."
_TENSOR_LINE = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]\s+(\S+)")
#: llama.cpp's line for a tensor whose rows do not fit the type's block, before it writes it in another type.
_FALLBACK_LINE = re.compile(r"^warning: (\S+)\s+- ncols\s+(\d+) not divisible by (\d+) \(required for type\s+(\S+)\)"
                            r" -> falling back to\s+(\S+)")


def require_llama_cpp(outtype: str) -> None:
    """Refuse, before anything is written, a quantized ``outtype`` when ``llama-cpp-python`` is missing.

    Raises:
        UnsupportedError: one line naming the extra to install.
    """
    try:
        import llama_cpp  # noqa: F401
    except (ImportError, OSError) as e:  # OSError: the package is there but its shared library does not load
        raise UnsupportedError(
            f"`outtype` {outtype} is made by llama.cpp's quantizer from llama-cpp-python, which is not installed",
            hint=INSTALL_HINT,
        ) from e


def default_threads() -> int:
    """Every CPU this process may use (``--threads`` default)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def check_threads(threads: int | None) -> int:
    """``threads`` resolved (None: all cores).

    Raises:
        ValidationError: fewer than 1.
    """
    if threads is None:
        return default_threads()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValidationError(f"`threads` {threads!r}: expected a positive integer")
    return threads


@dataclass
class Quantized:
    """What a quantized export did: the final file's tensors, disk and time."""

    types: dict[str, int]  # GGUF tensor type -> count, read back from the final file
    tensors: int
    bits_per_weight: float  # tensor data bits / elements, over every tensor of the file
    intermediate_bytes: int
    peak_disk_bytes: int  # intermediate + output, both on disk while llama.cpp writes
    phases: dict[str, float]  # seconds: write_intermediate, quantize
    threads: int
    fallbacks: list[dict[str, str]] = field(default_factory=list)  # tensor, type, reason: llama.cpp's own fallbacks


def read_summary(path: Path) -> dict[str, Any]:
    """Tensor types, count and bits per weight of a GGUF file, read back with gguf-py's reader.

    Example: ``read_summary(Path("m.gguf"))`` -> ``{"types": {"Q4_K": 12, "Q6_K": 3, "F32": 5}, "tensors": 20,
    "bits_per_weight": 4.9}``
    """
    import gguf

    reader = gguf.GGUFReader(path)
    types = Counter(t.tensor_type.name for t in reader.tensors)
    data_bytes = sum(int(t.n_bytes) for t in reader.tensors)
    elements = sum(int(t.n_elements) for t in reader.tensors)
    return {"types": dict(types), "tensors": len(reader.tensors),
            "bits_per_weight": round(8 * data_bytes / max(elements, 1), 3)}


def quantize_file(src: Path, dst: Path, *, outtype: str, threads: int, tensors: int,
                  progress: Progress = no_progress) -> list[dict[str, str]]:
    """Run ``llama_model_quantize(src, dst)`` for ``outtype`` on ``threads`` threads.

    Returns the tensors llama.cpp wrote in a fallback type (rows not a
    multiple of the type's block), as ``{"tensor", "type", "reason"}``.

    llama.cpp runs in a worker thread while this one draws ``progress`` from its
    per-tensor log lines (``tensors`` of them).

    Raises:
        OSError: the disk refused llama.cpp's writes (file too large, disk full).
        UnsupportedError: any other failure of the quantizer, quoting its error line.
    """
    import llama_cpp

    spec = OUTTYPES[outtype]
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_{spec.file_type}")
    params.nthread = threads
    # llama.cpp writes into a folder of its own, moved to ``dst`` when it returns: a signal cannot stop
    # llama.cpp, but removing the folder makes any file it would still create fail instead of appearing.
    folder = scratch_sibling(dst, "quantize")
    folder.mkdir()
    written = folder / "out.gguf"
    with _LOG_LOCK, _routed_log(llama_cpp) as session:
        done: dict[str, Any] = {}

        def run() -> None:
            try:
                done["rc"] = llama_cpp.llama_model_quantize(str(src).encode(), str(written).encode(),
                                                            ctypes.byref(params))
            except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
                done["error"] = e
            finally:
                session.events.put(None)

        worker = threading.Thread(target=run, name="bora-llama-quantize", daemon=True)
        worker.start()
        try:
            for _ in progress(session.ticks(), total=tensors, label=f"quantizing to {outtype} (llama.cpp)"):
                pass
            worker.join()
        except BaseException:  # a signal: llama.cpp runs on until the process ends, silenced and writing nowhere
            session.abandoned = True
            _remove_folder(folder)
            raise
        if written.exists():
            os.replace(written, dst)
        _remove_folder(folder)
        session.feed(_CONT, "\n")  # a last line without its newline
        while not session.events.empty():
            logger.debug("llama.cpp: %s", session.events.get())
    if "error" in done:
        raise done["error"]
    if done.get("rc") != 0:
        message = session.errors[-1] if session.errors else f"llama_model_quantize returned {done.get('rc')}"
        code = _write_failure(dst, message)
        if code is not None:
            raise OSError(code, f"llama.cpp's quantizer could not write {dst.name}: {message}")
        raise UnsupportedError(f"llama.cpp's quantizer failed on `outtype` {outtype}: {message}")
    return session.fallbacks


class _LogSession:
    """Receives llama.cpp's log text (in pieces), logs whole lines at debug level, and turns tensor lines
    into progress ticks."""

    def __init__(self) -> None:
        self.events: queue.Queue = queue.Queue()
        self.errors: list[str] = []
        self.fallbacks: list[dict[str, str]] = []
        self._pending = ""
        self._level = 0
        self.abandoned = False  # interrupted: llama.cpp's log stays ours (never on the terminal) until exit

    def feed(self, level: int, text: str) -> None:
        if level != _CONT:
            self._level = level
        self._pending += text
        while "\n" in self._pending:
            line, self._pending = self._pending.split("\n", 1)
            self._line(line.strip())

    def _line(self, line: str) -> None:
        if not line:
            return
        self.events.put(line)  # logged by the waiting thread, where the CLI's context is
        if self._level == _ERROR:
            self.errors.append(line.removeprefix("llama_model_quantize: "))
        fallback = _FALLBACK_LINE.match(line)
        if fallback:
            name, cols, block, wanted, used = fallback.groups()
            self.fallbacks.append({"tensor": name, "type": used.upper(),
                                   "reason": f"row of {cols} is not a multiple of {block} ({wanted.upper()})"})
        found = _TENSOR_LINE.match(line)
        if found:
            tensor_done(int(found.group(1)), int(found.group(2)), found.group(3), self.events)

    def ticks(self) -> Iterator[int]:
        """One item per tensor written, until llama.cpp returns; its log lines are logged on the way."""
        while (item := self.events.get()) is not None:
            if isinstance(item, str):
                logger.debug("llama.cpp: %s", item)
            else:
                yield item


def tensor_done(index: int, total: int, name: str, events: queue.Queue) -> None:
    """Called in llama.cpp's thread after each tensor line: one progress tick.

    (A seam for the crash-safety tests, which pause the quantizer here to kill it mid-file.)
    """
    events.put(index)


_LOG_LOCK = threading.Lock()  # llama_log_set is process-wide: one quantization at a time
_session: _LogSession | None = None
_callback = None  # referenced for as long as llama.cpp may call it


@contextlib.contextmanager
def _routed_log(llama_cpp: Any) -> Iterator[_LogSession]:
    global _callback, _session
    if _callback is None:
        @llama_cpp.llama_log_callback
        def callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
            if _session is not None:
                _session.feed(level, text.decode("utf-8", "replace"))
            elif level == _ERROR:
                logger.debug("llama.cpp: %s", text.decode("utf-8", "replace").rstrip())

        _callback = callback
    _session = _LogSession()
    llama_cpp.llama_log_set(_callback, ctypes.c_void_p(0))
    session = _session
    try:
        yield session
    finally:
        _session = None
        if not session.abandoned:  # an abandoned run's llama.cpp still logs: our callback keeps it off stderr
            _restore_default_log(llama_cpp)


def _remove_folder(folder: Path) -> None:
    """Remove llama.cpp's output folder, again if llama.cpp created its file while it was being removed."""
    for _ in range(50):
        remove_scratch(folder)
        if not folder.exists():
            return
        time.sleep(0.01)


def _restore_default_log(llama_cpp: Any) -> None:
    # Hand the log back to llama-cpp-python's own callback (the one it installs on import), so that a
    # later llama_cpp.Llama(verbose=...) in the same process behaves as without us.
    try:
        from llama_cpp import _logger
    except ImportError:  # another layout: keep ours, which logs only errors at debug level
        return
    default = getattr(_logger, "llama_log_callback", None)
    if default is not None:
        llama_cpp.llama_log_set(default, ctypes.c_void_p(0))


def _write_failure(dst: Path, message: str) -> int | None:
    """The errno behind a failed llama.cpp write, when the failure was one (its iostream says only "error")."""
    size = dst.stat().st_size if dst.exists() else 0
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if soft != resource.RLIM_INFINITY and size >= soft:
            return errno.EFBIG
    except ImportError:  # not on this platform
        pass
    with contextlib.suppress(OSError):
        st = os.statvfs(dst.parent)
        if st.f_bavail * st.f_frsize < (1 << 20):
            return errno.ENOSPC
    if "iostream" in message or "write" in message.lower():
        return errno.EIO
    return None
