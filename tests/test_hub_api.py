"""The recorded base (no ``--base``), Hub ids in the Python API and provenance of outputs made from Hub ids.

The real huggingface_hub client downloads from the Hub-compatible server in tests/hub_server.py: the API
functions are called in this process with huggingface_hub's endpoint and cache pointed at it (what
``HF_ENDPOINT`` and ``HF_HUB_CACHE`` set); CLI runs go through a subprocess as in test_hub_inputs.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest
import torch
from cli_support import clean_failure, run
from hub_server import FakeHub
from test_hub_inputs import cli_batch

import bora_tools as bt
from bora_tools.core.config import BoraConfig
from bora_tools.demo.tiny import build_model, default_targets, save_model_dir
from bora_tools.errors import HubError
from bora_tools.io.hub_input import hub_id_of, resolve_input
from bora_tools.training import add_bora, randomize_bora, save_bora

TOKEN = "hf_rEaDtOkEn1234567890abcdefghij"
IDS = torch.tensor([[0, 17, 42, 99, 3, 250, 7]])
HUB = "https://huggingface.co/"


def _files(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _gguf_fields(path: Path) -> dict:
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith("general.")}


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """A tiny base and two adapters on it: one recording the base as the Hub id org/base, one recording
    the local base folder."""
    root = tmp_path_factory.mktemp("api")
    model = build_model("llama")
    base = save_model_dir(model, root / "base")
    cfg = BoraConfig(r=2, bora_blocks=2, lora_alpha=4, target_modules=default_targets("llama"),
                     base_model_name_or_path="org/base")
    add_bora(model, cfg)
    randomize_bora(model, seed=1)
    with torch.no_grad():
        logits = model(IDS).logits
    adapter = save_bora(model, root / "bora")
    local_adapter = save_bora(model, root / "bora-local")
    config = json.loads((local_adapter / "adapter_config.json").read_text())
    (local_adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(base)}))
    data = root / "data.jsonl"
    data.write_text("\n".join(json.dumps({"text": "The quick brown fox jumps over the lazy dog."})
                              for _ in range(4)) + "\n")
    return {"base": base, "adapter": adapter, "local_adapter": local_adapter, "logits": logits, "data": data}


@pytest.fixture(scope="module")
def hub(local):
    with FakeHub(tokens={TOKEN: "read"}) as server:
        server.seed("org/base", _files(local["base"]))
        server.seed("org/bora", _files(local["adapter"]))
        server.seed("org/private-bora", _files(local["adapter"]), private=True)
        yield server


@pytest.fixture
def api_hub(hub, tmp_path, monkeypatch):
    """huggingface_hub in this process pointed at the fake Hub, with an empty cache and no saved token."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
    template = hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}"  # made from ENDPOINT at import time
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return hub


# ----- the recorded base ------------------------------------------------------------------------------
def test_merge_without_base_uses_the_recorded_local_folder(local, tmp_path):
    given = run("merge", local["local_adapter"], "--base", local["base"], "--out", tmp_path / "given", "--quiet")
    recorded = run("merge", local["local_adapter"], "--out", tmp_path / "recorded")
    assert given.exit_code == 0 and recorded.exit_code == 0, recorded.output
    assert f"no --base given: using the base model the adapter records (base_model_name_or_path), " \
           f"{local['base']} (a local folder)" in recorded.stderr
    assert _files(tmp_path / "given") == _files(tmp_path / "recorded")


@pytest.mark.parametrize("merge", [False, True])
def test_export_gguf_without_base_uses_the_recorded_local_folder(local, tmp_path, merge):
    flags = ["--merge"] if merge else []
    assert run("export-gguf", local["local_adapter"], "--base", local["base"], *flags, "--out",
               tmp_path / "given.gguf", "--quiet").exit_code == 0
    res = run("export-gguf", local["local_adapter"], *flags, "--out", tmp_path / "recorded.gguf")
    assert res.exit_code == 0, res.output
    assert "(a local folder)" in res.stderr
    assert (tmp_path / "given.gguf").read_bytes() == (tmp_path / "recorded.gguf").read_bytes()


@pytest.mark.parametrize("command", ["merge", "gguf-lora", "gguf-merge"])
@pytest.mark.parametrize("recorded", [None, "./not/here/either/model", ""])
def test_no_base_given_or_recorded_is_one_line_asking_for_base(work, command, recorded):
    config_path = work["adapter"] / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "base_model_name_or_path": recorded}))
    argv = [a for a in run_args(command, work) if a != "--base" and a != work["base"]]
    line = clean_failure(work, argv, "--base", "is an adapter")
    assert ("records no base model" in line) if not recorded else ("neither a local folder nor a Hub id" in line)


def run_args(command: str, work: dict) -> list:
    from cli_support import COMMANDS

    return COMMANDS[command](work)


