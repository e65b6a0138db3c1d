"""The one table of ``export-gguf --outtype`` names; light to import (the CLI lists it in its help).

Two producers share it:

- our streaming writer (``bora_tools.gguf.writer``) writes f32, f16, bf16 and
  q8_0 itself, bit for bit as llama.cpp's tools do;
- llama.cpp's own quantizer (``llama_model_quantize`` in ``llama-cpp-python``,
  ``bora_tools.gguf.quantize``) makes the k-quants and the legacy quants from
  an intermediate GGUF our writer produces.

Names are llama.cpp's, in lower case, as its ``llama-quantize`` spells them.
Types llama.cpp makes only with an importance matrix (or whose recipe is
designed for one: the IQ types and q2_k_s) are listed so that asking for them
gets a reason, not "unknown name".
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class OutType:
    """One ``--outtype``: its ``general.file_type`` and who produces it."""

    file_type: str  # member of gguf.LlamaFileType; llama_cpp.LLAMA_FTYPE_<file_type> is the same constant
    tensor: str | None = None  # our writer's GGUF tensor type for the weight matrices; None: llama.cpp quantizes
    imatrix: bool = False  # needs an importance matrix: refused

    @property
    def quantizer(self) -> bool:
        """Whether llama.cpp's quantizer (``llama-cpp-python``) makes this type."""
        return self.tensor is None


def _quant(file_type: str) -> OutType:
    return OutType(file_type)


def _imatrix(file_type: str) -> OutType:
    return OutType(file_type, imatrix=True)


OUTTYPES: dict[str, OutType] = {
    # our writer
    "f32": OutType("ALL_F32", "F32"),
    "f16": OutType("MOSTLY_F16", "F16"),
    "bf16": OutType("MOSTLY_BF16", "BF16"),
    "q8_0": OutType("MOSTLY_Q8_0", "Q8_0"),
    # llama.cpp's quantizer, no importance matrix needed
    "q4_0": _quant("MOSTLY_Q4_0"),
    "q4_1": _quant("MOSTLY_Q4_1"),
    "q5_0": _quant("MOSTLY_Q5_0"),
    "q5_1": _quant("MOSTLY_Q5_1"),
    "q2_k": _quant("MOSTLY_Q2_K"),
    "q3_k_s": _quant("MOSTLY_Q3_K_S"),
    "q3_k_m": _quant("MOSTLY_Q3_K_M"),
    "q3_k_l": _quant("MOSTLY_Q3_K_L"),
    "q4_k_s": _quant("MOSTLY_Q4_K_S"),
    "q4_k_m": _quant("MOSTLY_Q4_K_M"),
    "q5_k_s": _quant("MOSTLY_Q5_K_S"),
    "q5_k_m": _quant("MOSTLY_Q5_K_M"),
    "q6_k": _quant("MOSTLY_Q6_K"),
    # refused: made with an importance matrix (llama.cpp's llama-imatrix), which export-gguf does not compute
    "q2_k_s": _imatrix("MOSTLY_Q2_K_S"),
    "iq1_s": _imatrix("MOSTLY_IQ1_S"),
    "iq1_m": _imatrix("MOSTLY_IQ1_M"),
    "iq2_xxs": _imatrix("MOSTLY_IQ2_XXS"),
    "iq2_xs": _imatrix("MOSTLY_IQ2_XS"),
    "iq2_s": _imatrix("MOSTLY_IQ2_S"),
    "iq2_m": _imatrix("MOSTLY_IQ2_M"),
    "iq3_xxs": _imatrix("MOSTLY_IQ3_XXS"),
    "iq3_xs": _imatrix("MOSTLY_IQ3_XS"),
    "iq3_s": _imatrix("MOSTLY_IQ3_S"),
    "iq3_m": _imatrix("MOSTLY_IQ3_M"),
    "iq4_nl": _imatrix("MOSTLY_IQ4_NL"),
    "iq4_xs": _imatrix("MOSTLY_IQ4_XS"),
}

#: Written by our own writer (also the only types of a GGUF LoRA adapter).
WRITER_OUTTYPES = tuple(n for n, t in OUTTYPES.items() if not t.quantizer)
#: Made by llama.cpp's quantizer from an intermediate GGUF (full models only).
QUANTIZER_OUTTYPES = tuple(n for n, t in OUTTYPES.items() if t.quantizer and not t.imatrix)
#: Refused: they need an importance matrix.
IMATRIX_OUTTYPES = tuple(n for n, t in OUTTYPES.items() if t.imatrix)
