"""The tensors of a full GGUF (model or ``--merge``), planned before the first byte is written.

Three steps, each once:

1. ``name_tensors``: every checkpoint tensor -> the llama.cpp tensor it becomes (gguf-py's name map for
   the family), the experts of a mixture-of-experts layer grouped into one stacked tensor; what has no
   llama.cpp name, or is not a float tensor, is collected.
2. ``plan_tensors`` refuses those, then checks every shape against ``config.json`` at once
   (``bora_tools.gguf.shapes.check_shapes``);
3. and plans each tensor: its GGUF type, and how its rows are produced (``stream_rows``: read, merged
   with its BoRA module when the adapter changes it, then permuted or shifted as the family says).

``bora_tools.gguf.writer.write_streaming`` then writes the plan a block of rows at a time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import gguf
import torch

from bora_tools.core.adapter import BoraModule
from bora_tools.core.row_merge import Replacement, stream_rows
from bora_tools.errors import UnsupportedError, raise_if_problems
from bora_tools.gguf.architectures import Family, qk_heads, qk_row_order
from bora_tools.gguf.hparams import Hparams
from bora_tools.gguf.shapes import (
    check_layer_count,
    check_shapes,
    expert_index,
    stacked_label,
    stacked_name,
    stacked_shape,
)
from bora_tools.gguf.writer import PlannedTensor, Q, tensor_type, whole
from bora_tools.io.model_dir import ModelDir, TensorEntry
from bora_tools.io.safetensors import FLOAT_ST_DTYPES

#: safetensors dtype -> the GGUF type that holds its values exactly (float64 is rounded to float32,
#: as llama.cpp computes in float32).
_EXACT = {"F32": Q.F32, "F16": Q.F16, "BF16": Q.BF16}
#: Tensors the HF checkpoints may carry that llama.cpp recomputes itself.
_SKIPPED_SUFFIXES = (".rotary_emb.inv_freq",)


@dataclass
class NamedTensors:
    """A model's checkpoint tensors with the llama.cpp tensor each becomes (``name_tensors``)."""

    path: Path  # the model directory, for messages
    tensors: list[tuple[str, list[TensorEntry]]]  # (GGUF name, its checkpoint tensor or experts in order)
    unsupported: list[str]  # tensors llama.cpp has no name for, or that are not float
    embedding_rows: int | None  # rows of the stored token embedding: what bounds the vocabulary


def name_tensors(model: ModelDir, family: Family, hp: Hparams) -> NamedTensors:
    """Which checkpoint tensor(s) make each GGUF tensor, in the shards' order.

    The experts of a mixture-of-experts layer are stacked into one 3-D tensor at the place of the
    first one, sorted by expert index.

    Example: ``name_tensors(model, family, hp).tensors[0]`` -> ``("token_embd.weight", [TensorEntry(...)])``

    Raises:
        ConfigError: ``num_hidden_layers`` beyond the layers the weights hold.
    """
    check_layer_count(model, hp)  # bounds the per-layer name map built next
    tmap = gguf.get_tensor_name_map(family.arch, hp.n_layer)
    named = NamedTensors(model.path, [], [], None)
    stacks: dict[str, list[TensorEntry]] = {}
    for shard in model.shard_names:
        for entry in model.shard_entries(shard):
            if entry.name.endswith(_SKIPPED_SUFFIXES):
                continue  # recomputed by llama.cpp
            stacked = stacked_name(entry.name)
            hf_name = stacked or entry.name
            if stacked and hf_name in stacks:
                stacks[hf_name].append(entry)
                continue
            gname = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if gname == "token_embd.weight" and entry.shape and named.embedding_rows is None:
                named.embedding_rows = entry.shape[0]
            if gname is None:
                named.unsupported.append(f"{entry.name}: no llama.cpp {family.name} tensor corresponds to it")
            elif entry.dtype not in FLOAT_ST_DTYPES:
                named.unsupported.append(f"{entry.name}: dtype {entry.dtype} is not a float type")
            else:
                named.tensors.append((gname, [entry]))
                if stacked:
                    stacks[hf_name] = named.tensors[-1][1]  # the other experts join it
    for entries in stacks.values():
        entries.sort(key=lambda e: expert_index(e.name))
    return named


