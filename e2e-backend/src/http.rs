//! Just enough HTTP/1.1 for this backend: parse a request head, build a response head.

/// The largest request head accepted.
pub const MAX_HEAD: usize = 16 * 1024;

/// One parsed request head.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub query: Vec<(String, String)>,
    /// Whether the client lets the connection stay open after the answer.
    pub keep_alive: bool,
    /// Bytes of request body that follow the head.
    pub body_len: usize,
}

impl Request {
    /// A query parameter parsed as a number, `default` when absent; `Err` names a bad one.
    pub fn number(&self, name: &str, default: u64) -> Result<u64, String> {
        match self.query.iter().find(|(key, _)| key == name) {
            None => Ok(default),
            Some((_, value)) => value
                .parse()
                .map_err(|_| format!("query parameter {name}={value:?} is not a number")),
        }
    }
}

/// What is in the buffer so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A whole head, and how many bytes of the buffer it took.
    Complete(Request, usize),
    /// Not a whole head yet.
    Incomplete,
    /// Not HTTP, or too big: answer 400 and close.
    Invalid(String),
}

pub fn parse_head(buffer: &[u8]) -> Parsed {
    let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if buffer.len() > MAX_HEAD {
            Parsed::Invalid("request head too large".into())
        } else {
            Parsed::Incomplete
        };
    };
    let Ok(head) = std::str::from_utf8(&buffer[..end]) else {
        return Parsed::Invalid("request head is not UTF-8".into());
    };
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Parsed::Invalid(format!("bad request line {request_line:?}"));
    };
    if !version.starts_with("HTTP/1.") {
        return Parsed::Invalid(format!("unsupported version {version:?}"));
    }
    let mut keep_alive = version == "HTTP/1.1";
    let mut body_len = 0;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Parsed::Invalid(format!("bad header line {line:?}"));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("connection") {
            if value.eq_ignore_ascii_case("close") {
                keep_alive = false;
            } else if value.eq_ignore_ascii_case("keep-alive") {
                keep_alive = true;
            }
        } else if name.eq_ignore_ascii_case("content-length") {
            match value.parse() {
                Ok(length) => body_len = length,
                Err(_) => return Parsed::Invalid(format!("bad Content-Length {value:?}")),
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Parsed::Invalid("chunked request bodies are not supported".into());
        }
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let query = query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (key.to_owned(), value.to_owned())
        })
        .collect();
    Parsed::Complete(
        Request {
            method: method.to_owned(),
            path: path.to_owned(),
            query,
            keep_alive,
            body_len,
        },
        end + 4,
    )
}

/// A response head with a `Content-Length`, our `X-Backend` header, and `Connection: close`
/// when the connection ends after this answer.
pub fn response_head(status: u16, content_length: usize, backend: &str, close: bool) -> Vec<u8> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Unknown",
    };
    let connection = if close { "Connection: close\r\n" } else { "" };
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {content_length}\r\nX-Backend: {backend}\r\n{connection}\r\n"
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_parse() {
        let raw = b"GET /slow?ms=700&bytes=10 HTTP/1.1\r\nHost: x\r\n\r\nNEXT";
        let Parsed::Complete(request, used) = parse_head(raw) else {
            panic!("not parsed");
        };
        assert_eq!(used, raw.len() - 4);
        assert_eq!(request.path, "/slow");
        assert_eq!(request.number("ms", 0), Ok(700));
        assert_eq!(request.number("missing", 5), Ok(5));
        assert!(request.number("bytes", 0).is_ok());
        assert!(request.keep_alive);
        let Parsed::Complete(request, _) =
            parse_head(b"POST /fast HTTP/1.0\r\nContent-Length: 3\r\n\r\nabc")
        else {
            panic!("not parsed");
        };
        assert!(!request.keep_alive);
        assert_eq!(request.body_len, 3);
        let Parsed::Complete(request, _) =
            parse_head(b"GET /fast HTTP/1.1\r\nConnection: close\r\n\r\n")
        else {
            panic!("not parsed");
        };
        assert!(!request.keep_alive);
    }

    #[test]
    fn partial_and_bad_heads() {
        assert_eq!(parse_head(b"GET / HTTP/1.1\r\nHost"), Parsed::Incomplete);
        assert!(matches!(parse_head(b"GARBAGE\r\n\r\n"), Parsed::Invalid(_)));
        assert!(matches!(
            parse_head(b"GET / SPDY/3\r\n\r\n"),
            Parsed::Invalid(_)
        ));
        assert!(matches!(
            parse_head(&vec![b'a'; MAX_HEAD + 1]),
            Parsed::Invalid(_)
        ));
        let Parsed::Complete(request, _) = parse_head(b"GET /fast?bytes=x HTTP/1.1\r\n\r\n") else {
            panic!("not parsed");
        };
        assert!(request.number("bytes", 1).is_err());
    }

    #[test]
    fn response_heads() {
        let head = String::from_utf8(response_head(200, 5, "127.0.0.1:1 v1", true)).expect("utf8");
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(head.contains("Content-Length: 5\r\n"));
        assert!(head.contains("X-Backend: 127.0.0.1:1 v1\r\n"));
        assert!(head.ends_with("Connection: close\r\n\r\n"));
    }
}
