"""``bora-tools push`` against a Hub-compatible server on 127.0.0.1, through the real huggingface_hub client.

The command runs in a subprocess with ``HF_ENDPOINT`` and ``HF_HUB_DISABLE_XET=1`` set, as a user
would run it (huggingface_hub reads both at import time); model-card tests call the library in
process with ``endpoint=`` and read the card back from the server with ``huggingface_hub.ModelCard``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
from hub_server import FakeHub
from huggingface_hub import HfApi, ModelCard
from safetensors.numpy import save_file

from bora_tools.errors import BoraError, HubError, UnsafePathError
from bora_tools.hub.push import build_model_card, push
from bora_tools.io.hub_client import upload_errors
from bora_tools.progress import logger

# huggingface_hub itself passes file objects as `data=` to its HTTP client, which warns about it.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")

REPO_ROOT = Path(__file__).resolve().parents[1]
WRITE = "hf_wRiTeToKeN1234567890abcdef"
READ = "hf_rEaDoNlYtOkEn0987654321fedcba"
MiB = 1 << 20


# ----- inputs, built here: no downloads --------------------------------------------------------
def bora_adapter(d: Path, *, base: str | None = "org/tiny-llama", big: bool = False) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "BORA", "r": 4, "bora_blocks": 2, "lora_alpha": 8, "use_rslora": False,
              "target_modules": ["q_proj", "v_proj"], "base_model_name_or_path": base, "task_type": "CAUSAL_LM",
              "bias": "none"}
    (d / "adapter_config.json").write_text(json.dumps(config, indent=2))
    m = 2048 if big else 16  # big: 128 KiB of tensors instead of 1 KiB
    rng = np.random.default_rng(0)
    tensors = {}
    for mod in ("q_proj", "v_proj"):
        p = f"base_model.model.model.layers.0.self_attn.{mod}"
        tensors[f"{p}.lora_A.weight"] = rng.standard_normal((4, m)).astype(np.float32)
        tensors[f"{p}.lora_B.weight"] = rng.standard_normal((m, 4)).astype(np.float32)
        tensors[f"{p}.bora_sigma"] = np.ones((2, 2, 4), np.float32)
    save_file(tensors, str(d / "adapter_model.safetensors"))
    return d


def lora_adapter(d: Path, *, base: str = "org/tiny-llama") -> Path:
    d.mkdir(parents=True)
    config = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"],
              "base_model_name_or_path": base, "task_type": "CAUSAL_LM", "rank_pattern": {"q_proj": 4},
              "alpha_pattern": {}, "use_rslora": False, "bias": "none"}
    (d / "adapter_config.json").write_text(json.dumps(config))
    save_file({"base_model.model.q_proj.lora_A.weight": np.zeros((4, 16), np.float32),
               "base_model.model.q_proj.lora_B.weight": np.zeros((16, 4), np.float32)},
              str(d / "adapter_model.safetensors"))
    return d


def merged_model(d: Path, *, name_or_path: str | None = "org/tiny-llama") -> Path:
    """A folder as bora-tools merge writes it: config.json records the base as base_model_name_or_path."""
    d.mkdir(parents=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 16, "dtype": "float32"}
    if name_or_path:
        config["base_model_name_or_path"] = name_or_path
    (d / "config.json").write_text(json.dumps(config))
    (d / "generation_config.json").write_text("{}")
    save_file({"model.embed_tokens.weight": np.ones((8, 16), np.float32)}, str(d / "model.safetensors"))
    return d


def gguf_file(path: Path, *, kind: str, base_url: str | None = "https://huggingface.co/org/tiny-llama",
              source_url: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_type(kind)
    w.add_name("tiny")
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    if base_url:
        w.add_base_model_count(1)
        w.add_base_model_repo_url(0, base_url)
    if source_url:
        w.add_source_repo_url(source_url)
    if kind == "adapter":
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 8.0)
        w.add_tensor("blk.0.attn_q.weight.lora_a", np.ones((4, 16), np.float32))
    else:
        w.add_tensor("token_embd.weight", np.ones((8, 16), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def snapshot(d: Path) -> dict[str, tuple[bytes, int]]:
    return {p.relative_to(d).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns) for p in d.rglob("*") if p.is_file()}


# ----- the server and the command ----------------------------------------------------------------
@pytest.fixture
def hub():
    with FakeHub(tokens={WRITE: "write", READ: "read"}, lfs_threshold=MiB, multipart_chunk=MiB) as server:
        yield server


@pytest.fixture
def run(tmp_path, hub):
    """Run ``bora-tools push ARGS`` in a subprocess against ``hub``, with an empty HF_HOME (no saved login)."""
    home = tmp_path / "hf_home"
    home.mkdir()

    def _run(*args: str, env: dict[str, str] | None = None, endpoint: str | None = None):
        base = {k: v for k, v in os.environ.items()
                if not k.startswith("HF_") and k not in ("HUGGING_FACE_HUB_TOKEN",)}
        base |= {"HF_ENDPOINT": endpoint or hub.endpoint, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(home),
                 "HF_HUB_DISABLE_TELEMETRY": "1", **(env or {})}
        cmd = [sys.executable, "-m", "bora_tools.cli", "push", *args]
        return subprocess.run(cmd, cwd=REPO_ROOT, env=base, capture_output=True, text=True, timeout=120)

    _run.home = home
    return _run


def assert_clean_failure(result, *secrets: str) -> str:
    """Non-zero exit, one ``Error:`` line on stderr, no traceback, no secret anywhere."""
    assert result.returncode == 1, (result.stdout, result.stderr)
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for secret in secrets:
        assert secret not in result.stdout and secret not in result.stderr
    return errors[0]


@pytest.fixture
def no_xet(monkeypatch):
    """In-process pushes: the client must use the LFS path (the server has no Xet storage)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)


