//! The benchmark report: every benchmark appends its figures, tug's next to the reference
//! tools' measured in the same run, as JSON lines to the file `$TUG_BENCH_REPORT` names
//! ([`Report`]); `bench-report` turns that file into one markdown page ([`markdown`]) with a
//! PNG chart per benchmark ([`chart`]). `scripts/bench` runs the lot.
//!
//! Every figure is lower-is-better (a time, a size, a share of a core), so a ratio is the
//! reference's figure over tug's: above 1 tug is ahead by that factor.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// One line of the figures file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Record {
    /// A benchmark: its title and what a reader needs to know to read its figures.
    Bench {
        /// Its key, also the chart's file name.
        bench: String,
        /// A heading.
        title: String,
        /// How it was measured (may be empty).
        note: String,
    },
    /// One figure of a benchmark.
    Figure(Figure),
}

/// One measured case: tug's figure and the reference tools' for the same work.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Figure {
    /// The benchmark it belongs to.
    pub bench: String,
    /// What was measured, e.g. `10000 from scratch` or `ADD p50`.
    pub case: String,
    /// The unit of every value in it, e.g. `ms`.
    pub unit: String,
    /// tug's figure.
    pub tug: f64,
    /// The reference tools' figures, by tool.
    pub references: Vec<Reference>,
}

/// A reference tool's figure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reference {
    /// The tool, e.g. `iptables-nft-restore`.
    pub name: String,
    /// Its figure, in the figure's unit.
    pub value: f64,
}

/// Where a benchmark's records go.
#[derive(Debug, Clone)]
enum Sink {
    /// Appended to this file.
    File(std::path::PathBuf),
    /// Printed on stdout behind this prefix, for a benchmark half that runs in a guest and
    /// whose host records them ([`append_line`]).
    Console(&'static str),
    /// Nowhere: no report was asked for.
    Nowhere,
}

/// A benchmark's writer of records.
#[derive(Debug, Clone)]
pub struct Report {
    bench: String,
    sink: Sink,
}

impl Report {
    /// Starts benchmark `bench` in the file `$TUG_BENCH_REPORT` (if set): records its title
    /// and note.
    pub fn new(bench: &str, title: &str, note: &str) -> Report {
        let sink = match std::env::var_os("TUG_BENCH_REPORT") {
            Some(path) if !path.is_empty() => Sink::File(path.into()),
            _ => Sink::Nowhere,
        };
        Report::with_sink(bench, title, note, sink)
    }

    /// As [`Report::new`], printing each record behind `prefix` instead.
    pub fn on_console(bench: &str, title: &str, note: &str, prefix: &'static str) -> Report {
        Report::with_sink(bench, title, note, Sink::Console(prefix))
    }

    fn with_sink(bench: &str, title: &str, note: &str, sink: Sink) -> Report {
        let report = Report {
            bench: bench.to_owned(),
            sink,
        };
        report.write(&Record::Bench {
            bench: bench.to_owned(),
            title: title.to_owned(),
            note: note.to_owned(),
        });
        report
    }

    /// Records `case`: tug's `value` and the references' `(tool, value)`, all in `unit`.
    pub fn figure(&self, case: &str, unit: &str, tug: f64, references: &[(&str, f64)]) {
        self.write(&Record::Figure(Figure {
            bench: self.bench.clone(),
            case: case.to_owned(),
            unit: unit.to_owned(),
            tug,
            references: references
                .iter()
                .map(|(name, value)| Reference {
                    name: (*name).to_owned(),
                    value: *value,
                })
                .collect(),
        }));
    }

    /// [`Report::figure`] for durations, in milliseconds.
    pub fn millis(
        &self,
        case: &str,
        tug: std::time::Duration,
        references: &[(&str, std::time::Duration)],
    ) {
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
        let references: Vec<(&str, f64)> = references.iter().map(|(n, d)| (*n, ms(*d))).collect();
        self.figure(case, "ms", ms(tug), &references);
    }

    fn write(&self, record: &Record) {
        let line = serde_json::to_string(record).expect("a record is JSON");
        match &self.sink {
            Sink::File(path) => append_line(path, &line),
            Sink::Console(prefix) => {
                #[allow(
                    clippy::print_stdout,
                    reason = "the guest half of a benchmark reports through its console"
                )]
                {
                    println!("{prefix}{line}");
                }
            }
            Sink::Nowhere => {}
        }
    }
}

