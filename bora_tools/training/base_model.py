"""The base of a training run: its config, shapes, tokenizer and weights, each checked before use.

A base that is not what it claims is refused in one line naming the file at fault:
a ``config.json`` with a non-positive size (``num_attention_heads: -1``), a config no
causal-LM class can build, weights missing (no safetensors, a truncated shard), a
tokenizer that cannot be read (a junk ``tokenizer.json``), and, at load, any weight
the checkpoint lacks that is not tied to another (``lm_head.weight`` gone, a layer's
weight gone, a Llama relabelled ``model_type: bert``): transformers would initialise
those at random and the run would train on noise.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from bora_tools.core.config import matches_target
from bora_tools.core.factors import block_problems
from bora_tools.errors import ModelDirError, UnsupportedError, ValidationError
from bora_tools.io.model_dir import INDEX_FILE, SINGLE_FILE, WEIGHT_SUFFIXES, ModelDir
from bora_tools.training.guards import check_rank
from bora_tools.training.layers import is_conv1d
from bora_tools.training.model import linear_modules

#: config sizes that must be positive integers when present (a negative head count divides by zero, or worse)
SIZES = ("hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers", "intermediate_size",
         "vocab_size", "head_dim", "n_embd", "n_head", "n_layer", "n_positions", "max_position_embeddings")
#: words of an exception message, at most (a message quoting a whole file stays one short line)
WHY = 200


def _why(e: BaseException) -> str:
    return " ".join(str(e).split())[:WHY] or type(e).__name__


def read_config(base: Path):
    """``AutoConfig`` of ``base``, with its sizes checked."""
    from transformers import AutoConfig

    if not (base / "config.json").is_file():
        raise ModelDirError(f"`base` {base}: no config.json (not a Hugging Face model directory)")
    try:
        config = AutoConfig.from_pretrained(base)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ModelDirError(f"`base` {base}/config.json: cannot be read ({_why(e)})") from None
    for holder in (config, getattr(config, "text_config", None)):
        for name in SIZES:
            value = getattr(holder, name, None) if holder is not None else None
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ModelDirError(f"`base` {base}/config.json: {name} {value!r} (expected a positive integer)")
    return config


def meta_model(config_hf, base: Path) -> nn.Module:
    """The model's modules and shapes, without weights (no memory, no reading)."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config_hf)
    except ValueError as e:
        raise UnsupportedError(f"`base` {base}: not a causal language model transformers can build "
                               f"({_why(e)})") from None
    except (ArithmeticError, RuntimeError, TypeError, AttributeError, KeyError, IndexError) as e:
        raise ModelDirError(f"`base` {base}/config.json: transformers cannot build this model "
                            f"({type(e).__name__}: {_why(e)})") from None


def default_target_modules(model: nn.Module) -> list[str]:
    """Every linear projection of the model's family, by last name component, without the output head.

    Example: a Llama gives ``["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]``.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names: list[str] = []
    for name, module in linear_modules(model).items():
        short = name.rsplit(".", 1)[-1]
        if module is not head and short not in names:
            names.append(short)
    return names


def check_targets(config_hf, target_modules, blocks: int, base: Path, *, r: int = 1,
                  ) -> tuple[list[str] | str, int, nn.Module]:
    """The target modules (default: every linear projection but the head), each checked to match and to fit ``b``.

    ``r`` above a matched module's dimensions is refused (``guards.check_rank``).
    Returns the targets, the number of modules they match and the meta model they were matched on.
    """
    model = meta_model(config_hf, base)
    linear = linear_modules(model)
    targets = default_target_modules(model) if target_modules is None else target_modules
    if isinstance(targets, str):
        unmatched = [] if any(matches_target(targets, n) for n in linear) else [targets]
    else:
        unmatched = [t for t in targets if not any(matches_target([t], n) for n in linear)]
    if unmatched:
        known = sorted({n.rsplit(".", 1)[-1] for n in linear})
        raise ValidationError(f"`target_modules` {', '.join(map(repr, unmatched))} match(es) no linear module of "
                              f"{type(model).__name__} (its linear modules: {', '.join(known)})")
    matched = [n for n in linear if matches_target(targets, n)]
    check_rank(r, {n: tuple(linear[n].weight.shape[::-1 if is_conv1d(linear[n]) else 1]) for n in matched})
    problems, seen = [], set()
    for name in matched:
        module = linear[name]
        n_in, m_out = module.weight.shape if is_conv1d(module) else module.weight.shape[::-1]
        short = name.rsplit(".", 1)[-1]
        if short not in seen:
            found = block_problems(m_out, n_in, blocks, name=name)
            if found:
                seen.add(short)
                problems += found
    if problems:
        raise ValidationError(f"`blocks` {blocks} does not fit: " + "; ".join(problems[:3])
                              + (f"; and {len(problems) - 3} more" if len(problems) > 3 else ""),
                              hint="b must divide every adapted module's in and out features")
    return targets, len(matched), model


def check_weights(base: Path) -> None:
    """The base holds weights, and its safetensors headers are whole (a truncated shard is refused here)."""
    if (base / SINGLE_FILE).is_file() or (base / INDEX_FILE).is_file():
        try:
            ModelDir.open(base).entries  # noqa: B018 - parses and checks every header
        except ModelDirError as e:
            raise ModelDirError(f"`base` {e.one_line()}") from None
        return
    if not any(p.name.lower().endswith(WEIGHT_SUFFIXES) for p in base.iterdir() if p.is_file()):
        raise ModelDirError(f"`base` {base}: no weights (no {SINGLE_FILE} or {INDEX_FILE})")


def load_model(base: Path, dtype: torch.dtype | None, **load: object) -> nn.Module:
    """The base loaded with transformers, every weight of the model found in the checkpoint (or tied to one).

    ``load``: more keywords of ``from_pretrained`` (a quantization config and its device map).

    Raises:
        ModelDirError: a weight missing or left over (named), or weights transformers cannot read.
    """
    from transformers import AutoModelForCausalLM

    try:
        model, info = AutoModelForCausalLM.from_pretrained(base, dtype=dtype if dtype is not None else "auto",
                                                           output_loading_info=True, **load)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        raise ModelDirError(f"`base` {base}: its weights cannot be loaded ({type(e).__name__}: {_why(e)})") from None
    tied = _tied_names(model)
    missing = sorted(k for k in info.get("missing_keys", ()) if k not in tied)
    unexpected = sorted(info.get("unexpected_keys", ()))
    for what, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
            raise ModelDirError(
                f"`base` {base}: {len(keys)} {what} weight(s) for {type(model).__name__}: {', '.join(keys[:3])}{more}",
                hint="the checkpoint does not match its config.json (a missing weight would train from random values)")
    return model


def _tied_names(model: nn.Module) -> set[str]:
    """Names of parameters shared with another name (tied embeddings): absent from a checkpoint by design."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return {n for group in names.values() if len(group) > 1 for n in group}


def load_tokenizer(base: Path):
    """The base's tokenizer; a file the tokenizers library cannot parse is one line naming the base."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(base)
    except Exception as e:  # noqa: BLE001 - the Rust tokenizers library raises a bare Exception on a junk file
        raise ModelDirError(f"`base` {base}: no usable tokenizer ({_why(e)})") from None
