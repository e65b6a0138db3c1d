"""export-gguf for the families of the architecture registry, each proven in llama.cpp in all three modes.

Per family: a tiny random model (tests/families.py), a BoRA adapter on every projection it has, then
the merged model as a full GGUF, the base GGUF plus a LoRA GGUF, and the one-pass ``merge`` GGUF all
give transformers' logits of the merged model within 3e-3; Q8_0 stays correlated; the tokenizer
tokenizes as transformers does.
"""

from __future__ import annotations

import gguf
import pytest
import torch
from cli_support import run
from families import FAMILIES, SPM_HF_DIFFERS, build_family_dir, targets
from gguf_support import (
    BF16_RTOL,
    F16_RTOL,
    F32_RTOL,
    IDS,
    Q8_MIN_CORR,
    SAMPLES,
    correlation,
    gguf_logits,
    gguf_tokenize,
    hf_logits,
    needs_llama_cpp,
    relative_error,
    set_config,
)

from bora_tools.core.config import BoraConfig
from bora_tools.errors import ConfigError, UnsupportedError
from bora_tools.gguf.architectures import FAMILIES as REGISTRY
from bora_tools.gguf.architectures import family_for
from bora_tools.gguf.export import export_gguf
from bora_tools.gguf.plan import plan_model_tensors
from bora_tools.gguf.shapes import expected_shape
from bora_tools.io.model_dir import ModelDir
from bora_tools.merge import merge_adapter
from bora_tools.training import add_bora, randomize_bora, save_bora

pytestmark = needs_llama_cpp

HF_ARCH = {"qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM",
           "phi3": "Phi3ForCausalLM", "olmo2": "Olmo2ForCausalLM", "granite": "GraniteForCausalLM",
           "mixtral": "MixtralForCausalLM"}
LLAMA_CPP_ARCH = {"qwen3": "qwen3", "gemma2": "gemma2", "gemma3": "gemma3", "phi3": "phi3", "olmo2": "olmo2",
                  "granite": "granite", "mixtral": "llama"}


@pytest.fixture(scope="module", params=list(FAMILIES))
def case(request, tmp_path_factory):
    """A tiny model of one family, a randomised BoRA adapter on its projections, and the merged model."""
    from transformers import AutoModelForCausalLM

    family = request.param
    root = tmp_path_factory.mktemp(family)
    base = build_family_dir(root / "base", family)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    with torch.no_grad():
        base_logits = model(torch.tensor([IDS])).logits[0].numpy()
    add_bora(model, BoraConfig(r=2, bora_blocks=2, lora_alpha=4, target_modules=targets(family)))
    randomize_bora(model, seed=1, std=0.2)
    with torch.no_grad():
        bora_logits = model(torch.tensor([IDS])).logits[0].numpy()
    adapter = save_bora(model, root / "adapter")
    merged = root / "merged"
    merge_adapter(adapter, base, merged)
    want = hf_logits(merged)
    assert relative_error(want, bora_logits) < 1e-4  # the merge itself is right (proven elsewhere too)
    base_gguf = root / "base.gguf"
    export_gguf(base, base_gguf, outtype="f32")
    return dict(family=family, root=root, base=base, adapter=adapter, merged=merged, want=want,
                base_logits=base_logits, base_gguf=base_gguf)


def test_adapter_moves_the_logits_far_beyond_the_tolerance(case):
    assert relative_error(case["want"], case["base_logits"]) > 30 * F32_RTOL
    assert HF_ARCH[case["family"]] in REGISTRY


def test_base_model_f32(case):
    assert relative_error(gguf_logits(case["base_gguf"], IDS), case["base_logits"]) < F32_RTOL


def test_merged_model_f32(case, tmp_path):
    out = tmp_path / "merged.gguf"
    report = export_gguf(case["merged"], out, outtype="f32").to_dict()
    assert report["architecture"] == LLAMA_CPP_ARCH[case["family"]]
    assert report["hf_architecture"] == HF_ARCH[case["family"]]
    assert relative_error(gguf_logits(out, IDS), case["want"]) < F32_RTOL


