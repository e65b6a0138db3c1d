"""A/B benchmark of two source trees of bora-tools: did a refactor make merge, to-lora or export-gguf slower?

Both trees run the same CLI commands on the same inputs, each command in its own subprocess with
``PYTHONPATH`` pointing at one tree (so its peak RSS is its own, from ``os.wait4``), alternating
A, B, A, B, ... so that a shared machine's noise falls on both alike. Reports the median wall time
and peak RSS per tree and the ratio B/A per workload.

Inputs (built once with the current tree, in ``--workdir``):
  merge        a synthetic Llama-shaped bf16 model (``--layers``, hidden 2048) and a BoRA adapter on
               every projection (b=4, r=8)
  to-lora      a 7B-shaped BoRA adapter (32 layers x 7 projections, b=4, r=16), ``--rank 16``
  export-gguf  the same model with a SentencePiece tokenizer, ``--outtype f16`` and ``q8_0``

Usage (the redesign's check: the commit before it against HEAD):

    git worktree add --detach /tmp/tree-before 8fd8a41
    python scripts/bench_layout.py --a /tmp/tree-before --b . --layers 4 --repeats 3

Never imported by the package or the tests.
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

from bench_gguf import build_model  # noqa: E402  (scripts/ is on sys.path when run)
from bench_merge import build_adapters  # noqa: E402
from bench_to_lora import _make_7b_adapter  # noqa: E402


def run(tree: Path, args: list[str]) -> dict:
    """Wall time and peak RSS of ``python -m bora_tools.cli ARGS`` with ``tree`` first on the path."""
    env = {**os.environ, "PYTHONPATH": str(tree.resolve())}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "bora_tools.cli", *args, "--quiet"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"{tree}: bora-tools {' '.join(args)} failed:\n{stderr.decode()[-2000:]}")
    # CPU time (user + system) is the steadier figure on a shared machine: waiting for a core does not count.
    return {"seconds": wall, "cpu_seconds": usage.ru_utime + usage.ru_stime, "peak_rss_mib": usage.ru_maxrss / 1024}


def workloads(work: Path) -> dict[str, list[str]]:
    out = work / "out"
    return {
        "merge": ["merge", str(work / "bora"), "--base", str(work / "base"), "--out", str(out / "merged"),
                  "--device", "cpu", "--overwrite"],
        "to-lora --rank 16 (7B-shaped)": ["to-lora", str(work / "bora7b"), "--out", str(out / "lora"), "--rank", "16",
                                          "--device", "cpu", "--overwrite"],
        "export-gguf f16": ["export-gguf", str(work / "base"), "--out", str(out / "f16.gguf"), "--outtype", "f16",
                            "--overwrite"],
        "export-gguf q8_0": ["export-gguf", str(work / "base"), "--out", str(out / "q8.gguf"), "--outtype", "q8_0",
                             "--overwrite"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--a", type=Path, required=True, help="the tree before (the baseline)")
    parser.add_argument("--b", type=Path, required=True, help="the tree after")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path("/dev/shm/bench-layout"))
    parser.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = args.workdir
    if args.build_only:  # in a child: building in the parent would inflate every forked child's peak RSS
        size = build_model(work / "base", args.layers)
        build_adapters(work / "base", work / "bora", work / "lora-exact", args.layers)
        _make_7b_adapter(work / "bora7b")
        (work / "size").write_text(str(size))
        return
    shutil.rmtree(work, ignore_errors=True)
    (work / "out").mkdir(parents=True)
    try:
        subprocess.run([sys.executable, __file__, "--a", str(args.a), "--b", str(args.b), "--layers", str(args.layers),
                        "--workdir", str(work), "--build-only"], check=True)
        size = int((work / "size").read_text())
        results: dict[str, dict[str, list[dict]]] = {}
        for name, cli_args in workloads(work).items():
            runs = results.setdefault(name, {"a": [], "b": []})
            for i in range(args.repeats):
                for side in (("a", "b") if i % 2 == 0 else ("b", "a")):
                    runs[side].append(run(getattr(args, side), cli_args))
            secs = {side: [round(r["seconds"], 2) for r in runs[side]] for side in runs}
            print(f"{name}: before {secs['a']} after {secs['b']}", flush=True)
        print(f"\nmodel: {args.layers} layers, {size / 2**20:.0f} MiB bf16; "
              f"{args.repeats} runs per tree, alternating\n")
        print("| workload | wall s before / after | after/before | CPU s before / after | after/before "
              "| peak RSS MiB before / after |")
        print("|---|---|---|---|---|---|")
        for name, runs in results.items():
            ta, tb = (statistics.median(r["seconds"] for r in runs[s]) for s in ("a", "b"))
            ca, cb = (statistics.median(r["cpu_seconds"] for r in runs[s]) for s in ("a", "b"))
            ma, mb = (statistics.median(r["peak_rss_mib"] for r in runs[s]) for s in ("a", "b"))
            print(f"| {name} | {ta:.2f} / {tb:.2f} | {tb / ta:.2f}x | {ca:.2f} / {cb:.2f} | {cb / ca:.2f}x "
                  f"| {ma:.0f} / {mb:.0f} |")
        (work.parent / "bench-layout.json").write_text(json.dumps(results, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
