"""Benchmark ``export-gguf`` with three ``--outtype`` in one run against three runs of one type each.

The synthetic llama-shaped bf16 model of ``bench_gguf.py`` (random weights, hidden 2048) to
q4_k_m, q5_k_m and q8_0:

- one run: ``bora-tools export-gguf MODEL --out DIR/ --outtype q4_k_m --outtype q5_k_m --outtype q8_0``
  (the source read once: q8_0 written by our writer and the intermediate for llama.cpp's quantizer in the
  same pass, then two quantizations from that one intermediate);
- three runs: ``bora-tools export-gguf MODEL --out DIR/ --outtype T`` for each type, one after the other.

Each command runs in its own child process: wall time, CPU time and peak RSS (``os.wait4``; the three
runs: summed times, largest RSS); peak disk sampled every 50 ms over the output folder. Routes alternate
their order; the outputs of both routes are compared byte for byte.

    python scripts/bench_gguf_many.py --layers 3 --repeats 2 --workdir /tmp/bench-many

Prints a markdown table of medians (and writes ``results.json`` in the workdir). Never imported by the
package or the tests.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_gguf import build_model  # noqa: E402  (scripts/ is on sys.path when run)
from bench_quant import DiskSampler  # noqa: E402
from synthetic import HIDDEN  # noqa: E402

TYPES = ("q4_k_m", "q5_k_m", "q8_0")


def run(cmd: list[str]) -> dict:
    """Wall time, CPU time (user + system: the work done, less sensitive to a shared machine's load) and peak
    RSS of one child process (``os.wait4``)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"{cmd[:4]} failed:\n{stderr.decode()[-3000:]}")
    return {"seconds": time.perf_counter() - start, "cpu_seconds": usage.ru_utime + usage.ru_stime,
            "peak_rss_mib": usage.ru_maxrss / 1024}


def export(model: Path, outdir: Path, types: tuple[str, ...], threads: int) -> dict:
    cmd = [sys.executable, "-m", "bora_tools.cli", "export-gguf", str(model), "--out", f"{outdir}/", "--threads",
           str(threads), "--quiet"]
    for t in types:
        cmd += ["--outtype", t]
    return run(cmd)


def one_run(model: Path, outdir: Path, threads: int) -> dict:
    outdir.mkdir(parents=True)
    with DiskSampler(outdir) as disk:
        r = export(model, outdir, TYPES, threads)
    return {**r, "peak_disk_mib": disk.peak / 2**20}


def three_runs(model: Path, outdir: Path, threads: int) -> dict:
    outdir.mkdir(parents=True)
    with DiskSampler(outdir) as disk:
        steps = [export(model, outdir, (t,), threads) for t in TYPES]
    return {"seconds": sum(s["seconds"] for s in steps), "cpu_seconds": sum(s["cpu_seconds"] for s in steps),
            "peak_rss_mib": max(s["peak_rss_mib"] for s in steps),
            "peak_disk_mib": disk.peak / 2**20, "steps": steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench-many"))
    ap.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    model, outdir = args.workdir / "model", args.workdir / "out"
    if args.build_only:
        build_model(model, args.layers)
        return
    shutil.rmtree(args.workdir, ignore_errors=True)
    # Built in a child, so that this parent stays small (no torch).
    subprocess.run([sys.executable, __file__, "--build-only", "--layers", str(args.layers), "--workdir",
                    str(args.workdir)], check=True)
    size = (model / "model.safetensors").stat().st_size
    print(f"model: {args.layers} layers, hidden {HIDDEN}, bf16, {size / 2**30:.2f} GiB; {args.threads} threads; "
          f"types {', '.join(TYPES)}", flush=True)
    results: dict[str, list[dict]] = {"one run": [], "three runs": []}
    identical = None
    for rep in range(args.repeats):
        order = list(results) if rep % 2 == 0 else list(reversed(results))
        for route in order:
            where = outdir / route.replace(" ", "-")
            r = one_run(model, where, args.threads) if route == "one run" else three_runs(model, where, args.threads)
            results[route].append(r)
            print(f"  {route:10} {r['seconds']:7.1f} s  CPU {r['cpu_seconds']:7.1f} s  "
                  f"peak RSS {r['peak_rss_mib']:6.0f} MiB  peak disk {r['peak_disk_mib']:6.0f} MiB", flush=True)
        if identical is None:
            names = sorted(p.name for p in (outdir / "one-run").iterdir())
            identical = {n: filecmp.cmp(outdir / "one-run" / n, outdir / "three-runs" / n, shallow=False)
                         for n in names}
            print(f"  byte-identical: {identical}", flush=True)
        shutil.rmtree(outdir)
    print("\n| route | wall s (median) | CPU s (median) | peak RSS MiB (median) | peak disk MiB (median) |")
    print("|---|---|---|---|---|")
    med = {}
    for route, runs in results.items():
        med[route] = {k: statistics.median(r[k] for r in runs)
                      for k in ("seconds", "cpu_seconds", "peak_rss_mib", "peak_disk_mib")}
        m = med[route]
        print(f"| {route} | {m['seconds']:.1f} | {m['cpu_seconds']:.1f} | {m['peak_rss_mib']:.0f} | "
              f"{m['peak_disk_mib']:.0f} |")
    a, b = med["one run"], med["three runs"]
    print(f"\none run / three runs: time x{a['seconds'] / b['seconds']:.2f}, "
          f"CPU x{a['cpu_seconds'] / b['cpu_seconds']:.2f}, peak RSS "
          f"x{a['peak_rss_mib'] / b['peak_rss_mib']:.2f}, peak disk x{a['peak_disk_mib'] / b['peak_disk_mib']:.2f}")
    (args.workdir / "results.json").write_text(json.dumps(
        {"model_bytes": size, "layers": args.layers, "threads": args.threads, "results": results, "medians": med,
         "identical": identical}, indent=2))


if __name__ == "__main__":
    main()
