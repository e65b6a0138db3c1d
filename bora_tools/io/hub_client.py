"""The Hugging Face Hub client that downloads (``io.hub_input``) and ``push`` (``hub.push``) share.

Every Hub call goes through ``huggingface_hub``; this module holds what both
directions need around it, once:

- **tokens**: ``clean_token`` applies huggingface_hub's order (``token``, then
  ``HF_TOKEN``, then the saved login), strips a pasted token and refuses one an
  HTTP header cannot carry. Every token it sees is registered as a secret
  (``bora_tools.errors.register_secret``), so that ``errors.scrub`` masks it in
  every message and ``--debug`` traceback; a token is never passed to a masker.
- **quiet**: ``hub_messages_silenced`` keeps huggingface_hub's own bars and log
  lines off the terminal while our progress reports.
- **errors**: ``download_errors`` and ``upload_errors`` turn huggingface_hub's
  exceptions and the HTTP client's (httpx, requests) into one-line ``HubError``s
  with a hint. Each direction has its own table (``_download_error``,
  ``_upload_error``); what they share (401, an unreachable Hub, any other HTTP
  status) is written once below them. Any exception leaving either context has
  the registered secrets masked in its arguments and in those of its causes.
"""

from __future__ import annotations

import contextlib
import importlib
import re
from collections.abc import Callable, Iterator
from typing import Any

from bora_tools.errors import HubError, register_secret, scrub, scrub_chain

__all__ = ["LOGIN_HINT", "clean_token", "download_errors", "hub_messages_silenced", "hub_timeout", "upload_errors"]

LOGIN_HINT = "pass `token`, set HF_TOKEN, or run 'hf auth login'"
UNREACHABLE_HINT = "check the network, or HF_ENDPOINT when you use another server"


# -- tokens -----------------------------------------------------------------------------------------


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


def _has_token(token: str | None) -> bool:
    """A token went with the request: ``token``, or the one huggingface_hub resolves."""
    if token is not None:
        return True
    from huggingface_hub import get_token

    try:
        return get_token() is not None
    except Exception:  # an OIDC or Colab lookup that fails still means: no usable token
        return False


def hub_timeout() -> float:
    """Seconds a metadata call (a listing, a file's HEAD) waits for the Hub: ``HF_HUB_ETAG_TIMEOUT`` (default 10).

    A file's download waits ``HF_HUB_DOWNLOAD_TIMEOUT`` (default 10) between two reads; huggingface_hub applies it.
    """
    from huggingface_hub import constants

    return float(constants.HF_HUB_ETAG_TIMEOUT)


# -- quiet ------------------------------------------------------------------------------------------


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


# -- errors -----------------------------------------------------------------------------------------


def download_errors(*, endpoint: str, repo_id: str, revision: str | None, token: str | None,
                    spec: str) -> contextlib.AbstractContextManager[None]:
    """Turn huggingface_hub's download failures into one-line ``HubError``s that never contain a token.

    ``spec`` is the input as the user wrote it; ``token`` (after ``clean_token``) only tells a missing
    token from a rejected one.
    """
    return _translated(lambda e: _download_error(e, endpoint=endpoint, repo_id=repo_id, revision=revision,
                                                 token=token, spec=spec))


def upload_errors(*, endpoint: str, repo_id: str, revision: str | None,
                  token: str | None) -> contextlib.AbstractContextManager[None]:
    """Turn huggingface_hub's failures while pushing into one-line ``HubError``s that never contain a token.

    ``token`` (after ``clean_token``) only tells a missing token from a rejected one.
    """
    return _translated(lambda e: _upload_error(e, endpoint=endpoint, repo_id=repo_id, revision=revision,
                                               token=token))


@contextlib.contextmanager
def _translated(translate: Callable[[Exception], HubError | None]) -> Iterator[None]:
    """Raise ``translate(e)`` from ``e`` for what it knows, ``e`` itself otherwise; secrets masked in both."""
    try:
        yield
    except BaseException as e:
        scrub_chain(e)
        error = (_xet_error(e) or translate(e)) if isinstance(e, Exception) else None
        if error is None:
            raise
        raise error from e


