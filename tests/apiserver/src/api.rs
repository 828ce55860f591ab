//! The REST and watch protocol: routing, authentication and authorization of each request,
//! discovery, and the verbs (get, list, watch, create, update, patch, delete, deletecollection)
//! with their status codes and `Status` bodies. Errors become responses only here.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use futures::StreamExt;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};

use crate::admission::{self, ClusterSettings};
use crate::auth::{self, API_AUDIENCE, TokenSigner, User};
use crate::authz::{self, Attributes, Decision};
use crate::patch::{self, PatchKind};
use crate::pki::Ca;
use crate::protobuf;
use crate::resources::{self, Resource};
use crate::selectors::{FieldSelector, LabelSelector};
use crate::status::{self, ApiError};
use crate::store::{Change, EventType, Store, StoreError, UpdateError, key_of};

/// Largest request body accepted (the apiserver's limit).
pub const MAX_BODY: usize = 3 * 1024 * 1024;

/// The Kubernetes version this server reports.
pub const VERSION: (&str, &str) = ("1", "33");

/// Response body type: whole JSON documents or a watch stream.
pub type Body = BoxBody<Bytes, Infallible>;

/// Everything a request handler needs.
#[derive(Debug)]
pub struct ApiState {
    /// Objects and their history.
    pub store: Store,
    /// The cluster CA.
    pub ca: Ca,
    /// Signer of service-account tokens.
    pub signer: TokenSigner,
    /// Service CIDR and NodePort range.
    pub settings: ClusterSettings,
    /// `https://host:port` clients reach this server at.
    pub url: String,
    /// Interval between watch bookmarks.
    pub bookmark_interval: Duration,
    /// Held from reading the Services' allocations until a Service write is stored.
    pub allocating: std::sync::Mutex<()>,
}

/// A parsed request path.
#[derive(Debug)]
enum Route {
    Root,
    Version,
    Health,
    ApiVersions,
    GroupList,
    Group(String),
    ResourceList(String, String),
    OpenApiRoot,
    OpenApiGroupVersion(String, String),
    Object {
        resource: Resource,
        namespace: Option<String>,
        name: Option<String>,
        subresource: Option<String>,
    },
}

fn parse_route(path: &str) -> Option<Route> {
    let parts: Vec<&str> = path
        .trim_matches('/')
        .split('/')
        .filter(|p| !p.is_empty())
        .collect();
    let (group, version, rest) = match parts.as_slice() {
        [] => return Some(Route::Root),
        ["version"] => return Some(Route::Version),
        ["healthz" | "livez" | "readyz", ..] => return Some(Route::Health),
        ["api"] => return Some(Route::ApiVersions),
        ["openapi", "v3"] => return Some(Route::OpenApiRoot),
        ["openapi", "v3", "api", "v1"] => {
            return Some(Route::OpenApiGroupVersion(String::new(), "v1".into()));
        }
        ["openapi", "v3", "apis", group, version] => {
            return Some(Route::OpenApiGroupVersion(
                (*group).into(),
                (*version).into(),
            ));
        }
        ["api", "v1"] => return Some(Route::ResourceList(String::new(), "v1".into())),
        ["apis"] => return Some(Route::GroupList),
        ["apis", group] => return Some(Route::Group((*group).into())),
        ["apis", group, version] => {
            return Some(Route::ResourceList((*group).into(), (*version).into()));
        }
        ["api", "v1", rest @ ..] => ("", "v1", rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return None,
    };
    let owned = |s: &&str| (*s).to_owned();
    // `namespaces/{ns}/{resource}...` is a namespaced path only when {resource} is namespaced here.
    if let ["namespaces", ns, plural, tail @ ..] = rest
        && let Some(resource) =
            Resource::find(group, version, plural).filter(|r| r.def().namespaced)
    {
        if tail.len() > 2 {
            return None;
        }
        return Some(Route::Object {
            resource,
            namespace: Some((*ns).to_owned()),
            name: tail.first().map(owned),
            subresource: tail.get(1).map(owned),
        });
    }
    let [plural, tail @ ..] = rest else {
        return None;
    };
    let resource = Resource::find(group, version, plural)?;
    if tail.len() > 2 {
        return None;
    }
    Some(Route::Object {
        resource,
        namespace: None,
        name: tail.first().map(owned),
        subresource: tail.get(1).map(owned),
    })
}

/// Serves one request for a connection whose client certificate (if any) identified `cert_user`.
pub async fn handle(
    state: Arc<ApiState>,
    cert_user: Option<User>,
    request: Request<Incoming>,
) -> Response<Body> {
    let (parts, body) = request.into_parts();
    let body = match read_body(body).await {
        Ok(body) => body,
        Err(error) => return error_response(&error),
    };
    match serve(&state, cert_user, &parts, body).await {
        Ok(response) => response,
        Err(error) => error_response(&error),
    }
}

async fn read_body(body: Incoming) -> Result<Bytes, ApiError> {
    let limited = http_body_util::Limited::new(body, MAX_BODY);
    match limited.collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error)
            if error
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(ApiError::too_large(MAX_BODY))
        }
        Err(error) => Err(ApiError::bad_request(format!("read request body: {error}"))),
    }
}

struct Query(HashMap<String, String>);

impl Query {
    fn parse(uri: &http::Uri) -> Query {
        Query(
            form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
                .into_owned()
                .collect(),
        )
    }
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .get(key)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }
    fn flag(&self, key: &str) -> bool {
        matches!(self.get(key), Some("true" | "1"))
    }
}

fn authenticate(
    state: &ApiState,
    cert_user: Option<User>,
    headers: &http::HeaderMap,
) -> Result<User, ApiError> {
    if let Some(auth) = headers.get(header::AUTHORIZATION) {
        let token = auth
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or_else(ApiError::unauthorized)?;
        return auth::authenticate_token(&state.store, &state.signer, token, API_AUDIENCE)
            .ok_or_else(ApiError::unauthorized);
    }
    Ok(cert_user.unwrap_or_else(User::anonymous))
}

