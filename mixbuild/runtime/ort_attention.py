"""ONNX Runtime's fast path for the serving layout's attention, chosen when a session is made.

The artifact expresses each layer's cache update and attention in standard ONNX (opset 24):

    updated_k = TensorScatter(cache_k, k [B, Nkv, S, D], cache_lengths, axis=2)   (and v)
    y = Attention(q [B, Nq, S, D], updated_k, updated_v, mask [B, 1, S, C])

ONNX Runtime 1.32's CPU Attention reads the whole capacity C of the cache on every step, valid
or not (measured: a flat ~280 us per layer at C = 2048, GQA 16/4 heads, D = 64, whether 16 or
1900 positions are valid), so decode time would follow the capacity instead of the context.
Its contrib op com.microsoft.GroupQueryAttention does the same work reading only each row's
valid positions (11 us at 16 positions, 334 us at 1900): it takes the new K/V, writes them into
the cache in place when the cache input and output share one buffer (the serving step binds
them so), and applies the causal mask from per-row lengths. This module rewrites a private,
in-memory copy of the graph to it; the artifact on disk stays standard ONNX for every other
consumer (TensorRT parses TensorScatter / Attention itself).

Per row b, GroupQueryAttention takes seqlens_k[b] = cache_lengths[b] + S - 1: it places the S
(right-padded) new tokens at cache_lengths[b] .., as TensorScatter does, and lets query s see
positions <= cache_lengths[b] + s, which is the serving mask.

One limit of the kernel (ONNX Runtime 1.32, CPU): a step of several tokens over a non-empty
cache must have one row ("batch_size must be 1 when sequence_length > 1 and past context is
given"). A first prefill (every row's cache empty) and a decode step of any batch are fine;
ServingStep splits a mixed step (one row prefills a chunk while others decode) into one decode
call for the batch and one call per prefilling row.
"""

from __future__ import annotations

from mixbuild.contract import CACHE_LENGTHS, INPUT_IDS, cache_key


def rewrite_attention(model, num_heads: int, kv_num_heads: int, sliding_window: int | None) -> int:
    """Replace every TensorScatter/TensorScatter/Attention triple of `model` (an onnx
    ModelProto, changed in place) by one GroupQueryAttention. Returns how many were replaced."""
    from onnx import TensorProto, helper

    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    nodes, dropped, count = [], set(), 0
    shared = _shared_inputs(helper, TensorProto)
    for node in graph.node:
        if node.op_type != "Attention" or node.domain not in ("", "ai.onnx"):
            nodes.append(node)
            continue
        q, k_updated, v_updated = node.input[:3]
        k_scatter, v_scatter = producers[k_updated], producers[v_updated]
        if k_scatter.op_type != "TensorScatter" or v_scatter.op_type != "TensorScatter":
            nodes.append(node)
            continue
        dropped |= {id(k_scatter), id(v_scatter)}
        tag = f"mb_gqa{count}"
        q3, k3, v3 = (_to_bsh(helper, nodes, name, f"{tag}_{part}")
                      for name, part in ((q, "q"), (k_scatter.input[1], "k"), (v_scatter.input[1], "v")))
        if count == 0:
            nodes.extend(shared[0])
        out3 = f"{tag}_out"
        attrs = {"num_heads": num_heads, "kv_num_heads": kv_num_heads}
        if sliding_window is not None:
            attrs["local_window_size"] = sliding_window - 1
        nodes.append(helper.make_node(
            "GroupQueryAttention",
            [q3, k3, v3, k_scatter.input[0], v_scatter.input[0], shared[1], shared[2]],
            [out3, k_updated, v_updated], name=tag, domain="com.microsoft", **attrs))
        split = f"{tag}_split"
        nodes.append(helper.make_node("Reshape", [out3, "mb_gqa_split_shape"], [split]))
        nodes.append(helper.make_node("Transpose", [split], [node.output[0]], perm=[0, 2, 1, 3]))
        count += 1
    if not count:
        return 0
    kept = [n for n in nodes if id(n) not in dropped]
    kept.insert(0, helper.make_node("Constant", [], ["mb_gqa_split_shape"],
                                    value=helper.make_tensor("v", TensorProto.INT64, [4],
                                                             [0, 0, num_heads, -1])))
    del graph.node[:]
    graph.node.extend(_reachable(kept, {o.name for o in graph.output}))
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return count


def _to_bsh(helper, nodes: list, name: str, tag: str) -> str:
    """[B, N, S, D] -> [B, S, N*D]: the layout GroupQueryAttention reads."""
    nodes.append(helper.make_node("Transpose", [name], [f"{tag}_t"], perm=[0, 2, 1, 3]))
    nodes.append(helper.make_node("Reshape", [f"{tag}_t", "mb_gqa_bsh"], [f"{tag}_bsh"]))
    return f"{tag}_bsh"


def _shared_inputs(helper, TensorProto):
    """Nodes computing GroupQueryAttention's per-row seqlens_k and total length once, from the
    graph's own inputs; returns (nodes, seqlens_k name, total length name)."""
    i64 = TensorProto.INT64
    nodes = [
        helper.make_node("Constant", [], ["mb_gqa_bsh"],
                         value=helper.make_tensor("v", i64, [3], [0, 0, -1])),
        helper.make_node("Shape", [INPUT_IDS], ["mb_gqa_seq"], start=1, end=2),            # [S]
        helper.make_node("Constant", [], ["mb_gqa_one"], value=helper.make_tensor("v", i64, [1], [1])),
        helper.make_node("Sub", ["mb_gqa_seq", "mb_gqa_one"], ["mb_gqa_seq_m1"]),
        helper.make_node("Add", [CACHE_LENGTHS, "mb_gqa_seq_m1"], ["mb_gqa_last"]),        # [B]
        helper.make_node("Cast", ["mb_gqa_last"], ["mb_gqa_seqlens_k"], to=TensorProto.INT32),
        helper.make_node("Shape", [cache_key(0)], ["mb_gqa_cap"], start=2, end=3),         # [C]
        # total_sequence_length: S for a first prompt (every cache empty: the kernel's prompt
        # mode), else the capacity (decode, or one row's chunk after its past)
        helper.make_node("ReduceMax", [CACHE_LENGTHS], ["mb_gqa_max_len"], keepdims=1),
        helper.make_node("Constant", [], ["mb_gqa_zero"], value=helper.make_tensor("v", i64, [1], [0])),
        helper.make_node("Equal", ["mb_gqa_max_len", "mb_gqa_zero"], ["mb_gqa_first"]),
        helper.make_node("Where", ["mb_gqa_first", "mb_gqa_seq", "mb_gqa_cap"], ["mb_gqa_total1"]),
        helper.make_node("Squeeze", ["mb_gqa_total1"], ["mb_gqa_total64"]),
        helper.make_node("Cast", ["mb_gqa_total64"], ["mb_gqa_total"], to=TensorProto.INT32),
    ]
    return nodes, "mb_gqa_seqlens_k", "mb_gqa_total"


def upstream(producers: dict, values) -> set[int]:
    """ids of the nodes that `values` (value names) depend on, given value -> producing node."""
    found, stack = set(), list(values)
    while stack:
        node = producers.get(stack.pop())
        if node is None or id(node) in found:
            continue
        found.add(id(node))
        stack.extend(i for i in node.input if i)
    return found


def _reachable(nodes: list, outputs: set[str]) -> list:
    """The nodes some graph output depends on, in their order (drops the unused mask subgraph)."""
    needed = upstream({out: n for n in nodes for out in n.output}, outputs)
    return [n for n in nodes if id(n) in needed]
