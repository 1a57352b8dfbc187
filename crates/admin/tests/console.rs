//! The scripting console against a real admin endpoint (served on a background runtime; the
//! console itself blocks, as in `keel admin`).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use keel_admin::{AdminClient, Console, ConsoleError, Registry};

struct Fixture {
    me: Arc<FakeMe>,
    server: BackgroundServer,
}

fn fixture() -> Fixture {
    let registry = Registry::new();
    let me = FakeMe::new();
    registry.register(me.clone());
    registry.register(TestServer::new("server1"));
    registry.register(TestServer::new("server2"));
    let server = BackgroundServer::start(registry);
    Fixture { me, server }
}

fn console(addr: std::net::SocketAddr) -> (Console, Captured) {
    let out = Captured::default();
    let console = Console::new(client(addr))
        .unwrap()
        .with_output(Box::new(out.clone()));
    (console, out)
}

fn script_error(e: ConsoleError) -> (String, usize, usize, String) {
    match e {
        ConsoleError::Script {
            source,
            line,
            column,
            message,
        } => (source, line, column, message),
        other => panic!("expected a script error, got {other:?}"),
    }
}

/// DESIGN.md §3, character for character: lines without `;`, trailing `//` comments.
const SEED_EXAMPLE: &str = r#"let myME = AdminControl.queryNames("type=SIBMessagingEngine,*").splitlines()[0];
AdminControl.invoke(myME, "state")            // "stopped"
AdminControl.invoke(myME, "start", ["FLUSH"])
AdminControl.invoke(myME, "state")            // "started"
"#;

#[test]
fn the_seed_example_runs_as_written() {
    let f = fixture();
    let (mut console, out) = console(f.server.addr);
    assert_eq!(f.me.state(), "stopped");
    console
        .run_script(SEED_EXAMPLE, "<command line>", true)
        .unwrap();
    assert_eq!(f.me.state(), "started");
    assert_eq!(*f.me.start_modes.lock().unwrap(), ["FLUSH"]);
    // Like wsadmin -c: the final value is printed, nothing else.
    assert_eq!(out.text(), "started\n");
}

