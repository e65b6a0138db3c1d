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
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    return parse_json(text, source=str(path), error=error)


def parse_json(text: str | bytes, *, source: str, error: type = ConfigError) -> Any:
    """``json.loads(text)``, every failure one ``error`` naming ``source``: bad syntax, or nesting so deep
    that the parser would exhaust the stack (a hostile file), or text that is not UTF-8.

    Example: ``parse_json("[" * 100000, source="x.json")`` raises ``ConfigError("x.json: not valid JSON (nested ...")``.
    """
    try:
        return json.loads(text)
    except UnicodeDecodeError as e:
        raise error(f"{source}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    except json.JSONDecodeError as e:
        raise error(f"{source}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from e
    except RecursionError:
        raise error(f"{source}: not valid JSON here (nested too deeply to be read)") from None
