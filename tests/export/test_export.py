"""ONNX export: fused-op counts, parity with PyTorch and transformers, precisions, manifest, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from export.fusion import FusionError, check_fusion, op_counts, selection_nodes, untie_gemm_weights
from export.kernels import CANDIDATES, KERNELS, cpu_flags, isa_tag
from export.manifest import checkpoint_sha256, read_manifest, verify_files
from export.pipeline import ExportError, export_checkpoint
from export.verify import TOP1_FLOOR, verify
from model import load_pretrained
from tests.conftest import make_hf_checkpoint

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "model" / "demo"

# (name, config overrides): odd head counts, one layer, exact GELU, a non-default MLP width.
CONFIGS = {
    "2L-4H": dict(n_embd=32, n_layer=2, n_head=4),
    "1L-3H": dict(n_embd=48, n_layer=1, n_head=3),
    "3L-5H-gelu-ninner": dict(n_embd=40, n_layer=3, n_head=5, activation_function="gelu", n_inner=72),
}


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module", params=list(CONFIGS))
def exported_lm(request, tmp_path_factory) -> tuple[str, Path, Path, dict]:
    name = request.param
    ckpt = make_hf_checkpoint(tmp_path_factory.mktemp(f"ckpt-{name}"), "generate", seed=3,
                              vocab_size=1000, **CONFIGS[name])
    out = tmp_path_factory.mktemp(f"onnx-{name}")
    manifest = export_checkpoint(ckpt, out, "generate")
    return name, ckpt, out, manifest


def test_every_layernorm_is_one_skip_layer_norm(exported_lm) -> None:
    name, _, out, manifest = exported_lm
    cfg = CONFIGS[name]
    counts = op_counts(onnx.load(str(out / "model.onnx")))
    assert counts["SkipLayerNormalization"] == 2 * cfg["n_layer"] + 1
    assert counts["LayerNormalization"] == 0
    gelu = "BiasGelu" if cfg.get("activation_function") == "gelu" else "FastGelu"
    assert counts[gelu] == cfg["n_layer"]
    # The GELU is fully fused: no decomposed tanh / erf left.
    assert counts["Tanh"] == 0 and counts["Erf"] == 0
    assert manifest["fused_ops"]["SkipLayerNormalization"] == manifest["expected_skip_layer_norm"]


def test_graph_signature_matches_the_contract(exported_lm) -> None:
    name, _, out, manifest = exported_lm
    n_layer = CONFIGS[name]["n_layer"]
    sess = _session(out / "model.onnx")
    kv = [f"{p}.{i}.{k}" for i in range(n_layer) for k in ("key", "value") for p in ("past_key_values",)]
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask", "position_ids", *SELECT_IN, *kv]
    assert [o.name for o in sess.get_outputs()] == SELECT_OUT + [
        f"present.{i}.{k}" for i in range(n_layer) for k in ("key", "value")]
    # logits are for one position per row (the last kept one): (batch, vocab), never (batch, seq, vocab).
    shapes = {o.name: o.shape for o in sess.get_outputs()}
    assert shapes["logits"] == ["batch_size", 1000]
    assert shapes["token_logprobs"] == ["batch_size", "kept_positions"]
    assert shapes["top_ids"] == shapes["top_logprobs"] == ["batch_size", "kept_positions", "top_n"]
    assert sess.get_inputs()[1].shape == ["batch_size", "total_sequence_length"]
    assert {i.name: i.shape for i in sess.get_inputs()}["top_n"] == [1]
    # TopK reads k straight from the input: a node between them lands on the CPU EP under CUDA
    # and stops CUDA graph capture.
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    assert [n.input[1] for n in graph.node if n.op_type == "TopK"] == ["top_n"]
    assert manifest["opset"] >= 17 and manifest["parity"]["passed"]
    assert [i["name"] for i in manifest["inputs"]] == [i.name for i in sess.get_inputs()]


def _hf(ckpt: Path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(ckpt).eval()


SELECT_IN = ["logits_index", "target_ids", "temperature", "top_n"]
SELECT_OUT = ["logits", "token_logprobs", "top_ids", "top_logprobs"]


def _last(n: int, width: int, top_n: int = 1) -> dict[str, np.ndarray]:
    """Selection inputs that keep each row's last position (left-padded rows)."""
    return {"logits_index": (np.arange(n) * width + width - 1)[:, None], "target_ids": np.zeros((n, 1), np.int64),
            "temperature": np.ones(n, np.float32), "top_n": np.array([top_n])}