def _download_error(e: Exception, *, endpoint: str, repo_id: str, revision: str | None, token: str | None,
                    spec: str) -> HubError | None:
    from huggingface_hub import constants
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
    not_cached = f", and {where} is not in the cache"
    if isinstance(e, HFValidationError):
        return HubError(f"{spec}: not a local path, and not a valid Hub id ({_detail(e)})",
                        hint="a Hub id is owner/name[@revision]")
    if isinstance(e, RevisionNotFoundError):
        return HubError(f"{repo_id}: revision {revision!r} not found at {endpoint}",
                        hint="check the branch, tag or commit after @")
    if isinstance(e, GatedRepoError):
        if _status(e) == 401:
            return _unauthorized(endpoint, token, write=False)
        return HubError(f"{repo_id}: access is restricted (403 Forbidden)",
                        hint="request access on the repo's page, then use a token of that account")
    if isinstance(e, LocalEntryNotFoundError):
        cause = e.__cause__ or e.__context__
        if constants.is_offline_mode() or isinstance(cause, OfflineModeIsEnabled):
            return HubError(f"{where} is not in the Hugging Face cache and HF_HUB_OFFLINE is set",
                            hint="run once without HF_HUB_OFFLINE to download it")
        if isinstance(cause, HfHubHTTPError):
            e = cause
        elif _timed_out(e):
            return _no_answer(endpoint, not_cached)
        else:
            return _unreachable(endpoint, None, not_cached)
    if isinstance(e, (RepositoryNotFoundError, HfHubHTTPError)):
        status = _status(e)
        if status == 401 and not isinstance(e, RepositoryNotFoundError):
            return _unauthorized(endpoint, token, write=False)
        if status == 403:
            return HubError(f"{repo_id}: the token may not read this repo (403 Forbidden)",
                            hint="use a token with read access to it")
        if status in (401, 404) or isinstance(e, RepositoryNotFoundError):
            return HubError(f"{spec}: no such local path, and no repository {repo_id} at {endpoint}",
                            hint="check the id, and the token if the repo is private")
        return _http_status(endpoint, e, hint="try again later")
    if _timed_out(e):
        return _no_answer(endpoint, not_cached)
    if isinstance(e, _transport_errors()):
        return _unreachable(endpoint, e, not_cached)
    return None


def _upload_error(e: Exception, *, endpoint: str, repo_id: str, revision: str | None,
                  token: str | None) -> HubError | None:
    from huggingface_hub.errors import (
        HfHubHTTPError,
        HFValidationError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(e, OfflineModeIsEnabled):
        return HubError("HF_HUB_OFFLINE is set, so nothing can be pushed", hint="unset HF_HUB_OFFLINE")
    if isinstance(e, HFValidationError):
        return HubError(f"invalid REPO_ID {repo_id!r}: {_detail(e)}", hint="REPO_ID is owner/name")
    if isinstance(e, RevisionNotFoundError):
        return HubError(f"{repo_id}: revision {revision!r} not found", hint="check `revision`")
    if isinstance(e, HfHubHTTPError):
        status = _status(e)
        if status == 401:
            return _unauthorized(endpoint, token, write=True)
        if status == 403:
            return HubError(f"{repo_id}: the token may not write to this repo (403 Forbidden)",
                            hint="use a token with write access to this namespace, or `create_pr`")
        if status == 404 or isinstance(e, RepositoryNotFoundError):
            return HubError(f"{repo_id}: repository not found at {endpoint}",
                            hint="check REPO_ID and that the token can see the repo")
        return _http_status(endpoint, e, hint="run the same command again: files already uploaded are not sent twice")
    if isinstance(e, ValueError):
        if "Invalid metadata in README.md" not in str(e):
            return None
        return HubError(f"the Hub refused the README.md metadata: {_detail(e)}")
    if isinstance(e, _transport_errors()):
        if "header" in str(e).lower():  # the HTTP client refused a header value before sending anything
            return HubError(f"the HTTP client refused a request header ({type(e).__name__}: {_detail(e)})",
                            hint="check the token and HF_ENDPOINT")
        return _unreachable(endpoint, e)
    return None


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Network failures, whichever HTTP library this huggingface_hub uses."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module in ("httpx2", "httpx", "requests"):
        with contextlib.suppress(ImportError, AttributeError):
            mod = importlib.import_module(module)
            errors.append(mod.TransportError if hasattr(mod, "TransportError") else mod.RequestException)
    return tuple(errors)


def _timed_out(e: BaseException) -> bool:
    """``e`` or one of its causes is a timeout of the HTTP client (httpx, requests) or of a socket."""
    seen: set[int] = set()
    error: BaseException | None = e
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, TimeoutError) or "Timeout" in type(error).__name__:
            return True
        error = error.__cause__ or error.__context__
    return False


