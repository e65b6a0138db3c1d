"""``push``: the Hugging Face Hub. What a path holds (``sources``), its model card (``card``, ``card_text``),
and the upload (``push``)."""

from bora_tools.hub.card import build_model_card
from bora_tools.hub.push import push

__all__ = ["build_model_card", "push"]
