"""LoRA-adapter GGUF and one-pass ``--merge`` GGUF, proven in llama.cpp against the BoRA model."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf_support import (
    F16_RTOL,
    F32_RTOL,
    IDS,
    Q8_MIN_CORR,
    correlation,
    gguf_logits,
    needs_llama_cpp,
    relative_error,
    tiny_dir,
)

from bora_tools.core import row_merge
from bora_tools.core.adapter import load_adapter
from bora_tools.core.config import BoraConfig
from bora_tools.core.factors import delta_weight
from bora_tools.errors import UnsupportedError
from bora_tools.gguf.export import export_gguf
from bora_tools.training import add_bora, randomize_bora, save_bora

pytestmark = needs_llama_cpp

# Per-module ranks and alphas, rsLoRA: llama.cpp's own converter would get these scalings wrong.
CONFIG = dict(r=4, bora_blocks=2, lora_alpha=8, use_rslora=True, rank_pattern={"v_proj": 2, "down_proj": 6},
              alpha_pattern={"o_proj": 3.0, r"layers\.1\.self_attn\.q_proj": 16.0})


def _model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([IDS])).logits[0].numpy()


def _bora_logits(made) -> np.ndarray:
    """The logits of the BoRA model a shared adapter was saved from."""
    return made.logits(torch.tensor([IDS]))[0].numpy()


def _base_logits(made) -> np.ndarray:
    return made.base_logits(torch.tensor([IDS]))[0].numpy()


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def case(request, tmp_path_factory, tiny):
    """A base directory, its f32 GGUF, a randomised BoRA adapter and the BoRA model's logits."""
    arch = request.param
    root = tmp_path_factory.mktemp(f"lora-{arch}")
    base = tiny.base(arch)
    made = tiny.adapter(arch, randomize=3, **CONFIG)
    base_gguf = root / "base.gguf"
    export_gguf(base, base_gguf, outtype="f32")
    return dict(arch=arch, root=root, base=base, adapter=made.path, base_gguf=base_gguf,
                base_logits=_base_logits(made), bora_logits=_bora_logits(made))


def test_lora_gguf_on_base_gguf_gives_the_bora_logits(case, tmp_path):
    lora = tmp_path / "lora.gguf"
    export_gguf(case["adapter"], lora, base=case["base"], outtype="f32")
    assert relative_error(case["bora_logits"], case["base_logits"]) > 0.05  # the adapter matters
    assert relative_error(gguf_logits(case["base_gguf"], IDS), case["base_logits"]) < F32_RTOL
    got = gguf_logits(case["base_gguf"], IDS, lora_path=lora)
    assert relative_error(got, case["bora_logits"]) < F32_RTOL


def test_merge_one_pass_gives_the_bora_logits_and_the_lora_ones(case, tmp_path):
    merged, lora = tmp_path / "merged.gguf", tmp_path / "lora.gguf"
    report = export_gguf(case["adapter"], merged, base=case["base"], merge=True, outtype="f32").to_dict()
    export_gguf(case["adapter"], lora, base=case["base"], outtype="f32")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora.gguf", "merged.gguf"]  # no safetensors
    assert report["merged_tensors"] == 14
    got = gguf_logits(merged, IDS)
    assert relative_error(got, case["bora_logits"]) < F32_RTOL
    assert relative_error(gguf_logits(case["base_gguf"], IDS, lora_path=lora), got) < F32_RTOL


def test_merge_in_small_row_blocks(case, tmp_path, monkeypatch):
    """Merging a few rows at a time (block offsets, q/k heads split across blocks) changes nothing."""

    monkeypatch.setattr(row_merge, "CPU_CHUNK_ELEMENTS", 256)
    merged = tmp_path / "merged.gguf"
    export_gguf(case["adapter"], merged, base=case["base"], merge=True, outtype="f32")
    assert relative_error(gguf_logits(merged, IDS), case["bora_logits"]) < F32_RTOL


