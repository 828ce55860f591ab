//! The iptables backend: upstream kube-proxy's chain layout (so operators' habits and tools keep
//! working), rendered from the model as `iptables-restore` input and applied with one
//! `iptables-restore --noflush` per sync. Only tug's chains are ever written; chains of other
//! tools in the same tables are never flushed.
//!
//! Partial syncs rewrite the fixed top-level chains (`KUBE-SERVICES`, `KUBE-NODEPORTS`, ...) and
//! only the per-service chains whose rules changed since the last successful sync; unchanged
//! `KUBE-SVC-*`/`KUBE-SEP-*` chains are not even mentioned. A full sync (the first one, after a
//! failure, and periodically) rewrites everything and deletes stale chains found in the kernel.
//! Rendering is pure ([`render`], [`restore_input`]); [`Iptables`] runs the programs.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use crate::model::{Endpoint, Protocol, ServicePort};

/// The packet mark that asks `KUBE-POSTROUTING` to masquerade (upstream's 0x4000).
pub const MASQ_MARK: &str = "0x4000";

const TOP_NAT: [&str; 4] = [
    "KUBE-SERVICES",
    "KUBE-NODEPORTS",
    "KUBE-POSTROUTING",
    "KUBE-MARK-MASQ",
];
const TOP_FILTER: [&str; 4] = [
    "KUBE-SERVICES",
    "KUBE-EXTERNAL-SERVICES",
    "KUBE-NODEPORTS",
    "KUBE-FORWARD",
];
const SERVICE_CHAIN_PREFIXES: [&str; 4] = ["KUBE-SVC-", "KUBE-SEP-", "KUBE-EXT-", "KUBE-SVL-"];

/// How rules are rendered.
#[derive(Debug, Clone, Default)]
pub struct IptablesConfig {
    /// The cluster's pod CIDR for this family: traffic to a ClusterIP from outside it is
    /// masqueraded. `None` masquerades nothing for ClusterIP traffic (upstream's behaviour
    /// without `clusterCIDR`).
    pub cluster_cidr: Option<String>,
    /// Masquerade all ClusterIP traffic (`masqueradeAll`).
    pub masquerade_all: bool,
    /// Render for IPv6 (`ip6tables`): only IPv6 addresses are used.
    pub ipv6: bool,
    /// `nodePortAddresses`: NodePorts answer only on local addresses inside these; empty means
    /// every local address.
    pub node_port_cidrs: Vec<ipnet::IpNet>,
    /// The addresses chosen by `node_port_cidrs`, resolved at each sync (`None`: all local).
    pub node_port_ips: Option<Vec<IpAddr>>,
}

/// The rules for one sync: the fixed top-level chains' rules and every per-service chain.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rendered {
    /// Rules of tug's filter chains, in order.
    pub filter: Vec<String>,
    /// Rules of the fixed nat chains (`KUBE-SERVICES`, `KUBE-NODEPORTS`, ...), in order.
    pub nat: Vec<String>,
    /// Per-service nat chains (`KUBE-SVC-*`, `KUBE-SEP-*`, `KUBE-EXT-*`, `KUBE-SVL-*`) and their rules.
    pub service_chains: BTreeMap<String, Vec<String>>,
}

/// The longest comment the kernel keeps (`XT_MAX_COMMENT_LEN` is 256 with the NUL).
const MAX_COMMENT: usize = 255;

/// `text` as one quoted iptables-restore word for `--comment`. Object names go into comments,
/// and the API server is not trusted to have validated them: a quote, a control character (a
/// newline would end the rule and start one of the object's own) or a comment longer than the
/// kernel takes (which fails the whole restore, every Service's rules with it) cannot get
/// through.
fn quote(text: &str) -> String {
    let mut clean: String = text
        .chars()
        .map(|c| match c {
            '"' => '\'',
            c if c.is_control() => '?',
            c => c,
        })
        .collect();
    if clean.len() > MAX_COMMENT {
        let mut end = MAX_COMMENT;
        while !clean.is_char_boundary(end) {
            end -= 1;
        }
        clean.truncate(end);
    }
    format!("\"{clean}\"")
}

fn host(ip: &IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("{v4}/32"),
        IpAddr::V6(v6) => format!("{v6}/128"),
    }
}

fn proto(protocol: Protocol) -> String {
    format!("-m {p} -p {p}", p = protocol.as_str())
}

fn reject(ipv6: bool) -> &'static str {
    if ipv6 {
        "-j REJECT --reject-with icmp6-port-unreachable"
    } else {
        "-j REJECT --reject-with icmp-port-unreachable"
    }
}

