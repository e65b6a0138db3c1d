"""``bora-tools demo`` and the offline test support it shares: tiny models (``tiny``); the llama.cpp runner it
uses is ``bora_tools.gguf.llama_run`` (``verify`` runs GGUF files with it too). Library code never imports
this package."""

from bora_tools.demo.run import run_demo

__all__ = ["run_demo"]
