"""export-gguf and what config.json leaves out (issue 23, item 2): the family's transformers defaults.

transformers fills every key a config.json omits from the family's config class (Mixtral and Gemma 3:
rope_theta 1e6; Gemma 2: soft-caps 50 / 30, head_dim 256, ...). Here, for every family of the registry:

- each key of the tiny model's config, deleted on its own, gives the hyperparameters transformers' own
  config class reads from the same dict (or a one-line refusal where llama.cpp cannot do what it says);
- with every optional key deleted at once, llama.cpp's logits of the exported GGUF are transformers';
- the hostile configs of the issue (Gemma 3 with only a sliding rope entry, Phi-3's ``"type": "su"``,
  Gemma 2 without a sliding layer, a 2^31 layer count) are exported right or refused in one line.
"""

from __future__ import annotations

import copy
import json
import shutil
import time

import gguf
import pytest
from cli_support import clean_failure
from families import FAMILIES, build_family_dir, family_config
from gguf_support import F32_RTOL, IDS, gguf_logits, hf_logits, needs_llama_cpp, relative_error, set_config

from bora_tools.demo.tiny import build_model_dir, tiny_config
from bora_tools.errors import BoraError, ConfigError
from bora_tools.gguf.architectures import FAMILIES as REGISTRY
from bora_tools.gguf.architectures import family_for
from bora_tools.gguf.export import export_gguf

#: our family name -> (HF architecture, how tests build its tiny config)
ARCH = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
        "qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM",
        "phi3": "Phi3ForCausalLM", "olmo2": "Olmo2ForCausalLM", "granite": "GraniteForCausalLM",
        "mixtral": "MixtralForCausalLM"}
TINY_ARCHS = ("llama", "mistral", "qwen2")  # built by bora_tools.demo.tiny, the others by tests/families.py


def test_every_registry_family_is_covered():
    assert set(ARCH.values()) == set(REGISTRY)


def _config(family: str):
    return tiny_config(family) if family in TINY_ARCHS else family_config(family)


def _hf(family: str, config: dict):
    """transformers' reading of ``config`` (a config.json dict) with the family's config class."""
    import transformers

    # a deep copy: transformers completes the nested rope objects in place
    return getattr(transformers, REGISTRY[ARCH[family]].config_class).from_dict(copy.deepcopy(config))


def _rope(hf) -> tuple[dict, dict | None]:
    """transformers' rotary settings: (full-attention layers, sliding layers or None), in either version's form."""
    params = getattr(hf, "rope_parameters", None)
    if params is None:  # transformers 4
        full = dict(getattr(hf, "rope_scaling", None) or {}, rope_theta=hf.rope_theta)
        local = getattr(hf, "rope_local_base_freq", None)
        return full, None if local is None else {"rope_type": "default", "rope_theta": local}
    if "full_attention" in params:
        return params["full_attention"], params.get("sliding_attention")
    return params, None


def _expected(family: str, hf) -> dict:
    """What llama.cpp must be told about the model transformers builds from ``hf``."""
    full, local = _rope(hf)
    heads = hf.num_attention_heads
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
    out = dict(n_layer=hf.num_hidden_layers, n_embd=hf.hidden_size, n_ff=hf.intermediate_size, n_head=heads,
               n_head_kv=hf.num_key_value_heads or heads, vocab_size=hf.vocab_size,
               n_ctx=hf.max_position_embeddings, rms_eps=hf.rms_norm_eps, head_dim=head_dim,
               rope_theta=full["rope_theta"], rope_type=full.get("rope_type") or full.get("type") or "default")
    if family.startswith("gemma"):
        sliding = [t == "sliding_attention" for t in hf.layer_types]
        out.update(final_softcap=hf.final_logit_softcapping, sliding=sliding)
        if family == "gemma2":
            out.update(attn_softcap=hf.attn_logit_softcapping)
        if any(sliding):
            out.update(window=hf.sliding_window)
        if family == "gemma3":
            out.update(swa_theta=local["rope_theta"])
    if family == "phi3":
        partial = full.get("partial_rotary_factor", getattr(hf, "partial_rotary_factor", 1.0))
        orig = full.get("original_max_position_embeddings",
                        getattr(hf, "original_max_position_embeddings", None)) or hf.max_position_embeddings
        out.update(n_rot=int(head_dim * partial), orig_ctx=orig)
    if family == "granite":
        out.update({k: getattr(hf, k) for k in ("attention_multiplier", "embedding_multiplier",
                                                "residual_multiplier", "logits_scaling")})
    if family == "mixtral":
        out.update(num_local_experts=hf.num_local_experts, num_experts_per_tok=hf.num_experts_per_tok)
    return out


