//! `kiln check` on the default artifacts: it passes, it can fail (corrupted scale, swapped
//! rows), tract's lowering is exact, GPU providers are refused or skipped with a reason, and
//! bad input is named.

mod common;

use std::path::{Path, PathBuf};

use kiln::check::lowering::Lowering;
use kiln::check::tract::TractDecoder;
use kiln::onnx::manifest::Manifest;
use kiln::runtime::{OrtDecoder, ProfileShapes, Provider, SessionOptions, ShapeRange, StepInput, TensorRtOptions};
use ndarray::Array2;

/// `kiln check --json` with `args`; returns (exit success, reports, stderr).
fn check(args: &[&str]) -> (bool, Vec<serde_json::Value>, String) {
    let mut all = vec!["check", "--json"];
    all.extend_from_slice(args);
    let out = common::kiln(&all);
    let reports = String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    (out.status.success(), reports, String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn every_default_artifact_passes() {
    let dirs: Vec<String> =
        ["fp32", "int8", "int4", "int4-g64-sym"].iter().map(|n| common::artifact(n).display().to_string()).collect();
    let mut args: Vec<&str> = vec!["--tokens", "1024"];
    args.extend(dirs.iter().map(String::as_str));
    let (ok, reports, stderr) = check(&args);
    assert!(ok, "kiln check failed: {stderr}");
    assert_eq!(reports.len(), 4);
    for r in &reports {
        let parity = r["parity"].as_array().expect("parity rows");
        // Batch 1 and batch 3 (padded), prefill + 32 decode steps, at exact math.
        assert!(parity.len() >= 2, "{r}");
        for p in parity {
            assert_eq!(p["decode_steps"], 32);
            assert_eq!(p["pass"], true, "{p}");
        }
        assert_eq!(r["failures"].as_array().map(Vec::len), Some(0));
    }
    // The baseline scores itself on both texts: its perplexity, nothing lost.
    for q in reports[0]["quality"].as_array().expect("rows") {
        assert!(q["quality"]["ppl_increase"].as_f64().expect("increase").abs() < 1e-6, "{q}");
    }
    // Quality is measured for every quantized artifact;
    // what `kiln serve` runs by default (f16 KV cache) is held against tract too.
    for r in &reports[1..] {
        let names: Vec<&str> =
            r["parity"].as_array().expect("rows").iter().filter_map(|p| p["name"].as_str()).collect();
        assert!(names.iter().any(|n| n.starts_with("serving defaults (f16 KV cache) vs tract")), "{names:?}");
        // Scored in the calibration text's domain and out of it.
        let texts: Vec<&str> =
            r["quality"].as_array().expect("rows").iter().filter_map(|q| q["text"].as_str()).collect();
        assert!(
            texts.len() == 2 && texts[0].ends_with("hamlet_gut.txt") && texts[1].ends_with("alice29.txt"),
            "{texts:?}"
        );
        for q in r["quality"].as_array().expect("rows") {
            let (ppl, base) =
                (q["quality"]["ppl"].as_f64().expect("ppl"), q["quality"]["baseline_ppl"].as_f64().expect("ppl"));
            assert!(ppl > base && ppl < 2.5 * base, "{q}");
        }
    }
    // Integrity where the stored weights are the FP32 ones quantized; int8's AWQ rescales them.
    assert!(reports[1]["integrity"].is_null(), "{}", reports[1]["integrity"]);
    for r in &reports[2..] {
        assert!(r["integrity"]["tensors"].as_u64().expect("integrity") > 200);
    }
}

/// A copy of the INT4 artifact that tests may damage.
fn int4_copy(tmp: &Path) -> PathBuf {
    let src = common::artifact("int4");
    let dst = tmp.join("int4");
    std::fs::create_dir_all(&dst).expect("mkdir");
    for f in ["model.onnx", "serving.onnx", "model.onnx.data", "tokenizer.json", "kiln.json"] {
        std::fs::copy(src.join(f), dst.join(f)).expect("copy");
    }
    dst
}

/// Offset of an external initializer in model.onnx.data.
/// Where initializer `name` starts in the data file, and its dims.
fn data_offset(dir: &Path, name: &str) -> (usize, Vec<i64>) {
    let g = kiln::onnx::manifest::read_graph(dir).expect("graph");
    let t = g.initializer.iter().find(|t| t.name == name).expect("initializer");
    let offset = t.external_data.iter().find(|e| e.key == "offset").expect("offset").value.parse().expect("number");
    (offset, t.dims.clone())
}

/// The initializer holding matrix `name` and the matrix's first column in it.
fn stored_at(dir: &Path, name: &str) -> (String, usize) {
    let m = Manifest::read(dir).expect("manifest");
    let t = m.tensors.iter().find(|t| t.name == name).expect("tensor report");
    let packed = t.packed.as_ref().expect("q/k/v and gate/up are packed");
    (packed.tensor.clone(), packed.columns[0])
}

fn damage(dir: &Path, f: impl FnOnce(&mut Vec<u8>)) {
    let path = dir.join("model.onnx.data");
    let mut data = std::fs::read(&path).expect("read");
    f(&mut data);
    std::fs::write(&path, data).expect("write");
}

fn quick_check(dir: &Path) -> (bool, Vec<serde_json::Value>, String) {
    let baseline = common::artifact("fp32");
    check(&[
        "--tokens",
        "256",
        "--decode-steps",
        "2",
        "--baseline",
        baseline.to_str().expect("utf-8"),
        dir.to_str().expect("utf-8"),
    ])
}

#[test]
fn a_corrupted_scale_fails_the_check() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = int4_copy(tmp.path());
    let name = "model.layers.3.mlp.up_proj.weight";
    // up_proj is packed after gate_proj: its first scale is `column` f32s into the scales.
    let (stored, column) = stored_at(&dir, name);
    assert_eq!(stored, "model.layers.3.mlp.gate_up_proj.weight");
    let at = data_offset(&dir, &format!("{stored}.scale")).0 + 4 * column;
    damage(&dir, |d| {
        let v = f32::from_le_bytes([d[at], d[at + 1], d[at + 2], d[at + 3]]) * 50.0;
        d[at..at + 4].copy_from_slice(&v.to_le_bytes());
    });
    let (ok, reports, stderr) = quick_check(&dir);
    assert!(!ok, "a corrupted scale must fail");
    let failures = reports[0]["failures"].to_string();
    assert!(failures.contains("weight integrity") && failures.contains(name), "{failures}");
    assert!(stderr.contains("check failed"), "{stderr}");
}

#[test]
fn swapped_rows_fail_the_check() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = int4_copy(tmp.path());
    // q_proj is packed first in qkv_proj [in = 576, out = 576 + 192 + 192] as UINT4: a row
    // is 480 bytes, of which q_proj's 576 codes are the first 288. Rows 0 and 1 share their
    // block's scales, so swapping q_proj's parts of them moves values, not scales.
    let name = "model.layers.0.self_attn.q_proj.weight";
    let (stored, column) = stored_at(&dir, name);
    let (at, dims) = data_offset(&dir, &stored);
    assert_eq!((column, dims), (0, vec![576, 960]));
    damage(&dir, |d| {
        let (a, b) = d[at..at + 768].split_at_mut(480);
        a[..288].swap_with_slice(&mut b[..288]);
    });
    let (ok, reports, _) = quick_check(&dir);
    assert!(!ok, "swapped rows must fail");
    let failures = reports[0]["failures"].to_string();
    assert!(failures.contains("weight integrity") && failures.contains(name), "{failures}");
}

