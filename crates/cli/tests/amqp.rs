//! AMQP 1.0 on the bus port, with real processes: python-qpid-proton (a client nobody here
//! wrote), fe2o3-amqp as a Rust client, and a server killed with SIGKILL under load.

mod common;
#[path = "common/numbers.rs"]
mod numbers;

use std::process::Command;
use std::time::Duration;

use common::Env;
use fe2o3_amqp::types::messaging::{Body, Outcome};
use fe2o3_amqp::types::primitives::Value;
use fe2o3_amqp::{Receiver, Sender};
use numbers::{drain_numbers, n_of, numbered, open, receive_every, receive_numbers, send_numbers};

const ME: &str = "node01.server1-bus1";

fn started(env: &Env) -> (u16, String) {
    env.ok(&["destination", "create", "bus1", "q1", "--type", "queue"]);
    env.ok(&["destination", "create", "bus1", "prices", "--type", "topic"]);
    env.ok(&["node", "start"]);
    env.ok(&["server", "start", "server1"]);
    (env.bus_port("server1"), env.admin_password())
}

fn receive_all(env: &Env, dest: &str) -> Vec<String> {
    env.ok(&["receive", dest, "--server", "server1", "--count", "100000"])
        .lines()
        .map(str::to_string)
        .collect()
}

/// Runs a python-qpid-proton script of this folder with `args` and returns the JSON object of
/// findings it printed.
fn proton_findings(env: &Env, script: &str, args: &[&str]) -> serde_json::Value {
    let python = "/usr/bin/python3";
    let has_proton = Command::new(python)
        .args(["-c", "import proton"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        has_proton,
        "python3-qpid-proton is not installed for {python}: run scripts/test (it installs it) or apt-get install python3-qpid-proton"
    );
    let script = format!("{}/tests/{script}", env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(python)
        .arg(&script)
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{script} failed: {stderr}\n{stdout}\nserver log:\n{}",
        env.log("server1")
    );
    serde_json::from_str(stdout.trim()).unwrap()
}

#[test]
fn python_qpid_proton_interoperates() {
    let env = Env::new();
    let (port, password) = started(&env);
    let addr = format!("127.0.0.1:{port}");
    let found = proton_findings(&env, "amqp_proton.py", &[&addr, &password, "q1", "prices"]);
    assert_eq!(found["received_in_order"], 10);
    assert_eq!(found["released_count"], 0, "{found}");
    assert!(found["failed_count"].as_u64().unwrap() >= 1, "{found}");
    assert!(
        found["undefined_destination"]
            .as_str()
            .unwrap()
            .contains("not-found"),
        "{found}"
    );
    assert!(
        found["oversized"].as_str().unwrap().contains("size"),
        "{found}"
    );
    // What proton sent, `keel receive` reads (the body as text).
    assert_eq!(receive_all(&env, "q1"), vec!["for-keel-receive"]);
    // The rejected message went to the exception destination, with its failed count.
    let exception = format!("_SYSTEM.Exception.Destination.{ME}");
    assert_eq!(receive_all(&env, &exception), vec!["again"]);
    let log = env.log("server1");
    for id in ["CWSIT0001I", "CWSIT0002W", "CWSIT0003W"] {
        assert!(log.contains(id), "{id} missing from:\n{log}");
    }
    env.ok(&["node", "stop", "--stop-servers"]);
}

/// Issue 19 item 10: Qpid Proton C++ reuses delivery tags among a link's unsettled deliveries
/// (AMQP 1.0 §2.6.12 says they are unique). Keyed by tag alone, fe2o3's receiver overwrote
/// the earlier entry and sent no outcome for a later one: 45 of 300 producers waited for
/// ever. Every delivery gets its outcome and the store keeps each message once.
#[test]
fn reused_delivery_tags_each_get_their_outcome_and_are_stored_once() {
    let env = Env::new();
    let (port, password) = started(&env);
    let addr = format!("127.0.0.1:{port}");
    let found = proton_findings(
        &env,
        "amqp_duplicate_tags.py",
        &[&addr, &password, "q1", "300"],
    );
    assert_eq!(found["sent"], 300, "{found}");
    // The scenario has to reuse tags among unsettled deliveries to test anything.
    assert!(
        found["reused_while_unsettled"].as_u64().unwrap() > 0,
        "{found}"
    );
    assert_eq!(found["detached"], serde_json::Value::Null, "{found}");
    assert_eq!(found["timed_out"], false, "{found}");
    assert_eq!(found["accepted"], 300, "{found}");
    assert_eq!(found["received"], 300, "{found}");
    assert_eq!(found["received_distinct"], 300, "{found}");
    env.ok(&["node", "stop", "--stop-servers"]);
}

#[test]
fn pipelined_rust_client_keeps_order_and_every_accepted_message() {
    let env = Env::new();
    let (port, password) = started(&env);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (mut c, mut s) = open(port, &password).await;
        let mut snd = Sender::attach(&mut s, "p", "q1").await.unwrap();
        // Many in flight at once: the endpoint stores them in batches, in order.
        let mut outcomes = Vec::new();
        for n in 0..3000u64 {
            outcomes.push(snd.send_batchable(numbered(n)).await.unwrap());
        }
        for o in outcomes {
            assert!(matches!(o.await.unwrap(), Outcome::Accepted(_)));
        }
        snd.close().await.unwrap();
        let got = drain_numbers(&mut s, "q1", Duration::from_secs(3)).await;
        assert_eq!(got, (0..3000).collect::<Vec<_>>());
        s.end().await.unwrap();
        c.close().await.unwrap();
    });
    let depth = env.ok(&[
        "admin",
        "invoke",
        &format!("Keel:type=SIBQueuePoint,name=q1@{ME},bus=bus1,node=node01,process=server1"),
        "depth",
    ]);
    assert_eq!(depth.trim(), "0");
    env.ok(&["node", "stop", "--stop-servers"]);
}

