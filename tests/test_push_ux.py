"""``bora-tools push`` (issue 20): hf's argument order, --base-model, visibility after a failed first push,
Xet errors, and cards that say what the folder is and nothing else. Against the fake Hub of hub_server.py
through the real huggingface_hub client (the fixtures of test_push.py)."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
from huggingface_hub import HfApi, ModelCard
from safetensors.numpy import save_file
from test_push import WRITE, bora_adapter, gguf_file, hub, merged_model, no_xet, run  # noqa: F401 (fixtures)

from bora_tools.errors import HubError, ValidationError
from bora_tools.hub.push import build_model_card, push
from bora_tools.io.hub_client import upload_errors


def one_error(result, code: int) -> str:
    assert result.returncode == code, (result.stdout, result.stderr)
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    return errors[0]


# ----- the command line ----------------------------------------------------------------------------------
def test_hf_argument_order_is_refused_with_the_right_one(tmp_path, hub, run):  # noqa: F811
    src = bora_adapter(tmp_path / "adapter")
    line = one_error(run("me/bora", str(src), "--token", WRITE), 2)
    assert f"bora-tools push {src} me/bora" in line and "hf upload" in line
    assert not hub.requests  # nothing was asked of the Hub


def test_a_missing_path_is_still_named(tmp_path, hub, run):  # noqa: F811
    line = one_error(run(str(tmp_path / "nope"), "me/bora", "--token", WRITE), 2)
    assert "nope" in line and "does not exist" in line


@pytest.mark.parametrize("bad", ["./base", "/abs/base", "name-only", "a/b/c"])
def test_a_base_model_that_is_not_a_hub_id_is_a_usage_error(tmp_path, hub, run, bad):  # noqa: F811
    src = merged_model(tmp_path / "merged")
    line = one_error(run(str(src), "me/m", "--token", WRITE, "--base-model", bad), 2)
    assert "--base-model" in line and "not a Hub model id" in line
    assert not hub.requests
    with pytest.raises(ValidationError, match="`base_model`"):
        push(path=src, repo_id="me/m", token=WRITE, endpoint=hub.endpoint, base_model=bad)


# ----- visibility ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_private_after_a_failed_first_push_makes_the_empty_repo_private(tmp_path, hub, run):  # noqa: F811
    src = bora_adapter(tmp_path / "adapter")
    hub.fail_next("commit", 500)
    assert run(str(src), "me/bora", "--token", WRITE).returncode == 1
    assert hub.repos["me/bora"].private is False  # created public, then the commit failed: left empty
    result = run(str(src), "me/bora", "--token", WRITE, "--private")
    assert result.returncode == 0, result.stderr
    assert hub.repos["me/bora"].private is True and "Warning" not in result.stderr
    assert "made private" in result.stdout and "earlier push that failed" in result.stdout
    assert "adapter_config.json" in hub.files("me/bora")


def test_visibility_is_reported(tmp_path, hub, no_xet):  # noqa: F811
    src = bora_adapter(tmp_path / "adapter")
    first = push(path=src, repo_id="me/p", token=WRITE, endpoint=hub.endpoint, private=True)
    assert first.visibility == "created private" and hub.repos["me/p"].private is True
    again = push(path=src, repo_id="me/p", token=WRITE, endpoint=hub.endpoint)
    assert again.visibility == "kept private (it existed)" and hub.repos["me/p"].private is True
    assert "Repo: kept private" in again.to_text()


def test_an_empty_private_repo_is_never_made_public(tmp_path, hub, no_xet):  # noqa: F811
    HfApi(endpoint=hub.endpoint, token=WRITE).create_repo("me/empty", private=True)
    report = push(path=bora_adapter(tmp_path / "adapter"), repo_id="me/empty", token=WRITE, endpoint=hub.endpoint)
    assert hub.repos["me/empty"].private is True and "never makes a repo public" in report.visibility


# ----- Xet ----------------------------------------------------------------------------------------------
class _FromXet(RuntimeError):
    pass


_FromXet.__module__ = "hf_xet"


@pytest.mark.parametrize("error", [
    _FromXet("Failed to connect: error sending request"),
    RuntimeError("Data processing error: CAS service error : Reqwest Error: HTTP status client error (404 Not "
                 "Found), domain: https://cas-server.xethub.hf.co/reconstructions/abc"),
])
def test_xet_errors_name_the_way_around_them(error):
    with pytest.raises(HubError) as info:
        with upload_errors(endpoint="https://hub.example", repo_id="me/bora", revision=None, token=WRITE):
            raise error
    line = info.value.one_line()
    assert "Xet" in line and "HF_HUB_DISABLE_XET=1" in line and "cannot reach" not in line


def test_a_xet_token_404_is_not_a_missing_repo(hub):  # noqa: F811
    from huggingface_hub.utils import get_session, hf_raise_for_status

    with pytest.raises(HubError) as info:
        with upload_errors(endpoint=hub.endpoint, repo_id="me/bora", revision=None, token=WRITE):
            # What huggingface_hub asks before a Xet upload; a server without Xet storage answers 404.

            hf_raise_for_status(get_session().get(f"{hub.endpoint}/api/models/me/bora/xet-write-token/main"))
    line = info.value.one_line()
    assert "HF_HUB_DISABLE_XET=1" in line and "HTTP 404" in line and "repository not found" not in line


def test_other_errors_do_not_mention_xet(hub):  # noqa: F811
    api = HfApi(endpoint=hub.endpoint, token=WRITE)
    with pytest.raises(HubError) as info:
        with upload_errors(endpoint=hub.endpoint, repo_id="nobody/nothing", revision=None, token=WRITE):
            api.repo_info("nobody/nothing")
    assert "XET" not in info.value.one_line().upper()


# ----- cards: what the folder is, nothing else -----------------------------------------------------------
def ordinary_model(d: Path, *, name_or_path: str | None = None) -> Path:
    """A model folder as transformers' save_pretrained leaves it: no record of any merge (transformers 5 writes
    no ``_name_or_path``; older versions wrote the model a fine-tune started from)."""
    d.mkdir(parents=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    if name_or_path:
        config["_name_or_path"] = name_or_path
    (d / "config.json").write_text(json.dumps(config))
    save_file({"model.embed_tokens.weight": np.ones((8, 16), np.float32)}, str(d / "model.safetensors"))
    return d


def test_an_ordinary_model_is_not_called_a_merge(tmp_path):
    card = build_model_card(ordinary_model(tmp_path / "m"), repo_id="me/m")
    text = str(card).lower()
    assert "merg" not in text and "bora adapter" not in text and "base_model" not in card.data.to_dict()
    assert "a **transformers model**." in text
    older = build_model_card(ordinary_model(tmp_path / "o", name_or_path="org/started-from"), repo_id="me/o")
    assert older.data.base_model == "org/started-from" and older.data.base_model_relation == "finetune"
    assert "derived from" in older.text and "merg" not in older.text.lower()


def test_a_merge_says_so_and_names_its_recorded_base(tmp_path):
    card = build_model_card(merged_model(tmp_path / "m", name_or_path="org/tiny-llama"), repo_id="me/m")
    assert card.data.base_model == "org/tiny-llama" and card.data.base_model_relation == "finetune"
    assert "with a BoRA adapter" in card.text and "merged into its weights" in card.text
    assert "bora-tools merge" in card.text


def test_a_plain_gguf_claims_no_origin_and_a_merged_one_says_it(tmp_path):
    plain = build_model_card(gguf_file(tmp_path / "a" / "m.gguf", kind="model",
                                       source_url="https://huggingface.co/org/tiny-llama"), repo_id="me/a")
    assert "bora" not in plain.text.lower().replace("bora-tools push", "") and "merge" not in plain.text.lower()
    path = tmp_path / "b" / "m.gguf"
    path.parent.mkdir()
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_type("model")
    w.add_base_model_count(1)
    w.add_base_model_repo_url(0, "https://huggingface.co/org/tiny-llama")
    w.add_tags(["bora", "merged"])
    w.add_tensor("token_embd.weight", np.ones((8, 16), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    merged = build_model_card(path, repo_id="me/b")
    assert merged.data.base_model == "org/tiny-llama" and merged.data.base_model_relation == "finetune"
    assert "merge of a BoRA adapter" in merged.text and "--merge" in merged.text


def test_a_lora_card_claims_no_origin(tmp_path):
    from test_push import lora_adapter

    card = build_model_card(lora_adapter(tmp_path / "l"), repo_id="me/l")
    assert "to-lora" not in card.text and "BoRA" not in card.text and card.data.base_model == "org/tiny-llama"


def test_a_split_gguf_card_downloads_every_shard(tmp_path):
    folder = tmp_path / "split"
    for i in (1, 2):
        gguf_file(folder / f"m-0000{i}-of-00002.gguf", kind="model")
    card = build_model_card(folder, repo_id="me/s")
    assert "hf download me/s --include 'm-*-of-*.gguf' --local-dir ." in card.text
    assert "llama-cli -m m-00001-of-00002.gguf" in card.text


def test_the_card_round_trips_through_the_hub(tmp_path, hub, no_xet):  # noqa: F811
    push(path=ordinary_model(tmp_path / "m"), repo_id="me/o", token=WRITE, endpoint=hub.endpoint)
    card = ModelCard(hub.file("me/o", "README.md").decode())
    assert "base_model" not in card.data.to_dict() and "merg" not in card.text.lower()
