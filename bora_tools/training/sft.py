"""Supervised fine-tuning with a BoRA adapter on ``transformers.Trainer``: what ``bora-tools train`` runs.

``train`` checks everything it can before any work (parameters, the output, the
data file line by line, the target modules and ``b`` against the model's shapes
read from its config), then tokenizes, loads the base, adds BoRA layers and
hands the model to a plain ``transformers.Trainer``. It runs unchanged under
``torchrun`` / ``accelerate launch`` (DDP): every process trains on its share of
each global batch, and only the main process writes, atomically.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bora_tools.core.config import BoraConfig
from bora_tools.core.devices import resolve_device
from bora_tools.core.dtypes import parse_dtype
from bora_tools.errors import ModelDirError, UnsupportedError, ValidationError, raise_if_problems
from bora_tools.io.atomic import check_target, check_writable, refuse_output_over_inputs
from bora_tools.io.hub_input import hub_or_local
from bora_tools.progress import Progress, logger, no_progress
from bora_tools.report import Report, human_seconds
from bora_tools.training import base_model, evaluation, fsdp, guards, packing, quantized, reporting, resume
from bora_tools.training import data as sft_data
from bora_tools.training.base_model import default_target_modules
from bora_tools.training.model import add_bora, save_bora, trainable_parameters
from bora_tools.training.options import TrainOptions

__all__ = ["FinishedRun", "TrainReport", "default_target_modules", "is_main_process", "train"]


@dataclass
class TrainReport(Report):
    """What a training run did (``--json`` prints ``to_dict()``)."""

    out: Path
    base: str
    data: str
    examples: int
    steps: int
    epochs: float
    tokens: int  # non-padding input tokens seen by all processes
    loss_first: float
    loss_last: float
    seconds: float
    trainable_parameters: int
    total_parameters: int
    r: int
    blocks: int
    target_modules: list[str]
    modules: int
    processes: int
    global_batch: int
    dtype: str
    device: str
    checkpoints: Path | None = None
    resumed_from: str | None = None
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss) as logged
    eval_examples: int = 0
    eval_loss: float | None = None  # at the end of the run
    eval_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, eval loss), every `eval_steps`
    packed_rows: int | None = None  # with `packing`: the rows the examples were packed into
    pushed: dict | None = None  # `bora-tools train --push-to-hub`: what push reported
    logging_dir: Path | None = None  # with `report_to` tensorboard: where the event files are

    def to_text(self) -> str:
        resumed = f", resumed from {self.resumed_from}" if self.resumed_from else ""
        lines = [
            f"trained {self.out}: BoRA b={self.blocks} r={self.r} on {self.modules} modules "
            f"({', '.join(self.target_modules)}), {self.trainable_parameters:,} trainable of "
            f"{self.total_parameters:,} parameters",
            f"{self.steps} steps ({self.epochs:.2f} epochs of {self.examples} examples, global batch "
            f"{self.global_batch} on {self.processes} process(es), {self.dtype} on {self.device}){resumed}",
            f"loss {self.loss_first:.4f} -> {self.loss_last:.4f}; {self.tokens:,} tokens in "
            f"{human_seconds(self.seconds)}",
        ]
        if self.packed_rows is not None:
            lines.append(f"packed into {self.packed_rows} rows of at most max_length tokens")
        if self.eval_loss is not None:
            lines.append(f"eval loss {self.eval_loss:.4f} on {self.eval_examples} examples")
        if self.logging_dir is not None:
            lines.append(f"tensorboard logs in {self.logging_dir}")
        if self.pushed is not None:
            lines.append(f"pushed to {self.pushed['repo_id']}: {self.pushed['commit_url']}")
        if self.checkpoints:
            lines.append(f"checkpoints in {self.checkpoints}")
        return "\n".join(lines)


def train(
    base: str | Path,
    data: str | Path,
    out: str | Path,
    options: TrainOptions | None = None,
    *,
    device: str = "auto",
    overwrite: bool = False,
    base_name: str | None = None,
    log: Callable[[str], None] | None = None,
    progress: Progress = no_progress,
    token: str | None = None,
    **hyperparameters: Any,
) -> TrainReport:
    """Fine-tune a BoRA adapter on ``base`` with the JSONL ``data``; write it to ``out``.

    ``options`` holds the hyperparameters (``TrainOptions``: rank, blocks, learning rate, steps,
    checkpoints, ...); any of its fields may also be given as a keyword, over ``options`` or the
    defaults. ``base`` may be a Hub id (``owner/name[@revision]``, read with ``token``). ``device`` is
    where training runs (``auto``: CUDA when present); ``base_name`` is what the adapter records as its
    base (default: the Hub id, else the ``base`` path). ``log`` receives one line per
    logging step (step, loss, learning rate) on the main process; ``progress`` wraps the steps.

    Example::

        report = train("Llama-3.2-1B", "chats.jsonl", "my-bora", r=8, blocks=4, epochs=2, lr=2e-4)
        report = train("Llama-3.2-1B", "chats.jsonl", "my-bora", TrainOptions(r=8, epochs=2), device="cuda")
        print(report)

    Returns:
        A ``TrainReport``; or, when ``resume`` finds the run already finished (its checkpoint at or past the
        planned steps), a ``FinishedRun`` and nothing trained or written.

    Raises:
        ValidationError: a bad or unknown option, an unreadable or empty data file, records of the
            wrong shape (line numbers named), target modules that match nothing, ``blocks`` not
            dividing a target's dimensions, a checkpoint that does not fit this run.
        OutputExistsError: ``out`` exists and ``overwrite`` is false.
        ModelDirError, UnsupportedError: the base cannot be read or trained here, or is not what its
            config says (a weight missing or left over at load).
        OutputWriteError: ``out``'s parent or the checkpoint directory cannot be written.
    """
    start = time.perf_counter()
    if options is not None and not isinstance(options, TrainOptions):
        raise ValidationError(f"`options`: expected a TrainOptions, found {type(options).__name__}")
    found = hub_or_local(base, kind="model", token=token)
    base_name = base_name or found.repo_id
    run = _prepare(found.path, Path(data), Path(out), TrainOptions.from_dict(hyperparameters, base=options),
                   device=device, overwrite=overwrite, base_name=base_name)
    if isinstance(run, FinishedRun):
        return run
    trainer, losses, counts, run_dtype, evals = _fit(run, log=log, progress=progress)
    o, state, world = run.options, trainer.state, trainer.args.world_size
    return TrainReport(
        out=run.out, base=str(run.base), data=str(run.data), examples=run.examples, steps=state.global_step,
        epochs=float(state.epoch or 0.0), tokens=int(state.num_input_tokens_seen),
        loss_first=losses[0][1] if losses else float("nan"), loss_last=losses[-1][1] if losses else float("nan"),
        seconds=time.perf_counter() - start, trainable_parameters=counts.trainable, total_parameters=counts.total,
        r=o.r, blocks=o.blocks, target_modules=list(run.targets) if isinstance(run.targets, list) else [run.targets],
        modules=run.modules, processes=world, global_batch=o.batch_size * o.grad_accum * world,
        dtype=str(run_dtype).replace("torch.", ""), device=str(trainer.args.device),
        checkpoints=run.checkpoint_dir if o.save_steps else None,
        resumed_from=str(run.resume) if run.resume else None, losses=losses,
        eval_examples=len(run.eval_rows), eval_loss=evals[-1][1] if evals else None, eval_losses=evals,
        packed_rows=len(run.rows) if o.packing else None, logging_dir=run.logging_dir,
    )


@dataclass
class FinishedRun(Report):
    """``resume`` found the run already finished: nothing was trained and nothing written."""

    out: Path
    checkpoint: Path
    step: int
    planned_steps: int

    def to_text(self) -> str:
        where = (f"{self.out} is left as it is" if self.out.exists()
                 else f"its adapter is in {self.checkpoint} ({self.out} not written)")
        return (f"the run is already finished: {self.checkpoint} is at step {self.step} of {self.planned_steps}; "
                f"nothing trained, {where}")


@dataclass
class _Run:
    """A training run with everything checked: what ``_fit`` needs, and nothing left to refuse."""

    base: Path
    data: Path
    out: Path
    options: TrainOptions
    overwrite: bool
    device: torch.device
    dtype: torch.dtype | None  # None: as stored
    checkpoint_dir: Path
    config: BoraConfig
    targets: list[str] | str
    modules: int
    resume: Path | None
    examples: int  # tokenized examples trained on
    rows: list  # what the trainer iterates: the examples, or their packed rows
    eval_rows: list
    pad: int
    tokenizer: Any
    logging_dir: Path | None  # with `report_to` tensorboard


def _prepare(base: Path, data: Path, out: Path, o: TrainOptions, *, device: str, overwrite: bool,
             base_name: str | None) -> _Run | FinishedRun:
    """Every check ``train`` can make before any work: options, paths, data, targets, dtype, checkpoints."""
    problems = o.problems()
    if o.resume is not None and overwrite:
        problems.append("`resume` and `overwrite` together: resuming keeps the checkpoints that overwrite would clear")
    raise_if_problems("train", problems)
    quantized.check(o)
    o = fsdp.check(o)
    if not base.is_dir():
        raise ModelDirError(f"`base` {base}: not a model directory")
    for name, path in (("data", data), ("eval_data", o.eval_data)):
        if path is not None:
            guards.check_data_file(Path(path), name=name)
    torch_dtype = parse_dtype(o.dtype, allow_auto=True)
    dev = resolve_device(device)
    if o.resume is None:
        check_target(out, overwrite=overwrite)
    refuse_output_over_inputs(out, base, data, *([o.eval_data] if o.eval_data is not None else []))
    ckpt_dir = Path(o.checkpoint_dir) if o.checkpoint_dir is not None else out.parent / f"{out.name}-checkpoints"
    if overwrite:
        guards.check_overwrite(out, ckpt_dir if o.save_steps is not None else None)
    if o.save_steps is not None or o.resume is not None:
        guards.checkpoint_dir_names(ckpt_dir, given=o.checkpoint_dir is not None)
        refuse_output_over_inputs(ckpt_dir, base, data)
        if ckpt_dir.resolve().is_relative_to(out.resolve()) or out.resolve().is_relative_to(ckpt_dir.resolve()):
            raise ValidationError(f"`checkpoint_dir` {ckpt_dir} and `out` {out} overlap; OUT appears only when "
                                  f"training is done", hint="give the checkpoints a directory of their own")
    if o.save_steps is not None:
        check_writable(ckpt_dir, what=f"`checkpoint_dir` {ckpt_dir}")
    logs = reporting.logging_dir(o, checkpoint_dir=ckpt_dir, out=out, base=base, data=data)
    records = _read(data)
    eval_records = _read(Path(o.eval_data)) if o.eval_data is not None else []
    config_hf = base_model.read_config(base)
    targets, n_modules, _ = base_model.check_targets(config_hf, o.target_modules, o.blocks, base, r=o.r)
    base_model.check_weights(base)
    config = BoraConfig(r=o.r, bora_blocks=o.blocks, lora_alpha=o.alpha, use_rslora=o.rslora, target_modules=targets,
                        task_type="CAUSAL_LM", base_model_name_or_path=base_name or str(base))
    stored = getattr(config_hf, "dtype", None) or getattr(config_hf, "torch_dtype", None)
    if (torch_dtype or stored) in (torch.float16, "float16") and dev.type != "cuda":
        raise UnsupportedError(f"`dtype` float16 training needs a CUDA device ({base} would train in float16 on "
                               f"{dev.type})", hint="pass `dtype` float32 or bfloat16")
    resume_path = resume.resolve(o.resume, ckpt_dir, save_steps=o.save_steps, overwrite=overwrite)
    step = resume.check(resume_path, config) if resume_path is not None else 0
    tokenizer = base_model.load_tokenizer(base)
    examples = _tokenize(records, tokenizer, o, data, base=base)
    eval_rows = _tokenize(eval_records, tokenizer, o, Path(o.eval_data), base=base, name="eval_data") if eval_records \
        else []
    if o.eval_fraction is not None:
        examples, eval_rows = evaluation.split(examples, o.eval_fraction, seed=o.seed, data=data)
    rows = packing.pack(examples, o.max_length) if o.packing else examples
    if resume_path is not None:
        planned = resume.planned_steps(len(rows), batch_size=o.batch_size, grad_accum=o.grad_accum, epochs=o.epochs,
                                       max_steps=o.max_steps, world=int(os.environ.get("WORLD_SIZE", "1")))
        if step >= planned:
            return FinishedRun(out=out, checkpoint=resume_path, step=step, planned_steps=planned)
        check_target(out, overwrite=overwrite)
    if tokenizer.pad_token_id is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    else:
        pad = tokenizer.pad_token_id
    return _Run(base=base, data=data, out=out, options=o, overwrite=overwrite, device=dev, dtype=torch_dtype,
                checkpoint_dir=ckpt_dir, config=config, targets=targets, modules=n_modules, resume=resume_path,
                examples=len(examples), rows=rows, eval_rows=eval_rows, pad=pad, tokenizer=tokenizer,
                logging_dir=logs)


def _read(path: Path) -> list:
    sft_data.check_record_sizes(path)
    return sft_data.read_records(path)


def _tokenize(records: list, tokenizer, o: TrainOptions, path: Path, *, base: Path, name: str = "data") -> list:
    """Tokenized examples of ``records`` (the file ``name`` at ``path``), with the template and the cut checked."""
    sft_data.check_chat_template(records, tokenizer, source=str(base))
    examples, stats = sft_data.tokenize(records, tokenizer, max_length=o.max_length)
    if not examples:
        raise ValidationError(f"`{name}` {path}: no record keeps a token to learn within `max_length` {o.max_length}")
    if stats.dropped:
        logger.warning(f"`{name}` {path}: {len(stats.dropped)} record(s) left without a completion token within "
                       f"`max_length` {o.max_length} are skipped (first: line {stats.dropped[0]})")
    return examples


def _fit(run: _Run, *, log: Callable[[str], None] | None, progress: Progress):
    """Load the base, add BoRA, train with a plain ``transformers.Trainer``, save the adapter (main process).

    Returns the trainer (its state and arguments), the logged ``(step, loss)`` pairs, the parameter counts
    and the dtype the base trained in.
    """
    from transformers import Trainer
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    o, ckpt_dir = run.options, run.checkpoint_dir
    model = quantized.load_base(run.base, o, dtype=run.dtype, device=run.device)
    run_dtype = next(model.parameters()).dtype
    torch.manual_seed(o.seed)  # the same initial A on every process (DDP also broadcasts rank 0's)
    quantized.prepare_for_training(add_bora(model, run.config, dropout=o.dropout))
    counts = trainable_parameters(model)
    # Without checkpoints the trainer still wants a directory of its own: a temporary one, removed afterwards.
    scratch = None if o.save_steps else tempfile.TemporaryDirectory(prefix="bora-train-")
    args = _training_arguments(run, str(ckpt_dir) if scratch is None else scratch.name, run_dtype=run_dtype)
    losses: list[tuple[int, float]] = []
    evals: list[tuple[int, float]] = []
    reporter = _reporter(losses, evals, log, progress)
    collator = packing.PackedCollator() if o.packing else sft_data.Collator(run.pad)
    trainer_cls = fsdp.trainer_class() if o.fsdp else Trainer
    trainer = trainer_cls(model=model, args=args, train_dataset=run.rows, eval_dataset=run.eval_rows or None,
                          data_collator=collator, callbacks=[reporter, guards.kept_checkpoints(run.out)])
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    reporting.direct(trainer, run.logging_dir)
    main = trainer.accelerator.is_main_process
    if o.save_steps and run.resume is None and run.overwrite and main and ckpt_dir.is_dir():
        # An earlier run's checkpoint-N directories, and nothing else of the directory: only the main
        # process writes checkpoints, so only it clears them.
        for old in ckpt_dir.glob("checkpoint-*"):
            if old.is_dir() and not old.is_symlink() and old.name.split("-", 1)[1].isdigit():
                shutil.rmtree(old)
    try:
        trainer.train(resume_from_checkpoint=str(run.resume) if run.resume else None)
        reporter.close()
        if run.eval_rows and not o.eval_steps:
            # the final eval loss (with `eval_steps` the trainer computes it at the last step itself); decided
            # alike on every process (evaluate is collective under DDP), logged by the reporter on the main one
            trainer.evaluate()
        state = fsdp.full_adapter_state(model) if o.fsdp else None  # every rank: a collective gather
        if main:
            save_bora(model, run.out, overwrite=run.overwrite, state_dict=state, tokenizer=run.tokenizer)
        trainer.accelerator.wait_for_everyone()
    finally:
        if scratch is not None:
            scratch.cleanup()
    return trainer, losses, counts, run_dtype, evals


def _training_arguments(run: _Run, output_dir: str, *, run_dtype: torch.dtype):
    """``transformers.TrainingArguments`` for the run: its options, and what a BoRA adapter run always sets."""
    from transformers import TrainingArguments

    o = run.options
    total_steps_hint = o.max_steps or max(1, math.ceil(len(run.rows) / o.batch_size / o.grad_accum * o.epochs))
    return TrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=o.batch_size, gradient_accumulation_steps=o.grad_accum,
        num_train_epochs=o.epochs, max_steps=o.max_steps if o.max_steps is not None else -1,
        learning_rate=o.lr, lr_scheduler_type=o.scheduler, warmup_steps=o.warmup_steps, weight_decay=0.0,
        logging_steps=o.logging_steps or max(1, total_steps_hint // 20), logging_first_step=True,
        save_strategy="steps" if o.save_steps else "no", save_steps=o.save_steps or 500,
        seed=o.seed, data_seed=o.seed,
        bf16=run_dtype == torch.bfloat16, fp16=run_dtype == torch.float16, use_cpu=run.device.type == "cpu",
        **{_checkpointing_argument(TrainingArguments): o.gradient_checkpointing},
        report_to=o.report_to, disable_tqdm=True, remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding", dataloader_num_workers=0, ddp_find_unused_parameters=False,
        save_only_model=False, eval_strategy="steps" if o.eval_steps else "no", eval_steps=o.eval_steps,
        per_device_eval_batch_size=o.batch_size, prediction_loss_only=True,
    )


def _checkpointing_argument(arguments_cls) -> str:
    """``activation_checkpointing`` from transformers 5.24 on, ``gradient_checkpointing`` before."""
    fields = getattr(arguments_cls, "__dataclass_fields__", {})
    return "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"


def _reporter(losses: list, evals: list, log: Callable[[str], None] | None, progress: Progress):
    """A ``TrainerCallback`` (defined here: transformers is imported only when training) for losses and progress."""
    from transformers import TrainerCallback

    class Reporter(TrainerCallback):
        def __init__(self):
            self.bar = None
            self.t0 = time.perf_counter()

        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                self.bar = iter(progress(range(state.max_steps), total=state.max_steps, label="training"))
                for _ in range(state.global_step):  # resumed: the steps already done
                    next(self.bar, None)

        def on_step_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                next(self.bar, None)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs and "eval_loss" in logs:
                evals.append((state.global_step, float(logs["eval_loss"])))
                if log is not None:
                    log(f"step {state.global_step}/{state.max_steps}  eval loss {logs['eval_loss']:.4f}")
            if not state.is_world_process_zero or not logs or "loss" not in logs:
                return
            losses.append((state.global_step, float(logs["loss"])))
            if log is not None:
                log(f"step {state.global_step}/{state.max_steps}  loss {logs['loss']:.4f}  "
                    f"lr {logs.get('learning_rate', 0.0):.2e}  {human_seconds(time.perf_counter() - self.t0)}")

        def close(self):
            if self.bar is not None:
                for _ in self.bar:
                    pass
                self.bar = None

    return Reporter()


def is_main_process() -> bool:
    """True on the process that writes and reports: rank 0 under torchrun/accelerate, or a lone process."""
    return int(os.environ.get("RANK", "0")) == 0