@pytest.fixture
def warnings_seen():
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


# ----- uploads -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_files_arrive_byte_identical_small_as_regular_and_large_through_lfs(tmp_path, hub, run):
    src = bora_adapter(tmp_path / "adapter", big=True)
    (src / "notes").mkdir()
    (src / "notes" / "big.dat").write_bytes(np.random.default_rng(1).bytes(3 * MiB + 17))  # multipart: 4 parts
    before = snapshot(src)
    result = run(str(src), "me/bora", "--token", WRITE)
    assert result.returncode == 0, result.stderr
    files = hub.files("me/bora")
    for name, (data, _) in before.items():
        assert files[name] == data, name
    repo = hub.repos["me/bora"]
    assert repo.lfs_paths == {"adapter_model.safetensors", "notes/big.dat"}  # the json and README: regular
    assert len(hub.calls("lfs_upload")) == 1 + 4 and hub.calls("lfs_complete")
    assert f"/me/bora/commit/{hub.head('me/bora')}" in result.stdout
    assert snapshot(src) == before  # the input is untouched: the card went into the upload only
    assert "README.md" in files and "README.md" not in before
    assert all(c["authorization"] == f"Bearer {WRITE}" for c in hub.requests if not c["route"].startswith("lfs_"))
    assert WRITE not in result.stdout + result.stderr


@pytest.mark.slow
def test_second_push_of_unchanged_files_uploads_nothing_and_commits_nothing(tmp_path, hub, run):
    src = bora_adapter(tmp_path / "adapter", big=True)
    assert run(str(src), "me/bora", "--token", WRITE).returncode == 0
    head, sent, commits = hub.head("me/bora"), hub.lfs_bytes_received, len(hub.calls("commit"))
    result = run(str(src), "me/bora", "--token", WRITE, "--json")
    assert result.returncode == 0, result.stderr
    assert hub.lfs_bytes_received == sent and len(hub.calls("commit")) == commits
    assert hub.head("me/bora") == head
    assert json.loads(result.stdout)["commit_oid"] == head
    quiet = run(str(src), "me/bora", "--token", WRITE, "--quiet")
    assert quiet.returncode == 0 and quiet.stderr == ""  # no progress bars, no warnings


