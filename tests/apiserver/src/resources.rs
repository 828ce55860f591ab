//! The resources this server serves: names, scope and subresources for routing and discovery, and
//! each kind's typed decoding (through k8s-openapi) for real validation and pruning.

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// One served resource, by its index in [`TABLE`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Resource(u8);

/// Static facts about a resource.
#[derive(Debug)]
pub struct ResourceDef {
    /// API group; "" for the core group.
    pub group: &'static str,
    /// API version within the group.
    pub version: &'static str,
    /// Plural resource name, as in URLs.
    pub plural: &'static str,
    /// Singular name, for discovery.
    pub singular: &'static str,
    /// Object kind.
    pub kind: &'static str,
    /// Whether objects live in namespaces.
    pub namespaced: bool,
    /// kubectl short names.
    pub short_names: &'static [&'static str],
    /// Whether `/status` is a subresource (status writes go only there).
    pub has_status: bool,
    /// Create-only review resources (TokenReview, SubjectAccessReview): never stored.
    pub review: bool,
    /// Decodes a body into the typed object and back: rejects wrong types, drops unknown fields.
    pub decode: fn(Value) -> Result<Value, serde_json::Error>,
}

impl ResourceDef {
    /// `v1` or `group/version`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_owned()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// The resource as a `group/resource` string for messages (`pods`, `leases.coordination.k8s.io`).
    pub fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_owned()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }
}

impl Resource {
    /// The resource's static facts.
    pub fn def(self) -> &'static ResourceDef {
        &TABLE[usize::from(self.0)]
    }

    /// Every served resource.
    pub fn all() -> impl Iterator<Item = Resource> {
        (0..TABLE.len()).map(|i| Resource(u8::try_from(i).expect("table fits u8")))
    }

    /// Finds a resource by group, version and plural name.
    pub fn find(group: &str, version: &str, plural: &str) -> Option<Resource> {
        Resource::all().find(|r| {
            let d = r.def();
            d.group == group && d.version == version && d.plural == plural
        })
    }
}

fn roundtrip<T: DeserializeOwned + Serialize>(value: Value) -> Result<Value, serde_json::Error> {
    let typed: T = serde_json::from_value(value)?;
    serde_json::to_value(typed)
}

macro_rules! resources {
    ($( $const:ident = $idx:literal: $group:literal / $version:literal, $plural:literal, $singular:literal,
        $kind:literal, namespaced: $ns:literal, short: [$($short:literal),*], status: $status:literal,
        review: $review:literal, $ty:ty; )*) => {
        $(
            #[doc = concat!("`", $plural, "` (", $kind, ").")]
            pub const $const: Resource = Resource($idx);
        )*
        /// The table of served resources.
        pub static TABLE: &[ResourceDef] = &[$(
            ResourceDef {
                group: $group, version: $version, plural: $plural, singular: $singular,
                kind: $kind, namespaced: $ns, short_names: &[$($short),*], has_status: $status,
                review: $review, decode: roundtrip::<$ty>,
            },
        )*];
    };
}

use k8s_openapi::api::{
    authentication::v1 as authn, authorization::v1 as authz, certificates::v1 as certs,
    coordination::v1 as coordination, core::v1 as core, discovery::v1 as discovery,
    events::v1 as events, rbac::v1 as rbac,
};

