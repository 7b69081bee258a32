//! A second initializer entry for weights that a Gather and a DequantizeLinear both read.
//!
//! A tied embedding stored once (`onnx::decoder`) is read by the embedding's Gather and by
//! the lm_head's `DequantizeLinear → MatMul`. ONNX Runtime fuses that pair into MatMulNBits
//! only when nothing else reads the codes; shared, it dequantizes the whole table every run
//! (measured with ORT 1.31 on a 576 × 49152 INT8 table: 43.7 ms per decode step, against
//! 2.05 ms with two initializers). [`gathered`] gives each such Gather its own entry that
//! names the same bytes (the same external-data location, or a copy of inline data).

use tract_onnx::pb;

/// Suffix of the Gather's entry.
const SUFFIX: &str = ".gathered";

/// Points every Gather that reads an initializer that a DequantizeLinear also reads (codes or
/// scales) at its own entry for the same bytes; returns how many initializers gained one.
pub fn gathered(graph: &mut pb::GraphProto) -> usize {
    let standard = |n: &&pb::NodeProto, op: &str| n.op_type == op && n.domain.is_empty();
    let gathered = |name: &str, graph: &pb::GraphProto| {
        graph.node.iter().any(|n| standard(&n, "Gather") && n.input.first().is_some_and(|i| i == name))
    };
    let dequantized = |name: &str, graph: &pb::GraphProto| {
        graph.node.iter().any(|n| standard(&n, "DequantizeLinear") && n.input.iter().any(|i| i == name))
    };
    let shared: Vec<pb::TensorProto> =
        graph.initializer.iter().filter(|t| gathered(&t.name, graph) && dequantized(&t.name, graph)).cloned().collect();
    for mut t in shared.iter().cloned() {
        let alias = format!("{}{SUFFIX}", t.name);
        for n in graph.node.iter_mut().filter(|n| n.op_type == "Gather" && n.domain.is_empty()) {
            if n.input.first() == Some(&t.name) {
                n.input[0] = alias.clone();
            }
        }
        t.name = alias;
        graph.initializer.push(t);
    }
    shared.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(op: &str, inputs: &[&str], output: &str) -> pb::NodeProto {
        pb::NodeProto {
            op_type: op.into(),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.into()],
            ..Default::default()
        }
    }

    fn external(name: &str) -> pb::TensorProto {
        let entry = |k: &str, v: &str| pb::StringStringEntryProto { key: k.into(), value: v.into() };
        pb::TensorProto {
            name: name.into(),
            dims: vec![4, 8],
            data_type: pb::tensor_proto::DataType::Int8 as i32,
            data_location: Some(pb::tensor_proto::DataLocation::External as i32),
            external_data: vec![entry("location", "model.onnx.data"), entry("offset", "4096"), entry("length", "32")],
            ..Default::default()
        }
    }

    #[test]
    fn a_shared_table_gets_a_second_entry_for_the_same_bytes() {
        let mut graph = pb::GraphProto {
            initializer: vec![external("head"), external("head.scale"), external("other")],
            node: vec![
                node("Gather", &["head", "ids"], "cols"),
                node("Gather", &["head.scale", "ids"], "scales"),
                node("DequantizeLinear", &["head", "head.scale"], "w"),
                node("MatMul", &["h", "w"], "logits"),
                // Read by a Gather alone: left as it is.
                node("Gather", &["other", "ids"], "rows"),
            ],
            ..Default::default()
        };
        assert_eq!(gathered(&mut graph), 2);
        assert_eq!(graph.node[0].input, ["head.gathered", "ids"]);
        assert_eq!(graph.node[1].input, ["head.scale.gathered", "ids"]);
        assert_eq!(graph.node[2].input, ["head", "head.scale"]);
        assert_eq!(graph.node[4].input[0], "other");
        let alias = graph.initializer.iter().find(|t| t.name == "head.gathered").expect("the alias");
        assert_eq!(alias.external_data, external("head").external_data);
        assert_eq!((alias.dims.as_slice(), alias.data_type), (&[4i64, 8][..], external("head").data_type));
        assert_eq!(gathered(&mut graph), 0, "applied once");
    }
}
