"""Layer-by-layer calibration: activation ranges, routed-token counts and AWQ scales.

Only one decoder layer's weights are in memory at a time: the calibration hidden states are
carried forward through each float layer, statistics are collected on the way, and the layer is
dropped. Every expert is calibrated on every calibration token (its routed tokens alone may be
few or none); the routed counts are recorded so the manifest shows real expert load.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from mixbuild.contract import TOKENIZER_FILE
from mixbuild.errors import CheckpointError, UsageError
from mixbuild.model.checkpoint import Checkpoint
from mixbuild.model.reference import DecoderLayer, RMSNorm, attention_bias, rope_tables
from mixbuild.quant import awq
from mixbuild.quant.config import QuantConfig
from mixbuild.quant.quantize import HEAD, QuantStore, SmoothedWeights, quantize_matrix

# Standard-library modules whose source is the built-in calibration text: present wherever
# Python is, no download, and a different text from the validator's evaluation data.
CALIBRATION_MODULES = ("textwrap", "string", "bisect", "heapq", "fnmatch", "shlex", "colorsys",
                       "glob", "calendar", "difflib", "json.encoder", "json.decoder", "csv",
                       "argparse", "dataclasses", "functools", "pathlib")


def default_calibration_text() -> str:
    import importlib

    return "\n\n".join(inspect.getsource(importlib.import_module(name))
                       for name in CALIBRATION_MODULES)


def read_calibration_text(path: str | Path) -> str:
    """The text of a --calib file: UTF-8 (an optional BOM is dropped), no NUL bytes, not
    empty; a UsageError naming the file and what is wrong otherwise. Replacing undecodable
    bytes would silently calibrate on U+FFFD runs (a binary file, a UTF-16 or Latin-1 text),
    giving activation ranges of text the model never sees."""
    path = Path(path)
    hint = "pass a UTF-8 text file with --calib, or omit it for the built-in text"
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read the calibration file {path}", found=str(exc),
                         hint=hint) from exc
    if b"\x00" in data:
        offset = data.index(b"\x00")
        raise UsageError(f"calibration file {path} is binary, not text",
                         expected="UTF-8 text", found=f"a NUL byte at offset {offset} of "
                                                      f"{len(data)} bytes", hint=hint)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UsageError(f"calibration file {path} is not UTF-8 text",
                         expected="UTF-8 text",
                         found=f"byte 0x{data[exc.start]:02x} at offset {exc.start} is not valid "
                               "UTF-8", hint="convert it to UTF-8 (e.g. iconv -t UTF-8), or "
                                             "omit --calib for the built-in text") from exc
    if not text.strip():
        raise UsageError(f"calibration file {path} is empty",
                         expected="text to calibrate on",
                         found=f"{len(data)} bytes" + (" of whitespace" if data else ""), hint=hint)
    return text


def calibration_tokens(ckpt: Checkpoint, config: QuantConfig) -> Tensor:
    """[N, L] int64 token ids: the calibration text cut into N sequences of L tokens."""
    from tokenizers import Tokenizer

    text = (read_calibration_text(config.calib_file) if config.calib_file
            else default_calibration_text())
    tok_path = ckpt.path / TOKENIZER_FILE
    if not tok_path.is_file():
        raise CheckpointError(f"calibration needs the checkpoint's tokenizer: {tok_path} not found",
                              hint="copy tokenizer.json into the checkpoint directory")
    ids = Tokenizer.from_file(str(tok_path)).encode(text).ids
    length = config.calib_seq_len
    rows = min(len(ids) // length, config.calib_tokens // length)
    if rows < 1:
        raise UsageError("calibration text is too short",
                         expected=f"at least {length} tokens", found=f"{len(ids)} tokens",
                         hint="pass a longer --calib file")
    return torch.tensor(ids[:rows * length], dtype=torch.long).view(rows, length)


@dataclass
class LayerCalibration:
    """What the quantizers need from one layer (all small tensors)."""

    routed: list[int]                          # real routed tokens per expert
    amax: dict[str, float]                     # attn_in, o_in, moe_in
    down_in_amax: list[float]                  # per expert, SwiGLU output over all tokens
    smooth: dict[str, Tensor] = field(default_factory=dict)  # AWQ scales: attn, o, moe, down
    alpha: dict[str, float] = field(default_factory=dict)
    weight_error: dict[str, float] = field(default_factory=dict)
    expert_error: dict[str, list[float]] = field(default_factory=dict)  # gate_up, down per expert


def load_layer(ckpt: Checkpoint, index: int) -> DecoderLayer:
    """One float32 decoder layer with its weights (the only layer in memory)."""
    layer = DecoderLayer(ckpt.spec)
    roles = {"input_norm.weight": "input_norm", "post_norm.weight": "post_norm",
             "attn.q_proj.weight": "q_proj", "attn.k_proj.weight": "k_proj",
             "attn.v_proj.weight": "v_proj", "attn.o_proj.weight": "o_proj",
             "moe.gate.weight": "router"}
    with torch.no_grad():
        for name, role in roles.items():
            layer.get_parameter(name).copy_(ckpt.weight(role, index))
        layer.moe.w_gate_up.copy_(ckpt.expert_gate_up(index))
        layer.moe.w_down.copy_(ckpt.expert_down(index))
    return layer.float().eval()


def _swiglu(x: Tensor, w_gate_up: Tensor) -> Tensor:
    gate, up = (x @ w_gate_up.T).chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


@torch.no_grad()
def calibrate(ckpt: Checkpoint, config: QuantConfig, store: QuantStore,
              progress: bool = True) -> list[LayerCalibration]:
    """Walk the layers once: statistics, AWQ scales, and the layer's quantized weights (to
    `store`), with only that layer's float weights in memory."""
    from mixbuild.progress import track

    spec = ckpt.spec
    config.check_spec(spec)
    tokens = calibration_tokens(ckpt, config)
    mask = torch.ones_like(tokens)
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    cos, sin = rope_tables(positions, spec.rope_theta, spec.head_dim, torch.float32)
    bias = attention_bias(mask, tokens.shape[1], spec.sliding_window)
    hidden = ckpt.weight("embed").float()[tokens]
    empty = torch.zeros(tokens.shape[0], spec.num_kv_heads, 0, spec.head_dim)
    results: list[LayerCalibration] = []
    smoothed = SmoothedWeights(ckpt, results)
    for index in track(range(spec.num_layers), total=spec.num_layers, label="calibrating layers",
                       enabled=progress):
        layer = load_layer(ckpt, index)
        out, result, acts = _calibrate_layer(layer, hidden, (cos, sin, bias, empty), config)
        results.append(result)
        tensors = _quantize_layer(index, smoothed, result, acts, config)
        store.save(index, tensors)
        if config.propagate:   # the next layer calibrates on what the quantized layers give it
            quantized = _dequantized_layer(ckpt, index, smoothed, tensors, config)
            out = _forward(quantized, hidden, (cos, sin, bias, empty))
        hidden = out
    if config.lm_head.quantized:
        store.save(HEAD, _quantize_lm_head(ckpt, hidden, config, store))
    return results


