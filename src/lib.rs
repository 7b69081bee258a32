//! kiln: quantize a causal language model to INT8/INT4 ONNX, prove it against a CPU
//! reference, and serve it.
//!
//! The crate follows the data:
//!
//! 1. [`model`]: what a model is. GGUF and Hugging Face loaders produce one
//!    [`model::Model`] (config, f32 weights in Hugging Face layout, the model's own
//!    tokenizer); [`model::reference`] is a plain f32 forward pass used as the independent
//!    check of everything downstream.
//!
//! 2. [`quant`]: how weights are quantized (schemes, round-to-nearest, error metrics),
//!    pure math on ndarray.
//! 3. [`onnx`]: how a model is written: graph builder, decoder graph with QDQ weights,
//!    recipes, and the artifact directory with its manifest.
//! 4. [`check`]: how an artifact is proven: tract reference (with in-memory lowering of
//!    4-bit DequantizeLinear), parity with ONNX Runtime, quality against FP32.
//! 5. [`runtime`]: ONNX Runtime sessions over artifacts (the only room that names `ort`).
//!
//! Dependencies point one way: later rooms (quantization, ONNX writing, checking,
//! runtime, engine, serving) read from `model`, never the reverse.
#![warn(missing_docs, clippy::unwrap_used)]

pub mod bench;
pub mod check;
pub mod engine;
pub mod model;
pub mod onnx;
pub mod quant;
pub mod runtime;
pub mod serve;
