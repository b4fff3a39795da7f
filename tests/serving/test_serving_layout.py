"""The serving layout: a fixed-capacity KV cache updated in place at per-row positions, per-row
lengths, last-token logits, in standard ONNX (opset 24 TensorScatter + Attention).

Checked against transformers (every row run alone, the oracle), against onnx's own
ReferenceEvaluator, and against the concat layout through the generation runtime."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
import torch

from mixbuild.contract import (
    CACHE_LENGTHS,
    INPUT_IDS,
    INPUT_LENGTHS,
    LOGITS,
    POSITION_IDS,
    SERVING_OPSET,
    DType,
    Layout,
    cache_pairs,
    io_specs,
)
from mixbuild.exporter.artifact import Artifact
from mixbuild.exporter.export import export_checkpoint
from mixbuild.runtime.ort_runner import OrtRunner
from mixbuild.runtime.steps import ServingStep

CONFIGS = ["tiny", "tiny-e8k3-mha", "tiny-e4k1-mqa"]
CAPACITY = 48


@pytest.fixture(scope="module")
def serving_artifacts(hf_checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("serving")
    return {name: export_checkpoint(hf_checkpoints[name], root / name, layout="serving",
                                    progress=False) for name in CONFIGS}


def hf_last_logits(model, tokens: list[int]) -> np.ndarray:
    with torch.inference_mode():
        return model(input_ids=torch.tensor([tokens])).logits[0, -1].float().numpy()


def ragged(rows: list[list[int]], starts: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Right-padded ids, positions (start + i) and counts for rows of different lengths."""
    width = max(1, max(len(r) for r in rows))
    ids = np.zeros((len(rows), width), np.int64)
    positions = np.zeros_like(ids)
    for b, (row, start) in enumerate(zip(rows, starts)):
        ids[b, :len(row)] = row
        positions[b, :len(row)] = start + np.arange(len(row))
    return ids, positions, np.array([len(r) for r in rows], np.int64)


@pytest.mark.parametrize("name", CONFIGS)
def test_the_graph_is_the_contract(serving_artifacts, name):
    artifact = Artifact.open(serving_artifacts[name])
    model = onnx.load(str(artifact.onnx_path), load_external_data=False)
    onnx.checker.check_model(str(artifact.onnx_path), full_check=True)
    assert {o.domain: o.version for o in model.opset_import}[""] == SERVING_OPSET
    inputs, outputs = io_specs(artifact.spec, DType.FP32, layout=Layout.SERVING)
    assert [i.name for i in model.graph.input] == [t.name for t in inputs]
    assert [o.name for o in model.graph.output] == [t.name for t in outputs]
    ops = collections.Counter(n.op_type for n in model.graph.node)
    layers = artifact.spec.num_layers
    assert ops["TensorScatter"] == 2 * layers and ops["Attention"] == layers
    # the cache feeds only its TensorScatter (and a Shape, for the capacity): no Concat, no
    # Expand (GQA is read natively)
    consumers = collections.defaultdict(list)
    for node in model.graph.node:
        for value in node.input:
            consumers[value].append(node.op_type)
    for cache, updated in cache_pairs(layers):
        assert [op for op in consumers[cache] if op != "Shape"] == ["TensorScatter"]
        assert sorted(consumers[updated]) == ["Attention"]
    assert artifact.manifest.data["layout"] == "serving" and artifact.manifest.data["logits"] == "last"
    assert artifact.layout is Layout.SERVING and not artifact.all_logits


