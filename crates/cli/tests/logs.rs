//! `keel logs view` over the real processes' binary log repositories: filters combined, JSON
//! lines parsed, `--tail`, `--follow` across a restart of the server, the LogRepository admin
//! object, and bad input.

mod common;

use std::io::{BufRead, BufReader};
use std::time::Duration;

use common::Env;

fn json_lines(out: &str) -> Vec<serde_json::Value> {
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

#[test]
fn the_viewer_filters_follows_and_reports() {
    let env = Env::new();
    env.ok(&["node", "start"]);
    env.ok(&["server", "start", "server1"]);

    // The server's records, as JSON lines with every field the issue names.
    let view = |extra: &[&str]| {
        let mut args = vec!["logs", "view", "--server", "server1", "--format", "json"];
        args.extend_from_slice(extra);
        json_lines(&env.ok(&args))
    };
    let open = env.wait_for(
        Duration::from_secs(10),
        "WSVR0001I in the repository",
        || {
            let v = view(&["--message", "WSVR0001I"]);
            (!v.is_empty()).then_some(v)
        },
    );
    assert_eq!(open.len(), 1);
    for key in ["time", "level", "process", "thread", "logger", "id", "text"] {
        assert!(!open[0][key].is_null(), "{key} in {}", open[0]);
    }
    assert_eq!(open[0]["process"], "server1");
    assert_eq!(open[0]["level"], "INFO");
    assert!(open[0]["text"].as_str().unwrap().contains("open for work"));

    // Filters combined: an ID list, a level window, a logger, a text.
    let both = view(&["--message", "WSVR0100I,WSVR0001I"]);
    assert_eq!(both.len(), 2);
    assert!(view(&["--message", "WSVR0001I", "--min-level", "warn"]).is_empty());
    assert_eq!(
        view(&["--message", "WSVR0001I", "--max-level", "info"]).len(),
        1
    );
    // `--json` is `--format json`; the level names the repository always took still work.
    let json_spelling = json_lines(&env.ok(&[
        "logs",
        "view",
        "--server",
        "server1",
        "--json",
        "--message",
        "WSVR0001I",
    ]));
    assert_eq!(json_spelling, open);
    assert!(view(&["--message", "WSVR0001I", "--min-level", "WARNING"]).is_empty());
    assert_eq!(
        view(&["--message", "WSVR0001I", "--max-level", "I"]).len(),
        1
    );
    let engine = view(&["--logger", "engine", "--contains", "started"]);
    assert!(!engine.is_empty());
    assert!(engine
        .iter()
        .all(|r| r["logger"].as_str().unwrap().starts_with("engine")));
    assert!(view(&["--since", "1h", "--message", "WSVR0001I"]).len() == 1);
    assert!(view(&["--until", "2000-01-01T00:00:00Z"]).is_empty());
    assert_eq!(view(&["--tail", "2"]).len(), 2);
    let text = env.ok(&[
        "logs",
        "view",
        "--server",
        "server1",
        "--message",
        "WSVR0001I",
    ]);
    assert!(
        text.contains(" server I WSVR0001I: Server server1 open for work"),
        "{text}"
    );

    // Follow across a restart: the stop and the next start's records arrive.
    let mut follower = env
        .cmd(&[
            "logs",
            "view",
            "--server",
            "server1",
            "--follow",
            "--format",
            "json",
            "--message",
            "WSVR0024I,WSVR0001I",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(follower.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    assert!(first.contains("WSVR0001I"), "{first}");
    env.ok(&["server", "stop", "server1"]);
    env.ok(&["server", "start", "server1"]);
    let next: Vec<String> = (0..2).map(|_| lines.next().unwrap().unwrap()).collect();
    assert!(next[0].contains("WSVR0024I"), "{next:?}");
    assert!(next[1].contains("WSVR0001I"), "{next:?}");
    let _ = follower.kill();
    let _ = follower.wait();

    // The repository's admin object.
    let names = env.ok(&["admin", "query", "type=LogRepository,process=server1,*"]);
    let name = names
        .lines()
        .next()
        .expect("a LogRepository object")
        .to_string();
    let stats: serde_json::Value =
        serde_json::from_str(&env.ok(&["admin", "invoke", &name, "stats"])).unwrap();
    assert!(stats["size_bytes"].as_u64().unwrap() > 0, "{stats}");
    assert!(
        stats["segments"].as_u64().unwrap() >= 2,
        "a segment per start: {stats}"
    );
    assert_eq!(stats["dropped"], 0);
    assert!(stats["oldest"].as_str().is_some());

    // Bad input: one sentence each.
    let err = env.fails(&["logs", "view", "--server", "ghost"]);
    assert!(err.contains("no server ghost"), "{err}");
    // A level outside the set is a usage error (exit 2), naming the levels.
    let r = env.keel(&["logs", "view", "--server", "server1", "--min-level", "loud"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.starts_with("keel: ") && r.stderr.contains("error, warn, info, debug, trace"),
        "{}",
        r.stderr
    );
    let err = env.fails(&["logs", "view", "--server", "server1", "--since", "soon"]);
    assert!(err.contains("RFC 3339"), "{err}");
    // The node agent's own repository.
    let node = json_lines(&env.ok(&[
        "logs", "view", "--node", "node01", "--format", "json", "--tail", "5",
    ]));
    assert!(!node.is_empty());
    assert!(node.iter().all(|r| r["process"] == "nodeagent"));
    env.ok(&["node", "stop", "--stop-servers"]);
}
