//! The admin endpoint (axum). Every request is authenticated before anything else runs.

use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::WireError;
use crate::{AdminError, Credential, Registry, FORWARDED_HEADER, MAX_REQUEST_BYTES};

/// Requests served at once; more are answered 503 at once instead of queueing without bound.
const MAX_CONCURRENT_REQUESTS: usize = 256;
/// After `shutdown` completes, requests in flight get this long to finish before `serve`
/// returns anyway (a hung operation must not keep a stopping process alive).
const SHUTDOWN_GRACE_MS: u64 = 5_000;

#[derive(Clone)]
struct ServerState {
    registry: Arc<Registry>,
    credential: Arc<Credential>,
    inflight: Arc<tokio::sync::Semaphore>,
}

/// Serves the admin API on `listener` until `shutdown` completes. Binds nothing itself: the
/// caller binds, so it reports "port in use" in its own words (with the config key to change).
pub async fn serve(
    listener: tokio::net::TcpListener,
    registry: Arc<Registry>,
    credential: Credential,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let state = ServerState {
        registry,
        credential: Arc::new(credential),
        inflight: Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_REQUESTS)),
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

    let (stopping_tx, mut stopping_rx) = tokio::sync::watch::channel(false);
    let signal = async move {
        shutdown.await;
        let _ = stopping_tx.send(true);
    };
    let server = axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(signal)
    .into_future();
    let grace = async move {
        if stopping_rx.wait_for(|stopping| *stopping).await.is_err() {
            // The signal future was dropped: only the server branch can end the select.
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(Duration::from_millis(SHUTDOWN_GRACE_MS)).await;
    };
    tokio::select! {
        result = server => result,
        () = grace => {
            tracing::warn!("admin endpoint stopped with requests still running after {SHUTDOWN_GRACE_MS} ms");
            Ok(())
        }
    }
}

/// Authentication and admission, in front of every route (the fallback included).
async fn guard(State(state): State<ServerState>, request: Request, next: Next) -> Response {
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| addr.to_string())
        .unwrap_or_else(|| "an unknown peer".to_string());
    if let Err(why) = check_credential(request.headers(), &state.credential) {
        keel_core::emit!(
            keel_core::catalog::ADMN0003W,
            method = request.method(),
            path = request.uri().path(),
            peer = peer,
            why = why
        );
        let mut response = error_body(
            StatusCode::UNAUTHORIZED,
            WireError {
                kind: "unauthorized".into(),
                message: format!("the admin request was refused: {why}; send the profile's admin credential (HTTP Basic, user `admin`, password in secrets/admin-password)"),
                ..WireError::default()
            },
        );
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"keel\""),
        );
        return response;
    }
    let Ok(_permit) = state.inflight.clone().try_acquire_owned() else {
        return error_body(
            StatusCode::SERVICE_UNAVAILABLE,
            WireError {
                kind: "busy".into(),
                message: format!("the admin endpoint is already serving {MAX_CONCURRENT_REQUESTS} requests; retry shortly"),
                ..WireError::default()
            },
        );
    };
    next.run(request).await
}

/// `Ok` when the request carries exactly the configured credential; else why not, for ADMN0003W.
fn check_credential(headers: &HeaderMap, credential: &Credential) -> Result<(), &'static str> {
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
    let (user, password) = (&decoded[..split], &decoded[split + 1..]);
    // Both halves are compared in full whatever the first gives, so timing tells nothing.
    let user_ok = constant_time_eq(user, credential.user.as_bytes());
    let password_ok = constant_time_eq(password, credential.password.as_bytes());
    if user_ok & password_ok {
        Ok(())
    } else {
        Err(wrong)
    }
}

/// Compares in time that depends only on the lengths, never on where the bytes differ.
fn constant_time_eq(given: &[u8], expected: &[u8]) -> bool {
    let mut diff = u8::from(given.len() != expected.len());
    for i in 0..given.len().max(expected.len()) {
        let a = given.get(i).copied().unwrap_or(0);
        let b = expected.get(i).copied().unwrap_or(0xff);
        diff |= a ^ b;
    }
    std::hint::black_box(diff) == 0
}

fn error_body(status: StatusCode, error: WireError) -> Response {
    (status, Json(json!({ "error": error }))).into_response()
}

fn admin_error(e: &AdminError) -> Response {
    let status = StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    error_body(status, e.to_wire())
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
        ))
    })
}

/// Forwarded requests come from another registry: answer from local objects only.
fn may_forward(headers: &HeaderMap) -> bool {
    !headers.contains_key(FORWARDED_HEADER)
}

async fn ping() -> Json<Value> {
    Json(json!({ "ok": true, "pid": std::process::id() }))
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
                request.uri().path()
            ),
            ..WireError::default()
        },
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
    fn credentials_are_checked_exactly() {
        let cred = Credential::new("admin", "pw:with:colons");
        assert_eq!(
            check_credential(&headers(Some(&cred.basic_header())), &cred),
            Ok(())
        );
        assert_eq!(
            check_credential(&headers(None), &cred),
            Err("no credential")
        );
        for bad in [
            Credential::new("admin", "pw:with:colon").basic_header(),
            Credential::new("admin", "pw:with:colonss").basic_header(),
            Credential::new("Admin", "pw:with:colons").basic_header(),
            Credential::new("", "").basic_header(),
            "Bearer abc".to_string(),
            "Basic !!!notbase64".to_string(),
            "Basic".to_string(),
        ] {
            assert_eq!(
                check_credential(&headers(Some(&bad)), &cred),
                Err("wrong credential"),
                "{bad}"
            );
        }
        // The scheme is case-insensitive (RFC 7617).
        let lower = cred.basic_header().replacen("Basic", "basic", 1);
        assert_eq!(check_credential(&headers(Some(&lower)), &cred), Ok(()));
    }

    #[test]
    fn constant_time_eq_is_equality() {
        assert!(constant_time_eq(b"", b""));
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(!constant_time_eq(b"ab", b"abc"));
        // A prefix padded with what the padding byte would be must still differ.
        assert!(!constant_time_eq(b"ab\xff", b"ab"));
        assert!(!constant_time_eq(b"", b"\xff"));
    }
}
