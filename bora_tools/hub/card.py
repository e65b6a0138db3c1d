"""Model cards for ``bora-tools push``: the metadata of what a path holds (``hub.sources``).

The card's metadata
follows the Hub's model-card spec; ``base_model`` is only ever a Hub id, never
a local path. Cards are deterministic (no dates), so pushing the same
directory twice yields the same ``README.md`` and no new commit.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bora_tools.errors import ValidationError
from bora_tools.hub.sources import KINDS, Source, describe_source
from bora_tools.progress import logger

if TYPE_CHECKING:
    from huggingface_hub import ModelCard

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")
_HUB_URL = re.compile(r"^https://huggingface\.co/(?:models/)?([^/]+/[^/]+?)/?$")

def is_hub_model_id(value: Any) -> bool:
    """``value`` names a model on the Hub (``owner/name`` or its https://huggingface.co URL), not a local path.

    Example: ``is_hub_model_id("meta-llama/Llama-3.2-1B")`` -> True; ``is_hub_model_id("./base")`` -> False.
    """
    return _as_hub_id(value) is not None


def _as_hub_id(value: Any) -> str | None:
    if not value:
        return None
    text = str(value).strip()
    match = _HUB_URL.match(text)
    if match:
        text = match.group(1)
    local = os.path.isabs(text) or text.startswith((".", "/", "~")) or os.path.exists(text)
    return None if local or not _HUB_ID.match(text) else text


def hub_model_id(value: Any, *, what: str) -> str | None:
    """``value`` when it names a model on the Hub (``owner/name``), else ``None`` with a warning.

    Local paths never reach a card: absolute paths, paths starting with ``.`` or ``/``, anything that
    exists on disk and anything not of the form ``owner/name`` are dropped.

    Example: ``hub_model_id("meta-llama/Llama-3.2-1B", what="base model")`` -> ``"meta-llama/Llama-3.2-1B"``.
    """
    if not value:
        return None
    found = _as_hub_id(value)
    if found is None:
        logger.warning(f"{what} {str(value).strip()!r} is not a Hub model id (owner/name), so the model card "
                       "leaves base_model out (give the base model's Hub id with `base_model` to record it)")
    return found


def card_base_models(source: Source, *, base_model: str | None = None) -> list[str]:
    """The Hub ids a card may name as ``base_model``: ``base_model`` if given, else those the files name.

    Example: ``card_base_models(describe_source(Path("adapter")))`` -> ``["org/base-model"]``.
    """
    refs, what = ([base_model], "base model") if base_model is not None else (source.base_refs, source.base_from)
    ids: list[str] = []
    for ref in refs:
        ref_id = hub_model_id(ref, what=what)
        if ref_id and ref_id not in ids:
            ids.append(ref_id)
    return ids


def build_model_card(path: Path, *, repo_id: str | None = None, base_model: str | None = None) -> ModelCard:
    """A ``huggingface_hub.ModelCard`` describing what ``path`` holds and how to use it.

    ``base_model`` (a Hub id) replaces whatever the files say about their base model.

    Raises:
        ValidationError: ``base_model`` is not a Hub model id.

    Example::

        card = build_model_card(Path("out/adapter"), repo_id="me/my-bora")
        card.data.base_model_relation   # "adapter"
    """
    if base_model is not None and not is_hub_model_id(base_model):
        raise ValidationError(f"`base_model` {base_model!r} is not a Hub model id (owner/name)")
    source = describe_source(Path(path))
    title = (repo_id or Path(path).name).split("/")[-1]
    return render_card(source, title=title, repo_id=repo_id, base_model=base_model)


def render_card(source: Source, *, title: str, repo_id: str | None = None,
                base_model: str | None = None) -> ModelCard:
    """The card for an already described ``source`` (see ``build_model_card``)."""
    from huggingface_hub import ModelCard, ModelCardData

    from bora_tools.hub.card_text import card_body

    kind = KINDS[source.kind]
    bases = card_base_models(source, base_model=base_model)
    meta: dict[str, Any] = {"library_name": kind["library_name"], "tags": list(kind["tags"])}
    if bases:
        meta["base_model"] = bases[0] if len(bases) == 1 else bases
        meta["base_model_relation"] = source.relation or kind["relation"]
    pipeline = _pipeline_tag(source)
    if pipeline:
        meta["pipeline_tag"] = pipeline
    data = ModelCardData(**{k: v for k, v in meta.items() if v is not None})
    body = card_body(source, bases=bases, title=title, repo_id=repo_id)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def _pipeline_tag(source: Source) -> str | None:
    if source.details.get("task_type") == "CAUSAL_LM":
        return "text-generation"
    if any(str(a).endswith("ForCausalLM") for a in source.details.get("architectures", [])):
        return "text-generation"
    return None
