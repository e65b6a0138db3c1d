"""to-lora for serving engines: ``--uniform-rank`` (one rank everywhere, no rank_pattern) proven in PEFT,
and the report's vLLM advice (``--max-lora-rank``, modules_to_save, ranks above 512)."""

from __future__ import annotations

import json

import pytest
import torch
from cli_support import run
from peft import PeftModel
from safetensors.torch import load_file

from bora_tools.conversion import VLLM_LORA_RANKS, to_lora, vllm_max_lora_rank
from bora_tools.core.adapter import WEIGHTS_NAME
from bora_tools.demo.tiny import build_model

IDS = torch.tensor([[0, 17, 42, 99, 3, 250, 7, 64, 128, 5]])
# qwen2: rank_pattern and alpha_pattern and rsLoRA, so b*r differs per module (16, 8 and 4)
QWEN2 = dict(r=4, bora_blocks=2, lora_alpha=6, use_rslora=True,
             rank_pattern={"q_proj": 8, r"model\.layers\.1\.mlp\.down_proj": 2}, alpha_pattern={"v_proj": 3.0})
LLAMA = dict(r=4, bora_blocks=4, lora_alpha=8, modules_to_save=["lm_head"])


@pytest.fixture(scope="module")
def qwen2(tiny):
    return tiny.adapter("qwen2", randomize=1, task_type="CAUSAL_LM", **QWEN2)


@pytest.fixture(scope="module")
def llama(tiny):
    def perturb(model):
        with torch.no_grad():
            model.lm_head.module.weight.add_(0.05 * torch.randn_like(model.lm_head.module.weight))

    return tiny.adapter("llama", randomize=1, edit=perturb, task_type="CAUSAL_LM", **LLAMA)


def _peft_logits(arch, out):
    model = PeftModel.from_pretrained(build_model(arch, seed=0), str(out)).eval()
    with torch.no_grad():
        return model(IDS).logits.float()


def _products(out) -> dict[str, torch.Tensor]:
    """``lora_B @ lora_A`` per module, float64, from the written file."""
    t = load_file(out / WEIGHTS_NAME)
    return {k.removesuffix(".lora_A.weight"): t[k.replace("lora_A", "lora_B")].double() @ t[k].double()
            for k in t if k.endswith(".lora_A.weight")}


def _config(out) -> dict:
    return json.loads((out / "adapter_config.json").read_text())


@pytest.mark.parametrize("rank", [2, 8, 24])  # below, between and above the modules' b*r (16, 8, 4)
def test_uniform_rank_k_writes_one_rank_and_the_same_update(qwen2, tmp_path, rank):
    mixed, uniform = tmp_path / "mixed", tmp_path / "uniform"
    to_lora(qwen2.path, mixed, rank=rank)
    report = to_lora(qwen2.path, uniform, rank=rank, uniform_rank=True)
    cfg = _config(uniform)
    assert cfg["r"] == cfg["lora_alpha"] == rank and cfg["rank_pattern"] == {} and cfg["alpha_pattern"] == {}
    assert cfg["use_rslora"] is False
    tensors = load_file(uniform / WEIGHTS_NAME)
    assert {t.shape[0] for k, t in tensors.items() if k.endswith("lora_A.weight")} == {rank}
    assert {t.shape[1] for k, t in tensors.items() if k.endswith("lora_B.weight")} == {rank}
    # zero padding changes nothing: the same products, bit for bit, as the mixed-rank output
    before, after = _products(mixed), _products(uniform)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert (_peft_logits("qwen2", uniform) - _peft_logits("qwen2", mixed)).abs().max() <= 1e-5
    assert report.serving == {"uniform_rank": True, "max_rank": rank, "vllm_max_lora_rank": vllm_max_lora_rank(rank),
                              "modules_to_save": []}
    assert all(m.rank == rank and not m.capped for m in report.modules)
    if rank == 24:  # every module's update has a lower rank: each says it was padded
        assert all("zero-padded to 24" in m.note for m in report.modules)


def test_uniform_rank_full_is_exact_at_the_largest_b_times_r(qwen2, tmp_path):
    out = tmp_path / "lora"
    report = to_lora(qwen2.path, out, rank="full", uniform_rank=True)
    cfg = _config(out)
    assert cfg["r"] == cfg["lora_alpha"] == 16 and cfg["rank_pattern"] == {}  # q_proj: 2 blocks x rank 8
    assert report.totals["max_rel_error"] == 0.0
    assert (_peft_logits("qwen2", out) - qwen2.logits(IDS)).abs().max() <= 1e-4
    assert report.serving["vllm_max_lora_rank"] == 16


def test_uniform_rank_with_energy_pads_to_the_largest_rank_kept(qwen2, tmp_path):
    mixed = to_lora(qwen2.path, tmp_path / "mixed", energy=0.9)
    report = to_lora(qwen2.path, tmp_path / "uniform", energy=0.9, uniform_rank=True)
    largest = max(m.rank for m in mixed.modules)
    assert {m.rank for m in mixed.modules} != {largest}  # the case is a real mixed-rank one
    assert _config(tmp_path / "uniform")["r"] == largest and {m.rank for m in report.modules} == {largest}
    assert [m.rel_error for m in report.modules] == [m.rel_error for m in mixed.modules]


@pytest.mark.parametrize("rank, expected", [(1, 1), (2, 8), (8, 8), (9, 16), (300, 320), (321, 512), (512, 512),
                                            (513, None)])
def test_vllm_max_lora_rank_is_the_smallest_allowed_value_not_below(rank, expected):
    assert vllm_max_lora_rank(rank) == expected
    assert expected is None or expected in VLLM_LORA_RANKS


def test_report_names_max_lora_rank_and_warns_on_modules_to_save(llama, tmp_path):
    out = tmp_path / "lora"
    res = run("to-lora", llama.path, "--out", out, "--rank", "12", "--uniform-rank", "--json", "--quiet")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["serving"] == {"uniform_rank": True, "max_rank": 12, "vllm_max_lora_rank": 16,
                               "modules_to_save": ["lm_head"]}
    assert len(data["warnings"]) == 1 and "modules_to_save (lm_head): vLLM refuses" in data["warnings"][0]
    text = run("to-lora", llama.path, "--out", out, "--rank", "12", "--uniform-rank", "--overwrite")
    assert text.exit_code == 0, text.output
    assert "vLLM: serve with --enable-lora --max-lora-rank 16 (largest rank 12)" in text.stdout
    assert "bora-tools merge" in text.stderr  # the warning, also on stderr as every warning is


def test_rank_above_512_warns_and_names_no_max_lora_rank(qwen2, tmp_path):
    res = run("to-lora", qwen2.path, "--out", tmp_path / "lora", "--rank", "600", "--uniform-rank", "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["serving"]["vllm_max_lora_rank"] is None and data["serving"]["max_rank"] == 600
    assert any("above 512" in w for w in data["warnings"])
    assert "above 512" in res.stderr


def test_without_uniform_rank_the_report_still_names_max_lora_rank(qwen2, tmp_path):
    report = to_lora(qwen2.path, tmp_path / "lora", rank="full")
    assert _config(tmp_path / "lora")["rank_pattern"]  # mixed ranks: vLLM reads them by their tensors' shapes
    assert report.serving == {"uniform_rank": False, "max_rank": 16, "vllm_max_lora_rank": 16,
                              "modules_to_save": []}
    assert report.warnings == []
