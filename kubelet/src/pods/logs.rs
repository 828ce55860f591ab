//! Container logs as the kubelet API serves them (`/containerLogs/{namespace}/{pod}/{container}`,
//! what `kubectl logs` reads through the API server): the CRI log files of the container's
//! current (or, with `previous`, last) attempt, turned back into the text the container wrote.
//! Options as upstream: `tailLines`, `limitBytes`, `timestamps`, `sinceSeconds`, `previous`.

use std::path::PathBuf;

use super::translate::pod_log_dir;
use super::worker::Shared;

/// Why logs cannot be served.
#[derive(Debug, PartialEq, Eq)]
pub enum LogError {
    /// No such pod, container or attempt.
    NotFound(String),
    /// A bad option.
    BadRequest(String),
}

/// The options of one request.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct LogOptions {
    /// Only the last N lines.
    pub tail_lines: Option<usize>,
    /// At most N bytes (from the start of what is selected).
    pub limit_bytes: Option<usize>,
    /// Prefix each line with its RFC 3339 timestamp.
    pub timestamps: bool,
    /// Only lines newer than N seconds.
    pub since_seconds: Option<i64>,
    /// The previous attempt instead of the current one.
    pub previous: bool,
    /// Keep streaming new output while the container runs.
    pub follow: bool,
}

impl LogOptions {
    /// The options in a query.
    pub fn parse(query: &[(String, String)]) -> Result<LogOptions, LogError> {
        let mut options = LogOptions::default();
        let number = |key: &str, value: &str| {
            value
                .parse::<i64>()
                .ok()
                .filter(|n| *n >= 0)
                .ok_or_else(|| {
                    LogError::BadRequest(format!(
                        "{key}={value:?}: expected a non-negative integer"
                    ))
                })
        };
        let flag = |value: &str| matches!(value, "true" | "1" | "");
        for (key, value) in query {
            match key.as_str() {
                "tailLines" => options.tail_lines = Some(number(key, value)? as usize),
                "limitBytes" => options.limit_bytes = Some(number(key, value)? as usize),
                "sinceSeconds" => options.since_seconds = Some(number(key, value)?),
                "timestamps" => options.timestamps = flag(value),
                "previous" => options.previous = flag(value),
                "follow" => options.follow = flag(value),
                _ => {}
            }
        }
        Ok(options)
    }
}

/// Turns CRI log records back into text: partial records joined, each full line with its
/// newline (and its timestamp when asked), then the selection applied.
pub fn render(records: &str, options: &LogOptions, now: jiff::Timestamp) -> Vec<u8> {
    let mut lines: Vec<String> = Vec::new();
    let mut partial = String::new();
    let since = options
        .since_seconds
        .map(|s| now - jiff::SignedDuration::from_secs(s));
    for record in records.lines() {
        let mut fields = record.splitn(4, ' ');
        let (Some(stamp), Some(_stream), Some(tag)) = (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let body = fields.next().unwrap_or_default();
        let time = stamp.parse::<jiff::Timestamp>().ok();
        if let (Some(since), Some(time)) = (since, time)
            && time < since
        {
            continue;
        }
        partial.push_str(body);
        if tag == "P" {
            continue;
        }
        let text = std::mem::take(&mut partial);
        lines.push(if options.timestamps {
            format!("{stamp} {text}\n")
        } else {
            format!("{text}\n")
        });
    }
    if !partial.is_empty() {
        lines.push(partial);
    }
    if let Some(tail) = options.tail_lines {
        let skip = lines.len().saturating_sub(tail);
        lines.drain(..skip);
    }
    let mut out = lines.concat().into_bytes();
    if let Some(limit) = options.limit_bytes {
        out.truncate(limit);
    }
    out
}

/// The container's log files, oldest attempt first.
fn attempts(dir: &PathBuf) -> Vec<PathBuf> {
    let mut files: Vec<(u32, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let path = e.path();
            let attempt = path
                .file_name()?
                .to_str()?
                .strip_suffix(".log")?
                .parse()
                .ok()?;
            Some((attempt, path))
        })
        .collect();
    files.sort();
    files.into_iter().map(|(_, p)| p).collect()
}

/// What a logs request selected: the text so far, and where a follow continues from.
#[derive(Debug)]
pub struct Selected {
    /// The rendered text.
    pub body: Vec<u8>,
    /// The log file read.
    pub file: PathBuf,
    /// Bytes of it consumed (only whole records).
    pub offset: u64,
    /// The request's options.
    pub options: LogOptions,
}