@pytest.mark.parametrize("fast", [True, False], ids=["gqa", "standard"])
@pytest.mark.parametrize("name", CONFIGS)
def test_ragged_steps_match_transformers_row_by_row(serving_artifacts, hf_checkpoints, name, fast):
    """One batch where rows prefill different lengths, then a step where one row decodes one
    token while another prefills a chunk and a third is idle: every row's last-token logits
    equal transformers' on that row's whole sequence alone."""
    from transformers import MixtralForCausalLM

    hf = MixtralForCausalLM.from_pretrained(hf_checkpoints[name], dtype=torch.float32).eval()
    runner = OrtRunner(serving_artifacts[name], threads=1, fast_attention=fast)
    assert runner.fast_attention == (runner.spec.num_layers if fast else 0)
    step = ServingStep(runner, capacity=CAPACITY, max_batch=3)
    cache = step.new_cache()
    cache.reset(3, CAPACITY)
    rng = np.random.default_rng(1)
    vocab = runner.spec.vocab_size
    seqs = [list(rng.integers(0, vocab, n)) for n in (5, 11, 1)]
    logits = step.run(*ragged(seqs, [0, 0, 0]), cache)
    for b, seq in enumerate(seqs):
        np.testing.assert_allclose(logits[b], hf_last_logits(hf, seq), atol=1e-4)
    news = [[int(rng.integers(vocab))], list(rng.integers(0, vocab, 7)), []]   # decode, chunk, idle
    logits = step.run(*ragged(news, [len(s) for s in seqs]), cache).copy()
    assert list(cache.lengths) == [6, 18, 1]
    for b in (0, 1):
        np.testing.assert_allclose(logits[b], hf_last_logits(hf, seqs[b] + news[b]), atol=1e-4)


def greedy(step: ServingStep, cache, schedule: dict, steps: int) -> dict[int, list[int]]:
    """Greedy decoding where request r (row r) joins at step t with prompt p, schedule[r] =
    (t, p); returns every row's generated tokens."""
    rows = cache.batch
    tokens = {r: [] for r in range(rows)}
    pending = dict.fromkeys(range(rows))
    prompts = dict(schedule)
    for t in range(steps):
        feed, starts = [], []
        for r in range(rows):
            joined = prompts.get(r)
            if joined is not None and joined[0] == t:
                feed.append(list(joined[1]))
            elif pending[r] is not None:
                feed.append([pending[r]])
            else:
                feed.append([])
            starts.append(int(cache.lengths[r]))
        logits = step.run(*ragged(feed, starts), cache)
        for r in range(rows):
            if feed[r]:
                pending[r] = int(np.argmax(logits[r]))
                tokens[r].append(pending[r])
    return tokens


@pytest.fixture(scope="module")
def fixture_serving(fixture_fp32_artifact):
    return fixture_fp32_artifact        # the default export: the serving layout


@pytest.mark.parametrize("fast", [True, False], ids=["gqa", "standard"])
def test_a_request_joining_a_running_batch_gets_the_tokens_it_gets_alone(fixture_serving, fast):
    step = ServingStep(OrtRunner(fixture_serving, threads=1, fast_attention=fast), capacity=96,
                       max_batch=2)
    a = [1, 755, 912, 300, 41]
    b = list(range(40, 70))                          # a 30-token prompt
    together = step.new_cache()
    together.reset(2, 96)
    both = greedy(step, together, {0: (0, a), 1: (5, b)}, steps=20)
    alone = {}
    for row, prompt in ((0, a), (1, b)):
        cache = step.new_cache()
        cache.reset(1, 96)
        alone[row] = greedy(step, cache, {0: (0, prompt)}, steps=20 - (5 if row else 0))[0]
    assert both[0] == alone[0] and both[1] == alone[1] and len(both[1]) == 15


@pytest.mark.parametrize("fast", [True, False], ids=["gqa", "standard"])
def test_the_cache_is_updated_in_place(serving_artifacts, fast):
    runner = OrtRunner(serving_artifacts["tiny"], threads=1, fast_attention=fast)
    step = ServingStep(runner, capacity=CAPACITY, max_batch=2)
    cache = step.new_cache()
    cache.reset(2, CAPACITY)
    pointers = [b.ctypes.data for b in cache.buffers]
    step.run(*ragged([[3, 4, 5], [6]], [0, 0]), cache)
    for _ in range(4):
        step.run(*ragged([[7], [8]], list(cache.lengths[:2])), cache)
    assert [b.ctypes.data for b in cache.buffers] == pointers
    bound = cache.binding.get_outputs()          # in binding order: the caches, then logits
    assert len(bound) == len(cache.names) + 1
    # every updated-cache output ONNX Runtime produced is our buffer itself: nothing copied out
    assert [v.data_ptr() for v in bound[:len(cache.names)]] == pointers
    assert list(cache.lengths) == [7, 5]
    assert np.abs(cache.buffers[0][0, :, 6]).sum() > 0 and np.abs(cache.buffers[0][0, :, 7:]).sum() == 0


