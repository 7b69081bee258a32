//! GGML tensor types and their dequantization to f32.
//!
//! Each quantized type is a fixed-size block of bytes that decodes to a fixed number of
//! values. The block layouts follow the GGUF specification (llama.cpp's `ggml-common.h`);
//! the names (`Q4_0`, `Q4_K`, …) are llama.cpp's. Every block type has one scalar decoder
//! here, written for clarity: loading a model dequantizes once, so this is not a hot path.
//!
//! Layouts (all little-endian, `f16` scales):
//!
//! | type | values | bytes | layout |
//! |---|---|---|---|
//! | Q4_0 | 32 | 18 | d, 16 × (two 4-bit codes); x = (q − 8)·d |
//! | Q4_1 | 32 | 20 | d, m, 16 × (two 4-bit codes); x = q·d + m |
//! | Q5_0 | 32 | 22 | d, 32 high bits, 16 × (two low nibbles); x = (q − 16)·d |
//! | Q5_1 | 32 | 24 | d, m, 32 high bits, 16 × (two low nibbles); x = q·d + m |
//! | Q8_0 | 32 | 34 | d, 32 × i8; x = q·d |
//! | Q2_K | 256 | 84 | 16 × (4-bit scale, 4-bit min), 64 × (four 2-bit codes), d, dmin |
//! | Q3_K | 256 | 110 | 32 × high-bit mask, 64 × (four 2-bit codes), 12 bytes of 6-bit scales, d |
//! | Q4_K | 256 | 144 | d, dmin, 12 bytes of 6-bit scales/mins, 128 × (two 4-bit codes) |
//! | Q5_K | 256 | 176 | d, dmin, 12 bytes of 6-bit scales/mins, 32 × high bits, 128 × nibbles |
//! | Q6_K | 256 | 210 | 128 × low nibbles, 64 × (four 2-bit high parts), 16 × i8 scales, d |

use half::{bf16, f16};

/// A GGML tensor element type, with llama.cpp's numeric ids.
#[allow(non_camel_case_types, missing_docs)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
    I8,
    I16,
    I32,
    I64,
    F64,
    BF16,
}

/// Ids of types this reader knows by name but cannot decode (the IQ family, TQ, MXFP4…).
const KNOWN_UNSUPPORTED: &[(u32, &str)] = &[
    (16, "IQ2_XXS"),
    (17, "IQ2_XS"),
    (18, "IQ3_XXS"),
    (19, "IQ1_S"),
    (20, "IQ4_NL"),
    (21, "IQ3_S"),
    (22, "IQ2_S"),
    (23, "IQ4_XS"),
    (29, "IQ1_M"),
    (34, "TQ1_0"),
    (35, "TQ2_0"),
    (39, "MXFP4"),
];

impl GgmlType {
    /// The type for a GGUF type id. `Err` carries a printable name for ids that exist in
    /// llama.cpp but are not supported here, or `"unknown type id N"`.
    pub fn from_id(id: u32) -> Result<Self, String> {
        use GgmlType::*;
        Ok(match id {
            0 => F32,
            1 => F16,
            2 => Q4_0,
            3 => Q4_1,
            6 => Q5_0,
            7 => Q5_1,
            8 => Q8_0,
            9 => Q8_1,
            10 => Q2_K,
            11 => Q3_K,
            12 => Q4_K,
            13 => Q5_K,
            14 => Q6_K,
            15 => Q8_K,
            24 => I8,
            25 => I16,
            26 => I32,
            27 => I64,
            28 => F64,
            30 => BF16,
            other => {
                return Err(KNOWN_UNSUPPORTED
                    .iter()
                    .find(|(i, _)| *i == other)
                    .map(|(_, name)| (*name).to_string())
                    .unwrap_or_else(|| format!("unknown type id {other}")))
            }
        })
    }

