"""Atomic outputs: write into a temporary sibling, rename only when complete.

A run that fails or is killed leaves at most a hidden ``.NAME.bora-tmp-*``
sibling, never something at the target path that looks complete; the next run
ignores such leftovers (and removes those whose writer is gone).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import signal
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

from safetensors import SafetensorError

from bora_tools.errors import BoraError, OutputExistsError, OutputWriteError
from bora_tools.io.paths import NAME_MAX, check_name_lengths

_TMP_MARK = ".bora-tmp-"
_NAME_MAX = NAME_MAX  # temporary names are shortened to fit
#: Outputs renamed into place by this process, newest last: an interrupt after a rename says they are complete.
COMMITTED: list[Path] = []
#: What a long run has kept so far that is not its output (a training checkpoint), in words, newest last.
KEPT: list[str] = []


def _tmp_prefix(target: Path) -> str:
    """``.NAME.bora-tmp-``, with NAME shortened so that a full temporary name stays within ``_NAME_MAX`` bytes."""
    room = _NAME_MAX - len(f".{_TMP_MARK}") - 40  # pid, "old", a random tag and separators
    name = target.name
    while len(name.encode("utf-8", "surrogateescape")) > room:
        name = name[:-1]
    return f".{name}{_TMP_MARK}"


def check_target(target: Path, *, overwrite: bool) -> None:
    """Refuse an existing target (unless ``overwrite``), or a parent that cannot be a directory.

    Missing parent directories are fine: ``atomic_output`` creates them (and removes them again when
    the write fails), as mergekit and llama.cpp's converters do.
    """
    target = Path(target)
    check_name_lengths(target, "output")
    if (target.exists() or target.is_symlink()) and not overwrite:
        raise OutputExistsError(f"output {target} already exists", hint="pass `overwrite` to replace it")
    for parent in target.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputWriteError(f"output {target}: {parent} is a file, not a directory")
            check_writable(parent, what=f"output {target}")
            return


def check_writable(directory: Path, *, what: str) -> None:
    """Refuse, before any work, a directory this process cannot create entries in (or, when it does not
    exist yet, its nearest existing parent): a read-only mount (``ST_RDONLY``, even for root) or missing
    write permission. Nothing is written to find out.

    Raises:
        OutputWriteError: naming ``what`` and the directory.
    """
    directory = next((p for p in (Path(directory), *Path(directory).parents) if p.exists()), Path("."))
    if not directory.is_dir():
        raise OutputWriteError(f"{what}: {directory} is a file, not a directory")
    if hasattr(os, "statvfs") and os.statvfs(directory).f_flag & os.ST_RDONLY:
        raise OutputWriteError(f"{what}: {directory} is on a read-only file system")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise OutputWriteError(f"{what}: {directory} is not writable (permission denied)")


def _make_parents(target: Path) -> list[Path]:
    """Create the missing parents of ``target``; returns those created, innermost first."""
    missing = []
    for parent in target.parents:
        if parent.exists():
            break
        missing.append(parent)
    made: list[Path] = []
    try:
        for parent in reversed(missing):
            parent.mkdir(exist_ok=True)
            made.insert(0, parent)
    except OSError:
        _remove_created(made)
        raise
    return missing


def _remove_created(created: list[Path]) -> None:
    for parent in created:  # innermost first; only while empty (another writer may have used them)
        try:
            parent.rmdir()
        except OSError:
            break


def refuse_output_over_inputs(out: str | os.PathLike, *inputs: str | os.PathLike) -> None:
    """Refuse an output that is, holds, or lies inside an input: inputs are never modified.

    ``--overwrite`` replaces the output whole, so an output that holds an input
    would delete it, and one inside an input would change it.

    Raises:
        OutputWriteError: naming the output and the input.
    """
    target = Path(out).resolve()
    for path in inputs:
        src = Path(path).resolve()
        if target == src or src.is_relative_to(target) or target.is_relative_to(src):
            raise OutputWriteError(
                f"output {out} is, contains or lies inside the input {path}; inputs are never modified",
                hint="choose an output path outside the inputs",
            )


def _remove(path: Path) -> None:
    # Best effort: a cleanup failure (a read-only file system) must never hide the error that caused it.
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def _clean_stale(target: Path) -> None:
    """Remove leftovers of earlier runs on this target whose process is gone."""
    prefix = _tmp_prefix(target)
    for sibling in target.parent.glob(prefix + "*"):
        pid_text = sibling.name[len(prefix) :].split("-", 1)[0]
        if pid_text.isdigit() and not _pid_alive(int(pid_text)):
            _remove(sibling)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def atomic_output(target: str | os.PathLike, *, overwrite: bool = False, directory: bool = False,
                  record: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling of ``target``; rename it to ``target`` on success.

    Example::

        with atomic_output(out, overwrite=False, directory=True) as tmp:
            (tmp / "config.json").write_text("{}")
        # out/ now exists, complete; on an exception nothing is left at out/

    ``record=False``: ``target`` is part of something larger (a file of a checkpoint), so an interrupt
    after its rename does not call it the complete output (``COMMITTED``).

    Raises:
        OutputExistsError: ``target`` exists and ``overwrite`` is false.
        OutputWriteError: the disk refused a write (full, too large, read-only).
    """
    target = Path(target)
    check_target(target, overwrite=overwrite)
    created, tmp = _temporary_beside(target)
    try:
        if directory:
            tmp.mkdir()
        yield tmp
        _commit(tmp, target, overwrite=overwrite, record=record)
    except BaseException as e:
        _undo(tmp, created)
        _raise_write_error(target, e)
        raise


