//! `bench-report FIGURES OUT_DIR`: turns the figures the benchmarks appended to FIGURES (as
//! `$TUG_BENCH_REPORT`) into `OUT_DIR/report.md` and one `OUT_DIR/<bench>.png` chart per
//! benchmark. `scripts/bench` runs every benchmark and then this.

#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "a command-line tool reports on its standard streams"
)]

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use tug_tests::report;

/// What the report says about where it was measured.
fn header() -> Vec<String> {
    let output = |program: &str, args: &[&str]| -> Option<String> {
        Command::new(program)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or_else(String::new, |kib| {
            format!(", {:.0} GiB", kib as f64 / 1024.0 / 1024.0)
        });
    let mut lines = vec![
        format!(
            "measured: {}",
            output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]).unwrap_or_default()
        ),
        format!("machine: {cpu}, {cores} cores{memory}"),
        format!(
            "kernel: {}",
            output("uname", &["-r"]).unwrap_or_else(|| "unknown".into())
        ),
    ];
    if let Some(commit) = output("git", &["describe", "--always", "--dirty"]) {
        lines.push(format!("tug: commit {commit}, release build"));
    }
    lines
}

fn run(figures: &Path, out: &Path) -> Result<usize, String> {
    let text = std::fs::read_to_string(figures)
        .map_err(|e| format!("read the figures {}: {e}", figures.display()))?;
    let benches = report::parse(&text).map_err(|e| format!("{}: {e}", figures.display()))?;
    if benches.is_empty() {
        return Err(format!(
            "{} holds no benchmark: was $TUG_BENCH_REPORT set when they ran?",
            figures.display()
        ));
    }
    std::fs::create_dir_all(out).map_err(|e| format!("create {}: {e}", out.display()))?;
    for bench in &benches {
        report::chart(bench, &out.join(format!("{}.png", bench.bench)))?;
    }
    let page = out.join("report.md");
    std::fs::write(&page, report::markdown(&header(), &benches))
        .map_err(|e| format!("write {}: {e}", page.display()))?;
    Ok(benches.len())
}

fn main() -> ExitCode {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let [figures, out] = args.as_slice() else {
        eprintln!("usage: bench-report FIGURES OUT_DIR");
        return ExitCode::from(2);
    };
    match run(figures, out) {
        Ok(count) => {
            println!(
                "{} ({count} benchmarks, a chart each)",
                out.join("report.md").display()
            );
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("bench-report: {error}");
            ExitCode::FAILURE
        }
    }
}
