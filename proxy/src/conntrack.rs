//! Clearing stale UDP conntrack entries over netlink (ctnetlink), as upstream kube-proxy does
//! with the `conntrack` tool: UDP has no connection teardown, so a flow DNATed to an endpoint
//! that went away would keep going there until its entry times out. After a sync, entries whose
//! original destination is a Service address (and port) and whose reply comes from a removed
//! endpoint are deleted. Encoding and parsing are pure and unit-tested; [`clear`] talks to the
//! kernel of the calling thread's network namespace.

use std::net::IpAddr;
use std::os::fd::AsRawFd;

use nix::sys::socket::{MsgFlags, recv, send};

use crate::model::{Protocol, ServicePort};
use crate::nfnetlink::{
    self, NLA_F_NESTED, NLM_F_ACK, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR, attr as push_attr,
};

const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
const NLM_F_DUMP: u16 = 0x300;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
const IPPROTO_UDP: u8 = 17;

/// One conntrack entry's tuples (what matching and deleting need).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flow {
    /// Original direction: source address.
    pub src: IpAddr,
    /// Original direction: destination address (the Service address).
    pub dst: IpAddr,
    /// Original direction: source port.
    pub sport: u16,
    /// Original direction: destination port (the Service port).
    pub dport: u16,
    /// IP protocol number.
    pub proto: u8,
    /// Reply direction: source address (the endpoint after DNAT).
    pub reply_src: IpAddr,
}

/// A stale destination: UDP traffic to `dst` (any local address when `None`, for NodePorts)
/// on `port` that was sent to `endpoint`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Stale {
    /// The Service address, or `None` for a NodePort on any node address.
    pub dst: Option<IpAddr>,
    /// The Service port or NodePort.
    pub port: u16,
    /// The removed endpoint.
    pub endpoint: IpAddr,
}

impl Stale {
    /// Whether `flow` is traffic this entry describes.
    pub fn matches(&self, flow: &Flow) -> bool {
        flow.proto == IPPROTO_UDP
            && flow.dport == self.port
            && flow.reply_src == self.endpoint
            && self.dst.is_none_or(|dst| dst == flow.dst)
    }
}

/// The UDP destinations whose endpoints went away between `before` and `after`.
pub fn stale_udp(before: &[ServicePort], after: &[ServicePort]) -> Vec<Stale> {
    let mut stale = Vec::new();
    for old in before.iter().filter(|p| p.protocol == Protocol::Udp) {
        let new = after
            .iter()
            .find(|p| p.name == old.name && p.protocol == old.protocol);
        let kept = |ip: &IpAddr| {
            new.is_some_and(|n| {
                n.cluster_endpoints
                    .iter()
                    .chain(&n.external_endpoints)
                    .any(|e| e.ip == *ip)
            })
        };
        let gone: std::collections::BTreeSet<IpAddr> = old
            .cluster_endpoints
            .iter()
            .chain(&old.external_endpoints)
            .map(|e| e.ip)
            .filter(|ip| !kept(ip))
            .collect();
        for endpoint in gone {
            for dst in old
                .cluster_ips
                .iter()
                .chain(&old.external_ips)
                .chain(&old.load_balancer_ips)
            {
                stale.push(Stale {
                    dst: Some(*dst),
                    port: old.port,
                    endpoint,
                });
            }
            if let Some(node_port) = old.node_port {
                stale.push(Stale {
                    dst: None,
                    port: node_port,
                    endpoint,
                });
            }
        }
    }
    stale.sort();
    stale.dedup();
    stale
}

fn message(kind: u16, flags: u16, seq: u32, family: u8, attrs: &[u8]) -> Vec<u8> {
    let mut body = vec![family, 0, 0, 0];
    body.extend_from_slice(attrs);
    let mut out = Vec::with_capacity(16 + body.len());
    nfnetlink::message(
        &mut out,
        (NFNL_SUBSYS_CTNETLINK << 8) | kind,
        flags,
        seq,
        &body,
    );
    out
}

fn family_of(ip: &IpAddr) -> u8 {
    if ip.is_ipv4() { 2 } else { 10 }
}

/// A dump request for every entry of `family` (2 = IPv4, 10 = IPv6).
pub fn encode_dump(family: u8, seq: u32) -> Vec<u8> {
    message(
        IPCTNL_MSG_CT_GET,
        NLM_F_REQUEST | NLM_F_DUMP,
        seq,
        family,
        &[],
    )
}

