"""Output dtypes and the one place where a float tensor is rounded to a narrower type."""

from __future__ import annotations

import math

import torch

from bora_tools.choices import DTYPE_ALIASES
from bora_tools.errors import UnsupportedError, ValidationError

#: The float dtypes a user names (``dtype="bfloat16"``) -> torch dtypes. The one user-facing dtype table;
#: the on-disk names (``F32``, ``BF16``, ...) are ``io.safetensors.ST_DTYPES``.
FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def dtype_name(name: str, *, allow_auto: bool = False) -> str:
    """The canonical name (``float16``, ...) of a dtype a user spelled in any usual way; ``auto`` when allowed.

    Example: ``dtype_name("FP16")`` -> ``"float16"``; ``dtype_name("bf16")`` -> ``"bfloat16"``.

    Raises:
        ValidationError: an unknown name (or ``auto`` where it is not allowed).
    """
    key = str(name).strip().lower()
    if allow_auto and key == "auto":
        return "auto"
    if key not in DTYPE_ALIASES:
        names = (["auto"] if allow_auto else []) + ["float32 (fp32, f32)", "float16 (fp16, f16, half)",
                                                     "bfloat16 (bf16)"]
        raise ValidationError(f"`dtype` {name!r}: expected one of {', '.join(names)}")
    return DTYPE_ALIASES[key]


def parse_dtype(name: str, *, allow_auto: bool = False) -> torch.dtype | None:
    """The torch dtype a user named (any spelling of ``DTYPE_ALIASES``); ``None`` for ``auto`` (keep the
    input's) when ``allow_auto``.

    Example: ``parse_dtype("bfloat16")`` -> ``torch.bfloat16``; ``parse_dtype("fp16")`` -> ``torch.float16``.

    Raises:
        ValidationError: an unknown name (or ``auto`` where it is not allowed).
    """
    canonical = dtype_name(name, allow_auto=allow_auto)
    return None if canonical == "auto" else FLOAT_DTYPES[canonical]


def cast_finite(t: torch.Tensor, dtype: torch.dtype, name: str, *, strict: bool = False,
                hint: str | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``t`` rounded to ``dtype``, refusing values that the cast turns into ``inf`` (float16 overflow).

    ``out``, a tensor of ``t``'s shape and of ``dtype``, receives the result (a buffer reused across
    chunks); by default a new tensor does.

    A finite input that becomes infinite is refused, naming the tensor, the largest magnitude and the
    dtype. With ``strict`` every non-finite value is refused, including those ``t`` already held (a
    value computed here, such as a LoRA factor, must be finite; a base weight's own ``inf`` is carried
    over otherwise). ``hint`` replaces the default next step (``use `dtype` float32 or bfloat16``).

    Example: ``cast_finite(torch.tensor([7e4]), torch.float16, "lm_head.weight")`` raises
    ``UnsupportedError("lm_head.weight: a value (7e+04) overflows float16 ...")``.
    """
    out = t.to(dtype) if out is None else out.copy_(t)
    # The sum is a cheap gate (an infinite element makes it inf or NaN; isfinite().all() costs
    # 10x more on the CPU): the exact check below runs only when it trips.
    if out.is_floating_point() and t.is_floating_point() and not math.isfinite(float(out.sum())):
        dtype_name = str(dtype).replace("torch.", "")
        if strict and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise UnsupportedError(f"{name}: {bad} value(s) are not finite (the computation overflowed before the "
                                   f"cast to {dtype_name})", hint="check the adapter's scaling (lora_alpha / r)")
        newly = torch.isfinite(t) & ~torch.isfinite(out)
        if bool(newly.any()):
            biggest = float(t[newly].abs().max())
            if hint is None and dtype == torch.float16:
                hint = "use `dtype` float32 or bfloat16"
            raise UnsupportedError(f"{name}: a value ({biggest:.3g}) overflows {dtype_name} "
                                   f"(largest {torch.finfo(dtype).max:.4g})", hint=hint)
    return out


def check_finite_update(result: torch.Tensor, base: torch.Tensor, name: str, *, cause: str) -> None:
    """Refuse a merged ``result`` (``W + dW``) that is not finite where the base ``base`` was.

    ``cause`` says what multiplied the update (the scaling and ``scale``). The gate is one sum;
    the exact comparison runs only when it trips.

    Raises:
        UnsupportedError: naming the tensor, the number of values and ``cause``.
    """
    if math.isfinite(float(result.sum())):
        return
    bad = ~torch.isfinite(result) & torch.isfinite(base.to(result.device))
    count = int(bad.sum())
    if count:
        kind = str(result.dtype).replace("torch.", "")
        raise UnsupportedError(f"{name}: W + dW has {count} non-finite value(s): the update overflows {kind} "
                               f"({cause})", hint="check `scale` and the adapter's lora_alpha")
