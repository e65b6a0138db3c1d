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
from safetensors import SafetensorError

from bora_tools.demo.verify_step import step_verify
from bora_tools.errors import BoraError, OutputWriteError
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
    shown_root: str = "WORKDIR"  # how paths are shown in the printed commands: the --workdir as typed

    def shown(self, path: Path) -> str:
        """``path`` (inside the workdir) as the user would type it."""
        return f"{self.shown_root.rstrip('/')}/{path.relative_to(self.workdir).as_posix()}"

    def command(self, *words: str | Path) -> None:
        """Print the CLI command a step stands for (runnable once the demo ran with --workdir)."""
        shown = [self.shown(w) if isinstance(w, Path) else w for w in words]
        self.say("          $ bora-tools " + " ".join(shown))


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
        f"[train]   a tiny {DEMO_ARCH} model ({report.total_parameters - n_params:,} frozen parameters) learns a "
        f"short text through a BoRA adapter (b={DEMO_BLOCKS} blocks, r={DEMO_RANK}, {n_params:,} trainable "
        f"parameters) with transformers' Trainer, and its error on it falls (loss {report.loss_first:.3f} -> "
        f"{report.loss_last:.3f} in {report.steps} steps)"
    )
    ctx.command("train", "--base", ctx.base_dir, "--data", data, "--out", ctx.adapter_dir, "-r", str(DEMO_RANK),
                "--blocks", str(DEMO_BLOCKS), "--alpha", str(DEMO_ALPHA), "--max-steps", str(ctx.steps), "--lr", "0.01",
                "--scheduler", "constant", "--batch-size", "1", "--overwrite")


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
        f"[inspect] the adapter's parameter count follows from its shapes (r*(m+n) + b*b*r per module: "
        f"{report['total_parameters']:,} in {report['num_modules']} modules); "
        + (f"every update reaches rank b*r (= {DEMO_BLOCKS * DEMO_RANK}), where a LoRA of the same size reaches "
           f"only r (= {DEMO_RANK})" if full_rank else f"updates have rank up to b*r (= {DEMO_BLOCKS * DEMO_RANK})")
    )
    ctx.command("inspect", ctx.adapter_dir)


def step_export_gguf(ctx: DemoContext) -> None:
    """Export the merged model and the adapter as GGUF; llama.cpp must give the BoRA model's logits."""
    from bora_tools.gguf.export import export_gguf
    from bora_tools.gguf.llama_run import gguf_logits, gguf_tokenize, llama_cpp_available, relative_error

    merged, base, lora = (ctx.workdir / f"{n}.gguf" for n in ("merged", "base", "lora"))
    m = export_gguf(ctx.adapter_dir, merged, base=ctx.base_dir, merge=True, outtype="f32", progress=ctx.progress)
    m = m.to_dict()
    export_gguf(ctx.base_dir, base, outtype="f32", progress=ctx.progress)
    lo = export_gguf(
        ctx.adapter_dir, lora, base=ctx.base_dir, rank="full", outtype="f32", progress=ctx.progress
    ).to_dict()
    ranks = sorted({row["rank"] for row in lo["modules"]})
    ctx.say(
        f"[gguf]    llama.cpp files: the merged model ({m['merged_tensors']} of {m['tensors']} tensors merged in one "
        f"pass), the base, and the adapter as a GGUF LoRA (exact, rank {'/'.join(map(str, ranks))})"
    )
    ctx.command("export-gguf", ctx.adapter_dir, "--base", ctx.base_dir, "--merge", "--out", merged, "--outtype", "f32",
                "--overwrite")
    ctx.command("export-gguf", ctx.base_dir, "--out", base, "--outtype", "f32", "--overwrite")
    ctx.command("export-gguf", ctx.adapter_dir, "--base", ctx.base_dir, "--out", lora, "--outtype", "f32",
                "--overwrite")
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
        f"          llama.cpp gives the BoRA model's outputs with the merged file (relative error {err_merged:.1e}) "
        f"and with base + LoRA ({err_lora:.1e}; bound {GGUF_RTOL:g}), and splits text into the same tokens "
        f"({'identical' if same_tokens else 'DIFFERENT'})"
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
        f"[merge]   the merged model loads in transformers and gives the adapted model's outputs (largest logit "
        f"difference {err:.1e}; {report.merged} weights merged, {report.copied} copied unchanged)"
    )
    ctx.command("merge", ctx.adapter_dir, "--base", ctx.base_dir, "--out", out, "--overwrite")


