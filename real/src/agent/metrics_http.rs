//! The agent's HTTP endpoint: `GET /metrics` (Prometheus text format) and `GET /status` (the
//! status report as JSON). Hand-written rather than a web framework: two read-only routes, one
//! request per connection, and every input bounded (request head size, time, connections), which
//! is less code to trust than a general server on a host that runs the protected VM.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use super::prom::AgentExporter;

/// Largest request head read (request line and headers); larger requests get 431.
pub const MAX_REQUEST_BYTES: usize = 8 << 10;
/// Time a client has to send its request and take the answer.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
/// Connections served at once; more are closed at once (a scraper needs one).
pub const MAX_CONNECTIONS: usize = 16;

/// Errors of the endpoint.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The listening socket could not be opened.
    #[error("metrics endpoint: listen on {addr}: {source}")]
    Listen {
        /// Address.
        addr: std::net::SocketAddr,
        /// Cause.
        source: io::Error,
    },
}

/// Binds `addr` for [`serve`] (separate so a bad address fails the agent's start, not later).
pub async fn bind(addr: std::net::SocketAddr) -> Result<TcpListener, HttpError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| HttpError::Listen { addr, source })
}

/// Serves `exporter` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, exporter: Arc<AgentExporter>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let sock = match listener.accept().await {
            Ok((sock, _)) => sock,
            Err(e) => {
                // Out of descriptors and the like: transient, and metrics must never stop the
                // agent; wait a little instead of spinning.
                tracing::debug!(error = %e, "metrics endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            continue; // dropped: too many at once
        };
        let exporter = exporter.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(REQUEST_DEADLINE, answer(sock, &exporter)).await;
            drop(permit);
        });
    }
}

/// A parsed request head: method and path (query string dropped).
#[derive(Debug, PartialEq, Eq)]
pub struct Request<'a> {
    /// `GET`, `HEAD`, ...
    pub method: &'a str,
    /// `/metrics`, ...
    pub path: &'a str,
}

/// Parses the request line of `head` (None when it is not `METHOD PATH HTTP/x`).
pub fn parse_request(head: &[u8]) -> Option<Request<'_>> {
    let line_end = head.iter().position(|&b| b == b'\r' || b == b'\n')?;
    let line = std::str::from_utf8(&head[..line_end]).ok()?;
    let mut parts = line.split(' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || !version.starts_with("HTTP/") || !target.starts_with('/') {
        return None;
    }
    let path = target.split('?').next().unwrap_or(target);
    Some(Request { method, path })
}

/// The status code, content type and body for a request head (`None`: head too large).
pub fn respond(head: Option<&[u8]>, exporter: &AgentExporter) -> (u16, &'static str, Vec<u8>) {
    const TEXT: &str = "text/plain; charset=utf-8";
    let Some(head) = head else {
        return (431, TEXT, b"request head too large\n".to_vec());
    };
    let Some(req) = parse_request(head) else {
        return (400, TEXT, b"bad request\n".to_vec());
    };
    if req.method != "GET" && req.method != "HEAD" {
        return (405, TEXT, b"only GET\n".to_vec());
    }
    match req.path {
        "/metrics" => (
            200,
            "text/plain; version=0.0.4; charset=utf-8",
            exporter.encode().into_bytes(),
        ),
        "/status" => (200, "application/json", exporter.status_json()),
        _ => (404, TEXT, b"not found: try /metrics or /status\n".to_vec()),
    }
}

/// Reads the request head (up to the blank line, at most [`MAX_REQUEST_BYTES`]); None when
/// larger; an error when the peer closed first.
async fn read_head(sock: &mut TcpStream) -> io::Result<Option<Vec<u8>>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = sock.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_REQUEST_BYTES {
            return Ok(None);
        }
        if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n") {
            return Ok(Some(buf));
        }
    }
}

async fn answer(mut sock: TcpStream, exporter: &AgentExporter) -> io::Result<()> {
    let head = read_head(&mut sock).await?;
    let is_head = head
        .as_deref()
        .and_then(parse_request)
        .is_some_and(|r| r.method == "HEAD");
    let (code, ctype, body) = respond(head.as_deref(), exporter);
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Request Header Fields Too Large",
    };
    let mut out = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !is_head {
        out.extend_from_slice(&body);
    }
    sock.write_all(&out).await?;
    sock.shutdown().await?;
    if head.is_none() {
        // Closing with the rest of an oversized request unread would reset the connection and
        // could destroy the answer before the client reads it: discard a bounded amount first.
        let mut sink = [0u8; 4096];
        let mut left = 16 * MAX_REQUEST_BYTES;
        while left > 0 {
            match sock.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_parsed_and_hostile_ones_refused() {
        let x = AgentExporter::new(1, 1);
        assert_eq!(
            parse_request(b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\n\r\n"),
            Some(Request {
                method: "GET",
                path: "/metrics"
            })
        );
        assert_eq!(respond(Some(b"GET /metrics HTTP/1.1\r\n\r\n"), &x).0, 200);
        assert_eq!(respond(Some(b"GET /status HTTP/1.0\r\n\r\n"), &x).0, 200);
        assert_eq!(respond(Some(b"GET /nope HTTP/1.1\r\n\r\n"), &x).0, 404);
        assert_eq!(respond(Some(b"POST /metrics HTTP/1.1\r\n\r\n"), &x).0, 405);
        assert_eq!(respond(Some(b"GET metrics HTTP/1.1\r\n\r\n"), &x).0, 400);
        assert_eq!(respond(Some(b"\xff\xfe\r\n\r\n"), &x).0, 400);
        assert_eq!(respond(Some(b"GET / HTTP/1.1 extra\r\n\r\n"), &x).0, 400);
        assert_eq!(respond(None, &x).0, 431);
    }
}