def test_lora_metadata_and_per_module_ranks(case, tmp_path):
    lora = tmp_path / "lora.gguf"
    report = export_gguf(case["adapter"], lora, base=case["base"], outtype="f16").to_dict()
    reader = gguf.GGUFReader(lora)
    kv = {k: f.contents() for k, f in reader.fields.items()}
    assert kv["general.type"] == "adapter" and kv["adapter.type"] == "lora"
    assert kv["general.architecture"] == case["arch"]
    assert kv["adapter.lora.alpha"] == 12.0  # the largest exact rank: b * 6 for down_proj
    shapes = {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors}  # ggml order (ne0, ne1)
    assert shapes["blk.0.attn_q.weight.lora_a"] == (64, 8)  # (n, b*r)
    assert shapes["blk.0.attn_q.weight.lora_b"] == (8, 64)  # (b*r, m)
    assert shapes["blk.0.attn_v.weight.lora_b"] == (4, 32)  # rank_pattern v_proj: 2
    assert shapes["blk.1.ffn_down.weight.lora_a"] == (128, 12)
    assert len(shapes) == 28 and {m["relative_error"] for m in report["modules"]} == {0.0}


def test_rank_k_matches_the_dense_svd_truncation(case, tmp_path):
    k = 3
    lora = tmp_path / "lora3.gguf"
    report = export_gguf(case["adapter"], lora, base=case["base"], rank=k, outtype="f32").to_dict()
    assert {m["rank"] for m in report["modules"]} == {k}
    assert all(0 < m["relative_error"] < 1 for m in report["modules"])
    # Independent reference: the dense dW of every module, truncated by torch's SVD.
    adapter = load_adapter(case["adapter"])
    model = _model(case["base"])
    state = model.state_dict()
    with torch.no_grad():
        for name, mod in adapter.modules.items():
            dw = delta_weight(mod.A, mod.B, mod.sigma, mod.scaling, dtype=torch.float64)
            u, s, vh = torch.linalg.svd(dw, full_matrices=False)
            state[name + ".weight"] += (u[:, :k] * s[:k] @ vh[:k]).float()
    model.load_state_dict(state)
    want = _logits(model)
    got = gguf_logits(case["base_gguf"], IDS, lora_path=lora)
    assert relative_error(want, case["bora_logits"]) > 1e-3  # the truncation is visible...
    assert relative_error(got, want) < F32_RTOL  # ...and llama.cpp applies exactly it


def test_f16_lora_and_q8_0_merge(case, tmp_path):
    base16, lora16, merged8 = tmp_path / "b16.gguf", tmp_path / "l16.gguf", tmp_path / "m8.gguf"
    export_gguf(case["base"], base16, outtype="f16")
    export_gguf(case["adapter"], lora16, base=case["base"], outtype="f16")
    assert relative_error(gguf_logits(base16, IDS, lora_path=lora16), case["bora_logits"]) < F16_RTOL
    export_gguf(case["adapter"], merged8, base=case["base"], merge=True, outtype="q8_0")
    assert correlation(gguf_logits(merged8, IDS), case["bora_logits"]) > Q8_MIN_CORR


def _scale_saved_lm_head(model):
    with torch.no_grad():
        model.lm_head.module.weight.mul_(1.5)  # the saved copy differs from the base


def test_modules_to_save_merge_and_lora_refusal(tmp_path, tiny, llama_base):
    base = llama_base
    made = tiny.adapter("llama", r=2, bora_blocks=2, target_modules=["q_proj"], modules_to_save=["lm_head"],
                        randomize=5, edit=_scale_saved_lm_head)
    adapter = made.path
    want = _bora_logits(made)
    with pytest.raises(UnsupportedError, match=r"modules_to_save .*lm_head") as err:
        export_gguf(adapter, tmp_path / "lora.gguf", base=base)
    assert "`merge`" in err.value.one_line()  # the parameter; the CLI shows it as --merge
    assert not (tmp_path / "lora.gguf").exists()
    export_gguf(adapter, tmp_path / "merged.gguf", base=base, merge=True, outtype="f32")
    assert relative_error(gguf_logits(tmp_path / "merged.gguf", IDS), want) < F32_RTOL


def test_merge_keeps_an_lm_head_update_when_config_says_tied(tmp_path):
    """A base whose config says tied but stores a distinct lm_head: transformers unties it, so must the merge."""
    from gguf_support import set_config

    base = tiny_dir(tmp_path, "llama")
    set_config(base, tie_word_embeddings=True)
    model = _model(base)
    add_bora(model, BoraConfig(r=2, bora_blocks=2, target_modules=["q_proj", "lm_head"]))
    randomize_bora(model, seed=7)
    adapter = save_bora(model, tmp_path / "adapter")
    want = _logits(model)
    with torch.no_grad():
        model.lm_head.lora_B.zero_()  # the same adapter without its lm_head update
        without_head = _logits(model)
    assert relative_error(without_head, want) > 0.05  # the lm_head update matters
    merged = tmp_path / "merged.gguf"
    report = export_gguf(adapter, merged, base=base, merge=True, outtype="f32").to_dict()
    assert report["merged_tensors"] == 3
    assert relative_error(gguf_logits(merged, IDS), want) < F32_RTOL


