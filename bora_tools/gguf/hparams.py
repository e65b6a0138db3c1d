"""The hyperparameters llama.cpp needs, read from ``config.json`` and checked before any work.

transformers 5 stores the rotary settings in ``rope_parameters``
(``{"rope_theta": ..., "rope_type": ...}``, or one such object per layer type
for models that mix sliding and full attention, as Gemma 3 does); older
configs keep ``rope_theta`` at the top level and the scaling in
``rope_scaling``. All forms are read. What one architecture adds (soft-capping,
multipliers, sliding-window patterns) is read by its entry in
``bora_tools.gguf.architectures`` into ``Hparams.extra``. A key the config
omits takes the default of the family's transformers config class
(``bora_tools.gguf.defaults``, applied by the entry before this reader runs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import gguf
import torch

from bora_tools.errors import ConfigError, UnsupportedError, raise_if_problems
from bora_tools.gguf.defaults import per_layer_type, rope_object

#: rope_theta of a config read without its family's defaults (``read_hparams`` alone; families never use it).
DEFAULT_ROPE_THETA = 10000.0
#: Most layers llama.cpp loads (``LLAMA_MAX_LAYERS``): per-layer arrays are fixed at this size.
MAX_LAYERS = 512
#: Largest size (layers, widths, heads, vocabulary, context) accepted: llama.cpp keeps them in 32-bit integers.
MAX_SIZE = 2**31 - 1
#: Largest rope_theta accepted (real models use 1e4 to 1e8; float32 would turn 1e308 into inf).
MAX_ROPE_THETA = 1e12
#: Largest rotary scaling factor accepted.
MAX_ROPE_FACTOR = 1e6
#: Largest multiplier or soft-cap accepted (Granite's multipliers, Gemma's logit soft-capping).
MAX_SCALE = 1e6
#: rope_type values handled; anything else is refused rather than silently mis-rotated.
ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class Hparams:
    """Decoder hyperparameters in llama.cpp's terms."""

    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    vocab_size: int
    n_ctx: int
    rms_eps: float
    head_dim: int
    explicit_head_dim: bool
    rope_theta: float = DEFAULT_ROPE_THETA
    rope: dict[str, Any] = field(default_factory=dict)  # rope_type and its parameters (full-attention layers)
    rope_by_layer_type: dict[str, dict[str, Any]] = field(default_factory=dict)  # Gemma 3's per-layer-type form
    config: dict[str, Any] = field(default_factory=dict, repr=False)  # config.json with the family's defaults
    n_rot: int = 0  # rotary dimensions per head (head_dim unless partially rotary)
    extra: dict[str, Any] = field(default_factory=dict)  # what one architecture adds, read by its entry

    @property
    def rope_type(self) -> str:
        return str(self.rope.get("rope_type") or self.rope.get("type") or "default")


def read_hparams(config: dict[str, Any], *, source: str, rope_types: tuple[str, ...] = ROPE_TYPES) -> Hparams:
    """Read and check the decoder hyperparameters of a llama-family ``config.json``.

    Example::

        hp = read_hparams(json.load(open("config.json")), source="config.json")
        hp.n_head, hp.n_head_kv, hp.rope_theta      # (32, 8, 500000.0)

    Raises:
        ConfigError: a missing or invalid value; every one is named.
        UnsupportedError: a rotary scaling type llama.cpp would not reproduce here.
    """
    problems: list[str] = []

    def need(key: str, default: Any = None) -> int:
        value = config.get(key)
        value = default if value is None and default is not None else value  # null: derived, as transformers does
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_SIZE:
            problems.append(f"{key}: expected a positive integer of at most {MAX_SIZE}, found {short_repr(value)}")
            return 1
        return value

    n_head = need("num_attention_heads")
    hp = Hparams(n_layer=need("num_hidden_layers"), n_embd=need("hidden_size"), n_ff=need("intermediate_size"),
                 n_head=n_head, n_head_kv=need("num_key_value_heads", n_head), vocab_size=need("vocab_size"),
                 n_ctx=need("max_position_embeddings", 4096), rms_eps=number(config, "rms_norm_eps", 1e-6, problems),
                 head_dim=1, explicit_head_dim=config.get("head_dim") is not None, config=config)
    if hp.n_layer > MAX_LAYERS:  # before any per-layer list is built
        problems.append(f"num_hidden_layers {hp.n_layer}: llama.cpp loads at most {MAX_LAYERS} layers")
        hp.n_layer = 1
    hp.head_dim = need("head_dim") if hp.explicit_head_dim else hp.n_embd // max(hp.n_head, 1)
    if not hp.explicit_head_dim and hp.n_embd % hp.n_head:
        problems.append(f"hidden_size {hp.n_embd} is not divisible by num_attention_heads {hp.n_head}")
    if hp.n_head % hp.n_head_kv:
        problems.append(f"num_attention_heads {hp.n_head} is not a multiple of num_key_value_heads {hp.n_head_kv}")
    if hp.head_dim % 2:
        problems.append(f"head dimension {hp.head_dim} is odd; rotary embeddings need pairs")
    hp.rope, hp.rope_theta, hp.rope_by_layer_type = _rope(config, problems)
    hp.n_rot = hp.head_dim
    raise_if_problems(source, problems, cls=ConfigError)
    if hp.rope_type not in rope_types:
        raise UnsupportedError(f"{source}: rope_type {hp.rope_type!r} is not supported for GGUF export "
                               f"(supported: {', '.join(rope_types)})")
    return hp