    /// llama.cpp's name for the type.
    pub fn name(self) -> &'static str {
        use GgmlType::*;
        match self {
            F32 => "F32",
            F16 => "F16",
            Q4_0 => "Q4_0",
            Q4_1 => "Q4_1",
            Q5_0 => "Q5_0",
            Q5_1 => "Q5_1",
            Q8_0 => "Q8_0",
            Q8_1 => "Q8_1",
            Q2_K => "Q2_K",
            Q3_K => "Q3_K",
            Q4_K => "Q4_K",
            Q5_K => "Q5_K",
            Q6_K => "Q6_K",
            Q8_K => "Q8_K",
            I8 => "I8",
            I16 => "I16",
            I32 => "I32",
            I64 => "I64",
            F64 => "F64",
            BF16 => "BF16",
        }
    }

    /// (values per block, bytes per block).
    pub fn block_layout(self) -> (usize, usize) {
        use GgmlType::*;
        match self {
            F32 => (1, 4),
            F16 | BF16 => (1, 2),
            Q4_0 => (32, Q4_0_BYTES),
            Q4_1 => (32, Q4_1_BYTES),
            Q5_0 => (32, Q5_0_BYTES),
            Q5_1 => (32, Q5_1_BYTES),
            Q8_0 => (32, Q8_0_BYTES),
            Q8_1 => (32, 36),
            Q2_K => (QK_K, Q2_K_BYTES),
            Q3_K => (QK_K, Q3_K_BYTES),
            Q4_K => (QK_K, Q4_K_BYTES),
            Q5_K => (QK_K, Q5_K_BYTES),
            Q6_K => (QK_K, Q6_K_BYTES),
            Q8_K => (QK_K, 292),
            I8 => (1, 1),
            I16 => (1, 2),
            I32 => (1, 4),
            I64 | F64 => (1, 8),
        }
    }

    /// Bytes taken by `n` values, or `None` when `n` is not a whole number of blocks.
    pub fn bytes_for(self, n: u64) -> Option<u64> {
        let (values, bytes) = self.block_layout();
        n.is_multiple_of(values as u64).then(|| n / values as u64 * bytes as u64)
    }

    /// Whether [`dequantize`] decodes this type.
    pub fn is_float_decodable(self) -> bool {
        !matches!(self, GgmlType::Q8_1 | GgmlType::Q8_K | GgmlType::I8 | GgmlType::I16 | GgmlType::I32 | GgmlType::I64)
    }
}

const QK_K: usize = 256;
const Q4_0_BYTES: usize = 2 + 16;
const Q4_1_BYTES: usize = 2 + 2 + 16;
const Q5_0_BYTES: usize = 2 + 4 + 16;
const Q5_1_BYTES: usize = 2 + 2 + 4 + 16;
const Q8_0_BYTES: usize = 2 + 32;
const Q2_K_BYTES: usize = QK_K / 16 + QK_K / 4 + 2 + 2;
const Q3_K_BYTES: usize = QK_K / 8 + QK_K / 4 + 12 + 2;
const Q4_K_BYTES: usize = 2 + 2 + 12 + QK_K / 2;
const Q5_K_BYTES: usize = 2 + 2 + 12 + QK_K / 8 + QK_K / 2;
const Q6_K_BYTES: usize = QK_K / 2 + QK_K / 4 + QK_K / 16 + 2;
const _: () = assert!(Q2_K_BYTES == 84 && Q3_K_BYTES == 110 && Q4_K_BYTES == 144);
const _: () = assert!(Q5_K_BYTES == 176 && Q6_K_BYTES == 210);

