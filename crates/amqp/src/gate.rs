//! A socket whose writes can be held back until a moment: how the bus port delays its answer
//! to a throttled login (`keel_core::throttle`). fe2o3 asks `KeelSasl::on_init` for the SASL
//! outcome synchronously and writes it at once; `on_init` closes the gate instead of sleeping
//! (which would block a runtime thread), so the outcome reaches the peer only when the delay
//! is over. After that the gate stays open: one atomic load per write.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// When the writes of one connection may go on.
#[derive(Debug, Default)]
pub struct Gate {
    closed: AtomicBool,
    until: Mutex<Option<Instant>>,
}

impl Gate {
    /// Holds every write back until `until` (a later call keeps the later moment).
    pub fn close_until(&self, until: Instant) {
        let mut u = self.until.lock().expect("gate lock");
        *u = Some(u.map_or(until, |old| old.max(until)));
        self.closed.store(true, Ordering::Release);
    }

    fn until(&self) -> Option<Instant> {
        if !self.closed.load(Ordering::Acquire) {
            return None;
        }
        *self.until.lock().expect("gate lock")
    }

    fn open(&self) {
        *self.until.lock().expect("gate lock") = None;
        self.closed.store(false, Ordering::Release);
    }
}

/// `inner` with its writes held back while its gate is closed.
#[derive(Debug)]
pub struct Gated<S> {
    inner: S,
    gate: Arc<Gate>,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl<S> Gated<S> {
    pub fn new(inner: S, gate: Arc<Gate>) -> Gated<S> {
        Gated {
            inner,
            gate,
            sleep: None,
        }
    }

    /// Ready once the gate is open (or its moment has passed).
    fn poll_gate(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(until) = self.gate.until() else {
            return Poll::Ready(());
        };
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(until)));
        if sleep.deadline() != until {
            sleep.as_mut().reset(until);
        }
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => {
                self.sleep = None;
                self.gate.open();
                Poll::Ready(())
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

use std::future::Future;

impl<S: AsyncRead + Unpin> AsyncRead for Gated<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Gated<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.poll_gate(cx).is_pending() {
            return Poll::Pending;
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        if self.poll_gate(cx).is_pending() {
            return Poll::Pending;
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if self.poll_gate(cx).is_pending() {
            return Poll::Pending;
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if self.poll_gate(cx).is_pending() {
            return Poll::Pending;
        }
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn writes_wait_for_the_gate_and_then_flow() {
        let (a, mut b) = tokio::io::duplex(64);
        let gate = Arc::new(Gate::default());
        let mut gated = Gated::new(a, gate.clone());
        gated.write_all(b"open").await.unwrap();
        let start = Instant::now();
        gate.close_until(start + Duration::from_millis(500));
        gated.write_all(b"late").await.unwrap();
        assert!(start.elapsed() >= Duration::from_millis(500));
        let mut got = [0u8; 8];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"openlate");
        // Open again: no further wait.
        let t = Instant::now();
        gated.write_all(b"x").await.unwrap();
        assert_eq!(t.elapsed(), Duration::ZERO);
    }
}
