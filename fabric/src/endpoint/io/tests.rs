//! The vectored write of a batch.

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

#[tokio::test]
async fn a_batch_survives_short_vectored_writes_in_order() {
    let bufs: Vec<Bytes> = [&b"abc"[..], b"", b"defghijklmno", b"p", b"qrstuvwxyz0123"]
        .iter()
        .map(|b| Bytes::copy_from_slice(b))
        .collect();
    let mut w = Trickle(Vec::new(), 0);
    let n = write_all_vectored(&mut w, &bufs).await.unwrap();
    assert_eq!(n, 30);
    assert_eq!(w.0, b"abcdefghijklmnopqrstuvwxyz0123");
    assert_eq!(
        w.1, 5,
        "each write took as much as it could, across buffers"
    );
}
