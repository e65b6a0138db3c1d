"""bora-tools: ship BoRA adapters wherever LoRA goes.

The public Python surface is small; each stage lives in the module named after it:
``checkpoint`` (adapter directories), ``model_dir`` (Hugging Face model directories),
``math`` (pure tensor functions), ``training`` (BoRA layers for transformers models).
"""

__version__ = "0.1.0"
