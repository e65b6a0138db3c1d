"""Hub ids as inputs: ``owner/name[@revision]`` becomes a snapshot in huggingface_hub's cache.

Every command reads local folders; a Hub id is downloaded first, through
``huggingface_hub`` (its cache, its token rules: ``token``, then ``HF_TOKEN``,
then the saved login; ``HF_HUB_OFFLINE`` honoured), fetching only the files the
command reads: an adapter's ``adapter_config.json`` and
``adapter_model.safetensors``; a model's config, generation config, tokenizer
files, safetensors index and the shards it names (never ``.bin``, ``.gguf``
or other extras). An existing local path always wins over a Hub id.

This module sits on the io floor so that every command (and the CLI) may use
it; it also holds what Hub uploads and downloads share: the mapping of
huggingface_hub's failures to one-line ``HubError``s that never show a token.
"""

from __future__ import annotations

import contextlib
import importlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bora_tools.errors import HubError, register_secret
from bora_tools.errors import scrub as scrub_secrets
from bora_tools.progress import Progress, no_progress

__all__ = ["HubInput", "clean_token", "hub_messages_silenced", "parse_hub_id", "resolve_input", "scrub_chain"]

#: ``owner/name`` with an optional ``@revision`` (a branch, tag or commit), as mergekit writes it.
HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9_.-]+)(?:@(?P<rev>[\w./-]+))?$")

ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors"]
MODEL_FILES = ["config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
               "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json",
               "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja", "chat_template.json", "*.tiktoken"]
#: What each kind of input downloads before its weights. ``config.json`` comes with an adapter (it is
#: tiny) so that a model given where an adapter is expected is recognised as one.
PATTERNS = {"adapter": [*ADAPTER_FILES, "config.json"], "model": [*MODEL_FILES, "adapter_config.json"],
            "any": [*ADAPTER_FILES, *MODEL_FILES]}
LOGIN_HINT = "pass `token`, set HF_TOKEN, or run 'hf auth login'"


@dataclass(frozen=True)
class HubInput:
    """Where an input was found: a local path, or a Hub repo at a commit, cached at ``path``."""

    path: Path
    repo_id: str | None = None
    revision: str | None = None  # as asked (None: the default branch)
    commit: str | None = None
    files: list[str] = field(default_factory=list)

    @property
    def from_hub(self) -> bool:
        return self.repo_id is not None

    def describe(self) -> str:
        """One line for stderr: which of the two was used."""
        if not self.from_hub:
            return f"using the local folder {self.path}"
        rev = f"@{self.revision}" if self.revision else ""
        return (f"using {self.repo_id}{rev} from the Hub (commit {str(self.commit)[:10]}, {len(self.files)} file(s) "
                f"in the cache at {self.path})")


def parse_hub_id(spec: str) -> tuple[str, str | None] | None:
    """``"owner/name@rev"`` -> ``("owner/name", "rev")``; ``None`` when ``spec`` cannot be a Hub id.

    Example: ``parse_hub_id("meta-llama/Llama-3.2-1B")`` -> ``("meta-llama/Llama-3.2-1B", None)``.
    """
    m = HUB_ID.match(str(spec))
    if not m or ".." in spec or spec.endswith(".gguf"):
        return None
    return m.group("repo"), m.group("rev")