def _ours(hp, expected: dict) -> dict:
    out = {}
    for key in expected:
        if hasattr(hp, key):
            out[key] = getattr(hp, key)
        else:
            out[key] = hp.extra.get(key)
    return out


#: (family, deleted key) -> what the refusal names: transformers' default is one llama.cpp cannot run with the
#: tiny model's other settings (Gemma's query scale is fixed to head_dim by llama.cpp; a default layer count
#: against an explicit layer_types list).
REFUSED = {
    ("gemma2", "head_dim"): "query_pre_attn_scalar 16",
    ("gemma2", "query_pre_attn_scalar"): "query_pre_attn_scalar 256",
    ("gemma3", "head_dim"): "query_pre_attn_scalar 16",
    ("gemma3", "query_pre_attn_scalar"): "query_pre_attn_scalar 256",
}
#: Keys that are not hyperparameters (no effect on the model transformers runs).
NOT_HPARAMS = {"architectures", "model_type", "transformers_version", "dtype", "torch_dtype"}
#: Keys that state which tensors exist and their shapes: a default there cannot fit the stored weights
#: (transformers refuses them too; the shape checks of tests/test_hardening.py cover them). Every other key goes.
STRUCTURAL = {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "tie_word_embeddings", "num_local_experts",
              "bos_token_id", "eos_token_id", "pad_token_id"} | NOT_HPARAMS  # Phi-3's default pad 32000 > vocab


def _cases():
    for family in ARCH:
        for key in sorted(_config(family).to_dict()):
            if key not in STRUCTURAL:
                yield family, key


@pytest.mark.parametrize("family,key", list(_cases()))
def test_each_deleted_key_reads_as_transformers_reads_it(family, key):
    config = _config(family).to_dict()
    config.pop(key)
    expected = _expected(family, _hf(family, config))
    try:
        hp = family_for(ARCH[family], source="config.json").read_hparams(config, source="config.json")
    except BoraError as e:
        assert (family, key) in REFUSED, str(e)
        assert REFUSED[family, key] in str(e) and "\n" not in str(e)
        return
    assert (family, key) not in REFUSED
    if family == "gemma2" and not any(expected["sliding"]):  # written as sliding over the whole context
        expected.update(sliding=[True] * expected["n_layer"], window=expected["n_ctx"])
    assert _ours(hp, expected) == expected  # the same numbers, read from the same dict


@pytest.mark.parametrize("family,value", [("mixtral", 1e6), ("gemma3", 1e6), ("llama", None), ("phi3", None)])
def test_rope_theta_default_is_the_family_classes(family, value):
    """The issue's case: no rope_theta, no rope_parameters: Mixtral and Gemma 3 get 1e6, not 1e4."""
    import transformers

    config = _config(family).to_dict()
    for key in ("rope_theta", "rope_parameters", "rope_scaling", "rope_local_base_freq"):
        config.pop(key, None)
    hp = family_for(ARCH[family], source="config.json").read_hparams(config, source="config.json")
    cls = getattr(transformers, REGISTRY[ARCH[family]].config_class)
    assert hp.rope_theta == _rope(cls())[0]["rope_theta"]
    if value is not None:
        assert hp.rope_theta == value


# -- llama.cpp against transformers -------------------------------------------------------------------------

#: Tiny models whose head_dim is the class's default, so that head_dim (and Gemma's query scale) can go too.
DEFAULT_HEAD_DIM = {"gemma2": dict(head_dim=256, query_pre_attn_scalar=256),
                    "gemma3": dict(head_dim=256, query_pre_attn_scalar=256), "qwen3": dict(head_dim=128)}


def _build(path, family, **overrides):
    if family in TINY_ARCHS:
        return build_model_dir(path, family, **overrides)
    return build_family_dir(path, family, **overrides)


def _strip(model_dir, keep=()):
    path = model_dir / "config.json"
    config = json.loads(path.read_text())
    removed = sorted(k for k in config if k not in STRUCTURAL and k not in keep)
    path.write_text(json.dumps({k: v for k, v in config.items() if k in STRUCTURAL or k in keep}))
    return removed