#[test]
fn lowering_is_exact_on_int8() {
    // tract reads per-channel INT8 DequantizeLinear itself, blocked ones only lowered (the
    // recipe blocks q/k/v, o and down): lowered and direct graphs must agree bit for bit.
    let dir = common::artifact("int8");
    let direct = TractDecoder::open(&dir, Lowering::Needed).expect("direct");
    let lowered = TractDecoder::open(&dir, Lowering::All).expect("lowered");
    assert_eq!(direct.lowered, 30 * 3);
    // Per layer q/k/v packed, o, gate/up packed, down; and the lm_head.
    assert_eq!(lowered.lowered, 30 * 4 + 1);
    let m = Manifest::read(&dir).expect("manifest");
    let input = || {
        let ids = [504i64, 3575, 282, 4649, 314];
        StepInput {
            input_ids: Array2::from_shape_vec((1, 5), ids.to_vec()).expect("ids"),
            attention_mask: Array2::ones((1, 5)),
            position_ids: Array2::from_shape_fn((1, 5), |(_, j)| j as i64),
            past: (0..m.config.num_layers)
                .map(|_| (ndarray::Array4::zeros((1, 3, 0, 64)), ndarray::Array4::zeros((1, 3, 0, 64))))
                .collect(),
        }
    };
    let a = direct.run(input()).expect("runs");
    let b = lowered.run(input()).expect("runs");
    assert_eq!(a.logits, b.logits, "lowering changed the numbers");
}

