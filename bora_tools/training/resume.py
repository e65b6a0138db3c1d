"""Resuming a run: which checkpoint, whether it is whole and readable, and whether the run is already finished.

A checkpoint written by ``train --save-steps`` is a ``checkpoint-N`` directory holding the adapter,
the resume map and the trainer's state (``CHECKPOINT_FILES``). ``--resume`` (the latest) skips an
incomplete latest checkpoint, a run killed while writing it, with a warning, and resumes from the last
complete one; a checkpoint named explicitly must be complete. A checkpoint whose files are corrupt is
refused naming the file, with the earlier checkpoints as the way on. ``planned_steps`` is the
``max_steps`` ``transformers.Trainer`` will compute, so that a run resumed at or past it is reported as
finished instead of training "step 2/1".
"""

from __future__ import annotations

import json
import math
import re
import zipfile
from pathlib import Path

from bora_tools.core.adapter import WEIGHTS_NAME
from bora_tools.core.config import CONFIG_NAME, BoraConfig
from bora_tools.errors import BoraError, ValidationError
from bora_tools.progress import logger
from bora_tools.training.checkpoints import RESUME_MAP_NAME

STATE_NAME = "trainer_state.json"
#: what transformers.Trainer writes besides the adapter, and needs to continue exactly
TRAINER_FILES = ("optimizer.pt", "scheduler.pt")
#: one process writes ``rng_state.pth``, several ``rng_state_<rank>.pth``
RNG_PATTERN = re.compile(r"rng_state(_\d+)?\.pth")
CHECKPOINT_FILES = (CONFIG_NAME, WEIGHTS_NAME, RESUME_MAP_NAME, STATE_NAME, *TRAINER_FILES, "rng_state.pth")
_NUMBERED = re.compile(r"checkpoint-(\d+)")


def checkpoints(ckpt_dir: Path) -> list[Path]:
    """The ``checkpoint-N`` directories of ``ckpt_dir``, newest (largest N) first."""
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir()
             if (m := _NUMBERED.fullmatch(p.name)) and p.is_dir() and not p.is_symlink()]
    return [p for _, p in sorted(found, reverse=True)]


def missing_files(path: Path) -> list[str]:
    """The files of a complete checkpoint that ``path`` lacks (an empty list: complete)."""
    missing = [name for name in CHECKPOINT_FILES[:-1] if not (path / name).is_file()]
    if not any(RNG_PATTERN.fullmatch(p.name) for p in path.iterdir() if p.is_file()):
        missing.append("rng_state.pth")
    return missing


def resolve(resume: str | Path | None, ckpt_dir: Path, *, save_steps: int | None, overwrite: bool) -> Path | None:
    """The checkpoint to resume from (``choose``), or None for a fresh run; a fresh run refuses to mix its
    checkpoints with an earlier run's unless ``overwrite`` clears them."""
    if resume is not None:
        return choose(resume, ckpt_dir)
    if save_steps and checkpoints(ckpt_dir) and not overwrite:
        raise ValidationError(f"checkpoint directory {ckpt_dir} holds checkpoints of an earlier run",
                              hint="pass `resume` to continue it, or `overwrite` to start afresh")
    return None


def choose(resume: str | Path, ckpt_dir: Path) -> Path:
    """The checkpoint to resume from: ``"last"`` is the newest complete one in ``ckpt_dir``.

    Raises:
        ValidationError: no checkpoint, or the one named is incomplete (the missing file named).
    """
    if str(resume) != "last":
        path = Path(resume)
        if not path.is_dir():
            raise ValidationError(f"`resume` {path}: no such checkpoint directory")
        missing = missing_files(path)
        if missing:
            raise ValidationError(f"`resume` {path}: incomplete checkpoint, no {', '.join(missing)}",
                                  hint=_earlier(path))
        return path
    found = checkpoints(ckpt_dir)
    if not found:
        raise ValidationError(f"`resume`: no checkpoint-N directory in {ckpt_dir}")
    for path in found:
        missing = missing_files(path)
        if not missing:
            return path
        logger.warning(f"`resume`: {path} is incomplete (no {', '.join(missing)}); trying the one before")
    raise ValidationError(f"`resume`: no complete checkpoint in {ckpt_dir} (the latest, {found[0].name}, has no "
                          f"{', '.join(missing_files(found[0]))})")


def global_step(path: Path) -> int:
    """The step a checkpoint was written at, from its ``trainer_state.json``.

    Raises:
        ValidationError: the file is not a trainer state (named, with the earlier checkpoints as a hint).
    """
    try:
        state = json.loads((path / STATE_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ValidationError(f"`resume` {path / STATE_NAME}: corrupt ({' '.join(str(e).split())[:120]})",
                              hint=_earlier(path)) from None
    step = state.get("global_step") if isinstance(state, dict) else None
    if isinstance(step, bool) or not isinstance(step, int) or step < 0 or not isinstance(state.get("log_history"),
                                                                                        list):
        raise ValidationError(f"`resume` {path / STATE_NAME}: corrupt (expected an object with a global_step >= 0 "
                              f"and a log_history list)", hint=_earlier(path))
    return step


def check(path: Path, config: BoraConfig) -> int:
    """Every file of the checkpoint readable and its adapter this run's; returns its ``global_step``.

    The trainer's ``.pt``/``.pth`` files are ``torch.save`` zip archives: each member's CRC is checked,
    which finds a truncated or overwritten file without unpickling anything.
    """
    from bora_tools.core.adapter import load_adapter

    step = global_step(path)
    for name in [*TRAINER_FILES, *sorted(p.name for p in path.iterdir() if RNG_PATTERN.fullmatch(p.name))]:
        try:
            with zipfile.ZipFile(path / name) as archive:
                bad = archive.testzip()
        except (OSError, zipfile.BadZipFile, EOFError, ValueError) as e:
            bad = str(e) or type(e).__name__
        if bad is not None:
            raise ValidationError(f"`resume` {path / name}: corrupt ({' '.join(bad.split())[:120]})",
                                  hint=_earlier(path))
    try:
        saved = load_adapter(path)
    except BoraError as e:
        raise ValidationError(f"`resume` {path}: its adapter is corrupt ({e.one_line()})",
                              hint=_earlier(path)) from None
    keys = ("r", "bora_blocks", "lora_alpha", "use_rslora", "target_modules")
    differ = [f"{k} {getattr(saved.config, k)!r} there, {getattr(config, k)!r} here" for k in keys
              if getattr(saved.config, k) != getattr(config, k)]
    if differ:
        raise ValidationError(f"`resume` {path}: the checkpoint was trained with other settings: {'; '.join(differ)}")
    return step


def planned_steps(examples: int, *, batch_size: int, grad_accum: int, epochs: float, max_steps: int | None,
                  world: int) -> int:
    """The optimizer steps of the whole run, as ``transformers.Trainer`` counts them."""
    if max_steps is not None:
        return max_steps
    batches = math.ceil(math.ceil(examples / world) / batch_size)  # each process's share, then its batches
    return math.ceil(epochs * max(batches // grad_accum + int(batches % grad_accum > 0), 1))


def _earlier(path: Path) -> str:
    earlier = [p.name for p in checkpoints(path.parent) if p != path and _number(p) < _number(path)]
    if earlier:
        return f"resume from an earlier checkpoint (`resume` {path.parent / earlier[0]})"
    return "start afresh with `overwrite`"


def _number(path: Path) -> int:
    m = _NUMBERED.fullmatch(path.name)
    return int(m.group(1)) if m else -1
