"""Small, tested passes over the exported ONNX graph, and the fused-op accounting.

The fused nodes themselves come out of the exporter (the model emits them while tracing);
what is here tidies the graph for the precision passes and checks the fusion is complete:
every LayerNorm of the model is one `com.microsoft.SkipLayerNormalization` (2 * n_layer + 1,
the embedding sum included) and no plain `LayerNormalization` is left.
"""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import onnx
from onnx import numpy_helper

logger = logging.getLogger(__name__)

CONTRIB_DOMAIN = "com.microsoft"
FUSED_OPS = ("SkipLayerNormalization", "LayerNormalization", "FastGelu", "BiasGelu", "Gelu", "GroupQueryAttention")


class FusionError(RuntimeError):
    """The exported graph is not fused the way the service expects."""


def op_counts(model: onnx.ModelProto) -> Counter[str]:
    """Node counts by op type (top-level graph; ours has no subgraphs)."""
    return Counter(n.op_type for n in model.graph.node)


def fused_op_counts(model: onnx.ModelProto) -> dict[str, int]:
    counts = op_counts(model)
    return {op: counts.get(op, 0) for op in FUSED_OPS}


def check_fusion(model: onnx.ModelProto, n_layer: int, attention: str = "standard") -> dict[str, int]:
    """Raise `FusionError` unless every LayerNorm is a SkipLayerNormalization (and, for the
    `gqa` graph, every layer's attention one GroupQueryAttention); return the counts."""
    counts = fused_op_counts(model)
    want = 2 * n_layer + 1
    problems = []
    if attention == "gqa" and counts["GroupQueryAttention"] != n_layer:
        problems.append(f"{counts['GroupQueryAttention']} GroupQueryAttention nodes, expected {n_layer}")
    if counts["SkipLayerNormalization"] != want:
        problems.append(f"{counts['SkipLayerNormalization']} SkipLayerNormalization nodes, expected {want}")
    if counts["LayerNormalization"]:
        problems.append(f"{counts['LayerNormalization']} plain LayerNormalization nodes left")
    if problems:
        raise FusionError("; ".join(problems))
    return counts


def consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name -> the nodes that read it, in graph order."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    return readers


def _consumed(model: onnx.ModelProto) -> set[str]:
    used = {i for n in model.graph.node for i in n.input}
    return used | {o.name for o in model.graph.output}


def prune_unused_optional_outputs(model: onnx.ModelProto) -> int:
    """Blank SkipLayerNormalization's optional `mean` / `inv_std_var` outputs (1, 2) when unused.

    They are float32 whatever the input type, so leaving them in would trip the fp16 pass, and
    ONNX Runtime skips computing an output whose name is empty. Returns how many were pruned.
    """
    used = _consumed(model)
    pruned: set[str] = set()
    for node in model.graph.node:
        if node.domain == CONTRIB_DOMAIN and node.op_type == "SkipLayerNormalization":
            for k in (1, 2):
                if k < len(node.output) and node.output[k] and node.output[k] not in used:
                    pruned.add(node.output[k])
                    node.output[k] = ""
    keep = [vi for vi in model.graph.value_info if vi.name not in pruned]
    del model.graph.value_info[:]
    model.graph.value_info.extend(keep)
    return len(pruned)


def strip_initializer_value_info(model: onnx.ModelProto) -> None:
    """Drop value_info entries that shadow initializers (the exporter adds them for metadata);
    onnx's shape inference in the quantizer trips over them once it rewrites a weight."""
    inits = {i.name for i in model.graph.initializer}
    keep = [vi for vi in model.graph.value_info if vi.name not in inits]
    del model.graph.value_info[:]
    model.graph.value_info.extend(keep)


