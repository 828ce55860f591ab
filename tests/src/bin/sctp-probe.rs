//! A small SCTP server and client for traffic tests in guests (this host's kernel has no SCTP):
//! `sctp-probe serve PORT NAME` answers every association with `NAME`; `sctp-probe get ADDR
//! PORT` prints the answer, or nothing within 3 s. std has no SCTP sockets, but a one-to-one
//! style SCTP socket reads and writes like a TCP one once it exists.

#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "a command-line probe reports on stdout"
)]

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::time::Duration;

use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockProtocol, SockType, SockaddrStorage, bind, connect,
    listen, setsockopt, socket, sockopt,
};

fn sctp_socket(address: &SocketAddr) -> OwnedFd {
    let family = if address.is_ipv6() {
        AddressFamily::Inet6
    } else {
        AddressFamily::Inet
    };
    socket(
        family,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::Sctp,
    )
    .expect("an SCTP socket (is the sctp module loaded?)")
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["serve", port, name] => {
            let address = SocketAddr::new(IpAddr::from([0u8; 4]), port.parse().expect("a port"));
            let fd = sctp_socket(&address);
            setsockopt(&fd, sockopt::ReuseAddr, &true).expect("SO_REUSEADDR");
            bind(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                &SockaddrStorage::from(address),
            )
            .expect("bind");
            listen(&fd, Backlog::new(64).expect("backlog")).expect("listen");
            let listener = TcpListener::from(fd);
            loop {
                if let Ok((mut association, _)) = listener.accept() {
                    let _ = association.write_all(name.as_bytes());
                }
            }
        }
        ["get", address, port] => {
            let address = SocketAddr::new(
                address.parse().expect("an address"),
                port.parse().expect("a port"),
            );
            // An INIT that is dropped is retried for minutes: give up after 3 s.
            std::thread::spawn(|| {
                std::thread::sleep(Duration::from_secs(3));
                std::process::exit(1);
            });
            let fd = sctp_socket(&address);
            if let Err(error) = connect(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                &SockaddrStorage::from(address),
            ) {
                eprintln!("connect {address}: {error}");
                std::process::exit(1);
            }
            let mut stream = TcpStream::from(fd);
            let mut answer = String::new();
            let _ = stream.read_to_string(&mut answer);
            println!("{answer}");
        }
        _ => {
            eprintln!("usage: sctp-probe serve PORT NAME | sctp-probe get ADDRESS PORT");
            std::process::exit(2);
        }
    }
}
