"""``bora-tools demo``: the whole flow on a tiny model, offline, with proofs.

Each step is a function ``step_<name>(ctx)`` in ``STEPS``: it runs one
command's library function, checks the output in the program that consumes it,
and says what it proved. Steps record their figures in ``ctx.results``.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bora_tools.errors import BoraError
from bora_tools.progress import Progress, no_progress
from bora_tools.report import Report

DEMO_ARCH = "llama"
DEMO_RANK, DEMO_BLOCKS, DEMO_ALPHA = 4, 4, 8
GGUF_RTOL = 3e-3  # llama.cpp vs transformers, float32 files
DEMO_TEXT = "The quick brown fox jumps over the lazy dog. 3.14159 (a + b)"


@dataclass
class DemoContext:
    """What the steps share: paths, the adapted model, a fixed input and its logits."""

    workdir: Path
    steps: int = 60
    say: Callable[[str], None] = print
    progress: Progress = no_progress
    base_dir: Path | None = None
    adapter_dir: Path | None = None
    model: Any = None
    tokenizer: Any = None
    input_ids: torch.Tensor | None = None
    bora_logits: torch.Tensor | None = None
    results: dict[str, Any] = field(default_factory=dict)


def step_train(ctx: DemoContext) -> None:
    """Build a tiny llama with a tokenizer and train a BoRA adapter on it with ``bora-tools train``'s function."""
    import json

    from bora_tools.demo.tiny import TEXT, build_model, default_targets, save_model_dir
    from bora_tools.training import load_bora
    from bora_tools.training.sft import train

    ctx.base_dir = save_model_dir(build_model(DEMO_ARCH, seed=0), ctx.workdir / "base")
    from transformers import AutoTokenizer

    ctx.tokenizer = AutoTokenizer.from_pretrained(ctx.base_dir)
    data = ctx.workdir / "train.jsonl"
    data.write_text(json.dumps({"text": TEXT}) + "\n")
    targets = default_targets(DEMO_ARCH)
    report = train(ctx.base_dir, data, ctx.workdir / "bora-adapter", r=DEMO_RANK, blocks=DEMO_BLOCKS,
                   alpha=DEMO_ALPHA, target_modules=targets, max_steps=ctx.steps, lr=1e-2, scheduler="constant",
                   batch_size=1, logging_steps=1, device="cpu", seed=0, progress=ctx.progress)
    ctx.adapter_dir = report.out
    ctx.model = load_bora(build_model(DEMO_ARCH, seed=0), ctx.adapter_dir).eval()
    ctx.input_ids = ctx.tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
    with torch.no_grad():
        ctx.bora_logits = ctx.model(ctx.input_ids).logits.float()
    n_params = report.trainable_parameters
    ctx.results["train"] = {
        "loss_first": report.loss_first,
        "loss_last": report.loss_last,
        "steps": report.steps,
        "parameters": n_params,
    }
    ctx.say(
        f"[train]   tiny {DEMO_ARCH} ({report.total_parameters - n_params:,} frozen parameters), "
        f"BoRA b={DEMO_BLOCKS} r={DEMO_RANK} on {len(targets)} projection types, {n_params:,} trainable"
    )
    ctx.say(
        f"          loss {report.loss_first:.3f} -> {report.loss_last:.3f} in {report.steps} AdamW steps "
        f"(transformers Trainer, as bora-tools train); adapter saved to {ctx.adapter_dir.name}/"
    )


def step_inspect(ctx: DemoContext) -> None:
    """Inspect the saved adapter; the parameter count and ranks must follow from the shapes."""
    from bora_tools.inspection import inspect_adapter

    report = inspect_adapter(ctx.adapter_dir).to_dict()
    expected = sum(m["r"] * sum(m["shape"]) + m["b"] ** 2 * m["r"] for m in report["modules"])
    full_rank = all(m["rank"] == m["max_rank"] for m in report["modules"])
    if report["total_parameters"] != expected:
        raise BoraError(f"demo: inspect counted {report['total_parameters']} parameters, expected {expected}")
    ctx.results["inspect"] = {"modules": report["num_modules"], "parameters": report["total_parameters"]}
    ctx.say(
        f"[inspect] {report['num_modules']} modules, {report['total_parameters']:,} parameters = sum of r*(m+n)+b*b*r; "
        f"every update has rank {'b*r=' + str(DEMO_BLOCKS * DEMO_RANK) if full_rank else 'below b*r'} "
        f"(a LoRA of the same size reaches only r={DEMO_RANK})"
    )


