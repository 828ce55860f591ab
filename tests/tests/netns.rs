//! netns tier: real veth pairs and real traffic between throwaway network namespaces.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use tug_tests::netns::{Netns, tcp_round_trip, veth_pair};
use tug_tests::tier::{Tier, require};

#[test]
#[ignore = "netns tier (root): run as root via ./scripts/test, or cargo test -p tug-tests --test netns -- --ignored"]
fn tcp_payload_crosses_a_veth_pair_with_the_source_address_preserved() {
    require(Tier::Netns);
    let client = Netns::new("cli");
    let server = Netns::new("srv");
    veth_pair(&client, "c0", &server, "s0");
    client.ip(&["addr", "add", "10.250.0.1/24", "dev", "c0"]);
    server.ip(&["addr", "add", "10.250.0.2/24", "dev", "s0"]);
    let server_addr = SocketAddr::from((Ipv4Addr::new(10, 250, 0, 2), 7000));
    let peer = tcp_round_trip(&client, &server, server_addr);
    assert_eq!(
        peer.ip(),
        Ipv4Addr::new(10, 250, 0, 1),
        "the server sees the client's own address"
    );
}

#[test]
#[ignore = "netns tier (root): run as root via ./scripts/test, or cargo test -p tug-tests --test netns -- --ignored"]
fn a_namespace_is_isolated_from_the_host_network() {
    require(Tier::Netns);
    let isolated = Netns::new("iso");
    isolated.ip(&["addr", "add", "10.250.1.1/32", "dev", "lo"]);
    let addr = SocketAddr::from((Ipv4Addr::new(10, 250, 1, 1), 7001));

    // Binding is local: it proves the address is absent from the host without sending a packet.
    let from_host = TcpListener::bind(addr);
    assert!(
        from_host.is_err(),
        "the host must not own an address that exists only in the netns"
    );

    let inside = isolated.run(|| {
        let listener = TcpListener::bind(addr).expect("bind in netns");
        TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map(|_| listener)
    });
    assert!(
        inside.is_ok(),
        "inside the netns the listener answers: {inside:?}"
    );
}
