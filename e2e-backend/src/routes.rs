//! What the backend answers: `/health`, `/fast` and the streamed `/slow`.

use std::time::Duration;

use crate::http::Request;

/// The longest `/slow` allowed.
const MAX_SLOW: Duration = Duration::from_secs(60);
/// The largest body allowed.
const MAX_BYTES: u64 = 8 * 1024 * 1024;
/// `/slow` sends a piece of its body this often.
pub const PIECE_INTERVAL: Duration = Duration::from_millis(100);

/// How to answer one request.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// Head and body in one write.
    Whole { status: u16, body: Vec<u8> },
    /// `200` with a `Content-Length` of `bytes`; the head and a first piece go out at once,
    /// the rest in pieces spread over `over`, the last piece at the end. A proxy therefore
    /// forwards the head at once, and a backend that dies midway leaves a short body.
    Streamed { bytes: usize, over: Duration },
    /// The server's own counters (`in_flight N streaming M`).
    Stats,
}

/// `GET /health` → `ok <version>`; `GET /fast?bytes=N` (default 1024) → N bytes at once;
/// `GET /slow?ms=M&bytes=N` (defaults 1000 ms, 16384 bytes) → N bytes streamed over M ms;
/// `GET /stats` → requests in flight now, and streamed answers among them.
pub fn route(request: &Request, version: &str) -> Answer {
    if request.method != "GET" {
        return text(405, "only GET\n");
    }
    let answer = match request.path.as_str() {
        "/health" => Ok(text(200, &format!("ok {version}\n"))),
        "/stats" => Ok(Answer::Stats),
        "/fast" => request.number("bytes", 1024).and_then(|bytes| {
            let bytes = checked_bytes(bytes, 0)?;
            Ok(Answer::Whole {
                status: 200,
                body: body_bytes(0, bytes),
            })
        }),
        "/slow" => request.number("ms", 1000).and_then(|ms| {
            let bytes = checked_bytes(request.number("bytes", 16 * 1024)?, 2)?;
            let over = Duration::from_millis(ms);
            if over > MAX_SLOW {
                return Err(format!("ms={ms} is over {}", MAX_SLOW.as_millis()));
            }
            Ok(Answer::Streamed { bytes, over })
        }),
        _ => return text(404, "not found\n"),
    };
    answer.unwrap_or_else(|problem| text(400, &format!("{problem}\n")))
}

fn checked_bytes(bytes: u64, at_least: u64) -> Result<usize, String> {
    if !(at_least..=MAX_BYTES).contains(&bytes) {
        return Err(format!(
            "bytes={bytes} is not within {at_least}..={MAX_BYTES}"
        ));
    }
    usize::try_from(bytes).map_err(|_| format!("bytes={bytes} is too large"))
}

fn text(status: u16, body: &str) -> Answer {
    Answer::Whole {
        status,
        body: body.as_bytes().to_vec(),
    }
}

/// Bytes `offset..offset + len` of every body: the alphabet, over and over.
pub fn body_bytes(offset: usize, len: usize) -> Vec<u8> {
    (offset..offset + len)
        .map(|i| b'a' + (i % 26) as u8)
        .collect()
}

/// How a streamed body of `bytes` over `over` is cut: `(delay from the start, piece size)`,
/// the first piece at 0 and the last at `over`.
pub fn stream_plan(bytes: usize, over: Duration) -> Vec<(Duration, usize)> {
    let intervals = (over.as_millis() / PIECE_INTERVAL.as_millis()).max(1);
    let pieces = usize::try_from(intervals + 1)
        .unwrap_or(usize::MAX)
        .min(bytes)
        .max(2);
    let size = bytes / pieces;
    (0..pieces)
        .map(|k| {
            let at = over.mul_f64(k as f64 / (pieces - 1) as f64);
            let len = if k + 1 == pieces {
                bytes - size * k
            } else {
                size
            };
            (at, len)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::{Parsed, parse_head};

    fn request(target: &str) -> Request {
        let raw = format!("GET {target} HTTP/1.1\r\n\r\n");
        match parse_head(raw.as_bytes()) {
            Parsed::Complete(request, _) => request,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn routes() {
        assert_eq!(
            route(&request("/health"), "v2"),
            Answer::Whole {
                status: 200,
                body: b"ok v2\n".to_vec()
            }
        );
        assert_eq!(route(&request("/stats"), "v1"), Answer::Stats);
        assert!(
            matches!(route(&request("/fast?bytes=10"), "v1"), Answer::Whole { status: 200, body } if body == b"abcdefghij")
        );
        assert_eq!(
            route(&request("/slow?ms=1500&bytes=100"), "v1"),
            Answer::Streamed {
                bytes: 100,
                over: Duration::from_millis(1500)
            }
        );
        for bad in [
            "/slow?ms=x",
            "/slow?ms=999999",
            "/fast?bytes=99999999999",
            "/slow?bytes=1",
        ] {
            assert!(
                matches!(
                    route(&request(bad), "v1"),
                    Answer::Whole { status: 400, .. }
                ),
                "{bad}"
            );
        }
        assert!(matches!(
            route(&request("/nope"), "v1"),
            Answer::Whole { status: 404, .. }
        ));
    }

    #[test]
    fn stream_plans_cover_the_body_and_the_time() {
        for (bytes, ms) in [(16384, 3000), (2, 500), (100, 0), (7, 2000)] {
            let over = Duration::from_millis(ms);
            let plan = stream_plan(bytes, over);
            assert!(plan.len() >= 2);
            assert_eq!(plan.iter().map(|(_, len)| len).sum::<usize>(), bytes);
            assert_eq!(plan.first().map(|p| p.0), Some(Duration::ZERO));
            assert_eq!(plan.last().map(|p| p.0), Some(over));
            assert!(plan.iter().all(|(_, len)| *len > 0));
        }
    }
}
