//! A minimal HTTP/1.0 client for checking what test servers answer.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// One `GET path` to `addr` (`ip:port`); returns the whole response (status line, headers, body).
pub fn get(addr: &str, path: &str) -> std::io::Result<String> {
    let target: SocketAddr = addr.parse().map_err(|e| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{addr}: {e}"))
    })?;
    let mut conn = TcpStream::connect_timeout(&target, Duration::from_secs(2))?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    // One write: a request split over several segments must not race a server's first read.
    conn.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())?;
    let mut response = String::new();
    conn.read_to_string(&mut response)?;
    Ok(response)
}
