//! The admin API end to end: a real `serve` on 127.0.0.1 and the real client.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{header, Request, StatusCode};
use hyper_util::rt::TokioIo;
use keel_admin::{AdminClient, AdminError, Credential, Delegate, Registry, Value};
use serde_json::json;

/// Sends one raw request (no client-side checks) and returns status, headers and JSON body.
async fn raw(
    addr: SocketAddr,
    path: &str,
    auth: Option<String>,
    body: Vec<u8>,
) -> (StatusCode, hyper::HeaderMap, Value) {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut req = Request::builder()
        .method(if body.is_empty() { "GET" } else { "POST" })
        .uri(path)
        .header(header::HOST, addr.to_string());
    if let Some(a) = auth {
        req = req.header(header::AUTHORIZATION, a);
    }
    let resp = sender
        .send_request(req.body(Full::new(Bytes::from(body))).unwrap())
        .await
        .unwrap();
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    let json = serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&bytes)));
    (parts.status, parts.headers, json)
}

fn basic(user: &str, password: &str) -> String {
    use base64::Engine as _;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

fn one_server_registry() -> Arc<Registry> {
    let r = Registry::new();
    r.register(TestServer::new("s1"));
    r
}

#[tokio::test]
async fn ping_answers_with_this_process_id() {
    let (addr, _stop, _task) = start(one_server_registry()).await;
    let answer = client(addr).ping().await.unwrap();
    assert_eq!(
        answer,
        json!({"ok": true, "pid": std::process::id(), "cell": "", "node": "", "process": ""})
    );
}

#[tokio::test]
async fn query_matches_by_pattern() {
    let (addr, _stop, _task) = start(one_server_registry()).await;
    let c = client(addr);
    assert_eq!(
        c.query("type=Server,*").await.unwrap(),
        [TestServer::object_name("s1")]
    );
    assert_eq!(
        c.query("Keel:type=Server,process=s?,*").await.unwrap(),
        [TestServer::object_name("s1")]
    );
    assert!(c.query("type=Nope,*").await.unwrap().is_empty());
    // Without `*` the key set must be exact.
    assert!(c.query("type=Server").await.unwrap().is_empty());
}

#[tokio::test]
async fn invoke_and_attributes_return_values() {
    let (addr, _stop, _task) = start(one_server_registry()).await;
    let c = client(addr);
    let name = TestServer::object_name("s1");
    assert_eq!(
        c.invoke(&name, "state", vec![]).await.unwrap(),
        json!("running-s1")
    );
    let args = vec![json!("FLUSH"), json!(3), json!({"deep": [1, 2]})];
    assert_eq!(
        c.invoke(&name, "echo", args.clone()).await.unwrap(),
        Value::Array(args)
    );
    assert_eq!(
        c.attribute(&name, "state").await.unwrap(),
        json!("running-s1")
    );
    let all = c.attributes(&name).await.unwrap();
    assert_eq!(all["state"], json!("running-s1"));
    assert_eq!(all["pid"], json!(std::process::id()));
    // Property order does not matter (JMX identity).
    let reordered = "Keel:process=s1,node=n1,name=s1,type=Server";
    assert_eq!(
        c.invoke(reordered, "state", vec![]).await.unwrap(),
        json!("running-s1")
    );
}

#[tokio::test]
async fn errors_come_back_as_the_same_variant_and_sentence() {
    let (addr, _stop, _task) = start(one_server_registry()).await;
    let c = client(addr);
    let name = TestServer::object_name("s1");

    match c.invoke(&name, "fly", vec![]).await {
        Err(e @ AdminError::UnknownOperation { .. }) => {
            let AdminError::UnknownOperation {
                ref known, ref op, ..
            } = e
            else {
                unreachable!()
            };
            assert_eq!(known, &["state", "echo", "fail"]);
            assert_eq!(op, "fly");
            assert_eq!(e.kind(), "unknown_operation");
            assert!(
                e.to_string()
                    .contains("its operations are: state, echo, fail"),
                "{e}"
            );
        }
        other => panic!("expected UnknownOperation, got {other:?}"),
    }
    match c.attribute(&name, "colour").await {
        Err(AdminError::UnknownAttribute { known, .. }) => assert_eq!(known, ["pid", "state"]),
        other => panic!("expected UnknownAttribute, got {other:?}"),
    }
    match c.invoke(&name, "fail", vec![]).await {
        Err(e @ AdminError::Failed { .. }) => {
            assert_eq!(
                e.to_string(),
                format!("operation `fail` of {name} failed: the test object always fails")
            );
        }
        other => panic!("expected Failed, got {other:?}"),
    }
    let missing = "Keel:type=Server,name=ghost,node=n1,process=ghost";
    match c.invoke(missing, "state", vec![]).await {
        Err(AdminError::NotFound { name }) => assert_eq!(name, missing),
        other => panic!("expected NotFound, got {other:?}"),
    }
    assert!(matches!(
        c.attributes(missing).await,
        Err(AdminError::NotFound { .. })
    ));
    assert!(matches!(
        c.invoke("Keel:type", "state", vec![]).await,
        Err(AdminError::BadName(_))
    ));
}

#[tokio::test]
async fn wrong_password_is_unauthorized() {
    let (addr, _stop, _task) = start(one_server_registry()).await;
    let wrong = AdminClient::new(
        addr,
        Credential {
            user: "admin".into(),
            password: "guess".into(),
        },
    );
    match wrong.query("*").await {
        Err(e @ AdminError::Unauthorized { .. }) => {
            assert!(e.to_string().contains(&addr.to_string()), "{e}");
            assert!(e.to_string().contains("secrets/admin-password"), "{e}");
        }
        other => panic!("expected Unauthorized, got {other:?}"),
    }
    let wrong_user = AdminClient::new(
        addr,
        Credential {
            user: "root".into(),
            password: PASSWORD.into(),
        },
    );
    assert!(matches!(
        wrong_user.ping().await,
        Err(AdminError::Unauthorized { .. })
    ));
}

#[tokio::test]
async fn requests_without_credential_get_401_and_a_challenge() {
    let (addr, _stop, _task) = start(one_server_registry()).await;
    for path in ["/v1/ping", "/v1/nowhere"] {
        let (status, headers, body) = raw(addr, path, None, Vec::new()).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}");
        assert_eq!(headers[header::WWW_AUTHENTICATE], "Basic realm=\"keel\"");
        assert_eq!(body["error"]["kind"], "unauthorized");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("no credential"),
            "{body}"
        );
    }
    let (status, _, body) = raw(addr, "/v1/ping", Some(basic("admin", "nope")), Vec::new()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("wrong user or password"),
        "{body}"
    );
    // And the right one passes.
    let (status, _, body) = raw(addr, "/v1/ping", Some(basic("admin", PASSWORD)), Vec::new()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["ok"], true);
}

