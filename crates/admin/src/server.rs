//! The admin endpoint (axum). Every request is authenticated before anything else runs.
//!
//! Before authentication a peer gets little (DESIGN §10): the connection limits and deadlines
//! of `listener.rs`, a body that is never read, a refusal logged within a budget with the
//! peer's path clipped, and, after a few wrong passwords, answers that wait longer each time
//! (`keel_core::throttle`). After authentication: the request's body must arrive within a
//! deadline, and at most `MAX_CONCURRENT_REQUESTS` run at once, the ping excepted (it is
//! cheap, and `keel` commands use it to find out what answers on a port).
//!
//! `guard` runs before every route, in this order: the login delay the source and user owe,
//! the credential, and on failure a 401 (`ADMN0003W`) that closes the connection without
//! reading the body and names who answered (`Identity`: cell, node, process; the ping says the
//! same). Only then is the body read (within its deadline) and a request slot taken.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use keel_core::admission::Source;
use keel_core::budget::{clip, left_out_note, LogBudget};
use keel_core::throttle::LoginThrottle;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::WireError;
use crate::listener::{ConnHandle, Limits};
use crate::{
    AdminError, Principal, Registry, Users, FORWARDED_HEADER, MAX_REQUEST_BYTES, ON_BEHALF_HEADER,
};
use keel_core::roles::AdminRole;

/// Requests served at once; more are answered 503 at once instead of queueing without bound.
const MAX_CONCURRENT_REQUESTS: usize = 256;
/// After `shutdown` completes, requests in flight get this long to finish before `serve`
/// returns anyway (a hung operation must not keep a stopping process alive).
const SHUTDOWN_GRACE_MS: u64 = 5_000;
/// What a refused request's log record keeps of the path the peer chose.
const LOGGED_PATH_BYTES_MAX: usize = 128;

/// Who answers on an endpoint: told to every caller, authenticated or not, so that a `keel`
/// command that reached another profile's process (ports overlap) can say so instead of
/// blaming the password. Names only, never anything secret.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Identity {
    pub cell: String,
    pub node: String,
    pub process: String,
}

/// How an endpoint is served.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    pub identity: Identity,
    pub limits: Limits,
    /// Failed-login delays (the same defaults as the bus port's).
    pub logins: keel_core::throttle::Limits,
    /// HTTPS on the same port as plain HTTP (a connection opening with a TLS record), with
    /// the process's certificate; None: plain HTTP only.
    pub tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
}

#[derive(Clone)]
struct ServerState {
    registry: Arc<Registry>,
    users: Arc<Users>,
    inflight: Arc<tokio::sync::Semaphore>,
    identity: Arc<Identity>,
    body_read_ms: u64,
    throttle: Arc<LoginThrottle>,
    /// Budget of the log records that unauthenticated requests cause.
    refusals: Arc<LogBudget>,
}

/// Serves the admin API on `listener` until `shutdown` completes, with default limits and no
/// identity (tests, tools). Binds nothing itself: the caller binds, so it reports "port in
/// use" in its own words (with the config key to change).
pub async fn serve(
    listener: tokio::net::TcpListener,
    registry: Arc<Registry>,
    users: Arc<Users>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with(listener, registry, users, Settings::default(), shutdown).await
}