/// Renders every service port of this family.
pub fn render<'a>(
    ports: impl IntoIterator<Item = &'a ServicePort>,
    config: &IptablesConfig,
) -> Rendered {
    let family = |ip: &IpAddr| ip.is_ipv6() == config.ipv6;
    let mut out = Rendered::default();
    let mut nodeport_rules = Vec::new();
    let mut filter_services = Vec::new();
    let mut filter_external = Vec::new();

    out.nat.push(format!(
        "-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN"
    ));
    out.nat.push(format!(
        "-A KUBE-POSTROUTING -j MARK --xor-mark {MASQ_MARK}"
    ));
    out.nat.push(format!(
        "-A KUBE-POSTROUTING -m comment --comment {} -j MASQUERADE --random-fully",
        quote("kubernetes service traffic requiring SNAT")
    ));
    out.nat
        .push(format!("-A KUBE-MARK-MASQ -j MARK --or-mark {MASQ_MARK}"));

    for port in ports {
        let cluster_ips: Vec<&IpAddr> = port.cluster_ips.iter().filter(|ip| family(ip)).collect();
        if cluster_ips.is_empty() {
            continue;
        }
        let name = &port.name;
        let svc = port.service_chain();
        let ext = port.external_chain();
        let p = proto(port.protocol);
        let cluster_eps: Vec<&Endpoint> = port
            .cluster_endpoints
            .iter()
            .filter(|e| family(&e.ip))
            .collect();
        let external_eps: Vec<&Endpoint> = port
            .external_endpoints
            .iter()
            .filter(|e| family(&e.ip))
            .collect();
        let has_external = port.node_port.is_some()
            || port.external_ips.iter().any(&family)
            || port.load_balancer_ips.iter().any(&family);
        let externals_reject = if port.external_policy_local {
            external_eps.is_empty()
        } else {
            cluster_eps.is_empty()
        };

        // ClusterIP.
        for ip in &cluster_ips {
            if cluster_eps.is_empty() {
                filter_services.push(format!(
                    "-A KUBE-SERVICES -m comment --comment {} {p} -d {} --dport {} {}",
                    quote(&format!("{name} has no endpoints")),
                    host(ip),
                    port.port,
                    reject(config.ipv6)
                ));
            } else {
                out.nat.push(format!(
                    "-A KUBE-SERVICES -m comment --comment {} {p} -d {} --dport {} -j {svc}",
                    quote(&format!("{name} cluster IP")),
                    host(ip),
                    port.port
                ));
            }
        }
        // External IPs and load balancer IPs.
        let external_targets = port
            .external_ips
            .iter()
            .map(|ip| (ip, "external IP"))
            .chain(
                port.load_balancer_ips
                    .iter()
                    .map(|ip| (ip, "loadbalancer IP")),
            )
            .filter(|(ip, _)| family(ip));
        for (ip, what) in external_targets {
            if externals_reject {
                filter_external.push(format!(
                    "-A KUBE-EXTERNAL-SERVICES -m comment --comment {} {p} -d {} --dport {} {}",
                    quote(&format!(
                        "{name} has no {}endpoints",
                        if port.external_policy_local {
                            "local "
                        } else {
                            ""
                        }
                    )),
                    host(ip),
                    port.port,
                    if port.external_policy_local {
                        "-j DROP"
                    } else {
                        reject(config.ipv6)
                    }
                ));
            } else {
                out.nat.push(format!(
                    "-A KUBE-SERVICES -m comment --comment {} {p} -d {} --dport {} -j {ext}",
                    quote(&format!("{name} {what}")),
                    host(ip),
                    port.port
                ));
            }
        }
        // NodePort.
        if let Some(node_port) = port.node_port {
            if externals_reject {
                filter_external.push(format!(
                    "-A KUBE-EXTERNAL-SERVICES -m comment --comment {} -m addrtype --dst-type LOCAL {p} --dport {node_port} {}",
                    quote(&format!("{name} has no {}endpoints", if port.external_policy_local { "local " } else { "" })),
                    if port.external_policy_local { "-j DROP" } else { reject(config.ipv6) }
                ));
            } else {
                nodeport_rules.push(format!(
                    "-A KUBE-NODEPORTS -m comment --comment {} {p} --dport {node_port} -j {ext}",
                    quote(name)
                ));
            }
        }
        if cluster_eps.is_empty() && (externals_reject || !has_external) {
            continue;
        }

        // KUBE-SVC: masquerade off-cluster sources, then pick an endpoint.
        let mut svc_rules = Vec::new();
        for ip in &cluster_ips {
            let masq = if config.masquerade_all {
                Some(String::new())
            } else {
                config
                    .cluster_cidr
                    .as_ref()
                    .map(|cidr| format!(" ! -s {cidr}"))
            };
            if let Some(source) = masq {
                svc_rules.push(format!(
                    "-A {svc} -m comment --comment {} {p} -d {} --dport {}{source} -j KUBE-MARK-MASQ",
                    quote(&format!("{name} cluster IP")),
                    host(ip),
                    port.port
                ));
            }
        }
        svc_rules.extend(balance(&svc, port, &cluster_eps));
        out.service_chains.insert(svc.clone(), svc_rules);

        // Endpoint chains, for every endpoint either path may use.
        let all_eps: BTreeSet<&Endpoint> = cluster_eps
            .iter()
            .chain(external_eps.iter())
            .copied()
            .collect();
        for endpoint in all_eps {
            let sep = port.endpoint_chain(endpoint);
            let mut rules = vec![format!(
                "-A {sep} -m comment --comment {} -s {} -j KUBE-MARK-MASQ",
                quote(name),
                host(&endpoint.ip)
            )];
            let recent = port
                .affinity_timeout
                .map(|_| {
                    format!(
                        " -m recent --name {sep} --mask {} --rsource --set",
                        mask(&endpoint.ip)
                    )
                })
                .unwrap_or_default();
            rules.push(format!(
                "-A {sep} -m comment --comment {}{recent} {p} -j DNAT --to-destination {}",
                quote(name),
                endpoint.address()
            ));
            out.service_chains.insert(sep, rules);
        }

        // KUBE-EXT: external traffic.
        if has_external && !externals_reject {
            let mut ext_rules = Vec::new();
            if port.external_policy_local {
                let svl = port.local_chain();
                if let Some(cidr) = &config.cluster_cidr {
                    ext_rules.push(format!(
                        "-A {ext} -m comment --comment {} -s {cidr} -j {svc}",
                        quote(&format!("pod traffic for {name} external destinations"))
                    ));
                }
                ext_rules.push(format!(
                    "-A {ext} -m comment --comment {} -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ",
                    quote(&format!("masquerade LOCAL traffic for {name} external destinations"))
                ));
                ext_rules.push(format!(
                    "-A {ext} -m comment --comment {} -m addrtype --src-type LOCAL -j {svc}",
                    quote(&format!(
                        "route LOCAL traffic for {name} external destinations"
                    ))
                ));
                ext_rules.push(format!("-A {ext} -j {svl}"));
                out.service_chains
                    .insert(svl.clone(), balance(&svl, port, &external_eps));
            } else {
                ext_rules.push(format!(
                    "-A {ext} -m comment --comment {} -j KUBE-MARK-MASQ",
                    quote(&format!(
                        "masquerade traffic for {name} external destinations"
                    ))
                ));
                ext_rules.push(format!("-A {ext} -j {svc}"));
            }
            out.service_chains.insert(ext, ext_rules);
        }
    }

    out.nat.extend(nodeport_rules);
    let last =
        quote("kubernetes service nodeports; NOTE: this must be the last rule in this chain");
    match &config.node_port_ips {
        None => out.nat.push(format!(
            "-A KUBE-SERVICES -m comment --comment {last} -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS"
        )),
        Some(ips) => {
            for ip in ips.iter().filter(|ip| family(ip)) {
                out.nat.push(format!(
                    "-A KUBE-SERVICES -m comment --comment {last} -d {} -j KUBE-NODEPORTS",
                    host(ip)
                ));
            }
        }
    }
    out.filter.extend(filter_services);
    out.filter.extend(filter_external);
    out.filter
        .push("-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP".into());
    out.filter.push(format!(
        "-A KUBE-FORWARD -m comment --comment {} -m mark --mark {MASQ_MARK}/{MASQ_MARK} -j ACCEPT",
        quote("kubernetes forwarding rules")
    ));
    out.filter.push(format!(
        "-A KUBE-FORWARD -m comment --comment {} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        quote("kubernetes forwarding conntrack rule")
    ));
    out
}

