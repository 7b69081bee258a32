//! Weight integrity: every quantized tensor of an artifact, decoded from its file, against
//! the same tensor of the FP32 artifact of the same source. The relative error recomputed
//! here must equal the one the exporter recorded in `kiln.json`; a corrupted scale, a
//! swapped row or a mismatched file shows up as a larger error, named by tensor.

use serde::{Deserialize, Serialize};

use super::artifact::ArtifactFiles;
use super::lowering::unpack_codes;
use super::CheckError;
use crate::onnx::decoder::TensorReport;
use crate::quant::{Layout, Precision, QuantError};

/// Recomputed errors may differ from the recorded ones by summation order only.
const SAME_ERROR: f64 = 1e-4;

/// One tensor whose recomputed error differs from the recorded one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Mismatch {
    /// Tensor name.
    pub tensor: String,
    /// Relative error in kiln.json.
    pub recorded: f64,
    /// Relative error of the file against the FP32 artifact.
    pub actual: f64,
}

/// Integrity over all quantized tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Integrity {
    /// Tensors compared.
    pub tensors: usize,
    /// Largest recomputed relative error.
    pub max_rel_error: f64,
    /// Tensors that differ from their record.
    pub mismatches: Vec<Mismatch>,
}

/// Compares every integer-quantized tensor of `candidate` with `baseline` (an FP32 artifact).
pub fn compare(candidate: &ArtifactFiles, baseline: &ArtifactFiles) -> Result<Integrity, CheckError> {
    let mut out = Integrity { tensors: 0, max_rel_error: 0.0, mismatches: Vec::new() };
    for t in candidate.manifest.tensors.iter().filter(|t| t.scheme.precision.bits().is_some()) {
        let missing = |what: &str| CheckError::Artifact {
            path: candidate.dir.join("model.onnx"),
            reason: format!("initializer {what} listed in kiln.json is not in the graph"),
        };
        let (stored, columns) = location(t);
        // A tied embedding stored as the lm_head's codes is checked as the lm_head.
        if stored != t.name && candidate.manifest.tensors.iter().any(|o| o.name == stored) {
            continue;
        }
        let codes_t = candidate.initializer(stored).ok_or_else(|| missing(stored))?;
        let scale_name = format!("{stored}.scale");
        let scales_t = candidate.initializer(&scale_name).ok_or_else(|| missing(&scale_name))?;
        let zp_t = candidate.initializer(&format!("{stored}.zero_point"));
        let no_baseline = || CheckError::Artifact {
            path: baseline.dir.join("model.onnx"),
            reason: format!("baseline has no tensor {}", t.name),
        };
        let (base_stored, base_columns) =
            location(baseline.manifest.tensors.iter().find(|b| b.name == t.name).ok_or_else(no_baseline)?);
        let base_t = baseline.initializer(base_stored).ok_or_else(no_baseline)?;
        let base: Vec<f32> = f32_values(&baseline.bytes(base_t)?);
        let codes = unpack_codes(codes_t, &candidate.bytes(codes_t)?)?;
        let scales: Vec<f32> = f32_values(&candidate.bytes(scales_t)?);
        let zps = match zp_t {
            Some(z) => Some(unpack_codes(z, &candidate.bytes(z)?)?),
            None => None,
        };
        // NF4: the level table the file itself carries.
        let levels: Option<Vec<f32>> = match t.scheme.precision {
            Precision::Nf4 => {
                let name = format!("{stored}.levels");
                let l = candidate.initializer(&name).ok_or_else(|| missing(&name))?;
                let values = f32_values(&candidate.bytes(l)?);
                if values.len() != 16 {
                    return Err(CheckError::Artifact {
                        path: candidate.dir.join("model.onnx"),
                        reason: format!("{name}: {} levels, 16 expected", values.len()),
                    });
                }
                Some(values)
            }
            _ => None,
        };
        let shape_error = || CheckError::Artifact {
            path: candidate.dir.join("model.onnx"),
            reason: format!(
                "{}: dims {:?} (columns {columns:?}), baseline {:?} (columns {base_columns:?})",
                t.name, codes_t.dims, base_t.dims
            ),
        };
        let dims = |d: &[i64]| match d {
            &[r, c] if r >= 0 && c >= 0 => Some((r as usize, c as usize)),
            _ => None,
        };
        let ((rows, cols), (base_rows, base_cols)) =
            dims(&codes_t.dims).zip(dims(&base_t.dims)).ok_or_else(shape_error)?;
        let [c0, c1] = columns.unwrap_or([0, cols]);
        let [b0, b1] = base_columns.unwrap_or([0, base_cols]);
        let fits = c0 <= c1 && c1 <= cols && b0 <= b1 && b1 <= base_cols;
        if !fits
            || c1 - c0 != b1 - b0
            || rows != base_rows
            || rows.checked_mul(cols) != Some(codes.len())
            || rows.checked_mul(base_cols) != Some(base.len())
        {
            return Err(shape_error());
        }
        // Stored orientation: linear weights [in, out] (scales per output column, blocks
        // down the rows); the embedding [vocab, hidden] (scales per row, blocks along it).
        let embedding = t.name == "model.embed_tokens.weight";
        let block = t.scheme.block_size.max(1);
        let index = |r: usize, c: usize| -> usize {
            match (t.scheme.layout, embedding) {
                (Layout::PerTensor, _) => 0,
                (Layout::PerChannel, true) => r,
                (Layout::PerChannel, false) => c,
                (Layout::Blocked, true) => r * cols.div_ceil(block) + c / block,
                (Layout::Blocked, false) => (r / block) * cols + c,
            }
        };
        let signed = zps.is_none();
        let mut decoded = Vec::with_capacity(rows * (c1 - c0));
        for r in 0..rows {
            for c in c0..c1 {
                let k = index(r, c);
                let code = codes[r * cols + c];
                let centered = match &levels {
                    Some(levels) => levels[usize::from(code & 0x0F)],
                    None if signed => code as i8 as f32,
                    None => code as f32 - zps.as_ref().map_or(0.0, |z| z[k] as f32),
                };
                let scale = *scales.get(k).ok_or_else(|| CheckError::Artifact {
                    path: candidate.dir.join("model.onnx"),
                    reason: format!("{}: {} scales, index {k} needed", t.name, scales.len()),
                })?;
                decoded.push(centered * scale);
            }
        }
        let base = ndarray::ArrayView2::from_shape((rows, base_cols), &base)
            .map(|a| a.slice(ndarray::s![.., b0..b1]).to_owned());
        let decoded = ndarray::ArrayView2::from_shape((rows, c1 - c0), &decoded).map(|a| a.to_owned());
        let (Ok(a), Ok(b)) = (base, decoded) else { return Err(CheckError::Run(format!("{}: shape", t.name))) };
        let actual = QuantError::between(a.view(), b.view()).rel_frobenius;
        out.tensors += 1;
        out.max_rel_error = out.max_rel_error.max(actual);
        if (actual - t.error.rel_frobenius).abs() > SAME_ERROR * t.error.rel_frobenius.max(1e-6) {
            out.mismatches.push(Mismatch { tensor: t.name.clone(), recorded: t.error.rel_frobenius, actual });
        }
    }
    Ok(out)
}

/// Little-endian f32 values of an initializer's bytes.
fn f32_values(bytes: &[u8]) -> Vec<f32> {
    bytes.as_chunks::<4>().0.iter().map(|b| f32::from_le_bytes(*b)).collect()
}

/// The initializer holding report `t`'s matrix, and its columns there when packed.
fn location(t: &TensorReport) -> (&str, Option<[usize; 2]>) {
    match &t.packed {
        Some(p) => (&p.tensor, Some(p.columns)),
        None => (&t.name, None),
    }
}
