//! The one NBD codec: a cursor over received bytes and an encode/read pair
//! per wire type (rustls's `msgs/codec.rs` is the model). Every NBD byte the
//! project writes or parses goes through here, so the magics and layouts
//! live in exactly one place.
//!
//! Readers never panic and never allocate from a length they have not
//! checked against the bytes actually present: a short or malformed input
//! is `None`.

/// A cursor over a received message.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
    offs: usize,
}

impl<'a> Reader<'a> {
    #[inline]
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, offs: 0 }
    }

    /// The next `n` bytes, or None (consuming nothing) if fewer are left.
    #[inline]
    pub fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.left() < n {
            return None;
        }
        let b = &self.buf[self.offs..self.offs + n];
        self.offs += n;
        Some(b)
    }

    /// The next `N` bytes as an array.
    #[inline]
    pub fn take_array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N).map(|b| b.try_into().expect("length checked"))
    }

    /// Everything left.
    pub fn rest(&mut self) -> &'a [u8] {
        let b = &self.buf[self.offs..];
        self.offs = self.buf.len();
        b
    }

    #[inline]
    pub fn left(&self) -> usize {
        self.buf.len() - self.offs
    }

    pub fn any_left(&self) -> bool {
        self.left() > 0
    }

    /// Some(()) when the message was consumed exactly.
    pub fn finish(&self) -> Option<()> {
        (!self.any_left()).then_some(())
    }
}

/// Where encoders write: a `Vec`, or a fixed header buffer on the hot path.
pub trait Sink {
    fn put(&mut self, bytes: &[u8]);
}

impl Sink for Vec<u8> {
    #[inline]
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

/// One wire type: how it is written and read.
pub trait Codec: Sized {
    fn encode<S: Sink>(&self, out: &mut S);
    fn read(r: &mut Reader<'_>) -> Option<Self>;

    /// The encoding as a new vector.
    fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.encode(&mut v);
        v
    }

    /// Reads a whole message: None if it is short or has bytes left over.
    fn from_bytes(b: &[u8]) -> Option<Self> {
        let mut r = Reader::new(b);
        let v = Self::read(&mut r)?;
        r.finish().map(|()| v)
    }
}

macro_rules! big_endian {
    ($($t:ty),*) => {$(
        impl Codec for $t {
            #[inline]
            fn encode<S: Sink>(&self, out: &mut S) {
                out.put(&self.to_be_bytes());
            }
            #[inline]
            fn read(r: &mut Reader<'_>) -> Option<Self> {
                r.take_array().map(<$t>::from_be_bytes)
            }
        }
    )*};
}
big_endian!(u16, u32, u64);

/// A string with a u32 length in front (export names, meta contexts).
/// Longer than `max` or not UTF-8 reads as None.
pub fn read_string(r: &mut Reader<'_>, max: usize) -> Option<String> {
    let len = u32::read(r)? as usize;
    if len > max {
        return None;
    }
    std::str::from_utf8(r.take(len)?).ok().map(str::to_owned)
}

pub fn put_string<S: Sink>(out: &mut S, s: &str) {
    (s.len() as u32).encode(out);
    out.put(s.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn take_is_all_or_nothing() {
        let mut r = Reader::new(&[1, 2, 3]);
        assert_eq!(r.take(4), None);
        assert_eq!(r.take(2), Some(&[1, 2][..]));
        assert_eq!(r.left(), 1);
        assert_eq!(r.finish(), None);
        assert_eq!(r.rest(), &[3]);
        assert_eq!(r.finish(), Some(()));
        assert_eq!(r.take(0), Some(&[][..]));
    }

    #[test]
    fn integers_are_big_endian() {
        assert_eq!(0x0102u16.to_bytes(), [1, 2]);
        assert_eq!(0x0102_0304u32.to_bytes(), [1, 2, 3, 4]);
        assert_eq!(u64::from_bytes(&[0, 0, 0, 0, 0, 0, 1, 0]), Some(256));
        assert_eq!(u32::from_bytes(&[0, 0, 0]), None);
        assert_eq!(u16::from_bytes(&[0, 0, 0]), None, "left over");
    }

    #[test]
    fn strings_check_length_limit_and_utf8() {
        let mut v = Vec::new();
        put_string(&mut v, "disk");
        assert_eq!(v, [0, 0, 0, 4, b'd', b'i', b's', b'k']);
        assert_eq!(
            read_string(&mut Reader::new(&v), 4).as_deref(),
            Some("disk")
        );
        assert_eq!(read_string(&mut Reader::new(&v), 3), None, "over the limit");
        assert_eq!(read_string(&mut Reader::new(&v[..6]), 9), None, "short");
        assert_eq!(
            read_string(&mut Reader::new(&[0, 0, 0, 1, 0xff]), 9),
            None,
            "not utf-8"
        );
        // A huge claimed length is refused without allocating.
        assert_eq!(
            read_string(&mut Reader::new(&[0xff, 0xff, 0xff, 0xff]), usize::MAX),
            None
        );
    }
}
