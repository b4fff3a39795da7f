"""Options, profiles, the adapter and the timing cache, without building anything."""

from __future__ import annotations

from pathlib import Path

import pytest

from mixbuild.builder import timing_cache
from mixbuild.builder.adapter import Adapter
from mixbuild.builder.options import BuildOptions, ComputeCapability, Limits, MoEMode
from mixbuild.builder.profiles import DimRange, Profile, make_profiles, select_profile
from mixbuild.contract import EngineBackend
from mixbuild.errors import ArtifactError, UsageError


@pytest.mark.parametrize("text, cc", [("8.9", (8, 9)), ("89", (8, 9)), ("sm89", (8, 9)),
                                      ("SM_120", (12, 0)), ("12.1", (12, 1)), ("9.0", (9, 0))])
def test_compute_capability_parse(text, cc):
    parsed = ComputeCapability.parse(text)
    assert (parsed.major, parsed.minor) == cc and ComputeCapability.parse(str(parsed)) == parsed
    assert parsed.sm == f"SM{cc[0]}{cc[1]}"


def test_compute_capability_order_and_errors():
    assert ComputeCapability(8, 6) < ComputeCapability(8, 9) < ComputeCapability(12, 0)
    for bad in ("", "x", "8.", "0.5", "8.10"):
        with pytest.raises(UsageError, match="invalid compute capability"):
            ComputeCapability.parse(bad)


def test_backend_and_mode_parse():
    assert EngineBackend.parse("tensorrt-rtx") is EngineBackend.TENSORRT_RTX
    assert (EngineBackend.TENSORRT.module, EngineBackend.TENSORRT.extra) == ("tensorrt", "trt")
    rtx = EngineBackend.TENSORRT_RTX
    assert (rtx.module, rtx.extra) == ("tensorrt_rtx", "trt-rtx")
    with pytest.raises(UsageError, match="unknown TensorRT backend 'trt-rtx'"):
        EngineBackend.parse("trt-rtx")  # one spelling: the pip extra's name is not a backend
    assert MoEMode.parse("inline") is MoEMode.INLINE
    options = BuildOptions.parse(backend="tensorrt", moe="inline", compute_capability="9.0",
                                 max_batch=4, timing_cache="cache.bin")
    assert options == BuildOptions(EngineBackend.TENSORRT, MoEMode.INLINE, ComputeCapability(9, 0),
                                   Limits(4, 256, 1024), 3, Path("cache.bin"))


def test_limits_validate():
    assert Limits(1, 1, 2).validate() == Limits(1, 1, 2)
    with pytest.raises(UsageError, match="at least 2"):
        Limits(1, 1, 1).validate()
    with pytest.raises(UsageError, match="max_position_embeddings"):
        Limits(1, 8, 4096).validate(max_positions=2048)


def test_profiles_follow_the_symbolic_dims():
    prefill, decode = make_profiles(Limits(max_batch=4, max_step_tokens=32, max_context=128))
    inputs = {"input_ids": ["batch", "seq"], "attention_mask": ["batch", "total_seq"],
              "past_key_values.0.key": ["batch", 2, "past_seq", 16]}
    assert prefill.shapes(inputs) == {
        "input_ids": {"min": [1, 1], "opt": [1, 32], "max": [4, 32]},
        "attention_mask": {"min": [1, 1], "opt": [1, 32], "max": [4, 128]},
        "past_key_values.0.key": {"min": [1, 2, 0, 16], "opt": [1, 2, 0, 16], "max": [4, 2, 96, 16]}}
    assert decode.shapes(inputs)["past_key_values.0.key"] == {
        "min": [1, 2, 1, 16], "opt": [4, 2, 64, 16], "max": [4, 2, 127, 16]}
    with pytest.raises(ArtifactError, match="dynamic dim 'tokens'"):
        prefill.shapes({"router": ["tokens", 8]})


def test_select_profile_picks_the_tightest_fit():
    inputs = {"input_ids": ["batch", "seq"], "past": ["batch", "past_seq"]}
    profiles = [p.to_dict(inputs) for p in make_profiles(Limits(2, 16, 64))]
    assert select_profile(profiles, {"input_ids": (1, 10), "past": (1, 0)}) == 0     # prompt
    assert select_profile(profiles, {"input_ids": (2, 1), "past": (2, 40)}) == 1     # decode
    assert select_profile(profiles, {"input_ids": (1, 1), "past": (1, 5)}) == 1      # both fit
    assert select_profile(profiles, {"input_ids": (1, 4), "past": (1, 40)}) == 0     # chunk
    with pytest.raises(UsageError, match="fit none of the engine's optimisation profiles"):
        select_profile(profiles, {"input_ids": (1, 1), "past": (1, 64)})


