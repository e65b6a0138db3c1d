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
import uuid
from collections.abc import Iterator
from pathlib import Path

from safetensors import SafetensorError

from bora_tools.errors import BoraError, OutputExistsError, OutputWriteError

_TMP_MARK = ".bora-tmp-"


def check_target(target: Path, *, overwrite: bool) -> None:
    """Refuse an existing target (unless ``overwrite``) or a missing parent directory."""
    target = Path(target)
    if (target.exists() or target.is_symlink()) and not overwrite:
        raise OutputExistsError(f"output {target} already exists", hint="pass `overwrite` to replace it")
    if not target.parent.is_dir():
        raise OutputWriteError(f"output directory {target.parent} does not exist")


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
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _clean_stale(target: Path) -> None:
    """Remove leftovers of earlier runs on this target whose process is gone."""
    prefix = f".{target.name}{_TMP_MARK}"
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
def atomic_output(target: str | os.PathLike, *, overwrite: bool = False, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``target``; rename it to ``target`` on success.

    Example::

        with atomic_output(out, overwrite=False, directory=True) as tmp:
            (tmp / "config.json").write_text("{}")
        # out/ now exists, complete; on an exception nothing is left at out/

    Raises:
        OutputExistsError: ``target`` exists and ``overwrite`` is false.
        OutputWriteError: the disk refused a write (full, too large, read-only).
    """
    target = Path(target)
    check_target(target, overwrite=overwrite)
    _clean_stale(target)
    tmp = target.parent / f".{target.name}{_TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        if directory:
            tmp.mkdir()
        yield tmp
        _commit(tmp, target, overwrite=overwrite)
    except OSError as e:
        _remove(tmp)
        if isinstance(e, BoraError):
            raise
        raise OutputWriteError(f"writing {target} failed: {_os_reason(e)}; nothing was written") from e
    except SafetensorError as e:  # safetensors' writer reports I/O errors as its own type
        _remove(tmp)
        found = re.search(r"os error (\d+)", str(e))
        reason = _os_reason(OSError(int(found.group(1)), str(e))) if found else " ".join(str(e).split())
        raise OutputWriteError(f"writing {target} failed: {reason}; nothing was written") from e
    except BaseException:
        _remove(tmp)
        raise


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


def _commit(tmp: Path, target: Path, *, overwrite: bool) -> None:
    if target.exists() or target.is_symlink():
        if not overwrite:  # appeared while we were writing
            raise OutputExistsError(f"output {target} appeared while writing", hint="pass `overwrite` to replace it")
        trash = target.parent / f".{target.name}{_TMP_MARK}{os.getpid()}-old-{uuid.uuid4().hex[:8]}"
        os.replace(target, trash)
        os.replace(tmp, target)
        _remove(trash)
    else:
        os.replace(tmp, target)


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
