"""Hub ids as inputs (``owner/name[@revision]``), downloaded by the real huggingface_hub client from the
Hub-compatible server in ``tests/hub_server.py``.

The CLI runs in a subprocess with ``HF_ENDPOINT``, ``HF_HUB_DISABLE_XET=1`` and an empty ``HF_HOME`` set
before huggingface_hub is imported (it reads them at import time), as a user's shell would set them;
several commands share one process to keep the tests quick. The library function is also driven in
process with ``endpoint=`` and ``cache_dir=``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from cli_support import run
from hub_server import FakeHub

from bora_tools.core.config import BoraConfig
from bora_tools.demo.tiny import build_model, default_targets, save_model_dir
from bora_tools.errors import HubError
from bora_tools.hub.push import build_model_card
from bora_tools.io.hub_input import parse_hub_id, resolve_input
from bora_tools.training import add_bora, randomize_bora, save_bora

REPO_ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_rEaDtOkEn1234567890abcdefghij"


def _files(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """A sharded tiny base, a BoRA adapter on it, and a second adapter (for another revision)."""
    root = tmp_path_factory.mktemp("local")
    model = build_model("llama")
    base = save_model_dir(model, root / "base", max_shard_size="40KB")
    cfg = BoraConfig(r=2, bora_blocks=2, lora_alpha=4, target_modules=default_targets("llama"),
                     base_model_name_or_path="org/base")
    add_bora(model, cfg)
    randomize_bora(model, seed=1)
    adapter = save_bora(model, root / "bora")  # the repo's name: GGUF files record it
    randomize_bora(model, seed=2)  # new random factors: another adapter, same shapes
    adapter_v1 = save_bora(model, root / "adapter_v1")
    return {"base": base, "adapter": adapter, "adapter_v1": adapter_v1, "root": root}


@pytest.fixture(scope="module")
def hub(local):
    with FakeHub(tokens={TOKEN: "read"}) as server:
        extras = {"pytorch_model.bin": b"never downloaded", "model-q8_0.gguf": b"GGUF never downloaded",
                  "README.md": b"# base\n"}
        server.seed("org/base", {**_files(local["base"]), **extras})
        server.seed("org/bora", {**_files(local["adapter"]), "README.md": b"# adapter\n"})
        server.seed("org/bora", _files(local["adapter_v1"]), revision="v1")
        server.seed("org/private-bora", _files(local["adapter"]), private=True)
        server.seed("org/gated-bora", _files(local["adapter"]))
        server.repos["org/gated-bora"].gated = True
        yield server


def cli_batch(hub, home: Path, commands: list[list[str]], *, env: dict[str, str] | None = None) -> list[dict]:
    """Run several ``bora-tools`` command lines in one subprocess, as a user's shell environment sets them."""
    code = textwrap.dedent("""
        import json, sys
        from click.testing import CliRunner
        from bora_tools.cli import cli
        out = []
        for argv in json.loads(sys.argv[1]):
            r = CliRunner().invoke(cli, argv)
            out.append({"code": r.exit_code, "stdout": r.stdout, "stderr": r.stderr})
        print(json.dumps(out))
    """)
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and k != "HUGGING_FACE_HUB_TOKEN"}
    base_env |= {"HF_ENDPOINT": hub.endpoint, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(home),
                 "HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONPATH": str(REPO_ROOT), **(env or {})}
    proc = subprocess.run([sys.executable, "-c", code, json.dumps([[str(a) for a in c] for c in commands])],
                          cwd=REPO_ROOT, env=base_env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _gguf_contents(path: Path) -> dict:
    """Every key's value and every tensor's type, shape and bytes."""
    import gguf

    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: (t.tensor_type, tuple(t.shape), bytes(t.data.tobytes())) for t in reader.tensors}
    return {**fields, "tensors": tensors}


