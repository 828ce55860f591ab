//! Streaming over WebSocket (RFC 6455), the transport kubectl uses by default since 1.30:
//! sub-protocols `v5.channel.k8s.io` and `v4.channel.k8s.io` for exec and attach. Every binary
//! message is one channel's data, the channel number first (0 stdin, 1 stdout, 2 stderr,
//! 3 error, 4 resize); in v5 a message `[255, n]` closes channel `n` (how a client ends stdin).
//!
//! The channels are presented as [`Stream`]s and [`StreamWriter`]s, the same types a SPDY
//! session gives, so the code serving exec and attach does not care which transport it is on.

use std::collections::HashMap;

use base64::Engine;
use sha1::Digest;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::spdy::{Frame, Out, Stream, StreamWriter};
use crate::upgrade::Request;

/// The sub-protocols of exec and attach over WebSocket, most preferred first.
pub const PROTOCOLS: &[&str] = &["v5.channel.k8s.io", "v4.channel.k8s.io"];
/// The header naming them.
pub const PROTOCOL_HEADER: &str = "Sec-WebSocket-Protocol";
/// Channel numbers.
pub const STDIN: u8 = 0;
/// Stdout.
pub const STDOUT: u8 = 1;
/// Stderr.
pub const STDERR: u8 = 2;
/// The error channel (the final Status).
pub const ERROR: u8 = 3;
/// Terminal resizes.
pub const RESIZE: u8 = 4;
/// v5's close signal.
pub const CLOSE: u8 = 255;

const TEXT: u8 = 1;
const BINARY: u8 = 2;
const CLOSE_FRAME: u8 = 8;
const PING: u8 = 9;
const PONG: u8 = 10;
const MAX_MESSAGE: usize = 16 << 20;

/// Whether a request asks for a WebSocket upgrade.
pub fn is_upgrade(request: &Request) -> bool {
    request
        .values("Upgrade")
        .iter()
        .any(|u| u.eq_ignore_ascii_case("websocket"))
}

/// `Sec-WebSocket-Accept` for a `Sec-WebSocket-Key`.
pub fn accept_key(key: &str) -> String {
    let mut sha = sha1::Sha1::new();
    sha.update(key.trim().as_bytes());
    sha.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(sha.finalize())
}

/// Answers a WebSocket upgrade with `101 Switching Protocols` and the chosen sub-protocol.
pub async fn switch<T: AsyncWrite + Unpin>(
    io: &mut T,
    request: &Request,
    protocol: &str,
) -> std::io::Result<()> {
    let key = request
        .values("Sec-WebSocket-Key")
        .into_iter()
        .next()
        .ok_or_else(|| std::io::Error::other("WebSocket upgrade without Sec-WebSocket-Key"))?;
    let head = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n{PROTOCOL_HEADER}: {protocol}\r\n\r\n",
        accept_key(&key)
    );
    io.write_all(head.as_bytes()).await?;
    io.flush().await
}

/// Reads messages, joining fragments; control frames (which may come between fragments) are
/// returned as they come, the fragments read so far kept for the next call.
#[derive(Debug, Default)]
struct Reader {
    partial: Vec<u8>,
    opcode: Option<u8>,
}

impl Reader {
    /// The next message: opcode and payload.
    async fn next<R: AsyncRead + Unpin>(&mut self, io: &mut R) -> std::io::Result<(u8, Vec<u8>)> {
        loop {
            let mut head = [0u8; 2];
            io.read_exact(&mut head).await?;
            let fin = head[0] & 0x80 != 0;
            let opcode = head[0] & 0x0f;
            let masked = head[1] & 0x80 != 0;
            let len = match head[1] & 0x7f {
                126 => u64::from(io.read_u16().await?),
                127 => io.read_u64().await?,
                n => u64::from(n),
            };
            if len > MAX_MESSAGE as u64 || self.partial.len() + len as usize > MAX_MESSAGE {
                return Err(std::io::Error::other("WebSocket message too large"));
            }
            let mut mask = [0u8; 4];
            if masked {
                io.read_exact(&mut mask).await?;
            }
            let mut payload = vec![0u8; len as usize];
            io.read_exact(&mut payload).await?;
            if masked {
                for (i, b) in payload.iter_mut().enumerate() {
                    *b ^= mask[i % 4];
                }
            }
            if opcode >= CLOSE_FRAME {
                return Ok((opcode, payload));
            }
            if self.opcode.is_none() {
                self.opcode = Some(opcode);
            }
            self.partial.extend_from_slice(&payload);
            if fin {
                let opcode = self.opcode.take().unwrap_or(BINARY);
                return Ok((opcode, std::mem::take(&mut self.partial)));
            }
        }
    }
}

