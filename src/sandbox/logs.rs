//! Sandbox output: raw chunks split into lines per stream, and a per-job cap
//! that passes lines through until a byte budget is spent, then keeps only
//! the tail and counts what it dropped. Cuts happen on UTF-8 boundaries.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogStream {
    Stdout,
    Stderr,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    pub stream: LogStream,
    pub text: String,
}

/// Longest line kept whole; longer ones are cut (on a char boundary).
pub const MAX_LINE: usize = 8 * 1024;

/// The largest prefix of `s` no longer than `max` bytes that ends on a
/// character boundary.
pub fn cut_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Splits byte chunks into lines, one partial line kept per stream.
#[derive(Debug, Default)]
pub struct LineSplitter {
    partial: [Vec<u8>; 2],
}

impl LineSplitter {
    pub fn feed(&mut self, stream: LogStream, bytes: &[u8], out: &mut Vec<LogLine>) {
        let buf = &mut self.partial[stream as usize];
        for &b in bytes {
            if b == b'\n' {
                out.push(line(stream, buf));
                buf.clear();
            } else {
                buf.push(b);
                if buf.len() >= MAX_LINE {
                    out.push(line(stream, buf));
                    buf.clear();
                }
            }
        }
    }

    /// The unterminated rest of each stream.
    pub fn finish(&mut self, out: &mut Vec<LogLine>) {
        for stream in [LogStream::Stdout, LogStream::Stderr] {
            let buf = &mut self.partial[stream as usize];
            if !buf.is_empty() {
                out.push(line(stream, buf));
                buf.clear();
            }
        }
    }
}

fn line(stream: LogStream, bytes: &[u8]) -> LogLine {
    let text = String::from_utf8_lossy(bytes);
    // Postgres refuses NUL in text and JSON: one would lose the whole batch
    // of log lines (or a job's result) it travels in.
    let text = if text.contains('\0') {
        std::borrow::Cow::Owned(text.replace('\0', "\u{FFFD}"))
    } else {
        text
    };
    let text = text.strip_suffix('\r').unwrap_or(&text);
    LogLine {
        stream,
        text: cut_utf8(text, MAX_LINE).to_owned(),
    }
}

/// What a capped log ended as.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogSummary {
    /// Bytes of lines passed through.
    pub emitted_bytes: u64,
    /// Bytes of lines neither passed through nor kept in the tail.
    pub dropped_bytes: u64,
    /// The last lines after the budget was spent (at most `tail_bytes`).
    pub tail: Vec<LogLine>,
}

/// Passes lines through until `budget` bytes were emitted; after that keeps
/// the last `tail_bytes` of lines and counts the rest as dropped.
#[derive(Debug)]
pub struct LogCap {
    budget: u64,
    tail_bytes: usize,
    emitted: u64,
    dropped: u64,
    tail: VecDeque<LogLine>,
    tail_len: usize,
}

impl LogCap {
    pub fn new(budget: u64, tail_bytes: usize) -> Self {
        LogCap {
            budget,
            tail_bytes,
            emitted: 0,
            dropped: 0,
            tail: VecDeque::new(),
            tail_len: 0,
        }
    }

    /// `Some(line)` to pass on now, `None` once the budget is spent.
    pub fn accept(&mut self, line: LogLine) -> Option<LogLine> {
        let size = line.text.len() as u64 + 1;
        if self.emitted + size <= self.budget {
            self.emitted += size;
            return Some(line);
        }
        self.tail_len += line.text.len() + 1;
        self.tail.push_back(line);
        while self.tail_len > self.tail_bytes {
            match self.tail.pop_front() {
                Some(old) => {
                    self.tail_len -= old.text.len() + 1;
                    self.dropped += old.text.len() as u64 + 1;
                }
                None => break,
            }
        }
        None
    }

    pub fn finish(self) -> LogSummary {
        LogSummary {
            emitted_bytes: self.emitted,
            dropped_bytes: self.dropped,
            tail: self.tail.into_iter().collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(text: &str) -> LogLine {
        LogLine {
            stream: LogStream::Stdout,
            text: text.to_owned(),
        }
    }

    #[test]
    fn splits_lines_per_stream_across_chunks() {
        let mut s = LineSplitter::default();
        let mut lines = Vec::new();
        s.feed(LogStream::Stdout, b"hel", &mut lines);
        s.feed(LogStream::Stderr, b"oops\n", &mut lines);
        s.feed(LogStream::Stdout, b"lo\r\nworld", &mut lines);
        s.finish(&mut lines);
        let texts: Vec<_> = lines.iter().map(|l| (l.stream, l.text.as_str())).collect();
        assert_eq!(
            texts,
            vec![
                (LogStream::Stderr, "oops"),
                (LogStream::Stdout, "hello"),
                (LogStream::Stdout, "world")
            ]
        );
    }

    #[test]
    fn long_lines_are_cut_on_a_char_boundary() {
        let mut s = LineSplitter::default();
        let mut lines = Vec::new();
        let text = "é".repeat(MAX_LINE); // 2 bytes each
        s.feed(LogStream::Stdout, text.as_bytes(), &mut lines);
        s.finish(&mut lines);
        assert!(lines.iter().all(|l| l.text.len() <= MAX_LINE));
        assert!(lines.iter().all(|l| l.text.chars().all(|c| c == 'é')));
        assert_eq!(cut_utf8("aé", 2), "a");
    }

    #[test]
    fn the_cap_passes_then_keeps_the_tail_and_counts_the_rest() {
        let mut cap = LogCap::new(20, 10);
        let passed: Vec<_> = (0..10)
            .filter_map(|i| cap.accept(out(&format!("line{i}"))))
            .collect();
        // "lineN\n" is 6 bytes: three fit in 20.
        assert_eq!(passed.len(), 3);
        let summary = cap.finish();
        assert_eq!(summary.emitted_bytes, 18);
        assert_eq!(
            summary
                .tail
                .iter()
                .map(|l| l.text.as_str())
                .collect::<Vec<_>>(),
            vec!["line9"]
        );
        assert_eq!(summary.dropped_bytes, 6 * 6);
    }
}
