//! Netlink attributes (`struct nlattr`), read from plain bytes.
//!
//! Tolerant by construction: a truncated attribute ends the iteration and is
//! reported as an error item, it never panics.

pub use crate::sys::netlink::align4;
pub use crate::sys::uapi::{NLA_F_NESTED, NLA_HDRLEN};
// Strips the flags (`NLA_F_NESTED | NLA_F_NET_BYTEORDER`) off `nla_type`.
use crate::sys::uapi::NLA_TYPE_MASK;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed netlink attribute at byte {offset}: {what}")]
pub struct AttrError {
    pub offset: usize,
    pub what: &'static str,
}

/// Iterates the attributes of a buffer: `(type, payload)`.
#[derive(Clone, Debug)]
pub struct Attrs<'a> {
    buf: &'a [u8],
    pos: usize,
    failed: bool,
}

impl<'a> Attrs<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self {
            buf,
            pos: 0,
            failed: false,
        }
    }
}

impl<'a> Iterator for Attrs<'a> {
    type Item = Result<(u16, &'a [u8]), AttrError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.pos + NLA_HDRLEN > self.buf.len() {
            if !self.failed && self.pos < self.buf.len() {
                self.failed = true;
                return Some(Err(AttrError {
                    offset: self.pos,
                    what: "trailing bytes shorter than an attribute header",
                }));
            }
            return None;
        }
        let b = &self.buf[self.pos..];
        let len = u16::from_ne_bytes([b[0], b[1]]) as usize;
        let ty = u16::from_ne_bytes([b[2], b[3]]) & NLA_TYPE_MASK;
        if len < NLA_HDRLEN || len > b.len() {
            self.failed = true;
            return Some(Err(AttrError {
                offset: self.pos,
                what: "length beyond the buffer",
            }));
        }
        let payload = &b[NLA_HDRLEN..len];
        self.pos += align4(len).min(b.len());
        Some(Ok((ty, payload)))
    }
}

/// Big-endian integers as nf_tables sends them, and strings.
pub fn be_u32(b: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(..4)?.try_into().ok()?))
}

pub fn be_i32(b: &[u8]) -> Option<i32> {
    be_u32(b).map(|v| v as i32)
}

pub fn be_u64(b: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(..8)?.try_into().ok()?))
}

/// A string attribute's bytes up to its terminating NUL (all of them when
/// it has none).
pub fn until_nul(b: &[u8]) -> &[u8] {
    b.iter().position(|&c| c == 0).map_or(b, |end| &b[..end])
}

/// A NUL-terminated (or not) string attribute.
pub fn string(b: &[u8]) -> String {
    let b = until_nul(b);
    // Names and comments are nearly always valid UTF-8: checked in one pass,
    // copied once; only invalid bytes take the slower lossy path.
    match std::str::from_utf8(b) {
        Ok(s) => s.to_owned(),
        Err(_) => String::from_utf8_lossy(b).into_owned(),
    }
}

/// Appends an attribute to a message being built.
pub fn put(buf: &mut Vec<u8>, ty: u16, payload: &[u8]) {
    let len = NLA_HDRLEN + payload.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(payload);
    buf.resize(align4(buf.len()), 0);
}

/// A string attribute, NUL-terminated as the kernel expects.
pub fn put_str(buf: &mut Vec<u8>, ty: u16, s: &str) {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    put(buf, ty, &v);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_truncation() {
        let mut buf = Vec::new();
        put_str(&mut buf, 1, "nat");
        put(&mut buf, 2, &7u32.to_be_bytes());
        let got: Vec<_> = Attrs::new(&buf).collect::<Result<_, _>>().unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(string(got[0].1), "nat");
        assert_eq!(be_u32(got[1].1), Some(7));
        let cut = &buf[..buf.len() - 2];
        let items: Vec<_> = Attrs::new(cut).collect();
        assert!(items.last().unwrap().is_err(), "{items:?}");
    }
}