def _quantize_lm_head(ckpt: Checkpoint, hidden: Tensor, config: QuantConfig,
                      store: QuantStore) -> dict[str, tuple[Tensor, Tensor]]:
    """lm_head, GPTQ-rounded on its real inputs: the final norm of the last layer's output
    on the calibration tokens (no AWQ smoothing: the final norm's weight would have to absorb
    it, and the embedding is not in front of it). Its relative weight error goes to
    `store.head_error`."""
    spec = ckpt.spec
    norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
    norm.weight.copy_(ckpt.weight("final_norm").float())
    x = norm(hidden).reshape(-1, spec.hidden_size)
    w = ckpt.weight("lm_head").float()
    q, scale, wq = quantize_matrix(w, x, None, config, scheme=config.head_scheme)
    store.head_error = awq.relative_error(w, wq)
    return {"lm_head.weight": (q, scale)}


def _dequantized_layer(ckpt: Checkpoint, index: int, smoothed: SmoothedWeights, tensors,
                       config: QuantConfig) -> DecoderLayer:
    """Layer `index` as the artifact computes it (weight rounding; activations in float): the
    smoothed norms and router, and the dequantized linears and experts of `tensors`."""
    layer = DecoderLayer(ckpt.spec)
    prefix = f"layers.{index}."

    def dequantize(q: Tensor, scale: Tensor) -> Tensor:   # [N, K] or [E, N, K] codes
        batched = q if q.dim() == 3 else q[None]
        s = scale if q.dim() == 3 else scale[None]
        w = config.scheme.dequantize(batched, s, config)
        return w if q.dim() == 3 else w[0]

    with torch.no_grad():
        for name in ("input_norm.weight", "post_norm.weight", "moe.gate.weight"):
            layer.get_parameter(name).copy_(smoothed(prefix + name))
        for name in ("attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight",
                     "attn.o_proj.weight", "moe.w_gate_up", "moe.w_down"):
            layer.get_parameter(name).copy_(dequantize(*tensors[prefix + name]))
    return layer.float().eval()


def _forward(layer: DecoderLayer, x: Tensor, attn_args) -> Tensor:
    """The decoder layer's output on x (the residual stream after attention and MoE)."""
    cos, sin, bias, empty = attn_args
    x = x + layer.attn(layer.input_norm(x), cos, sin, bias, empty, empty)[0]
    return x + layer.moe(layer.post_norm(x))[0]


