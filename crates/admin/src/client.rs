//! The admin client: one HTTP/1.1 connection per call, the whole call bounded by a timeout.
//!
//! One connection per call keeps the client stateless (no pool to go stale when a server
//! restarts, which is exactly when operators use it); admin calls are rare enough that the
//! handshake cost does not matter.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::{header, Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use keel_core::{ObjectName, ObjectPattern};
use serde_json::{json, Map, Value};

use crate::error::{CallContext, WireError};
use crate::{
    AdminError, FORWARDED_HEADER, MAX_REQUEST_BYTES, MAX_RESPONSE_BYTES, ON_BEHALF_HEADER,
};

/// Default bound on one whole call (connect, request, answer).
pub const DEFAULT_TIMEOUT_MS: u64 = 30_000;

/// The admin credential (HTTP Basic). `Debug` never shows the password, so a credential can sit
/// in structs that get logged.
#[derive(Clone)]
pub struct Credential {
    pub user: String,
    pub password: String,
}

impl Credential {
    /// Convenience constructor (the fields are public too).
    pub fn new(user: impl Into<String>, password: impl Into<String>) -> Credential {
        Credential {
            user: user.into(),
            password: password.into(),
        }
    }

    /// The `Authorization` header value.
    pub(crate) fn basic_header(&self) -> String {
        let token = base64::engine::general_purpose::STANDARD
            .encode(format!("{}:{}", self.user, self.password));
        format!("Basic {token}")
    }
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credential")
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// A call's byte stream: plain TCP, or TLS over it.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// Client of one admin endpoint (a server or a node agent). Cheap to clone.
#[derive(Clone, Debug)]
pub struct AdminClient {
    addr: SocketAddr,
    credential: Credential,
    timeout_ms: u64,
    /// Set when a registry forwards a call: the peer must answer from its own objects only.
    forwarded: bool,
    /// The user a forwarded call acts for: the peer checks that user's roles (it trusts the
    /// header only from an Administrator, the forwarder's own credential).
    on_behalf_of: Option<String>,
    /// HTTPS, trusting what this configuration trusts (the cell's CA); the endpoint's
    /// certificate must name the address called. None: plain HTTP.
    tls: Option<Arc<tokio_rustls::rustls::ClientConfig>>,
}

#[derive(Clone, Copy)]
enum Endpoint {
    Ping,
    Query,
    Invoke,
    Attribute,
    Attributes,
}

impl Endpoint {
    fn path(&self) -> &'static str {
        match self {
            Endpoint::Ping => "/v1/ping",
            Endpoint::Query => "/v1/query",
            Endpoint::Invoke => "/v1/invoke",
            Endpoint::Attribute => "/v1/attribute",
            Endpoint::Attributes => "/v1/attributes",
        }
    }
}

impl AdminClient {
    /// A client of the endpoint at `addr`; every call is bounded by [`DEFAULT_TIMEOUT_MS`]
    /// unless [`AdminClient::with_timeout_ms`] says otherwise. Connects only when called.
    pub fn new(addr: SocketAddr, credential: Credential) -> AdminClient {
        AdminClient {
            addr,
            credential,
            timeout_ms: DEFAULT_TIMEOUT_MS,
            forwarded: false,
            on_behalf_of: None,
            tls: None,
        }
    }

    /// Calls over HTTPS, trusting `config`'s roots (`keel_tls::Pki::client_config`: the cell's
    /// CA), checking that the endpoint's certificate names the address called.
    pub fn with_tls(mut self, config: Arc<tokio_rustls::rustls::ClientConfig>) -> AdminClient {
        self.tls = Some(config);
        self
    }

    /// Whether calls go over HTTPS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Bounds every call of this client (connect, request and answer together).
    pub fn with_timeout_ms(mut self, timeout_ms: u64) -> AdminClient {
        assert!(timeout_ms > 0, "an admin call needs a positive timeout");
        self.timeout_ms = timeout_ms;
        self
    }

