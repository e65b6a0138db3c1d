"""``to-lora``: a BoRA adapter as a plain PEFT LoRA adapter, exact or optimally truncated.

Per module (docs/format.md, section 4): the SVD of ``dW`` is found from the factors alone
(their small Gram matrices, ``bora_tools.core.factors.gram_svd``; or thin QR of ``B'``
block by block and of ``A'^T``, ``factored_svd``; then the SVD of the small
``(b*r, b*r)`` core); no ``m x n`` matrix is ever built. A rank
policy picks how many singular triplets to keep; ``--rank full`` writes the
exact factors instead, which lose nothing at all.

The BoRA scaling is folded into the factors and PEFT's own scaling is made
exactly 1 for every module (``lora_alpha == r``, per-module overrides in
``rank_pattern`` / ``alpha_pattern``, ``use_rslora`` false), so the file means
the same thing to every LoRA loader, including those that ignore rsLoRA.
With ``uniform_rank`` every module gets the same rank (zero columns and rows
pad a lower one), so no ``rank_pattern`` is written at all: the form that
loaders and converters which read one global ``r`` and ``lora_alpha`` need
(llama.cpp's ``convert_lora_to_gguf.py``, Ollama's safetensors import).
"""

from __future__ import annotations

import json
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bora_tools.core.adapter import PREFIX, SUFFIX_A, SUFFIX_B, WEIGHTS_NAME, BoraAdapter, load_adapter
from bora_tools.core.config import CONFIG_NAME, BoraConfig, pattern_keys
from bora_tools.core.devices import one_cpu_thread, resolve_device
from bora_tools.core.dtypes import dtype_name, parse_dtype
from bora_tools.core.lowrank import SVD_ROUTES, ModuleResult, RankPolicy, convert_module
from bora_tools.errors import ValidationError
from bora_tools.io.atomic import atomic_output, check_target, refuse_output_over_inputs
from bora_tools.io.hub_input import hub_id_of, hub_or_local
from bora_tools.io.safetensors import save_tensors
from bora_tools.progress import Progress, logger, no_progress
from bora_tools.report import Report, json_text

Tensor = torch.Tensor

#: The values vLLM accepts for ``--max-lora-rank`` (vllm.config.lora; its default is 16).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_max_lora_rank(rank: int) -> int | None:
    """The smallest ``--max-lora-rank`` vLLM accepts for an adapter of largest rank ``rank``; None above 512.

    Example: ``vllm_max_lora_rank(24)`` -> ``32``.
    """
    return next((v for v in VLLM_LORA_RANKS if v >= rank), None)


def uniform_target(policy: RankPolicy, results: list[ModuleResult]) -> int:
    """The one rank of a ``uniform_rank`` output: ``K`` for ``rank`` K, the largest ``b*r`` for ``full``,
    the largest rank kept for ``energy``."""
    if policy.full:
        return max(r.bora_rank for r in results)
    if policy.energy is None:
        return int(policy.rank)
    return max(r.rank for r in results)


def pad_to_rank(tensors: dict[str, Tensor], results: list[ModuleResult], rank: int) -> None:
    """Pad every module's factors with zeros to exactly ``rank`` (in place): ``B @ A`` is unchanged."""
    for res in results:
        if res.rank == rank:
            continue
        key_a, key_b = PREFIX + res.name + SUFFIX_A, PREFIX + res.name + SUFFIX_B
        a_k, b_k = tensors[key_a], tensors[key_b]
        useful = res.rank if res.update_rank else 0
        tensors[key_a] = torch.cat([a_k, a_k.new_zeros(rank - res.rank, a_k.shape[1])]).contiguous()
        tensors[key_b] = torch.cat([b_k, b_k.new_zeros(b_k.shape[0], rank - res.rank)], dim=1).contiguous()
        res.note = (f"rank {useful} zero-padded to {rank} (--uniform-rank)" if useful
                    else f"zero update: written as rank {rank} with zero factors")
        res.capped = False
        res.rank = rank
        res.parameters_after = rank * sum(res.shape)


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
            tensors[PREFIX + name + SUFFIX_A] = a_k
            tensors[PREFIX + name + SUFFIX_B] = b_k
            results.append(result)
    for key, tensor in adapter.saved.items():
        tensors[PREFIX + key] = tensor.detach().cpu().contiguous()
    return tensors, results


