//! The server: HTTPS on a local port with the cluster CA, optional client certificates (their
//! CN and O are the identity), HTTP/1.1 and h2, running on a runtime of its own so any test —
//! whatever its runtime — can use it, and stopping when dropped.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use rustls::server::WebPkiClientVerifier;
use serde_json::json;
use tokio::sync::oneshot;

use crate::admission::{self, ClusterSettings};
use crate::api::{self, ApiState};
use crate::auth::{TokenSigner, User};
use crate::pki::{self, Ca};
use crate::resources;
use crate::{authz, controllers};

/// How to run the server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address to listen on; port 0 picks a free one.
    pub listen: SocketAddr,
    /// Extra addresses the serving certificate is valid for.
    pub extra_ips: Vec<IpAddr>,
    /// Cluster CIDR that node pod CIDRs are carved from.
    pub cluster_cidr: ipnet::Ipv4Net,
    /// Prefix length of each node's pod CIDR.
    pub node_cidr_prefix: u8,
    /// A dual-stack cluster's IPv6 cluster CIDR and per-node prefix length (`None`: IPv4 only).
    pub cluster_cidr_v6: Option<(ipnet::Ipv6Net, u8)>,
    /// Service ClusterIP range.
    pub service_cidr: ipnet::Ipv4Net,
    /// NodePort range, inclusive.
    pub node_ports: (u16, u16),
    /// Interval between watch bookmarks.
    pub bookmark_interval: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            extra_ips: Vec::new(),
            cluster_cidr: "10.244.0.0/16".parse().expect("static CIDR"),
            node_cidr_prefix: 24,
            cluster_cidr_v6: Some(("fd00:10:244::/56".parse().expect("static CIDR"), 64)),
            service_cidr: "10.96.0.0/12".parse().expect("static CIDR"),
            node_ports: (30000, 32767),
            bookmark_interval: Duration::from_secs(5),
        }
    }
}

/// A running test API server; stops when dropped.
#[derive(Debug)]
pub struct TestApiServer {
    state: Arc<ApiState>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TestApiServer {
    /// Starts a server with a fresh CA and an empty cluster (kubeadm's namespaces and RBAC).
    pub fn start(config: ServerConfig) -> std::io::Result<TestApiServer> {
        let listener = std::net::TcpListener::bind(config.listen)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let ca = Ca::generate();
        let mut ips = vec![IpAddr::from(Ipv4Addr::LOCALHOST), addr.ip()];
        ips.extend(&config.extra_ips);
        let serving = ca.serving_cert(
            &ips,
            &[
                "localhost",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ],
        );
        let tls = Arc::new(tls_config(&ca, &serving)?);
        let state = Arc::new(ApiState {
            store: Default::default(),
            ca,
            signer: TokenSigner::default(),
            settings: ClusterSettings {
                service_cidr: config.service_cidr,
                node_ports: config.node_ports,
            },
            url: format!("https://{addr}"),
            allocating: Default::default(),
            bookmark_interval: config.bookmark_interval,
        });
        seed(&state, addr.port());
        let (shutdown, stop) = oneshot::channel();
        let thread_state = state.clone();
        let thread = std::thread::Builder::new()
            .name("tug-test-apiserver".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("build the test apiserver runtime");
                runtime.block_on(async move {
                    let listener =
                        tokio::net::TcpListener::from_std(listener).expect("adopt listener");
                    let controllers = controllers::spawn(
                        thread_state.clone(),
                        config.cluster_cidr,
                        config.node_cidr_prefix,
                        config.cluster_cidr_v6,
                    );
                    tokio::select! {
                        () = accept_loop(listener, tls, thread_state) => {}
                        _ = stop => {}
                    }
                    controllers.abort();
                });
                runtime.shutdown_timeout(Duration::from_secs(1));
            })?;
        Ok(TestApiServer {
            state,
            shutdown: Some(shutdown),
            thread: Some(thread),
        })
    }

    /// `https://127.0.0.1:<port>`.
    pub fn url(&self) -> &str {
        &self.state.url
    }

    /// The cluster CA certificate, PEM.
    pub fn ca_pem(&self) -> &str {
        self.state.ca.cert_pem()
    }

    /// A kubeconfig authenticating as `user` in `groups` with a client certificate.
    pub fn kubeconfig_for(&self, user: &str, groups: &[&str]) -> String {
        let issued = self
            .state
            .ca
            .client_cert(user, groups, Duration::from_secs(86400));
        api::kubeconfig(
            self.url(),
            self.ca_pem(),
            Some((user, &issued.cert_pem, &issued.key_pem)),
        )
    }

    /// A kubeconfig for the cluster admin (`kubernetes-admin` in `system:masters`, as kubeadm's).
    pub fn admin_kubeconfig(&self) -> String {
        self.kubeconfig_for("kubernetes-admin", &["system:masters"])
    }
}

