//! Configuration commands, config backup/restore, admin API credentials, queries and the
//! console, `keel explain`, and bad input, all through the real `keel` binary.

mod common;

use common::{http_status, Env};

#[test]
fn config_backup_change_restore_gives_back_the_earlier_config() {
    let env = Env::new();
    let archive = env.dir().join("cfg.keelcfg");
    env.ok(&["config", "backup", "--to", archive.to_str().unwrap()]);
    let out = env.ok(&["server", "create", "server2"]);
    assert!(out.contains("Created server server2"), "{out}");
    assert!(env.ok(&["config", "validate"]).contains("2 server(s)"));
    let out = env.ok(&["config", "restore", archive.to_str().unwrap()]);
    assert!(out.contains("Restored configuration"), "{out}");
    let out = env.ok(&["config", "validate"]);
    assert!(out.contains("1 server(s)"), "{out}");
    let err = env.fails(&["server", "status", "server2"]);
    assert!(err.contains("server2"), "{err}");
}

#[test]
fn damaged_or_truncated_archives_are_refused_and_change_nothing() {
    let env = Env::new();
    let archive = env.dir().join("cfg.keelcfg");
    env.ok(&["config", "backup", "--to", archive.to_str().unwrap()]);
    env.ok(&["server", "create", "server2"]);
    let before = snapshot(&env.profile.join("config"));
    let bytes = std::fs::read(&archive).unwrap();
    let truncated = env.dir().join("truncated.keelcfg");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let err = env.fails(&["config", "restore", truncated.to_str().unwrap()]);
    assert!(err.contains("truncated.keelcfg"), "{err}");
    let garbage = env.dir().join("garbage.keelcfg");
    std::fs::write(&garbage, b"this is not an archive").unwrap();
    env.fails(&["config", "restore", garbage.to_str().unwrap()]);
    assert_eq!(
        before,
        snapshot(&env.profile.join("config")),
        "a refused restore must not touch config/"
    );

    // An archive of another cell is foreign.
    let other = Env::new_with(&["--cell", "otherCell"]);
    let foreign = env.dir().join("foreign.keelcfg");
    other.ok(&["config", "backup", "--to", foreign.to_str().unwrap()]);
    let err = env.fails(&["config", "restore", foreign.to_str().unwrap()]);
    assert!(err.contains("otherCell"), "{err}");
}

