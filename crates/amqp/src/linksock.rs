//! What an ME-to-ME link connection is handed to the link handler as: plain TCP (from a
//! loopback peer only, `keel_core::plaintext`), or TLS with the bytes already read to tell a
//! link from AMQP put back in front (TLS cannot be peeked), and the Keel process the peer's
//! certificate names (mutual TLS: the cell's CA verified the chain during the handshake).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// A stream whose first bytes were read already: they are read again first.
#[derive(Debug)]
pub struct Prefixed<S> {
    head: Vec<u8>,
    at: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    pub fn new(head: Vec<u8>, inner: S) -> Prefixed<S> {
        Prefixed { head, at: 0, inner }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.at < self.head.len() {
            let n = (self.head.len() - self.at).min(buf.remaining());
            let at = self.at;
            buf.put_slice(&self.head[at..at + n]);
            self.at += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// A link connection's byte stream.
pub enum LinkSocket {
    Plain(TcpStream),
    Tls(Box<Prefixed<tokio_rustls::server::TlsStream<TcpStream>>>),
}

impl LinkSocket {
    /// The TCP socket underneath (for keepalive and user timeout).
    pub fn tcp(&self) -> &TcpStream {
        match self {
            LinkSocket::Plain(s) => s,
            LinkSocket::Tls(s) => s.get_ref().get_ref().0,
        }
    }

    /// The Keel process (node, process) the peer's client certificate names; None over
    /// plain TCP or when the peer showed no certificate.
    pub fn peer_process(&self) -> Option<(String, String)> {
        match self {
            LinkSocket::Plain(_) => None,
            LinkSocket::Tls(s) => {
                keel_tls::peer_process(s.get_ref().get_ref().1.peer_certificates())
            }
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, LinkSocket::Tls(_))
    }
}

impl AsyncRead for LinkSocket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            LinkSocket::Plain(s) => Pin::new(s).poll_read(cx, buf),
            LinkSocket::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for LinkSocket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            LinkSocket::Plain(s) => Pin::new(s).poll_write(cx, buf),
            LinkSocket::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            LinkSocket::Plain(s) => Pin::new(s).poll_flush(cx),
            LinkSocket::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            LinkSocket::Plain(s) => Pin::new(s).poll_shutdown(cx),
            LinkSocket::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn the_prefix_is_read_first_then_the_stream() {
        let (a, mut b) = tokio::io::duplex(64);
        b.write_all(b"-rest").await.unwrap();
        drop(b);
        let mut p = Prefixed::new(b"KEEL".to_vec(), a);
        let mut got = String::new();
        p.read_to_string(&mut got).await.unwrap();
        assert_eq!(got, "KEEL-rest");
    }
}
