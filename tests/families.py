"""Tiny random models of the GGUF families, built offline from transformers' own config classes.

Each family gets the tokenizer kind its checkpoints ship: a byte-level BPE
``tokenizer.json`` (Qwen3, OLMo 2, Granite, Mixtral) or a SentencePiece
``tokenizer.model`` (Gemma 2/3, Phi-3), and a vocabulary padded beyond the
tokenizer's (320 rows for 300 BPE tokens, 512 for 450 pieces). Sizes keep
every matrix row a multiple of 32 (Q8_0 blocks) and cost a few seconds each.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch

from bora_tools.demo.tiny import TEXT, build_tokenizer, save_model_dir

#: family -> (transformers config class name, projections a BoRA adapter targets, tokenizer kind)
FAMILIES = {
    "qwen3": ("Qwen3Config", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], "bpe"),
    "gemma2": ("Gemma2Config", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], "spm"),
    "gemma3": ("Gemma3TextConfig", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
               "spm"),
    "phi3": ("Phi3Config", ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], "spm"),
    "olmo2": ("Olmo2Config", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], "bpe"),
    "granite": ("GraniteConfig", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                "bpe"),
    "mixtral": ("MixtralConfig", ["q_proj", "k_proj", "v_proj", "o_proj"], "bpe"),  # experts are fused in memory
}
SPM_VOCAB = 512  # config vocab_size of SentencePiece families (450 pieces: 62 padded rows)
BPE_VOCAB = 320  # config vocab_size of BPE families (300 tokens: 20 padded rows)
#: Texts where transformers' SentencePiece conversion differs from SentencePiece itself (one of two leading
#: spaces is dropped); llama.cpp follows SentencePiece there, which the tests check.
SPM_HF_DIFFERS = {"  leading spaces, trailing spaces   "}


def family_config(family: str, tokenizer: str | None = None, **overrides):
    """The transformers config of a tiny ``family`` model (hidden 64, 2 layers, 4 heads, 2 KV heads)."""
    import transformers

    cls_name, _, tok = FAMILIES[family]
    tok = tokenizer or tok
    common = dict(vocab_size=SPM_VOCAB if tok == "spm" else BPE_VOCAB, hidden_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128,
                  rms_norm_eps=1e-5)
    common.update(dict(bos_token_id=1, eos_token_id=2, pad_token_id=None) if tok == "spm"
                  else dict(bos_token_id=0, eos_token_id=1, pad_token_id=2))
    extra = {
        "qwen3": dict(head_dim=32, tie_word_embeddings=True),  # explicit head_dim: 4 x 32 != 64
        # query_pre_attn_scalar as llama.cpp fixes it (head_dim); a 24-token window the 41-token test sequence crosses
        # soft-capping far below Gemma 2's defaults (50, 30), which llama.cpp would also assume: visibly applied
        "gemma2": dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=24, attn_logit_softcapping=1.0,
                       final_logit_softcapping=1.5),
        # one sliding and one full layer, each with its own rope base
        "gemma3": dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=24,
                       layer_types=["sliding_attention", "full_attention"],
                       rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                        "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}}),
        "phi3": dict(original_max_position_embeddings=128, tie_word_embeddings=False),
        "olmo2": dict(),
        "granite": dict(attention_multiplier=0.2, embedding_multiplier=3.0, residual_multiplier=0.5,
                        logits_scaling=2.5),
        "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=64),
    }[family]
    common.update(extra)
    common.update(overrides)
    return getattr(transformers, cls_name)(**common)


def spm_tokenizer(path: Path):
    """Write a SentencePiece ``tokenizer.model`` (byte fallback, 450 pieces; unk 0, bos 1, eos 2) into ``path``."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXT.splitlines() * 20), model_writer=buf, vocab_size=450,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1,
                                   eos_id=2, pad_id=-1, hard_vocab_limit=False, remove_extra_whitespaces=False,
                                   normalization_rule_name="identity", minloglevel=2)
    (path / "tokenizer.model").write_bytes(buf.getvalue())
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "legacy": False}))
    return spm.SentencePieceProcessor(model_proto=buf.getvalue())


def build_family_dir(path: Path, family: str, *, seed: int = 0, init_std: float = 0.05, tokenizer: str | None = None,
                     **overrides) -> Path:
    """A tiny ``family`` model directory with random weights (norms too) and its kind of tokenizer.

    ``tokenizer`` ("bpe" or "spm") overrides the family's kind (Phi-4 is a Phi3ForCausalLM with BPE).
    """
    from transformers import AutoModelForCausalLM

    tokenizer = tokenizer or FAMILIES[family][2]
    config = family_config(family, tokenizer, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Norms too, so that the q/k norms and Gemma's 1 + w are visibly right: around 1 as applied
    # (Gemma stores w around 0, the others store the factor itself).
    norm_center = 0.0 if family.startswith("gemma") else 1.0
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.normal_(0.0, init_std) if p.ndim >= 2 else p.copy_(norm_center + 0.2 * torch.randn_like(p))
    path = Path(path)
    if tokenizer == "spm":
        model.eval().save_pretrained(path)
        spm_tokenizer(path)
    else:
        save_model_dir(model.eval(), path, tokenizer=build_tokenizer())
    return path


def targets(family: str) -> list[str]:
    return FAMILIES[family][1]
