"""Training past one GPU's memory (issue 21): BoRA on a 4-bit base against PEFT QLoRA, and FSDP2 against DDP.

``--mode qlora``: a Llama-shaped model with random weights (``--layers`` 4, hidden 1024, intermediate 2816,
16 heads, vocabulary 8000, untied), saved once in float32 and loaded quantized by bitsandbytes (NF4 + double
quantization, computing in float32), gets an adapter on all seven projections: BoRA b=4 r=8 (``add_bora``)
or PEFT LoRA r=8 (``get_peft_model``, QLoRA), the same r and within 1% of the same trainable parameters.
Each runs in its own subprocess (peak RSS its own), in rotating order for ``--rounds``; a step is forward,
backward and an AdamW step on ``--batch`` x ``--seq`` tokens, timed in wall and CPU seconds after
``--warmup`` steps. Medians; the ratio uses CPU time (the steadier figure on a shared machine).

``--mode fsdp``: ``torchrun --nproc_per_node 2 -m bora_tools.cli train`` on the CPU (gloo) with and without
``--fsdp`` on the same model in float32 (``--layers`` decoder layers of hidden 512) and data; the time per
step is (run of ``--steps`` + 2 steps - run of 2 steps) / ``--steps``, in wall time and in the CPU time of both
processes (the steadier figure on a shared machine), which leaves out loading and start-up; peak RSS is the
largest process's. GPU figures are not measured.

Usage (about 10 and 10 minutes on a shared 2-core CPU):

    python scripts/bench_train_scale.py --mode qlora --rounds 2 --steps 3 --threads 1
    python scripts/bench_train_scale.py --mode fsdp --rounds 2 --steps 6

Prints a markdown table. Never imported by the package or the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def save_base(path: Path, *, layers: int, hidden: int, intermediate: int, heads: int, vocab: int) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from bora_tools.demo.tiny import build_tokenizer

    if (path / "config.json").is_file():
        return path
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                         max_position_embeddings=512, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(path)
    build_tokenizer(vocab_size=min(vocab, 300)).save_pretrained(path)
    return path


def qlora_child(adapter: str, base: Path, args) -> dict:
    import torch

    from bora_tools.training import quantized, trainable_parameters

    torch.set_num_threads(args.threads)
    model = quantized.load_quantized(base, load_in_4bit=True, dtype=torch.float32, device=torch.device("cpu"))
    rss_model = _rss_mib()
    torch.manual_seed(0)
    if adapter == "bora":
        from bora_tools.core.config import BoraConfig
        from bora_tools.training import add_bora

        model = quantized.prepare_for_training(
            add_bora(model, BoraConfig(r=8, bora_blocks=4, lora_alpha=16, target_modules=TARGETS)))
    else:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, task_type="CAUSAL_LM"))
    trainable = trainable_parameters(model).trainable
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, 8000, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    walls, cpus = [], []
    for step in range(args.warmup + args.steps):
        w0, c0 = time.perf_counter(), time.process_time()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step >= args.warmup:
            walls.append(time.perf_counter() - w0)
            cpus.append(time.process_time() - c0)
    return {"adapter": adapter, "trainable": trainable, "wall": walls, "cpu": cpus, "rss": _rss_mib(),
            "rss_model": rss_model}


def run_qlora(args) -> None:
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-qlora-"))
    base = save_base(work / "base", layers=args.layers, hidden=1024, intermediate=2816, heads=16, vocab=8000)
    results: dict[str, list[dict]] = {"bora": [], "lora": []}
    order = ["bora", "lora"]
    for r in range(args.rounds):
        for adapter in order[r % 2:] + order[:r % 2]:
            out = subprocess.run([sys.executable, __file__, "--qlora-child", adapter, "--base", str(base),
                                  *_common(args)], capture_output=True, text=True, check=True,
                                 env={**os.environ, "PYTHONPATH": str(REPO)})
            results[adapter].append(json.loads(out.stdout.strip().splitlines()[-1]))
    lora_cpu = statistics.median(c for res in results["lora"] for c in res["cpu"])
    print("| adapter | trainable | step (wall) | step (CPU) | CPU vs QLoRA | peak RSS | RSS over the model |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for adapter, name in (("bora", "BoRA b=4 r=8 on NF4"), ("lora", "PEFT LoRA r=8 on NF4 (QLoRA)")):
        res = results[adapter]
        wall = statistics.median(w for x in res for w in x["wall"])
        cpu = statistics.median(c for x in res for c in x["cpu"])
        rss = statistics.median(x["rss"] for x in res)
        over = statistics.median(x["rss"] - x["rss_model"] for x in res)
        print(f"| {name} | {res[0]['trainable']:,} | {wall:.2f} s | {cpu:.2f} s | {cpu / lora_cpu:.2f}x | "
              f"{rss:,.0f} MiB | {over:,.0f} MiB |")


def _torchrun(base: Path, data: Path, out: Path, steps: int, fsdp: bool) -> dict:
    """One torchrun job in a child of this script, so that its RUSAGE_CHILDREN peak is this job's alone."""
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "bora_tools.cli", "train", "--base", str(base), "--data", str(data), "--out", str(out),
            "-r", "8", "--blocks", "4", "--max-steps", str(steps), "--batch-size", "2", "--max-length", "128",
            "--device", "cpu", "--overwrite", "--quiet", *(["--fsdp"] if fsdp else [])]
    code = ("import json, resource, subprocess, sys, time\n"
            "t = time.perf_counter(); subprocess.run(sys.argv[1:], check=True, capture_output=True)\n"
            "u = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
            "print(json.dumps({'seconds': time.perf_counter() - t, 'cpu': u.ru_utime + u.ru_stime, "
            "'rss': u.ru_maxrss / 1024}))")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout)


