"""verify passes every untouched output kind of every family in tests/families.py.

Per family: a tiny random model, a randomised BoRA adapter on its projections, and what bora-tools makes from
them: the merged model directory, the exact and a truncated PEFT LoRA, the merged model as f32 and q8_0 GGUF,
and a GGUF LoRA on the base GGUF. Each is run where it will run and must pass its type's tolerance.
"""

from __future__ import annotations

import pytest
import torch
from families import FAMILIES, build_family_dir, targets
from gguf_support import needs_llama_cpp

from bora_tools.conversion import to_lora
from bora_tools.core.config import BoraConfig
from bora_tools.gguf.export import export_gguf
from bora_tools.merge import merge_adapter
from bora_tools.training import add_bora, randomize_bora, save_bora
from bora_tools.verification import verify

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=list(FAMILIES))
def case(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    family = request.param
    root = tmp_path_factory.mktemp(f"verify-{family}")
    base = build_family_dir(root / "base", family)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    add_bora(model, BoraConfig(r=4, bora_blocks=2, lora_alpha=8, target_modules=targets(family)))
    randomize_bora(model, seed=1)
    adapter = save_bora(model, root / "adapter")
    return {"family": family, "root": root, "base": base, "adapter": adapter}


def make(case, kind: str):
    """The output of ``kind`` made from the case's adapter, and verify's extra arguments for it."""
    root, adapter, base = case["root"], case["adapter"], case["base"]
    out = root / kind
    if kind == "merged":
        merge_adapter(adapter, base, out)
    elif kind == "lora":
        to_lora(adapter, out, rank="full")
    elif kind == "lora-truncated":
        to_lora(adapter, out, rank=4)
    elif kind in ("gguf-f32", "gguf-q8_0"):
        out = root / f"{kind}.gguf"
        export_gguf(adapter, out, base=base, merge=True, outtype=kind.removeprefix("gguf-"))
    else:  # gguf-lora
        out, base_gguf = root / "lora.gguf", root / "base.gguf"
        export_gguf(base, base_gguf, outtype="f32")
        export_gguf(adapter, out, base=base, outtype="f32")
        return out, {"base_gguf": base_gguf}
    return out, {}


@pytest.mark.parametrize("kind", ["merged", "lora", "lora-truncated",
                                  pytest.param("gguf-f32", marks=needs_llama_cpp),
                                  pytest.param("gguf-q8_0", marks=needs_llama_cpp),
                                  pytest.param("gguf-lora", marks=needs_llama_cpp)])
def test_untouched_output_passes(case, kind):
    out, extra = make(case, kind)
    report = verify(out, case["adapter"], base=case["base"], tokens=32, **extra)
    print(f"{case['family']} {kind}: {report.tolerance.measure} {report.overall[report.tolerance.measure]:.3g} "
          f"(bound {report.tolerance.bound:.3g}), effect {report.effect:.3g}")
    assert report.passed, report.to_text()
    assert report.effect > 0.05  # the adapter moves the logits: a damaged output could not pass by luck
