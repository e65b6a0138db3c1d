"""Shared inputs of the tests, each built once per session: tiny base models and BoRA adapters on them.

Everything goes through ``tiny`` (a ``TinyStore``), which builds on the first request and hands out the
same directory afterwards::

    tiny.base("qwen2", max_shard_size="40KB")    # what bora_tools.demo.tiny.build_model_dir writes
    tiny.adapter("llama", r=4, bora_blocks=4, randomize=1)    # a saved adapter on build_model("llama")

``llama_base``, ``mistral_base``, ``qwen2_base``, ``gpt2_base`` (one float32 safetensors file each) and
``llama_sharded`` (shards of 40KB) name the common ones; a test module's own combinations are declared
in the module (``tiny.adapter(...)`` with its configuration) and built here.

Shared directories are read only. A test that changes its input works on a copy: ``fresh_copy`` (this
test's own copy of a shared directory) or ``gguf_support.tiny_dir`` (a writable tiny model directory,
copied from the shared build). After each test module every shared directory is compared with what was
built; a change fails that module, and the store forgets the directory, so later modules get a new one
(the named fixtures are module-scoped for that reason).

The bad-input harness (``cli_support``) takes its inputs from here: ``pristine`` (a sharded llama base,
an adapter on it, an adapter on another base; shared) and ``work`` (this test's copies of the base and the
adapter, and an empty ``outdir``).
"""

from __future__ import annotations

import itertools
import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import gguf_support
import pytest
import torch

from bora_tools.core.config import BoraConfig
from bora_tools.demo.tiny import build_model, default_targets, save_model_dir
from bora_tools.training import add_bora, randomize_bora, save_bora


def _frozen(kwargs: dict) -> str:
    """A cache key for keyword arguments (values are plain data: numbers, strings, lists, dicts)."""
    return repr(sorted(kwargs.items()))


def _label(arch: str, kwargs: dict) -> str:
    return "-".join([arch, *(f"{k}{v}" for k, v in sorted(kwargs.items()))])


def _fingerprint(path: Path) -> list[tuple[str, int, int]]:
    """Every entry under ``path`` with its size and modification time: a write, a new or a removed file shows."""
    entries = [path, *path.rglob("*")]
    return sorted((p.relative_to(path).as_posix(), p.lstat().st_size, p.lstat().st_mtime_ns) for p in entries)


@dataclass
class TinyAdapter:
    """A saved BoRA adapter (shared: read only) and the in-memory model it was saved from."""

    path: Path
    arch: str
    config: BoraConfig
    model_kwargs: dict
    _model: torch.nn.Module = field(repr=False)
    _store: TinyStore = field(repr=False)

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """The BoRA model's float32 logits on ``ids`` (batch, tokens): a new tensor on every call."""
        with torch.no_grad():
            return self._model(ids).logits.float()

    def base_logits(self, ids: torch.Tensor) -> torch.Tensor:
        """The base model's float32 logits on ``ids``, without the adapter."""
        with torch.no_grad():
            return self._store._base_model(self.arch, self.model_kwargs)(ids).logits.float()


