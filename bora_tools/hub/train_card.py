"""Pushing a trained adapter at the end of ``train --push-to-hub``: push's model card with a Training section.

The section records what TRL's cards record and what reproducing the run needs: the data file's name
and sha256, the steps and epochs, the final train and eval loss, ``b``, ``r`` and every hyperparameter.
The card is written into ``OUT`` as ``README.md`` (as TRL writes its card into ``output_dir``), then
``OUT`` goes up in one commit through ``push``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bora_tools.errors import ValidationError
from bora_tools.hub.card import build_model_card
from bora_tools.hub.push import CARD_NAME, PushReport, push
from bora_tools.io.atomic import atomic_output

#: ``owner/name`` as the Hub spells repo ids (``huggingface_hub.utils.validate_repo_id`` checks the rest)
REPO_ID = re.compile(r"[\w.-]{1,96}/[\w.-]{1,96}")


def check_repo_id(repo_id: str) -> str:
    """``repo_id`` when it is an ``owner/name`` the Hub accepts.

    Raises:
        ValidationError: naming it (``push_to_hub``).
    """
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        if not REPO_ID.fullmatch(repo_id):
            raise HFValidationError("expected owner/name")
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ValidationError(f"`push_to_hub` {repo_id!r}: not a Hub repo id ({' '.join(str(e).split())[:120]})",
                              hint="give OWNER/NAME") from None
    return repo_id


def check_push(repo_id: str, token: str | None) -> str:
    """Before training: the repo id is one, and a token will be there at the end (``token``, ``HF_TOKEN`` or the
    saved login). Returns the repo id.

    Raises:
        ValidationError: a bad repo id. HubError: no token, or one no HTTP header can carry.
    """
    from huggingface_hub import get_token

    from bora_tools.errors import HubError
    from bora_tools.io.hub_client import LOGIN_HINT, clean_token

    check_repo_id(repo_id)
    if clean_token(token) is None and get_token() is None:
        raise HubError(f"`push_to_hub` {repo_id}: no Hub token to push with", hint=LOGIN_HINT)
    return repo_id


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def training_section(summary: Mapping[str, Any], *, hyperparameters: Mapping[str, Any]) -> str:
    """Markdown: how the adapter was trained (``summary`` is a ``TrainReport.to_dict()``)."""
    data = Path(summary["data"])
    rows = [("data", f"`{data.name}` (sha256 `{sha256_of(data)}`)"),
            ("examples", summary["examples"]), ("steps", summary["steps"]), ("epochs", f"{summary['epochs']:.2f}"),
            ("final train loss", _loss(summary.get("loss_last"))), ("final eval loss", _loss(summary.get("eval_loss"))),
            ("b (blocks)", summary["blocks"]), ("r", summary["r"]),
            ("global batch", summary["global_batch"]), ("processes", summary["processes"]),
            ("dtype", summary["dtype"])]
    rows += [(f"`{k}`", f"`{v}`") for k, v in sorted(hyperparameters.items()) if v is not None and k != "resume"]
    lines = ["## Training", "", "Trained with `bora-tools train` (supervised fine-tuning, transformers' Trainer).",
             "", "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]
    return "\n".join(lines)


def _loss(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}"


def push_trained(out: Path, *, repo_id: str, summary: Mapping[str, Any], hyperparameters: Mapping[str, Any],
                 token: str | None = None, base_model: str | None = None, private: bool = False,
                 endpoint: str | None = None) -> PushReport:
    """Write the card (push's, with the Training section) into ``out``, then push ``out`` to ``repo_id``."""
    card = build_model_card(Path(out), repo_id=repo_id, base_model=base_model)
    card.text = card.text.rstrip("\n") + "\n\n" + training_section(summary, hyperparameters=hyperparameters) + "\n"
    with atomic_output(Path(out) / CARD_NAME, overwrite=True) as tmp:
        tmp.write_text(str(card), encoding="utf-8")
    return push(path=out, repo_id=repo_id, token=token, base_model=base_model, private=private, endpoint=endpoint)
