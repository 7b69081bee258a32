//! Weights stay quantized in ONNX Runtime's memory: loading the INT4 artifact adds at most
//! 1.5× its `model.onnx.data` to the process's resident memory. (A test binary of its own:
//! nothing else may allocate in the process while it measures.)

mod common;

use kiln::runtime::{environment, OrtDecoder, SessionOptions};

/// Resident set size of this process, from /proc/self/statm.
fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("statm");
    let pages: u64 = statm.split_whitespace().nth(1).expect("rss field").parse().expect("number");
    pages * 4096
}

#[test]
fn int4_session_memory_is_close_to_its_file() {
    let dir = common::artifact("int4");
    let data = std::fs::metadata(dir.join("model.onnx.data")).expect("data").len();
    environment().expect("ONNX Runtime loads");
    let before = rss_bytes();
    let dec = OrtDecoder::open(&dir, &SessionOptions::default()).expect("session");
    let added = rss_bytes().saturating_sub(before);
    eprintln!("int4: model.onnx.data {data} B, session added {added} B ({:.2}×)", added as f64 / data as f64);
    assert!(added * 2 <= data * 3, "loading added {added} B for {data} B of weights");
    drop(dec);
}