#[test]
fn sigkill_under_amqp_load_loses_no_accepted_message() {
    let env = Env::new();
    let (port, password) = started(&env);
    let pid = env.status("server1")["pid"].as_u64().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let accepted: Vec<u64> = rt.block_on(async {
        let (_c, mut s) = open(port, &password).await;
        let mut snd = Sender::attach(&mut s, "p", "q1").await.unwrap();
        // Producers run with up to 200 in flight; the server dies after the first 2000 are
        // accepted, in the middle of later batches.
        let (tx, mut rx) = tokio::sync::mpsc::channel(200);
        let producer = tokio::spawn(async move {
            for n in 0..1_000_000u64 {
                let Ok(fut) = snd.send_batchable(numbered(n)).await else {
                    break;
                };
                if tx.send((n, fut)).await.is_err() {
                    break;
                }
            }
        });
        let mut accepted = Vec::new();
        let mut killed = false;
        // After the kill, fe2o3's client may wait for credit forever instead of failing the
        // send: a quiet channel ends the run too.
        while let Ok(Some((n, fut))) = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await
        {
            match tokio::time::timeout(Duration::from_secs(5), fut).await {
                Ok(Ok(Outcome::Accepted(_))) => accepted.push(n),
                _ => break,
            }
            if accepted.len() == 2000 && !killed {
                common::sigkill(pid);
                killed = true;
            }
        }
        producer.abort();
        assert!(killed, "the server died before 2000 messages were accepted");
        accepted
    });
    // The node agent restarts it; every accepted message is there, once.
    env.wait_restarted("server1", 1);
    let got = rt.block_on(async {
        let (mut c, mut s) = open(port, &password).await;
        let got = drain_numbers(&mut s, "q1", Duration::from_secs(3)).await;
        s.end().await.unwrap();
        c.close().await.unwrap();
        got
    });
    let counts = numbers::assert_each_accepted_once(&accepted, &got);
    assert!(counts.values().all(|c| *c == 1), "a message arrived twice");
    // What was stored is a prefix of what was sent: the store keeps order across the crash.
    let mut sorted = got.clone();
    sorted.sort_unstable();
    assert_eq!(got, sorted, "messages out of order after the restart");
    assert!(got.len() >= accepted.len());
    env.ok(&["node", "stop", "--stop-servers"]);
}