def step_export_gguf(ctx: DemoContext) -> None:
    """Export the merged model and the adapter as GGUF; llama.cpp must give the BoRA model's logits."""
    from bora_tools.demo.llama_run import gguf_logits, gguf_tokenize, llama_cpp_available, relative_error
    from bora_tools.gguf.export import export_gguf

    merged, base, lora = (ctx.workdir / f"{n}.gguf" for n in ("merged", "base", "lora"))
    m = export_gguf(ctx.adapter_dir, merged, base=ctx.base_dir, merge=True, outtype="f32", progress=ctx.progress)
    m = m.to_dict()
    export_gguf(ctx.base_dir, base, outtype="f32", progress=ctx.progress)
    lo = export_gguf(
        ctx.adapter_dir, lora, base=ctx.base_dir, rank="full", outtype="f32", progress=ctx.progress
    ).to_dict()
    ranks = sorted({row["rank"] for row in lo["modules"]})
    ctx.say(
        f"[gguf]    merged model -> {merged.name} ({m['tensors']} tensors, {m['merged_tensors']} merged in one pass), "
        f"LoRA -> {lora.name} (exact rank {'/'.join(map(str, ranks))}, scaling folded in)"
    )
    if not llama_cpp_available():
        ctx.results["export-gguf"] = {"checked_in_llama_cpp": False}
        ctx.say("          llama-cpp-python is not installed: files written, not run (pip install 'bora-tools[test]')")
        return
    ids = ctx.input_ids[0].tolist()
    want = ctx.bora_logits[0].numpy()
    err_merged = relative_error(gguf_logits(merged, ids), want)
    err_lora = relative_error(gguf_logits(base, ids, lora_path=lora), want)
    same_tokens = gguf_tokenize(merged, DEMO_TEXT) == ctx.tokenizer(DEMO_TEXT).input_ids
    ctx.results["export-gguf"] = {
        "checked_in_llama_cpp": True,
        "merged_rel_error": err_merged,
        "lora_rel_error": err_lora,
        "same_tokens": same_tokens,
    }
    ctx.say(
        f"          llama.cpp logits vs the BoRA model: merged rel. error {err_merged:.1e}, base + LoRA "
        f"{err_lora:.1e} (bound {GGUF_RTOL:g}); tokenization {'identical' if same_tokens else 'DIFFERS'}"
    )
    if max(err_merged, err_lora) > GGUF_RTOL or not same_tokens:
        raise BoraError("demo: llama.cpp does not reproduce the BoRA model within the bound")


def step_merge(ctx: DemoContext) -> None:
    """Merge the adapter into the base; transformers must give the adapted model's logits."""
    from transformers import AutoModelForCausalLM

    from bora_tools.merge import merge_adapter

    out = ctx.workdir / "merged"
    report = merge_adapter(ctx.adapter_dir, ctx.base_dir, out, device="cpu")
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        err = float((merged(ctx.input_ids).logits.float() - ctx.bora_logits).abs().max())
    if err > 1e-4:
        raise BoraError(f"demo: merged logits differ from the BoRA model's by {err:.2e} (> 1e-4)")
    ctx.results["merge"] = {"max_abs_logit_error": err, "merged": report.merged, "copied": report.copied}
    ctx.say(
        f"[merge]   {report.merged} weights got W + dW (float32, rounded once), {report.copied} copied as raw bytes; "
        f"transformers loads {out.name}/ and its logits match the BoRA model's within {err:.1e} (max abs)"
    )