async fn serve(
    state: &Arc<ApiState>,
    cert_user: Option<User>,
    parts: &http::request::Parts,
    body: Bytes,
) -> Result<Response<Body>, ApiError> {
    let user = authenticate(state, cert_user, &parts.headers)?;
    let path = parts.uri.path();
    let route = parse_route(path).ok_or_else(|| ApiError::no_route(path))?;
    let query = Query::parse(&parts.uri);
    let Route::Object {
        resource,
        namespace,
        name,
        subresource,
    } = route
    else {
        let attrs = Attributes {
            verb: "get".into(),
            path: path.trim_end_matches('/').to_owned(),
            ..Default::default()
        };
        let path_for_authz = if attrs.path.is_empty() {
            "/".to_owned()
        } else {
            attrs.path.clone()
        };
        let attrs = Attributes {
            path: path_for_authz,
            ..attrs
        };
        if authz::authorize(&state.store, &user, &attrs) != Decision::Allow {
            return Err(ApiError::forbidden_path(&user.name, "get", &attrs.path));
        }
        if parts.method != Method::GET {
            return Err(ApiError::method_not_allowed(parts.method.as_str()));
        }
        return Ok(json_response(StatusCode::OK, &discovery(state, &route)));
    };
    let def = resource.def();
    let namespace = namespace.unwrap_or_default();
    if def.namespaced && namespace.is_empty() && (name.is_some() || parts.method != Method::GET) {
        return Err(ApiError::no_route(path));
    }
    let verb = match (&parts.method, name.is_some()) {
        (&Method::GET, true) if query.flag("watch") => "watch",
        (&Method::GET, true) => "get",
        (&Method::GET, false) if query.flag("watch") => "watch",
        (&Method::GET, false) => "list",
        (&Method::POST, _) => "create",
        (&Method::PUT, true) => "update",
        (&Method::PATCH, true) => "patch",
        (&Method::DELETE, true) => "delete",
        (&Method::DELETE, false) => "deletecollection",
        (method, _) => return Err(ApiError::method_not_allowed(method.as_str())),
    };
    let fields = field_selector(resource, &query)?;
    let labels = LabelSelector::parse(query.get("labelSelector").unwrap_or(""))
        .map_err(ApiError::bad_request)?;
    let authz_name = name
        .clone()
        .or_else(|| fields.name().map(str::to_owned))
        .unwrap_or_default();
    let attrs = Attributes {
        verb: verb.into(),
        group: Some(def.group.into()),
        resource: def.plural.into(),
        subresource: subresource.clone().unwrap_or_default(),
        namespace: namespace.clone(),
        name: authz_name,
        path: path.into(),
    };
    if let Decision::Deny(why) = authz::authorize(&state.store, &user, &attrs) {
        let ns = (!namespace.is_empty()).then_some(namespace.as_str());
        return Err(ApiError::forbidden(
            &user.name,
            verb,
            def,
            subresource.as_deref(),
            ns,
            name.as_deref(),
            why.as_deref(),
        ));
    }
    if let Some(sub) = subresource.as_deref() {
        let allowed = match sub {
            "status" => def.has_status,
            "token" => resource == resources::SERVICEACCOUNTS && verb == "create",
            "approval" => resource == resources::CSRS,
            _ => false,
        };
        if !allowed {
            return Err(ApiError::no_route(path));
        }
    }
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .to_owned();
    let body = if content_type.starts_with(protobuf::CONTENT_TYPE) && !body.is_empty() {
        match protobuf::decode(&body) {
            Ok(object) => Bytes::from(serde_json::to_vec(&object).expect("JSON values serialise")),
            Err(protobuf::DecodeError::Malformed(why)) => {
                return Err(ApiError::bad_request(format!(
                    "decode protobuf body: {why}"
                )));
            }
            Err(protobuf::DecodeError::Unsupported(why)) => {
                return Err(ApiError {
                    code: 415,
                    reason: "UnsupportedMediaType",
                    message: why,
                    details: None,
                });
            }
        }
    } else {
        body
    };
    let ctx = Ctx {
        state,
        user: &user,
        resource,
        namespace: &namespace,
        query: &query,
    };
    match verb {
        "get" => ctx.get(name.as_deref().unwrap_or_default()),
        "list" => ctx.list(&labels, &fields),
        "watch" => {
            let fields = match name.as_deref() {
                Some(name) => {
                    FieldSelector::parse(&format!("metadata.name={name}"), &["metadata.name"])
                        .map_err(ApiError::bad_request)?
                }
                None => fields,
            };
            ctx.watch(labels, fields)
        }
        "create" => ctx.create(name.as_deref(), subresource.as_deref(), &body),
        "update" => ctx.update(
            name.as_deref().unwrap_or_default(),
            subresource.as_deref(),
            &body,
        ),
        "patch" => ctx.patch(
            name.as_deref().unwrap_or_default(),
            subresource.as_deref(),
            &content_type,
            &body,
        ),
        "delete" => ctx.delete(name.as_deref().unwrap_or_default(), &body),
        _ => ctx.delete_collection(&labels, &fields),
    }
}

fn field_selector(resource: Resource, query: &Query) -> Result<FieldSelector, ApiError> {
    let mut supported = vec!["metadata.name", "metadata.namespace"];
    supported.extend_from_slice(match resource.def().plural {
        "pods" => &[
            "spec.nodeName",
            "status.phase",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "spec.hostNetwork",
            "status.podIP",
            "status.nominatedNodeName",
        ][..],
        "nodes" => &["spec.unschedulable"],
        "namespaces" => &["status.phase"],
        "secrets" => &["type"],
        "events" => &[
            "involvedObject.kind",
            "involvedObject.namespace",
            "involvedObject.name",
            "involvedObject.uid",
            "involvedObject.apiVersion",
            "involvedObject.resourceVersion",
            "involvedObject.fieldPath",
            "reason",
            "reportingComponent",
            "source",
            "type",
        ],
        "certificatesigningrequests" => &["spec.signerName"],
        _ => &[],
    });
    FieldSelector::parse(query.get("fieldSelector").unwrap_or(""), &supported)
        .map_err(ApiError::bad_request)
}

struct Ctx<'a> {
    state: &'a Arc<ApiState>,
    user: &'a User,
    resource: Resource,
    namespace: &'a str,
    query: &'a Query,
}

fn store_error(resource: Resource, name: &str, error: StoreError) -> ApiError {
    let def = resource.def();
    match error {
        StoreError::NotFound => ApiError::not_found(def, name),
        StoreError::AlreadyExists => ApiError::already_exists(def, name),
        StoreError::Conflict => ApiError::conflict(def, name, &error.to_string()),
        StoreError::TooOld { .. } => ApiError::expired(error.to_string()),
    }
}

