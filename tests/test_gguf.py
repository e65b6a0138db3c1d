"""Full-model GGUF export, proven in llama.cpp (llama-cpp-python) against transformers."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
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
    tiny_dir,
)

from bora_tools.core import row_merge
from bora_tools.gguf.export import export_gguf

Q = gguf.GGMLQuantizationType
pytestmark = needs_llama_cpp


@pytest.fixture(scope="module")
def models(tiny):
    """Tiny llama / qwen2 / mistral directories (vocab 320 > tokenizer 300) and their HF logits."""
    out = {}
    for arch in ("llama", "qwen2", "mistral"):
        path = tiny.base(arch)
        out[arch] = (path, hf_logits(path))
    return out


def fields(path) -> dict:
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items()}, {t.name: t for t in reader.tensors}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_f32_logits_match_transformers(models, tmp_path, arch):
    path, want = models[arch]
    out = tmp_path / "m.gguf"
    report = export_gguf(path, out, outtype="f32").to_dict()
    got = gguf_logits(out, IDS)
    assert got.shape == want.shape == (len(IDS), 320)
    assert relative_error(got, want) < F32_RTOL
    assert report["types"] == {"F32": report["tensors"]}


@pytest.mark.parametrize("arch,outtype,rtol", [("llama", "f16", F16_RTOL), ("qwen2", "f16", F16_RTOL),
                                               ("llama", "bf16", BF16_RTOL), ("qwen2", "bf16", BF16_RTOL)])
def test_16_bit_logits_match_transformers(models, tmp_path, arch, outtype, rtol):
    path, want = models[arch]
    out = tmp_path / "m.gguf"
    export_gguf(path, out, outtype=outtype)
    _, tensors = fields(out)
    assert tensors["blk.0.attn_q.weight"].tensor_type == (Q.F16 if outtype == "f16" else Q.BF16)
    assert tensors["blk.0.attn_norm.weight"].tensor_type == Q.F32  # norms stay F32
    assert relative_error(gguf_logits(out, IDS), want) < rtol


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_q8_0_logits_correlate(models, tmp_path, arch):
    path, want = models[arch]
    out = tmp_path / "m.gguf"
    report = export_gguf(path, out, outtype="q8_0").to_dict()
    got = gguf_logits(out, IDS)
    assert relative_error(got, want) > 1e-5  # really quantised...
    assert correlation(got, want) > Q8_MIN_CORR  # ...and still the same model
    assert report["fallbacks"] == []
    _, tensors = fields(out)
    assert tensors["blk.1.ffn_down.weight"].tensor_type == Q.Q8_0
    assert tensors["token_embd.weight"].tensor_type == Q.Q8_0


@pytest.mark.slow
def test_q8_0_falls_back_where_rows_are_not_multiples_of_32(tiny, tmp_path, caplog):
    # intermediate 80: ffn_down's rows (its input dimension) hold 80 values, not a multiple of 32
    path = tiny.base("llama", intermediate=80)
    want = hf_logits(path)
    out = tmp_path / "m.gguf"
    with caplog.at_level("WARNING", logger="bora_tools"):
        report = export_gguf(path, out, outtype="q8_0").to_dict()
    _, tensors = fields(out)
    assert tensors["blk.0.ffn_down.weight"].tensor_type == Q.F16
    assert tensors["blk.0.ffn_up.weight"].tensor_type == Q.Q8_0  # rows of 64
    assert {f["tensor"] for f in report["fallbacks"]} == {"blk.0.ffn_down.weight", "blk.1.ffn_down.weight"}
    assert "not a multiple of 32" in caplog.text
    assert correlation(gguf_logits(out, IDS), want) > Q8_MIN_CORR


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tokenizer_matches_hf(models, tmp_path, arch):
    from transformers import AutoTokenizer

    path, _ = models[arch]
    out = tmp_path / "m.gguf"
    export_gguf(path, out, outtype="f16")
    tok = AutoTokenizer.from_pretrained(path)
    for text in SAMPLES:
        assert gguf_tokenize(out, text) == tok(text).input_ids, text


def test_metadata_llama(models, tmp_path):
    path, _ = models["llama"]
    out = tmp_path / "m.gguf"
    export_gguf(path, out, outtype="f16")
    kv, tensors = fields(out)
    assert kv["general.architecture"] == "llama" and kv["general.type"] == "model"
    assert kv["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    assert (kv["llama.block_count"], kv["llama.embedding_length"], kv["llama.feed_forward_length"]) == (2, 64, 128)
    assert (kv["llama.attention.head_count"], kv["llama.attention.head_count_kv"]) == (4, 2)
    assert kv["llama.rope.freq_base"] == 10000.0 and kv["llama.context_length"] == 128
    assert kv["llama.rope.dimension_count"] == 16 and kv["llama.vocab_size"] == 320
    assert abs(kv["llama.attention.layer_norm_rms_epsilon"] - 1e-5) < 1e-12
    assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == "gpt-2"
    tokens = kv["tokenizer.ggml.tokens"]
    assert len(tokens) == 320 and len(set(tokens)) == 320  # padded with unique tokens
    types = kv["tokenizer.ggml.token_type"]
    assert all(t == gguf.TokenType.UNUSED for t in types[300:])
    assert types[0] == types[1] == gguf.TokenType.CONTROL  # <s>, </s>
    assert (kv["tokenizer.ggml.bos_token_id"], kv["tokenizer.ggml.eos_token_id"]) == (0, 1)
    assert kv["tokenizer.ggml.add_bos_token"] is True
    assert "messages" in kv["tokenizer.chat_template"]
    assert len(kv["tokenizer.ggml.merges"]) > 0
    assert "output.weight" in tensors and "blk.0.attn_q.bias" not in tensors


def test_metadata_qwen2_tied_embeddings_and_biases(models, tmp_path):
    path, _ = models["qwen2"]
    out = tmp_path / "m.gguf"
    export_gguf(path, out, outtype="f16")
    kv, tensors = fields(out)
    assert kv["general.architecture"] == "qwen2"
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
    for part in ("q", "k", "v"):
        assert tensors[f"blk.0.attn_{part}.bias"].tensor_type == Q.F32


@pytest.mark.slow
def test_rope_theta_read_from_rope_parameters(tmp_path):
    path = tiny_dir(tmp_path, "llama")
    set_config(path, rope_parameters={"rope_theta": 500000.0, "rope_type": "default"})
    want = hf_logits(path)
    out = tmp_path / "m.gguf"
    export_gguf(path, out, outtype="f32")
    kv, _ = fields(out)
    assert kv["llama.rope.freq_base"] == 500000.0
    assert relative_error(gguf_logits(out, IDS), want) < F32_RTOL


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64, "rope_theta": 10000.0},
])
def test_rope_scaling_matches_transformers(tmp_path, rope):
    path = tiny_dir(tmp_path, "llama")
    set_config(path, rope_parameters=rope)
    want = hf_logits(path)
    set_config(path, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    plain = hf_logits(path)
    set_config(path, rope_parameters=rope)
    assert relative_error(want, plain) > 1e-3  # the scaling changes the output
    out = tmp_path / "m.gguf"
    export_gguf(path, out, outtype="f32")
    assert relative_error(gguf_logits(out, IDS), want) < F32_RTOL


def test_streams_a_block_of_rows_at_a_time(models, tmp_path, monkeypatch):
    """Tensors are produced in blocks of rows, each gone before the next one exists; the file is unchanged."""
    import weakref

    from bora_tools.gguf import writer as gguf_write

    path, _ = models["llama"]
    export_gguf(path, tmp_path / "whole.gguf", outtype="q8_0")
    alive: list[weakref.ref] = []
    original = gguf_write.to_gguf_array

    def spy(t, qtype, **kwargs):
        assert all(ref() is None for ref in alive), "an earlier block is still in memory"
        assert t.numel() <= 1024 or t.shape[0] == 16  # a block, or one whole head of q/k rows
        alive.append(weakref.ref(t))
        return original(t, qtype, **kwargs)

    monkeypatch.setattr(gguf_write, "to_gguf_array", spy)
    monkeypatch.setattr(row_merge, "CPU_CHUNK_ELEMENTS", 1024)
    export_gguf(path, tmp_path / "blocks.gguf", outtype="q8_0")
    assert len(alive) > 100
    assert (tmp_path / "blocks.gguf").read_bytes() == (tmp_path / "whole.gguf").read_bytes()


def test_sharded_model_exports_the_same_file(tmp_path, llama_base, llama_sharded):
    single = llama_base
    sharded = llama_sharded
    assert (sharded / "model.safetensors.index.json").is_file()
    export_gguf(single, tmp_path / "a.gguf", outtype="f32")
    export_gguf(sharded, tmp_path / "b.gguf", outtype="f32")
    a, b = gguf.GGUFReader(tmp_path / "a.gguf"), gguf.GGUFReader(tmp_path / "b.gguf")
    ta, tb = {t.name: t.data for t in a.tensors}, {t.name: t.data for t in b.tensors}
    assert ta.keys() == tb.keys()
    for name in ta:
        np.testing.assert_array_equal(ta[name], tb[name])


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0])
def test_conversions_are_gguf_py_bit_for_bit(qtype, monkeypatch):
    """Our casts (torch) and parallel Q8_0 slices give exactly gguf-py's bytes."""
    import torch

    from bora_tools.gguf import writer as gguf_write

    monkeypatch.setattr(gguf_write, "_Q8_SLICE_ELEMENTS", 96 * 3)  # several slices, in threads
    x = torch.randn(37, 96, generator=torch.Generator().manual_seed(0)) * 3
    x[0, :32] = 0.0  # an all-zero Q8_0 block
    x[1, :4] = torch.tensor([1e-30, -1e-30, 65504.0, 1e-8])
    with gguf_write.quantize_pool() as pool:
        got = gguf_write.to_gguf_array(x, qtype, pool=pool)
    want = gguf.quants.quantize(x.numpy(), qtype)
    assert got.tobytes() == want.tobytes()
    assert gguf_write.to_gguf_array(x, qtype).tobytes() == want.tobytes()  # serially, without a pool


