"""Training step time and peak memory: BoRA (b=4, r=8) against PEFT LoRA r=8 and r=32 (the same rank b*r).

A Llama-shaped model (``--layers`` 8, hidden 1024, intermediate 2816, 16 heads, vocab 32000, random
weights built offline) gets an adapter on all seven projections and trains with a plain
``transformers.Trainer`` (AdamW, batch ``--batch`` x ``--seq`` tokens) in float32, and in bfloat16
(base weights bfloat16, adapter float32, ``bf16=True`` autocast: what PEFT users run). Each
(adapter, dtype) runs in its own subprocess so that its peak RSS is its own; the subprocesses run
in rotating order, ``--rounds`` times, so that a shared machine's noise falls on all alike. A step's
time is taken by a TrainerCallback from ``on_step_begin`` to ``on_step_end`` (wall and CPU seconds;
the first ``--warmup`` steps of each run are dropped). Reports medians, and ratios of the CPU-time
medians (the steadier figure on a shared machine) to LoRA r=8 and r=32.

Usage (about 25 minutes on a shared 2-core CPU):

    python scripts/bench_train.py --rounds 2 --steps 3 --threads 1

``--layer`` measures one layer instead (2048x2048, 2048 tokens, forward + backward, BoRA b=4 r=16
against PEFT LoRA r=16 and r=64, all in one process, interleaved; about 2 minutes):

    python scripts/bench_train.py --layer --repeats 15 --threads 1

Prints a markdown table (and writes ``results.json`` into ``--workdir`` when given). Never
imported by the package or the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ADAPTERS = ("bora-b4-r8", "lora-r8", "lora-r32")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def child(adapter: str, dtype_name: str, args) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

    torch.set_num_threads(args.threads)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    config = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=args.layers,
                         num_attention_heads=16, num_key_value_heads=16, vocab_size=32000,
                         max_position_embeddings=args.seq, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(dtype)
    rss_model = _rss_mib()
    if adapter.startswith("bora"):
        from bora_tools.core.config import BoraConfig
        from bora_tools.training import add_bora

        model = add_bora(model, BoraConfig(r=8, bora_blocks=4, lora_alpha=16, target_modules=TARGETS))
    else:
        from peft import LoraConfig, get_peft_model

        r = int(adapter.split("-r")[1])
        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, lora_dropout=0.0))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 32000, (args.batch * (args.warmup + args.steps), args.seq), generator=gen)
    data = [{"input_ids": row, "labels": row} for row in ids]
    times: list[tuple[float, float]] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = (time.perf_counter(), time.process_time())

        def on_step_end(self, *a, **k):
            times.append((time.perf_counter() - self.t[0], time.process_time() - self.t[1]))

    targs = TrainingArguments(output_dir=args.workdir_child, per_device_train_batch_size=args.batch,
                              max_steps=args.warmup + args.steps, learning_rate=1e-4, save_strategy="no",
                              report_to="none", disable_tqdm=True, use_cpu=True, bf16=dtype == torch.bfloat16,
                              logging_strategy="no", dataloader_num_workers=0)
    Trainer(model=model, args=targs, train_dataset=data, callbacks=[Timer()]).train()
    measured = times[args.warmup:]
    return {
        "adapter": adapter, "dtype": dtype_name, "trainable": trainable,
        "wall": [w for w, _ in measured], "cpu": [c for _, c in measured],
        "rss_model_mib": rss_model, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def layer_bench(args) -> str:
    """One 2048x2048 layer, 2048 tokens, forward + backward; the three adapters interleaved in one process."""
    import copy

    import torch
    from peft import LoraConfig, get_peft_model
    from torch import nn

    from bora_tools.training import BoraLinear

    torch.set_num_threads(args.threads)
    rows = ["| dtype | adapter | update rank | forward + backward (CPU, median) | vs LoRA r=16 | vs LoRA r=64 |",
            "|---|---|---|---|---|---|"]
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        base = nn.Linear(2048, 2048, bias=False).to(dtype).requires_grad_(False)
        bora = BoraLinear(copy.deepcopy(base), r=16, blocks=4, scaling=2.0)
        with torch.no_grad():
            bora.lora_B.normal_(0, 0.01)
        layers = {"bora-b4-r16": bora}
        for r in (16, 64):
            peft = get_peft_model(nn.Sequential(copy.deepcopy(base)), LoraConfig(r=r, lora_alpha=2 * r,
                                                                              target_modules=["0"]))
            layers[f"lora-r{r}"] = peft
        x = torch.randn(2048, 2048, dtype=dtype, requires_grad=True)
        cpu: dict[str, list[float]] = {name: [] for name in layers}
        for rep in range(args.repeats + 1):
            for name, layer in layers.items():
                t = time.process_time()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                    y = layer(x)
                y.float().sum().backward()
                if rep:  # the first pass warms up
                    cpu[name].append(time.process_time() - t)
        med = {name: statistics.median(v) for name, v in cpu.items()}
        for name, value in med.items():
            rank = 16 if name == "lora-r16" else 64
            rows.append(f"| {str(dtype).replace('torch.', '')} | {name} | {rank} | {value * 1000:.0f} ms | "
                        f"{value / med['lora-r16']:.3f}x | {value / med['lora-r64']:.3f}x |")
    return "\n".join(rows)


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="measured steps per run")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--layer", action="store_true", help="one layer instead of the model")
    parser.add_argument("--repeats", type=int, default=15, help="with --layer: timed passes per adapter")
    parser.add_argument("--child", nargs=2, metavar=("ADAPTER", "DTYPE"), help=argparse.SUPPRESS)
    parser.add_argument("--workdir-child", default="/tmp/bench-train-trainer", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args)))
        return
    if args.layer:
        start = time.time()
        print(layer_bench(args))
        print(f"\n{time.time() - start:.0f} s; {os.cpu_count()} CPUs, torch threads {args.threads}")
        return

    runs = [(a, d) for d in args.dtypes.split(",") for a in ADAPTERS]
    results: dict[tuple[str, str], list[dict]] = {run: [] for run in runs}
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads),
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    start = time.time()
    for round_ in range(args.rounds):
        order = runs[round_ % len(runs):] + runs[:round_ % len(runs)]  # rotate
        for adapter, dtype in order:
            cmd = [sys.executable, __file__, "--child", adapter, dtype, "--layers", str(args.layers),
                   "--seq", str(args.seq), "--batch", str(args.batch), "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
            if out.returncode:
                sys.exit(f"{adapter} {dtype} failed:\n{out.stderr[-3000:]}")
            results[(adapter, dtype)].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {round_ + 1} {adapter} {dtype}: median step "
                  f"{statistics.median(results[(adapter, dtype)][-1]['wall']):.2f} s", file=sys.stderr)
    table = report(results, runs, args)
    print(table)
    print(f"\n{args.rounds} rounds in {time.time() - start:.0f} s; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, torch threads {args.threads}")
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
        (args.workdir / "results.json").write_text(json.dumps(
            {f"{a} {d}": v for (a, d), v in results.items()}, indent=2))


def report(results, runs, args) -> str:
    rows = ["| dtype | adapter | update rank | trainable | step (wall, median) | step (CPU, median) | "
            "CPU vs LoRA r=8 | CPU vs LoRA r=32 | peak RSS | RSS over the model |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    med = {}
    for adapter, dtype in runs:
        rs = results[(adapter, dtype)]
        wall = statistics.median([w for r in rs for w in r["wall"]])
        cpu = statistics.median([c for r in rs for c in r["cpu"]])
        peak = statistics.median([r["peak_rss_mib"] for r in rs])
        over = statistics.median([r["peak_rss_mib"] - r["rss_model_mib"] for r in rs])
        med[(adapter, dtype)] = (wall, cpu, peak, over, rs[0]["trainable"])
    for adapter, dtype in runs:
        wall, cpu, peak, over, trainable = med[(adapter, dtype)]
        rank = 32 if adapter != "lora-r8" else 8
        rows.append(f"| {dtype} | {adapter} | {rank} | {trainable:,} | {wall:.2f} s | {cpu:.2f} s | "
                    f"{cpu / med[('lora-r8', dtype)][1]:.3f}x | {cpu / med[('lora-r32', dtype)][1]:.3f}x | "
                    f"{peak:,.0f} MiB | {over:,.0f} MiB |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