def _undo(tmp: Path, created: list[Path]) -> None:
    """A failed output: its temporary and the parent folders made for it go."""
    _remove(tmp)
    _remove_created(created)


def _raise_write_error(target: Path, e: BaseException) -> None:
    """A disk error while writing ``target``, as one ``OutputWriteError`` line; anything else (our own errors,
    interrupts) is left for the caller to re-raise. safetensors' writer reports I/O errors as its own type."""
    if isinstance(e, BoraError) or not isinstance(e, (OSError, SafetensorError)):
        return
    if isinstance(e, SafetensorError):
        found = re.search(r"os error (\d+)", str(e))
        reason = _os_reason(OSError(int(found.group(1)), str(e))) if found else " ".join(str(e).split())
    else:
        reason = _os_reason(e)
    raise OutputWriteError(f"writing {target} failed: {reason}; nothing was written") from e


def _temporary_beside(target: Path) -> tuple[list[Path], Path]:
    """The parent folders made for ``target`` (removed again on failure), and the name of its temporary sibling
    (stale ones of dead processes removed first)."""
    try:
        created = _make_parents(target)
    except OSError as e:
        raise OutputWriteError(f"cannot create the folder {target.parent}: {_os_reason(e)}") from e
    _clean_stale(target)
    return created, target.parent / f"{_tmp_prefix(target)}{os.getpid()}-{uuid.uuid4().hex[:8]}"


def scratch_sibling(tmp: str | os.PathLike, tag: str) -> Path:
    """Another hidden file beside the temporary ``tmp`` of ``atomic_output``, for a step's own scratch output.

    It carries the same marker and process id as ``tmp``, so a later run on the
    same target removes it as a leftover when this process is gone (killed).
    The caller removes it when done (``remove_scratch``); ``atomic_output`` does not.

    Example: ``scratch_sibling(Path(".m.gguf.bora-tmp-42-ab12cd34"), "f32")``
    -> ``Path(".m.gguf.bora-tmp-42-ab12cd34-f32")``
    """
    tmp = Path(tmp)
    if _TMP_MARK not in tmp.name:
        raise ValueError(f"{tmp} is not a temporary made by atomic_output")
    return tmp.with_name(f"{tmp.name}-{tag}")


def remove_scratch(path: str | os.PathLike) -> None:
    """Remove a scratch file or directory if it exists."""
    _remove(Path(path))


