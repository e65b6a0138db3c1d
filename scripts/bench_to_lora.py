"""Benchmark ``to-lora``: the factored SVD against a dense SVD of ``dW`` and ``torch.svd_lowrank``.

Side by side in one run (each measurement in its own child process, so its
peak memory is its own):

1. single layers 4096x4096 and 4096x11008 with ``b*r = 64`` (b=4, r=16):
   - gram / qr: ``bora_tools.conversion.convert_module`` with either SVD route
     (``gram_svd`` / ``factored_svd``, never forming ``dW``), SVD + rank-16 factors;
   - dense: form ``dW`` and ``torch.linalg.svd(dW, full_matrices=False)`` in float32,
     what PEFT's LoRA conversion and mergekit's extract_lora do;
   - lowrank: form ``dW`` and ``torch.svd_lowrank(dW, q=k+8, niter=2)`` (randomised),
     with its error at rank k against the optimum;
   plus the same-spectrum check (factored vs dense singular values);
2. a whole 7B-shaped adapter (32 layers x 7 projections, b=4, r=16) written to
   disk as a real BoRA adapter, converted end to end by ``to_lora`` (read,
   convert, write) at ``--rank 16``, ``--energy 0.9`` and ``--rank full``. The
   dense and lowrank routes for the whole adapter are extrapolated from the
   single-layer timings (224 dense SVDs would take hours on 2 cores); the
   output says so.

Run: python scripts/bench_to_lora.py [--quick] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

B, R, K = 4, 16, 16  # blocks, rank per block, truncation rank for the lowrank comparison
SHAPES = [(4096, 4096), (4096, 11008)]
LLAMA7B = {"q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096), "o_proj": (4096, 4096),
           "gate_proj": (11008, 4096), "up_proj": (11008, 4096), "down_proj": (4096, 11008)}
LAYERS = 32


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _factors(m: int, n: int, seed: int):
    """A trained-looking BoRA module: A as PEFT initialises it, small B, sigma around 1."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    A = (torch.rand(R, n, generator=gen) * 2 - 1) / n**0.5
    Bm = torch.randn(m, R, generator=gen) * 0.02
    sigma = 1 + 0.3 * torch.randn(B, B, R, generator=gen)
    return A, Bm, sigma


def _layer_job(method: str, m: int, n: int, reps: int, queue) -> None:
    """One method on one layer shape, in a child process: times, peak memory, spectrum.

    The factored routes run as ``to_lora`` runs them (one CPU thread, ``convert_module``:
    SVD, rank-K factors, cast); dense and lowrank run with torch's default threads.
    """
    import torch

    from bora_tools.core.adapter import BoraModule
    from bora_tools.core.devices import one_cpu_thread
    from bora_tools.core.factors import delta_weight, factored_svd
    from bora_tools.core.lowrank import RankPolicy, convert_module

    A, Bm, sigma = _factors(m, n, seed=m + n)
    s = 2.0
    module, policy = BoraModule("layer", A, Bm, sigma, s), RankPolicy.parse(rank=K)
    before = _peak_mib()
    times, S, err, threads = [], None, None, torch.get_num_threads()
    for _ in range(reps):
        t0 = time.perf_counter()
        if method in ("gram", "qr"):
            with one_cpu_thread("cpu"):
                threads = torch.get_num_threads()
                _, _, result = convert_module(module, policy, route=method)
            S = result.singular_values
        elif method == "dense":
            dw = delta_weight(A, Bm, sigma, s)
            _, S, _ = torch.linalg.svd(dw, full_matrices=False)
        else:
            dw = delta_weight(A, Bm, sigma, s)
            u, S, v = torch.svd_lowrank(dw, q=K + 8, niter=2)
        times.append(time.perf_counter() - t0)
    peak = max(0.0, _peak_mib() - before)  # before the error check below, which builds float64 copies
    if method == "lowrank":  # its error at rank K against the optimum from the exact spectrum
        exact = factored_svd(A, Bm, sigma, s).S
        approx = (u[:, :K] * S[:K]) @ v[:, :K].T
        err = float((dw.double() - approx.double()).norm()) / float(exact[K:].square().sum().sqrt())
    queue.put(
        {
            "method": method,
            "shape": [m, n],
            "threads": threads,
            "times": times,
            "median_s": statistics.median(times),
            "peak_extra_mib": peak,
            "S": S[: B * R + 1].double().tolist(),
            "lowrank_error_over_optimum": err,
        }
    )


def _adapter_job(adapter: str, out: str, kwargs: dict, queue) -> None:
    """``to_lora`` end to end on the 7B-shaped adapter, in a child process."""
    from bora_tools.conversion import to_lora

    before = _peak_mib()
    t0 = time.perf_counter()
    report = to_lora(adapter, out, **kwargs, overwrite=True).to_dict()
    seconds = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in Path(out).iterdir())
    queue.put(
        {
            "kwargs": kwargs,
            "seconds": seconds,
            "peak_extra_mib": max(0.0, _peak_mib() - before),
            "out_mib": size / 2**20,
            "totals": report["totals"],
        }
    )