fn mask(ip: &IpAddr) -> &'static str {
    if ip.is_ipv4() {
        "255.255.255.255"
    } else {
        "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    }
}

/// Load-balancing rules of `chain` over `endpoints`: affinity checks first, then endpoint i of
/// n chosen with probability 1/(n-i), the last one unconditionally (upstream's shape).
fn balance(chain: &str, port: &ServicePort, endpoints: &[&Endpoint]) -> Vec<String> {
    let mut rules = Vec::new();
    let name = &port.name;
    if let Some(timeout) = port.affinity_timeout {
        for endpoint in endpoints {
            let sep = port.endpoint_chain(endpoint);
            rules.push(format!(
                "-A {chain} -m comment --comment {} -m recent --name {sep} --rcheck --seconds {timeout} --reap -j {sep}",
                quote(&format!("{name} -> {}", endpoint.address()))
            ));
        }
    }
    let n = endpoints.len();
    for (i, endpoint) in endpoints.iter().enumerate() {
        let sep = port.endpoint_chain(endpoint);
        let statistic = if i + 1 < n {
            format!(
                " -m statistic --mode random --probability {:.10}",
                1.0 / (n - i) as f64
            )
        } else {
            String::new()
        };
        rules.push(format!(
            "-A {chain} -m comment --comment {}{statistic} -j {sep}",
            quote(&format!("{name} -> {}", endpoint.address()))
        ));
    }
    rules
}

fn fingerprint(rules: &[String]) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    rules.hash(&mut hasher);
    hasher.finish()
}

/// What a sync wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    /// The `iptables-restore` input.
    pub input: String,
    /// Per-service chains written.
    pub written: usize,
    /// Per-service chains deleted.
    pub deleted: usize,
    /// Fingerprints of every per-service chain now in place.
    pub chains: BTreeMap<String, u64>,
}