/// Garbage on the bus port closes that connection only: random bytes, a valid protocol header
/// followed by random frames, a SASL header followed by junk, and a frame announcing a huge
/// size. The server keeps serving a well-behaved client throughout.
#[test]
fn malformed_input_closes_that_connection_only() {
    use std::io::{Read, Write};
    let env = Env::new();
    let (port, password) = started(&env);
    // A deterministic generator: the cases are the same on every run.
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut cases: Vec<Vec<u8>> = Vec::new();
    for i in 0..60 {
        let len = (next() % 600) as usize;
        let junk: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        let mut case = match i % 4 {
            0 => Vec::new(),
            1 => b"AMQP\x00\x01\x00\x00".to_vec(),
            2 => b"AMQP\x03\x01\x00\x00".to_vec(),
            _ => {
                // Header, then a frame claiming 4 GiB.
                let mut v = b"AMQP\x03\x01\x00\x00".to_vec();
                v.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 2, 1, 0, 0]);
                v
            }
        };
        case.extend(junk);
        cases.push(case);
    }
    for (i, case) in cases.iter().enumerate() {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let _ = s.write_all(case);
        let _ = s.shutdown(std::net::Shutdown::Write);
        // The server answers what it can and closes: reading reaches the end, never hangs.
        let mut sink = Vec::new();
        let r = s.read_to_end(&mut sink);
        assert!(
            r.is_ok()
                || r.as_ref()
                    .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
            "case {i}: {r:?}"
        );
        if i % 20 == 19 {
            // Still serving.
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(async {
                let (mut c, mut s) = open(port, &password).await;
                let mut snd = Sender::attach(&mut s, "ok", "q1").await.unwrap();
                let o = snd.send(numbered(i as u64)).await.unwrap();
                assert!(matches!(o, Outcome::Accepted(_)));
                snd.close().await.unwrap();
                let got = drain_numbers(&mut s, "q1", Duration::from_secs(1)).await;
                assert_eq!(got, vec![i as u64]);
                s.end().await.unwrap();
                c.close().await.unwrap();
            });
        }
    }
    assert_eq!(
        env.status("server1")["restarts"],
        0,
        "the server never died"
    );
    env.ok(&["node", "stop", "--stop-servers"]);
}

fn depth(env: &Env) -> u64 {
    common::q1_depth(env)
}