def _feed(ids, mask, pos, past, n_layer):
    f = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, **_last(*ids.shape, top_n=3)}
    for i in range(n_layer):
        f[f"past_key_values.{i}.key"], f[f"past_key_values.{i}.value"] = past[i]
    return f


@torch.no_grad()
def test_parity_with_transformers_prefill_and_8_decode_steps_left_padded(exported_lm) -> None:
    """The graph, fed its own KV cache, against transformers' full forward at every step."""
    name, ckpt, out, _ = exported_lm
    cfg = CONFIGS[name]
    hf = _hf(ckpt)
    sess = _session(out / "model.onnx")
    rng = np.random.default_rng(0)
    lengths = [7, 3, 5]
    B, T = len(lengths), max(lengths)
    ids = np.zeros((B, T), np.int64)
    mask = np.zeros((B, T), np.int64)
    for b, n in enumerate(lengths):
        ids[b, T - n:] = rng.integers(0, 1000, n)
        mask[b, T - n:] = 1
    hd = cfg["n_embd"] // cfg["n_head"]
    empty = np.zeros((B, cfg["n_head"], 0, hd), np.float32)
    pos = np.clip(mask.cumsum(-1) - 1, 0, None)
    feed = _feed(ids, mask, pos, [(empty, empty)] * cfg["n_layer"], cfg["n_layer"])
    all_ids, all_mask = ids, mask
    for step in range(9):  # prefill + 8 decode steps
        outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed), strict=True))
        full_pos = np.clip(all_mask.cumsum(-1) - 1, 0, None)
        ref = hf(torch.from_numpy(all_ids), attention_mask=torch.from_numpy(all_mask),
                 position_ids=torch.from_numpy(full_pos)).logits[:, -1].numpy()
        assert np.abs(outs["logits"] - ref).max() < 1e-4, f"step {step}"
        logprobs = torch.log_softmax(torch.from_numpy(ref).double(), -1).numpy()
        assert (outs["top_ids"][:, 0, 0] == ref.argmax(-1)).all()
        np.testing.assert_allclose(outs["top_logprobs"][:, 0], -np.sort(-logprobs, -1)[:, :3], atol=1e-4)
        nxt = ref.argmax(-1)[:, None]
        all_ids = np.concatenate([all_ids, nxt], 1)
        all_mask = np.concatenate([all_mask, np.ones((B, 1), np.int64)], 1)
        past = [(outs[f"present.{i}.key"], outs[f"present.{i}.value"]) for i in range(cfg["n_layer"])]
        assert past[0][0].shape == (B, cfg["n_head"], all_ids.shape[1] - 1, hd)
        feed = _feed(nxt, all_mask, full_pos[:, -1:] + 1, past, cfg["n_layer"])


def test_verifier_reports_every_output_within_1e4(exported_lm) -> None:
    name, ckpt, out, manifest = exported_lm
    par = manifest["parity"]
    n_layer = CONFIGS[name]["n_layer"]
    assert set(par["max_abs_diff_by_output"]) == {"logits", "token_logprobs", "top_logprobs"} | {
        f"present.{i}.{k}" for i in range(n_layer) for k in ("key", "value")}
    assert max(par["max_abs_diff_by_output"].values()) < 1e-4
    assert par["top1_agreement"] == 1.0