/// The `iptables-restore --noflush` input that takes the kernel from `previous` (fingerprints of
/// the per-service chains in place; `existing` are further stale chains found in the kernel) to
/// `rendered`.
pub fn restore_input(
    rendered: &Rendered,
    previous: &BTreeMap<String, u64>,
    existing: &BTreeSet<String>,
) -> Applied {
    let chains: BTreeMap<String, u64> = rendered
        .service_chains
        .iter()
        .map(|(chain, rules)| (chain.clone(), fingerprint(rules)))
        .collect();
    let changed: Vec<&String> = chains
        .iter()
        .filter(|(chain, print)| previous.get(*chain) != Some(print))
        .map(|(chain, _)| chain)
        .collect();
    let stale: BTreeSet<&String> = previous
        .keys()
        .chain(existing.iter())
        .filter(|chain| !chains.contains_key(*chain))
        .collect();
    let mut input = String::from("*filter\n");
    for chain in TOP_FILTER {
        input.push_str(&format!(":{chain} - [0:0]\n"));
    }
    for rule in &rendered.filter {
        input.push_str(rule);
        input.push('\n');
    }
    input.push_str("COMMIT\n*nat\n");
    for chain in TOP_NAT {
        input.push_str(&format!(":{chain} - [0:0]\n"));
    }
    for chain in changed.iter().copied().chain(stale.iter().copied()) {
        input.push_str(&format!(":{chain} - [0:0]\n"));
    }
    for rule in &rendered.nat {
        input.push_str(rule);
        input.push('\n');
    }
    for chain in &changed {
        for rule in &rendered.service_chains[*chain] {
            input.push_str(rule);
            input.push('\n');
        }
    }
    for chain in &stale {
        input.push_str(&format!("-X {chain}\n"));
    }
    input.push_str("COMMIT\n");
    Applied {
        input,
        written: changed.len(),
        deleted: stale.len(),
        chains,
    }
}

/// tug's per-service chains declared in `iptables-save` output.
fn service_chains_in(saved: &str) -> BTreeSet<String> {
    saved
        .lines()
        .filter_map(|line| line.strip_prefix(':'))
        .filter_map(|line| line.split_whitespace().next())
        .filter(|chain| SERVICE_CHAIN_PREFIXES.iter().any(|p| chain.starts_with(p)))
        .map(str::to_owned)
        .collect()
}

