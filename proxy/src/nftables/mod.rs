//! The nftables backend: a table of tug's own (`ip tug-proxy`, `ip6 tug-proxy`) programmed over
//! netlink in one atomic batch per sync ([`netlink`]), with no `nft` in the path. Service lookup
//! costs the same whatever the number of Services: one verdict-map lookup keyed by
//! `daddr . l4proto . dport` (`service-ips`) or `l4proto . dport` (`service-nodeports`). Each
//! service port has its own chain that picks an endpoint with `numgen random` and each endpoint
//! a chain that DNATs; ports without endpoints are rejected through `no-endpoint-*` maps.
//!
//! Syncs replace the table's contents in one transaction: either all of the new ruleset is in
//! place or none of it. Rendering ([`render`]) is pure and unit-tested; traffic tests run it
//! in network namespaces and read it back with `nft -j list`.

pub mod netlink;

use std::collections::BTreeMap;
use std::net::IpAddr;

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

/// `fib daddr type local`.
pub(crate) fn local_destination() -> Vec<Expr> {
    vec![
        Expr::FibDaddrType { dreg: REG32 },
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

/// The fixed part of the table: base chains, helper chains and the (empty) maps.
pub fn base(config: &NftConfig) -> Ruleset {
    let family = Family { ipv6: config.ipv6 };
    let addr_key_type = (((family.addr_type() << 6) | TYPE_PROTO) << 6) | TYPE_SERVICE;
    let addr_key_len = family.addr_len() + 8;
    let map = |name: &str, by_addr: bool| SetSpec {
        name: name.to_owned(),
        key_type: if by_addr {
            addr_key_type
        } else {
            (TYPE_PROTO << 6) | TYPE_SERVICE
        },
        key_len: if by_addr { addr_key_len } else { 8 },
        verdict_map: true,
        timeout_ms: None,
    };
    let addr_lookup = |set: &str| family.service_lookup(set, Some(REG_VERDICT));
    // protocol . destination port → verdict, from map `set`.
    let l4_lookup = |set: &str| port_lookup(set, Some(REG_VERDICT));
    let local_port_lookup = |set: &str| {
        let mut rule = local_destination();
        rule.extend(l4_lookup(set));
        rule
    };
    let (mark_for_masquerade, masquerading) = mark_rules();
    let mut ruleset = Ruleset::default();
    // NodePorts: on every local address, or on the `nodePortAddresses` ones (set `nodeport-ips`).
    let nodeport_rule = match &config.node_port_ips {
        None => local_port_lookup("service-nodeports"),
        Some(_) => {
            let mut rule = vec![
                family.daddr(REG32),
                Expr::Lookup {
                    set: "nodeport-ips".into(),
                    sreg: REG32,
                    dreg: None,
                },
            ];
            rule.extend(l4_lookup("service-nodeports"));
            rule
        }
    };
    let base =
        |name: &str, hook: u32, priority: i32, kind: &'static str, rules: Vec<Vec<Expr>>| Chain {
            name: name.to_owned(),
            hook: Some((hook, priority, kind)),
            rules,
        };
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
            vec![vec![verdict(jump("masquerading"))]],
        ),
        base(
            "filter-input",
            1,
            -10,
            "filter",
            vec![local_port_lookup("no-endpoint-nodeports")],
        ),
        base(
            "filter-forward",
            2,
            -10,
            "filter",
            vec![addr_lookup("no-endpoint-services")],
        ),
        base(
            "filter-output",
            3,
            -10,
            "filter",
            vec![addr_lookup("no-endpoint-services")],
        ),
        Chain {
            name: "services".into(),
            hook: None,
            rules: vec![addr_lookup("service-ips"), nodeport_rule],
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
        Chain {
            name: "reject-chain".into(),
            hook: None,
            rules: vec![vec![Expr::Reject { ipv6: config.ipv6 }]],
        },
    ]);
    ruleset.maps = vec![
        (map("service-ips", true), Vec::new()),
        (map("service-nodeports", false), Vec::new()),
        (map("no-endpoint-services", true), Vec::new()),
        (map("no-endpoint-nodeports", false), Vec::new()),
    ];
    if let Some(ips) = &config.node_port_ips {
        let elements = ips
            .iter()
            .filter(|ip| ip.is_ipv6() == config.ipv6)
            .map(|ip| Element {
                key: ip_bytes(ip),
                verdict: None,
            })
            .collect();
        ruleset.maps.push((
            SetSpec {
                name: "nodeport-ips".into(),
                key_type: family.addr_type(),
                key_len: family.addr_len(),
                verdict_map: false,
                timeout_ms: None,
            },
            elements,
        ));
    }
    ruleset
}

