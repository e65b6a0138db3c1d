"""``verify``: run an output where it will run and compare it with the BoRA adapter it was made from."""

from __future__ import annotations

from pathlib import Path

import click

from bora_tools.choices import DEVICE_CHOICES, VERIFY_ENGINES
from bora_tools.cli.frame import make_progress, print_report
from bora_tools.cli.params import _InputType, _resolve, common_options, json_option, token_option


@click.command("verify", short_help="Prove an output (merged, LoRA, GGUF) gives the adapter's outputs.")
@click.argument("output", type=click.Path(exists=True, path_type=Path))
@click.option("--adapter", required=True, type=_InputType("adapter"),
              help="The BoRA adapter OUTPUT was made from (a folder or a Hub id).")
@click.option("--base", type=_InputType("model"), default=None,
              help="The base model  [default: the adapter's base_model_name_or_path]")
@click.option("--prompts", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="A .jsonl file (the 'text' of each record) or a text file (one prompt a line)  "
                   "[default: a built-in set of 5]")
@click.option("--tokens", type=click.IntRange(min=1), default=64, show_default=True,
              help="Cut each prompt to this many tokens.")
@click.option("--engine", type=click.Choice(VERIFY_ENGINES), default="auto", show_default=True,
              help="Where OUTPUT runs; auto: transformers (merged model), PEFT (LoRA), llama.cpp (GGUF). vllm: a "
                   "LoRA in vLLM's own venv (BORA_VLLM_PYTHON, .venv-vllm; see docs/cli.md#verify).")
@click.option("--base-gguf", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="The base model's GGUF, when OUTPUT is a GGUF LoRA adapter.")
@click.option("--precise", is_flag=True, help="A float64 reference (transformers and PEFT outputs run in float64).")
@click.option("--max-kl", type=click.FloatRange(min=0.0, min_open=True), default=None,
              help="Pass when mean KL(reference || output) stays at or below this, instead of the type's tolerance.")
@click.option("--device", type=click.Choice(list(DEVICE_CHOICES)), default="auto", show_default=True,
              help="Where the reference (and a transformers or PEFT output) runs; auto picks CUDA when present.")
@token_option
@json_option
@common_options
def verify_cmd(output: Path, adapter: str, base: str | None, prompts: Path | None, tokens: int, engine: str,
               base_gguf: Path | None, precise: bool, max_kl: float | None, device: str, token: str | None,
               as_json: bool) -> None:
    """Run OUTPUT where it will run and compare its logits with the BoRA adapter's (exit 1 outside tolerance).

    OUTPUT is a merged model folder, a PEFT LoRA folder (in PEFT, or vLLM with --engine vllm), a GGUF model
    (or the first file of a split) or a GGUF LoRA (with --base-gguf). The reference is the adapter on its
    base in transformers.

    \b
    Examples:
      bora-tools verify ./merged --adapter ./my-bora-adapter --base ./Llama-3.2-1B
      bora-tools verify ./my-lora --adapter someone/my-bora --json
      bora-tools verify merged-q4_k_m.gguf --adapter ./my-bora-adapter --prompts prompts.jsonl
      bora-tools verify lora.gguf --adapter ./my-bora-adapter --base-gguf base-f16.gguf
      bora-tools verify ./my-lora --adapter ./my-bora-adapter --engine vllm
    """
    from bora_tools.verification import VerificationFailed, verify

    found = _resolve(adapter, "adapter", token=token)
    found_base = _resolve(base, "model", token=token) if base is not None else None
    report = verify(output, found.path, base=found_base.path if found_base else None, prompts=prompts, tokens=tokens,
                    engine=engine, precise=precise, max_kl=max_kl, device=device, base_gguf=base_gguf,
                    progress=make_progress())
    print_report(report, as_json=as_json)
    if not report.passed:
        raise VerificationFailed(report.failure)