@pytest.mark.parametrize("fast", [True, False], ids=["gqa", "standard"])
def test_a_torch_tensor_cache_is_bound_and_updated_like_a_numpy_one(serving_artifacts, fast):
    """device="cuda" keeps the cache as torch tensors and binds their addresses; here the same
    code binds torch CPU tensors (the CUDA provider itself is unverified without a GPU)."""
    from mixbuild.runtime.kv_cache import TorchStaticCache

    runner = OrtRunner(serving_artifacts["tiny"], threads=1, fast_attention=fast)
    step = ServingStep(runner, capacity=CAPACITY, max_batch=2)
    arrays, tensors = step.new_cache(), TorchStaticCache(step.spec, CAPACITY, 2, torch.float32, "cpu")
    out = {}
    for name, cache in (("numpy", arrays), ("torch", tensors)):
        cache.reset(2, CAPACITY)
        out[name] = [step.run(*ragged([[3, 4, 5], [6]], [0, 0]), cache).copy()]
        for t in range(3):
            out[name].append(step.run(*ragged([[7 + t], [8]], list(cache.lengths[:2])), cache).copy())
    np.testing.assert_array_equal(np.stack(out["numpy"]), np.stack(out["torch"]))
    for a, t in zip(arrays.buffers, tensors.buffers):
        np.testing.assert_array_equal(a, t.numpy())
    assert np.abs(tensors.buffers[0][0, :, 5].numpy()).sum() > 0


def test_new_rows_prefill_together_beside_running_decodes(fixture_serving):
    """The fast path's mixed step: two new requests (adjacent rows, empty caches) prefill in
    one call of the kernel's prompt mode, one row decodes, one prompt continues a chunk; each
    row's logits equal the standard graph's."""
    from mixbuild.runtime import steps as S

    out = {}
    calls = []
    for fast in (True, False):
        step = ServingStep(OrtRunner(fixture_serving, threads=1, fast_attention=fast), capacity=64,
                           max_batch=4)
        if fast:
            def recording(*a, original=step._call, **k):
                calls.append(a[4])
                return original(*a, **k)
            step._call = recording
        cache = step.new_cache()
        cache.reset(4, 64)
        step.run(*ragged([[5, 6, 7], [], [], [40, 41, 42, 43]], [0, 0, 0, 0]), cache)
        calls.clear()
        rows = [[8], [100, 101, 102, 103, 104], [200, 201, 202], [44, 45]]
        out[fast] = step.run(*ragged(rows, list(cache.lengths)), cache).copy()
        assert list(cache.lengths) == [4, 5, 3, 6]
        if fast:
            fast_calls = list(calls)
    np.testing.assert_allclose(out[True], out[False], atol=1e-4)
    assert fast_calls == [slice(0, 4), slice(1, 3), slice(3, 4)], fast_calls
    assert S._prefill_groups([1, 2, 3], np.array([4, 0, 0, 4])) == [slice(1, 3), slice(3, 4)]


