//! The nftables backend: a table of tug's own (`ip tug-proxy`, `ip6 tug-proxy`) programmed over
//! netlink in one atomic batch per sync ([`netlink`]), with no `nft` in the path. Service lookup
//! costs the same whatever the number of Services.
//!
//! Most service ports take the **flat path**: no chain of their own, only set and map entries.
//! A port with `n` endpoints has, per address, `n` entries `daddr . l4proto . dport . slot →
//! endpoint address . port` in the map `endpoints-<n>` (`nodeport-endpoints-<n>` for its
//! NodePort, keyed by `l4proto . dport . slot`), and the `services` chain has one rule per
//! endpoint count in use: `dnat to daddr . l4proto . dport . numgen random mod n map
//! @endpoints-<n>`. Masquerade marks come from the sets `cluster-ips` (off-cluster sources),
//! `external-ips` and `external-nodeports`; hairpin traffic is masqueraded through `loop-back`.
//! With no jump in any entry, a change is a few element updates that the kernel applies without
//! revalidating the table, which is what made upstream's shape slow to change at scale.
//!
//! Ports with session affinity, `externalTrafficPolicy: Local` or more than
//! [`FLAT_MAX_ENDPOINTS`] endpoints take the **chain path**, upstream's shape: the verdict maps
//! `service-chains` and `nodeport-chains` lead to a chain per service port that picks an
//! endpoint with `numgen random`, and a chain per endpoint that DNATs. Ports without endpoints
//! are refused through the `reject-*` sets (or dropped through `drop-*` for
//! `externalTrafficPolicy: Local`).
//!
//! Syncs replace the table's contents in one transaction, or change only what differs: either
//! all of the new ruleset is in place or none of it. Rendering ([`render`]) is pure and
//! unit-tested; traffic tests run it in network namespaces and read it back with `nft -j list`.

pub mod netlink;

use std::collections::{BTreeMap, BTreeSet};
use std::hash::BuildHasher;
use std::net::IpAddr;

use foldhash::{HashMap, HashSet, HashSetExt};

use netlink::{
    Batch, Element, Expr, FAMILY_IPV4, FAMILY_IPV6, NftError, REG_VERDICT, REG32, SetSpec, Verdict,
};

use crate::model::{Endpoint, Protocol, ServicePort};

/// tug's table name in both families.
pub const TABLE: &str = "tug-proxy";
const MASQ_MARK: u32 = 0x4000;
pub(crate) const TYPE_IPV4: u32 = 7;
pub(crate) const TYPE_IPV6: u32 = 8;
pub(crate) const TYPE_PROTO: u32 = 12;
pub(crate) const TYPE_SERVICE: u32 = 13;
const TYPE_MARK: u32 = 19;
const META_MARK: u32 = 3;
pub(crate) const META_L4PROTO: u32 = 16;
pub(crate) const RTN_LOCAL: u32 = 2;

/// How rules are rendered.
#[derive(Debug, Clone, Default)]
pub struct NftConfig {
    /// The cluster's pod CIDR for this family (`10.244.0.0/16`); ClusterIP traffic from outside it
    /// is masqueraded. `None`: no masquerade for ClusterIP traffic.
    pub cluster_cidr: Option<String>,
    /// Masquerade all ClusterIP traffic.
    pub masquerade_all: bool,
    /// IPv6 (table `ip6 tug-proxy`).
    pub ipv6: bool,
    /// `nodePortAddresses`: NodePorts answer only on local addresses inside these; empty means
    /// every local address.
    pub node_port_cidrs: Vec<ipnet::IpNet>,
    /// The addresses chosen by `node_port_cidrs`, resolved at each sync (`None`: all local).
    pub node_port_ips: Option<Vec<IpAddr>>,
}

/// A chain: name, base-chain hook (number, priority, type) and rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    /// Name.
    pub name: String,
    /// Hook, for base chains.
    pub hook: Option<(u32, i32, &'static str)>,
    /// Rules, each a list of expressions.
    pub rules: Vec<Vec<Expr>>,
}

/// The whole table's desired contents.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ruleset {
    /// Chains.
    pub chains: Vec<Chain>,
    /// Maps with their elements.
    pub maps: Vec<(SetSpec, Vec<Element>)>,
    /// Dynamic sets (ClientIP affinity), filled by the packet path.
    pub sets: Vec<SetSpec>,
}

pub(crate) fn proto_number(protocol: Protocol) -> u8 {
    match protocol {
        Protocol::Tcp => 6,
        Protocol::Udp => 17,
        Protocol::Sctp => 132,
    }
}