def test_verifier_catches_a_damaged_graph(tmp_path, tiny_lm_dir) -> None:
    """Perturb one weight in the graph: the verifier must fail and name the outputs."""
    export_checkpoint(tiny_lm_dir, tmp_path, "generate", verify_parity=False)
    proto = onnx.load(str(tmp_path / "model.onnx"))
    init = next(i for i in proto.graph.initializer if i.name.endswith("h.1.ln_2.weight"))
    arr = onnx.numpy_helper.to_array(init).copy()
    arr[:4] += 0.05
    init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
    onnx.save(proto, str(tmp_path / "bad.onnx"))
    report = verify(load_pretrained(tiny_lm_dir), tmp_path / "bad.onnx", "fp32")
    assert not report.passed
    failures = report.failures()
    assert any("logits" in f for f in failures)
    # ln_2 of layer 1 acts after layer 1's attention: no KV cache is touched.
    assert not any("present." in f for f in failures)


@pytest.mark.parametrize("task", ["classify"])
def test_classifier_graph_parity(tmp_path, tiny_classifier_dir, task) -> None:
    import transformers

    manifest = export_checkpoint(tiny_classifier_dir, tmp_path, task)
    assert manifest["fused_ops"]["SkipLayerNormalization"] == 5 and manifest["fused_ops"]["LayerNormalization"] == 0
    assert manifest["parity"]["passed"] and manifest["parity"]["max_logit_error"] < 1e-4
    sess = _session(tmp_path / "model.onnx")
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask"]
    hf = transformers.GPT2ForSequenceClassification.from_pretrained(tiny_classifier_dir).eval()
    pad = hf.config.pad_token_id
    ids = np.array([[pad, pad, 464, 2068, 7586], [464, 2068, 7586, 21831, 18045], [318, 257, 1332, pad, pad]])
    mask = (ids != pad).astype(np.int64)
    pos = np.clip(mask.cumsum(-1) - 1, 0, None)
    (logits,) = sess.run(None, {"input_ids": ids, "attention_mask": mask})
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), position_ids=torch.from_numpy(pos))
    assert logits.shape == (3, 3)
    np.testing.assert_allclose(logits, ref.logits.numpy(), atol=1e-4)


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_gqa_graph_has_one_group_query_attention_per_layer_and_parity(tmp_path, precision) -> None:
    ckpt = make_hf_checkpoint(tmp_path / "ckpt", "generate", seed=3, vocab_size=1000, **CONFIGS["1L-3H"] | {
        "n_layer": 2})
    manifest = export_checkpoint(ckpt, tmp_path / "out", "generate", precision=precision, attention="gqa")
    proto = onnx.load(str(tmp_path / "out" / "model.onnx"))
    counts = op_counts(proto)
    assert counts["GroupQueryAttention"] == 2 and manifest["fused_ops"]["GroupQueryAttention"] == 2
    # The attention is the contrib node: no Softmax, and no Concat growing the cache.
    assert counts["Softmax"] == 0 and counts["SkipLayerNormalization"] == 5
    assert manifest["attention"] == "gqa"
    names = [i.name for i in proto.graph.input]
    assert names[:8] == ["input_ids", "position_ids", "seqlens_k", "total_sequence_length", *SELECT_IN]
    assert "attention_mask" not in names
    # Nothing derives from a tensor's shape (every index comes from an input), so no node has to
    # run on the host: what CUDA graph capture needs (DESIGN §9).
    assert not {"Shape", "Size", "Range", "ConstantOfShape"} & set(counts)
    par = manifest["parity"]
    assert par["passed"] and par["top1_agreement"] >= TOP1_FLOOR[precision]
    # right-padded batch (8 decode steps), batch 1 (2), chunked prompt (1): 8*9 + 3 + 2 positions
    assert par["top1_positions"] == 8 * 9 + 3 + 2
    if precision == "fp32":
        assert par["max_logit_error"] < 1e-4
        assert par["max_abs_diff_by_output"]["token_logprobs"] < 1e-4  # the scored prompt, too