/// [`serve`] with an identity and limits.
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    registry: Arc<Registry>,
    users: Arc<Users>,
    settings: Settings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let state = ServerState {
        registry,
        users,
        inflight: Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_REQUESTS)),
        identity: Arc::new(settings.identity),
        body_read_ms: settings.limits.body_read_ms,
        throttle: Arc::new(LoginThrottle::new(settings.logins)),
        refusals: Arc::new(LogBudget::new(10, 2)),
    };
    let app = Router::new()
        .route("/v1/ping", get(ping))
        .route("/v1/query", post(query))
        .route("/v1/invoke", post(invoke))
        .route("/v1/attribute", post(attribute))
        .route("/v1/attributes", post(attributes))
        .fallback(no_such_endpoint)
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .layer(DefaultBodyLimit::max(MAX_REQUEST_BYTES))
        .with_state(state);

    let (stopping_tx, stopping_rx) = tokio::sync::watch::channel(false);
    let mut grace_rx = stopping_rx.clone();
    let server = crate::listener::run(listener, app, settings.limits, settings.tls, stopping_rx);
    let signal = async move {
        shutdown.await;
        let _ = stopping_tx.send(true);
        // Keep the sender: dropping it would read as "stopping" never coming.
        std::future::pending::<()>().await;
    };
    let grace = async move {
        if grace_rx.wait_for(|stopping| *stopping).await.is_err() {
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(Duration::from_millis(SHUTDOWN_GRACE_MS)).await;
    };
    tokio::select! {
        () = server => Ok(()),
        () = signal => Ok(()),
        () = grace => {
            tracing::warn!("admin endpoint stopped with requests still running after {SHUTDOWN_GRACE_MS} ms");
            Ok(())
        }
    }
}