def test_onnx_reference_evaluator_agrees_with_onnxruntime(serving_artifacts):
    from onnx.reference import ReferenceEvaluator

    path = Artifact.open(serving_artifacts["tiny-e4k1-mqa"]).onnx_path
    reference = ReferenceEvaluator(str(path))
    runner = OrtRunner(serving_artifacts["tiny-e4k1-mqa"], threads=1, fast_attention=False)
    spec = runner.spec
    shape = (2, spec.num_kv_heads, 16, spec.head_dim)
    cache = {name: np.zeros(shape, np.float32) for name, _ in cache_pairs(spec.num_layers)}
    for rows, starts in (([[5, 6, 7, 8], [9, 10]], [0, 0]), ([[11], [12]], [4, 2])):   # prefill, decode
        ids, positions, counts = ragged(rows, starts)
        feeds = {INPUT_IDS: ids, POSITION_IDS: positions, CACHE_LENGTHS: np.array(starts),
                 INPUT_LENGTHS: counts, **cache}
        got = runner.session.run(None, feeds)
        want = reference.run(None, feeds)
        np.testing.assert_allclose(got[0], want[0], atol=1e-5)     # logits [B, V]
        for i, (name, _) in enumerate(cache_pairs(spec.num_layers)):
            np.testing.assert_allclose(got[1 + i], want[1 + i], atol=1e-5)
            cache[name] = got[1 + i]


def test_generation_through_the_runtime_matches_the_concat_layout(serving_artifacts, hf_checkpoints,
                                                                  tmp_path):
    import mixbuild.runtime as rt

    concat = export_checkpoint(hf_checkpoints["tiny"], tmp_path / "concat", progress=False)
    prompts = [[1, 5, 9, 2, 7], [3], [8, 8, 8, 8, 8, 8, 8, 8, 4]]
    want = rt.load(concat, threads=1).generate_ids(prompts, max_new_tokens=12)
    got = rt.load(serving_artifacts["tiny"], threads=1, max_context=64).generate_ids(
        prompts, max_new_tokens=12)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]


def test_all_position_logits_are_an_export_option(hf_checkpoints, tmp_path):
    artifact = export_checkpoint(hf_checkpoints["tiny"], tmp_path / "all", layout="serving",
                                 all_logits=True, progress=False)
    runner = OrtRunner(artifact, threads=1)
    spec = runner.spec
    cache = {n: np.zeros((1, spec.num_kv_heads, 8, spec.head_dim), np.float32)
             for n, _ in cache_pairs(spec.num_layers)}
    ids, positions, counts = ragged([[4, 5, 6]], [0])
    out = runner.session.run([LOGITS], {INPUT_IDS: ids, POSITION_IDS: positions,
                                        CACHE_LENGTHS: np.zeros(1, np.int64), INPUT_LENGTHS: counts,
                                        **cache})[0]
    assert out.shape == (1, 3, spec.vocab_size)
    assert Artifact.open(artifact).manifest.data["logits"] == "all"
    assert Artifact.open(artifact).all_logits


def test_the_fast_path_computes_what_the_artifact_does(fixture_serving):
    """GroupQueryAttention (the session-time rewrite) against the artifact's own TensorScatter +
    Attention graph over a mixed schedule: a ragged first prefill, decode steps, a row joining
    with a chunk while the others decode, an idle row. Logits and every valid cache position
    agree; positions past a row's length are scratch, which the contract leaves unspecified."""
    steps = {fast: ServingStep(OrtRunner(fixture_serving, threads=1, fast_attention=fast),
                               capacity=64, max_batch=3) for fast in (True, False)}
    caches = {fast: step.new_cache() for fast, step in steps.items()}
    for cache in caches.values():
        cache.reset(3, 64)
    schedule = [[[5, 6, 7], [8], []], [[9], [10], []], [[11], [12], [13, 14, 15, 16, 17]],
                [[18], [], [19]]]
    for rows in schedule:
        out = {}
        for fast, step in steps.items():
            starts = list(caches[fast].lengths[:3])
            out[fast] = step.run(*ragged(rows, starts), caches[fast]).copy()
        for b, row in enumerate(rows):
            if row:
                np.testing.assert_allclose(out[True][b], out[False][b], atol=1e-4)
    lengths = caches[True].lengths
    assert list(lengths) == list(caches[False].lengths) == [6, 3, 6]
    for fast_buffer, plain_buffer in zip(caches[True].buffers, caches[False].buffers):
        for b, n in enumerate(lengths):
            np.testing.assert_allclose(fast_buffer[b, :, :n], plain_buffer[b, :, :n], atol=1e-5)


