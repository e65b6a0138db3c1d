"""A small Hugging Face Hub-compatible HTTP server for tests (stdlib only).

It implements what the real ``huggingface_hub`` client calls to create a repo,
branch and commit (preupload, NDJSON commit, the git-LFS batch API with
single-part and multipart uploads, verify), to validate README metadata, to
read repo info, and what ``snapshot_download`` / ``hf_hub_download`` call to
download (model info with siblings and sha, the recursive tree listing,
``HEAD``/``GET .../resolve/{rev}/{path}`` with ``X-Repo-Commit``, ``ETag``,
``X-Linked-Etag`` and ``X-Linked-Size`` for LFS files), with the Hub's error shapes (``X-Error-Code`` /
``X-Error-Message`` headers, 401 for bad credentials, 403 for read-only
tokens). Point the client at it with ``HF_ENDPOINT=hub.endpoint`` and
``HF_HUB_DISABLE_XET=1``.

Example::

    with FakeHub(tokens={"hf_w": "write"}, lfs_threshold=1 << 20) as hub:
        ...  # run the client against hub.endpoint
        assert hub.file("me/repo", "adapter_model.safetensors") == expected_bytes
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote

import yaml

RELATIONS = ("adapter", "merge", "quantized", "finetune")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DEFAULT_LFS_PATTERNS = ("*.safetensors", "*.gguf", "*.bin", "*.pt")


class HttpError(Exception):
    """An HTTP error answer, with the Hub's error headers."""

    def __init__(self, status: int, message: str, code: str | None = None, **extra: Any):
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra


@dataclass
class Commit:
    oid: str
    message: str
    files: dict[str, bytes]


@dataclass
class Repo:
    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)  # name -> commit oid
    commits: dict[str, Commit] = field(default_factory=dict)
    lfs_paths: set[str] = field(default_factory=set)  # paths stored through LFS
    pull_requests: int = 0
    gated: bool = False  # reading needs access granted: 403 for any token, 401 without one


