"""Publishing to the Hugging Face Hub: ``push`` a directory or a ``.gguf`` file, with a model card.

Everything goes through ``huggingface_hub``: the repo is created if needed
(``exist_ok``), a missing ``--revision`` branch is created, and one commit
carries the files. Large files take the Hub's large-file path (LFS or Xet,
as the server decides); the client asks the Hub first (``preupload``) and
skips files whose content is already there, so a re-run after an interruption
sends only what is missing and a re-run with nothing changed makes no commit.

The token is never read, printed or logged here: ``token=None`` lets
``huggingface_hub`` resolve it (``HF_TOKEN``, then the saved login). Known
failures become one ``HubError`` line with a hint.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bora_tools.errors import HubError, UnsafePathError, UnsupportedError, register_secret, scrub
from bora_tools.hub.card import build_model_card, describe_source, render_card
from bora_tools.progress import logger
from bora_tools.report import Report

__all__ = ["PushReport", "build_model_card", "push"]

CARD_NAME = "README.md"
_LOGIN_HINT = "pass `token`, set HF_TOKEN, or run 'hf auth login'"


@dataclass(frozen=True)
class PushReport(Report):
    """What ``push`` did: the commit (or the unchanged head), the files sent, whether a card was written."""

    repo_id: str
    repo_url: str
    revision: str
    commit_url: str
    commit_oid: str
    pr_url: str | None
    files: list[str]
    card_written: bool

    def to_text(self) -> str:
        lines = [f"Pushed {len(self.files)} file(s) to {self.repo_id}@{self.revision}"
                 + (" as a pull request" if self.pr_url else "")
                 + (", with a generated model card" if self.card_written else ""),
                 f"Commit: {self.commit_url}"]
        if self.pr_url:
            lines.append(f"Pull request: {self.pr_url}")
        return "\n".join(lines)


def push(*, path: str | Path, repo_id: str, private: bool = False, revision: str | None = None,
         create_pr: bool = False, commit_message: str | None = None, token: str | None = None,
         include: Sequence[str] | None = None, exclude: Sequence[str] | None = None,
         base_model: str | None = None, endpoint: str | None = None) -> PushReport:
    """Upload ``path`` (a directory, or one ``.gguf`` file) to the model repo ``repo_id`` in one commit.

    When ``path`` has no ``README.md``, a model card describing it is added to the upload (``path`` itself
    is never modified); ``exclude=["README.md"]`` leaves the card out.

    Args:
        path: a directory, or a single ``.gguf`` file.
        repo_id: ``owner/name`` on the Hub; created (private if ``private``) when missing.
        revision: the branch to commit to (created from the default branch when missing); with
            ``create_pr``, the existing branch the pull request targets.
        create_pr: open a pull request instead of committing to the branch.
        commit_message: defaults to "Upload <what> with bora-tools".
        token: a Hub token; ``None`` lets huggingface_hub use ``HF_TOKEN`` or the saved login.
        include, exclude: glob patterns on paths relative to ``path`` (``huggingface_hub`` rules).
        base_model: the Hub id of the base model, for the card, when the files only know a local path.
        endpoint: the Hub's URL; ``None`` uses ``HF_ENDPOINT`` or https://huggingface.co.

    Returns:
        A ``PushReport`` with the commit URL and oid, the pull request URL and the files sent.

    Raises:
        HubError: missing or rejected token, no write access, unknown repo or revision, Hub unreachable.
        UnsupportedError: ``path`` is neither a directory nor a ``.gguf`` file, or nothing is left to upload.
        UnsafePathError: a symlink in ``path`` leads outside it.

    Example::

        result = push(path="out/bora-adapter", repo_id="me/my-bora", private=True)
        print(result.commit_url)
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    token = clean_token(token)
    path = Path(path)
    files = upload_files(path, include=include, exclude=exclude)
    source = describe_source(path)
    card = None
    if not _has_readme(path) and _selected([CARD_NAME], include, exclude):
        rendered = render_card(source, title=repo_id.split("/")[-1], repo_id=repo_id, base_model=base_model)
        card = str(rendered).encode("utf-8")
    if not files and card is None:
        raise UnsupportedError(f"{path}: no file left to upload after `include`/`exclude`")
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(local)) for name, local in files]
    if card is not None:
        operations.append(CommitOperationAdd(path_in_repo=CARD_NAME, path_or_fileobj=card))
    message = commit_message or f"Upload {source.label} with bora-tools"

    api = HfApi(endpoint=endpoint, token=token)
    with hub_errors(endpoint=api.endpoint, repo_id=repo_id, revision=revision, token=token):
        repo_url = api.create_repo(repo_id, private=True if private else None, exist_ok=True)
        repo_id = repo_url.repo_id or repo_id  # a bare name resolves to the token owner's namespace
        if private:
            _warn_if_public(api, repo_id)
        if revision and revision != "main" and not revision.startswith("refs/") and not create_pr:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.create_commit(repo_id, operations=operations, commit_message=message, revision=revision,
                                 create_pr=create_pr)
    return PushReport(repo_id=repo_id, repo_url=str(repo_url), revision=revision or "main",
                      commit_url=info.commit_url, commit_oid=info.oid, pr_url=info.pr_url,
                      files=sorted(op.path_in_repo for op in operations), card_written=card is not None)