pub(crate) fn ip_bytes(ip: &IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

/// Key of `daddr . l4proto . dport`: each field padded to 4 bytes, as registers hold them.
pub(crate) fn addr_key(ip: &IpAddr, protocol: Protocol, port: u16) -> Vec<u8> {
    let mut key = ip_bytes(ip);
    key.extend_from_slice(&[proto_number(protocol), 0, 0, 0]);
    key.extend_from_slice(&port.to_be_bytes());
    key.extend_from_slice(&[0, 0]);
    key
}

pub(crate) fn port_key(protocol: Protocol, port: u16) -> Vec<u8> {
    let mut key = vec![proto_number(protocol), 0, 0, 0];
    key.extend_from_slice(&port.to_be_bytes());
    key.extend_from_slice(&[0, 0]);
    key
}

pub(crate) struct Family {
    pub(crate) ipv6: bool,
}

impl Family {
    pub(crate) fn addr_len(&self) -> u32 {
        if self.ipv6 { 16 } else { 4 }
    }
    pub(crate) fn saddr(&self, dreg: u32) -> Expr {
        Expr::Payload {
            base: 1,
            offset: if self.ipv6 { 8 } else { 12 },
            len: self.addr_len(),
            dreg,
        }
    }
    pub(crate) fn daddr(&self, dreg: u32) -> Expr {
        Expr::Payload {
            base: 1,
            offset: if self.ipv6 { 24 } else { 16 },
            len: self.addr_len(),
            dreg,
        }
    }
    /// Registers for the three fields of `daddr . l4proto . dport`.
    pub(crate) fn key_regs(&self) -> (u32, u32, u32) {
        let words = self.addr_len() / 4;
        (REG32, REG32 + words, REG32 + words + 1)
    }
    pub(crate) fn addr_type(&self) -> u32 {
        if self.ipv6 { TYPE_IPV6 } else { TYPE_IPV4 }
    }
    pub(crate) fn nfproto(&self) -> u8 {
        if self.ipv6 { FAMILY_IPV6 } else { FAMILY_IPV4 }
    }
    /// `daddr . l4proto . dport` looked up in `set` (a map's value into `dreg`).
    pub(crate) fn service_lookup(&self, set: &str, dreg: Option<u32>) -> Vec<Expr> {
        let (k1, k2, k3) = self.key_regs();
        vec![
            self.daddr(k1),
            Expr::Meta {
                key: META_L4PROTO,
                dreg: k2,
            },
            Expr::Payload {
                base: 2,
                offset: 2,
                len: 2,
                dreg: k3,
            },
            Expr::Lookup {
                set: set.to_owned(),
                sreg: k1,
                dreg,
            },
        ]
    }
}

/// `fib daddr type local`: traffic to the node.
pub(crate) fn local_destination() -> Vec<Expr> {
    local_address(false)
}

/// `fib saddr type local`: the node's own traffic.
fn local_source() -> Vec<Expr> {
    local_address(true)
}

fn local_address(source: bool) -> Vec<Expr> {
    vec![
        Expr::FibAddrType {
            dreg: REG32,
            source,
        },
        Expr::Cmp {
            sreg: REG32,
            eq: true,
            data: RTN_LOCAL.to_ne_bytes().to_vec(),
        },
    ]
}

/// `l4proto . dport` looked up in `set` (a map's value into `dreg`).
pub(crate) fn port_lookup(set: &str, dreg: Option<u32>) -> Vec<Expr> {
    vec![
        Expr::Meta {
            key: META_L4PROTO,
            dreg: REG32,
        },
        Expr::Payload {
            base: 2,
            offset: 2,
            len: 2,
            dreg: REG32 + 1,
        },
        Expr::Lookup {
            set: set.to_owned(),
            sreg: REG32,
            dreg,
        },
    ]
}

pub(crate) fn verdict(v: Verdict) -> Expr {
    Expr::Immediate {
        dreg: REG_VERDICT,
        value: Vec::new(),
        verdict: Some(v),
    }
}

pub(crate) fn jump(chain: &str) -> Verdict {
    Verdict::Jump(chain.to_owned())
}

fn goto(chain: &str) -> Verdict {
    Verdict::Goto(chain.to_owned())
}

pub(crate) fn mark_rules() -> (Vec<Vec<Expr>>, Vec<Vec<Expr>>) {
    let load = Expr::Meta {
        key: META_MARK,
        dreg: REG32,
    };
    let set = Expr::MetaSet {
        key: META_MARK,
        sreg: REG32,
    };
    let mark_for_masquerade = vec![vec![
        load.clone(),
        Expr::Bitwise {
            sreg: REG32,
            dreg: REG32,
            mask: (!MASQ_MARK).to_ne_bytes().to_vec(),
            xor: MASQ_MARK.to_ne_bytes().to_vec(),
        },
        set.clone(),
    ]];
    let masquerading = vec![
        vec![
            load.clone(),
            Expr::Bitwise {
                sreg: REG32,
                dreg: REG32,
                mask: MASQ_MARK.to_ne_bytes().to_vec(),
                xor: 0u32.to_ne_bytes().to_vec(),
            },
            Expr::Cmp {
                sreg: REG32,
                eq: true,
                data: 0u32.to_ne_bytes().to_vec(),
            },
            verdict(Verdict::Return),
        ],
        vec![
            load,
            Expr::Bitwise {
                sreg: REG32,
                dreg: REG32,
                mask: u32::MAX.to_ne_bytes().to_vec(),
                xor: MASQ_MARK.to_ne_bytes().to_vec(),
            },
            set,
        ],
        vec![Expr::Masquerade],
    ];
    (mark_for_masquerade, masquerading)
}

/// Rules matching a source outside `cidr` (address/prefix).
pub(crate) fn outside(family: &Family, cidr: &str) -> Option<Vec<Expr>> {
    let (network, prefix) = cidr.split_once('/')?;
    let network: IpAddr = network.parse().ok()?;
    if network.is_ipv6() != family.ipv6 {
        return None;
    }
    let prefix: u32 = prefix.parse().ok()?;
    let bits = family.addr_len() * 8;
    let mask: Vec<u8> = (0..family.addr_len())
        .map(|byte| {
            let start = byte * 8;
            let ones = prefix.saturating_sub(start).min(8);
            if ones == 0 { 0 } else { 0xffu8 << (8 - ones) }
        })
        .collect();
    let _ = bits;
    let net: Vec<u8> = ip_bytes(&network)
        .iter()
        .zip(&mask)
        .map(|(a, m)| a & m)
        .collect();
    Some(vec![
        family.saddr(REG32),
        Expr::Bitwise {
            sreg: REG32,
            dreg: REG32,
            mask,
            xor: vec![0; family.addr_len() as usize],
        },
        Expr::Cmp {
            sreg: REG32,
            eq: false,
            data: net,
        },
    ])
}

/// The match for ClusterIP traffic that is masqueraded: to an address . port in the set
/// `cluster-ips`, from outside `cluster_cidr` (from anywhere with `masquerade_all`). `None`:
/// no ClusterIP traffic is.
pub(crate) fn cluster_masquerade(
    family: &Family,
    cluster_cidr: Option<&str>,
    masquerade_all: bool,
) -> Option<Vec<Expr>> {
    let mut rule = if masquerade_all {
        Vec::new()
    } else {
        outside(family, cluster_cidr?)?
    };
    rule.extend(family.service_lookup("cluster-ips", None));
    Some(rule)
}

/// Endpoint choice: endpoint i of n with probability 1/(n-i) given the earlier ones were not
/// chosen, so each is chosen with probability 1/n.
fn balance(chain_of: &dyn Fn(&Endpoint) -> String, endpoints: &[&Endpoint]) -> Vec<Vec<Expr>> {
    let n = endpoints.len();
    endpoints
        .iter()
        .enumerate()
        .map(|(i, endpoint)| {
            let target = goto(&chain_of(endpoint));
            if i + 1 < n {
                vec![
                    Expr::Numgen {
                        dreg: REG32,
                        modulus: (n - i) as u32,
                    },
                    Expr::Cmp {
                        sreg: REG32,
                        eq: true,
                        data: 0u32.to_ne_bytes().to_vec(),
                    },
                    verdict(target),
                ]
            } else {
                vec![verdict(target)]
            }
        })
        .collect()
}

fn chain_suffix(chain: &str) -> &str {
    chain.rsplit('-').next().unwrap_or(chain)
}

/// Service ports with at most this many endpoints (and no session affinity and no
/// `externalTrafficPolicy: Local`) take the flat path: map entries only, no chain of their own.
pub const FLAT_MAX_ENDPOINTS: usize = 16;

/// A set of addresses.
pub(crate) fn ip_set(name: &str, family: &Family) -> SetSpec {
    SetSpec {
        name: name.to_owned(),
        key_type: family.addr_type(),
        key_len: family.addr_len(),
        verdict_map: false,
        data: None,
        timeout_ms: None,
    }
}

/// A set keyed by `daddr . l4proto . dport`.
pub(crate) fn addr_set(name: &str, family: &Family) -> SetSpec {
    SetSpec {
        name: name.to_owned(),
        key_type: (((family.addr_type() << 6) | TYPE_PROTO) << 6) | TYPE_SERVICE,
        key_len: family.addr_len() + 8,
        verdict_map: false,
        data: None,
        timeout_ms: None,
    }
}

/// A set keyed by `l4proto . dport`.
pub(crate) fn port_set(name: &str) -> SetSpec {
    SetSpec {
        name: name.to_owned(),
        key_type: (TYPE_PROTO << 6) | TYPE_SERVICE,
        key_len: 8,
        verdict_map: false,
        data: None,
        timeout_ms: None,
    }
}

/// A map from `key . slot` to `endpoint address . port`, the slot being `numgen random mod n`.
fn slot_map(name: &str, key: SetSpec, family: &Family) -> SetSpec {
    SetSpec {
        name: name.to_owned(),
        key_type: (key.key_type << 6) | TYPE_MARK,
        key_len: key.key_len + 4,
        verdict_map: false,
        data: Some((
            (family.addr_type() << 6) | TYPE_SERVICE,
            family.addr_len() + 4,
        )),
        timeout_ms: None,
    }
}

/// The hairpin set: `daddr . l4proto . dport . saddr` of every endpoint, so that a packet an
/// endpoint sends to itself through a Service (after DNAT: source = destination) is
/// masqueraded, else its reply would never come back through the NAT.
pub(crate) fn loop_back_set(family: &Family) -> SetSpec {
    let mut set = addr_set("loop-back", family);
    set.key_type = (set.key_type << 6) | family.addr_type();
    set.key_len += family.addr_len();
    set
}

/// The key of an endpoint in [`loop_back_set`].
pub(crate) fn loop_back_key(ip: &IpAddr, protocol: Protocol, port: u16) -> Vec<u8> {
    let mut key = addr_key(ip, protocol, port);
    key.extend(ip_bytes(ip));
    key
}

/// `daddr . l4proto . dport . saddr @loop-back masquerade`, for the NAT postrouting hook.
pub(crate) fn loop_back_rule(family: &Family) -> Vec<Expr> {
    let mut rule = family.service_lookup("loop-back", None);
    let (_, _, k3) = family.key_regs();
    rule.insert(3, family.saddr(k3 + 1));
    rule.push(Expr::Masquerade);
    rule
}

/// Where NodePorts answer: every local address, or the `nodePortAddresses` ones.
fn node_port_condition(config: &NftConfig, family: &Family) -> Vec<Expr> {
    match &config.node_port_ips {
        None => local_destination(),
        Some(_) => vec![
            family.daddr(REG32),
            Expr::Lookup {
                set: "nodeport-ips".into(),
                sreg: REG32,
                dreg: None,
            },
        ],
    }
}

fn endpoints_map(count: u32) -> String {
    format!("endpoints-{count}")
}

fn node_port_endpoints_map(count: u32) -> String {
    format!("nodeport-endpoints-{count}")
}

/// The flat path's DNAT for service ports with `count` endpoints, through `addr` or NodePort:
/// `dnat to daddr . l4proto . dport . numgen random mod count map @endpoints-<count>`.
fn pick_rules(config: &NftConfig, family: &Family, count: u32) -> (Vec<Expr>, Vec<Expr>) {
    let data = REG32 + 8;
    let dnat = Expr::Dnat {
        family: family.nfproto(),
        addr_reg: data,
        proto_reg: data + family.addr_len() / 4,
    };
    let (_, _, k3) = family.key_regs();
    let mut cluster = family.service_lookup(&endpoints_map(count), Some(data));
    cluster.insert(
        3,
        Expr::Numgen {
            dreg: k3 + 1,
            modulus: count,
        },
    );
    cluster.push(dnat.clone());
    let mut node_port = node_port_condition(config, family);
    let mut lookup = port_lookup(&node_port_endpoints_map(count), Some(data));
    lookup.insert(
        2,
        Expr::Numgen {
            dreg: REG32 + 2,
            modulus: count,
        },
    );
    node_port.extend(lookup);
    node_port.push(dnat);
    (cluster, node_port)
}

/// The fixed part of the table for flat-path endpoint counts `counts`: base chains, helper
/// chains and the (empty) sets and maps.
pub fn base(config: &NftConfig, counts: &BTreeSet<u32>) -> Ruleset {
    let family = Family { ipv6: config.ipv6 };
    let then = |mut rule: Vec<Expr>, v: Verdict| {
        rule.push(verdict(v));
        rule
    };
    let addr_lookup = |set: &str| family.service_lookup(set, None);
    let local_port_lookup = |set: &str| {
        let mut rule = local_destination();
        rule.extend(port_lookup(set, None));
        rule
    };
    let node_port_lookup = |set: &str, dreg: Option<u32>| {
        let mut rule = node_port_condition(config, &family);
        rule.extend(port_lookup(set, dreg));
        rule
    };
    let (mark_for_masquerade, masquerading) = mark_rules();
    let mut services = vec![
        family.service_lookup("service-chains", Some(REG_VERDICT)),
        node_port_lookup("nodeport-chains", Some(REG_VERDICT)),
    ];
    services.extend(
        cluster_masquerade(
            &family,
            config.cluster_cidr.as_deref(),
            config.masquerade_all,
        )
        .map(|rule| then(rule, jump("mark-for-masquerade"))),
    );
    services.push(then(
        addr_lookup("external-ips"),
        jump("mark-for-masquerade"),
    ));
    services.push(then(
        node_port_lookup("external-nodeports", None),
        jump("mark-for-masquerade"),
    ));
    let (cluster_picks, node_port_picks): (Vec<_>, Vec<_>) = counts
        .iter()
        .map(|count| pick_rules(config, &family, *count))
        .unzip();
    services.extend(cluster_picks);
    services.extend(node_port_picks);
    let base =
        |name: &str, hook: u32, priority: i32, kind: &'static str, rules: Vec<Vec<Expr>>| Chain {
            name: name.to_owned(),
            hook: Some((hook, priority, kind)),
            rules,
        };
    let refuse = |lookup: &dyn Fn(&str) -> Vec<Expr>, what: &str| {
        vec![
            [
                lookup(&format!("reject-{what}")),
                vec![Expr::Reject { ipv6: config.ipv6 }],
            ]
            .concat(),
            then(lookup(&format!("drop-{what}")), Verdict::Drop),
        ]
    };
    let mut ruleset = Ruleset::default();
    ruleset.chains.extend([
        base(
            "nat-prerouting",
            0,
            -100,
            "nat",
            vec![vec![verdict(jump("services"))]],
        ),
        base(
            "nat-output",
            3,
            -100,
            "nat",
            vec![vec![verdict(jump("services"))]],
        ),
        base(
            "nat-postrouting",
            4,
            100,
            "nat",
            vec![vec![verdict(jump("masquerading"))], loop_back_rule(&family)],
        ),
        base(
            "filter-input",
            1,
            -10,
            "filter",
            refuse(&local_port_lookup, "nodeports"),
        ),
        base(
            "filter-forward",
            2,
            -10,
            "filter",
            refuse(&addr_lookup, "ips"),
        ),
        base(
            "filter-output",
            3,
            -10,
            "filter",
            refuse(&addr_lookup, "ips"),
        ),
        Chain {
            name: "services".into(),
            hook: None,
            rules: services,
        },
        Chain {
            name: "masquerading".into(),
            hook: None,
            rules: masquerading,
        },
        Chain {
            name: "mark-for-masquerade".into(),
            hook: None,
            rules: mark_for_masquerade,
        },
    ]);
    let verdicts = |mut set: SetSpec| {
        set.verdict_map = true;
        set
    };
    let empty = |set: SetSpec| (set, Vec::new());
    ruleset.maps = vec![
        empty(verdicts(addr_set("service-chains", &family))),
        empty(verdicts(port_set("nodeport-chains"))),
        empty(addr_set("cluster-ips", &family)),
        empty(addr_set("external-ips", &family)),
        empty(port_set("external-nodeports")),
        empty(addr_set("reject-ips", &family)),
        empty(addr_set("drop-ips", &family)),
        empty(port_set("reject-nodeports")),
        empty(port_set("drop-nodeports")),
        empty(loop_back_set(&family)),
    ];
    for count in counts {
        ruleset.maps.push(empty(slot_map(
            &endpoints_map(*count),
            addr_set("", &family),
            &family,
        )));
        ruleset.maps.push(empty(slot_map(
            &node_port_endpoints_map(*count),
            port_set(""),
            &family,
        )));
    }
    if let Some(ips) = &config.node_port_ips {
        let elements = ips
            .iter()
            .filter(|ip| ip.is_ipv6() == config.ipv6)
            .map(|ip| Element::key(ip_bytes(ip)))
            .collect();
        ruleset
            .maps
            .push((ip_set("nodeport-ips", &family), elements));
    }
    ruleset
}

