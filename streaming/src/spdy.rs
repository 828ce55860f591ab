//! SPDY/3.1 as Kubernetes uses it for exec, attach and port-forward: a session of streams over
//! one upgraded HTTP/1.1 connection (`Upgrade: SPDY/3.1`). Streams are opened with SYN_STREAM
//! carrying a header block (zlib-compressed against the SPDY/3 dictionary, one compression
//! context per direction for the whole connection), answered with SYN_REPLY, carry DATA frames and
//! end with FIN; PINGs are echoed. Kubernetes' peers do no flow control, and neither does this.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, LazyLock, Mutex};

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

/// The `Upgrade` token.
pub const UPGRADE: &str = "SPDY/3.1";

const VERSION: u16 = 3;
const SYN_STREAM: u16 = 1;
const SYN_REPLY: u16 = 2;
const RST_STREAM: u16 = 3;
const PING: u16 = 6;
const GOAWAY: u16 = 7;
const FLAG_FIN: u8 = 0x01;
/// RST_STREAM status: the stream was cancelled.
pub const CANCEL: u32 = 5;
/// Largest DATA frame payload sent.
const MAX_DATA: usize = 32 * 1024;
/// Largest frame accepted (a header block or data frame beyond this is a protocol error).
const MAX_FRAME: usize = 16 << 20;

/// The SPDY/3 header compression dictionary (draft 3, section 2.6.10.1): length-prefixed
/// common header names and values, then a raw tail of status codes, dates and media types.
pub static DICTIONARY: LazyLock<Vec<u8>> = LazyLock::new(|| {
    const WORDS: &[&str] = &[
        "options",
        "head",
        "post",
        "put",
        "delete",
        "trace",
        "accept",
        "accept-charset",
        "accept-encoding",
        "accept-language",
        "accept-ranges",
        "age",
        "allow",
        "authorization",
        "cache-control",
        "connection",
        "content-base",
        "content-encoding",
        "content-language",
        "content-length",
        "content-location",
        "content-md5",
        "content-range",
        "content-type",
        "date",
        "etag",
        "expect",
        "expires",
        "from",
        "host",
        "if-match",
        "if-modified-since",
        "if-none-match",
        "if-range",
        "if-unmodified-since",
        "last-modified",
        "location",
        "max-forwards",
        "pragma",
        "proxy-authenticate",
        "proxy-authorization",
        "range",
        "referer",
        "retry-after",
        "server",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "user-agent",
        "vary",
        "via",
        "warning",
        "www-authenticate",
        "method",
        "get",
        "status",
        "200 OK",
        "version",
        "HTTP/1.1",
        "url",
        "public",
        "set-cookie",
        "keep-alive",
        "origin",
    ];
    const TAIL: &str = concat!(
        "100101201202205206300302303304305306307402405406407408409410411412413414415416417",
        "502504505203 Non-Authoritative Information204 No Content301 Moved Permanently",
        "400 Bad Request401 Unauthorized403 Forbidden404 Not Found500 Internal Server Error",
        "501 Not Implemented503 Service UnavailableJan Feb Mar Apr May Jun Jul Aug Sept Oct ",
        "Nov Dec 00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMTchunked,text/html,image/png,",
        "image/jpg,image/gif,application/xml,application/xhtml+xml,text/plain,text/javascript,",
        "publicprivatemax-age=gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0.",
    );
    let mut out = Vec::with_capacity(1423);
    for word in WORDS {
        out.extend_from_slice(&u32::try_from(word.len()).unwrap_or(0).to_be_bytes());
        out.extend_from_slice(word.as_bytes());
    }
    out.extend_from_slice(TAIL.as_bytes());
    out
});

/// A stream's headers: lower-case names (SPDY/3 requires them), in order.
pub type Headers = Vec<(String, String)>;

/// The value of `name` in `headers`, compared without case.
pub fn header<'a>(headers: &'a Headers, name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

