"""The tokenizer of a model directory as llama.cpp's GGUF vocabulary.

Three tokenizer kinds are read, each with gguf-py's own reader:

- byte-level BPE in ``tokenizer.json`` (GPT-2, Llama 3, Qwen2 style):
  ``gguf.BpeVocab`` -> ``tokenizer.ggml.model = "gpt2"`` with merges;
- SentencePiece ``tokenizer.model``: ``gguf.SentencePieceVocab`` -> ``"llama"``;
- byte-fallback BPE in ``tokenizer.json`` (a Llama 2 style fast tokenizer
  without ``tokenizer.model``): ``gguf.LlamaHfVocab`` -> ``"llama"``.

Special tokens, ``add_bos``/``add_eos`` and the chat template come from
``gguf.SpecialVocab``. When the config's ``vocab_size`` exceeds the
tokenizer's, the list is padded with unique unused tokens so that every row of
the embedding has a token.

llama.cpp's own converter picks the BPE pre-tokenizer by hashing the token ids
of a test string and refuses a hash it does not know; here the pre-tokenizer
is chosen from the structure of ``tokenizer.json`` instead, with ``default``
and a warning when the structure is not one llama.cpp implements.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf

from bora_tools.errors import BoraError, ModelDirError, UnsupportedError
from bora_tools.io.json import read_json
from bora_tools.progress import logger

# Split regexes of the byte-level pre-tokenizers llama.cpp implements, as they
# appear in tokenizer.json, and llama.cpp's name for each.
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
KNOWN_SPLIT_REGEXES = {_GPT2_REGEX: "gpt-2", _LLAMA3_REGEX: "llama-bpe", _QWEN2_REGEX: "qwen2"}
DEFAULT_PRE = "default"
PAD_SCORE = -1000.0  # what llama.cpp's converter gives unused padding tokens


@dataclass
class GgufVocab:
    """Everything the GGUF tokenizer keys need, already padded to ``len(tokens)``."""

    model: str  # tokenizer.ggml.model: "gpt2" or "llama"
    pre: str  # tokenizer.ggml.pre
    tokens: list[str | bytes]
    toktypes: list[int]
    scores: list[float] | None  # SentencePiece-style models only
    special: gguf.SpecialVocab | None = None  # set once the list is padded
    add_space_prefix: bool | None = None
    padded: int = 0  # unused tokens appended to reach the config's vocab_size
    source: str = ""  # the file the vocabulary came from
    notes: list[str] = field(default_factory=list)

    def add_to(self, writer: gguf.GGUFWriter) -> None:
        """Write the tokenizer keys into ``writer`` (before its header is written)."""
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.toktypes)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        if self.special is not None:
            self.special.add_to_gguf(writer, quiet=True)

    def summary(self) -> dict[str, Any]:
        return {"model": self.model, "pre": self.pre, "tokens": len(self.tokens), "padded": self.padded,
                "source": self.source,
                "special": dict(self.special.special_token_ids) if self.special else {},
                "add_special": dict(self.special.add_special_token) if self.special else {},
                "chat_template": bool(self.special and self.special.chat_template is not None)}


def read_vocab(model_dir: str | Path, *, vocab_size: int, rows: int | None = None) -> GgufVocab:
    """Read the tokenizer of ``model_dir`` and pad it to ``vocab_size`` tokens (see ``_read_vocab``).

    A tokenizer file whose structure is not what its kind requires (a list where an object belongs, ...)
    is refused in one line naming the files, whichever reader (ours or gguf-py's) trips over it.
    """
    path = Path(model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (path / name).is_file():
            data = read_json(path / name, error=ModelDirError)
            if not isinstance(data, dict):
                raise ModelDirError(f"{path / name}: expected a JSON object, found {type(data).__name__}")
    try:
        return _read_vocab(path, vocab_size=vocab_size, rows=rows)
    except BoraError:
        raise
    except (TypeError, AttributeError, KeyError, IndexError, ValueError) as e:
        raise ModelDirError(f"{path}: malformed tokenizer files (tokenizer.json, tokenizer_config.json): "
                            f"{type(e).__name__}: {' '.join(str(e).split())[:200]}") from e


def _read_vocab(model_dir: Path, *, vocab_size: int, rows: int | None) -> GgufVocab:
    """Read the tokenizer of ``model_dir`` and pad it to ``vocab_size`` tokens.

    Example::

        vocab = read_vocab("models/tiny-llama", vocab_size=320)
        vocab.model, vocab.pre, len(vocab.tokens)     # ("gpt2", "gpt-2", 320)

    Raises:
        ModelDirError: no tokenizer, an unreadable one, more tokens than ``vocab_size``, or a
            ``vocab_size`` other than ``rows`` (the stored embedding's rows, when given).
        UnsupportedError: a tokenizer kind llama.cpp cannot load (WordPiece, Unigram JSON).
    """
    path = Path(model_dir)
    tok_json = _read_tokenizer_json(path)
    if (path / "tokenizer.model").is_file():
        vocab = _sentencepiece_vocab(path)
    elif tok_json is not None:
        vocab = _json_vocab(path, tok_json)
    else:
        raise ModelDirError(f"{path}: no tokenizer.json or tokenizer.model: a GGUF model needs its tokenizer",
                            hint="copy the base model's tokenizer files into the directory")
    _check_ids(path, vocab, tok_json, vocab_size)
    if rows is not None and rows != vocab_size:  # before padding: vocab_size is only trusted once tensors agree
        raise ModelDirError(f"{path / 'config.json'}: vocab_size is {vocab_size} but the token embedding has "
                            f"{rows} rows")
    _pad(vocab, vocab_size)
    vocab.special = gguf.SpecialVocab(path, load_merges=vocab.model == "gpt2", n_vocab=len(vocab.tokens))
    if vocab.model == "gpt2" and not vocab.special.merges:
        raise ModelDirError(f"{path / 'tokenizer.json'}: a byte-level BPE tokenizer without merges")
    return vocab


def _read_tokenizer_json(path: Path) -> dict[str, Any] | None:
    file = path / "tokenizer.json"
    if not file.is_file():
        return None
    data = read_json(file, error=ModelDirError)
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise ModelDirError(f"{file}: expected an object with a 'model' entry")
    return data


def _json_vocab(path: Path, tok: dict[str, Any]) -> GgufVocab:
    model = tok["model"]
    kind = model.get("type")
    decoder = (tok.get("decoder") or {}).get("type")
    if kind == "BPE" and model.get("byte_fallback"):
        return _llama_hf_vocab(path)
    if kind != "BPE" or decoder != "ByteLevel":
        raise UnsupportedError(f"{path / 'tokenizer.json'}: a {kind} tokenizer with a {decoder} decoder is not a "
                               "byte-level BPE, SentencePiece or byte-fallback BPE tokenizer llama.cpp can load")
    try:
        bpe = gguf.BpeVocab(path)
    except (ValueError, KeyError) as e:
        raise ModelDirError(f"{path / 'tokenizer.json'}: unusable BPE vocabulary ({e})") from e
    tokens, toktypes = [], []
    for text, _score, toktype in bpe.all_tokens():
        tokens.append(text)
        toktypes.append(int(toktype))
    _mark_added_tokens(tok, tokens, toktypes)
    pre, note = choose_pre_tokenizer(tok)
    vocab = GgufVocab("gpt2", pre, tokens, toktypes, None, source="tokenizer.json")
    if note:
        vocab.notes.append(note)
        logger.warning(note)
    return vocab


def _mark_added_tokens(tok: dict[str, Any], tokens: list, toktypes: list[int]) -> None:
    """Added tokens flagged ``special`` are CONTROL (never produced from text), others USER_DEFINED.

    BpeVocab types an added token that is also in the base vocabulary as
    NORMAL, which would let llama.cpp treat ``<s>`` as ordinary text.
    """
    for added in tok.get("added_tokens") or []:
        tid = added.get("id")
        if isinstance(tid, int) and 0 <= tid < len(tokens):
            special = bool(added.get("special"))
            toktypes[tid] = int(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)


def choose_pre_tokenizer(tok: dict[str, Any]) -> tuple[str, str | None]:
    """llama.cpp's name for the pre-tokenizer of a byte-level BPE ``tokenizer.json``.

    Returns ``(name, warning)``; the warning is ``None`` when the structure is
    one llama.cpp implements exactly.

    Example: a lone ``ByteLevel`` pre-tokenizer with ``use_regex`` -> ``("gpt-2", None)``.
    """
    pre = tok.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        if steps[0].get("add_prefix_space"):
            return "gpt-2", ("tokenizer.json: the ByteLevel pre-tokenizer adds a prefix space, which llama.cpp's "
                             "gpt-2 pre-tokenizer does not; text that starts without a space may tokenize differently")
        return "gpt-2", None
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        split = steps[0]
        regex = (split.get("pattern") or {}).get("Regex")
        name = KNOWN_SPLIT_REGEXES.get(regex)
        if name and split.get("behavior") == "Isolated" and not split.get("invert"):
            return name, None
    found = "+".join(str(k) for k in kinds) or "none"
    return DEFAULT_PRE, (f"tokenizer.json: pre-tokenizer {found} is not one llama.cpp implements exactly "
                         f"(known: ByteLevel, or Split by the GPT-2, Llama 3 or Qwen2 regex then ByteLevel); "
                         f"using llama.cpp's '{DEFAULT_PRE}' pre-tokenizer, so some text may tokenize differently")


def _sentencepiece_vocab(path: Path) -> GgufVocab:
    try:
        import sentencepiece  # noqa: F401
    except ImportError as e:
        raise UnsupportedError(f"{path / 'tokenizer.model'}: reading a SentencePiece tokenizer needs the "
                               "sentencepiece package", hint="pip install sentencepiece protobuf") from e
    try:
        spm = gguf.SentencePieceVocab(path)
    except (RuntimeError, ValueError, OSError) as e:
        raise ModelDirError(f"{path / 'tokenizer.model'}: unusable SentencePiece model ({e})") from e
    tokens, scores, toktypes = [], [], []
    for text, score, toktype in spm.all_tokens():
        tokens.append(text)
        scores.append(float(score))
        toktypes.append(int(toktype))
    _mark_config_added_tokens(path, tokens, toktypes, scores)
    vocab = GgufVocab("llama", DEFAULT_PRE, tokens, toktypes, scores,
                      source="tokenizer.model")
    vocab.add_space_prefix = _spm_adds_dummy_prefix(path / "tokenizer.model")
    return vocab


def _mark_config_added_tokens(path: Path, tokens: list, toktypes: list[int], scores: list[float]) -> None:
    """Tokens that ``tokenizer_config.json`` adds over a SentencePiece model (ids inside its range)."""
    file = path / "tokenizer_config.json"
    if not file.is_file():
        return
    try:  # the checked reader (depth-limited); an unreadable file only means: no added tokens to mark
        decoder = read_json(file).get("added_tokens_decoder") or {}
    except (BoraError, AttributeError):
        return
    for tid_text, data in decoder.items():
        if not (str(tid_text).isdigit() and isinstance(data, dict) and isinstance(data.get("content"), str)):
            continue
        tid = int(tid_text)
        if tid < len(tokens) and toktypes[tid] != int(gguf.TokenType.CONTROL):
            tokens[tid] = data["content"].encode("utf-8")
            toktypes[tid] = int(gguf.TokenType.CONTROL if data.get("special") else gguf.TokenType.USER_DEFINED)
            scores[tid] = PAD_SCORE


def _spm_adds_dummy_prefix(model_file: Path) -> bool | None:
    """SentencePiece's ``add_dummy_prefix`` (llama.cpp's ``add_space_prefix``), if protobuf can read it."""
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError:  # older sentencepiece: llama.cpp's default (true) applies
        return None
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    return bool(proto.normalizer_spec.add_dummy_prefix)


def _llama_hf_vocab(path: Path) -> GgufVocab:
    try:
        hf = gguf.LlamaHfVocab(path)
    except (OSError, ValueError, TypeError) as e:
        raise ModelDirError(f"{path / 'tokenizer.json'}: unusable byte-fallback BPE tokenizer ({e})") from e
    tokens, scores, toktypes = [], [], []
    for text, _score, toktype in hf.all_tokens():
        tokens.append(text)
        toktypes.append(int(toktype))
        # LlamaHfVocab gives every token -1000; llama.cpp's SentencePiece tokenizer
        # merges by score, and a byte-fallback BPE's ids follow its merge order.
        scores.append(-float(len(scores)) if toktype == gguf.TokenType.NORMAL else 0.0)
    return GgufVocab("llama", DEFAULT_PRE, tokens, toktypes, scores,
                     source="tokenizer.json (byte-fallback BPE)")


def _check_ids(path: Path, vocab: GgufVocab, tok_json: dict[str, Any] | None, vocab_size: int) -> None:
    if len(vocab.tokens) > vocab_size:
        raise ModelDirError(f"{path}: the tokenizer has {len(vocab.tokens)} tokens but config.json's vocab_size is "
                            f"{vocab_size}: the embedding has no row for the extra tokens")
    for added in (tok_json or {}).get("added_tokens") or []:
        tid = added.get("id")
        if isinstance(tid, int) and tid >= len(vocab.tokens):
            raise ModelDirError(f"{path / 'tokenizer.json'}: added token {added.get('content')!r} has id {tid}, "
                                f"beyond the {len(vocab.tokens)} tokens read from {vocab.source}")


def _pad(vocab: GgufVocab, vocab_size: int) -> None:
    """Append unique unused tokens up to ``vocab_size`` (llama.cpp needs one token per embedding row)."""
    seen = {t.decode("utf-8", "replace") if isinstance(t, bytes) else t for t in vocab.tokens}
    as_bytes = vocab.model == "llama"
    i = 0
    while len(vocab.tokens) < vocab_size:
        i += 1
        text = f"[PAD{i}]"
        if text in seen:
            continue
        vocab.tokens.append(text.encode("utf-8") if as_bytes else text)
        vocab.toktypes.append(int(gguf.TokenType.UNUSED))
        if vocab.scores is not None:
            vocab.scores.append(PAD_SCORE)
        vocab.padded += 1