def test_check_fusion_wants_one_gqa_node_per_layer(tmp_path, tiny_lm_dir) -> None:
    export_checkpoint(tiny_lm_dir, tmp_path, "generate", verify_parity=False, attention="gqa")
    proto = onnx.load(str(tmp_path / "model.onnx"))
    assert check_fusion(proto, 2, "gqa")["GroupQueryAttention"] == 2
    with pytest.raises(FusionError, match="2 GroupQueryAttention nodes, expected 3"):
        check_fusion(proto, 3, "gqa")
    with pytest.raises(ExportError, match="unknown attention 'flash'"):
        export_checkpoint(tiny_lm_dir, tmp_path / "x", "generate", attention="flash")


def test_fp16_runs_on_cpu_and_agrees(tmp_path, tiny_lm_dir) -> None:
    manifest = export_checkpoint(tiny_lm_dir, tmp_path, "generate", precision="fp16")
    sess = _session(tmp_path / "model.onnx")
    types = {i.name: i.type for i in sess.get_inputs()} | {o.name: o.type for o in sess.get_outputs()}
    assert types["past_key_values.0.key"] == "tensor(float16)" and types["present.1.value"] == "tensor(float16)"
    assert types["logits"] == "tensor(float)"  # sampling sees fp32
    # The selection after the LM head runs in fp32: one Cast up after the head, none inside.
    assert types["token_logprobs"] == types["top_logprobs"] == types["temperature"] == "tensor(float)"
    proto = onnx.load(str(tmp_path / "model.onnx"))
    head, tail = selection_nodes(proto)
    casts = [n for n in proto.graph.node if n.op_type == "Cast" and n.input[0] == head]
    assert len(casts) == 1 and casts[0].attribute[0].i == onnx.TensorProto.FLOAT
    assert {"Exp", "TopK", "ReduceMax"} <= {n.op_type for n in tail}
    assert not any(n.op_type == "Cast" and n.attribute[0].i == onnx.TensorProto.FLOAT16 for n in tail)
    par = manifest["parity"]
    assert par["passed"] and par["top1_agreement"] >= TOP1_FLOOR["fp16"]
    assert 0 < par["max_logit_error"] < 1e-2  # really half precision, and close


def test_fp16_classifier_is_a_valid_graph_and_agrees(tmp_path, tiny_classifier_dir) -> None:
    """The classifier has no selection after its head: its fp16 export once listed `logits` twice
    (two Casts of one name, a model ONNX Runtime refuses), so a default start on CUDA served the
    classifier on PyTorch (seen on an H200, 2026-12-04)."""
    manifest = export_checkpoint(tiny_classifier_dir, tmp_path, "classify", precision="fp16")
    proto = onnx.load(str(tmp_path / "model.onnx"))
    assert [o.name for o in proto.graph.output] == ["logits"]
    assert {i.name: i.type for i in _session(tmp_path / "model.onnx").get_outputs()} == {"logits": "tensor(float)"}
    assert manifest["parity"]["passed"] and 0 < manifest["parity"]["max_logit_error"] < 1e-2


@pytest.mark.parametrize(("precision", "kernel"), [("int8", "nbits8-b32"), ("int8", "dynamic8"),
                                                   ("int4", "nbits4-b32-zp")])