def test_tokenization_matches_transformers(case):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(case["base"])
    spm = FAMILIES[case["family"]][2] == "spm"
    checked = 0
    for text in SAMPLES:
        if spm and text in SPM_HF_DIFFERS:
            continue
        assert gguf_tokenize(case["base_gguf"], text) == hf(text).input_ids, text
        checked += 1
    assert checked >= len(SAMPLES) - 1


def test_lora_gguf_on_the_base_gguf(case, tmp_path):
    lora = tmp_path / "lora.gguf"
    report = export_gguf(case["adapter"], lora, base=case["base"], outtype="f32").to_dict()
    assert report["architecture"] == LLAMA_CPP_ARCH[case["family"]]
    names = [t.name for t in gguf.GGUFReader(lora).tensors]
    assert names and all(n.endswith((".lora_a", ".lora_b")) for n in names)  # never rope factors or other tensors
    assert len(names) == 2 * len(report["modules"])
    got = gguf_logits(case["base_gguf"], IDS, lora_path=lora)
    assert relative_error(got, case["want"]) < F32_RTOL


def test_one_pass_merge(case, tmp_path):
    out = tmp_path / "onepass.gguf"
    report = export_gguf(case["adapter"], out, base=case["base"], merge=True, outtype="f32").to_dict()
    assert report["merged_tensors"] > 0
    assert relative_error(gguf_logits(out, IDS), case["want"]) < F32_RTOL


def test_q8_0(case, tmp_path):
    out = tmp_path / "q8.gguf"
    report = export_gguf(case["adapter"], out, base=case["base"], merge=True, outtype="q8_0").to_dict()
    assert report["fallbacks"] == [] and report["types"].get("Q8_0", 0) > 0
    assert correlation(gguf_logits(out, IDS), case["want"]) > Q8_MIN_CORR


#: Correlation with the merged model's logits of a q4_k_m one-pass merge, measured per family (rows of 64: llama.cpp
#: falls back to Q5_0 / Q8_0 for most tensors): qwen3 0.994, gemma2 0.993, gemma3 0.984, phi3 0.997, olmo2 0.952,
#: granite 0.997, mixtral 0.985; pinned at 1 - 1.5 x (1 - the lowest), as tests/test_gguf_quant.py pins its floors.
Q4_K_M_MIN_CORR = 0.92


def test_llama_cpp_quantization_of_the_one_pass_merge(case, tmp_path):
    """llama.cpp's quantizer (issue 12) on every family's merged export, with a Hub-style name (issue 14)."""
    out = tmp_path / "q4km.gguf"
    report = export_gguf(case["adapter"], out, base=case["base"], merge=True, outtype="q4_k_m",
                         name="org/tuned-model").to_dict()
    assert report["architecture"] == LLAMA_CPP_ARCH[case["family"]] and report["merged_tensors"] > 0
    assert report["intermediate"]["types"].get("F32", 0) > 0  # merged weights reach the quantizer unrounded
    reader = gguf.GGUFReader(out)
    assert reader.get_field("general.name").contents() == "org/tuned-model"
    assert correlation(gguf_logits(out, IDS), case["want"]) > Q4_K_M_MIN_CORR


@pytest.mark.parametrize("outtype,rtol", [("f16", F16_RTOL), ("bf16", BF16_RTOL)])
def test_half_precision(case, tmp_path, outtype, rtol):
    out = tmp_path / f"{outtype}.gguf"
    export_gguf(case["adapter"], out, base=case["base"], merge=True, outtype=outtype)
    assert relative_error(gguf_logits(out, IDS), case["want"]) < rtol


def test_phi3_with_a_bpe_tokenizer_as_phi_4_ships(tmp_path):
    from transformers import AutoTokenizer

    path = build_family_dir(tmp_path / "phi4", "phi3", tokenizer="bpe")
    out = tmp_path / "m.gguf"
    report = export_gguf(path, out, outtype="f32").to_dict()
    assert report["vocab"]["model"] == "gpt2" and report["vocab"]["padded"] == 20
    assert relative_error(gguf_logits(out, IDS), hf_logits(path)) < F32_RTOL
    hf = AutoTokenizer.from_pretrained(path)
    for text in SAMPLES:
        assert gguf_tokenize(out, text) == hf(text).input_ids, text


