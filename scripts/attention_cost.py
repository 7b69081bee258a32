#!/usr/bin/env python3
"""What one decode step's attention costs in ONNX Runtime's CPU kernels, by context length.

Builds graphs of 30 attention nodes shaped like SmolLM2-135M's layers (9 query heads, 3 KV
heads, head_dim 64; one new token, batch 1) and times them with ONNX Runtime, 2 threads, no
spinning (kiln's serving settings):

- `gqa`: com.microsoft GroupQueryAttention over KV buffers bound as both past and present,
  as in kiln's serving graph;
- `gqa-scale1`: the same with `scale = 1` (MLAS takes its unpacked one-row GEMM path only
  with alpha = 1; the query would carry 1/sqrt(head_dim));
- `gqa-fp16`: the same with float16 inputs and KV buffers;
- `matmul`: MatMul -> Softmax -> MatMul with the 3 query heads of a group as the rows of one
  product, over keys and values of exactly the context length (this form cannot update a
  cache in place: it shows what the arithmetic costs without GroupQueryAttention's kernel).

Prints milliseconds per step (all 30 nodes), the median of --repeat rounds.

Usage: .venv/bin/python scripts/attention_cost.py [--contexts 16,256,1024] [--repeat 5]
"""

import argparse
import statistics
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

LAYERS, HEADS, KV_HEADS, HEAD_DIM = 30, 9, 3, 64
GROUP = HEADS // KV_HEADS


def session(graph):
    model = helper.make_model(
        graph,
        ir_version=10,
        opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)],
    )
    onnx.checker.check_model(model)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def gqa(context, dtype, scale, buffer):
    """GroupQueryAttention nodes chained through their outputs; KV buffers of `buffer` positions."""
    elem = TensorProto.FLOAT if dtype == np.float32 else TensorProto.FLOAT16
    io = helper.make_tensor_value_info
    inputs = [
        io("q", elem, [1, 1, HEADS * HEAD_DIM]),
        io("k", elem, [1, 1, KV_HEADS * HEAD_DIM]),
        io("v", elem, [1, 1, KV_HEADS * HEAD_DIM]),
        io("seqlens_k", TensorProto.INT32, [1]),
        io("total_sequence_length", TensorProto.INT32, []),
    ]
    nodes, outputs, x = [], [], "q"
    kv_shape = [1, KV_HEADS, buffer, HEAD_DIM]
    for i in range(LAYERS):
        inputs += [io(f"past_key.{i}", elem, kv_shape), io(f"past_value.{i}", elem, kv_shape)]
        outputs += [io(f"present_key.{i}", elem, kv_shape), io(f"present_value.{i}", elem, kv_shape)]
        attrs = {"num_heads": HEADS, "kv_num_heads": KV_HEADS}
        if scale is not None:
            attrs["scale"] = scale
        nodes.append(
            helper.make_node(
                "GroupQueryAttention",
                [x, "k", "v", f"past_key.{i}", f"past_value.{i}", "seqlens_k", "total_sequence_length"],
                [f"out.{i}", f"present_key.{i}", f"present_value.{i}"],
                domain="com.microsoft",
                **attrs,
            )
        )
        x = f"out.{i}"
    outputs.insert(0, io(x, elem, [1, 1, HEADS * HEAD_DIM]))
    sess = session(helper.make_graph(nodes, "gqa", inputs, outputs))
    rng = np.random.default_rng(0)
    binding = sess.io_binding()
    values = []

    def bind(name, array, output=None):
        value = ort.OrtValue.ortvalue_from_numpy(array)
        values.append(value)
        binding.bind_ortvalue_input(name, value)
        if output:
            binding.bind_ortvalue_output(output, value)

    bind("q", (rng.standard_normal((1, 1, HEADS * HEAD_DIM)) * 0.1).astype(dtype))
    bind("k", rng.standard_normal((1, 1, KV_HEADS * HEAD_DIM)).astype(dtype))
    bind("v", rng.standard_normal((1, 1, KV_HEADS * HEAD_DIM)).astype(dtype))
    bind("seqlens_k", np.array([context - 1], np.int32))
    bind("total_sequence_length", np.array(context, np.int32))
    for i in range(LAYERS):
        for kind in ("key", "value"):
            bind(f"past_{kind}.{i}", rng.standard_normal(kv_shape).astype(dtype), f"present_{kind}.{i}")
    binding.bind_output(x)
    return lambda: sess.run_with_iobinding(binding)


def matmul(context):
    """MatMul -> Softmax -> MatMul per layer, keys stored transposed ([kv, dim, context])."""
    io = helper.make_tensor_value_info
    q_shape = [1, KV_HEADS, GROUP, HEAD_DIM]
    inputs, nodes, x = [io("q", TensorProto.FLOAT, q_shape)], [], "q"
    for i in range(LAYERS):
        inputs += [
            io(f"key_t.{i}", TensorProto.FLOAT, [1, KV_HEADS, HEAD_DIM, context]),
            io(f"value.{i}", TensorProto.FLOAT, [1, KV_HEADS, context, HEAD_DIM]),
        ]
        nodes += [
            helper.make_node("MatMul", [x, f"key_t.{i}"], [f"scores.{i}"]),
            helper.make_node("Softmax", [f"scores.{i}"], [f"probs.{i}"], axis=-1),
            helper.make_node("MatMul", [f"probs.{i}", f"value.{i}"], [f"out.{i}"]),
        ]
        x = f"out.{i}"
    sess = session(helper.make_graph(nodes, "matmul", inputs, [io(x, TensorProto.FLOAT, q_shape)]))
    rng = np.random.default_rng(0)
    binding = sess.io_binding()
    values = []
    feeds = {"q": (rng.standard_normal(q_shape) * 0.1).astype(np.float32)}
    for i in range(LAYERS):
        feeds[f"key_t.{i}"] = rng.standard_normal((1, KV_HEADS, HEAD_DIM, context)).astype(np.float32)
        feeds[f"value.{i}"] = rng.standard_normal((1, KV_HEADS, context, HEAD_DIM)).astype(np.float32)
    for name, array in feeds.items():
        values.append(ort.OrtValue.ortvalue_from_numpy(array))
        binding.bind_ortvalue_input(name, values[-1])
    binding.bind_output(x)
    return lambda: sess.run_with_iobinding(binding)


def milliseconds(run, steps=20):
    for _ in range(3):
        run()
    start = time.perf_counter()
    for _ in range(steps):
        run()
    return (time.perf_counter() - start) / steps * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", default="16,256,1024")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    for context in [int(c) for c in args.contexts.split(",")]:
        buffer = max(context, 2048)
        forms = {
            "gqa": gqa(context, np.float32, None, buffer),
            "gqa-scale1": gqa(context, np.float32, 1.0, buffer),
            "gqa-fp16": gqa(context, np.float16, None, buffer),
            "matmul": matmul(context),
        }
        rounds = {name: [] for name in forms}
        for _ in range(args.repeat):
            for name, run in forms.items():
                rounds[name].append(milliseconds(run))
        cells = "  ".join(f"{name} {statistics.median(ms):6.2f}" for name, ms in rounds.items())
        print(f"context {context:5}: ms per step  {cells}")


if __name__ == "__main__":
    main()
