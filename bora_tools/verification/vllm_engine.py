"""A PEFT LoRA run in vLLM: its prompt logprobs, from a subprocess of vLLM's own venv.

vLLM's CPU build pins its own torch and transformers, so vLLM lives in a venv of its own
(scripts/vllm_venv.sh): ``vllm_python`` finds its python, and ``vllm_logprobs`` runs ``vllm_runner.py`` there
(one engine start, in float32) on the prompts' token ids. vLLM returns log-probabilities of the ``TOP`` most
likely tokens and of the actual next token at each position, not full logits: ``measures.measure_logprobs``
compares what that allows.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from bora_tools.conversion import vllm_max_lora_rank
from bora_tools.errors import UnsupportedError
from bora_tools.io.json import read_json
from bora_tools.verification.reference import OVERHEAD, Prompts, check_memory, weights_bytes

RUNNER = Path(__file__).with_name("vllm_runner.py")
#: the repository's vLLM venv (scripts/vllm_venv.sh's default), when bora_tools runs from a checkout
REPO_VENV = Path(__file__).resolve().parents[2] / ".venv-vllm"
#: how many of the most likely tokens vLLM returns at each position (its ``max_logprobs`` default)
TOP = 20
#: vLLM's environment (the caller's values win): the engine in the runner's process, on the CPU, 1 GiB of KV cache
ENVIRONMENT = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1",
               "VLLM_LOGGING_LEVEL": "WARNING"}
_RESULT = "BORA-VLLM-RESULT "
_HINT = "build vLLM's venv with scripts/vllm_venv.sh (or point BORA_VLLM_PYTHON at its python)"


def vllm_python() -> Path:
    """vLLM's python: ``BORA_VLLM_PYTHON``, else the repository's ``.venv-vllm``, else ``python`` on ``PATH``
    when it can import vllm.

    Raises:
        UnsupportedError: none of them, naming scripts/vllm_venv.sh.
    """
    named = os.environ.get("BORA_VLLM_PYTHON")
    if named:
        if not Path(named).is_file():
            raise UnsupportedError(f"BORA_VLLM_PYTHON {named} does not exist", hint=_HINT)
        return Path(named)
    if (REPO_VENV / "bin" / "python").is_file():
        return REPO_VENV / "bin" / "python"
    on_path = shutil.which("python")
    if on_path and _imports_vllm(on_path):
        return Path(on_path)
    raise UnsupportedError("`engine` vllm: no vLLM found (no BORA_VLLM_PYTHON, no .venv-vllm, and `python` cannot "
                           "import vllm); build its venv with scripts/vllm_venv.sh")


def _imports_vllm(python: str) -> bool:
    """Whether ``python`` finds the vllm package (without importing it: that takes seconds)."""
    if Path(python).resolve() == Path(sys.executable).resolve():
        return importlib.util.find_spec("vllm") is not None
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"
    return subprocess.run([python, "-c", probe], capture_output=True).returncode == 0


def lora_rank(lora: Path) -> int:
    """The ``--max-lora-rank`` vLLM needs for a PEFT LoRA (its largest rank, ``rank_pattern`` included).

    Raises:
        UnsupportedError: a rank above 512 (vLLM's largest).
    """
    config = read_json(lora / "adapter_config.json")
    largest = max([int(config.get("r", 8)), *(int(v) for v in (config.get("rank_pattern") or {}).values())])
    allowed = vllm_max_lora_rank(largest)
    if allowed is None:
        raise UnsupportedError(f"{lora}: rank {largest}; vLLM serves LoRA ranks up to 512")
    return allowed


def vllm_logprobs(python: Path, lora: Path, base: Path, prompts: Prompts) -> list[list[dict[int, float]]]:
    """vLLM's log-probabilities of ``lora`` on ``base``: per prompt, per position ``i`` (predicting token ``i+1``),
    ``{token: logprob}`` of the ``TOP`` most likely tokens and of the actual next token.

    Raises:
        UnsupportedError: the base does not fit in memory in float32; vLLM fails (its last line).
    """
    check_memory(int(weights_bytes(base, itemsize=4) * OVERHEAD) + 2**30, f"running {lora} in vLLM in float32",
                 device=torch.device("cpu"))
    job = {"model": str(base), "prompts": prompts.ids, "adapters": {"output": str(lora)}, "base": False,
           "max_lora_rank": lora_rank(lora), "max_model_len": max(128, max(map(len, prompts.ids)) + 1), "top": TOP}
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update({k: v for k, v in ENVIRONMENT.items() if k not in env})
    done = subprocess.run([str(python), str(RUNNER)], input=json.dumps(job), capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith(_RESULT)]
    if done.returncode != 0 or not lines:
        last = next((line.strip() for line in reversed(done.stderr.splitlines()) if line.strip()), "no message")
        raise UnsupportedError(f"vLLM ({python}) failed to run {lora} (exit {done.returncode}): {last}")
    result = json.loads(lines[-1].removeprefix(_RESULT))
    served = result["top"]["output"]
    return [[{int(tok): float(lp) for tok, lp in position} for position in prompt] for prompt in served]
