//! GPTQ (Frantar, Ashkboos, Hoefler, Alistarh 2022, "GPTQ: Accurate Post-Training
//! Quantization for Generative Pre-trained Transformers"): quantize a weight matrix column
//! by column, spreading each column's rounding error over the columns not yet quantized
//! through the inverse Hessian of the layer's reconstruction error, H = 2XXᵀ.
//!
//! Here: H accumulated over calibration inputs (a running mean, as the paper's code does),
//! dampening by a fraction of the mean diagonal, dead inputs (zero diagonal) pinned to zero,
//! the upper Cholesky factor of H⁻¹, lazy updates in blocks of columns, and optional
//! act-order (largest diagonal first) with static groups, so that the saved block layout is
//! still "block g = input columns [g·B, (g+1)·B)" as ONNX `block_size` requires. Group
//! parameters (scale, zero point) are those of the storage scheme; without act-order they
//! are computed from the already-updated weights when the group's first column is reached.

use ndarray::{s, Array2, ArrayView2, ArrayViewMut2, Axis};
use rayon::prelude::*;

use super::rtn::GroupParams;
use super::{Layout, Quantized, Scheme};

/// GPTQ settings.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GptqOptions {
    /// Dampening added to the diagonal, as a fraction of its mean.
    pub damp: f64,
    /// Columns per lazy update block.
    pub block: usize,
    /// Quantize columns in order of decreasing Hessian diagonal (with static groups).
    pub act_order: bool,
}

impl Default for GptqOptions {
    fn default() -> Self {
        GptqOptions { damp: 0.01, block: 128, act_order: false }
    }
}

/// Running H = 2/n · Σ xxᵀ over rows x of the layer inputs.
#[derive(Debug, Clone)]
pub struct Hessian {
    h: Array2<f64>,
    n: usize,
}

impl Hessian {
    /// An empty accumulator for inputs of width `dim`.
    pub fn new(dim: usize) -> Self {
        Hessian { h: Array2::zeros((dim, dim)), n: 0 }
    }

    /// Adds the rows of `x` `[tokens, dim]`.
    pub fn add(&mut self, x: ArrayView2<f32>) {
        let m = x.nrows();
        if m == 0 {
            return;
        }
        let xtx = x.t().dot(&x);
        let total = (self.n + m) as f64;
        self.h *= self.n as f64 / total;
        self.h.zip_mut_with(&xtx, |h, &v| *h += 2.0 * v as f64 / total);
        self.n += m;
    }

    /// Adds another accumulator's rows (a weighted mean of the two).
    pub fn merge(&mut self, other: &Hessian) {
        let total = (self.n + other.n) as f64;
        if other.n == 0 {
            return;
        }
        let (a, b) = (self.n as f64 / total, other.n as f64 / total);
        self.h.zip_mut_with(&other.h, |h, &o| *h = *h * a + o * b);
        self.n += other.n;
    }

    /// The accumulated matrix.
    pub fn matrix(&self) -> &Array2<f64> {
        &self.h
    }
}

/// Rows per parallel task of the column loop.
const ROW_CHUNK: usize = 64;