@pytest.mark.parametrize("precision", ["fp8", "int4"])
def test_quantized_serving_artifacts_compute_what_the_concat_ones_do(fixture_export, precision):
    """Same calibration, same quantized weights: the serving layout's last-token logits equal
    the concat layout's on a batch of different prompt lengths (only the attention kernels
    differ)."""
    from mixbuild.runtime.runner import left_pad, prefill_feeds
    from tests.conftest import small_quant

    quant = small_quant(precision)
    concat = OrtRunner(fixture_export(quant=quant, layout="concat"), threads=1)
    serving = OrtRunner(fixture_export(quant=quant), threads=1)   # the default layout
    prompts = [[1, 755, 912, 300, 41, 7, 9], [1, 40, 41], [1, 1000, 1001, 1002, 1003]]
    ids, mask = left_pad(prompts, 0)
    want = concat.infer(prefill_feeds(concat.spec, ids, mask))[LOGITS][:, -1]
    step = ServingStep(serving, capacity=16, max_batch=3)
    cache = step.new_cache()
    cache.reset(3, 16)
    got = step.run(*ragged(prompts, [0, 0, 0]), cache)
    assert (got.argmax(-1) == want.argmax(-1)).all()
    assert np.abs(got - want).max() < 1e-4      # measured: fp8 1.9e-6, int4 6.7e-6


def test_the_torch_backend_runs_the_serving_contract(fixture_dir, fixture_serving):
    """layout="serving" on the torch backend: a static cache updated in place (the model writes
    the caller's tensors), and the same greedy tokens as the ONNX serving artifact and as the
    torch backend's own concat layout, for a batch of different prompt lengths."""
    import mixbuild.runtime as rt

    prompts = [[1, 755, 912, 300], [1, 40], [1, 1000, 1001, 1002, 1003, 1004]]
    torch_serving = rt.load(fixture_dir, backend="torch", layout="serving", max_context=64)
    got = torch_serving.generate_ids(prompts, max_new_tokens=12)
    concat = rt.load(fixture_dir, backend="torch").generate_ids(prompts, max_new_tokens=12)
    onnx = rt.load(fixture_serving, max_context=64, threads=1).generate_ids(prompts, max_new_tokens=12)
    assert [r.token_ids for r in got] == [r.token_ids for r in concat] == [r.token_ids for r in onnx]
    step = torch_serving.step
    cache = step.new_cache()
    cache.reset(1, 64)
    before = [b.data_ptr() for b in cache.buffers]
    step.run(*ragged([[5, 6, 7]], [0]), cache)
    assert [b.data_ptr() for b in cache.buffers] == before and cache.buffers[0][0, :, 2].abs().sum() > 0


def test_layout_is_refused_where_it_cannot_apply(fixture_serving):
    import mixbuild.runtime as rt
    from mixbuild.errors import UsageError

    with pytest.raises(UsageError, match="layout is a choice of the torch backend only"):
        rt.load(fixture_serving, layout="serving")
    with pytest.raises(UsageError, match="unknown KV-cache layout 'paged'"):
        rt.load(fixture_serving, backend="torch", layout="paged")


@pytest.mark.parametrize("field, value, message", [
    ("layout", "paged", "field 'layout'"),
    ("layout", "concat", "does not match the artifact"),     # the graph's inputs are serving's
    ("logits", "every", "field 'logits'"),
])
def test_an_edited_layout_is_refused(serving_artifacts, tmp_path, field, value, message):
    import json
    import shutil

    from mixbuild.errors import ArtifactError

    artifact = tmp_path / "a"
    shutil.copytree(serving_artifacts["tiny"], artifact)
    manifest = json.loads((artifact / "mixbuild.json").read_text())
    manifest[field] = value
    (artifact / "mixbuild.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=message):
        Artifact.open(artifact)