def test_stored_lm_head_is_written_even_if_config_says_tied(tmp_path):
    """transformers 5 unties embeddings whose two matrices are stored and differ; llama.cpp must agree."""
    import torch
    from transformers import AutoModelForCausalLM

    path = tiny_dir(tmp_path, "llama")  # lm_head.weight stored, distinct from embed_tokens
    set_config(path, tie_word_embeddings=True)
    want = hf_logits(path)
    tied = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        tied.lm_head.weight.copy_(tied.model.embed_tokens.weight)
        wrong = tied(torch.tensor([IDS])).logits[0].numpy()
    assert relative_error(wrong, want) > 0.05  # output = token_embd would be visibly wrong
    out = tmp_path / "m.gguf"
    export_gguf(path, out, outtype="f32")
    _, tensors = fields(out)
    assert "output.weight" in tensors
    assert relative_error(gguf_logits(out, IDS), want) < F32_RTOL


def test_q8_0_thread_pool_ends_with_the_export(models, tmp_path):
    import threading

    path, _ = models["llama"]
    export_gguf(path, tmp_path / "m.gguf", outtype="q8_0")
    assert not [t.name for t in threading.enumerate() if t.name.startswith("bora-q8")]


@pytest.mark.parametrize("qtype,value", [(Q.F16, 65520.0), (Q.BF16, 3.4e38), (Q.Q8_0, 127 * 65520.0)])
def test_narrowing_overflow_is_refused(qtype, value):
    """A finite value the GGUF type cannot hold is an error naming the tensor, never an inf in the file."""
    import torch

    from bora_tools.errors import UnsupportedError
    from bora_tools.gguf import writer as gguf_write

    x = torch.zeros(2, 64)
    gguf_write.to_gguf_array(x + 6e4, qtype)  # large but representable
    x[1, 40] = value
    with pytest.raises(UnsupportedError, match=r"^blk\.0\.attn_q\.weight.* overflows"):
        gguf_write.to_gguf_array(x, qtype, name="blk.0.attn_q.weight")