def step_to_lora(ctx: DemoContext) -> None:
    """Convert the adapter to PEFT LoRA at full rank (exact) and at rank r (optimal); prove both in PEFT."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from bora_tools.core.factors import delta_weight
    from bora_tools.to_lora import to_lora

    figures = {}
    for label, rank in (("full", "full"), ("truncated", DEMO_RANK)):
        out = ctx.workdir / f"lora-{label}"
        report = to_lora(ctx.adapter_dir, out, rank=rank, device="cpu").to_dict()
        base = AutoModelForCausalLM.from_pretrained(ctx.base_dir, dtype=torch.float32)
        with warnings.catch_warnings():  # PEFT 0.21 calls a transformers 5 API that warns of its own deprecation
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            peft_model = PeftModel.from_pretrained(base, str(out)).eval()
        with torch.no_grad():
            logit_err = float((peft_model(ctx.input_ids).logits.float() - ctx.bora_logits).abs().max())
        worst = _peft_vs_report(peft_model, ctx.model, report, delta_weight)
        figures[label] = {
            "rank": report["peft"]["r"],
            "max_abs_logit_error": logit_err,
            "max_rel_error": report["totals"]["max_rel_error"],
            "mean_rel_error": report["totals"]["mean_rel_error"],
            "min_energy": report["totals"]["min_energy"],
            "parameters": report["totals"]["parameters_after"],
            "peft_error_mismatch": worst,
        }
    full, cut = figures["full"], figures["truncated"]
    if full["max_abs_logit_error"] > 1e-4:
        raise BoraError(
            f"demo: PEFT logits of the exact LoRA differ from the BoRA model's by {full['max_abs_logit_error']:.2e}"
        )
    ctx.results["to-lora"] = figures
    ctx.say(
        f"[to-lora] exact form: PEFT loads a rank-{full['rank']} (b*r) LoRA whose logits match the BoRA model's "
        f"within {full['max_abs_logit_error']:.1e} (max abs)"
    )
    ctx.say(
        f"          rank {cut['rank']} (same r as the BoRA adapter): relative Frobenius error worst "
        f"{cut['max_rel_error']:.3f}, mean {cut['mean_rel_error']:.3f}, energy retained >= {cut['min_energy']:.3f}, "
        f"{cut['parameters']:,} parameters; logits move by {cut['max_abs_logit_error']:.2f}"
    )
    ctx.say(
        f"          PEFT's own updates have the reported (Eckart-Young optimal) errors within "
        f"{max(full['peft_error_mismatch'], cut['peft_error_mismatch']):.1e} (checked against a dense float64 dW; "
        f"the conversion itself never forms dW)"
    )


def _peft_vs_report(peft_model, bora_model, report: dict, delta_weight) -> float:
    """Largest gap between the relative error PEFT's update really has and the one the report states."""
    from peft.tuners.lora import LoraLayer

    from bora_tools.training import bora_modules

    layers = {n: m for n, m in peft_model.base_model.model.named_modules() if isinstance(m, LoraLayer)}
    stated = {m["name"]: m["rel_error"] for m in report["modules"]}
    worst = 0.0
    with torch.no_grad():
        for name, bora in bora_modules(bora_model).items():
            dw = delta_weight(bora.lora_A, bora.lora_B, bora.bora_sigma, bora.scaling, dtype=torch.float64)
            lora = layers[name]
            got = (
                lora.scaling["default"]
                * lora.lora_B["default"].weight.double()
                @ lora.lora_A["default"].weight.double()
            )
            worst = max(worst, abs(float((dw - got).norm() / dw.norm()) - stated[name]))
    return worst


DEMO_HUB_OWNER = "your-name"  # a placeholder namespace: the demo never contacts a Hub


