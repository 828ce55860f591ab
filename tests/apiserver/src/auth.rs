//! Authentication: who is asking. Client certificates (CN = user, O = groups), bootstrap tokens
//! (`<id>.<secret>` against Secret `bootstrap-token-<id>` in kube-system), and service-account
//! tokens this server issued through TokenRequest (JWTs signed with its own key). Anything else
//! with a bearer token is 401; a request with no credentials is `system:anonymous`.

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

use crate::resources::{PODS, SECRETS, SERVICEACCOUNTS};
use crate::store::Store;

/// The audience of tokens meant for this API server (the upstream default issuer).
pub const API_AUDIENCE: &str = "https://kubernetes.default.svc.cluster.local";

/// An authenticated (or anonymous) user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// User name (`system:node:n1`, `system:bootstrap:abcdef`, ...).
    pub name: String,
    /// UID, where the identity has one (service accounts).
    pub uid: String,
    /// Groups, including `system:authenticated` or `system:unauthenticated`.
    pub groups: Vec<String>,
}

impl User {
    /// An authenticated user with `groups` plus `system:authenticated`.
    pub fn authenticated(name: &str, groups: &[String]) -> User {
        let mut groups = groups.to_vec();
        groups.push("system:authenticated".into());
        User {
            name: name.into(),
            uid: String::new(),
            groups,
        }
    }

    /// The anonymous user.
    pub fn anonymous() -> User {
        User {
            name: "system:anonymous".into(),
            uid: String::new(),
            groups: vec!["system:unauthenticated".into()],
        }
    }

    /// Whether the user is in `group`.
    pub fn in_group(&self, group: &str) -> bool {
        self.groups.iter().any(|g| g == group)
    }

    /// The node name, for a user `system:node:<name>` in `system:nodes`.
    pub fn node_name(&self) -> Option<&str> {
        self.name
            .strip_prefix("system:node:")
            .filter(|_| self.in_group("system:nodes"))
    }

    /// The user as a TokenReview / SubjectAccessReview `userInfo`.
    pub fn user_info(&self) -> Value {
        json!({"username": self.name, "uid": self.uid, "groups": self.groups})
    }
}

/// Signs and verifies service-account tokens (HS256 JWTs with this server's key).
pub struct TokenSigner {
    key: [u8; 32],
}

impl std::fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenSigner")
    }
}

impl Default for TokenSigner {
    fn default() -> Self {
        TokenSigner {
            key: rand::random(),
        }
    }
}

impl TokenSigner {
    fn mac(&self) -> Hmac<Sha256> {
        Hmac::<Sha256>::new_from_slice(&self.key).expect("any key length works for HMAC")
    }

    /// Issues a JWT carrying `claims`.
    pub fn issue(&self, claims: &Value) -> String {
        let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"HS256","typ":"JWT"}"#);
        let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
        let signing_input = format!("{header}.{payload}");
        let mut mac = self.mac();
        mac.update(signing_input.as_bytes());
        let signature = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        format!("{signing_input}.{signature}")
    }

    /// The claims of a token this signer issued, if the signature holds and it has not expired.
    pub fn verify(&self, token: &str) -> Option<Value> {
        let (signing_input, signature) = token.rsplit_once('.')?;
        let (_, payload) = signing_input.split_once('.')?;
        let signature = URL_SAFE_NO_PAD.decode(signature).ok()?;
        let mut mac = self.mac();
        mac.update(signing_input.as_bytes());
        mac.verify_slice(&signature).ok()?;
        let claims: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).ok()?).ok()?;
        let now = jiff::Timestamp::now().as_second();
        (claims["exp"].as_i64()? > now).then_some(claims)
    }
}

/// Authenticates a bearer token for `audience`; `None` means 401.
pub fn authenticate_token(
    store: &Store,
    signer: &TokenSigner,
    token: &str,
    audience: &str,
) -> Option<User> {
    if let Some(user) = bootstrap_token_user(store, token) {
        return Some(user);
    }
    let claims = signer.verify(token)?;
    let audiences = claims["aud"].as_array()?;
    if !audiences.iter().any(|a| a == audience) {
        return None;
    }
    let k8s = &claims["kubernetes.io"];
    let namespace = k8s["namespace"].as_str()?;
    let sa_name = k8s["serviceaccount"]["name"].as_str()?;
    let sa = store.get(SERVICEACCOUNTS, namespace, sa_name)?;
    if sa["metadata"]["uid"] != k8s["serviceaccount"]["uid"] {
        return None; // the account was deleted and recreated: old tokens die with it
    }
    if let Some(pod_name) = k8s["pod"]["name"].as_str() {
        let pod = store.get(PODS, namespace, pod_name)?;
        if pod["metadata"]["uid"] != k8s["pod"]["uid"] {
            return None;
        }
    }
    let mut user = User::authenticated(
        &format!("system:serviceaccount:{namespace}:{sa_name}"),
        &[
            "system:serviceaccounts".into(),
            format!("system:serviceaccounts:{namespace}"),
        ],
    );
    user.uid = sa["metadata"]["uid"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    Some(user)
}

/// The token ID and secret of a well-formed bootstrap token `[a-z0-9]{6}.[a-z0-9]{16}`.
pub fn parse_bootstrap_token(token: &str) -> Option<(&str, &str)> {
    let (id, secret) = token.split_once('.')?;
    let ok = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    };
    (ok(id, 6) && ok(secret, 16)).then_some((id, secret))
}