fn protocol(message: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, message.into())
}

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A new stream from the peer.
    SynStream {
        /// Stream id.
        id: u32,
        /// FIN: the opener sends nothing more.
        fin: bool,
        /// Its headers.
        headers: Headers,
    },
    /// The answer to a SYN_STREAM.
    SynReply {
        /// Stream id.
        id: u32,
        /// FIN.
        fin: bool,
        /// Its headers.
        headers: Headers,
    },
    /// A stream aborted.
    RstStream {
        /// Stream id.
        id: u32,
        /// Why.
        status: u32,
    },
    /// A ping (echoed by the receiver of an odd/even id it did not send).
    Ping(u32),
    /// The session is ending.
    GoAway,
    /// Stream data.
    Data {
        /// Stream id.
        id: u32,
        /// FIN: the sender sends nothing more on this stream.
        fin: bool,
        /// Payload.
        data: Vec<u8>,
    },
    /// A frame this implementation does not act on (SETTINGS, WINDOW_UPDATE, HEADERS, ...).
    Other(u16),
}

/// Header-block compression, one context per direction.
#[derive(Debug)]
pub struct Deflater(Compress);

impl Default for Deflater {
    fn default() -> Deflater {
        let mut compress = Compress::new(Compression::default(), true);
        compress
            .set_dictionary(&DICTIONARY)
            .expect("zlib accepts the SPDY dictionary");
        Deflater(compress)
    }
}

impl Deflater {
    fn compress(&mut self, input: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(input.len() + 64);
        let mut consumed = 0;
        loop {
            if out.capacity() - out.len() < 64 {
                out.reserve(256);
            }
            let before = self.0.total_in();
            let status = self
                .0
                .compress_vec(&input[consumed..], &mut out, FlushCompress::Sync)
                .expect("deflate of a header block");
            consumed += usize::try_from(self.0.total_in() - before).unwrap_or(0);
            // A sync flush is complete when all input is taken and there was room left over.
            if consumed == input.len() && out.len() < out.capacity() {
                break;
            }
            if status == Status::StreamEnd {
                break;
            }
        }
        out
    }
}

/// Header-block decompression, one context per direction.
#[derive(Debug)]
pub struct Inflater(Decompress);

impl Default for Inflater {
    fn default() -> Inflater {
        Inflater(Decompress::new(true))
    }
}

impl Inflater {
    fn decompress(&mut self, input: &[u8]) -> std::io::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(input.len() * 4 + 256);
        let mut consumed = 0;
        loop {
            if out.capacity() - out.len() < 256 {
                out.reserve(out.capacity().max(1024));
            }
            let before = self.0.total_in();
            match self
                .0
                .decompress_vec(&input[consumed..], &mut out, FlushDecompress::Sync)
            {
                Ok(_) => {}
                Err(error) if error.needs_dictionary().is_some() => {
                    self.0
                        .set_dictionary(&DICTIONARY)
                        .map_err(|e| protocol(format!("SPDY header dictionary: {e}")))?;
                }
                Err(error) => return Err(protocol(format!("SPDY header block: {error}"))),
            }
            consumed += usize::try_from(self.0.total_in() - before).unwrap_or(0);
            if consumed == input.len() && out.len() < out.capacity() {
                return Ok(out);
            }
            if out.len() > MAX_FRAME {
                return Err(protocol("SPDY header block too large"));
            }
        }
    }
}

fn encode_headers(headers: &Headers) -> Vec<u8> {
    let mut block = Vec::new();
    let len = |n: usize| u32::try_from(n).unwrap_or(u32::MAX).to_be_bytes();
    block.extend_from_slice(&len(headers.len()));
    for (name, value) in headers {
        block.extend_from_slice(&len(name.len()));
        block.extend_from_slice(name.to_ascii_lowercase().as_bytes());
        block.extend_from_slice(&len(value.len()));
        block.extend_from_slice(value.as_bytes());
    }
    block
}

fn decode_headers(block: &[u8]) -> std::io::Result<Headers> {
    let mut at = 0usize;
    let mut next = |n: usize| -> std::io::Result<&[u8]> {
        let slice = block
            .get(at..at + n)
            .ok_or_else(|| protocol("SPDY header block is truncated"))?;
        at += n;
        Ok(slice)
    };
    let word = |bytes: &[u8]| u32::from_be_bytes(bytes.try_into().unwrap_or([0; 4])) as usize;
    let count = word(next(4)?);
    let mut headers = Vec::with_capacity(count.min(64));
    for _ in 0..count {
        let name_len = word(next(4)?);
        let name = String::from_utf8_lossy(next(name_len)?).into_owned();
        let value_len = word(next(4)?);
        let value = String::from_utf8_lossy(next(value_len)?).into_owned();
        // Several values of one name are NUL-separated.
        for part in value.split('\0') {
            headers.push((name.clone(), part.to_owned()));
        }
    }
    Ok(headers)
}

