"""The whole flow on a tiny llama, through the command line alone, each output proven in its consumer.

An adapter is trained with ``bora_tools.training`` (a few AdamW steps) and saved; from then on only
``python -m bora_tools.cli`` runs, in subprocesses, as a user would run it: ``inspect``, ``merge``,
``to-lora`` (exact and truncated), ``export-gguf`` (full model, LoRA adapter, one-pass merge) and
``push`` to the local Hub server; then ``bora-tools demo`` runs the same chain on its own. The tests
run in file order and share the module's ``flow``; a step whose input an earlier step failed to make
is skipped, not failed twice.

Consumers: transformers for the merged directory, ``peft.PeftModel.from_pretrained`` for the LoRA
adapters, llama.cpp (llama-cpp-python) for the GGUF files, the real ``huggingface_hub`` client
against ``tests/hub_server.py`` for the uploads.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gguf_support import F32_RTOL, IDS, gguf_logits, gguf_tokenize, hf_logits, relative_error
from hub_server import FakeHub
from huggingface_hub import ModelCard
from peft import PeftModel
from safetensors.torch import load_file
from test_to_lora import _dense_dw, _lora_layers, _peft_delta

from bora_tools.core.adapter import load_adapter
from bora_tools.core.config import BoraConfig
from bora_tools.demo.tiny import TEXT, build_model, default_targets
from bora_tools.gguf.llama_run import llama_cpp_available
from bora_tools.training import add_bora, randomize_bora, save_bora

# huggingface_hub itself passes file objects as `data=` to its HTTP client, which warns about it.
# PEFT 0.21 calls a transformers 5 API that warns of its own deprecation.
pytestmark = [pytest.mark.slow,  # every test runs the CLI in subprocesses
              pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")]

R, BLOCKS, ALPHA, TRUNCATED_RANK = 4, 4, 8, 4  # b*r = 16; the truncated LoRA keeps r = 4
TRAIN_STEPS = 5
ATOL_LOGITS = 1e-4
WRITE = "hf_e2eWriteToken0123456789abcdef"
HUB_BASE = "org/tiny-llama"  # the base model's Hub id, named with --base-model (the files only know a path)


def _bora_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([IDS])).logits[0].float()


@pytest.fixture(scope="module")
def flow(tmp_path_factory, llama_base):
    """A tiny llama directory, a BoRA adapter trained on it and saved, the logits before and after."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("e2e")
    base = shutil.copytree(llama_base, root / "base")  # the flow's directory: the commands run in it, by name
    model = build_model("llama", seed=0)  # the base's weights, in memory, to train the adapter on
    base_logits = _bora_logits(model)
    config = BoraConfig(r=R, bora_blocks=BLOCKS, lora_alpha=ALPHA, target_modules=default_targets("llama"),
                        task_type="CAUSAL_LM", base_model_name_or_path=str(base))
    # A new adapter (B = 0) moves along a few gradient directions in its first steps, so its update is
    # numerically of rank < b*r; a random start makes every update reach b*r, as a trained adapter does.
    randomize_bora(add_bora(model, config), seed=1)
    params = [p for p in model.parameters() if p.requires_grad]
    ids = AutoTokenizer.from_pretrained(base)(TEXT, return_tensors="pt").input_ids
    opt = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    losses = []
    for _ in range(TRAIN_STEPS):
        loss = model(input_ids=ids, labels=ids).loss
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    adapter = save_bora(model, root / "bora-adapter")
    bora_logits = _bora_logits(model)
    # the trained adapter visibly changes the output, so every match below proves something
    assert (bora_logits - base_logits).abs().max() > 0.1
    assert losses[-1] < losses[0]  # and the optimiser really trained it
    return {"root": root, "base": base, "adapter": adapter, "model": model, "base_logits": base_logits,
            "bora_logits": bora_logits, "trainable": sum(p.numel() for p in params), "made": {}}