def test_quantized_export_covers_head_and_embedding(tmp_path, tiny_lm_dir, precision, kernel) -> None:
    manifest = export_checkpoint(tiny_lm_dir, tmp_path, "generate", precision=precision, kernel=kernel)
    proto = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False)
    counts = op_counts(proto)
    # 4 weight MatMuls per layer + the tied LM head, all quantized; attention's two stay fp32;
    # the token embedding is a GatherBlockQuantized (the position table stays a Gather).
    op = "DynamicQuantizeMatMul" if kernel == "dynamic8" else "MatMulNBits"
    assert counts[op] == 4 * 2 + 1 and counts["Gemm"] == 0 and manifest["quantization"][op] == 9
    assert counts["GatherBlockQuantized"] == 1 and counts["Gather"] >= 1
    bits = {8: 0, 4: 0}
    for n in proto.graph.node:
        if n.op_type == "MatMulNBits":
            a = {x.name: onnx.helper.get_attribute_value(x) for x in n.attribute}
            bits[a["bits"]] += 1
            assert a["block_size"] == 32 and a["accuracy_level"] == 4
    assert bits[int(precision[3:])] == (0 if kernel == "dynamic8" else 9)
    if kernel == "dynamic8":  # int8 weights, one scale per output column
        inits = {i.name: i for i in proto.graph.initializer}
        for n in (n for n in proto.graph.node if n.op_type == "DynamicQuantizeMatMul"):
            q, scale = inits[n.input[1]], inits[n.input[2]]
            assert q.data_type == onnx.TensorProto.INT8 and list(scale.dims) == [q.dims[1]]
        # the biases after c_attn and both c_proj are the op's own input (no Add left after it); c_fc's
        # is FastGelu's and the head has none: 3 per layer
        biased = [n for n in proto.graph.node if n.op_type == "DynamicQuantizeMatMul" and len(n.input) == 5]
        assert len(biased) == manifest["quantization"]["bias_folded"] == 3 * 2 and all(n.input[3] == "" for n in biased)
        made = {n.output[0]: n.op_type for n in proto.graph.node}
        assert not [n for n in proto.graph.node if n.op_type == "Add"
                    and any(made.get(i) == "DynamicQuantizeMatMul" for i in n.input)]
    # The selection's sum over the vocabulary (a MatMul with a ones vector) stays fp32.
    assert [n.op_type for n in selection_nodes(proto)[1]].count("MatMul") == 1
    assert counts["SkipLayerNormalization"] == 5
    assert {i.name for i in proto.graph.initializer}.isdisjoint({"model.lm_head.weight"})  # no fp32 wte left
    par = manifest["parity"]
    assert par["passed"] and par["top1_agreement"] >= TOP1_FLOOR[precision]
    assert par["max_logit_error"] > 0
    ppl = par["perplexity"]
    assert ppl["passed"] and ppl["tokens"] > 0 and abs(ppl["ratio"] - 1) <= ppl["margin"]
    assert manifest["quantization"]["bits"] == int(precision[3:]) and manifest["quantization"]["kernel"] == kernel
    assert manifest["kernel"]["name"] == kernel and manifest["kernel"]["chosen_by"] == "setting"
    assert manifest["files"].keys() == {"model.onnx", "model.onnx.data"}


def test_auto_kernel_is_measured_on_this_cpu_and_recorded(tmp_path, tiny_lm_dir) -> None:
    """PRECISION=int8 with the kernel measured: every candidate timed, the fastest that passes
    served, the CPU it was measured on in the manifest."""
    manifest = export_checkpoint(tiny_lm_dir, tmp_path, "generate", precision="int8")
    k = manifest["kernel"]
    assert k["chosen_by"] == "measured" and k["isa"] == isa_tag() and k["cpu_flags"] == cpu_flags()
    assert k["timings_ms"].keys() == {c.name for c in CANDIDATES["int8"]}
    passed_over = [r["name"] for r in k["rejected"]]
    ranked = sorted(k["score"], key=k["score"].get)
    assert k["name"] == ranked[len(passed_over)] and passed_over == ranked[:len(passed_over)]
    assert manifest["quantization"]["kernel"] == k["name"] and manifest["parity"]["passed"]


