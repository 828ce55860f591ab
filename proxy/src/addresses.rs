//! `nodePortAddresses`: which of this node's addresses accept NodePort traffic. Upstream's
//! option is a list of CIDRs; the addresses of local interfaces inside them are used, read
//! again at every sync so that addresses added later are picked up.

use std::net::IpAddr;

use ipnet::IpNet;

/// Why a `nodePortAddresses` entry is refused. Not retryable: the configuration must change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("nodePortAddresses entry {0:?} is not a CIDR such as 192.168.0.0/16")]
pub struct BadCidr(pub String);

/// Parses `nodePortAddresses`.
pub fn parse(entries: &[String]) -> Result<Vec<IpNet>, BadCidr> {
    entries
        .iter()
        .map(|e| e.trim().parse::<IpNet>().map_err(|_| BadCidr(e.clone())))
        .collect()
}

/// The addresses among `local` inside any of `cidrs`.
pub fn select(local: &[IpAddr], cidrs: &[IpNet]) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = local
        .iter()
        .filter(|ip| cidrs.iter().any(|c| c.contains(*ip)))
        .copied()
        .collect();
    out.sort();
    out.dedup();
    out
}

/// This network namespace's interface addresses.
pub fn local_addresses() -> Vec<IpAddr> {
    let Ok(addresses) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    addresses
        .filter_map(|a| a.address)
        .filter_map(|a| {
            if let Some(v4) = a.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_inside_the_cidrs_are_selected() {
        let cidrs = parse(&["192.168.50.0/24".into(), "fd00:50::/64".into()]).unwrap();
        let local: Vec<IpAddr> = [
            "127.0.0.1",
            "192.168.50.1",
            "10.0.0.5",
            "fd00:50::1",
            "192.168.50.1",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        let chosen: Vec<String> = select(&local, &cidrs)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(chosen, ["192.168.50.1", "fd00:50::1"]);
        assert_eq!(
            parse(&["primary".into()]).unwrap_err().to_string(),
            "nodePortAddresses entry \"primary\" is not a CIDR such as 192.168.0.0/16"
        );
    }

    #[test]
    fn loopback_is_among_the_local_addresses() {
        assert!(local_addresses().iter().any(IpAddr::is_loopback));
    }
}
