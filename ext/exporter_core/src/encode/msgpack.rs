//! Msgpack writers into a `Vec<u8>` for the encoders' hot path.
//!
//! rmp's writers go through `io::Write` and return `Result`s that cannot
//! fail for a `Vec`; these are infallible and inlined, and write the same
//! (smallest) forms, byte for byte (see the tests).

#[inline(always)]
pub fn uint(buf: &mut Vec<u8>, v: u64) {
    if v < 128 {
        buf.push(v as u8);
    } else if v <= u64::from(u8::MAX) {
        buf.extend_from_slice(&[0xcc, v as u8]);
    } else if v <= u64::from(u16::MAX) {
        let [a, b] = (v as u16).to_be_bytes();
        buf.extend_from_slice(&[0xcd, a, b]);
    } else if v <= u64::from(u32::MAX) {
        let [a, b, c, d] = (v as u32).to_be_bytes();
        buf.extend_from_slice(&[0xce, a, b, c, d]);
    } else {
        buf.push(0xcf);
        buf.extend_from_slice(&v.to_be_bytes());
    }
}

#[inline(always)]
pub fn sint(buf: &mut Vec<u8>, v: i64) {
    if v >= 0 {
        uint(buf, v as u64);
    } else if v >= -32 {
        buf.push(v as u8);
    } else if v >= i64::from(i8::MIN) {
        buf.extend_from_slice(&[0xd0, v as u8]);
    } else if v >= i64::from(i16::MIN) {
        let [a, b] = (v as i16).to_be_bytes();
        buf.extend_from_slice(&[0xd1, a, b]);
    } else if v >= i64::from(i32::MIN) {
        let [a, b, c, d] = (v as i32).to_be_bytes();
        buf.extend_from_slice(&[0xd2, a, b, c, d]);
    } else {
        buf.push(0xd3);
        buf.extend_from_slice(&v.to_be_bytes());
    }
}

#[inline(always)]
pub fn f64(buf: &mut Vec<u8>, v: f64) {
    buf.push(0xcb);
    buf.extend_from_slice(&v.to_be_bytes());
}

#[inline(always)]
pub fn str(buf: &mut Vec<u8>, s: &str) {
    let len = s.len();
    if len < 32 {
        buf.push(0xa0 | len as u8);
    } else if len <= usize::from(u8::MAX) {
        buf.extend_from_slice(&[0xd9, len as u8]);
    } else if len <= usize::from(u16::MAX) {
        let [a, b] = (len as u16).to_be_bytes();
        buf.extend_from_slice(&[0xda, a, b]);
    } else {
        let [a, b, c, d] = (len as u32).to_be_bytes();
        buf.extend_from_slice(&[0xdb, a, b, c, d]);
    }
    buf.extend_from_slice(s.as_bytes());
}

/// How many bytes [`str`] writes for `s`.
pub fn str_len(s: &str) -> usize {
    let header = match s.len() {
        0..=31 => 1,
        32..=0xff => 2,
        0x100..=0xffff => 3,
        _ => 5,
    };
    header + s.len()
}

/// A map header (`len` pairs follow).
#[inline(always)]
pub fn map_len(buf: &mut Vec<u8>, len: usize) {
    container_len(buf, len, 0x80, 0xde);
}

/// An array header (`len` items follow).
#[inline(always)]
pub fn array_len(buf: &mut Vec<u8>, len: usize) {
    container_len(buf, len, 0x90, 0xdc);
}

/// `fix | len` below 16, else the 16-bit marker `m16` (or the 32-bit one
/// after it).
#[inline(always)]
fn container_len(buf: &mut Vec<u8>, len: usize, fix: u8, m16: u8) {
    if len < 16 {
        buf.push(fix | len as u8);
    } else if len <= usize::from(u16::MAX) {
        let [a, b] = (len as u16).to_be_bytes();
        buf.extend_from_slice(&[m16, a, b]);
    } else {
        let [a, b, c, d] = (len as u32).to_be_bytes();
        buf.extend_from_slice(&[m16 + 1, a, b, c, d]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn same<T: Copy + std::fmt::Debug>(
        values: &[T],
        ours: fn(&mut Vec<u8>, T),
        rmp: fn(&mut Vec<u8>, T),
    ) {
        for &v in values {
            let (mut a, mut b) = (Vec::new(), Vec::new());
            ours(&mut a, v);
            rmp(&mut b, v);
            assert_eq!(a, b, "{v:?}");
        }
    }

    #[test]
    fn integers_match_rmp_at_every_boundary() {
        let mut u = vec![0, 1, 127, 128, 255, 256, 65_535, 65_536, u64::MAX];
        u.extend([u64::from(u32::MAX), u64::from(u32::MAX) + 1]);
        same(&u, uint, |b, v| {
            rmp::encode::write_uint(b, v).unwrap();
        });
        let mut s: Vec<i64> = vec![0, 1, 127, 128, 255, 256, 65_535, 65_536, i64::MAX];
        s.extend([-1, -32, -33, -128, -129, -32_768, -32_769, i64::MIN]);
        s.extend([i64::from(i32::MIN), i64::from(i32::MIN) - 1, 4_294_967_296]);
        same(&s, sint, |b, v| {
            rmp::encode::write_sint(b, v).unwrap();
        });
        same(&[0.0, -1.5, f64::MAX, f64::NAN], f64, |b, v| {
            rmp::encode::write_f64(b, v).unwrap();
        });
    }

    #[test]
    fn strings_and_headers_match_rmp_at_every_boundary() {
        for len in [0, 1, 31, 32, 255, 256, 65_535, 65_536] {
            let s = "x".repeat(len);
            let (mut a, mut b) = (Vec::new(), Vec::new());
            str(&mut a, &s);
            rmp::encode::write_str(&mut b, &s).unwrap();
            assert_eq!(a, b, "str of {len}");
            assert_eq!(str_len(&s), a.len(), "str_len of {len}");
        }
        for len in [0, 15, 16, 65_535, 65_536] {
            let (mut a, mut b) = (Vec::new(), Vec::new());
            map_len(&mut a, len);
            rmp::encode::write_map_len(&mut b, len as u32).unwrap();
            assert_eq!(a, b, "map of {len}");
            let (mut a, mut b) = (Vec::new(), Vec::new());
            array_len(&mut a, len);
            rmp::encode::write_array_len(&mut b, len as u32).unwrap();
            assert_eq!(a, b, "array of {len}");
        }
    }
}
