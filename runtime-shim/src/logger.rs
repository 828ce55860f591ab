//! Container logs in the CRI format, written by a logging process containerd's runc shim starts
//! for each container (containerd's "binary" stdio: `binary:///path/to/tug?shim-logger=<log path>`
//! makes the shim run `tug shim-logger <log path>` with the container's stdout on fd 3, stderr
//! on fd 4 and a readiness pipe on fd 5). Binary stdio has no stdin, so for a container with
//! stdin tug shim starts `tug shim-logger <log path> --stdout-fifo .. --stderr-fifo ..` itself,
//! in a session of its own, reading the FIFOs the runc shim writes.
//!
//! Because neither runs inside tug shim, logs keep flowing while tug shim restarts. Each line becomes `<RFC3339Nano> <stdout|stderr> <F|P> <text>`; lines longer than
//! 16 KiB are split into partial (`P`) records as containerd does. SIGUSR1 reopens the file
//! (ReopenContainerLog after the kubelet rotates it); SIGTERM is ignored so the tail is drained
//! until the shim closes the pipes.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::FromRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// The longest record body before a line is split into partial records (containerd's default).
pub const MAX_RECORD: usize = 16 * 1024;

/// Splits one stream's bytes into CRI log records, keeping an unfinished line between chunks.
#[derive(Debug)]
pub struct Records {
    stream: &'static str,
    pending: Vec<u8>,
}

impl Records {
    /// Records for `stream` (`stdout` or `stderr`).
    pub fn new(stream: &'static str) -> Records {
        Records {
            stream,
            pending: Vec::new(),
        }
    }

    fn record(&self, out: &mut Vec<u8>, timestamp: &str, tag: &str, body: &[u8]) {
        out.extend_from_slice(timestamp.as_bytes());
        out.push(b' ');
        out.extend_from_slice(self.stream.as_bytes());
        out.push(b' ');
        out.extend_from_slice(tag.as_bytes());
        out.push(b' ');
        out.extend_from_slice(body);
        out.push(b'\n');
    }

    /// Appends the records completed by `data` to `out`.
    pub fn feed(&mut self, data: &[u8], timestamp: &str, out: &mut Vec<u8>) {
        self.pending.extend_from_slice(data);
        let mut start = 0;
        while let Some(offset) = self.pending[start..].iter().position(|b| *b == b'\n') {
            let line_end = start + offset;
            let mut line = &self.pending[start..line_end];
            while line.len() > MAX_RECORD {
                self.record(out, timestamp, "P", &line[..MAX_RECORD]);
                line = &line[MAX_RECORD..];
            }
            self.record(out, timestamp, "F", line);
            start = line_end + 1;
        }
        self.pending.drain(..start);
        while self.pending.len() > MAX_RECORD {
            let chunk: Vec<u8> = self.pending.drain(..MAX_RECORD).collect();
            self.record(out, timestamp, "P", &chunk);
        }
    }

    /// Flushes an unfinished last line as a partial record (the output had no final newline).
    pub fn finish(&mut self, timestamp: &str, out: &mut Vec<u8>) {
        if !self.pending.is_empty() {
            let rest = std::mem::take(&mut self.pending);
            self.record(out, timestamp, "P", &rest);
        }
    }
}

fn timestamp() -> String {
    jiff::Timestamp::now().to_string()
}

static REOPEN: AtomicBool = AtomicBool::new(false);

extern "C" fn request_reopen(_: nix::libc::c_int) {
    REOPEN.store(true, Ordering::SeqCst);
}

fn open(path: &Path) -> std::io::Result<File> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    OpenOptions::new().create(true).append(true).open(path)
}

struct Sink {
    path: PathBuf,
    file: File,
    /// Bytes of output dropped since the last write that went through (a full disk).
    dropped: u64,
}

