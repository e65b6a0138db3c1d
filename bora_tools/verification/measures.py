"""How far an output's logits are from the reference's, and how far they may be.

Four measures per prompt, on the logits of every position (``(tokens, vocab)`` arrays, computed in float64):

- ``max_rel_error``: ``max |out - ref| / max |ref|``, the measure of the exactness guarantees;
- ``mean_kl``: the mean over positions of ``KL(softmax(ref) || softmax(out))`` in nats, llama.cpp's
  ``llama-perplexity --kl-divergence`` measure for quantized files;
- ``top1``: the share of positions whose most likely next token is the reference's;
- ``correlation``: Pearson's correlation of all logits.

A ``Tolerance`` bounds one measure (``max_rel_error`` for exact outputs, ``mean_kl`` for quantized ones);
``TOLERANCES`` holds the bounds of docs/guarantees.md and the KL bounds measured with llama.cpp's own
quantizer (docs/cli.md, section verify).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bora_tools.errors import UnsupportedError

MEASURES = ("max_rel_error", "mean_kl", "top1", "correlation")


def measure(out: np.ndarray, ref: np.ndarray) -> dict:
    """The four measures of one prompt, and the positions where the first two are worst.

    Example: ``measure(ref + 1e-6, ref)["max_rel_error"]`` -> about ``1e-6 / abs(ref).max()``.
    """
    out, ref = np.asarray(out, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    diff = np.abs(out - ref).max(axis=-1)
    scale = max(float(np.abs(ref).max()), 1e-30)
    kl = kl_divergence(ref, out)
    same = out.argmax(-1) == ref.argmax(-1)
    corr = float(np.corrcoef(out.ravel(), ref.ravel())[0, 1]) if out.size > 1 else 1.0
    return {
        "max_rel_error": float(diff.max()) / scale,
        "max_rel_error_position": int(diff.argmax()),
        "mean_kl": float(kl.mean()),
        "max_kl_position": int(kl.argmax()),
        "top1": float(same.mean()),
        "correlation": corr if np.isfinite(corr) else 0.0,
    }


def measure_logprobs(served: list[dict[int, float]], ref: np.ndarray) -> dict:
    """What an engine that returns top-k log-probabilities (vLLM) allows: per position ``i`` (predicting token
    ``i+1``), ``served[i]`` holds ``{token: logprob}`` for its most likely tokens and the actual one.

    - ``max_rel_logprob_error``: ``max |logprob_out - logprob_ref|`` over those tokens, ``/ max |ref|``;
    - ``top1``: the share of positions whose most likely token (the largest served) is the reference's.

    KL and correlation need every token's value and are ``None``.
    """
    ref = np.asarray(ref, dtype=np.float64)
    log_p = _log_softmax(ref)
    errors = np.array([max(abs(lp - log_p[i, tok]) for tok, lp in position.items())
                       for i, position in enumerate(served)])
    same = [max(position, key=position.get) == int(ref[i].argmax()) for i, position in enumerate(served)]
    scale = max(float(np.abs(ref).max()), 1e-30)
    return {
        "max_rel_error": None,
        "max_rel_logprob_error": float(errors.max()) / scale if errors.size else 0.0,
        "max_rel_logprob_error_position": int(errors.argmax()) if errors.size else 0,
        "mean_kl": None,
        "top1": float(np.mean(same)) if same else 1.0,
        "correlation": None,
    }


def kl_divergence(ref: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``KL(softmax(ref) || softmax(out))`` per position (nats), from log-softmax: stable for any logits."""
    log_p = _log_softmax(ref)
    log_q = _log_softmax(out)
    return np.maximum((np.exp(log_p) * (log_p - log_q)).sum(-1), 0.0)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def effect(ref: np.ndarray, base: np.ndarray) -> float:
    """How much the adapter moves the logits: ``max |ref - base| / max |ref|`` (0: the check proves nothing)."""
    ref, base = np.asarray(ref, dtype=np.float64), np.asarray(base, dtype=np.float64)
    return float(np.abs(ref - base).max() / max(float(np.abs(ref).max()), 1e-30))


@dataclass(frozen=True)
class Tolerance:
    """``measure`` must stay at or below ``bound``; ``source`` says where the bound comes from."""

    measure: str  # "max_rel_error", "mean_kl" or (vLLM) "max_rel_logprob_error"
    bound: float
    source: str

    def holds(self, value: float) -> bool:
        return bool(np.isfinite(value)) and value <= self.bound

    def to_dict(self) -> dict:
        return {"measure": self.measure, "bound": self.bound, "source": self.source}


_EXACT = "docs/guarantees.md"
_MEASURED = "measured with llama.cpp's quantizer on the tiny families (docs/cli.md#verify)"

#: output type -> its tolerance. Exact outputs: max relative logit error; quantized GGUF: mean KL (nats).
TOLERANCES: dict[str, Tolerance] = {
    # merged model directories and PEFT LoRA adapters, run in transformers / PEFT in float32
    "float32": Tolerance("max_rel_error", 1e-4, _EXACT),
    "float64": Tolerance("max_rel_error", 1e-4, _EXACT),
    "float16": Tolerance("max_rel_error", 1e-2, _EXACT),
    "bfloat16": Tolerance("max_rel_error", 3e-2, _EXACT),
    # GGUF files whose weights are floats, run in llama.cpp
    "gguf-f32": Tolerance("max_rel_error", 3e-3, _EXACT),
    "gguf-f16": Tolerance("max_rel_error", 1e-2, _EXACT),
    "gguf-bf16": Tolerance("max_rel_error", 3e-2, _EXACT),
}

#: quantized GGUF type -> the mean KL bound (nats): twice the worst mean KL that llama.cpp's quantizer reached on
#: the tiny families and two tiny llamas (rows of 64 and of 256), measured by ``scripts/verify_kl_bounds.py``.
KL_BOUNDS: dict[str, float] = {
    "q8_0": 0.00051, "q4_0": 0.074, "q4_1": 0.061, "q5_0": 0.018, "q5_1": 0.016, "q2_k": 0.4, "q3_k_s": 0.2,
    "q3_k_m": 0.13, "q3_k_l": 0.13, "q4_k_s": 0.042, "q4_k_m": 0.046, "q5_k_s": 0.015, "q5_k_m": 0.015,
    "q6_k": 0.0039,
}


def tolerance_for(kind: str, *, max_kl: float | None = None) -> Tolerance:
    """The tolerance of an output type (``float32``, ``gguf-q8_0``, ...); ``max_kl`` overrides it with a KL bound.

    Raises:
        UnsupportedError: a type without a known bound, and no ``max_kl``.
    """
    if max_kl is not None:
        return Tolerance("mean_kl", float(max_kl), "`max_kl`")
    if kind in TOLERANCES:
        return TOLERANCES[kind]
    quant = kind.removeprefix("gguf-")
    if quant not in KL_BOUNDS:
        raise UnsupportedError(f"no KL bound is known for {quant} files", hint="give one with `max_kl`")
    return Tolerance("mean_kl", KL_BOUNDS[quant], _MEASURED)
