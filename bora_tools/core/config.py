"""``adapter_config.json`` for BoRA (docs/format.md, section 2), with PEFT's matching rules."""

from __future__ import annotations

import json
import math
import re
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import regex

from bora_tools.errors import ConfigError, raise_if_problems
from bora_tools.io.json import read_json
from bora_tools.progress import logger

PEFT_TYPE = "BORA"
CONFIG_NAME = "adapter_config.json"

#: Largest |lora_alpha| (and alpha_pattern value) accepted: alpha / r is a multiplier of the update, and beyond
#: this every merged weight is dominated by it (real adapters use 1 to a few thousand).
MAX_ALPHA = 1e6

# Keys PEFT writes into every config; kept and never warned about.
_PEFT_BOOKKEEPING = {"inference_mode", "revision", "auto_mapping", "peft_version", "lora_dropout"}


#: User patterns (``target_modules`` as one regex, ``rank_pattern`` / ``alpha_pattern`` keys) are matched with
#: PEFT's semantics on the ``regex`` engine, which can stop a match: one match may take at most
#: ``REGEX_MATCH_SECONDS`` and all matches of one pattern together ``REGEX_TOTAL_SECONDS``, so a pattern
#: with catastrophic backtracking (``([a-z_.0-9]+)+Z``) is refused in well under a second instead of
#: running for hours. A module name is a few dozen characters: an honest pattern matches in microseconds.
REGEX_MATCH_SECONDS = 0.05
REGEX_TOTAL_SECONDS = 2.0
#: Longest user pattern accepted (characters).
MAX_PATTERN_CHARS = 1000
_regex_spent: dict[str, float] = {}  # per pattern: a budget that grows with the input, never with the process


def _peft_key_regex(key: str) -> str:
    return rf"(.*\.)?({key})$"


def _guarded_match(pattern: str, name: str, *, what: str, full: bool = False, shown: str | None = None) -> bool:
    started = time.perf_counter()
    try:
        compiled = _compiled(pattern)
        found = (compiled.fullmatch if full else compiled.match)(name, timeout=REGEX_MATCH_SECONDS)
    except TimeoutError:
        raise ConfigError(f"{CONFIG_NAME}: {what} {shown or pattern!r} takes too long to match {name!r} "
                          "(catastrophic backtracking?)", hint="simplify the regular expression") from None
    except regex.error as e:
        raise ConfigError(f"{CONFIG_NAME}: {what} {shown or pattern!r} is not a valid regular expression ({e})"
                          ) from None
    finally:
        _regex_spent[pattern] = _regex_spent.get(pattern, 0.0) + time.perf_counter() - started
    if _regex_spent[pattern] > REGEX_TOTAL_SECONDS:
        raise ConfigError(f"{CONFIG_NAME}: matching {what} {shown or pattern!r} against the module names took over "
                          f"{REGEX_TOTAL_SECONDS:g} s", hint="simplify the regular expression")
    return found is not None


_COMPILED: dict[str, Any] = {}


def _compiled(pattern: str) -> Any:
    if pattern not in _COMPILED:
        if len(_COMPILED) > 4096:
            _COMPILED.clear()
            _regex_spent.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # regex's notes on syntax it may change one day
            _COMPILED[pattern] = regex.compile(pattern, flags=regex.VERSION0)
    return _COMPILED[pattern]


def pattern_key(patterns: dict[str, Any], name: str) -> str | None:
    """The first key of ``patterns`` that matches module ``name`` the way PEFT matches.

    A key matches when ``re.match(rf"(.*\\.)?({key})$", name)``: it is a suffix
    of dotted components or a regex over them. Matching is guarded against
    catastrophic backtracking (``REGEX_MATCH_SECONDS``).

    Example: ``pattern_key({"q_proj": 8}, "model.layers.0.self_attn.q_proj")`` -> ``"q_proj"``.
    """
    for key in patterns:
        if key == name or name.endswith("." + key) or _guarded_match(_peft_key_regex(key), name, what="pattern key",
                                                                      shown=key):
            return key
    return None


