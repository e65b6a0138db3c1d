"""Every hyperparameter of ``train`` in one frozen dataclass: its default, its check, its command-line flag.

``TrainOptions`` is the single place a training option is defined. ``train`` takes one;
``bora-tools train`` builds its click options from the fields (``bora_tools.cli.train``),
so a default, a help text or a check is written once. Adding an option is adding one field::

    warmup_ratio: float | None = option(None, "--warmup-ratio", check=FRACTION,
                                        help="Warmup as a fraction of the steps (overrides --warmup-steps).")

and a second spelling of a flag (TRL's ``--learning-rate`` for ``--lr``) is one more name in
that field's ``option(...)``. ``TrainOptions.from_dict`` reads any mapping of field names
(keywords, a parsed config file) and refuses unknown keys by name.

No torch and no click here: the command line lists the names below in ``--help`` without loading either.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bora_tools.errors import raise_if_problems

#: ``scheduler``: the learning-rate schedules after warmup (``transformers``' ``lr_scheduler_type`` names).
SCHEDULERS = ("linear", "cosine", "constant")
#: ``report_to``: where the scalars go besides the log lines (``transformers``' ``report_to`` names)
REPORT_TO = ("none", "tensorboard")


@dataclass(frozen=True)
class Check:
    """One field's rule: ``ok(value)``, and what is expected in words (``"an integer >= 1"``)."""

    want: str
    ok: Callable[[Any], bool]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def integer(minimum: int | None = None) -> Check:
    """An integer (not a bool), at least ``minimum`` when given."""
    if minimum is None:
        return Check("an integer", _is_int)
    return Check(f"an integer >= {minimum}", lambda v: _is_int(v) and v >= minimum)


FINITE = Check("a finite number", _is_number)
POSITIVE = Check("a number > 0", lambda v: _is_number(v) and v > 0)
FRACTION = Check("a number in [0, 1)", lambda v: _is_number(v) and 0 <= v < 1)
OPEN_FRACTION = Check("a number in (0, 1)", lambda v: _is_number(v) and 0 < v < 1)
#: what numpy, torch and Python's random all accept as a seed
SEED = Check("an integer in [0, 2**32)", lambda v: _is_int(v) and 0 <= v < 2**32)


def one_of(names: tuple[str, ...]) -> Check:
    return Check(f"one of {', '.join(names)}", lambda v: v in names)


@dataclass(frozen=True)
class Flag:
    """How a field appears on the command line. ``names``: its flags, the first one shown in messages.

    ``kind`` names a command-line type the CLI defines (``"dtype"``, ``"directory"``, ``"modules"``);
    without it the type follows the field's annotation (``bool``: an on/off flag; ``int``, ``float``: a number).
    ``flag_value``: the value of the flag given alone (``--resume`` means ``"last"``).
    """

    names: tuple[str, ...]
    help: str
    kind: str | None = None
    choices: tuple[str, ...] = ()
    metavar: str | None = None
    flag_value: str | None = None


def option(default: Any, *names: str, help: str, check: Check | None = None, kind: str | None = None,
           choices: tuple[str, ...] = (), metavar: str | None = None, flag_value: str | None = None) -> Any:
    """A ``TrainOptions`` field: its default, its flag(s) and help, and its check (``None`` passes when it is the
    default). ``choices`` also make the check."""
    if choices and check is None:
        check = one_of(choices)
    flag = Flag(tuple(names), help, kind=kind, choices=tuple(choices), metavar=metavar, flag_value=flag_value)
    return dataclasses.field(default=default, metadata={"flag": flag, "check": check})


