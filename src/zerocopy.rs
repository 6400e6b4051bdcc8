//! Blob bodies sent from the store beside hyper: `sendfile(2)`, or to a
//! client on loopback a copy through a small buffer.
//!
//! hyper owns the socket and writes whatever body frames it is given, so a
//! file range cannot travel through it as such. Instead, a stored blob's body
//! yields placeholder frames that point into one static buffer, and queues
//! the matching file range on its connection. The connection's stream
//! wrapper ([`Stream`]) recognises a placeholder among the buffers hyper
//! writes and, in its place, sends the same number of bytes straight from
//! the file: with `sendfile`, the bytes never enter user space.
//!
//! To a peer on loopback (a node mirror's containerd) it reads the file
//! into a 256 KiB buffer and writes that instead ([`Send::for_peer`]). On
//! loopback the receiver copies every byte out of the socket anyway, and
//! there `sendfile`'s page-by-page socket buffers cost the machine more
//! than one copy through a buffer that stays in the CPU's cache: 15-20%
//! less throughput and 20-25% more CPU per GiB in every trial of
//! BENCHMARKS.md. Remote peers, which this could not be measured against,
//! keep `sendfile`, which spares the copy a network card does not need.
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

/// The copy buffer of a loopback connection, while it sends a file.
const COPY: usize = 256 * 1024;

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

/// How a connection sends file ranges.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Send {
    /// `sendfile(2)`: no copy in user space.
    Sendfile,
    /// `pread` into a buffer, then `write`: cheaper on loopback.
    Copy,
}

impl Send {
    /// [`Send::Copy`] for a loopback peer, else [`Send::Sendfile`].
    pub fn for_peer(ip: std::net::IpAddr) -> Send {
        if ip.to_canonical().is_loopback() {
            Send::Copy
        } else {
            Send::Sendfile
        }
    }
}

/// Bytes read from the head range's file and not yet written.
struct Pending {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

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
    send: Send,
    /// [`Send::Copy`]'s buffer, held only while a body is sent.
    pending: Option<Pending>,
}