/// AMQP transactions: posts are invisible until the commit and gone with a rollback;
/// transactional acknowledgements apply together; a committed transaction survives SIGKILL
/// right after the commit, an undischarged one leaves nothing.
#[test]
fn amqp_transactions_are_atomic_and_durable() {
    use fe2o3_amqp::transaction::{
        Controller, Transaction, TransactionDischarge, TransactionPosting, TransactionRetirement,
    };
    let env = Env::new();
    let (port, password) = started(&env);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (mut c, mut s) = open(port, &password).await;
        let controller = Controller::attach(&mut s, "controller").await.unwrap();
        let mut snd = Sender::attach(&mut s, "p", "q1").await.unwrap();

        let txn = Transaction::declare(&controller, None).await.unwrap();
        for n in 0..3 {
            txn.post(&mut snd, numbered(n)).await.unwrap();
        }
        assert_eq!(depth(&env), 0, "posts are invisible before the commit");
        txn.commit().await.unwrap();
        assert_eq!(depth(&env), 3);

        let txn = Transaction::declare(&controller, None).await.unwrap();
        for n in 100..102 {
            txn.post(&mut snd, numbered(n)).await.unwrap();
        }
        txn.rollback().await.unwrap();
        assert_eq!(depth(&env), 3, "a rollback stores nothing");

        // Transactional acknowledgements: rolled back, the deliveries are still ours to
        // settle; committed, they are gone together.
        let mut rcv = Receiver::attach(&mut s, "c", "q1").await.unwrap();
        let mut got = Vec::new();
        for _ in 0..3 {
            got.push(rcv.recv::<Body<Value>>().await.unwrap());
        }
        assert_eq!(
            got.iter().map(|d| n_of(d.message())).collect::<Vec<_>>(),
            [0, 1, 2]
        );
        let txn = Transaction::declare(&controller, None).await.unwrap();
        txn.accept(&mut rcv, &got[0]).await.unwrap();
        txn.rollback().await.unwrap();
        assert_eq!(depth(&env), 3);
        // Settled on the client's side by the transaction, message 0 comes back.
        let again = rcv.recv::<Body<Value>>().await.unwrap();
        assert_eq!(n_of(again.message()), 0);
        let txn = Transaction::declare(&controller, None).await.unwrap();
        for d in [&got[1], &got[2], &again] {
            txn.accept(&mut rcv, d).await.unwrap();
        }
        txn.commit().await.unwrap();
        assert_eq!(depth(&env), 0, "three acknowledgements, one commit");
        rcv.close().await.unwrap();

        // Committed, then the server dies at once: the messages are there after the restart.
        let txn = Transaction::declare(&controller, None).await.unwrap();
        for n in 200..205 {
            txn.post(&mut snd, numbered(n)).await.unwrap();
        }
        txn.commit().await.unwrap();
        // Not discharged when the server dies: nothing of it survives.
        let open_txn = Transaction::declare(&controller, None).await.unwrap();
        for n in 300..305 {
            open_txn.post(&mut snd, numbered(n)).await.unwrap();
        }
        common::sigkill(env.status("server1")["pid"].as_u64().unwrap());
        std::mem::forget(open_txn);
        drop(snd);
        drop(controller);
        drop(s);
        drop(c.close().await);
    });
    env.wait_restarted("server1", 1);
    let got = rt.block_on(async {
        let (mut c, mut s) = open(port, &password).await;
        let got = drain_numbers(&mut s, "q1", Duration::from_secs(2)).await;
        s.end().await.unwrap();
        c.close().await.unwrap();
        got
    });
    assert_eq!(got, (200..205).collect::<Vec<_>>());
    env.ok(&["node", "stop", "--stop-servers"]);
}

/// A client that goes away holding unsettled deliveries gives them back: another consumer
/// receives them (they are not left locked until the server restarts).
#[test]
fn deliveries_of_a_closed_connection_are_released() {
    let env = Env::new();
    let (port, password) = started(&env);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (mut c, mut s) = open(port, &password).await;
        let mut snd = Sender::attach(&mut s, "p", "q1").await.unwrap();
        for n in 0..5 {
            let o = snd.send(numbered(n)).await.unwrap();
            assert!(matches!(o, Outcome::Accepted(_)));
        }
        snd.close().await.unwrap();
        let mut rcv = Receiver::attach(&mut s, "holder", "q1").await.unwrap();
        for n in 0..5 {
            let d = rcv.recv::<Body<Value>>().await.unwrap();
            assert_eq!(n_of(d.message()), n);
        }
        // Neither settled nor detached: the connection just ends.
        drop(rcv);
        drop(s);
        // fe2o3's client may answer this close with IllegalState (it still flushes the dropped
        // session's frames after sending Close: a client-side race, seen in 3 of 15 runs); its
        // connection ends either way, which is all this test needs.
        let _ = c.close().await;

        let (mut c, mut s) = open(port, &password).await;
        let got = drain_numbers(&mut s, "q1", Duration::from_secs(5)).await;
        assert_eq!(got, (0..5).collect::<Vec<_>>());
        s.end().await.unwrap();
        c.close().await.unwrap();
    });
    env.ok(&["node", "stop", "--stop-servers"]);
}

