"""Typed errors. The CLI turns every ``BoraError`` into one ``Error: ...`` line.

Each class also inherits the builtin a caller would naturally catch, as
``huggingface_hub`` does (``OutputExistsError`` is a ``FileExistsError``).
Library code raises these and never prints or exits.
"""

from __future__ import annotations

import contextlib


class BoraError(Exception):
    """Base class of every error bora-tools reports to a user.

    The message is one line that names the culprit (a file, a key, a module).
    ``hint`` is an optional next step the CLI appends.
    """

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.hint = hint

    def one_line(self) -> str:
        text = scrub(" ".join(str(self).split()))  # never more than one line, never a secret
        if self.hint:
            text += f" ({self.hint})"
        return text


class ConfigError(BoraError, ValueError):
    """An ``adapter_config.json`` or ``config.json`` that is unreadable or inconsistent."""


class CheckpointError(BoraError, ValueError):
    """Adapter tensors that are missing, unexpected, mis-shaped or non-finite."""


class ModelDirError(BoraError, ValueError):
    """A base model directory that is incomplete, corrupt or unsafe."""


class ShapeError(CheckpointError):
    """Shapes that disagree with each other, the config or the base model."""


class UnsafePathError(BoraError, ValueError):
    """A path (shard name, symlink) that would leave the directory it belongs to."""


class OutputExistsError(BoraError, FileExistsError):
    """The output target exists and ``--overwrite`` was not given."""


class OutputWriteError(BoraError, OSError):
    """Writing the output failed (disk full, permissions); nothing was left behind."""


class UnsupportedError(BoraError, NotImplementedError):
    """A valid input this tool does not handle (an architecture, a dtype)."""


class HubError(BoraError):
    """A failure talking to the Hugging Face Hub (auth, missing repo, network)."""


class ValidationError(BoraError, ValueError):
    """Several problems found at once; each names its key, expected and found."""


def raise_if_problems(
    subject: str, problems: list[str], *, cls: type = ValidationError, hint: str | None = None
) -> None:
    """Raise one ``cls`` error listing every problem, or return when there is none.

    Example: ``raise_if_problems("adapter_config.json", ["r: expected >= 1, found 0"], cls=ConfigError)``
    raises ``ConfigError("adapter_config.json: r: expected >= 1, found 0")``.
    """
    if not problems:
        return
    head = f"{subject}: " if len(problems) == 1 else f"{subject}: {len(problems)} problems: "
    shown = [_clip(p) for p in problems[:MAX_PROBLEMS]]
    if len(problems) > MAX_PROBLEMS:
        shown.append(f"and {len(problems) - MAX_PROBLEMS} more")
    raise cls(head + "; ".join(shown), hint=hint)


#: At most this many problems are listed in one error line, then "and N more".
MAX_PROBLEMS = 10
#: At most this many characters of one problem (a key name can be arbitrarily long).
MAX_PROBLEM_CHARS = 500


def _clip(text: str) -> str:
    return text if len(text) <= MAX_PROBLEM_CHARS else text[: MAX_PROBLEM_CHARS - 3] + "..."


# -- secrets ----------------------------------------------------------------
# Values (Hub tokens) that must never appear in any output, tracebacks under --debug included. A value is
# registered once where it enters (``io.hub_client.clean_token``); every printer masks what is registered.
_SECRETS: set[str] = set()
MIN_SECRET_CHARS = 8


def register_secret(value: str | None) -> None:
    """Remember ``value`` so that ``scrub`` masks it wherever it would be printed (Hub tokens are ~37 characters;
    shorter values than ``MIN_SECRET_CHARS`` are not registered, so that common words are never masked)."""
    for text in {value or "", (value or "").strip()}:
        if len(text) >= MIN_SECRET_CHARS:
            _SECRETS.add(text)


def scrub(text: str) -> str:
    """``text`` with every registered secret replaced by ``***``.

    Example: after ``register_secret("hf_abc123")``, ``scrub("Bearer hf_abc123")`` -> ``"Bearer ***"``.
    """
    for secret in sorted(_SECRETS, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def scrub_chain(error: BaseException | None) -> None:
    """Mask the registered secrets in the string arguments of ``error`` and of every exception it was chained
    from, in place (a caller that catches it, or prints its causes, never sees a secret)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        with contextlib.suppress(Exception):  # an exception class whose args cannot be set keeps them
            error.args = tuple(scrub(a) if isinstance(a, str) else a for a in error.args)
        error = error.__cause__ or error.__context__
