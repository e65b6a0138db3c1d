"""One module's BoRA update as a plain low-rank factorisation: rank policies, exact and truncated forms.

The SVD of ``dW = s * B' @ A'`` is found from the factors alone (their small
Gram matrices, ``core.factors.gram_svd``; or thin QR of ``B'`` block by block
and of ``A'^T``, ``core.factors.factored_svd``); no ``m x n`` matrix is ever
built (docs/format.md, "The update as a LoRA"). ``to-lora`` and the GGUF LoRA
export both convert modules through ``convert_module``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from bora_tools.core.adapter import PREFIX, SUFFIX_A, SUFFIX_B, BoraModule
from bora_tools.core.dtypes import cast_finite
from bora_tools.core.factors import FactoredSVD, exact_lora_factors, factored_svd, gram_svd
from bora_tools.errors import ValidationError

Tensor = torch.Tensor


def _qr_route(A: Tensor, B: Tensor, sigma: Tensor, scaling: float, *, vectors: int | None = None) -> FactoredSVD:
    return factored_svd(A, B, sigma, scaling)  # assembles every singular vector whatever ``vectors`` says


# Two routes to the same SVD (docs/format.md, section 4): "gram" reads each factor once by matrix products and is the
# default (2-3x faster than "qr" per module: a Householder QR of a tall n x b*r factor is slow next to one
# matrix product); "qr" is accurate to float64 rounding rather than about 1e-7 * S[0].
SVD_ROUTES = {"gram": gram_svd, "qr": _qr_route}
ZERO_NOTE = "zero update: written as rank 1 with zero factors"


def zero_factors(m: int, n: int, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """A zero update as LoRA loaders need it (``ZERO_NOTE``): rank 1 (PEFT and llama.cpp need ``r >= 1``),
    zero factors, so the module stays a no-op."""
    return torch.zeros(m, 1, dtype=dtype), torch.zeros(1, n, dtype=dtype)


def update_rank(module: BoraModule, *, device: torch.device | str = "cpu", route: str = "gram") -> int:
    """The numerical rank of ``dW`` from the factors' spectrum alone (no singular vectors); 0 for a zero update."""
    A, B, sigma = (t.to(device) for t in (module.A, module.B, module.sigma))
    return SVD_ROUTES[route](A, B, sigma, module.scaling, vectors=0).rank()


def parse_rank(value: int | str) -> int | str:
    """``"full"`` or a positive ``int``, from either or from their text (``"8"``, ``"Full"``).

    The one ``rank`` parser: ``RankPolicy``, the GGUF LoRA export and the CLI's ``--rank`` all use it.

    Example: ``parse_rank("16")`` -> ``16``; ``parse_rank("FULL")`` -> ``"full"``.

    Raises:
        ValidationError: anything else (``0``, ``-3``, ``2.5``, ``"most"``, ``True``).
    """
    if isinstance(value, str):
        text = value.strip()
        if text.lower() == "full":
            return "full"
        value = int(text) if text.lstrip("+").isdigit() else text
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValidationError(f"`rank`: expected a positive integer or 'full', found {value!r}")
    return value


@dataclass(frozen=True)
class RankPolicy:
    """How many singular triplets each module keeps.

    Exactly one meaning per option: ``full`` writes the exact factors (rank
    ``b*r``); ``rank`` alone keeps ``K`` (capped at each update's rank);
    ``energy`` keeps the smallest rank retaining at least that fraction of
    ``||dW||_F^2``, capped by ``rank`` when both are given.

    Example::

        RankPolicy.parse(rank=8)                   # --rank 8
        RankPolicy.parse(rank="full")              # --rank full
        RankPolicy.parse(energy=0.99, rank=16)     # --energy 0.99 --rank 16
    """

    rank: int | None = None
    energy: float | None = None
    full: bool = False

    @classmethod
    def parse(cls, rank: int | str | None = None, energy: float | None = None) -> RankPolicy:
        """Validate the options; every problem is reported at once.

        Raises:
            ValidationError: a rank below 1, an energy outside (0, 1], ``full``
                with ``energy``, or neither option.
        """
        problems = []
        if rank is not None:
            try:
                rank = parse_rank(rank)
            except ValidationError as e:
                problems.append(str(e))
                rank = -1  # reported; keep collecting the other problems
        full = rank == "full"
        if energy is not None and (isinstance(energy, bool) or not isinstance(energy, (int, float))
                                   or not 0.0 < float(energy) <= 1.0):
            problems.append(f"`energy`: expected a fraction in (0, 1], found {energy!r}")
        if full and energy is not None:
            problems.append("`rank` full keeps everything and cannot be combined with `energy`")
        if rank is None and energy is None:
            problems.append("give `rank` K, `rank` full or `energy` F")
        if problems:
            raise ValidationError("; ".join(problems))
        return cls(rank=None if full else rank, energy=None if energy is None else float(energy), full=full)

    def to_dict(self) -> dict[str, Any]:
        return {"rank": "full" if self.full else self.rank, "energy": self.energy}

    @property
    def vectors(self) -> int | None:
        """The most singular vectors any module can need (``None``: all): the exact form needs none."""
        return 0 if self.full else self.rank

    def choose(self, S: Tensor, update_rank: int) -> tuple[int, str | None]:
        """The rank to keep for one non-zero update with singular values ``S``, and a note when capped."""
        if self.energy is None:
            if self.rank > update_rank:
                return update_rank, f"--rank {self.rank} capped at the update's rank {update_rank}"
            return self.rank, None
        k = min(energy_rank(S, self.energy), update_rank)
        if self.rank is not None and k > self.rank:
            return self.rank, f"--energy {self.energy:g} needs rank {k}; capped by --rank {self.rank}"
        return k, None