def test_gemma2_query_scale_llama_cpp_cannot_apply_is_refused(tmp_path):
    path = build_family_dir(tmp_path / "g", "gemma2")
    set_config(path, query_pre_attn_scalar=24)
    with pytest.raises(UnsupportedError, match=r"query_pre_attn_scalar 24: llama.cpp scales queries by 1/sqrt\(16\)"):
        export_gguf(path, tmp_path / "g.gguf", outtype="f32")
    assert not (tmp_path / "g.gguf").exists()


def test_unsupported_architecture_names_the_supported_list(tmp_path):
    path = build_family_dir(tmp_path / "q", "qwen3")
    set_config(path, architectures=["Qwen3MoeForCausalLM"])
    with pytest.raises(UnsupportedError) as e:
        export_gguf(path, tmp_path / "q.gguf", outtype="f32")
    message = str(e.value)
    assert "'Qwen3MoeForCausalLM' is not supported" in message and "\n" not in message
    assert all(arch in message for arch in HF_ARCH.values())


# Settings a family reads from config.json beyond the default tiny model, each shown to change the logits.
VARIANTS = {
    # LongRoPE over a 32-token original context (the 41-token sequence uses the long factors in both
    # programs), on half of each head's dimensions
    "phi3-longrope": ("phi3", dict(original_max_position_embeddings=32, rope_parameters={
        "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
        "long_factor": [1.0, 2.5, 4.0, 9.0], "short_factor": [1.0, 1.1, 1.3, 1.7]})),
    # linear rope scaling on the full-attention layers only, as Gemma 3 4B+ ship it
    "gemma3-linear": ("gemma3", dict(rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}})),
    # layer_types against Gemma 2's default pattern: the first layer full, the second sliding
    "gemma2-layer-types": ("gemma2", dict(layer_types=["full_attention", "sliding_attention"])),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_config_variants(variant, tmp_path):
    family, overrides = VARIANTS[variant]
    plain = hf_logits(build_family_dir(tmp_path / "plain", family))
    path = build_family_dir(tmp_path / "variant", family, **overrides)
    want = hf_logits(path)
    assert relative_error(want, plain) > 30 * F32_RTOL  # the setting matters
    out = tmp_path / "m.gguf"
    export_gguf(path, out, outtype="f32")
    assert relative_error(gguf_logits(out, IDS), want) < F32_RTOL


def test_mixtral_adapter_on_experts_merges_and_refuses_a_lora(tmp_path):
    """An adapter on the stored expert matrices (...experts.<i>.w1, as PEFT targets them) and q_proj: the merged
    experts are stacked into llama.cpp's 3-D tensors; a LoRA GGUF cannot carry them and says to merge."""
    from safetensors.torch import load_file

    from bora_tools.core.adapter import BoraAdapter, BoraModule, save_adapter

    base = build_family_dir(tmp_path / "base", "mixtral")
    shapes = {k[: -len(".weight")]: tuple(v.shape) for k, v in load_file(base / "model.safetensors").items()}
    names = [k for k in shapes if ".experts." in k or k.endswith("q_proj")]
    assert "model.layers.1.block_sparse_moe.experts.3.w2" in names and len(names) == 2 * (4 * 3 + 1)
    g = torch.Generator().manual_seed(3)
    config = BoraConfig(r=2, bora_blocks=2, lora_alpha=4, target_modules=["q_proj", "w1", "w2", "w3"])
    modules = {name: BoraModule(name, torch.randn(2, shapes[name][1], generator=g) * 0.3,
                                torch.randn(shapes[name][0], 2, generator=g) * 0.3,
                                1 + 0.5 * torch.randn(2, 2, 2, generator=g), 2.0) for name in names}
    adapter = save_adapter(BoraAdapter(config, modules), tmp_path / "adapter")
    merged = tmp_path / "merged"
    merge_adapter(adapter, base, merged)
    want = hf_logits(merged)
    assert relative_error(want, hf_logits(base)) > 30 * F32_RTOL
    out = tmp_path / "m.gguf"
    report = export_gguf(adapter, out, base=base, merge=True, outtype="f32").to_dict()
    assert report["merged_tensors"] == 2 * (3 + 1)  # per layer: 3 stacked expert tensors and q_proj
    gguf_shapes = {t.name: tuple(int(x) for x in t.shape) for t in gguf.GGUFReader(out).tensors}
    assert gguf_shapes["blk.0.ffn_gate_exps.weight"] == (64, 64, 4)  # ggml order: (n_embd, n_ff, n_expert)
    assert relative_error(gguf_logits(out, IDS), want) < F32_RTOL
    with pytest.raises(UnsupportedError, match=r"experts\.0\.w1.*no tensor.*`merge`"):
        export_gguf(adapter, tmp_path / "lora.gguf", base=base, outtype="f32")


