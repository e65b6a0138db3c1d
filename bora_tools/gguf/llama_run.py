"""Run an exported GGUF in llama.cpp (through ``llama-cpp-python``): the proof the demo and tests use.

``llama-cpp-python`` is optional (it is in the ``test`` extra); importing this
module does not need it, calling its functions does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from bora_tools.errors import UnsupportedError


def llama_cpp_available() -> bool:
    """Whether ``llama-cpp-python`` can be imported."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


_GGML_LOG_ERROR = 4  # ggml's enum: NONE, DEBUG, INFO, WARN, ERROR, CONT
_quiet_callback = None  # kept referenced: llama.cpp holds a raw pointer to it


def _errors_only() -> None:
    # llama-cpp-python maps ggml's log levels with an older enum, so its quiet mode
    # still prints warnings (such as every tiny model exceeding its 128-token
    # training context once llama.cpp pads the context to 256).
    global _quiet_callback
    import ctypes
    import sys

    import llama_cpp

    if _quiet_callback is None:
        @llama_cpp.llama_log_callback
        def callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
            if level == _GGML_LOG_ERROR:
                print(text.decode("utf-8", "replace"), end="", file=sys.stderr, flush=True)

        _quiet_callback = callback
    llama_cpp.llama_log_set(_quiet_callback, ctypes.c_void_p(0))


@contextlib.contextmanager
def _plain_buffers() -> Iterator[None]:
    # llama.cpp repacks quantised weights into "extra" CPU buffers (AMX, ...)
    # when the CPU has the instructions; on this project's AMX machines (a VM)
    # its repacked Q8_0 kernels crash with a segmentation fault, also on files
    # made by llama.cpp's own quantiser. Plain buffers compute the same logits.
    import llama_cpp.llama as high

    low = high.llama_cpp
    original = low.llama_model_default_params

    def params():
        p = original()
        p.use_extra_bufts = False
        return p

    low.llama_model_default_params = params
    try:
        yield
    finally:
        low.llama_model_default_params = original


def open_llama(path: str | Path, *, lora_path: str | Path | None = None, lora_scale: float = 1.0,
               n_ctx: int = 0, vocab_only: bool = False):
    """A ``llama_cpp.Llama`` for ``path`` (and a LoRA GGUF), logits for every position kept.

    ``n_ctx=0`` takes the model's own context length (a longer one only draws
    llama.cpp's warning about exceeding the trained context).

    Example::

        llm = open_llama("model.gguf", lora_path="lora.gguf")
        llm.eval(ids); logits = np.array(llm.scores[:len(ids)])

    Raises:
        UnsupportedError: ``llama-cpp-python`` is not installed.
    """
    try:
        import llama_cpp
    except ImportError as e:
        raise UnsupportedError("llama-cpp-python is not installed", hint="pip install 'bora-tools[test]'") from e
    _errors_only()
    with _plain_buffers():
        return llama_cpp.Llama(str(path), lora_path=str(lora_path) if lora_path else None, lora_scale=lora_scale,
                               n_ctx=n_ctx, logits_all=True, vocab_only=vocab_only, verbose=False, n_threads=2)


def gguf_logits(path: str | Path, ids: Sequence[int], *, lora_path: str | Path | None = None) -> np.ndarray:
    """llama.cpp's float32 logits ``(len(ids), n_vocab)`` for the token sequence ``ids``.

    Example: ``gguf_logits("base.gguf", [0, 5, 9], lora_path="lora.gguf").shape`` -> ``(3, 320)``
    """
    llm = open_llama(path, lora_path=lora_path)
    try:
        llm.eval(list(int(i) for i in ids))
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


def gguf_tokenize(path: str | Path, text: str, *, add_bos: bool = True) -> list[int]:
    """llama.cpp's tokenization of ``text`` (special tokens in the text are not parsed).

    Example: ``gguf_tokenize("model.gguf", "Hello")`` -> ``[0, 54, 262]`` (with the BOS token)
    """
    llm = open_llama(path)  # vocab_only has no context length, and llama.cpp then warns
    try:
        return list(llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=False))
    finally:
        llm.close()


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    """``max |got - want| / max |want|``: the tolerance measure of the GGUF proofs."""
    return float(np.abs(np.asarray(got) - np.asarray(want)).max() / max(float(np.abs(want).max()), 1e-30))


def correlation(got: np.ndarray, want: np.ndarray) -> float:
    """Pearson correlation of all logits (the measure for quantised files)."""
    return float(np.corrcoef(np.asarray(got).ravel(), np.asarray(want).ravel())[0, 1])