impl Sink {
    fn write(&mut self, bytes: &[u8]) {
        if REOPEN.swap(false, Ordering::SeqCst) {
            match open(&self.path) {
                Ok(file) => self.file = file,
                Err(error) => eprintln!("tug shim-logger: reopen {}: {error}", self.path.display()),
            }
        }
        // The container's output is never held up by its log: what cannot be written (a full
        // disk) is dropped, said once when it starts and once when writing works again.
        match append_whole(&mut self.file, bytes) {
            Ok(()) if self.dropped > 0 => {
                eprintln!(
                    "tug shim-logger: {}: writing again; {} bytes of output were dropped",
                    self.path.display(),
                    self.dropped
                );
                self.dropped = 0;
            }
            Ok(()) => {}
            Err(error) => {
                if self.dropped == 0 {
                    eprintln!(
                        "tug shim-logger: write {}: {error}; dropping output until it can be written",
                        self.path.display()
                    );
                }
                self.dropped += bytes.len() as u64;
            }
        }
    }
}

/// Appends `bytes` (whole records) to `file` whole or not at all: a write cut short, as on a
/// full disk, is taken back, so the log never holds a torn record that the next one would run
/// into and a reader would misparse.
fn append_whole(file: &mut File, bytes: &[u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < bytes.len() {
        let error = match file.write(&bytes[done..]) {
            Ok(0) => std::io::Error::from(std::io::ErrorKind::WriteZero),
            Ok(n) => {
                done += n;
                continue;
            }
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(error) => error,
        };
        if done > 0 {
            let len = file.metadata()?.len();
            file.set_len(len.saturating_sub(done as u64))?;
        }
        return Err(error);
    }
    Ok(())
}

fn pump(mut input: File, stream: &'static str, sink: Arc<Mutex<Sink>>) {
    let mut records = Records::new(stream);
    let mut buffer = vec![0u8; 32 * 1024];
    let mut out = Vec::new();
    loop {
        let n = match input.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => n,
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        out.clear();
        records.feed(&buffer[..n], &timestamp(), &mut out);
        if !out.is_empty() {
            sink.lock().unwrap_or_else(|p| p.into_inner()).write(&out);
        }
    }
    out.clear();
    records.finish(&timestamp(), &mut out);
    if !out.is_empty() {
        sink.lock().unwrap_or_else(|p| p.into_inner()).write(&out);
    }
}

/// Where the container's output comes from.
#[derive(Debug)]
pub enum Inputs {
    /// containerd's binary logging protocol: stdout on fd 3, stderr on fd 4, readiness on fd 5.
    Fds,
    /// FIFOs containerd's runc shim writes (its plain FIFO stdio, which a container with stdin
    /// needs); each is opened when the shim opens its end. With a terminal there is no stderr.
    Fifos {
        /// The stdout FIFO.
        stdout: PathBuf,
        /// The stderr FIFO, without a terminal.
        stderr: Option<PathBuf>,
        /// The container's stdin FIFO. The runc shim reads it without holding a writer, so this
        /// process holds one (from before the task exists, announced by closing its stdout,
        /// until SIGUSR2): the container's stdin ends only when asked, not when tug shim
        /// restarts.
        stdin: Option<PathBuf>,
    },
}

/// Opens a writer of the stdin FIFO at `path` and keeps it until SIGUSR2 (the container's
/// `stdinOnce` session ended). SIGUSR2 is blocked in every thread and taken by one that waits
/// for it.
fn hold_stdin(path: &Path) -> std::io::Result<()> {
    use nix::sys::signal::{SigSet, SigmaskHow, Signal, pthread_sigmask};
    let mut usr2 = SigSet::empty();
    usr2.add(Signal::SIGUSR2);
    pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&usr2), None)?;
    // Read and write: opening never blocks, and nothing is ever read through it.
    let writer = OpenOptions::new().read(true).write(true).open(path)?;
    std::thread::spawn(move || {
        let _ = usr2.wait();
        drop(writer);
    });
    Ok(())
}