@needs_llama_cpp
@pytest.mark.slow
@pytest.mark.parametrize("family", list(ARCH))
def test_config_without_optional_keys_runs_in_llama_cpp_as_in_transformers(family, tmp_path):
    """One model per family with every optional key deleted at once: llama.cpp's logits are transformers'."""
    path = _build(tmp_path / "m", family, **DEFAULT_HEAD_DIM.get(family, {}))
    removed = _strip(path)
    assert removed, "nothing optional to remove"
    want = hf_logits(path)
    out = tmp_path / "m.gguf"
    export_gguf(path, out, outtype="f32")
    assert relative_error(gguf_logits(out, IDS), want) < F32_RTOL


def _theta_1e4_differs(path, tmp_path):
    """The logits with rope_theta 1e4 (the old constant) differ far beyond the tolerance from ``path``'s."""
    other = tmp_path / "theta-1e4"
    shutil.copytree(path, other)
    set_config(other, rope_theta=10000.0)
    return relative_error(hf_logits(other), hf_logits(path)) > 30 * F32_RTOL


@needs_llama_cpp
@pytest.mark.slow
def test_mixtral_without_rope_theta_is_the_issues_case(tmp_path):
    path = build_family_dir(tmp_path / "m", "mixtral")
    _strip(path)
    assert _theta_1e4_differs(path, tmp_path)  # the default matters: the old 1e4 would be visibly wrong
    out = tmp_path / "m.gguf"
    export_gguf(path, out, outtype="f32")
    assert gguf.GGUFReader(out).get_field("llama.rope.freq_base").contents() == 1e6
    assert relative_error(gguf_logits(out, IDS), hf_logits(path)) < F32_RTOL


@needs_llama_cpp
@pytest.mark.slow
def test_gemma3_with_only_a_sliding_rope_entry(tmp_path):
    """The full-attention layers take the class's entry (rope_theta 1e6); the sliding layers keep theirs."""
    path = build_family_dir(tmp_path / "m", "gemma3")
    set_config(path, rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 20000.0}})
    out = tmp_path / "m.gguf"
    export_gguf(path, out, outtype="f32")
    fields = gguf.GGUFReader(out)
    assert fields.get_field("gemma3.rope.freq_base").contents() == 1e6
    assert fields.get_field("gemma3.rope.freq_base_swa").contents() == 20000.0
    assert relative_error(gguf_logits(out, IDS), hf_logits(path)) < F32_RTOL


#: Phi-3 with the original 128k release's spelling of LongRoPE (4 factors: half of each 16-wide head rotates).
SU = {"type": "su", "long_factor": [3.0, 9.0, 30.0, 90.0], "short_factor": [1.0, 1.1, 1.3, 1.7]}


@needs_llama_cpp
@pytest.mark.slow
def test_phi3_su_rope_scaling_keeps_its_factors(tmp_path):
    path = build_family_dir(tmp_path / "m", "phi3", original_max_position_embeddings=32, partial_rotary_factor=0.5)
    config = json.loads((path / "config.json").read_text())
    config.pop("rope_parameters", None)
    config.update(rope_scaling=SU, rope_theta=10000.0)  # as the 128k release's config.json has it
    (path / "config.json").write_text(json.dumps(config))
    want = hf_logits(path)
    plain = tmp_path / "plain"
    shutil.copytree(path, plain)
    set_config(plain, rope_scaling=None)
    assert relative_error(hf_logits(plain), want) > 30 * F32_RTOL  # the factors matter
    out = tmp_path / "m.gguf"
    export_gguf(path, out, outtype="f32")
    reader = gguf.GGUFReader(out)
    assert {"rope_factors_long.weight", "rope_factors_short.weight"} <= {t.name for t in reader.tensors}
    assert reader.get_field("phi3.rope.scaling.attn_factor") is not None
    assert relative_error(gguf_logits(out, IDS), want) < F32_RTOL


@needs_llama_cpp
@pytest.mark.slow
@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_gemma_without_a_sliding_layer_loads_and_matches(family, tmp_path):
    """llama.cpp aborts on a sliding window without a sliding layer (GGML_ASSERT(hparams.is_swa_any())):
    Gemma 2's every layer slides over the whole context instead; Gemma 3 gets no window."""
    path = build_family_dir(tmp_path / "m", family, layer_types=["full_attention", "full_attention"])
    want = hf_logits(path)
    assert relative_error(want, hf_logits(build_family_dir(tmp_path / "p", family))) > 30 * F32_RTOL
    out = tmp_path / "m.gguf"
    export_gguf(path, out, outtype="f32")
    fields = gguf.GGUFReader(out)
    if family == "gemma2":
        assert fields.get_field("gemma2.attention.sliding_window_pattern").contents() == [True, True]
    else:
        assert fields.get_field("gemma3.attention.sliding_window") is None
    assert relative_error(gguf_logits(out, IDS), want) < F32_RTOL


