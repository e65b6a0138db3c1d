"""``verify``: run an output where it will run and compare it with the BoRA adapter it was made from.

The order: check the options and recognise the output (nothing loaded yet); read and tokenize the prompts;
load the reference (the adapter on its base in transformers, float32 or float64), take its logits and the
base's, free it; run the output in its engine; measure and judge by the output type's tolerance.
"""

from __future__ import annotations

from pathlib import Path

import torch

from bora_tools.choices import VERIFY_ENGINES as ENGINES
from bora_tools.core.config import CONFIG_NAME
from bora_tools.core.devices import resolve_device
from bora_tools.errors import ConfigError, UnsupportedError, ValidationError
from bora_tools.io.hub_input import resolve_input
from bora_tools.io.json import read_json
from bora_tools.io.kinds import wrong_kind
from bora_tools.progress import Progress, no_progress
from bora_tools.verification.engines import Output, find_output, pick_engine, run_output
from bora_tools.verification.measures import TOLERANCES, Tolerance, effect, tolerance_for
from bora_tools.verification.reference import read_prompts, reference_logits, tokenize
from bora_tools.verification.report import VerifyReport, build_logprob_report, build_report
from bora_tools.verification.vllm_engine import lora_rank, vllm_logprobs, vllm_python

#: A truncated LoRA may lose up to this many times to-lora's predicted error of the adapter's effect on the logits.
TRUNCATION_FACTOR = 4.0


def verify(output: str | Path, adapter: str | Path, *, base: str | Path | None = None,
           prompts: str | Path | None = None, tokens: int = 64, engine: str = "auto", precise: bool = False,
           max_kl: float | None = None, device: str = "auto", base_gguf: str | Path | None = None,
           progress: Progress = no_progress) -> VerifyReport:
    """Run ``output`` (a merged model, PEFT LoRA, GGUF model or GGUF LoRA) and compare it with ``adapter`` on ``base``.

    Args:
        output: what was made from the adapter: a model directory, a PEFT LoRA directory, a ``.gguf`` file
            (the first of a split, or any part of it), or a GGUF LoRA (with ``base_gguf``).
        adapter: the BoRA adapter directory.
        base: the base model (a folder or Hub id); default: the adapter's ``base_model_name_or_path``.
        prompts: a ``.jsonl`` file (the ``text`` of each record) or a text file (one prompt a line); default:
            a built-in set.
        tokens: each prompt is cut to this many tokens.
        engine: ``auto`` (the program that consumes the output), ``transformers``, ``peft``, ``llama.cpp`` or
            ``vllm`` (a PEFT LoRA, in vLLM's own venv: ``vllm_engine.vllm_python``).
        precise: a float64 reference (and transformers/PEFT outputs run in float64) instead of float32.
        max_kl: judge by mean KL(reference || output) <= ``max_kl`` instead of the output type's tolerance (not
            with vllm, which returns top-k log-probabilities, not logits).
        device: where the reference (and a transformers/PEFT output) runs: ``cpu``, ``cuda`` or ``auto``.
        base_gguf: the base model's GGUF, for a GGUF LoRA ``output``.

    Returns:
        ``VerifyReport``; ``report.passed`` is the verdict and ``report.failure`` the line saying why not.

    Raises:
        ValidationError: bad options, an output of no known kind, a GGUF LoRA without ``base_gguf``.
        UnsupportedError: ``engine`` vllm without vLLM, on an output other than a LoRA, or with ``max_kl``;
            the reference or the output does not fit in memory; vLLM fails.
        ConfigError, CheckpointError, ShapeError, ModelDirError, HubError: unreadable inputs.

    Example::

        report = verify("merged", "my-bora", base="base-model")
        report.passed, report.overall["max_rel_error"], print(report)
    """
    if engine not in ENGINES:
        raise ValidationError(f"`engine`: expected one of {', '.join(ENGINES)}, found {engine!r}")
    if not isinstance(tokens, int) or tokens < 1:
        raise ValidationError(f"`tokens`: expected a positive integer, found {tokens!r}")
    if max_kl is not None and not max_kl > 0:
        raise ValidationError(f"`max_kl`: expected a positive number, found {max_kl!r}")
    adapter = Path(adapter)
    wrong = wrong_kind(adapter, expected="adapter")
    if wrong is not None:
        raise ConfigError(f"`adapter` {wrong}")
    found = find_output(output, base_gguf=base_gguf)
    if base_gguf is not None and found.kind != "gguf-lora":
        raise ValidationError(f"`base_gguf` applies to a GGUF LoRA adapter; {found.path} is a {found.detail}")
    chosen = pick_engine(found, engine)
    python = None
    if chosen == "vllm":
        if max_kl is not None:
            raise UnsupportedError("`max_kl` with `engine` vllm: vLLM returns the log-probabilities of its top tokens, "
                                   "not logits, so no KL is measured")
        python = vllm_python()
        lora_rank(found.path)
    tolerance_for(found.type, max_kl=max_kl)  # a type without a known bound is refused before any work
    base_path = _base(adapter, base, progress=progress)
    dev = resolve_device(device)
    dtype = torch.float64 if precise else torch.float32

    texts, source = read_prompts(prompts)
    batch = tokenize(base_path, texts, tokens=tokens, source=source)
    refs, plain = reference_logits(adapter, base_path, batch, dtype=dtype, device=dev)
    moved = max(effect(r, p) for r, p in zip(refs, plain))
    fields = dict(output=str(found.path), kind=found.kind, type=found.type, engine=chosen, adapter=str(adapter),
                  base=str(base_path), reference_dtype=str(dtype).removeprefix("torch."), prompts_source=source,
                  effect=moved)
    if python is not None:
        served = vllm_logprobs(python, found.path, base_path, batch)
        vocab = refs[0].shape[-1]
        if any(tok >= vocab for prompt in served for position in prompt for tok in position):
            raise ValidationError(f"vLLM gives {found.path} tokens beyond the reference's vocabulary of {vocab}")
        return build_logprob_report(served, refs, tolerance=_tolerance(found, moved, max_kl=None, vllm=True),
                                    **fields)
    outs = run_output(found, chosen, batch, base=base_path, dtype=dtype, device=dev)
    for out, ref in zip(outs, refs):
        if out.shape != ref.shape:
            raise ValidationError(f"{found.path} gives logits of shape {tuple(out.shape)} where the reference gives "
                                  f"{tuple(ref.shape)}: a vocabulary of another size, not a model of this base")
    return build_report(outs, refs, tolerance=_tolerance(found, moved, max_kl=max_kl), **fields)