@dataclass
class ToLoraReport(Report):
    """What ``to_lora`` wrote: per module the rank kept, the exact error and energy retained; totals.

    The figures are exact, not estimated: the relative error of a rank-``k`` truncation is
    ``sqrt(sum of discarded S^2) / ||dW||_F`` from the factored SVD (Eckart-Young), and the energy
    retained is ``sum(S[:k]^2) / sum(S^2)``.
    """

    adapter: str
    out: str
    policy: dict[str, Any]  # {"rank": K | "full" | None, "energy": F | None}
    dtype: str
    peft: dict[str, Any]  # r, lora_alpha, rank_pattern_entries, use_rslora of the written config
    modules: list[ModuleResult]
    totals: dict[str, Any]
    # uniform_rank, max_rank, vllm_max_lora_rank (None above 512), modules_to_save
    serving: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    report_path: str | None = None  # --report: this report as JSON
    plot_path: str | None = None  # --plot: the spectra PNG

    def to_text(self) -> str:
        """A short table for the terminal: one row per module, then the totals."""
        return _table(self.to_dict())


def build_report(*, adapter: Path, out: Path, policy: dict, dtype: str, results: list[ModuleResult],
                 peft_config: dict, saved: dict[str, torch.Tensor], uniform_rank: bool = False) -> ToLoraReport:
    """The report of a conversion (``to_dict()`` is what ``--json`` prints and ``--report`` writes)."""
    errors = [r.rel_error for r in results]
    worst = max(results, key=lambda r: r.rel_error)
    totals = {
        "modules": len(results),
        "parameters_before": sum(r.parameters_before for r in results),
        "parameters_after": sum(r.parameters_after for r in results),
        "saved_parameters": sum(t.numel() for t in saved.values()),
        "max_rel_error": worst.rel_error,
        "max_rel_error_module": worst.name,
        "mean_rel_error": sum(errors) / len(errors),
        "min_energy": min(r.energy for r in results),
        "zero_modules": sum(1 for r in results if r.update_rank == 0),
        "capped_modules": sum(1 for r in results if r.capped),
    }
    peft = {"r": peft_config["r"], "lora_alpha": peft_config["lora_alpha"],
            "rank_pattern_entries": len(peft_config["rank_pattern"]), "use_rslora": peft_config["use_rslora"]}
    max_rank = max(r.rank for r in results)
    serving = {"uniform_rank": uniform_rank, "max_rank": max_rank, "vllm_max_lora_rank": vllm_max_lora_rank(max_rank),
               "modules_to_save": sorted({k.rsplit(".", 1)[0] for k in saved})}
    warnings = []
    if saved:
        warnings.append(f"modules_to_save ({', '.join(serving['modules_to_save'])}): vLLM refuses LoRA adapters "
                        "that carry whole modules; serve the merged model instead (bora-tools merge)")
    if serving["vllm_max_lora_rank"] is None:
        warnings.append(f"rank {max_rank} is above 512, the largest --max-lora-rank vLLM accepts; choose "
                        "--rank 512 or lower, or serve the merged model (bora-tools merge)")
    return ToLoraReport(adapter=str(adapter), out=str(out), policy=policy, dtype=dtype, peft=peft,
                        modules=list(results), totals=totals, serving=serving, warnings=warnings)