def git_blob_sha1(data: bytes) -> str:
    """What the Hub reports as the oid of a regular (non-LFS) file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """The server and its state; a context manager that serves on 127.0.0.1 on a free port."""

    def __init__(self, *, tokens: dict[str, str] | None = None, lfs_threshold: int = 10 * 2**20,
                 lfs_patterns: tuple[str, ...] = _DEFAULT_LFS_PATTERNS, multipart_chunk: int | None = None):
        self.tokens = dict(tokens or {"hf_test_write_token": "write"})  # token -> "write" | "read"
        self.lfs_threshold = lfs_threshold
        self.lfs_patterns = lfs_patterns
        self.multipart_chunk = multipart_chunk  # multipart LFS uploads for objects bigger than this
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}  # sha256 -> content
        self.requests: list[dict[str, Any]] = []
        self.lfs_bytes_received = 0
        self._parts: dict[str, dict[int, bytes]] = {}
        self._failures: dict[str, int] = {}
        self.stalls: dict[str, float] = {}  # "GET resolve" -> seconds the answer waits (a Hub that hangs)
        self.stalled = threading.Event()  # set when a stalled request has arrived
        self._lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None

    # ----- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> FakeHub:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()

    @property
    def endpoint(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    # ----- helpers for tests -----------------------------------------------------------------
    def head(self, repo_id: str, revision: str = "main") -> str:
        return self.repos[repo_id].branches[revision]

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return repo.commits[repo.branches[revision]].files

    def file(self, repo_id: str, path: str, revision: str = "main") -> bytes:
        return self.files(repo_id, revision)[path]

    def seed(self, repo_id: str, files: dict[str, bytes], *, revision: str = "main", private: bool = False,
             message: str = "seed") -> str:
        """Commit ``files`` (replacing the branch's whole content) without the client; returns the commit oid.

        Creates the repo (and the branch, from main) when missing. Files that match the LFS patterns are LFS files.
        """
        with self._lock:
            repo = self.repos.get(repo_id)
            if repo is None:
                repo = self.repos[repo_id] = Repo(repo_id, private=private)
            parent = repo.branches.get(revision) or repo.branches.get("main")
            for path, data in files.items():
                if self.is_lfs(repo, path, len(data)):
                    repo.lfs_paths.add(path)
                    self.lfs[hashlib.sha256(data).hexdigest()] = data
            repo.branches[revision] = self.new_commit(repo, parent, message, files)
            return repo.branches[revision]

    def downloaded(self) -> list[str]:
        """Paths of the files whose content was sent (GET on ``/resolve/``), in request order."""
        return [r["path"].split("/resolve/", 1)[1].split("/", 1)[1] for r in self.requests
                if r["route"] == "resolve" and r["method"] == "GET"]

    def fail_next(self, route: str, status: int = 500) -> None:
        """Make the next request to ``route`` (e.g. ``"commit"``) fail with ``status``."""
        self._failures[route] = status

    def stall(self, route: str, seconds: float, *, method: str = "GET") -> None:
        """Make every ``method`` request to ``route`` wait ``seconds`` before it is answered."""
        self.stalls[f"{method} {route}"] = seconds

    def calls(self, route: str) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["route"] == route]

    # ----- auth ------------------------------------------------------------------------------
    def role(self, headers: Any) -> str | None:
        auth = headers.get("Authorization")
        if not auth:
            return None
        token = auth.removeprefix("Bearer ").strip()
        if token not in self.tokens:
            raise HttpError(401, "Invalid credentials in Authorization header")
        return self.tokens[token]

    def require(self, headers: Any, *, write: bool) -> str:
        role = self.role(headers)
        if role is None:
            raise HttpError(401, "You must be authenticated to access this resource")
        if write and role != "write":
            raise HttpError(403, "You don't have the rights to write to this repository")
        return role

    def repo(self, repo_id: str, headers: Any) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and self.role(headers) is None):
            raise HttpError(404, "Repository not found", "RepoNotFound")
        return repo

    def readable(self, repo_id: str, headers: Any) -> Repo:
        """The repo, for a download: an invalid token is 401 (as on the Hub, even for a public repo); gated
        repos answer 401 without a token and 403 with one."""
        self.role(headers)
        repo = self.repo(repo_id, headers)
        if repo.gated:
            if self.role(headers) is None:
                raise HttpError(401, "Access to this gated repo needs authentication", "GatedRepo")
            raise HttpError(403, f"Access to model {repo_id} is restricted: ask for access on its page", "GatedRepo")
        return repo

    def oid_of(self, repo: Repo, path: str, data: bytes) -> str:
        """The etag of a file: the sha256 of an LFS file's content, else the git blob sha1."""
        return hashlib.sha256(data).hexdigest() if path in repo.lfs_paths else git_blob_sha1(data)

    @staticmethod
    def revision(repo: Repo, rev: str) -> str:
        if rev in repo.branches:
            return repo.branches[rev]
        if rev in repo.commits:
            return rev
        raise HttpError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    def is_lfs(self, repo: Repo, path: str, size: int) -> bool:
        return (size >= self.lfs_threshold or path in repo.lfs_paths
                or any(fnmatch.fnmatch(path.rsplit("/", 1)[-1], p) for p in self.lfs_patterns))

    def new_commit(self, repo: Repo, parent: str | None, message: str, files: dict[str, bytes]) -> str:
        seed = f"{repo.repo_id}\n{parent}\n{message}\n{len(repo.commits)}".encode()
        oid = hashlib.sha1(seed + b"".join(hashlib.sha256(files[p]).digest() for p in sorted(files))).hexdigest()
        repo.commits[oid] = Commit(oid, message, dict(files))
        return oid


# ----- route handlers: (hub, request) -> (status, json body) ---------------------------------
@dataclass
class Raw:
    """A non-JSON answer: the bytes of a file and extra headers."""

    data: bytes
    headers: dict[str, str]


@dataclass
class Request:
    groups: dict[str, str]
    query: dict[str, str]
    headers: Any
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body or b"{}")


def create_repo(hub: FakeHub, req: Request) -> tuple[int, Any]:
    hub.require(req.headers, write=True)
    data = req.json()
    repo_id = f"{data.get('organization')}/{data['name']}" if data.get("organization") else f"user/{data['name']}"
    if repo_id in hub.repos:
        raise HttpError(409, "You already created this model repo", url=f"{hub.endpoint}/{repo_id}")
    repo = Repo(repo_id, private=data.get("visibility") == "private" or data.get("private") is True)
    attributes = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in hub.lfs_patterns).encode()
    repo.branches["main"] = hub.new_commit(repo, None, "initial commit", {".gitattributes": attributes})
    hub.repos[repo_id] = repo
    return 200, {"url": f"{hub.endpoint}/{repo_id}", "name": repo_id, "id": repo_id}


def repo_settings(hub: FakeHub, req: Request) -> tuple[int, Any]:
    """``PUT /api/models/{repo}/settings``: the visibility (``{"visibility": "private"}``, or the older ``private``)."""
    hub.require(req.headers, write=True)
    repo = hub.repo(req.groups["repo"], req.headers)
    data = req.json()
    if "visibility" in data:
        repo.private = data["visibility"] == "private"
    elif "private" in data:
        repo.private = bool(data["private"])
    return 200, {}