def matches_target(target_modules: list[str] | str | None, name: str) -> bool:
    """PEFT's ``target_modules`` rule: a regex string must fullmatch; a list entry
    must equal the name or be its dotted suffix."""
    if target_modules is None:
        return True
    if isinstance(target_modules, str):
        return _guarded_match(target_modules, name, what="target_modules", full=True)
    return any(name == t or name.endswith("." + t) for t in target_modules)


@dataclass
class BoraConfig:
    """A BoRA adapter's configuration (PEFT's layout, ``peft_type: "BORA"``).

    Example::

        cfg = BoraConfig(r=8, bora_blocks=4, lora_alpha=16, target_modules=["q_proj", "v_proj"])
        cfg.scaling_for("model.layers.0.self_attn.q_proj")   # 2.0
    """

    r: int
    bora_blocks: int
    lora_alpha: float | None = None
    use_rslora: bool = False
    target_modules: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    fan_in_fan_out: bool = False
    modules_to_save: list[str] | None = None
    base_model_name_or_path: str | None = None
    task_type: str | None = None
    bias: str = "none"
    peft_type: str = PEFT_TYPE
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.lora_alpha is None and _is_int(self.r):
            self.lora_alpha = self.r
        if isinstance(self.target_modules, (tuple, set)):
            self.target_modules = sorted(self.target_modules)
        raise_if_problems(CONFIG_NAME, self.problems(), cls=ConfigError)

    def problems(self) -> list[str]:
        """Every inconsistency, each naming the key, what was expected and what was found."""
        p: list[str] = []
        if self.peft_type != PEFT_TYPE:
            p.append(f"peft_type: expected {PEFT_TYPE!r}, found {self.peft_type!r}")
        if not _is_int(self.r) or self.r < 1:
            p.append(f"r: expected an integer >= 1, found {self.r!r}")
        if not _is_int(self.bora_blocks) or self.bora_blocks < 1:
            p.append(f"bora_blocks: expected an integer >= 1, found {self.bora_blocks!r}")
        if not _is_number(self.lora_alpha) or abs(self.lora_alpha) > MAX_ALPHA:
            p.append(f"lora_alpha: expected a finite number of magnitude at most {MAX_ALPHA:g}, "
                     f"found {self.lora_alpha!r}")
        for key in ("use_rslora", "fan_in_fan_out"):
            if not isinstance(getattr(self, key), bool):
                p.append(f"{key}: expected true or false, found {getattr(self, key)!r}")
        tm = self.target_modules
        if (
            tm is not None
            and not isinstance(tm, str)
            and not (isinstance(tm, list) and all(isinstance(t, str) for t in tm))
        ):
            p.append(f"target_modules: expected a list of names or one regex string, found {tm!r}")
        if isinstance(tm, str):
            p.extend(_regex_problems("target_modules", [tm]))
        mts = self.modules_to_save
        if mts is not None and not (isinstance(mts, list) and all(isinstance(t, str) for t in mts)):
            p.append(f"modules_to_save: expected a list of names, found {mts!r}")
        p.extend(_pattern_problems("rank_pattern", self.rank_pattern, integer=True))
        p.extend(_pattern_problems("alpha_pattern", self.alpha_pattern, integer=False))
        if self.bias != "none":
            p.append(f"bias: only 'none' is supported, found {self.bias!r}")
        return p

    # -- per-module values -------------------------------------------------
    def rank_for(self, name: str) -> int:
        key = pattern_key(self.rank_pattern, name)
        return int(self.rank_pattern[key]) if key is not None else int(self.r)

    def alpha_for(self, name: str) -> float:
        key = pattern_key(self.alpha_pattern, name)
        return float(self.alpha_pattern[key]) if key is not None else float(self.lora_alpha)

    def scaling_for(self, name: str) -> float:
        """``alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA), with per-module overrides."""
        r = self.rank_for(name)
        return self.alpha_for(name) / (math.sqrt(r) if self.use_rslora else r)

    def is_module_to_save(self, name: str) -> bool:
        return bool(self.modules_to_save) and matches_target(self.modules_to_save, name)

    # -- (de)serialisation -------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if k != "extra"}
        return {**self.extra, **data}

    @classmethod
    def from_dict(cls, data: Any, *, source: str = CONFIG_NAME) -> BoraConfig:
        """Build from parsed JSON; unknown keys are kept in ``extra`` with a warning."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, found {type(data).__name__}")
        known = {f.name for f in fields(cls)} - {"extra"}
        missing = [k for k in ("peft_type", "r", "bora_blocks") if k not in data]
        if missing:
            raise ConfigError(f"{source}: missing required key(s) {', '.join(missing)}")
        unknown = sorted(set(data) - known - _PEFT_BOOKKEEPING)
        if unknown:
            logger.warning(f"{source}: ignoring unknown key(s) {', '.join(unknown)}")
        kwargs = {k: v for k, v in data.items() if k in known}
        for key in ("rank_pattern", "alpha_pattern"):
            if kwargs.get(key) is None:
                kwargs[key] = {}
        extra = {k: v for k, v in data.items() if k not in known}
        try:
            return cls(**kwargs, extra=extra)
        except ConfigError as e:
            raise ConfigError(str(e).replace(CONFIG_NAME, source, 1)) from None

    @classmethod
    def load(cls, directory: str | Path) -> BoraConfig:
        path = Path(directory) / CONFIG_NAME
        return cls.from_dict(read_json(path), source=str(path))

    def save(self, directory: str | Path) -> None:
        (Path(directory) / CONFIG_NAME).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _regex_problems(key: str, patterns: list[str], *, wrap: bool = False) -> list[str]:
    """Invalid patterns, compiled as they are matched (a pattern key wrapped as PEFT wraps it), named."""
    out = []
    for pat in patterns:
        if len(pat) > MAX_PATTERN_CHARS:
            out.append(f"{key}: a pattern of {len(pat)} characters (at most {MAX_PATTERN_CHARS})")
            continue
        for compile_ in (re.compile, lambda p: regex.compile(p, flags=regex.VERSION0)):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)
                    compile_(_peft_key_regex(pat) if wrap else pat)
            except (re.error, regex.error, RecursionError, OverflowError) as e:
                out.append(f"{key}: {pat!r} is not a valid regular expression here ({' '.join(str(e).split())})")
                break
    return out


def _pattern_problems(key: str, pattern: Any, *, integer: bool) -> list[str]:
    if not isinstance(pattern, dict):
        return [f"{key}: expected an object mapping module names to values, found {pattern!r}"]
    out = _regex_problems(key, [k for k in pattern if isinstance(k, str)], wrap=True)
    for name, value in pattern.items():
        ok = (_is_int(value) and value >= 1) if integer else (_is_number(value) and abs(value) <= MAX_ALPHA)
        if not ok:
            want = "an integer >= 1" if integer else f"a finite number of magnitude at most {MAX_ALPHA:g}"
            out.append(f"{key}[{name!r}]: expected {want}, found {value!r}")
    return out


def pattern_keys(names: list[str]) -> dict[str, str]:
    """A ``rank_pattern`` / ``alpha_pattern`` key per module that PEFT matches to that module only.

    PEFT matches ``re.match(rf"(.*\\.)?({key})$", name)``: the escaped full name
    matches the module itself (also inside a wrapping model); where it would
    also match another adapted module (one name a dotted suffix of another),
    ``^`` anchors it at the start.

    Example: ``pattern_keys(["model.layers.0.mlp.up_proj"])`` ->
    ``{"model.layers.0.mlp.up_proj": "model\\.layers\\.0\\.mlp\\.up_proj"}``
    """
    keys = {}
    for name in names:
        key = re.escape(name)
        if any(other != name and re.match(rf"(.*\.)?({key})$", other) for other in names):
            key = "^" + key
        keys[name] = key
    return keys
