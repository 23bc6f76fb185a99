//! `struct sockaddr_in`/`sockaddr_in6` in the target's memory, with the
//! kernel's checks and copy-out semantics (DESIGN.md "Virtual TCP sockets":
//! `connect`/`bind` read an address, `accept`/`getsockname`/`getpeername`
//! write one).
//!
//! Decoding is family-agnostic: whether an address family fits the socket
//! (an IPv4 address on an IPv6 socket, `AF_UNSPEC` for `bind`) is the
//! supervisor's decision.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use crate::memory::TargetMemory;

/// `sizeof(struct sockaddr_in)`.
pub const SOCKADDR_IN_LEN: usize = 16;
/// `sizeof(struct sockaddr_in6)`.
pub const SOCKADDR_IN6_LEN: usize = 28;
/// `SIN6_LEN_RFC2133`: the kernel accepts a sockaddr_in6 without `sin6_scope_id`.
pub const SOCKADDR_IN6_MIN_LEN: usize = 24;
/// `sizeof(struct sockaddr_storage)`: longer lengths are `EINVAL`.
pub const SOCKADDR_STORAGE_LEN: usize = 128;

/// A decoded address argument.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decoded {
    /// An IPv4 or IPv6 address.
    Inet(SocketAddr),
    /// `AF_UNSPEC`: for `connect`, dissolve the association. `any`: the
    /// port when it is laid out as a whole `sockaddr_in` with
    /// `INADDR_ANY`, which `bind` on an IPv4 socket takes as `AF_INET`
    /// (the kernel's compatibility rule in `__inet_bind`).
    Unspec { any: Option<u16> },
}

/// Decodes a sockaddr; errors are errnos (`EINVAL` for short lengths,
/// `EAFNOSUPPORT` for other families), as `connect(2)` reports them.
pub fn decode(bytes: &[u8]) -> Result<Decoded, i32> {
    let family = match bytes {
        [a, b, ..] => i32::from(u16::from_ne_bytes([*a, *b])),
        _ => return Err(libc::EINVAL),
    };
    let port = |b: &[u8]| u16::from_be_bytes([b[2], b[3]]);
    match family {
        libc::AF_UNSPEC => {
            let any =
                (bytes.len() >= SOCKADDR_IN_LEN && bytes[4..8] == [0; 4]).then(|| port(bytes));
            Ok(Decoded::Unspec { any })
        }
        libc::AF_INET if bytes.len() >= SOCKADDR_IN_LEN => {
            let ip = Ipv4Addr::new(bytes[4], bytes[5], bytes[6], bytes[7]);
            Ok(Decoded::Inet(SocketAddrV4::new(ip, port(bytes)).into()))
        }
        libc::AF_INET6 if bytes.len() >= SOCKADDR_IN6_MIN_LEN => {
            let flowinfo = u32::from_be_bytes(bytes[4..8].try_into().unwrap_or_default());
            let ip: [u8; 16] = bytes[8..24].try_into().unwrap_or_default();
            let scope_id = bytes
                .get(24..28)
                .map_or(0, |s| u32::from_ne_bytes(s.try_into().unwrap_or_default()));
            Ok(Decoded::Inet(
                SocketAddrV6::new(Ipv6Addr::from(ip), port(bytes), flowinfo, scope_id).into(),
            ))
        }
        libc::AF_INET | libc::AF_INET6 => Err(libc::EINVAL),
        _ => Err(libc::EAFNOSUPPORT),
    }
}

/// Encodes an address as the kernel lays out `sockaddr_in`/`sockaddr_in6`.
pub fn encode(addr: &SocketAddr) -> Vec<u8> {
    let mut out = Vec::with_capacity(SOCKADDR_IN6_LEN);
    let family = |out: &mut Vec<u8>, f: i32| out.extend_from_slice(&(f as u16).to_ne_bytes());
    match addr {
        SocketAddr::V4(a) => {
            family(&mut out, libc::AF_INET);
            out.extend_from_slice(&a.port().to_be_bytes());
            out.extend_from_slice(&a.ip().octets());
            out.resize(SOCKADDR_IN_LEN, 0);
        }
        SocketAddr::V6(a) => {
            family(&mut out, libc::AF_INET6);
            out.extend_from_slice(&a.port().to_be_bytes());
            out.extend_from_slice(&a.flowinfo().to_be_bytes());
            out.extend_from_slice(&a.ip().octets());
            out.extend_from_slice(&a.scope_id().to_ne_bytes());
        }
    }
    out
}

/// Reads and decodes the `(addr, addrlen)` arguments of `connect`/`bind`
/// like the kernel's `move_addr_to_kernel`: a length above
/// `sizeof(sockaddr_storage)` or negative is `EINVAL`, an unreadable buffer
/// `EFAULT`.
pub fn read_from_target(mem: &TargetMemory, addr_ptr: u64, addrlen: u64) -> Result<Decoded, i32> {
    let len = addrlen as u32 as i32;
    let len = usize::try_from(len).map_err(|_| libc::EINVAL)?;
    if len > SOCKADDR_STORAGE_LEN {
        return Err(libc::EINVAL);
    }
    let bytes = mem.read(addr_ptr, len).map_err(|_| libc::EFAULT)?;
    decode(&bytes)
}