def repo_info(hub: FakeHub, req: Request) -> tuple[int, Any]:
    repo = hub.repo(req.groups["repo"], req.headers)
    oid = hub.revision(repo, req.groups.get("rev") or "main")
    return 200, {"id": repo.repo_id, "modelId": repo.repo_id, "sha": oid, "private": repo.private,
                 "siblings": [{"rfilename": p} for p in sorted(repo.commits[oid].files)]}


def list_tree(hub: FakeHub, req: Request) -> tuple[int, Any]:
    """``GET /api/models/{repo}/tree/{rev}[/{path}]``: files (recursive) with git oids and LFS info; one page."""
    repo = hub.readable(req.groups["repo"], req.headers)
    files = repo.commits[hub.revision(repo, req.groups["rev"])].files
    prefix = (req.groups.get("path") or "").strip("/")
    entries = []
    for path in sorted(files):
        if prefix and not path.startswith(prefix + "/"):
            continue
        data = files[path]
        entry: dict[str, Any] = {"type": "file", "path": path, "size": len(data), "oid": git_blob_sha1(data)}
        if path in repo.lfs_paths:
            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        entries.append(entry)
    return 200, entries


def resolve_file(hub: FakeHub, req: Request) -> tuple[int, Any]:
    """``HEAD``/``GET /{repo}/resolve/{rev}/{path}``: the file, with the Hub's headers (no CDN redirect)."""
    repo = hub.readable(req.groups["repo"], req.headers)
    oid = hub.revision(repo, req.groups["rev"])
    path = req.groups["path"]
    data = repo.commits[oid].files.get(path)
    if data is None:
        raise HttpError(404, f"Entry not found: {path}", "EntryNotFound", __headers__={"X-Repo-Commit": oid})
    etag = f'"{hub.oid_of(repo, path, data)}"'
    headers = {"X-Repo-Commit": oid, "ETag": etag}
    if path in repo.lfs_paths:
        headers.update({"X-Linked-Etag": etag, "X-Linked-Size": str(len(data))})
    return 200, Raw(data, headers)


def list_refs(hub: FakeHub, req: Request) -> tuple[int, Any]:
    repo = hub.repo(req.groups["repo"], req.headers)
    refs = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": o} for b, o in repo.branches.items()
            if not b.startswith("refs/pr/")]
    return 200, {"branches": refs, "converts": [], "tags": []}


def create_branch(hub: FakeHub, req: Request) -> tuple[int, Any]:
    hub.require(req.headers, write=True)
    repo = hub.repo(req.groups["repo"], req.headers)
    if req.groups["rev"] in repo.branches:
        raise HttpError(409, "Reference already exists")
    repo.branches[req.groups["rev"]] = hub.revision(repo, req.json().get("startingPoint") or "main")
    return 200, {}


def preupload(hub: FakeHub, req: Request) -> tuple[int, Any]:
    create_pr = req.query.get("create_pr") == "1"
    hub.require(req.headers, write=not create_pr)
    repo = hub.repo(req.groups["repo"], req.headers)
    existing = repo.commits[hub.revision(repo, req.groups["rev"])].files
    answer = []
    for f in req.json()["files"]:
        path, oid, data = f["path"], None, existing.get(f["path"])
        if data is not None:  # what lets the client leave unchanged files out of the commit
            oid = hashlib.sha256(data).hexdigest() if path in repo.lfs_paths else git_blob_sha1(data)
        mode = "lfs" if hub.is_lfs(repo, path, f["size"]) else "regular"
        answer.append({"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": oid})
    return 200, {"files": answer, "commitOid": repo.branches.get("main")}


def lfs_batch(hub: FakeHub, req: Request) -> tuple[int, Any]:
    hub.require(req.headers, write=False)
    hub.repo(req.groups["repo"], req.headers)
    objects = []
    for obj in req.json()["objects"]:
        oid, size = obj["oid"], obj["size"]
        entry: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
        if oid not in hub.lfs:  # already stored objects get no actions: the client skips them
            entry["actions"] = {"upload": _upload_action(hub, oid, size),
                                "verify": {"href": f"{hub.endpoint}/lfs/verify"}}
        objects.append(entry)
    return 200, {"transfer": "basic", "objects": objects}


