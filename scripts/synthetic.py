"""Synthetic llama-shaped models for the benchmarks (never imported by the package or tests).

Shapes of a Llama-2-7B-like layer at hidden 2048 (intermediate 5632, 16 heads,
4 KV heads, vocabulary 32000, untied), random bf16 weights written by
safetensors' own ``save_file`` into one ``model.safetensors``.
"""

from __future__ import annotations

from pathlib import Path

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, VOCAB = 2048, 5632, 16, 4, 32000


def llama_config(layers: int, **extra):
    """A valid ``LlamaConfig`` for ``layers`` layers (bf16, untied)."""
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=layers,
                       num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, vocab_size=VOCAB,
                       tie_word_embeddings=False, dtype="bfloat16", architectures=["LlamaForCausalLM"], **extra)


def shapes(layers: int) -> dict[str, tuple[int, ...]]:
    """Every tensor name of the model and its shape, in the order transformers saves them."""
    kv = HIDDEN // HEADS * KV_HEADS
    out = {
        "model.embed_tokens.weight": (VOCAB, HIDDEN),
        "model.norm.weight": (HIDDEN,),
        "lm_head.weight": (VOCAB, HIDDEN),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        out.update(
            {
                p + "input_layernorm.weight": (HIDDEN,),
                p + "post_attention_layernorm.weight": (HIDDEN,),
                p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
                p + "self_attn.k_proj.weight": (kv, HIDDEN),
                p + "self_attn.v_proj.weight": (kv, HIDDEN),
                p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
                p + "mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN),
                p + "mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
                p + "mlp.down_proj.weight": (HIDDEN, INTERMEDIATE),
            }
        )
    return out


def write_model(path: Path, layers: int, **config_extra) -> int:
    """``config.json`` and random bf16 weights in one ``model.safetensors``; returns its size in bytes."""
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    llama_config(layers, **config_extra).save_pretrained(path)
    gen = torch.Generator().manual_seed(0)
    pool = (torch.randn(1 << 24, generator=gen) * 0.02).to(torch.bfloat16)  # sliced, so building stays fast
    tensors = {}
    for name, shape in shapes(layers).items():
        n = 1
        for d in shape:
            n *= d
        start = int(torch.randint(0, pool.numel(), (1,), generator=gen))
        tensors[name] = pool.roll(start).repeat(-(-n // pool.numel()))[:n].reshape(shape).clone()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return (path / "model.safetensors").stat().st_size
