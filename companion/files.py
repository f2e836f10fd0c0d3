"""Writing a file all at once: readers see the old file or the new one, never half of it, and modes follow the umask.

``tempfile.mkstemp`` and ``NamedTemporaryFile`` create their files with mode 0600 whatever the umask, so a file
renamed from one is readable by its owner only: a decoded cache in a data folder shared by a class, or weights
meant for a group, could not be read by the others. ``atomic_write`` creates its temporary file with ``os.open``
and mode 0666, which the process's umask narrows as for any ordinary file (umask 022: 0644).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_write"]


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object], *, overwrite: bool = True) -> Path:
    """Write ``path`` by calling ``write(f)`` on a new binary file beside it, then renaming that file to ``path``.

    The file's mode follows the umask (0666 narrowed by it), as ``open(path, "wb")`` would give. If ``write``
    raises, or the process is interrupted, ``path`` is untouched and the temporary file
    (``.<name>-<random>.tmp`` in the same folder) is removed. ``overwrite=False`` never replaces an existing
    file: a ``FileExistsError`` names it, and of several processes writing one new path at once exactly one
    succeeds (the file is linked into place, which fails if the name exists). Returns ``path`` as a Path.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give the path of a file to write")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: the folder {path.parent} does not exist; create it first")
    if not overwrite and path.exists():  # refused before any work; checked again, atomically, at the end
        raise FileExistsError(f"{path} exists already and is not replaced; remove it or choose another name")
    while True:
        tmp = path.with_name(f".{path.name}-{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask narrows 0666
            break
        except FileExistsError:  # pragma: no cover - 48 random bits taken already
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                _link_new(tmp, path)
            except FileExistsError:
                raise FileExistsError(
                    f"{path} was created by someone else while this was written, and is not replaced; remove it "
                    "or choose another name"
                ) from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _link_new(tmp: Path, path: Path) -> None:
    """Put ``tmp`` at the new name ``path``; FileExistsError if that name exists, even if made a moment ago."""
    try:
        os.link(tmp, path)  # atomic, and fails if the name exists
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links: claim the name first (atomic), then fill it by renaming
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        os.replace(tmp, path)
