"""Checks kiln artifacts with the ONNX project's own tools.

For each artifact directory given: `onnx.checker.check_model(path, full_check=True)` (which
also runs strict shape inference), then a session in ONNX Runtime's Python package that runs
a prefill of the given ids and one decode step, printing one JSON line per artifact with the
argmax of the last position of each step and the logits of the prefill's last position.

Usage: check_artifact.py IDS_JSON DIR [DIR ...]
"""

import json
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort


def run(dir_, ids):
    path = os.path.join(dir_, "model.onnx")
    onnx.checker.check_model(path, full_check=True)
    with open(os.path.join(dir_, "kiln.json")) as f:
        manifest = json.load(f)
    cfg = manifest["config"]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    layers, kvh, hd = cfg["num_layers"], cfg["num_kv_heads"], cfg["head_dim"]
    past = {}
    for i in range(layers):
        for kind in ("key", "value"):
            past[f"past_key_values.{i}.{kind}"] = np.zeros((1, kvh, 0, hd), np.float32)
    steps = []
    seq = np.array([ids], np.int64)
    total = 0
    last_logits = None
    for _ in range(2):
        n = seq.shape[1]
        feeds = {
            "input_ids": seq,
            "attention_mask": np.ones((1, total + n), np.int64),
            "position_ids": np.arange(total, total + n, dtype=np.int64)[None, :],
            **past,
        }
        outs = sess.run(None, feeds)
        names = [o.name for o in sess.get_outputs()]
        res = dict(zip(names, outs))
        logits = res["logits"][0, -1]
        if last_logits is None:
            last_logits = logits
        nxt = int(np.argmax(logits))
        steps.append(nxt)
        for i in range(layers):
            for kind in ("key", "value"):
                past[f"past_key_values.{i}.{kind}"] = res[f"present.{i}.{kind}"]
        total += n
        seq = np.array([[nxt]], np.int64)
    return {"dir": dir_, "argmax": steps, "last_logits": last_logits.tolist()}


def main():
    ids = json.loads(sys.argv[1])
    for d in sys.argv[2:]:
        print(json.dumps(run(d, ids)))


if __name__ == "__main__":
    main()
