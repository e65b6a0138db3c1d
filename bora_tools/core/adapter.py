"""BoRA adapter directories <-> config + tensors (docs/format.md, section 2).

Reading validates everything before anyone computes: every problem found is
reported at once, each naming the key, what was expected and what was found.
"""

from __future__ import annotations

import json
import pickle
import struct
import warnings
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from bora_tools.core.config import BoraConfig, matches_target
from bora_tools.core.factors import block_problems
from bora_tools.errors import BoraError, CheckpointError, ConfigError, ShapeError, raise_if_problems
from bora_tools.io.atomic import atomic_output
from bora_tools.io.hub_input import hub_or_local
from bora_tools.io.kinds import wrong_kind

WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
SUFFIX_A, SUFFIX_B, SUFFIX_SIGMA = ".lora_A.weight", ".lora_B.weight", ".bora_sigma"
_PARTS = {SUFFIX_A: "A", SUFFIX_B: "B", SUFFIX_SIGMA: "sigma"}


@dataclass
class BoraModule:
    """One adapted linear layer ``P`` (the weight ``P.weight`` of the base is ``(m, n)``)."""

    name: str
    A: torch.Tensor  # (r, n)
    B: torch.Tensor  # (m, r)
    sigma: torch.Tensor  # (b, b, r)
    scaling: float

    @property
    def r(self) -> int:
        return self.A.shape[0]

    @property
    def b(self) -> int:
        return self.sigma.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        """``(m, n)``: the shape of ``dW`` in (out, in) order."""
        return self.B.shape[0], self.A.shape[1]

    @property
    def num_parameters(self) -> int:
        """``r*(m+n) + b*b*r``."""
        return self.A.numel() + self.B.numel() + self.sigma.numel()

    def key(self, part: str) -> str:
        suffix = {"A": SUFFIX_A, "B": SUFFIX_B, "sigma": SUFFIX_SIGMA}[part]
        return PREFIX + self.name + suffix

    def __repr__(self) -> str:  # shapes, not tensor values
        m, n = self.shape
        return (f"BoraModule({self.name!r}, shape=({m}, {n}), r={self.r}, b={self.b}, scaling={self.scaling:g}, "
                f"dtype={str(self.A.dtype).replace('torch.', '')})")


@dataclass
class BoraAdapter:
    """A validated BoRA adapter: its config, adapted modules and whole saved modules."""

    config: BoraConfig
    modules: dict[str, BoraModule]
    saved: dict[str, torch.Tensor] = field(default_factory=dict)  # "P.weight" -> tensor, for modules_to_save
    path: Path | None = None

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The flat tensor dict of ``adapter_model.safetensors``."""
        out: dict[str, torch.Tensor] = {}
        for mod in self.modules.values():
            out[mod.key("A")], out[mod.key("B")], out[mod.key("sigma")] = mod.A, mod.B, mod.sigma
        out.update({PREFIX + k: v for k, v in self.saved.items()})
        return out

    @property
    def num_parameters(self) -> int:
        return sum(m.num_parameters for m in self.modules.values())

    def __repr__(self) -> str:  # a summary, not 100,000 characters of tensor values
        where = f"{str(self.path)!r}, " if self.path is not None else ""
        saved = f", saved={sorted(self.saved)}" if self.saved else ""
        return (f"BoraAdapter({where}r={self.config.r}, b={self.config.bora_blocks}, "
                f"modules={len(self.modules)}, parameters={self.num_parameters:,}{saved})")


def load_adapter(path: str | Path, *, token: str | None = None) -> BoraAdapter:
    """Read and validate a BoRA adapter directory, or one on the Hub (``owner/name[@revision]``, ``token``).

    Example::

        adapter = load_adapter("out/my-adapter")
        adapter.modules["model.layers.0.self_attn.q_proj"].sigma.shape   # (b, b, r)
        adapter = load_adapter("someone/my-bora@v1")      # downloaded into the Hugging Face cache

    Raises:
        ConfigError: ``adapter_config.json`` is missing, not JSON or inconsistent.
        CheckpointError: tensors are unreadable, missing, unexpected, mis-shaped or non-finite.
        HubError: a Hub id that cannot be downloaded.
    """
    path = hub_or_local(path, kind="adapter", token=token).path
    wrong = wrong_kind(path, expected="adapter")
    if wrong is not None:
        raise (CheckpointError if not path.is_dir() else ConfigError)(wrong)
    config = BoraConfig.load(path)
    tensors = read_tensors(path)
    return adapter_from_tensors(config, tensors, source=path)


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The raw tensors of an adapter directory (safetensors first, legacy ``.bin`` second)."""
    st, legacy = path / WEIGHTS_NAME, path / LEGACY_WEIGHTS_NAME
    if st.is_file():
        _check_tensor_count(st)
        try:
            return load_file(st)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{st}: not a readable safetensors file ({_short(e)})") from e
    if legacy.is_file():
        return _read_legacy(legacy)
    raise CheckpointError(f"{path}: no {WEIGHTS_NAME} (or legacy {LEGACY_WEIGHTS_NAME}) found")