impl Frame {
    /// The frame's bytes on the wire (header blocks through `deflater`, in write order).
    pub fn encode(&self, deflater: &mut Deflater) -> Vec<u8> {
        let control = |kind: u16, flags: u8, body: Vec<u8>| {
            let mut out = Vec::with_capacity(8 + body.len());
            out.extend_from_slice(&(0x8000 | VERSION).to_be_bytes());
            out.extend_from_slice(&kind.to_be_bytes());
            let len = u32::try_from(body.len()).unwrap_or(0) & 0x00ff_ffff;
            out.extend_from_slice(&((u32::from(flags) << 24) | len).to_be_bytes());
            out.extend_from_slice(&body);
            out
        };
        let fin = |f: bool| if f { FLAG_FIN } else { 0 };
        match self {
            Frame::SynStream {
                id,
                fin: f,
                headers,
            } => {
                let mut body = Vec::new();
                body.extend_from_slice(&(id & 0x7fff_ffff).to_be_bytes());
                body.extend_from_slice(&0u32.to_be_bytes()); // associated stream
                body.extend_from_slice(&[0, 0]); // priority, slot
                body.extend_from_slice(&deflater.compress(&encode_headers(headers)));
                control(SYN_STREAM, fin(*f), body)
            }
            Frame::SynReply {
                id,
                fin: f,
                headers,
            } => {
                let mut body = Vec::new();
                body.extend_from_slice(&(id & 0x7fff_ffff).to_be_bytes());
                body.extend_from_slice(&deflater.compress(&encode_headers(headers)));
                control(SYN_REPLY, fin(*f), body)
            }
            Frame::RstStream { id, status } => {
                let mut body = (id & 0x7fff_ffff).to_be_bytes().to_vec();
                body.extend_from_slice(&status.to_be_bytes());
                control(RST_STREAM, 0, body)
            }
            Frame::Ping(id) => control(PING, 0, id.to_be_bytes().to_vec()),
            Frame::GoAway => control(GOAWAY, 0, vec![0; 8]),
            Frame::Data { id, fin: f, data } => {
                let mut out = Vec::with_capacity(8 + data.len());
                out.extend_from_slice(&(id & 0x7fff_ffff).to_be_bytes());
                let len = u32::try_from(data.len()).unwrap_or(0) & 0x00ff_ffff;
                out.extend_from_slice(&((u32::from(fin(*f)) << 24) | len).to_be_bytes());
                out.extend_from_slice(data);
                out
            }
            Frame::Other(_) => Vec::new(),
        }
    }