/// A decoded `data` field of a Secret.
pub fn secret_data(secret: &Value, key: &str) -> Option<String> {
    let encoded = secret["data"][key].as_str()?;
    String::from_utf8(STANDARD.decode(encoded).ok()?).ok()
}

fn bootstrap_token_user(store: &Store, token: &str) -> Option<User> {
    let (id, secret) = parse_bootstrap_token(token)?;
    let stored = store.get(SECRETS, "kube-system", &format!("bootstrap-token-{id}"))?;
    if stored["type"] != "bootstrap.kubernetes.io/token"
        || secret_data(&stored, "token-id").as_deref() != Some(id)
        || secret_data(&stored, "usage-bootstrap-authentication").as_deref() != Some("true")
    {
        return None;
    }
    let stored_secret = secret_data(&stored, "token-secret")?;
    // Constant-time comparison of the secret.
    let same = stored_secret.len() == secret.len()
        && stored_secret
            .bytes()
            .zip(secret.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if !same || bootstrap_token_expired(&stored) {
        return None;
    }
    let mut groups = vec!["system:bootstrappers".to_owned()];
    if let Some(extra) = secret_data(&stored, "auth-extra-groups") {
        groups.extend(
            extra
                .split(',')
                .map(str::trim)
                .filter(|g| g.starts_with("system:bootstrappers:"))
                .map(str::to_owned),
        );
    }
    Some(User::authenticated(
        &format!("system:bootstrap:{id}"),
        &groups,
    ))
}

/// Whether a bootstrap token Secret's `expiration` has passed.
pub fn bootstrap_token_expired(secret: &Value) -> bool {
    secret_data(secret, "expiration")
        .and_then(|e| e.parse::<jiff::Timestamp>().ok())
        .is_some_and(|expiry| expiry <= jiff::Timestamp::now())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    fn b64(s: &str) -> String {
        STANDARD.encode(s)
    }

    fn token_secret(id: &str, secret: &str, expiration: Option<&str>) -> Value {
        let mut data = json!({
            "token-id": b64(id), "token-secret": b64(secret),
            "usage-bootstrap-authentication": b64("true"),
            "auth-extra-groups": b64("system:bootstrappers:kubeadm:default-node-token,evil-group"),
        });
        if let Some(e) = expiration {
            data["expiration"] = json!(b64(e));
        }
        json!({"metadata": {"name": format!("bootstrap-token-{id}"), "namespace": "kube-system"},
               "type": "bootstrap.kubernetes.io/token", "data": data})
    }

    #[test]
    fn bootstrap_tokens_authenticate_with_their_groups_until_they_expire() {
        let store = Store::default();
        let signer = TokenSigner::default();
        store
            .create(SECRETS, token_secret("abcdef", "0123456789abcdef", None))
            .unwrap();
        store
            .create(
                SECRETS,
                token_secret("expird", "0123456789abcdef", Some("2001-01-01T00:00:00Z")),
            )
            .unwrap();
        let user =
            authenticate_token(&store, &signer, "abcdef.0123456789abcdef", API_AUDIENCE).unwrap();
        assert_eq!(user.name, "system:bootstrap:abcdef");
        assert_eq!(
            user.groups,
            [
                "system:bootstrappers",
                "system:bootstrappers:kubeadm:default-node-token",
                "system:authenticated"
            ],
            "extra groups outside system:bootstrappers: are ignored"
        );
        assert!(
            authenticate_token(&store, &signer, "abcdef.0123456789abcdeX", API_AUDIENCE).is_none()
        );
        assert!(
            authenticate_token(&store, &signer, "expird.0123456789abcdef", API_AUDIENCE).is_none()
        );
        assert!(
            authenticate_token(&store, &signer, "nosuch.0123456789abcdef", API_AUDIENCE).is_none()
        );
        assert_eq!(parse_bootstrap_token("ABCDEF.0123456789abcdef"), None);
    }

    #[test]
    fn issued_tokens_verify_and_tampered_or_expired_ones_do_not() {
        let signer = TokenSigner::default();
        let exp = jiff::Timestamp::now().as_second() + 60;
        let token = signer.issue(&json!({"sub": "x", "exp": exp}));
        assert_eq!(signer.verify(&token).unwrap()["sub"], "x");
        let mut tampered = token.clone();
        tampered.insert(token.len() - 2, 'A');
        assert!(signer.verify(&tampered).is_none());
        assert!(signer.verify(&signer.issue(&json!({"exp": 1}))).is_none());
        assert!(
            TokenSigner::default().verify(&token).is_none(),
            "another server's key fails"
        );
    }
}
