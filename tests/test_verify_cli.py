"""``bora-tools verify`` on the command line: exit codes, --json, the failure line, Hub ids, and each refusal."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cli_support import clean_failure, run
from hub_server import FakeHub

from bora_tools.conversion import to_lora
from bora_tools.core.config import BoraConfig
from bora_tools.demo.tiny import build_model, default_targets, save_model_dir
from bora_tools.merge import merge_adapter
from bora_tools.training import add_bora, randomize_bora, save_bora

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def made(pristine, tmp_path_factory) -> dict[str, Path]:
    """The merged model and the exact LoRA of the harness's pristine adapter (shared: read only)."""
    root = tmp_path_factory.mktemp("verify-cli")
    merge_adapter(pristine["adapter"], pristine["base"], root / "merged")
    to_lora(pristine["adapter"], root / "lora", rank="full")
    return {"merged": root / "merged", "lora": root / "lora"}


@pytest.mark.slow
def test_a_good_output_exits_0_and_json_has_every_measure(work, made):
    result = run("verify", made["merged"], "--adapter", work["adapter"], "--base", work["base"], "--tokens", 16,
                 "--json", "--quiet")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["passed"] is True and report["failure"] is None and report["engine"] == "transformers"
    assert set(report["overall"]) >= {"max_rel_error", "mean_kl", "top1", "correlation", "tokens"}
    assert [p["prompt"] for p in report["prompts"]] == [1, 2, 3, 4, 5]
    assert report["tolerance"] == {"measure": "max_rel_error", "bound": 1e-4, "source": "docs/guarantees.md"}


@pytest.mark.slow
def test_a_damaged_output_exits_1_with_one_line_naming_prompt_position_and_measure(work, made, tmp_path):
    lora = Path(shutil.copytree(made["lora"], tmp_path / "lora"))
    config = json.loads((lora / "adapter_config.json").read_text())
    config["lora_alpha"] *= 2
    (lora / "adapter_config.json").write_text(json.dumps(config))
    result = run("verify", lora, "--adapter", work["adapter"], "--base", work["base"], "--tokens", 16)
    assert result.exit_code == 1
    errors = result.stderr.splitlines()
    assert len(errors) == 1 and errors[0].startswith("Error: max relative logit error "), result.stderr
    assert "exceeds 0.0001" in errors[0] and ", position " in errors[0] and "worst at prompt " in errors[0]
    assert "FAILED: " in result.stdout  # the report is printed before the verdict


@pytest.mark.slow
def test_prompts_from_jsonl_and_text_files_cut_to_tokens(work, made, tmp_path):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(json.dumps({"text": "The quick brown fox"}) + "\n\n" + json.dumps({"text": "BoRA blocks"}) + "\n")
    text = tmp_path / "p.txt"
    text.write_text("one prompt\n\nanother prompt, longer than four tokens for sure\n")
    for path, count in ((jsonl, 2), (text, 2)):
        result = run("verify", made["merged"], "--adapter", work["adapter"], "--base", work["base"], "--prompts",
                     path, "--tokens", 4, "--json", "--quiet")
        report = json.loads(result.stdout)
        assert result.exit_code == 0 and len(report["prompts"]) == count and report["prompts_source"] == str(path)
        assert max(p["tokens"] for p in report["prompts"]) == 4


