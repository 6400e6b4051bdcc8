//! Zero-copy blob bodies: `sendfile(2)` from the store to the client socket.
//!
//! hyper owns the socket and writes whatever body frames it is given, so a
//! file range cannot travel through it as such. Instead, a stored blob's body
//! yields placeholder frames that point into one static buffer, and queues
//! the matching file range on its connection. The connection's stream
//! wrapper ([`Stream`]) recognises a placeholder among the buffers hyper
//! writes and, in its place, sends the same number of bytes straight from
//! the file with `sendfile`: the bytes never enter user space.
//!
//! Invariants: one connection serves one request at a time (HTTP/1.1), so
//! ranges are queued in the order hyper writes their frames; a placeholder
//! and the range at the head of the queue always have the same length left,
//! and any disagreement aborts the connection rather than send wrong bytes.
//! The server wraps connections; the pipeline builds the bodies. Depends on
//! `body`, `metrics`, `store`.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

use crate::body::Body;
use crate::metrics::Metrics;
use crate::store::ReadGuard;

/// Largest frame: one `sendfile` call moves at most this much.
const FRAME: usize = 2 * 1024 * 1024;

/// What placeholder frames point into. Never sent as such.
static PLACEHOLDER: [u8; FRAME] = [0; FRAME];

fn is_placeholder(buf: &[u8]) -> bool {
    let start = PLACEHOLDER.as_ptr() as usize;
    let p = buf.as_ptr() as usize;
    !buf.is_empty() && p >= start && p + buf.len() <= start + FRAME
}

/// A file range waiting to be sent in place of a placeholder frame.
struct Region {
    file: Arc<File>,
    offset: u64,
    len: u64,
    /// The body's last range: the socket is uncorked once it is sent.
    last: bool,
}

/// The ranges queued on one connection.
#[derive(Clone, Default)]
pub struct Queue(Arc<Mutex<VecDeque<Region>>>);

/// A client connection that can send queued file ranges with `sendfile`.
///
/// While a file is sent, the socket is corked (`TCP_CORK`, what nginx's
/// `tcp_nopush` does): the response headers and the file go out in full
/// segments instead of one push per `sendfile` call, which on loopback
/// took a third of the throughput and more CPU per byte (BENCHMARKS.md).
/// The last range of a body uncorks it, so its tail goes out at once.
pub struct Stream {
    inner: TcpStream,
    queue: Queue,
    corked: std::sync::atomic::AtomicBool,
}

impl Stream {
    pub fn new(inner: TcpStream) -> (Stream, Queue) {
        let queue = Queue::default();
        (
            Stream {
                inner,
                queue: queue.clone(),
                corked: std::sync::atomic::AtomicBool::new(false),
            },
            queue,
        )
    }

    /// Corks the socket before a file is sent; best effort (an error only
    /// costs the batching).
    fn cork(&self, on: bool) {
        use std::sync::atomic::Ordering::Relaxed;
        if self.corked.swap(on, Relaxed) != on {
            let _ = rustix::net::sockopt::set_tcp_cork(&self.inner, on);
        }
    }

    /// Sends up to `want` bytes of the range at the head of the queue.
    fn poll_sendfile(&self, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<usize>> {
        let mut queue = self.queue.0.lock().expect("zero-copy queue lock");
        let Some(region) = queue.front_mut() else {
            return Poll::Ready(Err(io::Error::other(
                "zero-copy frame without a queued file range",
            )));
        };
        if region.len != want as u64 {
            return Poll::Ready(Err(io::Error::other(
                "zero-copy frame and file range out of step",
            )));
        }
        loop {
            ready!(self.inner.poll_write_ready(cx))?;
            let mut offset = region.offset;
            let sent = self.inner.try_io(Interest::WRITABLE, || {
                rustix::fs::sendfile(&self.inner, &*region.file, Some(&mut offset), want)
                    .map_err(io::Error::from)
            });
            match sent {
                Ok(0) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "stored blob is shorter than expected",
                    )))
                }
                Ok(n) => {
                    region.offset += n as u64;
                    region.len -= n as u64;
                    if region.len == 0 {
                        let last = region.last;
                        queue.pop_front();
                        if last {
                            self.cork(false);
                        }
                    }
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if is_placeholder(buf) {
            self.cork(true);
            return self.poll_sendfile(cx, buf.len());
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        // Write the ordinary buffers before the first placeholder, or the
        // placeholder itself when it comes first; corked from the headers on.
        let placeholder = bufs.iter().position(|b| is_placeholder(b));
        if placeholder.is_some() {
            self.cork(true);
        }
        match placeholder {
            Some(0) => self.poll_sendfile(cx, bufs[0].len()),
            Some(i) => Pin::new(&mut self.inner).poll_write_vectored(cx, &bufs[..i]),
            None => Pin::new(&mut self.inner).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        // hyper must hand us its buffers as they are (its "queue" strategy);
        // flattening would copy placeholders into its own buffer.
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A body that sends `[start, end)` of a stored blob through `queue`.
pub fn body(
    queue: Queue,
    file: Arc<File>,
    start: u64,
    end: u64,
    guard: ReadGuard,
    metrics: Arc<Metrics>,
) -> Body {
    struct State {
        queue: Queue,
        file: Arc<File>,
        pos: u64,
        end: u64,
        _guard: ReadGuard,
        metrics: Arc<Metrics>,
    }
    let state = State {
        queue,
        file,
        pos: start,
        end,
        _guard: guard,
        metrics,
    };
    let stream = futures_util::stream::unfold(state, |mut s| async move {
        if s.pos >= s.end {
            return None;
        }
        let len = ((s.end - s.pos) as usize).min(FRAME);
        s.queue
            .0
            .lock()
            .expect("zero-copy queue lock")
            .push_back(Region {
                file: s.file.clone(),
                offset: s.pos,
                len: len as u64,
                last: s.pos + len as u64 >= s.end,
            });
        s.pos += len as u64;
        s.metrics.served_from_cache(len as u64);
        let frame: Result<Frame<Bytes>, io::Error> =
            Ok(Frame::data(Bytes::from_static(&PLACEHOLDER[..len])));
        Some((frame, s))
    });
    BodyExt::boxed(StreamBody::new(stream))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_recognised_by_address_only() {
        assert!(is_placeholder(&PLACEHOLDER[..10]));
        assert!(is_placeholder(&PLACEHOLDER[FRAME - 1..]));
        assert!(!is_placeholder(&PLACEHOLDER[..0]));
        let zeros = vec![0u8; 10];
        assert!(!is_placeholder(&zeros), "equal bytes elsewhere are data");
    }
}