fn update_error(resource: Resource, name: &str, error: UpdateError<ApiError>) -> ApiError {
    match error {
        UpdateError::Store(e) => store_error(resource, name, e),
        UpdateError::Rejected(e) => e,
    }
}

/// The stored form of an admitted object: through the typed model once more, so what admission
/// added is well-typed and no empty fields linger.
fn normalize(def: &resources::ResourceDef, object: Value) -> Result<Value, ApiError> {
    (def.decode)(object)
        .map_err(|e| ApiError::internal(format!("admitted {} does not decode: {e}", def.kind)))
}

fn parse_json(body: &Bytes) -> Result<Value, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!("couldn't get version/kind; json parse error: {e}"))
    })
}

impl Ctx<'_> {
    fn def(&self) -> &'static resources::ResourceDef {
        self.resource.def()
    }

    fn strict(&self) -> bool {
        self.query.get("fieldValidation") == Some("Strict")
    }

    fn dry_run(&self) -> bool {
        self.query.get("dryRun") == Some("All")
    }

    fn get(&self, name: &str) -> Result<Response<Body>, ApiError> {
        let object = self
            .state
            .store
            .get(self.resource, self.namespace, name)
            .ok_or_else(|| ApiError::not_found(self.def(), name))?;
        Ok(json_response(StatusCode::OK, &object))
    }

    fn list(
        &self,
        labels: &LabelSelector,
        fields: &FieldSelector,
    ) -> Result<Response<Body>, ApiError> {
        let def = self.def();
        let namespace = (!self.namespace.is_empty()).then_some(self.namespace);
        let (items, rv) = self.state.store.list(self.resource, namespace);
        if self.query.get("resourceVersionMatch") == Some("Exact") {
            let wanted: u64 = self
                .query
                .get("resourceVersion")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            if wanted != rv {
                return Err(ApiError::expired(format!(
                    "too old resource version: {wanted} ({rv})"
                )));
            }
        }
        let items: Vec<Value> = items
            .into_iter()
            .filter(|o| labels.matches(o) && fields.matches(o))
            .map(|mut o| {
                if let Some(m) = o.as_object_mut() {
                    m.remove("apiVersion");
                    m.remove("kind");
                }
                o
            })
            .collect();
        let list = json!({
            "apiVersion": def.api_version(),
            "kind": format!("{}List", def.kind),
            "metadata": {"resourceVersion": rv.to_string()},
            "items": items,
        });
        Ok(json_response(StatusCode::OK, &list))
    }

    fn watch(
        &self,
        labels: LabelSelector,
        fields: FieldSelector,
    ) -> Result<Response<Body>, ApiError> {
        let requested = self.query.get("resourceVersion");
        let send_initial = self.query.flag("sendInitialEvents");
        let bookmarks = self.query.flag("allowWatchBookmarks");
        let timeout = self
            .query
            .get("timeoutSeconds")
            .and_then(|t| t.parse().ok())
            .map(Duration::from_secs)
            .unwrap_or(Duration::from_secs(1800));
        let namespace = (!self.namespace.is_empty()).then(|| self.namespace.to_owned());
        let store = &self.state.store;
        let from: Option<u64> =
            match requested {
                None | Some("0") => None,
                Some(rv) => Some(rv.parse().map_err(|_| {
                    ApiError::bad_request(format!("invalid resource version: {rv}"))
                })?),
            };
        let (tx, rx) = mpsc::channel::<Bytes>(1024);
        let filter = WatchFilter {
            resource: self.resource,
            namespace,
            labels,
            fields,
        };
        let start = match from.filter(|_| !send_initial) {
            Some(rv) => match store.watch_from(rv) {
                Ok((backlog, receiver)) => Ok((Vec::new(), backlog, receiver, rv)),
                Err(e) => Err(e.to_string()),
            },
            None => {
                // "Most recent" (or sendInitialEvents): the current objects as ADDED, then changes.
                let (objects, rv) = store.list(self.resource, filter.namespace.as_deref());
                store
                    .watch_from(rv)
                    .map(|(backlog, receiver)| (objects, backlog, receiver, rv))
                    .map_err(|e| e.to_string())
            }
        };
        let def = self.def();
        let state = self.state.clone();
        tokio::spawn(async move {
            let (initial, backlog, mut receiver, mut last_rv) = match start {
                Ok(start) => start,
                Err(message) => {
                    let _ = tx
                        .send(event_line("ERROR", &ApiError::expired(message).status()))
                        .await;
                    return;
                }
            };
            for object in initial.iter().filter(|o| filter.matches(o)) {
                if tx.send(event_line("ADDED", object)).await.is_err() {
                    return;
                }
            }
            if send_initial {
                let bookmark = bookmark(def, last_rv, true);
                if tx.send(event_line("BOOKMARK", &bookmark)).await.is_err() {
                    return;
                }
            }
            for change in backlog {
                last_rv = change.rv;
                if let Some((kind, object)) = filter.translate(&change)
                    && tx.send(event_line(kind, object)).await.is_err()
                {
                    return;
                }
            }
            let deadline = tokio::time::sleep(timeout);
            tokio::pin!(deadline);
            // Like upstream: a bookmark shortly before the watch times out, and periodically.
            let last_bookmark = tokio::time::sleep(timeout.saturating_sub(Duration::from_secs(2)));
            tokio::pin!(last_bookmark);
            let mut last_bookmark_sent = false;
            let mut ticker = tokio::time::interval(state.bookmark_interval);
            ticker.tick().await;
            loop {
                tokio::select! {
                    () = &mut deadline => return,
                    () = tx.closed() => return,
                    () = &mut last_bookmark, if bookmarks && !last_bookmark_sent => {
                        last_bookmark_sent = true;
                        if tx.send(event_line("BOOKMARK", &bookmark(def, last_rv, false))).await.is_err() {
                            return;
                        }
                    }
                    _ = ticker.tick(), if bookmarks => {
                        if tx.send(event_line("BOOKMARK", &bookmark(def, last_rv, false))).await.is_err() {
                            return;
                        }
                    }
                    received = receiver.recv() => match received {
                        Ok(change) => {
                            if change.rv <= last_rv {
                                continue;
                            }
                            last_rv = change.rv;
                            if let Some((kind, object)) = filter.translate(&change)
                                && tx.send(event_line(kind, object)).await.is_err() {
                                    return;
                                }
                        }
                        Err(broadcast::error::RecvError::Lagged(_)) => {
                            let status = ApiError::expired(format!("too old resource version: {last_rv}")).status();
                            let _ = tx.send(event_line("ERROR", &status)).await;
                            return;
                        }
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                }
            }
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx)
            .map(|bytes| Ok::<_, Infallible>(Frame::data(bytes)));
        let mut response = Response::new(BodyExt::boxed(StreamBody::new(stream)));
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            "application/json".parse().expect("static header"),
        );
        Ok(response)
    }

    fn create(
        &self,
        name: Option<&str>,
        subresource: Option<&str>,
        body: &Bytes,
    ) -> Result<Response<Body>, ApiError> {
        let body = parse_json(body)?;
        match (self.resource, subresource) {
            (r, Some("token")) if r == resources::SERVICEACCOUNTS => {
                return self.token_request(name.unwrap_or_default(), body);
            }
            (r, _) if r == resources::TOKENREVIEWS => return self.token_review(body),
            (r, _) if r == resources::SUBJECTACCESSREVIEWS => {
                return self.subject_access_review(body, None);
            }
            (r, _) if r == resources::SELFSUBJECTACCESSREVIEWS => {
                return self.subject_access_review(body, Some(self.user));
            }
            _ if name.is_some() => return Err(ApiError::method_not_allowed("POST")),
            _ => {}
        }
        let def = self.def();
        let (mut object, warnings) = admission::decode(def, body, self.strict())?;
        if def.namespaced {
            match self
                .state
                .store
                .get(resources::NAMESPACES, "", self.namespace)
            {
                None => {
                    return Err(ApiError::not_found(
                        resources::NAMESPACES.def(),
                        self.namespace,
                    ));
                }
                Some(ns) if !ns["metadata"]["deletionTimestamp"].is_null() => {
                    return Err(ApiError {
                        code: 403,
                        reason: "Forbidden",
                        message: format!(
                            "{} \"{}\" is forbidden: unable to create new content in namespace {} because it is being terminated",
                            def.qualified(),
                            object["metadata"]["name"].as_str().unwrap_or_default(),
                            self.namespace
                        ),
                        details: None,
                    });
                }
                Some(_) => {}
            }
        }
        let name = object["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let (_allocating, allocations) = self.allocations(&name);
        admission::admit_create(
            &self.state.store,
            &allocations,
            self.user,
            self.resource,
            &mut object,
            self.namespace,
        )?;
        let object = normalize(def, object)?;
        if self.dry_run() {
            return Ok(with_warnings(
                json_response(StatusCode::CREATED, &object),
                &warnings,
            ));
        }
        let created = self
            .state
            .store
            .create(self.resource, object)
            .map_err(|e| store_error(self.resource, &name, e))?;
        Ok(with_warnings(
            json_response(StatusCode::CREATED, &created),
            &warnings,
        ))
    }

    fn update(
        &self,
        name: &str,
        subresource: Option<&str>,
        body: &Bytes,
    ) -> Result<Response<Body>, ApiError> {
        let def = self.def();
        let (mut new, warnings) = admission::decode(def, parse_json(body)?, self.strict())?;
        if def.namespaced
            && new["metadata"]["namespace"]
                .as_str()
                .is_none_or(str::is_empty)
        {
            new["metadata"]["namespace"] = json!(self.namespace);
        }
        if new["metadata"]["name"] != name
            || (def.namespaced && new["metadata"]["namespace"] != self.namespace)
        {
            return Err(ApiError::bad_request(
                "the name of the object does not match the name on the URL",
            ));
        }
        let (_allocating, allocations) = self.allocations(name);
        let updated = self
            .state
            .store
            .update_with(self.resource, self.namespace, name, |current| {
                admission::admit_update(
                    &self.state.store,
                    &allocations,
                    self.user,
                    self.resource,
                    &mut new,
                    current,
                    subresource,
                )?;
                *current = normalize(def, std::mem::take(&mut new))?;
                Ok(())
            })
            .map_err(|e| update_error(self.resource, name, e))?;
        let result = self.finish_if_finalized(updated)?;
        Ok(with_warnings(
            json_response(StatusCode::OK, &result),
            &warnings,
        ))
    }

    fn patch(
        &self,
        name: &str,
        subresource: Option<&str>,
        content_type: &str,
        body: &Bytes,
    ) -> Result<Response<Body>, ApiError> {
        let kind = PatchKind::from_content_type(content_type)
            .ok_or_else(|| ApiError::unsupported_media(content_type))?;
        let patch_body = parse_json(body)?;
        let def = self.def();
        if kind == PatchKind::Apply
            && self
                .state
                .store
                .get(self.resource, self.namespace, name)
                .is_none()
        {
            let mut object = patch_body;
            object["metadata"]["name"] = json!(name);
            let (mut object, _) = admission::decode(def, object, self.strict())?;
            let (_allocating, allocations) = self.allocations(name);
            admission::admit_create(
                &self.state.store,
                &allocations,
                self.user,
                self.resource,
                &mut object,
                self.namespace,
            )?;
            let created = self
                .state
                .store
                .create(self.resource, normalize(def, object)?)
                .map_err(|e| store_error(self.resource, name, e))?;
            return Ok(json_response(StatusCode::CREATED, &created));
        }
        let strict = self.strict();
        let (_allocating, allocations) = self.allocations(name);
        let updated = self
            .state
            .store
            .update_with(self.resource, self.namespace, name, |current| {
                let mut patched = current.clone();
                // The stored version is not a precondition unless the patch sets one.
                if let Some(m) = patched["metadata"].as_object_mut() {
                    m.remove("resourceVersion");
                }
                patch::apply(kind, &mut patched, &patch_body).map_err(|e| match e {
                    patch::PatchError::Malformed(why) => ApiError::bad_request(why),
                    patch::PatchError::NotApplicable(why) => ApiError {
                        code: 422,
                        reason: "Invalid",
                        message: why,
                        details: None,
                    },
                })?;
                let (mut patched, _) = admission::decode(def, patched, strict)?;
                admission::admit_update(
                    &self.state.store,
                    &allocations,
                    self.user,
                    self.resource,
                    &mut patched,
                    current,
                    subresource,
                )?;
                *current = normalize(def, patched)?;
                Ok(())
            })
            .map_err(|e| update_error(self.resource, name, e))?;
        let result = self.finish_if_finalized(updated)?;
        Ok(json_response(StatusCode::OK, &result))
    }

    /// For a Service write: the allocation lock, held until the write is stored, and what the
    /// other Services hold. Nothing for other resources.
    fn allocations(
        &self,
        name: &str,
    ) -> (
        Option<std::sync::MutexGuard<'_, ()>>,
        admission::Allocations,
    ) {
        if self.resource != resources::SERVICES {
            return (None, admission::Allocations::none(&self.state.settings));
        }
        let guard = self
            .state
            .allocating
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let allocations = admission::Allocations::of(
            &self.state.store,
            &self.state.settings,
            self.namespace,
            name,
        );
        (Some(guard), allocations)
    }

    /// An object marked for deletion whose last finalizer is gone is removed now.
    fn finish_if_finalized(&self, object: Value) -> Result<Value, ApiError> {
        let marked = !object["metadata"]["deletionTimestamp"].is_null();
        let finalizers_left = object["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty());
        let pod_waiting = self.resource == resources::PODS
            && object["metadata"]["deletionGracePeriodSeconds"]
                .as_i64()
                .unwrap_or(0)
                > 0;
        let namespace_waiting = self.resource == resources::NAMESPACES;
        if marked && !finalizers_left && !pod_waiting && !namespace_waiting {
            let (ns, name) = key_of(&object);
            return self
                .state
                .store
                .delete(self.resource, &ns, &name)
                .map_err(|e| store_error(self.resource, &name, e));
        }
        Ok(object)
    }

    fn delete(&self, name: &str, body: &Bytes) -> Result<Response<Body>, ApiError> {
        let options = if body.is_empty() {
            json!({})
        } else {
            parse_json(body)?
        };
        let grace = options["gracePeriodSeconds"].as_i64().or_else(|| {
            self.query
                .get("gracePeriodSeconds")
                .and_then(|g| g.parse().ok())
        });
        let result = delete_object(
            &self.state.store,
            self.resource,
            self.namespace,
            name,
            grace,
            &options["preconditions"],
            self.dry_run(),
        )?;
        Ok(json_response(StatusCode::OK, &result))
    }

    fn delete_collection(
        &self,
        labels: &LabelSelector,
        fields: &FieldSelector,
    ) -> Result<Response<Body>, ApiError> {
        let namespace = (!self.namespace.is_empty()).then_some(self.namespace);
        let (items, rv) = self.state.store.list(self.resource, namespace);
        let mut deleted = Vec::new();
        for item in items
            .into_iter()
            .filter(|o| labels.matches(o) && fields.matches(o))
        {
            let (ns, name) = key_of(&item);
            if let Ok(result) = delete_object(
                &self.state.store,
                self.resource,
                &ns,
                &name,
                None,
                &Value::Null,
                self.dry_run(),
            ) {
                deleted.push(result);
            }
        }
        let def = self.def();
        let list = json!({"apiVersion": def.api_version(), "kind": format!("{}List", def.kind), "metadata": {"resourceVersion": rv.to_string()}, "items": deleted});
        Ok(json_response(StatusCode::OK, &list))
    }

    fn token_request(&self, sa_name: &str, body: Value) -> Result<Response<Body>, ApiError> {
        let request: k8s_openapi::api::authentication::v1::TokenRequest =
            serde_json::from_value(body).map_err(|e| {
                ApiError::bad_request(format!(
                    "TokenRequest in version \"v1\" cannot be handled as a TokenRequest: {e}"
                ))
            })?;
        let request = serde_json::to_value(request).expect("typed values serialise");
        let sa = self
            .state
            .store
            .get(resources::SERVICEACCOUNTS, self.namespace, sa_name)
            .ok_or_else(|| ApiError::not_found(resources::SERVICEACCOUNTS.def(), sa_name))?;
        let spec = &request["spec"];
        let expiration = spec["expirationSeconds"].as_i64().unwrap_or(3600);
        if expiration < 600 {
            return Err(ApiError::invalid(
                resources::SERVICEACCOUNTS.def(),
                sa_name,
                &[(
                    "spec.expirationSeconds".into(),
                    "FieldValueInvalid",
                    format!(
                        "Invalid value: {expiration}: may not specify a duration less than 10 minutes"
                    ),
                )],
            ));
        }
        let audiences = spec["audiences"]
            .as_array()
            .filter(|a| !a.is_empty())
            .cloned()
            .unwrap_or_else(|| vec![json!(API_AUDIENCE)]);
        let mut pod_claim = Value::Null;
        let bound = &spec["boundObjectRef"];
        if bound["kind"] == "Pod" {
            let pod_name = bound["name"].as_str().unwrap_or_default();
            let pod = self
                .state
                .store
                .get(resources::PODS, self.namespace, pod_name)
                .ok_or_else(|| ApiError::not_found(resources::PODS.def(), pod_name))?;
            if !bound["uid"].is_null() && bound["uid"] != pod["metadata"]["uid"] {
                return Err(ApiError::conflict(
                    resources::PODS.def(),
                    pod_name,
                    "the UID in the bound object reference does not match",
                ));
            }
            if let Some(node) = self.user.node_name()
                && pod["spec"]["nodeName"] != node
            {
                return Err(ApiError::forbidden(
                    &self.user.name,
                    "create",
                    resources::SERVICEACCOUNTS.def(),
                    Some("token"),
                    Some(self.namespace),
                    Some(sa_name),
                    Some("node requested token bound to a pod scheduled on a different node"),
                ));
            }
            pod_claim = json!({"name": pod_name, "uid": pod["metadata"]["uid"]});
        } else if self.user.node_name().is_some() {
            return Err(ApiError::forbidden(
                &self.user.name,
                "create",
                resources::SERVICEACCOUNTS.def(),
                Some("token"),
                Some(self.namespace),
                Some(sa_name),
                Some("node requested token not bound to a pod"),
            ));
        }
        let now = jiff::Timestamp::now().as_second();
        let mut k8s = json!({"namespace": self.namespace, "serviceaccount": {"name": sa_name, "uid": sa["metadata"]["uid"]}});
        if !pod_claim.is_null() {
            k8s["pod"] = pod_claim;
        }
        let claims = json!({"aud": audiences, "exp": now + expiration, "iat": now, "nbf": now, "iss": API_AUDIENCE,
            "sub": format!("system:serviceaccount:{}:{sa_name}", self.namespace), "kubernetes.io": k8s});
        let token = self.state.signer.issue(&claims);
        let expires = jiff::Timestamp::from_second(now + expiration)
            .expect("valid time")
            .to_string();
        let mut response = request.clone();
        response["apiVersion"] = json!("authentication.k8s.io/v1");
        response["kind"] = json!("TokenRequest");
        response["metadata"] = json!({"name": sa_name, "namespace": self.namespace, "creationTimestamp": admission::now()});
        response["spec"]["audiences"] = json!(audiences);
        response["spec"]["expirationSeconds"] = json!(expiration);
        response["status"] = json!({"token": token, "expirationTimestamp": expires});
        Ok(json_response(StatusCode::CREATED, &response))
    }

    fn token_review(&self, body: Value) -> Result<Response<Body>, ApiError> {
        let (mut review, _) =
            admission::decode(resources::TOKENREVIEWS.def(), body, self.strict())?;
        let token = review["spec"]["token"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let audiences = review["spec"]["audiences"]
            .as_array()
            .filter(|a| !a.is_empty())
            .cloned()
            .unwrap_or_else(|| vec![json!(API_AUDIENCE)]);
        let matched = audiences.iter().filter_map(Value::as_str).find_map(|aud| {
            auth::authenticate_token(&self.state.store, &self.state.signer, &token, aud)
                .map(|u| (u, aud.to_owned()))
        });
        review["status"] = match matched {
            Some((user, aud)) => {
                json!({"authenticated": true, "user": user.user_info(), "audiences": [aud]})
            }
            None => json!({"authenticated": false, "error": "invalid bearer token"}),
        };
        Ok(json_response(StatusCode::CREATED, &review))
    }

    /// A SubjectAccessReview (about the user in its spec) or, with `requester`, a
    /// SelfSubjectAccessReview (about whoever asks).
    fn subject_access_review(
        &self,
        body: Value,
        requester: Option<&User>,
    ) -> Result<Response<Body>, ApiError> {
        let resource = if requester.is_some() {
            resources::SELFSUBJECTACCESSREVIEWS
        } else {
            resources::SUBJECTACCESSREVIEWS
        };
        let (mut review, _) = admission::decode(resource.def(), body, self.strict())?;
        let spec = &review["spec"];
        let user = match requester {
            Some(user) => user.clone(),
            None => User {
                name: spec["user"].as_str().unwrap_or_default().into(),
                uid: spec["uid"].as_str().unwrap_or_default().into(),
                groups: spec["groups"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|g| g.as_str().map(str::to_owned))
                    .collect(),
            },
        };
        let text = |v: &Value, k: &str| v[k].as_str().unwrap_or_default().to_owned();
        let attrs = if spec["resourceAttributes"].is_object() {
            let r = &spec["resourceAttributes"];
            Attributes {
                verb: text(r, "verb"),
                group: Some(text(r, "group")),
                resource: text(r, "resource"),
                subresource: text(r, "subresource"),
                namespace: text(r, "namespace"),
                name: text(r, "name"),
                path: String::new(),
            }
        } else {
            let r = &spec["nonResourceAttributes"];
            Attributes {
                verb: text(r, "verb"),
                path: text(r, "path"),
                ..Default::default()
            }
        };
        review["status"] = match authz::authorize(&self.state.store, &user, &attrs) {
            Decision::Allow => json!({"allowed": true}),
            Decision::Deny(reason) => {
                json!({"allowed": false, "reason": reason.unwrap_or_default()})
            }
        };
        Ok(json_response(StatusCode::CREATED, &review))
    }
}

/// Deletes one object the way the apiserver does: pods bound to a node get a grace period
/// (`deletionTimestamp` now + grace; the kubelet confirms with grace 0), objects with finalizers
/// or namespaces are marked and finished later, everything else goes at once.
pub fn delete_object(
    store: &Store,
    resource: Resource,
    namespace: &str,
    name: &str,
    grace: Option<i64>,
    preconditions: &Value,
    dry_run: bool,
) -> Result<Value, ApiError> {
    let def = resource.def();
    let current = store
        .get(resource, namespace, name)
        .ok_or_else(|| ApiError::not_found(def, name))?;
    if let Some(uid) = preconditions["uid"].as_str()
        && current["metadata"]["uid"] != uid
    {
        return Err(ApiError::conflict(
            def,
            name,
            &format!(
                "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                current["metadata"]["uid"].as_str().unwrap_or_default()
            ),
        ));
    }
    if let Some(rv) = preconditions["resourceVersion"].as_str()
        && current["metadata"]["resourceVersion"] != rv
    {
        return Err(ApiError::conflict(
            def,
            name,
            "the object has been modified; please apply your changes to the latest version and try again",
        ));
    }
    if dry_run {
        return Ok(current);
    }
    let finalizers = current["metadata"]["finalizers"]
        .as_array()
        .is_some_and(|f| !f.is_empty());
    let grace = if resource == resources::PODS {
        let bound = current["spec"]["nodeName"]
            .as_str()
            .is_some_and(|n| !n.is_empty());
        let finished = matches!(
            current["status"]["phase"].as_str(),
            Some("Succeeded" | "Failed")
        );
        let default = current["spec"]["terminationGracePeriodSeconds"]
            .as_i64()
            .unwrap_or(30);
        if bound && !finished {
            grace.unwrap_or(default).max(0)
        } else {
            0
        }
    } else {
        0
    };
    let mark = resource == resources::NAMESPACES || finalizers || grace > 0;
    if !mark {
        let deleted = store
            .delete(resource, namespace, name)
            .map_err(|e| store_error(resource, name, e))?;
        return Ok(if resource == resources::PODS {
            deleted
        } else {
            status::success(
                def,
                name,
                deleted["metadata"]["uid"].as_str().unwrap_or_default(),
            )
        });
    }
    let marked = store
        .update_with(resource, namespace, name, |object| {
            let meta = &mut object["metadata"];
            let existing = meta["deletionGracePeriodSeconds"].as_i64();
            if meta["deletionTimestamp"].is_null() || existing.is_some_and(|g| grace < g) {
                let at = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(grace);
                meta["deletionTimestamp"] =
                    json!(at.round(jiff::Unit::Second).expect("round").to_string());
                meta["deletionGracePeriodSeconds"] = json!(grace);
            }
            if resource == resources::NAMESPACES {
                object["status"]["phase"] = json!("Terminating");
            }
            Ok::<_, ApiError>(())
        })
        .map_err(|e| update_error(resource, name, e))?;
    // A bound pod deleted with grace 0 and no finalizers is gone now.
    if resource == resources::PODS && grace == 0 && !finalizers {
        return store
            .delete(resource, namespace, name)
            .map_err(|e| store_error(resource, name, e));
    }
    Ok(marked)
}

struct WatchFilter {
    resource: Resource,
    namespace: Option<String>,
    labels: LabelSelector,
    fields: FieldSelector,
}

impl WatchFilter {
    fn matches(&self, object: &Value) -> bool {
        let in_namespace = self
            .namespace
            .as_deref()
            .is_none_or(|ns| object["metadata"]["namespace"] == ns);
        in_namespace && self.labels.matches(object) && self.fields.matches(object)
    }

    /// The event a watcher sees for `change`, if any: objects entering or leaving the selection
    /// show as ADDED or DELETED.
    fn translate<'c>(&self, change: &'c Change) -> Option<(&'static str, &'c Value)> {
        if change.resource != self.resource {
            return None;
        }
        let now = self.matches(&change.object);
        match change.kind {
            EventType::Added | EventType::Deleted => {
                now.then_some((change.kind.wire(), &change.object))
            }
            EventType::Modified => {
                let before = change.previous.as_ref().is_some_and(|p| self.matches(p));
                match (before, now) {
                    (true, true) => Some(("MODIFIED", &change.object)),
                    (false, true) => Some(("ADDED", &change.object)),
                    (true, false) => Some(("DELETED", &change.object)),
                    (false, false) => None,
                }
            }
        }
    }
}

fn bookmark(def: &resources::ResourceDef, rv: u64, initial_end: bool) -> Value {
    let mut meta = json!({"resourceVersion": rv.to_string()});
    if initial_end {
        meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    json!({"apiVersion": def.api_version(), "kind": def.kind, "metadata": meta})
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line =
        serde_json::to_vec(&json!({"type": kind, "object": object})).expect("events serialise");
    line.push(b'\n');
    Bytes::from(line)
}

fn discovery(state: &ApiState, route: &Route) -> Value {
    let address = state.url.trim_start_matches("https://");
    let groups = || {
        let mut seen: Vec<(&str, &str)> = Vec::new();
        for r in Resource::all() {
            let d = r.def();
            if !d.group.is_empty() && !seen.contains(&(d.group, d.version)) {
                seen.push((d.group, d.version));
            }
        }
        seen
    };
    let group_json = |group: &str, version: &str| {
        let gv = json!({"groupVersion": format!("{group}/{version}"), "version": version});
        json!({"name": group, "versions": [gv], "preferredVersion": gv})
    };
    match route {
        Route::Root => {
            let mut paths = vec![
                "/api".to_owned(),
                "/api/v1".into(),
                "/apis".into(),
                "/healthz".into(),
                "/livez".into(),
                "/readyz".into(),
                "/version".into(),
            ];
            for (g, v) in groups() {
                paths.push(format!("/apis/{g}"));
                paths.push(format!("/apis/{g}/{v}"));
            }
            json!({"paths": paths})
        }
        Route::Version => {
            json!({"major": VERSION.0, "minor": VERSION.1, "gitVersion": format!("v{}.{}.0-tug-test", VERSION.0, VERSION.1), "gitCommit": "", "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z", "goVersion": "n/a", "compiler": "rustc", "platform": "linux/amd64"})
        }
        Route::Health => json!("ok"),
        Route::ApiVersions => {
            json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": address}]})
        }
        Route::GroupList => {
            json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups().into_iter().map(|(g, v)| group_json(g, v)).collect::<Vec<_>>()})
        }
        Route::Group(group) => match groups().into_iter().find(|(g, _)| g == group) {
            Some((g, v)) => {
                let mut group = group_json(g, v);
                group["kind"] = json!("APIGroup");
                group["apiVersion"] = json!("v1");
                group
            }
            None => ApiError::no_route(&format!("/apis/{group}")).status(),
        },
        Route::ResourceList(group, version) => {
            let mut list = Vec::new();
            for r in Resource::all()
                .map(Resource::def)
                .filter(|d| d.group == group && d.version == version)
            {
                let verbs: &[&str] = if r.review {
                    &["create"]
                } else {
                    &[
                        "create",
                        "delete",
                        "deletecollection",
                        "get",
                        "list",
                        "patch",
                        "update",
                        "watch",
                    ]
                };
                list.push(json!({"name": r.plural, "singularName": r.singular, "namespaced": r.namespaced, "kind": r.kind, "verbs": verbs, "shortNames": r.short_names}));
                if r.has_status {
                    list.push(json!({"name": format!("{}/status", r.plural), "singularName": "", "namespaced": r.namespaced, "kind": r.kind, "verbs": ["get", "patch", "update"]}));
                }
                if r.plural == "serviceaccounts" {
                    list.push(json!({"name": "serviceaccounts/token", "singularName": "", "namespaced": true, "group": "authentication.k8s.io", "version": "v1", "kind": "TokenRequest", "verbs": ["create"]}));
                }
                if r.plural == "certificatesigningrequests" {
                    list.push(json!({"name": "certificatesigningrequests/approval", "singularName": "", "namespaced": false, "kind": "CertificateSigningRequest", "verbs": ["get", "patch", "update"]}));
                }
            }
            let group_version = if group.is_empty() {
                version.clone()
            } else {
                format!("{group}/{version}")
            };
            json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": list})
        }
        Route::OpenApiRoot => {
            let mut paths = serde_json::Map::new();
            paths.insert(
                "api/v1".into(),
                json!({"serverRelativeURL": "/openapi/v3/api/v1?hash=tug-test"}),
            );
            for (g, v) in groups() {
                paths.insert(
                    format!("apis/{g}/{v}"),
                    json!({"serverRelativeURL": format!("/openapi/v3/apis/{g}/{v}?hash=tug-test")}),
                );
            }
            json!({"paths": paths})
        }
        Route::OpenApiGroupVersion(group, version) => openapi_group_version(group, version),
        Route::Object { .. } => Value::Null,
    }
}

/// An OpenAPI v3 document for one group/version with the operations' parameters but not the
/// schemas: enough for clients to learn that PATCH takes `fieldValidation`, which this server
/// implements (so kubectl validates on the server, as against a real apiserver).
fn openapi_group_version(group: &str, version: &str) -> Value {
    let mut paths = serde_json::Map::new();
    let prefix = if group.is_empty() {
        "/api/v1".to_owned()
    } else {
        format!("/apis/{group}/{version}")
    };
    for def in Resource::all()
        .map(Resource::def)
        .filter(|d| d.group == group && d.version == version && !d.review)
    {
        let gvk = json!({"group": def.group, "version": def.version, "kind": def.kind});
        let params = json!([{"name": "dryRun", "in": "query", "schema": {"type": "string"}}, {"name": "fieldManager", "in": "query", "schema": {"type": "string"}}, {"name": "fieldValidation", "in": "query", "schema": {"type": "string"}}, {"name": "force", "in": "query", "schema": {"type": "boolean"}}]);
        let operation = |action: &str| json!({"x-kubernetes-group-version-kind": gvk, "x-kubernetes-action": action, "parameters": params, "responses": {"200": {"description": "OK"}}});
        let item = if def.namespaced {
            format!("{prefix}/namespaces/{{namespace}}/{}/{{name}}", def.plural)
        } else {
            format!("{prefix}/{}/{{name}}", def.plural)
        };
        paths.insert(item, json!({"get": operation("get"), "put": operation("put"), "patch": operation("patch"), "delete": operation("delete")}));
    }
    json!({"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": format!("v{}.{}.0", VERSION.0, VERSION.1)}, "paths": paths})
}

