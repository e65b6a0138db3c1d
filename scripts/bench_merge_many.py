"""Benchmark several adapters at once (issue 19): ``merge`` of 1, 2 and 4 adapters, and ``combine --to lora``.

``merge``: a synthetic llama-shaped bf16 base (scripts/synthetic.py, one shard) and four BoRA adapters
(``b=4``, ``r=8``, every projection); ``merge_adapter`` of the first 1, 2 and 4 (linear, weights 1) and of
two with ``--method ties --density 0.5``, each run in its own subprocess (peak RSS from ``os.wait4``),
rotating the order; medians.

``combine``: four BoRA adapters (``b=4``, ``r=16``) on every projection of ``--layers`` layers of 7B shapes
(hidden 4096, intermediate 11008); ``combine_adapters(..., to="lora", rank=64)`` against PEFT's
``add_weighted_adapter(..., combination_type="svd", svd_rank=64)`` on the same four adapters as exact
LoRAs (rank ``b*r = 64``, scaling folded in), loaded into a model of those shapes (vocabulary 320, so the
carrier model is small). Each in its own subprocess: the operation's time and its peak RSS above the RSS
before it; then, per module, ``||sum - B A||_F / ||sum||_F`` of each result, computed from the factors
(traces of small Gram products, no dense matrix). PEFT runs with ``svd_full_matrices=False``, the faster
of its settings (its default, ``True``, also computes the full square ``U`` and ``V``).

Usage (a 2-core CPU; merge about 5 minutes, combine about 5 minutes for one layer):

    python scripts/bench_merge_many.py merge --layers 10 --repeats 3 --kinds merge-1 merge-2 merge-4
    python scripts/bench_merge_many.py merge --layers 1 --repeats 1 --kinds merge-1 ties-2
    python scripts/bench_merge_many.py combine --layers 1

Files live in ``--workdir`` (default ``/dev/shm/bench-merge-many``) and are removed at the end. Never
imported by the package or the tests.
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

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
HIDDEN7B, INTER7B = 4096, 11008


def _shapes_7b(layers: int) -> dict[str, tuple[int, int]]:
    out = {}
    for i in range(layers):
        p = f"model.layers.{i}."
        for t in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[p + "self_attn." + t] = (HIDDEN7B, HIDDEN7B)
        out[p + "mlp.gate_proj"] = out[p + "mlp.up_proj"] = (INTER7B, HIDDEN7B)
        out[p + "mlp.down_proj"] = (HIDDEN7B, INTER7B)
    return out


def build_adapters(work: Path, modules: dict[str, tuple[int, int]], count: int, *, rank: int, blocks: int,
                   lora: bool) -> None:
    """``count`` random BoRA adapters ``bora-k`` (and, with ``lora``, their exact LoRAs ``lora-k``)."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    from bora_tools.core.adapter import PREFIX, BoraAdapter, BoraModule, save_adapter
    from bora_tools.core.config import BoraConfig
    from bora_tools.core.factors import exact_lora_factors

    for k in range(count):
        config = BoraConfig(r=rank, bora_blocks=blocks, lora_alpha=2 * rank, target_modules=TARGETS)
        gen = torch.Generator().manual_seed(k + 1)
        mods, tensors = {}, {}
        for name, (m, n) in modules.items():
            mod = BoraModule(name, torch.randn(rank, n, generator=gen) / n**0.5,
                             torch.randn(m, rank, generator=gen) * 0.01,
                             1 + 0.3 * torch.randn(blocks, blocks, rank, generator=gen), config.scaling_for(name))
            mods[name] = mod
            if lora:
                b_full, a_full = exact_lora_factors(mod.A, mod.B, mod.sigma)
                tensors[f"{PREFIX}{name}.lora_A.weight"] = a_full.contiguous()
                tensors[f"{PREFIX}{name}.lora_B.weight"] = (b_full * mod.scaling).contiguous()
        save_adapter(BoraAdapter(config=config, modules=mods), work / f"bora-{k}")
        if lora:
            (work / f"lora-{k}").mkdir()
            LoraConfig(r=blocks * rank, lora_alpha=blocks * rank, target_modules=TARGETS).save_pretrained(
                work / f"lora-{k}")
            save_file(tensors, str(work / f"lora-{k}" / "adapter_model.safetensors"), metadata={"format": "pt"})


# -- children -----------------------------------------------------------------------------------------------


def child_merge(work: Path, kind: str) -> dict:
    from bora_tools.merge import merge_adapter

    count, method = {"merge-1": (1, "linear"), "merge-2": (2, "linear"), "merge-4": (4, "linear"),
                     "ties-2": (2, "ties")}[kind]
    adapters = [work / f"bora-{k}" for k in range(count)]
    start = time.perf_counter()
    report = merge_adapter(adapters[0] if count == 1 else adapters, work / "base", work / "out", device="cpu",
                           method=method, density=None if method == "linear" else 0.5)
    return {"seconds": time.perf_counter() - start, "module_bytes": report.module_bytes}