/// One service port's chains, set and map entries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fragment {
    /// Its chains (none on the flat path).
    pub chains: Vec<Chain>,
    /// Its entries, by set or map name.
    pub elements: BTreeMap<String, Vec<Element>>,
    /// Its affinity sets.
    pub sets: Vec<SetSpec>,
    /// Its keys in `loop-back`, which Service ports share when they share endpoints.
    pub loop_back: Vec<Vec<u8>>,
    /// On the flat path: its number of endpoints.
    pub count: Option<u32>,
}

impl Fragment {
    fn add(&mut self, set: &str, elements: impl IntoIterator<Item = Element>) {
        self.elements
            .entry(set.to_owned())
            .or_default()
            .extend(elements);
    }
}

/// The value of an endpoint in an `endpoints-<n>` map: `address . port`.
fn endpoint_value(endpoint: &Endpoint) -> Vec<u8> {
    let mut value = ip_bytes(&endpoint.ip);
    value.extend_from_slice(&endpoint.port.to_be_bytes());
    value.extend_from_slice(&[0, 0]);
    value
}

/// The chains and map entries of one service port.
pub fn render_port(port: &ServicePort, config: &NftConfig) -> Fragment {
    let in_family = |ip: &IpAddr| ip.is_ipv6() == config.ipv6;
    let mut fragment = Fragment::default();
    let cluster_ips: Vec<&IpAddr> = port.cluster_ips.iter().filter(|ip| in_family(ip)).collect();
    if cluster_ips.is_empty() {
        return fragment;
    }
    let cluster_eps: Vec<&Endpoint> = port
        .cluster_endpoints
        .iter()
        .filter(|e| in_family(&e.ip))
        .collect();
    let external_eps: Vec<&Endpoint> = port
        .external_endpoints
        .iter()
        .filter(|e| in_family(&e.ip))
        .collect();
    let externals: Vec<&IpAddr> = port
        .external_ips
        .iter()
        .chain(&port.load_balancer_ips)
        .filter(|ip| in_family(ip))
        .collect();
    // Ports without endpoints: refused where traffic would be masqueraded anyway, dropped
    // for `externalTrafficPolicy: Local` (the load balancer's health check moves it away).
    if cluster_eps.is_empty() {
        for ip in &cluster_ips {
            fragment.add(
                "reject-ips",
                [Element::key(addr_key(ip, port.protocol, port.port))],
            );
        }
    }
    let externals_refused = if port.external_policy_local {
        external_eps.is_empty()
    } else {
        cluster_eps.is_empty()
    };
    if externals_refused {
        let how = if port.external_policy_local {
            "drop"
        } else {
            "reject"
        };
        for ip in &externals {
            fragment.add(
                &format!("{how}-ips"),
                [Element::key(addr_key(ip, port.protocol, port.port))],
            );
        }
        if let Some(node_port) = port.node_port {
            fragment.add(
                &format!("{how}-nodeports"),
                [Element::key(port_key(port.protocol, node_port))],
            );
        }
    }
    let flat = port.affinity_timeout.is_none()
        && !port.external_policy_local
        && (1..=FLAT_MAX_ENDPOINTS).contains(&cluster_eps.len());
    if flat {
        flat_entries(port, &mut fragment, &cluster_ips, &externals, &cluster_eps);
    } else {
        chain_entries(
            port,
            config,
            &mut fragment,
            (&cluster_ips, &externals),
            (&cluster_eps, &external_eps),
            externals_refused,
        );
    }
    fragment
}