resources! {
    NAMESPACES = 0: "" / "v1", "namespaces", "namespace", "Namespace", namespaced: false, short: ["ns"], status: true, review: false, core::Namespace;
    NODES = 1: "" / "v1", "nodes", "node", "Node", namespaced: false, short: ["no"], status: true, review: false, core::Node;
    PODS = 2: "" / "v1", "pods", "pod", "Pod", namespaced: true, short: ["po"], status: true, review: false, core::Pod;
    SERVICES = 3: "" / "v1", "services", "service", "Service", namespaced: true, short: ["svc"], status: true, review: false, core::Service;
    CONFIGMAPS = 4: "" / "v1", "configmaps", "configmap", "ConfigMap", namespaced: true, short: ["cm"], status: false, review: false, core::ConfigMap;
    SECRETS = 5: "" / "v1", "secrets", "secret", "Secret", namespaced: true, short: [], status: false, review: false, core::Secret;
    SERVICEACCOUNTS = 6: "" / "v1", "serviceaccounts", "serviceaccount", "ServiceAccount", namespaced: true, short: ["sa"], status: false, review: false, core::ServiceAccount;
    EVENTS = 7: "" / "v1", "events", "event", "Event", namespaced: true, short: ["ev"], status: false, review: false, core::Event;
    PERSISTENTVOLUMES = 8: "" / "v1", "persistentvolumes", "persistentvolume", "PersistentVolume", namespaced: false, short: ["pv"], status: true, review: false, core::PersistentVolume;
    PERSISTENTVOLUMECLAIMS = 9: "" / "v1", "persistentvolumeclaims", "persistentvolumeclaim", "PersistentVolumeClaim", namespaced: true, short: ["pvc"], status: true, review: false, core::PersistentVolumeClaim;
    ENDPOINTSLICES = 10: "discovery.k8s.io" / "v1", "endpointslices", "endpointslice", "EndpointSlice", namespaced: true, short: [], status: false, review: false, discovery::EndpointSlice;
    LEASES = 11: "coordination.k8s.io" / "v1", "leases", "lease", "Lease", namespaced: true, short: [], status: false, review: false, coordination::Lease;
    CSRS = 12: "certificates.k8s.io" / "v1", "certificatesigningrequests", "certificatesigningrequest", "CertificateSigningRequest", namespaced: false, short: ["csr"], status: true, review: false, certs::CertificateSigningRequest;
    TOKENREVIEWS = 13: "authentication.k8s.io" / "v1", "tokenreviews", "tokenreview", "TokenReview", namespaced: false, short: [], status: false, review: true, authn::TokenReview;
    SUBJECTACCESSREVIEWS = 14: "authorization.k8s.io" / "v1", "subjectaccessreviews", "subjectaccessreview", "SubjectAccessReview", namespaced: false, short: [], status: false, review: true, authz::SubjectAccessReview;
    EVENTS_V1 = 15: "events.k8s.io" / "v1", "events", "event", "Event", namespaced: true, short: [], status: false, review: false, events::Event;
    CLUSTERROLES = 16: "rbac.authorization.k8s.io" / "v1", "clusterroles", "clusterrole", "ClusterRole", namespaced: false, short: [], status: false, review: false, rbac::ClusterRole;
    CLUSTERROLEBINDINGS = 17: "rbac.authorization.k8s.io" / "v1", "clusterrolebindings", "clusterrolebinding", "ClusterRoleBinding", namespaced: false, short: [], status: false, review: false, rbac::ClusterRoleBinding;
    ROLES = 18: "rbac.authorization.k8s.io" / "v1", "roles", "role", "Role", namespaced: true, short: [], status: false, review: false, rbac::Role;
    ROLEBINDINGS = 19: "rbac.authorization.k8s.io" / "v1", "rolebindings", "rolebinding", "RoleBinding", namespaced: true, short: [], status: false, review: false, rbac::RoleBinding;
    SELFSUBJECTACCESSREVIEWS = 20: "authorization.k8s.io" / "v1", "selfsubjectaccessreviews", "selfsubjectaccessreview", "SelfSubjectAccessReview", namespaced: false, short: [], status: false, review: true, authz::SelfSubjectAccessReview;
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_table_indexes_match_the_constants() {
        for resource in Resource::all() {
            let def = resource.def();
            assert_eq!(
                Resource::find(def.group, def.version, def.plural),
                Some(resource)
            );
        }
        assert_eq!(PODS.def().kind, "Pod");
        assert_eq!(ROLEBINDINGS.def().kind, "RoleBinding");
        assert_eq!(LEASES.def().api_version(), "coordination.k8s.io/v1");
    }

    #[test]
    fn decoding_rejects_wrong_types_and_drops_unknown_fields() {
        let decode = PODS.def().decode;
        let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
            "spec": {"containers": [{"name": "c", "image": "i", "bogus": 1}]}});
        let decoded = decode(pod).unwrap();
        assert!(decoded["spec"]["containers"][0].get("bogus").is_none());
        assert!(decode(json!({"spec": {"containers": "nope"}})).is_err());
    }
}