def short_repr(value: Any) -> str:
    """``repr(value)``, cut to 60 characters for an error line."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def number(config: dict[str, Any], key: str, default: float, problems: list[str], *,
           at_most: float = 3e38) -> float:
    """``config[key]`` as a positive finite float of at most ``at_most`` (``default`` when absent).

    A bad value is added to ``problems`` (and ``default`` returned).

    Example: ``number({"rope_theta": 5e5}, "rope_theta", 1e4, problems, at_most=MAX_ROPE_THETA)`` -> ``500000.0``
    """
    value = config.get(key, default)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    try:
        ok = ok and math.isfinite(value) and 0 < value <= at_most
    except OverflowError:  # an int beyond float's range
        ok = False
    if not ok:
        problems.append(f"{key}: expected a positive number of at most {at_most:g}, found {short_repr(value)}")
        return default
    return float(value)


def _rope(config: dict[str, Any], problems: list[str]) -> tuple[dict[str, Any], float, dict[str, dict[str, Any]]]:
    params = rope_object(config)  # transformers 4's top-level rope_theta and rope_scaling too
    params = {} if params is None else params
    if not isinstance(params, dict):
        problems.append(f"rope_parameters: expected an object, found {short_repr(params)}")
        return {}, DEFAULT_ROPE_THETA, {}
    by_type: dict[str, dict[str, Any]] = {}
    if per_layer_type(params):  # one object per layer type (Gemma 3)
        by_type = {k: dict(v) for k, v in params.items() if isinstance(v, dict)}
        if "full_attention" not in by_type:
            problems.append("rope_parameters: no full_attention entry")
            return {}, DEFAULT_ROPE_THETA, by_type
        params = by_type["full_attention"]
    theta = _rope_kind(params, problems, "rope_parameters")
    for layer_type, other in by_type.items():
        if layer_type != "full_attention":
            _rope_kind(other, problems, f"rope_parameters.{layer_type}")
    return dict(params), theta, by_type


def _rope_kind(params: dict[str, Any], problems: list[str], where: str) -> float:
    """Check one rope object's theta and its scaling parameters (bounded); returns its theta."""
    theta = number(params, "rope_theta", DEFAULT_ROPE_THETA, problems, at_most=MAX_ROPE_THETA)
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind in ("linear", "llama3"):
        if "factor" not in params:  # transformers requires it too
            problems.append(f"{where}: rope_type {kind!r} needs a factor")
        number(params, "factor", 1.0, problems, at_most=MAX_ROPE_FACTOR)
    if kind == "llama3":
        low = number(params, "low_freq_factor", 1.0, problems, at_most=MAX_ROPE_FACTOR)
        high = number(params, "high_freq_factor", 4.0, problems, at_most=MAX_ROPE_FACTOR)
        number(params, "original_max_position_embeddings", 8192, problems, at_most=MAX_SIZE)
        if high <= low:
            problems.append(f"{where}: rope high_freq_factor {high:g} must exceed low_freq_factor {low:g}")
    return theta


def add_hparams(writer: gguf.GGUFWriter, hp: Hparams) -> None:
    """Write the ``{arch}.*`` keys every llama.cpp decoder reads (an architecture's entry adds its own).

    Example: ``add_hparams(gguf.GGUFWriter(None, "llama"), read_hparams(config, source="config.json"))``
    """
    writer.add_vocab_size(hp.vocab_size)
    writer.add_context_length(hp.n_ctx)
    writer.add_embedding_length(hp.n_embd)
    writer.add_block_count(hp.n_layer)
    writer.add_feed_forward_length(hp.n_ff)
    writer.add_head_count(hp.n_head)
    writer.add_head_count_kv(hp.n_head_kv)
    writer.add_layer_norm_rms_eps(hp.rms_eps)
    writer.add_rope_freq_base(hp.rope_theta)
    writer.add_rope_dimension_count(hp.n_rot)
    if hp.explicit_head_dim:
        writer.add_key_length(hp.head_dim)
        writer.add_value_length(hp.head_dim)
    if hp.rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(hp.rope["factor"]))


def rope_freq_factors(hp: Hparams) -> torch.Tensor | None:
    """Llama 3.1's per-frequency divisors (``rope_freqs.weight``), or None for other rope types.

    llama.cpp divides each rotary frequency by its factor; transformers'
    ``llama3`` rope type scales the same frequencies: low frequencies by
    ``factor``, high ones not at all, and a smooth blend in between.

    Example: with ``factor=8`` and a 64-token original context, the slowest
    rotary frequencies get 8.0, the fastest 1.0.
    """
    if hp.rope_type != "llama3":
        return None
    p = hp.rope
    factor, low, high = float(p["factor"]), float(p.get("low_freq_factor", 1.0)), float(p.get("high_freq_factor", 4.0))
    old_ctx = float(p.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / hp.rope_theta ** (torch.arange(0, hp.head_dim, 2, dtype=torch.float64) / hp.head_dim)
    wavelen = 2 * math.pi / freqs
    smooth = (old_ctx / wavelen - low) / (high - low)
    blended = 1.0 / ((1 - smooth) / factor + smooth)
    out = torch.where(wavelen < old_ctx / high, torch.ones_like(freqs),
                      torch.where(wavelen > old_ctx / low, torch.full_like(freqs, factor), blended))
    return out.to(torch.float32)