/// The flat path: each address (and the NodePort) has one entry per endpoint slot in
/// `endpoints-<n>`, and the Service's keys go in the masquerade sets. No chains, no jumps: a
/// change is a few element updates, which the kernel applies without revalidating the table.
fn flat_entries(
    port: &ServicePort,
    fragment: &mut Fragment,
    cluster_ips: &[&IpAddr],
    externals: &[&IpAddr],
    endpoints: &[&Endpoint],
) {
    let count = endpoints.len() as u32;
    let slots = |key: Vec<u8>| {
        endpoints.iter().enumerate().map(move |(slot, endpoint)| {
            let mut key = key.clone();
            key.extend_from_slice(&(slot as u32).to_ne_bytes());
            Element::data(key, endpoint_value(endpoint))
        })
    };
    for (set, ips) in [("cluster-ips", cluster_ips), ("external-ips", externals)] {
        for ip in ips {
            let key = addr_key(ip, port.protocol, port.port);
            fragment.add(set, [Element::key(key.clone())]);
            fragment.add(&endpoints_map(count), slots(key));
        }
    }
    if let Some(node_port) = port.node_port {
        let key = port_key(port.protocol, node_port);
        fragment.add("external-nodeports", [Element::key(key.clone())]);
        fragment.add(&node_port_endpoints_map(count), slots(key));
    }
    let mut loop_back: Vec<Vec<u8>> = endpoints
        .iter()
        .map(|e| loop_back_key(&e.ip, port.protocol, e.port))
        .collect();
    loop_back.sort();
    loop_back.dedup();
    fragment.loop_back = loop_back;
    fragment.count = Some(count);
}