/// Authentication and admission, in front of every route (the fallback included).
async fn guard(State(state): State<ServerState>, request: Request, next: Next) -> Response {
    let peer_addr = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| *addr);
    let peer = peer_addr.map_or_else(|| "an unknown peer".to_string(), |a| a.to_string());
    // Only a presented credential is a login attempt: a request without one (a browser's
    // first try, a port scan) guesses nothing and is not throttled.
    let source = peer_addr
        .map(|a| Source::of(a.ip()))
        .filter(|_| request.headers().contains_key(header::AUTHORIZATION));
    let user = claimed_user(request.headers());
    // A source and user with failures behind it waits before any answer, right or wrong, one
    // attempt after another; past the queue's bound an attempt is refused unevaluated.
    if let Some(source) = source {
        match state.throttle.reserve(source, &user, Instant::now()) {
            Ok(wait) if wait.is_zero() => {}
            Ok(wait) => tokio::time::sleep(wait).await,
            Err(retry) => {
                let message = format!(
                    "too many login attempts from {source} as user {:?}: this one was refused without being checked; retry in {} s",
                    clip(&user, 64),
                    retry.as_secs() + 1
                );
                let mut response = error_body(
                    StatusCode::TOO_MANY_REQUESTS,
                    WireError {
                        kind: "unauthorized".into(),
                        message,
                        ..WireError::default()
                    },
                    Some(&state.identity),
                );
                let headers = response.headers_mut();
                if let Ok(v) = HeaderValue::from_str(&(retry.as_secs() + 1).to_string()) {
                    headers.insert(header::RETRY_AFTER, v);
                }
                return closing(response);
            }
        }
    }
    // The node agent of this node calling over mutual TLS is known by its certificate (held
    // as privately as the admin password, and checked against the cell's CA in the handshake):
    // its calls do not depend on a password an operator may change meanwhile.
    let by_certificate = request
        .extensions()
        .get::<crate::listener::PeerProcess>()
        .and_then(|p| p.0.clone())
        .filter(|(node, process)| {
            *node == state.identity.node && process == keel_core::layout::NODE_AGENT
        });
    let checked = match (by_certificate, basic_credentials(request.headers())) {
        (Some((node, process)), _) => Ok(Principal {
            user: format!("{node}/{process}"),
            grants: keel_core::roles::Grants::administrator(),
        }),
        (None, Err(reason)) => Err(reason.to_string()),
        (None, Ok((claimed, password))) => {
            // Argon2 takes tens of milliseconds by design: off the runtime's workers.
            let users = state.users.clone();
            tokio::task::spawn_blocking(move || users.authenticate(&claimed, &password))
                .await
                .unwrap_or_else(|e| Err(format!("the credential check ended abnormally: {e}")))
        }
    };
    let mut principal = match checked {
        Ok(p) => p,
        Err(reason) => return refuse_credential(&state, &request, source, &user, &peer, reason),
    };
    if let Some(source) = source {
        state.throttle.succeeded(source, &user);
    }
    // A registry forwarding a call acts for its caller, whose roles are checked here, where
    // the object lives. Only an Administrator (a forwarder's own credential) may say so.
    if let Some(on_behalf) = request.headers().get(ON_BEHALF_HEADER) {
        if !principal.grants.is_administrator() {
            return forbidden(format!(
                "user {:?} may not act for another user: only an Administrator (a node agent's own credential) may",
                principal.user
            ));
        }
        let named = on_behalf.to_str().unwrap_or_default();
        principal = match state.users.principal(named) {
            Some(p) => p,
            None => {
                return forbidden(format!(
                    "user {:?}, for whom this call was forwarded, is not a user here (removed meanwhile?)",
                    clip(named, 64)
                ))
            }
        };
    }
    // Every route but the ping needs at least Monitor: a bus-only user reads nothing here.
    if request.uri().path() != "/v1/ping" && !principal.grants.admin(AdminRole::Monitor) {
        return forbidden(keel_core::roles::refusal(
            &principal.user,
            AdminRole::Monitor,
            "the admin API",
        ));
    }
    let mut request = request;
    request.extensions_mut().insert(principal);
    // Authenticated work is never evicted to make room for new connections.
    let _busy = request
        .extensions()
        .get::<ConnHandle>()
        .map(ConnHandle::busy);
    // The body arrives whole, within its deadline, before a request slot is taken: a client
    // that stalls mid-body holds its connection for `body_read_ms` at most and no slot.
    let (parts, body) = request.into_parts();
    let read = tokio::time::timeout(
        Duration::from_millis(state.body_read_ms),
        axum::body::to_bytes(body, MAX_REQUEST_BYTES),
    )
    .await;
    let body = match read {
        Ok(Ok(bytes)) => Body::from(bytes),
        Ok(Err(e)) => {
            let too_large = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            let (status, message) = if too_large {
                (
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!(
                        "the request to {} is larger than {MAX_REQUEST_BYTES} bytes",
                        clip(parts.uri.path(), LOGGED_PATH_BYTES_MAX)
                    ),
                )
            } else {
                (
                    StatusCode::BAD_REQUEST,
                    format!("the request body could not be read: {e}"),
                )
            };
            return closing(error_body(status, protocol_error(message), None));
        }
        Err(_) => {
            let message = format!(
                "the request body did not arrive within {} ms",
                state.body_read_ms
            );
            return closing(error_body(
                StatusCode::REQUEST_TIMEOUT,
                protocol_error(message),
                None,
            ));
        }
    };
    let request = Request::from_parts(parts, body);
    if request.uri().path() == "/v1/ping" {
        return next.run(request).await;
    }
    let Ok(_permit) = state.inflight.clone().try_acquire_owned() else {
        return error_body(
            StatusCode::SERVICE_UNAVAILABLE,
            WireError {
                kind: "busy".into(),
                message: format!("the admin endpoint is already serving {MAX_CONCURRENT_REQUESTS} requests; retry shortly"),
                ..WireError::default()
            },
            None,
        );
    };
    next.run(request).await
}

/// The 401 of a request whose credential did not check out (ADMN0003W, within its budget).
fn refuse_credential(
    state: &ServerState,
    request: &Request,
    source: Option<Source>,
    user: &str,
    peer: &str,
    reason: String,
) -> Response {
    let mut why = reason.clone();
    if let Some(source) = source {
        state
            .throttle
            .failed_and_logged(source, user, Instant::now());
    }
    if let Some(left_out) = state.refusals.take(Instant::now()) {
        why.push_str(&left_out_note(left_out));
        keel_core::emit!(
            keel_core::catalog::ADMN0003W,
            method = clip(request.method().as_str(), 16),
            path = clip(request.uri().path(), LOGGED_PATH_BYTES_MAX),
            peer = peer,
            why = why
        );
    }
    let mut response = error_body(
        StatusCode::UNAUTHORIZED,
        WireError {
            kind: "unauthorized".into(),
            message: format!("the admin request was refused: {reason}; send a user's credential (HTTP Basic); the profile's own user `admin` has its password in secrets/admin-password"),
            ..WireError::default()
        },
        Some(&state.identity),
    );
    let headers = response.headers_mut();
    headers.insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"keel\""),
    );
    // The body was never read: the connection cannot carry another request.
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// A 403 naming the user, the role and the object. The body was not read: close.
fn forbidden(why: String) -> Response {
    closing(admin_error(&AdminError::Forbidden { why }))
}

