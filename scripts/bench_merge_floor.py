"""``bora-tools merge`` against its floor: starting Python and importing torch, then copying the base.

Issue 18's benchmark: a synthetic Llama-shaped bf16 base (``--layers``, hidden 2048, one shard,
written by ``safetensors.torch.save_file``) and a BoRA adapter on all seven projections of every
layer (``b=4``, ``r=16``: ``b*r = 64``). Each round runs, in rotating order and each in its own
process (wall time, user + system CPU and peak RSS from ``os.wait4``):

  floor   ``python -c "import torch"``, then ``cp -r`` of the base directory (the two times added)
  merge   ``python -m bora_tools.cli merge ADAPTER --base BASE --out OUT --device cpu --quiet``
          with ``PYTHONPATH`` at this tree, and at ``--before TREE`` too when given

and reports the medians and, per round, the ratios merge / floor (and after / before). The merged
``model.safetensors`` of both trees is compared by sha256. ``--profile`` also runs the merge's
steps in this process on one thread and prints the CPU seconds of each (read, widen, update,
check, round, write), after the timed rounds.

Usage (tmpfs: about 7 GB at the peak, removed at the end; a few minutes):

    python scripts/bench_merge_floor.py --layers 16 --repeats 7 --profile [--before /tmp/tree-before]

Never imported by the package or the tests.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TREE = HERE.parent
RANK, BLOCKS = 16, 4  # b*r = 64


def _wait(proc: subprocess.Popen) -> dict:
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"{proc.args} failed with exit code {os.waitstatus_to_exitcode(status)}")
    return {"cpu": usage.ru_utime + usage.ru_stime, "rss_mib": usage.ru_maxrss / 1024}


def timed(args: list[str], env: dict | None = None) -> dict:
    """Wall time, CPU time and peak RSS of one process."""
    start = time.perf_counter()
    usage = _wait(subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return {"wall": time.perf_counter() - start, **usage}


def floor(work: Path) -> dict:
    shutil.rmtree(work / "out-copy", ignore_errors=True)
    imports = timed([sys.executable, "-c", "import torch"])
    copy = timed(["cp", "-r", str(work / "base"), str(work / "out-copy")])
    return {"wall": imports["wall"] + copy["wall"], "cpu": imports["cpu"] + copy["cpu"],
            "rss_mib": max(imports["rss_mib"], copy["rss_mib"])}


def merge(work: Path, tree: Path, label: str) -> dict:
    out = work / f"out-{label}"
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return timed([sys.executable, "-m", "bora_tools.cli", "merge", str(work / "bora"), "--base", str(work / "base"),
                  "--out", str(out), "--device", "cpu", "--quiet"], env=env)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def setup(work: Path, layers: int) -> None:
    """In a child process (its memory never counts): the base and the adapter."""
    sys.path.insert(0, str(HERE))
    from bench_merge import build_adapters
    from synthetic import write_model

    write_model(work / "base", layers)
    build_adapters(work / "base", work / "bora", work / "lora", layers, rank=RANK, blocks=BLOCKS)
    shutil.rmtree(work / "lora")


def profile(work: Path) -> None:
    """CPU seconds (this thread, torch on one thread) of each step of the merge, over every adapted weight."""
    import torch

    from bora_tools.core.adapter import load_adapter
    from bora_tools.core.dtypes import cast_finite
    from bora_tools.core.row_merge import RowMerger, chunk_elements, merge_plan, row_chunks
    from bora_tools.io.model_dir import ModelDir, read_rows

    torch.set_num_threads(1)
    base = ModelDir.open(work / "base")
    plan = merge_plan(load_adapter(work / "bora"), base)
    steps = dict.fromkeys(("read", "widen", "update", "check", "round", "write"), 0.0)
    fd, out_fd = os.open(base.path / "model.safetensors", os.O_RDONLY), os.open(work / "profile.out", os.O_WRONLY
                                                                                  | os.O_CREAT | os.O_TRUNC)
    clock, values = time.thread_time, 0
    for name, module in plan.items():
        entry = base.entries[name]
        merger = RowMerger(module, fan_in_fan_out=False)
        rows, cols = entry.shape
        ranges = list(row_chunks(rows, cols, chunk=chunk_elements("cpu")))
        height = ranges[0][1] - ranges[0][0]
        buf = torch.empty(height * cols * 2, dtype=torch.uint8)
        work_f32, out = torch.empty(height, cols), torch.empty(height, cols, dtype=torch.bfloat16)
        for start, stop in ranges:
            values += (stop - start) * cols
            t0 = clock()
            w_rows = read_rows(entry, start, stop, fd=fd, buf=buf)
            t1 = clock()
            work_f32[: stop - start].copy_(w_rows)  # the widening alone, to apportion RowMerger.rows
            t2 = clock()
            merged = merger.rows(w_rows, start, work=work_f32[: stop - start])  # widen + update + check
            t3 = clock()
            float(merged.sum())  # the check's gate alone
            t4 = clock()
            rounded = cast_finite(merged, torch.bfloat16, name, out=out[: stop - start])
            t5 = clock()
            os.write(out_fd, rounded.view(torch.uint8).numpy())
            t6 = clock()
            widen, check = t2 - t1, t4 - t3
            steps["read"] += t1 - t0
            steps["widen"] += widen
            steps["check"] += check
            steps["update"] += (t3 - t2) - widen - check
            steps["round"] += t5 - t4
            steps["write"] += t6 - t5
    os.close(fd)
    os.close(out_fd)
    os.unlink(work / "profile.out")
    total = sum(steps.values())
    print(f"{len(plan)} adapted weights, {values / 1e6:.0f}M values, {values * 2 / 2**30:.2f} GiB bf16; "
          f"CPU seconds on one thread:")
    print("| step | CPU s | share |\n|---|---:|---:|")
    for step, seconds in steps.items():
        print(f"| {step} | {seconds:.2f} | {100 * seconds / total:.0f}% |")
    print(f"| total | {total:.2f} | |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--before", type=Path, help="another checkout of bora-tools, timed side by side")
    parser.add_argument("--profile", action="store_true", help="also the CPU seconds of each step")
    parser.add_argument("--workdir", type=Path, default=Path("/dev/shm/bench-merge-floor"))
    parser.add_argument("--setup", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = args.workdir
    if args.setup:
        setup(work, args.layers)
        return
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        subprocess.run([sys.executable, __file__, "--setup", "--layers", str(args.layers), "--workdir", str(work)],
                       check=True)
        size = (work / "base" / "model.safetensors").stat().st_size
        print(f"base: {args.layers} layers, {size / 1e9:.2f} GB ({size / 2**30:.2f} GiB) bf16; adapter b={BLOCKS}, "
              f"r={RANK} on 7 projections x {args.layers} layers")
        trees = {"merge": TREE, **({"merge before": args.before.resolve()} if args.before else {})}
        kinds = ["floor", *trees]
        runs: dict[str, list[dict]] = {k: [] for k in kinds}
        load = [os.getloadavg()[0]]
        for rep in range(args.repeats + 1):  # the first round warms the page cache and is not counted
            for kind in kinds[rep % len(kinds):] + kinds[: rep % len(kinds)]:
                got = floor(work) if kind == "floor" else merge(work, trees[kind], kind.replace(" ", "-"))
                if rep:
                    runs[kind].append(got)
            load.append(os.getloadavg()[0])
        digests = {kind: sha256(work / f"out-{kind.replace(' ', '-')}" / "model.safetensors") for kind in trees}
        print(json.dumps({"runs": runs, "sha256": digests}))
        print(f"\n{args.repeats} rounds, rotating order; load average (1 min) {min(load):.1f}-{max(load):.1f} on "
              f"{os.cpu_count()} CPUs\n")
        print("| contender | wall (median) | x floor | CPU s (median) | x floor | peak RSS |")
        print("|---|---:|---:|---:|---:|---:|")
        for kind in kinds:
            med = {f: statistics.median(r[f] for r in runs[kind]) for f in ("wall", "cpu", "rss_mib")}
            ratio = {f: statistics.median(r[f] / fl[f] for r, fl in zip(runs[kind], runs["floor"]))
                     for f in ("wall", "cpu")}
            print(f"| {kind} | {med['wall']:.2f} s | {ratio['wall']:.2f} | {med['cpu']:.2f} s | {ratio['cpu']:.2f} | "
                  f"{med['rss_mib']:.0f} MiB |")
        if args.before:
            ratio = {f: statistics.median(a[f] / b[f] for a, b in zip(runs["merge"], runs["merge before"]))
                     for f in ("wall", "cpu")}
            same = "identical" if len(set(digests.values())) == 1 else "DIFFERENT"
            print(f"\nmerge after / before (median of per-round ratios): wall {ratio['wall']:.2f}, "
                  f"CPU {ratio['cpu']:.2f}; merged model.safetensors {same} (sha256 {digests['merge'][:16]}...)")
        else:
            print(f"\nmerged model.safetensors sha256 {digests['merge']}")
        if args.profile:  # last: this process imports torch only now, after every timed child
            sys.path.insert(0, str(TREE))
            print()
            profile(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
