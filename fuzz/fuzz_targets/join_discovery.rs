//! `tug join`'s parsers of what it is handed: the bootstrap token and CA pins from the command
//! line, and from an unauthenticated read of `kube-public/cluster-info`, the server's Date
//! header, the kubeconfig and the token's signature over it; then the kubeconfigs the kubelet
//! reads (`--discovery-file`, the bootstrap and node kubeconfigs).
//!
//! Input lines: token, pins (comma-separated), Date header, signature (empty: the harness signs
//! the kubeconfig with the token, so verification goes on to the kubeconfig), then the
//! kubeconfig. Asserts:
//! - a token's error message never depends on its secret;
//! - tokens and pins that parse print back to what parses to them again;
//! - what verifies names a server and a CA whose pin is one of those given.
#![no_main]

use std::time::{Duration, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use libfuzzer_sys::fuzz_target;
use sha2::Sha256;
use tug::join::discovery::{Discovery, Pin, Token, check_clock};

/// The detached JWS cluster-info carries for `token` over `content`, as the bootstrap signer
/// writes it.
fn sign(content: &str, token: &Token) -> String {
    let header = URL_SAFE_NO_PAD.encode(format!(r#"{{"alg":"HS256","kid":"{}"}}"#, token.id));
    let mut mac = Hmac::<Sha256>::new_from_slice(token.secret.as_bytes()).expect("any key");
    mac.update(header.as_bytes());
    mac.update(b".");
    mac.update(URL_SAFE_NO_PAD.encode(content).as_bytes());
    format!(
        "{header}..{}",
        URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    )
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.splitn(5, '\n');
    let (token_text, pins_text, date, jws, kubeconfig) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );

    let token = match token_text.parse::<Token>() {
        Ok(token) => {
            assert_eq!(token.bearer().parse::<Token>().ok(), Some(token.clone()));
            assert!(
                !format!("{token:?}").contains(&token.secret),
                "Debug shows the secret"
            );
            token
        }
        Err(error) => {
            if let Some((id, _secret)) = token_text.split_once('.') {
                let without = format!("{id}.").parse::<Token>().expect_err("no secret");
                assert_eq!(
                    error.to_string(),
                    without.to_string(),
                    "the error for a malformed token depends on its secret"
                );
            }
            "abcdef.0123456789abcdef".parse().expect("a token")
        }
    };
    let pins: Vec<Pin> = pins_text
        .split(',')
        .filter(|p| !p.is_empty())
        .filter_map(|p| p.parse::<Pin>().ok())
        .collect();
    for pin in &pins {
        assert_eq!(pin.to_string().parse::<Pin>().ok().as_ref(), Some(pin));
    }
    let _ = check_clock(date, SystemTime::now());

    let discovery = Discovery {
        endpoint: "192.0.2.1:6443".into(),
        token: token.clone(),
        unsafe_skip_ca_verification: pins.is_empty(),
        pins: pins.clone(),
        timeout: Duration::ZERO,
    };
    let signature = if jws.is_empty() {
        sign(kubeconfig, &token)
    } else {
        jws.to_owned()
    };
    if let Ok((server, ca, pin)) = discovery.verify(kubeconfig, &signature) {
        assert!(!server.trim().is_empty(), "an empty server was accepted");
        assert_eq!(Pin::of_certificate(ca.as_bytes()).ok(), Some(pin.clone()));
        assert!(
            pins.is_empty() || pins.contains(&pin),
            "a CA no pin names was trusted"
        );
    }

    // The kubeconfigs the kubelet reads. Paths inside are the operator's files, not input.
    if let Ok(mut parsed) = kube::config::Kubeconfig::from_yaml(kubeconfig) {
        for cluster in parsed
            .clusters
            .iter_mut()
            .filter_map(|c| c.cluster.as_mut())
        {
            cluster.certificate_authority = None;
        }
        for user in parsed
            .auth_infos
            .iter_mut()
            .filter_map(|u| u.auth_info.as_mut())
        {
            user.client_certificate = None;
            user.client_key = None;
            user.token_file = None;
            let _ = tug_kubelet::bootstrap::client_certificate(user);
        }
        let _ = tug_kubelet::bootstrap::server_and_ca(&parsed);
        let file = tempfile::NamedTempFile::new().expect("a temporary file");
        if let Ok(yaml) = serde_yaml::to_string(&parsed) {
            std::fs::write(file.path(), yaml).expect("write the kubeconfig");
            let _ = tug_kubelet::bootstrap::usable(file.path());
        }
    }
});