def step_push(ctx: DemoContext) -> None:
    """Build the model cards ``bora-tools push`` would write, parse them back, print the push commands.

    Pushing needs a Hub, so nothing is uploaded: the cards are the part of ``push`` that can be
    proven offline (metadata the Hub reads, no local path leaked, the same card on every run).
    """
    from bora_tools.hub.push import build_model_card, upload_files

    # The demo's base model exists only on this disk, so the cards name it with --base-model, as a
    # user whose base is a local copy would; the adapter's own base_model_name_or_path is a path.
    base_id = f"{DEMO_HUB_OWNER}/tiny-{DEMO_ARCH}"
    commands, figures = [], {}
    for name, repo, library, relation in (
        ("merged", "tiny-bora-merged", "transformers", "finetune"),
        ("lora-full", "tiny-bora-lora", "peft", "adapter"),
    ):
        path, repo_id = ctx.workdir / name, f"{DEMO_HUB_OWNER}/{repo}"
        card = str(build_model_card(path, repo_id=repo_id, base_model=base_id))
        meta = _check_card(
            card,
            [str(ctx.workdir.resolve()), str(ctx.base_dir)],
            repo_id=repo_id,
            library=library,
            relation=relation,
            base=base_id,
        )
        if card != str(build_model_card(path, repo_id=repo_id, base_model=base_id)):
            raise BoraError(f"demo: the model card for {name}/ changes from one build to the next")
        files = upload_files(path)
        size = sum(local.stat().st_size for _, local in files)
        figures[name] = {"repo_id": repo_id, "files": len(files) + 1, "bytes": size + len(card.encode()), **meta}
        commands.append(
            (
                f"bora-tools push {name} {repo_id} --base-model {base_id}",
                f"{len(files)} files ({size / 1024:,.0f} KB) + card: library_name={library}, "
                f"base_model_relation={relation}",
            )
        )
    ctx.results["push"] = {
        "uploaded": False,
        "base_model": base_id,
        "cards": figures,
        "commands": [c for c, _ in commands],
    }
    ctx.say(
        "[push]    not run (it needs a Hub); the model cards it would add parse back with huggingface_hub's "
        "ModelCard, carry no local path and are the same on every build:"
    )
    width = max(len(c) for c, _ in commands)
    for command, what in commands:
        ctx.say(f"          {command:<{width}}  # {what}")


def _check_card(card: str, local_paths: list[str], *, repo_id: str, library: str, relation: str, base: str) -> dict:
    """The card's metadata as huggingface_hub parses it; raises when it is not what push must write."""
    from huggingface_hub import ModelCard

    meta = ModelCard(card).data.to_dict()
    got = (meta.get("library_name"), meta.get("base_model"), meta.get("base_model_relation"))
    problems = [f"metadata {got} instead of {(library, base, relation)}"] if got != (library, base, relation) else []
    if "bora-tools" not in meta.get("tags", []):
        problems.append(f"tags {meta.get('tags')} lack bora-tools")
    if repo_id not in ModelCard(card).text:
        problems.append(f"the usage example does not name {repo_id}")
    problems += [f"a local path ({p}) leaked into the card" for p in local_paths if p in card]
    if problems:
        raise BoraError(f"demo: the model card for {repo_id}: {'; '.join(problems)}")
    return {k: meta[k] for k in ("library_name", "base_model", "base_model_relation", "tags") if k in meta}


@dataclass
class DemoReport(Report):
    """The figures each demo step recorded (``to_dict()``), and the closing line (``to_text()``)."""

    results: dict[str, Any]
    seconds: float
    workdir: str | None = None  # where the files were kept, if they were

    def to_dict(self) -> dict[str, Any]:
        return self.results

    def to_text(self) -> str:
        return f"demo done in {self.seconds:.1f} s" + (f"; files in {self.workdir}" if self.workdir else "")


# Steps are registered above this line.

STEPS: list[Callable[[DemoContext], None]] = [
    step_train,
    step_inspect,
    step_merge,
    step_to_lora,
    step_export_gguf,
    step_push,
]


def run_demo(
    *,
    workdir: str | Path | None = None,
    steps: int = 60,
    say: Callable[[str], None] = print,
    progress: Progress = no_progress,
) -> DemoReport:
    """Run every demo step, saying what each proved; returns the figures each step recorded.

    ``workdir`` keeps the files (it must be empty or absent); by default a
    temporary directory is used and removed.
    """
    with contextlib.ExitStack() as stack:
        if workdir is None:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bora-demo-")))
        else:
            root = Path(workdir)
            if root.exists() and any(root.iterdir()):
                raise BoraError(f"demo workdir {root} is not empty", hint="give a new or empty directory")
            root.mkdir(parents=True, exist_ok=True)
        ctx = DemoContext(workdir=root, steps=steps, say=say, progress=progress)
        start = time.perf_counter()
        for step in STEPS:
            step(ctx)
        return DemoReport(
            results=ctx.results, seconds=time.perf_counter() - start, workdir=str(root) if workdir else None
        )