/// server1 and server2 on bus1, queue q2 on server2's engine, the node agent and server1
/// started (server2 is left to the test).
fn remote_queue_env() -> Env {
    let env = Env::new();
    env.add_second_member();
    env.ok(&[
        "destination",
        "create",
        "bus1",
        "q2",
        "--type",
        "queue",
        "--me",
        "node01.server2-bus1",
    ]);
    env.ok(&["node", "start"]);
    env.ok(&["server", "start", "server1"]);
    env
}

#[test]
fn messages_for_a_queue_on_another_engine_arrive_there_exactly_once() {
    let env = remote_queue_env();
    let password = env.admin_password();
    let port1 = env.bus_port("server1");
    let rt = tokio::runtime::Runtime::new().unwrap();
    // The queue's engine is down: accepted means durable on server1's transmission queue.
    send_numbers(&rt, port1, &password, "q2", 0..100);
    env.ok(&["server", "start", "server2"]);
    send_numbers(&rt, port1, &password, "q2", 100..200);
    let port2 = env.bus_port("server2");
    let mut got = receive_numbers(&rt, port2, &password, "q2", 200, Duration::from_secs(30));
    got.sort_unstable();
    assert_eq!(got, (0..200).collect::<Vec<_>>(), "every message once");
    // A restart of the source resends nothing the target already has.
    env.ok(&["server", "stop", "server1"]);
    env.ok(&["server", "start", "server1"]);
    env.wait_for(Duration::from_secs(20), "the link again", || {
        (env.log("server1").matches("CWSIT0007I").count() >= 2).then_some(())
    });
    assert!(
        receive_numbers(&rt, port2, &password, "q2", 1, Duration::from_secs(3)).is_empty(),
        "nothing arrives twice"
    );
    env.ok(&["node", "stop", "--stop-servers"]);
}

#[test]
fn delivery_streams_survive_crashes_of_either_engine_without_loss_or_duplicates() {
    let env = remote_queue_env();
    // The target crashes right after storing its first batch, before acknowledging it; the node
    // agent restarts it (without the fault) and the source resends what was not acknowledged.
    let mut c = env.cmd(&["server", "start", "server2"]);
    c.env("KEEL_FAULTS", "bus.target_after_commit:crash");
    assert!(c.status().unwrap().success());
    let password = env.admin_password();
    let port1 = env.bus_port("server1");
    let rt = tokio::runtime::Runtime::new().unwrap();
    send_numbers(&rt, port1, &password, "q2", 0..300);
    env.wait_restarted("server2", 1);
    // Then the source is killed while its stream is still moving.
    send_numbers(&rt, port1, &password, "q2", 300..600);
    let pid1 = env.status("server1")["pid"].as_u64().unwrap();
    common::sigkill(pid1);
    env.wait_restarted("server1", 1);
    let port2 = env.bus_port("server2");
    let got = receive_every(&rt, port2, &password, "q2", 600, Duration::from_secs(60));
    assert_eq!(
        got,
        (0..600).collect::<Vec<_>>(),
        "every accepted message exactly once"
    );
    env.ok(&["node", "stop", "--stop-servers"]);
}

/// Remote puts through server1 to q2 on server2 with `server`'s store file copied aside after
/// the first 20 messages and put back by hand (no restore mark) after 30 more; then 10 more are
/// sent. Returns with both servers running.
fn traffic_with_a_store_copied_back(server: &str) -> Env {
    let env = remote_queue_env();
    env.ok(&["server", "start", "server2"]);
    let password = env.admin_password();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let send = |range| send_numbers(&rt, env.bus_port("server1"), &password, "q2", range);
    let receive =
        |want, limit| receive_numbers(&rt, env.bus_port("server2"), &password, "q2", want, limit);
    // Until the source has removed what the target acknowledged.
    let source_drained = || {
        env.wait_for(
            Duration::from_secs(20),
            "the transmission queue emptied",
            || (source_messages(&env) == 0).then_some(()),
        )
    };
    let store = env
        .profile
        .join(format!("databases/node01.{server}-bus1.sqlite"));
    let copy = env.dir().join("store-copy.sqlite");
    send(0..20);
    assert_eq!(receive(20, Duration::from_secs(30)).len(), 20);
    source_drained();
    env.ok(&["server", "stop", server]);
    std::fs::copy(&store, &copy).unwrap();
    env.ok(&["server", "start", server]);
    send(20..50);
    assert_eq!(receive(30, Duration::from_secs(30)).len(), 30);
    source_drained();
    env.ok(&["server", "stop", server]);
    std::fs::copy(&copy, &store).unwrap();
    env.ok(&["server", "start", server]);
    send(50..60);
    env
}

