//! The kubelet's Prometheus metrics, served as text (exposition format 0.0.4) on `/metrics`
//! (the kubelet's own: pods and containers running and started, pod start and worker
//! durations, CRI operations, evictions, the serving certificate's TTL) and `/metrics/probes`
//! (`prober_probe_total`, `prober_probe_duration_seconds`), under upstream's names and labels so
//! that existing dashboards and alerts work. `/metrics/resource` (what metrics-server scrapes)
//! is rendered from the stats summary, see [`crate::stats`].

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;

/// What a family is.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
    Histogram(&'static [f64]),
}

/// Upstream's default buckets for operation latencies (seconds).
const LATENCY: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Upstream's buckets for pod start (seconds).
const POD_START: &[f64] = &[
    0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 20.0, 30.0, 45.0, 60.0, 120.0, 180.0, 240.0,
    300.0, 360.0, 480.0, 600.0, 900.0, 1200.0, 1800.0, 2700.0, 3600.0,
];
/// Probe durations (seconds).
const PROBE: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// The families: name, help, kind, and the endpoint that serves them.
const FAMILIES: &[(&str, &str, Kind, Endpoint)] = &[
    (
        "kubelet_node_name",
        "The node's name. The count is always 1.",
        Kind::Gauge,
        Endpoint::Kubelet,
    ),
    (
        "kubelet_running_pods",
        "Number of pods that have a running pod sandbox.",
        Kind::Gauge,
        Endpoint::Kubelet,
    ),
    (
        "kubelet_running_containers",
        "Number of containers currently running, by state.",
        Kind::Gauge,
        Endpoint::Kubelet,
    ),
    (
        "kubelet_started_pods_total",
        "Cumulative number of pods started (sandboxes run).",
        Kind::Counter,
        Endpoint::Kubelet,
    ),
    (
        "kubelet_started_pods_errors_total",
        "Cumulative number of errors when starting pods.",
        Kind::Counter,
        Endpoint::Kubelet,
    ),
    (
        "kubelet_started_containers_total",
        "Cumulative number of containers started.",
        Kind::Counter,
        Endpoint::Kubelet,
    ),
    (
        "kubelet_started_containers_errors_total",
        "Cumulative number of errors when starting containers.",
        Kind::Counter,
        Endpoint::Kubelet,
    ),
    (
        "kubelet_pod_start_duration_seconds",
        "Duration in seconds from the kubelet seeing a pod for the first time to the pod starting to run.",
        Kind::Histogram(POD_START),
        Endpoint::Kubelet,
    ),
    (
        "kubelet_pod_worker_duration_seconds",
        "Duration in seconds to sync a single pod, by operation type (create, update, sync).",
        Kind::Histogram(LATENCY),
        Endpoint::Kubelet,
    ),
    (
        "kubelet_runtime_operations_total",
        "Cumulative number of runtime operations by operation type.",
        Kind::Counter,
        Endpoint::Kubelet,
    ),
    (
        "kubelet_runtime_operations_errors_total",
        "Cumulative number of runtime operation errors by operation type.",
        Kind::Counter,
        Endpoint::Kubelet,
    ),
    (
        "kubelet_runtime_operations_duration_seconds",
        "Duration in seconds of runtime operations, by operation type.",
        Kind::Histogram(LATENCY),
        Endpoint::Kubelet,
    ),
    (
        "kubelet_evictions",
        "Cumulative number of pod evictions by eviction signal.",
        Kind::Counter,
        Endpoint::Kubelet,
    ),
    (
        "kubelet_certificate_manager_client_ttl_seconds",
        "Seconds until the kubelet's client certificate expires.",
        Kind::Gauge,
        Endpoint::Kubelet,
    ),
    (
        "kubelet_certificate_manager_server_ttl_seconds",
        "Seconds until the kubelet's serving certificate expires.",
        Kind::Gauge,
        Endpoint::Kubelet,
    ),
    (
        "prober_probe_total",
        "Cumulative number of liveness, readiness or startup probes of a container, by result.",
        Kind::Counter,
        Endpoint::Probes,
    ),
    (
        "prober_probe_duration_seconds",
        "Duration in seconds of a probe response.",
        Kind::Histogram(PROBE),
        Endpoint::Probes,
    ),
];

/// Which endpoint serves a family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `/metrics`.
    Kubelet,
    /// `/metrics/probes`.
    Probes,
}

