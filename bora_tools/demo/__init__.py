"""``bora-tools demo`` and the offline test support it shares: tiny models (``tiny``) and a llama.cpp runner
(``llama_run``). Library code never imports this package."""

from bora_tools.demo.run import run_demo

__all__ = ["run_demo"]
