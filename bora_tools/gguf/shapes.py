"""What ``config.json`` implies for the shape of every tensor llama.cpp reads, checked before the first byte.

llama.cpp refuses a file whose tensors disagree with its hyperparameters (``check_tensor_dims: tensor
'blk.0.ffn_gate.weight' has wrong shape``); these checks refuse it here instead, naming the tensor, for
the model, ``--merge`` and LoRA exports alike (a LoRA applies to a base GGUF that must itself load).
"""

from __future__ import annotations

import re

import gguf

from bora_tools.errors import ConfigError, raise_if_problems
from bora_tools.gguf.hparams import Hparams
from bora_tools.gguf.writer import ArchSpec
from bora_tools.io.model_dir import ModelDir, TensorEntry

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


def check_layer_count(model: ModelDir, hp: Hparams) -> None:
    """num_hidden_layers cannot exceed the layers the weights hold (and llama.cpp's name map is built per layer).

    Raises:
        ConfigError: naming both counts.
    """
    stored = {int(m.group(1)) for name in model.entries if (m := _LAYER.search(name))}
    if hp.n_layer > len(stored):
        raise ConfigError(f"{model.path / 'config.json'}: num_hidden_layers is {hp.n_layer} but the weights hold "
                          f"{len(stored)} layer(s)")


def embedding_rows(model: ModelDir, spec: ArchSpec, hp: Hparams) -> int | None:
    """Rows of the stored token embedding (what bounds the vocabulary before it is padded), or None when absent."""
    check_layer_count(model, hp)
    tmap = gguf.get_tensor_name_map(spec.arch, hp.n_layer)
    for entry in model.entries.values():
        if entry.shape and tmap.get_name(entry.name, try_suffixes=(".weight",)) == "token_embd.weight":
            return entry.shape[0]
    return None


def expected_shape(gname: str, hp: Hparams) -> tuple[int, ...] | None:
    """The shape (torch order) llama.cpp expects for GGUF tensor ``gname`` from config.json, or None if unknown.

    Example: ``expected_shape("blk.0.ffn_down.weight", hp)`` -> ``(hp.n_embd, hp.n_ff)``
    """
    parts = gname.split(".")
    kind, what = (parts[2], parts[3]) if gname.startswith("blk.") and len(parts) == 4 else (parts[0], parts[-1])
    q, kv = hp.n_head * hp.head_dim, hp.n_head_kv * hp.head_dim
    weights = {
        "token_embd": (hp.vocab_size, hp.n_embd), "output": (hp.vocab_size, hp.n_embd),
        "output_norm": (hp.n_embd,), "attn_norm": (hp.n_embd,), "ffn_norm": (hp.n_embd,),
        "attn_q": (q, hp.n_embd), "attn_k": (kv, hp.n_embd), "attn_v": (kv, hp.n_embd),
        "attn_output": (hp.n_embd, q),
        "ffn_gate": (hp.n_ff, hp.n_embd), "ffn_up": (hp.n_ff, hp.n_embd), "ffn_down": (hp.n_embd, hp.n_ff),
    }
    if what == "weight":
        return weights.get(kind)
    if what == "bias" and kind in ("attn_q", "attn_k", "attn_v"):
        return weights[kind][:1]
    return None


def shape_problems(entry: TensorEntry, gname: str, hp: Hparams) -> list[str]:
    """Why ``entry`` (written as ``gname``) does not have the shape config.json implies (empty when it does)."""
    want = expected_shape(gname, hp)
    if want is None or tuple(entry.shape) == want:
        return []
    return [f"{entry.name}: shape {tuple(entry.shape)}, but config.json implies {want} for llama.cpp's {gname} "
            f"(vocab_size {hp.vocab_size}, hidden_size {hp.n_embd}, intermediate_size {hp.n_ff}, "
            f"heads {hp.n_head}/{hp.n_head_kv} x head_dim {hp.head_dim})"]


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


def check_base_tensors(model: ModelDir, spec: ArchSpec, hp: Hparams) -> None:
    """Every tensor llama.cpp would read from ``model`` has the shape config.json implies (LoRA exports' base).

    Raises:
        ConfigError: every disagreement at once, each naming the tensor.
    """
    check_layer_count(model, hp)
    tmap = gguf.get_tensor_name_map(spec.arch, hp.n_layer)
    problems, names = [], set()
    for entry in model.entries.values():
        gname = tmap.get_name(entry.name, try_suffixes=(".weight", ".bias"))
        if gname is not None:
            names.add(gname)
            problems.extend(shape_problems(entry, gname, hp))
    raise_if_problems(str(model.path), problems + layout_problems(names, hp), cls=ConfigError)
