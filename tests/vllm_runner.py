"""Prompt logprobs from vLLM, run in vLLM's own venv (scripts/vllm_venv.sh) by tests/test_vllm.py.

Reads a JSON job on stdin::

    {"model": DIR, "prompts": [[ids...], ...], "adapters": {"name": LORA_DIR, ...}, "max_lora_rank": 16}

and prints one JSON line: ``{"base": [[logprob of token i given tokens < i, for i >= 1], ...],
"adapters": {"name": [[...], ...]}, "vllm": VERSION}``. The engine runs in float32 on the CPU, in this
process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), with every adapter served through ``LoRARequest``.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def main() -> None:
    job = json.loads(sys.stdin.read())
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    llm = LLM(model=job["model"], dtype="float32", enforce_eager=True, max_model_len=128, seed=0,
              enable_lora=bool(job["adapters"]), max_lora_rank=job.get("max_lora_rank", 16), max_loras=1,
              max_num_seqs=1)
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in job["prompts"]]

    def logprobs(lora: LoRARequest | None) -> list[list[float]]:
        rows = []
        for ids, prompt in zip(job["prompts"], prompts, strict=True):
            # One prompt per call: with LoRA enabled, vLLM 0.32's CPU logits processor indexes the LoRA of
            # each sequence, not of each prompt position, and a batch of prompt logprobs fails in einsum.
            (out,) = llm.generate([prompt], params, lora_request=lora, use_tqdm=False)
            # prompt_logprobs[i]: {token: Logprob} for position i (None for the first token)
            rows.append([out.prompt_logprobs[i][tok].logprob for i, tok in enumerate(ids) if i > 0])
        return rows

    result = {"vllm": vllm.__version__, "base": logprobs(None), "adapters": {}}
    for n, (name, path) in enumerate(job["adapters"].items(), start=1):
        result["adapters"][name] = logprobs(LoRARequest(name, n, path))
    print("BORA-VLLM-RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