type Labels = Vec<(&'static str, String)>;

#[derive(Debug, Clone)]
enum Series {
    Value(f64),
    Histogram {
        counts: Vec<u64>,
        sum: f64,
        count: u64,
    },
}

/// The kubelet's metrics (one per kubelet, shared by its parts).
#[derive(Debug, Default)]
pub struct Metrics {
    series: Mutex<BTreeMap<&'static str, BTreeMap<Labels, Series>>>,
}

fn family(name: &str) -> (&'static str, &'static str, Kind, Endpoint) {
    *FAMILIES
        .iter()
        .find(|f| f.0 == name)
        .unwrap_or_else(|| panic!("metric {name} is not declared"))
}

fn labels(pairs: &[(&'static str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| (*k, (*v).to_owned())).collect()
}

impl Metrics {
    fn with(&self, name: &str, pairs: &[(&'static str, &str)], change: impl FnOnce(&mut Series)) {
        let (name, _, kind, _) = family(name);
        let mut series = self.series.lock().expect("metrics lock");
        let entry = series
            .entry(name)
            .or_default()
            .entry(labels(pairs))
            .or_insert_with(|| match kind {
                Kind::Histogram(bounds) => Series::Histogram {
                    counts: vec![0; bounds.len()],
                    sum: 0.0,
                    count: 0,
                },
                Kind::Counter | Kind::Gauge => Series::Value(0.0),
            });
        change(entry);
    }

    /// Adds to a counter.
    pub fn inc(&self, name: &str, pairs: &[(&'static str, &str)]) {
        self.with(name, pairs, |s| {
            if let Series::Value(v) = s {
                *v += 1.0;
            }
        });
    }

    /// Sets a gauge.
    pub fn set(&self, name: &str, pairs: &[(&'static str, &str)], value: f64) {
        self.with(name, pairs, |s| *s = Series::Value(value));
    }

    /// Replaces every series of a gauge family (for gauges computed whole at each scrape).
    pub fn set_all(&self, name: &str, values: Vec<(Vec<(&'static str, &str)>, f64)>) {
        let (name, ..) = family(name);
        let fresh = values
            .into_iter()
            .map(|(pairs, v)| (labels(&pairs), Series::Value(v)))
            .collect();
        self.series
            .lock()
            .expect("metrics lock")
            .insert(name, fresh);
    }

    /// Records one observation of a histogram.
    pub fn observe(&self, name: &str, pairs: &[(&'static str, &str)], value: f64) {
        let (_, _, kind, _) = family(name);
        let Kind::Histogram(bounds) = kind else {
            panic!("metric {name} is not a histogram");
        };
        self.with(name, pairs, |s| {
            if let Series::Histogram { counts, sum, count } = s {
                for (bound, n) in bounds.iter().zip(counts.iter_mut()) {
                    if value <= *bound {
                        *n += 1;
                    }
                }
                *sum += value;
                *count += 1;
            }
        });
    }

    /// Drops every series whose `label` is `value` (a pod's series when it is gone).
    pub fn forget(&self, label: &str, value: &str) {
        for series in self.series.lock().expect("metrics lock").values_mut() {
            series.retain(|labels, _| !labels.iter().any(|(k, v)| *k == label && v == value));
        }
    }

    /// The families of `endpoint` in the Prometheus text format.
    pub fn render(&self, endpoint: Endpoint) -> String {
        let series = self.series.lock().expect("metrics lock");
        let mut out = String::new();
        for (name, help, kind, served) in FAMILIES {
            if *served != endpoint {
                continue;
            }
            let Some(family) = series.get(name) else {
                continue;
            };
            let kind_name = match kind {
                Kind::Counter => "counter",
                Kind::Gauge => "gauge",
                Kind::Histogram(_) => "histogram",
            };
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind_name}");
            for (labels, value) in family {
                match (value, kind) {
                    (Series::Value(v), _) => {
                        let _ =
                            writeln!(out, "{name}{} {}", render_labels(labels, None), number(*v));
                    }
                    (Series::Histogram { counts, sum, count }, Kind::Histogram(bounds)) => {
                        for (bound, n) in bounds.iter().zip(counts) {
                            let le = number(*bound);
                            let _ = writeln!(
                                out,
                                "{name}_bucket{} {n}",
                                render_labels(labels, Some(&le))
                            );
                        }
                        let _ = writeln!(
                            out,
                            "{name}_bucket{} {count}",
                            render_labels(labels, Some("+Inf"))
                        );
                        let _ = writeln!(
                            out,
                            "{name}_sum{} {}",
                            render_labels(labels, None),
                            number(*sum)
                        );
                        let _ =
                            writeln!(out, "{name}_count{} {count}", render_labels(labels, None));
                    }
                    _ => {}
                }
            }
        }
        out
    }
}

/// `/metrics`: the kubelet's families, with the gauges of what runs now refreshed from the
/// pods' last statuses.
pub fn kubelet_text(shared: &crate::pods::worker::Shared) -> String {
    let metrics = shared.cri.metrics();
    let (mut pods, mut states) = (0.0, BTreeMap::<&'static str, f64>::new());
    for pod in shared.statuses.lock().expect("statuses lock").values() {
        let status = pod.status.clone().unwrap_or_default();
        let all: Vec<_> = status
            .container_statuses
            .iter()
            .flatten()
            .chain(status.init_container_statuses.iter().flatten())
            .cloned()
            .collect();
        if status.phase.as_deref() == Some("Running")
            || status.phase.as_deref() == Some("Pending") && !all.is_empty()
        {
            pods += 1.0;
        }
        for c in &all {
            let state = c.state.clone().unwrap_or_default();
            let kind = if state.running.is_some() {
                "running"
            } else if state.terminated.is_some()
                || c.last_state
                    .as_ref()
                    .is_some_and(|l| l.terminated.is_some())
            {
                "exited"
            } else if c.container_id.is_some() {
                "created"
            } else {
                continue;
            };
            *states.entry(kind).or_default() += 1.0;
        }
    }
    metrics.set("kubelet_node_name", &[("node", &shared.node_name)], 1.0);
    metrics.set("kubelet_running_pods", &[], pods);
    metrics.set_all(
        "kubelet_running_containers",
        ["running", "exited", "created"]
            .into_iter()
            .map(|k| {
                (
                    vec![("container_state", k)],
                    states.get(k).copied().unwrap_or(0.0),
                )
            })
            .collect(),
    );
    metrics.render(Endpoint::Kubelet)
}

/// A number as Prometheus writes it.
pub fn number(v: f64) -> String {
    if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.to_owned()
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

/// A label value escaped as the text format requires.
pub fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// `{a="x",b="y"}` (empty when there are no labels), with `le` last for buckets.
pub fn render_labels(labels: &[(&str, String)], le: Option<&str>) -> String {
    let mut parts: Vec<String> = labels
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect();
    if let Some(le) = le {
        parts.push(format!("le=\"{le}\""));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", parts.join(","))
    }
}

/// The `operation_type` upstream gives a CRI method: `RunPodSandbox` → `run_podsandbox`,
/// `ListContainerStats` → `list_container_stats`.
pub fn operation_type(method: &str) -> String {
    let method = method.replace("PodSandbox", "Podsandbox");
    let mut out = String::with_capacity(method.len() + 4);
    for (i, c) in method.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_gauges_and_histograms_render_as_prometheus_text() {
        let metrics = Metrics::default();
        metrics.inc(
            "kubelet_runtime_operations_total",
            &[("operation_type", "version")],
        );
        metrics.inc(
            "kubelet_runtime_operations_total",
            &[("operation_type", "version")],
        );
        metrics.set("kubelet_node_name", &[("node", "n\"1")], 1.0);
        metrics.observe(
            "kubelet_runtime_operations_duration_seconds",
            &[("operation_type", "version")],
            0.02,
        );
        metrics.inc(
            "prober_probe_total",
            &[("probe_type", "Readiness"), ("pod", "web")],
        );
        let text = metrics.render(Endpoint::Kubelet);
        assert!(text.contains("# TYPE kubelet_runtime_operations_total counter\nkubelet_runtime_operations_total{operation_type=\"version\"} 2\n"), "{text}");
        assert!(
            text.contains("kubelet_node_name{node=\"n\\\"1\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("kubelet_runtime_operations_duration_seconds_bucket{operation_type=\"version\",le=\"0.01\"} 0\n"), "{text}");
        assert!(text.contains("kubelet_runtime_operations_duration_seconds_bucket{operation_type=\"version\",le=\"0.025\"} 1\n"), "{text}");
        assert!(text.contains("kubelet_runtime_operations_duration_seconds_bucket{operation_type=\"version\",le=\"+Inf\"} 1\n"), "{text}");
        assert!(
            text.contains(
                "kubelet_runtime_operations_duration_seconds_count{operation_type=\"version\"} 1\n"
            ),
            "{text}"
        );
        assert!(
            !text.contains("prober_probe_total"),
            "probes are on /metrics/probes: {text}"
        );
        let probes = metrics.render(Endpoint::Probes);
        assert!(
            probes.contains("prober_probe_total{probe_type=\"Readiness\",pod=\"web\"} 1\n"),
            "{probes}"
        );
        metrics.forget("pod", "web");
        assert!(!metrics.render(Endpoint::Probes).contains("web"));
    }

    #[test]
    fn cri_methods_become_upstream_operation_types() {
        assert_eq!(operation_type("RunPodSandbox"), "run_podsandbox");
        assert_eq!(
            operation_type("ListPodSandboxStats"),
            "list_podsandbox_stats"
        );
        assert_eq!(operation_type("ContainerStatus"), "container_status");
        assert_eq!(operation_type("ExecSync"), "exec_sync");
        assert_eq!(operation_type("Version"), "version");
    }
}