    /// Reads one frame; `None` at a clean end of the connection.
    pub async fn read<R: AsyncRead + Unpin>(
        reader: &mut R,
        inflater: &mut Inflater,
    ) -> std::io::Result<Option<Frame>> {
        let mut head = [0u8; 8];
        match reader.read_exact(&mut head).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        let flags = head[4];
        let len = (u32::from_be_bytes([0, head[5], head[6], head[7]])) as usize;
        if len > MAX_FRAME {
            return Err(protocol(format!("SPDY frame of {len} bytes")));
        }
        let mut body = vec![0u8; len];
        reader.read_exact(&mut body).await?;
        let fin = flags & FLAG_FIN != 0;
        let word = |at: usize| -> std::io::Result<u32> {
            body.get(at..at + 4)
                .map(|b| u32::from_be_bytes(b.try_into().unwrap_or([0; 4])))
                .ok_or_else(|| protocol("SPDY control frame is too short"))
        };
        if head[0] & 0x80 == 0 {
            let id = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) & 0x7fff_ffff;
            return Ok(Some(Frame::Data {
                id,
                fin,
                data: body,
            }));
        }
        let version = u16::from_be_bytes([head[0], head[1]]) & 0x7fff;
        if version != VERSION {
            return Err(protocol(format!("SPDY version {version}, expected 3")));
        }
        let kind = u16::from_be_bytes([head[2], head[3]]);
        Ok(Some(match kind {
            SYN_STREAM => {
                let id = word(0)? & 0x7fff_ffff;
                let block = body.get(10..).ok_or_else(|| protocol("short SYN_STREAM"))?;
                let headers = decode_headers(&inflater.decompress(block)?)?;
                Frame::SynStream { id, fin, headers }
            }
            SYN_REPLY => {
                let id = word(0)? & 0x7fff_ffff;
                let headers = decode_headers(&inflater.decompress(&body[4..])?)?;
                Frame::SynReply { id, fin, headers }
            }
            RST_STREAM => Frame::RstStream {
                id: word(0)? & 0x7fff_ffff,
                status: word(4)?,
            },
            PING => Frame::Ping(word(0)?),
            GOAWAY => Frame::GoAway,
            // HEADERS carries a header block: it must go through the inflater to keep the
            // compression context in step, though nothing here uses its content.
            8 => {
                if body.len() > 4 {
                    inflater.decompress(&body[4..])?;
                }
                Frame::Other(kind)
            }
            other => Frame::Other(other),
        }))
    }
}

/// What the writer task is asked to do.
pub(crate) enum Out {
    Frame(Frame),
    Shutdown,
}

#[derive(Default)]
struct State {
    /// Receivers of each open stream's data (dropped at its FIN or reset).
    streams: HashMap<u32, mpsc::UnboundedSender<Vec<u8>>>,
    /// Streams this side opened that wait for their SYN_REPLY.
    replies: HashMap<u32, oneshot::Sender<()>>,
}

/// One side of a SPDY session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Opens odd-numbered streams.
    Client,
    /// Accepts the client's streams.
    Server,
}

/// A SPDY session on an upgraded connection.
pub struct Session {
    out: mpsc::UnboundedSender<Out>,
    incoming: tokio::sync::Mutex<mpsc::UnboundedReceiver<Stream>>,
    state: Arc<Mutex<State>>,
    next_id: AtomicU32,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").finish_non_exhaustive()
    }
}

/// One stream of a session.
#[derive(Debug)]
pub struct Stream {
    /// Its id.
    pub id: u32,
    /// The headers it was opened with.
    pub headers: Headers,
    data: mpsc::UnboundedReceiver<Vec<u8>>,
    writer: StreamWriter,
}

/// The sending half of a stream; cloneable.
#[derive(Debug, Clone)]
pub struct StreamWriter {
    id: u32,
    out: mpsc::UnboundedSender<Out>,
}

impl std::fmt::Debug for Out {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Out::Frame(frame) => write!(f, "{frame:?}"),
            Out::Shutdown => f.write_str("Shutdown"),
        }
    }
}

impl StreamWriter {
    /// A writer of stream `id` into `out`, for transports other than a SPDY session.
    pub(crate) fn detached(id: u32, out: mpsc::UnboundedSender<Out>) -> StreamWriter {
        StreamWriter { id, out }
    }

    /// Sends `data` (split into frames); an error means the session is gone.
    pub fn send(&self, data: &[u8]) -> std::io::Result<()> {
        for chunk in data.chunks(MAX_DATA) {
            self.out
                .send(Out::Frame(Frame::Data {
                    id: self.id,
                    fin: false,
                    data: chunk.to_vec(),
                }))
                .map_err(|_| std::io::Error::from(std::io::ErrorKind::BrokenPipe))?;
        }
        Ok(())
    }

    /// Half-closes the stream: this side sends nothing more (FIN).
    pub fn close(&self) {
        let _ = self.out.send(Out::Frame(Frame::Data {
            id: self.id,
            fin: true,
            data: Vec::new(),
        }));
    }

    /// Aborts the stream (RST_STREAM CANCEL).
    pub fn reset(&self) {
        let _ = self.out.send(Out::Frame(Frame::RstStream {
            id: self.id,
            status: CANCEL,
        }));
    }
}

