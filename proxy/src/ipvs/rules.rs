//! The netfilter half of IPVS mode. IPVS does the load balancing; tug's nftables table (the same
//! `tug-proxy` table as nftables mode, written with the same netlink encoder) does what IPVS
//! cannot: it marks for masquerade the traffic that needs it (ClusterIP traffic from outside the
//! cluster CIDR, NodePort and external traffic unless `externalTrafficPolicy: Local`), it
//! masquerades marked and hairpin traffic (a pod reaching itself through its Service), and it
//! refuses new connections to a Service address on a port that is no Service's (upstream's
//! `KUBE-IPVS-FILTER`), so the VIPs on the dummy device do not expose the node's own listeners.

use std::net::IpAddr;

use crate::model::Protocol;
use crate::nftables::netlink::{Element, Expr, REG32, Verdict};
use crate::nftables::{
    Chain, Family, META_L4PROTO, Ruleset, addr_key, addr_set, cluster_masquerade, ip_bytes, ip_set,
    jump, local_destination, loop_back_key, loop_back_rule, loop_back_set, mark_rules, port_key,
    port_lookup, port_set, verdict,
};

/// `ct state`, and its `new` bit.
const CT_STATE: u32 = 0;
const CT_STATE_NEW: u32 = 1 << 3;

/// What the rules are built from, for one family.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inputs {
    /// `address . protocol . port` of every ClusterIP service port.
    pub cluster: Vec<(IpAddr, Protocol, u16)>,
    /// External and LoadBalancer IPs of ports whose external traffic is masqueraded.
    pub external: Vec<(IpAddr, Protocol, u16)>,
    /// Every virtual service on a Service address (cluster, external, LoadBalancer).
    pub services: Vec<(IpAddr, Protocol, u16)>,
    /// NodePorts whose traffic is masqueraded.
    pub node_ports: Vec<(Protocol, u16)>,
    /// Endpoints (`address . protocol . port`) that may reach themselves through a Service.
    pub endpoints: Vec<(IpAddr, Protocol, u16)>,
    /// The addresses on the VIP device.
    pub vips: Vec<IpAddr>,
}

/// How the rules are rendered for one family.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuleConfig {
    /// IPv6.
    pub ipv6: bool,
    /// The cluster CIDR of this family; ClusterIP traffic from outside it is masqueraded.
    pub cluster_cidr: Option<String>,
    /// Masquerade all ClusterIP traffic.
    pub masquerade_all: bool,
}

fn elements(keys: impl Iterator<Item = Vec<u8>>) -> Vec<Element> {
    let mut keys: Vec<Vec<u8>> = keys.collect();
    keys.sort();
    keys.dedup();
    keys.into_iter().map(Element::key).collect()
}