/// The chain path, for session affinity, `externalTrafficPolicy: Local` and many endpoints:
/// upstream's shape, a chain per service port and per endpoint reached through the
/// `service-chains` and `nodeport-chains` verdict maps.
fn chain_entries(
    port: &ServicePort,
    config: &NftConfig,
    fragment: &mut Fragment,
    (cluster_ips, externals): (&[&IpAddr], &[&IpAddr]),
    (cluster_eps, external_eps): (&[&Endpoint], &[&Endpoint]),
    externals_refused: bool,
) {
    let family = Family { ipv6: config.ipv6 };
    let hash = chain_suffix(&port.service_chain()).to_owned();
    let service = format!("service-{hash}");
    let external = format!("external-{hash}");
    let local_chain = format!("local-{hash}");
    let endpoint_chain =
        |e: &Endpoint| format!("endpoint-{}", chain_suffix(&port.endpoint_chain(e)));
    // ClientIP affinity: a dynamic set of recent clients per endpoint; a client found in one
    // goes straight back to that endpoint, and every DNAT refreshes the client's entry.
    let affinity_set = |e: &Endpoint| format!("affinity-{}", chain_suffix(&port.endpoint_chain(e)));
    let sticky = |endpoints: &[&Endpoint]| -> Vec<Vec<Expr>> {
        if port.affinity_timeout.is_none() {
            return Vec::new();
        }
        endpoints
            .iter()
            .map(|e| {
                vec![
                    family.saddr(REG32),
                    Expr::Lookup {
                        set: affinity_set(e),
                        sreg: REG32,
                        dreg: None,
                    },
                    verdict(goto(&endpoint_chain(e))),
                ]
            })
            .collect()
    };
    if !cluster_eps.is_empty() {
        for ip in cluster_ips {
            let key = addr_key(ip, port.protocol, port.port);
            fragment.add("service-chains", [Element::verdict(key, goto(&service))]);
        }
    }
    if !externals_refused {
        for ip in externals {
            let key = addr_key(ip, port.protocol, port.port);
            fragment.add("service-chains", [Element::verdict(key, goto(&external))]);
        }
        if let Some(node_port) = port.node_port {
            let key = port_key(port.protocol, node_port);
            fragment.add("nodeport-chains", [Element::verdict(key, goto(&external))]);
        }
    }
    let has_external = !externals.is_empty() || port.node_port.is_some();
    if !cluster_eps.is_empty() {
        let mut rules = Vec::new();
        let masq = if config.masquerade_all {
            Some(Vec::new())
        } else {
            config
                .cluster_cidr
                .as_deref()
                .and_then(|c| outside(&family, c))
        };
        if let Some(mut rule) = masq {
            rule.push(verdict(jump("mark-for-masquerade")));
            rules.push(rule);
        }
        rules.extend(sticky(cluster_eps));
        rules.extend(balance(&endpoint_chain, cluster_eps));
        fragment.chains.push(Chain {
            name: service.clone(),
            hook: None,
            rules,
        });
    }
    if has_external && !externals_refused {
        let rules = if port.external_policy_local {
            let mut rules = Vec::new();
            if let Some(mut inside) = config
                .cluster_cidr
                .as_deref()
                .and_then(|c| outside(&family, c))
            {
                // Pod traffic is cluster traffic: flip the "outside" test to "inside".
                if let Some(Expr::Cmp { eq, .. }) = inside.last_mut() {
                    *eq = true;
                }
                inside.push(verdict(goto(&service)));
                rules.push(inside);
            }
            // The node's own traffic has no source to keep: it goes to any endpoint,
            // masqueraded, as upstream does.
            let mut mark = local_source();
            mark.push(verdict(jump("mark-for-masquerade")));
            let mut to_service = local_source();
            to_service.push(verdict(goto(&service)));
            rules.extend([mark, to_service]);
            rules.push(vec![verdict(goto(&local_chain))]);
            fragment.chains.push(Chain {
                name: local_chain.clone(),
                hook: None,
                rules: [sticky(external_eps), balance(&endpoint_chain, external_eps)].concat(),
            });
            rules
        } else {
            vec![
                vec![verdict(jump("mark-for-masquerade"))],
                vec![verdict(goto(&service))],
            ]
        };
        fragment.chains.push(Chain {
            name: external.clone(),
            hook: None,
            rules,
        });
    }
    let mut endpoints: Vec<&Endpoint> = cluster_eps.iter().chain(external_eps).copied().collect();
    endpoints.sort();
    endpoints.dedup();
    for endpoint in endpoints {
        let addr = ip_bytes(&endpoint.ip);
        let port_reg = REG32 + family.addr_len() / 4;
        let mut remember = Vec::new();
        if let Some(timeout) = port.affinity_timeout {
            fragment.sets.push(SetSpec {
                timeout_ms: Some(u64::from(timeout) * 1000),
                ..ip_set(&affinity_set(endpoint), &family)
            });
            remember.push(vec![
                family.saddr(REG32),
                Expr::DynsetUpdate {
                    set: affinity_set(endpoint),
                    sreg: REG32,
                },
            ]);
        }
        fragment.chains.push(Chain {
            name: endpoint_chain(endpoint),
            hook: None,
            rules: [
                vec![vec![
                    family.saddr(REG32),
                    Expr::Cmp {
                        sreg: REG32,
                        eq: true,
                        data: addr.clone(),
                    },
                    verdict(jump("mark-for-masquerade")),
                ]],
                remember,
                vec![vec![
                    Expr::Meta {
                        key: META_L4PROTO,
                        dreg: REG32,
                    },
                    Expr::Cmp {
                        sreg: REG32,
                        eq: true,
                        data: vec![proto_number(port.protocol)],
                    },
                    Expr::Immediate {
                        dreg: REG32,
                        value: addr,
                        verdict: None,
                    },
                    Expr::Immediate {
                        dreg: port_reg,
                        value: endpoint.port.to_be_bytes().to_vec(),
                        verdict: None,
                    },
                    Expr::Dnat {
                        family: family.nfproto(),
                        addr_reg: REG32,
                        proto_reg: port_reg,
                    },
                ]],
            ]
            .concat(),
        });
    }
}

/// Adds the fragments' chains, sets and entries to `ruleset` (from [`base`]). A key can only
/// be in a set once: the first Service wins (the model already refuses NodePort conflicts;
/// duplicate external IPs across Services are a user error upstream too).
pub fn assemble<'a>(
    mut ruleset: Ruleset,
    fragments: impl IntoIterator<Item = &'a Fragment>,
) -> Ruleset {
    let index: HashMap<&str, usize> = ruleset
        .maps
        .iter()
        .enumerate()
        .map(|(i, (spec, _))| (spec.name.as_str(), i))
        .collect();
    let mut seen: Vec<HashSet<&[u8]>> = (0..ruleset.maps.len()).map(|_| HashSet::new()).collect();
    let mut lists: Vec<Vec<Element>> = vec![Vec::new(); ruleset.maps.len()];
    for fragment in fragments {
        ruleset.chains.extend(fragment.chains.iter().cloned());
        ruleset.sets.extend(fragment.sets.iter().cloned());
        for (set, elements) in &fragment.elements {
            let Some(&i) = index.get(set.as_str()) else {
                debug_assert!(false, "no set {set} in the table");
                continue;
            };
            for element in elements {
                if seen[i].insert(element.key.as_slice()) {
                    lists[i].push(element.clone());
                }
            }
        }
    }
    for ((_, elements), list) in ruleset.maps.iter_mut().zip(lists) {
        elements.extend(list);
    }
    ruleset
}

/// The ruleset for every service port of this family.
pub fn render(ports: &[ServicePort], config: &NftConfig) -> Ruleset {
    let fragments: Vec<Fragment> = ports.iter().map(|p| render_port(p, config)).collect();
    let counts: BTreeSet<u32> = fragments.iter().filter_map(|f| f.count).collect();
    let mut ruleset = assemble(base(config, &counts), &fragments);
    let loop_back: BTreeSet<&Vec<u8>> = fragments.iter().flat_map(|f| &f.loop_back).collect();
    ruleset.push_elements("loop-back", loop_back.into_iter().cloned());
    ruleset
}

impl Ruleset {
    /// Every set and map of the table.
    fn set_specs(&self) -> Vec<&SetSpec> {
        self.maps
            .iter()
            .map(|(spec, _)| spec)
            .chain(&self.sets)
            .collect()
    }

    /// Adds keys to the set `name`.
    fn push_elements(&mut self, name: &str, keys: impl IntoIterator<Item = Vec<u8>>) {
        if let Some((_, elements)) = self.maps.iter_mut().find(|(spec, _)| spec.name == name) {
            elements.extend(keys.into_iter().map(Element::key));
        }
    }

    /// One batch that replaces the table's contents with this ruleset.
    pub fn replace(&self, family: u8) -> Batch {
        let mut batch = Batch::new(family);
        // Add first so that deleting never fails, then start from an empty table.
        batch.add_table(TABLE);
        batch.del_table(TABLE);
        batch.add_table(TABLE);
        for spec in self.set_specs() {
            batch.add_set(TABLE, spec);
        }
        for chain in &self.chains {
            batch.add_chain(TABLE, &chain.name, chain.hook);
        }
        for (spec, elements) in &self.maps {
            if !elements.is_empty() {
                batch.add_elements(TABLE, &spec.name, elements);
            }
        }
        for chain in &self.chains {
            for rule in &chain.rules {
                batch.add_rule(TABLE, &chain.name, rule);
            }
        }
        batch
    }
}

