"""The builder's timing cache file: loaded when present, saved (atomically) after a build.

Kernel timings are reused across builds of the same network shapes on the same GPU, which is
most of the build time of a large engine at high optimisation levels. Saved with
mixbuild.atomic.atomic_file. Full TensorRT only:
TensorRT-RTX compiles kernels at run time and its timing-cache calls are no-ops (since 1.2).
"""

from __future__ import annotations

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
    from mixbuild.atomic import atomic_file

    data = bytes(memoryview(attached.cache.serialize()))
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return {"path": str(path), "loaded_bytes": attached.loaded_bytes,
            "saved_bytes": len(data), "rejected_old_cache": attached.rejected}