#: A legacy ``.bin`` may inflate to at most this many times its size on disk (and always to ``LEGACY_FREE_BYTES``):
#: ``torch.save`` stores every entry uncompressed, so an honest file inflates to about its own size; a
#: deflate-compressed archive that promises more is refused before anything is inflated.
LEGACY_MAX_RATIO = 4
LEGACY_FREE_BYTES = 64 * 2**20


def _check_legacy_sizes(path: Path) -> None:
    """Refuse a legacy ``.bin`` whose declared contents exceed what its size can honestly hold, before inflating."""
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: refused: not a zip-based torch.save file (the pre-1.6 format is not read; "
                              f"convert it to {WEIGHTS_NAME})")
    try:
        with zipfile.ZipFile(path) as z:
            declared = sum(info.file_size for info in z.infolist())
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: refused: unreadable zip archive ({_short(e)})") from e
    limit = max(LEGACY_MAX_RATIO * path.stat().st_size, LEGACY_FREE_BYTES)
    if declared > limit:
        raise CheckpointError(f"{path}: refused: its entries declare {declared:,} bytes once inflated, more than "
                              f"{LEGACY_MAX_RATIO}x the file's {path.stat().st_size:,} bytes (a decompression bomb?)")


#: Most tensors an adapter file may hold: 3 per adapted module, so 20,000 modules (a 405B model with every
#: projection adapted has under 1,000); a header that lists more is refused before any tensor is read.
MAX_ADAPTER_TENSORS = 60_000


#: Longest safetensors header an adapter may have: ``MAX_ADAPTER_TENSORS`` entries of a few hundred bytes.
MAX_ADAPTER_HEADER_BYTES = 16 * 2**20