    /// The endpoint this client talks to (for messages naming it).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The bound on each call.
    pub fn timeout_ms(&self) -> u64 {
        self.timeout_ms
    }

    /// A copy for forwarding on behalf of a registry: marked so the peer does not forward
    /// again, and bounded by at most `timeout_ms`.
    pub(crate) fn forwarding(&self, timeout_ms: u64) -> AdminClient {
        AdminClient {
            forwarded: true,
            on_behalf_of: None,
            timeout_ms: self.timeout_ms.min(timeout_ms),
            ..self.clone()
        }
    }

    /// The same client, acting for `user` (a forwarded call keeps the caller's roles).
    pub(crate) fn on_behalf_of(mut self, user: &str) -> AdminClient {
        self.on_behalf_of = Some(user.to_string());
        self
    }

    /// `{"ok": true, "pid": N}` when a Keel process answers and accepts the credential.
    pub async fn ping(&self) -> Result<Value, AdminError> {
        let call = CallContext {
            name: "admin endpoint",
            op: "ping",
            is_pattern: false,
        };
        let answer = self.call(Endpoint::Ping, None, &call).await?;
        if answer.get("ok") != Some(&Value::Bool(true)) {
            return Err(self.protocol(format!(
                "ping answered {answer} instead of {{\"ok\": true, ...}}"
            )));
        }
        Ok(answer)
    }

    /// Names matching `pattern` (`type=Server,*`), sorted; on a node agent, its servers' too.
    pub async fn query(&self, pattern: &str) -> Result<Vec<String>, AdminError> {
        // Checked here too: a malformed pattern is reported without a round trip.
        ObjectPattern::parse(pattern)?;
        let call = CallContext {
            name: pattern,
            op: "query",
            is_pattern: true,
        };
        let mut answer = self
            .call(Endpoint::Query, Some(json!({ "pattern": pattern })), &call)
            .await?;
        match answer.get_mut("names").map(Value::take) {
            Some(names) => serde_json::from_value(names).map_err(|e| {
                self.protocol(format!(
                    "query answered names that are not a list of strings: {e}"
                ))
            }),
            None => Err(self.protocol("query answer has no `names`".to_string())),
        }
    }

    pub async fn invoke(
        &self,
        name: &str,
        op: &str,
        args: Vec<Value>,
    ) -> Result<Value, AdminError> {
        ObjectName::parse(name)?;
        let call = CallContext {
            name,
            op,
            is_pattern: false,
        };
        let mut answer = self
            .call(
                Endpoint::Invoke,
                Some(json!({ "name": name, "op": op, "args": args })),
                &call,
            )
            .await?;
        answer.get_mut("result").map(Value::take).ok_or_else(|| {
            self.protocol(format!(
                "invoke of `{op}` on {name} answered without `result`"
            ))
        })
    }

    /// One attribute of object `name`.
    pub async fn attribute(&self, name: &str, attribute: &str) -> Result<Value, AdminError> {
        ObjectName::parse(name)?;
        let call = CallContext {
            name,
            op: "getAttribute",
            is_pattern: false,
        };
        let mut answer = self
            .call(
                Endpoint::Attribute,
                Some(json!({ "name": name, "attribute": attribute })),
                &call,
            )
            .await?;
        answer.get_mut("value").map(Value::take).ok_or_else(|| {
            self.protocol(format!(
                "attribute `{attribute}` of {name} answered without `value`"
            ))
        })
    }

    /// Every attribute of object `name`.
    pub async fn attributes(&self, name: &str) -> Result<Map<String, Value>, AdminError> {
        ObjectName::parse(name)?;
        let call = CallContext {
            name,
            op: "getAttributes",
            is_pattern: false,
        };
        let mut answer = self
            .call(Endpoint::Attributes, Some(json!({ "name": name })), &call)
            .await?;
        match answer.get_mut("attributes").map(Value::take) {
            Some(Value::Object(map)) => Ok(map),
            _ => Err(self.protocol(format!(
                "attributes of {name} answered without an `attributes` object"
            ))),
        }
    }

