"""Several adapters as one weighted sum ``sum_k w_k * dW_k``: checked together, stacked exactly, recorded.

A weighted sum of BoRA updates of one module is itself low rank, and exact in two forms:

- ``bora_sum``: one BoRA module on the finest block grid ``b`` (every ``b_k`` divides it). ``A`` and ``B``
  are the inputs' factors concatenated along ``r``; ``sigma`` is theirs with ``w_k * s_k`` folded in,
  each coarser grid refined by repeating its ``sigma`` (block ``(I, J)`` of grid ``b`` lies in block
  ``(I // q, J // q)`` of grid ``b / q``). The scaling is then exactly 1.
- ``lora_stack``: the inputs' exact LoRA factors (``B'_k`` ``(m, b_k r_k)``, ``A'_k``) concatenated, as a
  BoRA module with ``b = 1`` and ``sigma = w_k`` (scaling folded into the factors): what the factored
  SVD of ``to-lora`` reads, so the best rank-K LoRA of the sum never needs a dense ``dW``.

``Inputs`` holds the adapters, their weights and what the sum means per module; ``recipe`` is what a
merged model records to be made again.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from bora_tools.core.adapter import PREFIX, BoraAdapter, BoraModule, _natural_key
from bora_tools.core.factors import exact_lora_factors
from bora_tools.errors import ShapeError, UnsupportedError, ValidationError

#: Largest |weight| accepted (as merge's ``scale``).
MAX_WEIGHT = 1e9


def parse_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    """One finite weight per adapter (default 1.0 each; negative allowed).

    Raises:
        ValidationError: a count that does not match, or a NaN, infinite or huge weight.
    """
    if weights is None:
        return [1.0] * count
    values = list(weights)
    if len(values) != count:
        raise ValidationError(f"`weights`: {len(values)} weight(s) for {count} adapter(s)")
    for w in values:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or abs(w) > MAX_WEIGHT:
            raise ValidationError(f"`weights`: expected finite numbers of magnitude at most {MAX_WEIGHT:g}, "
                                  f"found {w!r}")
    return [float(w) for w in values]


@dataclass
class Inputs:
    """Adapters to be summed with their weights, checked against each other."""

    adapters: list[BoraAdapter]
    weights: list[float]
    names: list[str]  # how each adapter is named in messages and the recipe

    def __post_init__(self) -> None:
        problems = []
        first = self.adapters[0].config.fan_in_fan_out
        for adapter, name in zip(self.adapters, self.names):
            if adapter.config.fan_in_fan_out != first:
                problems.append(f"fan_in_fan_out is {adapter.config.fan_in_fan_out} in {name} but {first} in "
                                f"{self.names[0]} (adapters for different layer types, so for different bases)")
        shapes: dict[str, tuple[tuple[int, int], str]] = {}
        for adapter, name in zip(self.adapters, self.names):
            for mod in adapter.modules.values():
                seen = shapes.setdefault(mod.name, (mod.shape, name))
                if seen[0] != mod.shape:
                    problems.append(f"{PREFIX + mod.name}: shape {mod.shape} in {name} but {seen[0]} in {seen[1]} "
                                    "(adapters for different base models?)")
        self.saved = self._saved(problems)
        if problems:
            raise ShapeError(problems[0])

    def _saved(self, problems: list[str]) -> dict[str, torch.Tensor]:
        saved: dict[str, tuple[torch.Tensor, str]] = {}
        for adapter, name in zip(self.adapters, self.names):
            for key, tensor in adapter.saved.items():
                if key not in saved:
                    saved[key] = (tensor, name)
                elif saved[key][0].shape != tensor.shape or not torch.equal(saved[key][0], tensor.to(
                        saved[key][0].dtype)):
                    problems.append(f"{PREFIX + key}: modules_to_save differs between {saved[key][1]} and {name} "
                                    "(a saved module replaces the base's whole; two different ones cannot both)")
        return {k: v for k, (v, _) in saved.items()}

    @property
    def fan_in_fan_out(self) -> bool:
        return self.adapters[0].config.fan_in_fan_out

    def terms(self) -> dict[str, list[tuple[BoraModule, float]]]:
        """Per adapted module (natural order), the ``(module, weight)`` of every adapter that adapts it."""
        out: dict[str, list[tuple[BoraModule, float]]] = {}
        for adapter, w in zip(self.adapters, self.weights):
            for name, mod in adapter.modules.items():
                out.setdefault(name, []).append((mod, w))
        return {k: out[k] for k in sorted(out, key=_natural_key)}

    def modules_to_save(self) -> list[str] | None:
        names = sorted({n for a in self.adapters for n in (a.config.modules_to_save or [])})
        return names or None


def common_blocks(terms: Sequence[tuple[BoraModule, float]], *, name: str) -> int:
    """The finest block grid of ``terms``: the largest ``b``, when every other divides it.

    Raises:
        UnsupportedError: two ``b`` that do not divide one another.
    """
    b = max(mod.b for mod, _ in terms)
    odd = sorted({mod.b for mod, _ in terms if b % mod.b})
    if odd:
        raise UnsupportedError(f"{PREFIX + name}: bora_blocks {odd[0]} and {b} do not divide one another, so the "
                               "sum has no BoRA form on one block grid", hint="use --to lora")
    return b


def refine_sigma(sigma: torch.Tensor, b: int) -> torch.Tensor:
    """``sigma`` ``(c, c, r)`` on the finer grid ``b`` (``c`` divides ``b``): each entry repeated ``b / c`` times."""
    q = b // sigma.shape[0]
    return sigma.repeat_interleave(q, dim=0).repeat_interleave(q, dim=1)


def bora_sum(terms: Sequence[tuple[BoraModule, float]], *, b: int | None = None,
             dtype: torch.dtype = torch.float32) -> BoraModule:
    """``sum_k w_k dW_k`` of one module as one BoRA module of rank ``sum_k r_k`` (scaling 1), exactly.

    ``b`` is the block grid (default: the finest of ``terms``; every ``b_k`` must divide it).
    """
    name = terms[0][0].name
    b = common_blocks(terms, name=name) if b is None else b
    a = torch.cat([mod.A.to(dtype) for mod, _ in terms])
    bb = torch.cat([mod.B.to(dtype) for mod, _ in terms], dim=1)
    sigma = torch.cat([refine_sigma(mod.sigma.to(torch.float64), b) * (mod.scaling * w) for mod, w in terms], dim=2)
    return BoraModule(name, a.contiguous(), bb.contiguous(), sigma.to(dtype).contiguous(), 1.0)


def lora_stack(terms: Sequence[tuple[BoraModule, float]]) -> BoraModule:
    """``sum_k w_k dW_k`` as a float64 BoRA module with ``b = 1`` and rank ``sum_k b_k r_k``: stacked exact factors."""
    bs, as_, sig = [], [], []
    for mod, w in terms:
        b_full, a_full = exact_lora_factors(*(t.to(torch.float64) for t in (mod.A, mod.B, mod.sigma)))
        bs.append(b_full)
        as_.append(a_full)
        sig.append(torch.full((a_full.shape[0],), mod.scaling * w, dtype=torch.float64))
    return BoraModule(terms[0][0].name, torch.cat(as_), torch.cat(bs, dim=1), torch.cat(sig).reshape(1, 1, -1), 1.0)


def recipe(*, command: str, names: Sequence[str], revisions: Sequence[str | None], kinds: Sequence[str],
           weights: Sequence[float], method: str = "linear", densities: Sequence[float] | None = None,
           seed: int | None = None, scale: float = 1.0, base: str | None = None) -> dict[str, Any]:
    """What a merged model records (``config.json`` key ``bora_tools_recipe``, and its README) to be made again."""
    adapters = []
    for i, (name, rev, kind, w) in enumerate(zip(names, revisions, kinds, weights)):
        entry = {"adapter": name, "revision": rev, "kind": kind, "weight": w}
        if densities is not None and method != "linear":
            entry["density"] = densities[i]
        adapters.append(entry)
    out: dict[str, Any] = {"tool": "bora-tools", "command": command, "method": method, "adapters": adapters}
    if base is not None:
        out["base"] = base
    if scale != 1.0:
        out["scale"] = scale
    if method.startswith("dare"):
        out["seed"] = seed
    return out


def recipe_card(rec: dict[str, Any], *, base_model: str | None) -> str:
    """A model card (README.md) stating the recipe and the command line that repeats it."""
    rows = "\n".join(f"| {a['adapter']} | {a['revision'] or '-'} | {a['kind']} | {a['weight']:g} | "
                     f"{a.get('density', 1.0):g} |" for a in rec["adapters"])
    spec = [a["adapter"] + (f"@{a['revision']}" if a["revision"] else "") for a in rec["adapters"]]
    line = ["bora-tools", "merge", *spec, "--base", rec.get("base") or "BASE", "--out", "OUT",
            "--weights", ",".join(f"{a['weight']:g}" for a in rec["adapters"]), "--method", rec["method"]]
    if rec["method"] != "linear":
        line += ["--density", ",".join(f"{a['density']:g}" for a in rec["adapters"])]
    if "seed" in rec:
        line += ["--seed", str(rec["seed"])]
    if "scale" in rec:
        line += ["--scale", f"{rec['scale']:g}"]
    front = ["---", "library_name: transformers", "tags:", "- merge", "- bora-tools"]
    if base_model:
        front += [f"base_model: {base_model}"]
    return "\n".join([*front, "---", "", "# Merged model", "",
                      f"Made by bora-tools: the base model plus a `{rec['method']}` merge of "
                      f"{len(rec['adapters'])} adapter(s).", "",
                      "| adapter | revision | kind | weight | density |", "|---|---|---|---|---|", rows, "",
                      "To make it again:", "", "```", " ".join(line), "```", "",
                      "The same recipe is recorded in `config.json` under `bora_tools_recipe`.", ""])
