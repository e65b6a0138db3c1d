"""Measure what llama.cpp's own quantizer reaches, per type, as ``verify`` measures it: mean KL(reference || GGUF).

For every family of tests/families.py, the demo's tiny llama and a llama whose rows are multiples of 256 (so
that the k-quants apply without fallbacks): a randomised BoRA adapter (std 0.1, r=4, b=2), merged and
quantized by ``export-gguf --merge --outtype TYPE`` (llama.cpp's quantizer), run in llama.cpp on verify's
built-in prompts (64 tokens), against the BoRA model in transformers (float32). Prints a markdown table of
the mean KL per type and model, the worst per type, and the bound ``verify`` states (``KL_BOUNDS``: twice the
worst, rounded up to two significant digits). Never imported by the package or the tests.

Usage (about 15 minutes on 2 cores):

    python scripts/verify_kl_bounds.py --workdir /tmp/kl-bounds
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from families import FAMILIES, build_family_dir, targets  # noqa: E402

from bora_tools.core.config import BoraConfig  # noqa: E402
from bora_tools.demo.tiny import build_model, default_targets, save_model_dir  # noqa: E402
from bora_tools.gguf.export import export_gguf  # noqa: E402
from bora_tools.gguf.outtypes import QUANTIZER_OUTTYPES  # noqa: E402
from bora_tools.training import add_bora, randomize_bora, save_bora  # noqa: E402
from bora_tools.verification.engines import _llama_logits  # noqa: E402
from bora_tools.verification.measures import kl_divergence  # noqa: E402
from bora_tools.verification.reference import read_prompts, reference_logits, tokenize  # noqa: E402

TYPES = ["q8_0", *QUANTIZER_OUTTYPES]


def models(root: Path):
    """(name, base dir, adapter dir) for every model measured."""
    from transformers import AutoModelForCausalLM

    for family in FAMILIES:
        base = build_family_dir(root / family / "base", family)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        add_bora(model, BoraConfig(r=4, bora_blocks=2, lora_alpha=8, target_modules=targets(family)))
        randomize_bora(model, seed=1)
        yield family, base, save_bora(model, root / family / "adapter")
    for name, shape in (("llama", {}), ("llama-256", dict(hidden=256, intermediate=512, heads=4, kv_heads=2))):
        model = build_model("llama", **shape)
        base = save_model_dir(model, root / name / "base")
        add_bora(model, BoraConfig(r=4, bora_blocks=2, lora_alpha=8, target_modules=default_targets("llama")))
        randomize_bora(model, seed=1)
        yield name, base, save_bora(model, root / name / "adapter")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, required=True)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, float]] = {}
    for name, base, adapter in models(args.workdir):
        texts, source = read_prompts(None)
        prompts = tokenize(base, texts, tokens=64, source=source)
        refs, _ = reference_logits(adapter, base, prompts, dtype=torch.float32, device=torch.device("cpu"))
        for outtype in TYPES:
            out = args.workdir / name / f"merged-{outtype}.gguf"
            export_gguf(adapter, out, base=base, merge=True, outtype=outtype, threads=2, overwrite=True)
            outs = _llama_logits(out, prompts, lora=None)
            kl = float(sum(kl_divergence(r, o).sum() for r, o in zip(refs, outs)) / sum(len(r) for r in refs))
            results.setdefault(outtype, {})[name] = kl
            out.unlink()
            print(f"{name} {outtype}: mean KL {kl:.3e}", flush=True)
    (args.workdir / "results.json").write_text(json.dumps(results, indent=2))
    names = list(next(iter(results.values())))
    print("| type | " + " | ".join(names) + " | worst | bound |")
    print("|---" * (len(names) + 3) + "|")
    for outtype, row in results.items():
        worst = max(row.values())
        print(f"| {outtype} | " + " | ".join(f"{row[n]:.2g}" for n in names) + f" | {worst:.2g} | "
              f"{round_up(2 * worst):.2g} |")


def round_up(x: float) -> float:
    """``x`` rounded up to two significant digits."""
    scale = 10 ** (math.floor(math.log10(x)) - 1)
    return math.ceil(x / scale) * scale


if __name__ == "__main__":
    main()