/// Appends one record `line` (as [`Report`] writes it, e.g. relayed from a guest) to `path`.
pub fn append_line(path: &Path, line: &str) {
    serde_json::from_str::<Record>(line)
        .unwrap_or_else(|e| panic!("not a benchmark record ({e}): {line}"));
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open the benchmark report {}: {e}", path.display()));
    // One write per line: records of benchmarks run side by side do not interleave.
    file.write_all(format!("{line}\n").as_bytes())
        .unwrap_or_else(|e| panic!("append to {}: {e}", path.display()));
}

/// A benchmark as the report shows it: its cases in the order first measured, a case measured
/// again replaced by its last figures.
#[derive(Debug, Clone, PartialEq)]
pub struct Bench {
    /// Its key.
    pub bench: String,
    /// Its heading.
    pub title: String,
    /// Its note.
    pub note: String,
    /// Its figures.
    pub figures: Vec<Figure>,
}

impl Bench {
    /// Every reference tool named in it, in the order first named.
    pub fn reference_names(&self) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for figure in &self.figures {
            for reference in &figure.references {
                if !names.contains(&reference.name) {
                    names.push(reference.name.clone());
                }
            }
        }
        names
    }
}

/// Reads a figures file: the benchmarks in the order they started. A line that is not a record
/// is an error naming its line number.
pub fn parse(text: &str) -> Result<Vec<Bench>, String> {
    let mut benches: Vec<Bench> = Vec::new();
    let mut index: BTreeMap<String, usize> = BTreeMap::new();
    for (number, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let record: Record = serde_json::from_str(line)
            .map_err(|e| format!("line {}: not a benchmark record: {e}", number + 1))?;
        match record {
            Record::Bench { bench, title, note } => match index.get(&bench) {
                Some(&i) => {
                    benches[i].title = title;
                    benches[i].note = note;
                }
                None => {
                    index.insert(bench.clone(), benches.len());
                    benches.push(Bench {
                        bench,
                        title,
                        note,
                        figures: Vec::new(),
                    });
                }
            },
            Record::Figure(figure) => {
                let Some(&i) = index.get(&figure.bench) else {
                    return Err(format!(
                        "line {}: a figure of benchmark {:?}, which no earlier line starts",
                        number + 1,
                        figure.bench
                    ));
                };
                if !figure.tug.is_finite() || figure.references.iter().any(|r| !r.value.is_finite())
                {
                    return Err(format!(
                        "line {}: {:?} {:?} has a figure that is not a number",
                        number + 1,
                        figure.bench,
                        figure.case
                    ));
                }
                let figures = &mut benches[i].figures;
                match figures.iter_mut().find(|f| f.case == figure.case) {
                    Some(old) => *old = figure,
                    None => figures.push(figure),
                }
            }
        }
    }
    Ok(benches)
}

/// A figure as the report prints it: three significant digits, no exponent.
pub fn number(value: f64) -> String {
    let magnitude = value.abs();
    if magnitude >= 100.0 || magnitude == 0.0 {
        format!("{value:.0}")
    } else if magnitude >= 10.0 {
        format!("{value:.1}")
    } else if magnitude >= 1.0 {
        format!("{value:.2}")
    } else {
        let decimals = (2.0 - magnitude.log10().floor()) as usize;
        format!("{value:.decimals$}")
    }
}

/// The ratio of a reference's figure to tug's, as the report prints it.
pub fn ratio(reference: f64, tug: f64) -> String {
    if tug <= 0.0 {
        return "—".into();
    }
    let ratio = reference / tug;
    if ratio >= 10.0 {
        format!("{ratio:.0}×")
    } else {
        format!("{ratio:.2}×")
    }
}

/// The report's markdown: a heading of `header` lines, then per benchmark its note, a table of
/// its cases (tug, every reference and its ratio) and its chart, `<bench>.png` beside the page.
pub fn markdown(header: &[String], benches: &[Bench]) -> String {
    let mut page = String::from("# tug benchmark report\n\n");
    for line in header {
        page.push_str(&format!("- {line}\n"));
    }
    page.push_str(
        "\nEvery figure is lower-is-better. A ratio is the reference's figure over tug's, both \
         measured in this run: above 1× tug is ahead by that factor, below 1× behind.\n",
    );
    for bench in benches {
        page.push_str(&format!("\n## {}\n\n", bench.title));
        if !bench.note.is_empty() {
            page.push_str(&format!("{}\n\n", bench.note));
        }
        let names = bench.reference_names();
        let mut head = String::from("| case | unit | tug |");
        let mut rule = String::from("|---|---|---:|");
        for name in &names {
            head.push_str(&format!(" {name} | ratio |"));
            rule.push_str("---:|---:|");
        }
        page.push_str(&format!("{head}\n{rule}\n"));
        for figure in &bench.figures {
            let mut row = format!(
                "| {} | {} | {} |",
                figure.case,
                figure.unit,
                number(figure.tug)
            );
            for name in &names {
                match figure.references.iter().find(|r| &r.name == name) {
                    Some(reference) => row.push_str(&format!(
                        " {} | {} |",
                        number(reference.value),
                        ratio(reference.value, figure.tug)
                    )),
                    None => row.push_str(" — | |"),
                }
            }
            page.push_str(&format!("{row}\n"));
        }
        page.push_str(&format!(
            "\n![{}]({}.png)\n",
            bench.title.replace(['[', ']'], ""),
            bench.bench
        ));
    }
    page
}