/// Renders the whole records in `chunk` for a follow (partial records as they come, timestamps
/// at the start of each line); returns the text and the bytes consumed.
pub fn render_more(chunk: &[u8], timestamps: bool, line_start: &mut bool) -> (Vec<u8>, usize) {
    let mut out = Vec::new();
    let mut consumed = 0;
    while let Some(end) = chunk[consumed..].iter().position(|b| *b == b'\n') {
        let record = String::from_utf8_lossy(&chunk[consumed..consumed + end]).into_owned();
        consumed += end + 1;
        let mut fields = record.splitn(4, ' ');
        let (Some(stamp), Some(_), Some(tag)) = (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if timestamps && *line_start {
            out.extend_from_slice(format!("{stamp} ").as_bytes());
        }
        out.extend_from_slice(fields.next().unwrap_or_default().as_bytes());
        *line_start = tag != "P";
        if *line_start {
            out.push(b'\n');
        }
    }
    (out, consumed)
}

/// Whether `container` of the pod runs now (a follow ends when it stops).
pub fn running(shared: &Shared, namespace: &str, name: &str, container: &str) -> bool {
    shared
        .pod(namespace, name)
        .and_then(|p| p.status)
        .is_some_and(|status| {
            status
                .container_statuses
                .iter()
                .flatten()
                .chain(status.init_container_statuses.iter().flatten())
                .any(|c| {
                    c.name == container && c.state.as_ref().is_some_and(|s| s.running.is_some())
                })
        })
}

/// The logs of `container` in the pod `namespace`/`name` that this kubelet runs.
pub fn read(
    shared: &Shared,
    namespace: &str,
    name: &str,
    container: &str,
    query: &[(String, String)],
) -> Result<Selected, LogError> {
    let options = LogOptions::parse(query)?;
    let pod = shared
        .pod(namespace, name)
        .ok_or_else(|| LogError::NotFound(format!("pod {namespace}/{name} is not on this node")))?;
    let known = pod.spec.as_ref().is_some_and(|s| {
        s.containers
            .iter()
            .chain(s.init_containers.iter().flatten())
            .any(|c| c.name == container)
    });
    if !known {
        return Err(LogError::NotFound(format!(
            "container {container:?} is not in pod {namespace}/{name}"
        )));
    }
    let dir = pod_log_dir(&shared.node.pod_logs_dir, &pod).join(container);
    let files = attempts(&dir);
    let chosen = if options.previous {
        files.len().checked_sub(2).and_then(|i| files.get(i))
    } else {
        files.last()
    };
    let Some(file) = chosen else {
        let which = if options.previous { "previous " } else { "" };
        return Err(LogError::NotFound(format!(
            "no {which}logs of container {container:?} in pod {namespace}/{name} yet"
        )));
    };
    let bytes = std::fs::read(file)
        .map_err(|e| LogError::NotFound(format!("read {}: {e}", file.display())))?;
    // Whole records only: a record being written is left for the follow.
    let whole = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    let text = String::from_utf8_lossy(&bytes[..whole]);
    Ok(Selected {
        body: render(&text, &options, jiff::Timestamp::now()),
        file: file.clone(),
        offset: whole as u64,
        options,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const RECORDS: &str = "2026-01-01T00:00:00.000000001Z stdout F one\n2026-01-01T00:00:10Z stderr P par\n2026-01-01T00:00:10Z stderr F tial\n2026-01-01T00:00:20Z stdout F three\n";

    fn at(seconds: i64) -> jiff::Timestamp {
        jiff::Timestamp::from_second(1_767_225_600 + seconds).unwrap()
    }

    #[test]
    fn records_become_the_text_written() {
        let all = render(RECORDS, &LogOptions::default(), at(30));
        assert_eq!(String::from_utf8(all).unwrap(), "one\npartial\nthree\n");
        let tail = LogOptions {
            tail_lines: Some(2),
            timestamps: true,
            ..Default::default()
        };
        assert_eq!(
            String::from_utf8(render(RECORDS, &tail, at(30))).unwrap(),
            "2026-01-01T00:00:10Z partial\n2026-01-01T00:00:20Z three\n"
        );
        let since = LogOptions {
            since_seconds: Some(15),
            ..Default::default()
        };
        assert_eq!(render(RECORDS, &since, at(30)), b"three\n");
        let limit = LogOptions {
            limit_bytes: Some(5),
            ..Default::default()
        };
        assert_eq!(render(RECORDS, &limit, at(30)), b"one\np");
    }

    #[test]
    fn options_are_checked() {
        let query = |k: &str, v: &str| vec![(k.to_owned(), v.to_owned())];
        assert_eq!(
            LogOptions::parse(&query("tailLines", "3"))
                .unwrap()
                .tail_lines,
            Some(3)
        );
        assert!(matches!(
            LogOptions::parse(&query("tailLines", "-1")),
            Err(LogError::BadRequest(m)) if m.contains("tailLines")
        ));
        assert!(
            LogOptions::parse(&query("previous", "true"))
                .unwrap()
                .previous
        );
        assert!(LogOptions::parse(&query("follow", "true")).unwrap().follow);
    }

    #[test]
    fn followed_records_keep_partial_lines_together() {
        let mut line_start = true;
        let chunk = b"2026-01-01T00:00:10Z stderr P par\n2026-01-01T00:00:10Z stderr F tial\n2026-01-01T00:00:20Z stdout F thr";
        let (out, used) = render_more(chunk, true, &mut line_start);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "2026-01-01T00:00:10Z partial\n"
        );
        assert_eq!(
            used,
            chunk.len() - "2026-01-01T00:00:20Z stdout F thr".len()
        );
        assert!(line_start);
    }
}