class TinyStore:
    """Tiny model directories and BoRA adapters, built on first request and kept for the session."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory):
        self._factory = tmp_path_factory
        self._roots: dict[str, Path] = {}
        self._bases: dict[tuple, Path] = {}
        self._models: dict[tuple, torch.nn.Module] = {}
        self._adapters: dict[tuple, TinyAdapter] = {}
        self._built: dict[Path, list] = {}
        self._serial = itertools.count(1)

    def _root(self, arch: str, config_kwargs: dict) -> Path:
        """One directory per model (architecture and config): its bases and the adapters on it."""
        label = _label(arch, config_kwargs)
        if label not in self._roots:
            self._roots[label] = self._factory.mktemp(label)
        return self._roots[label]

    def _register(self, path: Path) -> None:
        self._built[path] = _fingerprint(path)

    def base(
        self,
        arch: str = "llama",
        *,
        max_shard_size: str | int | None = None,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        **config_kwargs,
    ) -> Path:
        """The model directory ``build_model_dir(path, arch, ...)`` writes, with the same arguments."""
        key = (arch, max_shard_size, seed, dtype, _frozen(config_kwargs))
        if key not in self._bases:
            parts = ["base", str(dtype).removeprefix("torch.") if dtype != torch.float32 else None,
                     f"seed{seed}" if seed else None, str(max_shard_size) if max_shard_size else None]
            path = self._root(arch, config_kwargs) / "-".join(p for p in parts if p)
            with torch.random.fork_rng(devices=[]):  # the tests' random state does not depend on what is cached
                model = build_model(arch, seed=seed, dtype=dtype, **config_kwargs)
            self._bases[key] = save_model_dir(model, path, max_shard_size=max_shard_size)
            self._register(path)
        return self._bases[key]

    def _base_model(self, arch: str, model_kwargs: dict) -> torch.nn.Module:
        key = (arch, _frozen(model_kwargs))
        if key not in self._models:
            with torch.random.fork_rng(devices=[]):
                self._models[key] = build_model(arch, seed=0, **model_kwargs)
        return self._models[key]

    def adapter(
        self,
        arch: str = "llama",
        *,
        model_kwargs: dict | None = None,
        randomize: int | None = 0,
        edit: Callable[[torch.nn.Module], None] | None = None,
        **config,
    ) -> TinyAdapter:
        """A BoRA adapter on ``build_model(arch, seed=0, **model_kwargs)``, saved.

        ``config`` are ``BoraConfig`` fields (``target_modules`` defaults to every linear module of the
        architecture); ``randomize`` is the seed of ``randomize_bora`` (None: a fresh adapter, B = 0);
        ``edit(model)`` changes the model (its ``modules_to_save`` copies, say) before it is saved. The
        adapter's A is drawn right after the base's weights, so an adapter is the same whatever was built
        before it, and a base directory built with the same arguments holds its base weights.
        """
        model_kwargs = model_kwargs or {}
        key = (arch, _frozen(model_kwargs), randomize, edit, _frozen(config))
        if key not in self._adapters:
            cfg = BoraConfig(**{"target_modules": default_targets(arch), **config})
            root = self._root(arch, model_kwargs)
            path = root / f"adapter-{next(self._serial)}"
            with torch.random.fork_rng(devices=[]):
                model = build_model(arch, seed=0, **model_kwargs)
                add_bora(model, cfg)
                if randomize is not None:
                    randomize_bora(model, seed=randomize)
                if edit is not None:
                    edit(model)
            model.eval()
            save_bora(model, path)
            self._register(path)
            self._adapters[key] = TinyAdapter(path, arch, cfg, model_kwargs, model, self)
        return self._adapters[key]

    def forget_changed(self) -> list[Path]:
        """The shared directories that differ from what was built; the store drops them (they are rebuilt anew)."""
        changed = [path for path, before in self._built.items() if not path.exists() or _fingerprint(path) != before]
        for path in changed:
            del self._built[path]
            for cache in (self._bases, self._adapters):
                for key in [k for k, v in cache.items() if getattr(v, "path", v) == path]:
                    del cache[key]
            self._roots = {label: root for label, root in self._roots.items() if root != path.parent}
        return changed


@pytest.fixture(scope="session", autouse=True)
def _sigint_not_ignored():
    """A shell starts a background job (``pytest ... &``, ``nohup``) with SIGINT ignored, and every command the
    signal tests interrupt would inherit that and ignore their Ctrl-C: give SIGINT its default handler back."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session", autouse=True)
def tiny(tmp_path_factory) -> TinyStore:
    """The session's store of tiny bases and adapters (also behind ``gguf_support.tiny_dir``)."""
    store = TinyStore(tmp_path_factory)
    gguf_support.use_shared_builds(store.base)
    yield store
    gguf_support.use_shared_builds(None)


@pytest.fixture(scope="module", autouse=True)
def _shared_inputs_stay_unchanged(tiny):
    yield
    changed = tiny.forget_changed()
    if changed:
        pytest.fail("this module's tests wrote into shared inputs (take a fresh_copy first): "
                    + ", ".join(map(str, changed)), pytrace=False)


@pytest.fixture(scope="module")
def llama_base(tiny) -> Path:
    return tiny.base("llama")


@pytest.fixture(scope="module")
def llama_sharded(tiny) -> Path:
    """The llama of ``llama_base`` in shards of 40KB, with a ``model.safetensors.index.json``."""
    return tiny.base("llama", max_shard_size="40KB")


@pytest.fixture(scope="module")
def mistral_base(tiny) -> Path:
    return tiny.base("mistral")


@pytest.fixture(scope="module")
def qwen2_base(tiny) -> Path:
    return tiny.base("qwen2")


@pytest.fixture(scope="module")
def gpt2_base(tiny) -> Path:
    return tiny.base("gpt2")


@pytest.fixture
def fresh_copy(tmp_path) -> Callable[..., Path]:
    """``fresh_copy(shared, name=None)``: this test's own copy of a shared directory, at ``tmp_path / name``."""

    def copy(src: Path, name: str | None = None) -> Path:
        return Path(shutil.copytree(src, tmp_path / (name or Path(src).name)))

    return copy


# -- the bad-input harness (tests/cli_support.py): pristine inputs, built once, and each test's own copies --


@pytest.fixture(scope="module")
def pristine(tiny, llama_sharded) -> dict[str, Path]:
    """Shared (read only): ``base``, a llama in shards of 40KB; ``adapter``, a BoRA adapter on it (r=4, b=2,
    lora_alpha=8, every linear module); ``other``, an adapter on a llama of another size."""
    adapter = tiny.adapter("llama", r=4, bora_blocks=2, lora_alpha=8)
    other = tiny.adapter("llama", model_kwargs=dict(hidden=32, intermediate=64), r=4, bora_blocks=2, randomize=None)
    return {"base": llama_sharded, "adapter": adapter.path, "other": other.path}


@pytest.fixture
def work(tmp_path, pristine, fresh_copy) -> dict[str, Path]:
    """This test's own copies of the pristine ``base`` and ``adapter``, and an empty ``outdir`` for outputs."""
    paths = {k: fresh_copy(pristine[k], k) for k in ("base", "adapter")}
    paths["outdir"] = tmp_path / "outdir"
    paths["outdir"].mkdir()
    return paths