def _table(report: dict[str, Any]) -> str:
    mods = report["modules"]
    width = max(len("module"), *(len(m["name"]) for m in mods))
    notes = any(m["note"] for m in mods)
    lines = [f"{'module':<{width}}  {'shape':>11}  {'kept':>4}  {'update':>6}  {'rel.error':>9}  {'energy':>9}"
             + ("  note" if notes else "")]
    for m in mods:
        shape = f"{m['shape'][0]}x{m['shape'][1]}"
        lines.append(f"{m['name']:<{width}}  {shape:>11}  {m['rank']:>4}  {m['update_rank']:>6}  "
                     f"{m['rel_error']:>9.2e}  {m['energy']:>9.6f}  {m['note'] or ''}".rstrip())
    t, peft = report["totals"], report["peft"]
    before, after = t["parameters_before"], t["parameters_after"]
    notes = [f"{t['zero_modules']} with a zero update"] if t["zero_modules"] else []
    if t["capped_modules"]:
        notes.append(f"{t['capped_modules']} kept a different rank than asked: see their note")
    if t["max_rel_error"] > 0:
        error = (f"relative Frobenius error: worst {t['max_rel_error']:.3e} ({t['max_rel_error_module']}), "
                 f"mean {t['mean_rel_error']:.3e}; share of ||dW||^2 kept >= {t['min_energy']:.6f}")
    else:
        error = "exact: every LoRA update equals its BoRA update (relative error 0)"
    lines += [
        "  (kept: the LoRA's rank; update: the rank of the BoRA update dW; rel.error: ||dW - LoRA|| / ||dW||; "
        "energy: the share of ||dW||^2 kept)",
        f"{t['modules']} modules" + (f" ({'; '.join(notes)})" if notes else "")
        + f"; {policy_text(report['policy'])}; factors stored as {report['dtype']}",
        f"parameters: {before:,} (BoRA) -> {after:,} (LoRA, {after / max(before, 1):.2f}x)"
        + (f"; modules_to_save: {t['saved_parameters']:,} copied" if t["saved_parameters"] else ""),
        error,
    ]
    serving = report.get("serving") or {}
    if serving.get("vllm_max_lora_rank"):  # the warnings (modules_to_save, rank > 512) go to stderr
        lines.append(f"vLLM: serve with --enable-lora --max-lora-rank {serving['vllm_max_lora_rank']} "
                     f"(largest rank {serving['max_rank']})")
    for label, key in (("this report, as JSON", "report_path"), ("singular values and energy, as a PNG plot",
                                                                 "plot_path")):
        if report.get(key):
            lines.append(f"wrote {report[key]} ({label})")
    lines.append(f"wrote {report['out']} (PEFT LoRA adapter: r={peft['r']}, lora_alpha={peft['lora_alpha']}"
                 + (f", {peft['rank_pattern_entries']} per-module ranks in rank_pattern/alpha_pattern"
                    if peft["rank_pattern_entries"] else "") + ")")
    return "\n".join(lines)


def policy_text(policy: dict) -> str:
    """The policy as the options that chose it, e.g. ``--energy 0.9 --rank 8``."""
    if policy["rank"] == "full":
        return "--rank full (exact factors)"
    parts = ([f"--energy {policy['energy']:g}"] if policy["energy"] is not None else []) + \
            ([f"--rank {policy['rank']}"] if policy["rank"] is not None else [])
    return " ".join(parts)


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
        # a folder in the Hugging Face cache is recorded as its Hub id, never as the cache's hash
        "base_model_name_or_path": hub_id_of(config.base_model_name_or_path) or config.base_model_name_or_path,
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
            progress: Progress = no_progress, name: str | None = None, uniform_rank: bool = False,
            token: str | None = None) -> ToLoraReport:
    """Convert the BoRA adapter at ``adapter`` into a PEFT LoRA adapter directory ``out``.

    Everything is validated (options, output paths, the adapter) before any
    computation; ``out``, ``report`` (JSON) and ``plot`` (PNG) appear only
    when everything succeeded. ``name`` names the adapter in the plot's title
    (default: its folder's name, or its Hub id). ``adapter`` may be a Hub id (``owner/name[@revision]``,
    read with ``token``). ``uniform_rank`` writes every module at the same rank (``rank`` K,
    the largest ``b*r`` for ``full``, the largest kept for ``energy``), zero-padded, with no
    ``rank_pattern``. Returns the report (``ToLoraReport``); its ``serving`` names vLLM's
    ``--max-lora-rank``.

    Example::

        report = to_lora("my-bora", "my-lora", rank="full")          # exact, rank b*r
        report = to_lora("my-bora", "my-lora-8", rank=8, overwrite=True)
        report.totals["max_rel_error"], print(report)

    Raises:
        ValidationError: bad ``rank`` / ``energy`` / ``dtype``, or outputs that clash with each other.
        OutputExistsError, OutputWriteError: an output exists (without ``overwrite``) or would replace the input.
        ConfigError, CheckpointError: the adapter is invalid.
        UnsupportedError: ``plot`` without matplotlib; a factor overflowing ``dtype``; cuda unavailable.
    """
    policy = RankPolicy.parse(rank, energy)
    dtype = dtype_name(dtype)
    torch_dtype = parse_dtype(dtype)
    if route not in SVD_ROUTES:
        raise ValidationError(f"route: expected one of {', '.join(SVD_ROUTES)}, found {route!r}")
    dev = resolve_device(device)
    found = hub_or_local(adapter, kind="adapter", token=token)
    adapter, out = found.path, Path(out)
    name = name or found.repo_id
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
    tensors, results = convert_adapter(bora, policy, device=dev, dtype=torch_dtype, route=route,
                                       progress=progress)
    if uniform_rank:
        pad_to_rank(tensors, results, uniform_target(policy, results))
    config = peft_lora_config(bora.config, {r.name: r.rank for r in results})
    result = build_report(adapter=adapter, out=out, policy=policy.to_dict(), dtype=dtype, results=results,
                          peft_config=config, saved=bora.saved, uniform_rank=uniform_rank)
    for warning in result.warnings:
        logger.warning(warning)
    capped = [r for r in results if r.capped]
    if capped:
        logger.warning(f"{len(capped)} module(s) kept another rank than asked, e.g. {capped[0].name}: "
                       f"{capped[0].note}")
    result.report_path = str(extras["report"]) if extras["report"] else None
    result.plot_path = str(extras["plot"]) if extras["plot"] else None
    _write_all(out, tensors, config, result, results, extras, policy=policy, overwrite=overwrite,
               name=name or adapter.resolve().name)
    return result