@pytest.mark.parametrize("case", ["gemma2"], indirect=True)  # one family is enough for the command line
def test_cli_exports_a_family_and_refuses_in_one_line(case, tmp_path):
    """The command line: a one-pass merge with --json, and an unsupported setting as one `Error:` line."""
    import json
    import shutil

    out = tmp_path / "m.gguf"
    result = run("export-gguf", case["adapter"], "--base", case["base"], "--merge", "--out", out, "--outtype", "f32",
                 "--json", "--quiet")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["architecture"] == "gemma2"
    assert relative_error(gguf_logits(out, IDS), case["want"]) < F32_RTOL
    bad = tmp_path / "bad"
    shutil.copytree(case["base"], bad)
    set_config(bad, hidden_activation="relu")
    result = run("export-gguf", bad, "--out", tmp_path / "x.gguf")
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert result.exit_code == 1 and len(errors) == 1 and "Traceback" not in result.output, result.output
    assert "activation 'relu'" in errors[0] and "gemma2" in errors[0]
    assert not (tmp_path / "x.gguf").exists()


# -- shapes: config.json against every family's tensors, before the first byte ------------------------------------


def test_every_stored_tensor_has_the_shape_its_family_states(case):
    """No tensor of a family escapes the shape check: each stored (or stacked) tensor's shape is stated and right
    (fused Phi-3 qkv and gate_up, per-head or whole-projection q/k norms, post norms, Mixtral's router and experts)."""
    model = ModelDir.open(case["base"])
    family = family_for(model.architecture, source="config.json")
    hp = family.read_hparams(model.config, source="config.json")
    stored = [p for p in plan_model_tensors(model, family, hp, "f32", replacements={})
              if not p.source.startswith("rope_parameters")]
    assert stored and {p.name: expected_shape(p.name, hp, family) for p in stored} == {p.name: p.shape for p in stored}


#: family -> (config change, what the refusal names): a shape only the family's own entry states.
FAMILY_SHAPE_CASES = {
    "phi3": ({"intermediate_size": 96}, "(192, 64) for llama.cpp's blk.0.ffn_up.weight"),  # gate_up: 2 x n_ff rows
    "mixtral": ({"num_local_experts": 3}, "(3, 64, 64) for llama.cpp's blk.0.ffn_gate_exps.weight"),
}


@pytest.mark.parametrize("case", list(FAMILY_SHAPE_CASES), indirect=True)
@pytest.mark.parametrize("mode", ["full", "lora", "merge"])
def test_family_tensor_contradicting_config_is_refused_in_every_mode(case, mode, tmp_path):
    import shutil

    change, culprit = FAMILY_SHAPE_CASES[case["family"]]
    base = tmp_path / "base"
    shutil.copytree(case["base"], base)
    set_config(base, **change)
    out = tmp_path / "x.gguf"
    source, extra = (base, {}) if mode == "full" else (case["adapter"], {"base": base, "merge": mode == "merge"})
    with pytest.raises(ConfigError, match=r"config\.json implies") as e:
        export_gguf(source, out, outtype="f32", **extra)
    assert culprit in str(e.value)
    assert not out.exists()