def test_a_kernel_that_fails_the_gates_is_passed_over(tmp_path, monkeypatch) -> None:
    """The next candidate is tried when one fails the accuracy gates. Here every weight's first
    input row is an outlier (30 standard deviations): a 4-bit block of 128 spans a whole column
    of this 128-wide model, so its other weights round to a level or two (top-1 0.0 under int8's
    floor); 8-bit blocks of 32 confine the outlier to one block (top-1 1.0). The order is forced,
    the quantization and the gates are real."""
    from safetensors.torch import load_file, save_file

    import export.pipeline as pipeline

    ckpt = make_hf_checkpoint(tmp_path / "ckpt", "generate", seed=5, n_embd=128, n_head=4, n_layer=1)
    weights = load_file(str(ckpt / "model.safetensors"))
    for name, w in weights.items():
        if w.ndim == 2 and ("attn" in name or "mlp" in name):
            w[0, :] = 30 * w.std()  # Conv1D weights are (in, out): row 0 is input 0 of every column
        elif name.endswith("wte.weight"):
            w[:, 0] = 30 * w.std()  # the tied head's B is wte^T: its row 0
    save_file(weights, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    order = [KERNELS["nbits4-b128-zp"], KERNELS["nbits8-b32"]]
    monkeypatch.setattr(pipeline, "rank", lambda precision, n_embd, kernel: (order, {"chosen_by": "measured",
                                                                                       "isa": isa_tag()}))
    manifest = export_checkpoint(ckpt, tmp_path / "out", "generate", precision="int8")
    rejected = manifest["kernel"]["rejected"]
    assert [r["name"] for r in rejected] == ["nbits4-b128-zp"] and "top-1 agreement" in rejected[0]["failures"][0]
    assert manifest["kernel"]["name"] == manifest["quantization"]["kernel"] == "nbits8-b32"
    assert manifest["parity"]["passed"] and manifest["quantization"]["bits"] == 8


def test_untie_gemm_leaves_the_embedding_alone(tmp_path, tiny_lm_dir) -> None:
    export_checkpoint(tiny_lm_dir, tmp_path, "generate", verify_parity=False)
    proto = onnx.load(str(tmp_path / "model.onnx"))
    before = _session(tmp_path / "model.onnx")
    assert untie_gemm_weights(proto) == 1
    inits = {i.name for i in proto.graph.initializer}
    assert op_counts(proto)["Gemm"] == 0 and not any(n.op_type == "Transpose" and n.input[0] in inits
                                                     for n in proto.graph.node)
    onnx.save(proto, str(tmp_path / "untied.onnx"))
    after = _session(tmp_path / "untied.onnx")
    feed = {"input_ids": np.array([[464, 2068]]), "attention_mask": np.ones((1, 2), np.int64),
            "position_ids": np.array([[0, 1]]), **_last(1, 2)}
    feed |= {i.name: np.zeros((1, 4, 0, 8), np.float32) for i in before.get_inputs() if i.name.startswith("past")}
    np.testing.assert_allclose(after.run(None, feed)[0], before.run(None, feed)[0], atol=1e-5)


def test_check_fusion_rejects_a_plain_layernorm() -> None:
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])
    node = onnx.helper.make_node("LayerNormalization", ["x", "s", "b"], ["y"])
    g = onnx.helper.make_graph([node], "g", [x], [y])
    with pytest.raises(FusionError, match="0 SkipLayerNormalization nodes, expected 3; 1 plain LayerNormalization"):
        check_fusion(onnx.helper.make_model(g), n_layer=1)


def test_weights_are_external_data_and_no_proto_is_serialized_whole(tmp_path, tiny_lm_dir, monkeypatch) -> None:
    # Protobuf cannot serialize (or even size) a message past 2 GB: the export must never ask.
    def refuse(self):  # noqa: ANN001
        raise AssertionError("ModelProto.ByteSize() called on the export path")

    monkeypatch.setattr(onnx.ModelProto, "ByteSize", refuse)
    manifest = export_checkpoint(tiny_lm_dir, tmp_path, "generate")
    assert sorted(manifest["files"]) == ["model.onnx", "model.onnx.data"]
    assert (tmp_path / "model.onnx").stat().st_size < (tmp_path / "model.onnx.data").stat().st_size
    assert manifest["parity"]["passed"]