fn json_response(code: StatusCode, value: &Value) -> Response<Body> {
    let body = serde_json::to_vec(value).expect("JSON values serialise");
    let mut response = Response::new(Full::new(Bytes::from(body)).boxed());
    *response.status_mut() = code;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        "application/json".parse().expect("static header"),
    );
    response
}

fn with_warnings(mut response: Response<Body>, warnings: &[String]) -> Response<Body> {
    for warning in warnings {
        let value = format!("299 - \"{}\"", warning.replace('"', "\\\""));
        if let Ok(value) = value.parse() {
            response.headers_mut().append("Warning", value);
        }
    }
    response
}

/// The response for an error: its code and `Status` body.
pub fn error_response(error: &ApiError) -> Response<Body> {
    json_response(
        StatusCode::from_u16(error.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        &error.status(),
    )
}

/// A kubeconfig (YAML) for `server` trusting `ca_pem`, with a client certificate or none.
pub fn kubeconfig(server: &str, ca_pem: &str, user: Option<(&str, &str, &str)>) -> String {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let mut config = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: tug-test\n  cluster:\n    server: {server}\n    certificate-authority-data: {}\n",
        b64(ca_pem)
    );
    match user {
        Some((name, cert, key)) => config.push_str(&format!(
            "users:\n- name: {name}\n  user:\n    client-certificate-data: {}\n    client-key-data: {}\ncontexts:\n- name: tug-test\n  context:\n    cluster: tug-test\n    user: {name}\ncurrent-context: tug-test\n",
            b64(cert),
            b64(key)
        )),
        None => config.push_str("contexts: []\nusers: []\ncurrent-context: \"\"\n"),
    }
    config
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object_route(path: &str) -> (Resource, Option<String>, Option<String>, Option<String>) {
        match parse_route(path) {
            Some(Route::Object {
                resource,
                namespace,
                name,
                subresource,
            }) => (resource, namespace, name, subresource),
            other => panic!("{path}: {other:?}"),
        }
    }

    #[test]
    fn routes_tell_namespaced_paths_from_namespace_objects() {
        assert_eq!(
            object_route("/api/v1/namespaces/ns/pods"),
            (resources::PODS, Some("ns".into()), None, None)
        );
        assert_eq!(
            object_route("/api/v1/namespaces/ns/pods/p/status"),
            (
                resources::PODS,
                Some("ns".into()),
                Some("p".into()),
                Some("status".into())
            )
        );
        assert_eq!(
            object_route("/api/v1/namespaces/ns"),
            (resources::NAMESPACES, None, Some("ns".into()), None)
        );
        assert_eq!(
            object_route("/api/v1/namespaces/ns/status"),
            (
                resources::NAMESPACES,
                None,
                Some("ns".into()),
                Some("status".into())
            )
        );
        assert_eq!(
            object_route("/api/v1/pods"),
            (resources::PODS, None, None, None)
        );
        assert_eq!(
            object_route("/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/n1"),
            (
                resources::LEASES,
                Some("kube-node-lease".into()),
                Some("n1".into()),
                None
            )
        );
        assert!(parse_route("/api/v1/bogus").is_none());
        assert!(parse_route("/apis/apps/v1/deployments").is_none());
        assert!(matches!(
            parse_route("/apis/discovery.k8s.io/v1"),
            Some(Route::ResourceList(..))
        ));
    }

    #[test]
    fn watch_filters_turn_selector_transitions_into_added_and_deleted() {
        let filter = WatchFilter {
            resource: resources::PODS,
            namespace: None,
            labels: LabelSelector::parse("app=web").unwrap(),
            fields: FieldSelector::default(),
        };
        let pod = |app: &str| json!({"metadata": {"name": "p", "namespace": "ns", "labels": {"app": app}}});
        let change = |previous: Value, object: Value| Change {
            rv: 2,
            resource: resources::PODS,
            kind: EventType::Modified,
            object,
            previous: Some(previous),
            at: std::time::Instant::now(),
        };
        assert_eq!(
            filter
                .translate(&change(pod("db"), pod("web")))
                .map(|e| e.0),
            Some("ADDED")
        );
        assert_eq!(
            filter
                .translate(&change(pod("web"), pod("db")))
                .map(|e| e.0),
            Some("DELETED")
        );
        assert_eq!(
            filter
                .translate(&change(pod("web"), pod("web")))
                .map(|e| e.0),
            Some("MODIFIED")
        );
        assert_eq!(filter.translate(&change(pod("db"), pod("db"))), None);
    }
}
