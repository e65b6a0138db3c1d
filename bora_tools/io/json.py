"""Reading the JSON files of adapters and models, every failure one line naming the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bora_tools.errors import ConfigError


def read_json(path: Path, *, error: type = ConfigError) -> Any:
    """Parse a JSON file, turning every failure into one ``error`` naming the file.

    Example: ``read_json(Path("adapter/adapter_config.json"))`` -> ``{"peft_type": "BORA", ...}``.
    """
    if not path.is_file():
        raise error(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from e
