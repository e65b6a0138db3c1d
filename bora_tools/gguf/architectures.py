"""The Hugging Face architectures ``export-gguf`` handles: one small entry (``Family``) each.

An entry says what llama.cpp needs for one architecture, and nothing else:

- ``config_class``: the transformers config class whose defaults fill what
  ``config.json`` omits (``bora_tools.gguf.defaults``), as transformers fills them.
- ``arch``: llama.cpp's architecture (``gguf.MODEL_ARCH``). Tensor names always
  come from gguf-py's own map for it (``gguf.get_tensor_name_map``); a
  checkpoint tensor the map does not know is refused, never guessed.
- ``permute_qk``: llama.cpp's llama-style graphs rotate adjacent pairs, so the
  q/k rows (and a LoRA's ``lora_b``) are reordered (``qk_row_order``); the
  NeoX-style graphs (Qwen, Gemma, Phi-3, OLMo 2) take the HF layout as is.
- ``norm_shift``: added to every ``*norm.weight`` (Gemma stores ``w`` and
  applies ``1 + w``; llama.cpp multiplies by the stored weight).
- ``read`` / ``write``: hooks that read what the architecture adds to
  ``config.json`` into ``Hparams.extra`` (checking it: a setting llama.cpp
  would not reproduce is refused) and write it as ``{arch}.*`` keys.
- ``generated``: tensors llama.cpp needs that the checkpoint does not store
  (rotary factors). They go into full models only, never into a LoRA GGUF.
- ``shapes``: the shapes (torch order, from the hyperparameters) of the
  tensors whose shape differs from, or is missing in, the ones every decoder
  shares (``bora_tools.gguf.shapes.expected_shape``): fused, per-projection
  norm and expert tensors. Every tensor with a known shape is checked before
  the first byte; ``None`` means "not checked".
- ``rope_types``, ``activations``: the rotary scalings and activations
  llama.cpp's graph for the architecture reproduces; others are refused.
- ``tokenizers``: the tokenizer kinds its checkpoints ship (documentation).

Mixture-of-experts checkpoints store one matrix per expert
(``...experts.<i>.w1.weight``); the exporter stacks them into llama.cpp's 3-D
expert tensors, expert by expert, whatever the family.

Adding an architecture is one entry in ``FAMILIES`` (with its hooks, when it
has settings of its own) and one row in ``tests/test_gguf_families.py`` and in
``tests/test_gguf_defaults.py`` (which fails until the family is there).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gguf
import torch

from bora_tools.errors import ConfigError, UnsupportedError, raise_if_problems
from bora_tools.gguf.defaults import class_layer_types, effective_config
from bora_tools.gguf.hparams import (
    MAX_ROPE_FACTOR,
    MAX_ROPE_THETA,
    MAX_SCALE,
    MAX_SIZE,
    ROPE_TYPES,
    Hparams,
    add_hparams,
    number,
    read_hparams,
    rope_freq_factors,
    short_repr,
)

M = gguf.MODEL_ARCH
Reader = Callable[[dict[str, Any], Hparams, list[str], list[str]], None]  # (config, hp, problems, unsupported)
Writer = Callable[[gguf.GGUFWriter, Hparams], None]
Generated = Callable[[Hparams], list[tuple[str, torch.Tensor, str]]]  # -> [(gguf name, tensor, source)]
Shapes = Callable[[Hparams], dict[str, tuple[int, ...] | None]]  # -> {GGUF tensor kind ("ffn_up"): shape}

SILU = ("silu", "swish")
GELU_TANH = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast")  # llama.cpp's GELU is the tanh approximation
BPE, SPM = "byte-level BPE (tokenizer.json)", "SentencePiece (tokenizer.model)"


@dataclass(frozen=True)
class Family:
    """How one Hugging Face architecture maps onto a llama.cpp architecture (see the module docstring)."""

    arch: gguf.MODEL_ARCH
    config_class: str  # transformers' config class: the defaults of what config.json omits
    permute_qk: bool = False
    norm_shift: float = 0.0
    read: Reader | None = None
    write: Writer | None = None
    generated: Generated | None = None
    shapes: Shapes | None = None
    rope_types: tuple[str, ...] = ROPE_TYPES
    activations: tuple[str, ...] | None = None  # None: not checked (the original three families)
    tokenizers: tuple[str, ...] = (BPE, SPM)
    warn_sliding_window: bool = False  # config's sliding_window is not applied by llama.cpp's graph
    notes: tuple[str, ...] = field(default_factory=tuple)  # what the entry handles (documentation)

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.arch]

    def read_hparams(self, config: dict[str, Any], *, source: str) -> Hparams:
        """The hyperparameters, checked: the common ones, then this architecture's own.

        A key ``config`` omits takes the default of the family's transformers config class.

        Raises:
            ConfigError: a missing or invalid value; every one is named.
            UnsupportedError: a setting llama.cpp's graph for this architecture would not reproduce.
        """
        config = effective_config(config, self.config_class)
        hp = read_hparams(config, source=source, rope_types=self.rope_types)  # n_layer is bounded from here on
        problems: list[str] = []
        unsupported: list[str] = []
        if config.get("layer_types") is None:  # derived by transformers from the layer count (and Gemma 3's pattern)
            pattern = config.get("sliding_window_pattern")
            if pattern is not None and (not isinstance(pattern, int) or isinstance(pattern, bool)
                                        or not 1 <= pattern <= MAX_SIZE):
                problems.append(f"sliding_window_pattern: expected a positive integer, found {short_repr(pattern)}")
                pattern = None
            types = class_layer_types(self.config_class, hp.n_layer, pattern)
            config["layer_types"] = None if types is None else list(types)
        if self.activations is not None:
            act = config.get("hidden_activation") or config.get("hidden_act")
            if act not in self.activations:
                unsupported.append(f"activation {act!r}: llama.cpp's {self.name} graph uses "
                                   f"{' / '.join(self.activations)}")
        if self.read is not None:
            self.read(config, hp, problems, unsupported)
        raise_if_problems(source, problems, cls=ConfigError)
        raise_if_problems(source, unsupported, cls=UnsupportedError)
        return hp

    def write_hparams(self, writer: gguf.GGUFWriter, hp: Hparams) -> None:
        add_hparams(writer, hp)
        if self.write is not None:
            self.write(writer, hp)

    def generated_tensors(self, hp: Hparams) -> list[tuple[str, torch.Tensor, str]]:
        """Tensors llama.cpp needs that no checkpoint stores (full models only)."""
        out = []
        freqs = rope_freq_factors(hp)
        if freqs is not None:
            out.append((gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", freqs,
                        "rope_parameters (llama3)"))
        if self.generated is not None:
            out.extend(self.generated(hp))
        return out

    def shifted(self, gguf_name: str) -> float:
        """What to add to this tensor's values (Gemma's ``1 + w`` norms), 0.0 for none."""
        return self.norm_shift if gguf_name.endswith("norm.weight") else 0.0


def qk_row_order(rows: int, n_head: int) -> torch.Tensor:
    """Row order that turns HF q/k rows into llama.cpp's rotary layout.

    HF stores each head's rotary pairs as two halves (all first components,
    then all second ones); llama.cpp's llama graph rotates adjacent pairs, so
    the halves of every head are interleaved. ``W_gguf = W_hf[order]``; it
    applies to weights, biases and a LoRA's ``lora_b`` alike (they all index
    output rows).

    Example: ``qk_row_order(4, 1)`` -> ``tensor([0, 2, 1, 3])``
    """
    return torch.arange(rows).reshape(n_head, 2, rows // n_head // 2).transpose(1, 2).reshape(-1)


def qk_heads(gguf_name: str, hparams: Hparams) -> int | None:
    """Heads of a q or k projection (whose rows have ``head_dim`` each), or None for any other tensor.

    Example: ``qk_heads("blk.3.attn_k.weight", hp)`` -> ``hp.n_head_kv``
    """
    part = gguf_name.split(".")[2] if gguf_name.startswith("blk.") else ""
    if part == "attn_q":
        return hparams.n_head
    if part == "attn_k":
        return hparams.n_head_kv
    return None


# ---- hooks: what one architecture adds to config.json -------------------------------------------------------------

def _layer_sliding(config: dict[str, Any], hp: Hparams, problems: list[str]) -> list[bool]:
    """Per layer, whether it uses sliding-window attention (``layer_types``, given or derived by transformers)."""
    types = config.get("layer_types")
    if types is None:
        return [False] * hp.n_layer
    allowed = ("sliding_attention", "full_attention")
    if not isinstance(types, list) or len(types) != hp.n_layer or any(t not in allowed for t in types):
        problems.append(f"layer_types: expected {hp.n_layer} of {' / '.join(allowed)}, found {types!r}")
        return [False] * hp.n_layer
    return [t == "sliding_attention" for t in types]


def _window(config: dict[str, Any], problems: list[str]) -> int | None:
    window = config.get("sliding_window")
    if window is not None and (not isinstance(window, int) or isinstance(window, bool)
                               or not 1 <= window <= MAX_SIZE):
        problems.append(f"sliding_window: expected a positive integer of at most {MAX_SIZE} or null, "
                        f"found {short_repr(window)}")
        return None
    return window


def _gemma_attention_scale(config: dict[str, Any], hp: Hparams, unsupported: list[str], layers_27b: int) -> None:
    # llama.cpp fixes the query scale: 1/sqrt(head_dim), or 1/sqrt(n_embd/n_head) for the 27B layer count.
    scalar = config.get("query_pre_attn_scalar", hp.head_dim)
    expected = hp.n_embd // hp.n_head if hp.n_layer == layers_27b else hp.head_dim
    try:
        same = isinstance(scalar, (int, float)) and math.isclose(float(scalar), float(expected))
    except OverflowError:  # an int beyond float's range
        same = False
    if not same:
        unsupported.append(f"query_pre_attn_scalar {short_repr(scalar)}: llama.cpp scales queries by "
                           f"1/sqrt({expected}) for this model")


def _softcap(config: dict[str, Any], key: str, problems: list[str]) -> float | None:
    return None if config.get(key) is None else number(config, key, 1.0, problems, at_most=MAX_SCALE)


def _read_gemma2(config: dict[str, Any], hp: Hparams, problems: list[str], unsupported: list[str]) -> None:
    _gemma_attention_scale(config, hp, unsupported, layers_27b=46)
    hp.extra["attn_softcap"] = _softcap(config, "attn_logit_softcapping", problems)
    hp.extra["final_softcap"] = _softcap(config, "final_logit_softcapping", problems)
    # llama.cpp's gemma2 graph always has sliding layers (it aborts without any): no window is a window
    # as long as the context, which attends to the same tokens.
    hp.extra["window"] = _window(config, problems) or hp.n_ctx
    hp.extra["sliding"] = _layer_sliding(config, hp, problems)
    if not any(hp.extra["sliding"]):  # full attention everywhere: every layer slides over the whole context
        hp.extra["window"], hp.extra["sliding"] = hp.n_ctx, [True] * hp.n_layer


def _read_gemma3(config: dict[str, Any], hp: Hparams, problems: list[str], unsupported: list[str]) -> None:
    _gemma_attention_scale(config, hp, unsupported, layers_27b=62)
    if config.get("attn_logit_softcapping") is not None:
        unsupported.append("attn_logit_softcapping: llama.cpp's gemma3 graph has no attention soft-capping")
    hp.extra["final_softcap"] = _softcap(config, "final_logit_softcapping", problems)
    hp.extra["window"] = _window(config, problems)
    hp.extra["sliding"] = _layer_sliding(config, hp, problems)
    if not any(hp.extra["sliding"]):  # llama.cpp aborts on a window without sliding layers: run all as full
        hp.extra["window"] = None
    # the class's defaults always give the sliding layers their own entry (transformers 4: rope_local_base_freq)
    local = hp.rope_by_layer_type.get("sliding_attention", {"rope_theta": hp.rope_theta})
    kind = local.get("rope_type") or local.get("type") or "default"
    if kind != "default":
        unsupported.append(f"rope_parameters.sliding_attention: rope_type {kind!r} on sliding layers is not "
                           f"supported (llama.cpp scales only full-attention layers)")
    hp.extra["swa_theta"] = number(local, "rope_theta", hp.rope_theta, problems, at_most=MAX_ROPE_THETA)


def _write_gemma(writer: gguf.GGUFWriter, hp: Hparams) -> None:
    if hp.extra.get("attn_softcap") is not None:
        writer.add_attn_logit_softcapping(hp.extra["attn_softcap"])
    if hp.extra.get("final_softcap") is not None:
        writer.add_final_logit_softcapping(hp.extra["final_softcap"])
    if hp.extra["window"] is not None:  # else (Gemma 3 only) llama.cpp runs every layer with full attention
        writer.add_sliding_window(hp.extra["window"])
        writer.add_sliding_window_pattern(hp.extra["sliding"])
        if "swa_theta" in hp.extra:
            writer.add_rope_freq_base_swa(hp.extra["swa_theta"])


def _read_phi3(config: dict[str, Any], hp: Hparams, problems: list[str], unsupported: list[str]) -> None:
    factor = hp.rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if not isinstance(factor, (int, float)) or not 0 < factor <= 1:
        problems.append(f"partial_rotary_factor: expected a number in (0, 1], found {short_repr(factor)}")
        factor = 1.0
    hp.n_rot = int(hp.head_dim * factor)
    if hp.n_rot < 2 or hp.n_rot % 2:
        problems.append(f"partial_rotary_factor {factor:g}: {hp.n_rot} rotary dimensions per head; rotary "
                        f"embeddings need a positive even number")
    orig = config.get("original_max_position_embeddings")  # the top-level value wins in transformers, as here
    orig = hp.rope.get("original_max_position_embeddings", hp.n_ctx) if orig is None else orig
    if orig is not None and (not isinstance(orig, int) or isinstance(orig, bool) or not 1 <= orig <= MAX_SIZE):
        problems.append(f"original_max_position_embeddings: expected a positive integer of at most {MAX_SIZE}, "
                        f"found {short_repr(orig)}")
        orig = None
    hp.extra["orig_ctx"] = orig or hp.n_ctx
    if hp.rope_type in ("su", "yarn"):  # older names transformers reads as longrope for Phi-3
        hp.rope["rope_type"] = "longrope"
    if hp.rope_type != "longrope":
        return
    long, short = hp.rope.get("long_factor"), hp.rope.get("short_factor")
    for key, values in (("long_factor", long), ("short_factor", short)):
        if not isinstance(values, list) or len(values) != hp.n_rot // 2 or not all(
                _factor_ok(v) for v in values):
            problems.append(f"rope_parameters.{key}: expected {hp.n_rot // 2} positive numbers of at most "
                            f"{MAX_ROPE_FACTOR:g}, found {short_repr(values)}")
            return
    scale = hp.n_ctx / hp.extra["orig_ctx"]
    attn = hp.rope.get("attention_factor")
    if attn is None:  # transformers' default for LongRoPE
        attn = (math.sqrt(1 + math.log(scale) / math.log(hp.extra["orig_ctx"]))
                if scale > 1 and hp.extra["orig_ctx"] > 1 else 1.0)
    else:
        attn = number(hp.rope, "attention_factor", 1.0, problems, at_most=MAX_ROPE_FACTOR)
    hp.extra["longrope"] = (torch.tensor(long, dtype=torch.float32), torch.tensor(short, dtype=torch.float32),
                            float(attn))


def _factor_ok(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and 0 < value <= MAX_ROPE_FACTOR)


def _phi3_shapes(hp: Hparams) -> dict[str, tuple[int, ...] | None]:
    return {"ffn_up": (2 * hp.n_ff, hp.n_embd)}  # gate_up_proj: gate and up stacked, kept fused


def _write_phi3(writer: gguf.GGUFWriter, hp: Hparams) -> None:
    writer.add_rope_scaling_orig_ctx_len(hp.extra["orig_ctx"])
    if "longrope" in hp.extra:
        writer.add_rope_scaling_attn_factors(hp.extra["longrope"][2])


def _phi3_factors(hp: Hparams) -> list[tuple[str, torch.Tensor, str]]:
    if "longrope" not in hp.extra:
        return []
    long, short, _ = hp.extra["longrope"]
    return [(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_LONG] + ".weight", long, "rope_parameters.long_factor"),
            (gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT] + ".weight", short,
             "rope_parameters.short_factor")]


def _read_granite(config: dict[str, Any], hp: Hparams, problems: list[str], unsupported: list[str]) -> None:
    if hp.explicit_head_dim and hp.head_dim * hp.n_head != hp.n_embd:
        unsupported.append(f"head_dim {hp.head_dim}: llama.cpp's granite graph needs hidden_size / "
                           f"num_attention_heads ({hp.n_embd // hp.n_head})")
    for key in ("attention_multiplier", "embedding_multiplier", "residual_multiplier", "logits_scaling"):
        hp.extra[key] = number(config, key, 1.0, problems, at_most=MAX_SCALE)


def _write_granite(writer: gguf.GGUFWriter, hp: Hparams) -> None:
    writer.add_attention_scale(hp.extra["attention_multiplier"])
    writer.add_embedding_scale(hp.extra["embedding_multiplier"])
    writer.add_residual_scale(hp.extra["residual_multiplier"])
    writer.add_logit_scale(hp.extra["logits_scaling"])  # llama.cpp divides the logits by it, as transformers does


def _read_experts(config: dict[str, Any], hp: Hparams, problems: list[str], unsupported: list[str]) -> None:
    for key in ("num_local_experts", "num_experts_per_tok"):
        value = config.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_SIZE:
            problems.append(f"{key}: expected a positive integer of at most {MAX_SIZE}, found {short_repr(value)}")
            value = None
        hp.extra[key] = value
    used, count = hp.extra["num_experts_per_tok"], hp.extra["num_local_experts"]
    if used is not None and count is not None and used > count:
        problems.append(f"num_experts_per_tok {used} exceeds num_local_experts {count}")


def _expert_shapes(hp: Hparams) -> dict[str, tuple[int, ...] | None]:
    n = hp.extra.get("num_local_experts")
    if n is None:
        return {}
    return {"ffn_gate_inp": (n, hp.n_embd),  # the router
            "ffn_gate_exps": (n, hp.n_ff, hp.n_embd), "ffn_up_exps": (n, hp.n_ff, hp.n_embd),
            "ffn_down_exps": (n, hp.n_embd, hp.n_ff)}


def _olmo2_shapes(hp: Hparams) -> dict[str, tuple[int, ...] | None]:
    # OLMo 2 normalises the whole q and k projections, not each head.
    return {"attn_q_norm": (hp.n_head * hp.head_dim,), "attn_k_norm": (hp.n_head_kv * hp.head_dim,)}


def _write_experts(writer: gguf.GGUFWriter, hp: Hparams) -> None:
    writer.add_expert_count(hp.extra["num_local_experts"])
    writer.add_expert_used_count(hp.extra["num_experts_per_tok"])


_QK_NORMS = "q_norm / k_norm"
FAMILIES: dict[str, Family] = {
    "LlamaForCausalLM": Family(M.LLAMA, "LlamaConfig", permute_qk=True),
    # llama.cpp runs Mistral as llama
    "MistralForCausalLM": Family(M.LLAMA, "MistralConfig", permute_qk=True, warn_sliding_window=True),
    "Qwen2ForCausalLM": Family(M.QWEN2, "Qwen2Config"),  # Qwen2 uses the HF (NeoX) rotary layout
    "Qwen3ForCausalLM": Family(M.QWEN3, "Qwen3Config", activations=SILU,
                               warn_sliding_window=True,  # when use_sliding_window
                               notes=(_QK_NORMS, "explicit head_dim", "tied embeddings")),
    "Gemma2ForCausalLM": Family(M.GEMMA2, "Gemma2Config", norm_shift=1.0, read=_read_gemma2, write=_write_gemma,
                                activations=GELU_TANH, tokenizers=(SPM, BPE),
                                notes=("norms 1 + w", "attention and final soft-capping", "sliding-window layers",
                                       "query_pre_attn_scalar as llama.cpp fixes it", "tied embeddings")),
    "Gemma3ForCausalLM": Family(M.GEMMA3, "Gemma3TextConfig", norm_shift=1.0, read=_read_gemma3, write=_write_gemma,
                                rope_types=("default", "linear"), activations=GELU_TANH, tokenizers=(SPM, BPE),
                                notes=("norms 1 + w", _QK_NORMS, "rope base per layer type",
                                       "sliding-window layers")),
    "Phi3ForCausalLM": Family(M.PHI3, "Phi3Config", read=_read_phi3, write=_write_phi3, generated=_phi3_factors,
                              shapes=_phi3_shapes,
                              rope_types=("default", "longrope", "su", "yarn"), activations=SILU, tokenizers=(SPM, BPE),
                              warn_sliding_window=True,
                              notes=("fused qkv_proj and gate_up_proj kept fused", "LongRoPE factors",
                                     "partial rotary")),
    "MixtralForCausalLM": Family(M.LLAMA, "MixtralConfig", permute_qk=True, read=_read_experts, write=_write_experts,
                                 shapes=_expert_shapes,
                                 activations=SILU, warn_sliding_window=True,
                                 notes=("experts stacked into 3-D tensors", "router")),
    "Olmo2ForCausalLM": Family(M.OLMO2, "Olmo2Config", activations=SILU, shapes=_olmo2_shapes,
                               notes=("post-attention / post-feed-forward norms", "q/k norms over the projection")),
    "GraniteForCausalLM": Family(M.GRANITE, "GraniteConfig", permute_qk=True, read=_read_granite, write=_write_granite,
                                 activations=SILU, notes=("embedding, residual, attention and logit multipliers",)),
}


def family_for(architecture: str | None, *, source: str) -> Family:
    """The registry entry of ``architecture`` (``config.json``'s ``architectures[0]``).

    Example: ``family_for("MistralForCausalLM", source="config.json").name`` -> ``"llama"``

    Raises:
        UnsupportedError: naming the architecture and the supported ones.
    """
    family = FAMILIES.get(architecture or "")
    if family is None:
        raise UnsupportedError(f"{source}: architecture {architecture!r} is not supported for GGUF export "
                               f"(supported: {', '.join(FAMILIES)})")
    return family
