"""Publishing to the Hugging Face Hub: ``push`` a directory or a ``.gguf`` file, with a model card.

Everything goes through ``huggingface_hub``: the repo is created if needed
(``exist_ok``), a missing ``--revision`` branch is created, and one commit
carries the files. Large files take the Hub's large-file path (LFS or Xet,
as the server decides); the client asks the Hub first (``preupload``) and
skips files whose content is already there, so a re-run after an interruption
sends only what is missing and a re-run with nothing changed makes no commit.

The token is never read, printed or logged here: ``token=None`` lets
``huggingface_hub`` resolve it (``HF_TOKEN``, then the saved login). Known
failures become one ``HubError`` line with a hint (``io.hub_client``, the
client that downloads use too).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bora_tools.errors import UnsafePathError, UnsupportedError, ValidationError
from bora_tools.hub.card import build_model_card, describe_source, is_hub_model_id, render_card
from bora_tools.io.hub_client import clean_token, hub_messages_silenced, upload_errors
from bora_tools.progress import Progress, logger, no_progress
from bora_tools.report import Report, human_bytes

__all__ = ["PushReport", "build_model_card", "push"]

CARD_NAME = "README.md"


@dataclass(frozen=True)
class PushReport(Report):
    """What ``push`` did: the commit it made (``commit`` is ``None`` when nothing changed), the files that
    commit carried, those already up to date on the Hub, and whether a generated card was part of it.

    ``commit_oid`` / ``commit_url`` name the commit the branch points at afterwards: the new one, or the
    unchanged head when nothing was uploaded.
    """

    repo_id: str
    repo_url: str
    revision: str
    commit_url: str
    commit_oid: str
    pr_url: str | None
    files: list[str]  # what the commit carried (new or changed files)
    card_written: bool  # a generated README.md was part of the commit
    commit: dict[str, str] | None = None  # {"oid", "url"} of the new commit; None: nothing to upload
    unchanged: list[str] = field(default_factory=list)  # files already on the Hub with the same content
    bytes_uploaded: int = 0  # size of the files the commit carried
    visibility: str = ""  # what became of the repo's visibility (created private/public, made private, kept)

    def to_text(self) -> str:
        where = f"{self.repo_id}@{self.revision}"
        if self.commit is None:
            return (f"nothing to upload: {where} is already up to date ({len(self.unchanged)} file(s) unchanged)"
                    + (f"\nRepo: {self.visibility}" if self.visibility else ""))
        lines = [f"  {name}" for name in self.files]
        lines.append(f"Pushed {len(self.files)} file(s), {human_bytes(self.bytes_uploaded)}, to {where}"
                     + (" as a pull request" if self.pr_url else "")
                     + (", with a generated model card (README.md)" if self.card_written else "")
                     + (f"; {len(self.unchanged)} file(s) were already up to date" if self.unchanged else ""))
        lines.append(f"Commit: {self.commit_url}")
        if self.visibility:
            lines.append(f"Repo: {self.visibility}")
        if self.pr_url:
            lines.append(f"Pull request: {self.pr_url}")
        return "\n".join(lines)


def push(*, path: str | Path, repo_id: str, private: bool = False, revision: str | None = None,
         create_pr: bool = False, commit_message: str | None = None, token: str | None = None,
         include: Sequence[str] | None = None, exclude: Sequence[str] | None = None,
         base_model: str | None = None, endpoint: str | None = None,
         progress: Progress = no_progress) -> PushReport:
    """Upload ``path`` (a directory, or one ``.gguf`` file) to the model repo ``repo_id`` in one commit.

    When ``path`` has no ``README.md``, a model card describing it is added to the upload (``path`` itself
    is never modified); ``exclude=["README.md"]`` leaves the card out.

    Args:
        path: a directory, or a single ``.gguf`` file.
        repo_id: ``owner/name`` on the Hub; created (private if ``private``) when missing. An existing
            repo that holds nothing yet (made by an earlier push that failed before its commit) counts
            as created by this one: ``private`` makes it private. An existing repo with files keeps
            its visibility (a warning says so when ``private`` asks otherwise).
        revision: the branch to commit to (created from the default branch when missing); with
            ``create_pr``, the existing branch the pull request targets.
        create_pr: open a pull request instead of committing to the branch.
        commit_message: defaults to "Upload <what> with bora-tools".
        token: a Hub token; ``None`` lets huggingface_hub use ``HF_TOKEN`` or the saved login.
        include, exclude: glob patterns on paths relative to ``path`` (``huggingface_hub`` rules).
        base_model: the Hub id of the base model, for the card, when the files only know a local path.
        endpoint: the Hub's URL; ``None`` uses ``HF_ENDPOINT`` or https://huggingface.co.
        progress: wraps the files as they are uploaded (huggingface_hub's own bars and messages are silenced).

    Returns:
        A ``PushReport`` with the commit URL and oid (``commit`` is ``None`` when every file was already
        up to date and no commit was made), the pull request URL and the files the commit carried.

    Raises:
        HubError: missing or rejected token, no write access, unknown repo or revision, Hub unreachable.
        UnsupportedError: ``path`` is neither a directory nor a ``.gguf`` file, or nothing is left to upload.
        ValidationError: ``base_model`` is not a Hub model id (``owner/name``).
        UnsafePathError: a symlink in ``path`` leads outside it.

    Example::

        result = push(path="out/bora-adapter", repo_id="me/my-bora", private=True)
        print(result.commit_url)
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    token = clean_token(token)
    if base_model is not None and not is_hub_model_id(base_model):
        raise ValidationError(f"`base_model` {base_model!r} is not a Hub model id (owner/name)",
                              hint="give the base model's id on the Hub, e.g. meta-llama/Llama-3.2-1B")
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
    with upload_errors(endpoint=api.endpoint, repo_id=repo_id, revision=revision, token=token), \
            hub_messages_silenced():
        repo_url, visibility = _create_or_reuse(api, repo_id, private=private)
        repo_id = repo_url.repo_id or repo_id  # a bare name resolves to the token owner's namespace
        if visibility is None:
            visibility = _visibility_of_existing(api, repo_id, private=private)
        if revision and revision != "main" and not revision.startswith("refs/") and not create_pr:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        _validate_card_first(api, operations)
        # One file at a time, so that our bar moves as files go up; the commit then sends no byte twice.
        for op in progress(operations, total=len(operations), label=f"uploading to {repo_id}"):
            api.preupload_lfs_files(repo_id, additions=[op], revision=revision, create_pr=create_pr)
        head = api.repo_info(repo_id, revision=revision).sha if not create_pr else None
        info = api.create_commit(repo_id, operations=operations, commit_message=message, revision=revision,
                                 create_pr=create_pr)
    carried = [op for op in operations if not _unchanged(op)]
    made = bool(carried) and (create_pr or info.oid != head)
    names = sorted(op.path_in_repo for op in carried) if made else []
    return PushReport(repo_id=repo_id, repo_url=str(repo_url), revision=revision or "main",
                      commit_url=info.commit_url, commit_oid=info.oid, pr_url=info.pr_url if made else None,
                      files=names, card_written=made and card is not None and CARD_NAME in names,
                      commit={"oid": info.oid, "url": info.commit_url} if made else None,
                      unchanged=sorted(op.path_in_repo for op in operations if op.path_in_repo not in names),
                      bytes_uploaded=sum(op.upload_info.size for op in carried) if made else 0,
                      visibility=visibility)


def _validate_card_first(api: Any, operations: list[Any]) -> None:
    """Let the Hub check README.md's metadata before any file goes up, as ``create_commit`` does first."""
    validate = getattr(api, "_validate_yaml", None)  # create_commit calls it again; absent: it is the only check
    for op in operations:
        if op.path_in_repo == CARD_NAME and validate is not None:
            with op.as_file() as f:
                validate(f.read().decode())


def _unchanged(op: Any) -> bool:
    """huggingface_hub left ``op`` out of the commit: the Hub already holds the same content at that path.

    The client compares the oid the Hub reported for the path (``preupload``) with the local one, as
    ``create_commit`` does; without those (another client version), the file counts as sent.
    """
    remote, local = getattr(op, "_remote_oid", None), None
    with contextlib.suppress(Exception):
        local = op._local_oid
    return remote is not None and remote == local


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


def _create_or_reuse(api: Any, repo_id: str, *, private: bool) -> tuple[Any, str | None]:
    """Create the repo with the visibility asked for; ``(url, what was done)``, or ``(url, None)`` when it existed."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        # Not private: the namespace's default visibility (an organisation may default to private).
        url = api.create_repo(repo_id, private=True if private else None, exist_ok=False)
    except HfHubHTTPError as e:
        if getattr(e.response, "status_code", None) != 409:
            raise
        return api.create_repo(repo_id, exist_ok=True), None
    return url, "created private" if private else "created with the Hub's default visibility"


def _visibility_of_existing(api: Any, repo_id: str, *, private: bool) -> str:
    """An existing repo: an empty one (an earlier push failed after creating it) follows ``private``."""
    info = api.repo_info(repo_id)
    empty = {s.rfilename for s in info.siblings or []} <= {".gitattributes"}
    if private and info.private is False:
        if empty:
            api.update_repo_settings(repo_id, private=True)
            return "made private (it existed empty: an earlier push that failed had created it)"
        logger.warning(f"{repo_id} already exists and is public; private only applies when the repo is created "
                       "(change its visibility in the repo's settings on the Hub)")
        return "kept public (it existed with files)"
    if not private and info.private and empty:
        return ("kept private (it existed empty, created private by an earlier push that failed; bora-tools "
                "never makes a repo public)")
    return f"kept {'private' if info.private else 'public'} (it existed)"