#[tokio::test]
async fn malformed_and_oversized_requests_get_json_errors() {
    let (addr, _stop, _task) = start(one_server_registry()).await;
    let auth = || Some(basic("admin", PASSWORD));

    let (status, _, body) = raw(addr, "/v1/invoke", auth(), b"{not json".to_vec()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"]["kind"], "protocol");

    let (status, _, body) = raw(
        addr,
        "/v1/invoke",
        auth(),
        br#"{"name": "Keel:type", "op": "x"}"#.to_vec(),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"]["kind"], "bad_name");

    let huge =
        serde_json::to_vec(&json!({"pattern": "x".repeat(keel_admin::MAX_REQUEST_BYTES + 1)}))
            .unwrap();
    let (status, _, body) = raw(addr, "/v1/query", auth(), huge).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(body["error"]["kind"], "protocol");

    let (status, _, body) = raw(addr, "/v1/nowhere", auth(), Vec::new()).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("/v1/query"),
        "{body}"
    );

    // The client refuses an oversized call itself, naming the object and operation.
    let name = TestServer::object_name("s1");
    let big = vec![json!("y".repeat(keel_admin::MAX_REQUEST_BYTES))];
    assert!(matches!(
        client(addr).invoke(&name, "echo", big).await,
        Err(AdminError::BadArguments { .. })
    ));
}

#[tokio::test]
async fn closed_port_is_unreachable_at_once() {
    let addr = closed_addr();
    let started = Instant::now();
    match client(addr).ping().await {
        Err(e @ AdminError::Unreachable { .. }) => {
            assert!(e.to_string().contains(&addr.to_string()), "{e}")
        }
        other => panic!("expected Unreachable, got {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
}

/// Accepts connections and never answers: a hung process.
async fn hung_endpoint() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    addr
}

#[tokio::test]
async fn a_hung_process_times_out_within_the_bound() {
    let addr = hung_endpoint().await;
    let started = Instant::now();
    match client(addr).with_timeout_ms(300).query("*").await {
        Err(AdminError::Timeout { timeout_ms, .. }) => assert_eq!(timeout_ms, 300),
        other => panic!("expected Timeout, got {other:?}"),
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(300) && elapsed < Duration::from_secs(2),
        "took {elapsed:?}"
    );
}

#[tokio::test]
async fn shutdown_stops_serving() {
    let (addr, stop, task) = start(one_server_registry()).await;
    client(addr).ping().await.unwrap();
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("serve returns after shutdown")
        .unwrap()
        .unwrap();
    assert!(matches!(
        client(addr).ping().await,
        Err(AdminError::Unreachable { .. })
    ));
}

struct Peers(Vec<(String, AdminClient)>);

impl Delegate for Peers {
    fn peers(&self) -> Vec<(String, AdminClient)> {
        self.0.clone()
    }
}

#[tokio::test]
async fn a_delegate_fans_queries_out_and_forwards_calls_by_process() {
    let peer_registry = Registry::new();
    peer_registry.register(TestServer::new("s2"));
    let (peer_addr, _peer_stop, _peer_task) = start(peer_registry.clone()).await;

    let agent_registry = Registry::new();
    agent_registry.register(TestServer::new("s1"));
    let dead = closed_addr();
    let hung = hung_endpoint().await;
    agent_registry.set_delegate(Arc::new(Peers(vec![
        ("s2".into(), client(peer_addr)),
        ("s3".into(), client(dead)),
        ("s4".into(), client(hung)),
    ])));
    // A loop (the peer delegating back to the agent) must not make calls circle.
    let (agent_addr, _agent_stop, _agent_task) = start(agent_registry.clone()).await;
    peer_registry.set_delegate(Arc::new(Peers(vec![("s1".into(), client(agent_addr))])));

    let c = client(agent_addr);
    let started = Instant::now();
    let names = c.query("type=Server,*").await.unwrap();
    let elapsed = started.elapsed();
    assert_eq!(
        names,
        [TestServer::object_name("s1"), TestServer::object_name("s2")]
    );
    // The hung peer costs at most its 2000 ms bound (plus slack), not the client's 30 s.
    assert!(
        elapsed < Duration::from_millis(keel_admin::PEER_QUERY_TIMEOUT_MS + 1_500),
        "took {elapsed:?}"
    );
    assert!(
        elapsed >= Duration::from_millis(keel_admin::PEER_QUERY_TIMEOUT_MS),
        "the hung peer was not asked? {elapsed:?}"
    );

    let s2 = TestServer::object_name("s2");
    assert_eq!(
        c.invoke(&s2, "state", vec![]).await.unwrap(),
        json!("running-s2")
    );
    assert_eq!(
        c.invoke(&s2, "echo", vec![json!(7)]).await.unwrap(),
        json!([7])
    );
    assert_eq!(
        c.attribute(&s2, "state").await.unwrap(),
        json!("running-s2")
    );
    assert_eq!(
        c.attributes(&s2).await.unwrap()["state"],
        json!("running-s2")
    );
    match c.invoke(&s2, "fly", vec![]).await {
        Err(AdminError::UnknownOperation { name, .. }) => assert_eq!(name, s2),
        other => panic!("expected the peer's UnknownOperation, got {other:?}"),
    }

    // A peer that is down: the caller learns which address failed.
    match c
        .invoke(&TestServer::object_name("s3"), "state", vec![])
        .await
    {
        Err(AdminError::Unreachable { addr, .. }) => assert_eq!(addr, dead.to_string()),
        other => panic!("expected Unreachable, got {other:?}"),
    }
    // No peer of that name and no local object.
    assert!(matches!(
        c.invoke(&TestServer::object_name("s9"), "state", vec![])
            .await,
        Err(AdminError::NotFound { .. })
    ));

    // The registry API itself (used in-process by the node agent) delegates the same way.
    assert_eq!(
        agent_registry.invoke(&s2, "state", vec![]).await.unwrap(),
        json!("running-s2")
    );
    // The peer answers for itself only: it does not forward what it was forwarded... but a
    // direct query on it delegates back to the agent (s1) and skips the unknown.
    let from_peer = client(peer_addr).query("type=Server,*").await.unwrap();
    assert_eq!(
        from_peer,
        [TestServer::object_name("s1"), TestServer::object_name("s2")]
    );
}
