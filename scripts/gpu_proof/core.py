"""Budgets, per-stage records and the shapes of a run (GPU or dry run).

A stage is a function `(ctx) -> dict of details`; run_stage times it, catches any exception
(recording its type, message and the last frames of its traceback) and marks it skipped when
the overall budget is spent before it starts, so one failure never stops the proof. Work
inside a stage checks `ctx.clock` between items and records what it left out.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass, field

SKIPPED_BUDGET = "skipped: budget"


class Clock:
    """A deadline: the stage's own budget, capped by the whole run's."""

    def __init__(self, seconds: float, overall: Clock | None = None) -> None:
        end = time.monotonic() + seconds
        self.deadline = min(end, overall.deadline) if overall is not None else end

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def expired(self, reserve: float = 0.0) -> bool:
        return self.left() <= reserve


@dataclass(frozen=True)
class Profile:
    """What one run measures. GPU: the real Mixtral-8x7B shapes; dry run: tiny shapes that the
    Triton interpreter gets through in seconds, so the same code paths run on a CPU."""

    dry_run: bool
    device: str
    real_shape: tuple[int, int, int, int]          # (E, k, H, I) of the kernel stages
    correctness_tokens: tuple[int, ...]            # T at the real shape (none in a dry run)
    small_shapes: tuple[tuple[int, int, int, int, int], ...]   # (T, E, k, H, I)
    bench_ms: tuple[int, ...]
    bench_dtypes: tuple[str, ...]
    decode_batches: tuple[int, ...]
    copy_bytes: int
    gemm_size: int
    reps: int
    group_size: int
    stage_seconds: dict = field(default_factory=dict)

    @property
    def bench_shape(self) -> tuple[int, int, int, int]:
        return self.real_shape


# the odd small shapes of tests/plugins (partial tiles in N and K, k=3, unused experts, one token)
SMALL_SHAPES = ((9, 4, 2, 48, 80), (1, 4, 2, 48, 80), (20, 3, 2, 40, 56), (11, 5, 3, 48, 80),
                (37, 8, 2, 256, 512), (300, 5, 3, 200, 344))
MIXTRAL_8X7B = (8, 2, 4096, 14336)
BENCH_MS = (1, 4, 16, 64, 512, 2048, 8192)
DECODE_BATCHES = (1, 8, 32, 64)
# seconds each stage may take at most (the whole run is capped by --budget-s as well)
GPU_STAGE_SECONDS = {"environment": 30, "kernel_correctness": 90, "end_to_end": 120,
                     "kernel_benchmark": 120, "decode": 150, "tuning": 120}


def profile(dry_run: bool) -> Profile:
    if dry_run:
        return Profile(dry_run=True, device="cpu", real_shape=(4, 2, 64, 96),
                       correctness_tokens=(), small_shapes=SMALL_SHAPES[:4], bench_ms=(1, 16),
                       bench_dtypes=("bf16", "fp8", "int4"), decode_batches=(1, 2),
                       copy_bytes=1 << 22, gemm_size=128, reps=1, group_size=32,
                       stage_seconds=dict.fromkeys(GPU_STAGE_SECONDS, 60))
    return Profile(dry_run=False, device="cuda", real_shape=MIXTRAL_8X7B,
                   correctness_tokens=(1, 33, 512), small_shapes=SMALL_SHAPES,
                   bench_ms=BENCH_MS, bench_dtypes=("bf16", "fp8", "int4"),
                   decode_batches=DECODE_BATCHES, copy_bytes=1 << 30, gemm_size=8192, reps=10,
                   group_size=128, stage_seconds=dict(GPU_STAGE_SECONDS))


@dataclass
class Context:
    """What every stage sees: the profile, the output directory, the clocks, and what earlier
    stages measured (the ceilings of the environment stage)."""

    profile: Profile
    out_dir: object
    overall: Clock
    clock: Clock | None = None
    ceilings: dict = field(default_factory=dict)
    files: list = field(default_factory=list)       # written files, relative to out_dir
    fail_stage: str | None = None                   # a stage made to fail (tests)


def goal(name: str, met: bool | None, detail: str = "") -> dict:
    """A goal's record: met True / False, or None when it could not be measured."""
    return {"name": name, "met": met, "detail": detail}


def run_stage(name: str, fn, ctx: Context, progress=None) -> dict:
    """Run one stage under its budget; never raises (except KeyboardInterrupt)."""
    start = time.monotonic()
    record = {"name": name, "passed": False, "seconds": 0.0}
    if ctx.overall.expired(reserve=1.0):
        record["skipped"] = SKIPPED_BUDGET
        return record
    ctx.clock = Clock(ctx.profile.stage_seconds.get(name, 60), ctx.overall)
    try:
        if ctx.fail_stage == name:
            raise RuntimeError(f"failure injected into stage '{name}' (--fail-stage)")
        details = fn(ctx) or {}
        record.update(details)
        record["passed"] = bool(details.get("passed", True))
    except Exception as exc:  # a stage's failure is data; the next stage still runs
        record["passed"] = False
        record["error"] = f"{type(exc).__name__}: {str(exc).strip()[:2000]}"
        record["traceback"] = traceback.format_exc(limit=-6).splitlines()[-14:]
    finally:
        record["seconds"] = round(time.monotonic() - start, 3)
        _release_memory()
    if progress is not None:
        progress(name, record)
    return record


def _release_memory() -> None:
    """Free what a stage left on the GPU so the next one has the whole device."""
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def median_seconds(fn, profile: Profile, graph: bool = True, reps: int | None = None,
                   inner: int = 5) -> float:
    """Median seconds of one fn() call: CUDA events over CUDA-graph replays on a GPU
    (mixbuild.plugins.timing), wall time of eager calls on the CPU."""
    reps = reps or profile.reps
    if profile.device == "cuda":
        from mixbuild.plugins.timing import cuda_median_ms

        return cuda_median_ms(fn, reps, inner=inner, graph=graph) * 1e-3
    import statistics

    fn()
    samples = []
    for _ in range(max(min(reps, profile.reps), 1)):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)
