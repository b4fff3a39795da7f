"""Atomic output directories: write into a temporary sibling, rename into place when complete.

A failure or Ctrl-C leaves the destination as it was (absent, or the old artifact), never a
half-written directory that looks valid.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from mixbuild.errors import UsageError


def check_destination(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise UsageError(f"output directory already exists: {out}",
                         hint="pass --overwrite to replace it, or choose another -o")
    if out.exists() and not out.is_dir():
        raise UsageError(f"output path is a file, not a directory: {out}")


@contextlib.contextmanager
def atomic_directory(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes `out` only if the block completes."""
    out = Path(out)
    check_destination(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the artifact is not
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