#[test]
fn gpu_providers_are_refused_or_skipped_with_a_reason() {
    for (ep, provider) in [("cuda", Provider::Cuda), ("tensorrt", Provider::TensorRt)] {
        let Err(reason) = provider.availability() else {
            eprintln!("{ep} is available here: `make test-gpu` covers it");
            continue;
        };
        // Asked for explicitly: an error naming the provider, never a silent CPU run.
        let dir = common::artifact("int4");
        let opts = SessionOptions { provider, ..Default::default() };
        let err = OrtDecoder::open(&dir, &opts).err().expect("refused").to_string();
        assert!(err.contains(&format!("{ep} execution provider")) && err.contains(&reason), "{err}");
        let out = common::kiln(&["check", "--ep", ep, dir.to_str().expect("utf-8")]);
        assert!(!out.status.success());
        // With --skip-unavailable (what `make test-gpu` uses): a SKIPPED line and success.
        let out = common::kiln(&["check", "--ep", ep, "--skip-unavailable", dir.to_str().expect("utf-8")]);
        assert!(out.status.success());
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.starts_with(&format!("SKIPPED: {ep} execution provider: ")), "{stdout}");
    }
}

#[test]
fn tensorrt_options_come_from_the_manifest() {
    let m = Manifest::read(&common::artifact("int4-g64-sym")).expect("manifest");
    let range = ShapeRange { max_batch: 4, max_seq: 512, max_past: 2048, opt_batch: 2, opt_past: 256 };
    let t = TensorRtOptions::for_artifact(&m, &range, false, None);
    assert!(t.int8, "QDQ graphs need INT8 kernels enabled");
    let ProfileShapes { min, opt, max } = t.profile;
    assert!(
        min.starts_with("input_ids:1x1,attention_mask:1x1,position_ids:1x1,past_key_values.0.key:1x3x0x64,"),
        "{min}"
    );
    assert!(
        opt.starts_with("input_ids:2x1,attention_mask:2x257,position_ids:2x1,past_key_values.0.key:2x3x256x64,"),
        "{opt}"
    );
    assert!(max.contains("attention_mask:4x2560,") && max.ends_with("past_key_values.29.value:4x3x2048x64"), "{max}");
    // One entry per dynamic input: 3 + 2 per layer.
    assert_eq!(max.split(',').count(), 3 + 2 * 30);
    let fp32 = Manifest::read(&common::artifact("fp32")).expect("manifest");
    assert!(!TensorRtOptions::for_artifact(&fp32, &range, true, None).int8);
}

#[test]
fn bad_artifacts_and_texts_are_named() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let run = |dir: &Path, extra: &[&str]| {
        let mut args = vec!["check", "--tokens", "64", "--decode-steps", "1"];
        args.extend_from_slice(extra);
        args.push(dir.to_str().expect("utf-8"));
        let out = common::kiln(&args);
        assert!(!out.status.success(), "must fail: {extra:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let dir = int4_copy(tmp.path());
    std::fs::remove_file(dir.join("model.onnx.data")).expect("rm");
    let e = run(&dir, &[]);
    assert!(e.contains("model.onnx.data") && e.contains("No such file"), "{e}");

    let dir = int4_copy(&tmp.path().join("b"));
    let onnx = std::fs::read(dir.join("model.onnx")).expect("read");
    std::fs::write(dir.join("model.onnx"), &onnx[..onnx.len() / 2]).expect("truncate");
    let e = run(&dir, &[]);
    assert!(e.contains("model.onnx") && e.contains("not an ONNX model"), "{e}");

    let dir = int4_copy(&tmp.path().join("c"));
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("kiln.json")).expect("read")).expect("json");
    m["io"]["inputs"].as_array_mut().expect("inputs").pop();
    std::fs::write(dir.join("kiln.json"), m.to_string()).expect("write");
    let e = run(&dir, &[]);
    assert!(e.contains("kiln.json") && e.contains("does not match the graph"), "{e}");

    let dir = int4_copy(&tmp.path().join("d"));
    let data = std::fs::read(dir.join("model.onnx.data")).expect("read");
    std::fs::write(dir.join("model.onnx.data"), &data[..data.len() / 2]).expect("truncate");
    let e = run(&dir, &[]);
    assert!(e.contains("lie beyond") && e.contains("truncated"), "{e}");

    let dir = common::artifact("int4");
    let empty = tmp.path().join("empty.txt");
    std::fs::write(&empty, "  \n").expect("write");
    let e = run(&dir, &["--text", empty.to_str().expect("utf-8")]);
    assert!(e.contains("empty.txt") && e.contains("the text is empty"), "{e}");
    let latin1 = tmp.path().join("latin1.txt");
    std::fs::write(&latin1, b"caf\xe9 au lait").expect("write");
    let e = run(&dir, &["--text", latin1.to_str().expect("utf-8")]);
    assert!(e.contains("latin1.txt") && e.contains("not UTF-8"), "{e}");
}