/// Where Debian's `fonts-dejavu-core` puts the font the charts are lettered in.
pub const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// Loads [`FONT`] as the charts' sans-serif, once.
fn register_font() -> Result<(), String> {
    static REGISTERED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            let bytes = std::fs::read(FONT).map_err(|e| {
                format!("read the charts' font {FONT} ({e}); apt package fonts-dejavu-core")
            })?;
            plotters::style::register_font(
                "sans-serif",
                plotters::style::FontStyle::Normal,
                Box::leak(bytes.into_boxed_slice()),
            )
            .map_err(|_| format!("{FONT} is not a font plotters can read"))
        })
        .clone()
}

/// The colour of tug's bars and of each reference's, in order.
const COLOURS: [plotters::style::RGBColor; 5] = [
    plotters::style::RGBColor(0x1f, 0x77, 0xb4),
    plotters::style::RGBColor(0xff, 0x7f, 0x0e),
    plotters::style::RGBColor(0x2c, 0xa0, 0x2c),
    plotters::style::RGBColor(0x94, 0x67, 0xbd),
    plotters::style::RGBColor(0x8c, 0x56, 0x4b),
];

/// The chart's size in pixels.
pub const CHART_SIZE: (u32, u32) = (1200, 640);

/// Draws `bench` as grouped bars, one group per case (tug first, then each reference), into a
/// PNG at `path`. Values that span more than two orders of magnitude get a log scale.
pub fn chart(bench: &Bench, path: &Path) -> Result<(), String> {
    draw(
        bench,
        plotters::prelude::BitMapBackend::new(path, CHART_SIZE),
    )
    .map_err(|e| format!("draw {}: {e}", path.display()))
}

/// The chart's grid and y axis (the cases under the bars are lettered by [`draw`]).
fn mesh<DB, Y>(
    chart: &mut plotters::chart::ChartContext<
        '_,
        DB,
        plotters::coord::cartesian::Cartesian2d<plotters::coord::types::RangedCoordf64, Y>,
    >,
    y_desc: &str,
) -> Result<(), String>
where
    DB: plotters::prelude::DrawingBackend,
    Y: plotters::coord::ranged1d::Ranged<ValueType = f64>
        + plotters::coord::ranged1d::ValueFormatter<f64>,
{
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_desc(y_desc)
        .label_style(("sans-serif", 15))
        .draw()
        .map_err(|e| e.to_string())
}

