//! The plain encoding that snapshots of live state are written in (the
//! channel's here, the fabric router's in `saps-fabric`): big-endian
//! integers, `0`/`1` flags and option tags, octets and lists after their
//! length, and a checked [`Cursor`] that reads them back, refusing what
//! is short or malformed with the caller's own error ([`CursorError`]).

use bytes::{BufMut, Bytes, BytesMut};
use std::marker::PhantomData;
use std::time::Duration;

/// How a snapshot's error says its input ended early or broke a rule.
pub trait CursorError: Sized {
    fn truncated() -> Self;
    fn malformed(what: &'static str) -> Self;
}

/// `len: u64`, then the octets.
pub fn put_bytes(out: &mut BytesMut, b: &[u8]) {
    out.put_u64(b.len() as u64);
    out.put_slice(b);
}

/// `0`, or `1` then the value.
pub fn put_opt<T>(out: &mut BytesMut, v: Option<T>, put: impl FnOnce(&mut BytesMut, T)) {
    match v {
        Some(v) => {
            out.put_u8(1);
            put(out, v);
        }
        None => out.put_u8(0),
    }
}

/// `count: u32`, then each item.
pub fn put_list<T>(out: &mut BytesMut, items: &[T], mut put: impl FnMut(&mut BytesMut, &T)) {
    out.put_u32(items.len() as u32);
    for item in items {
        put(out, item);
    }
}

/// A duration in nanoseconds, saturated at 584 years.
pub fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// A checked cursor over an encoded snapshot; its errors are `E`'s.
pub struct Cursor<'a, E> {
    buf: &'a [u8],
    error: PhantomData<fn() -> E>,
}

impl<'a, E: CursorError> Cursor<'a, E> {
    pub fn new(buf: &'a [u8]) -> Self {
        Cursor {
            buf,
            error: PhantomData,
        }
    }

    /// What is left unread.
    pub fn rest(&self) -> &'a [u8] {
        self.buf
    }

    /// The next `n` octets, if there are that many.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], E> {
        if self.buf.len() < n {
            return Err(E::truncated());
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], E> {
        let mut a = [0; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    pub fn u8(&mut self) -> Result<u8, E> {
        Ok(self.take(1)?[0])
    }

    pub fn bool(&mut self) -> Result<bool, E> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(E::malformed("a flag neither 0 nor 1")),
        }
    }

    pub fn u32(&mut self) -> Result<u32, E> {
        self.array().map(u32::from_be_bytes)
    }

    pub fn i32(&mut self) -> Result<i32, E> {
        self.array().map(i32::from_be_bytes)
    }

    pub fn u64(&mut self) -> Result<u64, E> {
        self.array().map(u64::from_be_bytes)
    }

    pub fn i64(&mut self) -> Result<i64, E> {
        self.array().map(i64::from_be_bytes)
    }

    pub fn usize(&mut self) -> Result<usize, E> {
        usize::try_from(self.u64()?).map_err(|_| E::malformed("a count past usize"))
    }

    /// `len: u64`, then that many octets (checked before they are copied).
    pub fn bytes(&mut self) -> Result<Bytes, E> {
        let len = self.usize()?;
        self.take(len).map(Bytes::copy_from_slice)
    }

    /// `0`, or `1` then what `get` reads.
    pub fn opt<T>(&mut self, get: impl FnOnce(&mut Self) -> Result<T, E>) -> Result<Option<T>, E> {
        match self.u8()? {
            0 => Ok(None),
            1 => get(self).map(Some),
            _ => Err(E::malformed("an option tag neither 0 nor 1")),
        }
    }

    /// `count: u32`, then each item. Nothing is reserved for the count:
    /// each item read takes input, so a hostile count ends at the input's
    /// end.
    pub fn list<T>(&mut self, mut get: impl FnMut(&mut Self) -> Result<T, E>) -> Result<Vec<T>, E> {
        let mut items = Vec::new();
        for _ in 0..self.u32()? {
            items.push(get(self)?);
        }
        Ok(items)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    enum E {
        Short,
        Bad(&'static str),
    }

    impl CursorError for E {
        fn truncated() -> Self {
            E::Short
        }
        fn malformed(what: &'static str) -> Self {
            E::Bad(what)
        }
    }

    #[test]
    fn what_is_put_reads_back_and_short_or_bad_input_is_refused() {
        let mut out = BytesMut::new();
        put_bytes(&mut out, b"abc");
        put_opt(&mut out, Some(7u32), |o, v| o.put_u32(v));
        put_opt(&mut out, None::<u32>, |o, v| o.put_u32(v));
        put_list(&mut out, &[1u64, 2], |o, v| o.put_u64(*v));
        out.put_i64(-5);
        let mut r = Cursor::<E>::new(&out);
        assert_eq!(r.bytes().unwrap(), Bytes::from_static(b"abc"));
        assert_eq!(r.opt(|r| r.u32()).unwrap(), Some(7));
        assert_eq!(r.opt(|r| r.u32()).unwrap(), None);
        assert_eq!(r.list(|r| r.u64()).unwrap(), vec![1, 2]);
        assert_eq!(r.i64().unwrap(), -5);
        assert!(r.rest().is_empty());
        assert_eq!(r.u8(), Err(E::Short));
        assert_eq!(
            Cursor::<E>::new(&[2]).bool(),
            Err(E::Bad("a flag neither 0 nor 1"))
        );
        assert_eq!(
            Cursor::<E>::new(&[2]).opt(|r| r.u8()),
            Err(E::Bad("an option tag neither 0 nor 1"))
        );
        // A length past the input is refused before anything is copied.
        assert_eq!(
            Cursor::<E>::new(&[0, 0, 0, 0, 0, 0, 1, 0]).bytes(),
            Err(E::Short)
        );
        assert_eq!(
            Cursor::<E>::new(&[0, 0, 0, 9]).list(|r| r.u8()),
            Err(E::Short)
        );
    }
}
