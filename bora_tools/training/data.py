"""Supervised fine-tuning data: JSONL records, checked line by line, tokenized with completion-only labels.

One JSON object per line, in one of these shapes (blank lines are skipped):

- ``{"text": "..."}``: language modelling, loss on every token;
- ``{"prompt": "...", "completion": "..."}``: loss on the completion only;
- ``{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}``:
  rendered with the tokenizer's chat template, loss on the assistant turns only;
- ``{"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}]}`` (ShareGPT;
  ``from`` is ``system``, ``human`` or ``gpt``): read as ``messages`` with roles system, user, assistant;
- ``{"prompt": [messages], "completion": [messages]}`` (TRL's conversational prompt/completion): the
  conversation rendered whole, loss on the assistant turns of the completion only.

Other keys are ignored. Texts and completions end with the tokenizer's EOS token,
so the model learns to stop. Pieces are tokenized as generation sees them: the
prompt (or the conversation so far) alone, then what the model must write.
Each text (a message's content) is cut before tokenizing at ``char_budget`` characters,
far more than ``max_length`` tokens can hold, and a chat is rendered only as far as
``max_length`` tokens reach: a 20 MB line or a chat of thousands of turns costs what
its first ``max_length`` tokens cost.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bora_tools.errors import UnsupportedError, ValidationError, raise_if_problems

IGNORE_INDEX = -100  # labels the loss skips (transformers' convention)
SHAPES = '"text", "prompt" and "completion", "messages", or "conversations"'
#: ShareGPT's speakers -> chat roles
SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant"}
#: the largest record (line) read, in bytes
MAX_RECORD_BYTES = 64 << 20
MAX_LISTED = 5  # problems listed in one error line; the rest are counted


@dataclass
class Record:
    """One training example as read from the file: its line number, its kind and its fields."""

    line: int
    kind: str  # "text", "prompt" or "messages" (ShareGPT and conversational prompt/completion too)
    fields: dict[str, Any]


@dataclass
class TokenStats:
    """What tokenization produced."""

    examples: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    truncated: int = 0
    dropped: list[int] = field(default_factory=list)  # line numbers left without any loss token
    kinds: dict[str, int] = field(default_factory=dict)


def read_records(path: str | Path) -> list[Record]:
    """Read and check every line of a JSONL file.

    Raises:
        ValidationError: the file cannot be read, holds no record, or records of the wrong
            shape (the first few named by line number, the rest counted).
    """
    path = Path(path)
    try:
        lines = path.read_bytes().decode("utf-8").split("\n")  # JSONL: records end at \n only (not U+2028...)
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else " ".join(str(e).split())
        raise ValidationError(f"`data` {path}: cannot be read ({why})") from None
    records, problems = [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"line {number}: not valid JSON ({e.msg} at column {e.colno})")
            continue
        record, problem = _record(number, value)
        if problem:
            problems.append(f"line {number}: {problem}")
        else:
            records.append(record)
    if len(problems) > MAX_LISTED:
        problems = problems[:MAX_LISTED] + [f"and {len(problems) - MAX_LISTED} more bad line(s)"]
    raise_if_problems(f"`data` {path}", problems)
    if not records:
        raise ValidationError(f"`data` {path}: no records (expected one JSON object per line with {SHAPES})")
    return records


def _record(number: int, value: Any) -> tuple[Record | None, str | None]:
    if not isinstance(value, dict):
        return None, f"expected a JSON object with {SHAPES}, found {type(value).__name__}"
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:  # JSON's "\ud800" escape decodes to a lone surrogate: no text holds one
        return None, f"holds a lone surrogate (U+{ord(e.object[e.start]):04X}), which is not text"
    present = [k for k in ("text", "prompt", "completion", "messages", "conversations") if k in value]
    if present == ["text"]:
        return _strings(number, "text", value, ["text"])
    if present == ["prompt", "completion"] and isinstance(value["prompt"], list):
        return _conversational(number, value["prompt"], value["completion"])
    if present == ["prompt", "completion"]:
        return _strings(number, "prompt", value, ["prompt", "completion"])
    if present == ["messages"]:
        return _messages(number, value["messages"])
    if present == ["conversations"]:
        return _sharegpt(number, value["conversations"])
    if not present:
        return None, f"expected {SHAPES}, found keys {', '.join(map(repr, value)) or 'none'}"
    if present in (["prompt"], ["completion"]):
        return None, f"{present[0]!r} without {'completion' if present == ['prompt'] else 'prompt'!r}"
    return None, f"holds {', '.join(map(repr, present))}: a record is one of {SHAPES}"


def _strings(number: int, kind: str, value: dict, keys: list[str]) -> tuple[Record | None, str | None]:
    for key in keys:
        if not isinstance(value[key], str):
            return None, f"{key!r}: expected a string, found {type(value[key]).__name__}"
    learnt = keys[-1]
    if not value[learnt].strip():
        return None, f"{learnt!r} is empty: nothing to learn"
    return Record(number, kind, {k: value[k] for k in keys}), None


def _messages(number: int, messages: Any) -> tuple[Record | None, str | None]:
    if not isinstance(messages, list) or not messages:
        return None, "'messages': expected a non-empty list of {\"role\": ..., \"content\": ...} objects"
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            return None, f"'messages'[{i}]: expected an object with string \"role\" and \"content\""
    if not any(m["role"] == "assistant" for m in messages):
        return None, "'messages' has no \"assistant\" turn: nothing to learn"
    kept = [{"role": m["role"], "content": m["content"]} for m in messages]
    return Record(number, "messages", {"messages": kept}), None


def _sharegpt(number: int, turns: Any) -> tuple[Record | None, str | None]:
    """ShareGPT's ``conversations`` (``from``/``value``) as chat messages."""
    if not isinstance(turns, list) or not turns:
        return None, "'conversations': expected a non-empty list of {\"from\": ..., \"value\": ...} objects"
    messages = []
    for i, t in enumerate(turns):
        if not (isinstance(t, dict) and isinstance(t.get("from"), str) and isinstance(t.get("value"), str)):
            return None, f"'conversations'[{i}]: expected an object with string \"from\" and \"value\""
        if t["from"] not in SHAREGPT_ROLES:
            return None, f"'conversations'[{i}]: \"from\" {t['from']!r} is not one of {', '.join(SHAREGPT_ROLES)}"
        messages.append({"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]})
    if not any(m["role"] == "assistant" for m in messages):
        return None, "'conversations' has no \"gpt\" turn: nothing to learn"
    return Record(number, "messages", {"messages": messages}), None


def _conversational(number: int, prompt: list, completion: Any) -> tuple[Record | None, str | None]:
    """TRL's conversational prompt/completion: one chat, loss on the assistant turns of the completion."""
    if not isinstance(completion, list):
        return None, f"'prompt' is a list of messages, 'completion' must be one too, found {type(completion).__name__}"
    record, problem = _messages(number, [*prompt, *completion])
    if problem:
        return None, problem.replace("'messages'", "'prompt' + 'completion'")
    if not prompt or not any(isinstance(m, dict) and m.get("role") == "assistant" for m in completion):
        return None, "'completion' has no \"assistant\" turn (or 'prompt' is empty): nothing to learn"
    record.fields["learn_from"] = len(prompt)
    return record, None


def check_record_sizes(path: str | Path, *, limit: int | None = None) -> None:
    """Refuse a line over ``limit`` bytes (``MAX_RECORD_BYTES``) before it is read whole.

    The file is streamed; JSONL lines end at ``\\n``.

    Raises:
        ValidationError: naming the line and its size.
    """
    path, limit = Path(path), MAX_RECORD_BYTES if limit is None else limit
    number, size = 1, 0
    try:
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                *ended, rest = chunk.split(b"\n")
                for part in ended:
                    if size + len(part) > limit:
                        break
                    number, size = number + 1, 0
                else:
                    size += len(rest)
                    if size <= limit:
                        continue
                raise ValidationError(f"`data` {path}: line {number} is over {limit >> 20} MiB; a record is "
                                      f"bounded (its text is cut at `max_length` tokens anyway)",
                                      hint="split the text into several records")
    except OSError as e:
        raise ValidationError(f"`data` {path}: cannot be read ({e.strerror or e})") from None


def check_chat_template(records: list[Record], tokenizer, *, source: str) -> None:
    """Chat records need a tokenizer with a chat template."""
    chats = [r.line for r in records if r.kind == "messages"]
    if chats and not getattr(tokenizer, "chat_template", None):
        raise ValidationError(f"`data` line {chats[0]}: chat \"messages\" need a chat template, and the tokenizer "
                              f"of {source} has none", hint="give prompt/completion records instead")


def char_budget(tokenizer, max_length: int) -> int:
    """Characters kept of one text before tokenizing: ``max_length`` tokens of the tokenizer's longest
    vocabulary entry, twice over (at least 16 characters a token), so the cut never shortens what
    ``max_length`` keeps."""
    try:
        longest = max((len(t) for t in tokenizer.get_vocab()), default=16)
    except (AttributeError, NotImplementedError, TypeError):
        longest = 64
    return 2 * max_length * min(max(longest, 16), 1024)


def tokenize(records: list[Record], tokenizer, *, max_length: int) -> tuple[list[dict[str, list[int]]], TokenStats]:
    """``input_ids`` and ``labels`` (``-100`` where no loss is taken) per record, cut at ``max_length`` tokens.

    Records left without any loss token after the cut are dropped (and listed in the stats).

    Raises:
        ValidationError: the chat template refuses a conversation (its message and the record's line named).
    """
    eos = tokenizer.eos_token_id
    budget = char_budget(tokenizer, max_length)
    examples, stats = [], TokenStats()
    for rec in records:
        stats.kinds[rec.kind] = stats.kinds.get(rec.kind, 0) + 1
        ids: list[int] = []
        labels: list[int] = []
        for text, learn, special in _pieces(rec, tokenizer, budget):
            piece = tokenizer(text[:budget], add_special_tokens=special).input_ids
            ids += piece
            labels += piece if learn else [IGNORE_INDEX] * len(piece)
            if len(ids) > max_length:  # what follows would be cut: not rendered, not tokenized
                break
        if rec.kind != "messages" and eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
            labels.append(eos)
        if len(ids) > max_length:
            stats.truncated += 1
            ids, labels = ids[:max_length], labels[:max_length]
        learnt = sum(1 for t in labels[1:] if t != IGNORE_INDEX)  # the first label is never predicted
        if not learnt:
            stats.dropped.append(rec.line)
            continue
        examples.append({"input_ids": ids, "labels": labels})
        stats.examples += 1
        stats.tokens += len(ids)
        stats.loss_tokens += learnt
    return examples, stats


def _pieces(rec: Record, tokenizer, budget: int) -> Iterator[tuple[str, bool, bool]]:
    """``(text, learn, add_special_tokens)`` pieces of one record, in order."""
    f = rec.fields
    if rec.kind == "text":
        return iter([(f["text"], True, True)])
    if rec.kind == "prompt":
        return iter([(f["prompt"][:budget], False, True), (f["completion"][:budget], True, False)])
    return _chat_pieces(rec, tokenizer, budget)


def _chat_pieces(rec: Record, tokenizer, budget: int) -> Iterator[tuple[str, bool, bool]]:
    """The rendered conversation cut around each assistant turn (its end-of-turn marker included).

    A generator: the caller stops when ``max_length`` is reached, so a long chat renders only its
    first turns (rendering every prefix of all the turns would cost their square).
    """
    messages = [{**m, "content": m["content"][:budget]} for m in rec.fields["messages"]]
    learn_from = rec.fields.get("learn_from", 0)

    def render(msgs: list[dict], generation_prompt: bool) -> str:
        import jinja2

        try:
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)
        except (jinja2.TemplateError, ValueError, TypeError, KeyError, IndexError) as e:
            raise ValidationError(f"`data` line {rec.line}: the chat template refuses this conversation "
                                  f"({' '.join(str(e).split())[:200] or type(e).__name__})") from None

    full = render(messages, False)
    done = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i < learn_from:
            continue
        start = len(render(messages[:i], True)) if i else 0
        end_text = render(messages[: i + 1], False)
        if not full.startswith(end_text) or start < done or start > len(end_text):
            raise UnsupportedError(f"`data` line {rec.line}: the chat template does not render a conversation "
                                   f"as the sum of its turns, so the assistant turns cannot be located",
                                   hint="give prompt/completion records instead")
        yield from _nonempty((full[done:start], False, False), (full[start:len(end_text)], True, False))
        done = len(end_text)
    yield from _nonempty((full[done:], False, False))


def _nonempty(*pieces: tuple[str, bool, bool]) -> Iterator[tuple[str, bool, bool]]:
    return (p for p in pieces if p[0])


class Collator:
    """Pads a batch on the right: ``input_ids`` with the pad token, ``labels`` with ``-100``, and the attention mask."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, batch: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(ex["input_ids"]) for ex in batch)
        ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, ex in enumerate(batch):
            n = len(ex["input_ids"])
            ids[i, :n] = torch.tensor(ex["input_ids"])
            labels[i, :n] = torch.tensor(ex["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}
