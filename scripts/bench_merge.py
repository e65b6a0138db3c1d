"""Benchmark ``bora-tools merge`` against a plain file copy and PEFT's merge_and_unload.

Builds synthetic llama-shaped bf16 models (random weights written with
safetensors' own ``save_file``, one large shard each, a valid LlamaConfig),
a BoRA adapter on every linear layer and its exact-LoRA equivalent (rank
``b*r``, scaling folded into ``lora_B``), then times, side by side and in
rotating order, three contenders, each in its own subprocess so that its peak
RSS is its own (``os.wait4`` returns the child's ``ru_maxrss``):

  copy   shutil.copytree of the base directory (the floor for moving the bytes)
  merge  bora_tools.merge.merge_adapter(..., device="cpu")
  peft   AutoModelForCausalLM.from_pretrained + PeftModel.from_pretrained
         + merge_and_unload + save_pretrained

Usage (about 6 minutes on a 2-core CPU):

    python scripts/bench_merge.py --layers 10 20 --repeats 3

The files live in ``--workdir`` (default ``/dev/shm/bench-merge``, tmpfs: about
4 GB at the peak) and are removed at the end. Prints a markdown table of
medians and ratios and the per-run figures as JSON. Never imported by the
package or the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from synthetic import shapes, write_model  # noqa: E402  (scripts/ is on sys.path when run)

RANK, BLOCKS, ALPHA = 8, 4, 16
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# -- setup (parent) ---------------------------------------------------------

def build_base(path: Path, layers: int) -> int:
    """Random bf16 weights in one ``model.safetensors`` written by safetensors itself."""
    return write_model(path, layers)


def build_adapters(base: Path, bora_dir: Path, lora_dir: Path, layers: int, *, rank: int = RANK,
                   blocks: int = BLOCKS) -> None:
    """A BoRA adapter on every linear layer and the PEFT LoRA that equals it exactly (rank b*r)."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    from bora_tools.core.adapter import PREFIX, BoraAdapter, BoraModule, save_adapter
    from bora_tools.core.config import BoraConfig
    from bora_tools.core.factors import exact_lora_factors

    config = BoraConfig(r=rank, bora_blocks=blocks, lora_alpha=ALPHA, target_modules=TARGETS, task_type="CAUSAL_LM",
                        base_model_name_or_path=str(base))
    gen = torch.Generator().manual_seed(1)
    modules, lora = {}, {}
    for name, shape in shapes(layers).items():
        if not any(name.endswith(f"{t}.weight") for t in TARGETS):
            continue
        mod_name, (m, n) = name[: -len(".weight")], shape
        mod = BoraModule(
            mod_name,
            torch.randn(rank, n, generator=gen) / n**0.5,
            torch.randn(m, rank, generator=gen) * 0.01,
            1 + 0.3 * torch.randn(blocks, blocks, rank, generator=gen),
            config.scaling_for(mod_name),
        )
        modules[mod_name] = mod
        b_full, a_full = exact_lora_factors(mod.A, mod.B, mod.sigma)
        lora[f"{PREFIX}{mod_name}.lora_A.weight"] = a_full.contiguous()
        lora[f"{PREFIX}{mod_name}.lora_B.weight"] = (b_full * mod.scaling).contiguous()  # scaling folded in
    save_adapter(BoraAdapter(config=config, modules=modules), bora_dir)
    lora_dir.mkdir()
    LoraConfig(
        r=blocks * rank,
        lora_alpha=blocks * rank,
        target_modules=TARGETS,
        task_type="CAUSAL_LM",
        base_model_name_or_path=str(base),
    ).save_pretrained(lora_dir)
    save_file(lora, str(lora_dir / "adapter_model.safetensors"), metadata={"format": "pt"})


# -- contenders (each in its own child process) ----------------------------


def child(kind: str, base: Path, adapter: Path, out: Path) -> None:
    if kind == "copy":
        start = time.perf_counter()
        shutil.copytree(base, out)
    elif kind == "merge":
        from bora_tools.merge import merge_adapter

        start = time.perf_counter()
        merge_adapter(adapter, base, out, device="cpu")
    elif kind == "peft":
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        start = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        model.save_pretrained(out)
    elif kind == "imports":  # the floor: an interpreter with torch and bora_tools.merge imported
        import bora_tools.merge  # noqa: F401

        start = time.perf_counter()
    else:
        raise SystemExit(f"unknown contender {kind}")
    print(json.dumps({"seconds": time.perf_counter() - start}))


def run_child(kind: str, base: Path, adapter: Path, out: Path) -> dict:
    """Run one contender; its own time, the process wall time and its peak RSS."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, __file__, "--child", kind, str(base), str(adapter), str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)  # rusage of this child alone
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{kind} failed with exit code {proc.returncode}")
    return {
        "seconds": json.loads(stdout.strip().splitlines()[-1])["seconds"],
        "wall": time.perf_counter() - started,
        "rss_mib": usage.ru_maxrss / 1024,
    }


def check_agreement(ours: Path, peft_out: Path, names: list[str]) -> float:
    """Fraction of equal bf16 elements between our merge and PEFT's on a few adapted tensors."""
    from safetensors import safe_open

    equal = total = 0
    peft_file = sorted(peft_out.glob("*.safetensors"))[0]
    with safe_open(ours / "model.safetensors", "pt") as a, safe_open(peft_file, "pt") as b:
        for name in names:
            x, y = a.get_tensor(name), b.get_tensor(name)
            equal += int((x == y).sum())
            total += x.numel()
    return equal / total