#: family -> (config change, the key the refusal names): the family's own settings are bounded too.
FAMILY_BOUND_CASES = {
    "gemma3-swa-theta": ("gemma3", {"rope_parameters": {
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e300},
        "full_attention": {"rope_type": "default", "rope_theta": 1e6}}}, "rope_theta"),
    "gemma3-v4-local-base": ("gemma3", {"rope_parameters": None, "rope_theta": 1e6, "rope_local_base_freq": 1e300},
                             "rope_theta"),
    "gemma2-softcap": ("gemma2", {"final_logit_softcapping": 1e300}, "final_logit_softcapping"),
    "granite-multiplier": ("granite", {"embedding_multiplier": float("1e300")}, "embedding_multiplier"),
    "phi3-long-factor": ("phi3", {"rope_parameters": {
        "rope_type": "longrope", "rope_theta": 10000.0, "long_factor": ["1"] * 8, "short_factor": [1.0] * 8}},
        "long_factor"),
    "mixtral-experts-used": ("mixtral", {"num_experts_per_tok": 5}, "num_experts_per_tok 5"),
    "mixtral-experts-huge": ("mixtral", {"num_local_experts": 2**40}, "num_local_experts"),
    "phi3-no-rotary-dims": ("phi3", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                                                         "partial_rotary_factor": 0.01}}, "0 rotary dimensions"),
    "llama3-without-factor": ("qwen3", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e6}},
                              "'llama3' needs a factor"),
    "gemma2-query-scalar-huge": ("gemma2", {"query_pre_attn_scalar": 10**400}, "query_pre_attn_scalar 1000"),
}


@pytest.mark.parametrize("name", list(FAMILY_BOUND_CASES))
def test_family_settings_out_of_bounds_are_refused(name):
    from families import family_config

    family, change, culprit = FAMILY_BOUND_CASES[name]
    config = family_config(family).to_dict()
    config.update(change)
    if config.get("rope_parameters") is None:
        config.pop("rope_parameters", None)
    # a setting llama.cpp cannot apply is unsupported; a value that is not one is a config error
    with pytest.raises(UnsupportedError if "query_pre_attn_scalar" in change else ConfigError, match=culprit):
        family_for(config["architectures"][0] if config.get("architectures") else HF_ARCH[family],
                   source="config.json").read_hparams(config, source="config.json")


def test_gemma3_transformers_4_config_gives_the_same_file(tmp_path):
    """transformers 4 wrote Gemma 3's rope as top-level rope_theta and rope_local_base_freq: the same GGUF."""
    import json
    import shutil

    rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 20000.0},  # neither is llama.cpp's default
            "full_attention": {"rope_type": "default", "rope_theta": 500000.0}}
    v5 = build_family_dir(tmp_path / "v5" / "model", "gemma3", rope_parameters=rope)
    v4 = tmp_path / "v4" / "model"
    shutil.copytree(v5, v4)
    config = json.loads((v4 / "config.json").read_text())
    config.pop("rope_parameters")
    config.update(rope_theta=500000.0, rope_local_base_freq=20000.0, rope_scaling=None)
    (v4 / "config.json").write_text(json.dumps(config))
    export_gguf(v5, tmp_path / "v5.gguf", outtype="f32")
    export_gguf(v4, tmp_path / "v4.gguf", outtype="f32")
    assert (tmp_path / "v4.gguf").read_bytes() == (tmp_path / "v5.gguf").read_bytes()
    kv = {k: f.contents() for k, f in gguf.GGUFReader(tmp_path / "v4.gguf").fields.items()}
    assert (kv["gemma3.rope.freq_base"], kv["gemma3.rope.freq_base_swa"]) == (500000.0, 20000.0)
    assert kv["gemma3.attention.sliding_window_pattern"] == [True, False]
