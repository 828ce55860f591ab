//! The health-check NodePorts of `externalTrafficPolicy: Local` Services: for each, an HTTP
//! server on the Service's `healthCheckNodePort` that answers 200 while this node has a local
//! endpoint and 503 otherwise, so an external load balancer only sends traffic to nodes that
//! can serve it without a second hop (upstream kube-proxy's behaviour and body).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;

use crate::model::ServicePort;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    namespace: String,
    name: String,
    local_endpoints: usize,
}

/// The answer for one health-check port: status code and JSON body.
fn answer(target: &Target) -> (u16, String) {
    let body = format!(
        "{{\"service\":{{\"namespace\":\"{}\",\"name\":\"{}\"}},\"localEndpoints\":{},\"serviceProxyHealthy\":true}}",
        target.namespace, target.name, target.local_endpoints
    );
    (if target.local_endpoints > 0 { 200 } else { 503 }, body)
}

/// What each health-check port should report, from the programmed service ports.
fn targets(ports: &[ServicePort]) -> BTreeMap<u16, Target> {
    let mut out: BTreeMap<u16, Target> = BTreeMap::new();
    for port in ports {
        let Some(check) = port.health_check_node_port else {
            continue;
        };
        let service = port.name.split(':').next().unwrap_or(&port.name);
        let (namespace, name) = service.split_once('/').unwrap_or(("", service));
        let local = port.external_endpoints.iter().filter(|e| e.local).count();
        let entry = out.entry(check).or_insert_with(|| Target {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            local_endpoints: 0,
        });
        // A Service's ports share one health check: count its local endpoints once per address.
        entry.local_endpoints = entry.local_endpoints.max(local);
    }
    out
}

/// The health-check servers.
#[derive(Debug)]
pub struct HealthChecks {
    bind: IpAddr,
    servers: BTreeMap<u16, (Arc<Mutex<Target>>, JoinHandle<()>)>,
}

impl Default for HealthChecks {
    fn default() -> Self {
        HealthChecks::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
    }
}

impl HealthChecks {
    /// Servers listening on `bind` (all addresses by default).
    pub fn new(bind: IpAddr) -> HealthChecks {
        HealthChecks {
            bind,
            servers: BTreeMap::new(),
        }
    }

    /// Starts, updates and stops servers to match `ports`. A port that cannot be bound is
    /// logged and retried at the next update.
    pub async fn update(&mut self, ports: &[ServicePort]) {
        let wanted = targets(ports);
        self.servers.retain(|port, (_, task)| {
            let keep = wanted.contains_key(port);
            if !keep {
                task.abort();
            }
            keep
        });
        for (port, target) in wanted {
            if let Some((current, _)) = self.servers.get(&port) {
                *current.lock().unwrap_or_else(|p| p.into_inner()) = target;
                continue;
            }
            let address = SocketAddr::new(self.bind, port);
            let listener = match tokio::net::TcpListener::bind(address).await {
                Ok(listener) => listener,
                Err(error) => {
                    tracing::warn!(%address, %error, service = %format!("{}/{}", target.namespace, target.name), "cannot serve the health-check NodePort");
                    continue;
                }
            };
            let shared = Arc::new(Mutex::new(target));
            let state = shared.clone();
            let task = tokio::spawn(async move {
                loop {
                    let Ok((mut conn, _)) = listener.accept().await else {
                        continue;
                    };
                    let state = state.clone();
                    tokio::spawn(async move {
                        let mut buf = [0u8; 2048];
                        let _ =
                            tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf)).await;
                        let (status, body) =
                            answer(&state.lock().unwrap_or_else(|p| p.into_inner()));
                        let reason = if status == 200 {
                            "OK"
                        } else {
                            "Service Unavailable"
                        };
                        let response = format!(
                            "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nX-Content-Type-Options: nosniff\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                            body.len()
                        );
                        let _ = conn.write_all(response.as_bytes()).await;
                    });
                }
            });
            self.servers.insert(port, (shared, task));
        }
    }

    /// The ports served now.
    pub fn ports(&self) -> Vec<u16> {
        self.servers.keys().copied().collect()
    }
}

impl Drop for HealthChecks {
    fn drop(&mut self) {
        for (_, task) in self.servers.values() {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Endpoint, Protocol};

    fn lb(check: u16, local: &[bool]) -> ServicePort {
        let endpoints: Vec<Endpoint> = local
            .iter()
            .enumerate()
            .map(|(i, local)| Endpoint {
                ip: format!("10.244.0.{}", i + 1).parse().unwrap(),
                port: 8080,
                local: *local,
            })
            .collect();
        ServicePort {
            name: "shop/front:http".into(),
            protocol: Protocol::Tcp,
            cluster_ips: vec!["10.96.0.20".parse().unwrap()],
            port: 80,
            node_port: Some(31000),
            external_ips: vec![],
            load_balancer_ips: vec!["192.0.2.7".parse().unwrap()],
            affinity_timeout: None,
            cluster_endpoints: endpoints.clone(),
            external_endpoints: endpoints.into_iter().filter(|e| e.local).collect(),
            health_check_node_port: Some(check),
            external_policy_local: true,
        }
    }

    async fn get(port: u16) -> (u16, String) {
        let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        conn.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut text = String::new();
        conn.read_to_string(&mut text).await.unwrap();
        let status = text.split_whitespace().nth(1).unwrap().parse().unwrap();
        (status, text.split_once("\r\n\r\n").unwrap().1.to_owned())
    }

    #[tokio::test]
    async fn the_health_check_port_follows_local_endpoints() {
        let port = 42000 + (std::process::id() % 1000) as u16;
        let mut checks = HealthChecks::new("127.0.0.1".parse().unwrap());
        checks.update(&[lb(port, &[true, false])]).await;
        let (status, body) = get(port).await;
        assert_eq!(status, 200);
        assert_eq!(
            body,
            "{\"service\":{\"namespace\":\"shop\",\"name\":\"front\"},\"localEndpoints\":1,\"serviceProxyHealthy\":true}"
        );
        checks.update(&[lb(port, &[false, false])]).await;
        assert_eq!(
            get(port).await.0,
            503,
            "no local endpoint: the load balancer must skip this node"
        );
        checks.update(&[]).await;
        assert!(checks.ports().is_empty());
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_err(),
            "the server is gone with the Service"
        );
    }
}
