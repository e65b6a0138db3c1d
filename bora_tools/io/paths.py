"""Path checks every command makes before touching the file system.

A path component longer than ``NAME_MAX`` bytes is refused by every common file
system (ext4, XFS, btrfs, APFS, NTFS): the ``stat`` that would find it fails with
``ENAMETOOLONG``. It is checked by name here, once, so that an input, an output or
a name we derive from one (``OUT-checkpoints``) gets one line naming it instead
of an ``OSError`` from deep inside a library.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from bora_tools.errors import ValidationError

__all__ = ["NAME_MAX", "check_name_lengths", "long_component", "regular_file_problem"]

#: Longest file name (bytes) the common file systems accept.
NAME_MAX = 255


def long_component(path: str | os.PathLike) -> str | None:
    """The first component of ``path`` longer than ``NAME_MAX`` bytes (UTF-8, as the file system stores it), or None."""
    for part in Path(path).parts:
        if len(os.fsencode(part)) > NAME_MAX:
            return part
    return None


def check_name_lengths(path: str | os.PathLike, what: str) -> None:
    """Refuse ``path`` when one of its components is over ``NAME_MAX`` bytes.

    ``what`` names the parameter in backquotes (``"`out`"``) or says where the name comes from.

    Raises:
        ValidationError: naming ``what``, the component (cut) and its length in bytes.
    """
    part = long_component(path)
    if part is not None:
        size = len(os.fsencode(part))
        shown = part if len(part) <= 40 else f"{part[:20]}...{part[-12:]}"
        raise ValidationError(f"{what}: the path component {shown!r} is {size} bytes long; file systems accept at "
                              f"most {NAME_MAX}", hint="choose a shorter name")


def regular_file_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be read as an input file (``"no such file"``, ``"a FIFO or pipe, not a regular file"``),
    or None."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "no such file"
    except OSError as e:
        return e.strerror or str(e)
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a directory, not a file"
    kind = "a FIFO or pipe" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
    return f"{kind}, not a regular file"