fn protocol_error(message: String) -> WireError {
    WireError {
        kind: "protocol".into(),
        message,
        ..WireError::default()
    }
}

fn closing(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// The user a request claims to be (for throttling), whether or not the password is right.
fn claimed_user(headers: &HeaderMap) -> String {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once(' '))
        .and_then(|(_, token)| {
            base64::engine::general_purpose::STANDARD
                .decode(token.trim())
                .ok()
        })
        .map(|decoded| {
            let user = decoded.split(|b| *b == b':').next().unwrap_or_default();
            String::from_utf8_lossy(user).into_owned()
        })
        .unwrap_or_default()
}

/// The (user, password) of an HTTP Basic `Authorization` header; else why not, for ADMN0003W.
fn basic_credentials(headers: &HeaderMap) -> Result<(String, String), &'static str> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Err("no credential");
    };
    let wrong = "wrong credential";
    let value = value.to_str().map_err(|_| wrong)?;
    let (scheme, token) = value.trim().split_once(' ').ok_or(wrong)?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(wrong);
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(token.trim())
        .map_err(|_| wrong)?;
    let split = decoded.iter().position(|b| *b == b':').ok_or(wrong)?;
    let user = std::str::from_utf8(&decoded[..split]).map_err(|_| wrong)?;
    let password = std::str::from_utf8(&decoded[split + 1..]).map_err(|_| wrong)?;
    Ok((user.to_string(), password.to_string()))
}

fn error_body(status: StatusCode, error: WireError, identity: Option<&Identity>) -> Response {
    match identity {
        Some(identity) => (
            status,
            Json(json!({ "error": error, "answered_by": identity })),
        )
            .into_response(),
        None => (status, Json(json!({ "error": error }))).into_response(),
    }
}

fn admin_error(e: &AdminError) -> Response {
    let status = StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    error_body(status, e.to_wire(), None)
}

/// Parses a JSON body by hand so that every refusal is a JSON error an operator can read.
fn parse_body<T: DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
    path: &str,
    shape: &str,
) -> Result<T, Box<Response>> {
    let bytes = body.map_err(|rejection| {
        let status = rejection.status();
        let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
            format!("the request to {path} is larger than {MAX_REQUEST_BYTES} bytes")
        } else {
            format!("the request body to {path} could not be read: {rejection}")
        };
        error_body(
            status,
            WireError {
                kind: "protocol".into(),
                message,
                ..WireError::default()
            },
            None,
        )
    })?;
    serde_json::from_slice(&bytes).map_err(|e| {
        Box::new(error_body(
            StatusCode::BAD_REQUEST,
            WireError {
                kind: "protocol".into(),
                message: format!("the request to {path} must be JSON of the form {shape}: {e}"),
                ..WireError::default()
            },
            None,
        ))
    })
}

/// Forwarded requests come from another registry: answer from local objects only.
fn may_forward(headers: &HeaderMap) -> bool {
    !headers.contains_key(FORWARDED_HEADER)
}

async fn ping(State(state): State<ServerState>) -> Json<Value> {
    let Identity {
        cell,
        node,
        process,
    } = &*state.identity;
    Json(json!({
        "ok": true,
        "pid": std::process::id(),
        "cell": cell,
        "node": node,
        "process": process,
    }))
}

#[derive(Deserialize)]
struct QueryRequest {
    pattern: String,
}

