"""Hub ids as inputs: ``owner/name[@revision]`` becomes a snapshot in huggingface_hub's cache.

Every command reads local folders; a Hub id is downloaded first, through
``huggingface_hub`` (its cache, its token rules: ``token``, then ``HF_TOKEN``,
then the saved login; ``HF_HUB_OFFLINE`` honoured), fetching only the files the
command reads: an adapter's ``adapter_config.json`` and
``adapter_model.safetensors``; a model's config, generation config, tokenizer
files, safetensors index and the shards it names (never ``.bin``, ``.gguf``
or other extras). An existing local path always wins over a Hub id.

This module sits on the io floor so that every command (and the CLI) may use
it. Tokens, huggingface_hub's quiet and the mapping of its failures to one-line
``HubError``s are those of ``push`` too: they live in ``io.hub_client``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from bora_tools.errors import HubError, ValidationError
from bora_tools.io.hub_client import clean_token, download_errors, hub_messages_silenced, hub_timeout
from bora_tools.io.paths import check_name_lengths
from bora_tools.progress import Progress, no_progress

__all__ = ["HubInput", "hub_id_of", "hub_or_local", "parse_hub_id", "recorded_base", "resolve_input",
           "revision_problem"]

#: ``owner/name`` with an optional ``@revision`` (a branch, tag or commit), as mergekit writes it.
HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9_.-]+)(?:@(?P<rev>[\w./-]+))?$")

ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors"]
MODEL_FILES = ["config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
               "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json",
               "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja", "chat_template.json"]
#: What each kind of input downloads before its weights: exact top-level names, never a pattern, so that a
#: listing with ``../x`` names or extras no command reads (``*.bin``, ``*.gguf``, a ``huge.tiktoken``) fetches
#: nothing more. ``config.json`` comes with an adapter (it is tiny) so that a model given where an adapter
#: is expected is recognised as one.
PATTERNS = {"adapter": [*ADAPTER_FILES, "config.json"], "model": [*MODEL_FILES, "adapter_config.json"],
            "any": [*ADAPTER_FILES, *MODEL_FILES]}


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


#: A commit id: 40 (SHA-1) or 64 (SHA-256) hex digits.
_COMMIT_ID = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})$")
#: Longest revision accepted, in bytes: a ref is a file in huggingface_hub's cache (``refs/<revision>``).
MAX_REVISION = 200


def revision_problem(revision: str) -> str | None:
    """Why ``revision`` is neither a commit id nor a name git accepts for a branch or tag, or None.

    The rules of ``git check-ref-format``: no leading or trailing ``/``, no empty, ``.`` or ``..``
    component, no component beginning with ``.`` or ending in ``.lock``, no control character, space,
    ``~ ^ : ? * [ \\`` or ``@{``, not ``@`` alone, and at most ``MAX_REVISION`` bytes. huggingface_hub
    writes the revision as a path in its cache (``refs/<revision>``): these rules keep it there.

    Example: ``revision_problem("refs/pr/1")`` -> None; ``revision_problem("/etc/x")`` -> ``"begins with '/'"``.
    """
    if _COMMIT_ID.match(revision):
        return None
    if not revision:
        return "is empty"
    if len(revision.encode("utf-8", "surrogatepass")) > MAX_REVISION:
        return f"is longer than {MAX_REVISION} bytes"
    bad = sorted({c for c in revision if ord(c) < 32 or ord(c) == 127 or c in " ~^:?*[\\"})
    if bad:
        return f"holds {', '.join(map(repr, bad))}"
    if revision.startswith("/") or revision.endswith("/"):
        return f"{'begins' if revision.startswith('/') else 'ends'} with '/'"
    if "@{" in revision or revision == "@":
        return "holds '@{' or is '@'"
    for part in revision.split("/"):
        if part in ("", ".", ".."):
            return f"has an empty, '.' or '..' component ({part!r})"
        if part.startswith(".") or part.endswith((".lock", ".")):
            return f"has a component that begins with '.' or ends with '.' or '.lock' ({part!r})"
    return None


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
    check_name_lengths(spec, "input")
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
    problem = revision_problem(revision) if revision is not None else None
    if problem:
        raise HubError(f"{spec}: the revision {revision!r} {problem}, so it is not a branch, tag or commit id",
                       hint="give a branch, a tag or a commit id after @")
    from huggingface_hub import constants

    endpoint = endpoint or constants.ENDPOINT
    token = clean_token(token)  # push's token rules: whitespace stripped, registered as a secret
    with download_errors(endpoint=endpoint, repo_id=repo_id, revision=revision, token=token, spec=str(spec)), \
            hub_messages_silenced():
        return _download(repo_id, revision, kind=kind, token=token, endpoint=endpoint, cache_dir=cache_dir,
                         progress=progress)


def _download(repo_id: str, revision: str | None, *, kind: str, token: str | None, endpoint: str,
              cache_dir: str | Path | None, progress: Progress) -> HubInput:
    """Fetch the files ``kind`` reads, one at a time in this thread (a signal stops it at once), with timeouts."""
    from huggingface_hub import constants
    from huggingface_hub.errors import EntryNotFoundError

    from bora_tools.io.json import read_json
    from bora_tools.io.model_dir import INDEX_FILE, SINGLE_FILE, _index_shards

    if constants.is_offline_mode():
        folder = _cached_snapshot(repo_id, revision, kind=kind, token=token, endpoint=endpoint, cache_dir=cache_dir)
    else:
        folder = _fetch_listed(repo_id, revision, kind=kind, token=token, endpoint=endpoint, cache_dir=cache_dir)
    commit = folder.name  # snapshots/<commit>: what the revision resolved to
    if kind != "adapter" and (folder / "config.json").is_file() and not (folder / "adapter_config.json").is_file():
        index = folder / INDEX_FILE
        shards = _index_shards(index, read_json(index, error=HubError)) if index.is_file() else [SINGLE_FILE]
        for shard in progress(shards, total=len(shards), label=f"downloading {repo_id}"):
            try:
                _fetch(repo_id, shard, commit=commit, folder=folder, token=token, endpoint=endpoint,
                       cache_dir=cache_dir)
            except EntryNotFoundError as e:
                if index.is_file():  # a single-file model without weights: ModelDir.open says what is missing
                    raise HubError(f"{repo_id}@{commit[:10]}: {INDEX_FILE} names {shard}, which the repo does not "
                                   f"hold") from e
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return HubInput(path=folder, repo_id=repo_id, revision=revision, commit=commit, files=files)


def _fetch_listed(repo_id: str, revision: str | None, *, kind: str, token: str | None, endpoint: str,
                  cache_dir: str | Path | None) -> Path:
    """The repo's listing at ``revision``; then each file of ``PATTERNS[kind]`` it holds, by its exact name.

    Not ``snapshot_download``: its worker threads keep a SIGTERM'd process alive until their downloads end,
    and its listing call has no timeout.
    """
    from huggingface_hub import HfApi, constants
    from huggingface_hub.file_download import _cache_commit_hash_for_specific_revision, repo_folder_name

    info = HfApi(endpoint=endpoint).model_info(repo_id, revision=revision, token=token, timeout=hub_timeout())
    commit = str(info.sha)
    listed = {s.rfilename for s in info.siblings or []}
    storage = Path(cache_dir or constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")
    folder = storage / "snapshots" / commit
    for name in PATTERNS[kind]:
        if name in listed:
            _fetch(repo_id, name, commit=commit, folder=folder, token=token, endpoint=endpoint, cache_dir=cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    if revision != commit:  # what an offline run reads to find the commit of a branch or tag (checked above)
        _cache_commit_hash_for_specific_revision(str(storage), revision or constants.DEFAULT_REVISION, commit)
    return folder


def _fetch(repo_id: str, name: str, *, commit: str, folder: Path, token: str | None, endpoint: str,
           cache_dir: str | Path | None) -> None:
    """One file into the cache. A file not cached yet is first asked for once, within ``hub_timeout()``:
    ``hf_hub_download`` retries a metadata call that timed out five times with a 60 s timeout."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url

    if not (folder / name).is_file():
        get_hf_file_metadata(hf_hub_url(repo_id, name, revision=commit, endpoint=endpoint), token=token,
                             timeout=hub_timeout(), endpoint=endpoint)
    hf_hub_download(repo_id, name, revision=commit, token=token, endpoint=endpoint, cache_dir=cache_dir)


def _cached_snapshot(repo_id: str, revision: str | None, *, kind: str, token: str | None, endpoint: str,
                     cache_dir: str | Path | None) -> Path:
    """``HF_HUB_OFFLINE``: the snapshot already in the cache (huggingface_hub's lookup; nothing downloaded)."""
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id, revision=revision, allow_patterns=PATTERNS[kind], token=token,
                                  endpoint=endpoint, cache_dir=cache_dir, local_files_only=True))