    fn protocol(&self, why: String) -> AdminError {
        AdminError::Protocol {
            addr: self.addr.to_string(),
            why,
        }
    }

    fn unreachable(&self, why: String) -> AdminError {
        AdminError::Unreachable {
            addr: self.addr.to_string(),
            why,
        }
    }

    /// One whole call, bounded by `timeout_ms`.
    async fn call(
        &self,
        endpoint: Endpoint,
        body: Option<Value>,
        call: &CallContext<'_>,
    ) -> Result<Value, AdminError> {
        let body = match body {
            Some(v) => serde_json::to_vec(&v).expect("serde_json::Value always serializes"),
            None => Vec::new(),
        };
        if body.len() > MAX_REQUEST_BYTES {
            return Err(AdminError::BadArguments {
                name: call.name.to_string(),
                op: call.op.to_string(),
                why: format!(
                    "the request is {} bytes and the admin API takes at most {MAX_REQUEST_BYTES} bytes; pass a reference (a file or destination name) instead of the data",
                    body.len()
                ),
            });
        }
        let bounded = tokio::time::timeout(
            Duration::from_millis(self.timeout_ms),
            self.exchange(endpoint, body),
        );
        let (status, bytes) = match bounded.await {
            Ok(answer) => answer?,
            Err(_elapsed) => {
                return Err(AdminError::Timeout {
                    addr: self.addr.to_string(),
                    timeout_ms: self.timeout_ms,
                })
            }
        };
        if status == StatusCode::OK {
            return serde_json::from_slice(&bytes).map_err(|e| {
                self.protocol(format!(
                    "{} answered a body that is not JSON: {e}",
                    endpoint.path()
                ))
            });
        }
        if status == StatusCode::UNAUTHORIZED {
            return Err(AdminError::Unauthorized {
                addr: self.addr.to_string(),
                answered_by: answered_by(&bytes),
            });
        }
        #[derive(serde::Deserialize)]
        struct ErrorBody {
            error: WireError,
        }
        match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(b) => Err(AdminError::from_wire(b.error, call)),
            Err(_) => {
                let snippet: String = String::from_utf8_lossy(&bytes).chars().take(200).collect();
                Err(self.protocol(format!(
                    "{} answered HTTP {status}: {snippet}",
                    endpoint.path()
                )))
            }
        }
    }

    /// Connect, send, read the whole answer (at most [`MAX_RESPONSE_BYTES`]).
    async fn exchange(
        &self,
        endpoint: Endpoint,
        body: Vec<u8>,
    ) -> Result<(StatusCode, Bytes), AdminError> {
        let stream = tokio::net::TcpStream::connect(self.addr)
            .await
            .map_err(|e| self.unreachable(e.to_string()))?;
        // Small requests: send them at once rather than waiting for Nagle.
        let _ = stream.set_nodelay(true);
        let stream: Box<dyn Io> = match &self.tls {
            None => Box::new(stream),
            Some(config) => {
                let name =
                    tokio_rustls::rustls::pki_types::ServerName::IpAddress(self.addr.ip().into());
                let tls = tokio_rustls::TlsConnector::from(config.clone())
                    .connect(name, stream)
                    .await
                    .map_err(|e| self.unreachable(format!("TLS handshake failed: {e}")))?;
                Box::new(tls)
            }
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| self.unreachable(format!("HTTP handshake failed: {e}")))?;

        let method = if matches!(endpoint, Endpoint::Ping) {
            Method::GET
        } else {
            Method::POST
        };
        let mut request = Request::builder()
            .method(method)
            .uri(endpoint.path())
            .header(header::HOST, self.addr.to_string())
            .header(header::AUTHORIZATION, self.credential.basic_header())
            .header(header::CONNECTION, "close");
        if !body.is_empty() {
            request = request.header(header::CONTENT_TYPE, "application/json");
        }
        if self.forwarded {
            request = request.header(FORWARDED_HEADER, "1");
        }
        if let Some(user) = &self.on_behalf_of {
            request = request.header(ON_BEHALF_HEADER, user.as_str());
        }
        let request = request
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| self.protocol(format!("could not build the request: {e}")))?;

        let exchange = async {
            let response = sender.send_request(request).await.map_err(|e| {
                if e.is_parse() || e.is_parse_status() {
                    self.protocol(format!("the answer is not HTTP/1.1: {e}"))
                } else {
                    self.unreachable(format!("the connection failed before an answer: {e}"))
                }
            })?;
            let status = response.status();
            let collected = Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
                .collect()
                .await
                .map_err(|e| {
                    if e.is::<http_body_util::LengthLimitError>() {
                        self.protocol(format!(
                            "the answer is larger than {MAX_RESPONSE_BYTES} bytes"
                        ))
                    } else {
                        self.unreachable(format!(
                            "the connection failed while reading the answer: {e}"
                        ))
                    }
                })?;
            Ok::<_, AdminError>((status, collected.to_bytes()))
        };

        // Drive the connection and the exchange together on this task (no spawned task can
        // outlive the call's timeout). The connection may finish first once the server closes
        // it after answering; the exchange still holds the buffered answer then.
        let mut conn = std::pin::pin!(conn);
        let mut exchange = std::pin::pin!(exchange);
        let mut conn_done = false;
        loop {
            tokio::select! {
                answer = &mut exchange => return answer,
                result = &mut conn, if !conn_done => {
                    conn_done = true;
                    if let Err(e) = result {
                        // The exchange will report the failure too; keep waiting for it so the
                        // operator sees the most specific sentence.
                        tracing::debug!(addr = %self.addr, "admin connection ended: {e}");
                    }
                }
            }
        }
    }
}

