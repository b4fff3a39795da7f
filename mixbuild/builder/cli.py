"""Plain functions behind `mixbuild engine` and `mixbuild inspect ENGINE_DIR` (click stays in
mixbuild/cli.py, which only forwards its options here)."""

from __future__ import annotations

from pathlib import Path

BACKENDS = ("tensorrt-rtx", "tensorrt")
MOE_MODES = ("plugin", "inline")


def engine_command(artifact: str, out: str, backend: str = "tensorrt-rtx",
                   compute_capability: str | None = None, moe: str = "plugin",
                   max_batch: int = 1, max_step_tokens: int = 256, max_context: int = 1024,
                   opt_level: int = 3, timing_cache: str | None = None, overwrite: bool = False,
                   progress: bool = True, echo=print) -> Path:
    """Build the engine and print one summary line; MixbuildError propagates to the CLI."""
    from mixbuild.builder.build import build_engine
    from mixbuild.builder.manifest import read_engine_manifest
    from mixbuild.progress import human_bytes

    path = build_engine(artifact, out, backend=backend, compute_capability=compute_capability,
                        moe=moe, max_batch=max_batch, max_step_tokens=max_step_tokens,
                        max_context=max_context,
                        opt_level=opt_level, timing_cache=timing_cache, overwrite=overwrite,
                        progress=progress)
    manifest = read_engine_manifest(path)
    plugins = ", ".join(f"{p['name']} x{p['layers']}" for p in manifest.plugins) or "none"
    echo(f"built {path} ({manifest.backend.value} {manifest.version}, "
         f"SM {manifest.compute_capability}, {manifest.precision.value}, --moe {manifest.moe}, "
         f"plugins: {plugins}; plan {human_bytes(manifest.plan_bytes)}) in "
         f"{manifest.wall_s:.1f} s")
    cache = manifest.timing_cache
    if cache and not cache["used"]:
        echo(f"note: --timing-cache ignored: {cache['reason']}")
    return path


def is_engine_dir(path: str | Path) -> bool:
    from mixbuild.contract import ENGINE_MANIFEST_FILE

    return (Path(path) / ENGINE_MANIFEST_FILE).is_file()