/// Nothing arrives at q2 within 3 s.
fn nothing_arrives(env: &Env) -> bool {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let port2 = env.bus_port("server2");
    receive_numbers(
        &rt,
        port2,
        &env.admin_password(),
        "q2",
        1,
        Duration::from_secs(3),
    )
    .is_empty()
}

/// Messages in server1's engine's data store (its transmission queue, here).
fn source_messages(env: &Env) -> u64 {
    let info: serde_json::Value =
        serde_json::from_str(&env.ok(&["store", "info", "node01.server1-bus1", "--json"])).unwrap();
    info["messages"].as_u64().unwrap()
}

/// Waits until server2 logged CWSIP0784E and server1 logged `source_says`, then checks that
/// nothing of the held stream reaches q2.
fn held_on_both_sides(env: &Env, source_says: &str) {
    env.wait_for(
        Duration::from_secs(20),
        "the stream held on both sides",
        || {
            (env.log("server2").contains("CWSIP0784E") && env.log("server1").contains(source_says))
                .then_some(())
        },
    );
    assert!(nothing_arrives(env), "nothing of a held stream is taken");
}

/// The remedy: the engine of `server` is stopped and started with FLUSH; waits for CWSIP0783E.
fn flush_engine(env: &Env, server: &str) {
    let me = format!("node01.{server}-bus1");
    env.ok(&["me", "stop", &me]);
    env.ok(&["me", "start", &me, "--flush"]);
    env.wait_for(Duration::from_secs(30), "CWSIP0783E", || {
        env.log(server).contains("CWSIP0783E").then_some(())
    });
    assert_eq!(
        env.ok(&["me", "state", &me]).trim(),
        "started",
        "nothing pending once every peer confirmed"
    );
}

/// After the FLUSH, the held messages 50..60 arrive, each once.
fn held_messages_arrive_once(env: &Env) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let password = env.admin_password();
    let port2 = env.bus_port("server2");
    let got = receive_every(&rt, port2, &password, "q2", 10, Duration::from_secs(30));
    assert_eq!(got, (50..60).collect::<Vec<_>>(), "each held message once");
}

#[test]
fn a_source_store_copied_back_is_caught_by_the_handshake_and_loses_nothing() {
    // The copy reuses the stream's old ticks for new messages: without the handshake the
    // target would take them for duplicates and drop them. It holds the stream instead.
    let env = traffic_with_a_store_copied_back("server1");
    held_on_both_sides(&env, "CWSIT0009E");
    assert!(
        source_messages(&env) >= 10,
        "the new messages wait on the transmission queue"
    );
    // FLUSH of the engine whose store went back: a new stream carries what was held.
    flush_engine(&env, "server1");
    held_messages_arrive_once(&env);
    assert!(env.log("server2").contains("CWSIP0784E"));
    env.ok(&["node", "stop", "--stop-servers"]);
}

#[test]
fn a_target_store_copied_back_is_caught_by_the_handshake() {
    // The source holds acks beyond the target's prefix.
    let env = traffic_with_a_store_copied_back("server2");
    held_on_both_sides(&env, "that engine's data store went back in time");
    // FLUSH of the target: it asks the source to move its stream onto a new one.
    flush_engine(&env, "server2");
    assert!(
        env.log("server1").contains("CWSIT0010I"),
        "the source flushed at the target's request"
    );
    held_messages_arrive_once(&env);
    env.ok(&["node", "stop", "--stop-servers"]);
}