#[test]
fn a_multi_line_script_loops_over_query_results() {
    let f = fixture();
    let (mut console, out) = console(f.server.addr);
    let script = r#"
// Every server, its state, and one attribute read back.
let servers = AdminControl.queryNames("type=Server,*").splitlines()
let count = 0
for s in servers {
    let state = AdminControl.invoke(s, "state")
    print(`${s} -> ${state}`)
    count += 1
}
let echoed = AdminControl.invoke(servers[0], "echo", [1, "two", #{three: 3}])
print(echoed[1] + " " + echoed[2].three)
let attrs = AdminControl.getAttributes(servers[1])
print(attrs.state == AdminControl.getAttribute(servers[1], "state"))
fn me_state() { AdminControl.invoke(AdminControl.queryNames("type=SIBMessagingEngine,*"), "state") }
print(me_state())
count
"#;
    console.run_script(script, "loop.keel", true).unwrap();
    let expected = [
        format!("{} -> running-server1", TestServer::object_name("server1")),
        format!("{} -> running-server2", TestServer::object_name("server2")),
        "two 3".to_string(),
        "true".to_string(),
        "stopped".to_string(),
        "2".to_string(),
    ];
    assert_eq!(out.text(), expected.join("\n") + "\n");
}

#[test]
fn variables_survive_between_scripts() {
    let f = fixture();
    let (mut console, out) = console(f.server.addr);
    console
        .run_script(
            "let me = AdminControl.queryNames(\"type=SIB*,*\")",
            "a",
            false,
        )
        .unwrap();
    console
        .run_script("fn twice(x) { x + x }", "b", false)
        .unwrap();
    console.run_script("twice(me.len())", "c", true).unwrap();
    assert_eq!(out.text(), format!("{}\n", 2 * ME_NAME.len()));
}

#[test]
fn admin_errors_are_script_errors_at_the_call() {
    let f = fixture();
    let (mut console, _out) = console(f.server.addr);
    let script = "let me = AdminControl.queryNames(\"type=SIBMessagingEngine,*\")\nlet s = AdminControl.invoke(me, \"state\")\n    AdminControl.invoke(me, \"fly\")\n";
    let (source, line, column, message) =
        script_error(console.run_script(script, "bad.keel", false).unwrap_err());
    assert_eq!(source, "bad.keel");
    assert_eq!(line, 3);
    assert!(
        (5..=18).contains(&column),
        "column {column} is not on the call"
    );
    assert_eq!(
        message,
        format!(
            "admin object {ME_NAME} has no operation `fly`; its operations are: state, start, stop"
        )
    );

    // An operation's own refusal, raised inside a script function, keeps the innermost position.
    let script = "fn warm(me) {\n  AdminControl.invoke(me, \"start\", [\"WARM\"])\n}\nwarm(AdminControl.queryNames(\"type=SIB*,*\"))";
    let (_, line, _, message) =
        script_error(console.run_script(script, "fn.keel", false).unwrap_err());
    assert_eq!(line, 2);
    assert!(
        message.starts_with("in function `warm`: operation `start` of"),
        "{message}"
    );
    assert!(message.contains("refused its arguments"), "{message}");
    assert_eq!(f.me.state(), "stopped");

    // The full Display is the operator's line.
    let e = console
        .run_script(
            "\n\nAdminControl.getAttribute(\"Keel:type=Nope,name=x\", \"state\")",
            "c",
            false,
        )
        .unwrap_err();
    assert!(e.to_string().starts_with("c: line 3, column "), "{e}");
    assert!(
        e.to_string()
            .contains("no admin object named Keel:type=Nope,name=x is registered"),
        "{e}"
    );
}

#[test]
fn syntax_errors_report_line_and_column() {
    let f = fixture();
    let (mut console, out) = console(f.server.addr);
    let (source, line, column, message) = script_error(
        console
            .run_script(
                "let a = 1\nlet b = 2\nlet c = a +* b\n",
                "syntax.keel",
                false,
            )
            .unwrap_err(),
    );
    assert_eq!(
        (source.as_str(), line, column),
        ("syntax.keel", 3, 12),
        "{message}"
    );
    // Two statements on one line still need a `;`: the repair only applies at line breaks.
    let (_, line, column, message) = script_error(
        console
            .run_script("let a = 1 let b = 2", "x", false)
            .unwrap_err(),
    );
    assert_eq!((line, column), (1, 11), "{message}");
    assert!(message.contains("';'"), "{message}");
    // Nothing ran.
    assert_eq!(out.text(), "");
}

#[test]
fn a_runaway_script_is_stopped_with_a_clear_error() {
    let f = fixture();
    let (mut console, _out) = console(f.server.addr);
    let started = Instant::now();
    let (_, line, _, message) = script_error(
        console
            .run_script("let i = 0;\nloop {\n  i += 1;\n}", "spin", false)
            .unwrap_err(),
    );
    assert!(
        message.contains("stopped after 10000000 operations"),
        "{message}"
    );
    assert!((2..=3).contains(&line), "line {line}");
    assert!(started.elapsed() < Duration::from_secs(120));

    let (_, _, _, message) = script_error(
        console
            .run_script("fn down(n) { down(n + 1) }\ndown(0)", "deep", false)
            .unwrap_err(),
    );
    assert!(
        message.contains("nested deeper than 64 levels"),
        "{message}"
    );

    let (_, _, _, message) = script_error(
        console
            .run_script("let s = \"x\"; loop { s += s; }", "big", false)
            .unwrap_err(),
    );
    assert!(
        message.contains("larger than the console allows"),
        "{message}"
    );
}

#[test]
fn an_unreachable_endpoint_is_reported_in_the_script() {
    let addr = closed_addr();
    let (mut console, _out) = console(addr);
    let (_, line, _, message) = script_error(
        console
            .run_script("\nAdminControl.queryNames(\"*\")", "c", false)
            .unwrap_err(),
    );
    assert_eq!(line, 2);
    assert!(
        message.starts_with(&format!("no Keel process answers at {addr}")),
        "{message}"
    );
}

#[test]
fn a_console_refuses_to_live_inside_an_async_runtime() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let client = AdminClient::new(closed_addr(), credential());
    let result = runtime.block_on(async move { Console::new(client).map(|_| ()) });
    match result {
        Err(ConsoleError::Io(e)) => assert!(e.to_string().contains("async runtime"), "{e}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
}
