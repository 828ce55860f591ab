//! `bench-report`, the last step of `scripts/bench`, as the script runs it: a figures file in,
//! the markdown page and a chart per benchmark out, and a clear error for a file it cannot use.
//! Unit tier (no root).

use std::process::Command;

fn bench_report(args: &[&std::path::Path]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_bench-report"))
        .args(args)
        .output()
        .expect("run bench-report")
}

const FIGURES: &str = r#"{"kind":"bench","bench":"cni","title":"CNI plugin","note":"200 pods."}
{"kind":"figure","bench":"cni","case":"ADD p50","unit":"ms","tug":1.6,"references":[{"name":"bridge + host-local","value":12.8}]}
{"kind":"bench","bench":"proxy-ipvs","title":"IPVS mode","note":""}
{"kind":"figure","bench":"proxy-ipvs","case":"30000 from scratch","unit":"ms","tug":33100,"references":[{"name":"ipvsadm -R + ip -batch + nft -f","value":228900}]}
{"kind":"figure","bench":"proxy-ipvs","case":"one change at 30000","unit":"ms","tug":27.9,"references":[]}
"#;

#[test]
fn figures_become_a_page_with_a_chart_per_benchmark() {
    let dir = tempfile::tempdir().unwrap();
    let figures = dir.path().join("figures.jsonl");
    std::fs::write(&figures, FIGURES).unwrap();
    let out = dir.path().join("report");
    let run = bench_report(&[&figures, &out]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let page = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(
        page.contains("| ADD p50 | ms | 1.60 | 12.8 | 8.00× |"),
        "{page}"
    );
    assert!(
        page.contains("| 30000 from scratch | ms | 33100 | 228900 | 6.92× |"),
        "{page}"
    );
    assert!(
        page.contains("| one change at 30000 | ms | 27.9 | — | |"),
        "{page}"
    );
    for chart in ["cni.png", "proxy-ipvs.png"] {
        assert!(page.contains(&format!("({chart})")), "{page}");
        let bytes = std::fs::read(out.join(chart)).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{chart}");
    }
}

#[test]
fn a_file_it_cannot_use_is_named_with_the_line_at_fault() {
    let dir = tempfile::tempdir().unwrap();
    let figures = dir.path().join("figures.jsonl");
    std::fs::write(&figures, format!("{FIGURES}{{\"kind\":\"figure\"}}\n")).unwrap();
    let run = bench_report(&[&figures, dir.path()]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success());
    assert!(
        stderr.contains("figures.jsonl: line 6: not a benchmark record"),
        "{stderr}"
    );
    assert!(!dir.path().join("report.md").exists());

    std::fs::write(&figures, "").unwrap();
    let run = bench_report(&[&figures, dir.path()]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains("holds no benchmark"), "{stderr}");

    let run = bench_report(&[&figures]);
    assert_eq!(run.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&run.stderr).contains("usage: bench-report"));
}