/// The batch that takes the kernel from `old` to `new`: new sets and chains are added and
/// changed chains rewritten before entries point at them; entries that go are deleted before
/// the chains they pointed at and the sets they were in. Unchanged chains and entries are not
/// mentioned at all, so a change to one Service costs the same at 30,000 Services as at ten.
pub fn update(old: &Ruleset, new: &Ruleset, family: u8) -> Batch {
    let mut batch = Batch::new(family);
    let (old_specs, new_specs) = (old.set_specs(), new.set_specs());
    let old_names: BTreeSet<&str> = old_specs.iter().map(|s| s.name.as_str()).collect();
    let new_names: BTreeSet<&str> = new_specs.iter().map(|s| s.name.as_str()).collect();
    for spec in &new_specs {
        if !old_names.contains(spec.name.as_str()) {
            batch.add_set(TABLE, spec);
        }
    }
    let old_chains: BTreeMap<&str, &Chain> =
        old.chains.iter().map(|c| (c.name.as_str(), c)).collect();
    let new_chains: BTreeMap<&str, &Chain> =
        new.chains.iter().map(|c| (c.name.as_str(), c)).collect();
    let mut rewrite = Vec::new();
    for chain in &new.chains {
        match old_chains.get(chain.name.as_str()) {
            None => {
                batch.add_chain(TABLE, &chain.name, chain.hook);
                rewrite.push(chain);
            }
            Some(before) if before.rules != chain.rules || before.hook != chain.hook => {
                batch.flush_chain(TABLE, &chain.name);
                rewrite.push(chain);
            }
            Some(_) => {}
        }
    }
    for chain in rewrite {
        for rule in &chain.rules {
            batch.add_rule(TABLE, &chain.name, rule);
        }
    }
    let old_maps: BTreeMap<&str, &Vec<Element>> =
        old.maps.iter().map(|(s, e)| (s.name.as_str(), e)).collect();
    for (spec, elements) in &new.maps {
        let before: HashMap<&[u8], &Element> = old_maps
            .get(spec.name.as_str())
            .map(|list| list.iter().map(|e| (e.key.as_slice(), e)).collect())
            .unwrap_or_default();
        let after: HashMap<&[u8], &Element> =
            elements.iter().map(|e| (e.key.as_slice(), e)).collect();
        let gone: Vec<Element> = before
            .iter()
            .filter(|(key, element)| after.get(*key) != Some(*element))
            .map(|(_, e)| (*e).clone())
            .collect();
        let added: Vec<Element> = elements
            .iter()
            .filter(|element| before.get(element.key.as_slice()) != Some(element))
            .cloned()
            .collect();
        if !gone.is_empty() {
            batch.del_elements(TABLE, &spec.name, &gone);
        }
        if !added.is_empty() {
            batch.add_elements(TABLE, &spec.name, &added);
        }
    }
    let removed: Vec<&&Chain> = old_chains
        .iter()
        .filter(|(name, _)| !new_chains.contains_key(*name))
        .map(|(_, c)| c)
        .collect();
    // Emptied first, so no rule of a chain that goes still refers to another one that goes.
    for chain in &removed {
        batch.flush_chain(TABLE, &chain.name);
    }
    for chain in &removed {
        batch.del_chain(TABLE, &chain.name);
    }
    for name in old_names.difference(&new_names) {
        batch.del_set(TABLE, name);
    }
    batch
}

/// What was last programmed: each service port with its fragment, and the counts of what
/// fragments share.
#[derive(Debug, Default)]
struct Programmed {
    /// By the hash of service port name and protocol.
    ports: HashMap<u64, Entry>,
    /// Flat-path endpoint counts in use, with how many ports have each.
    counts: BTreeMap<u32, usize>,
    /// `loop-back` keys, with how many ports need each.
    loop_back: HashMap<Vec<u8>, usize>,
    /// Per-service chains of all entries.
    chains: usize,
    /// Each Service's entries (`namespace/name` → port keys).
    services: HashMap<String, Vec<u64>>,
}

/// A programmed service port. Ports are told apart and compared by 64-bit hashes (a collision
/// among 30,000 ports has odds of about 1 in 10^11, and the periodic full sync rewrites all),
/// so the backend keeps no copy of the ports and a sync reads each given port once.
#[derive(Debug)]
struct Entry {
    hash: u64,
    /// Boxed: the table stays small enough for the cache, which a sync walks in full.
    fragment: Box<Fragment>,
}

const HASHER: foldhash::fast::FixedState = foldhash::fast::FixedState::with_seed(0x7467);

/// A port's identity (name and protocol) and contents, hashed in one pass.
fn fingerprint(port: &ServicePort) -> (u64, u64) {
    use std::hash::{Hash, Hasher};
    let mut hasher = HASHER.build_hasher();
    port.name.hash(&mut hasher);
    port.protocol.hash(&mut hasher);
    let key = hasher.finish();
    port.hash(&mut hasher);
    (key, hasher.finish())
}

impl Programmed {
    /// Counts a fragment in; returns the `loop-back` keys it is the first to need.
    fn count_in(&mut self, fragment: &Fragment, added: &mut Vec<Vec<u8>>) {
        self.chains += fragment.chains.len();
        if let Some(count) = fragment.count {
            *self.counts.entry(count).or_default() += 1;
        }
        for key in &fragment.loop_back {
            let users = self.loop_back.entry(key.clone()).or_default();
            *users += 1;
            if *users == 1 {
                added.push(key.clone());
            }
        }
    }

    /// Counts a fragment out; returns the `loop-back` keys nobody needs any more.
    fn count_out(&mut self, fragment: &Fragment, dropped: &mut Vec<Vec<u8>>) {
        self.chains -= fragment.chains.len();
        if let Some(count) = fragment.count
            && let Some(users) = self.counts.get_mut(&count)
        {
            *users -= 1;
            if *users == 0 {
                self.counts.remove(&count);
            }
        }
        for key in &fragment.loop_back {
            if let Some(users) = self.loop_back.get_mut(key) {
                *users -= 1;
                if *users == 0 {
                    self.loop_back.remove(key);
                    dropped.push(key.clone());
                }
            }
        }
    }

    fn counts(&self) -> BTreeSet<u32> {
        self.counts.keys().copied().collect()
    }
}

/// The nftables backend for one family.
#[derive(Debug)]
pub struct Nftables {
    config: NftConfig,
    /// `None` (at start, after a failure or cleanup) forces a full replace.
    programmed: Option<Programmed>,
    /// Opened at the first sync, in that thread's network namespace.
    socket: Option<netlink::Socket>,
}

impl Nftables {
    /// A backend for `config`'s family.
    pub fn new(config: NftConfig) -> Nftables {
        Nftables {
            config,
            programmed: None,
            socket: None,
        }
    }

    fn family(&self) -> u8 {
        if self.config.ipv6 {
            FAMILY_IPV6
        } else {
            FAMILY_IPV4
        }
    }