/// Copies `addr` out to the `(addr_ptr, len_ptr)` result arguments with the
/// kernel's `move_addr_to_user` semantics: read the caller's buffer length,
/// write `min(len, actual)` bytes (truncating silently), store the actual
/// length; returns the caller's buffer length. Errors are errnos: `EINVAL`
/// for a negative length, `EFAULT`.
/// (`accept` with a NULL `addr` skips this entirely; that is the caller's
/// check.)
pub fn write_to_target(
    mem: &TargetMemory,
    addr_ptr: u64,
    len_ptr: u64,
    addr: &SocketAddr,
) -> Result<u32, i32> {
    let bytes = encode(addr);
    let len_in = mem.read_u32(len_ptr).map_err(|_| libc::EFAULT)?;
    let len = usize::try_from(len_in as i32)
        .map_err(|_| libc::EINVAL)?
        .min(bytes.len());
    let full = (bytes.len() as u32).to_ne_bytes();
    mem.write_parts(&[(addr_ptr, &bytes[..len]), (len_ptr, &full)])
        .map_err(|_| libc::EFAULT)?;
    Ok(len_in)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v6() -> SocketAddr {
        SocketAddrV6::new("fe80::1".parse().unwrap(), 8080, 0x12345, 3).into()
    }

    #[test]
    fn encode_decode_round_trip() {
        for addr in ["192.0.2.7:80".parse().unwrap(), v6()] {
            assert_eq!(decode(&encode(&addr)), Ok(Decoded::Inet(addr)));
        }
        assert_eq!(encode(&"1.2.3.4:5".parse().unwrap()).len(), SOCKADDR_IN_LEN);
        assert_eq!(encode(&v6()).len(), SOCKADDR_IN6_LEN);
    }

    #[test]
    fn encoding_matches_the_kernel_layout() {
        let b = encode(&"1.2.3.4:258".parse().unwrap());
        assert_eq!(&b[..8], &[libc::AF_INET as u8, 0, 1, 2, 1, 2, 3, 4]);
        assert!(b[8..].iter().all(|&x| x == 0));
    }

    #[test]
    fn short_foreign_and_unspec_addresses() {
        let v4 = encode(&"1.2.3.4:5".parse().unwrap());
        assert_eq!(decode(&v4[..15]), Err(libc::EINVAL));
        assert_eq!(decode(&v4[..1]), Err(libc::EINVAL));
        assert_eq!(decode(&[]), Err(libc::EINVAL));
        let six = encode(&v6());
        assert_eq!(decode(&six[..23]), Err(libc::EINVAL));
        // RFC 2133 length: no scope id, which then reads as 0.
        let SocketAddr::V6(short) = v6() else {
            unreachable!()
        };
        let expect = SocketAddrV6::new(*short.ip(), short.port(), short.flowinfo(), 0);
        assert_eq!(decode(&six[..24]), Ok(Decoded::Inet(expect.into())));
        let unix = (libc::AF_UNIX as u16).to_ne_bytes();
        assert_eq!(
            decode(&[unix[0], unix[1], b'/', 0]),
            Err(libc::EAFNOSUPPORT)
        );
        assert_eq!(decode(&[0, 0]), Ok(Decoded::Unspec { any: None }));
        let mut any = encode(&"0.0.0.0:8080".parse().unwrap());
        any[..2].copy_from_slice(&(libc::AF_UNSPEC as u16).to_ne_bytes());
        assert_eq!(decode(&any), Ok(Decoded::Unspec { any: Some(8080) }));
        any[4] = 10;
        assert_eq!(decode(&any), Ok(Decoded::Unspec { any: None }));
    }

    #[test]
    fn write_to_target_truncates_and_reports_actual_length() {
        let mem = TargetMemory::new(std::process::id());
        let mut buf = [0xaau8; 32];
        let mut len: u32 = 8;
        let (bp, lp) = (buf.as_mut_ptr() as u64, &mut len as *mut u32 as u64);
        write_to_target(&mem, bp, lp, &v6()).unwrap();
        let (buf, len) = std::hint::black_box((buf, len));
        assert_eq!(len as usize, SOCKADDR_IN6_LEN);
        assert_eq!(&buf[..8], &encode(&v6())[..8]);
        assert!(
            buf[8..].iter().all(|&x| x == 0xaa),
            "nothing past the caller's length"
        );

        let mut neg: i32 = -1;
        let np = &mut neg as *mut i32 as u64;
        assert_eq!(write_to_target(&mem, bp, np, &v6()), Err(libc::EINVAL));
        assert_eq!(write_to_target(&mem, bp, 0, &v6()), Err(libc::EFAULT));
    }

    #[test]
    fn read_from_target_checks_length_and_pointer() {
        let mem = TargetMemory::new(std::process::id());
        let bytes = encode(&"10.0.0.1:443".parse().unwrap());
        let p = bytes.as_ptr() as u64;
        assert_eq!(
            read_from_target(&mem, p, 16),
            Ok(Decoded::Inet("10.0.0.1:443".parse().unwrap()))
        );
        assert_eq!(read_from_target(&mem, p, 129), Err(libc::EINVAL));
        assert_eq!(
            read_from_target(&mem, p, u64::from(u32::MAX)),
            Err(libc::EINVAL)
        );
        assert_eq!(read_from_target(&mem, 1, 16), Err(libc::EFAULT));
    }
}
