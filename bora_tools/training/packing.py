"""Packing, as TRL's ``packing=True`` does it (its ``bfd`` strategy, padding-free).

``pack`` puts tokenized examples into rows of at most ``max_length`` tokens, best fit
decreasing: the longest example first, each into the fullest row it still fits in. Nothing
is cut or dropped, and each example keeps its labels (``-100`` where no loss is taken).

``PackedCollator`` lays a batch out as TRL's padding-free collator does: one row holding
every example of the batch end to end, no padding, and ``position_ids`` that restart at 0
where each example starts. transformers reads restarting ``position_ids`` without an
attention mask (and without a KV cache: ``use_cache=False`` goes with the batch) as
packed sequences and attends within each example only, so a packed
example's logits are its logits alone. The label of each example's first token is ``-100``:
no example learns to predict its first token from the end of the one before, as it never
does unpacked.
"""

from __future__ import annotations

import bisect

import torch

from bora_tools.training.data import IGNORE_INDEX


def pack(examples: list[dict[str, list[int]]], max_length: int) -> list[dict[str, list[int]]]:
    """Examples packed into rows of at most ``max_length`` tokens (best fit decreasing); each row's
    ``position_ids`` restart at every example."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]), reverse=True)
    rows: list[list[int]] = []  # example indices per row
    free: list[tuple[int, int]] = []  # (room left, row), sorted: the fullest row that fits is the first >= n
    for i in order:
        n = len(examples[i]["input_ids"])
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            room, row = free.pop(at)
            rows[row].append(i)
            bisect.insort(free, (room - n, row))
        else:
            rows.append([i])
            bisect.insort(free, (max_length - n, len(rows) - 1))
    packed = []
    for row in rows:
        ids, labels, positions = [], [], []
        for i in sorted(row):  # the examples of a row in their file order
            ids += examples[i]["input_ids"]
            labels += examples[i]["labels"]
            positions += range(len(examples[i]["input_ids"]))
        packed.append({"input_ids": ids, "labels": labels, "position_ids": positions})
    return packed


class PackedCollator:
    """A batch as one row without padding: examples end to end, ``position_ids`` restarting at each one."""

    def __call__(self, batch: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        ids, labels, positions = [], [], []
        for ex in batch:
            ids += ex["input_ids"]
            labels += ex["labels"]
            positions += ex.get("position_ids") or range(len(ex["input_ids"]))
        labels = [IGNORE_INDEX if p == 0 else t for t, p in zip(labels, positions)]
        # use_cache=False: transformers reads packed position_ids only when no cache is made (in training too)
        return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
                "position_ids": torch.tensor([positions]), "use_cache": False}