async fn query(
    State(state): State<ServerState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let request: QueryRequest =
        match parse_body(body, "/v1/query", r#"{"pattern": "type=Server,*"}"#) {
            Ok(r) => r,
            Err(response) => return *response,
        };
    match state
        .registry
        .query_scoped(&request.pattern, may_forward(&headers))
        .await
    {
        Ok(names) => Json(json!({ "names": names })).into_response(),
        Err(e) => admin_error(&e),
    }
}

#[derive(Deserialize)]
struct InvokeRequest {
    name: String,
    op: String,
    #[serde(default)]
    args: Vec<Value>,
}

async fn invoke(
    State(state): State<ServerState>,
    axum::Extension(caller): axum::Extension<Principal>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let shape = r#"{"name": "Keel:type=...", "op": "...", "args": [...]}"#;
    let request: InvokeRequest = match parse_body(body, "/v1/invoke", shape) {
        Ok(r) => r,
        Err(response) => return *response,
    };
    match state
        .registry
        .invoke_scoped(
            &request.name,
            &request.op,
            request.args,
            may_forward(&headers),
            Some(&caller),
        )
        .await
    {
        Ok(result) => Json(json!({ "result": result })).into_response(),
        Err(e) => admin_error(&e),
    }
}

#[derive(Deserialize)]
struct AttributeRequest {
    name: String,
    attribute: String,
}

async fn attribute(
    State(state): State<ServerState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let shape = r#"{"name": "Keel:type=...", "attribute": "..."}"#;
    let request: AttributeRequest = match parse_body(body, "/v1/attribute", shape) {
        Ok(r) => r,
        Err(response) => return *response,
    };
    match state
        .registry
        .attribute_scoped(&request.name, &request.attribute, may_forward(&headers))
        .await
    {
        Ok(value) => Json(json!({ "value": value })).into_response(),
        Err(e) => admin_error(&e),
    }
}

#[derive(Deserialize)]
struct AttributesRequest {
    name: String,
}

async fn attributes(
    State(state): State<ServerState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let request: AttributesRequest =
        match parse_body(body, "/v1/attributes", r#"{"name": "Keel:type=..."}"#) {
            Ok(r) => r,
            Err(response) => return *response,
        };
    match state
        .registry
        .attributes_scoped(&request.name, may_forward(&headers))
        .await
    {
        Ok(attributes) => Json(json!({ "attributes": attributes })).into_response(),
        Err(e) => admin_error(&e),
    }
}

async fn no_such_endpoint(request: Request) -> Response {
    error_body(
        StatusCode::NOT_FOUND,
        WireError {
            kind: "protocol".into(),
            message: format!(
                "there is no admin API at {} {}; this endpoint serves GET /v1/ping and POST /v1/query, /v1/invoke, /v1/attribute, /v1/attributes",
                request.method(),
                clip(request.uri().path(), LOGGED_PATH_BYTES_MAX)
            ),
            ..WireError::default()
        },
        None,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(value: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(v) = value {
            h.insert(header::AUTHORIZATION, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn basic_credentials_are_parsed_exactly() {
        let cred = crate::Credential::new("admin", "pw:with:colons");
        assert_eq!(
            basic_credentials(&headers(Some(&cred.basic_header()))),
            Ok(("admin".to_string(), "pw:with:colons".to_string()))
        );
        assert_eq!(basic_credentials(&headers(None)), Err("no credential"));
        for bad in [
            "Bearer abc".to_string(),
            "Basic !!!notbase64".to_string(),
            "Basic".to_string(),
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode("no-colon")
            ),
        ] {
            assert_eq!(
                basic_credentials(&headers(Some(&bad))),
                Err("wrong credential"),
                "{bad}"
            );
        }
        // The scheme is case-insensitive (RFC 7617).
        let lower = cred.basic_header().replacen("Basic", "basic", 1);
        assert!(basic_credentials(&headers(Some(&lower))).is_ok());
    }
}