fn snapshot(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if !p.ends_with(".lock") {
                out.push((p.display().to_string(), std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn bad_input_gets_one_sentence_and_corrupts_nothing() {
    let env = Env::new();
    // Profile created twice in the same directory.
    let err = env.fails(&["profile", "create", env.profile.to_str().unwrap()]);
    assert!(err.contains("already"), "{err}");
    // Unknown server.
    let err = env.fails(&["server", "status", "nosuch"]);
    assert!(err.contains("nosuch"), "{err}");
    let err = env.fails(&[
        "server",
        "set-monitor-policy",
        "nosuch",
        "--auto-restart",
        "false",
    ]);
    assert!(err.contains("nosuch"), "{err}");
    // Not a profile.
    let r = env
        .cmd(&["config", "validate"])
        .arg("--profile")
        .arg(env.dir())
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&r.stderr).contains("not a Keel profile"));
    // Invalid monitor value: refused, nothing written.
    let err = env.fails(&[
        "server",
        "set-monitor-policy",
        "server1",
        "--ping-interval-s",
        "0",
    ]);
    assert!(err.contains("ping_interval_s"), "{err}");
    // Invalid TOML names the file.
    let server_file = env.profile.join("config/nodes/node01/servers/server1.toml");
    let good = std::fs::read_to_string(&server_file).unwrap();
    std::fs::write(&server_file, format!("{good}\n[monitor\n")).unwrap();
    let err = env.fails(&["config", "validate"]);
    assert!(err.contains("server1.toml"), "{err}");
    std::fs::write(&server_file, good.replace("auto_restart", "auto_restrat")).unwrap();
    let err = env.fails(&["config", "validate"]);
    assert!(
        err.contains("server1.toml") && err.contains("auto_restrat"),
        "{err}"
    );
    std::fs::write(&server_file, &good).unwrap();
    env.ok(&["config", "validate"]);
    // Unwritable location for a new profile.
    let ro = env.dir().join("ro");
    std::fs::create_dir(&ro).unwrap();
    std::fs::set_permissions(&ro, std::os::unix::fs::PermissionsExt::from_mode(0o500)).unwrap();
    if std::fs::write(ro.join("probe"), b"x").is_err() {
        let err = env.fails(&["profile", "create", ro.join("p").to_str().unwrap()]);
        assert!(err.contains("ro"), "{err}");
    }
    // A location that cannot hold a directory (as root, mode bits alone would not stop us).
    let file = env.dir().join("afile");
    std::fs::write(&file, b"x").unwrap();
    let err = env.fails(&["profile", "create", file.join("p").to_str().unwrap()]);
    assert!(err.contains("afile"), "{err}");
    // Unknown message ID.
    let err = env.fails(&["explain", "NOPE1234X"]);
    assert!(err.contains("NOPE1234X"));
}

#[test]
fn admin_api_requires_the_profile_credential() {
    let env = Env::new();
    env.ok(&["node", "start"]);
    let port = env.base_port;
    let body = r#"{"pattern":"*"}"#;
    let req = |auth: &str| {
        format!("POST /v1/query HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n{auth}\r\n{body}", body.len())
    };
    assert_eq!(http_status(port, &req("")), 401);
    let wrong = common::base64(&format!("admin:{}x", env.admin_password()));
    assert_eq!(
        http_status(port, &req(&format!("Authorization: Basic {wrong}\r\n"))),
        401
    );
    let right = common::base64(&format!("admin:{}", env.admin_password()));
    assert_eq!(
        http_status(port, &req(&format!("Authorization: Basic {right}\r\n"))),
        200
    );
    let log = env.log("nodeagent");
    assert!(
        log.contains("ADMN0003W")
            && log.contains("no credential")
            && log.contains("wrong user or password"),
        "{log}"
    );
    // The password file is private to its owner.
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(env.profile.join("secrets/admin-password"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    env.ok(&["node", "stop"]);
}

#[test]
fn admin_queries_invokes_and_console_scripts() {
    let env = Env::new();
    env.ok(&["node", "start"]);
    env.ok(&["server", "start", "server1"]);
    let names = env.ok(&["admin", "query", "type=Server,*"]);
    assert_eq!(
        names.trim(),
        "Keel:type=Server,name=server1,node=node01,process=server1"
    );
    let all = env.ok(&["admin", "query", "*"]);
    assert!(
        all.contains("type=NodeAgent") && all.contains("type=Server"),
        "{all}"
    );
    assert_eq!(env.ok(&["admin", "query", "type=Nope,*"]).trim(), "");
    let state = env.ok(&["admin", "invoke", names.trim(), "state"]);
    assert_eq!(state.trim(), "started");
    let err = env.fails(&["admin", "invoke", names.trim(), "explode"]);
    assert!(err.contains("explode"), "{err}");

    // -c prints the final value, like wsadmin.
    let out = env.ok(&[
        "admin",
        "-c",
        r#"AdminControl.invoke(AdminControl.queryNames("type=Server,*").splitlines()[0], "state")"#,
    ]);
    assert_eq!(out.trim(), "started");

    // A multi-line script in the seed's style: no `;` at line ends, comments, a loop.
    let script = env.dir().join("script.rhai");
    std::fs::write(
        &script,
        r#"let names = AdminControl.queryNames("*").splitlines()
let count = 0
for n in names {
    count += 1
    print(n)
}
let s = AdminControl.queryNames("type=Server,*").splitlines()[0];
AdminControl.invoke(s, "state")            // "started"
print("servers state: " + AdminControl.getAttribute(s, "state"))
print("objects: " + count)
"#,
    )
    .unwrap();
    let out = env.ok(&["admin", "-f", script.to_str().unwrap()]);
    assert!(
        out.contains("servers state: started")
            && out.contains(&format!(
                "objects: {}",
                env.ok(&["admin", "query", "*"]).lines().count()
            )),
        "{out}"
    );

    // Script errors give line and column.
    std::fs::write(&script, "let a = 1;\nlet b = nosuchvar + 1;\n").unwrap();
    let err = env.fails(&["admin", "-f", script.to_str().unwrap()]);
    assert!(err.contains("line 2"), "{err}");

    // Stopping a server through the console is a normal stop.
    env.ok(&[
        "admin",
        "-c",
        r#"AdminControl.invoke(AdminControl.queryNames("type=Server,*").splitlines()[0], "stop")"#,
    ]);
    env.wait_for(
        std::time::Duration::from_secs(10),
        "server1 stopped",
        || (env.status("server1")["state"] == "stopped").then_some(()),
    );
    assert!(env.log("server1").contains("WSVR0024I"));
    env.ok(&["node", "stop"]);
}

#[test]
fn explain_prints_the_catalog_entry() {
    let env = Env::new();
    let out = env.ok(&["explain", "cwsip0784e"]);
    assert!(
        out.contains("CWSIP0784E") && out.contains("restart-after-restore"),
        "{out}"
    );
    let out = env.ok(&["explain", "WSVR0001I"]);
    assert!(out.contains("User action"), "{out}");
}
