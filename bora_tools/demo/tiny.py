"""Tiny Hugging Face models with random weights and a real tokenizer, built offline.

Used by ``bora-tools demo`` and by the tests: nothing is downloaded. Each
builder writes a complete model directory (config, safetensors shards and
index, tokenizer files, generation config) that ``transformers`` loads as is.
"""

from __future__ import annotations

from pathlib import Path

import torch

#: The embedded text the demo trains on and tokenizers are learnt from.
TEXT = """\
BoRA splits every adapted weight into blocks and gives each pair of blocks its own
diagonal mixing, so the update reaches a higher rank than LoRA at the same number of
parameters. To ship it, the adapter is merged into the base weights, turned into a plain
LoRA that every server already loads, exported for llama.cpp, and published to the Hub.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
How vexingly quick daft zebras jump! Sphinx of black quartz, judge my vow.
Numbers like 3.14159, 2718 and 42 appear too, as do symbols: (a + b) * c = d; x -> y.
"""

ARCHS = ("llama", "mistral", "qwen2", "gpt2")
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]


def build_tokenizer(*, vocab_size: int = 300, text: str = TEXT):
    """A byte-level BPE tokenizer (GPT-2 style) learnt from ``text``, as a transformers fast tokenizer.

    Special tokens: ``<s>`` (bos), ``</s>`` (eos), ``<pad>``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([text], trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 0)]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant: {% endif %}"
    )
    return fast


def tiny_config(
    arch: str = "llama",
    *,
    vocab_size: int = 320,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    tie: bool | None = None,
):
    """A transformers config for a tiny model of ``arch`` (llama, mistral, qwen2, gpt2)."""
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    if arch == "gpt2":
        return GPT2Config(
            n_embd=hidden,
            n_layer=layers,
            n_head=heads,
            n_positions=128,
            n_inner=intermediate,
            tie_word_embeddings=True if tie is None else tie,
            **common,
        )
    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}.get(arch)
    if cls is None:
        raise ValueError(f"unknown tiny architecture {arch!r}; expected one of {', '.join(ARCHS)}")
    kwargs = dict(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=intermediate,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        tie_word_embeddings=(arch == "qwen2") if tie is None else tie,
        **common,
    )
    if arch == "mistral":
        kwargs["sliding_window"] = None
    return cls(**kwargs)


def build_model(
    arch: str = "llama", *, seed: int = 0, dtype: torch.dtype = torch.float32, init_std: float = 0.05, **config_kwargs
):
    """A causal LM with random weights (deterministic for ``seed``) in ``dtype``."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch, **config_kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # a wider spread than the 0.02 default makes logits differ visibly
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, init_std)
            elif "bias" in name:
                p.normal_(0.0, init_std)
    return model.to(dtype).eval()


def save_model_dir(model, path: str | Path, *, tokenizer=None, max_shard_size: str | int | None = None) -> Path:
    """Write ``model`` (and ``tokenizer``) as a Hugging Face model directory.

    ``max_shard_size`` (e.g. ``"40KB"``) splits the weights over several shards
    with a ``model.safetensors.index.json``.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # ours go through the CLI's reporter
    path = Path(path)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size is not None else {}
    model.save_pretrained(path, **kwargs)
    (tokenizer or build_tokenizer()).save_pretrained(path)
    return path


def build_model_dir(
    path: str | Path,
    arch: str = "llama",
    *,
    max_shard_size: str | int | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **config_kwargs,
) -> Path:
    """Build and save a tiny model directory in one call; returns ``path``."""
    model = build_model(arch, seed=seed, dtype=dtype, **config_kwargs)
    return save_model_dir(model, path, max_shard_size=max_shard_size)


def default_targets(arch: str) -> list[str]:
    return GPT2_TARGETS if arch == "gpt2" else LLAMA_TARGETS
