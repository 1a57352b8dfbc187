//! Test admin objects and servers shared by the integration tests.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use keel_admin::{
    serve, AdminClient, AdminError, AdminObject, Credential, OpFuture, Registry, Value,
};
use keel_core::ObjectName;
use serde_json::{json, Map};

pub const PASSWORD: &str = "correct horse battery staple";

/// What the test endpoints check logins against: `admin` with [`PASSWORD`].
pub fn users() -> std::sync::Arc<keel_admin::Users> {
    std::sync::Arc::new(keel_admin::Users::admin_only(PASSWORD).unwrap())
}

pub fn credential() -> Credential {
    Credential {
        user: "admin".into(),
        password: PASSWORD.into(),
    }
}

/// `Keel:type=Server,name=P,node=n1,process=P` with attribute `state` and ops
/// `state`, `echo`, `fail`.
pub struct TestServer {
    pub process: String,
    pub state: String,
}

impl TestServer {
    pub fn new(process: &str) -> Arc<TestServer> {
        Arc::new(TestServer {
            process: process.into(),
            state: format!("running-{process}"),
        })
    }

    pub fn object_name(process: &str) -> String {
        format!("Keel:type=Server,name={process},node=n1,process={process}")
    }
}

impl AdminObject for TestServer {
    fn name(&self) -> ObjectName {
        ObjectName::new(&[
            ("type", "Server"),
            ("name", &self.process),
            ("node", "n1"),
            ("process", &self.process),
        ])
    }

    fn attributes(&self) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("state".into(), json!(self.state));
        m.insert("pid".into(), json!(std::process::id()));
        m
    }

    fn operations(&self) -> Vec<keel_admin::Op> {
        vec![
            keel_admin::Op::monitor("state", "current state"),
            keel_admin::Op::monitor("echo", "returns its arguments"),
            keel_admin::Op::monitor("fail", "always fails"),
        ]
    }

    fn invoke<'a>(&'a self, op: &'a str, args: Vec<Value>) -> OpFuture<'a> {
        Box::pin(async move {
            match op {
                "state" => Ok(json!(self.state)),
                "echo" => Ok(Value::Array(args)),
                "fail" => Err(AdminError::Failed {
                    name: self.name().to_string(),
                    op: op.into(),
                    why: "the test object always fails".into(),
                }),
                other => {
                    unreachable!("the registry lets only listed operations through, got {other}")
                }
            }
        })
    }
}

pub const ME_NAME: &str =
    "Keel:type=SIBMessagingEngine,name=node01.server1-bus1,bus=bus1,node=node01,process=server1";

/// A messaging engine that starts (optionally in FLUSH mode) and stops.
pub struct FakeMe {
    pub state: Mutex<&'static str>,
    pub start_modes: Mutex<Vec<String>>,
}

impl FakeMe {
    pub fn new() -> Arc<FakeMe> {
        Arc::new(FakeMe {
            state: Mutex::new("stopped"),
            start_modes: Mutex::new(Vec::new()),
        })
    }

    pub fn state(&self) -> &'static str {
        *self.state.lock().unwrap()
    }
}

impl AdminObject for FakeMe {
    fn name(&self) -> ObjectName {
        ObjectName::parse(ME_NAME).unwrap()
    }

    fn attributes(&self) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("state".into(), json!(self.state()));
        m.insert("messages".into(), json!(42));
        m
    }

    fn operations(&self) -> Vec<keel_admin::Op> {
        vec![
            keel_admin::Op::monitor("state", "stopped|starting|started|stopping"),
            keel_admin::Op::operator("start", "start [FLUSH]"),
            keel_admin::Op::operator("stop", "stop"),
        ]
    }

    fn invoke<'a>(&'a self, op: &'a str, args: Vec<Value>) -> OpFuture<'a> {
        Box::pin(async move {
            match op {
                "state" => Ok(json!(self.state())),
                "start" => {
                    let mode = match args.as_slice() {
                        [] => "NORMAL".to_string(),
                        [Value::String(m)] if m == "FLUSH" => m.clone(),
                        _ => {
                            return Err(AdminError::BadArguments {
                                name: ME_NAME.into(),
                                op: op.into(),
                                why: format!(
                                    "expected no argument or [\"FLUSH\"], got {}",
                                    Value::Array(args.clone())
                                ),
                            })
                        }
                    };
                    self.start_modes.lock().unwrap().push(mode);
                    *self.state.lock().unwrap() = "started";
                    Ok(Value::Null)
                }
                "stop" => {
                    *self.state.lock().unwrap() = "stopped";
                    Ok(Value::Null)
                }
                _ => unreachable!(),
            }
        })
    }
}

/// Serves `registry` on 127.0.0.1:0 inside the current runtime; drop or send on the returned
/// sender to stop it.
pub async fn start(
    registry: Arc<Registry>,
) -> (
    SocketAddr,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<std::io::Result<()>>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(serve(listener, registry, users(), async move {
        let _ = rx.await;
    }));
    (addr, tx, task)
}

pub fn client(addr: SocketAddr) -> AdminClient {
    AdminClient::new(addr, credential())
}

/// An address where nothing listens (bound, then released).
pub fn closed_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    addr
}

/// A server on its own runtime and threads, for the blocking console tests.
pub struct BackgroundServer {
    pub addr: SocketAddr,
    runtime: tokio::runtime::Runtime,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl BackgroundServer {
    pub fn start(registry: Arc<Registry>) -> BackgroundServer {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let (addr, stop, _task) = runtime.block_on(start(registry));
        BackgroundServer {
            addr,
            runtime,
            stop: Some(stop),
        }
    }
}

impl Drop for BackgroundServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = &self.runtime;
    }
}

/// A `Write` whose bytes the test can read afterwards.
#[derive(Clone, Default)]
pub struct Captured(pub Arc<Mutex<Vec<u8>>>);

impl Captured {
    pub fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