def _check_tensor_count(path: Path) -> None:
    """Refuse a header too long, or listing too many tensors, for an adapter, before any tensor is read."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return  # the safetensors reader reports the truncation
            (n,) = struct.unpack("<Q", head)
            if 8 + n > path.stat().st_size:
                return  # a length that lies: the safetensors reader reports the corrupt file
            if n > MAX_ADAPTER_HEADER_BYTES:
                raise CheckpointError(f"{path}: a header of {n:,} bytes, more than an adapter's (at most "
                                      f"{MAX_ADAPTER_HEADER_BYTES:,})")
            header = json.loads(f.read(n))
    except (OSError, ValueError, RecursionError) as e:
        if isinstance(e, BoraError):
            raise
        return  # unreadable: the safetensors reader below says why
    count = len(header) - ("__metadata__" in header) if isinstance(header, dict) else 0
    if count > MAX_ADAPTER_TENSORS:
        raise CheckpointError(f"{path}: {count:,} tensors, more than an adapter holds (at most "
                              f"{MAX_ADAPTER_TENSORS:,}: 3 per adapted module)")


def _read_legacy(path: Path) -> dict[str, torch.Tensor]:
    _check_legacy_sizes(path)
    # weights_only=True: a pickle may only rebuild tensors and plain containers,
    # never call arbitrary code.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's protocol notes are not the user's concern
            data = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, AttributeError, TypeError) as e:
        # torch's message is boilerplate around one paragraph that names what was refused
        paragraphs = [p.strip() for p in str(e).split("\n\n") if p.strip()][1:]
        detail = next((p for p in paragraphs if not p.startswith("Check the documentation")), None)
        why = f"the pickle asks for more than tensors: {_short(detail)}" if detail else _short(e)
        raise CheckpointError(f"{path}: refused: not a plain tensor file ({why})") from e
    plain = isinstance(data, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items())
    if not plain:
        raise CheckpointError(f"{path}: refused: expected a dict of named tensors")
    return data


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:200] + ("..." if len(text) > 200 else "")


def adapter_from_tensors(
    config: BoraConfig, tensors: Mapping[str, torch.Tensor], *, source: str | Path = "adapter"
) -> BoraAdapter:
    """Group flat tensors into modules and validate them against each other and the config."""
    problems: list[str] = []
    parts: dict[str, dict[str, torch.Tensor]] = {}
    saved: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        module, part = _split_key(key, config)
        if part is None:
            problems.append(
                f"{key}: unexpected key (expected {PREFIX}<module>{SUFFIX_A}, {SUFFIX_B} or {SUFFIX_SIGMA}, "
                f"or <module>.weight/.bias for a module in modules_to_save)"
            )
        elif part == "saved":
            saved[key[len(PREFIX) :]] = tensor
        else:
            parts.setdefault(module, {})[part] = tensor
        if part is not None:
            problems.extend(_value_problems(key, tensor))
    modules = {}
    for name in sorted(parts, key=_natural_key):
        mod_problems = _module_problems(name, parts[name], config)
        problems.extend(mod_problems)
        if not mod_problems:
            p = parts[name]
            modules[name] = BoraModule(name, p["A"], p["B"], p["sigma"], config.scaling_for(name))
    if not parts and not saved and not problems:
        problems.append("no adapted module found")
    raise_if_problems(str(source), problems, cls=_error_class(problems))
    return BoraAdapter(config=config, modules=modules, saved=saved, path=Path(source) if source else None)


def _error_class(problems: list[str]) -> type:
    return ShapeError if problems and all("shape" in p for p in problems) else CheckpointError


def _split_key(key: str, config: BoraConfig) -> tuple[str, str | None]:
    if not key.startswith(PREFIX):
        return "", None
    rest = key[len(PREFIX) :]
    for suffix, part in _PARTS.items():
        if rest.endswith(suffix) and len(rest) > len(suffix):
            return rest[: -len(suffix)], part
    for suffix in (".weight", ".bias"):
        if rest.endswith(suffix) and config.is_module_to_save(rest[: -len(suffix)]):
            return rest[: -len(suffix)], "saved"
    return "", None


#: Float dtypes an adapter tensor may be stored in (float8 has no arithmetic worth merging and no isfinite).
ADAPTER_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _value_problems(key: str, tensor: torch.Tensor) -> list[str]:
    if tensor.dtype not in ADAPTER_DTYPES:
        names = ", ".join(str(d).replace("torch.", "") for d in ADAPTER_DTYPES)
        return [f"{key}: expected a float tensor ({names}), found dtype {str(tensor.dtype).replace('torch.', '')}"]
    bad = int((~torch.isfinite(tensor)).sum())
    if bad:
        return [f"{key}: {bad} non-finite value(s) (NaN or inf)"]
    return []


def _module_problems(name: str, p: dict[str, torch.Tensor], config: BoraConfig) -> list[str]:
    """Shape consistency of one module's three tensors with each other and the config."""
    key = PREFIX + name
    missing = [s for s, part in _PARTS.items() if part not in p]
    if missing:
        return [f"{key}: module is missing {', '.join(key + s for s in missing)}"]
    A, B, sigma = p["A"], p["B"], p["sigma"]
    if A.ndim != 2 or B.ndim != 2 or sigma.ndim != 3:
        return [
            f"{key}: expected 2-D lora_A, 2-D lora_B and 3-D bora_sigma shapes, found "
            f"{tuple(A.shape)}, {tuple(B.shape)}, {tuple(sigma.shape)}"
        ]
    (r, n), (m, r_b), b = A.shape, B.shape, config.bora_blocks
    if 0 in (r, n, m):
        return [f"{key}: empty factors: lora_A {tuple(A.shape)}, lora_B {tuple(B.shape)} "
                "(every dimension must be >= 1)"]
    out = []
    if r_b != r:
        out.append(f"{key + SUFFIX_B}: shape {tuple(B.shape)} has rank {r_b}, but lora_A has rank {r}")
    if tuple(sigma.shape) != (b, b, r):
        out.append(
            f"{key + SUFFIX_SIGMA}: expected shape ({b}, {b}, {r}) from bora_blocks={b} and r={r}, "
            f"found {tuple(sigma.shape)}"
        )
    want_r = config.rank_for(name)
    if r != want_r:
        out.append(f"{key + SUFFIX_A}: shape {tuple(A.shape)} has rank {r}, but the config gives r={want_r} for {name}")
    out.extend(block_problems(m, n, b, name=key))
    if config.target_modules is not None and not matches_target(config.target_modules, name):
        out.append(f"{key}: module {name} is not matched by target_modules {config.target_modules!r}")
    if config.is_module_to_save(name):
        out.append(f"{key}: module {name} is both adapted and listed in modules_to_save; its update would be "
                   f"dropped (a module is either adapted or saved whole)")
    return out