# -- refusals, in the bad-input harness -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma2_base(tmp_path_factory):
    return build_family_dir(tmp_path_factory.mktemp("gemma2") / "base", "gemma2")


@pytest.fixture(scope="module")
def phi3_base(tmp_path_factory):
    return build_family_dir(tmp_path_factory.mktemp("phi3") / "base", "phi3")


def _work(base, tmp_path):
    work = {"base": shutil.copytree(base, tmp_path / "base"), "outdir": tmp_path / "outdir"}
    work["outdir"].mkdir()
    return work


def _export(work):
    return ["export-gguf", work["base"], "--out", work["outdir"] / "m.gguf"]


def test_huge_layer_count_without_layer_types_is_refused_at_once(gemma2_base, tmp_path):
    work = _work(gemma2_base, tmp_path)
    set_config(work["base"], num_hidden_layers=2147483647, layer_types=None)
    start = time.monotonic()
    line = clean_failure(work, _export(work), "num_hidden_layers 2147483647", "at most 512 layers")
    assert time.monotonic() - start < 30, line  # a guard against the 2^31 list, not a timing claim


def test_phi3_su_factors_of_the_wrong_length_are_refused(phi3_base, tmp_path):
    work = _work(phi3_base, tmp_path)
    set_config(work["base"], rope_parameters=None, rope_theta=10000.0, rope_scaling={**SU, "long_factor": [1.0]})
    clean_failure(work, _export(work), "long_factor")


def test_per_layer_type_rope_without_a_full_attention_entry_reads_the_class_default():
    config = family_config("gemma3").to_dict()
    config["rope_parameters"] = {"sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
    hp = family_for("Gemma3ForCausalLM", source="c").read_hparams(config, source="c")
    assert (hp.rope_theta, hp.extra["swa_theta"]) == (1e6, 1e4)


def test_bad_sliding_window_pattern_is_refused():
    config = family_config("gemma3").to_dict()
    config.update(layer_types=None, sliding_window_pattern="six")
    with pytest.raises(ConfigError, match="sliding_window_pattern"):
        family_for("Gemma3ForCausalLM", source="c").read_hparams(config, source="c")


def test_families_builds_each_family():
    assert set(FAMILIES) | set(TINY_ARCHS) == set(ARCH)


#: Rotary settings in the forms configs on the Hub carry, each read with transformers' precedence.
ROPE_FORMS = {
    "v4-scaling-and-theta": ("llama", dict(rope_parameters=None, rope_theta=5e5,
                                           rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "scaling-beats-parameters": ("llama", dict(rope_parameters={"rope_type": "default", "rope_theta": 3e4},
                                               rope_scaling={"rope_type": "linear", "factor": 4.0})),
    "top-theta-fills-parameters": ("mixtral", dict(rope_parameters={"rope_type": "linear", "factor": 2.0},
                                                   rope_theta=2e5)),
    "gemma3-v4-local-base-only": ("gemma3", dict(rope_parameters=None, rope_local_base_freq=2e4)),
    "gemma3-per-type-and-top-theta": ("gemma3", dict(rope_parameters={
        "sliding_attention": {"rope_type": "default"}, "full_attention": {"rope_type": "default"}},
        rope_theta=3e5, rope_local_base_freq=3e4)),
    "gemma3-scaling-updates-full": ("gemma3", dict(rope_scaling={"rope_type": "linear", "factor": 8.0})),
    "phi3-top-partial-only": ("phi3", dict(rope_parameters=None, partial_rotary_factor=0.5)),
    "phi3-su": ("phi3", dict(rope_parameters=None, rope_scaling={**SU, "long_factor": [1.0] * 8,
                                                                 "short_factor": [1.0] * 8})),
}


@pytest.mark.parametrize("name", list(ROPE_FORMS))
def test_rope_forms_read_as_transformers_reads_them(name):
    family, change = ROPE_FORMS[name]
    config = _config(family).to_dict()
    config.update(change)
    config = {k: v for k, v in config.items() if not (k == "rope_parameters" and v is None)}
    expected = _expected(family, _hf(family, config))
    hp = family_for(ARCH[family], source="config.json").read_hparams(config, source="config.json")
    assert _ours(hp, expected) == expected
    full, _ = _rope(_hf(family, config))
    assert {k: hp.rope.get(k) for k in ("factor", "long_factor")} == {k: full.get(k) for k in ("factor", "long_factor")}