/// Decodes `data` (a whole number of blocks of `ty`) into `out`, which must hold exactly
/// the number of values those blocks encode.
///
/// Returns `Err` with a reason for types that have no float decoding or sizes that do not
/// match; the caller adds the file and tensor name.
pub fn dequantize(ty: GgmlType, data: &[u8], out: &mut [f32]) -> Result<(), String> {
    let (values, bytes) = ty.block_layout();
    if !data.len().is_multiple_of(bytes) || data.len() / bytes * values != out.len() {
        return Err(format!("{} data of {} bytes does not decode to {} values", ty.name(), data.len(), out.len()));
    }
    use GgmlType::*;
    match ty {
        F32 => decode_scalars::<4>(data, out, f32::from_le_bytes),
        F16 => decode_scalars::<2>(data, out, |b| f16::from_le_bytes(b).to_f32()),
        BF16 => decode_scalars::<2>(data, out, |b| bf16::from_le_bytes(b).to_f32()),
        F64 => decode_scalars::<8>(data, out, |b| f64::from_le_bytes(b) as f32),
        Q4_0 => decode_blocks::<Q4_0_BYTES, 32>(data, out, q4_0),
        Q4_1 => decode_blocks::<Q4_1_BYTES, 32>(data, out, q4_1),
        Q5_0 => decode_blocks::<Q5_0_BYTES, 32>(data, out, q5_0),
        Q5_1 => decode_blocks::<Q5_1_BYTES, 32>(data, out, q5_1),
        Q8_0 => decode_blocks::<Q8_0_BYTES, 32>(data, out, q8_0),
        Q2_K => decode_blocks::<Q2_K_BYTES, QK_K>(data, out, q2_k),
        Q3_K => decode_blocks::<Q3_K_BYTES, QK_K>(data, out, q3_k),
        Q4_K => decode_blocks::<Q4_K_BYTES, QK_K>(data, out, q4_k),
        Q5_K => decode_blocks::<Q5_K_BYTES, QK_K>(data, out, q5_k),
        Q6_K => decode_blocks::<Q6_K_BYTES, QK_K>(data, out, q6_k),
        Q8_1 | Q8_K | I8 | I16 | I32 | I64 => return Err(format!("{} tensors have no f32 decoding here", ty.name())),
    }
    Ok(())
}

fn decode_scalars<const N: usize>(data: &[u8], out: &mut [f32], f: impl Fn([u8; N]) -> f32) {
    let (chunks, _) = data.as_chunks::<N>();
    for (o, c) in out.iter_mut().zip(chunks) {
        *o = f(*c);
    }
}