def helper(*args: str) -> str:
    """Run setup or checks in a child, so that this parent stays small: a child's
    peak RSS starts from its parent's at fork time, and this one imports no torch."""
    done = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True)
    return done.stdout.strip().splitlines()[-1]


def bench_size(work: Path, layers: int, repeats: int, *, check: bool) -> dict:
    base, bora, lora = work / f"base-{layers}", work / f"bora-{layers}", work / f"lora-{layers}"
    size = int(helper("--setup", str(layers), str(work)))
    runs: dict[str, list[dict]] = {"copy": [], "merge": [], "peft": []}
    order = list(runs)
    agreement = None
    for rep in range(repeats):
        keep = check and rep == 0  # our output and PEFT's, compared once
        for kind in order[rep % 3 :] + order[: rep % 3]:  # rotate so no one always goes first
            out = work / f"out-{kind}"
            runs[kind].append(run_child(kind, base, lora if kind == "peft" else bora, out))
            if not (keep and kind != "copy"):
                shutil.rmtree(out)
        if keep:
            agreement = float(helper("--check", str(work / "out-merge"), str(work / "out-peft"), str(layers)))
            shutil.rmtree(work / "out-merge")
            shutil.rmtree(work / "out-peft")
    shutil.rmtree(base)
    med = {k: {f: statistics.median(r[f] for r in v) for f in ("seconds", "wall", "rss_mib")} for k, v in runs.items()}
    return {"layers": layers, "bytes": size, "runs": runs, "median": med, "merge_vs_peft_equal_fraction": agreement}


def report(results: list[dict], floor: dict) -> str:
    lines = [
        "| model | contender | time (median) | x copy | process wall | peak RSS | RSS - import floor |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for res in results:
        med, label = res["median"], f"{res['layers']} layers, {res['bytes'] / 1e9:.2f} GB"
        for kind in ("copy", "merge", "peft"):
            m = med[kind]
            floor_mib = floor["rss_mib"] if kind == "merge" else None
            extra = f"{m['rss_mib'] - floor_mib:.0f} MiB" if floor_mib else ""
            lines.append(
                f"| {label} | {kind} | {m['seconds']:.2f} s | {m['seconds'] / med['copy']['seconds']:.2f} | "
                f"{m['wall']:.2f} s | {m['rss_mib']:.0f} MiB | {extra} |"
            )
        lines.append(
            f"| {label} | merge vs peft | {med['peft']['seconds'] / med['merge']['seconds']:.1f}x faster | | | "
            f"{med['peft']['rss_mib'] / med['merge']['rss_mib']:.1f}x less | |"
        )
    lines.append(f"\nimport floor (python + torch + bora_tools.merge, nothing merged): {floor['rss_mib']:.0f} MiB")
    for res in [r for r in results if r["merge_vs_peft_equal_fraction"] is not None]:
        lines.append(
            f"{res['layers']} layers: merge and PEFT agree on {100 * res['merge_vs_peft_equal_fraction']:.3f}% "
            f"of bf16 elements of 4 sampled adapted tensors"
        )
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]), Path(sys.argv[5]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--setup":
        layers, work = int(sys.argv[2]), Path(sys.argv[3])
        size = build_base(work / f"base-{layers}", layers)
        build_adapters(work / f"base-{layers}", work / f"bora-{layers}", work / f"lora-{layers}", layers)
        print(size)
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--check":
        layers = int(sys.argv[4])
        print(
            check_agreement(
                Path(sys.argv[2]),
                Path(sys.argv[3]),
                [
                    f"model.layers.{i}.{p}.weight"
                    for i in (0, layers - 1)
                    for p in ("self_attn.q_proj", "mlp.down_proj")
                ],
            )
        )
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[10, 20])
    parser.add_argument("--repeats", type=int, default=3)
    # tmpfs by default: every contender reads and writes memory, and no disk
    # writeback of one run lands in the next one's time.
    parser.add_argument("--workdir", type=Path, default=Path("/dev/shm/bench-merge"))
    args = parser.parse_args()
    if args.workdir.exists():
        shutil.rmtree(args.workdir)
    args.workdir.mkdir(parents=True)
    started = time.perf_counter()
    floor = run_child("imports", args.workdir, args.workdir, args.workdir / "none")
    results = [bench_size(args.workdir, layers, args.repeats, check=(i == 0)) for i, layers in enumerate(args.layers)]
    print(json.dumps({"floor": floor, "runs": {r["layers"]: r["runs"] for r in results}}))
    print(report(results, floor))
    print(
        f"\ntotal benchmark time {time.perf_counter() - started:.0f} s; load average at the end "
        f"{', '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs"
    )
    shutil.rmtree(args.workdir)


if __name__ == "__main__":
    main()