def _child(target, *args):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def _make_7b_adapter(path: Path) -> float:
    """Write a 7B-shaped BoRA adapter (32 layers x 7 projections, b=4, r=16); returns its size in MiB."""
    from bora_tools.core.adapter import BoraAdapter, BoraModule, save_adapter
    from bora_tools.core.config import BoraConfig

    config = BoraConfig(r=R, bora_blocks=B, lora_alpha=2 * R, target_modules=list(LLAMA7B), task_type="CAUSAL_LM")
    modules = {}
    for layer in range(LAYERS):
        for kind, (m, n) in LLAMA7B.items():
            part = "self_attn" if kind.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            name = f"model.layers.{layer}.{part}.{kind}"
            A, Bm, sigma = _factors(m, n, seed=layer * 10 + len(kind))
            modules[name] = BoraModule(name, A, Bm, sigma, config.scaling_for(name))
    save_adapter(BoraAdapter(config=config, modules=modules), path)
    return sum(p.stat().st_size for p in path.iterdir()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    args = parser.parse_args()
    fast_reps, dense_reps = (3, 1) if args.quick else (21, 1)  # one dense SVD takes 0.1-2 min here
    results = {"layers": [], "adapter": {}}
    for m, n in SHAPES:
        row = {}
        dense = dense_reps if m * n > 4096 * 4096 else 3 * dense_reps  # 4096^2: seconds to a minute each
        for method, reps in (("gram", fast_reps), ("qr", fast_reps), ("lowrank", fast_reps), ("dense", dense)):
            row[method] = _child(_layer_job, method, m, n, reps)
            print(
                f"{m}x{n} {method:8s} median {row[method]['median_s'] * 1e3:10.1f} ms over {reps} run(s) "
                f"({row[method]['threads']} thread(s)), peak +{row[method]['peak_extra_mib']:.0f} MiB",
                flush=True,
            )
        _report_layer(row, m, n)
        results["layers"].append(row)
    with tempfile.TemporaryDirectory(prefix="bench-to-lora-") as tmp:
        adapter = Path(tmp) / "bora-7b"
        t0 = time.perf_counter()
        size = _make_7b_adapter(adapter)
        print(
            f"\n7B-shaped BoRA adapter: {LAYERS} layers x {len(LLAMA7B)} projections, b={B}, r={R}, "
            f"{size:.0f} MiB on disk (built in {time.perf_counter() - t0:.1f} s)",
            flush=True,
        )
        for kwargs in ({"rank": 16}, {"energy": 0.9}, {"rank": "full"}):
            res = _child(_adapter_job, str(adapter), str(Path(tmp) / "lora"), kwargs)
            results["adapter"][json.dumps(kwargs)] = res
            print(
                f"to_lora {kwargs}: {res['seconds']:.2f} s end to end (read, convert, write "
                f"{res['out_mib']:.0f} MiB), peak +{res['peak_extra_mib']:.0f} MiB, "
                f"worst rel. error {res['totals']['max_rel_error']:.3e}",
                flush=True,
            )
            shutil.rmtree(Path(tmp) / "lora", ignore_errors=True)
    _report_extrapolation(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def _report_layer(row: dict, m: int, n: int) -> None:
    g, q, d, lr = row["gram"], row["qr"], row["dense"], row["lowrank"]
    s_d = d["S"][: B * R]
    diffs = {name: max(abs(a - b) for a, b in zip(row[name]["S"][: B * R], s_d)) / s_d[0] for name in ("gram", "qr")}
    print(
        f"  {m}x{n}: dense / gram = {d['median_s'] / g['median_s']:,.0f}x, dense / qr = "
        f"{d['median_s'] / q['median_s']:,.0f}x, svd_lowrank / gram = {lr['median_s'] / g['median_s']:,.1f}x; "
        f"same spectrum: max |S - S_dense| / S_0 = {diffs['gram']:.1e} (gram), {diffs['qr']:.1e} (qr) against "
        f"dense float32; S_dense[{B * R}] / S_0 = {d['S'][B * R] / s_d[0]:.1e}; svd_lowrank error at rank {K}: "
        f"{lr['lowrank_error_over_optimum']:.6f}x the optimum",
        flush=True,
    )


def _report_extrapolation(results: dict) -> None:
    by_shape = {tuple(row["gram"]["shape"]): row for row in results["layers"]}
    # gate/up (11008x4096) are costed as down_proj's transpose (4096x11008): the same SVD work.
    per_layer = {
        method: sum(
            by_shape[(4096, 4096) if shape == (4096, 4096) else (4096, 11008)][method]["median_s"]
            for shape in LLAMA7B.values()
        )
        for method in ("gram", "qr", "dense", "lowrank")
    }
    measured = results["adapter"][json.dumps({"rank": 16})]["seconds"]
    print(
        f"\nwhole 7B-shaped adapter, extrapolated from the single layers (x{LAYERS} layers, not run): "
        f"dense {per_layer['dense'] * LAYERS / 60:.0f} min, svd_lowrank {per_layer['lowrank'] * LAYERS:.0f} s; "
        f"per-module conversion alone: gram {per_layer['gram'] * LAYERS:.1f} s, qr {per_layer['qr'] * LAYERS:.1f} s. "
        f"Measured to_lora --rank 16 end to end: {measured:.1f} s "
        f"({per_layer['dense'] * LAYERS / measured:,.0f}x faster than the dense route)"
    )


if __name__ == "__main__":
    main()