def upload_files(path: Path, *, include: Sequence[str] | None = None,
                 exclude: Sequence[str] | None = None) -> list[tuple[str, Path]]:
    """``(path in repo, local file)`` for every file of ``path`` that the patterns keep, sorted.

    A ``.gguf`` file uploads as itself; a directory uploads its files (recursively), minus ``.git``
    and ``.cache/huggingface`` as ``huggingface_hub.upload_folder`` does.

    Example: ``upload_files(Path("adapter"), exclude=["*.bin"])`` -> ``[("adapter_config.json", ...), ...]``.
    """
    from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS

    if path.is_file():
        if path.suffix != ".gguf":
            raise UnsupportedError(f"{path}: push uploads a directory or a single .gguf file")
        candidates = {path.name: path}
    elif path.is_dir():
        root = path.resolve()
        candidates = {}
        for p in sorted(path.rglob("*")):
            if p.is_file():
                if root not in p.resolve().parents:
                    raise UnsafePathError(f"{p}: a symlink that leads outside {path}; copy the file in instead")
                candidates[p.relative_to(path).as_posix()] = p
    else:
        raise UnsupportedError(f"{path}: not found")
    kept = _selected(list(candidates), include, [*(exclude or []), *DEFAULT_IGNORE_PATTERNS])
    return [(name, candidates[name]) for name in kept]


def _selected(names: list[str], include: Sequence[str] | None, exclude: Sequence[str] | None) -> list[str]:
    from huggingface_hub.utils import filter_repo_objects

    return list(filter_repo_objects(names, allow_patterns=list(include) if include else None,
                                    ignore_patterns=list(exclude) if exclude else None))


def _has_readme(path: Path) -> bool:
    return path.is_dir() and (path / CARD_NAME).is_file()


def _warn_if_public(api: Any, repo_id: str) -> None:
    if api.repo_info(repo_id).private is False:
        logger.warning(f"{repo_id} already exists and is public; private only applies when the repo is created "
                       "(change its visibility in the repo's settings on the Hub)")


def clean_token(token: str | None) -> str | None:
    """``token`` without surrounding whitespace (a pasted token often ends in a newline or CR).

    The token (and the one ``huggingface_hub`` would resolve when ``token`` is None) is registered
    as a secret, so that no message or ``--debug`` traceback can show it.

    Example: ``clean_token("hf_abc\\r\\n")`` -> ``"hf_abc"``.

    Raises:
        HubError: an empty token, or one with a space, a control or a non-ASCII character inside
            (never a valid HTTP header value); the token itself is not shown.
    """
    where = "`token`"
    if token is None:
        from huggingface_hub import get_token

        try:
            resolved = get_token()
        except Exception:  # an OIDC or Colab lookup that fails: huggingface_hub reports it itself
            return None
        if resolved is None:
            return None
        register_secret(resolved)
        if resolved == resolved.strip() and _token_ok(resolved):
            return None  # huggingface_hub resolves it again, unchanged
        token, where = resolved, "the token from HF_TOKEN or the saved login"
    register_secret(token)
    stripped = token.strip()
    if not stripped:
        raise HubError(f"{where} is empty", hint=_LOGIN_HINT)
    if not _token_ok(stripped):
        raise HubError(f"{where} contains a space, a control character or a non-ASCII character, which an HTTP "
                       "header cannot carry (the token is not shown)", hint="copy the token again from the Hub")
    return stripped


