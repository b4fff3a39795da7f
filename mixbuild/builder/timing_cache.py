"""The builder's timing cache file: loaded when present, saved (atomically) after a build.

Kernel timings are reused across builds of the same network shapes on the same GPU, which is
most of the build time of a large engine at high optimisation levels. Full TensorRT only:
TensorRT-RTX compiles kernels at run time and its timing-cache calls are no-ops (since 1.2).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass
class AttachedCache:
    cache: object              # the ITimingCache the builder config holds
    loaded_bytes: int          # 0 when the file was absent or rejected
    rejected: bool = False     # the file's cache was for another device / version


def attach(config, path: Path) -> AttachedCache:
    """Give `config` the cache stored at `path` (a fresh one when absent or unusable)."""
    data = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(data)
    if data and (cache is None or not config.set_timing_cache(cache, False)):
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, False)
        return AttachedCache(cache, 0, rejected=True)
    if not data:
        config.set_timing_cache(cache, False)
    return AttachedCache(cache, len(data))


def save(attached: AttachedCache, path: Path) -> dict:
    """Write the (grown) cache back; returns what happened, for engine.json."""
    data = bytes(memoryview(attached.cache.serialize()))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return {"path": str(path), "loaded_bytes": attached.loaded_bytes,
            "saved_bytes": len(data), "rejected_old_cache": attached.rejected}