def _no_answer(endpoint: str, then: str = "") -> HubError:
    """The Hub accepted the connection but did not answer in time."""
    from huggingface_hub import constants

    return HubError(f"the Hub at {endpoint} did not answer within the timeout (HF_HUB_ETAG_TIMEOUT="
                    f"{constants.HF_HUB_ETAG_TIMEOUT:g} s for metadata, HF_HUB_DOWNLOAD_TIMEOUT="
                    f"{constants.HF_HUB_DOWNLOAD_TIMEOUT:g} s for a download){then}",
                    hint="try again later, or raise HF_HUB_ETAG_TIMEOUT / HF_HUB_DOWNLOAD_TIMEOUT")


def _unauthorized(endpoint: str, token: str | None, *, write: bool) -> HubError:
    """The 401 line: no token at all, or one the Hub rejected."""
    if not _has_token(token):
        return HubError(f"no Hugging Face token found; {endpoint} answered 401 Unauthorized", hint=LOGIN_HINT)
    return HubError(f"{endpoint} rejected the token (401 Unauthorized)",
                    hint=f"the token is invalid or expired: {LOGIN_HINT}" + (" with a write token" if write else ""))


_XET_WORD = re.compile(r"(?<![a-z])xet", re.IGNORECASE)  # hf_xet, xethub, xet-write-token
XET_HINT = ("set HF_HUB_DISABLE_XET=1 to transfer through the Hub's LFS path instead "
            "(a server without Xet storage needs it)")


def _xet_error(e: Exception) -> HubError | None:
    """A failure of the Xet storage step (hf_xet, or a request to a Xet endpoint): named, with the way around it.

    A server without Xet storage answers its token request with 404, and hf_xet's own errors read like
    a network failure; both would otherwise become "repository not found" or "cannot reach the Hub".
    """
    seen: list[BaseException] = []
    cause: BaseException | None = e
    while cause is not None and cause not in seen:
        seen.append(cause)
        cause = cause.__cause__ or cause.__context__
    for err in seen:
        response = getattr(err, "response", None)
        url = str(getattr(response, "url", "") or "") if response is not None else ""
        if type(err).__module__.split(".")[0] == "hf_xet" or _XET_WORD.search(f"{url} {err}"):
            status = _status(err) if isinstance(err, Exception) else None
            what = f"HTTP {status}" if status else type(err).__name__
            return HubError(f"the Hub's Xet storage step failed ({what}: {_detail(err)[:200]})", hint=XET_HINT)
    return None


def _unreachable(endpoint: str, e: BaseException | None, then: str = "") -> HubError:
    """The Hub did not answer: ``e`` is the transport error (its type is named), ``then`` what follows."""
    kind = f" ({type(e).__name__})" if e is not None else ""
    return HubError(f"cannot reach the Hub at {endpoint}{kind}{then}", hint=UNREACHABLE_HINT)


def _http_status(endpoint: str, e: Exception, *, hint: str) -> HubError:
    """Any other HTTP answer: its status and the server's message."""
    detail = _detail(getattr(e, "server_message", None) or e)
    return HubError(f"the Hub at {endpoint} answered HTTP {_status(e)}: {detail}", hint=hint)


def _status(e: Exception) -> int | None:
    response = getattr(e, "response", None)
    return response.status_code if response is not None else None


def _detail(text: Any) -> str:
    """``text`` (a server message, an exception) on one line, registered secrets masked."""
    return scrub(" ".join(str(text).split()))