/// `process P of node N, cell C` from a refusal's `answered_by`, or empty.
fn answered_by(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Refusal {
        answered_by: Option<crate::Identity>,
    }
    match serde_json::from_slice::<Refusal>(body) {
        Ok(Refusal {
            answered_by: Some(who),
        }) if !who.process.is_empty() => {
            format!(
                "process {} of node {}, cell {}",
                who.process, who.node, who.cell
            )
        }
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_password() {
        let c = Credential::new("admin", "s3cret-pa55");
        let client = AdminClient::new("127.0.0.1:1".parse().unwrap(), c.clone());
        for text in [format!("{c:?}"), format!("{client:?}")] {
            assert!(!text.contains("s3cret-pa55"), "{text}");
            assert!(text.contains("admin"), "{text}");
        }
    }

    #[test]
    fn basic_header_is_rfc7617() {
        // "Aladdin:open sesame" is the RFC 7617 example.
        assert_eq!(
            Credential::new("Aladdin", "open sesame").basic_header(),
            "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ=="
        );
    }

    #[test]
    fn forwarding_never_lengthens_the_timeout() {
        let c = AdminClient::new("127.0.0.1:1".parse().unwrap(), Credential::new("a", "b"))
            .with_timeout_ms(500);
        assert_eq!(c.forwarding(2_000).timeout_ms(), 500);
        assert_eq!(c.forwarding(100).timeout_ms(), 100);
        assert!(c.forwarding(100).forwarded && !c.forwarded);
    }

    #[tokio::test]
    async fn malformed_names_fail_before_any_connection() {
        // Port 1 on localhost: nothing listens, so only a local check can give BadName.
        let c = AdminClient::new("127.0.0.1:1".parse().unwrap(), Credential::new("a", "b"));
        assert!(matches!(c.query("type").await, Err(AdminError::BadName(_))));
        assert!(matches!(
            c.invoke("type=Server,*", "x", vec![]).await,
            Err(AdminError::BadName(_))
        ));
    }
}