/// `input` with `jumps` added to each table's section, before its `COMMIT`.
fn with_jumps(input: &str, jumps: &BTreeMap<&'static str, Vec<String>>) -> String {
    let mut out = String::with_capacity(input.len() + 1024);
    let mut table = "";
    for line in input.lines() {
        if let Some(name) = line.strip_prefix('*') {
            table = name;
        }
        if line == "COMMIT" {
            for jump in jumps.get(table).into_iter().flatten() {
                out.push_str(jump);
                out.push('\n');
            }
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// The rules that hook tug's chains into the built-in ones: (table, built-in chain, rule).
pub fn jump_rules() -> Vec<(&'static str, &'static str, Vec<&'static str>)> {
    let portals = ["-m", "comment", "--comment", "kubernetes service portals"];
    let external = [
        "-m",
        "comment",
        "--comment",
        "kubernetes externally-visible service portals",
    ];
    let new = ["-m", "conntrack", "--ctstate", "NEW"];
    let with = |a: &[&'static str], b: &[&'static str], target: &'static str| {
        let mut rule = a.to_vec();
        rule.extend_from_slice(b);
        rule.extend_from_slice(&["-j", target]);
        rule
    };
    vec![
        (
            "filter",
            "INPUT",
            with(&external, &new, "KUBE-EXTERNAL-SERVICES"),
        ),
        (
            "filter",
            "FORWARD",
            with(
                &["-m", "comment", "--comment", "kubernetes forwarding rules"],
                &[],
                "KUBE-FORWARD",
            ),
        ),
        ("filter", "FORWARD", with(&portals, &new, "KUBE-SERVICES")),
        (
            "filter",
            "FORWARD",
            with(&external, &new, "KUBE-EXTERNAL-SERVICES"),
        ),
        ("filter", "OUTPUT", with(&portals, &new, "KUBE-SERVICES")),
        ("nat", "PREROUTING", with(&portals, &[], "KUBE-SERVICES")),
        ("nat", "OUTPUT", with(&portals, &[], "KUBE-SERVICES")),
        (
            "nat",
            "POSTROUTING",
            with(
                &["-m", "comment", "--comment", "kubernetes postrouting rules"],
                &[],
                "KUBE-POSTROUTING",
            ),
        ),
    ]
}

/// `-I <chain> 1 ...` lines, per table, for the jump rules missing from `saved` (the output of
/// `iptables-save` for all tables), so a full sync adds them in the same transaction.
pub fn missing_jumps(saved: &str) -> BTreeMap<&'static str, Vec<String>> {
    let mut present: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    let mut table = "";
    for line in saved.lines() {
        if let Some(name) = line.strip_prefix('*') {
            table = name.trim();
        } else if line.starts_with("-A ") {
            present.entry(table).or_default().push(line);
        }
    }
    let mut missing: BTreeMap<&'static str, Vec<String>> = BTreeMap::new();
    for (table, chain, rule) in jump_rules() {
        let comment = rule
            .iter()
            .position(|a| *a == "--comment")
            .and_then(|i| rule.get(i + 1))
            .copied()
            .unwrap_or_default();
        let target = rule.last().copied().unwrap_or_default();
        let found = present.get(table).is_some_and(|lines| {
            lines.iter().any(|line| {
                line.starts_with(&format!("-A {chain} "))
                    && line.contains(&format!("--comment \"{comment}\""))
                    && line.ends_with(&format!("-j {target}"))
            })
        });
        if !found {
            let args: Vec<String> = rule
                .iter()
                .map(|a| {
                    if a.contains(' ') {
                        quote(a)
                    } else {
                        (*a).to_owned()
                    }
                })
                .collect();
            missing
                .entry(table)
                .or_default()
                .push(format!("-I {chain} 1 {}", args.join(" ")));
        }
    }
    missing
}

/// The IPv6 program of an iptables program: `iptables-nft` → `ip6tables-nft`, a path's file
/// name likewise.
pub fn ipv6_program(program: &str) -> String {
    match program.rsplit_once('/') {
        Some((dir, name)) => format!("{dir}/{}", name.replacen("iptables", "ip6tables", 1)),
        None => program.replacen("iptables", "ip6tables", 1),
    }
}

/// Why an iptables operation failed. Retryable: the next sync is a full one.
#[derive(Debug, thiserror::Error)]
pub enum IptablesError {
    /// A program could not run.
    #[error("run {program}: {source}")]
    Exec {
        /// The program.
        program: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A program failed.
    #[error("{program} {args} failed: {stderr}")]
    Failed {
        /// The program.
        program: String,
        /// Its arguments.
        args: String,
        /// What it said.
        stderr: String,
    },
}

/// The iptables programs of one family and backend (`iptables`, `iptables-legacy`,
/// `iptables-nft`, `ip6tables`, ...): `<base>`, `<base>-save`, `<base>-restore`.
#[derive(Debug, Clone)]
pub struct Iptables {
    base: PathBuf,
    config: IptablesConfig,
    chains: Option<BTreeMap<String, u64>>,
}

/// What one sync did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Whether it was a full sync.
    pub full: bool,
    /// Per-service chains written.
    pub written: usize,
    /// Per-service chains deleted.
    pub deleted: usize,
    /// Per-service chains in place afterwards.
    pub chains: usize,
}

impl Iptables {
    /// A backend running `base` (e.g. `iptables`, or a path to `iptables-legacy`).
    pub fn new(base: impl Into<PathBuf>, config: IptablesConfig) -> Iptables {
        Iptables {
            base: base.into(),
            config,
            chains: None,
        }
    }

    fn program(&self, suffix: &str) -> PathBuf {
        let mut name = self.base.clone().into_os_string();
        name.push(suffix);
        PathBuf::from(name)
    }

    fn run(
        &self,
        suffix: &str,
        args: &[&str],
        stdin: Option<&str>,
    ) -> Result<String, IptablesError> {
        let program = self.program(suffix);
        let shown = program.display().to_string();
        let mut child = Command::new(&program)
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| IptablesError::Exec {
                program: shown.clone(),
                source,
            })?;
        if let Some(input) = stdin {
            let mut pipe = child.stdin.take().expect("stdin is piped");
            pipe.write_all(input.as_bytes())
                .map_err(|source| IptablesError::Exec {
                    program: shown.clone(),
                    source,
                })?;
        }
        let output = child
            .wait_with_output()
            .map_err(|source| IptablesError::Exec {
                program: shown.clone(),
                source,
            })?;
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        } else {
            Err(IptablesError::Failed {
                program: shown,
                args: args.join(" "),
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            })
        }
    }

    /// tug-owned per-service chains present in the nat table now.
    fn existing_service_chains(&self) -> Result<BTreeSet<String>, IptablesError> {
        Ok(service_chains_in(&self.run(
            "-save",
            &["-t", "nat"],
            None,
        )?))
    }

    /// Programs `ports`. A full sync also adds missing jump rules and deletes stale chains left
    /// in the kernel by an earlier run — in the same `iptables-restore` transaction, after one
    /// `iptables-save` (each separate `iptables -C` would read the whole table again).
    pub fn sync<'a>(
        &mut self,
        ports: impl IntoIterator<Item = &'a ServicePort>,
        full: bool,
    ) -> Result<SyncReport, IptablesError> {
        let full = full || self.chains.is_none();
        if !self.config.node_port_cidrs.is_empty() {
            self.config.node_port_ips = Some(crate::addresses::select(
                &crate::addresses::local_addresses(),
                &self.config.node_port_cidrs,
            ));
        }
        let rendered = render(ports, &self.config);
        let (previous, existing, jumps) = if full {
            let saved = self.run("-save", &[], None)?;
            (
                BTreeMap::new(),
                service_chains_in(&saved),
                missing_jumps(&saved),
            )
        } else {
            (
                self.chains.clone().unwrap_or_default(),
                BTreeSet::new(),
                BTreeMap::new(),
            )
        };
        let applied = restore_input(&rendered, &previous, &existing);
        let input = with_jumps(&applied.input, &jumps);
        match self.run("-restore", &["-w", "5", "--noflush"], Some(&input)) {
            Ok(_) => {
                let report = SyncReport {
                    full,
                    written: applied.written,
                    deleted: applied.deleted,
                    chains: applied.chains.len(),
                };
                self.chains = Some(applied.chains);
                Ok(report)
            }
            Err(error) => {
                // The kernel's state is unknown now: rewrite everything next time.
                self.chains = None;
                Err(error)
            }
        }
    }

    /// Removes everything tug programmed: the jump rules, then tug's chains.
    pub fn cleanup(&mut self) -> Result<(), IptablesError> {
        for (table, chain, rule) in jump_rules() {
            let mut delete = vec!["-w", "-t", table, "-D", chain];
            delete.extend(&rule);
            while self.run("", &delete, None).is_ok() {}
        }
        let mut input = String::from("*filter\n");
        for chain in TOP_FILTER {
            input.push_str(&format!(":{chain} - [0:0]\n"));
        }
        for chain in TOP_FILTER {
            input.push_str(&format!("-X {chain}\n"));
        }
        input.push_str("COMMIT\n*nat\n");
        let mut nat: Vec<String> = TOP_NAT.iter().map(|c| (*c).to_owned()).collect();
        nat.extend(self.existing_service_chains()?);
        for chain in &nat {
            input.push_str(&format!(":{chain} - [0:0]\n"));
        }
        for chain in &nat {
            input.push_str(&format!("-X {chain}\n"));
        }
        input.push_str("COMMIT\n");
        self.run("-restore", &["-w", "5", "--noflush"], Some(&input))?;
        self.chains = None;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(ip: &str, port: u16) -> Endpoint {
        Endpoint {
            ip: ip.parse().unwrap(),
            port,
            local: false,
        }
    }

    fn web() -> ServicePort {
        ServicePort {
            name: "ns1/svc1:p80".into(),
            protocol: Protocol::Tcp,
            cluster_ips: vec!["172.30.0.41".parse().unwrap()],
            port: 80,
            node_port: None,
            external_ips: vec![],
            load_balancer_ips: vec![],
            affinity_timeout: None,
            cluster_endpoints: vec![endpoint("10.180.0.1", 80), endpoint("10.180.0.2", 80)],
            external_endpoints: vec![endpoint("10.180.0.1", 80), endpoint("10.180.0.2", 80)],
            health_check_node_port: None,
            external_policy_local: false,
        }
    }

    fn config() -> IptablesConfig {
        IptablesConfig {
            cluster_cidr: Some("10.0.0.0/8".into()),
            ..Default::default()
        }
    }

    #[test]
    fn cluster_ip_renders_upstreams_rule_shapes() {
        let rendered = render(&[web()], &config());
        assert!(rendered.nat.contains(&"-A KUBE-SERVICES -m comment --comment \"ns1/svc1:p80 cluster IP\" -m tcp -p tcp -d 172.30.0.41/32 --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O".to_owned()), "{:#?}", rendered.nat);
        let svc = &rendered.service_chains["KUBE-SVC-XPGD46QRK7WJZT7O"];
        assert_eq!(
            svc[0],
            "-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment \"ns1/svc1:p80 cluster IP\" -m tcp -p tcp -d 172.30.0.41/32 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ"
        );
        assert_eq!(
            svc[1],
            "-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment \"ns1/svc1:p80 -> 10.180.0.1:80\" -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-SXIVWICOYRO3J4NJ"
        );
        assert!(
            svc[2].ends_with("-j KUBE-SEP-") || svc[2].contains("-> 10.180.0.2:80\" -j KUBE-SEP-"),
            "{}",
            svc[2]
        );
        let sep = &rendered.service_chains["KUBE-SEP-SXIVWICOYRO3J4NJ"];
        assert_eq!(sep, &vec![
            "-A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment \"ns1/svc1:p80\" -s 10.180.0.1/32 -j KUBE-MARK-MASQ".to_owned(),
            "-A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment \"ns1/svc1:p80\" -m tcp -p tcp -j DNAT --to-destination 10.180.0.1:80".to_owned(),
        ]);
        assert!(
            rendered
                .nat
                .last()
                .unwrap()
                .contains("-m addrtype --dst-type LOCAL -j KUBE-NODEPORTS"),
            "NODEPORTS is last"
        );
    }

    /// Found by the rule_model fuzz target: a port name with a newline (or a NUL) went into a
    /// comment as it was, so an object could add rules of its own to the restore input.
    #[test]
    fn names_in_comments_cannot_end_the_rule_or_outgrow_the_kernels_limit() {
        let mut port = web();
        port.name = format!("ns1/svc1:p\n-A INPUT -j DROP\0\"x{}", "y".repeat(400));
        let rendered = render(&[port], &config());
        let rules: Vec<&String> = rendered
            .nat
            .iter()
            .chain(&rendered.filter)
            .chain(rendered.service_chains.values().flatten())
            .collect();
        let mut named = 0;
        for rule in rules {
            assert!(!rule.contains(['\n', '\0']), "{rule:?}");
            if let Some((_, rest)) = rule.split_once("--comment \"") {
                let comment = rest.split('"').next().unwrap();
                assert!(comment.len() <= MAX_COMMENT, "{} bytes", comment.len());
                if comment.starts_with("ns1/") {
                    assert!(
                        comment.starts_with("ns1/svc1:p?-A INPUT -j DROP?'x"),
                        "{comment}"
                    );
                    named += 1;
                }
            }
        }
        assert!(named >= 3, "{named} rules name the Service");
    }

    #[test]
    fn probabilities_are_one_over_the_remaining_count() {
        let mut port = web();
        port.cluster_endpoints = (1..=3)
            .map(|i| endpoint(&format!("10.180.0.{i}"), 80))
            .collect();
        let rendered = render(&[port], &config());
        let svc = &rendered.service_chains["KUBE-SVC-XPGD46QRK7WJZT7O"];
        assert!(svc[1].contains("--probability 0.3333333333"));
        assert!(svc[2].contains("--probability 0.5000000000"));
        assert!(!svc[3].contains("statistic"));
    }

    #[test]
    fn no_endpoints_rejects_in_filter_and_writes_no_service_chain() {
        let mut port = web();
        port.cluster_endpoints.clear();
        port.external_endpoints.clear();
        port.node_port = Some(30080);
        let rendered = render(&[port], &config());
        assert!(rendered.service_chains.is_empty());
        assert!(rendered.filter.iter().any(|r| r == "-A KUBE-SERVICES -m comment --comment \"ns1/svc1:p80 has no endpoints\" -m tcp -p tcp -d 172.30.0.41/32 --dport 80 -j REJECT --reject-with icmp-port-unreachable"));
        assert!(
            rendered
                .filter
                .iter()
                .any(|r| r.starts_with("-A KUBE-EXTERNAL-SERVICES")
                    && r.contains("--dport 30080 -j REJECT"))
        );
    }

    #[test]
    fn node_ports_go_through_the_external_chain_with_masquerade() {
        let mut port = web();
        port.node_port = Some(30080);
        port.external_ips = vec!["192.0.2.10".parse().unwrap()];
        let rendered = render(&[port.clone()], &config());
        let ext = port.external_chain();
        assert!(rendered.nat.iter().any(|r| r == &format!("-A KUBE-NODEPORTS -m comment --comment \"ns1/svc1:p80\" -m tcp -p tcp --dport 30080 -j {ext}")));
        assert!(
            rendered
                .nat
                .iter()
                .any(|r| r.contains("\"ns1/svc1:p80 external IP\"")
                    && r.contains("-d 192.0.2.10/32 --dport 80"))
        );
        assert_eq!(
            rendered.service_chains[&ext][0],
            format!(
                "-A {ext} -m comment --comment \"masquerade traffic for ns1/svc1:p80 external destinations\" -j KUBE-MARK-MASQ"
            )
        );
        assert_eq!(
            rendered.service_chains[&ext][1],
            format!("-A {ext} -j {}", port.service_chain())
        );
    }

    #[test]
    fn external_traffic_policy_local_keeps_sources_and_uses_local_endpoints() {
        let mut port = web();
        port.node_port = Some(30080);
        port.external_policy_local = true;
        port.external_endpoints = vec![Endpoint {
            local: true,
            ..endpoint("10.180.0.2", 80)
        }];
        let rendered = render(&[port.clone()], &config());
        let ext = &rendered.service_chains[&port.external_chain()];
        assert!(
            !ext.iter()
                .any(|r| r.ends_with("-j KUBE-MARK-MASQ") && !r.contains("--src-type LOCAL")),
            "no masquerade of external clients: {ext:#?}"
        );
        assert_eq!(
            ext.last().unwrap(),
            &format!("-A {} -j {}", port.external_chain(), port.local_chain())
        );
        let svl = &rendered.service_chains[&port.local_chain()];
        assert_eq!(svl.len(), 1);
        assert!(svl[0].contains("10.180.0.2:80"));
        port.external_endpoints.clear();
        let rendered = render(&[port], &config());
        assert!(
            rendered
                .filter
                .iter()
                .any(|r| r.contains("has no local endpoints") && r.ends_with("-j DROP"))
        );
    }

    #[test]
    fn affinity_checks_recent_before_balancing() {
        let mut port = web();
        port.affinity_timeout = Some(10800);
        let rendered = render(&[port.clone()], &config());
        let svc = &rendered.service_chains[&port.service_chain()];
        assert!(svc[1].contains("-m recent --name KUBE-SEP-SXIVWICOYRO3J4NJ --rcheck --seconds 10800 --reap -j KUBE-SEP-SXIVWICOYRO3J4NJ"), "{svc:#?}");
        let sep = &rendered.service_chains["KUBE-SEP-SXIVWICOYRO3J4NJ"];
        assert!(sep[1].contains("-m recent --name KUBE-SEP-SXIVWICOYRO3J4NJ --mask 255.255.255.255 --rsource --set -m tcp -p tcp -j DNAT"));
    }

    #[test]
    fn missing_jump_rules_are_inserted_in_the_same_transaction() {
        let saved = "*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -m comment --comment \"kubernetes externally-visible service portals\" -m conntrack --ctstate NEW -j KUBE-EXTERNAL-SERVICES\nCOMMIT\n*nat\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING -j OTHER\nCOMMIT\n";
        let missing = missing_jumps(saved);
        assert!(
            !missing["filter"].iter().any(|l| l.starts_with("-I INPUT")),
            "present already"
        );
        assert!(missing["filter"].contains(&"-I FORWARD 1 -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD".to_owned()));
        assert_eq!(missing["nat"].len(), 3);
        let input = with_jumps(
            "*filter\n:KUBE-SERVICES - [0:0]\nCOMMIT\n*nat\nCOMMIT\n",
            &missing,
        );
        let nat = input.split("*nat\n").nth(1).unwrap();
        assert!(nat.starts_with("-I PREROUTING 1 -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n"), "{input}");
        assert!(nat.ends_with("COMMIT\n"));
        let applied: String = with_jumps(saved, &missing)
            .lines()
            .map(|line| match line.strip_prefix("-I ") {
                Some(rest) => format!("-A {}\n", rest.replacen(" 1 ", " ", 1)),
                None => format!("{line}\n"),
            })
            .collect();
        assert!(
            missing_jumps(&applied).is_empty(),
            "once present, nothing is missing: {applied}"
        );
    }

    #[test]
    fn node_port_addresses_replace_the_local_address_type_match() {
        let mut port = web();
        port.node_port = Some(30080);
        let config = IptablesConfig {
            node_port_ips: Some(vec![
                "192.168.50.1".parse().unwrap(),
                "fd00::1".parse().unwrap(),
            ]),
            ..config()
        };
        let rendered = render(&[port], &config);
        let last = rendered.nat.last().unwrap();
        assert!(
            last.ends_with("-d 192.168.50.1/32 -j KUBE-NODEPORTS"),
            "{last}"
        );
        assert!(
            !rendered
                .nat
                .iter()
                .any(|r| r.contains("--dst-type LOCAL -j KUBE-NODEPORTS"))
        );
        assert!(
            !rendered.nat.iter().any(|r| r.contains("fd00::1")),
            "other family"
        );
    }

    #[test]
    fn ipv6_programs_are_derived() {
        assert_eq!(ipv6_program("iptables"), "ip6tables");
        assert_eq!(ipv6_program("iptables-legacy"), "ip6tables-legacy");
        assert_eq!(
            ipv6_program("/usr/sbin/iptables-nft"),
            "/usr/sbin/ip6tables-nft"
        );
    }

    #[test]
    fn ipv6_renders_only_its_family() {
        let mut port = web();
        port.cluster_ips.push("fd00::41".parse().unwrap());
        port.cluster_endpoints.push(endpoint("fd00:10::1", 80));
        let v6 = render(
            &[port.clone()],
            &IptablesConfig {
                ipv6: true,
                ..Default::default()
            },
        );
        assert!(v6.nat.iter().any(|r| r.contains("-d fd00::41/128")));
        assert!(
            v6.service_chains
                .values()
                .flatten()
                .any(|r| r.contains("--to-destination [fd00:10::1]:80"))
        );
        assert!(
            !v6.service_chains
                .values()
                .flatten()
                .any(|r| r.contains("10.180.0.1"))
        );
    }

    #[test]
    fn partial_restores_write_only_changed_chains_and_delete_stale_ones() {
        let mut other = web();
        other.name = "ns2/other".into();
        other.cluster_ips = vec!["172.30.0.42".parse().unwrap()];
        let first = restore_input(
            &render(&[web(), other.clone()], &config()),
            &BTreeMap::new(),
            &BTreeSet::new(),
        );
        assert_eq!(first.written, 6);
        // The same again: nothing per-service is written.
        let again = restore_input(
            &render(&[web(), other.clone()], &config()),
            &first.chains,
            &BTreeSet::new(),
        );
        assert_eq!((again.written, again.deleted), (0, 0));
        assert!(!again.input.contains(":KUBE-SVC-"));
        assert!(again.input.contains(":KUBE-SERVICES - [0:0]"));
        // One endpoint of `other` goes away: its SVC chain is rewritten and one SEP deleted.
        other.cluster_endpoints.pop();
        other.external_endpoints.pop();
        let changed = restore_input(
            &render(&[web(), other.clone()], &config()),
            &first.chains,
            &BTreeSet::new(),
        );
        assert_eq!((changed.written, changed.deleted), (1, 1));
        assert!(
            changed
                .input
                .contains(&format!(":{} - [0:0]", other.service_chain()))
        );
        let stale = other.endpoint_chain(&endpoint("10.180.0.2", 80));
        assert!(
            changed.input.contains(&format!("-X {stale}\n")),
            "{}",
            changed.input
        );
        // Nothing outside tug's chains is ever mentioned.
        for line in changed
            .input
            .lines()
            .filter(|l| l.starts_with(':') || l.starts_with("-X"))
        {
            assert!(line.contains("KUBE-"), "{line}");
        }
    }
}
