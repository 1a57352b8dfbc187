//! The lab itself: hosts reach each other over the switch, a partition cuts one host off and
//! healing joins it again, the machine's own namespace cannot reach the lab, and dropping the
//! lab deletes every namespace it made.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keel_testkit::netlab::Lab;

const PORT: u16 = 7000;

/// A TCP server on host 0 that greets every connection.
fn greeter(lab: &Lab) -> Child {
    let code = format!(
        "import socket\ns = socket.socket()\ns.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\ns.bind(('{}', {PORT}))\ns.listen()\nwhile True:\n    c, _ = s.accept()\n    c.sendall(b'hi')\n    c.close()\n",
        lab.addr(0)
    );
    lab.cmd(0, "python3")
        .args(["-c", &code])
        .stdout(Stdio::null())
        .spawn()
        .unwrap()
}

/// Whether a connection from `cmd`'s host to host 0's greeter gets its greeting within 2 s.
fn greeted(mut cmd: Command, to: &str) -> bool {
    let code = format!(
        "import socket, sys\ntry:\n    s = socket.create_connection(('{to}', {PORT}), timeout=2)\n    sys.exit(0 if s.recv(2) == b'hi' else 1)\nexcept OSError:\n    sys.exit(1)\n"
    );
    cmd.args(["-c", &code]).status().is_ok_and(|s| s.success())
}

#[test]
fn hosts_reach_each_other_until_partitioned_and_nothing_outlives_the_lab() {
    let lab = Lab::new(3).unwrap();
    assert_eq!(lab.namespaces().len(), 4, "three hosts and the switch");
    let mut server = greeter(&lab);
    let to = lab.addr(0);
    // The greeter takes a moment to listen.
    let start = Instant::now();
    while !greeted(lab.cmd(1, "python3"), &to) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "host 1 never reached host 0"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(greeted(lab.cmd(2, "python3"), &to));
    // The machine's own namespace has no route into the lab.
    assert!(
        !greeted(Command::new("python3"), &to),
        "the lab leaks into the machine's namespace"
    );

    lab.partition(1).unwrap();
    assert!(
        !greeted(lab.cmd(1, "python3"), &to),
        "a partitioned host got through"
    );
    assert!(
        greeted(lab.cmd(2, "python3"), &to),
        "the others still reach each other"
    );
    lab.heal(1).unwrap();
    let start = Instant::now();
    while !greeted(lab.cmd(1, "python3"), &to) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "host 1 did not come back after heal"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let _ = server.kill();
    let _ = server.wait();
    let names = lab.namespaces();
    drop(lab);
    let left = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let left = String::from_utf8_lossy(&left.stdout);
    for n in names {
        assert!(!left.contains(&n), "namespace {n} outlived its lab");
    }
}
