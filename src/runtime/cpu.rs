//! kiln's own CPU kernels for `serving.onnx`, as ONNX Runtime custom operators.
//!
//! The artifact keeps standard operators (the contrib GroupQueryAttention, `DequantizeLinear
//! → MatMul`), which the CUDA and TensorRT providers run. A CPU session loads the graph with
//! [`rewrite`], which moves those nodes into the [`DOMAIN`] domain, and registers [`domain`].

use ort::operator::OperatorDomain;
use tract_onnx::pb;

use super::{attention, matmul, KvCache};

/// The operator domain of kiln's CPU kernels.
const DOMAIN: &str = "ai.kiln";

/// The operators a CPU session of the serving graph registers.
pub fn domain() -> ort::Result<OperatorDomain> {
    OperatorDomain::new(DOMAIN)?
        .add(attention::CachedAttention { cache: KvCache::F32 })?
        .add(attention::CachedAttention { cache: KvCache::F16 })?
        .add(matmul::QuantizedMatMul)
}

/// Rewrites `serving.onnx` for a CPU session: attention always runs kiln's kernel;
/// quantized MatMuls do where `int8_matmuls` (int8 activations allowed) and the CPU has
/// AVX-512 VNNI, else ONNX Runtime fuses them into MatMulNBits as before. The KV cache
/// (graph inputs `past_key_values.*`, outputs `present.*`) becomes `cache`; `paged` makes it
/// a block pool read through the new input `block_table` ([`attention::page`]).
pub fn rewrite(model: &mut pb::ModelProto, int8_matmuls: bool, cache: KvCache, paged: bool) -> Result<(), String> {
    let graph = model.graph.as_mut().ok_or("the model has no graph")?;
    if attention::move_nodes(graph, DOMAIN, cache)? == 0 {
        return Err("the graph has no GroupQueryAttention node".into());
    }
    if paged {
        attention::page(graph);
    }
    if int8_matmuls && matmul::available() {
        matmul::fuse(graph, DOMAIN);
    }
    model.opset_import.push(pb::OperatorSetIdProto { domain: DOMAIN.into(), version: 1 });
    Ok(())
}