def bora_tools(flow: dict, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``bora-tools ARGS`` in a subprocess from the flow's directory (``env``: its whole environment)."""
    result = subprocess.run([sys.executable, "-m", "bora_tools.cli", *args], cwd=flow["root"], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"bora-tools {' '.join(args)}\n{result.stderr}"
    assert "Traceback" not in result.stderr and "Error:" not in result.stderr, result.stderr
    return result


def bora_tools_json(flow: dict, *args: str) -> dict:
    return json.loads(bora_tools(flow, *args, "--json", "--quiet").stdout)


def made(flow: dict, *keys: str) -> list[Path]:
    """Outputs of earlier steps; skip (their own test already failed) when one is missing."""
    missing = [k for k in keys if k not in flow["made"]]
    if missing:
        pytest.skip(f"an earlier step did not make {', '.join(missing)}")
    return [flow["made"][k] for k in keys]


def _peft_model(flow: dict, lora: Path):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(flow["base"], dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(lora)).eval()


def _hf_tokens(model_dir: Path, text: str) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)(text).input_ids


def _local_files(path: Path) -> dict[str, Path]:
    if path.is_file():
        return {path.name: path}
    return {p.relative_to(path).as_posix(): p for p in sorted(path.rglob("*")) if p.is_file()}


class TestEndToEnd:
    def test_inspect_counts_every_parameter_and_finds_rank_b_times_r(self, flow):
        report = bora_tools_json(flow, "inspect", "bora-adapter")
        tensors = load_file(flow["adapter"] / "adapter_model.safetensors")  # shapes from the file itself
        assert report["num_modules"] == 2 * len(default_targets("llama"))
        for mod in report["modules"]:
            key = f"base_model.model.{mod['name']}"
            (m, r), (r2, n) = tensors[f"{key}.lora_B.weight"].shape, tensors[f"{key}.lora_A.weight"].shape
            assert (r, r2, mod["b"], mod["shape"]) == (R, R, BLOCKS, [m, n])
            assert mod["parameters"] == r * (m + n) + BLOCKS * BLOCKS * r, mod["name"]
            assert mod["rank"] == mod["max_rank"] == BLOCKS * R, mod["name"]  # a LoRA of this size reaches r
        assert report["total_parameters"] == flow["trainable"]  # what the optimiser really trained

    def test_merge_loads_in_transformers_with_the_bora_logits(self, flow):
        from transformers import AutoModelForCausalLM

        report = bora_tools_json(flow, "merge", "bora-adapter", "--base", "base", "--out", "merged")
        assert report["merged"] == 2 * len(default_targets("llama"))
        merged = AutoModelForCausalLM.from_pretrained(flow["root"] / "merged", dtype=torch.float32).eval()
        assert (_bora_logits(merged) - flow["bora_logits"]).abs().max() <= ATOL_LOGITS
        flow["made"]["merged"] = flow["root"] / "merged"

    def test_to_lora_full_rank_loads_in_peft_with_the_bora_logits(self, flow):
        report = bora_tools_json(flow, "to-lora", "bora-adapter", "--out", "lora-full", "--rank", "full")
        assert report["peft"]["r"] == BLOCKS * R and report["totals"]["max_rel_error"] == 0.0
        peft_model = _peft_model(flow, flow["root"] / "lora-full")
        assert {layer.r["default"] for layer in _lora_layers(peft_model).values()} == {BLOCKS * R}
        assert (_bora_logits(peft_model) - flow["bora_logits"]).abs().max() <= ATOL_LOGITS
        flow["made"]["lora-full"] = flow["root"] / "lora-full"

    def test_to_lora_truncated_has_the_errors_of_a_dense_svd_optimum(self, flow):
        report = bora_tools_json(flow, "to-lora", "bora-adapter", "--out", "lora-r4", "--rank", str(TRUNCATED_RANK))
        layers = _lora_layers(_peft_model(flow, flow["root"] / "lora-r4"))
        adapter = load_adapter(flow["adapter"])
        assert {m["name"] for m in report["modules"]} == set(adapter.modules) == set(layers)
        for row in report["modules"]:
            dw = _dense_dw(adapter.modules[row["name"]])  # float64, block by block from docs/format.md, section 1
            s = torch.linalg.svdvals(dw)
            optimum = float(s[TRUNCATED_RANK:].square().sum().sqrt())
            assert optimum > 0.05 * float(dw.norm()), row["name"]  # truncation really loses something
            assert row["rank"] == layers[row["name"]].r["default"] == TRUNCATED_RANK
            assert row["rel_error"] == pytest.approx(optimum / float(dw.norm()), rel=1e-4), row["name"]
            # and the LoRA PEFT loaded has that error, not only the report
            assert float((dw - _peft_delta(layers[row["name"]])).norm()) == pytest.approx(optimum, rel=1e-4)

    def test_export_gguf_full_lora_and_one_pass_run_in_llama_cpp(self, flow):
        (merged,) = made(flow, "merged")
        n_modules = 2 * len(default_targets("llama"))
        for args, kind, n_merged in ((["merged", "--out", "merged.gguf"], "model", 0),
                                     (["base", "--out", "base.gguf"], "model", 0),
                                     (["bora-adapter", "--base", "base", "--out", "lora.gguf"], "lora", None),
                                     (["bora-adapter", "--base", "base", "--merge", "--out", "one-pass.gguf"],
                                      "merged", n_modules)):
            report = bora_tools_json(flow, "export-gguf", *args, "--outtype", "f32")
            assert (report["kind"], report.get("merged_tensors"), report["types"]) == \
                (kind, n_merged, {"F32": report["tensors"]}), args
        root = flow["root"]
        flow["made"]["lora.gguf"] = root / "lora.gguf"
        if not llama_cpp_available():
            pytest.skip("llama-cpp-python is not installed: GGUF files written, not run")
        want = hf_logits(merged)  # transformers on the merged directory
        merged_cpp = gguf_logits(root / "merged.gguf", IDS)
        assert relative_error(merged_cpp, want) < F32_RTOL
        assert relative_error(gguf_logits(root / "base.gguf", IDS, lora_path=root / "lora.gguf"), merged_cpp) < F32_RTOL
        assert relative_error(gguf_logits(root / "one-pass.gguf", IDS), flow["bora_logits"].numpy()) < F32_RTOL
        assert gguf_tokenize(root / "one-pass.gguf", TEXT) == _hf_tokens(flow["base"], TEXT)

    def test_push_uploads_byte_identical_files_with_a_model_card(self, flow):
        merged, lora, lora_gguf = made(flow, "merged", "lora-full", "lora.gguf")
        home = flow["root"] / "hf_home"
        home.mkdir()
        with FakeHub(tokens={WRITE: "write"}) as hub:
            env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
            env |= {"HF_ENDPOINT": hub.endpoint, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(home),
                    "HF_HUB_DISABLE_TELEMETRY": "1"}
            expected = {"me/tiny-merged": (merged, "transformers", "finetune"),
                        "me/tiny-lora": (lora, "peft", "adapter"),
                        "me/tiny-lora-gguf": (lora_gguf, "gguf", "adapter")}
            for repo, (path, library, relation) in expected.items():
                result = bora_tools(flow, "push", str(path), repo, "--token", WRITE, "--base-model", HUB_BASE,
                                    "--quiet", env=env)
                assert WRITE not in result.stdout + result.stderr
                local = _local_files(path)
                assert set(hub.files(repo)) == {".gitattributes", "README.md", *local}, repo
                for name, file in local.items():
                    assert hub.file(repo, name) == file.read_bytes(), f"{repo}/{name}"
                meta = ModelCard(hub.file(repo, "README.md").decode()).data.to_dict()
                assert (meta["library_name"], meta["base_model"], meta["base_model_relation"]) == \
                    (library, HUB_BASE, relation), repo
                assert "bora-tools" in meta["tags"]

    def test_demo_runs_the_same_chain_and_says_what_each_step_proved(self, flow):
        out = bora_tools(flow, "demo", "--quiet", "--steps", "5", "--workdir", "demo").stdout
        labels = [line.split("]")[0] + "]" for line in out.splitlines() if line.startswith("[")]
        assert labels == ["[train]", "[inspect]", "[merge]", "[to-lora]", "[gguf]", "[verify]", "[push]"], out
        assert "bora-tools verify demo/merged --adapter demo/bora-adapter --base demo/base" in out
        assert "bora-tools push demo/merged " in out and "bora-tools push demo/lora-full " in out
        assert out.splitlines()[-1].startswith("demo done in ")