def test_rtx_targets_and_flags(trt):
    adapter = Adapter.load(EngineBackend.TENSORRT_RTX)
    targets = [str(cc) for cc in adapter.targets()]
    assert {"7.5", "8.0", "8.6", "8.9", "12.0"} <= set(targets) and "9.0" not in targets
    assert adapter.ahead_of_time and not adapter.timing_cache_supported
    assert adapter.config_flags() == 0 and adapter.version == trt.__version__


def test_rtx_library_alias_points_at_the_installed_library(trt, tmp_path):
    """The TensorRT-RTX parser dlopen()s the unversioned libtensorrt_rtx.so when it adds a plugin
    layer; the build process gets an alias to the wheel's libtensorrt_rtx.so.N."""
    import tensorrt_rtx_libs

    env = Adapter.load(EngineBackend.TENSORRT_RTX).worker_env(tmp_path)
    libs = Path(tensorrt_rtx_libs.__file__).parent
    if (libs / "libtensorrt_rtx.so").exists():          # an SDK-style install needs no alias
        assert not (tmp_path / "lib").exists()
        return
    link = tmp_path / "lib" / "libtensorrt_rtx.so"
    assert link.is_symlink() and link.resolve().parent == libs.resolve()
    assert link.resolve().name.startswith("libtensorrt_rtx.so.")
    assert env["LD_LIBRARY_PATH"].split(":")[0] == str(tmp_path / "lib")


class FakeCache:
    def __init__(self, data: bytes):
        self.data = data

    def serialize(self):
        return self.data + b"+grown"


class FakeConfig:
    """The two IBuilderConfig calls the timing cache uses; rejects caches starting with 'old'."""

    def __init__(self):
        self.attached = None

    def create_timing_cache(self, data: bytes):
        return FakeCache(data)

    def set_timing_cache(self, cache, ignore_mismatch: bool) -> bool:
        if cache.data.startswith(b"old") or ignore_mismatch:
            return False
        self.attached = cache
        return True


def test_timing_cache_is_created_loaded_and_saved(tmp_path):
    path = tmp_path / "cache" / "timing.bin"
    config = FakeConfig()
    first = timing_cache.attach(config, path)
    assert config.attached is first.cache and first.loaded_bytes == 0
    report = timing_cache.save(first, path)
    assert path.read_bytes() == b"+grown" and report["saved_bytes"] == 6
    second = timing_cache.attach(FakeConfig(), path)
    assert second.loaded_bytes == 6 and not second.rejected
    path.write_bytes(b"old device")
    third = timing_cache.attach(FakeConfig(), path)
    assert third.rejected and third.loaded_bytes == 0
    assert sorted(p.name for p in path.parent.iterdir()) == ["timing.bin"]   # no temp files


def test_dim_range_and_profile_dict():
    profile = Profile("p", {"batch": DimRange(1, 2, 3)})
    assert profile.to_dict({"x": ["batch", 5]}) == {
        "name": "p", "dims": {"batch": [1, 2, 3]},
        "shapes": {"x": {"min": [1, 5], "opt": [2, 5], "max": [3, 5]}}}


def test_build_view_tracks_nested_phases():
    import io

    from rich.console import Console
    from rich.progress import Progress

    from mixbuild.builder.view import BuildView

    with Progress(console=Console(file=io.StringIO()), auto_refresh=False) as progress:
        view = BuildView(progress)
        view.handle({"event": "stage", "name": "building the engine"})
        view.handle({"event": "phase_start", "phase": "Building engine", "parent": None, "steps": 6})
        view.handle({"event": "phase_start", "phase": "Timing", "parent": "Building engine",
                     "steps": 3})
        view.handle({"event": "step", "phase": "Timing", "step": 1})
        tasks = {t.description.strip(): t for t in progress.tasks}
        assert tasks["building the engine"].total is None
        assert (tasks["Timing"].completed, tasks["Timing"].total) == (2, 3)
        assert tasks["Timing"].description == "    Timing"          # nested one level deeper
        view.handle({"event": "phase_finish", "phase": "Timing"})
        view.handle({"event": "step", "phase": "unknown", "step": 9})    # ignored
        assert [t.description.strip() for t in progress.tasks] == ["building the engine",
                                                                   "Building engine"]