def _natural_key(name: str) -> list[tuple[int, int, str]]:
    # layers.2 before layers.10; (kind, number, text) keeps mixed components comparable
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in name.split(".")]


def check_against_base(
    adapter: BoraAdapter, shape_of: Callable[[str], tuple[int, ...] | None], *, source: str = "adapter"
) -> None:
    """Every adapted module and saved module exists in the base with matching shapes.

    ``shape_of(tensor_name)`` returns a base tensor's shape or ``None`` when
    absent. With ``fan_in_fan_out`` the base stores ``(n, m)`` (GPT-2 ``Conv1D``).

    Raises:
        ShapeError: naming every module whose base tensor is absent or mis-shaped.
    """
    problems = []
    for name, mod in adapter.modules.items():
        want = mod.shape[::-1] if adapter.config.fan_in_fan_out else mod.shape
        found = shape_of(name + ".weight")
        if found is None:
            problems.append(
                f"{PREFIX + name}: the base model has no tensor {name}.weight (is this adapter for another base model?)"
            )
        elif tuple(found) != tuple(want):
            problems.append(
                f"{PREFIX + name}: the adapter implies base shape {tuple(want)} for {name}.weight, "
                f"the base has {tuple(found)} (is this adapter for another base model?)"
            )
    for key, tensor in adapter.saved.items():
        found = shape_of(key)
        if found is None:
            problems.append(f"{PREFIX + key}: modules_to_save tensor has no counterpart {key} in the base model")
        elif tuple(found) != tuple(tensor.shape):
            problems.append(f"{PREFIX + key}: shape {tuple(tensor.shape)} differs from the base's {tuple(found)}")
    raise_if_problems(source, problems, cls=ShapeError)


def save_adapter(adapter: BoraAdapter, path: str | Path, *, overwrite: bool = False,
                 extra: Callable[[Path], object] | None = None) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` atomically.

    The adapter is validated first (``adapter_from_tensors``), so a saved
    directory always loads back. ``extra(directory)`` writes other files into the
    directory before it appears (``train`` saves the tokenizer there).
    """
    tensors = {k: v.detach().contiguous().cpu() for k, v in adapter.state_dict().items()}
    adapter_from_tensors(adapter.config, tensors, source=PREFIX.rstrip("."))
    path = Path(path)
    with atomic_output(path, overwrite=overwrite, directory=True) as tmp:
        adapter.config.save(tmp)
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        if extra is not None:
            extra(tmp)
    return path