#: The safetensors metadata key under which a LoRA records the error to-lora predicted (``verify`` reads it).
PREDICTED_KEY = "bora_tools.to_lora"


def predicted_error(report: ToLoraReport) -> str:
    """What the LoRA's weights file records: the policy and each module's relative Frobenius error, as JSON.

    Example: ``'{"max_rel_error": 0.0, "modules": {"model.layers.0.self_attn.q_proj": 0.0, ...}, ...}'``
    """
    return json.dumps({"policy": report.policy, "max_rel_error": report.totals["max_rel_error"],
                       "modules": {m.name: m.rel_error for m in report.modules}}, sort_keys=True)


def _check_outputs(adapter: Path, out: Path, extra: list[Path], *, overwrite: bool) -> None:
    """Refuse before any work: outputs that are or hold the input, clashing outputs, existing outputs."""
    dst_out = out.resolve()
    for target in [out, *extra]:
        refuse_output_over_inputs(target, adapter)
    for p in extra:
        if p.resolve().is_relative_to(dst_out):
            raise ValidationError(f"output {p} would be inside the LoRA adapter directory {out}")
    if len(extra) == 2 and extra[0].resolve() == extra[1].resolve():
        raise ValidationError(f"`report` and `plot` are the same file {extra[0]}")
    for target in [out, *extra]:
        check_target(target, overwrite=overwrite)


def _write_all(out: Path, tensors: dict[str, Tensor], config: dict, report: ToLoraReport, results: list[ModuleResult],
               extras: dict[str, Path | None], *, policy: RankPolicy, overwrite: bool, name: str) -> None:
    # Every output is written into its temporary sibling first; the renames happen together at the end.
    with ExitStack() as stack:
        tmp = stack.enter_context(atomic_output(out, overwrite=overwrite, directory=True))
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        # Our writer: safetensors' own orders two metadata keys differently from run to run.
        save_tensors(tensors, tmp / WEIGHTS_NAME, {"format": "pt", PREDICTED_KEY: predicted_error(report)})
        if extras["report"]:
            tmp_report = stack.enter_context(atomic_output(extras["report"], overwrite=overwrite))
            tmp_report.write_text(json_text(report.to_dict()) + "\n")
        if extras["plot"]:
            from bora_tools.plot import plot_spectra

            tmp_plot = stack.enter_context(atomic_output(extras["plot"], overwrite=overwrite))
            title = f"BoRA adapter {name} -> PEFT LoRA ({policy_text(policy.to_dict())})"
            plot_spectra(results, tmp_plot, title=title, energy=policy.energy)