    /// Programs `ports` in one transaction: the whole table when `full` (or after a failure),
    /// else only what differs from the last sync, found by comparing every port with what was
    /// programmed (a 64-bit hash each). Returns (messages sent, per-service chains in place).
    pub fn sync<'a>(
        &mut self,
        ports: impl IntoIterator<Item = &'a ServicePort>,
        full: bool,
    ) -> Result<(usize, usize), NftError> {
        let known = self
            .programmed
            .iter()
            .flat_map(|state| state.services.keys());
        let services = crate::model::by_service(ports, known);
        self.program(services, full)
    }

    /// Programs the changes of some Services in one transaction: each named Service's ports are
    /// now exactly those given (none: it is gone); every other Service stays as it is. Only
    /// these ports are looked at, so one change costs the same whatever the number of
    /// Services. Without a previous successful sync this cannot know the rest, and returns
    /// `None`: call [`Nftables::sync`] with everything.
    pub fn sync_services<'a>(
        &mut self,
        changed: impl IntoIterator<Item = (&'a str, &'a [ServicePort])>,
    ) -> Option<Result<(usize, usize), NftError>> {
        self.programmed.as_ref()?;
        let changed = crate::model::changed_services(changed);
        Some(self.program(changed, false))
    }

    /// Programs `services` (each with all its ports), replacing the whole table when `full`.
    fn program(
        &mut self,
        services: Vec<(std::borrow::Cow<'_, str>, Vec<&ServicePort>)>,
        full: bool,
    ) -> Result<(usize, usize), NftError> {
        let mut full = full;
        if !self.config.node_port_cidrs.is_empty() {
            let ips = Some(crate::addresses::select(
                &crate::addresses::local_addresses(),
                &self.config.node_port_cidrs,
            ));
            // The fixed part of the table changes with them: rewrite it all.
            full |= ips != self.config.node_port_ips;
            self.config.node_port_ips = ips;
        }
        let incremental = !full && self.programmed.is_some();
        let mut state = match self.programmed.take() {
            Some(state) if incremental => state,
            _ => Programmed::default(),
        };
        let old_counts = state.counts();
        let (mut gone, mut came) = (Vec::new(), Vec::new());
        let (mut added, mut dropped) = (Vec::new(), Vec::new());
        let mut keys: Vec<u64> = Vec::new();
        for (service, ports) in services {
            keys.clear();
            for port in ports {
                let (key, hash) = fingerprint(port);
                // Named twice: the later one wins.
                let again = keys.contains(&key);
                if !again {
                    keys.push(key);
                }
                if !again
                    && state
                        .ports
                        .get(&key)
                        .is_some_and(|entry| entry.hash == hash)
                {
                    continue;
                }
                let fragment = render_port(port, &self.config);
                state.count_in(&fragment, &mut added);
                if incremental {
                    came.push(fragment.clone());
                }
                let entry = Entry {
                    hash,
                    fragment: Box::new(fragment),
                };
                if let Some(old) = state.ports.insert(key, entry) {
                    gone.push(*old.fragment);
                }
            }
            let old_keys = state.services.get(service.as_ref());
            if old_keys.map_or(&[][..], Vec::as_slice) == keys.as_slice() {
                continue; // the same ports as before
            }
            let old_keys = state.services.remove(service.as_ref()).unwrap_or_default();
            for key in old_keys.iter().filter(|k| !keys.contains(k)) {
                if let Some(old) = state.ports.remove(key) {
                    gone.push(*old.fragment);
                }
            }
            if !keys.is_empty() {
                state.services.insert(service.into_owned(), keys.clone());
            }
        }
        for fragment in &gone {
            state.count_out(fragment, &mut dropped);
        }
        let new_counts = state.counts();
        let batch = if incremental {
            let mut old = assemble(base(&self.config, &old_counts), &gone);
            old.push_elements("loop-back", dropped);
            let mut new = assemble(base(&self.config, &new_counts), &came);
            new.push_elements("loop-back", added);
            update(&old, &new, self.family())
        } else {
            let mut ruleset = assemble(
                base(&self.config, &new_counts),
                state.ports.values().map(|e| &*e.fragment),
            );
            ruleset.push_elements("loop-back", state.loop_back.keys().cloned());
            ruleset.replace(self.family())
        };
        let messages = batch.len();
        if messages > 0 {
            self.apply(batch)?;
        }
        let chains = state.chains;
        self.programmed = Some(state);
        Ok((messages, chains))
    }

    fn apply(&mut self, batch: Batch) -> Result<(), NftError> {
        let socket = match &mut self.socket {
            Some(socket) => socket,
            None => self.socket.insert(netlink::Socket::open()?),
        };
        let outcome = socket.apply(batch);
        if let Err(NftError::Socket { .. }) = outcome {
            self.socket = None;
        }
        outcome
    }

    /// Removes tug's table.
    pub fn cleanup(&mut self) -> Result<(), NftError> {
        let mut batch = Batch::new(self.family());
        batch.add_table(TABLE);
        batch.del_table(TABLE);
        self.programmed = None;
        self.apply(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(ip: &str) -> Endpoint {
        Endpoint {
            ip: ip.parse().unwrap(),
            port: 8080,
            local: false,
        }
    }

    fn web(endpoints: &[&str]) -> ServicePort {
        let eps: Vec<Endpoint> = endpoints.iter().map(|e| endpoint(e)).collect();
        ServicePort {
            name: "ns1/svc1:p80".into(),
            protocol: Protocol::Tcp,
            cluster_ips: vec!["172.30.0.41".parse().unwrap()],
            port: 80,
            node_port: Some(30080),
            external_ips: vec![],
            load_balancer_ips: vec![],
            affinity_timeout: None,
            cluster_endpoints: eps.clone(),
            external_endpoints: eps,
            health_check_node_port: None,
            external_policy_local: false,
        }
    }

    fn config() -> NftConfig {
        NftConfig {
            cluster_cidr: Some("10.0.0.0/8".into()),
            ..Default::default()
        }
    }

    fn set<'a>(ruleset: &'a Ruleset, name: &str) -> &'a [Element] {
        &ruleset
            .maps
            .iter()
            .find(|(spec, _)| spec.name == name)
            .unwrap_or_else(|| panic!("no set {name}"))
            .1
    }

    fn chain<'a>(ruleset: &'a Ruleset, name: &str) -> &'a Chain {
        ruleset.chains.iter().find(|c| c.name == name).unwrap()
    }

    #[test]
    fn a_plain_service_is_map_entries_and_no_chain() {
        let ruleset = render(&[web(&["10.180.0.1", "10.180.0.2"])], &config());
        let key = vec![172, 30, 0, 41, 6, 0, 0, 0, 0, 80, 0, 0];
        assert_eq!(set(&ruleset, "cluster-ips"), [Element::key(key.clone())]);
        let endpoints = set(&ruleset, "endpoints-2");
        assert_eq!(endpoints.len(), 2, "one entry per endpoint slot");
        let mut slot1 = key.clone();
        slot1.extend(1u32.to_ne_bytes());
        assert!(
            endpoints.contains(&Element::data(slot1, vec![10, 180, 0, 2, 0x1f, 0x90, 0, 0])),
            "{endpoints:?}"
        );
        let node_port = vec![6, 0, 0, 0, 0x75, 0x80, 0, 0];
        assert_eq!(
            set(&ruleset, "external-nodeports"),
            [Element::key(node_port.clone())]
        );
        assert_eq!(set(&ruleset, "nodeport-endpoints-2").len(), 2);
        assert_eq!(set(&ruleset, "loop-back").len(), 2, "hairpin per endpoint");
        assert!(set(&ruleset, "service-chains").is_empty());
        assert!(
            !ruleset
                .chains
                .iter()
                .any(|c| c.name.starts_with("service-") || c.name.starts_with("endpoint-")),
            "no per-service chain"
        );
        // One DNAT rule for services with two endpoints: a random slot of two.
        let services = chain(&ruleset, "services");
        let pick = services
            .rules
            .iter()
            .find(|r| {
                r.iter()
                    .any(|e| matches!(e, Expr::Lookup { set, .. } if set == "endpoints-2"))
            })
            .expect("the endpoints-2 rule");
        assert!(
            pick.iter()
                .any(|e| matches!(e, Expr::Numgen { modulus: 2, .. }))
        );
        assert!(matches!(pick.last(), Some(Expr::Dnat { .. })));
        assert!(
            !ruleset.maps.iter().any(|(s, _)| s.name == "endpoints-1"),
            "maps only for the counts in use"
        );
    }

    #[test]
    fn affinity_and_local_policy_take_the_chain_path() {
        let mut sticky = web(&["10.180.0.1", "10.180.0.2"]);
        sticky.affinity_timeout = Some(60);
        let ruleset = render(&[sticky], &config());
        let elements = set(&ruleset, "service-chains");
        assert_eq!(elements.len(), 1);
        assert_eq!(
            elements[0].verdict,
            Some(Verdict::Goto("service-XPGD46QRK7WJZT7O".into()))
        );
        let service = chain(&ruleset, "service-XPGD46QRK7WJZT7O");
        assert_eq!(
            service.rules.len(),
            5,
            "masquerade check, two sticky lookups, then two endpoints"
        );
        assert_eq!(ruleset.sets.len(), 2, "an affinity set per endpoint");
        assert!(set(&ruleset, "cluster-ips").is_empty());

        let mut local = web(&["10.180.0.1"]);
        local.external_policy_local = true;
        local.external_endpoints = vec![];
        let ruleset = render(&[local], &config());
        assert_eq!(set(&ruleset, "service-chains").len(), 1);
        assert_eq!(
            set(&ruleset, "drop-nodeports").len(),
            1,
            "no local endpoint: external traffic is dropped"
        );
    }

    #[test]
    fn ports_without_endpoints_are_rejected() {
        let ruleset = render(&[web(&[])], &config());
        assert!(set(&ruleset, "cluster-ips").is_empty());
        assert_eq!(set(&ruleset, "reject-ips").len(), 1);
        assert_eq!(
            set(&ruleset, "reject-nodeports").len(),
            1,
            "the NodePort too"
        );
        assert!(
            !ruleset
                .chains
                .iter()
                .any(|c| c.name.starts_with("service-"))
        );
        let output = chain(&ruleset, "filter-output");
        assert!(matches!(output.rules[0].last(), Some(Expr::Reject { .. })));
    }

    #[test]
    fn the_cluster_cidr_mask_is_computed_per_byte() {
        let family = Family { ipv6: false };
        let rule = outside(&family, "10.244.0.0/14").unwrap();
        assert!(matches!(&rule[1], Expr::Bitwise { mask, .. } if mask == &vec![255, 252, 0, 0]));
        assert!(
            matches!(&rule[2], Expr::Cmp { eq: false, data, .. } if data == &vec![10, 244, 0, 0])
        );
        assert!(outside(&family, "fd00::/64").is_none(), "other family");
    }

    fn labels_of(batch: Batch) -> Vec<String> {
        batch.finish().1.into_iter().map(|(_, l)| l).collect()
    }

    #[test]
    fn an_update_touches_only_what_changed() {
        let mut other = web(&["10.180.1.1"]);
        other.name = "ns2/other:p80".into();
        other.cluster_ips = vec!["172.30.0.42".parse().unwrap()];
        other.node_port = None;
        other.affinity_timeout = Some(30);
        let before = render(
            &[web(&["10.180.0.1", "10.180.0.2"]), other.clone()],
            &config(),
        );
        assert!(
            update(&before, &before, FAMILY_IPV4).is_empty(),
            "no change, no message"
        );
        // An endpoint moves: two entries change, nothing else.
        let after = render(
            &[web(&["10.180.0.1", "10.180.0.3"]), other.clone()],
            &config(),
        );
        let labels = labels_of(update(&before, &after, FAMILY_IPV4));
        assert_eq!(
            labels[1..labels.len() - 1],
            [
                "delete 1 elements in tug-proxy loop-back",
                "add 1 elements in tug-proxy loop-back",
                "delete 1 elements in tug-proxy endpoints-2",
                "add 1 elements in tug-proxy endpoints-2",
                "delete 1 elements in tug-proxy nodeport-endpoints-2",
                "add 1 elements in tug-proxy nodeport-endpoints-2",
            ],
            "{labels:?}"
        );
        // A third endpoint: the services chain gains the rules for three, the maps for three
        // come, those for two go once nothing uses them.
        let three = render(
            &[
                web(&["10.180.0.1", "10.180.0.2", "10.180.0.3"]),
                other.clone(),
            ],
            &config(),
        );
        let labels = labels_of(update(&before, &three, FAMILY_IPV4));
        let position = |label: &str| {
            labels
                .iter()
                .position(|l| l == label)
                .unwrap_or_else(|| panic!("no {label} in {labels:?}"))
        };
        assert!(
            position("add set tug-proxy endpoints-3") < position("flush chain tug-proxy services")
        );
        assert!(
            position("flush chain tug-proxy services")
                < position("delete set tug-proxy endpoints-2")
        );
        assert!(
            position("add 3 elements in tug-proxy endpoints-3")
                < position("delete set tug-proxy endpoints-2")
        );
        assert!(
            !labels
                .iter()
                .any(|l| l.contains("affinity-") || l.contains("service-")),
            "the other Service is not touched: {labels:?}"
        );
        // On the chain path, a moved endpoint rewrites that service's chain and nothing else.
        let mut moved = other.clone();
        moved.cluster_endpoints = vec![endpoint("10.180.1.2")];
        moved.external_endpoints = moved.cluster_endpoints.clone();
        let after = render(&[web(&["10.180.0.1", "10.180.0.2"]), moved], &config());
        let labels = labels_of(update(&before, &after, FAMILY_IPV4));
        assert!(
            labels
                .iter()
                .any(|l| l.starts_with("flush chain tug-proxy service-")),
            "{labels:?}"
        );
        let flush = labels
            .iter()
            .position(|l| l.starts_with("flush chain tug-proxy endpoint-"))
            .unwrap();
        let rewrite = labels
            .iter()
            .position(|l| l.starts_with("add rule tug-proxy service-"))
            .unwrap();
        assert!(
            rewrite < flush,
            "the chain that goes is emptied after its last reference"
        );
        assert!(
            !labels.iter().any(|l| l.contains("endpoints-2")),
            "{labels:?}"
        );
    }

    #[test]
    fn a_replace_batch_creates_maps_and_chains_before_what_refers_to_them() {
        let batch = render(&[web(&["10.180.0.1"])], &config()).replace(FAMILY_IPV4);
        let (_, labels) = batch.finish();
        let position = |prefix: &str| {
            labels
                .iter()
                .position(|(_, l)| l.starts_with(prefix))
                .unwrap()
        };
        assert!(
            position("add set tug-proxy cluster-ips")
                < position("add 1 elements in tug-proxy cluster-ips")
        );
        assert!(
            position("add set tug-proxy endpoints-1")
                < position("add 1 elements in tug-proxy endpoints-1")
        );
        assert!(
            position("add 1 elements in tug-proxy endpoints-1")
                < position("add rule tug-proxy services")
        );
        assert_eq!(labels[2].1, "delete table tug-proxy");
    }
}
