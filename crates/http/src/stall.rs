//! Disconnecting clients that stop reading. A connection whose writes make no progress for the
//! configured time fails with `TimedOut`: hyper then closes it and drops the response, and a
//! download's producing thread, finding its channel closed, ends too.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// A connection whose writes fail once they have been blocked (the client's receive window
/// full) for longer than `limit`; reads are untouched.
pub struct StallLimited<Io> {
    io: Io,
    limit: Duration,
    /// Armed when a write first blocks; cleared by any progress.
    stalled: Option<Pin<Box<Sleep>>>,
}

impl<Io> StallLimited<Io> {
    /// Wraps an accepted connection.
    pub fn new(io: Io, limit: Duration) -> StallLimited<Io> {
        StallLimited { io, limit, stalled: None }
    }

    /// Turns a blocked write into an error once the client has been stalled for `limit`.
    fn blocked<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let limit = self.limit;
        let timer = self.stalled.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => {
                tracing::info!(seconds = limit.as_secs(), "client stopped reading; disconnecting");
                Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "client stopped reading")))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn progressed(&mut self, result: io::Result<usize>) -> Poll<io::Result<usize>> {
        if result.as_ref().is_ok_and(|written| *written > 0) {
            self.stalled = None;
        }
        Poll::Ready(result)
    }
}

impl<Io: AsyncRead + Unpin> AsyncRead for StallLimited<Io> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<Io: AsyncWrite + Unpin> AsyncWrite for StallLimited<Io> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.io).poll_write(cx, buf) {
            Poll::Ready(result) => self.progressed(result),
            Poll::Pending => self.blocked(cx),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.io).poll_write_vectored(cx, bufs) {
            Poll::Ready(result) => self.progressed(result),
            Poll::Pending => self.blocked(cx),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    // Flushing moves no bytes of its own (a TCP flush is always ready), so only writes count
    // as progress.
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.io).poll_flush(cx) {
            Poll::Ready(result) => Poll::Ready(result),
            Poll::Pending => self.blocked(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.io).poll_shutdown(cx) {
            Poll::Ready(result) => Poll::Ready(result),
            Poll::Pending => self.blocked(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A peer that reads nothing: writes block once the pipe is full, then fail after the limit;
    /// a peer that keeps reading is never cut off, however long the transfer takes.
    #[tokio::test(start_paused = true)]
    async fn a_write_blocked_past_the_limit_fails_and_progress_resets_the_clock() {
        let (near, _far) = tokio::io::duplex(1024);
        let mut guarded = StallLimited { io: near, limit: Duration::from_secs(60), stalled: None };
        let started = tokio::time::Instant::now();
        let error = guarded.write_all(&[0u8; 4096]).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= Duration::from_secs(60));

        let (near, mut far_reader) = tokio::io::duplex(1024);
        let mut guarded = StallLimited { io: near, limit: Duration::from_secs(60), stalled: None };
        let reader = tokio::spawn(async move {
            let mut total = 0;
            let mut chunk = [0u8; 512];
            // Slow but steady: 512 bytes every 50 s, each wait under the limit.
            loop {
                tokio::time::sleep(Duration::from_secs(50)).await;
                match far_reader.read(&mut chunk).await.unwrap() {
                    0 => return total,
                    read => total += read,
                }
            }
        });
        guarded.write_all(&[0u8; 8192]).await.expect("a slow reader is not a stalled one");
        guarded.shutdown().await.unwrap();
        drop(guarded);
        assert_eq!(reader.await.unwrap(), 8192);
    }
}