/// One service port's chains and map entries (in the order of [`base`]'s maps).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fragment {
    /// Its chains.
    pub chains: Vec<Chain>,
    /// Its entries in `service-ips`, `service-nodeports`, `no-endpoint-services`,
    /// `no-endpoint-nodeports`.
    pub elements: [Vec<Element>; 4],
    /// Its affinity sets.
    pub sets: Vec<SetSpec>,
}

/// The chains and map entries of one service port.
pub fn render_port(port: &ServicePort, config: &NftConfig) -> Fragment {
    let family = Family { ipv6: config.ipv6 };
    let in_family = |ip: &IpAddr| ip.is_ipv6() == config.ipv6;
    let mut ruleset = Ruleset::default();
    let (
        mut service_ips,
        mut service_nodeports,
        mut no_endpoint_services,
        mut no_endpoint_nodeports,
    ) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let element = |key: Vec<u8>, v: Verdict| Element {
        key,
        verdict: Some(v),
    };
    let cluster_ips: Vec<&IpAddr> = port.cluster_ips.iter().filter(|ip| in_family(ip)).collect();
    if cluster_ips.is_empty() {
        return Fragment::default();
    }
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
    let externals_reject = if port.external_policy_local {
        external_eps.is_empty()
    } else {
        cluster_eps.is_empty()
    };
    let external_verdict = if port.external_policy_local {
        Verdict::Drop
    } else {
        goto("reject-chain")
    };

    for ip in &cluster_ips {
        let key = addr_key(ip, port.protocol, port.port);
        if cluster_eps.is_empty() {
            no_endpoint_services.push(element(key, goto("reject-chain")));
        } else {
            service_ips.push(element(key, goto(&service)));
        }
    }
    for ip in &externals {
        let key = addr_key(ip, port.protocol, port.port);
        if externals_reject {
            no_endpoint_services.push(element(key, external_verdict.clone()));
        } else {
            service_ips.push(element(key, goto(&external)));
        }
    }
    if let Some(node_port) = port.node_port {
        let key = port_key(port.protocol, node_port);
        if externals_reject {
            no_endpoint_nodeports.push(element(key, external_verdict.clone()));
        } else {
            service_nodeports.push(element(key, goto(&external)));
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
        rules.extend(sticky(&cluster_eps));
        rules.extend(balance(&endpoint_chain, &cluster_eps));
        ruleset.chains.push(Chain {
            name: service.clone(),
            hook: None,
            rules,
        });
    }
    if has_external && !externals_reject {
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
            rules.push(vec![verdict(goto(&local_chain))]);
            ruleset.chains.push(Chain {
                name: local_chain.clone(),
                hook: None,
                rules: [
                    sticky(&external_eps),
                    balance(&endpoint_chain, &external_eps),
                ]
                .concat(),
            });
            rules
        } else {
            vec![
                vec![verdict(jump("mark-for-masquerade"))],
                vec![verdict(goto(&service))],
            ]
        };
        ruleset.chains.push(Chain {
            name: external.clone(),
            hook: None,
            rules,
        });
    }
    let mut endpoints: Vec<&Endpoint> = cluster_eps.iter().chain(&external_eps).copied().collect();
    endpoints.sort();
    endpoints.dedup();
    for endpoint in endpoints {
        let addr = ip_bytes(&endpoint.ip);
        let port_reg = REG32 + family.addr_len() / 4;
        let mut remember = Vec::new();
        if let Some(timeout) = port.affinity_timeout {
            ruleset.sets.push(SetSpec {
                name: affinity_set(endpoint),
                key_type: family.addr_type(),
                key_len: family.addr_len(),
                verdict_map: false,
                timeout_ms: Some(u64::from(timeout) * 1000),
            });
            remember.push(vec![
                family.saddr(REG32),
                Expr::DynsetUpdate {
                    set: affinity_set(endpoint),
                    sreg: REG32,
                },
            ]);
        }
        ruleset.chains.push(Chain {
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
    Fragment {
        chains: ruleset.chains,
        elements: [
            service_ips,
            service_nodeports,
            no_endpoint_services,
            no_endpoint_nodeports,
        ],
        sets: ruleset.sets,
    }
}

/// Assembles the table from its fixed part and the service ports' fragments. A key can only be
/// in a map once: the first Service wins (the model already refuses NodePort conflicts;
/// duplicate external IPs across Services are a user error upstream too).
pub fn assemble<'a>(
    config: &NftConfig,
    fragments: impl IntoIterator<Item = &'a Fragment>,
) -> Ruleset {
    let mut ruleset = base(config);
    let mut seen: [std::collections::BTreeSet<&[u8]>; 4] = Default::default();
    let mut lists: [Vec<Element>; 4] = Default::default();
    for fragment in fragments {
        ruleset.chains.extend(fragment.chains.iter().cloned());
        ruleset.sets.extend(fragment.sets.iter().cloned());
        for (i, elements) in fragment.elements.iter().enumerate() {
            for element in elements {
                if seen[i].insert(element.key.as_slice()) {
                    lists[i].push(element.clone());
                }
            }
        }
    }
    for ((_, elements), list) in ruleset.maps.iter_mut().zip(lists) {
        *elements = list;
    }
    ruleset
}

/// The ruleset for every service port of this family.
pub fn render(ports: &[ServicePort], config: &NftConfig) -> Ruleset {
    let fragments: Vec<Fragment> = ports.iter().map(|p| render_port(p, config)).collect();
    assemble(config, &fragments)
}

impl Ruleset {
    /// One batch that replaces the table's contents with this ruleset.
    pub fn replace(&self, family: u8) -> Batch {
        let mut batch = Batch::new(family);
        // Add first so that deleting never fails, then start from an empty table.
        batch.add_table(TABLE);
        batch.del_table(TABLE);
        batch.add_table(TABLE);
        for (spec, _) in &self.maps {
            batch.add_set(TABLE, spec);
        }
        for spec in &self.sets {
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

/// The batch that takes the kernel from `old` to `new`: new chains are added and changed ones
/// rewritten before map elements point at them; elements that go are deleted before the chains
/// they pointed at. Unchanged chains and elements are not mentioned at all, so a change to one
/// Service costs the same at 30,000 Services as at ten.
pub fn update(old: &Ruleset, new: &Ruleset, family: u8) -> Batch {
    use std::collections::BTreeMap;
    let mut batch = Batch::new(family);
    let old_sets: std::collections::BTreeSet<&str> =
        old.sets.iter().map(|s| s.name.as_str()).collect();
    let new_sets: std::collections::BTreeSet<&str> =
        new.sets.iter().map(|s| s.name.as_str()).collect();
    for spec in &new.sets {
        if !old_sets.contains(spec.name.as_str()) {
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
        let before: BTreeMap<&[u8], &Element> = old_maps
            .get(spec.name.as_str())
            .map(|list| list.iter().map(|e| (e.key.as_slice(), e)).collect())
            .unwrap_or_default();
        let after: BTreeMap<&[u8], &Element> =
            elements.iter().map(|e| (e.key.as_slice(), e)).collect();
        let gone: Vec<Element> = before
            .iter()
            .filter(|(key, element)| after.get(*key) != Some(*element))
            .map(|(_, e)| (*e).clone())
            .collect();
        let added: Vec<Element> = after
            .iter()
            .filter(|(key, element)| before.get(*key) != Some(*element))
            .map(|(_, e)| (*e).clone())
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
    for name in old_sets.difference(&new_sets) {
        batch.del_set(TABLE, name);
    }
    batch
}

/// The nftables backend for one family.
#[derive(Debug, Clone)]
pub struct Nftables {
    config: NftConfig,
    /// Per service port (name, protocol): the port as last programmed and its fragment; `None`
    /// (at start, after a failure or cleanup) forces a full replace.
    programmed: Option<BTreeMap<(String, Protocol), (ServicePort, Fragment)>>,
}

impl Nftables {
    /// A backend for `config`'s family.
    pub fn new(config: NftConfig) -> Nftables {
        Nftables {
            config,
            programmed: None,
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
    /// else only what changed since the last sync. Only the service ports that differ from
    /// what was programmed are rendered and compared, so one change costs the same whatever
    /// the number of Services. Returns (messages sent, per-service chains in place).
    pub fn sync(&mut self, ports: &[ServicePort], full: bool) -> Result<(usize, usize), NftError> {
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
        let mut previous = self.programmed.take();
        let incremental = previous.is_some() && !full;
        let mut next = BTreeMap::new();
        let (mut old_fragments, mut new_fragments) = (Vec::new(), Vec::new());
        for port in ports {
            let key = (port.name.clone(), port.protocol);
            let before = previous.as_mut().and_then(|p| p.remove(&key));
            let fragment = match before {
                Some((old_port, fragment)) if &old_port == port => fragment,
                before => {
                    let fragment = render_port(port, &self.config);
                    if let Some((_, old)) = before {
                        old_fragments.push(old);
                    }
                    new_fragments.push(fragment.clone());
                    fragment
                }
            };
            next.insert(key, (port.clone(), fragment));
        }
        // What is left of the previous sync is gone.
        old_fragments.extend(previous.into_iter().flatten().map(|(_, (_, f))| f));
        let batch = if incremental {
            update(
                &assemble(&self.config, &old_fragments),
                &assemble(&self.config, &new_fragments),
                self.family(),
            )
        } else {
            assemble(&self.config, next.values().map(|(_, f)| f)).replace(self.family())
        };
        let messages = batch.len();
        if messages > 0 {
            netlink::apply(batch)?;
        }
        let chains = next.values().map(|(_, f)| f.chains.len()).sum();
        self.programmed = Some(next);
        Ok((messages, chains))
    }

    /// Removes tug's table.
    pub fn cleanup(&mut self) -> Result<(), NftError> {
        let mut batch = Batch::new(self.family());
        batch.add_table(TABLE);
        batch.del_table(TABLE);
        self.programmed = None;
        netlink::apply(batch)
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

    #[test]
    fn service_lookup_is_one_map_entry_per_address_and_port() {
        let ruleset = render(&[web(&["10.180.0.1", "10.180.0.2"])], &config());
        let (spec, elements) = &ruleset.maps[0];
        assert_eq!(spec.name, "service-ips");
        assert_eq!(spec.key_len, 12);
        assert_eq!(elements.len(), 1);
        assert_eq!(
            elements[0].key,
            vec![172, 30, 0, 41, 6, 0, 0, 0, 0, 80, 0, 0]
        );
        assert_eq!(
            elements[0].verdict,
            Some(Verdict::Goto("service-XPGD46QRK7WJZT7O".into()))
        );
        let nodeports = &ruleset.maps[1].1;
        assert_eq!(nodeports[0].key, vec![6, 0, 0, 0, 0x75, 0x80, 0, 0]);
        let service = ruleset
            .chains
            .iter()
            .find(|c| c.name == "service-XPGD46QRK7WJZT7O")
            .unwrap();
        assert_eq!(
            service.rules.len(),
            3,
            "masquerade check, then two endpoints"
        );
        assert!(matches!(
            service.rules[1][0],
            Expr::Numgen { modulus: 2, .. }
        ));
        assert_eq!(
            ruleset
                .chains
                .iter()
                .filter(|c| c.name.starts_with("endpoint-"))
                .count(),
            2
        );
    }

    #[test]
    fn ports_without_endpoints_go_to_the_reject_chain() {
        let ruleset = render(&[web(&[])], &config());
        assert!(ruleset.maps[0].1.is_empty());
        assert_eq!(ruleset.maps[2].1.len(), 1);
        assert_eq!(
            ruleset.maps[2].1[0].verdict,
            Some(Verdict::Goto("reject-chain".into()))
        );
        assert_eq!(ruleset.maps[3].1.len(), 1, "the NodePort rejects too");
        assert!(
            !ruleset
                .chains
                .iter()
                .any(|c| c.name.starts_with("service-"))
        );
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

    #[test]
    fn an_update_touches_only_what_changed() {
        let mut other = web(&["10.180.1.1"]);
        other.name = "ns2/other:p80".into();
        other.cluster_ips = vec!["172.30.0.42".parse().unwrap()];
        other.node_port = None;
        let before = render(
            &[web(&["10.180.0.1", "10.180.0.2"]), other.clone()],
            &config(),
        );
        assert!(
            update(&before, &before, FAMILY_IPV4).is_empty(),
            "no change, no message"
        );
        let after = render(&[web(&["10.180.0.2"]), other], &config());
        let (_, labels) = update(&before, &after, FAMILY_IPV4).finish();
        let labels: Vec<&str> = labels.iter().map(|(_, l)| l.as_str()).collect();
        assert!(
            labels
                .iter()
                .any(|l| l.starts_with("flush chain tug-proxy service-XPGD46QRK7WJZT7O")),
            "{labels:?}"
        );
        assert!(
            labels
                .iter()
                .any(|l| l.starts_with("delete chain tug-proxy endpoint-")),
            "{labels:?}"
        );
        assert!(
            !labels
                .iter()
                .any(|l| l.contains("service-") && l.contains("other")),
            "{labels:?}"
        );
        assert!(
            !labels.iter().any(|l| l.contains("elements")),
            "map entries did not change: {labels:?}"
        );
        // Everything after the flush of a chain that goes comes after its last reference.
        let flush = labels
            .iter()
            .position(|l| l.starts_with("flush chain tug-proxy endpoint-"))
            .unwrap();
        let rewrite = labels
            .iter()
            .position(|l| l.starts_with("add rule tug-proxy service-XPGD46QRK7WJZT7O"))
            .unwrap();
        assert!(rewrite < flush);
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
            position("add set tug-proxy service-ips")
                < position("add 1 elements in tug-proxy service-ips")
        );
        assert!(
            position("add chain tug-proxy service-")
                < position("add 1 elements in tug-proxy service-ips")
        );
        assert!(
            position("add chain tug-proxy endpoint-") < position("add rule tug-proxy service-")
        );
        assert_eq!(labels[2].1, "delete table tug-proxy");
    }
}
