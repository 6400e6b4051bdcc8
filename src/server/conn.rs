//! What one client connection may hold: a slot among `max_connections`, a
//! deadline for its request heads (hyper's, set in `mod.rs`), a deadline
//! for a response the client stopped reading, and registry-format answers
//! where hyper would answer a malformed request with a bare status.
//!
//! hyper writes its own answer to a request it cannot parse (400, 414,
//! 431 with an empty body) straight to the connection, so the only place
//! to turn it into a distribution-spec error is the connection's writer:
//! [`Guarded`] recognises such a head and writes pullgate's answer in its
//! place, when it is the first thing written on the connection: then it
//! cannot be a body (a blob's bytes could be made to look like such a
//! head, so nothing later on a connection is ever looked at), and every
//! answer of pullgate's own with these statuses has an error body (a HEAD
//! answer states that body's length), so an empty-bodied one is hyper's.
//! A malformed request later on a kept-alive connection gets hyper's bare
//! answer; clients send the same headers on every request, so the first
//! is the one that fails. Such answers are counted where the connection
//! ends (`mod.rs`). Written here because no crate does it; tests in
//! `tests/hostile.rs` hold it to hyper's behaviour. Depends on `metrics`,
//! `oci`.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::StatusCode;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use crate::metrics::Metrics;
use crate::oci::ApiError;

/// Most request headers read; more is answered 431.
pub const MAX_HEADERS: usize = 256;

/// A connection's IO: sends give up after `send_timeout` without progress,
/// and hyper's bare answers to malformed requests are replaced.
pub struct Guarded<S> {
    inner: S,
    send_timeout: Duration,
    /// Armed while a write waits on the client.
    stall: Option<Pin<Box<Sleep>>>,
    stalled: bool,
    /// pullgate's answer in place of hyper's: the bytes, how many are out,
    /// and how long hyper's head was.
    answer: Option<(Vec<u8>, usize, usize)>,
    /// Something was written: nothing more is looked at.
    wrote: bool,
    metrics: Arc<Metrics>,
}

impl<S> Guarded<S> {
    pub fn new(inner: S, send_timeout: Duration, metrics: Arc<Metrics>) -> Guarded<S> {
        Guarded {
            inner,
            send_timeout,
            stall: None,
            stalled: false,
            answer: None,
            wrote: false,
            metrics,
        }
    }

    /// Passes a write's outcome on, starting the send deadline when it
    /// waits and failing the write once the deadline passed.
    fn deadline<T>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if r.is_ready() {
            self.stalled = false;
            return r;
        }
        let deadline = Instant::now() + self.send_timeout;
        let stall = self
            .stall
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if !self.stalled {
            self.stalled = true;
            stall.as_mut().reset(deadline);
        }
        if stall.as_mut().poll(cx).is_ready() {
            self.metrics
                .connection_timeouts
                .with_label_values(&["send"])
                .inc();
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client stopped reading its response (server.send_timeout)",
            )));
        }
        Poll::Pending
    }
}

