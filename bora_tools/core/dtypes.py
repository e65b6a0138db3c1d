"""Output dtypes and the one place where a float tensor is rounded to a narrower type."""

from __future__ import annotations

import math

import torch

from bora_tools.errors import UnsupportedError, ValidationError

#: The float dtypes a user names (``dtype="bfloat16"``) -> torch dtypes. The one user-facing dtype table;
#: the on-disk names (``F32``, ``BF16``, ...) are ``io.safetensors.ST_DTYPES``.
FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_dtype(name: str, *, allow_auto: bool = False) -> torch.dtype | None:
    """The torch dtype a user named; ``None`` for ``auto`` (keep the input's) when ``allow_auto``.

    Example: ``parse_dtype("bfloat16")`` -> ``torch.bfloat16``.

    Raises:
        ValidationError: a name outside ``FLOAT_DTYPES`` (or ``auto`` where it is not allowed).
    """
    if allow_auto and name == "auto":
        return None
    if name not in FLOAT_DTYPES:
        names = (["auto"] if allow_auto else []) + list(FLOAT_DTYPES)
        raise ValidationError(f"`dtype` {name!r}: expected one of {', '.join(names)}")
    return FLOAT_DTYPES[name]


def cast_finite(t: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    """``t`` rounded to ``dtype``, refusing values that become infinite (float16 overflow).

    A finite input that the cast turns into ``inf`` is the only failure: the
    message names the tensor, the largest magnitude and the dtype.

    Example: ``cast_finite(torch.tensor([7e4]), torch.float16, "lm_head.weight")`` raises
    ``UnsupportedError("lm_head.weight: a value (7e+04) overflows float16 ...")``.
    """
    out = t.to(dtype)
    # The sum is a cheap gate (an infinite element makes it inf or NaN; isfinite().all() costs
    # 10x more on the CPU): the exact check below runs only when it trips.
    if out.is_floating_point() and t.is_floating_point() and not math.isfinite(float(out.sum())):
        newly = torch.isfinite(t) & ~torch.isfinite(out)
        if bool(newly.any()):
            biggest = float(t[newly].abs().max())
            dtype_name = str(dtype).replace("torch.", "")
            raise UnsupportedError(f"{name}: a value ({biggest:.3g}) overflows {dtype_name}",
                                   hint="use float32 or bfloat16")
    return out