fn decode_blocks<const B: usize, const V: usize>(data: &[u8], out: &mut [f32], f: fn(&[u8; B], &mut [f32; V])) {
    let (blocks, _) = data.as_chunks::<B>();
    let (outs, _) = out.as_chunks_mut::<V>();
    for (block, o) in blocks.iter().zip(outs) {
        f(block, o);
    }
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

fn q4_0(b: &[u8; Q4_0_BYTES], y: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    for (j, &q) in b[2..].iter().enumerate() {
        y[j] = ((q & 0xF) as i32 - 8) as f32 * d;
        y[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
    }
}

fn q4_1(b: &[u8; Q4_1_BYTES], y: &mut [f32; 32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    for (j, &q) in b[4..].iter().enumerate() {
        y[j] = (q & 0xF) as f32 * d + m;
        y[j + 16] = (q >> 4) as f32 * d + m;
    }
}

/// The 5-bit codes of a Q5_0/Q5_1 block: low nibbles in `qs`, fifth bits in `qh`.
fn q5_codes(qh: u32, qs: &[u8]) -> [u8; 32] {
    let mut codes = [0u8; 32];
    for (j, &q) in qs.iter().enumerate() {
        let hi0 = ((qh >> j) & 1) as u8;
        let hi1 = ((qh >> (j + 16)) & 1) as u8;
        codes[j] = (q & 0xF) | (hi0 << 4);
        codes[j + 16] = (q >> 4) | (hi1 << 4);
    }
    codes
}

fn q5_0(b: &[u8; Q5_0_BYTES], y: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    for (o, c) in y.iter_mut().zip(q5_codes(qh, &b[6..])) {
        *o = (c as i32 - 16) as f32 * d;
    }
}

fn q5_1(b: &[u8; Q5_1_BYTES], y: &mut [f32; 32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    for (o, c) in y.iter_mut().zip(q5_codes(qh, &b[8..])) {
        *o = c as f32 * d + m;
    }
}

fn q8_0(b: &[u8; Q8_0_BYTES], y: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    for (o, &q) in y.iter_mut().zip(&b[2..]) {
        *o = q as i8 as f32 * d;
    }
}

/// Q2_K: 16 sub-blocks of 16 values; each has a 4-bit scale and a 4-bit min.
/// Codes are packed four per byte: 128 values use 32 bytes, shifts 0, 2, 4, 6.
fn q2_k(b: &[u8; Q2_K_BYTES], y: &mut [f32; QK_K]) {
    let scales = &b[..16];
    let qs = &b[16..80];
    let (d, dmin) = (f16_at(b, 80), f16_at(b, 82));
    let mut sub = 0;
    for half in 0..2 {
        let q = &qs[half * 32..half * 32 + 32];
        for shift in [0, 2, 4, 6] {
            for part in 0..2 {
                let sc = scales[sub];
                let (dl, ml) = (d * (sc & 0xF) as f32, dmin * (sc >> 4) as f32);
                let base = sub * 16;
                for l in 0..16 {
                    y[base + l] = dl * ((q[part * 16 + l] >> shift) & 3) as f32 - ml;
                }
                sub += 1;
            }
        }
    }
}

/// Q3_K: 16 sub-blocks of 16 values with 6-bit signed scales (offset 32). Two low bits
/// per value as in Q2_K; the third bit comes from `hmask` (a cleared bit subtracts 4).
fn q3_k(b: &[u8; Q3_K_BYTES], y: &mut [f32; QK_K]) {
    let hmask = &b[..32];
    let qs = &b[32..96];
    let packed = &b[96..108];
    let d = f16_at(b, 108);
    // Unpack the sixteen 6-bit scales: low 4 bits from the first 8 bytes (two per byte),
    // high 2 bits from the last 4 bytes (four per byte).
    let mut scales = [0i32; 16];
    for (i, s) in scales.iter_mut().enumerate() {
        let low = if i < 8 { packed[i] & 0xF } else { packed[i - 8] >> 4 };
        let high = (packed[8 + i % 4] >> (2 * (i / 4))) & 3;
        *s = (low | (high << 4)) as i32 - 32;
    }
    let mut sub = 0;
    for half in 0..2 {
        let q = &qs[half * 32..half * 32 + 32];
        for (bit, shift) in [0, 2, 4, 6].into_iter().enumerate() {
            let m = 1u8 << (half * 4 + bit);
            for part in 0..2 {
                let dl = d * scales[sub] as f32;
                let base = sub * 16;
                for l in 0..16 {
                    let i = part * 16 + l;
                    let low = ((q[i] >> shift) & 3) as i32;
                    let sub4 = if hmask[i] & m != 0 { 0 } else { 4 };
                    y[base + l] = dl * (low - sub4) as f32;
                }
                sub += 1;
            }
        }
    }
}

/// Scale and min `j` (0..8) of the 12-byte packed 6-bit scales of Q4_K and Q5_K.
fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        ((s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4))
    }
}

/// Q4_K: 8 sub-blocks of 32 values with 6-bit scales and mins; x = d·sc·q − dmin·m.
fn q4_k(b: &[u8; Q4_K_BYTES], y: &mut [f32; QK_K]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let scales = &b[4..16];
    let qs = &b[16..];
    for chunk in 0..4 {
        let q = &qs[chunk * 32..chunk * 32 + 32];
        let (sc1, m1) = scale_min_k4(2 * chunk, scales);
        let (sc2, m2) = scale_min_k4(2 * chunk + 1, scales);
        let (d1, mn1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, mn2) = (d * sc2 as f32, dmin * m2 as f32);
        let base = chunk * 64;
        for l in 0..32 {
            y[base + l] = d1 * (q[l] & 0xF) as f32 - mn1;
            y[base + 32 + l] = d2 * (q[l] >> 4) as f32 - mn2;
        }
    }
}

/// Q5_K: Q4_K with a fifth bit per value from `qh` (bit 2·chunk for the low nibbles,
/// bit 2·chunk + 1 for the high nibbles).
fn q5_k(b: &[u8; Q5_K_BYTES], y: &mut [f32; QK_K]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let scales = &b[4..16];
    let qh = &b[16..48];
    let qs = &b[48..];
    for chunk in 0..4 {
        let q = &qs[chunk * 32..chunk * 32 + 32];
        let (sc1, m1) = scale_min_k4(2 * chunk, scales);
        let (sc2, m2) = scale_min_k4(2 * chunk + 1, scales);
        let (d1, mn1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, mn2) = (d * sc2 as f32, dmin * m2 as f32);
        let (u1, u2) = (1u8 << (2 * chunk), 1u8 << (2 * chunk + 1));
        let base = chunk * 64;
        for l in 0..32 {
            let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
            let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
            y[base + l] = d1 * ((q[l] & 0xF) + h1) as f32 - mn1;
            y[base + 32 + l] = d2 * ((q[l] >> 4) + h2) as f32 - mn2;
        }
    }
}

/// Q6_K: 16 sub-blocks of 16 values with i8 scales; 6-bit codes offset by 32, low nibble
/// from `ql`, two high bits from `qh`.
fn q6_k(b: &[u8; Q6_K_BYTES], y: &mut [f32; QK_K]) {
    let ql_all = &b[..128];
    let qh_all = &b[128..192];
    let sc_all = &b[192..208];
    let d = f16_at(b, 208);
    for half in 0..2 {
        let ql = &ql_all[half * 64..half * 64 + 64];
        let qh = &qh_all[half * 32..half * 32 + 32];
        let sc = &sc_all[half * 8..half * 8 + 8];
        let out = &mut y[half * 128..half * 128 + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            out[l] = d * (sc[is] as i8 as f32) * q1 as f32;
            out[l + 32] = d * (sc[is + 2] as i8 as f32) * q2 as f32;
            out[l + 64] = d * (sc[is + 4] as i8 as f32) * q3 as f32;
            out[l + 96] = d * (sc[is + 6] as i8 as f32) * q4 as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    //! Hand-built blocks with answers worked out from the format description, not from
    //! the decoders above.
    use super::*;

    fn h(v: f32) -> [u8; 2] {
        f16::from_f32(v).to_le_bytes()
    }

    fn decode(ty: GgmlType, block: &[u8]) -> Vec<f32> {
        let mut out = vec![0f32; ty.block_layout().0];
        dequantize(ty, block, &mut out).expect("decodes");
        out
    }

    #[test]
    fn q4_0_and_q4_1() {
        // qs[j] holds value j in its low nibble and value j+16 in its high nibble.
        let qs: Vec<u8> = (0..16u8).map(|j| j | ((15 - j) << 4)).collect();
        let y = decode(GgmlType::Q4_0, &[&h(0.5)[..], &qs].concat());
        assert_eq!(y[0], -4.0); // (0 - 8) · 0.5
        assert_eq!(y[15], 3.5); // (15 - 8) · 0.5
        assert_eq!(y[16], 3.5); // high nibble of qs[0] = 15
        assert_eq!(y[31], -4.0);
        let y = decode(GgmlType::Q4_1, &[&h(0.25)[..], &h(-1.0), &qs].concat());
        assert_eq!(y[0], -1.0); // 0 · 0.25 − 1
        assert_eq!(y[5], 0.25); // 5 · 0.25 − 1
        assert_eq!(y[16], 2.75); // 15 · 0.25 − 1
    }

    #[test]
    fn q5_0_and_q5_1() {
        let mut qs = [0u8; 16];
        qs[3] = 0x27; // value 3: low nibble 7; value 19: low nibble 2
        qs[9] = 0xF0; // value 9: 0; value 25: 15
        let qh: u32 = (1 << 3) | (1 << 25); // fifth bit set for values 3 and 25
        let block = [&h(1.0)[..], &qh.to_le_bytes(), &qs].concat();
        let y = decode(GgmlType::Q5_0, &block);
        assert_eq!(y[3], 7.0); // (7 + 16) − 16
        assert_eq!(y[19], -14.0); // 2 − 16
        assert_eq!(y[9], -16.0);
        assert_eq!(y[25], 15.0); // (15 + 16) − 16
        let block = [&h(0.5)[..], &h(2.0), &qh.to_le_bytes(), &qs].concat();
        let y = decode(GgmlType::Q5_1, &block);
        assert_eq!(y[3], 13.5); // 23 · 0.5 + 2
        assert_eq!(y[25], 17.5); // 31 · 0.5 + 2
        assert_eq!(y[0], 2.0);
    }

    #[test]
    fn q8_0() {
        let mut qs = [0u8; 32];
        qs[0] = 0x80; // −128
        qs[1] = 0x7F; // 127
        qs[31] = 0xFF; // −1
        let y = decode(GgmlType::Q8_0, &[&h(2.0)[..], &qs].concat());
        assert_eq!((y[0], y[1], y[2], y[31]), (-256.0, 254.0, 0.0, -2.0));
    }

    #[test]
    fn q2_k() {
        // Sub-block s covers values 16s..16s+16. In each half of 128 values, byte l of the
        // 32 code bytes holds four 2-bit codes at shifts 0, 2, 4, 6, for values l, l+32,
        // l+64, l+96 (l < 32) of that half.
        let mut scales = [0u8; 16];
        scales[0] = 0x21; // scale 1, min 2 → values 0..16
        scales[2] = 0x13; // scale 3, min 1 → values 32..48
        scales[15] = 0xF5; // scale 5, min 15 → values 240..256
        let mut qs = [0u8; 64];
        qs[0] = 0b11_10_01_00;
        qs[32 + 31] = 0b10_00_00_00; // second half, byte 31, shift 6 → value 128 + 96 + 31
        let block = [&scales[..], &qs, &h(1.0), &h(0.5)].concat();
        let y = decode(GgmlType::Q2_K, &block);
        assert_eq!(y[0], -1.0); // 1·0 − 2·0.5
        assert_eq!(y[32], 2.5); // 3·1 − 1·0.5
        assert_eq!(y[255], 2.5); // 5·2 − 15·0.5
        assert_eq!(y[1], -1.0); // code 0 in sub-block 0
    }

    #[test]
    fn q3_k() {
        // Scales: 16 six-bit values stored as low nibbles (bytes 0..8, two per byte) and
        // two high bits each (bytes 8..12, four per byte); the scale is the value − 32.
        let mut packed = [0u8; 12];
        packed[0] = 0x0A | (0x01 << 4); // scale 0 low = 10, scale 8 low = 1
        packed[8] = 0b00_10_00_10; // scale 0 high = 2, scale 8 high = 2 (shift 4)
                                   // scale 0 = (10 | 2<<4) − 32 = 10; scale 8 = (1 | 2<<4) − 32 = 1; others −32.
        let mut hmask = [0u8; 32];
        hmask[0] = 0b0001_0001; // value 0 (bit 0) and value 128 (bit 4) have the third bit set
        let mut qs = [0u8; 64];
        qs[0] = 0b00_00_00_11; // value 0: low code 3
        qs[32] = 0b00_00_00_01; // value 128: low code 1
        let block = [&hmask[..], &qs, &packed, &h(0.5)].concat();
        let y = decode(GgmlType::Q3_K, &block);
        assert_eq!(y[0], 15.0); // 0.5 · 10 · (3 − 0)
        assert_eq!(y[128], 0.5); // 0.5 · 1 · (1 − 0)
        assert_eq!(y[1], -20.0); // 0.5 · 10 · (0 − 4)
        assert_eq!(y[16], 64.0); // sub-block 1, scale −32: 0.5 · −32 · (0 − 4)
    }

    #[test]
    fn q4_k_and_q5_k() {
        // Eight 6-bit (scale, min) pairs: pairs 0..4 in the low 6 bits of bytes 0..4 and
        // 4..8; pairs 4..8 take their low nibbles from bytes 8..12 and their top two bits
        // from the top of bytes 0..4 (scales) and 4..8 (mins).
        let mut sc = [0u8; 12];
        sc[0] = 3; // pair 0 scale 3
        sc[4] = 1; // pair 0 min 1
        sc[8] = 0x25; // pair 4: scale low 5, min low 2
        sc[0] |= 1 << 6; // pair 4 scale high bits 01 → 5 + 16 = 21
        sc[4] |= 2 << 6; // pair 4 min high bits 10 → 2 + 32 = 34
        let mut qs = [0u8; 128];
        qs[0] = 0x9F; // value 0: 15; value 32: 9
        qs[64] = 0x02; // chunk 2 (values 128..192), low nibble → value 128 (pair 4): 2
        let block = [&h(1.0)[..], &h(0.25), &sc, &qs].concat();
        let y = decode(GgmlType::Q4_K, &block);
        assert_eq!(y[0], 44.75); // 1·3·15 − 0.25·1
        assert_eq!(y[128], 33.5); // 1·21·2 − 0.25·34
        assert_eq!(y[32], 0.0); // pair 1 is all zero
                                // Q5_K: same scales, plus a fifth bit: bit 0 of qh[l] for value l, bit 5 of
                                // qh[0] for value 128 + 32 (chunk 2, high nibble).
        let mut qh = [0u8; 32];
        qh[0] = 0b0010_0001;
        let block = [&h(1.0)[..], &h(0.25), &sc, &qh, &qs].concat();
        let y = decode(GgmlType::Q5_K, &block);
        assert_eq!(y[0], 92.75); // 3·(15 + 16) − 0.25
        assert_eq!(y[128], 33.5); // no fifth bit
                                  // value 160 is pair 5: all zero scales/mins except the high bits of byte 1/5 → 0.
        assert_eq!(y[160], 0.0);
    }

    #[test]
    fn q6_k() {
        // Per half of 128 values: ql 64 bytes, qh 32 bytes, 8 scales. For l < 32: value l
        // uses ql[l] low nibble and qh[l] bits 0-1; value l+32 ql[l+32] low, qh bits 2-3;
        // value l+64 ql[l] high, bits 4-5; value l+96 ql[l+32] high, bits 6-7.
        // Scale index for value v of a half is v / 16.
        let mut ql = [0u8; 128];
        let mut qh = [0u8; 64];
        let mut scales = [0u8; 16];
        ql[0] = 0x3F; // value 0 low nibble 15, value 64 low nibble 3
        qh[0] = 0b10_00_00_11; // value 0 high 3 → 63; value 96 high 2
        scales[0] = 2;
        scales[4] = (-3i8) as u8; // values 64..80
        scales[6] = 1; // values 96..112
        ql[64] = 0x01; // second half, value 128: low nibble 1
        scales[8] = 4;
        let block = [&ql[..], &qh, &scales, &h(0.5)].concat();
        let y = decode(GgmlType::Q6_K, &block);
        assert_eq!(y[0], 31.0); // 0.5 · 2 · (63 − 32)
        assert_eq!(y[64], 43.5); // 0.5 · −3 · (3 − 32)
        assert_eq!(y[96], 0.0); // 0.5 · 1 · (32 − 32)
        assert_eq!(y[128], -62.0); // 0.5 · 4 · (1 − 32)
    }

    #[test]
    fn floats() {
        let y = {
            let mut out = [0f32; 2];
            dequantize(GgmlType::BF16, &[0x80, 0x3F, 0x00, 0xC0], &mut out).expect("bf16");
            out
        };
        assert_eq!(y, [1.0, -2.0]);
        let mut out = [0f32; 1];
        dequantize(GgmlType::F16, &h(0.125), &mut out).expect("f16");
        assert_eq!(out, [0.125]);
    }

    #[test]
    fn size_mismatch_and_undecodable_types_are_errors() {
        let mut out = [0f32; 32];
        assert!(dequantize(GgmlType::Q4_0, &[0; 17], &mut out).is_err());
        assert!(dequantize(GgmlType::I32, &[0; 128], &mut out).is_err());
        assert_eq!(GgmlType::from_id(16), Err("IQ2_XXS".to_string()));
        assert_eq!(GgmlType::from_id(99), Err("unknown type id 99".to_string()));
        assert_eq!(GgmlType::Q6_K.bytes_for(512), Some(420));
        assert_eq!(GgmlType::Q6_K.bytes_for(100), None);
    }
}
