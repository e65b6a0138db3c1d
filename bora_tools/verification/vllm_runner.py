"""Prompt logprobs from vLLM: the script ``verify --engine vllm`` (and tests/test_vllm.py) runs in vLLM's venv.

vLLM's CPU build pins its own torch and transformers, so it lives in its own venv (scripts/vllm_venv.sh) where
bora_tools is not installed: this file is run by path (``VENV/bin/python .../vllm_runner.py``) and imports only
``vllm``, ``json`` and ``sys``. The caller sets vLLM's environment (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: the
engine runs in this process). Reads a JSON job on stdin::

    {"model": DIR, "prompts": [[ids...], ...], "adapters": {"name": LORA_DIR, ...}, "max_lora_rank": 16,
     "max_model_len": 128, "top": 0, "base": true}

and prints one line ``BORA-VLLM-RESULT {json}``: ``{"vllm": VERSION, "base": [[logprob of token i given tokens
< i, for i >= 1], ...], "adapters": {"name": [[...], ...]}}``, plus, when ``top`` > 0, ``"top": {"base" or name:
[[[[token, logprob], ...] for each position i >= 1] for each prompt]}``: the ``top`` most likely tokens vLLM
returns at each position, and the actual token. ``"base": false`` leaves the base model's run out. The engine
runs in float32, with every adapter served through ``LoRARequest``.
"""

import json
import sys


def main() -> None:
    """Run the job read from stdin and print its result line."""
    job = json.loads(sys.stdin.read())
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    top = int(job.get("top", 0))
    llm = LLM(model=job["model"], dtype="float32", enforce_eager=True, max_model_len=job.get("max_model_len", 128),
              seed=0, enable_lora=bool(job["adapters"]), max_lora_rank=job.get("max_lora_rank", 16), max_loras=1,
              max_num_seqs=1, max_logprobs=max(top, 20))
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=top)
    result = {"vllm": vllm.__version__, "adapters": {}}
    tops = {}

    def run(name, lora):
        rows, top_rows = [], []
        for ids in job["prompts"]:
            # One prompt per call: with LoRA enabled, vLLM 0.32's CPU logits processor indexes the LoRA of
            # each sequence, not of each prompt position, and a batch of prompt logprobs fails in einsum.
            (out,) = llm.generate([TokensPrompt(prompt_token_ids=ids)], params, lora_request=lora, use_tqdm=False)
            # prompt_logprobs[i]: {token: Logprob} for position i (None for the first token)
            positions = out.prompt_logprobs[1:]
            rows.append([entries[tok].logprob for entries, tok in zip(positions, ids[1:])])
            top_rows.append([[[tok, lp.logprob] for tok, lp in entries.items()] for entries in positions])
        if top:
            tops[name] = top_rows
        return rows

    if job.get("base", True):
        result["base"] = run("base", None)
    for n, (name, path) in enumerate(job["adapters"].items(), start=1):
        result["adapters"][name] = run(name, LoRARequest(name, n, path))
    if top:
        result["top"] = tops
    print("BORA-VLLM-RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    del sys.path[0]  # this file's folder: bora_tools' modules (report.py, ...) must not shadow vLLM's imports
    main()
