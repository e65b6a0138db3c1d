"""What a ``config.json`` leaves out, taken from the transformers config class of its family.

transformers fills every key a checkpoint's ``config.json`` omits from the
defaults of the architecture's config class (``MixtralConfig``: ``rope_theta``
1e6; ``Gemma2Config``: soft-capping 50 / 30, ``head_dim`` 256; ...). The GGUF
must describe the model transformers runs, so ``effective_config`` fills the
same keys from the same class, instantiated once with its defaults: no default
is a constant of ours.

A default that transformers derives from other keys (``num_key_value_heads``
from ``num_attention_heads``, ``head_dim`` from ``hidden_size``, ``layer_types``
from ``num_hidden_layers``) is left out: the readers derive it from the model's
own sizes, as transformers does. Such keys are found by instantiating the class
again with other sizes and keeping only the values that did not move.

The rotary settings are merged entry by entry (``rope_parameters``, in
transformers 5's form): a config with a ``rope_type`` but no ``rope_theta``
gets the class's ``rope_theta``; Gemma 3's per-layer-type object gets the
class's entry for a layer type it omits (only ``sliding_attention`` given: the
``full_attention`` entry, ``rope_theta`` 1e6, is the class's).
"""

from __future__ import annotations

import copy
import functools
from typing import Any

#: Per-layer-type rotary objects (Gemma 3): ``rope_parameters`` keyed by these.
LAYER_TYPES = ("full_attention", "sliding_attention")
_ROPE_KEYS = ("rope_parameters", "rope_scaling", "rope_theta", "rope_local_base_freq")
#: Sizes changed together in each of the instances that reveal the derived defaults.
_SIZES = (("num_hidden_layers",), ("hidden_size",), ("num_attention_heads", "hidden_size"))


@functools.cache
def class_defaults(config_class: str) -> dict[str, Any]:
    """The defaults of transformers' ``config_class`` (``"MixtralConfig"``), without those derived from sizes.

    Example: ``class_defaults("MixtralConfig")["rope_parameters"]["rope_theta"]`` -> ``1000000.0``
    """
    import transformers

    cls = getattr(transformers, config_class)
    plain = cls().to_dict()
    # Instances with other sizes: what moves with them is derived, not a default.
    moved = [cls(**{key: 2 * plain[key] for key in keys}).to_dict() for keys in _SIZES]
    keep = {key: value for key, value in plain.items()
            if not key.startswith("_") and all(m.get(key) == value or key in keys for m, keys in zip(moved, _SIZES))}
    keep["rope_parameters"] = rope_object(plain)  # whatever form the installed transformers stores it in
    for key in _ROPE_KEYS[1:]:
        keep.pop(key, None)
    return keep


@functools.lru_cache(maxsize=64)
def class_layer_types(config_class: str, n_layer: int, pattern: int | None = None) -> tuple[str, ...] | None:
    """The ``layer_types`` transformers derives for ``n_layer`` layers (and Gemma 3's ``sliding_window_pattern``).

    None for a class without layer types. ``n_layer`` must be bounded first (the list has one entry a layer).

    Example: ``class_layer_types("Gemma2Config", 2)`` -> ``("sliding_attention", "full_attention")``
    """
    import transformers

    kwargs: dict[str, Any] = {"num_hidden_layers": n_layer}
    if pattern is not None:
        kwargs["sliding_window_pattern"] = pattern
    types = getattr(getattr(transformers, config_class)(**kwargs), "layer_types", None)
    return None if types is None else tuple(types)


