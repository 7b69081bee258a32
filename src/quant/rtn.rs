//! Round-to-nearest quantization, with an optional per-group search for the clipping range
//! that minimizes the squared reconstruction error.

use ndarray::{s, Array2, ArrayView2};
use rayon::prelude::*;

use super::{Layout, Precision, Quantized, Scheme, NF4_LEVELS};

/// Clipping ratios tried by the search: the full range down to half of it.
const CLIP_STEPS: usize = 20;
const CLIP_MIN_RATIO: f32 = 0.5;

/// Quantizes `w` `[rows, cols]` with `scheme`; `None` for float precisions.
///
/// Symmetric: `scale = absmax / qmax`, codes `round(w / scale)` in `[-qmax - 1, qmax]`.
/// Asymmetric: the range `[min(w, 0), max(w, 0)]` is spread over `0..=2^bits - 1` with a
/// zero point, so zero stays exactly representable. Rounding is half-to-even, as ONNX
/// QuantizeLinear rounds.
pub fn quantize(w: ArrayView2<f32>, scheme: &Scheme) -> Option<Quantized> {
    quantize_groups(w, scheme, &|_, values, out, p| p.quantize_group(values, out))
}

/// Quantizes `w` `[out, in]` like [`quantize`], but chooses each group's clipping range by
/// the error it causes in the layer's outputs for inputs `x` `[tokens, in]`, not in the
/// weights: for the rounding differences d of a group over input columns c,
/// ‖d·x_cᵀ‖² = dᵀ(x_cᵀx_c)d (the clipping search of AWQ). Blocked layouts only; the others
/// are quantized by [`quantize`].
pub fn quantize_for_inputs(w: ArrayView2<f32>, scheme: &Scheme, x: ArrayView2<f32>) -> Option<Quantized> {
    let cols = w.ncols();
    if scheme.layout != Layout::Blocked || x.ncols() != cols {
        return quantize(w, scheme);
    }
    let block = scheme.block_size.min(cols).max(1);
    // Row-major Gram matrix of each block's input columns.
    let grams: Vec<Vec<f32>> = (0..cols.div_ceil(block))
        .map(|g| {
            let xg = x.slice(s![.., g * block..((g + 1) * block).min(cols)]);
            xg.t().dot(&xg).iter().copied().collect()
        })
        .collect();
    quantize_groups(w, scheme, &|g, values, out, p| {
        p.quantize_group_by(values, out, true, &|d| quadratic(&grams[g], d))
    })
}

/// dᵀGd for a row-major `G` `[n, n]`, with eight independent sums per row so the compiler
/// vectorizes it (it runs for every clipping ratio of every group).
fn quadratic(g: &[f32], d: &[f32]) -> f32 {
    let n = d.len();
    let mut total = 0f32;
    for (row, &da) in g.chunks_exact(n).zip(d) {
        let mut lanes = [0f32; 8];
        let (rows8, ds8) = (row.chunks_exact(8), d.chunks_exact(8));
        let tail: f32 = rows8.remainder().iter().zip(ds8.remainder()).map(|(a, b)| a * b).sum();
        for (r, x) in rows8.zip(ds8) {
            for k in 0..8 {
                lanes[k] += r[k] * x[k];
            }
        }
        total += da * (lanes.iter().sum::<f32>() + tail);
    }
    total
}

/// Quantizes one group: (index of the group within its row, values, codes out, parameters)
/// → (scale, zero point).
type GroupFn<'a> = dyn Fn(usize, &[f32], &mut [u8], &GroupParams) -> (f32, u8) + Sync + 'a;

