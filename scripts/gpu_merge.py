"""Measure ``bora-tools merge --device cuda`` against the CPU path and a plain copy (one prepared run).

For a CUDA machine; a few minutes in all. It builds a synthetic llama-shaped
bf16 model in one shard (the builders of ``scripts/bench_merge.py``), a BoRA
adapter on every linear layer, then runs in fresh subprocesses, rotating the
order: a plain copy, the merge on the CPU, the merge on the GPU. It checks
that the GPU and CPU outputs agree (bf16 elements, 4 sampled adapted tensors)
and runs the CUDA test of ``tests/test_merge.py``. Figures are printed as a
markdown table and written to ``$OUT/gpu_merge.json`` when ``$OUT`` is set.

Usage:

    python scripts/gpu_merge.py --layers 16 --repeats 3 --workdir /tmp/gpu-merge
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def child(kind: str, base: Path, adapter: Path, out: Path, *, dry: bool = False) -> None:
    if kind == "copy":
        start = time.perf_counter()
        shutil.copytree(base, out)
    else:
        import torch

        from bora_tools.merge import merge_adapter

        device = "cuda" if kind == "merge-cuda" and not dry else "cpu"
        if device == "cuda":
            torch.zeros(1, device="cuda")  # CUDA context creation is not part of the merge
        start = time.perf_counter()
        merge_adapter(adapter, base, out, device=device)
    print(json.dumps({"seconds": time.perf_counter() - start}))


def run(kind: str, base: Path, adapter: Path, out: Path, *, dry: bool) -> dict:
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, __file__, "--child", kind, str(base), str(adapter), str(out)] + ["--dry"] * dry,
        stdout=subprocess.PIPE,
        text=True,
    )
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"{kind} failed")
    return {
        "seconds": json.loads(stdout.strip().splitlines()[-1])["seconds"],
        "wall": time.perf_counter() - started,
        "rss_mib": usage.ru_maxrss / 1024,
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]), Path(sys.argv[5]), dry="--dry" in sys.argv)
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/gpu-merge"))
    parser.add_argument(
        "--dry-run-cpu",
        action="store_true",
        help="check this script on a machine without CUDA (merge-cuda runs on the CPU)",
    )
    args = parser.parse_args()
    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    size = int(
        subprocess.run(
            [sys.executable, str(HERE / "bench_merge.py"), "--setup", str(args.layers), str(work)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.split()[-1]
    )
    base, bora = work / f"base-{args.layers}", work / f"bora-{args.layers}"
    kinds = ["copy", "merge-cpu", "merge-cuda"]
    runs: dict[str, list[dict]] = {k: [] for k in kinds}
    for rep in range(args.repeats):
        for kind in kinds[rep % 3 :] + kinds[: rep % 3]:
            runs[kind].append(run(kind, base, bora, work / f"out-{kind}", dry=args.dry_run_cpu))
        if rep == 0:
            agree = float(
                subprocess.run(
                    [
                        sys.executable,
                        str(HERE / "bench_merge.py"),
                        "--check",
                        str(work / "out-merge-cpu"),
                        str(work / "out-merge-cuda"),
                        str(args.layers),
                    ],
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout.split()[-1]
            )
        for kind in kinds:
            shutil.rmtree(work / f"out-{kind}")
    test = subprocess.run(
        [sys.executable, "-m", "pytest", str(HERE.parent / "tests" / "test_merge.py"), "-q", "-k", "cuda"],
        capture_output=True,
        text=True,
    )
    med = {k: {f: statistics.median(r[f] for r in v) for f in ("seconds", "wall", "rss_mib")} for k, v in runs.items()}
    lines = [
        f"model: {args.layers} layers, {size / 1e9:.2f} GB bf16, one shard; {args.repeats} repeats",
        "| contender | time (median) | x copy | peak RSS |",
        "|---|---:|---:|---:|",
    ]
    for kind in kinds:
        lines.append(
            f"| {kind} | {med[kind]['seconds']:.2f} s | {med[kind]['seconds'] / med['copy']['seconds']:.2f} | "
            f"{med[kind]['rss_mib']:.0f} MiB |"
        )
    lines.append(f"GPU and CPU outputs agree on {100 * agree:.3f}% of bf16 elements of 4 sampled adapted tensors")
    lines.append(f"CUDA test: {test.stdout.strip().splitlines()[-1] if test.stdout.strip() else test.stderr[-300:]}")
    print("\n".join(lines))
    result = {
        "layers": args.layers,
        "bytes": size,
        "runs": runs,
        "median": med,
        "cpu_cuda_equal_fraction": agree,
        "cuda_test": test.stdout[-2000:],
        "gpu": _gpu_name(),
    }
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_merge.json").write_text(json.dumps(result, indent=2))
    shutil.rmtree(work)


def _gpu_name() -> str:
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"], capture_output=True, text=True
        )
    except OSError:
        return "unknown (no nvidia-smi)"
    return done.stdout.strip() or "unknown"


if __name__ == "__main__":
    main()
