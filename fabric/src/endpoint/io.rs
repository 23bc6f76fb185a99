//! The socket adapter of a relay: a socket shared behind an `Arc` (its
//! owner keeps setting options on it), read and written through tokio's
//! readiness, and the vectored write of a batch of Data payloads.

use crate::channel::Reservation;
use crate::splice::ReadySocket;
use bytes::BufMut;
use bytes::Bytes;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, Interest, ReadBuf};

/// Reads from `rd` straight into the payload room of `r`, a Data frame in
/// the channel's output buffer, whose spare room is not initialised
/// (zeroing up to 256 KiB per read would cost more than the read).
pub(super) fn poll_read_into<R: AsyncRead + Unpin>(
    rd: &mut R,
    cx: &mut Context<'_>,
    r: &mut Reservation,
) -> Poll<io::Result<()>> {
    let mut dst = r.payload_mut();
    let (n, read) = {
        // SAFETY: `ReadBuf` only writes into the slice and reports as
        // filled what it wrote; nothing reads the uninitialised rest.
        let mut rb = ReadBuf::uninit(unsafe { dst.chunk_mut().as_uninit_slice_mut() });
        let read = Pin::new(rd).poll_read(cx, &mut rb);
        (rb.filled().len(), read)
    };
    // SAFETY: the reader initialised the first `n` octets of the chunk.
    unsafe { dst.advance_mut(n) };
    read
}

/// A socket shared behind an `Arc`, read and written through its
/// readiness (tokio implements the I/O traits only for an owned stream).
pub(super) struct SocketAdapter<T>(pub(super) Arc<T>);

impl<T: ReadySocket> AsyncRead for SocketAdapter<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        // Each WouldBlock clears the readiness, so the next poll parks.
        loop {
            ready!(self.0.poll_read_ready(cx))?;
            let want = buf.remaining();
            let mut got = 0;
            // A short read drained the socket (epoll): report WouldBlock to
            // `try_io` so it clears the readiness now, as tokio's own
            // poll_read does, instead of paying a recv that fails next time.
            let r = self.0.try_io(Interest::READABLE, || {
                // Into the unfilled part as it is: the relay reads straight
                // into the channel's output buffer, whose spare room is not
                // initialised, and zeroing 64 KiB per read cost more than
                // the read. SAFETY: recv only writes to the slice.
                got = socket2::SockRef::from(&*self.0).recv(unsafe { buf.unfilled_mut() })?;
                if got > 0 && got < want {
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                Ok(())
            });
            match r {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && got == 0 => {}
                Err(e) if e.kind() != io::ErrorKind::WouldBlock => return Poll::Ready(Err(e)),
                _ => {
                    // SAFETY: recv wrote (initialised) the first `got` octets.
                    unsafe { buf.assume_init(got) };
                    buf.advance(got);
                    return Poll::Ready(Ok(()));
                }
            }
        }
    }
}

impl<T: ReadySocket> SocketAdapter<T> {
    /// Runs `write` once the socket is writable, until it does not block.
    pub(super) fn poll_write_with(
        &self,
        cx: &mut Context<'_>,
        mut write: impl FnMut(&T) -> io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.0.poll_write_ready(cx))?;
            match write(&self.0) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                r => return Poll::Ready(r),
            }
        }
    }
}

impl<T: ReadySocket> AsyncWrite for SocketAdapter<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_with(cx, |s| s.try_write(buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_with(cx, |s| s.try_write_vectored(bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(socket2::SockRef::from(&*self.0).shutdown(std::net::Shutdown::Write))
    }
}

/// At most this many Data frames go into one vectored write (`IOV_MAX`
/// is far larger; this bounds what one write holds back from the credit).
pub(super) const MAX_BATCH: usize = 16;

/// One write of the first octets of `bufs`, vectored where the stream
/// allows: how many it took (at least one). Dropped before it returns, it
/// wrote nothing.
pub(super) async fn write_vectored_once<W: AsyncWrite + Unpin>(
    wr: &mut W,
    bufs: &[Bytes],
) -> io::Result<usize> {
    let n = if bufs.len() == 1 || !wr.is_write_vectored() {
        wr.write(&bufs[0]).await?
    } else {
        let slices: Vec<io::IoSlice<'_>> = bufs.iter().map(|b| io::IoSlice::new(b)).collect();
        wr.write_vectored(&slices).await?
    };
    if n == 0 {
        return Err(io::ErrorKind::WriteZero.into());
    }
    Ok(n)
}

#[cfg(test)]
mod tests;
