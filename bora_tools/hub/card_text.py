"""The Markdown body of the model cards ``bora-tools push`` writes (metadata: ``hub/card.py``).

One function per kind of source. Each tells a reader what the files are and how to
use them (the PEFT snippet, the llama.cpp command), and nothing else: how the files
were made only where they say so themselves (a BoRA adapter; a merge, which records
its base as ``base_model_name_or_path`` or is tagged ``bora``/``merged`` in a GGUF),
never for an ordinary model, LoRA adapter or GGUF. Nothing here depends on time or
machine, so the same source always gives the same text.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bora_tools.hub.sources import Source

PAPER = "[arXiv 2508.06953](https://arxiv.org/abs/2508.06953)"


def card_body(source: Source, *, bases: list[str], title: str, repo_id: str | None) -> str:
    """The Markdown that follows the card's YAML header; ``bases`` are Hub ids, checked by the caller."""
    ctx = {"repo": repo_id or "OWNER/NAME", "base": bases[0] if bases else None}
    writer = {"bora": _bora, "lora": _lora, "peft": _lora, "model": _model, "gguf-model": _gguf_model,
              "gguf-lora": _gguf_lora}.get(source.kind, _unknown)
    parts = [f"# {title}", *writer(source.details, ctx)]
    parts.append("Published with `bora-tools push`.")
    return "\n\n".join(parts) + "\n"


def _base_link(ctx: dict[str, Any]) -> str:
    base = ctx["base"]
    return f"[`{base}`](https://huggingface.co/{base})" if base else "its base model (not recorded in the files)"


def _table(rows: list[tuple[str, Any]]) -> str:
    lines = ["| parameter | value |", "|---|---|"]
    lines += [f"| {name} | {_fmt(value)} |" for name, value in rows if value not in (None, "", [], {})]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return ", ".join(f"`{v}`" for v in value)
    if isinstance(value, dict):
        return ", ".join(f"`{k}`: {v}" for k, v in sorted(value.items()))
    if isinstance(value, str) and value.isidentifier():
        return f"`{value}`"
    return str(value)


def _scaling(d: dict[str, Any]) -> str | None:
    r, alpha = d.get("r"), d.get("lora_alpha", d.get("r"))
    if not isinstance(r, (int, float)) or not isinstance(alpha, (int, float)) or r <= 0:
        return None
    if d.get("use_rslora"):
        return f"`lora_alpha / sqrt(r)` = {alpha / r ** 0.5:g} (rsLoRA)"
    return f"`lora_alpha / r` = {alpha / r:g}"


def _peft_snippet(base: str | None, adapter: str) -> str:
    return ("```python\nfrom transformers import AutoModelForCausalLM\nfrom peft import PeftModel\n\n"
            f'base = AutoModelForCausalLM.from_pretrained("{base or "BASE_MODEL"}")\n'
            f'model = PeftModel.from_pretrained(base, "{adapter}")\n'
            "model = model.merge_and_unload()  # optional: fold the update into the weights\n```")


def _bora(d: dict[str, Any], ctx: dict[str, Any]) -> list[str]:
    r, b = d.get("r"), d.get("bora_blocks")
    exact = r * b if isinstance(r, int) and isinstance(b, int) else None
    rows = [("rank `r`", r), ("blocks `b` (`bora_blocks`)", b), ("`lora_alpha`", d.get("lora_alpha", r)),
            ("scaling `s`", _scaling(d)), ("target modules", d.get("target_modules")),
            ("`rank_pattern`", d.get("rank_pattern")), ("`alpha_pattern`", d.get("alpha_pattern")),
            ("modules saved whole", d.get("modules_to_save")), ("adapted modules", d.get("modules")),
            ("stored parameters", d.get("parameters")), ("rank of the exact LoRA form (`b*r`)", exact)]
    base = ctx["base"] or "BASE_MODEL"
    commands = (f"```bash\npip install bora-tools\nhf download {ctx['repo']} --local-dir bora-adapter\n"
                f"hf download {base} --local-dir base-model\n"
                "bora-tools inspect bora-adapter\n"
                "# the exact PEFT LoRA adapter (rank b*r, no loss), or --rank K for the optimal rank-K one\n"
                "bora-tools to-lora bora-adapter --out lora-adapter --rank full\n"
                "# the base weights with the update merged in\n"
                "bora-tools merge bora-adapter --base base-model --out merged-model\n"
                "# a GGUF LoRA adapter for llama.cpp's --lora\n"
                "bora-tools export-gguf bora-adapter --base base-model --out adapter.gguf\n```")
    return [
        f"A **BoRA adapter** (Block Diversified Low-Rank Adaptation, {PAPER}) for {_base_link(ctx)}, "
        "stored in PEFT's layout with `peft_type: BORA`.",
        "## BoRA parameters", _table(rows),
        "Each adapted weight `W` (`m x n`) is split into `b x b` blocks; block `(i, j)` of the update is "
        "`s * B_i @ diag(sigma[i, j]) @ A_j`, with `A` (`r x n`), `B` (`m x r`) and `sigma` (`b x b x r`).",
        "## How to use it",
        "PEFT does not load `peft_type: BORA` itself; [bora-tools](https://pypi.org/project/bora-tools/) turns "
        "the adapter into what PEFT, transformers and llama.cpp load:", commands,
        "Then load the LoRA adapter with PEFT:", _peft_snippet(ctx["base"], "lora-adapter"),
    ]


