//! The HTTP/1.1 exchange that turns a connection into a streaming session: the client's
//! `Connection: Upgrade` request naming the protocols it speaks (`X-Stream-Protocol-Version`,
//! most preferred first) and the server's `101 Switching Protocols` naming the one chosen.

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

/// The header that lists and then names the streaming sub-protocol.
pub const PROTOCOL_HEADER: &str = "X-Stream-Protocol-Version";
const MAX_HEAD: usize = 64 * 1024;

/// A request's first line and headers.
#[derive(Debug, Clone, Default)]
pub struct Request {
    /// `GET`, `POST`, ...
    pub method: String,
    /// The path with its query.
    pub target: String,
    /// Headers in order, names as sent.
    pub headers: Vec<(String, String)>,
}

impl Request {
    /// Every value of `name` (case-insensitive), comma-separated lists split.
    pub fn values(&self, name: &str) -> Vec<String> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .flat_map(|(_, v)| v.split(',').map(|s| s.trim().to_owned()))
            .filter(|v| !v.is_empty())
            .collect()
    }

    /// The path without the query.
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or_default()
    }

    /// The decoded query parameters.
    pub fn query(&self) -> Vec<(String, String)> {
        let Some((_, query)) = self.target.split_once('?') else {
            return Vec::new();
        };
        query
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|pair| {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                (decode(k), decode(v))
            })
            .collect()
    }
}

/// Percent-decoding of a query component (`+` is a space).
pub fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                match u8::from_str_radix(text.get(i + 1..i + 3).unwrap_or(""), 16) {
                    Ok(byte) => {
                        out.push(byte);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            other => out.push(other),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A connection with bytes already read in front of it.
#[derive(Debug)]
pub struct Rewind<T> {
    buffered: Vec<u8>,
    inner: T,
}

impl<T> Rewind<T> {
    /// `inner`, with `buffered` read first.
    pub fn new(buffered: Vec<u8>, inner: T) -> Rewind<T> {
        Rewind { buffered, inner }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.buffered.is_empty() {
            let n = self.buffered.len().min(buf.remaining());
            buf.put_slice(&self.buffered[..n]);
            self.buffered.drain(..n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewind<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Reads up to the blank line ending a head; returns the head's lines and what followed it.
async fn read_head<T: AsyncRead + Unpin>(io: &mut T) -> std::io::Result<(Vec<String>, Vec<u8>)> {
    let mut buffer = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let end = loop {
        if let Some(at) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break at;
        }
        if buffer.len() > MAX_HEAD {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "HTTP head larger than 64 KiB",
            ));
        }
        let n = io.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buffer.extend_from_slice(&chunk[..n]);
    };
    let rest = buffer[end + 4..].to_vec();
    let head = String::from_utf8_lossy(&buffer[..end]).into_owned();
    Ok((head.split("\r\n").map(str::to_owned).collect(), rest))
}

fn headers(lines: &[String]) -> Vec<(String, String)> {
    lines
        .iter()
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

/// Server side: reads the request head.
pub async fn read_request<T: AsyncRead + Unpin>(
    mut io: T,
) -> std::io::Result<(Request, Rewind<T>)> {
    let (lines, rest) = read_head(&mut io).await?;
    let mut first = lines.first().map(String::as_str).unwrap_or("").split(' ');
    let request = Request {
        method: first.next().unwrap_or_default().to_owned(),
        target: first.next().unwrap_or_default().to_owned(),
        headers: headers(lines.get(1..).unwrap_or_default()),
    };
    Ok((request, Rewind::new(rest, io)))
}

/// Server side: the first protocol of the client's list that the server also speaks.
pub fn choose<'a>(request: &Request, supported: &[&'a str]) -> Option<&'a str> {
    request
        .values(PROTOCOL_HEADER)
        .iter()
        .find_map(|wanted| supported.iter().find(|s| *s == wanted).copied())
}

/// Server side: `101 Switching Protocols` to `upgrade` speaking `protocol`.
pub async fn switch<T: AsyncWrite + Unpin>(
    io: &mut T,
    upgrade: &str,
    protocol: &str,
) -> std::io::Result<()> {
    io.write_all(
        format!(
            "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: {upgrade}\r\n{PROTOCOL_HEADER}: {protocol}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await?;
    io.flush().await
}

/// Server side: a plain error answer (the connection is then closed).
pub async fn refuse<T: AsyncWrite + Unpin>(
    io: &mut T,
    status: &str,
    message: &str,
) -> std::io::Result<()> {
    let body = format!("{message}\n");
    io.write_all(
        format!(
            "HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await?;
    io.shutdown().await
}

/// Client side: asks `io` to upgrade `target` to `upgrade`, offering `protocols`; returns the
/// protocol the server chose. A refusal becomes an error carrying the server's status and body.
pub async fn request_upgrade<T: AsyncRead + AsyncWrite + Unpin>(
    mut io: T,
    target: &str,
    host: &str,
    upgrade: &str,
    protocols: &[&str],
    extra_headers: &[(&str, &str)],
) -> std::io::Result<(String, Rewind<T>)> {
    let mut head = format!(
        "POST {target} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: {upgrade}\r\nContent-Length: 0\r\n"
    );
    for protocol in protocols {
        head.push_str(&format!("{PROTOCOL_HEADER}: {protocol}\r\n"));
    }
    for (name, value) in extra_headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    io.write_all(head.as_bytes()).await?;
    io.flush().await?;
    let (lines, rest) = read_head(&mut io).await?;
    let status = lines.first().cloned().unwrap_or_default();
    if status.split(' ').nth(1) != Some("101") {
        let mut body = rest;
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), io.read_to_end(&mut body))
            .await;
        return Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            format!(
                "{target}: {status}: {}",
                String::from_utf8_lossy(&body).trim()
            ),
        ));
    }
    let response = Request {
        headers: headers(lines.get(1..).unwrap_or_default()),
        ..Default::default()
    };
    let chosen = response
        .values(PROTOCOL_HEADER)
        .into_iter()
        .next()
        .unwrap_or_default();
    Ok((chosen, Rewind::new(rest, io)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_decode() {
        let request = Request {
            target: "/exec/abc?command=sh&command=-c&command=echo+%22hi%22&stdout=1".into(),
            ..Default::default()
        };
        assert_eq!(request.path(), "/exec/abc");
        let query = request.query();
        assert_eq!(query[2], ("command".into(), "echo \"hi\"".into()));
        assert_eq!(query[3], ("stdout".into(), "1".into()));
    }

    #[tokio::test]
    async fn the_client_and_server_agree_on_a_protocol() {
        let (a, b) = tokio::io::duplex(4096);
        let server = tokio::spawn(async move {
            let (request, mut io) = read_request(b).await.unwrap();
            let chosen = choose(&request, &["v4.channel.k8s.io", "channel.k8s.io"]).unwrap();
            switch(&mut io, "SPDY/3.1", chosen).await.unwrap();
            request
        });
        let (chosen, _io) = request_upgrade(
            a,
            "/exec/t",
            "h",
            "SPDY/3.1",
            &["v5.channel.k8s.io", "v4.channel.k8s.io"],
            &[],
        )
        .await
        .unwrap();
        assert_eq!(chosen, "v4.channel.k8s.io");
        assert_eq!(server.await.unwrap().path(), "/exec/t");
    }
}
