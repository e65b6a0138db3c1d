"""``export-gguf --modelfile``: an Ollama ``Modelfile`` beside the GGUF it names.

The syntax is Ollama's (https://docs.ollama.com/modelfile): one ``INSTRUCTION arguments`` a line,
``#`` comments; ``FROM`` (required) names the model, here the GGUF by a path relative to the
Modelfile; ``ADAPTER`` a LoRA adapter to apply on it (a GGUF adapter, path relative to the Modelfile);
``PARAMETER stop "..."`` once per stop sequence.

What it holds:

- a full or merged GGUF: ``FROM ./<file>.gguf``;
- a LoRA GGUF: ``FROM`` the base (the ``base`` of the export: its folder, or ``hf.co/OWNER/NAME`` for a
  Hub id, which Ollama pulls from the Hub when that repo holds GGUF files) and ``ADAPTER ./<file>.gguf``;
- ``PARAMETER stop`` for the tokenizer's end-of-generation tokens: its eos token(s) (tokenizer config,
  ``generation_config.json``), and the end-of-turn tokens llama.cpp itself stops on when the vocabulary
  has them (``<|eot_id|>``, ``<|im_end|>``, ``<end_of_turn>``, ...);
- no ``TEMPLATE``: the chat template is a Jinja template (transformers) and Ollama's is a Go template; no
  conversion of one into the other is faithful in general (loops, filters, tool calls). The GGUF carries
  the Jinja template as ``tokenizer.chat_template``, from which Ollama picks its own matching template
  when it imports the file. The Modelfile says so in a comment.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bora_tools.gguf.vocab import GgufVocab
from bora_tools.io.atomic import atomic_output, check_target

#: Tokens llama.cpp treats as end of generation when the vocabulary has them (llama-vocab.cpp's list).
END_OF_TURN = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<EOT>",
               "<|end_of_text|>", "<｜end▁of▁sentence｜>", "<|return|>", "<|call|>")


def modelfile_path(gguf_path: str | Path) -> Path:
    """Where the Modelfile of ``gguf_path`` goes: ``<stem>.Modelfile`` beside it (one per file of a folder).

    Example: ``modelfile_path("out/tiny-q8_0.gguf")`` -> ``Path("out/tiny-q8_0.Modelfile")``
    """
    path = Path(gguf_path)
    return path.with_name(f"{path.stem}.Modelfile")


def stop_tokens(vocab: GgufVocab, model_dir: str | Path) -> list[str]:
    """The tokenizer's end-of-generation tokens as text: eos ids first, then llama.cpp's end-of-turn names."""
    texts = [t.decode("utf-8", "replace") if isinstance(t, bytes) else t for t in vocab.tokens]
    ids: list[int] = []
    special = dict(vocab.special.special_token_ids) if vocab.special else {}
    for key in ("eos", "eot", "eom"):
        if isinstance(special.get(key), int):
            ids.append(special[key])
    gen = Path(model_dir) / "generation_config.json"
    if gen.is_file():
        try:
            eos = json.loads(gen.read_text()).get("eos_token_id")
        except (OSError, ValueError, AttributeError):
            eos = None
        listed = eos if isinstance(eos, list) else [eos]
        ids += [i for i in listed if isinstance(i, int) and not isinstance(i, bool)]
    found = [texts[i] for i in ids if 0 <= i < len(texts)]
    found += [t for t in END_OF_TURN if t in set(texts)]
    out: list[str] = []
    for t in found:
        if t and t not in out and '"' not in t and "\n" not in t:
            out.append(t)
    return out


def modelfile_text(gguf_path: Path, *, stops: list[str], base_from: str | None = None,
                   chat_template: bool = False) -> str:
    """The Modelfile for ``gguf_path``: a full model, or (``base_from`` given) a LoRA adapter on that base."""
    lines = ["# Ollama Modelfile written by bora-tools export-gguf (syntax: https://docs.ollama.com/modelfile)",
             f"# ollama create NAME -f {modelfile_path(gguf_path).name} && ollama run NAME"]
    if base_from is None:
        lines.append(f"FROM ./{gguf_path.name}")
    else:
        lines += ["# The base model the adapter was made for: a GGUF of it, a folder Ollama imports, or a Hub repo "
                  "of GGUF files (hf.co/OWNER/NAME)",
                  f"FROM {_quoted(base_from)}", f"ADAPTER ./{gguf_path.name}"]
    lines += [f"PARAMETER stop {_quoted(s, always=True)}" for s in stops]
    lines.append("# No TEMPLATE: the chat template is Jinja (transformers) and Ollama's is a Go template"
                 + ("; Ollama picks its own from the GGUF's tokenizer.chat_template when it imports the file"
                    if chat_template else "; this tokenizer has no chat template"))
    return "\n".join(lines) + "\n"


def _quoted(text: str, *, always: bool = False) -> str:
    return f'"{text}"' if always or any(c.isspace() for c in text) else text


def write_modelfile(gguf_path: str | Path, *, vocab: GgufVocab, model_dir: str | Path, base_from: str | None = None,
                    overwrite: bool = False) -> Path:
    """Write ``<stem>.Modelfile`` beside ``gguf_path`` (atomically); returns its path."""
    gguf_path = Path(gguf_path)
    target = modelfile_path(gguf_path)
    text = modelfile_text(gguf_path, stops=stop_tokens(vocab, model_dir), base_from=base_from,
                          chat_template=_has_template(vocab))
    with atomic_output(target, overwrite=overwrite) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return target


def check_modelfile_target(gguf_path: str | Path, *, overwrite: bool) -> None:
    """Refuse an existing Modelfile before anything is written (unless ``overwrite``)."""
    check_target(modelfile_path(gguf_path), overwrite=overwrite)


def _has_template(vocab: GgufVocab) -> bool:
    special: Any = vocab.special
    return bool(special is not None and special.chat_template)


def tokenizer_vocab(model_dir: str | Path) -> GgufVocab:
    """The tokenizer of the model folder ``model_dir``, as the GGUF writer reads it."""
    from bora_tools.gguf.architectures import family_for
    from bora_tools.io.model_dir import ModelDir

    model = ModelDir.open(model_dir)
    config_path = str(model.path / "config.json")
    hp = family_for(model.architecture, source=config_path).read_hparams(model.config, source=config_path)
    from bora_tools.gguf.vocab import read_vocab

    return read_vocab(model.path, vocab_size=hp.vocab_size)
