"""Hypothesis fuzzing of the surfaces hardened in issue 15: JSON nesting, safetensors header values,
user patterns, GGUF hyperparameters and Hub tokens. A clean one-line BoraError or a correct result,
never a crash, a hang or a secret in a message.

Budget: 60 examples per target (a few seconds in CI); BORA_FUZZ_EXAMPLES for a deeper run.
"""

import json
import os
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bora_tools.core.config import BoraConfig, matches_target, pattern_key
from bora_tools.errors import BoraError, HubError
from bora_tools.gguf.hparams import read_hparams
from bora_tools.io.json import parse_json
from bora_tools.io.model_dir import read_header

FUZZ = settings(max_examples=int(os.environ.get("BORA_FUZZ_EXAMPLES", "60")), deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
NAMES = ["model.layers.0.self_attn.q_proj", "model.layers.11.mlp.down_proj", "lm_head", "model.embed_tokens"]


def clean(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except BoraError as e:
        line = e.one_line()
        assert "\n" not in line and len(line) < 20_000
        return e


# -- JSON depth -------------------------------------------------------------------------------------


@FUZZ
@given(depth=st.integers(1, 200_000), opener=st.sampled_from(["[", "{\"a\":", "[{\"b\":"]), tail=st.booleans())
def test_json_of_any_depth_parses_or_is_refused_in_one_line(depth, opener, tail):
    closer = {"[": "]", "{\"a\":": "}", "[{\"b\":": "}]"}[opener]
    text = opener * depth + "1" + (closer * depth if tail else "")
    result = clean(parse_json, text, source="x.json")
    if isinstance(result, BoraError):
        assert "x.json" in str(result)


@FUZZ
@given(depth=st.integers(500, 100_000))
def test_deep_adapter_config_is_refused(tmp_path_factory, depth):
    d = tmp_path_factory.mktemp("deep")
    (d / "adapter_config.json").write_text("[" * depth + "]" * depth)
    result = clean(BoraConfig.load, d)
    assert isinstance(result, BoraError) and "adapter_config.json" in str(result)


# -- safetensors header values ------------------------------------------------------------------------

text_with_surrogates = st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=12)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 1 << 70) | st.floats() | text_with_surrogates,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(text_with_surrogates, children, max_size=3),
    max_leaves=8,
)


@FUZZ
@given(name=text_with_surrogates, metadata=json_values, extra=json_values)
@pytest.mark.slow
def test_header_names_and_values_read_or_refused(tmp_path_factory, name, metadata, extra):
    header = {name: {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "__metadata__": metadata, "x": extra}
    raw = json.dumps(header).encode()
    path = tmp_path_factory.mktemp("h") / "s.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 4)
    result = clean(read_header, path)
    if not isinstance(result, BoraError):  # what was accepted can be written back as UTF-8
        for key in [*result.entries, *(result.metadata or {})]:
            key.encode("utf-8")


# -- user patterns ------------------------------------------------------------------------------------

pattern_text = st.text(alphabet=list("()[]{}*+?|.^$\\-:!=<>,0123456789aqjZ_.wdsS"), max_size=24)


@FUZZ
@given(key=pattern_text, target=pattern_text, value=st.integers(1, 64))
def test_patterns_match_or_are_refused_quickly(key, target, value):
    start = time.perf_counter()
    config = clean(BoraConfig, r=4, bora_blocks=2, rank_pattern={key: value}, target_modules=target)
    if not isinstance(config, BoraError):
        for name in NAMES:
            clean(pattern_key, config.rank_pattern, name)
            clean(matches_target, config.target_modules, name)
            clean(config.rank_for, name)
    assert time.perf_counter() - start < 5.0


@pytest.mark.parametrize("key", ["q_proj", r"layers\.\d+\.self_attn\.q_proj", "(q|k)_proj", r"model\..*q_proj"])
def test_guarded_matching_keeps_peft_semantics(key):
    import re

    for name in NAMES:
        want = re.match(rf"(.*\.)?({key})$", name) is not None
        assert (pattern_key({key: 1}, name) == key) == want


# -- GGUF hyperparameters -------------------------------------------------------------------------------

numbers = st.one_of(st.integers(-5, 1 << 80), st.floats(), st.text(max_size=4), st.none(), st.booleans(),
                    st.lists(st.integers(), max_size=2))


@FUZZ
@given(values=st.dictionaries(st.sampled_from(["num_hidden_layers", "hidden_size", "intermediate_size",
                                               "num_attention_heads", "num_key_value_heads", "vocab_size",
                                               "max_position_embeddings", "rms_norm_eps", "head_dim",
                                               "rope_theta"]), numbers, max_size=4),
       rope=st.dictionaries(st.sampled_from(["rope_type", "factor", "low_freq_factor", "high_freq_factor",
                                             "original_max_position_embeddings", "rope_theta"]),
                            st.one_of(numbers, st.sampled_from(["llama3", "linear", "default"])), max_size=5))
@pytest.mark.slow
def test_hparams_read_or_refused(values, rope):
    config = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": 320, **values, "rope_parameters": rope}
    hp = clean(read_hparams, config, source="config.json")
    if not isinstance(hp, BoraError):
        assert 1 <= hp.vocab_size < 2**31 and 1 <= hp.n_ctx < 2**31 and 0 < hp.rope_theta <= 1e12
        from bora_tools.gguf.hparams import rope_freq_factors

        freqs = rope_freq_factors(hp)
        assert freqs is None or bool(freqs.isfinite().all())


# -- Hub tokens ------------------------------------------------------------------------------------------


@FUZZ
@given(core=st.text(min_size=8, max_size=40), pad=st.sampled_from(["", " ", "\r\n", "\n", "\t "]))
def test_tokens_are_stripped_or_refused_without_being_shown(core, pad):
    from bora_tools import errors
    from bora_tools.hub.push import clean_token

    token = pad + core + pad
    before = set(errors._SECRETS)
    try:
        result = clean(clean_token, token)
    finally:  # registered secrets are process-wide: leave none of these random strings behind
        errors._SECRETS.clear()
        errors._SECRETS.update(before)
    if isinstance(result, HubError):
        assert core.strip() not in result.one_line() or len(core.strip()) < errors.MIN_SECRET_CHARS
    else:
        assert result == token.strip() and all(33 <= ord(c) <= 126 for c in result)
