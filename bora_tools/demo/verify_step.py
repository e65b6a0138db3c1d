"""The demo's ``verify`` step: every output the demo made, run where it will run and judged by its tolerance."""

from __future__ import annotations

from typing import Any

from bora_tools.errors import BoraError


def step_verify(ctx: Any) -> None:
    """``bora-tools verify`` on the merged model, both LoRAs and (with llama.cpp) the GGUF files."""
    from bora_tools.gguf.llama_run import llama_cpp_available
    from bora_tools.verification import verify

    outputs: list[tuple[str, dict]] = [("merged", {}), ("lora-full", {}), ("lora-truncated", {})]
    if llama_cpp_available():
        outputs += [("merged.gguf", {}), ("lora.gguf", {"base_gguf": ctx.workdir / "base.gguf"})]
    figures, failed = {}, []
    for name, extra in outputs:
        report = verify(ctx.workdir / name, ctx.adapter_dir, base=ctx.base_dir, tokens=32, device="cpu", **extra)
        t = report.tolerance
        figures[name] = {"passed": report.passed, "engine": report.engine, "type": report.type,
                         "measure": t.measure, "value": report.overall[t.measure], "bound": t.bound}
        if not report.passed:
            failed.append(f"{name}: {report.failure}")
    ctx.results["verify"] = figures
    shown = ", ".join(f"{name} in {f['engine']} ({f['measure']} {f['value']:.1e} <= {f['bound']:.1e})"
                      for name, f in figures.items())
    ctx.say(f"[verify]  each output gives the adapter's outputs, run where it will run, within its type's tolerance "
            f"({len(report.prompts)} built-in prompts): {shown}")
    for name, extra in outputs:
        words = ["verify", ctx.workdir / name, "--adapter", ctx.adapter_dir, "--base", ctx.base_dir]
        if extra:
            words += ["--base-gguf", extra["base_gguf"]]
        ctx.command(*words)
    if failed:
        raise BoraError(f"demo: verify failed for {failed[0]}")