/// A delete request for `flow`, by its original tuple.
pub fn encode_delete(flow: &Flow, seq: u32) -> Vec<u8> {
    let mut ip = Vec::new();
    match (flow.src, flow.dst) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            push_attr(&mut ip, CTA_IP_V4_SRC, &src.octets());
            push_attr(&mut ip, CTA_IP_V4_DST, &dst.octets());
        }
        (src, dst) => {
            let v6 = |ip: IpAddr| match ip {
                IpAddr::V6(v6) => v6.octets(),
                IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            };
            push_attr(&mut ip, CTA_IP_V6_SRC, &v6(src));
            push_attr(&mut ip, CTA_IP_V6_DST, &v6(dst));
        }
    }
    let mut proto = Vec::new();
    push_attr(&mut proto, CTA_PROTO_NUM, &[flow.proto]);
    push_attr(&mut proto, CTA_PROTO_SRC_PORT, &flow.sport.to_be_bytes());
    push_attr(&mut proto, CTA_PROTO_DST_PORT, &flow.dport.to_be_bytes());
    let mut tuple = Vec::new();
    push_attr(&mut tuple, CTA_TUPLE_IP | NLA_F_NESTED, &ip);
    push_attr(&mut tuple, CTA_TUPLE_PROTO | NLA_F_NESTED, &proto);
    let mut attrs = Vec::new();
    push_attr(&mut attrs, CTA_TUPLE_ORIG | NLA_F_NESTED, &tuple);
    message(
        IPCTNL_MSG_CT_DELETE,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        family_of(&flow.dst),
        &attrs,
    )
}

fn ip_of(payload: &[u8]) -> Option<IpAddr> {
    match payload.len() {
        4 => Some(IpAddr::from(<[u8; 4]>::try_from(payload).ok()?)),
        16 => Some(IpAddr::from(<[u8; 16]>::try_from(payload).ok()?)),
        _ => None,
    }
}