/// Quantizes `w` `[out, in]` with `scheme` (an integer precision) using the Hessian `h`
/// `[in, in]` of its inputs. `Err` when H stays singular even after extra dampening.
pub fn gptq(w: ArrayView2<f32>, h: &Array2<f64>, scheme: &Scheme, opts: &GptqOptions) -> Result<Quantized, String> {
    let params = GroupParams::of(scheme).ok_or("GPTQ needs an integer precision")?;
    let (rows, cols) = w.dim();
    if h.dim() != (cols, cols) {
        return Err(format!("Hessian is {:?}, the weight has {cols} inputs", h.dim()));
    }
    let group = match scheme.layout {
        Layout::Blocked => scheme.block_size.min(cols).max(1),
        _ => cols,
    };
    let groups = cols.div_ceil(group);

    let mut h = h.clone();
    let mut w = w.to_owned();
    for i in 0..cols {
        if h[[i, i]] == 0.0 {
            // A dead input: nothing flows through it, so its weights do not matter.
            h[[i, i]] = 1.0;
            w.column_mut(i).fill(0.0);
        }
    }
    let perm: Vec<usize> = if opts.act_order {
        let mut p: Vec<usize> = (0..cols).collect();
        p.sort_by(|&a, &b| h[[b, b]].total_cmp(&h[[a, a]]));
        p
    } else {
        (0..cols).collect()
    };
    let mut wp = w.select(Axis(1), &perm);
    let hp = h.select(Axis(0), &perm).select(Axis(1), &perm);
    let u = inverse_cholesky_upper(&hp, opts.damp)?;

    // Scales and zero points per (row, group). Static ones come from the original weights;
    // without act-order, blocked groups are set when their first column comes up.
    let mut scales = Array2::<f32>::ones((rows, groups));
    let mut zps = Array2::<u8>::zeros((rows, groups));
    let dynamic = scheme.layout == Layout::Blocked && !opts.act_order;
    let set_group =
        |scales: &mut ArrayViewMut2<f32>, zps: &mut ArrayViewMut2<u8>, values: ArrayView2<f32>, g: usize| {
            for (r, row) in values.rows().into_iter().enumerate() {
                let v: Vec<f32> = row.to_vec();
                let (sc, z) = params.params(&v);
                scales[[r, g]] = sc;
                zps[[r, g]] = z;
            }
        };
    if scheme.layout == Layout::PerTensor {
        let all: Vec<f32> = w.iter().copied().collect();
        let (sc, z) = params.params(&all);
        scales.fill(sc);
        zps.fill(z);
    } else if !dynamic {
        for g in 0..groups {
            let end = ((g + 1) * group).min(cols);
            set_group(&mut scales.view_mut(), &mut zps.view_mut(), w.slice(s![.., g * group..end]), g);
        }
    }

    let mut codes = Array2::<u8>::zeros((rows, cols));
    let block = opts.block.max(group.min(cols)).max(1);
    let mut i1 = 0;
    while i1 < cols {
        let i2 = (i1 + block).min(cols);
        let count = i2 - i1;
        let mut w1 = wp.slice(s![.., i1..i2]).to_owned();
        let mut err1 = Array2::<f32>::zeros((rows, count));
        // Rows are independent within a block (each row's error feeds only its own later
        // columns): chunks of rows run in parallel, each over the block's columns in order.
        let d: Vec<f32> = (i1..i2).map(|c| u[[c, c]] as f32).collect();
        let urows: Vec<Vec<f32>> =
            (0..count).map(|j| (j + 1..count).map(|k| u[[i1 + j, i1 + k]] as f32).collect()).collect();
        let mut parts: Vec<_> = w1
            .axis_chunks_iter_mut(Axis(0), ROW_CHUNK)
            .zip(err1.axis_chunks_iter_mut(Axis(0), ROW_CHUNK))
            .zip(codes.axis_chunks_iter_mut(Axis(0), ROW_CHUNK))
            .zip(scales.axis_chunks_iter_mut(Axis(0), ROW_CHUNK))
            .zip(zps.axis_chunks_iter_mut(Axis(0), ROW_CHUNK))
            .collect();
        parts.par_iter_mut().for_each(|((((w1, err1), codes), scales), zps)| {
            for j in 0..count {
                let orig = perm[i1 + j];
                let g = orig / group;
                if dynamic && orig.is_multiple_of(group) {
                    let end = (j + group).min(count);
                    set_group(scales, zps, w1.slice(s![.., j..end]), g);
                }
                for r in 0..w1.nrows() {
                    let v = w1[[r, j]];
                    let (sc, z) = (scales[[r, g]], zps[[r, g]]);
                    let q = params.code(v, sc, z);
                    codes[[r, orig]] = q;
                    let e = (v - params.dequant(q, sc, z)) / d[j];
                    err1[[r, j]] = e;
                    let mut rest = w1.slice_mut(s![r, j + 1..]);
                    for (x, &uk) in rest.iter_mut().zip(&urows[j]) {
                        *x -= e * uk;
                    }
                }
            }
        });
        if i2 < cols {
            let tail: Array2<f32> = u.slice(s![i1..i2, i2..]).mapv(|v| v as f32);
            let update = err1.dot(&tail);
            let mut rest = wp.slice_mut(s![.., i2..]);
            rest -= &update;
        }
        i1 = i2;
    }
    let stored_groups = if scheme.layout == Layout::PerTensor { 1 } else { groups };
    let scale_rows = if scheme.layout == Layout::PerTensor { 1 } else { rows };
    let scales = scales.slice(s![..scale_rows, ..stored_groups]).to_owned();
    let zps = zps.slice(s![..scale_rows, ..stored_groups]).to_owned();
    Ok(Quantized {
        bits: params.bits,
        signed: params.signed(),
        codes,
        scales,
        zero_points: (!scheme.symmetric).then_some(zps),
        layout: scheme.layout,
        group: if scheme.layout == Layout::PerTensor { rows * cols } else { group },
        levels: params.levels,
    })
}

