//! What an AMQP client may hold open on the bus port (issue 19, DESIGN §10), with a real
//! server process: transactions bounded in size, age and number; duplicate delivery tags;
//! over-size messages.

mod common;
#[path = "common/numbers.rs"]
mod numbers;

use std::time::Duration;

use common::{rss_kib, Env};
use fe2o3_amqp::transaction::{Controller, Transaction, TransactionDischarge, TransactionPosting};
use fe2o3_amqp::types::messaging::Outcome;
use fe2o3_amqp::Sender;
use numbers::{numbered, numbered_sized, open};

/// A server with queue q1; `env_vars` go to the node agent and so to the servers it starts.
fn started_with(env: &Env, env_vars: &[(&str, &str)]) -> (u16, String) {
    env.ok(&["destination", "create", "bus1", "q1", "--type", "queue"]);
    let mut node = env.cmd(&["node", "start"]);
    node.envs(env_vars.iter().copied());
    let out = node.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    env.ok(&["server", "start", "server1"]);
    (env.bus_port("server1"), env.admin_password())
}

fn depth(env: &Env) -> u64 {
    common::q1_depth(env)
}

/// One transaction grows past its bound (32 MiB of posted messages): from there its posts are
/// rejected with the reason and not kept, the server's RSS stays bounded while the client keeps
/// posting 96 MiB, the commit is refused with `amqp:transaction:rollback` and the reason, and
/// nothing of it is stored. Posts count in flow control: more than the link's 200 credits of
/// posts go through (they used to stall the client for ever). A connection holds at most 32
/// open transactions.
#[test]
fn a_transaction_past_its_size_bound_is_rolled_back_and_the_server_holds_no_more() {
    let env = Env::new();
    let (port, password) = started_with(&env, &[]);
    let pid = env.status("server1")["pid"].as_u64().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (_c, mut s) = open(port, &password).await;
        let controller = Controller::attach(&mut s, "controller").await.unwrap();
        let mut snd = Sender::attach(&mut s, "p", "q1").await.unwrap();
        let txn = Transaction::declare(&controller, None).await.unwrap();
        let rss_before = rss_kib(pid);
        let mut rss_peak = rss_before;
        let mut first_rejected = None;
        let mut accepted_after_rejection = 0;
        for n in 0..1536u64 {
            let outcome = tokio::time::timeout(
                Duration::from_secs(10),
                txn.post(&mut snd, numbered_sized(n, 64 * 1024)),
            )
            .await
            .unwrap_or_else(|_| panic!("post {n} waited 10 s (no credit?)"))
            .unwrap();
            match outcome {
                Outcome::Rejected(r) if first_rejected.is_none() => {
                    first_rejected = Some((n, format!("{:?}", r.error)));
                }
                Outcome::Rejected(_) => {}
                _ if first_rejected.is_some() => accepted_after_rejection += 1,
                _ => {}
            }
            if n % 64 == 0 {
                rss_peak = rss_peak.max(rss_kib(pid));
            }
        }
        rss_peak = rss_peak.max(rss_kib(pid));
        eprintln!("server RSS {rss_before} KiB before, {rss_peak} KiB at most while posting 96 MiB in one transaction");
        let (n, why) = first_rejected.expect("a post past 32 MiB is rejected");
        assert!((400..=520).contains(&n), "rejected from post {n}: {why}");
        assert!(
            why.contains("rolled back by the server") && why.contains("commit in smaller transactions"),
            "{why}"
        );
        assert_eq!(accepted_after_rejection, 0);
        assert!(
            rss_peak < rss_before + 64 * 1024,
            "RSS grew from {rss_before} to {rss_peak} KiB"
        );
        let refused = txn.commit().await.expect_err("the commit of a rolled-back transaction is refused");
        let refused = format!("{refused:?}");
        assert!(refused.contains("Rollback") && refused.contains("grew past"), "{refused}");
        assert_eq!(depth(&env), 0, "nothing of it is stored");

        // The link and the controller still work.
        let txn = Transaction::declare(&controller, None).await.unwrap();
        for n in 0..3 {
            txn.post(&mut snd, numbered(n)).await.unwrap();
        }
        txn.commit().await.unwrap();
        assert_eq!(depth(&env), 3);

        // Open transactions per connection.
        let mut open_txns = Vec::new();
        for _ in 0..32 {
            open_txns.push(Transaction::declare(&controller, None).await.unwrap());
        }
        let refused = format!(
            "{:?}",
            Transaction::declare(&controller, None).await.expect_err("a 33rd open transaction")
        );
        assert!(refused.contains("32 open transactions"), "{refused}");
        open_txns.pop().unwrap().rollback().await.unwrap();
        Transaction::declare(&controller, None).await.unwrap().rollback().await.unwrap();
        for t in open_txns {
            t.rollback().await.unwrap();
        }
    });
    env.ok(&["node", "stop", "--stop-servers"]);
}

