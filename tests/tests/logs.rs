//! netns tier (root, for a mount): container logs when the log directory's disk is full.
//! `tug shim-logger` (what containerd's runc shim runs for every container) writes a container's
//! log on a tmpfs too small for it. The container's output never waits on the log; what cannot
//! be written is dropped whole, so the log never holds a torn record; and once there is room
//! again, logging goes on.

use std::io::{BufRead, Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tug_tests::cni::tug_binary;
use tug_tests::tier::{Tier, require};

/// Lines the container writes, each this long with its newline.
const LINE: usize = 100;

fn line(prefix: &str, i: usize) -> String {
    let head = format!("{prefix}-{i:06} ");
    format!("{head}{}\n", "x".repeat(LINE - head.len() - 1))
}

/// Writes `count` lines to `fifo` and returns how long that took.
fn write_lines(out: &mut std::fs::File, prefix: &str, count: usize) -> Duration {
    let began = Instant::now();
    for i in 0..count {
        out.write_all(line(prefix, i).as_bytes())
            .expect("the container's write");
    }
    began.elapsed()
}

/// The first word of every record's line in the log at `path`; panics on a torn record.
fn records(path: &Path) -> Vec<String> {
    let text = std::fs::File::open(path).expect("open the log");
    let mut words = Vec::new();
    for record in std::io::BufReader::new(text).lines() {
        let record = record.expect("a log line");
        let fields: Vec<&str> = record.splitn(4, ' ').collect();
        assert_eq!(fields.len(), 4, "a torn record: {record:?}");
        assert_eq!((fields[1], fields[2]), ("stdout", "F"), "{record:?}");
        assert!(
            fields[0].parse::<jiff::Timestamp>().is_ok(),
            "a torn record (bad timestamp): {record:?}"
        );
        assert_eq!(fields[3].len(), LINE - 1, "a torn record: {record:?}");
        words.push(fields[3].split(' ').next().unwrap_or_default().to_owned());
    }
    words
}

struct Tmpfs(std::path::PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
#[ignore = "netns tier (root): run as root via ./scripts/test, or cargo build -p tug && cargo test -p tug-tests --test logs -- --ignored"]
fn a_full_log_disk_never_holds_up_the_container_nor_tears_a_record() {
    require(Tier::Netns);
    let dir = tempfile::tempdir().expect("temp dir");
    let logs = dir.path().join("logs");
    std::fs::create_dir(&logs).expect("create the log directory");
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=256k", "tmpfs"])
        .arg(&logs)
        .status()
        .expect("run mount");
    assert!(mounted.success(), "mount a 256 KiB tmpfs");
    let _tmpfs = Tmpfs(logs.clone());
    let fifo = |name: &str| {
        let path = dir.path().join(name);
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600))
            .expect("mkfifo");
        path
    };
    let (stdout, stderr) = (fifo("stdout"), fifo("stderr"));
    let log = logs.join("app").join("0.log");
    let mut logger = Command::new(tug_binary())
        .arg("shim-logger")
        .arg(&log)
        .arg("--stdout-fifo")
        .arg(&stdout)
        .arg("--stderr-fifo")
        .arg(&stderr)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start tug shim-logger");
    // It closes its stdout once it is ready for the container.
    let mut ready = String::new();
    let _ = logger
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut ready);
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .open(&stdout)
        .expect("open the stdout FIFO as the container");
    let err = std::fs::OpenOptions::new()
        .write(true)
        .open(&stderr)
        .expect("open the stderr FIFO as the container");

    // 500 KiB into 256 KiB: the disk fills about half way.
    let full_for = write_lines(&mut out, "before", 5_000);
    std::thread::sleep(Duration::from_millis(500));
    // The disk is full, and what is on it is whole records.
    let full = std::fs::metadata(&log).expect("the log").len();
    assert!(full > 200 * 1024, "the log disk never filled: {full} bytes");
    let before = records(&log);
    assert!(
        !before.is_empty() && before.len() < 5_000,
        "{} of 5,000 lines on a full disk",
        before.len()
    );
    // Room again, as after the kubelet rotates the log away.
    std::fs::remove_file(&log).expect("remove the full log");
    Command::new("kill")
        .args(["-USR1", &logger.id().to_string()])
        .status()
        .expect("signal the logger to reopen");
    std::thread::sleep(Duration::from_millis(200));
    write_lines(&mut out, "after", 500);
    drop((out, err));
    let exited = logger
        .wait()
        .expect("the logger exits once the FIFOs close");
    assert!(exited.success(), "tug shim-logger: {exited}");
    let mut messages = String::new();
    logger
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut messages)
        .expect("read the logger's stderr");

    // The container was not held up: 5,000 lines, half of them dropped, in moments.
    assert!(
        full_for < Duration::from_secs(10),
        "the container's output waited {full_for:?} on a full log disk"
    );
    // Everything after the disk had room again, every record whole.
    let after = records(&log);
    let wanted: Vec<String> = (0..500).map(|i| format!("after-{i:06}")).collect();
    assert_eq!(after, wanted, "every line written once there was room");
    // Said when it starts dropping and when it stops (a nearly full disk may take a short
    // chunk between two long ones that do not fit), not once a line.
    let lines: Vec<&str> = messages.lines().collect();
    assert!(
        messages.contains("dropping output") && lines.len() <= 10,
        "the logger's messages:\n{messages}"
    );
    assert!(
        lines.last().is_some_and(|l| l.contains("writing again")),
        "the logger's messages:\n{messages}"
    );
}