def resolve_input(spec: str | Path, *, kind: str = "any", token: str | None = None, endpoint: str | None = None,
                  cache_dir: str | Path | None = None, progress: Progress = no_progress) -> HubInput:
    """A local path as it is, or a Hub id downloaded into the cache; returns where the files are.

    Args:
        spec: a local path, or ``owner/name[@revision]``. An existing local path wins.
        kind: ``"adapter"``, ``"model"`` (a base), or ``"any"`` (either: export-gguf's SOURCE); decides the files.
        token: a Hub token; ``None`` lets huggingface_hub use ``HF_TOKEN`` or the saved login.
        endpoint: the Hub's URL; ``None`` uses ``HF_ENDPOINT`` or https://huggingface.co.
        cache_dir: huggingface_hub's cache (default: ``HF_HUB_CACHE``).
        progress: wraps the list of weight files being fetched.

    Raises:
        HubError: neither a local path nor a Hub id; a missing repo, revision or file; 401/403; the Hub
            unreachable (or ``HF_HUB_OFFLINE`` set) with the snapshot not in the cache.

    Example: ``resolve_input("me/my-bora@v1", kind="adapter").path`` -> ``.../snapshots/<commit>``.
    """
    local = Path(spec)
    if local.exists():
        return HubInput(path=local)
    parsed = parse_hub_id(str(spec))
    if parsed is None:
        raise HubError(f"{spec}: no such file or directory, and not a Hub id",
                       hint="give a local path or owner/name[@revision]")
    if kind not in PATTERNS:
        raise ValueError(f"kind: expected one of {', '.join(PATTERNS)}, found {kind!r}")
    repo_id, revision = parsed
    from huggingface_hub import constants

    endpoint = endpoint or constants.ENDPOINT
    token = clean_token(token)  # push's token rules: whitespace stripped, never shown
    with download_errors(endpoint=endpoint, repo_id=repo_id, revision=revision, token=token, spec=str(spec)), \
            hub_messages_silenced():
        return _download(repo_id, revision, kind=kind, token=token, endpoint=endpoint, cache_dir=cache_dir,
                         progress=progress)


def _download(repo_id: str, revision: str | None, *, kind: str, token: str | None, endpoint: str,
              cache_dir: str | Path | None, progress: Progress) -> HubInput:
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import EntryNotFoundError

    from bora_tools.io.json import read_json
    from bora_tools.io.model_dir import INDEX_FILE, SINGLE_FILE, _index_shards

    folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=PATTERNS[kind], token=token,
                                    endpoint=endpoint, cache_dir=cache_dir))
    commit = folder.name  # snapshots/<commit>: what the revision resolved to
    if kind != "adapter" and (folder / "config.json").is_file() and not (folder / "adapter_config.json").is_file():
        index = folder / INDEX_FILE
        shards = _index_shards(index, read_json(index, error=HubError)) if index.is_file() else [SINGLE_FILE]
        for shard in progress(shards, total=len(shards), label=f"downloading {repo_id}"):
            try:
                hf_hub_download(repo_id, shard, revision=commit, token=token, endpoint=endpoint, cache_dir=cache_dir)
            except EntryNotFoundError as e:
                if index.is_file():  # a single-file model without weights: ModelDir.open says what is missing
                    raise HubError(f"{repo_id}@{commit[:10]}: {INDEX_FILE} names {shard}, which the repo does not "
                                   f"hold") from e
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return HubInput(path=folder, repo_id=repo_id, revision=revision, commit=commit, files=files)


@contextlib.contextmanager
def hub_messages_silenced() -> Iterator[None]:
    """huggingface_hub's own progress bars and log messages stay off the terminal; ours report instead."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from huggingface_hub.utils import logging as hf_logging

    bars_were_off = are_progress_bars_disabled()
    verbosity = hf_logging.get_verbosity()
    with contextlib.suppress(Exception):  # HF_HUB_DISABLE_PROGRESS_BARS=0 refuses, with a warning: keep going
        disable_progress_bars()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if not bars_were_off:
            with contextlib.suppress(Exception):
                enable_progress_bars()


def transport_errors() -> tuple[type[BaseException], ...]:
    """Network failures, whichever HTTP library this huggingface_hub uses."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module in ("httpx2", "httpx", "requests"):
        with contextlib.suppress(ImportError, AttributeError):
            mod = importlib.import_module(module)
            errors.append(mod.TransportError if hasattr(mod, "TransportError") else mod.RequestException)
    return tuple(errors)


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
        raise HubError(f"{where} is empty", hint=LOGIN_HINT)
    if not _token_ok(stripped):
        raise HubError(f"{where} contains a space, a control character or a non-ASCII character, which an HTTP "
                       "header cannot carry (the token is not shown)", hint="copy the token again from the Hub")
    return stripped


def _token_ok(token: str) -> bool:
    return all(33 <= ord(c) <= 126 for c in token)


