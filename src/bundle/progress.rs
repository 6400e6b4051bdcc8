//! Progress of a long export or import on a terminal (stderr): images,
//! bytes and rate on one line, redrawn at most four times a second. Quiet
//! when stderr is not a terminal (CI, cron, a pipe).

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

pub struct Progress {
    on: bool,
    verb: &'static str,
    total: u64,
    done: u64,
    items: (usize, usize),
    started: Instant,
    drawn: Option<Instant>,
}

impl Progress {
    pub fn new(verb: &'static str, items: usize, total: u64) -> Progress {
        Progress {
            on: std::io::stderr().is_terminal(),
            verb,
            total,
            done: 0,
            items: (0, items),
            started: Instant::now(),
            drawn: None,
        }
    }

    /// `n` more bytes.
    pub fn bytes(&mut self, n: u64) {
        self.done += n;
        self.draw(false);
    }

    /// One more item (blob) done.
    pub fn item(&mut self) {
        self.items.0 += 1;
        self.draw(false);
    }

    fn draw(&mut self, last: bool) {
        if !self.on {
            return;
        }
        let now = Instant::now();
        if !last
            && self
                .drawn
                .is_some_and(|t| now - t < Duration::from_millis(250))
        {
            return;
        }
        self.drawn = Some(now);
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        let rate = (self.done as f64 / secs) as u64;
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r{}: {}/{} blobs, {} of {}, {}/s   ",
            self.verb,
            self.items.0,
            self.items.1,
            bytesize::ByteSize(self.done),
            bytesize::ByteSize(self.total),
            bytesize::ByteSize(rate),
        );
        if last {
            let _ = writeln!(err);
        }
        let _ = err.flush();
    }

    /// The last line.
    pub fn finish(&mut self) {
        self.draw(true);
    }
}
