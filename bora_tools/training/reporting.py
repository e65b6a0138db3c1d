"""``train --report-to tensorboard``: the run's scalars through transformers' own ``TensorBoardCallback``.

What the Trainer writes with ``report_to="tensorboard"`` is what is written: ``train/loss``,
``train/learning_rate``, ``train/grad_norm``, ``train/epoch`` at every logging step, ``eval/loss``
at every evaluation, and the training arguments and model config as text. Only the main
process writes (the callback does nothing on the others).

Where: ``logging_dir`` when given (the event files go straight into it, as PyTorch's
``SummaryWriter(log_dir=...)`` puts them), else ``runs/<date>_<host>`` in the checkpoint
directory (``OUT-checkpoints`` by default), which is where the Trainer puts them under its
``output_dir``: one subdirectory per run, so that TensorBoard shows runs side by side. The
``TENSORBOARD_LOGGING_DIR`` environment variable is not read: ``logging_dir`` says it.
"""

from __future__ import annotations

from pathlib import Path

from bora_tools.errors import UnsupportedError, ValidationError
from bora_tools.io.atomic import check_writable
from bora_tools.io.paths import check_name_lengths

#: what to install for ``report_to`` tensorboard
INSTALL_HINT = "pip install 'bora-tools[tensorboard]'"


def logging_dir(options, *, checkpoint_dir: Path, out: Path, base: Path, data: Path) -> Path | None:
    """The directory the run's TensorBoard events go to (None: ``report_to`` none), checked before any work.

    Raises:
        UnsupportedError: tensorboard is not installed (one line naming the extra).
        ValidationError: the directory lies inside the base or over OUT, or is the data file.
        OutputWriteError: it cannot be written.
    """
    if options.report_to != "tensorboard":
        return None
    from transformers.integrations import is_tensorboard_available

    if not is_tensorboard_available():
        raise UnsupportedError("`report_to` tensorboard needs tensorboard, which is not installed", hint=INSTALL_HINT)
    if options.logging_dir is None:
        from transformers.integrations.integration_utils import default_logdir

        where, what = checkpoint_dir / default_logdir(), "the logging directory (runs/ in the checkpoint directory)"
    else:
        where, what = Path(options.logging_dir), "`logging_dir`"
    check_name_lengths(where, what)
    resolved = where.resolve()
    if resolved.is_relative_to(out.resolve()) or out.resolve().is_relative_to(resolved):
        raise ValidationError(f"`logging_dir` {where} and `out` {out} overlap; OUT holds only the adapter",
                              hint="give the logs a directory of their own")
    for source in (base, data):
        if resolved == source.resolve() or resolved.is_relative_to(source.resolve()):
            raise ValidationError(f"`logging_dir` {where} lies inside the input {source}; inputs are never modified",
                                  hint="give the logs a directory outside the inputs")
    check_writable(where, what=f"`logging_dir` {where}")
    return where


def direct(trainer, directory: Path | None) -> None:
    """Point the trainer's ``TensorBoardCallback`` (``report_to`` tensorboard adds it) at ``directory``."""
    if directory is None:
        return
    from transformers.integrations import TensorBoardCallback

    for found in trainer.callback_handler.callbacks:
        if isinstance(found, TensorBoardCallback):
            found.logging_dir = str(directory)  # read at its first on_train_begin, as TENSORBOARD_LOGGING_DIR is