def plan_tensors(named: NamedTensors, family: Family, hp: Hparams, outtype: str, *,
                 replacements: dict[str, Replacement], device: torch.device | str = "cpu") -> list[PlannedTensor]:
    """Every tensor of the GGUF, generated ones (rotary factors) first, then ``named``'s in order.

    ``replacements`` (``bora_tools.core.row_merge.merge_plan``) maps base tensor names to a
    ``BoraModule`` (written as ``W + dW``) or a whole tensor (``modules_to_save``).

    Raises:
        UnsupportedError: tensors llama.cpp has no name for, or non-float tensors (every one at once).
        ConfigError: shapes that disagree with ``config.json`` (every one at once).
    """
    raise_if_problems(str(named.path), named.unsupported, cls=UnsupportedError)
    check_shapes(named.path, named.tensors, hp, family)
    generated = [PlannedTensor(name, tuple(t.shape), Q.F32, whole(t), source=src)
                 for name, t, src in family.generated_tensors(hp)]
    return generated + [_planned(entries, gname, hp, outtype, family, replacements, device)
                        for gname, entries in named.tensors]


def plan_model_tensors(model: ModelDir, family: Family, hp: Hparams, outtype: str, *,
                       replacements: dict[str, Replacement], device: torch.device | str = "cpu"
                       ) -> list[PlannedTensor]:
    """``plan_tensors(name_tensors(model, family, hp), ...)``: every tensor of the GGUF, every problem at once.

    Example: ``plan_model_tensors(model, family_for("LlamaForCausalLM", source="x"), hp, "q8_0", replacements={})``
    -> ``[PlannedTensor("token_embd.weight", (320, 64), Q8_0, ...), ...]``
    """
    return plan_tensors(name_tensors(model, family, hp), family, hp, outtype, replacements=replacements,
                        device=device)


def _planned(entries: list[TensorEntry], gname: str, hp: Hparams, outtype: str, family: Family,
             replacements: dict[str, Replacement], device: torch.device | str) -> PlannedTensor:
    """One GGUF tensor from one checkpoint tensor, or from the experts ``entries`` stacked in order."""
    first = entries[0]
    shape = stacked_shape(entries)
    # For llama.cpp's quantizer, the intermediate keeps the values exactly: the stored dtype,
    # or float32 for weights computed here (W + dW), so that only the quantizer rounds.
    computed = any(replacements.get(e.name) is not None for e in entries)
    exact = Q.F32 if computed else _EXACT.get(first.dtype, Q.F32)
    qtype, fallback = tensor_type(gname, shape, outtype, exact=exact)
    heads = qk_heads(gname, hp) if family.permute_qk else None
    head_rows = first.shape[0] // heads if heads else 1
    shift = family.shifted(gname)

    def transform(block: torch.Tensor) -> torch.Tensor:
        # Blocks hold whole heads, and the permutation never crosses a head.
        if heads is not None:
            block = block[qk_row_order(block.shape[0], block.shape[0] // head_rows).to(block.device)]
        if shift:  # in float32, as transformers computes 1 + w
            block = block.float() + shift
        return block

    def chunks() -> Iterator[torch.Tensor]:
        for entry in entries:  # experts one after the other: the 3-D tensor is their rows in order
            yield from _entry_blocks(entry, replacements.get(entry.name), transform, device, align=head_rows)

    merged = [e for e in entries if isinstance(replacements.get(e.name), BoraModule)]
    saved = [e for e in entries if isinstance(replacements.get(e.name), torch.Tensor)]
    how = "(merged)" if merged else "(modules_to_save)" if saved else ""
    return PlannedTensor(gname, shape, qtype, chunks, source=f"{stacked_label(entries)} {how}".strip(),
                         fallback=fallback)


def _entry_blocks(entry: TensorEntry, replacement: Replacement | None,
                  transform: Callable[[torch.Tensor], torch.Tensor], device: torch.device | str, *,
                  align: int) -> Iterator[torch.Tensor]:
    """``entry``'s rows in blocks (merged with ``replacement`` when it is a BoRA module), transformed."""
    if isinstance(replacement, torch.Tensor):  # modules_to_save: the whole tensor, from the adapter
        yield transform(replacement)
        return
    # W + dW in float32, a block of rows at a time; rounded once when converted. Each block is
    # converted and written before the next is read, so one buffer of each kind serves them all.
    with contextlib.closing(stream_rows(entry, replacement, device=device, align=align)) as blocks:
        for block in blocks:
            yield transform(block)