impl Stream {
    pub fn new(inner: TcpStream, send: Send) -> (Stream, Queue) {
        let queue = Queue::default();
        (
            Stream {
                inner,
                queue: queue.clone(),
                corked: std::sync::atomic::AtomicBool::new(false),
                send,
                pending: None,
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
    fn poll_file(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<usize>> {
        let queue = self.queue.clone();
        let mut queue = queue.0.lock().expect("zero-copy queue lock");
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
        let sent = match self.send {
            Send::Sendfile => ready!(self.poll_sendfile(cx, region, want)),
            Send::Copy => ready!(self.poll_copy(cx, region, want)),
        };
        match sent {
            Ok(0) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "stored blob is shorter than expected",
            ))),
            Ok(n) => {
                region.offset += n as u64;
                region.len -= n as u64;
                if region.len == 0 {
                    let last = region.last;
                    queue.pop_front();
                    if last {
                        self.pending = None;
                        self.cork(false);
                    }
                }
                Poll::Ready(Ok(n))
            }
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_sendfile(
        &self,
        cx: &mut Context<'_>,
        region: &Region,
        want: usize,
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.inner.poll_write_ready(cx))?;
            let mut offset = region.offset;
            let sent = self.inner.try_io(Interest::WRITABLE, || {
                rustix::fs::sendfile(&self.inner, &*region.file, Some(&mut offset), want)
                    .map_err(io::Error::from)
            });
            match sent {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                sent => return Poll::Ready(sent),
            }
        }
    }

    /// Writes what is pending, reading the next part of the range into the
    /// buffer first when nothing is. The pending bytes always start at
    /// `region.offset`.
    fn poll_copy(
        &mut self,
        cx: &mut Context<'_>,
        region: &Region,
        want: usize,
    ) -> Poll<io::Result<usize>> {
        use std::os::unix::fs::FileExt;
        let pending = self.pending.get_or_insert_with(|| Pending {
            buf: vec![0; want.min(COPY)].into_boxed_slice(),
            start: 0,
            end: 0,
        });
        if pending.start == pending.end {
            let len = want.min(pending.buf.len());
            let read = loop {
                match region.file.read_at(&mut pending.buf[..len], region.offset) {
                    Ok(0) => return Poll::Ready(Ok(0)),
                    Ok(n) => break n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Poll::Ready(Err(e)),
                }
            };
            pending.start = 0;
            pending.end = read;
        }
        loop {
            ready!(self.inner.poll_write_ready(cx))?;
            let bytes = &pending.buf[pending.start..pending.end];
            match self.inner.try_write(bytes) {
                Ok(n) => {
                    pending.start += n;
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
            return self.poll_file(cx, buf.len());
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
            Some(0) => self.poll_file(cx, bufs[0].len()),
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

    #[test]
    fn loopback_peers_get_the_copy_and_others_sendfile() {
        for ip in ["127.0.0.1", "127.0.0.3", "::1", "::ffff:127.0.0.1"] {
            assert_eq!(Send::for_peer(ip.parse().unwrap()), Send::Copy, "{ip}");
        }
        for ip in ["10.0.0.1", "192.0.2.7", "2001:db8::1", "::ffff:10.0.0.1"] {
            assert_eq!(Send::for_peer(ip.parse().unwrap()), Send::Sendfile, "{ip}");
        }
    }

    /// Sends `ranges` of a file of `size` bytes over a real loopback
    /// connection in `send` mode, each as hyper would: queued, then written
    /// as placeholders of at most `FRAME`. What the peer read, or the error.
    async fn send_ranges(
        send: Send,
        size: usize,
        file_len: usize,
        ranges: &[(u64, u64)],
    ) -> (Vec<u8>, io::Result<()>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let content: Vec<u8> = (0..size).map(|i| (i * 7 + i / 4099) as u8).collect();
        let mut tmp = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut tmp, &content[..file_len]).unwrap();
        let file = Arc::new(tmp);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        let (mut client, (server, _)) = (client.unwrap(), accepted.unwrap());
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.map(|_| got)
        });
        let (mut stream, queue) = Stream::new(server, send);
        let result = async {
            for &(start, end) in ranges {
                let mut pos = start;
                while pos < end {
                    let len = ((end - pos) as usize).min(FRAME);
                    queue.0.lock().unwrap().push_back(Region {
                        file: file.clone(),
                        offset: pos,
                        len: len as u64,
                        last: pos + len as u64 >= end,
                    });
                    stream.write_all(&PLACEHOLDER[..len]).await?;
                    pos += len as u64;
                }
                stream.write_all(b"|").await?;
            }
            stream.shutdown().await
        }
        .await;
        drop(stream);
        let got = reader.await.unwrap().unwrap();
        (got, result)
    }

    #[tokio::test]
    async fn both_ways_send_exactly_the_queued_ranges() {
        let size = 2 * FRAME + COPY + 12_345;
        let content: Vec<u8> = (0..size).map(|i| (i * 7 + i / 4099) as u8).collect();
        let ranges = [
            (0, size as u64),
            (5, 6),
            (COPY as u64 - 3, FRAME as u64 + 9),
        ];
        let mut want = Vec::new();
        for &(start, end) in &ranges {
            want.extend_from_slice(&content[start as usize..end as usize]);
            want.push(b'|');
        }
        for send in [Send::Copy, Send::Sendfile] {
            let (got, result) = send_ranges(send, size, size, &ranges).await;
            result.unwrap();
            assert_eq!(got.len(), want.len(), "{send:?}");
            assert!(got == want, "{send:?}: the bytes differ");
        }
    }

    #[tokio::test]
    async fn a_file_shorter_than_its_range_fails_the_connection_both_ways() {
        let size = FRAME + 100;
        for send in [Send::Copy, Send::Sendfile] {
            let (got, result) = send_ranges(send, size, size - 10, &[(0, size as u64)]).await;
            let err = result.expect_err("a short file must not pass as a whole body");
            assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{send:?}: {err}");
            assert!(got.len() <= size - 10, "{send:?}: sent {} bytes", got.len());
        }
    }
}