@pytest.mark.slow
def test_rerun_after_an_interrupted_push_sends_only_what_is_missing(tmp_path, hub, run):
    src = bora_adapter(tmp_path / "adapter", big=True)
    hub.fail_next("commit", 500)  # the large file is stored, then the commit fails
    line = assert_clean_failure(run(str(src), "me/bora", "--token", WRITE), WRITE)
    assert "HTTP 500" in line and "again" in line
    sent = hub.lfs_bytes_received
    assert sent >= (src / "adapter_model.safetensors").stat().st_size
    result = run(str(src), "me/bora", "--token", WRITE)
    assert result.returncode == 0, result.stderr
    assert hub.lfs_bytes_received == sent  # nothing sent twice
    assert hub.file("me/bora", "adapter_model.safetensors") == (src / "adapter_model.safetensors").read_bytes()


@pytest.mark.parametrize("private", [True, False])
@pytest.mark.slow
def test_private_flag_is_honoured_on_creation(tmp_path, hub, run, private):
    src = bora_adapter(tmp_path / "adapter")
    flags = ["--private"] if private else []
    assert run(str(src), "me/bora", "--token", WRITE, *flags).returncode == 0
    assert hub.repos["me/bora"].private is private


@pytest.mark.slow
def test_private_flag_on_an_existing_public_repo_warns(tmp_path, hub, run):
    src = bora_adapter(tmp_path / "adapter")
    assert run(str(src), "me/bora", "--token", WRITE).returncode == 0
    result = run(str(src), "me/bora", "--token", WRITE, "--private")
    assert result.returncode == 0 and hub.repos["me/bora"].private is False
    assert "already exists and is public" in result.stderr