impl<S: AsyncWrite + Unpin> Guarded<S> {
    /// Writes the replacement answer; reports hyper's head as written once
    /// all of it is out.
    fn poll_answer(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let Some((bytes, sent, replaces)) = &mut self.answer else {
            return Poll::Ready(Ok(0));
        };
        while *sent < bytes.len() {
            match Pin::new(&mut self.inner).poll_write(cx, &bytes[*sent..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => *sent += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        let n = *replaces;
        self.answer = None;
        Poll::Ready(Ok(n))
    }

    /// Whether `buf`, the first write on the connection, is hyper's own
    /// answer to a malformed request; if so, pullgate's takes its place.
    fn intercept(&mut self, buf: &[u8]) -> bool {
        if !self.wrote {
            self.wrote = true;
            if let Some((_, bytes)) = replacement(buf) {
                self.answer = Some((bytes, 0, buf.len()));
            }
        }
        self.answer.is_some()
    }
}

/// pullgate's answer for hyper's `head`, when `head` is one of hyper's.
pub(crate) fn replacement(head: &[u8]) -> Option<(StatusCode, Vec<u8>)> {
    let (status, message) = match head.get(..13)? {
        b"HTTP/1.1 400 " => (
            StatusCode::BAD_REQUEST,
            "the request is not valid HTTP/1.1 (its request line or a header could not be read)"
                .to_owned(),
        ),
        b"HTTP/1.1 414 " => (
            StatusCode::URI_TOO_LONG,
            "the request path is too long".to_owned(),
        ),
        b"HTTP/1.1 431 " => (
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            format!(
                "the request head is too large: pullgate reads at most {MAX_HEADERS} headers, {} KiB in all",
                crate::pipeline::MAX_HEADER_BYTES / 1024
            ),
        ),
        _ => return None,
    };
    let text = std::str::from_utf8(head).ok()?;
    let (head_text, rest) = text.split_once("\r\n\r\n")?;
    if !rest.is_empty() {
        return None;
    }
    let mut lines = head_text.split("\r\n");
    let status_line = lines.next()?;
    let mut empty = false;
    let mut kept = Vec::new();
    for line in lines {
        let lower = line.to_ascii_lowercase();
        if lower == "content-length: 0" {
            empty = true;
        } else if !lower.starts_with("connection:") {
            kept.push(line);
        }
    }
    if !empty {
        return None;
    }
    let code = if status == StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE {
        "SIZE_INVALID"
    } else {
        "UNSUPPORTED"
    };
    let mut head = format!("{status_line}\r\n");
    for line in kept {
        head.push_str(line);
        head.push_str("\r\n");
    }
    Some((
        status,
        last_answer(head, &ApiError::new(status, code, message)),
    ))
}

/// A connection's last answer, written by hand: `head` (status line and
/// headers, each ending in CRLF), the registry error headers, and the
/// error body; the connection closes after it.
fn last_answer(mut head: String, e: &ApiError) -> Vec<u8> {
    let body = e.body_json();
    head.push_str(&format!(
        "content-type: application/json\r\ndocker-distribution-api-version: registry/2.0\r\nconnection: close\r\ncontent-length: {}\r\n\r\n",
        body.len()
    ));
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(&body);
    bytes
}

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = if this.intercept(buf) {
            this.poll_answer(cx)
        } else {
            Pin::new(&mut this.inner).poll_write(cx, buf)
        };
        this.deadline(cx, r)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let first = bufs.iter().find(|b| !b.is_empty());
        let r = if first.is_some_and(|b| this.intercept(b)) {
            this.poll_answer(cx)
        } else {
            Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
        };
        this.deadline(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_flush(cx);
        this.deadline(cx, r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The answer to a connection over `server.max_connections`.
fn refusal(max: usize) -> Vec<u8> {
    last_answer(
        "HTTP/1.1 503 Service Unavailable\r\nretry-after: 1\r\n".into(),
        &ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "UNAVAILABLE",
            format!("pullgate has its {max} connections open (server.max_connections); try again"),
        ),
    )
}

/// Answers a connection over the limit with a 503 and closes it, reading
/// what the client sent first so that the close does not reset the
/// connection before the client read the answer. Bounded: a second
/// at most.
pub async fn refuse(mut stream: TcpStream, max: usize) {
    let answer = refusal(max);
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(&answer).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 4096];
        loop {
            match tokio::io::AsyncReadExt::read(&mut stream, &mut sink).await {
                Ok(0) | Err(_) => return Ok::<_, io::Error>(()),
                Ok(_) => {}
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hypers_bare_answers_are_replaced_and_pullgates_are_not() {
        let hyper = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: Wed, 02 Dec 2026 15:00:00 GMT\r\n\r\n";
        let (status, bytes) = replacement(hyper).unwrap();
        assert_eq!(status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
        let text = String::from_utf8(bytes).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 431 "), "{head}");
        assert!(head.contains("\r\ndate: Wed, 02 Dec 2026"), "{head}");
        assert!(head.contains("docker-distribution-api-version: registry/2.0"));
        assert!(head.contains(&format!("content-length: {}", body.len())));
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["errors"][0]["code"], "SIZE_INVALID");
        // pullgate's own 400 carries its error body: left alone.
        let ours = b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 60\r\n\r\n";
        assert!(replacement(ours).is_none());
        assert!(replacement(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").is_none());
        assert!(replacement(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\nx").is_none());
    }

    #[test]
    fn the_refusal_is_a_registry_error() {
        let text = String::from_utf8(refusal(8)).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 503 "));
        assert!(head.contains(&format!("content-length: {}", body.len())));
        assert!(body.contains("server.max_connections"), "{body}");
    }
}