/// Splits `w` into the scheme's groups and quantizes each with `quantize_group`.
fn quantize_groups(w: ArrayView2<f32>, scheme: &Scheme, quantize_group: &GroupFn<'_>) -> Option<Quantized> {
    let params = GroupParams::of(scheme)?;
    let (rows, cols) = w.dim();
    let group = match scheme.layout {
        Layout::PerTensor => rows * cols,
        Layout::PerChannel => cols,
        Layout::Blocked => scheme.block_size.min(cols).max(1),
    };
    let groups_per_row = match scheme.layout {
        Layout::PerTensor => 1,
        _ => cols.div_ceil(group),
    };
    let data: Vec<f32> = w.iter().copied().collect();
    let mut codes = vec![0u8; rows * cols];
    let (scales, zero_points): (Vec<f32>, Vec<u8>) = if scheme.layout == Layout::PerTensor {
        let (s, z) = quantize_group(0, &data, &mut codes, &params);
        (vec![s], vec![z])
    } else {
        let per_row: Vec<Vec<(f32, u8)>> = data
            .par_chunks(cols.max(1))
            .zip(codes.par_chunks_mut(cols.max(1)))
            .map(|(row, out)| {
                row.chunks(group)
                    .zip(out.chunks_mut(group))
                    .enumerate()
                    .map(|(i, (g, o))| quantize_group(i, g, o, &params))
                    .collect()
            })
            .collect();
        per_row.into_iter().flatten().unzip()
    };
    let scale_rows = if scheme.layout == Layout::PerTensor { 1 } else { rows };
    let shape = (scale_rows, groups_per_row);
    Some(Quantized {
        bits: params.bits,
        signed: params.signed(),
        codes: Array2::from_shape_vec((rows, cols), codes).expect("rows × cols codes"),
        scales: Array2::from_shape_vec(shape, scales).expect("one scale per group"),
        zero_points: (!scheme.symmetric)
            .then(|| Array2::from_shape_vec(shape, zero_points).expect("one zero point per group")),
        layout: scheme.layout,
        group,
        levels: params.levels,
    })
}

/// Quantization of one group of values: its scale and zero point, and the codes.
#[derive(Clone, Copy)]
pub(crate) struct GroupParams {
    pub(crate) bits: u32,
    pub(crate) symmetric: bool,
    pub(crate) clip_search: bool,
    /// The values codes stand for, times the scale (NF4); `None`: evenly spaced integers.
    pub(crate) levels: Option<&'static [f32; 16]>,
}

impl GroupParams {
    /// The parameters of `scheme`; `None` for float precisions.
    pub(crate) fn of(scheme: &Scheme) -> Option<Self> {
        Some(GroupParams {
            bits: scheme.precision.bits()?,
            symmetric: scheme.symmetric,
            clip_search: scheme.clip_search,
            levels: (scheme.precision == Precision::Nf4).then_some(&NF4_LEVELS),
        })
    }

    /// Whether codes are signed integers (stored as INT4/INT8).
    pub(crate) fn signed(&self) -> bool {
        self.symmetric && self.levels.is_none()
    }

    /// Quantizes one group into `out`; returns its scale and zero point (0 when symmetric).
    pub(crate) fn quantize_group(&self, values: &[f32], out: &mut [u8]) -> (f32, u8) {
        self.quantize_group_by(values, out, self.clip_search, &|d| d.iter().map(|x| x * x).sum())
    }

    /// As [`quantize_group`](Self::quantize_group), with the clipping ratios (all of them when
    /// `search`, else only the full range) ranked by `error` of the rounding differences.
    fn quantize_group_by(
        &self,
        values: &[f32],
        out: &mut [u8],
        search: bool,
        error: &dyn Fn(&[f32]) -> f32,
    ) -> (f32, u8) {
        let ratios: Vec<f32> = if search {
            (0..=CLIP_STEPS).map(|k| 1.0 - (1.0 - CLIP_MIN_RATIO) * k as f32 / CLIP_STEPS as f32).collect()
        } else {
            vec![1.0]
        };
        let mut best = (f32::INFINITY, 0f32, 0u8);
        let mut d = vec![0f32; values.len()];
        for ratio in ratios {
            let (scale, zp) = self.range(values, ratio);
            for (di, &v) in d.iter_mut().zip(values) {
                *di = v - self.dequant(self.code(v, scale, zp), scale, zp);
            }
            let err = error(&d);
            if err < best.0 {
                best = (err, scale, zp);
            }
        }
        let (_, scale, zp) = best;
        for (o, &v) in out.iter_mut().zip(values) {
            *o = self.code(v, scale, zp);
        }
        (scale, zp)
    }

    /// The scale and zero point for `values` (with the clipping search when enabled).
    pub(crate) fn params(&self, values: &[f32]) -> (f32, u8) {
        let mut scratch = vec![0u8; values.len()];
        self.quantize_group(values, &mut scratch)
    }

    /// Scale and zero point covering `values` shrunk by `ratio`.
    fn range(&self, values: &[f32], ratio: f32) -> (f32, u8) {
        let nonzero = |s: f32| if s > 0.0 && s.is_finite() { s } else { 1.0 };
        if self.symmetric || self.levels.is_some() {
            // Levels span [-1, 1] (no zero point); signed integers reach ±qmax.
            let qmax = if self.levels.is_some() { 1.0 } else { ((1i32 << (self.bits - 1)) - 1) as f32 };
            let absmax = values.iter().fold(0f32, |m, v| m.max(v.abs())) * ratio;
            (nonzero(absmax / qmax), 0)
        } else {
            let levels = ((1u32 << self.bits) - 1) as f32;
            let lo = values.iter().fold(0f32, |m, &v| m.min(v)) * ratio;
            let hi = values.iter().fold(0f32, |m, &v| m.max(v)) * ratio;
            let scale = nonzero((hi - lo) / levels);
            let zp = (-lo / scale).round_ties_even().clamp(0.0, levels);
            (scale, zp as u8)
        }
    }

