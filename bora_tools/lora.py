"""``to-lora``: a BoRA adapter as a plain PEFT LoRA adapter, exact or optimally truncated.

Per module (SPEC section 1): the SVD of ``dW`` is found from the factors alone
(their small Gram matrices, ``bora_tools.math.gram_svd``; or thin QR of ``B'``
block by block and of ``A'^T``, ``factored_svd``; then the SVD of the small
``(b*r, b*r)`` core); no ``m x n`` matrix is ever built. A rank
policy picks how many singular triplets to keep; ``--rank full`` writes the
exact factors instead, which lose nothing at all.

The BoRA scaling is folded into the factors and PEFT's own scaling is made
exactly 1 for every module (``lora_alpha == r``, per-module overrides in
``rank_pattern`` / ``alpha_pattern``, ``use_rslora`` false), so the file means
the same thing to every LoRA loader, including those that ignore rsLoRA.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from bora_tools.checkpoint import PREFIX, WEIGHTS_NAME, BoraAdapter, BoraModule, load_adapter
from bora_tools.config import CONFIG_NAME, BoraConfig
from bora_tools.devices import one_cpu_thread, resolve_device
from bora_tools.dtypes import DTYPES, cast_finite
from bora_tools.errors import ValidationError
from bora_tools.lora_report import ModuleResult, build_report, policy_text
from bora_tools.math import FactoredSVD, exact_lora_factors, factored_svd, gram_svd
from bora_tools.output import atomic_output, check_target, refuse_output_over_inputs
from bora_tools.progress import Progress, logger, no_progress

Tensor = torch.Tensor


def _qr_route(A: Tensor, B: Tensor, sigma: Tensor, scaling: float, *, vectors: int | None = None) -> FactoredSVD:
    return factored_svd(A, B, sigma, scaling)  # assembles every singular vector whatever ``vectors`` says


# Two routes to the same SVD (SPEC section 1): "gram" reads each factor once by matrix products and is the
# default (2-3x faster than "qr" per module: a Householder QR of a tall n x b*r factor is slow next to one
# matrix product); "qr" is accurate to float64 rounding rather than about 1e-7 * S[0].
SVD_ROUTES = {"gram": gram_svd, "qr": _qr_route}
ZERO_NOTE = "zero update: written as rank 1 with zero factors"


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
    def parse(cls, rank: int | str | None = None, energy: float | None = None) -> "RankPolicy":
        """Validate the options; every problem is reported at once.

        Raises:
            ValidationError: a rank below 1, an energy outside (0, 1], ``full``
                with ``energy``, or neither option.
        """
        problems = []
        full = isinstance(rank, str) and rank.strip().lower() == "full"
        if isinstance(rank, str) and not full:
            problems.append(f"--rank: expected a positive integer or 'full', found {rank!r}")
        elif not full and rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            problems.append(f"--rank: expected a positive integer or 'full', found {rank!r}")
        if energy is not None and (isinstance(energy, bool) or not isinstance(energy, (int, float))
                                   or not 0.0 < float(energy) <= 1.0):
            problems.append(f"--energy: expected a fraction in (0, 1], found {energy!r}")
        if full and energy is not None:
            problems.append("--rank full keeps everything and cannot be combined with --energy")
        if rank is None and energy is None:
            problems.append("give --rank K, --rank full or --energy F")
        if problems:
            raise ValidationError("to-lora: " + "; ".join(problems))
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
        b_k, a_k = torch.zeros(m, 1, dtype=torch.float64), torch.zeros(1, n, dtype=torch.float64)
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
    return (cast_finite(b_k.cpu(), dtype, key + ".lora_B.weight").contiguous(),
            cast_finite(a_k.cpu(), dtype, key + ".lora_A.weight").contiguous(), result)


def _truncation_figures(svd: FactoredSVD, k: int) -> tuple[float, float]:
    s2 = svd.S**2
    total = float(s2.sum())
    # The discarded tail is summed directly (not 1 - retained) so tiny errors keep their precision.
    discarded = float(s2[k:].sum())
    return (discarded / total) ** 0.5, float(s2[:k].sum()) / total


def convert_adapter(adapter: BoraAdapter, policy: RankPolicy, *, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32, route: str = "gram", progress: Progress = no_progress
                    ) -> tuple[dict[str, Tensor], list[ModuleResult]]:
    """The PEFT LoRA tensors (keys ``base_model.model.P.lora_A.weight`` ...) and one result per module.

    ``modules_to_save`` tensors are carried over unchanged, in their stored dtype.
    """
    tensors: dict[str, Tensor] = {}
    results = []
    with one_cpu_thread(torch.device(device)):
        for name in progress(list(adapter.modules), total=len(adapter.modules), label="converting to LoRA"):
            b_k, a_k, result = convert_module(adapter.modules[name], policy, device=device, dtype=dtype, route=route)
            tensors[f"{PREFIX}{name}.lora_A.weight"] = a_k
            tensors[f"{PREFIX}{name}.lora_B.weight"] = b_k
            results.append(result)
    for key, tensor in adapter.saved.items():
        tensors[PREFIX + key] = tensor.detach().cpu().contiguous()
    return tensors, results


def pattern_keys(names: list[str]) -> dict[str, str]:
    """A ``rank_pattern`` / ``alpha_pattern`` key per module that PEFT matches to that module only.

    PEFT matches ``re.match(rf"(.*\\.)?({key})$", name)``: the escaped full name
    matches the module itself (also inside a wrapping model); where it would
    also match another adapted module (one name a dotted suffix of another),
    ``^`` anchors it at the start.

    Example: ``pattern_keys(["model.layers.0.mlp.up_proj"])`` ->
    ``{"model.layers.0.mlp.up_proj": "model\\.layers\\.0\\.mlp\\.up_proj"}``
    """
    keys = {}
    for name in names:
        key = re.escape(name)
        if any(other != name and re.match(rf"(.*\.)?({key})$", other) for other in names):
            key = "^" + key
        keys[name] = key
    return keys


def peft_lora_config(config: BoraConfig, ranks: dict[str, int]) -> dict[str, Any]:
    """PEFT's ``adapter_config.json`` for the converted adapter, with PEFT's scaling exactly 1 everywhere.

    ``r`` is the most common kept rank; the other modules get ``rank_pattern``
    and ``alpha_pattern`` entries (alpha = rank, so ``alpha / r == 1``).
    """
    counts = Counter(ranks.values())
    default = max(counts, key=lambda k: (counts[k], k))
    keys = pattern_keys(list(ranks))
    differing = {keys[name]: k for name, k in ranks.items() if k != default}
    target = config.target_modules if config.target_modules is not None else sorted(ranks)
    return {
        "peft_type": "LORA",
        "task_type": config.task_type,
        "base_model_name_or_path": config.base_model_name_or_path,
        "r": default,
        "lora_alpha": default,
        "use_rslora": False,  # the BoRA scaling (rsLoRA or not) is already folded into the factors
        "rank_pattern": differing,
        "alpha_pattern": dict(differing),
        "target_modules": target,
        "fan_in_fan_out": config.fan_in_fan_out,
        "modules_to_save": config.modules_to_save,
        "bias": "none",
        "lora_dropout": 0.0,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def to_lora(adapter: str | Path, out: str | Path, *, rank: int | str | None = None, energy: float | None = None,
            dtype: str = "float32", device: str = "auto", report: str | Path | None = None,
            plot: str | Path | None = None, overwrite: bool = False, route: str = "gram",
            progress: Progress = no_progress) -> dict[str, Any]:
    """Convert the BoRA adapter at ``adapter`` into a PEFT LoRA adapter directory ``out``.

    Everything is validated (options, output paths, the adapter) before any
    computation; ``out``, ``report`` (JSON) and ``plot`` (PNG) appear only
    when everything succeeded. Returns the report (see ``lora_report``).

    Example::

        report = to_lora("my-bora", "my-lora", rank="full")          # exact, rank b*r
        report = to_lora("my-bora", "my-lora-8", rank=8, overwrite=True)
        report["totals"]["max_rel_error"]

    Raises:
        ValidationError: bad ``rank`` / ``energy`` / ``dtype``, or outputs that clash with each other.
        OutputExistsError, OutputWriteError: an output exists (without ``overwrite``) or would replace the input.
        ConfigError, CheckpointError: the adapter is invalid.
        UnsupportedError: ``plot`` without matplotlib; a factor overflowing ``dtype``; cuda unavailable.
    """
    policy = RankPolicy.parse(rank, energy)
    if dtype not in DTYPES:
        raise ValidationError(f"--dtype: expected one of {', '.join(DTYPES)}, found {dtype!r}")
    if route not in SVD_ROUTES:
        raise ValidationError(f"route: expected one of {', '.join(SVD_ROUTES)}, found {route!r}")
    dev = resolve_device(device)
    adapter, out = Path(adapter), Path(out)
    extras = {"report": Path(report) if report else None, "plot": Path(plot) if plot else None}
    _check_outputs(adapter, out, [p for p in extras.values() if p], overwrite=overwrite)
    if extras["plot"]:
        from bora_tools.plot import require_matplotlib

        require_matplotlib()
    with one_cpu_thread(torch.device("cpu")):  # reading checks every value: small ops
        bora = load_adapter(adapter)
    if not bora.modules:
        raise ValidationError(f"{adapter}: no adapted module to convert (only modules_to_save tensors)",
                              hint="a LoRA needs at least one adapted module; use merge to apply whole tensors")
    tensors, results = convert_adapter(bora, policy, device=dev, dtype=DTYPES[dtype], route=route,
                                       progress=progress)
    config = peft_lora_config(bora.config, {r.name: r.rank for r in results})
    result = build_report(adapter=adapter, out=out, policy=policy.to_dict(), dtype=dtype, results=results,
                          peft_config=config, saved=bora.saved)
    capped = [r for r in results if r.capped]
    if capped:
        logger.warning(f"{len(capped)} module(s) kept fewer triplets than asked, "
                       f"e.g. {capped[0].name}: {capped[0].note}")
    _write_all(out, tensors, config, result, results, extras, policy=policy, overwrite=overwrite)
    return result


def _check_outputs(adapter: Path, out: Path, extra: list[Path], *, overwrite: bool) -> None:
    """Refuse before any work: outputs that are or hold the input, clashing outputs, existing outputs."""
    dst_out = out.resolve()
    for target in [out, *extra]:
        refuse_output_over_inputs(target, adapter)
    for p in extra:
        if p.resolve().is_relative_to(dst_out):
            raise ValidationError(f"output {p} would be inside the LoRA adapter directory {out}")
    if len(extra) == 2 and extra[0].resolve() == extra[1].resolve():
        raise ValidationError(f"--report and --plot are the same file {extra[0]}")
    for target in [out, *extra]:
        check_target(target, overwrite=overwrite)


def _write_all(out: Path, tensors: dict[str, Tensor], config: dict, report: dict, results: list[ModuleResult],
               extras: dict[str, Path | None], *, policy: RankPolicy, overwrite: bool) -> None:
    # Every output is written into its temporary sibling first; the renames happen together at the end.
    with ExitStack() as stack:
        tmp = stack.enter_context(atomic_output(out, overwrite=overwrite, directory=True))
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        if extras["report"]:
            tmp_report = stack.enter_context(atomic_output(extras["report"], overwrite=overwrite))
            tmp_report.write_text(json.dumps(report, indent=2) + "\n")
        if extras["plot"]:
            from bora_tools.plot import plot_spectra

            tmp_plot = stack.enter_context(atomic_output(extras["plot"], overwrite=overwrite))
            title = f"{Path(report['adapter']).name}: to-lora {policy_text(policy.to_dict())}"
            plot_spectra(results, tmp_plot, title=title, energy=policy.energy)