def _umask() -> int:
    """The process's umask, read without changing it where the system says it (Linux), else set and restored."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _give_files_the_usual_mode(tmp: Path) -> None:
    """Every file of the output gets ``0o666 & ~umask``, as ``open()`` creates it (``cp``, ``tar`` and PEFT's
    outputs have it): some writers (safetensors' atomic ``save_file``) create their file ``0o600``."""
    mode = 0o666 & ~_umask()
    files = [tmp] if not tmp.is_dir() else [p for p in tmp.rglob("*") if p.is_file() and not p.is_symlink()]
    for path in files:
        if path.is_file() and not path.is_symlink() and (path.stat().st_mode & 0o777) != mode:
            os.chmod(path, mode)


def _commit(tmp: Path, target: Path, *, overwrite: bool, record: bool = True) -> None:
    _give_files_the_usual_mode(tmp)
    done = COMMITTED if record else []
    if not (target.exists() or target.is_symlink()):
        with _signals_deferred():
            os.replace(tmp, target)
            done.append(target)
        return
    if not overwrite:  # appeared while we were writing
        raise OutputExistsError(f"output {target} appeared while writing", hint="pass `overwrite` to replace it")
    trash = target.parent / f"{_tmp_prefix(target)}{os.getpid()}-old-{uuid.uuid4().hex[:8]}"
    replaced = False
    try:
        with _signals_deferred():  # both renames happen, or neither: an interrupt waits until they are done
            os.replace(target, trash)
            try:
                os.replace(tmp, target)
            except BaseException:
                os.replace(trash, target)  # put the old output back
                raise
            replaced = True
            done.append(target)
    finally:
        if replaced:  # the old output goes, even when an interrupt arrived during the renames
            _remove(trash)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back until the block is done, then act on the first one that came.

    Python-level handlers (not a signal mask) so that a signal delivered to any thread waits too.
    Outside the main thread, where handlers cannot be set, the block runs as is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    old = {sig: signal.signal(sig, lambda signum, frame: caught.append(signum)) for sig in held}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        if caught:
            handler = old[caught[0]]
            if callable(handler):
                handler(caught[0], None)  # Python's own SIGINT handler raises KeyboardInterrupt here
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), caught[0])


def _os_reason(e: OSError) -> str:
    names = {
        errno.ENOSPC: "no space left on device",
        errno.EFBIG: "file too large",
        errno.EROFS: "read-only file system",
        errno.EACCES: "permission denied",
        errno.EDQUOT: "disk quota exceeded",
    }
    if e.errno is None and "requested and" in str(e):  # numpy's short write: the kernel stopped accepting bytes
        return f"short write ({e}): file too large or no space left on device"
    return names.get(e.errno, e.strerror or str(e))


#: The shard names llama.cpp and gguf-py write: ``NAME-00001-of-00003.gguf``.
SHARD_PATTERN = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def existing_shards(target: Path) -> list[Path]:
    """The files of an earlier split of ``target`` (``STEM-NNNNN-of-NNNNN.gguf`` beside it), sorted."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    found = []
    for p in target.parent.glob(f"{glob_escape(target.stem)}-*-of-*.gguf"):
        m = SHARD_PATTERN.match(p.name)
        if m and m.group("stem") == target.stem:
            found.append(p)
    return sorted(found)


def glob_escape(text: str) -> str:
    """``text`` with glob's special characters taken literally."""
    return re.sub(r"([*?\[])", r"[\1]", text)


@contextlib.contextmanager
def atomic_shards(target: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a path in a hidden temporary folder beside ``target``; move what was written there into place.

    For a writer that may split its output (gguf-py's ``GGUFWriter`` with ``split_max_size``): it writes
    either the one file ``target`` names or ``STEM-00001-of-0000N.gguf`` and its siblings. Each file is
    renamed into ``target``'s folder, the first shard last (what llama.cpp opens appears only when the
    rest is there). An existing ``target`` or earlier split of it is refused unless ``overwrite``, which
    replaces it whole (every file of the old split goes). A failure leaves nothing.

    Example::

        with atomic_shards(Path("out/m.gguf")) as path:
            write_streaming(gguf.GGUFWriter(None, "llama", split_max_size=10**9), path, plan)
        # out/m-00001-of-00002.gguf, out/m-00002-of-00002.gguf

    Raises:
        OutputExistsError: ``target`` or a shard of it exists and ``overwrite`` is false.
        OutputWriteError: the disk refused a write.
    """
    target = Path(target)
    check_target(target, overwrite=overwrite)
    old = existing_shards(target)
    if old and not overwrite:
        raise OutputExistsError(f"output {old[0]} already exists (a split of {target.name})",
                                hint="pass `overwrite` to replace it")
    created, tmp = _temporary_beside(target)
    try:
        tmp.mkdir()
        yield tmp / target.name
        written = sorted(p for p in tmp.iterdir() if p.is_file())
        names = {p.name for p in written}
        with _signals_deferred():
            for p in [*existing_shards(target), *([target] if target.exists() else [])]:
                if p.name not in names:
                    _remove(p)  # overwrite: the old output goes whole
            for p in reversed(written):  # the first shard, what llama.cpp opens, last
                os.replace(p, target.parent / p.name)
                COMMITTED.append(target.parent / p.name)
        _remove(tmp)
    except BaseException as e:
        _undo(tmp, created)
        _raise_write_error(target, e)
        raise