/// The upper Cholesky factor U of H⁻¹ (UᵀU = H⁻¹) after dampening H's diagonal by
/// `damp` × its mean; the dampening grows tenfold (up to three times) while H is not
/// positive definite.
///
/// With J the reversal permutation and JHJ = KKᵀ (lower Cholesky), H = RRᵀ with R = JKJ
/// upper triangular, so H⁻¹ = R⁻ᵀR⁻¹ and U = R⁻¹: one Cholesky and one triangular inverse,
/// with no explicit H⁻¹.
fn inverse_cholesky_upper(h: &Array2<f64>, damp: f64) -> Result<Array2<f64>, String> {
    let n = h.nrows();
    let mean = (0..n).map(|i| h[[i, i]]).sum::<f64>() / n as f64;
    let mut factor = damp;
    for _ in 0..4 {
        let mut reversed = h.slice(s![..;-1, ..;-1]).to_owned();
        for i in 0..n {
            reversed[[i, i]] += factor * mean;
        }
        if let Some(k) = cholesky_lower(&reversed) {
            let r = k.slice(s![..;-1, ..;-1]).to_owned();
            return Ok(upper_inverse(&r));
        }
        factor *= 10.0;
    }
    Err(format!("the Hessian ({n}×{n}) is not positive definite even with dampening {factor}"))
}

/// Lower Cholesky factor of a symmetric positive definite matrix, or `None`.
pub fn cholesky_lower(a: &Array2<f64>) -> Option<Array2<f64>> {
    let n = a.nrows();
    let mut l = vec![0f64; n * n];
    for i in 0..n {
        for j in 0..=i {
            let (ri, rj) = (&l[i * n..i * n + j], &l[j * n..j * n + j]);
            let dot: f64 = ri.iter().zip(rj).map(|(x, y)| x * y).sum();
            let v = a[[i, j]] - dot;
            if i == j {
                if !(v > 0.0 && v.is_finite()) {
                    return None;
                }
                l[i * n + i] = v.sqrt();
            } else {
                l[i * n + j] = v / l[j * n + j];
            }
        }
    }
    Array2::from_shape_vec((n, n), l).ok()
}