def energy_rank(S: Tensor, fraction: float) -> int:
    """The smallest ``k`` with ``sum(S[:k]^2) >= fraction * sum(S^2)`` (``S`` descending, not all zero).

    Example: ``energy_rank(torch.tensor([3., 2., 1.]), 0.9)`` -> 2 (13 of 14 retained).
    """
    cum = torch.cumsum(S.to(torch.float64) ** 2, dim=0)
    # The total is the last partial sum, so fraction 1 is reached exactly at the end, never missed by rounding.
    return int((cum < fraction * cum[-1]).sum()) + 1


def balanced_exact_factors(A: Tensor, B: Tensor, sigma: Tensor, scaling: float) -> tuple[Tensor, Tensor]:
    """``(B2, A2)`` float64 with ``B2 @ A2 == s * B' @ A' == dW`` exactly in exact arithmetic.

    The scaling is folded in, and each rank-one term ``B'[:, c] A'[c]`` is
    rescaled so its two halves have equal norms: a diagonal change that alters
    nothing in exact arithmetic but keeps float16/bfloat16 storage of both
    factors on the same scale (trained ``B`` is typically far smaller than ``A``).

    Example::

        B2, A2 = balanced_exact_factors(A, B, sigma, scaling=2.0)   # (m, b*r), (b*r, n)
    """
    b_full, a_full = exact_lora_factors(*(t.to(torch.float64) for t in (A, B, sigma)))
    nb, na = b_full.norm(dim=0), a_full.norm(dim=1)
    ok = (nb > 0) & (na > 0)
    # d^2 = |s| * |A'_c| / |B'_c| equalises the norms; a term with a zero half is zero whatever d is.
    d = torch.where(ok, (abs(scaling) * na / torch.where(ok, nb, 1.0)).sqrt(), torch.ones_like(nb))
    return b_full * d, a_full * (scaling / d).unsqueeze(1)


@dataclass
class ModuleResult:
    """What the conversion did to one module."""

    name: str
    shape: tuple[int, int]  # (m, n) of dW
    bora_rank: int  # b*r: the rank of the exact form
    update_rank: int  # numerical rank of dW
    rank: int  # rank written
    rel_error: float  # ||dW - B_k A_k||_F / ||dW||_F (0 for the exact form and for a zero update)
    energy: float  # retained fraction of ||dW||_F^2
    parameters_before: int  # r*(m+n) + b*b*r
    parameters_after: int  # k*(m+n)
    note: str | None = None
    capped: bool = False  # fewer triplets kept than the policy asked (update rank or --rank cap)
    singular_values: torch.Tensor | None = field(default=None, repr=False)  # float64, descending

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "bora_rank": self.bora_rank,
                "update_rank": self.update_rank, "rank": self.rank, "rel_error": self.rel_error,
                "energy": self.energy, "parameters_before": self.parameters_before,
                "parameters_after": self.parameters_after, "capped": self.capped, "note": self.note}


def convert_module(module: BoraModule, policy: RankPolicy, *, device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float32, route: str = "gram") -> tuple[Tensor, Tensor, ModuleResult]:
    """``(lora_B (m, k), lora_A (k, n), result)`` for one module, on the CPU in ``dtype``.

    ``lora_B @ lora_A`` approximates ``dW`` (scaling folded in); ``result``
    carries the rank kept, the exact relative error and energy retained, and
    the singular values.

    Example::

        B_k, A_k, res = convert_module(adapter.modules[name], RankPolicy.parse(rank=4))
        res.rel_error    # ||dW - B_k A_k||_F / ||dW||_F, the optimum (Eckart-Young)
    """
    A, B, sigma = (t.to(device) for t in (module.A, module.B, module.sigma))
    svd = SVD_ROUTES[route](A, B, sigma, module.scaling, vectors=policy.vectors)
    update_rank = svd.rank()
    m, n = module.shape
    note = None
    if update_rank == 0:  # exactly zero: PEFT needs r >= 1, and zero factors keep the module a no-op
        k, rel_error, energy, note = 1, 0.0, 1.0, ZERO_NOTE
        b_k, a_k = zero_factors(m, n)
    elif policy.full:
        b_k, a_k = balanced_exact_factors(A, B, sigma, module.scaling)
        k, rel_error, energy = b_k.shape[1], 0.0, 1.0
    else:
        k, note = policy.choose(svd.S, update_rank)
        b_k, a_k = svd.lora_factors(k, dtype=torch.float64)
        rel_error, energy = _truncation_figures(svd, k)
    result = ModuleResult(name=module.name, shape=(m, n), bora_rank=module.b * module.r, update_rank=update_rank,
                          rank=k, rel_error=rel_error, energy=energy, parameters_before=module.num_parameters,
                          parameters_after=k * (m + n), note=note, capped=bool(note) and note != ZERO_NOTE,
                          singular_values=svd.S.detach().cpu())
    # The one cast of the whole conversion: float64 -> the stored dtype.
    key = PREFIX + module.name
    return (cast_finite(b_k.cpu(), dtype, key + SUFFIX_B).contiguous(),
            cast_finite(a_k.cpu(), dtype, key + SUFFIX_A).contiguous(), result)


def _truncation_figures(svd: FactoredSVD, k: int) -> tuple[float, float]:
    s2 = svd.S**2
    total = float(s2.sum())
    # The discarded tail is summed directly (not 1 - retained) so tiny errors keep their precision.
    discarded = float(s2[k:].sum())
    return (discarded / total) ** 0.5, float(s2[:k].sum()) / total