def hub_or_local(spec: str | Path, *, kind: str = "any", token: str | None = None) -> HubInput:
    """The library's reading of an input: a ``Path``, an existing path or anything that cannot be a Hub id is a
    local path (its own errors come later, from the reader); a string ``owner/name[@revision]`` naming no
    local path is downloaded (``resolve_input``). What every API function taking a folder does first.

    Example: ``hub_or_local("me/my-bora@v1", kind="adapter").path`` -> ``.../snapshots/<commit>``.
    """
    if isinstance(spec, Path) or Path(spec).exists() or parse_hub_id(str(spec)) is None:
        return HubInput(path=Path(spec))
    return resolve_input(spec, kind=kind, token=token)


def recorded_base(adapter: str | Path) -> str:
    """The base model an adapter records (``base_model_name_or_path``), for a command given no ``base``.

    A local folder when it exists, else a Hub id, as PEFT's ``AutoPeftModelForCausalLM`` and llama.cpp's
    ``convert_lora_to_gguf.py`` read it.

    Raises:
        ValidationError: the adapter records none, or something that is neither (one line asking for ``base``).
    """
    path = Path(adapter)
    try:
        value = json.loads((path / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        value = None
    if not isinstance(value, str) or not value.strip():
        raise ValidationError(f"{path} is an adapter that records no base model (base_model_name_or_path): give "
                              "`base`, the model it was trained on")
    value = value.strip()
    if not Path(value).exists() and parse_hub_id(value) is None:
        raise ValidationError(f"{path} is an adapter whose recorded base model {value!r} is neither a local folder "
                              "nor a Hub id: give `base`, the model it was trained on")
    return value


#: huggingface_hub's cache layout: ``.../models--owner--name/snapshots/<commit>``
_CACHE_SNAPSHOT = re.compile(r"(?:^|/)models--(?P<owner>[^/]+?)--(?P<name>[^/]+)/snapshots/[0-9a-f]{40}/?$")


def hub_id_of(path: str | Path | None) -> str | None:
    """The Hub id of a folder in huggingface_hub's cache (``models--owner--name/snapshots/<commit>``), else None.

    What provenance records instead of a cache folder's hash. Example:
    ``hub_id_of("/root/.cache/huggingface/hub/models--org--base/snapshots/" + 40 * "a")`` -> ``"org/base"``.
    """
    if path is None:
        return None
    m = _CACHE_SNAPSHOT.search(Path(path).as_posix())
    return f"{m.group('owner')}/{m.group('name')}" if m else None
