#!/usr/bin/env python3
"""Top-1 agreement and perplexity of artifacts against the FP32 artifact on a held-out text.

Runs each artifact with ONNX Runtime's Python API (CPU, default session settings, so fused
INT4/INT8 MatMulNBits use ONNX Runtime's default accuracy level) over the first N tokens of the
text in windows, and prints, per artifact: the share of positions whose argmax equals the FP32
artifact's, and the perplexity.

Usage: .venv/bin/python scripts/top1_agreement.py TEXT FP32_DIR DIR [DIR ...] [--tokens N] [--window W]
"""

import argparse
import json
import math
import os

import numpy as np
import onnxruntime as ort
import tokenizers


def logits_over(dir_, ids, window):
    with open(os.path.join(dir_, "kiln.json")) as f:
        cfg = json.load(f)["config"]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(os.path.join(dir_, "model.onnx"), opts, providers=["CPUExecutionProvider"])
    out = []
    for start in range(0, len(ids), window):
        chunk = ids[start:start + window]
        n = len(chunk)
        feeds = {
            "input_ids": np.array([chunk], np.int64),
            "attention_mask": np.ones((1, n), np.int64),
            "position_ids": np.arange(n, dtype=np.int64)[None, :],
        }
        for i in range(cfg["num_layers"]):
            for kind in ("key", "value"):
                feeds[f"past_key_values.{i}.{kind}"] = np.zeros((1, cfg["num_kv_heads"], 0, cfg["head_dim"]), np.float32)
        out.append(sess.run(["logits"], feeds)[0][0])
    return out


def nll(windows, ids, window):
    total, count = 0.0, 0
    for w, logits in enumerate(windows):
        chunk = ids[w * window:(w + 1) * window]
        for t in range(len(chunk) - 1):
            row = logits[t].astype(np.float64)
            m = row.max()
            lse = m + math.log(np.exp(row - m).sum())
            total += lse - row[chunk[t + 1]]
            count += 1
    return math.exp(total / count)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("text")
    p.add_argument("dirs", nargs="+")
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--window", type=int, default=512)
    a = p.parse_args()
    tok = tokenizers.Tokenizer.from_file(os.path.join(a.dirs[0], "tokenizer.json"))
    with open(a.text, encoding="utf-8", errors="strict") as f:
        ids = tok.encode(f.read(), add_special_tokens=False).ids[: a.tokens]
    base = logits_over(a.dirs[0], ids, a.window)
    base_arg = np.concatenate([w.argmax(-1) for w in base])
    print(f"{'artifact':<28} {'top-1 vs fp32':>14} {'perplexity':>11}   ({len(ids)} tokens of {os.path.basename(a.text)})")
    for d in a.dirs:
        wins = base if d == a.dirs[0] else logits_over(d, ids, a.window)
        arg = np.concatenate([w.argmax(-1) for w in wins])
        print(f"{d:<28} {np.mean(arg == base_arg):>14.4f} {nll(wins, ids, a.window):>11.3f}")


if __name__ == "__main__":
    main()