@dataclass(frozen=True)
class TrainOptions:
    """The hyperparameters of ``train`` (``bora-tools train``), with their defaults.

    ``batch_size`` is per process: the global batch is ``batch_size * grad_accum * processes``.
    ``save_steps`` writes adapter-only checkpoints every so many steps into ``checkpoint_dir``
    (default ``OUT-checkpoints`` next to ``OUT``); ``resume`` is ``"last"`` (the latest there)
    or one ``checkpoint-N`` directory.

    Example::

        options = TrainOptions(r=16, blocks=4, epochs=2, lr=1e-4)
        assert not options.problems()
        train("Llama-3.2-1B", "chats.jsonl", "my-bora", options)
    """

    r: int = option(8, "-r", "--rank", check=integer(1), help="Rank r of each block product.")
    blocks: int = option(4, "--blocks", check=integer(1), help="BoRA blocks b (must divide every dimension).")
    alpha: float | None = option(None, "--alpha", check=FINITE, help="lora_alpha (default: r, a scaling of 1).")
    rslora: bool = option(False, "--rslora", help="Scale by alpha/sqrt(r) instead of alpha/r.")
    target_modules: list[str] | str | None = option(
        None, "--target-modules", kind="modules", metavar="NAMES",
        help="Comma-separated module names (or one regex); default: every linear projection but the head.")
    dropout: float = option(0.0, "--dropout", check=FRACTION, help="Dropout on the BoRA path's input.")
    epochs: float = option(1.0, "--epochs", "--num-train-epochs", check=POSITIVE, help="Passes over the data.")
    max_steps: int | None = option(None, "--max-steps", check=integer(1),
                                   help="Stop after this many optimizer steps (overrides --epochs).")
    lr: float = option(2e-4, "--lr", "--learning-rate", check=POSITIVE, help="Peak learning rate (AdamW).")
    scheduler: str = option("linear", "--scheduler", choices=SCHEDULERS, help="Learning-rate schedule after warmup.")
    warmup_steps: int = option(0, "--warmup-steps", check=integer(0), help="Linear warmup steps.")
    batch_size: int = option(4, "--batch-size", "--per-device-train-batch-size", check=integer(1),
                             help="Examples per process and step; global batch = batch size x grad accum x processes.")
    grad_accum: int = option(1, "--grad-accum", "--gradient-accumulation-steps", check=integer(1),
                             help="Gradient accumulation steps.")
    max_length: int = option(1024, "--max-length", check=integer(2), help="Cut examples at this many tokens.")
    dtype: str = option("auto", "--dtype", kind="dtype",
                        help="Base weights' dtype (auto: as stored); bfloat16/float16 also train under autocast. "
                             "Factors stay float32.")
    gradient_checkpointing: bool = option(False, "--gradient-checkpointing",
                                          help="Recompute activations in backward: less memory.")
    fsdp: bool = option(False, "--fsdp", help="Shard each decoder layer over the torchrun processes with FSDP2 "
                                              "(fully_shard); the adapter is gathered whole into checkpoints and OUT.")
    load_in_4bit: bool = option(False, "--load-in-4bit",
                                help="Quantize the base to 4 bits as it loads (NF4, double quantization, computing in "
                                     "--dtype; needs bitsandbytes).")
    load_in_8bit: bool = option(False, "--load-in-8bit",
                                help="Quantize the base to 8 bits as it loads (LLM.int8; needs bitsandbytes).")
    save_steps: int | None = option(None, "--save-steps", check=integer(1),
                                    help="Write an adapter-only checkpoint every N steps.")
    checkpoint_dir: str | Path | None = option(None, "--checkpoint-dir", kind="directory",
                                               help="Where checkpoints go (default: OUT-checkpoints next to OUT).")
    resume: str | Path | None = option(
        None, "--resume", flag_value="last", metavar="[CHECKPOINT]",
        help="Resume from the latest checkpoint, or from the checkpoint-N directory given.")
    seed: int = option(0, "--seed", check=SEED, help="Seed for the adapter's init and data order.")
    logging_steps: int | None = option(None, "--logging-steps", check=integer(1),
                                       help="Log the loss every N steps (default: about 20 lines).")
    eval_data: str | Path | None = option(None, "--eval-data", kind="file", metavar="FILE",
                                          help="JSONL records to compute the eval loss on (as --data).")
    eval_fraction: float | None = option(None, "--eval-fraction", check=OPEN_FRACTION, metavar="F",
                                         help="Hold out this fraction of --data (seeded) as the eval set.")
    eval_steps: int | None = option(None, "--eval-steps", check=integer(1),
                                    help="Compute the eval loss every N steps (it is always computed at the end).")
    packing: bool = option(False, "--packing",
                           help="Pack examples into rows of up to --max-length tokens (TRL's bfd packing; "
                                "attention stays within each example).")
    report_to: str = option("none", "--report-to", choices=REPORT_TO,
                            help="Also write the loss, learning rate and eval loss as TensorBoard scalars "
                                 "(transformers' TensorBoardCallback; needs tensorboard).")
    logging_dir: str | Path | None = option(None, "--logging-dir", kind="directory",
                                            help="Where --report-to tensorboard writes (default: "
                                                 "OUT-checkpoints/runs/DATE_HOST).")

    def problems(self) -> list[str]:
        """One line per field whose value fails its check (``"`lr`: expected a number > 0, found 0"``)."""
        found = []
        for f in dataclasses.fields(self):
            check, value = f.metadata["check"], getattr(self, f.name)
            if check is not None and not (value is None and f.default is None) and not check.ok(value):
                found.append(f"`{f.name}`: expected {check.want}, found {value!r}")
        if self.eval_data is not None and self.eval_fraction is not None:
            found.append("`eval_data` and `eval_fraction` together: give one eval set")
        if self.eval_steps is not None and self.eval_data is None and self.eval_fraction is None:
            found.append("`eval_steps` without an eval set: give `eval_data` or `eval_fraction`")
        if self.logging_dir is not None and self.report_to == "none":
            found.append("`logging_dir` without a logger: give `report_to` tensorboard")
        return found

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, base: TrainOptions | None = None) -> TrainOptions:
        """Options from field names (keywords, a config file), over ``base`` or the defaults.

        Raises:
            ValidationError: a key that is no field, named, with the closest field when there is one.
        """
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [key for key in values if key not in names]
        if unknown:
            import difflib

            problems = []
            for key in unknown:
                close = difflib.get_close_matches(str(key), names, n=1)
                problems.append(f"`{key}`: not a training option" + (f" (did you mean `{close[0]}`?)" if close else ""))
            raise_if_problems("train", problems)
        return dataclasses.replace(base if base is not None else cls(), **values)
