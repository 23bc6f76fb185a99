//! The little HTTP the metrics endpoint speaks, sans-IO: a request's head
//! read into a [`Verdict`], and HTTP/1.0 answers that close the
//! connection (scrapers open one per scrape).

/// What was asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// `GET /metrics`: the Prometheus text format.
    Metrics,
    /// `GET /`: the `io-server status` report.
    Report,
    /// A GET of any other path.
    NotFound,
    /// Another method.
    NotGet,
}

/// What a request's head came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Request(Request),
    /// The peer closed before sending anything.
    Closed,
    /// Not an HTTP request line, or closed halfway.
    Malformed,
    /// No end of the head within the bound.
    TooLarge,
}

/// The verdict on `buf`, the bytes read so far (`eof`: all there will
/// be), or `None` while the head is incomplete and under `max` bytes.
pub fn parse(buf: &[u8], max: usize, eof: bool) -> Option<Verdict> {
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4)
        .or_else(|| buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2));
    let Some(end) = end else {
        return if buf.len() >= max {
            Some(Verdict::TooLarge)
        } else if eof && buf.is_empty() {
            Some(Verdict::Closed)
        } else if eof {
            Some(Verdict::Malformed)
        } else {
            None
        };
    };
    if end > max {
        return Some(Verdict::TooLarge);
    }
    let line = buf[..end].split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut words = line.split_whitespace();
    let (Some(method), Some(target), Some(version)) = (words.next(), words.next(), words.next())
    else {
        return Some(Verdict::Malformed);
    };
    if !version.starts_with("HTTP/1.") || words.next().is_some() {
        return Some(Verdict::Malformed);
    }
    let path = target.split(['?', '#']).next().unwrap_or_default();
    Some(Verdict::Request(match (method, path) {
        ("GET", "/metrics") => Request::Metrics,
        ("GET", "/") => Request::Report,
        ("GET", _) => Request::NotFound,
        _ => Request::NotGet,
    }))
}

/// An answer with `body`.
pub fn response(code: u16, content_type: &str, body: &str) -> Vec<u8> {
    let mut r = format!(
        "HTTP/1.0 {code} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        reason(code),
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body.as_bytes());
    r
}

/// An error answer, its reason as the body.
pub fn error(code: u16) -> Vec<u8> {
    let mut body = reason(code).to_string();
    if code == 404 {
        body += ": try /metrics (Prometheus) or / (the status report)";
    }
    body.push('\n');
    response(code, "text/plain; charset=utf-8", &body)
}

fn reason(code: u16) -> &'static str {
    match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Error",
    }
}