def test_manifest_records_hashes_versions_and_detects_damage(tmp_path, tiny_lm_dir) -> None:
    manifest = export_checkpoint(tiny_lm_dir, tmp_path, "generate", verify_parity=False)
    on_disk = read_manifest(tmp_path)
    assert on_disk == json.loads(json.dumps(manifest))
    assert on_disk["checkpoint"]["sha256"] == checkpoint_sha256(tiny_lm_dir)
    assert {"torch", "onnx", "onnxruntime", "python"} <= set(on_disk["versions"])
    assert on_disk["parity"] is None
    assert verify_files(tmp_path, on_disk) == []
    with open(tmp_path / "model.onnx", "r+b") as f:
        f.seek(100)
        f.write(b"\x00garbage")
    assert verify_files(tmp_path, on_disk) == ["model.onnx"]


def test_export_rejects_bad_arguments(tmp_path, tiny_lm_dir, tiny_classifier_dir) -> None:
    with pytest.raises(ExportError, match="unknown task 'summarise'"):
        export_checkpoint(tiny_lm_dir, tmp_path, "summarise")
    with pytest.raises(ExportError, match="unknown precision 'int3'"):
        export_checkpoint(tiny_lm_dir, tmp_path, "generate", precision="int3")
    with pytest.raises(ExportError, match="holds a sequence classifier"):
        export_checkpoint(tiny_classifier_dir, tmp_path, "generate", verify_parity=False)
    with pytest.raises(ExportError, match="holds a language model"):
        export_checkpoint(tiny_lm_dir, tmp_path, "classify", verify_parity=False)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ExportError, match="not writable"):
        export_checkpoint(tiny_lm_dir, blocker / "sub", "generate")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "export", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def test_cli_success_prints_summary_and_exit_0(tmp_path, tiny_lm_dir) -> None:
    r = _cli("--checkpoint", str(tiny_lm_dir), "--task", "generate", "--out", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr
    assert "SkipLayerNormalization  5 (expected 5)" in r.stdout
    assert "parity                  PASSED" in r.stdout
    assert "verifying parity" in r.stderr  # progress goes to stderr
    assert read_manifest(tmp_path / "o")["parity"]["passed"]


def test_cli_errors_are_clear_and_nonzero(tmp_path, tiny_lm_dir) -> None:
    r = _cli("--checkpoint", str(tmp_path / "nope"), "--task", "generate", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    r = _cli("--checkpoint", str(tiny_lm_dir), "--task", "translate", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "invalid choice: 'translate'" in r.stderr
    blocker = tmp_path / "f"
    blocker.write_text("")
    r = _cli("--checkpoint", str(tiny_lm_dir), "--task", "generate", "--out", str(blocker / "o"))
    assert r.returncode == 2 and "not writable" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize(("sub", "task"), [("lm", "generate"), ("classifier", "classify")])
def test_demo_checkpoints_round_trip(tmp_path, sub, task) -> None:
    if not (DEMO / sub / "config.json").is_file():
        pytest.fail(f"demo checkpoint {DEMO / sub} is missing")
    manifest = export_checkpoint(DEMO / sub, tmp_path, task)
    model = load_pretrained(DEMO / sub)
    assert manifest["fused_ops"]["SkipLayerNormalization"] == 2 * model.config.n_layer + 1
    assert manifest["parity"]["passed"], manifest["parity"]["failures"]
    assert manifest["parity"]["top1_agreement"] == 1.0


@pytest.mark.slow
def test_demo_lm_int8_keeps_the_agreement_floor(tmp_path) -> None:
    """On a trained model (the demo LM), int8 must agree with fp32 on the next token at the floor."""
    manifest = export_checkpoint(DEMO / "lm", tmp_path, "generate", precision="int8")
    assert manifest["parity"]["top1_agreement"] >= TOP1_FLOOR["int8"], manifest["parity"]