def _upload_action(hub: FakeHub, oid: str, size: int) -> dict[str, Any]:
    chunk = hub.multipart_chunk
    if chunk is None or size <= chunk:
        return {"href": f"{hub.endpoint}/lfs/upload/{oid}"}
    parts = -(-size // chunk)
    header = {"chunk_size": str(chunk), **{str(i): f"{hub.endpoint}/lfs/upload/{oid}/{i}" for i in range(1, parts + 1)}}
    return {"href": f"{hub.endpoint}/lfs/complete/{oid}", "header": header}


def lfs_put(hub: FakeHub, req: Request) -> tuple[int, Any]:
    oid, part = req.groups["oid"], req.groups.get("part")
    hub.lfs_bytes_received += len(req.body)
    if part is None:
        _store_lfs(hub, oid, req.body)
        return 200, {}
    hub._parts.setdefault(oid, {})[int(part)] = req.body
    return 200, {"__etag__": hashlib.md5(req.body).hexdigest()}


def lfs_complete(hub: FakeHub, req: Request) -> tuple[int, Any]:
    oid, parts = req.groups["oid"], req.json()["parts"]
    stored = hub._parts.pop(oid, {})
    for p in parts:
        if hashlib.md5(stored.get(p["partNumber"], b"")).hexdigest() != p["etag"]:
            raise HttpError(400, f"part {p['partNumber']} of {oid} is missing or has a wrong etag")
    _store_lfs(hub, oid, b"".join(stored[p["partNumber"]] for p in parts))
    return 200, {}


def _store_lfs(hub: FakeHub, oid: str, data: bytes) -> None:
    if hashlib.sha256(data).hexdigest() != oid:
        raise HttpError(400, f"uploaded content does not match oid {oid}")
    hub.lfs[oid] = data


def lfs_verify(hub: FakeHub, req: Request) -> tuple[int, Any]:
    obj = req.json()
    data = hub.lfs.get(obj["oid"])
    if data is None or len(data) != obj["size"]:
        raise HttpError(404, f"object {obj['oid']} not found")
    return 200, {}


def commit(hub: FakeHub, req: Request) -> tuple[int, Any]:
    create_pr = req.query.get("create_pr") == "1"
    hub.require(req.headers, write=not create_pr)
    repo = hub.repo(req.groups["repo"], req.headers)
    rev = req.groups["rev"]
    parent = hub.revision(repo, rev)
    lines = [json.loads(line) for line in req.body.splitlines() if line.strip()]
    header = next(x["value"] for x in lines if x["key"] == "header")
    if header.get("parentCommit") and header["parentCommit"] != parent:
        raise HttpError(412, "A commit has happened since. Please refresh and try again.")
    files = dict(repo.commits[parent].files)
    for line in lines:
        _apply(hub, repo, files, line["key"], line["value"])
    oid = hub.new_commit(repo, parent, header["summary"], files)
    pr_url = None
    if create_pr:
        repo.pull_requests += 1
        repo.branches[f"refs/pr/{repo.pull_requests}"] = oid
        pr_url = f"{hub.endpoint}/{repo.repo_id}/discussions/{repo.pull_requests}"
    elif rev in repo.branches:
        repo.branches[rev] = oid
    else:
        raise HttpError(400, f"Cannot commit to {rev}: not a branch")
    return 200, {"commitUrl": f"{hub.endpoint}/{repo.repo_id}/commit/{oid}", "commitOid": oid,
                 "pullRequestUrl": pr_url, "success": True}


def _apply(hub: FakeHub, repo: Repo, files: dict[str, bytes], key: str, value: dict[str, Any]) -> None:
    path = value.get("path", "")
    if key == "file":
        if value.get("encoding") != "base64":
            raise HttpError(400, f"unsupported encoding for {path}")
        files[path] = base64.b64decode(value["content"])
        repo.lfs_paths.discard(path)
    elif key == "lfsFile":
        if value["oid"] not in hub.lfs:
            raise HttpError(422, f"Your push was rejected because an LFS pointer pointed to a file that does not "
                                 f"exist: {path}")
        files[path] = hub.lfs[value["oid"]]
        repo.lfs_paths.add(path)
    elif key == "deletedFile":
        files.pop(path, None)
    elif key == "deletedFolder":
        for p in [p for p in files if p.startswith(path.rstrip("/") + "/")]:
            files.pop(p)
    elif key != "header":
        raise HttpError(400, f"unknown commit operation {key}")


def validate_yaml(hub: FakeHub, req: Request) -> tuple[int, Any]:
    errors = [{"message": m} for m in card_metadata_problems(req.json()["content"])]
    return (400 if errors else 200), {"errors": errors, "warnings": []}


def card_metadata_problems(content: str) -> list[str]:
    """The checks the Hub makes on the fields bora-tools writes."""
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, re.S)
    if not match:
        return []
    try:
        meta = yaml.safe_load(match.group(1)) or {}
    except yaml.YAMLError as e:
        return [f"invalid YAML: {e}"]
    problems = []
    if "base_model_relation" in meta and meta["base_model_relation"] not in RELATIONS:
        problems.append(f'"base_model_relation" must be one of {RELATIONS}')
    bases = meta.get("base_model", [])
    for base in [bases] if isinstance(bases, str) else bases:
        if not isinstance(base, str) or not _REPO_ID.match(base):
            problems.append(f'"base_model" must be a model id on the Hub, got {base!r}')
    if "base_model_relation" in meta and "base_model" not in meta:
        problems.append('"base_model_relation" needs "base_model"')
    tags = meta.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        problems.append('"tags" must be a list of strings')
    if "library_name" in meta and not isinstance(meta["library_name"], str):
        problems.append('"library_name" must be a string')
    return problems