def _token_ok(token: str) -> bool:
    return all(33 <= ord(c) <= 126 for c in token)


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Network failures, whichever HTTP library this huggingface_hub uses."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module in ("httpx2", "httpx", "requests"):
        with contextlib.suppress(ImportError, AttributeError):
            mod = importlib.import_module(module)
            errors.append(mod.TransportError if hasattr(mod, "TransportError") else mod.RequestException)
    return tuple(errors)


@contextlib.contextmanager
def hub_errors(*, endpoint: str, repo_id: str, revision: str | None, token: str | None) -> Iterator[None]:
    """Turn huggingface_hub's failures into one-line ``HubError``s that never contain the token."""
    from huggingface_hub.errors import (
        HfHubHTTPError,
        HFValidationError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        yield
    except OfflineModeIsEnabled as e:
        raise HubError("HF_HUB_OFFLINE is set, so nothing can be pushed", hint="unset HF_HUB_OFFLINE") from e
    except HFValidationError as e:
        raise HubError(f"invalid REPO_ID {repo_id!r}: {_scrub(e, token)}", hint="REPO_ID is owner/name") from e
    except RevisionNotFoundError as e:
        raise HubError(f"{repo_id}: revision {revision!r} not found", hint="check `revision`") from e
    except HfHubHTTPError as e:
        status = e.response.status_code if getattr(e, "response", None) is not None else None
        if status == 401:
            raise _unauthorized(endpoint, token) from e
        if status == 403:
            raise HubError(f"{repo_id}: the token may not write to this repo (403 Forbidden)",
                           hint="use a token with write access to this namespace, or `create_pr`") from e
        if status == 404 or isinstance(e, RepositoryNotFoundError):
            raise HubError(f"{repo_id}: repository not found at {endpoint}",
                           hint="check REPO_ID and that the token can see the repo") from e
        detail = _scrub(getattr(e, "server_message", None) or e, token)
        raise HubError(f"the Hub at {endpoint} answered HTTP {status}: {detail}",
                       hint="run the same command again: files already uploaded are not sent twice") from e
    except ValueError as e:
        if "Invalid metadata in README.md" not in str(e):
            raise
        raise HubError(f"the Hub refused the README.md metadata: {_scrub(e, token)}") from e
    except _transport_errors() as e:
        _scrub_chain(e)
        if "header" in str(e).lower():  # the HTTP client refused a header value before sending anything
            raise HubError(f"the HTTP client refused a request header ({type(e).__name__}: {_scrub(e, token)})",
                           hint="check the token and HF_ENDPOINT") from e
        raise HubError(f"cannot reach the Hub at {endpoint} ({type(e).__name__})",
                       hint="check the network, or HF_ENDPOINT when you use another server") from e
    except BaseException as e:
        _scrub_chain(e)
        raise


def _scrub_chain(e: BaseException | None) -> None:
    """Mask secrets in the string arguments of ``e`` and every exception it was chained from, in place."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        with contextlib.suppress(Exception):
            e.args = tuple(scrub(a) if isinstance(a, str) else a for a in e.args)
        e = e.__cause__ or e.__context__


def _unauthorized(endpoint: str, token: str | None) -> HubError:
    from huggingface_hub import get_token

    try:
        known = token is not None or get_token() is not None
    except Exception:  # an OIDC or Colab lookup that fails still means: no usable token
        known = token is not None
    if not known:
        return HubError(f"no Hugging Face token found; {endpoint} answered 401 Unauthorized", hint=_LOGIN_HINT)
    return HubError(f"{endpoint} rejected the token (401 Unauthorized)",
                    hint=f"the token is invalid or expired: {_LOGIN_HINT} with a write token")


def _scrub(text: Any, token: str | None) -> str:
    """``text`` on one line, with any token (explicit or resolved) masked."""
    from huggingface_hub import get_token

    out = scrub(" ".join(str(text).split()))
    with contextlib.suppress(Exception):
        for secret in {token, get_token()}:
            if secret:
                out = out.replace(secret, "***")
    return out
