"""``verify``: prove an output (merged model, PEFT LoRA, GGUF model or LoRA) in the program that consumes it.

- ``reference``: the prompts, and the BoRA adapter on its base in transformers (float32, float64 with ``precise``).
- ``engines``: what the output is, and its run in transformers, PEFT or llama.cpp.
- ``measures``: max relative logit error, KL, top-1 agreement, correlation; each output type's tolerance.
- ``report``: ``VerifyReport``; ``command``: ``verify`` itself.
"""

from bora_tools.verification.command import verify
from bora_tools.verification.report import VerificationFailed, VerifyReport

__all__ = ["verify", "VerifyReport", "VerificationFailed"]