def _lora(d: dict[str, Any], ctx: dict[str, Any]) -> list[str]:
    rows = [("`peft_type`", d.get("peft_type")), ("rank `r`", d.get("r")), ("`lora_alpha`", d.get("lora_alpha")),
            ("scaling `s`", _scaling(d) if d.get("peft_type", "").upper() == "LORA" else None),
            ("target modules", d.get("target_modules")), ("`rank_pattern`", d.get("rank_pattern")),
            ("`alpha_pattern`", d.get("alpha_pattern")), ("modules saved whole", d.get("modules_to_save")),
            ("adapted modules", d.get("modules")), ("stored parameters", d.get("parameters"))]
    return [
        f"A **PEFT adapter** for {_base_link(ctx)}.",
        "## Parameters", _table(rows),
        "## How to use it", _peft_snippet(ctx["base"], ctx["repo"]),
        "For llama.cpp's `--lora`: `bora-tools export-gguf DIR --base BASE --out adapter.gguf` "
        "(DIR: this repo downloaded, BASE: its base model).",
    ]


def _model(d: dict[str, Any], ctx: dict[str, Any]) -> list[str]:
    rows = [("architectures", d.get("architectures")), ("`model_type`", d.get("model_type")),
            ("dtype", d.get("dtype")), ("weight files", d.get("weights"))]
    snippet = ("```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
               f'model = AutoModelForCausalLM.from_pretrained("{ctx["repo"]}")\n'
               f'tokenizer = AutoTokenizer.from_pretrained("{ctx["repo"]}")\n```')
    intro = (f"A **transformers model**: {_base_link(ctx)} with a BoRA adapter ({PAPER}) merged into its weights."
             if d.get("merged") else f"A **transformers model**, derived from {_base_link(ctx)}." if ctx["base"]
             else "A **transformers model**.")
    made = (["## How it was made",
             "`bora-tools merge ADAPTER --base BASE --out DIR` computes `W + dW` in float32 and rounds once to the "
             "base dtype; the directory keeps the base's config, tokenizer and shard layout."]
            if d.get("merged") else [])
    return [
        intro,
        "## Model", _table(rows),
        "## How to use it", snippet,
        f"For llama.cpp: `hf download {ctx['repo']} --local-dir model && "
        "bora-tools export-gguf model --out model.gguf --outtype f16`.",
        *made,
    ]


def _gguf_rows(files: list[dict[str, Any]]) -> str:
    lines = ["| file | type | architecture | tensor type |", "|---|---|---|---|"]
    lines += [f"| `{f['file']}` | {f['type']} | {f['architecture'] or ''} | {f['file_type'] or ''} |" for f in files]
    return "\n".join(lines)


def _gguf_model(d: dict[str, Any], ctx: dict[str, Any]) -> list[str]:
    files = d.get("files", [])
    first = next((f["file"] for f in files if f["type"] != "adapter"), "MODEL.gguf")
    quantized = [f for f in files if f["type"] != "adapter" and f.get("file_type") not in (None, "F32", "F16", "BF16")]
    quantization = (["Quantization: " + ", ".join(f"**{f['file_type']}** (`{f['file']}`)" for f in quantized)
                     + ", as llama.cpp's quantizer makes it."] if quantized else [])
    what = (f"the merge of a BoRA adapter ({PAPER}) into {_base_link(ctx)}" if d.get("merged")
            else _base_link(ctx) if ctx["base"] else "a model")
    made = (["## How it was made",
             "`bora-tools export-gguf ADAPTER --base BASE --merge --out FILE.gguf` merges the adapter and converts "
             "in one pass; `--outtype q4_k_m` (or q5_k_m, q6_k, ...) quantizes with llama.cpp's own quantizer."]
            if d.get("merged") else [])
    shard = re.match(r"^(.+)-00001-of-\d{5}\.gguf$", first)
    # A split model: every shard is downloaded; llama.cpp opens the first and finds the others beside it.
    fetch = f"--include '{shard.group(1)}-*-of-*.gguf'" if shard else first
    return [
        f"**GGUF** files for [llama.cpp](https://github.com/ggml-org/llama.cpp): {what}.",
        "## Files", _gguf_rows(files), *quantization,
        "## How to use it",
        f"```bash\nhf download {ctx['repo']} {fetch} --local-dir .\nllama-cli -m {first} -p \"Hello\"\n```",
        *made,
    ]


def _gguf_lora(d: dict[str, Any], ctx: dict[str, Any]) -> list[str]:
    files = d.get("files", [])
    first = files[0]["file"] if files else "ADAPTER.gguf"
    alphas = sorted({f["lora_alpha"] for f in files if f.get("lora_alpha") is not None})
    lines = [
        f"A **GGUF LoRA adapter** for [llama.cpp](https://github.com/ggml-org/llama.cpp), for {_base_link(ctx)}.",
        "## Files", _gguf_rows(files),
    ]
    if alphas:
        lines.append(f"`adapter.lora.alpha`: {', '.join(f'{a:g}' for a in alphas)}.")
    return lines + [
        "## How to use it",
        "Apply it on a GGUF of the base model:",
        f"```bash\nhf download {ctx['repo']} {first} --local-dir .\n"
        f"llama-cli -m BASE.gguf --lora {first} -p \"Hello\"\n```",
    ]


def _unknown(d: dict[str, Any], ctx: dict[str, Any]) -> list[str]:
    return ["Files published with bora-tools. No adapter, model or GGUF file was recognised among them; "
            "add a `README.md` next to them to describe them."]
