//! The vectored writes of a batch.

use super::*;

/// A vectored writer that takes at most 7 octets per call.
struct Trickle(Vec<u8>, usize);

impl Trickle {
    fn take(&mut self, bufs: &[io::IoSlice<'_>]) -> usize {
        self.1 += 1;
        let mut room = 7;
        for b in bufs {
            let n = b.len().min(room);
            self.0.extend_from_slice(&b[..n]);
            room -= n;
        }
        7 - room
    }
}

impl tokio::io::AsyncWrite for Trickle {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(self.take(&[io::IoSlice::new(buf)])))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(self.take(bufs)))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Writes every octet of `bufs` with [`write_vectored_once`], stepping
/// past what each write took as a relay does; how many octets.
async fn write_all(w: &mut Trickle, mut bufs: Vec<Bytes>) -> usize {
    use bytes::Buf;
    bufs.retain(|b| !b.is_empty());
    let mut total = 0;
    while !bufs.is_empty() {
        let mut n = write_vectored_once(w, &bufs).await.unwrap();
        total += n;
        while n > 0 {
            let take = n.min(bufs[0].len());
            bufs[0].advance(take);
            n -= take;
            if bufs[0].is_empty() {
                bufs.remove(0);
            }
        }
    }
    total
}

#[tokio::test]
async fn a_batch_survives_short_vectored_writes_in_order() {
    let bufs: Vec<Bytes> = [&b"abc"[..], b"", b"defghijklmno", b"p", b"qrstuvwxyz0123"]
        .iter()
        .map(|b| Bytes::copy_from_slice(b))
        .collect();
    let mut w = Trickle(Vec::new(), 0);
    let n = write_all(&mut w, bufs).await;
    assert_eq!(n, 30);
    assert_eq!(w.0, b"abcdefghijklmnopqrstuvwxyz0123");
    assert_eq!(
        w.1, 5,
        "each write took as much as it could, across buffers"
    );
}