/// The table for one family.
pub fn render(config: &RuleConfig, inputs: &Inputs) -> Ruleset {
    let family = Family { ipv6: config.ipv6 };
    let ours = |ip: &IpAddr| ip.is_ipv6() == config.ipv6;
    let addr_lookup = |set: &str| family.service_lookup(set, None);
    let then = |mut rule: Vec<Expr>, v: Verdict| {
        rule.push(verdict(v));
        rule
    };
    let mut mark = Vec::new();
    let cluster_rule = cluster_masquerade(
        &family,
        config.cluster_cidr.as_deref(),
        config.masquerade_all,
    );
    if let Some(rule) = cluster_rule {
        mark.push(then(rule, jump("mark-for-masquerade")));
    }
    mark.push(then(
        addr_lookup("external-ips"),
        jump("mark-for-masquerade"),
    ));
    let mut node_ports = local_destination();
    node_ports.extend(port_lookup("node-ports", None));
    mark.push(then(node_ports, jump("mark-for-masquerade")));
    let icmp = if config.ipv6 { 58u8 } else { 1 };
    // Only new connections: replies to the node's own connections from a VIP pass.
    let not_new = vec![
        Expr::Ct {
            key: CT_STATE,
            dreg: REG32,
        },
        Expr::Bitwise {
            sreg: REG32,
            dreg: REG32,
            mask: CT_STATE_NEW.to_ne_bytes().to_vec(),
            xor: 0u32.to_ne_bytes().to_vec(),
        },
        Expr::Cmp {
            sreg: REG32,
            eq: true,
            data: 0u32.to_ne_bytes().to_vec(),
        },
        verdict(Verdict::Return),
    ];
    let vip_filter = vec![
        not_new,
        vec![
            Expr::Meta {
                key: META_L4PROTO,
                dreg: REG32,
            },
            Expr::Cmp {
                sreg: REG32,
                eq: true,
                data: vec![icmp],
            },
            verdict(Verdict::Return),
        ],
        then(addr_lookup("services"), Verdict::Return),
        vec![Expr::Reject { ipv6: config.ipv6 }],
    ];
    let (mark_for_masquerade, masquerading) = mark_rules();
    let base =
        |name: &str, hook: u32, priority: i32, kind: &'static str, rules: Vec<Vec<Expr>>| Chain {
            name: name.to_owned(),
            hook: Some((hook, priority, kind)),
            rules,
        };
    let chain = |name: &str, rules: Vec<Vec<Expr>>| Chain {
        name: name.to_owned(),
        hook: None,
        rules,
    };
    let chains = vec![
        base(
            "nat-prerouting",
            0,
            -100,
            "nat",
            vec![vec![verdict(jump("ipvs-mark"))]],
        ),
        base(
            "nat-output",
            3,
            -100,
            "nat",
            vec![vec![verdict(jump("ipvs-mark"))]],
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
            vec![vec![
                family.daddr(REG32),
                Expr::Lookup {
                    set: "vips".into(),
                    sreg: REG32,
                    dreg: None,
                },
                verdict(jump("vip-filter")),
            ]],
        ),
        chain("ipvs-mark", mark),
        chain("mark-for-masquerade", mark_for_masquerade),
        chain("masquerading", masquerading),
        chain("vip-filter", vip_filter),
    ];
    let keyed = |list: &[(IpAddr, Protocol, u16)]| {
        elements(
            list.iter()
                .filter(|(ip, _, _)| ours(ip))
                .map(|(ip, protocol, port)| addr_key(ip, *protocol, *port)),
        )
    };
    let maps = vec![
        (addr_set("cluster-ips", &family), keyed(&inputs.cluster)),
        (addr_set("external-ips", &family), keyed(&inputs.external)),
        (addr_set("services", &family), keyed(&inputs.services)),
        (
            port_set("node-ports"),
            elements(
                inputs
                    .node_ports
                    .iter()
                    .map(|(protocol, port)| port_key(*protocol, *port)),
            ),
        ),
        (
            loop_back_set(&family),
            elements(
                inputs
                    .endpoints
                    .iter()
                    .filter(|(ip, _, _)| ours(ip))
                    .map(|(ip, protocol, port)| loop_back_key(ip, *protocol, *port)),
            ),
        ),
        (
            ip_set("vips", &family),
            elements(inputs.vips.iter().filter(|ip| ours(ip)).map(ip_bytes)),
        ),
    ];
    Ruleset {
        chains,
        maps,
        sets: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs() -> Inputs {
        let vip: IpAddr = "10.96.0.10".parse().unwrap();
        let v6: IpAddr = "fd00::a".parse().unwrap();
        Inputs {
            cluster: vec![(vip, Protocol::Udp, 53), (v6, Protocol::Udp, 53)],
            external: Vec::new(),
            services: vec![(vip, Protocol::Udp, 53), (v6, Protocol::Udp, 53)],
            node_ports: vec![(Protocol::Tcp, 30080)],
            endpoints: vec![("10.244.1.5".parse().unwrap(), Protocol::Udp, 53)],
            vips: vec![vip, v6],
        }
    }

    #[test]
    fn sets_hold_only_their_familys_keys() {
        let config = RuleConfig {
            ipv6: false,
            cluster_cidr: Some("10.244.0.0/16".into()),
            masquerade_all: false,
        };
        let ruleset = render(&config, &inputs());
        let set = |name: &str| {
            ruleset
                .maps
                .iter()
                .find(|(spec, _)| spec.name == name)
                .unwrap()
        };
        assert_eq!(
            set("cluster-ips").1,
            [Element::key(vec![10, 96, 0, 10, 17, 0, 0, 0, 0, 53, 0, 0])]
        );
        assert_eq!(set("vips").1.len(), 1, "no IPv6 VIP in the ip table");
        let (spec, loop_back) = set("loop-back");
        assert_eq!(spec.key_len, 16);
        assert_eq!(loop_back[0].key[12..], [10, 244, 1, 5]);
        // ClusterIP traffic is marked only from outside the cluster CIDR.
        let mark = ruleset
            .chains
            .iter()
            .find(|c| c.name == "ipvs-mark")
            .unwrap();
        assert!(
            matches!(mark.rules[0][2], Expr::Cmp { eq: false, .. }),
            "{:?}",
            mark.rules[0]
        );
    }

    #[test]
    fn without_a_cluster_cidr_cluster_traffic_is_not_marked() {
        let ruleset = render(&RuleConfig::default(), &inputs());
        let mark = ruleset
            .chains
            .iter()
            .find(|c| c.name == "ipvs-mark")
            .unwrap();
        assert_eq!(mark.rules.len(), 2, "external IPs and NodePorts only");
    }
}
