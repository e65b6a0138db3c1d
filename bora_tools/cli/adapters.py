"""The adapter commands: ``inspect``, ``merge`` (into the base) and ``to-lora`` (a PEFT LoRA)."""

from __future__ import annotations

from pathlib import Path

import click

from bora_tools.cli.frame import make_progress, print_report
from bora_tools.cli.params import (
    _DtypeType,
    _InputType,
    _RankType,
    _resolve,
    _resolve_base,
    common_options,
    device_option,
    json_option,
    overwrite_option,
    token_option,
)


@click.command("inspect", short_help="Describe a BoRA adapter: modules, shapes, ranks, sigma.")
@click.argument("adapter", type=_InputType("adapter"))
@device_option
@token_option
@json_option
@common_options
def inspect_cmd(adapter: str, device: str, token: str | None, as_json: bool) -> None:
    """Describe a BoRA adapter: modules, shapes, b, r, scaling, parameters, update ranks, sigma.

    \b
    Examples:
      bora-tools inspect ./my-bora-adapter --json
      bora-tools inspect someone/my-bora@v1
    """
    from bora_tools.core.devices import resolve_device
    from bora_tools.inspection import inspect_adapter

    found = _resolve(adapter, "adapter", token=token)
    report = inspect_adapter(found.path, device=resolve_device(device), progress=make_progress())
    print_report(report, as_json=as_json)


@click.command("merge", short_help="Merge a BoRA adapter into its base model (a full model folder).")
@click.argument("adapter", type=_InputType("adapter"))
@click.option("--base", type=_InputType("model"), default=None,
              help="The base model: a folder (config.json, safetensors shards) or a Hub id  [default: the "
                   "adapter's base_model_name_or_path]")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="The merged model directory to write (missing parent folders are created).")
@click.option("--dtype", type=_DtypeType(allow_auto=True), default="auto", show_default=True,
              help="Output dtype of float tensors (fp16, bf16, ... accepted); auto keeps each base tensor's dtype.")
@click.option("--scale", type=float, default=1.0, show_default=True, help="Multiply the update: W + scale * dW.")
@device_option
@token_option
@overwrite_option
@json_option
@common_options
def merge_cmd(adapter: str, base: str | None, out: Path, dtype: str, scale: float, device: str, token: str | None,
              overwrite: bool, as_json: bool) -> None:
    """Merge a BoRA adapter into its base model: OUT is a complete model directory.

    \b
    Examples:
      bora-tools merge ./my-bora-adapter --base ./Llama-3.2-1B --out ./merged --dtype bf16
      bora-tools merge someone/my-bora --base meta-llama/Llama-3.2-1B@main --out ./merged
      bora-tools merge someone/my-bora --out ./merged      # the base the adapter records
    """
    from bora_tools.merge import merge_adapter

    found_adapter = _resolve(adapter, "adapter", token=token)
    found_base = _resolve_base(base, found_adapter, token=token)
    report = merge_adapter(found_adapter.path, found_base.path, out, dtype=dtype, scale=scale, device=device,
                           overwrite=overwrite, progress=make_progress(), base_name=found_base.repo_id)
    print_report(report, as_json=as_json)


@click.command("to-lora", short_help="Convert a BoRA adapter to a PEFT LoRA, exact or truncated.")
@click.argument("adapter", type=_InputType("adapter"))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="The PEFT LoRA adapter directory to write.")
@click.option("--rank", type=_RankType(), default=None,
              help="'full' (the default without --energy): the exact factors (rank b*r, lossless); K: the best "
                   "rank-K LoRA per module (capped at each update's rank); with --energy, a cap.")
@click.option("--energy", type=click.FloatRange(0.0, 1.0, min_open=True), default=None,
              help="Per module, the smallest rank retaining at least this fraction of ||dW||_F^2.")
@click.option("--uniform-rank", is_flag=True,
              help="Every module at one rank (K, or the largest b*r with --rank full), zero-padded, no "
                   "rank_pattern: for vLLM, llama.cpp's and Ollama's converters.")
@click.option("--dtype", type=_DtypeType(allow_auto=False), default="float32", show_default=True,
              help="Dtype of the stored LoRA factors, fp16/bf16/... accepted (computed in float64, cast once).")
@device_option
@token_option
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the report as JSON to this file.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Draw singular value spectra and energy curves to this PNG (needs the 'plot' extra).")
@overwrite_option
@json_option
@common_options
def to_lora_cmd(adapter: str, out: Path, rank: int | str | None, energy: float | None, uniform_rank: bool,
                dtype: str, device: str, token: str | None, report_path: Path | None, plot_path: Path | None,
                overwrite: bool, as_json: bool) -> None:
    """Convert a BoRA adapter into a plain PEFT LoRA adapter, exact or optimally truncated.

    \b
    Examples:
      bora-tools to-lora ./my-bora-adapter --out ./my-lora
      bora-tools to-lora someone/my-bora@v1 --out ./my-lora
      bora-tools to-lora ./my-bora-adapter --out ./my-lora-16 --rank 16 --dtype bf16
      bora-tools to-lora ./my-bora-adapter --out ./lora-vllm --rank 16 --uniform-rank
      bora-tools to-lora ./my-bora-adapter --out ./my-lora-99 --energy 0.99 --rank 32 --plot spectra.png
    """
    if rank is None and energy is None:
        rank = "full"
    if rank == "full" and energy is not None:
        raise click.UsageError("--rank full keeps everything; it cannot be combined with --energy")
    from bora_tools.conversion import to_lora

    found = _resolve(adapter, "adapter", token=token)
    report = to_lora(found.path, out, rank=rank, energy=energy, dtype=dtype, device=device, report=report_path,
                     plot=plot_path, overwrite=overwrite, progress=make_progress(),
                     name=found.repo_id if found.from_hub else None, uniform_rank=uniform_rank)
    print_report(report, as_json=as_json)