def one_error_line(result: dict) -> str:
    assert result["code"] == 1, result
    lines = [line for line in result["stderr"].splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error: ")]
    assert len(errors) == 1 and "Traceback" not in result["stderr"], result["stderr"]
    return errors[0]


# ----- the library: which files, which commit, which errors ---------------------------------------
def test_hub_id_syntax():
    assert parse_hub_id("meta-llama/Llama-3.2-1B") == ("meta-llama/Llama-3.2-1B", None)
    assert parse_hub_id("org/x@refs/pr/1") == ("org/x", "refs/pr/1")
    for not_an_id in ("./x", "/abs/path", "x", "a/b/c", "../a/b", "out/model.gguf", "a/b@"):
        assert parse_hub_id(not_an_id) is None, not_an_id


def test_only_the_needed_files_are_downloaded(hub, tmp_path):
    hub.requests.clear()
    base = resolve_input("org/base", kind="model", endpoint=hub.endpoint, cache_dir=tmp_path)
    assert base.from_hub and base.commit == hub.head("org/base")
    got = set(base.files)
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json"} <= got
    assert not any(f.endswith((".bin", ".gguf")) or f == "README.md" for f in got), got
    shards = set(json.loads((base.path / "model.safetensors.index.json").read_text())["weight_map"].values())
    assert shards <= got and len(shards) > 1
    assert set(hub.downloaded()) == got  # nothing else crossed the wire
    adapter = resolve_input("org/bora", kind="adapter", endpoint=hub.endpoint, cache_dir=tmp_path)
    assert set(adapter.files) == {"adapter_config.json", "adapter_model.safetensors"}


def test_revision_selects_its_commit(hub, local, tmp_path):
    main = resolve_input("org/bora", kind="adapter", endpoint=hub.endpoint, cache_dir=tmp_path)
    v1 = resolve_input("org/bora@v1", kind="adapter", endpoint=hub.endpoint, cache_dir=tmp_path)
    assert v1.commit == hub.head("org/bora", "v1") != main.commit
    name = "adapter_model.safetensors"
    assert (v1.path / name).read_bytes() == (local["adapter_v1"] / name).read_bytes()
    assert (main.path / name).read_bytes() == (local["adapter"] / name).read_bytes()
    by_commit = resolve_input(f"org/bora@{main.commit}", kind="adapter", endpoint=hub.endpoint, cache_dir=tmp_path)
    assert by_commit.path == main.path


def test_an_existing_local_path_wins(hub, local, tmp_path, monkeypatch):
    (tmp_path / "org" / "bora").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    hub.requests.clear()
    found = resolve_input("org/bora", kind="adapter", endpoint=hub.endpoint, cache_dir=tmp_path / "cache")
    assert not found.from_hub and found.path == Path("org/bora") and hub.requests == []


def test_offline_cache_hit_works_and_a_miss_is_one_line(hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    online = resolve_input("org/bora", kind="adapter", endpoint=hub.endpoint, cache_dir=tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub.requests.clear()
    offline = resolve_input("org/bora", kind="adapter", endpoint=hub.endpoint, cache_dir=tmp_path)
    assert offline.path == online.path and hub.requests == []
    with pytest.raises(HubError, match="not in the Hugging Face cache and HF_HUB_OFFLINE is set"):
        resolve_input("org/base", kind="model", endpoint=hub.endpoint, cache_dir=tmp_path)


@pytest.mark.parametrize("spec,token,fragment", [
    ("org/missing", None, "no repository org/missing"),
    ("org/bora@nope", None, "revision 'nope' not found"),
    ("org/private-bora", None, "no repository org/private-bora"),
    ("org/gated-bora", None, "no Hugging Face token found"),
    ("org/gated-bora", TOKEN, "403 Forbidden"),
    ("org/bora", "hf_wrong_token_abcdefghijklmnop", "rejected the token (401"),
])
def test_hub_errors_are_one_line(hub, tmp_path, monkeypatch, spec, token, fragment):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))
    with pytest.raises(HubError) as info:
        resolve_input(spec, kind="adapter", token=token, endpoint=hub.endpoint, cache_dir=tmp_path)
    line = info.value.one_line()
    assert fragment in line and "\n" not in line and (token is None or token not in line), line


def test_private_repo_with_a_token(hub, tmp_path):
    found = resolve_input("org/private-bora", kind="adapter", token=TOKEN, endpoint=hub.endpoint, cache_dir=tmp_path)
    assert (found.path / "adapter_model.safetensors").is_file()


def test_unreachable_endpoint_is_one_line(tmp_path):
    with pytest.raises(HubError, match="cannot reach the Hub at http://127.0.0.1:9"):
        resolve_input("org/bora", kind="adapter", endpoint="http://127.0.0.1:9", cache_dir=tmp_path)


# ----- the CLI: outputs from Hub ids are the outputs from local copies -----------------------------
@pytest.mark.slow
def test_commands_from_hub_ids_match_local_copies(hub, local, tmp_path):
    a, b = local["adapter"], local["base"]
    hub_out, loc = tmp_path / "hub", tmp_path / "local"
    commands = {
        "inspect": (["inspect", "org/bora", "--json"], ["inspect", a, "--json"]),
        "merge": (["merge", "org/bora", "--base", "org/base", "--out", hub_out / "merged"],
                  ["merge", a, "--base", b, "--out", loc / "merged"]),
        "to-lora": (["to-lora", "org/bora@v1", "--out", hub_out / "lora", "--rank", "3"],
                    ["to-lora", local["adapter_v1"], "--out", loc / "lora", "--rank", "3"]),
        "export-gguf": (["export-gguf", "org/base", "--out", hub_out / "m.gguf", "--outtype", "Q8_0"],
                        ["export-gguf", b, "--out", loc / "m.gguf", "--outtype", "q8_0"]),
        "export-lora": (["export-gguf", "org/bora", "--base", "org/base", "--out", hub_out / "l.gguf"],
                        ["export-gguf", a, "--base", b, "--out", loc / "l.gguf"]),
    }
    results = cli_batch(hub, tmp_path / "home", [c[0] for c in commands.values()])
    for name, result in zip(commands, results, strict=True):
        assert result["code"] == 0, (name, result)
        assert "from the Hub" in result["stderr"], (name, result["stderr"])
    local_results = [run(*c[1]) for c in commands.values()]
    assert all(r.exit_code == 0 for r in local_results), [r.output for r in local_results]
    inspected_hub, inspected_local = json.loads(results[0]["stdout"]), json.loads(local_results[0].stdout)
    assert inspected_hub.pop("path") != inspected_local.pop("path")
    assert inspected_hub == inspected_local
    hub_merged, local_merged = _files(hub_out / "merged"), _files(loc / "merged")
    assert json.loads(hub_merged.pop("config.json"))["_name_or_path"] == "org/base"  # for push's model card
    local_merged.pop("config.json")
    assert hub_merged == local_merged
    assert build_model_card(hub_out / "merged", repo_id="me/merged").data.base_model == "org/base"
    assert _files(hub_out / "lora") == _files(loc / "lora")
    # the same GGUFs, except that those made from Hub ids name them (general.source.*, general.base_model.*)
    provenance = {"m.gguf": {"general.source.repo_url": "https://huggingface.co/org/base"},
                  "l.gguf": {"general.source.repo_url": "https://huggingface.co/org/bora",
                             "general.base_model.count": 1, "general.base_model.0.name": "base",
                             "general.base_model.0.organization": "org",
                             "general.base_model.0.repo_url": "https://huggingface.co/org/base"}}
    for name, extra in provenance.items():
        from_hub, here = _gguf_contents(hub_out / name), _gguf_contents(loc / name)
        assert from_hub == {**here, **extra}, name
    assert not any(f.endswith((".bin", ".gguf")) for f in hub.downloaded())


@pytest.mark.slow
def test_cli_offline_and_errors(hub, local, tmp_path):
    home = tmp_path / "home"
    first = cli_batch(hub, home, [["inspect", "org/bora", "--json"]])
    assert first[0]["code"] == 0
    offline = cli_batch(hub, home, [["inspect", "org/bora", "--json"], ["inspect", "org/bora@v1"],
                                    ["inspect", "org/missing"]], env={"HF_HUB_OFFLINE": "1"})
    assert offline[0]["code"] == 0 and json.loads(offline[0]["stdout"]) == json.loads(first[0]["stdout"])
    assert "HF_HUB_OFFLINE" in one_error_line(offline[1])
    assert "HF_HUB_OFFLINE" in one_error_line(offline[2])
    online = cli_batch(hub, home, [["inspect", "org/missing"], ["merge", "org/bora", "--base", "org/base@nope",
                                                                "--out", tmp_path / "x"],
                                   ["inspect", "org/private-bora", "--token", TOKEN, "--json"]])
    assert "no repository org/missing" in one_error_line(online[0])
    assert "revision 'nope' not found" in one_error_line(online[1]) and not (tmp_path / "x").exists()
    assert online[2]["code"] == 0 and TOKEN not in online[2]["stdout"] + online[2]["stderr"]