def child_combine(work: Path, kind: str) -> dict:
    """One combination of the four adapters: its time and its peak RSS above the RSS before it."""
    import resource

    import torch

    weights = [1.0, -0.5, 0.7, 0.3]
    if kind == "combine":
        from bora_tools.combine import combine_adapters

        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        combine_adapters([work / f"bora-{k}" for k in range(4)], work / "out-combine", weights=weights, to="lora",
                         rank=64, device="cpu")
        seconds = time.perf_counter() - start
    else:
        from peft import PeftModel
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file
        from transformers import AutoModelForCausalLM, LlamaConfig

        cfg = LlamaConfig(hidden_size=HIDDEN7B, intermediate_size=INTER7B,
                          num_hidden_layers=int((work / "layers").read_text()), num_attention_heads=32,
                          num_key_value_heads=32, vocab_size=320)
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16),
                                          work / "lora-0", adapter_name="a0")
        for k in range(1, 4):
            model.load_adapter(work / f"lora-{k}", adapter_name=f"a{k}")
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        model.add_weighted_adapter([f"a{k}" for k in range(4)], weights, "sum", combination_type="svd", svd_rank=64,
                                   svd_full_matrices=kind == "peft-full")
        seconds = time.perf_counter() - start
        state = get_peft_model_state_dict(model, adapter_name="sum")
        (work / "out-peft").mkdir()
        save_file({k: v.contiguous() for k, v in state.items()}, str(work / "out-peft" / "adapter_model.safetensors"))
    return {"seconds": seconds, "rss_above_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024}


def errors(work: Path) -> dict:
    """Per module, each result's relative Frobenius error against the exact weighted sum, from factors only."""
    import torch
    from safetensors.torch import load_file

    weights = [1.0, -0.5, 0.7, 0.3]
    loras = [load_file(work / f"lora-{k}" / "adapter_model.safetensors") for k in range(4)]
    ours = load_file(work / "out-combine" / "adapter_model.safetensors")
    peft = {k.replace(".sum.", "."): v for k, v in load_file(work / "out-peft" / "adapter_model.safetensors").items()}
    out = {}
    for key in sorted(k for k in ours if k.endswith(".lora_A.weight")):
        bkey = key.replace("lora_A", "lora_B")
        bs = torch.cat([w * lo[bkey].double() for w, lo in zip(weights, loras)], dim=1)
        as_ = torch.cat([lo[key].double() for lo in loras])
        xx = float(((bs.T @ bs) * (as_ @ as_.T)).sum())

        def rel(b, a, bs=bs, as_=as_, xx=xx):
            b, a = b.double(), a.double()
            xy = float(((bs.T @ b) * (as_ @ a.T)).sum())
            yy = float(((b.T @ b) * (a @ a.T)).sum())
            return max(xx - 2 * xy + yy, 0.0) ** 0.5 / xx**0.5

        pk = [k for k in peft if k.endswith(key.split("base_model.model.")[-1])]
        pb = [k for k in peft if k.endswith(bkey.split("base_model.model.")[-1])]
        out[key.split("base_model.model.")[-1][: -len(".lora_A.weight")]] = {
            "combine": rel(ours[bkey], ours[key]), "peft_svd": rel(peft[pb[0]], peft[pk[0]])}
    return out


# -- parent ----------------------------------------------------------------------------------------------------


def run_child(*args: str) -> dict:
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--child", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"{args} failed")
    return {**json.loads(stdout.strip().splitlines()[-1]), "wall": time.perf_counter() - started,
            "rss_mib": usage.ru_maxrss / 1024}


def helper(*args: str) -> str:
    done = subprocess.run([sys.executable, __file__, "--child", *args], check=True, capture_output=True, text=True)
    return done.stdout.strip().splitlines()[-1]


def bench_merge(work: Path, layers: int, repeats: int, kinds: list[str]) -> dict:
    helper("setup-merge", str(work), str(layers))
    runs: dict[str, list] = {k: [] for k in kinds}
    for rep in range(repeats):
        for kind in kinds[rep % len(kinds):] + kinds[: rep % len(kinds)]:
            runs[kind].append(run_child("merge", str(work), kind))
            shutil.rmtree(work / "out")
    med = {k: {f: statistics.median(r[f] for r in v) for f in ("seconds", "wall", "rss_mib", "module_bytes")}
           for k, v in runs.items()}
    return {"layers": layers, "runs": runs, "median": med}


def bench_combine(work: Path, layers: int) -> dict:
    helper("setup-combine", str(work), str(layers))
    res = {"combine": run_child("combine", str(work), "combine")}
    print(json.dumps(res), file=sys.stderr, flush=True)  # as it comes: the PEFT run is long
    res["peft_svd"] = run_child("combine", str(work), "peft-thin")
    res["errors"] = json.loads(helper("errors", str(work)))
    return res


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        what, work, arg = sys.argv[2], Path(sys.argv[3]), sys.argv[4] if len(sys.argv) > 4 else ""
        if what == "setup-merge":
            write_model(work / "base", int(arg))
            mods = {n[: -len(".weight")]: s for n, s in shapes(int(arg)).items()
                    if any(n.endswith(f"{t}.weight") for t in TARGETS)}
            build_adapters(work, mods, 4, rank=8, blocks=4, lora=False)
            print("{}")
        elif what == "setup-combine":
            (work / "layers").write_text(arg)
            build_adapters(work, _shapes_7b(int(arg)), 4, rank=16, blocks=4, lora=True)
            print("{}")
        elif what == "merge":
            print(json.dumps(child_merge(work, arg)))
        elif what == "combine":
            print(json.dumps(child_combine(work, arg)))
        elif what == "errors":
            print(json.dumps(errors(work)))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["merge", "combine"])
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kinds", nargs="+", default=["merge-1", "merge-2", "merge-4", "ties-2"],
                        help="merge: which runs (merge-1, merge-2, merge-4, ties-2)")
    parser.add_argument("--workdir", type=Path, default=Path("/dev/shm/bench-merge-many"))
    args = parser.parse_args()
    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        result = bench_merge(work, args.layers, args.repeats, args.kinds) if args.part == "merge" else \
            bench_combine(work, args.layers)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
