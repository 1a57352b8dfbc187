//! Users and roles (DESIGN §10), tried as operators and clients would: `keel user` and
//! `keel role` on a running cell, `keel` commands run as users with one role each
//! (`KEEL_USER`/`KEEL_PASSWORD`), AMQP clients (fe2o3 and python-qpid-proton) with and without
//! bus roles, a password changed and a user removed while a client is connected, and a profile
//! made before users existed.

mod common;
#[path = "common/numbers.rs"]
mod numbers;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{Env, Run};
use fe2o3_amqp::types::messaging::{Body, Outcome};
use fe2o3_amqp::types::primitives::Value;
use fe2o3_amqp::{Receiver, Sender, Session};
use numbers::numbered;

const ME: &str = "node01.server1-bus1";

/// Runs `keel` as `user` (`KEEL_USER`/`KEEL_PASSWORD`).
fn keel_as(env: &Env, user: &str, password: &str, args: &[&str]) -> Run {
    let mut c = env.cmd(args);
    c.env("KEEL_USER", user).env("KEEL_PASSWORD", password);
    Run::of(c.output().unwrap())
}

/// Runs `keel` with `PW` in the environment (the password of `user add|passwd`).
fn keel_pw(env: &Env, password: &str, args: &[&str]) -> String {
    let mut c = env.cmd(args);
    c.env("PW", password);
    let r = Run::of(c.output().unwrap());
    assert_eq!(r.code, 0, "`keel {}` failed: {}", args.join(" "), r.stderr);
    r.stdout
}

fn add_user(env: &Env, name: &str, password: &str, roles: &[&str]) {
    let mut args = vec!["user", "add", name, "--password-env", "PW"];
    for r in roles {
        args.extend(["--role", r]);
    }
    keel_pw(env, password, &args);
}

/// `keel role grant ROLE --user USER --bus bus1 [--destination DEST]`.
fn grant(env: &Env, role: &str, user: &str, destination: Option<&str>) {
    let mut args = vec!["role", "grant", role, "--user", user, "--bus", "bus1"];
    if let Some(d) = destination {
        args.extend(["--destination", d]);
    }
    env.ok(&args);
}

fn started() -> Env {
    let env = Env::new();
    env.ok(&["destination", "create", "bus1", "q1", "--type", "queue"]);
    env.ok(&["destination", "create", "bus1", "other", "--type", "queue"]);
    env.ok(&["node", "start"]);
    env.ok(&["server", "start", "server1"]);
    env
}