    pub(crate) fn code(&self, v: f32, scale: f32, zp: u8) -> u8 {
        if let Some(levels) = self.levels {
            return nearest_level(levels, v / scale);
        }
        let q = (v / scale).round_ties_even();
        if self.symmetric {
            let qmax = ((1i32 << (self.bits - 1)) - 1) as f32;
            q.clamp(-qmax - 1.0, qmax) as i8 as u8
        } else {
            let levels = ((1u32 << self.bits) - 1) as f32;
            (q + zp as f32).clamp(0.0, levels) as u8
        }
    }

    pub(crate) fn dequant(&self, code: u8, scale: f32, zp: u8) -> f32 {
        if let Some(levels) = self.levels {
            levels[usize::from(code & 0x0F)] * scale
        } else if self.symmetric {
            code as i8 as f32 * scale
        } else {
            (code as f32 - zp as f32) * scale
        }
    }
}

/// The index of the level nearest `x` among ascending `levels` (the lower one on a tie; NaN
/// gives the zero level's neighbour below, harmlessly).
fn nearest_level(levels: &[f32; 16], x: f32) -> u8 {
    // Levels above x: the nearest is that boundary or the one below it.
    let above = levels.partition_point(|&l| l < x).min(15);
    let below = above.saturating_sub(1);
    if (x - levels[below]).abs() <= (levels[above] - x).abs() {
        below as u8
    } else {
        above as u8
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{Precision, QuantError};
    use ndarray::array;

    fn scheme(precision: Precision, layout: Layout, block_size: usize, symmetric: bool) -> Scheme {
        Scheme { precision, layout, block_size, symmetric, clip_search: false }
    }

    #[test]
    fn symmetric_int8_per_channel() {
        let w = array![[1.27, -0.5, 0.0], [0.0, 0.0, -2.54]];
        let q = quantize(w.view(), &scheme(Precision::Int8, Layout::PerChannel, 0, true)).expect("int");
        assert!((q.scales[[0, 0]] - 0.01).abs() < 1e-8 && (q.scales[[1, 0]] - 0.02).abs() < 1e-8);
        assert_eq!(q.codes.row(0).to_vec(), [127u8, (-50i8) as u8, 0]);
        assert_eq!(q.codes[[1, 2]], (-127i8) as u8);
        let back = q.dequantize();
        assert!((&back - &w).iter().all(|d| d.abs() < 1e-6));
    }

    #[test]
    fn asymmetric_uint4_blocks_with_a_partial_last_block() {
        // cols = 5, block 4: blocks [0..4] and [4..5].
        let w = array![[0.0, 1.4, 3.0, 0.75, -1.0]];
        let q = quantize(w.view(), &scheme(Precision::Int4, Layout::Blocked, 4, false)).expect("int");
        assert_eq!(q.scales.dim(), (1, 2));
        // Block 0: range [0, 3] over 15 levels → scale 0.2, zero point 0.
        assert!((q.scales[[0, 0]] - 0.2).abs() < 1e-7);
        assert_eq!(q.zero_points.as_ref().expect("zp")[[0, 0]], 0);
        assert_eq!(q.codes.row(0).to_vec()[..4], [0, 7, 15, 4]); // 0.75 / 0.2 = 3.75 → 4
                                                                 // Block 1: range [-1, 0] → scale 1/15, zero point 15, code 0.
        assert_eq!(q.zero_points.as_ref().expect("zp")[[0, 1]], 15);
        assert_eq!(q.codes[[0, 4]], 0);
        assert!((q.dequantize()[[0, 4]] + 1.0).abs() < 1e-6);
    }

    #[test]
    fn signed_int4_range_and_all_zero_groups() {
        let w = array![[0.7, -0.7, 0.04, 0.0], [0.0, 0.0, 0.0, 0.0]];
        let q = quantize(w.view(), &scheme(Precision::Int4, Layout::PerChannel, 0, true)).expect("int");
        assert_eq!(q.codes.row(0).to_vec(), [7u8, (-7i8) as u8, 0, 0]); // 0.04 / 0.1 = 0.4 → 0
        assert_eq!(q.scales[[1, 0]], 1.0, "an all-zero group gets a harmless scale");
        assert!(q.dequantize().row(1).iter().all(|&v| v == 0.0));
    }

    #[test]
    fn per_tensor_uses_one_scale() {
        let w = array![[1.0, -2.0], [4.0, 0.5]];
        let q = quantize(w.view(), &scheme(Precision::Int8, Layout::PerTensor, 0, true)).expect("int");
        assert_eq!(q.scales.dim(), (1, 1));
        assert!((q.scales[[0, 0]] - 4.0 / 127.0).abs() < 1e-8);
        assert_eq!(q.codes[[1, 0]], 127);
    }

    #[test]
    fn clip_search_never_increases_error() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        // Heavy-tailed rows: one outlier per row makes the full range wasteful.
        let w = Array2::from_shape_fn((16, 64), |(_, c)| {
            let v: f32 = rng.random::<f32>() * 2.0 - 1.0;
            if c == 3 {
                v * 12.0
            } else {
                v
            }
        });
        for symmetric in [true, false] {
            let plain = scheme(Precision::Int4, Layout::Blocked, 32, symmetric);
            let clipped = Scheme { clip_search: true, ..plain };
            let e0 = QuantError::between(w.view(), quantize(w.view(), &plain).expect("q").dequantize().view());
            let e1 = QuantError::between(w.view(), quantize(w.view(), &clipped).expect("q").dequantize().view());
            assert!(e1.rel_frobenius < e0.rel_frobenius, "clip search helps on outliers: {e1:?} vs {e0:?}");
        }
    }

    #[test]
    fn quadratic_form_matches_the_definition() {
        for n in [32usize, 13] {
            let g: Vec<f32> = (0..n * n).map(|i| ((i * 7) % 11) as f32 - 5.0).collect();
            let d: Vec<f32> = (0..n).map(|i| ((i * 3) % 5) as f32 * 0.5 - 1.0).collect();
            let want: f64 = (0..n)
                .flat_map(|a| (0..n).map(move |b| (a, b)))
                .map(|(a, b)| (d[a] * g[a * n + b] * d[b]) as f64)
                .sum();
            assert!((quadratic(&g, &d) as f64 - want).abs() < 1e-3, "n = {n}");
        }
    }

    #[test]
    fn clipping_for_the_inputs_lowers_the_output_error() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        let w = Array2::from_shape_fn((24, 64), |(_, c)| {
            let v: f32 = rng.random::<f32>() * 2.0 - 1.0;
            if c % 17 == 3 {
                v * 6.0
            } else {
                v
            }
        });
        // Inputs where a few channels carry most of the signal, so an error there costs more.
        let x = Array2::from_shape_fn((200, 64), |(_, c)| {
            let v: f32 = rng.random::<f32>() * 2.0 - 1.0;
            if c % 9 == 0 {
                v * 10.0
            } else {
                v * 0.2
            }
        });
        for symmetric in [true, false] {
            let s = Scheme { clip_search: true, ..scheme(Precision::Int4, Layout::Blocked, 32, symmetric) };
            let y = x.dot(&w.t());
            let out_error =
                |q: Quantized| QuantError::between(y.view(), x.dot(&q.dequantize().t()).view()).rel_frobenius;
            let by_weights = out_error(quantize(w.view(), &s).expect("q"));
            let by_outputs = out_error(quantize_for_inputs(w.view(), &s, x.view()).expect("q"));
            assert!(by_outputs < by_weights, "symmetric {symmetric}: {by_outputs} vs {by_weights}");
        }
        // Other layouts fall back to plain round-to-nearest.
        let pc = scheme(Precision::Int8, Layout::PerChannel, 0, true);
        assert_eq!(quantize_for_inputs(w.view(), &pc, x.view()), quantize(w.view(), &pc));
    }

    /// Φ⁻¹(p) by bisection on Φ(x) = erfc(-x/√2)/2, erfc from its continued fraction
    /// (independent of the table under test; 1e-12 in x).
    fn normal_quantile(p: f64) -> f64 {
        fn erfc(x: f64) -> f64 {
            if x < 0.0 {
                return 2.0 - erfc(-x);
            }
            if x < 2.0 {
                // erf by its Taylor series.
                let (mut term, mut sum, mut n) = (x, x, 0.0);
                while term.abs() > 1e-17 {
                    n += 1.0;
                    term *= -x * x / n;
                    sum += term / (2.0 * n + 1.0);
                }
                return 1.0 - 2.0 / std::f64::consts::PI.sqrt() * sum;
            }
            // Lentz's continued fraction for x ≥ 2.
            let mut f = x;
            for k in (1..60).rev() {
                f = x + k as f64 / 2.0 / f;
            }
            (-x * x).exp() / std::f64::consts::PI.sqrt() / f
        }
        let (mut lo, mut hi) = (-10.0, 10.0);
        while hi - lo > 1e-12 {
            let mid = (lo + hi) / 2.0;
            if erfc(-mid / std::f64::consts::SQRT_2) / 2.0 < p {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        (lo + hi) / 2.0
    }

    #[test]
    fn nf4_levels_are_qloras_normal_quantiles() {
        // QLoRA: 8 positive quantiles at p evenly from the offset ((1 − 1/30 + 1 − 1/32) / 2)
        // down to 0.5 (exclusive), 7 negative ones likewise, and zero; scaled so the largest
        // is 1.
        let offset = (1.0 - 1.0 / 30.0 + 1.0 - 1.0 / 32.0) / 2.0;
        let side = |count: usize| -> Vec<f64> {
            (0..count).map(|i| normal_quantile(offset + (0.5 - offset) * i as f64 / count as f64)).collect()
        };
        let (positive, negative) = (side(8), side(7));
        let max = positive[0];
        let mut want: Vec<f64> = negative.iter().map(|v| -v / max).collect();
        want.push(0.0);
        want.extend(positive.iter().rev().map(|v| v / max));
        for (i, (&l, w)) in NF4_LEVELS.iter().zip(&want).enumerate() {
            assert!((f64::from(l) - w).abs() < 2e-6, "level {i}: {l} vs {w}");
        }
    }

    #[test]
    fn nf4_codes_name_the_nearest_level_of_each_block() {
        let s = scheme(Precision::Nf4, Layout::Blocked, 4, true);
        // Block 0: absmax 2 → levels × 2; block 1: absmax 0.5, a value exactly on a level.
        let w = array![[2.0, -2.0, 0.1, 0.9, 0.5, -0.5 * 0.394_917_5, 0.0, 0.01]];
        let q = quantize(w.view(), &s).expect("nf4 quantizes");
        assert_eq!((q.signed, q.zero_points.is_none(), q.levels), (false, true, Some(&NF4_LEVELS)));
        assert_eq!(q.scales.row(0).to_vec(), [2.0, 0.5]);
        // 0.1 / 2 = 0.05: between 0 (7) and 0.0796 (8), nearer 0.0796; 0.45 → 0.4407 (12).
        assert_eq!(q.codes.row(0).to_vec(), [15, 0, 8, 12, 15, 3, 7, 7]);
        let back = q.dequantize();
        assert_eq!(back[[0, 5]], NF4_LEVELS[3] * 0.5, "a level times its scale is exact");
        assert_eq!(back[[0, 0]], 2.0);
        // Every value decodes to the level nearest it.
        for (c, (&v, &b)) in w.row(0).iter().zip(back.row(0)).enumerate() {
            let scale = q.scales[[0, c / 4]];
            let best = NF4_LEVELS.iter().map(|l| (l * scale - v).abs()).fold(f32::INFINITY, f32::min);
            assert!(((b - v).abs() - best).abs() < 1e-7, "column {c}");
        }
        assert_eq!(s.label(), "nf4-b4");
        // Codes, f32 scales and the 16-level table.
        assert_eq!(s.stored_bytes(1, 8), 4 + 2 * 4 + 64);
        let zp = Scheme { symmetric: false, ..s };
        assert!(zp.validate().expect_err("refused").contains("symmetric = true"));
        let pc = Scheme { layout: Layout::PerChannel, ..s };
        assert!(pc.validate().expect_err("refused").contains("blocked"));
    }

    #[test]
    fn float_precisions_are_not_integer_quantized() {
        let w = array![[1.0f32]];
        assert!(quantize(w.view(), &Scheme::FP32).is_none());
    }

    #[test]
    fn scheme_validation_and_labels() {
        let s = scheme(Precision::Int4, Layout::Blocked, 48, false);
        assert!(s.validate().expect_err("refused").contains("block_size = 48"));
        assert_eq!(scheme(Precision::Int4, Layout::Blocked, 32, false).label(), "int4-b32-zp");
        assert_eq!(scheme(Precision::Int8, Layout::PerChannel, 0, true).label(), "int8-pc-sym");
    }
}
