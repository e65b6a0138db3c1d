"""``verify --engine vllm``: a to-lora output run in vLLM passes, a damaged one fails; the refusals.

vLLM runs in its own venv (``BORA_VLLM_PYTHON``, else ``.venv-vllm``: scripts/vllm_venv.sh). As in
tests/test_vllm.py, the vLLM runs FAIL without it and skip only with ``BORA_SKIP_VLLM=1``. Each run starts
vLLM's engine once (40-100 s on 2 cores): one untouched output, one damaged, on a tiny llama with head_dim 64.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from cli_support import Q, clean_failure, run
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_vllm import MODEL, vllm_python

from bora_tools.conversion import to_lora
from bora_tools.verification import vllm_engine
from bora_tools.verification.command import _tolerance
from bora_tools.verification.engines import Output
from bora_tools.verification.measures import Tolerance, measure_logprobs
from bora_tools.verification.report import build_logprob_report


@pytest.fixture(scope="module")
def made(tiny, tmp_path_factory) -> dict[str, Path]:
    """A tiny llama (head_dim 64), a randomised BoRA adapter on it and its exact to-lora output (read only)."""
    root = tmp_path_factory.mktemp("verify-vllm")
    adapter = tiny.adapter("llama", model_kwargs=MODEL, randomize=1, task_type="CAUSAL_LM", r=4, bora_blocks=4,
                           lora_alpha=8).path
    to_lora(adapter, root / "lora", rank="full")
    return {"base": tiny.base("llama", **MODEL), "adapter": adapter, "lora": root / "lora"}


@pytest.fixture
def with_vllm(monkeypatch) -> None:
    monkeypatch.setenv("BORA_VLLM_PYTHON", str(vllm_python()))


def verify_cli(made: dict, lora: Path, *extra):
    return run("verify", lora, "--adapter", made["adapter"], "--base", made["base"], "--engine", "vllm", "--tokens",
               24, *extra)


@pytest.mark.slow
def test_an_untouched_lora_passes_in_vllm(made, with_vllm):
    result = verify_cli(made, made["lora"], "--json", "--quiet")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["passed"] is True and report["engine"] == "vllm" and report["kind"] == "lora"
    assert report["tolerance"]["measure"] == "max_rel_logprob_error" and report["tolerance"]["bound"] == 2e-4
    overall = report["overall"]
    assert overall["top1"] == 1.0 and overall["mean_kl"] is None and overall["correlation"] is None
    assert 0 <= overall["max_rel_logprob_error"] <= 2e-4
    assert report["effect"] > 30 * 2e-4  # the adapter moves the logits far beyond the bound: the check can fail
    assert [p["tokens"] for p in report["prompts"]] and all(p["tokens"] <= 24 for p in report["prompts"])


def negate_one_b(lora: Path) -> None:
    weights = lora / "adapter_model.safetensors"
    with safe_open(weights, "pt") as f:
        meta = f.metadata()
    tensors = load_file(weights)
    tensors[f"{Q}.lora_B.weight"].neg_()
    save_file(tensors, weights, metadata=meta)


def double_alpha(lora: Path) -> None:
    config = json.loads((lora / "adapter_config.json").read_text())
    config["lora_alpha"] *= 2
    (lora / "adapter_config.json").write_text(json.dumps(config))


@pytest.mark.slow
@pytest.mark.parametrize("damage", [negate_one_b, double_alpha], ids=["one-B-negated", "alpha-doubled"])
def test_a_damaged_lora_fails_in_vllm(made, with_vllm, tmp_path, damage):
    lora = Path(shutil.copytree(made["lora"], tmp_path / "lora"))
    damage(lora)
    result = verify_cli(made, lora)
    assert result.exit_code == 1, result.output
    errors = result.stderr.splitlines()
    assert len(errors) == 1 and errors[0].startswith("Error: max relative logprob error "), result.stderr
    assert "exceeds 0.0002" in errors[0] and "worst at prompt " in errors[0] and ", position " in errors[0]
    assert "FAILED: " in result.stdout and "no KL or correlation" in result.stdout


# -- the measures on top-k log-probabilities, without vLLM -------------------------------------------------


def test_logprob_measures_see_the_served_tokens_only():
    import numpy as np

    ref = np.log(np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]]))  # logits whose log-softmax is themselves
    served = [{0: np.log(0.7), 2: np.log(0.1)}, {2: np.log(0.6) - 0.01, 1: np.log(0.3)}]
    measures = measure_logprobs(served, ref)
    assert measures["max_rel_logprob_error"] == pytest.approx(0.01 / np.abs(ref).max())
    assert measures["max_rel_logprob_error_position"] == 1 and measures["top1"] == 1.0
    served[1] = {1: np.log(0.6), 2: np.log(0.3)}  # another most likely token at position 1
    report = build_logprob_report([served], [ref], tolerance=vllm_engine_tolerance(), output="o", kind="lora",
                                  type="float32", engine="vllm", adapter="a", base="b", reference_dtype="float32",
                                  prompts_source="built-in", effect=1.0)
    assert report.overall["top1"] == 0.5 and not report.passed
    assert report.failure.startswith("max relative logprob error ") and "prompt 1, position 1" in report.failure


def vllm_engine_tolerance():
    return Tolerance("max_rel_logprob_error", 2e-4, "test")


def test_in_vllm_the_bound_is_twice_the_logits_also_for_a_truncated_lora():
    exact = Output(Path("lora"), "lora", "float32")
    truncated = Output(Path("lora"), "lora", "float32", predicted={"max_rel_error": 0.05})
    for output in (exact, truncated):
        logits = _tolerance(output, 0.5, max_kl=None)
        logprobs = _tolerance(output, 0.5, max_kl=None, vllm=True)
        assert logprobs.measure == "max_rel_logprob_error" and logits.measure == "max_rel_error"
        assert logprobs.bound == 2 * logits.bound and logits.source in logprobs.source
    assert _tolerance(truncated, 0.5, max_kl=None).bound == pytest.approx(4 * 0.05 * 0.5 + 1e-4)


# -- refusals: one line, before any model is loaded ---------------------------------------------------------


def test_without_vllm_the_refusal_names_the_venv_script(work, made, monkeypatch, tmp_path):
    monkeypatch.delenv("BORA_VLLM_PYTHON", raising=False)
    monkeypatch.setattr(vllm_engine, "REPO_VENV", tmp_path / "no-venv")
    monkeypatch.setenv("PATH", str(tmp_path))  # no `python` to ask
    clean_failure(work, ["verify", made["lora"], "--adapter", work["adapter"], "--base", work["base"],
                         "--engine", "vllm"], "no vLLM found", "scripts/vllm_venv.sh")
    monkeypatch.setenv("BORA_VLLM_PYTHON", str(tmp_path / "missing" / "python"))
    clean_failure(work, ["verify", made["lora"], "--adapter", work["adapter"], "--base", work["base"],
                         "--engine", "vllm"], "BORA_VLLM_PYTHON", "scripts/vllm_venv.sh")


def test_vllm_runs_only_lora_and_measures_no_kl(work, made, tmp_path, monkeypatch):
    monkeypatch.setenv("BORA_VLLM_PYTHON", __file__)  # found; never run, as both are refused first
    clean_failure(work, ["verify", made["base"], "--adapter", work["adapter"], "--base", work["base"],
                         "--engine", "vllm"], "--engine vllm", "transformers")
    clean_failure(work, ["verify", made["lora"], "--adapter", work["adapter"], "--base", work["base"],
                         "--engine", "vllm", "--max-kl", "0.1"], "--max-kl", "--engine vllm", "top tokens")
