"""``train --config FILE.yaml``: the options of a run in a YAML file, as ``trl sft --config`` reads them.

Keys are the options' names, spelt as the field (``lr``, ``max_steps``), or as any of its flags
without the dashes, with ``-`` or ``_`` (``learning-rate``, ``learning_rate``: TRL's long names are
aliases of the options they match). ``extra`` keys are the command's other parameters
(``base``, ``data``, ``out``...). An unknown key is an error naming it (with the closest known key):
a misspelt option must not be silently ignored. Values are converted as the command line converts
them; a flag given on the command line wins over the file.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bora_tools.errors import ValidationError, raise_if_problems
from bora_tools.training.options import TrainOptions

MAX_BYTES = 1 << 20  # a config file is a few hundred bytes


def key_names(extra: Iterable[str] = ()) -> dict[str, str]:
    """Every accepted spelling of a key -> the name it stands for."""
    names = {name: name for name in extra}
    for f in dataclasses.fields(TrainOptions):
        names[f.name] = f.name
        for flag in f.metadata["flag"].names:
            if flag.startswith("--"):
                names[flag[2:]] = names[flag[2:].replace("-", "_")] = f.name
    for name in list(names):
        names.setdefault(name.replace("_", "-"), names[name])
    return names


def read_config_file(path: str | Path, *, extra: Iterable[str] = ()) -> dict[str, Any]:
    """The file's keys, mapped to option (field) names or ``extra`` names, with their values as written.

    Raises:
        ValidationError: the file cannot be read, is not a YAML mapping, or holds an unknown or repeated key.
    """
    import yaml

    path = Path(path)
    try:
        if path.stat().st_size > MAX_BYTES:
            raise ValidationError(f"`config` {path}: over {MAX_BYTES >> 20} MiB, not a config file")
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else " ".join(str(e).split())
        raise ValidationError(f"`config` {path}: cannot be read ({why})") from None
    except yaml.YAMLError as e:
        raise ValidationError(f"`config` {path}: not valid YAML ({' '.join(str(e).split())[:160]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValidationError(f"`config` {path}: expected a mapping of option names to values, "
                              f"found {type(data).__name__}")
    names = key_names(extra)
    values: dict[str, Any] = {}
    problems = []
    for key, value in data.items():
        name = names.get(str(key))
        if name is None:
            close = difflib.get_close_matches(str(key), list(names), n=1)
            problems.append(f"{key!r} is not an option of train" + (f" (did you mean {close[0]!r}?)" if close else ""))
        elif name in values:
            problems.append(f"{key!r} repeats the option {name!r}")
        else:
            values[name] = value
    raise_if_problems(f"`config` {path}", problems)
    return values