/// Draws `bench` on `backend` ([`CHART_SIZE`]), as [`chart`] describes.
fn draw<DB: plotters::prelude::DrawingBackend>(bench: &Bench, backend: DB) -> Result<(), String> {
    use plotters::prelude::*;
    register_font()?;
    if bench.figures.is_empty() {
        return Err(format!("benchmark {} has no figures to chart", bench.bench));
    }
    let names = bench.reference_names();
    let mut series = vec!["tug".to_owned()];
    series.extend(names.iter().cloned());
    let value = |figure: &Figure, s: usize| -> Option<f64> {
        if s == 0 {
            Some(figure.tug)
        } else {
            figure
                .references
                .iter()
                .find(|r| r.name == names[s - 1])
                .map(|r| r.value)
        }
    };
    let values: Vec<f64> = bench
        .figures
        .iter()
        .flat_map(|f| (0..series.len()).filter_map(move |s| value(f, s)))
        .filter(|v| *v > 0.0)
        .collect();
    let max = values.iter().cloned().fold(f64::MIN_POSITIVE, f64::max);
    let min = values.iter().cloned().fold(max, f64::min);
    let log = max / min > 100.0;
    let units: Vec<&str> = {
        let mut units: Vec<&str> = bench.figures.iter().map(|f| f.unit.as_str()).collect();
        units.dedup();
        units
    };
    let err = |e: &dyn std::fmt::Display| e.to_string();
    let root = backend.into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let cases = bench.figures.len();
    let mut builder = ChartBuilder::on(&root);
    builder
        .caption(&bench.title, ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(60)
        .y_label_area_size(80);
    let y_desc = format!(
        "{}{}",
        units.join(", "),
        if log { " (log scale)" } else { "" }
    );
    // Bars are drawn in the root area's pixels, placed through the chart's coordinates.
    let mut bars: Vec<(i32, i32, i32, i32, usize, f64)> = Vec::new();
    let mut labels: Vec<(i32, i32, &str)> = Vec::new();
    let mut place = |to_pixel: &dyn Fn(f64, f64) -> (i32, i32), floor: f64| {
        for (i, figure) in bench.figures.iter().enumerate() {
            let (x, y) = to_pixel(i as f64 + 0.5, floor);
            labels.push((x, y + 8, figure.case.as_str()));
            let width = 0.8 / series.len() as f64;
            for s in 0..series.len() {
                let Some(v) = value(figure, s) else { continue };
                let left = i as f64 + 0.1 + width * s as f64;
                let (x0, y0) = to_pixel(left, v.max(floor));
                let (x1, y1) = to_pixel(left + width * 0.92, floor);
                bars.push((x0, y0, x1, y1, s, v));
            }
        }
    };
    let x_range = 0.0..cases as f64;
    if log {
        let floor = min / 2.0;
        let mut chart = builder
            .build_cartesian_2d(x_range, (floor..max * 2.0).log_scale())
            .map_err(|e| err(&e))?;
        mesh(&mut chart, &y_desc)?;
        place(&|x, y| chart.backend_coord(&(x, y)), floor);
    } else {
        let mut chart = builder
            .build_cartesian_2d(x_range, 0.0..max * 1.15)
            .map_err(|e| err(&e))?;
        mesh(&mut chart, &y_desc)?;
        place(&|x, y| chart.backend_coord(&(x, y)), 0.0);
    }
    for (x0, y0, x1, y1, s, v) in bars {
        let colour = COLOURS[s % COLOURS.len()];
        root.draw(&Rectangle::new([(x0, y0), (x1, y1)], colour.filled()))
            .map_err(|e| err(&e))?;
        if bench.figures.len() * series.len() <= 24 {
            root.draw(&Text::new(
                number(v),
                ((x0 + x1) / 2 - 14, y0 - 16),
                ("sans-serif", 12),
            ))
            .map_err(|e| err(&e))?;
        }
    }
    // Each group's case under it, centred (about 7 px a character).
    for (x, y, case) in labels {
        let half = (case.chars().count() as i32 * 7) / 2;
        root.draw(&Text::new(
            case.to_owned(),
            (x - half, y),
            ("sans-serif", 14),
        ))
        .map_err(|e| err(&e))?;
    }
    // The legend, top right, on white over whatever bar is under it.
    let widest = series.iter().map(|n| n.chars().count()).max().unwrap_or(0) as i32;
    let (left, top) = (CHART_SIZE.0 as i32 - 336, 54);
    root.draw(&Rectangle::new(
        [
            (left, top),
            (left + 32 + widest * 8, top + 8 + 22 * series.len() as i32),
        ],
        WHITE.filled(),
    ))
    .map_err(|e| err(&e))?;
    for (s, name) in series.iter().enumerate() {
        let (x, y) = (CHART_SIZE.0 as i32 - 330, 60 + 22 * s as i32);
        root.draw(&Rectangle::new(
            [(x, y), (x + 14, y + 14)],
            COLOURS[s % COLOURS.len()].filled(),
        ))
        .map_err(|e| err(&e))?;
        root.draw(&Text::new(name.clone(), (x + 20, y), ("sans-serif", 15)))
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines() -> String {
        [
            r#"{"kind":"bench","bench":"cni","title":"CNI","note":"200 pods"}"#,
            r#"{"kind":"figure","bench":"cni","case":"ADD p50","unit":"ms","tug":2.0,"references":[{"name":"bridge","value":9.0}]}"#,
            r#"{"kind":"figure","bench":"cni","case":"DEL p50","unit":"ms","tug":1.0,"references":[]}"#,
            r#"{"kind":"figure","bench":"cni","case":"ADD p50","unit":"ms","tug":3.0,"references":[{"name":"bridge","value":12.0},{"name":"other","value":1.5}]}"#,
        ]
        .join("\n")
    }

    #[test]
    fn a_case_measured_again_keeps_its_place_and_takes_the_last_figures() {
        let benches = parse(&lines()).unwrap();
        assert_eq!(benches.len(), 1);
        let cases: Vec<(&str, f64)> = benches[0]
            .figures
            .iter()
            .map(|f| (f.case.as_str(), f.tug))
            .collect();
        assert_eq!(cases, [("ADD p50", 3.0), ("DEL p50", 1.0)]);
        assert_eq!(benches[0].reference_names(), ["bridge", "other"]);
    }

    #[test]
    fn the_table_puts_each_reference_and_its_ratio_beside_tug() {
        let page = markdown(&["commit abc".into()], &parse(&lines()).unwrap());
        assert!(page.contains("- commit abc\n"), "{page}");
        assert!(
            page.contains("| case | unit | tug | bridge | ratio | other | ratio |"),
            "{page}"
        );
        // 12 / 3 = 4× ahead of bridge; 1.5 / 3 = half as fast as "other".
        assert!(
            page.contains("| ADD p50 | ms | 3.00 | 12.0 | 4.00× | 1.50 | 0.50× |"),
            "{page}"
        );
        assert!(
            page.contains("| DEL p50 | ms | 1.00 | — | | — | |"),
            "{page}"
        );
        assert!(page.contains("![CNI](cni.png)"), "{page}");
    }

    #[test]
    fn a_bad_line_is_named_by_its_number() {
        let text = format!("{}\nnot json", lines());
        let error = parse(&text).unwrap_err();
        assert!(
            error.starts_with("line 5: not a benchmark record"),
            "{error}"
        );
        let orphan =
            r#"{"kind":"figure","bench":"x","case":"c","unit":"ms","tug":1.0,"references":[]}"#;
        let error = parse(orphan).unwrap_err();
        assert!(
            error.contains("\"x\", which no earlier line starts"),
            "{error}"
        );
    }

    #[test]
    fn numbers_keep_three_significant_digits() {
        assert_eq!(number(14_532.4), "14532");
        assert_eq!(number(43.71), "43.7");
        assert_eq!(number(2.2049), "2.20");
        assert_eq!(number(0.30412), "0.304");
        assert_eq!(number(0.0123), "0.0123");
        assert_eq!(ratio(122.0, 1.0), "122×");
        assert_eq!(ratio(1.0, 4.0), "0.25×");
    }

    #[test]
    fn a_record_written_is_a_record_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("figures.jsonl");
        let report = Report::with_sink("proxy", "Proxy", "", Sink::File(path.clone()));
        report.millis(
            "1000 from scratch",
            std::time::Duration::from_millis(12),
            &[("nft -f", std::time::Duration::from_millis(48))],
        );
        let benches = parse(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(benches[0].figures[0].tug, 12.0);
        assert_eq!(benches[0].figures[0].references[0].value, 48.0);
    }

    /// Pixels of `colour` in an RGB buffer.
    fn pixels(buffer: &[u8], colour: plotters::style::RGBColor) -> usize {
        buffer
            .chunks(3)
            .filter(|p| p == &[colour.0, colour.1, colour.2])
            .count()
    }

    /// Each series gets bars in its colour, as tall as its figures are relative to each other.
    #[test]
    fn the_chart_has_a_bar_per_series() {
        let (w, h) = CHART_SIZE;
        let mut buffer = vec![0u8; (w * h * 3) as usize];
        let benches = parse(&lines()).unwrap();
        draw(
            &benches[0],
            plotters::prelude::BitMapBackend::with_buffer(&mut buffer, CHART_SIZE),
        )
        .unwrap();
        let area = |s: usize| pixels(&buffer, COLOURS[s]);
        // Without the legend's squares (14 × 14 each): tug 3 + 1, bridge 12, other 1.5.
        let legend = 14 * 14;
        let (tug, bridge, other) = (area(0) - legend, area(1) - legend, area(2) - legend);
        assert!(tug > 0 && other > 0, "{tug} {bridge} {other}");
        let share = |a: usize, b: usize| a as f64 / b as f64;
        assert!((share(bridge, tug) - 3.0).abs() < 0.3, "{bridge} / {tug}");
        assert!((share(other, tug) - 0.375).abs() < 0.05, "{other} / {tug}");
    }

    /// The chart is a PNG of the promised size.
    #[test]
    fn the_chart_file_is_a_png() {
        let dir = tempfile::tempdir().unwrap();
        for text in [
            lines(),
            // Spanning orders of magnitude: a log scale.
            lines().replace(r#""tug":1.0"#, r#""tug":0.001"#),
        ] {
            let benches = parse(&text).unwrap();
            let path = dir.path().join("cni.png");
            chart(&benches[0], &path).unwrap();
            let bytes = std::fs::read(&path).unwrap();
            assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
            let width = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
            let height = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
            assert_eq!((width, height), CHART_SIZE);
        }
    }
}
