"""Files written whole or not at all: a temporary file beside the target, renamed onto it.

At the bottom of the layering (standard library only), so that configs, checkpoints, teacher
caches, key stores, reports and exports are all written the same way.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def default_mode() -> int:
    """The permission bits a plain open() would give a new file under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(path: str | Path, mode: int | None = None, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary file beside `path` to write; renamed onto `path` only if the block completes.

    The folder is created when missing. The file gets `mode`, by default what a plain open()
    would give: mkstemp's 0600 would hide run directories shared with others.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, default_mode() if mode is None else mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomically(path: str | Path, text: str, mode: int | None = None) -> None:
    """Write `text` to `path` whole or not at all (see atomic_path)."""
    with atomic_path(path, mode) as tmp:
        tmp.write_text(text)