#[test]
fn administrative_roles_are_checked_on_every_operation_class() {
    let env = started();
    add_user(&env, "mon", "monitor-pw", &["Monitor"]);
    add_user(&env, "op", "operator-pw", &["Operator"]);
    add_user(&env, "conf", "configurator-pw", &["Configurator"]);
    add_user(&env, "busonly", "busonly-pw", &[]);
    // The processes read users again within a second of the change.
    std::thread::sleep(Duration::from_millis(1500));

    // The node agent calls its servers over mutual TLS (its certificate, the cell's CA).
    let status: serde_json::Value =
        serde_json::from_str(&env.ok(&["server", "status", "server1", "--json"])).unwrap();
    let status = if status.is_array() {
        status[0].clone()
    } else {
        status
    };
    assert_eq!(status["admin_transport"], "mutual TLS", "{status}");

    // Monitor reads, on the node agent and (forwarded) on the server.
    let r = keel_as(&env, "mon", "monitor-pw", &["server", "status", "server1"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = keel_as(&env, "mon", "monitor-pw", &["me", "state", ME]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("started"), "{}", r.stdout);
    // ... and may not act: on the node agent's own object, and on the server's engine through
    // the node agent (the server checks the forwarded caller's role).
    let r = keel_as(&env, "mon", "monitor-pw", &["server", "stop", "server1"]);
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains(
            "user \"mon\" does not hold the Operator role needed for operation `stopProcess`"
        ),
        "{}",
        r.stderr
    );
    let r = keel_as(&env, "mon", "monitor-pw", &["me", "stop", ME]);
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains("does not hold the Operator role needed for operation `stop` of Keel:type=SIBMessagingEngine"),
        "{}",
        r.stderr
    );
    // The console goes through the same check.
    let engine =
        format!("Keel:type=SIBMessagingEngine,name={ME},bus=bus1,node=node01,process=server1");
    let r = keel_as(
        &env,
        "mon",
        "monitor-pw",
        &["admin", "invoke", &engine, "stop"],
    );
    assert!(
        r.code != 0 && r.stderr.contains("Operator role"),
        "{}",
        r.stderr
    );
    // A Configurator changes configuration (sync) but does not run the cell.
    let r = keel_as(&env, "conf", "configurator-pw", &["config", "sync"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = keel_as(&env, "conf", "configurator-pw", &["me", "stop", ME]);
    assert!(
        r.code != 0 && r.stderr.contains("Operator role"),
        "{}",
        r.stderr
    );
    let r = keel_as(&env, "op", "operator-pw", &["config", "sync"]);
    assert!(
        r.code != 0 && r.stderr.contains("Configurator role"),
        "{}",
        r.stderr
    );
    // An Operator stops and starts the engine.
    let r = keel_as(&env, "op", "operator-pw", &["me", "stop", ME]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = keel_as(&env, "op", "operator-pw", &["me", "start", ME]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    // A user without administrative roles reads nothing; a wrong password is a 401.
    let r = keel_as(
        &env,
        "busonly",
        "busonly-pw",
        &["server", "status", "server1"],
    );
    assert!(
        r.code != 0 && r.stderr.contains("Monitor role needed for the admin API"),
        "{}",
        r.stderr
    );
    let r = keel_as(
        &env,
        "mon",
        "wrong-password",
        &["server", "status", "server1"],
    );
    assert!(r.code != 0 && r.stderr.contains("refused"), "{}", r.stderr);

    // On the wire: 403 for a forbidden operation, 401 for a wrong password.
    let port = env.base_port;
    let body = format!(r#"{{"name":"{engine}","op":"stop","args":[]}}"#);
    let req = |user: &str, pw: &str| {
        let token = common::base64(&format!("{user}:{pw}"));
        format!(
            "POST /v1/invoke HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    };
    assert_eq!(common::http_status(port, &req("mon", "monitor-pw")), 403);
    assert_eq!(common::http_status(port, &req("mon", "monitor-pX")), 401);

    // Only verifiers are kept: the configuration and `user list` never show a password.
    let file = std::fs::read_to_string(env.profile.join("config/users/mon.toml")).unwrap();
    assert!(
        file.contains("$argon2id$") && file.contains("SCRAM-SHA-256$"),
        "{file}"
    );
    assert!(!file.contains("monitor-pw"));
    let list = env.ok(&["user", "list", "--json"]);
    assert!(
        !list.contains("argon2") && !list.contains("monitor-pw"),
        "{list}"
    );
    let users: serde_json::Value = serde_json::from_str(&list).unwrap();
    let names: Vec<&str> = users
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["admin", "busonly", "conf", "mon", "op"]);
    // The admin password changes while the node agent runs: its calls to the servers do not
    // depend on it (mutual TLS, its certificate), and `keel` logs in with the new one.
    keel_pw(
        &env,
        "a-new-admin-password",
        &["user", "passwd", "admin", "--password-env", "PW"],
    );
    assert_eq!(env.admin_password(), "a-new-admin-password");
    std::thread::sleep(Duration::from_millis(1500));
    // Through the node agent, which forwards to the server.
    let state = env.ok(&["admin", "invoke", &engine, "state"]);
    assert!(state.contains("started"), "{state}");
    let names = env.ok(&["admin", "query", "type=SIBMessagingEngine,*"]);
    assert!(
        names.contains(ME),
        "the node agent's fan-out reached the server: {names}"
    );
    // The last Administrator cannot be removed or demoted.
    let e = env.fails(&["user", "remove", "admin"]);
    assert!(e.contains("last Administrator"), "{e}");
    let e = env.fails(&["role", "revoke", "Administrator", "--user", "admin"]);
    assert!(e.contains("last Administrator"), "{e}");
    env.ok(&["node", "stop", "--stop-servers"]);
}

async fn connect(
    port: u16,
    user: &str,
    password: &str,
) -> Result<fe2o3_amqp::connection::ConnectionHandle<()>, String> {
    fe2o3_amqp::connection::Connection::builder()
        .container_id("keel-users-test")
        .sasl_profile(fe2o3_amqp::sasl_profile::SaslProfile::Plain {
            username: user.into(),
            password: password.into(),
        })
        .open(format!("amqp://127.0.0.1:{port}").as_str())
        .await
        .map_err(|e| format!("{e:?}"))
}

/// A connection that logs in with SCRAM-SHA-256.
async fn scram_connect(
    port: u16,
    user: &str,
    password: &str,
) -> Result<fe2o3_amqp::connection::ConnectionHandle<()>, String> {
    fe2o3_amqp::connection::Connection::builder()
        .container_id("keel-users-scram")
        .sasl_profile(fe2o3_amqp::sasl_profile::SaslProfile::ScramSha256(
            fe2o3_amqp::sasl_profile::SaslScramSha256::new(user, password),
        ))
        .open(format!("amqp://127.0.0.1:{port}").as_str())
        .await
        .map_err(|e| format!("{e:?}"))
}

#[test]
fn bus_roles_are_checked_at_connect_and_attach() {
    let env = started();
    add_user(&env, "bob", "bob-password", &[]);
    grant(&env, "connector", "bob", None);
    grant(&env, "sender", "bob", Some("q1"));
    add_user(&env, "carol", "carol-password", &[]);
    grant(&env, "connector", "carol", None);
    grant(&env, "receiver", "carol", Some("q*"));
    add_user(&env, "dave", "dave-password", &["Monitor"]);
    let roles = env.ok(&["role", "list", "--user", "carol", "--json"]);
    assert!(roles.contains("\"destination\": \"q*\""), "{roles}");
    std::thread::sleep(Duration::from_millis(1500));
    let port = env.bus_port("server1");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // dave is no connector: refused once authenticated.
        let refused = match connect(port, "dave", "dave-password").await {
            Err(e) => e,
            Ok(mut c) => match Session::begin(&mut c).await {
                Err(e) => format!("{e:?}"),
                Ok(_) => panic!("a user without the connector role could open a session"),
            },
        };
        assert!(!refused.is_empty());

        // bob sends to q1, may not send to `other` nor receive from q1.
        let mut c = connect(port, "bob", "bob-password").await.unwrap();
        let mut s = Session::begin(&mut c).await.unwrap();
        let mut snd = Sender::attach(&mut s, "bob-q1", "q1").await.unwrap();
        assert!(matches!(
            snd.send(numbered(1)).await.unwrap(),
            Outcome::Accepted(_)
        ));
        // A refused link is attached and at once detached with the error (AMQP 1.0 §2.6.3):
        // the client learns it at its next use of the link.
        let refused = match Sender::attach(&mut s, "bob-other", "other").await {
            Err(e) => format!("{e:?}"),
            Ok(mut other) => format!("{:?}", other.send(numbered(9)).await.unwrap_err()),
        };
        assert!(
            refused.contains("sender role for destination other of bus bus1"),
            "{refused}"
        );
        let refused = match Receiver::attach(&mut s, "bob-r", "q1").await {
            Err(e) => format!("{e:?}"),
            Ok(mut r) => format!("{:?}", r.recv::<Body<Value>>().await.unwrap_err()),
        };
        assert!(
            refused.contains("receiver role for destination q1 of bus bus1"),
            "{refused}"
        );

        // carol receives from q1 (granted as q*).
        let mut c2 = connect(port, "carol", "carol-password").await.unwrap();
        let mut s2 = Session::begin(&mut c2).await.unwrap();
        let mut rcv = Receiver::attach(&mut s2, "carol-q1", "q1").await.unwrap();
        let d = tokio::time::timeout(Duration::from_secs(10), rcv.recv::<Body<Value>>())
            .await
            .expect("a message within 10 s")
            .unwrap();
        rcv.accept(&d).await.unwrap();

        // A password change: bob's open connection goes on; the next login needs the new one.
        keel_pw(
            &env,
            "bob-new-password",
            &["user", "passwd", "bob", "--password-env", "PW"],
        );
        let changed = Instant::now();
        loop {
            if connect(port, "bob", "bob-password").await.is_err() {
                break;
            }
            assert!(
                changed.elapsed() < Duration::from_secs(5),
                "the old password still works 5 s after the change"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let mut c3 = connect(port, "bob", "bob-new-password").await.unwrap();
        c3.close().await.unwrap();
        // SCRAM-SHA-256 (fe2o3's client side, RFC 7677): the password never crosses the wire,
        // so it is offered on plain connections too; the client checks the server's proof.
        let mut c4 = scram_connect(port, "bob", "bob-new-password")
            .await
            .expect("SCRAM-SHA-256 login");
        let mut s4 = Session::begin(&mut c4).await.unwrap();
        let mut snd4 = Sender::attach(&mut s4, "bob-scram", "q1").await.unwrap();
        assert!(matches!(
            snd4.send(numbered(3)).await.unwrap(),
            Outcome::Accepted(_)
        ));
        snd4.close().await.unwrap();
        c4.close().await.unwrap();
        assert!(
            scram_connect(port, "bob", "bob-password").await.is_err(),
            "SCRAM with the old password"
        );
        assert!(
            scram_connect(port, "nobody", "bob-new-password")
                .await
                .is_err(),
            "SCRAM as an unknown user"
        );
        assert!(matches!(
            snd.send(numbered(2)).await.unwrap(),
            Outcome::Accepted(_)
        ));

        // Removing carol closes her connection within the stated bound.
        env.ok(&["user", "remove", "carol"]);
        let removed = Instant::now();
        let closed = loop {
            match tokio::time::timeout(Duration::from_millis(200), rcv.recv::<Body<Value>>()).await
            {
                Ok(Err(e)) => break format!("{e:?}"),
                Ok(Ok(d)) => {
                    let _ = rcv.accept(&d).await;
                }
                Err(_) => {}
            }
            assert!(
                removed.elapsed() < Duration::from_secs(5),
                "carol's connection still open 5 s after removal"
            );
        };
        assert!(!closed.is_empty());
        let log = env.log("server1");
        assert!(
            log.contains("user \\\"carol\\\" was removed")
                || log.contains("user \"carol\" was removed"),
            "{log}"
        );
        let _ = snd.close().await;
        let _ = s.end().await;
        let _ = c.close().await;
    });

    // python-qpid-proton sees amqp:unauthorized-access with the sentence.
    let found = proton_roles(port, "bob", "bob-new-password", "sender");
    let refused = found["refused"].as_str().unwrap();
    assert!(
        refused.contains("amqp:unauthorized-access") && refused.contains("receiver role"),
        "{refused}"
    );
    env.ok(&["node", "stop", "--stop-servers"]);
}

/// Runs tests/amqp_roles.py (python-qpid-proton) in `mode`; returns its findings.
fn proton_roles(port: u16, user: &str, password: &str, mode: &str) -> serde_json::Value {
    let script = format!("{}/tests/amqp_roles.py", env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("/usr/bin/python3")
        .arg(&script)
        .args([&format!("127.0.0.1:{port}"), user, password, "q1", mode])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{script}: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap()
}

#[test]
fn anonymous_clients_act_as_the_buses_anonymous_user() {
    let env = Env::new();
    env.ok(&["destination", "create", "bus1", "q1", "--type", "queue"]);
    let e = env.fails(&["bus", "anonymous", "bus1", "on"]);
    assert!(e.contains("user `anonymous`, which does not exist"), "{e}");
    env.ok(&["user", "add", "guest", "--no-password"]);
    grant(&env, "connector", "guest", None);
    grant(&env, "receiver", "guest", Some("q1"));
    env.ok(&["bus", "anonymous", "bus1", "on", "--as", "guest"]);
    // guest cannot log in with a password, and cannot be removed while the bus maps to it.
    let e = env.fails(&["user", "remove", "guest"]);
    assert!(
        e.contains("anonymous clients of bus `bus1` act as this user"),
        "{e}"
    );
    env.ok(&["node", "start"]);
    env.ok(&["server", "start", "server1"]);
    assert!(
        env.log("server1").contains("ANONYMOUS"),
        "CWSIT0001I names the mechanism"
    );
    env.ok(&["send", "q1", "--body", "for-anyone", "--server", "server1"]);
    let found = proton_roles(env.bus_port("server1"), "-", "-", "anonymous-receiver");
    assert_eq!(found["received"], "for-anyone", "{found}");
    let refused = found["refused"].as_str().unwrap();
    assert!(
        refused.contains("amqp:unauthorized-access")
            && refused.contains("user \"guest\" does not hold the sender role"),
        "{refused}"
    );
    env.ok(&["node", "stop", "--stop-servers"]);
}

#[test]
fn a_profile_made_before_users_gets_user_admin_once() {
    let env = Env::new();
    // What a profile made before users existed looks like: no users/ in the configuration.
    std::fs::remove_dir_all(env.profile.join("config/users")).unwrap();
    let r = env.keel(&["user", "list"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("ADMN0043I"), "{}", r.stderr);
    assert!(
        r.stdout.contains("admin") && r.stdout.contains("Administrator"),
        "{}",
        r.stdout
    );
    let again = env.keel(&["user", "list"]);
    assert!(
        !again.stderr.contains("ADMN0043I"),
        "said once only: {}",
        again.stderr
    );
    // The profile's own credential still logs in, now as user admin.
    env.ok(&["node", "start"]);
    env.ok(&["node", "status"]);
    assert!(
        !env.log("nodeagent").contains("ADMN0043I"),
        "the node agent found users already"
    );
    env.ok(&["node", "stop"]);
}