def untie_gemm_weights(model: onnx.ModelProto) -> int:
    """Give each `Gemm(x, W^T)` or `MatMul(x, Transpose(W))` whose W is shared with another node
    (the tied LM head shares `wte` with the embedding Gather) its own pre-transposed copy, as a
    plain MatMul with a constant weight.

    Dynamic quantization rewrites a weight in place; on a shared initializer that would also
    change the embedding; and it only quantizes a MatMul whose weight is a constant. Returns the
    number of nodes rewritten.
    """
    inits = {i.name: i for i in model.graph.initializer}
    uses = Counter(i for n in model.graph.node for i in n.input)
    producer = {o: n for n in model.graph.node for o in n.output}
    rewritten = 0
    for node in list(model.graph.node):
        t = producer.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if t is None or t.op_type != "Transpose" or t.input[0] not in inits or uses[t.input[0]] < 2:
            continue
        perm = next((list(onnx.helper.get_attribute_value(a)) for a in t.attribute if a.name == "perm"), [1, 0])
        if perm != [1, 0]:
            continue
        name = f"{t.input[0]}.matmul_b"
        if name not in inits:
            w = np.ascontiguousarray(numpy_helper.to_array(inits[t.input[0]]).T)  # (K, N)
            inits[name] = numpy_helper.from_array(w, name)
            model.graph.initializer.append(inits[name])
        node.input[1] = name
        if not any(t.output[0] in n.input for n in model.graph.node):
            model.graph.node.remove(t)
        rewritten += 1
    for idx, node in enumerate(list(model.graph.node)):
        if node.op_type != "Gemm" or len(node.input) != 2 or node.input[1] not in inits or uses[node.input[1]] < 2:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0:
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        w = np.ascontiguousarray(w.T) if attrs.get("transB", 0) else w.copy()  # (K, N)
        name = f"{node.input[1]}.matmul_b"
        model.graph.initializer.append(numpy_helper.from_array(w, name))
        matmul = onnx.helper.make_node("MatMul", [node.input[0], name], list(node.output), name=node.name + "_untied")
        model.graph.node.remove(node)
        model.graph.node.insert(idx, matmul)
        rewritten += 1
    return rewritten


def selection_nodes(model: onnx.ModelProto) -> tuple[str | None, list[onnx.NodeProto]]:
    """The LM head's output tensor and the nodes after it: the log-softmax, gather and top-N that
    the generation graph computes from the logits (`model.gpt2.select_tokens`). The head is found
    from the `logits` output back through shape-only ops to the MatMul (or Gemm) that makes the
    logits; the selection is every node that neither the head nor the KV cache outputs need.
    (None, []) for a graph without that head (the classifier)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    readers = consumers(model)
    node = producer.get("logits")
    while node is not None and node.op_type not in ("MatMul", "Gemm", "MatMulNBits", "DynamicQuantizeMatMul",
                                                    "MatMulIntegerToFloat"):
        node = producer.get(node.input[0]) if node.op_type in _PASS_THROUGH else None
    if node is None:
        return None, []
    head = node.output[0]
    after: set[int] = set()  # the head's descendants
    todo = [head]
    while todo:
        for n in readers.get(todo.pop(), []):
            if id(n) not in after:
                after.add(id(n))
                todo.extend(n.output)
    # The body is what the head and the graph outputs not made after it (the KV cache) need; the
    # rest is the selection, with its own branches from the selection inputs (temperature).
    made_after = {o for n in model.graph.node if id(n) in after for o in n.output}
    body: set[int] = set()
    todo = [head] + [o.name for o in model.graph.output if o.name not in made_after]
    while todo:
        n = producer.get(todo.pop())
        if n is not None and id(n) not in body:
            body.add(id(n))
            todo.extend(n.input)
    return head, [n for n in model.graph.node if id(n) not in body]  # in graph (topological) order


_PASS_THROUGH = ("Gather", "Slice", "Squeeze", "Unsqueeze", "Reshape", "Identity", "Cast", "GatherND", "Flatten")


def prune_dangling(model: onnx.ModelProto) -> None:
    """Remove nodes none of whose outputs is read: the float16 tool's casts of inputs only the
    selection reads (it was out of the graph while the tool converted), a Transpose of a weight
    whose MatMul was quantized."""
    g = model.graph
    while True:
        read = {i for n in g.node for i in n.input} | {o.name for o in g.output}
        dead = [n for n in g.node if not any(o in read for o in n.output)]
        if not dead:
            return
        for n in dead:
            g.node.remove(n)