#[test]
fn consumers_on_one_server_receive_from_a_queue_on_another_engine() {
    let env = remote_queue_env();
    env.ok(&["server", "start", "server2"]);
    let password = env.admin_password();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (port1, port2) = (env.bus_port("server1"), env.bus_port("server2"));
    send_numbers(&rt, port2, &password, "q2", 0..100);
    // Remote get: through server1, settled at server2's engine.
    let got = receive_every(&rt, port1, &password, "q2", 100, Duration::from_secs(30));
    assert_eq!(got, (0..100).collect::<Vec<_>>(), "each message once");
    let me2_messages = || {
        let info: serde_json::Value =
            serde_json::from_str(&env.ok(&["store", "info", "node01.server2-bus1", "--json"]))
                .unwrap();
        info["messages"].as_u64().unwrap()
    };
    env.wait_for(
        Duration::from_secs(10),
        "the accepted messages removed",
        || (me2_messages() == 0).then_some(()),
    );

    // A remote consumer's server dies holding unsettled deliveries: the queue's engine gets
    // them back when the link ends, and nothing is lost.
    send_numbers(&rt, port2, &password, "q2", 100..150);
    // The client connection stays open (held below) until server1 is killed: the deliveries
    // must come back through the end of the link between the engines, not a clean release.
    let (held, _client) = rt.block_on(async {
        let (c, mut s) = open(port1, &password).await;
        let mut r = Receiver::attach(&mut s, "hold", "q2").await.unwrap();
        let mut held = 0;
        while held < 5 {
            if let Ok(Ok(_)) =
                tokio::time::timeout(Duration::from_secs(10), r.recv::<Body<Value>>()).await
            {
                held += 1;
            } else {
                break;
            }
        }
        (held, (c, s, r))
    });
    assert!(held > 0, "the remote consumer got messages");
    let pid1 = env.status("server1")["pid"].as_u64().unwrap();
    common::sigkill(pid1);
    let rest = receive_every(&rt, port2, &password, "q2", 50, Duration::from_secs(30));
    assert_eq!(rest, (100..150).collect::<Vec<_>>(), "released, not lost");
    env.ok(&["node", "stop", "--stop-servers"]);
}

#[test]
fn remote_put_and_remote_get_share_a_link_under_load_with_large_messages() {
    // Producers and a consumer both on server1 for q2 on server2: data frames flow one way and
    // lent messages (256 KiB each) the other way on the same link at the same time.
    let env = remote_queue_env();
    env.ok(&["server", "start", "server2"]);
    let password = env.admin_password();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let port1 = env.bus_port("server1");
    const N: u64 = 200;
    let got = rt.block_on(async {
        let producer = async {
            let (mut c, mut s) = open(port1, &password).await;
            let mut snd = Sender::attach(&mut s, "big-p", "q2").await.unwrap();
            for n in 0..N {
                let o = snd
                    .send(numbers::numbered_sized(n, 256 * 1024))
                    .await
                    .unwrap();
                assert!(matches!(o, Outcome::Accepted(_)), "{o:?}");
            }
            let _ = snd.close().await;
            let _ = s.end().await;
            let _ = c.close().await;
        };
        let consumer = async {
            let (mut c, mut s) = open(port1, &password).await;
            let mut r = Receiver::attach(&mut s, "big-c", "q2").await.unwrap();
            let mut got = Vec::new();
            while got.len() < N as usize {
                match tokio::time::timeout(Duration::from_secs(60), r.recv::<Body<Value>>()).await {
                    Ok(Ok(d)) => {
                        got.push(n_of(d.message()));
                        r.accept(&d).await.unwrap();
                    }
                    _ => break,
                }
            }
            let _ = r.close().await;
            let _ = s.end().await;
            let _ = c.close().await;
            got
        };
        tokio::join!(producer, consumer).1
    });
    let mut got = got;
    got.sort_unstable();
    assert_eq!(got, (0..N).collect::<Vec<_>>(), "each message once");
    env.ok(&["node", "stop", "--stop-servers"]);
}