@pytest.mark.slow
def test_base_defaults_to_the_adapters_recorded_base(work, made):
    config = json.loads((work["adapter"] / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(work["base"])
    (work["adapter"] / "adapter_config.json").write_text(json.dumps(config))
    result = run("verify", made["merged"], "--adapter", work["adapter"], "--tokens", 8, "--json", "--quiet")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["base"] == str(work["base"])


# -- refusals: one line, exit 1 (2 for usage), nothing written ---------------------------------------------


def test_an_engine_that_does_not_run_the_output_is_refused(work, made):
    clean_failure(work, ["verify", made["merged"], "--adapter", work["adapter"], "--base", work["base"],
                         "--engine", "peft"], "--engine peft", "transformers")


def test_the_adapter_given_as_output_is_refused(work):
    clean_failure(work, ["verify", work["adapter"], "--adapter", work["adapter"], "--base", work["base"]],
                  "a BoRA adapter", "--adapter")


def test_a_gguf_lora_without_base_gguf_is_refused(work, tmp_path):
    from bora_tools.gguf.export import export_gguf

    lora = work["outdir"] / "lora.gguf"
    export_gguf(work["adapter"], lora, base=work["base"], outtype="f32")
    clean_failure(work, ["verify", lora, "--adapter", work["adapter"], "--base", work["base"]],
                  "GGUF LoRA adapter", "--base-gguf")


def test_base_gguf_for_an_output_that_is_no_gguf_lora_is_refused(work, made):
    gguf = work["outdir"] / "base.gguf"
    gguf.write_bytes(b"GGUF")
    clean_failure(work, ["verify", made["merged"], "--adapter", work["adapter"], "--base", work["base"],
                         "--base-gguf", gguf], "--base-gguf", "model directory")


def test_a_bad_prompts_file_is_refused(work, made):
    bad = work["outdir"] / "p.jsonl"
    bad.write_text('{"text": "fine"}\n{"prompt": "no text"}\n')
    clean_failure(work, ["verify", made["merged"], "--adapter", work["adapter"], "--base", work["base"],
                         "--prompts", bad], "--prompts", "line 2", "'text'")


def test_no_recorded_base_and_no_base_is_refused(work, made):
    clean_failure(work, ["verify", made["merged"], "--adapter", work["adapter"]], "base_model_name_or_path", "--base")


def test_a_reference_that_does_not_fit_in_memory_is_refused_before_loading(work, made, monkeypatch):
    import bora_tools.verification.reference as reference

    monkeypatch.setattr(reference, "available_memory", lambda: 1000)
    line = clean_failure(work, ["verify", made["merged"], "--adapter", work["adapter"], "--base", work["base"],
                                "--quiet"], "the reference", "needs about", "of RAM is available")
    assert "1000 B" in line


def test_usage_errors_exit_2(work, made):
    for extra in (["--tokens", "0"], ["--max-kl", "-1"], ["--engine", "onnx"]):
        result = run("verify", made["merged"], "--adapter", work["adapter"], *extra)
        assert result.exit_code == 2, (extra, result.output)


# -- Hub ids: the adapter and its recorded base from a Hub ----------------------------------------------------


@pytest.mark.slow
def test_hub_ids_for_the_adapter_and_its_recorded_base(tmp_path):
    model = build_model("llama")
    base = save_model_dir(model, tmp_path / "base")
    add_bora(model, BoraConfig(r=2, bora_blocks=2, lora_alpha=4, target_modules=default_targets("llama"),
                               base_model_name_or_path="org/base"))
    randomize_bora(model, seed=1)
    adapter = save_bora(model, tmp_path / "bora")
    merge_adapter(adapter, base, tmp_path / "merged")
    files = {name: {p.relative_to(d).as_posix(): p.read_bytes() for p in d.rglob("*") if p.is_file()}
             for name, d in (("base", base), ("bora", adapter))}
    with FakeHub() as hub:
        hub.seed("org/base", files["base"])
        hub.seed("org/bora", files["bora"])
        env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
        env |= {"HF_ENDPOINT": hub.endpoint, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(tmp_path / "home"),
                "HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONPATH": str(REPO_ROOT)}
        proc = subprocess.run([sys.executable, "-m", "bora_tools.cli", "verify", str(tmp_path / "merged"),
                               "--adapter", "org/bora", "--tokens", "8", "--json", "--quiet"],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["passed"] and "snapshots" in report["base"] and "snapshots" in report["adapter"]
