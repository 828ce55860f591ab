//! exec and attach (`remotecommand`) over SPDY: the client opens one stream per channel, each
//! named by its `streamType` header; the server runs the command once the streams it expects
//! are there, copies stdin/stdout/stderr, applies terminal resizes, and at the end writes a
//! `Status` to the `error` stream (v4: success, or failure with reason `NonZeroExitCode` and the
//! exit code as a cause) and closes.

use serde_json::{Value, json};

/// Sub-protocols, most capable first.
pub const PROTOCOLS: &[&str] = &[
    "v4.channel.k8s.io",
    "v3.channel.k8s.io",
    "v2.channel.k8s.io",
    "channel.k8s.io",
];
/// The header naming a stream's role.
pub const STREAM_TYPE: &str = "streamType";
/// Stream types.
pub const ERROR: &str = "error";
/// stdin.
pub const STDIN: &str = "stdin";
/// stdout.
pub const STDOUT: &str = "stdout";
/// stderr.
pub const STDERR: &str = "stderr";
/// Terminal size changes (v3+): JSON `{"Width":..,"Height":..}` messages.
pub const RESIZE: &str = "resize";

/// The v4 status for a finished command: `Success` for exit code 0, otherwise a `Failure` with
/// reason `NonZeroExitCode` and the code in `details.causes`.
pub fn exit_status(code: i32) -> Value {
    if code == 0 {
        return json!({"metadata": {}, "status": "Success"});
    }
    json!({
        "metadata": {},
        "status": "Failure",
        "message": format!("command terminated with non-zero exit code: error executing command, exit status {code}"),
        "reason": "NonZeroExitCode",
        "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]},
    })
}

/// The v4 status for a command that could not run.
pub fn error_status(message: &str) -> Value {
    json!({"metadata": {}, "status": "Failure", "message": message})
}

/// What the client learns from the error stream: the exit code, or why the command failed.
pub fn parse_status(bytes: &[u8]) -> Result<i32, String> {
    if bytes.is_empty() {
        return Ok(0);
    }
    let Ok(status) = serde_json::from_slice::<Value>(bytes) else {
        // Before v4 the error stream carries plain text.
        return Err(String::from_utf8_lossy(bytes).into_owned());
    };
    if status["status"] == "Success" {
        return Ok(0);
    }
    if status["reason"] == "NonZeroExitCode" {
        let code = status["details"]["causes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["reason"] == "ExitCode")
            .and_then(|c| c["message"].as_str())
            .and_then(|m| m.parse().ok());
        if let Some(code) = code {
            return Ok(code);
        }
    }
    Err(status["message"]
        .as_str()
        .unwrap_or("unknown failure")
        .to_owned())
}

/// A terminal size message of the resize stream.
pub fn parse_resize(bytes: &[u8]) -> Option<(u16, u16)> {
    let size: Value = serde_json::from_slice(bytes).ok()?;
    Some((
        u16::try_from(size["Width"].as_u64()?).ok()?,
        u16::try_from(size["Height"].as_u64()?).ok()?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_carry_exit_codes() {
        let bytes = |v: Value| serde_json::to_vec(&v).unwrap();
        assert_eq!(parse_status(&bytes(exit_status(0))), Ok(0));
        assert_eq!(parse_status(&bytes(exit_status(3))), Ok(3));
        assert_eq!(
            parse_status(&bytes(error_status("no such container"))),
            Err("no such container".into())
        );
        assert_eq!(parse_resize(br#"{"Width":80,"Height":24}"#), Some((80, 24)));
    }
}