# ----- the Python API takes Hub ids ----------------------------------------------------------------------
def test_load_inspect_and_load_bora_take_hub_ids(api_hub, local):
    from_hub = bt.load_adapter("org/bora")
    here = bt.load_adapter(local["adapter"])
    assert from_hub.modules.keys() == here.modules.keys()
    assert all(torch.equal(from_hub.modules[k].B, here.modules[k].B) for k in here.modules)
    with pytest.raises(HubError, match="no repository org/private-bora"):
        bt.load_adapter("org/private-bora")  # without the token: the Hub says it does not exist
    report = bt.inspect_adapter("org/private-bora", token=TOKEN).to_dict()
    assert report.pop("path") != str(local["adapter"])
    expected = bt.inspect_adapter(local["adapter"]).to_dict()
    expected.pop("path")
    assert report == expected
    model = bt.load_bora(build_model("llama"), "org/bora").eval()
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, local["logits"])


def test_merge_and_to_lora_from_hub_ids_match_local_ones(api_hub, local, tmp_path):
    report = bt.merge_adapter("org/bora", None, tmp_path / "merged")  # the base it records: org/base
    bt.merge_adapter(local["adapter"], local["base"], tmp_path / "merged-local")
    hub_files, local_files = _files(tmp_path / "merged"), _files(tmp_path / "merged-local")
    assert json.loads(hub_files.pop("config.json"))["_name_or_path"] == "org/base"  # the id, not the cache's hash
    local_files.pop("config.json")
    assert hub_files == local_files and report.merged == 14
    bt.to_lora("org/bora", tmp_path / "lora", rank=3)
    bt.to_lora(local["adapter"], tmp_path / "lora-local", rank=3)
    assert _files(tmp_path / "lora") == _files(tmp_path / "lora-local")


def test_gguf_from_hub_ids_records_the_ids(api_hub, local, tmp_path):
    bt.export_gguf("org/bora", tmp_path / "merged.gguf", merge=True)  # base: the recorded org/base
    merged = _gguf_fields(tmp_path / "merged.gguf")
    assert merged["general.base_model.count"] == 1
    assert merged["general.base_model.0.name"] == "base" and merged["general.base_model.0.organization"] == "org"
    assert merged["general.base_model.0.repo_url"] == HUB + "org/base"
    assert merged["general.source.repo_url"] == HUB + "org/bora"
    assert merged["general.name"] == "base"
    bt.export_gguf("org/bora", tmp_path / "lora.gguf", base="org/base")
    lora = _gguf_fields(tmp_path / "lora.gguf")
    assert lora["general.base_model.0.repo_url"] == HUB + "org/base" and lora["general.name"] == "bora"
    bt.export_gguf("org/base", tmp_path / "base.gguf")
    full = _gguf_fields(tmp_path / "base.gguf")
    assert full["general.source.repo_url"] == HUB + "org/base" and full["general.name"] == "base"
    assert "general.base_model.count" not in full
    everything = b"".join((tmp_path / f).read_bytes() for f in ("merged.gguf", "lora.gguf", "base.gguf"))
    snapshot = next((tmp_path / "hf-cache").glob("models--org--base/snapshots/*")).name
    assert snapshot.encode() not in everything  # never the cache folder's hash


def test_to_lora_records_a_hub_cache_base_as_its_id(api_hub, local, tmp_path):
    snapshot = resolve_input("org/base", kind="model").path  # .../models--org--base/snapshots/<commit>
    assert hub_id_of(snapshot) == "org/base" and hub_id_of(local["base"]) is None
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (adapter / name).write_bytes((local["adapter"] / name).read_bytes())
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(snapshot)}))
    bt.to_lora(adapter, tmp_path / "lora", rank="full")
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["base_model_name_or_path"] == "org/base"


@pytest.mark.slow
def test_train_takes_a_hub_id_and_records_it(api_hub, local, tmp_path):
    report = bt.train("org/base", local["data"], tmp_path / "trained", r=2, blocks=2, max_steps=1, device="cpu")
    config = json.loads((tmp_path / "trained" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "org/base" and report.steps == 1


# ----- the CLI: the recorded Hub id, provenance ------------------------------------------------------
@pytest.mark.slow
def test_cli_without_base_downloads_the_recorded_hub_id(hub, local, tmp_path):
    merged, lora = tmp_path / "merged", tmp_path / "lora.gguf"
    results = cli_batch(hub, tmp_path / "home", [["merge", "org/bora", "--out", merged],
                                                 ["export-gguf", "org/bora", "--out", lora]])
    for result in results:
        assert result["code"] == 0, result
        assert "no --base given: using the base model the adapter records (base_model_name_or_path), org/base " \
               "(a Hub id)" in result["stderr"]
        assert "using org/base from the Hub" in result["stderr"]
    assert json.loads((merged / "config.json").read_text())["_name_or_path"] == "org/base"
    assert _gguf_fields(lora)["general.base_model.0.repo_url"] == HUB + "org/base"