/// Runs the logging process for the log file at `path`; returns the exit status.
pub fn run(path: &Path, inputs: Inputs) -> u8 {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    let file = match open(path) {
        Ok(file) => file,
        Err(error) => {
            eprintln!("tug shim-logger: open {}: {error}", path.display());
            return 1;
        }
    };
    let ignore = SigAction::new(SigHandler::SigIgn, SaFlags::empty(), SigSet::empty());
    let reopen = SigAction::new(
        SigHandler::Handler(request_reopen),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    // SAFETY: the handlers are SIG_IGN and a function that only stores to an atomic, which is
    // async-signal-safe; no other code in this process installs handlers for these signals.
    unsafe {
        let _ = sigaction(Signal::SIGTERM, &ignore);
        let _ = sigaction(Signal::SIGUSR1, &reopen);
    }
    let sink = Arc::new(Mutex::new(Sink {
        path: path.to_owned(),
        file,
        dropped: 0,
    }));
    type Source = Box<dyn FnOnce() -> std::io::Result<File> + Send>;
    let (sources, ready): (Vec<(Source, &'static str)>, Option<File>) = match inputs {
        Inputs::Fds => {
            // SAFETY: containerd's shim hands this process fds 3 (stdout), 4 (stderr) and 5
            // (readiness) by the binary logging protocol; nothing else in the process owns or
            // closes them.
            let (stdout, stderr, ready) = unsafe {
                (
                    File::from_raw_fd(3),
                    File::from_raw_fd(4),
                    File::from_raw_fd(5),
                )
            };
            (
                vec![
                    (Box::new(move || Ok(stdout)), "stdout"),
                    (Box::new(move || Ok(stderr)), "stderr"),
                ],
                Some(ready),
            )
        }
        Inputs::Fifos {
            stdout,
            stderr,
            stdin,
        } => {
            if let Some(stdin) = stdin
                && let Err(error) = hold_stdin(&stdin)
            {
                eprintln!("tug shim-logger: hold {}: {error}", stdin.display());
                return 1;
            }
            // Ready: whoever started this process may create the task now.
            let _ = nix::unistd::close(1);
            // Opening a FIFO for reading waits for its writer: the runc shim, once the task
            // exists.
            let mut sources: Vec<(Source, &'static str)> =
                vec![(Box::new(move || File::open(stdout)), "stdout")];
            if let Some(stderr) = stderr {
                sources.push((Box::new(move || File::open(stderr)), "stderr"));
            }
            (sources, None)
        }
    };
    let pumps: Vec<_> = sources
        .into_iter()
        .map(|(source, stream)| {
            let sink = sink.clone();
            std::thread::spawn(move || match source() {
                Ok(input) => pump(input, stream, sink),
                Err(error) => eprintln!("tug shim-logger: open the container's {stream}: {error}"),
            })
        })
        .collect();
    // Closing the readiness pipe tells the shim the container may start.
    drop(ready);
    for pump in pumps {
        let _ = pump.join();
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed_all(chunks: &[&[u8]]) -> String {
        let mut records = Records::new("stdout");
        let mut out = Vec::new();
        for chunk in chunks {
            records.feed(chunk, "T", &mut out);
        }
        records.finish("T", &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn lines_become_full_records_across_chunk_boundaries() {
        assert_eq!(
            feed_all(&[b"hello\nwor", b"ld\n", b"\n"]),
            "T stdout F hello\nT stdout F world\nT stdout F \n"
        );
    }

    #[test]
    fn an_unterminated_last_line_is_partial() {
        assert_eq!(
            feed_all(&[b"a\nno newline"]),
            "T stdout F a\nT stdout P no newline\n"
        );
    }

    #[test]
    fn long_lines_split_into_partial_records() {
        let line = vec![b'x'; MAX_RECORD * 2 + 10];
        let mut input = line.clone();
        input.push(b'\n');
        let text = feed_all(&[&input[..100], &input[100..]]);
        let tags: Vec<&str> = text.lines().map(|l| l.split(' ').nth(2).unwrap()).collect();
        assert_eq!(tags, ["P", "P", "F"]);
        let body: usize = text
            .lines()
            .map(|l| l.splitn(4, ' ').nth(3).unwrap().len())
            .sum();
        assert_eq!(body, line.len());
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        let stamp = timestamp();
        assert!(stamp.ends_with('Z') && stamp.contains('T'), "{stamp}");
        assert!(stamp.parse::<jiff::Timestamp>().is_ok(), "{stamp}");
    }
}