def rope_object(config: dict[str, Any]) -> Any:
    """The rotary settings of ``config`` as one ``rope_parameters`` object, None when it has none.

    transformers 4's form (top-level ``rope_theta``, scaling in ``rope_scaling``,
    Gemma 3's ``rope_local_base_freq`` for its sliding layers) is turned into
    transformers 5's, with transformers' precedence: a non-empty ``rope_scaling``
    replaces ``rope_parameters`` (on Gemma 3's per-layer-type object, it updates the
    full-attention entry); a top-level ``rope_theta`` or ``partial_rotary_factor`` only
    fills an entry that has none. A value that is not an object is returned as is (the reader refuses it).

    Example: ``rope_object({"rope_theta": 5e5})`` -> ``{"rope_theta": 500000.0}``
    """
    if all(config.get(key) is None for key in (*_ROPE_KEYS, "partial_rotary_factor")):
        return None
    params = copy.deepcopy(config.get("rope_parameters") or {})
    legacy = copy.deepcopy(config.get("rope_scaling"))
    if legacy and isinstance(params, dict) and per_layer_type(params) and isinstance(legacy, dict):
        params["full_attention"] = {**(params.get("full_attention") or {}), **legacy}
    elif legacy:
        params = legacy
    if not isinstance(params, dict):
        return params
    if config.get("rope_local_base_freq") is not None and not per_layer_type(params):  # Gemma 3, transformers 4
        params = {"full_attention": params, "sliding_attention": {"rope_type": "default"}}
    full = params.get("full_attention") if per_layer_type(params) else params
    if isinstance(full, dict):
        for key in ("rope_theta", "partial_rotary_factor"):  # Phi-3 keeps partial_rotary_factor at the top
            if full.get(key) is None and config.get(key) is not None:
                full[key] = config[key]
    local = params.get("sliding_attention")
    if isinstance(local, dict) and local.get("rope_theta") is None and config.get("rope_local_base_freq") is not None:
        local["rope_theta"] = config["rope_local_base_freq"]
    return params


def per_layer_type(params: Any) -> bool:
    """Whether ``params`` is a per-layer-type rotary object (``{"full_attention": {...}, ...}``)."""
    return isinstance(params, dict) and any(isinstance(params.get(t), dict) for t in LAYER_TYPES)


def merge_rope(given: Any, default: Any) -> Any:
    """``given`` (a ``rope_parameters`` object or None) completed with ``default`` (the class's).

    Only ``rope_theta`` and ``partial_rotary_factor`` are taken into an entry ``given`` has: transformers
    sets those two by default whatever the rotary type; its scaling parameters stay the entry's own.

    Example: ``merge_rope({"rope_type": "linear", "factor": 8.0}, {"rope_type": "default", "rope_theta": 1e6})``
    -> ``{"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}``
    """
    if given is None:
        return copy.deepcopy(default)
    if not isinstance(given, dict) or not isinstance(default, dict):
        return given
    if per_layer_type(default):
        out = dict(given) if per_layer_type(given) else {"full_attention": dict(given)}
        for layer_type, entry in default.items():
            if out.get(layer_type) is None:
                out[layer_type] = copy.deepcopy(entry)
            else:
                out[layer_type] = _with_theta(out[layer_type], entry)
        return out
    if per_layer_type(given):
        return {key: _with_theta(entry, default) for key, entry in given.items()}
    return _with_theta(given, default)


def _with_theta(entry: Any, default: Any) -> Any:
    """``entry`` with the class's ``rope_theta`` and ``partial_rotary_factor`` where it has none (never its type)."""
    if not isinstance(entry, dict) or not isinstance(default, dict):
        return entry
    missing = {k: default[k] for k in ("rope_theta", "partial_rotary_factor")
               if entry.get(k) is None and default.get(k) is not None}
    return {**entry, **missing}


def effective_config(config: dict[str, Any], config_class: str) -> dict[str, Any]:
    """``config`` as transformers reads it with ``config_class``: every key it omits filled from the class.

    The rotary settings come out as one ``rope_parameters`` object (``rope_theta`` and
    ``rope_scaling`` removed), merged with the class's by ``merge_rope``.

    Example: ``effective_config({"hidden_size": 64}, "MixtralConfig")["rope_parameters"]["rope_theta"]``
    -> ``1000000.0``
    """
    defaults = class_defaults(config_class)
    out = {key: copy.deepcopy(value) for key, value in defaults.items() if key not in _ROPE_KEYS}
    out.update({key: value for key, value in config.items() if key not in _ROPE_KEYS})
    out["rope_parameters"] = merge_rope(rope_object(config), defaults.get("rope_parameters"))
    return out