def test_exact_factors_built_once_per_module(case, tmp_path, monkeypatch):
    from bora_tools.gguf import lora as gguf_lora

    built = []

    def counting(A, B, sigma, scaling):
        built.append(A.shape)
        return original(A, B, sigma, scaling)

    original = gguf_lora.balanced_exact_factors
    monkeypatch.setattr(gguf_lora, "balanced_exact_factors", counting)
    report = export_gguf(case["adapter"], tmp_path / "lora.gguf", base=case["base"], outtype="f32").to_dict()
    assert len(built) == len(report["modules"]) == 14


def test_zero_update_is_rank_1_zeros_with_a_note(tmp_path, tiny, llama_base):
    """A fresh adapter (B = 0): both modes write rank 1 zeros, say so, and llama.cpp runs the base unchanged."""
    from bora_tools.core.lowrank import ZERO_NOTE

    base = llama_base
    made = tiny.adapter("llama", r=2, bora_blocks=2, target_modules=["q_proj", "v_proj"], randomize=None)
    base_logits = _base_logits(made)
    adapter = made.path
    export_gguf(base, tmp_path / "base.gguf", outtype="f32")
    for rank in ("full", 2):
        lora = tmp_path / f"lora-{rank}.gguf"
        result = export_gguf(adapter, lora, base=base, rank=rank, outtype="f32")
        report = result.to_dict()
        assert {(m["rank"], m["note"]) for m in report["modules"]} == {(1, ZERO_NOTE)}
        assert len(report["notes"]) == 4
        assert f"note: model.layers.0.self_attn.q_proj: {ZERO_NOTE}" in str(result)
        got = gguf_logits(tmp_path / "base.gguf", IDS, lora_path=lora)
        assert relative_error(got, base_logits) < F32_RTOL


@pytest.mark.parametrize("rank", ["full", 2])
def test_lora_conversion_uses_the_device_on_one_thread_with_progress(case, tmp_path, monkeypatch, rank):
    from bora_tools.gguf import lora as gguf_lora

    seen = []
    for name in ("convert_module", "balanced_exact_factors"):
        original = getattr(gguf_lora, name)

        def spy(*args, _original=original, **kwargs):
            # convert_module gets the device; the exact factors get tensors already on it.
            seen.append((kwargs.get("device", getattr(args[0], "device", None)), torch.get_num_threads()))
            return _original(*args, **kwargs)

        monkeypatch.setattr(gguf_lora, name, spy)
    labels = []

    def progress(items, total, label):
        labels.append((label, total))
        return items

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        export_gguf(case["adapter"], tmp_path / "lora.gguf", base=case["base"], rank=rank, device="cpu",
                    progress=progress)
        assert torch.get_num_threads() == 2  # restored
    finally:
        torch.set_num_threads(before)
    assert len(seen) == 14 and set(seen) == {(torch.device("cpu"), 1)}
    assert labels == [("converting to LoRA", 14), ("writing GGUF LoRA", 28)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("rank", ["full", 3])
def test_lora_on_cuda_gives_the_cpu_file(case, tmp_path, rank):
    cpu, cuda = tmp_path / "cpu.gguf", tmp_path / "cuda.gguf"
    export_gguf(case["adapter"], cpu, base=case["base"], rank=rank, device="cpu", outtype="f32")
    export_gguf(case["adapter"], cuda, base=case["base"], rank=rank, device="cuda", outtype="f32")
    a, b = gguf.GGUFReader(cpu), gguf.GGUFReader(cuda)
    for ta, tb in zip(a.tensors, b.tensors):
        assert ta.name == tb.name
        np.testing.assert_allclose(tb.data, ta.data, rtol=1e-4, atol=1e-5 * float(np.abs(ta.data).max()))
    assert relative_error(gguf_logits(case["base_gguf"], IDS, lora_path=cuda), case["bora_logits"]) < F32_RTOL