@pytest.mark.slow
def test_revision_creates_the_branch_and_leaves_main_alone(tmp_path, hub, run):
    src = bora_adapter(tmp_path / "adapter")
    result = run(str(src), "me/bora", "--token", WRITE, "--revision", "v1-exact", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["revision"] == "v1-exact" and summary["commit_oid"] == hub.head("me/bora", "v1-exact")
    assert set(hub.files("me/bora", "v1-exact")) >= {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    assert set(hub.files("me/bora")) == {".gitattributes"}
    assert run(str(src), "me/bora", "--token", WRITE, "--revision", "v1-exact").returncode == 0  # branch exists


@pytest.mark.slow
def test_create_pr_opens_a_pull_request_against_the_revision(tmp_path, hub, run):
    src = bora_adapter(tmp_path / "adapter")
    assert run(str(src), "me/bora", "--token", WRITE, "--revision", "dev").returncode == 0
    (src / "extra.json").write_text("{}")
    result = run(str(src), "me/bora", "--token", WRITE, "--revision", "dev", "--create-pr", "--json",
                 "--commit-message", "Add extra")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["pr_url"] == f"{hub.endpoint}/me/bora/discussions/1"
    assert "extra.json" in hub.files("me/bora", "refs/pr/1") and "extra.json" not in hub.files("me/bora", "dev")
    commit = hub.calls("commit")[-1]
    assert commit["path"].split("?")[0].endswith("/commit/dev") and commit["query"] == {"create_pr": "1"}
    assert hub.repos["me/bora"].commits[hub.head("me/bora", "refs/pr/1")].message == "Add extra"


@pytest.mark.slow
def test_create_pr_against_a_missing_branch_is_one_line(tmp_path, hub, run):
    src = bora_adapter(tmp_path / "adapter")
    line = assert_clean_failure(run(str(src), "me/bora", "--token", WRITE, "--revision", "nope", "--create-pr"),
                                WRITE)
    assert "revision 'nope' not found" in line


@pytest.mark.slow
def test_include_and_exclude_patterns_are_repeatable_and_exclude_readme_skips_the_card(tmp_path, hub, run):
    src = bora_adapter(tmp_path / "adapter")
    (src / "logs").mkdir()
    (src / "logs" / "train.log").write_text("loss 1.0")
    (src / "notes.txt").write_text("notes")
    result = run(str(src), "me/bora", "--token", WRITE, "--exclude", "logs/*", "--exclude", "*.txt",
                 "--exclude", "README.md", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["card_written"] is False
    assert set(hub.files("me/bora")) == {".gitattributes", "adapter_config.json", "adapter_model.safetensors"}
    result = run(str(src), "me/bora2", "--token", WRITE, "--include", "*.json", "--include", "README.md")
    assert result.returncode == 0, result.stderr
    assert set(hub.files("me/bora2")) == {".gitattributes", "adapter_config.json", "README.md"}


@pytest.mark.slow
def test_a_readme_in_path_is_uploaded_as_is(tmp_path, hub, run):
    src = bora_adapter(tmp_path / "adapter", base="/local/base")
    readme = "---\nlicense: mit\n---\n# My own card\n"
    (src / "README.md").write_text(readme)
    result = run(str(src), "me/bora", "--token", WRITE, "--json")
    assert json.loads(result.stdout)["card_written"] is False
    assert "Warning" not in result.stderr  # no card, so nothing to say about its base model
    assert hub.file("me/bora", "README.md").decode() == readme


@pytest.mark.slow
def test_a_readme_the_hub_refuses_is_one_line_and_nothing_is_uploaded(tmp_path, hub, run):
    src = bora_adapter(tmp_path / "adapter")
    (src / "README.md").write_text("---\nbase_model: org/base\nbase_model_relation: cousin\n---\n# card\n")
    line = assert_clean_failure(run(str(src), "me/bora", "--token", WRITE), WRITE)
    assert "README.md metadata" in line and "base_model_relation" in line
    assert not hub.calls("preupload") and not hub.calls("commit")


@pytest.mark.slow
def test_a_single_gguf_file_uploads_with_its_card(tmp_path, hub, run):
    path = gguf_file(tmp_path / "out" / "tiny-f32.gguf", kind="model")
    result = run(str(path), "me/tiny-gguf", "--token", WRITE, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["files"] == ["README.md", "tiny-f32.gguf"]
    assert hub.file("me/tiny-gguf", "tiny-f32.gguf") == path.read_bytes()
    assert ModelCard(hub.file("me/tiny-gguf", "README.md").decode()).data.library_name == "gguf"


# ----- tokens and errors -------------------------------------------------------------------------
@pytest.mark.parametrize("flag, env_token, saved, expected", [
    (WRITE, None, None, WRITE),
    (None, WRITE, None, WRITE),
    (None, None, WRITE, WRITE),
    (WRITE, "hf_other_env_token", None, WRITE),  # --token first
    (None, WRITE, "hf_other_saved_token", WRITE),  # then HF_TOKEN, then the saved login
], ids=["flag", "env", "saved-login", "flag-over-env", "env-over-saved-login"])
@pytest.mark.slow
def test_token_sources_in_huggingface_hub_order_and_never_printed(tmp_path, hub, run, flag, env_token, saved,
                                                                   expected):
    src = bora_adapter(tmp_path / "adapter")
    if saved:
        (run.home / "token").write_text(saved)
    args = ["--token", flag] if flag else []
    result = run(str(src), "me/bora", *args, env={"HF_TOKEN": env_token} if env_token else None)
    assert result.returncode == 0, result.stderr
    assert {c["authorization"] for c in hub.calls("commit") + hub.calls("preupload")} == {f"Bearer {expected}"}
    for secret in {WRITE, env_token, saved} - {None}:
        assert secret not in result.stdout + result.stderr


@pytest.mark.slow
def test_missing_token_is_one_line_with_what_to_do(tmp_path, hub, run):
    line = assert_clean_failure(run(str(bora_adapter(tmp_path / "a")), "me/bora"))
    assert "no Hugging Face token found" in line and "HF_TOKEN" in line and "hf auth login" in line
    assert hub.calls("create_repo")[0]["authorization"] is None


@pytest.mark.slow
def test_rejected_token_401_is_one_line_and_never_shows_the_token(tmp_path, hub, run):
    bad = "hf_NotAValidTokenXYZ123456789"
    line = assert_clean_failure(run(str(bora_adapter(tmp_path / "a")), "me/bora", "--token", bad), bad)
    assert "rejected the token (401" in line
    assert hub.calls("create_repo")[0]["authorization"] == f"Bearer {bad}"


@pytest.mark.slow
def test_read_only_token_403_is_one_line(tmp_path, hub, run):
    src = bora_adapter(tmp_path / "a")
    assert run(str(src), "me/bora", "--token", WRITE).returncode == 0
    (src / "new.json").write_text("{}")
    line = assert_clean_failure(run(str(src), "me/bora", "--token", READ), READ, WRITE)
    assert "403" in line and "write" in line
    line = assert_clean_failure(run(str(src), "me/elsewhere", "--token", READ), READ)
    assert "403" in line
    assert "me/elsewhere" not in hub.repos


@pytest.mark.slow
def test_unreachable_endpoint_is_one_line_and_fast(tmp_path, run):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    start = time.monotonic()
    line = assert_clean_failure(run(str(bora_adapter(tmp_path / "a")), "me/bora", "--token", WRITE,
                                    endpoint=closed), WRITE)
    assert f"cannot reach the Hub at {closed}" in line and "HF_ENDPOINT" in line
    assert time.monotonic() - start < 60


def test_missing_repo_answer_maps_to_one_line(hub):
    api = HfApi(endpoint=hub.endpoint, token=WRITE)
    with pytest.raises(HubError, match=r"nobody/nothing: repository not found at http://127\.0\.0\.1") as info:
        with upload_errors(endpoint=hub.endpoint, repo_id="nobody/nothing", revision=None, token=WRITE):
            api.repo_info("nobody/nothing")
    assert WRITE not in info.value.one_line()


def test_a_symlink_leading_outside_path_is_refused(tmp_path, hub, no_xet):
    src = bora_adapter(tmp_path / "adapter")
    (tmp_path / "secret.txt").write_text("secret")
    (src / "leak.txt").symlink_to(tmp_path / "secret.txt")
    with pytest.raises(UnsafePathError, match="leak.txt"):
        push(path=src, repo_id="me/bora", token=WRITE, endpoint=hub.endpoint)
    assert not hub.requests


# ----- model cards ---------------------------------------------------------------------------------
CARDS = {
    "bora": (lambda p: bora_adapter(p), {"library_name": "peft", "base_model": "org/tiny-llama",
                                         "base_model_relation": "adapter", "pipeline_tag": "text-generation"},
             ["bora", "peft"], ["bora-tools to-lora", "PeftModel.from_pretrained", "| blocks `b` (`bora_blocks`) | 2 |",
                                "bora-tools merge", "bora-tools export-gguf"]),
    "lora": (lambda p: lora_adapter(p), {"library_name": "peft", "base_model": "org/tiny-llama",
                                         "base_model_relation": "adapter"},
             ["lora", "peft"], ['PeftModel.from_pretrained(base, "me/card")', "bora-tools export-gguf"]),
    "merged": (lambda p: merged_model(p), {"library_name": "transformers", "base_model": "org/tiny-llama",
                                           "base_model_relation": "finetune", "pipeline_tag": "text-generation"},
               ["bora-tools"], ['AutoModelForCausalLM.from_pretrained("me/card")', "bora-tools merge"]),
    "gguf-model": (lambda p: gguf_file(p / "tiny-f32.gguf", kind="model",
                                       source_url="https://huggingface.co/org/tiny-llama-merged"),
                   {"library_name": "gguf", "base_model": "org/tiny-llama-merged", "base_model_relation": "quantized"},
                   ["gguf"], ["llama-cli -m tiny-f32.gguf"]),
    "gguf-lora": (lambda p: gguf_file(p / "adapter-f32.gguf", kind="adapter"),
                  {"library_name": "gguf", "base_model": "org/tiny-llama", "base_model_relation": "adapter"},
                  ["gguf", "lora"], ["--lora adapter-f32.gguf", "`adapter.lora.alpha`: 8"]),
}


@pytest.mark.parametrize("kind", list(CARDS))
def test_model_card_metadata_parses_back_with_the_expected_fields(tmp_path, hub, no_xet, kind):
    make, fields, tags, body = CARDS[kind]
    src = tmp_path / "src"
    make(src)
    result = push(path=src, repo_id="me/card", token=WRITE, endpoint=hub.endpoint)
    assert result.card_written and "README.md" in result.files
    assert hub.calls("validate_yaml"), "the client validates README metadata with the Hub before uploading"
    card = ModelCard(hub.file("me/card", "README.md").decode())
    meta = card.data.to_dict()
    for key, value in fields.items():
        assert meta[key] == value, key
    assert set(tags) | {"bora-tools"} <= set(meta["tags"])
    for snippet in body:
        assert snippet in card.text, snippet
    assert meta["base_model_relation"] in ("adapter", "merge", "quantized", "finetune")


@pytest.mark.parametrize("base", ["/abs/base-model", "./relative/base", "name-only", "~/models/base", "EXISTS"])
def test_a_local_base_model_is_left_out_with_a_warning(tmp_path, warnings_seen, monkeypatch, base):
    monkeypatch.chdir(tmp_path)
    if base == "EXISTS":
        base = "models/llama"  # looks like owner/name but is a directory here
        (tmp_path / base).mkdir(parents=True)
    card = build_model_card(bora_adapter(tmp_path / "adapter", base=base), repo_id="me/card")
    assert "base_model" not in card.data.to_dict() and "base_model_relation" not in card.data.to_dict()
    assert base not in str(card)
    assert any("not a Hub model id" in r.getMessage() and "`base_model`" in r.getMessage() for r in warnings_seen)


@pytest.mark.slow
def test_base_model_option_fills_the_card_for_a_merged_model(tmp_path, hub, run):
    src = merged_model(tmp_path / "merged", name_or_path=str(tmp_path / "base"))
    result = run(str(src), "me/merged", "--token", WRITE, "--base-model", "org/tiny-llama")
    assert result.returncode == 0, result.stderr
    assert "Warning" not in result.stderr
    meta = ModelCard(hub.file("me/merged", "README.md").decode()).data.to_dict()
    assert meta["base_model"] == "org/tiny-llama" and meta["base_model_relation"] == "finetune"


def test_gguf_that_names_only_its_base_is_a_finetune_of_it(tmp_path):
    card = build_model_card(gguf_file(tmp_path / "m.gguf", kind="model"), repo_id="me/m")
    assert card.data.base_model == "org/tiny-llama" and card.data.base_model_relation == "finetune"


def test_cards_are_deterministic(tmp_path):
    src = bora_adapter(tmp_path / "adapter")
    assert str(build_model_card(src, repo_id="me/x")) == str(build_model_card(src, repo_id="me/x"))


def test_exported_ggufs_carry_the_right_relation(tmp_path, tiny, llama_base):
    """A real export: a merged GGUF is a fine-tune of its base, a plain conversion a quantized form."""
    from bora_tools.gguf.export import export_gguf

    base = llama_base
    adapter = tiny.adapter("llama", r=2, bora_blocks=2, target_modules=["q_proj"]).path
    export_gguf(adapter, tmp_path / "merged.gguf", base=base, merge=True, outtype="f32")
    export_gguf(base, tmp_path / "base.gguf", outtype="f32")
    merged = build_model_card(tmp_path / "merged.gguf", repo_id="me/m", base_model="org/tiny-llama").data
    plain = build_model_card(tmp_path / "base.gguf", repo_id="me/b", base_model="org/tiny-llama").data
    assert (merged.base_model, merged.base_model_relation) == ("org/tiny-llama", "finetune")
    assert (plain.base_model, plain.base_model_relation) == ("org/tiny-llama", "quantized")


@pytest.mark.parametrize("header", [{"x": {"dtype": "F32", "data_offsets": [0, 4]}}, ["not", "an", "object"]])
def test_malformed_adapter_header_is_a_clean_error(tmp_path, header):
    import struct

    src = bora_adapter(tmp_path / "adapter")
    raw = json.dumps(header).encode()
    (src / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 4)
    with pytest.raises(BoraError, match="adapter_model.safetensors: corrupt safetensors header"):
        build_model_card(src, repo_id="me/x")