/// Inverse of an upper-triangular matrix by back substitution, row by row.
fn upper_inverse(t: &Array2<f64>) -> Array2<f64> {
    let n = t.nrows();
    let mut y = Array2::<f64>::zeros((n, n));
    for i in (0..n).rev() {
        let mut row = vec![0f64; n];
        row[i] = 1.0;
        for k in i + 1..n {
            let c = t[[i, k]];
            if c != 0.0 {
                let yk = y.row(k);
                for (dst, &v) in row[k..].iter_mut().zip(yk.slice(s![k..]).iter()) {
                    *dst -= c * v;
                }
            }
        }
        let d = t[[i, i]];
        for (j, v) in row.into_iter().enumerate().skip(i) {
            y[[i, j]] = v / d;
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{quantize, Precision, QuantError};
    use rand::{Rng, SeedableRng};

    fn scheme(layout: Layout, block_size: usize, symmetric: bool) -> Scheme {
        Scheme { precision: Precision::Int4, layout, block_size, symmetric, clip_search: false }
    }

    fn random(rows: usize, cols: usize, seed: u64) -> Array2<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        Array2::from_shape_fn((rows, cols), |_| rng.random::<f32>() * 2.0 - 1.0)
    }

    /// Inputs with strongly correlated channels (a few latent factors plus noise).
    fn correlated_inputs(tokens: usize, dim: usize, seed: u64) -> Array2<f32> {
        let latent = random(tokens, 4, seed);
        let mix = random(4, dim, seed + 1);
        let noise = random(tokens, dim, seed + 2) * 0.05;
        latent.dot(&mix) + noise
    }

    fn output_error(w: &Array2<f32>, q: &Array2<f32>, x: &Array2<f32>) -> f64 {
        let (a, b) = (x.dot(&w.t()), x.dot(&q.t()));
        QuantError::between(a.view(), b.view()).rel_frobenius
    }

    #[test]
    fn beats_round_to_nearest_on_correlated_inputs() {
        let (out, dim) = (24, 64);
        let w = random(out, dim, 1);
        let x = correlated_inputs(512, dim, 10);
        let mut h = Hessian::new(dim);
        h.add(x.view());
        for (sc, act_order) in [
            (scheme(Layout::Blocked, 16, false), false),
            (scheme(Layout::Blocked, 16, true), true),
            (scheme(Layout::PerChannel, 0, true), false),
        ] {
            let rtn = quantize(w.view(), &sc).expect("int").dequantize();
            let opts = GptqOptions { act_order, block: 32, ..Default::default() };
            let g = gptq(w.view(), h.matrix(), &sc, &opts).expect("gptq").dequantize();
            let (e_rtn, e_gptq) = (output_error(&w, &rtn, &x), output_error(&w, &g, &x));
            assert!(e_gptq < 0.8 * e_rtn, "{}: GPTQ {e_gptq} vs RTN {e_rtn}", sc.label());
        }
    }

    #[test]
    fn identity_hessian_is_round_to_nearest() {
        // With H = I (and no dampening effect on the ratios) no error feeds forward to
        // columns in other groups... and within a group: H⁻¹ = I means zero off-diagonal
        // terms, so every column is rounded on its own.
        let w = random(8, 48, 3);
        let h = Array2::<f64>::eye(48);
        for sc in [
            scheme(Layout::Blocked, 16, false),
            scheme(Layout::PerChannel, 0, true),
            scheme(Layout::PerTensor, 0, true),
        ] {
            let g = gptq(w.view(), &h, &sc, &GptqOptions::default()).expect("gptq");
            let r = quantize(w.view(), &sc).expect("rtn");
            assert_eq!(g, r, "{}", sc.label());
        }
    }

    #[test]
    fn dead_inputs_get_zero_weights() {
        let w = random(4, 32, 5);
        let mut x = random(64, 32, 6);
        x.column_mut(7).fill(0.0);
        let mut h = Hessian::new(32);
        h.add(x.view());
        let q = gptq(w.view(), h.matrix(), &scheme(Layout::Blocked, 16, true), &GptqOptions::default()).expect("gptq");
        assert!(q.dequantize().column(7).iter().all(|&v| v == 0.0));
    }

    #[test]
    fn cholesky_and_inverse() {
        let a = random(6, 6, 9).mapv(f64::from);
        let spd = a.dot(&a.t()) + Array2::<f64>::eye(6);
        let l = cholesky_lower(&spd).expect("spd");
        assert!((l.dot(&l.t()) - &spd).iter().all(|d| d.abs() < 1e-9));
        let u = inverse_cholesky_upper(&spd, 0.0).expect("spd");
        let inv = u.t().dot(&u);
        assert!((inv.dot(&spd) - Array2::<f64>::eye(6)).iter().all(|d| d.abs() < 1e-8));
        assert!(cholesky_lower(&(-Array2::<f64>::eye(3))).is_none());
    }
}
