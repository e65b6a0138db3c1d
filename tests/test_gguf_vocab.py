"""Tokenizers in GGUF: SentencePiece, byte-fallback BPE, and pre-tokenizers chosen from tokenizer.json's structure."""

from __future__ import annotations

import json
import shutil

import gguf
import pytest
from families import spm_tokenizer
from gguf_support import (
    F32_RTOL,
    IDS,
    SAMPLES,
    gguf_logits,
    gguf_tokenize,
    hf_logits,
    needs_llama_cpp,
    relative_error,
    set_config,
    tiny_dir,
)

from bora_tools.demo.tiny import TEXT
from bora_tools.gguf.export import export_gguf
from bora_tools.gguf.vocab import KNOWN_SPLIT_REGEXES, choose_pre_tokenizer

pytestmark = needs_llama_cpp

LEADING_SPACES = "  leading spaces, trailing spaces   "


def _kv(path) -> dict:
    return {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items()}


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory):
    """A tiny llama with only a SentencePiece tokenizer.model (byte fallback, 450 pieces, vocab_size 512)."""
    pytest.importorskip("sentencepiece")
    root = tmp_path_factory.mktemp("spm")
    path = tiny_dir(root, "llama", vocab_size=512)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (path / name).unlink(missing_ok=True)
    processor = spm_tokenizer(path)  # Llama 2's settings: identity normalisation, whitespace kept as is
    set_config(path, bos_token_id=1, eos_token_id=2, pad_token_id=None)
    return path, processor


def test_sentencepiece_tokenizer(spm_dir, tmp_path):
    from transformers import AutoTokenizer

    path, sp = spm_dir
    out = tmp_path / "spm.gguf"
    report = export_gguf(path, out, outtype="f32").to_dict()
    kv = _kv(out)
    assert kv["tokenizer.ggml.model"] == "llama" and len(kv["tokenizer.ggml.tokens"]) == 512
    assert report["vocab"]["padded"] == 62 and len(set(kv["tokenizer.ggml.tokens"])) == 512
    assert (kv["tokenizer.ggml.bos_token_id"], kv["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert kv["tokenizer.ggml.add_bos_token"] is True and kv["tokenizer.ggml.add_space_prefix"] is True
    assert kv["tokenizer.ggml.token_type"][3] == gguf.TokenType.BYTE
    hf = AutoTokenizer.from_pretrained(path)
    for text in SAMPLES:
        got = gguf_tokenize(out, text)
        assert got == [1] + sp.encode(text), text  # exactly SentencePiece itself
        if text != LEADING_SPACES:  # transformers' Metaspace conversion drops one of two leading spaces
            assert got == hf(text).input_ids, text
    assert relative_error(gguf_logits(out, IDS), hf_logits(path)) < F32_RTOL


def test_byte_fallback_bpe_tokenizer_json(spm_dir, tmp_path):
    """A Llama 2 style fast tokenizer (tokenizer.json, byte-fallback BPE) without tokenizer.model."""
    from transformers import AutoTokenizer

    src, sp = spm_dir
    path = tmp_path / "hf"
    shutil.copytree(src, path)
    AutoTokenizer.from_pretrained(src).save_pretrained(path)
    (path / "tokenizer.model").unlink()
    assert json.loads((path / "tokenizer.json").read_text())["model"]["byte_fallback"] is True
    out = tmp_path / "bf.gguf"
    report = export_gguf(path, out, outtype="f16").to_dict()
    assert report["vocab"]["model"] == "llama" and "byte-fallback" in report["vocab"]["source"]
    hf = AutoTokenizer.from_pretrained(path)
    for text in SAMPLES:
        got = gguf_tokenize(out, text)
        assert got == [1] + sp.encode(text), text
        if text != LEADING_SPACES:
            assert got == hf(text).input_ids, text


def _bpe_dir(root, name, pre_tokenizer, *, ignore_merges=False):
    """A tiny llama whose byte-level BPE tokenizer uses ``pre_tokenizer``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    path = tiny_dir(root / name, "llama")
    tok = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<pad>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(path)
    return path


def _split(regex):
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


@pytest.mark.parametrize("expected", ["llama-bpe", "qwen2", "gpt-2"])
def test_pre_tokenizer_chosen_from_structure(tmp_path, expected):
    """Split-by-regex tokenizers (which llama.cpp's converter knows only by hash) tokenize exactly like HF."""
    from transformers import AutoTokenizer

    regex = next(r for r, name in KNOWN_SPLIT_REGEXES.items() if name == expected)
    path = _bpe_dir(tmp_path, expected, _split(regex), ignore_merges=expected == "llama-bpe")
    out = tmp_path / "m.gguf"
    report = export_gguf(path, out, outtype="f16").to_dict()
    assert report["vocab"]["pre"] == expected and report["warnings"] == []
    assert _kv(out)["tokenizer.ggml.pre"] == expected
    hf = AutoTokenizer.from_pretrained(path)
    for text in SAMPLES:
        assert gguf_tokenize(out, text) == hf(text).input_ids, text


def test_unknown_pre_tokenizer_uses_default_with_a_warning(tmp_path, caplog):
    from tokenizers import pre_tokenizers

    path = _bpe_dir(tmp_path, "odd", pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                              pre_tokenizers.ByteLevel(add_prefix_space=False)]))
    out = tmp_path / "m.gguf"
    with caplog.at_level("WARNING", logger="bora_tools"):
        report = export_gguf(path, out, outtype="f16").to_dict()
    assert report["vocab"]["pre"] == "default" and "Digits+ByteLevel" in caplog.text
    assert _kv(out)["tokenizer.ggml.pre"] == "default"
    assert len(gguf_tokenize(out, "loads fine 123")) > 3  # llama.cpp accepts the file


def test_prefix_space_is_flagged():
    tok = {"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": True, "use_regex": True}}
    name, warning = choose_pre_tokenizer(tok)
    assert name == "gpt-2" and "prefix space" in warning