/// Encodes one frame; a client masks it (RFC 6455 requires it of clients only).
fn frame(opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.push(0x80 | opcode);
    let bit = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(bit | n as u8),
        n if n <= 0xffff => {
            out.push(bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(mask) => {
            out.extend_from_slice(&mask);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        }
        None => out.extend_from_slice(payload),
    }
    out
}

/// Which end of the connection this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The streaming server (sends unmasked frames).
    Server,
    /// A client (masks its frames).
    Client,
}

/// The channels of an upgraded connection: a [`Stream`] for each of `channels` (data the peer
/// sends on it; `None` from `recv` once the peer closed it or the connection ended), and
/// writers through them. `v5` enables the close signal. Dropping every writer and calling
/// [`Channels::close`] ends the connection with a close frame.
#[derive(Debug)]
pub struct Channels {
    /// The streams by channel number.
    pub streams: HashMap<u8, Stream>,
    out: mpsc::UnboundedSender<Out>,
    gone: tokio::sync::watch::Receiver<bool>,
}

impl Channels {
    /// Runs the connection `io` in background tasks.
    pub fn new<T>(io: T, side: Side, v5: bool, channels: &[u8]) -> Channels
    where
        T: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (mut reader, mut writer) = tokio::io::split(io);
        let (out, mut outgoing) = mpsc::unbounded_channel::<Out>();
        let mut senders: HashMap<u8, mpsc::UnboundedSender<Vec<u8>>> = HashMap::new();
        let mut streams = HashMap::new();
        for &channel in channels {
            let (sender, receiver) = mpsc::unbounded_channel();
            senders.insert(channel, sender);
            let writer = StreamWriter::detached(u32::from(channel), out.clone());
            streams.insert(
                channel,
                Stream::detached(u32::from(channel), receiver, writer),
            );
        }
        let mask = move || (side == Side::Client).then(rand_mask);
        let pongs = out.clone();
        let (ended, gone) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            let mut messages = Reader::default();
            while let Ok((opcode, payload)) = messages.next(&mut reader).await {
                match opcode {
                    BINARY | TEXT if !payload.is_empty() => {
                        let (channel, data) = (payload[0], &payload[1..]);
                        if channel == CLOSE && v5 {
                            if let Some(&closed) = data.first() {
                                senders.remove(&closed);
                            }
                        } else if let Some(sender) = senders.get(&channel)
                            && !data.is_empty()
                        {
                            let _ = sender.send(data.to_vec());
                        }
                    }
                    PING => {
                        let _ = pongs.send(Out::Frame(Frame::Ping(0)));
                    }
                    CLOSE_FRAME => break,
                    _ => {}
                }
            }
            senders.clear();
            let _ = ended.send(true);
        });
        tokio::spawn(async move {
            while let Some(next) = outgoing.recv().await {
                let bytes = match next {
                    Out::Frame(Frame::Data { id, fin, data }) => {
                        let channel = id as u8;
                        let mut bytes = Vec::new();
                        if !data.is_empty() {
                            let mut message = Vec::with_capacity(data.len() + 1);
                            message.push(channel);
                            message.extend_from_slice(&data);
                            bytes.extend(frame(BINARY, &message, mask()));
                        }
                        if fin && v5 {
                            bytes.extend(frame(BINARY, &[CLOSE, channel], mask()));
                        }
                        bytes
                    }
                    Out::Frame(Frame::Ping(_)) => frame(PONG, &[], mask()),
                    Out::Frame(_) => continue,
                    Out::Shutdown => {
                        // Normal closure.
                        let _ = writer
                            .write_all(&frame(CLOSE_FRAME, &[0x03, 0xe8], mask()))
                            .await;
                        let _ = writer.flush().await;
                        let _ = writer.shutdown().await;
                        break;
                    }
                };
                if bytes.is_empty() {
                    continue;
                }
                if writer.write_all(&bytes).await.is_err() || writer.flush().await.is_err() {
                    break;
                }
            }
        });
        Channels { streams, out, gone }
    }

    /// Resolves once the peer closed the connection (or it broke).
    pub async fn gone(&self) {
        let mut gone = self.gone.clone();
        let _ = gone.wait_for(|g| *g).await;
    }

    /// Takes the stream of `channel`.
    pub fn take(&mut self, channel: u8) -> Option<Stream> {
        self.streams.remove(&channel)
    }

    /// A writer on `channel` (whether or not the peer sends on it).
    pub fn writer(&self, channel: u8) -> StreamWriter {
        StreamWriter::detached(u32::from(channel), self.out.clone())
    }

    /// Ends the connection after everything already sent.
    pub fn close(&self) {
        let _ = self.out.send(Out::Shutdown);
    }
}