impl Drop for TestApiServer {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn tls_config(ca: &Ca, serving: &pki::Issued) -> std::io::Result<rustls::ServerConfig> {
    let invalid = |e: &dyn std::fmt::Display| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string())
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from(ca.cert_der().to_vec()))
        .map_err(|e| invalid(&e))?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| invalid(&e))?;
    let chain = CertificateDer::pem_slice_iter(serving.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(&e))?;
    let key = PrivateKeyDer::from_pem_slice(serving.key_pem.as_bytes()).map_err(|e| invalid(&e))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid(&e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| invalid(&e))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    state: Arc<ApiState>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let acceptor = acceptor.clone();
        let state = state.clone();
        tokio::spawn(async move {
            let Ok(stream) = acceptor.accept(tcp).await else {
                return;
            };
            let cert_user = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|certs| certs.first())
                .and_then(|cert| pki::subject_identity(cert))
                .map(|(name, groups)| User::authenticated(&name, &groups));
            let service = hyper::service::service_fn(move |request| {
                let state = state.clone();
                let cert_user = cert_user.clone();
                async move {
                    Ok::<_, std::convert::Infallible>(api::handle(state, cert_user, request).await)
                }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// What a fresh kubeadm cluster has before any node joins: its namespaces, the RBAC bootstrap
/// policy, the `cluster-info` ConfigMap and the `kubernetes` Service.
fn seed(state: &ApiState, port: u16) {
    let store = &state.store;
    let stamp = |mut object: serde_json::Value| {
        object["metadata"]["uid"] = json!(uuid::Uuid::new_v4().to_string());
        object["metadata"]["creationTimestamp"] = json!(admission::now());
        object
    };
    for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        let namespace = json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": ns, "labels": {"kubernetes.io/metadata.name": ns}},
            "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}});
        store
            .create(resources::NAMESPACES, stamp(namespace))
            .expect("seed namespace");
    }
    for (resource, object) in authz::default_policy() {
        store.create(resource, stamp(object)).expect("seed RBAC");
    }
    let cluster_info = api::kubeconfig(&state.url, state.ca.cert_pem(), None);
    store
        .create(resources::CONFIGMAPS, stamp(json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "cluster-info", "namespace": "kube-public"}, "data": {"kubeconfig": cluster_info}})))
        .expect("seed cluster-info");
    // kubeadm's shared kubelet configuration, which `kubeadm join` (and `tug join`) fetch.
    let kubelet_config = format!(
        "apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\nauthentication:\n  anonymous:\n    enabled: false\n  webhook:\n    enabled: true\n  x509:\n    clientCAFile: /etc/kubernetes/pki/ca.crt\nauthorization:\n  mode: Webhook\ncgroupDriver: systemd\nclusterDNS:\n- {}\nclusterDomain: cluster.local\nrotateCertificates: true\nstaticPodPath: /etc/kubernetes/manifests\n",
        state
            .settings
            .service_cidr
            .hosts()
            .nth(9)
            .expect("service CIDR has ten hosts")
    );
    store
        .create(resources::CONFIGMAPS, stamp(json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "kubelet-config", "namespace": "kube-system"}, "data": {"kubelet": kubelet_config}})))
        .expect("seed kubelet-config");
    // kubeadm's kube-proxy configuration (its DaemonSet's ConfigMap), in the shape kubeadm
    // writes it: the mode left empty (iptables), the service account's kubeconfig beside it.
    let proxy_config = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nbindAddress: 0.0.0.0\nbindAddressHardFail: false\nclientConnection:\n  acceptContentTypes: \"\"\n  burst: 0\n  contentType: \"\"\n  kubeconfig: /var/lib/kube-proxy/kubeconfig.conf\n  qps: 0\nclusterCIDR: 10.244.0.0/16\nconfigSyncPeriod: 0s\nconntrack:\n  maxPerCore: null\n  min: null\n  tcpCloseWaitTimeout: null\n  tcpEstablishedTimeout: null\ndetectLocalMode: \"\"\nenableProfiling: false\nhealthzBindAddress: \"\"\nhostnameOverride: \"\"\niptables:\n  localhostNodePorts: null\n  masqueradeAll: false\n  masqueradeBit: null\n  minSyncPeriod: 0s\n  syncPeriod: 0s\nipvs:\n  excludeCIDRs: null\n  minSyncPeriod: 0s\n  scheduler: \"\"\n  strictARP: false\n  syncPeriod: 0s\n  tcpFinTimeout: 0s\n  tcpTimeout: 0s\n  udpTimeout: 0s\nkind: KubeProxyConfiguration\nmetricsBindAddress: \"\"\nmode: \"\"\nnodePortAddresses: null\noomScoreAdj: null\nportRange: \"\"\nshowHiddenMetricsForProbes: \"\"\nwinkernel:\n  enableDSR: false\n  forwardHealthCheckVip: false\n  networkName: \"\"\n  rootHnsEndpointName: \"\"\n  sourceVip: \"\"\n";
    store
        .create(resources::CONFIGMAPS, stamp(json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "kube-proxy", "namespace": "kube-system", "labels": {"app": "kube-proxy"}},
            "data": {"config.conf": proxy_config}})))
        .expect("seed kube-proxy");
    let first_ip = state
        .settings
        .service_cidr
        .hosts()
        .next()
        .expect("service CIDR has hosts");
    store
        .create(resources::SERVICES, stamp(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "kubernetes", "namespace": "default", "labels": {"component": "apiserver", "provider": "kubernetes"}},
            "spec": {"type": "ClusterIP", "clusterIP": first_ip.to_string(), "clusterIPs": [first_ip.to_string()], "sessionAffinity": "None",
                "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack", "internalTrafficPolicy": "Cluster",
                "ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": port}]},
            "status": {"loadBalancer": {}}})))
        .expect("seed kubernetes service");
    // The cluster existed before: its early history is compacted away.
    store.compact();
}