impl Stream {
    /// A stream fed by `data` and written through `writer`, for transports other than a SPDY
    /// session.
    pub(crate) fn detached(
        id: u32,
        data: mpsc::UnboundedReceiver<Vec<u8>>,
        writer: StreamWriter,
    ) -> Stream {
        Stream {
            id,
            headers: Headers::default(),
            data,
            writer,
        }
    }

    /// The next data received; `None` once the peer closed or reset the stream.
    pub async fn recv(&mut self) -> Option<Vec<u8>> {
        self.data.recv().await
    }

    /// The sending half.
    pub fn writer(&self) -> StreamWriter {
        self.writer.clone()
    }

    /// Splits into the receiving stream and the sending half.
    pub fn split(self) -> (Stream, StreamWriter) {
        let writer = self.writer.clone();
        (self, writer)
    }

    /// Sends `data`.
    pub fn send(&self, data: &[u8]) -> std::io::Result<()> {
        self.writer.send(data)
    }

    /// Half-closes (FIN).
    pub fn close(&self) {
        self.writer.close();
    }

    /// Reads everything until the peer's FIN.
    pub async fn read_to_end(&mut self) -> Vec<u8> {
        let mut all = Vec::new();
        while let Some(chunk) = self.recv().await {
            all.extend_from_slice(&chunk);
        }
        all
    }
}

impl Session {
    /// Runs a session over `io` (already upgraded) in background tasks.
    pub fn new<T>(io: T, role: Role) -> Session
    where
        T: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (mut reader, mut writer) = tokio::io::split(io);
        let (out, mut frames) = mpsc::unbounded_channel::<Out>();
        let (accepted, incoming) = mpsc::unbounded_channel();
        let state: Arc<Mutex<State>> = Arc::default();
        tokio::spawn(async move {
            let mut deflater = Deflater::default();
            while let Some(next) = frames.recv().await {
                match next {
                    Out::Frame(frame) => {
                        if writer
                            .write_all(&frame.encode(&mut deflater))
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                    Out::Shutdown => break,
                }
            }
            let _ = writer.flush().await;
            let _ = writer.shutdown().await;
        });
        let reader_state = state.clone();
        let reader_out = out.clone();
        tokio::spawn(async move {
            let mut inflater = Inflater::default();
            loop {
                let frame = match Frame::read(&mut reader, &mut inflater).await {
                    Ok(Some(frame)) => frame,
                    Ok(None) => break,
                    Err(error) => {
                        tracing::debug!(%error, "SPDY session ended");
                        break;
                    }
                };
                let mut state = reader_state.lock().unwrap_or_else(|p| p.into_inner());
                match frame {
                    Frame::SynStream { id, fin, headers } => {
                        let (sender, data) = mpsc::unbounded_channel();
                        if !fin {
                            state.streams.insert(id, sender);
                        }
                        let _ = reader_out.send(Out::Frame(Frame::SynReply {
                            id,
                            fin: false,
                            headers: Vec::new(),
                        }));
                        let stream = Stream {
                            id,
                            headers,
                            data,
                            writer: StreamWriter {
                                id,
                                out: reader_out.clone(),
                            },
                        };
                        let _ = accepted.send(stream);
                    }
                    Frame::SynReply { id, fin, .. } => {
                        if let Some(waiter) = state.replies.remove(&id) {
                            let _ = waiter.send(());
                        }
                        if fin {
                            state.streams.remove(&id);
                        }
                    }
                    Frame::Data { id, fin, data } => {
                        if let Some(sender) = state.streams.get(&id)
                            && !data.is_empty()
                        {
                            let _ = sender.send(data);
                        }
                        if fin {
                            state.streams.remove(&id);
                        }
                    }
                    Frame::RstStream { id, .. } => {
                        state.streams.remove(&id);
                        state.replies.remove(&id);
                    }
                    Frame::Ping(id) => {
                        // Echo the peer's pings (ours would have the other parity).
                        let ours = match role {
                            Role::Client => id % 2 == 1,
                            Role::Server => id % 2 == 0,
                        };
                        if !ours {
                            let _ = reader_out.send(Out::Frame(Frame::Ping(id)));
                        }
                    }
                    Frame::GoAway => break,
                    Frame::Other(_) => {}
                }
            }
            let mut state = reader_state.lock().unwrap_or_else(|p| p.into_inner());
            state.streams.clear();
            state.replies.clear();
        });
        Session {
            out,
            incoming: tokio::sync::Mutex::new(incoming),
            state,
            next_id: AtomicU32::new(match role {
                Role::Client => 1,
                Role::Server => 2,
            }),
        }
    }