fn rand_mask() -> [u8; 4] {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0x5a5a_5a5a);
    (nanos ^ 0x9e37_79b9).to_le_bytes()
}

/// The client side of the upgrade: sends the request for `path` offering `protocols` and reads
/// the answer; returns the protocol the server chose.
pub async fn request_upgrade<T: AsyncRead + AsyncWrite + Unpin>(
    io: &mut T,
    path: &str,
    host: &str,
    protocols: &[&str],
    headers: &[(&str, &str)],
) -> std::io::Result<String> {
    let key = base64::engine::general_purpose::STANDARD.encode(rand_mask().repeat(4));
    let mut head = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n{PROTOCOL_HEADER}: {}\r\n",
        protocols.join(", ")
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    io.write_all(head.as_bytes()).await?;
    io.flush().await?;
    // The answer's head, byte by byte so nothing after it is consumed.
    let mut answer = Vec::new();
    while !answer.ends_with(b"\r\n\r\n") {
        if answer.len() > 64 * 1024 {
            return Err(std::io::Error::other("answer head too long"));
        }
        answer.push(io.read_u8().await?);
    }
    let text = String::from_utf8_lossy(&answer);
    if !text.starts_with("HTTP/1.1 101") {
        // The refusal's body says why.
        let mut body = Vec::new();
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(2),
            io.take(4096).read_to_end(&mut body),
        )
        .await;
        return Err(std::io::Error::other(format!(
            "the upgrade was refused: {}: {}",
            text.lines().next().unwrap_or_default(),
            String::from_utf8_lossy(&body).trim()
        )));
    }
    let header = |name: &str| {
        text.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    };
    if header("Sec-WebSocket-Accept").as_deref() != Some(accept_key(&key).as_str()) {
        return Err(std::io::Error::other("wrong Sec-WebSocket-Accept"));
    }
    header(PROTOCOL_HEADER).ok_or_else(|| std::io::Error::other("no sub-protocol chosen"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_accept_key_is_rfc_6455s() {
        // The example of RFC 6455 section 1.3.
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[tokio::test]
    async fn masked_fragmented_frames_reassemble() {
        let mut bytes = Vec::new();
        // A masked first fragment (FIN clear), a ping in between, the last fragment.
        let mut first = frame(BINARY, &[1, b'h', b'e'], Some([1, 2, 3, 4]));
        first[0] &= 0x7f;
        bytes.extend(first);
        bytes.extend(frame(PING, b"", None));
        let mut last = frame(0, b"llo", Some([9, 8, 7, 6]));
        last[0] |= 0x80;
        bytes.extend(last);
        let mut reader = &bytes[..];
        let mut messages = Reader::default();
        assert_eq!(messages.next(&mut reader).await.unwrap(), (PING, vec![]));
        assert_eq!(
            messages.next(&mut reader).await.unwrap(),
            (BINARY, vec![1, b'h', b'e', b'l', b'l', b'o'])
        );
        let long = vec![7u8; 70_000];
        let encoded = frame(BINARY, &long, None);
        assert_eq!(encoded[1], 127);
        let mut reader = &encoded[..];
        assert_eq!(
            Reader::default().next(&mut reader).await.unwrap().1.len(),
            70_000
        );
    }

    #[tokio::test]
    async fn channels_carry_data_and_v5_close_signals_both_ways() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let mut server = Channels::new(a, Side::Server, true, &[STDIN]);
        let mut client = Channels::new(b, Side::Client, true, &[STDOUT, ERROR]);
        let stdin = client.writer(STDIN);
        stdin.send(b"input").unwrap();
        stdin.close();
        let mut received = server.take(STDIN).unwrap();
        assert_eq!(received.read_to_end().await, b"input");
        server.writer(STDOUT).send(b"output").unwrap();
        server.writer(STDOUT).close();
        server.writer(ERROR).send(b"{}").unwrap();
        server.close();
        assert_eq!(client.take(STDOUT).unwrap().read_to_end().await, b"output");
        assert_eq!(client.take(ERROR).unwrap().read_to_end().await, b"{}");
    }
}