_ROUTES: list[tuple[str, str, re.Pattern, Callable[[FakeHub, Request], tuple[int, Any]]]] = [
    (m, name, re.compile(rx), fn) for m, name, rx, fn in [
        ("POST", "create_repo", r"^/api/repos/create$", create_repo),
        ("POST", "validate_yaml", r"^/api/validate-yaml$", validate_yaml),
        ("GET", "repo_info", r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?$", repo_info),
        ("PUT", "settings", r"^/api/models/(?P<repo>[^/]+/[^/]+)/settings$", repo_settings),
        ("GET", "refs", r"^/api/models/(?P<repo>[^/]+/[^/]+)/refs$", list_refs),
        ("GET", "tree", r"^/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?P<path>/.*)?$", list_tree),
        ("GET", "resolve", r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$", resolve_file),
        ("HEAD", "resolve", r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$", resolve_file),
        ("POST", "branch", r"^/api/models/(?P<repo>[^/]+/[^/]+)/branch/(?P<rev>[^/]+)$", create_branch),
        ("POST", "preupload", r"^/api/models/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>[^/]+)$", preupload),
        ("POST", "commit", r"^/api/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>[^/]+)$", commit),
        ("POST", "lfs_batch", r"^/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch$", lfs_batch),
        ("PUT", "lfs_upload", r"^/lfs/upload/(?P<oid>[0-9a-f]{64})(?:/(?P<part>\d+))?$", lfs_put),
        ("POST", "lfs_complete", r"^/lfs/complete/(?P<oid>[0-9a-f]{64})$", lfs_complete),
        ("POST", "lfs_verify", r"^/lfs/verify$", lfs_verify),
    ]
]


def _make_handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # keep test output clean
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                    if size == 0:
                        return b"".join(chunks)
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _dispatch(self) -> None:
            raw_path, _, query = self.path.partition("?")
            body = self._body()
            for method, name, rx, fn in _ROUTES:  # noqa: B007 - used after the loop
                match = rx.match(raw_path)
                if method == self.command and match:
                    break
            else:
                return self._send(404, {"error": f"no route for {self.command} {raw_path}"})
            groups = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
            req = Request(groups, {k: v[-1] for k, v in parse_qs(query).items()}, self.headers, body)
            stall = hub.stalls.get(f"{self.command} {name}")
            if stall:
                hub.stalled.set()
                time.sleep(stall)
            with hub._lock:
                hub.requests.append({"route": name, "method": self.command, "path": self.path,
                                     "authorization": self.headers.get("Authorization"), "query": req.query})
                try:
                    if name in hub._failures:
                        raise HttpError(hub._failures.pop(name), f"injected failure of {name}")
                    status, payload = fn(hub, req)
                except HttpError as e:
                    extra = dict(e.extra)
                    more = extra.pop("__headers__", None)
                    return self._send(e.status, {"error": e.message, **extra}, e, more)
            self._send(status, payload)

        def _send(self, status: int, payload: Any, error: HttpError | None = None,
                  more: dict[str, str] | None = None) -> None:
            if isinstance(payload, Raw):
                data, content_type, headers = payload.data, "application/octet-stream", dict(payload.headers)
            else:
                etag = payload.pop("__etag__", None) if isinstance(payload, dict) else None
                data, content_type, headers = json.dumps(payload).encode(), "application/json", {"ETag": etag}
            headers.update({"X-Error-Message": error and error.message, "X-Error-Code": error and error.code,
                            **(more or {})})
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            for key, value in headers.items():
                if value:
                    self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_HEAD = _dispatch

    return Handler
