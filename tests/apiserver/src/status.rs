//! Errors as the Kubernetes API returns them: an HTTP code and a `Status` body whose `reason` and
//! message follow the real apiserver's wording, so clients branch on them the same way.

use serde_json::{Value, json};

use crate::resources::ResourceDef;

/// An API error, rendered as a `Status` object.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// HTTP status code.
    pub code: u16,
    /// `Status.reason` (`NotFound`, `Conflict`, `Forbidden`, ...).
    pub reason: &'static str,
    /// Human-readable message.
    pub message: String,
    /// `Status.details`, when the error is about one object.
    pub details: Option<Value>,
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: String) -> ApiError {
        ApiError {
            code,
            reason,
            message,
            details: None,
        }
    }

    fn about(mut self, def: &ResourceDef, name: &str) -> ApiError {
        self.details = Some(json!({"name": name, "group": def.group, "kind": def.plural}));
        self
    }

    /// 404: `pods "x" not found`.
    pub fn not_found(def: &ResourceDef, name: &str) -> ApiError {
        ApiError::new(
            404,
            "NotFound",
            format!("{} \"{name}\" not found", def.qualified()),
        )
        .about(def, name)
    }

    /// 404 for a path that names no resource.
    pub fn no_route(path: &str) -> ApiError {
        ApiError::new(
            404,
            "NotFound",
            format!("the server could not find the requested resource ({path})"),
        )
    }

    /// 409: the name is taken.
    pub fn already_exists(def: &ResourceDef, name: &str) -> ApiError {
        ApiError::new(
            409,
            "AlreadyExists",
            format!("{} \"{name}\" already exists", def.qualified()),
        )
        .about(def, name)
    }

    /// 409: a stale resourceVersion.
    pub fn conflict(def: &ResourceDef, name: &str, why: &str) -> ApiError {
        ApiError::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": {why}",
                def.qualified()
            ),
        )
        .about(def, name)
    }

    /// 401: no valid credentials.
    pub fn unauthorized() -> ApiError {
        ApiError::new(401, "Unauthorized", "Unauthorized".into())
    }

    /// 403 in the apiserver's wording, with the authorizer's reason appended when it gave one.
    pub fn forbidden(
        user: &str,
        verb: &str,
        def: &ResourceDef,
        subresource: Option<&str>,
        namespace: Option<&str>,
        name: Option<&str>,
        why: Option<&str>,
    ) -> ApiError {
        let object = match name {
            Some(name) => format!("{} \"{name}\"", def.qualified()),
            None => def.qualified(),
        };
        let resource = match subresource {
            Some(sub) => format!("{}/{sub}", def.plural),
            None => def.plural.to_owned(),
        };
        let scope = match namespace {
            Some(ns) => format!(" in the namespace \"{ns}\""),
            None => " at the cluster scope".to_owned(),
        };
        let mut message = format!(
            "{object} is forbidden: User \"{user}\" cannot {verb} resource \"{resource}\" in API group \"{}\"{scope}",
            def.group
        );
        if let Some(why) = why {
            message.push_str(": ");
            message.push_str(why);
        }
        let mut error = ApiError::new(403, "Forbidden", message);
        error.details =
            Some(json!({"name": name.unwrap_or_default(), "group": def.group, "kind": def.plural}));
        error
    }

    /// 403 for a non-resource path.
    pub fn forbidden_path(user: &str, verb: &str, path: &str) -> ApiError {
        ApiError::new(
            403,
            "Forbidden",
            format!("forbidden: User \"{user}\" cannot {verb} path \"{path}\""),
        )
    }

    /// 422: validation failed; `causes` are (field, reason, message).
    pub fn invalid(def: &ResourceDef, name: &str, causes: &[(String, &str, String)]) -> ApiError {
        let summary = causes
            .iter()
            .map(|(field, _, message)| format!("{field}: {message}"))
            .collect::<Vec<_>>();
        let summary = if summary.len() == 1 {
            summary[0].clone()
        } else {
            format!("[{}]", summary.join(", "))
        };
        let mut error = ApiError::new(
            422,
            "Invalid",
            format!("{} \"{name}\" is invalid: {summary}", def.kind),
        );
        let causes: Vec<Value> = causes
            .iter()
            .map(|(field, reason, message)| json!({"reason": reason, "message": message, "field": field}))
            .collect();
        error.details =
            Some(json!({"name": name, "group": def.group, "kind": def.kind, "causes": causes}));
        error
    }

    /// 400: the request itself is malformed.
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(400, "BadRequest", message.into())
    }

    /// 405: the verb is not supported on this path.
    pub fn method_not_allowed(method: &str) -> ApiError {
        ApiError::new(
            405,
            "MethodNotAllowed",
            format!("the server does not allow this method on the requested resource ({method})"),
        )
    }

    /// 410: the resourceVersion is older than the history kept.
    pub fn expired(message: String) -> ApiError {
        ApiError::new(410, "Expired", message)
    }

    /// 413: body over the limit.
    pub fn too_large(limit: usize) -> ApiError {
        ApiError::new(
            413,
            "RequestEntityTooLarge",
            format!("Request entity too large: limit is {limit}"),
        )
    }

    /// 415: a content type the verb does not accept.
    pub fn unsupported_media(content_type: &str) -> ApiError {
        ApiError::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: application/json, application/merge-patch+json, application/json-patch+json, application/strategic-merge-patch+json, application/apply-patch+yaml (got {content_type})"
            ),
        )
    }

    /// 500: a server bug; never a panic.
    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(500, "InternalError", message.into())
    }

    /// The `Status` object.
    pub fn status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(details) = &self.details {
            status["details"] = details.clone();
        }
        status
    }
}

/// A `Status` reporting success, as returned by deletes of kinds that do not return the object.
pub fn success(def: &ResourceDef, name: &str, uid: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success",
        "details": {"name": name, "group": def.group, "kind": def.plural, "uid": uid},
    })
}
