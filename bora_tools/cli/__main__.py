"""``python -m bora_tools.cli``: what torchrun and ``accelerate launch`` run."""

from bora_tools.cli.app import main

if __name__ == "__main__":
    main()