    /// The next stream the peer opens; `None` when the session has ended.
    pub async fn accept(&self) -> Option<Stream> {
        self.incoming.lock().await.recv().await
    }

    /// Opens a stream with `headers` and waits for the peer's SYN_REPLY.
    pub async fn open(&self, headers: Headers) -> std::io::Result<Stream> {
        let id = self.next_id.fetch_add(2, Ordering::Relaxed);
        let (sender, data) = mpsc::unbounded_channel();
        let (replied, reply) = oneshot::channel();
        {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            state.streams.insert(id, sender);
            state.replies.insert(id, replied);
        }
        self.out
            .send(Out::Frame(Frame::SynStream {
                id,
                fin: false,
                headers: headers.clone(),
            }))
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::BrokenPipe))?;
        reply.await.map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                format!("the peer refused or reset SPDY stream {id}"),
            )
        })?;
        Ok(Stream {
            id,
            headers,
            data,
            writer: StreamWriter {
                id,
                out: self.out.clone(),
            },
        })
    }

    /// Ends the session: everything queued is written, then the connection is closed for
    /// writing.
    pub fn close(&self) {
        let _ = self.out.send(Out::Frame(Frame::GoAway));
        let _ = self.out.send(Out::Shutdown);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// zlib's Adler-32 of a buffer.
    fn adler32(data: &[u8]) -> u32 {
        let (mut a, mut b) = (1u32, 0u32);
        for byte in data {
            a = (a + u32::from(*byte)) % 65521;
            b = (b + a) % 65521;
        }
        (b << 16) | a
    }

    #[test]
    fn the_dictionary_is_the_spdy3_one() {
        // Its length and the dictionary id every SPDY/3 zlib stream names in its header.
        assert_eq!(DICTIONARY.len(), 1423);
        assert_eq!(adler32(&DICTIONARY), 0xe3c6_a7c2);
    }

    #[tokio::test]
    async fn frames_round_trip_through_one_compression_context_per_direction() {
        let mut deflater = Deflater::default();
        let frames = vec![
            Frame::SynStream {
                id: 1,
                fin: false,
                headers: vec![("streamtype".into(), "error".into())],
            },
            Frame::SynStream {
                id: 3,
                fin: true,
                headers: vec![
                    ("streamtype".into(), "stdout".into()),
                    ("port".into(), "8080".into()),
                ],
            },
            Frame::SynReply {
                id: 3,
                fin: false,
                headers: Vec::new(),
            },
            Frame::Data {
                id: 3,
                fin: true,
                data: b"hello".to_vec(),
            },
            Frame::Ping(7),
            Frame::RstStream {
                id: 5,
                status: CANCEL,
            },
        ];
        let mut wire = Vec::new();
        for frame in &frames {
            wire.extend(frame.encode(&mut deflater));
        }
        let mut reader = &wire[..];
        let mut inflater = Inflater::default();
        let mut read = Vec::new();
        while let Some(frame) = Frame::read(&mut reader, &mut inflater).await.unwrap() {
            read.push(frame);
        }
        assert_eq!(read, frames);
    }

    #[tokio::test]
    async fn a_session_carries_streams_both_ways() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let client = Session::new(a, Role::Client);
        let server = Session::new(b, Role::Server);
        let accept = tokio::spawn(async move {
            let mut stream = server.accept().await.unwrap();
            let kind = header(&stream.headers, "streamType").unwrap().to_owned();
            let got = stream.read_to_end().await;
            stream
                .send(format!("{kind}:{}", got.len()).as_bytes())
                .unwrap();
            stream.close();
            server
        });
        let mut stream = client
            .open(vec![("streamType".into(), "stdin".into())])
            .await
            .unwrap();
        stream.send(&vec![7u8; 100_000]).unwrap();
        stream.close();
        assert_eq!(stream.read_to_end().await, b"stdin:100000");
        let _server = accept.await.unwrap();
    }
}