/// A transaction left open longer than its age bound (2 s here, through the server's
/// environment) is rolled back by the server without any further frame from the client: the
/// messages it settled become available again, nothing it posted is stored, and its discharge
/// is refused with `amqp:transaction:timeout` and the reason.
#[test]
fn a_transaction_open_too_long_is_rolled_back_and_its_discharge_says_so() {
    use fe2o3_amqp::transaction::TransactionRetirement;
    use fe2o3_amqp::types::messaging::Body;
    use fe2o3_amqp::types::primitives::Value;
    let env = Env::new();
    let (port, password) = started_with(&env, &[("KEEL_AMQP_TXN_AGE_MAX_S", "2")]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (_c, mut s) = open(port, &password).await;
        let controller = Controller::attach(&mut s, "controller").await.unwrap();
        let mut snd = Sender::attach(&mut s, "p", "q1").await.unwrap();
        snd.send(numbered(1)).await.unwrap();
        let mut rcv = fe2o3_amqp::Receiver::attach(&mut s, "c", "q1")
            .await
            .unwrap();
        let got = rcv.recv::<Body<Value>>().await.unwrap();

        let txn = Transaction::declare(&controller, None).await.unwrap();
        txn.post(&mut snd, numbered(2)).await.unwrap();
        txn.accept(&mut rcv, &got).await.unwrap();
        // Past the age bound and the server's next check of it.
        tokio::time::sleep(Duration::from_secs(5)).await;
        // Rolled back by then: the settled message is released, so it comes again.
        let again = tokio::time::timeout(Duration::from_secs(5), rcv.recv::<Body<Value>>())
            .await
            .expect("the delivery the expired transaction settled comes back")
            .unwrap();
        assert_eq!(numbers::n_of(again.message()), 1);
        rcv.accept(&again).await.unwrap();
        let refused = format!(
            "{:?}",
            txn.commit()
                .await
                .expect_err("an expired transaction does not commit")
        );
        assert!(
            refused.contains("Timeout") && refused.contains("open longer than 2 s"),
            "{refused}"
        );
        assert_eq!(depth(&env), 0, "nothing of it is stored");
    });
    env.ok(&["node", "stop", "--stop-servers"]);
}

/// A client that attaches to a queue created after its server started is told that a restart
/// of the server is needed (CWSIT0003W, as `keel send` says it), not only to create it.
#[test]
fn an_attach_to_a_queue_created_after_the_start_asks_for_a_restart() {
    let env = Env::new();
    let (port, password) = started_with(&env, &[]);
    env.ok(&["destination", "create", "bus1", "late", "--type", "queue"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (_c, mut s) = open(port, &password).await;
        // The attach is answered, then the link closed with the refusal (amqp:not-found).
        let _ = Sender::attach(&mut s, "p", "late").await;
    });
    let log = env.wait_for(Duration::from_secs(10), "CWSIT0003W", || {
        let log = env.log("server1");
        log.contains("CWSIT0003W").then_some(log)
    });
    assert!(
        log.contains("one created while this server runs takes effect when the server restarts"),
        "{log}"
    );
    env.ok(&["node", "stop", "--stop-servers"]);
}
