//! The CPU reference runner: an artifact's `model.onnx` in tract, 4-bit and blocked
//! DequantizeLinear lowered in memory (see [`super::lowering`]), one optimized plan for
//! prefill and decode with symbolic batch, sequence and past lengths.

use std::path::Path;
use std::sync::Arc;

use ndarray::{Array3, Array4, Ix3, Ix4};
use tract_onnx::prelude::*;

use super::artifact::ArtifactFiles;
use super::lowering::{lower_dequantize, Lowering};
use super::CheckError;
use crate::onnx::manifest;
use crate::runtime::{StepInput, StepOutput};

/// An artifact's decoder, optimized by tract.
pub struct TractDecoder {
    plan: Arc<TypedRunnableModel>,
    layers: usize,
    /// DequantizeLinear nodes lowered before tract saw the graph.
    pub lowered: usize,
}

impl TractDecoder {
    /// Loads `dir/model.onnx`, lowers DequantizeLinear per `which`, declares the symbolic
    /// input facts and optimizes once.
    pub fn open(dir: &Path, which: Lowering) -> Result<Self, CheckError> {
        let files = ArtifactFiles::open(dir)?;
        let path = dir.join(manifest::MODEL_FILE);
        let mut proto = files.model.clone();
        let graph = proto
            .graph
            .as_mut()
            .ok_or_else(|| CheckError::Artifact { path: path.clone(), reason: "no graph".into() })?;
        let lowered = lower_dequantize(graph, which, &|t| files.bytes(t))?;
        let m = &files.manifest;
        let tract_err = |e: TractError| CheckError::Tract { path: path.clone(), reason: format!("{e:?}") };
        let dir_str = dir
            .to_str()
            .ok_or_else(|| CheckError::Artifact { path: path.clone(), reason: "path is not UTF-8".into() })?;
        let mut model = tract_onnx::onnx().parse(&proto, Some(dir_str)).map_err(tract_err)?.model;
        let (b, s, p) = (model.sym("batch"), model.sym("seq"), model.sym("past"));
        let c = &m.config;
        let (bd, sd, pd) = (b.to_dim(), s.to_dim(), p.to_dim());
        model.set_input_fact(0, i64::fact([bd.clone(), sd.clone()]).into()).map_err(tract_err)?;
        model.set_input_fact(1, i64::fact([bd.clone(), pd.clone() + sd.clone()]).into()).map_err(tract_err)?;
        model.set_input_fact(2, i64::fact([bd.clone(), sd]).into()).map_err(tract_err)?;
        let kv = f32::fact([bd, (c.num_kv_heads as i64).to_dim(), pd, (c.head_dim as i64).to_dim()]);
        for i in 0..2 * c.num_layers {
            model.set_input_fact(3 + i, kv.clone().into()).map_err(tract_err)?;
        }
        let plan = model.into_optimized().and_then(|m| m.into_runnable()).map_err(tract_err)?;
        Ok(TractDecoder { plan, layers: c.num_layers, lowered })
    }

    /// Runs the graph once.
    pub fn run(&self, input: StepInput) -> Result<StepOutput, CheckError> {
        let err = |e: TractError| CheckError::Run(format!("{e:?}"));
        let mut inputs: TVec<TValue> = tvec![
            input.input_ids.into_dyn().into_tensor().into_tvalue(),
            input.attention_mask.into_dyn().into_tensor().into_tvalue(),
            input.position_ids.into_dyn().into_tensor().into_tvalue(),
        ];
        for (k, v) in input.past {
            inputs.push(k.into_dyn().into_tensor().into_tvalue());
            inputs.push(v.into_dyn().into_tensor().into_tvalue());
        }
        let out = self.plan.run(inputs).map_err(err)?;
        let array = |i: usize| -> Result<tract_ndarray::ArrayD<f32>, CheckError> {
            Ok(out[i].to_plain_array_view::<f32>().map_err(err)?.to_owned())
        };
        let logits: Array3<f32> =
            array(0)?.into_dimensionality::<Ix3>().map_err(|e| CheckError::Run(format!("logits: {e}")))?;
        let mut present = Vec::with_capacity(self.layers);
        for i in 0..self.layers {
            let kv = |j: usize| -> Result<Array4<f32>, CheckError> {
                array(j)?.into_dimensionality::<Ix4>().map_err(|e| CheckError::Run(format!("present: {e}")))
            };
            present.push((kv(1 + 2 * i)?, kv(2 + 2 * i)?));
        }
        Ok(StepOutput { logits, present })
    }
}