def step_to_lora(ctx: DemoContext) -> None:
    """Convert the adapter to PEFT LoRA at full rank (exact) and at rank r (optimal); prove both in PEFT."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from bora_tools.conversion import to_lora
    from bora_tools.core.factors import delta_weight

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
        f"[to-lora] as a plain PEFT LoRA of rank b*r (= {full['rank']}), the adapter loses nothing: PEFT gives the "
        f"BoRA model's outputs (largest logit difference {full['max_abs_logit_error']:.1e})"
    )
    ctx.command("to-lora", ctx.adapter_dir, "--out", ctx.workdir / "lora-full", "--overwrite")
    ctx.say(
        f"          cut to rank {cut['rank']}, it is the best LoRA of that rank, with a known error (relative error "
        f"of the update: worst {cut['max_rel_error']:.3f}, mean {cut['mean_rel_error']:.3f}; outputs move by "
        f"{cut['max_abs_logit_error']:.2f}); PEFT's updates have exactly the reported errors (within "
        f"{max(full['peft_error_mismatch'], cut['peft_error_mismatch']):.1e})"
    )
    ctx.command("to-lora", ctx.adapter_dir, "--out", ctx.workdir / "lora-truncated", "--rank", str(DEMO_RANK),
                "--overwrite")


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
                f"bora-tools push {ctx.shown(path)} {repo_id} --base-model {base_id}",
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
        "[push]    not run (it needs a Hub account); the model cards it would add are valid for the Hub, name no "
        "local path and are the same on every build:"
    )
    for command, what in commands:
        ctx.say(f"          $ {command}   # {what}")


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
        from bora_tools.report import human_seconds

        if self.workdir:
            return (f"demo done in {human_seconds(self.seconds)}; files in {self.workdir}: run the commands above "
                    "on them")
        return (f"demo done in {human_seconds(self.seconds)}; its files were temporary and are gone: run "
                "'bora-tools demo --workdir DIR' to keep them and run the commands above yourself")


# Steps are registered above this line.

STEPS: list[Callable[[DemoContext], None]] = [
    step_train,
    step_inspect,
    step_merge,
    step_to_lora,
    step_export_gguf,
    step_verify,
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
            created = not root.exists()
            root.mkdir(parents=True, exist_ok=True)
            stack.push(lambda kind, _e, _tb: _clean_after_failure(root, created=created, failed=kind is not None))
        ctx = DemoContext(workdir=root, steps=steps, say=say, progress=progress,
                          shown_root=str(workdir) if workdir is not None else "WORKDIR")
        start = time.perf_counter()
        for step in STEPS:
            try:
                step(ctx)
            except (OSError, SafetensorError) as e:  # the workdir's disk (full, read-only): one line
                if isinstance(e, BoraError):
                    raise
                why = e.strerror if isinstance(e, OSError) and e.strerror else " ".join(str(e).split())
                raise OutputWriteError(f"demo workdir {root}: writing failed ({why})") from e
        return DemoReport(
            results=ctx.results, seconds=time.perf_counter() - start, workdir=str(root) if workdir else None
        )


def _clean_after_failure(root: Path, *, created: bool, failed: bool) -> bool:
    """After a failure or Ctrl-C, remove what the demo wrote, so that a rerun with the same --workdir works."""
    import shutil

    if failed and created:
        shutil.rmtree(root, ignore_errors=True)
    elif failed:  # it was empty before the demo
        for p in root.iterdir():
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
    return False  # the exception goes on
