"""What ``train`` refuses before any work about its paths and sizes, and what it says when stopped.

- ``--data`` must be a regular file: a FIFO, ``<(...)`` or ``/dev/stdin`` is refused by name (every
  process of a torchrun job reads the file, and a pipe can be read only once);
- ``--overwrite`` removes only what carries our marker: an OUT that is a BoRA adapter (its
  ``adapter_config.json`` says ``peft_type: BORA``, and it holds nothing else), an empty directory,
  and ``checkpoint-N`` directories that hold only the files a checkpoint is made of (a BoRA adapter,
  the trainer's state);
- ``r`` above an adapted module's dimensions is refused (as ``b`` that does not divide them);
- a name over 255 bytes (OUT, the data file, the checkpoint directory made from OUT) is one line;
- a signal during training names what is complete (the last checkpoint) and what is not (OUT).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from bora_tools.errors import ValidationError
from bora_tools.io.paths import check_name_lengths, regular_file_problem

__all__ = ["check_data_file", "check_overwrite", "check_rank", "checkpoint_dir_names", "kept_checkpoints"]

#: The files of an OUT adapter (``save_bora``), and those of a ``checkpoint-N`` (the adapter, the resume map,
#: and what ``transformers.Trainer`` saves beside them).
#: What train writes into OUT: the adapter, the base's tokenizer files (as ``save_pretrained`` names them) and,
#: with ``push_to_hub``, the card.
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "README.md", "tokenizer.json",
                 "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
                 "chat_template.json", "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model"}
CHECKPOINT_FILES = re.compile(r"^(adapter_config\.json|adapter_model\.safetensors|model\.safetensors\.index\.json|"
                              r"trainer_state\.json|training_args\.bin|optimizer\.pt|scheduler\.pt|scaler\.pt|"
                              r"rng_state(_\d+)?\.pth|\..*\.bora-tmp-.*)$")
CHECKPOINT_NAME = re.compile(r"^checkpoint-\d+$")


def check_data_file(data: Path, name: str = "data") -> None:
    """``data`` (the parameter ``name``) names a regular file (not a FIFO, a directory or a device), in names a
    file system accepts."""
    check_name_lengths(data, f"`{name}` {str(data)[:80]}")
    problem = regular_file_problem(data)
    if problem is None:
        return
    hint = ("write the records to a file first: every process of a torchrun job reads it, and a pipe can be read "
            "only once" if "FIFO" in problem or "device" in problem else None)
    raise ValidationError(f"`{name}` {data}: {problem}", hint=hint)


def checkpoint_dir_names(ckpt_dir: Path, *, given: bool) -> None:
    """The checkpoint directory (given, or ``OUT-checkpoints`` made from OUT) fits a file system's names."""
    check_name_lengths(ckpt_dir, "`checkpoint_dir`" if given else "the checkpoint directory made from `out` "
                                                                  "(OUT-checkpoints)")


def check_overwrite(out: Path, ckpt_dir: Path | None) -> None:
    """``overwrite`` replaces OUT and clears ``checkpoint-N`` directories: only those bora-tools wrote.

    Raises:
        ValidationError: naming the file or directory that is not ours.
    """
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ValidationError(f"`overwrite`: {out} is not a directory bora-tools wrote; it is left alone",
                              hint="remove it yourself, or choose another `out`")
    if out.is_dir():
        entries = sorted(p.name for p in out.iterdir())
        foreign = [n for n in entries if n not in ADAPTER_FILES and ".bora-tmp-" not in n]
        if entries and (foreign or not _is_bora_config(out / "adapter_config.json")):
            what = f"holds {foreign[0]!r}" if foreign else "has no BoRA adapter_config.json"
            raise ValidationError(f"`overwrite`: {out} is not a BoRA adapter bora-tools wrote (it {what}); it is "
                                  f"left alone", hint="remove it yourself, or choose another `out`")
    if ckpt_dir is None or not ckpt_dir.is_dir():
        return
    for sub in sorted(ckpt_dir.iterdir()):
        if not sub.name.startswith("checkpoint-"):
            continue
        if sub.is_symlink() or not sub.is_dir() or not CHECKPOINT_NAME.match(sub.name):
            raise ValidationError(f"`overwrite`: {sub} is not a checkpoint bora-tools wrote; it is left alone",
                                  hint="move it, or choose another `checkpoint_dir`")
        foreign = sorted(p.name for p in sub.iterdir() if not CHECKPOINT_FILES.match(p.name) or p.is_dir())
        config = sub / "adapter_config.json"
        if foreign or (config.exists() and not _is_bora_config(config)):  # an empty one holds nothing to lose
            what = f"holds {foreign[0]!r}" if foreign else "has no BoRA adapter_config.json"
            raise ValidationError(f"`overwrite`: {sub} is not a checkpoint bora-tools wrote (it {what}); it is "
                                  f"left alone", hint="move it, or choose another `checkpoint_dir`")


def _is_bora_config(path: Path) -> bool:
    from bora_tools.core.config import PEFT_TYPE

    try:
        return json.loads(path.read_text(encoding="utf-8")).get("peft_type") == PEFT_TYPE
    except (OSError, ValueError, AttributeError, RecursionError):
        return False


def check_rank(r: int, shapes: dict[str, tuple[int, int]]) -> None:
    """``r`` at most ``min(m, n)`` of every adapted module ``name -> (m, n)``: a larger rank adds parameters and
    nothing the update can express (its rank is at most ``min(m, n)``)."""
    over = [(name, m, n) for name, (m, n) in shapes.items() if r > min(m, n)]
    if over:
        name, m, n = min(over, key=lambda item: min(item[1], item[2]))
        raise ValidationError(f"`r` {r} is larger than the dimensions of {name} (out {m} x in {n}): a rank above "
                              f"min(m, n) = {min(m, n)} adds parameters and nothing the update can express",
                              hint=f"pass `r` of at most {min(m, n)}, or adapt other `target_modules`")


def kept_checkpoints(out: Path):
    """A ``TrainerCallback`` that records each checkpoint as complete once the trainer has saved all of it, so that
    a signal's line names it, and says that OUT was not written."""
    from transformers import TrainerCallback

    from bora_tools.io.atomic import KEPT

    KEPT.clear()  # an earlier run in this process kept its own

    class Kept(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                KEPT.append(f"the checkpoint {checkpoint} is complete (continue with `resume`), and {out} was "
                            f"not written")

    return Kept()
