"""What ``config.json`` implies for the shape of every tensor llama.cpp reads, checked before the first byte.

llama.cpp refuses a file whose tensors disagree with its hyperparameters (``check_tensor_dims: tensor
'blk.0.ffn_gate.weight' has wrong shape``); these checks refuse it here instead, naming the tensor, for
the model, ``--merge`` and LoRA exports alike (a LoRA applies to a base GGUF that must itself load).

The shapes every llama.cpp decoder shares are in ``expected_shape``; an architecture whose tensors differ
(Phi-3's fused ``gate_up_proj``, OLMo 2's q/k norms over the whole projection, Mixtral's 3-D expert
tensors) says so in its registry entry (``Family.shapes`` in ``bora_tools.gguf.architectures``). A
tensor whose shape nothing states is not refused here (llama.cpp still checks it when it loads).
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import gguf

from bora_tools.errors import ConfigError, raise_if_problems
from bora_tools.gguf.architectures import Family
from bora_tools.gguf.hparams import Hparams
from bora_tools.io.model_dir import ModelDir, TensorEntry

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")
#: One expert's matrix of a mixture-of-experts layer: stacked into llama.cpp's 3-D tensor of all experts.
EXPERT = re.compile(r"^(?P<head>.*\.experts)\.(?P<index>\d+)\.(?P<tail>.+)$")


def stacked_name(name: str) -> str | None:
    """The name of the stacked tensor that checkpoint tensor ``name`` is one expert of, or None.

    Example: ``stacked_name("model.layers.0.block_sparse_moe.experts.3.w1.weight")``
    -> ``"model.layers.0.block_sparse_moe.experts.w1.weight"``
    """
    m = EXPERT.match(name)
    return f"{m['head']}.{m['tail']}" if m else None


def expert_index(name: str) -> int:
    """The expert index of a checkpoint tensor ``stacked_name`` recognises."""
    m = EXPERT.match(name)
    if m is None:
        raise ValueError(f"{name} is not an expert's tensor")
    return int(m["index"])


def check_layer_count(model: ModelDir, hp: Hparams) -> None:
    """num_hidden_layers cannot exceed the layers the weights hold (and llama.cpp's name map is built per layer).

    Raises:
        ConfigError: naming both counts.
    """
    stored = {int(m.group(1)) for name in model.entries if (m := _LAYER.search(name))}
    if hp.n_layer > len(stored):
        raise ConfigError(f"{model.path / 'config.json'}: num_hidden_layers is {hp.n_layer} but the weights hold "
                          f"{len(stored)} layer(s)")


def _kind(gname: str) -> tuple[str, str]:
    parts = gname.split(".")
    return (parts[2], parts[3]) if gname.startswith("blk.") and len(parts) == 4 else (parts[0], parts[-1])


def expected_shape(gname: str, hp: Hparams, family: Family | None = None) -> tuple[int, ...] | None:
    """The shape (torch order) llama.cpp expects for GGUF tensor ``gname`` from config.json, or None if unknown.

    ``family`` adds or overrides the shapes of its own tensors (``Family.shapes``); without it, the
    shapes every llama.cpp decoder shares.

    Example: ``expected_shape("blk.0.ffn_down.weight", hp)`` -> ``(hp.n_embd, hp.n_ff)``
    """
    kind, what = _kind(gname)
    q, kv = hp.n_head * hp.head_dim, hp.n_head_kv * hp.head_dim
    weights: dict[str, tuple[int, ...] | None] = {
        "token_embd": (hp.vocab_size, hp.n_embd), "output": (hp.vocab_size, hp.n_embd),
        "output_norm": (hp.n_embd,), "attn_norm": (hp.n_embd,), "ffn_norm": (hp.n_embd,),
        "post_attention_norm": (hp.n_embd,), "post_ffw_norm": (hp.n_embd,),  # Gemma 2/3, OLMo 2
        "attn_q_norm": (hp.head_dim,), "attn_k_norm": (hp.head_dim,),  # per head (Qwen3, Gemma 3)
        "attn_q": (q, hp.n_embd), "attn_k": (kv, hp.n_embd), "attn_v": (kv, hp.n_embd),
        "attn_qkv": (q + 2 * kv, hp.n_embd),  # fused (Phi-3)
        "attn_output": (hp.n_embd, q),
        "ffn_gate": (hp.n_ff, hp.n_embd), "ffn_up": (hp.n_ff, hp.n_embd), "ffn_down": (hp.n_embd, hp.n_ff),
    }
    if family is not None and family.shapes is not None:
        weights.update(family.shapes(hp))
    if what == "weight":
        return weights.get(kind)
    if what == "bias" and kind in ("attn_q", "attn_k", "attn_v", "attn_qkv"):
        want = weights.get(kind)
        return want[:1] if want else None
    return None


def _implied_by(hp: Hparams) -> str:
    out = (f"vocab_size {hp.vocab_size}, hidden_size {hp.n_embd}, intermediate_size {hp.n_ff}, "
           f"heads {hp.n_head}/{hp.n_head_kv} x head_dim {hp.head_dim}")
    if hp.extra.get("num_local_experts") is not None:
        out += f", num_local_experts {hp.extra['num_local_experts']}"
    return out


def shape_problems(name: str, shape: tuple[int, ...], gname: str, hp: Hparams,
                   family: Family | None = None) -> list[str]:
    """Why checkpoint tensor ``name`` of ``shape`` (written as ``gname``) disagrees with config.json (empty if not).

    ``shape`` is the written one: for experts stacked into one tensor, ``(experts, *one expert's shape)``.

    Example: ``shape_problems("model.norm.weight", (64,), "output_norm.weight", hp, family)`` -> ``[]``
    """
    want = expected_shape(gname, hp, family)
    if want is None or tuple(shape) == want:
        return []
    return [f"{name}: shape {tuple(shape)}, but config.json implies {want} for llama.cpp's {gname} "
            f"({_implied_by(hp)})"]


def layout_problems(names: set[str], hp: Hparams) -> list[str]:
    """A missing token embedding, or layers below ``num_hidden_layers`` with no tensor, among GGUF ``names``."""
    out = []
    if "token_embd.weight" not in names:
        out.append("no token embedding (model.embed_tokens.weight): llama.cpp needs token_embd.weight")
    empty = [i for i in range(hp.n_layer) if not any(n.startswith(f"blk.{i}.") for n in names)]
    if empty:
        out.append(f"num_hidden_layers is {hp.n_layer} but no tensor is stored for layer(s) "
                   f"{', '.join(map(str, empty[:8]))}{' ...' if len(empty) > 8 else ''}")
    return out


def expert_problems(entries: list[TensorEntry]) -> list[str]:
    """The experts of one stacked tensor (sorted by index) are 0..n-1, of one shape and dtype."""
    indices = [expert_index(e.name) for e in entries]
    out = []
    if indices != list(range(len(entries))):
        out.append(f"{entries[0].name}: experts {indices} are not numbered 0..{len(entries) - 1}")
    if len({(tuple(e.shape), e.dtype) for e in entries}) > 1:
        out.append(f"{entries[0].name}: the experts differ in shape or dtype")
    return out


def stacked_label(entries: list[TensorEntry]) -> str:
    """How a report or an error names the checkpoint tensor(s) of one GGUF tensor."""
    if len(entries) == 1 and stacked_name(entries[0].name) is None:
        return entries[0].name
    return f"{entries[0].name} .. {entries[-1].name} ({len(entries)} stacked)"


def stacked_shape(entries: list[TensorEntry]) -> tuple[int, ...]:
    """The GGUF tensor's shape: the one checkpoint tensor's, or ``(experts, *one expert's shape)``."""
    first = tuple(entries[0].shape)
    return first if len(entries) == 1 and stacked_name(entries[0].name) is None else (len(entries), *first)


def check_shapes(path: str | Path, tensors: list[tuple[str, list[TensorEntry]]], hp: Hparams,
                 family: Family) -> None:
    """Every GGUF tensor of ``tensors`` (its name, its checkpoint tensor or experts in order) has the
    shape ``config.json`` implies, the experts of a stacked tensor are 0..n-1 and alike, and no layer
    or token embedding is missing.

    Raises:
        ConfigError: every disagreement at once, each naming the tensor, in the shards' order.
    """
    problems = []
    for gname, entries in tensors:
        if stacked_name(entries[0].name) is not None:
            problems.extend(expert_problems(entries))
        problems.extend(shape_problems(stacked_label(entries), stacked_shape(entries), gname, hp, family))
    problems.extend(layout_problems({gname for gname, _ in tensors}, hp))
    raise_if_problems(str(path), problems, cls=ConfigError)


def check_base_tensors(model: ModelDir, family: Family, hp: Hparams) -> None:
    """Every tensor llama.cpp would read from ``model`` has the shape config.json implies (LoRA exports' base).

    Unlike a full export (``bora_tools.gguf.plan.name_tensors``), tensors llama.cpp has no name for
    are left alone: the LoRA GGUF does not carry them.

    Raises:
        ConfigError: every disagreement at once, each naming the tensor.
    """
    check_layer_count(model, hp)
    tmap = gguf.get_tensor_name_map(family.arch, hp.n_layer)
    groups: dict[str, list[TensorEntry]] = defaultdict(list)
    for entry in model.entries.values():
        groups[stacked_name(entry.name) or entry.name].append(entry)
    tensors = []
    for hf_name, entries in groups.items():
        gname = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gname is not None:
            tensors.append((gname, sorted(entries, key=lambda e: expert_index(e.name))
                            if stacked_name(entries[0].name) is not None else entries))
    check_shapes(model.path, tensors, hp, family)
