"""Writing a big output file (a merge, an 8-bit checkpoint) so that no one ever sees half of it under its name,
and so that a file already there is never replaced unless the caller says so."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_new_file(out: Path, write: Callable, replace: bool = False) -> None:
    """Call write(f) on a temporary file next to `out` (the same file system), then give it out's name.

    Without `replace`, the name is given by a hard link, which fails if the name exists: a file that appeared
    meanwhile raises FileExistsError and is left as it is. (Where there are no hard links: check, then rename.)
    Whatever happens, the temporary file is gone afterwards."""
    handle, temporary = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}-", suffix=".part")
    try:
        with os.fdopen(handle, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp's file is private; the output is an ordinary file
        if replace:
            os.replace(temporary, out)
            return
        try:
            os.link(temporary, out)
        except FileExistsError:
            raise
        except OSError:  # no hard links on this file system
            if out.exists():
                raise FileExistsError(out) from None
            os.replace(temporary, out)
    finally:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