/// AMQP over TLS on the bus port (issue 21): python-qpid-proton with `amqps://` and the cell's
/// CA sends and receives durable messages by IP and by name; a client trusting another CA is
/// refused; a TLS client that never finishes its handshake is cut off at the pre-auth deadline;
/// plain AMQP keeps working on the same port.
#[test]
fn python_qpid_proton_over_tls_on_the_bus_port() {
    let env = Env::new();
    let other = Env::new();
    let (port, password) = started(&env);
    let ca = env.profile.join("secrets/tls/ca.pem");
    let other_ca = other.profile.join("secrets/tls/ca.pem");
    let found = proton_findings(
        &env,
        "amqp_tls.py",
        &[
            "127.0.0.1",
            &port.to_string(),
            &password,
            "q1",
            ca.to_str().unwrap(),
            other_ca.to_str().unwrap(),
        ],
    );
    assert_eq!(found["round_trip_127.0.0.1"], 5, "{found}");
    assert_eq!(found["round_trip_localhost"], 5, "{found}");
    let log = env.log("server1");
    assert!(
        log.contains("plain and TLS, certificate node01.server1"),
        "CWSIT0001I names TLS:\n{log}"
    );
    assert!(log.contains("TLS handshake failed"), "{log}");
    // A client that sends half a ClientHello and stops is cut off at the deadline.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    use std::io::{Read, Write};
    s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00]).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    let t0 = std::time::Instant::now();
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "closed without an answer");
    assert!(t0.elapsed() < std::time::Duration::from_secs(15));
    env.wait_for(
        std::time::Duration::from_secs(5),
        "the deadline refusal",
        || {
            env.log("server1")
                .contains("TLS handshake did not finish")
                .then_some(())
        },
    );
    // fe2o3-amqp asks for TLS with the AMQP TLS header (protocol id 2) instead of opening
    // with a TLS record: the bus port answers the header, then the handshake follows.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let tls = tokio_rustls::TlsConnector::from(keel_tls::client_config_from(&ca).unwrap());
        let mut c = fe2o3_amqp::connection::Connection::builder()
            .container_id("keel-tls-test")
            .sasl_profile(fe2o3_amqp::sasl_profile::SaslProfile::Plain {
                username: "admin".into(),
                password: password.clone(),
            })
            .tls_connector(tls)
            .open(format!("amqps://localhost:{port}").as_str())
            .await
            .expect("fe2o3 over TLS (AMQP TLS header)");
        let mut s = fe2o3_amqp::Session::begin(&mut c).await.unwrap();
        let mut snd = Sender::attach(&mut s, "tls-sender", "q1").await.unwrap();
        let outcome = snd.send("over-tls-header").await.unwrap();
        assert!(matches!(outcome, Outcome::Accepted(_)), "{outcome:?}");
        let mut rcv = Receiver::attach(&mut s, "tls-receiver", "q1")
            .await
            .unwrap();
        let d = rcv.recv::<Body<Value>>().await.unwrap();
        assert!(
            format!("{:?}", d.body()).contains("over-tls-header"),
            "{:?}",
            d.body()
        );
        rcv.accept(&d).await.unwrap();
        snd.close().await.unwrap();
        rcv.close().await.unwrap();
        s.end().await.unwrap();
        c.close().await.unwrap();
    });
    // Plain AMQP on the same port still works.
    let found = proton_findings(
        &env,
        "amqp_proton.py",
        &[&format!("127.0.0.1:{port}"), &password, "q1", "prices"],
    );
    assert_eq!(found["received_in_order"], 10);
    env.ok(&["node", "stop", "--stop-servers"]);
}