def _calibrate_layer(layer: DecoderLayer, x: Tensor, attn_args, config: QuantConfig):
    cos, sin, bias, empty = attn_args
    captured = {}
    hook = layer.attn.o_proj.register_forward_pre_hook(
        lambda module, args: captured.__setitem__("o_in", args[0].reshape(-1, args[0].shape[-1])))
    attn_in = layer.input_norm(x)
    attn, _, _ = layer.attn(attn_in, cos, sin, bias, empty, empty)
    hook.remove()
    x = x + attn
    moe_in = layer.post_norm(x)
    moe, _router_logits, ids = layer.moe(moe_in)
    num_experts = layer.moe.w_gate_up.shape[0]
    flat_attn, flat_moe = attn_in.reshape(-1, x.shape[-1]), moe_in.reshape(-1, x.shape[-1])
    swiglu = [_swiglu(flat_moe, layer.moe.w_gate_up[e]) for e in range(num_experts)]
    routed = [(ids == e).any(dim=-1) for e in range(num_experts)]
    result = LayerCalibration(
        routed=torch.bincount(ids.reshape(-1).long(), minlength=num_experts).tolist(),
        amax={"attn_in": float(flat_attn.abs().max()), "o_in": float(captured["o_in"].abs().max()),
              "moe_in": float(flat_moe.abs().max())},
        down_in_amax=[float(a.abs().max()) for a in swiglu])
    acts = {"attn": flat_attn, "o": captured["o_in"], "moe": flat_moe, "down": swiglu,
            "routed": routed}
    if config.smooths:
        _search_smoothing(layer, result, acts, config)
    return x + moe, result, acts


def _search_smoothing(layer: DecoderLayer, result: LayerCalibration, acts, config) -> None:
    """AWQ scales for each group of linears that share an input (the 1/s is folded upstream)."""
    quantize = awq.int4_fake_quant(config.group_size)
    attn, moe = layer.attn, layer.moe
    experts = range(moe.w_gate_up.shape[0])
    groups = {"attn": (acts["attn"], [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]),
              "moe": (acts["moe"], [moe.w_gate_up[e] for e in experts])}
    if attn.nq == attn.nkv:  # o_proj's input channels are v_proj's rows only without GQA
        groups["o"] = (acts["o"], [attn.o_proj.weight])
    for name, (x, weights) in groups.items():
        result.smooth[name], result.alpha[name] = awq.search_scales(x, weights, quantize,
                                                                    config.awq_grid)
    downs = [awq.search_scales(acts["down"][e], [moe.w_down[e]], quantize, config.awq_grid)
             for e in experts]
    result.smooth["down"] = torch.stack([s for s, _ in downs])
    result.alpha["down"] = sum(a for _, a in downs) / len(downs)


def _quantize_layer(index: int, smoothed: SmoothedWeights, result: LayerCalibration, acts,
                    config: QuantConfig) -> dict[str, tuple[Tensor, Tensor]]:
    """Quantize every linear and expert of the layer (GPTQ on its smoothed inputs)."""
    s = result.smooth
    one = torch.ones(())
    prefix = f"layers.{index}."
    out = {}
    inputs = {"q_proj": acts["attn"] / s.get("attn", one), "k_proj": acts["attn"] / s.get("attn", one),
              "v_proj": acts["attn"] / s.get("attn", one), "o_proj": acts["o"] / s.get("o", one)}
    for name, x in inputs.items():
        param = f"{prefix}attn.{name}.weight"
        w = smoothed(param)
        q, scale, wq = quantize_matrix(w, x, None, config)
        out[param] = (q, scale)
        result.weight_error[name] = awq.relative_error(w, wq)
    gate_up = smoothed(f"{prefix}moe.w_gate_up")
    down = smoothed(f"{prefix}moe.w_down")
    x_moe = acts["moe"] / s.get("moe", one)
    encoded = {"w_gate_up": [], "w_down": []}
    result.expert_error = {"gate_up": [], "down": []}
    for e, mask in enumerate(acts["routed"]):
        x_down = acts["down"][e] / (s["down"][e] if "down" in s else one)
        for key, w, x in (("gate_up", gate_up[e], x_moe), ("down", down[e], x_down)):
            q, scale, wq = quantize_matrix(w, x, x[mask], config)
            encoded[f"w_{key}"].append((q, scale))
            result.expert_error[key].append(awq.relative_error(w, wq))
    for key, pairs in encoded.items():
        out[f"{prefix}moe.{key}"] = (torch.stack([q for q, _ in pairs]),
                                     torch.stack([sc for _, sc in pairs]))
    return out