def _base(adapter: Path, base: str | Path | None, *, progress: Progress) -> Path:
    """The base model folder: ``base``, else what the adapter records; a Hub id is downloaded."""
    if base is None:
        recorded = read_json(adapter / CONFIG_NAME).get("base_model_name_or_path")
        if not isinstance(recorded, str) or not recorded:
            raise ValidationError(f"{adapter}: {CONFIG_NAME} records no base_model_name_or_path; give `base`")
        base = recorded
    return resolve_input(base, kind="model", progress=progress).path


def _tolerance(output: Output, moved: float, *, max_kl: float | None, vllm: bool = False) -> Tolerance:
    """The output type's tolerance; a truncated LoRA's grows with the error to-lora predicted for it. In vLLM,
    the bound on log-probabilities is twice the logits' (a logprob carries its logit's error and the
    normalizer's, ``logsumexp``, which is at most as large)."""
    tolerance = tolerance_for(output.type, max_kl=max_kl)
    predicted = (output.predicted or {}).get("max_rel_error") if output.kind == "lora" else None
    if max_kl is None and predicted:
        exact = TOLERANCES[output.type]
        tolerance = Tolerance("max_rel_error", TRUNCATION_FACTOR * predicted * moved + exact.bound,
                              f"a truncated LoRA: {TRUNCATION_FACTOR:g} x to-lora's predicted error {predicted:.3g} x "
                              f"the adapter's effect {moved:.3g}, + {exact.bound:g} ({output.type})")
    if vllm:
        return Tolerance("max_rel_logprob_error", 2 * tolerance.bound,
                         f"2 x the logits' bound {tolerance.bound:.3g}, {tolerance.source}")
    return tolerance