def run_fsdp(args) -> None:
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-fsdp-"))
    base = save_base(work / "base", layers=args.layers, hidden=512, intermediate=1408, heads=8, vocab=8000)
    data = work / "data.jsonl"
    words = "the quick brown fox jumps over the lazy dog and runs far away into the hills".split()
    data.write_text("".join(json.dumps({"text": " ".join(words[(i + j) % len(words)] for j in range(120))}) + "\n"
                            for i in range(64)))
    results: dict[str, list[dict]] = {"ddp": [], "fsdp": []}
    order = ["ddp", "fsdp"]
    for r in range(args.rounds):
        for mode in order[r % 2:] + order[:r % 2]:
            short = _torchrun(base, data, work / "out", 2, mode == "fsdp")
            long = _torchrun(base, data, work / "out", 2 + args.steps, mode == "fsdp")
            results[mode].append({"step": (long["seconds"] - short["seconds"]) / args.steps,
                                  "cpu": (long["cpu"] - short["cpu"]) / args.steps,
                                  "rss": max(short["rss"], long["rss"])})
    ddp = statistics.median(x["cpu"] for x in results["ddp"])
    print("| 2 processes (gloo, CPU) | step (wall) | step (CPU, both processes) | CPU vs DDP | "
          "peak RSS (largest process) |")
    print("|---|---:|---:|---:|---:|")
    for mode, name in (("ddp", "DDP"), ("fsdp", "FSDP2 (`--fsdp`)")):
        step = statistics.median(x["step"] for x in results[mode])
        cpu = statistics.median(x["cpu"] for x in results[mode])
        rss = statistics.median(x["rss"] for x in results[mode])
        print(f"| {name} | {step:.2f} s | {cpu:.2f} s | {cpu / ddp:.2f}x | {rss:,.0f} MiB |")


def _common(args) -> list[str]:
    return ["--layers", str(args.layers), "--steps", str(args.steps), "--warmup", str(args.warmup),
            "--threads", str(args.threads), "--batch", str(args.batch), "--seq", str(args.seq)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["qlora", "fsdp"], default="qlora")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--qlora-child", choices=["bora", "lora"])
    parser.add_argument("--base", type=Path)
    args = parser.parse_args()
    if args.qlora_child:
        print(json.dumps(qlora_child(args.qlora_child, args.base, args)))
    elif args.mode == "qlora":
        run_qlora(args)
    else:
        run_fsdp(args)


if __name__ == "__main__":
    main()
