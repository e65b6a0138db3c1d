"""TIES, DARE and magnitude pruning of several updates of one module, as mergekit defines them.

Each method sparsifies every task vector ``dW_k`` of a module to ``density`` (the share of its elements
kept), weights it by ``w_k`` and sums:

- ``magnitude_prune``: keep the ``density`` largest ``|dW_k|`` of the tensor, no rescale; plain sum.
- ``dare_linear``: keep each element with probability ``density`` (a seeded Bernoulli draw) and divide the
  kept ones by ``density``; plain sum (``density = 1`` is the linear merge).
- ``ties``: magnitude sparsification, then sign election: each element's sign is the sign of the weighted
  sum; only contributions of that sign are kept, and the sum is divided by the weights of the agreeing
  contributions (mergekit's ``normalize: true``; a divisor under ``1e-8`` counts as 1).
- ``dare_ties``: the DARE draw, then the TIES election.

These need a module's whole update at once: ``K`` dense ``(m, n)`` tensors for ``K`` adapters, in
float32 (float64 for a float64 base); ``working_bytes`` is that figure, which bounds the memory of a
merge by its largest module, never by the model.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import torch

from bora_tools.core.adapter import BoraModule
from bora_tools.core.factors import delta_weight
from bora_tools.errors import ValidationError

Tensor = torch.Tensor

#: The merge methods: ``linear`` streams rows (core.row_merge); the others are computed here, per module.
METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
TASK_METHODS = METHODS[1:]
_MAGNITUDE = ("ties", "magnitude_prune")
_ELECT = ("ties", "dare_ties")
_DARE = ("dare_linear", "dare_ties")


def check_method(method: str, density: Sequence[float] | None, count: int) -> list[float]:
    """The per-adapter densities of ``method`` (all 1.0 for ``linear``), validated.

    Raises:
        ValidationError: an unknown ``method``; a ``density`` outside (0, 1], of the wrong count, or given
            to ``linear``.
    """
    if method not in METHODS:
        raise ValidationError(f"`method`: expected one of {', '.join(METHODS)}, found {method!r}")
    if density is None:
        return [1.0] * count
    values = list(density)
    if method == "linear":
        raise ValidationError("`density` applies to ties, dare_linear, dare_ties and magnitude_prune, not linear")
    if len(values) == 1:
        values *= count
    if len(values) != count:
        raise ValidationError(f"`density`: {len(values)} values for {count} adapters (give one, or one per adapter)")
    for d in values:
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 < float(d) <= 1.0:
            raise ValidationError(f"`density`: expected a fraction in (0, 1], found {d!r}")
    return [float(d) for d in values]


def module_seed(seed: int, name: str) -> int:
    """The seed of one module's DARE draws: the same for a module whatever order the modules are merged in."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def sparsify(delta: Tensor, density: float, method: str, generator: torch.Generator | None = None) -> Tensor:
    """``delta`` with all but a ``density`` share of its elements set to zero, in place.

    ``ties`` / ``magnitude_prune``: the ``int(density * numel)`` largest magnitudes are kept, as mergekit's
    ``magnitude`` does. ``dare_*``: each element kept with probability ``density``, the kept ones divided
    by ``density`` (mergekit's ``bernoulli`` with ``rescale``).
    """
    if density >= 1.0:
        return delta
    if method in _DARE:
        keep = torch.rand(delta.shape, generator=generator, dtype=delta.dtype, device=delta.device) < density
        return delta.masked_fill_(~keep, 0.0).div_(density)
    k = int(density * delta.numel())
    if k == 0:
        return delta.zero_()
    bits = _magnitude_bits(delta)
    return delta.masked_fill_(bits < kth_largest(bits, k), 0.0)


def _magnitude_bits(delta: Tensor) -> Tensor:
    """``|delta|`` as integers of the same width: for non-negative floats they order as the values do."""
    return delta.abs().view(torch.int64 if delta.element_size() == 8 else torch.int32)


def kth_largest(values: Tensor, k: int) -> int:
    """The ``k``-th largest of non-negative integer ``values``, exactly, by bisection on counts.

    Each step is one pass with a boolean mask (a byte per element), where a sort or ``kthvalue`` would
    copy the tensor and add int64 indices (three times its float32 size): the bound of ``working_bytes``.
    """
    lo, hi = 0, int(values.max())  # count(values >= lo) >= k always; the answer is at most hi
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if int(torch.count_nonzero(values >= mid)) >= k:  # (a bool .sum() would widen to int64)
            lo = mid
        else:
            hi = mid - 1
    return lo


def combine_deltas(deltas: list[Tensor], weights: Sequence[float], densities: Sequence[float], method: str,
                   *, generator: torch.Generator | None = None) -> Tensor:
    """The merged update of one module from its task vectors ``deltas``.

    ``deltas`` is consumed: each is sparsified and weighted in place, and the list is emptied as they are
    used, so that at most ``len(deltas) + 3`` dense tensors and a few boolean masks live at once
    (``working_bytes``).
    """
    for d, dens, w in zip(deltas, densities, weights):
        sparsify(d, dens, method, generator).mul_(w)  # w_k * sparse(dW_k), as mergekit weights them
    total = torch.zeros_like(deltas[0])
    for d in deltas:
        total.add_(d)
    if method not in _ELECT:
        deltas.clear()
        return total
    positive = total >= 0  # mergekit: the sign of the weighted sum elects, 0 counting as +
    total.zero_()
    divisor = torch.zeros_like(total)
    for w in weights:
        d = deltas.pop(0)  # freed after its use
        agree = d > 0
        torch.eq(agree, positive, out=agree)  # the sign of w_k * dW_k is the elected one ...
        agree.logical_and_(d != 0)  # ... and not zero (mergekit: sign 0 never agrees)
        mask = agree.to(d.dtype)  # the one float temporary (multiplying by a bool tensor would make another)
        total.add_(d.mul_(mask))
        divisor.add_(mask, alpha=w)
        del d, agree, mask
    divisor.masked_fill_(divisor.abs() < 1e-8, 1.0)
    return total.div_(divisor)


def module_update(terms: Sequence[tuple[BoraModule, float]], densities: Sequence[float], method: str, *,
                  fan_in_fan_out: bool, seed: int, dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu") -> Tensor:
    """The merged update of one module in its stored orientation (``(n, m)`` with ``fan_in_fan_out``).

    ``terms`` are ``(module, weight)`` pairs of the adapters that adapt it, ``densities`` theirs.
    """
    generator = torch.Generator(device=device).manual_seed(module_seed(seed, terms[0][0].name))
    deltas = [delta_weight(*(t.to(device) for t in (mod.A, mod.B, mod.sigma)), mod.scaling, dtype=dtype)
              for mod, _ in terms]
    merged = combine_deltas(deltas, [w for _, w in terms], densities, method, generator=generator)
    return merged.T if fan_in_fan_out else merged


def working_bytes(shape: tuple[int, int], count: int, dtype: torch.dtype = torch.float32) -> int:
    """The dense memory ``module_update``'s tensors take for one module of ``shape`` merged from ``count`` adapters
    (a process's measured peak for ``ties`` was up to 1.25x this: temporary masks and the allocator's reuse).

    ``count`` task vectors, the sum, (TIES) the divisor and one temporary (a magnitude, a random draw, a
    cast mask): ``count + 3`` tensors of ``m * n`` values, and up to three boolean masks, a byte per element.
    """
    m, n = shape
    return ((count + 3) * torch.finfo(dtype).bits // 8 + 3) * m * n
