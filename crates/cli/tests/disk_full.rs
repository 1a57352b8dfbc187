//! A full disk under a running server (issue 19, DESIGN §10): the whole profile (data stores,
//! logs, the servers' stderr) lives on a small tmpfs the test mounts, and a filler file fills
//! it. Persistent sends are refused with `amqp:resource-limit-exceeded` and a sentence saying
//! what to do; `keel me state` says the store is out of space; once the filler is deleted the
//! next send is accepted without any restart; and every message that was accepted arrives
//! exactly once. The logs say when the disk filled and when it cleared, once each.

mod common;
#[path = "common/numbers.rs"]
mod numbers;

use std::time::Duration;

use common::Env;
use fe2o3_amqp::types::definitions::{AmqpError, ErrorCondition};
use fe2o3_amqp::types::messaging::Outcome;
use fe2o3_amqp::{Receiver, Sender};
use keel_core::testfs::{fill, Tmpfs};
use numbers::{assert_each_accepted_once, numbered, open, receive_every};

const ME: &str = "node01.server1-bus1";
/// Room for the profile, a server's files and a few thousand 1 KiB messages.
const DISK_BYTES: u64 = 96 * 1024 * 1024;
/// Sends tried at most while waiting for the full disk to refuse one.
const SENDS_TO_REFUSAL_MAX: u64 = 5_000;

/// What happened to one send.
enum Sent {
    Accepted,
    /// Refused with `amqp:resource-limit-exceeded`; the description.
    Full(String),
}

async fn send_one(snd: &mut Sender, n: u64) -> Sent {
    match snd.send(numbered(n)).await.unwrap() {
        Outcome::Accepted(_) => Sent::Accepted,
        Outcome::Rejected(r) => {
            let e = r.error.expect("a rejection says why");
            assert_eq!(
                e.condition,
                ErrorCondition::AmqpError(AmqpError::ResourceLimitExceeded),
                "message {n} refused with another condition: {e:?}"
            );
            Sent::Full(e.description.unwrap_or_default())
        }
        other => panic!("message {n}: unexpected outcome {other:?}"),
    }
}

fn me_state(env: &Env) -> String {
    env.ok(&["me", "state", ME])
}

/// The `Server` object's `health` attribute (also in its health ping's answer).
fn server_health(env: &Env) -> String {
    let server = "Keel:type=Server,name=server1,node=node01,process=server1";
    env.ok(&["admin", "get", server, "health"])
        .trim()
        .to_string()
}

#[test]
fn a_full_disk_refuses_sends_says_so_and_takes_work_again_when_space_returns() {
    // Declared first, dropped last: a failing test still shows the logs on it.
    let mut disk = None;
    let env = Env::new_prepared(&[], |profile| {
        disk = Some(Tmpfs::mount_at(profile.parent().unwrap(), DISK_BYTES));
    });
    let disk = disk.expect("the profile's file system is mounted");
    env.ok(&["destination", "create", "bus1", "q1", "--type", "queue"]);
    env.ok(&["node", "start"]);
    env.ok(&["server", "start", "server1"]);
    let (port, password) = (env.bus_port("server1"), env.admin_password());
    assert_eq!(me_state(&env).trim(), "started");

    let rt = tokio::runtime::Runtime::new().unwrap();
    let filler = disk.path().join("filler");
    let accepted: Vec<u64> = rt.block_on(async {
        let (mut c, mut s) = open(port, &password).await;
        let mut snd = Sender::attach(&mut s, "p", "q1").await.unwrap();
        let mut accepted = Vec::new();
        let mut n = 0u64;
        for _ in 0..200 {
            assert!(matches!(send_one(&mut snd, n).await, Sent::Accepted));
            accepted.push(n);
            n += 1;
        }
        // The disk fills up: sends go on until the store refuses one (a few may still fit in
        // the last pages of its files).
        assert!(fill(&filler) > 0);
        let refusal = loop {
            assert!(
                n < 200 + SENDS_TO_REFUSAL_MAX,
                "the full disk never refused a send"
            );
            match send_one(&mut snd, n).await {
                Sent::Accepted => accepted.push(n),
                Sent::Full(why) => break why,
            }
            n += 1;
        };
        assert!(
            refusal.contains("the disk is full") && refusal.contains("resume by themselves"),
            "{refusal}"
        );
        eprintln!(
            "disk full after {} accepted sends ({} after the filler): {refusal}",
            accepted.len(),
            accepted.len() - 200
        );
        // While the disk is full the server must also log a line longer than the room any of
        // its log files has left in its last page: a refused attach with a long link name
        // (CWSIT0003W). The log must not stop for good, nor the thread that logs die.
        {
            let (mut c2, mut s2) = open(port, &password).await;
            let long = format!("long-{}", "x".repeat(6_000));
            // Refused (the server answers the attach, then detaches it with the reason):
            // what matters here is the line it logs.
            let _ = Receiver::attach(&mut s2, long.as_str(), "no-such-queue").await;
            let _ = s2.end().await;
            let _ = c2.close().await;
        }
        // It stays refused, with the same answer, and the engine is still there.
        for _ in 0..20 {
            n += 1;
            assert!(matches!(send_one(&mut snd, n).await, Sent::Full(_)));
        }
        let state = me_state(&env);
        assert!(
            state.starts_with("started\n") && state.contains("store: disk-full since"),
            "{state}"
        );
        assert_eq!(server_health(&env), "degraded");
        // Space returns: the very next send is accepted, without a restart.
        std::fs::remove_file(&filler).unwrap();
        for _ in 0..100 {
            n += 1;
            assert!(
                matches!(send_one(&mut snd, n).await, Sent::Accepted),
                "message {n} after space returned"
            );
            accepted.push(n);
        }
        snd.close().await.unwrap();
        let _ = s.end().await;
        let _ = c.close().await;
        accepted
    });
    assert_eq!(me_state(&env).trim(), "started", "the store is ok again");
    assert_eq!(server_health(&env), "ok");

    // Every accepted message arrives exactly once, and nothing that was refused.
    let got = receive_every(
        &rt,
        port,
        &password,
        "q1",
        accepted.len(),
        Duration::from_secs(30),
    );
    assert_each_accepted_once(&accepted, &got);
    assert_eq!(got.len(), accepted.len(), "a refused message was stored");

    // The log says it once when it starts and once when it clears (the lines written while the
    // disk was full are written late, once there is room again), and nothing said "closed".
    let log = env.log("server1");
    for id in ["CWSIP0112W", "CWSIP0113I", "WSVR0108W"] {
        for line in log.lines().filter(|l| l.contains(id)) {
            eprintln!("{line}");
        }
    }
    assert_eq!(log.matches("CWSIP0112W").count(), 1, "{log}");
    assert_eq!(log.matches("CWSIP0113I").count(), 1, "{log}");
    assert!(!log.contains("is closed; restart"), "{log}");
    // The line that found no room was held and written late, after the note saying so.
    assert!(log.contains("long-xxxx"), "the held line: {log}");
    assert!(log.contains("WSVR0108W"), "{log}");
    env.ok(&["node", "stop", "--stop-servers"]);
}