/// (src, dst, proto, sport, dport) of a tuple attribute's payload.
fn tuple(payload: &[u8]) -> Option<(IpAddr, IpAddr, u8, u16, u16)> {
    let (mut src, mut dst, mut proto, mut sport, mut dport) = (None, None, None, 0, 0);
    for (kind, inner) in crate::nfnetlink::attributes(payload) {
        match kind {
            CTA_TUPLE_IP => {
                for (k, v) in crate::nfnetlink::attributes(inner) {
                    match k {
                        CTA_IP_V4_SRC | CTA_IP_V6_SRC => src = ip_of(v),
                        CTA_IP_V4_DST | CTA_IP_V6_DST => dst = ip_of(v),
                        _ => {}
                    }
                }
            }
            CTA_TUPLE_PROTO => {
                for (k, v) in crate::nfnetlink::attributes(inner) {
                    match (k, v.len()) {
                        (CTA_PROTO_NUM, 1) => proto = Some(v[0]),
                        (CTA_PROTO_SRC_PORT, 2) => sport = u16::from_be_bytes([v[0], v[1]]),
                        (CTA_PROTO_DST_PORT, 2) => dport = u16::from_be_bytes([v[0], v[1]]),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some((src?, dst?, proto?, sport, dport))
}

/// The flows in one conntrack message's payload (nfgenmsg + attributes).
pub fn parse_flow(payload: &[u8]) -> Option<Flow> {
    let body = payload.get(4..)?;
    let (mut orig, mut reply) = (None, None);
    for (kind, inner) in crate::nfnetlink::attributes(body) {
        match kind {
            CTA_TUPLE_ORIG => orig = tuple(inner),
            CTA_TUPLE_REPLY => reply = tuple(inner),
            _ => {}
        }
    }
    let (src, dst, proto, sport, dport) = orig?;
    let (reply_src, ..) = reply?;
    Some(Flow {
        src,
        dst,
        sport,
        dport,
        proto,
        reply_src,
    })
}

/// Why clearing failed. Retryable at the next sync.
#[derive(Debug, thiserror::Error)]
#[error("conntrack over netlink: {what}: {errno}")]
pub struct ConntrackError {
    what: &'static str,
    errno: nix::Error,
}

fn fail(what: &'static str) -> impl FnOnce(nix::Error) -> ConntrackError {
    move |errno| ConntrackError { what, errno }
}

/// Deletes every conntrack entry that matches one of `stale`; returns how many went.
pub fn clear(stale: &[Stale]) -> Result<usize, ConntrackError> {
    if stale.is_empty() {
        return Ok(0);
    }
    let fd = nfnetlink::socket().map_err(fail("open socket"))?;
    let mut flows = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let families: std::collections::BTreeSet<u8> =
        stale.iter().map(|s| family_of(&s.endpoint)).collect();
    for (seq, family) in families.into_iter().enumerate() {
        send(
            fd.as_raw_fd(),
            &encode_dump(family, seq as u32 + 1),
            MsgFlags::empty(),
        )
        .map_err(fail("send dump"))?;
        'dump: loop {
            let n =
                recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()).map_err(fail("receive dump"))?;
            for message in nfnetlink::messages(&buf[..n]) {
                match message.kind {
                    NLMSG_DONE => break 'dump,
                    NLMSG_ERROR => {
                        let code = message.error_code();
                        if code != 0 {
                            return Err(ConntrackError {
                                what: "dump",
                                errno: nix::Error::from_raw(-code),
                            });
                        }
                        break 'dump;
                    }
                    _ => {
                        if let Some(flow) = parse_flow(message.payload)
                            && stale.iter().any(|s| s.matches(&flow))
                        {
                            flows.push(flow);
                        }
                    }
                }
            }
        }
    }
    let mut deleted = 0;
    for (i, flow) in flows.iter().enumerate() {
        send(
            fd.as_raw_fd(),
            &encode_delete(flow, 1000 + i as u32),
            MsgFlags::empty(),
        )
        .map_err(fail("send delete"))?;
        let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()).map_err(fail("receive ack"))?;
        for message in nfnetlink::messages(&buf[..n]) {
            if message.kind == NLMSG_ERROR {
                let code = message.error_code();
                // Gone already (expired meanwhile) is fine.
                if code == 0 || code == -(nix::libc::ENOENT) {
                    deleted += usize::from(code == 0);
                } else {
                    return Err(ConntrackError {
                        what: "delete",
                        errno: nix::Error::from_raw(-code),
                    });
                }
            }
        }
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Endpoint;

    fn udp_port(endpoints: &[&str]) -> ServicePort {
        let eps: Vec<Endpoint> = endpoints
            .iter()
            .map(|ip| Endpoint {
                ip: ip.parse().unwrap(),
                port: 53,
                local: false,
            })
            .collect();
        ServicePort {
            name: "kube-system/dns:dns".into(),
            protocol: Protocol::Udp,
            cluster_ips: vec!["10.96.0.10".parse().unwrap()],
            port: 53,
            node_port: Some(30053),
            external_ips: vec![],
            load_balancer_ips: vec![],
            affinity_timeout: None,
            cluster_endpoints: eps.clone(),
            external_endpoints: eps,
            health_check_node_port: None,
            external_policy_local: false,
        }
    }

    #[test]
    fn removed_udp_endpoints_are_stale_for_every_service_address() {
        let before = [udp_port(&["10.244.1.5", "10.244.2.7"])];
        let after = [udp_port(&["10.244.2.7"])];
        let stale = stale_udp(&before, &after);
        let gone: IpAddr = "10.244.1.5".parse().unwrap();
        assert_eq!(
            stale,
            [
                Stale {
                    dst: None,
                    port: 30053,
                    endpoint: gone
                },
                Stale {
                    dst: Some("10.96.0.10".parse().unwrap()),
                    port: 53,
                    endpoint: gone
                },
            ]
        );
        assert!(stale_udp(&after, &after).is_empty());
        assert_eq!(
            stale_udp(&before, &[]).len(),
            4,
            "a deleted Service leaves every endpoint stale"
        );
    }

    #[test]
    fn a_delete_request_round_trips_through_the_parser() {
        let flow = Flow {
            src: "192.168.50.2".parse().unwrap(),
            dst: "10.96.0.10".parse().unwrap(),
            sport: 40000,
            dport: 53,
            proto: IPPROTO_UDP,
            reply_src: "192.168.50.2".parse().unwrap(),
        };
        let request = encode_delete(&flow, 7);
        let parsed = nfnetlink::messages(&request);
        assert_eq!(parsed.len(), 1);
        assert_eq!(
            parsed[0].kind,
            (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE
        );
        // The request carries only the original tuple; parse it back as a tuple.
        let body = &parsed[0].payload[4..];
        let (kind, orig) = crate::nfnetlink::attributes(body)[0];
        assert_eq!(kind, CTA_TUPLE_ORIG);
        assert_eq!(
            tuple(orig),
            Some((flow.src, flow.dst, IPPROTO_UDP, 40000, 53))
        );
        let stale = Stale {
            dst: Some(flow.dst),
            port: 53,
            endpoint: flow.reply_src,
        };
        assert!(stale.matches(&flow));
        assert!(
            !Stale {
                dst: None,
                port: 54,
                endpoint: flow.reply_src
            }
            .matches(&flow)
        );
    }
}