def scrub_chain(e: BaseException | None) -> None:
    """Mask secrets in the string arguments of ``e`` and every exception it was chained from, in place."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        with contextlib.suppress(Exception):
            e.args = tuple(scrub_secrets(a) if isinstance(a, str) else a for a in e.args)
        e = e.__cause__ or e.__context__


def scrub(text: Any, token: str | None) -> str:
    """``text`` on one line, with any token (explicit, resolved or registered as a secret) masked."""
    from huggingface_hub import get_token

    out = scrub_secrets(" ".join(str(text).split()))
    with contextlib.suppress(Exception):
        for secret in {token, get_token()}:
            if secret:
                out = out.replace(secret, "***")
    return out


def unauthorized(endpoint: str, token: str | None, *, write: bool) -> HubError:
    """The 401 line: no token at all, or one the Hub rejected."""
    from huggingface_hub import get_token

    try:
        known = token is not None or get_token() is not None
    except Exception:  # an OIDC or Colab lookup that fails still means: no usable token
        known = token is not None
    if not known:
        return HubError(f"no Hugging Face token found; {endpoint} answered 401 Unauthorized", hint=LOGIN_HINT)
    return HubError(f"{endpoint} rejected the token (401 Unauthorized)",
                    hint=f"the token is invalid or expired: {LOGIN_HINT}" + (" with a write token" if write else ""))


@contextlib.contextmanager
def download_errors(*, endpoint: str, repo_id: str, revision: str | None, token: str | None,
                    spec: str) -> Iterator[None]:
    """Turn huggingface_hub's download failures into one-line ``HubError``s that never contain the token."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{repo_id}@{revision}" if revision else repo_id
    try:
        yield
    except HFValidationError as e:
        raise HubError(f"{spec}: not a local path, and not a valid Hub id ({scrub(e, token)})",
                       hint="a Hub id is owner/name[@revision]") from e
    except RevisionNotFoundError as e:
        raise HubError(f"{repo_id}: revision {revision!r} not found at {endpoint}",
                       hint="check the branch, tag or commit after @") from e
    except GatedRepoError as e:
        status = e.response.status_code if getattr(e, "response", None) is not None else None
        if status == 401:
            raise unauthorized(endpoint, token, write=False) from e
        raise HubError(f"{repo_id}: access is restricted (403 Forbidden)",
                       hint="request access on the repo's page, then use a token of that account") from e
    except LocalEntryNotFoundError as e:
        from huggingface_hub import constants

        cause = e.__cause__ or e.__context__
        if constants.is_offline_mode() or isinstance(cause, OfflineModeIsEnabled):
            raise HubError(f"{where} is not in the Hugging Face cache and HF_HUB_OFFLINE is set",
                           hint="run once without HF_HUB_OFFLINE to download it") from e
        if isinstance(cause, HfHubHTTPError):
            raise _http(cause, endpoint=endpoint, repo_id=repo_id, token=token, spec=spec) from e
        raise HubError(f"cannot reach the Hub at {endpoint}, and {where} is not in the cache",
                       hint="check the network, or HF_ENDPOINT when you use another server") from e
    except (RepositoryNotFoundError, HfHubHTTPError) as e:
        raise _http(e, endpoint=endpoint, repo_id=repo_id, token=token, spec=spec) from e
    except transport_errors() as e:
        raise HubError(f"cannot reach the Hub at {endpoint} ({type(e).__name__}), and {where} is not in the cache",
                       hint="check the network, or HF_ENDPOINT when you use another server") from e


def _http(e: Exception, *, endpoint: str, repo_id: str, token: str | None, spec: str) -> HubError:
    from huggingface_hub.errors import RepositoryNotFoundError

    status = e.response.status_code if getattr(e, "response", None) is not None else None
    if status == 401 and not isinstance(e, RepositoryNotFoundError):
        return unauthorized(endpoint, token, write=False)
    if status == 403:
        return HubError(f"{repo_id}: the token may not read this repo (403 Forbidden)",
                        hint="use a token with read access to it")
    if status in (401, 404) or isinstance(e, RepositoryNotFoundError):
        return HubError(f"{spec}: no such local path, and no repository {repo_id} at {endpoint}",
                        hint="check the id, and the token if the repo is private")
    detail = scrub(getattr(e, "server_message", None) or e, token)
    return HubError(f"the Hub at {endpoint} answered HTTP {status}: {detail}", hint="try again later")
