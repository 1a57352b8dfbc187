//! Data sources and applications through the real `keel` binary: passwords go to the profile's
//! secrets and never into the configuration, every application kind, list, delete, and bad
//! input answered with one sentence.

mod common;

use common::Env;

fn mode(path: &std::path::Path) -> u32 {
    std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(path).unwrap().permissions()) & 0o777
}

#[test]
fn datasources_and_applications_through_the_cli() {
    let env = Env::new();
    let me1 = "node01.server1-bus1";
    env.ok(&["server", "create", "server2"]);
    env.ok(&["bus", "add-member", "bus1", "--server", "server2"]);
    for (q, me) in [("in", me1), ("out", me1), ("far", "node01.server2-bus1")] {
        env.ok(&[
            "destination",
            "create",
            "bus1",
            q,
            "--type",
            "queue",
            "--me",
            me,
        ]);
    }

    // The password is taken out of the URL and kept in the profile's secrets.
    let out = env.ok(&[
        "datasource",
        "create",
        "pg1",
        "--kind",
        "postgres",
        "--url",
        "postgresql://u:secret@127.0.0.1:5432/db",
    ]);
    assert!(out.contains("Data source pg1 created (postgres"), "{out}");
    assert!(out.contains("kept in the profile's secrets"), "{out}");
    assert!(!out.contains(":secret@"), "{out}");
    let cfg_file = env.profile.join("config/datasources/pg1.toml");
    let text = std::fs::read_to_string(&cfg_file).unwrap();
    assert!(!text.contains("secret"), "{text}");
    assert!(
        text.contains("url = \"postgresql://u@127.0.0.1:5432/db\""),
        "{text}"
    );
    let secret = env.profile.join("secrets/datasources/pg1");
    assert_eq!(
        std::fs::read_to_string(&secret).unwrap().trim_end(),
        "secret"
    );
    assert_eq!(mode(&secret), 0o600);
    // Or from an environment variable.
    let r = env
        .cmd(&[
            "datasource",
            "create",
            "m1",
            "--kind",
            "mariadb",
            "--url",
            "mysql://keel@127.0.0.1:3306/db",
            "--password-env",
            "M1_PW",
        ])
        .env("M1_PW", "from-env")
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert_eq!(
        std::fs::read_to_string(env.profile.join("secrets/datasources/m1"))
            .unwrap()
            .trim_end(),
        "from-env"
    );
    let list: serde_json::Value =
        serde_json::from_str(&env.ok(&["datasource", "list", "--json"])).unwrap();
    assert_eq!(list.as_array().map(Vec::len), Some(2), "{list}");
    assert_eq!(list[1]["name"], "pg1");
    assert_eq!(list[1]["has_password"], true);
    assert!(!list.to_string().contains(":secret@"), "{list}");

    // One application of each kind.
    let out = env.ok(&[
        "app", "create", "fwd", "--server", "server1", "--on", "in", "--kind", "forward", "--to",
        "out",
    ]);
    assert!(
        out.contains("Application fwd created on server1 (forward, on bus1/in to bus1/out)"),
        "{out}"
    );
    env.ok(&[
        "app",
        "create",
        "sq",
        "--server",
        "server1",
        "--on",
        "in",
        "--kind",
        "sql",
        "--datasource",
        "pg1",
        "--statement",
        "INSERT INTO t(body) VALUES ($1)",
    ]);
    let script = env.dir().join("mover.rhai");
    let source = "fn on_message(msg) {\n    send(\"out\", \"a \\\"quoted\\\" \\\\ body\");\n}\n";
    std::fs::write(&script, source).unwrap();
    let out = env.ok(&[
        "app",
        "create",
        "mover",
        "--server",
        "server1",
        "--on",
        "in",
        "--kind",
        "script",
        "--script",
        script.to_str().unwrap(),
        "--concurrency",
        "8",
    ]);
    assert!(
        out.contains("Application mover created on server1 (script, on bus1/in)")
            && out.contains("next start"),
        "{out}"
    );
    let apps: serde_json::Value =
        serde_json::from_str(&env.ok(&["app", "list", "--json"])).unwrap();
    let names: Vec<&str> = apps
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["fwd", "mover", "sq"]);
    assert_eq!(apps[1]["script_bytes"], source.len());
    assert_eq!(apps[1]["concurrency"], 8);
    assert_eq!(apps[2]["datasource"], "pg1");
    let none: serde_json::Value =
        serde_json::from_str(&env.ok(&["app", "list", "--server", "server2", "--json"])).unwrap();
    assert_eq!(none, serde_json::json!([]));
    env.ok(&["config", "validate"]);

    // The data source cannot go while the sql application uses it.
    let err = env.fails(&["datasource", "delete", "pg1"]);
    assert!(err.contains("pg1") && err.contains("sq"), "{err}");
    assert!(secret.exists());
    env.ok(&["app", "delete", "sq"]);
    env.ok(&["datasource", "delete", "pg1"]);
    assert!(!secret.exists(), "the secret goes with the data source");
    assert!(!cfg_file.exists());

    // Bad input: one sentence each, nothing saved. server2 on two buses needs --bus.
    env.ok(&["bus", "add-member", "bus2", "--server", "server2"]);
    let version = std::fs::read_to_string(env.profile.join("config/cell.toml")).unwrap();
    let create = |extra: &[&str]| {
        let mut args = vec!["app", "create", "bad"];
        args.extend_from_slice(extra);
        env.fails(&args)
    };
    let err = create(&[
        "--server", "ghost", "--on", "in", "--kind", "forward", "--to", "out",
    ]);
    assert!(err.contains("ghost") && err.contains("server1"), "{err}");
    let err = create(&[
        "--server", "server1", "--on", "far", "--kind", "forward", "--to", "out",
    ]);
    assert!(
        err.contains("app.on") && err.contains("node01.server2-bus1") && err.contains(me1),
        "{err}"
    );
    let err = create(&[
        "--server", "server1", "--on", "nowhere", "--kind", "forward", "--to", "out",
    ]);
    assert!(err.contains("nowhere"), "{err}");
    let err = create(&["--server", "server1", "--on", "in", "--kind", "forward"]);
    assert!(err.contains("--to"), "{err}");
    let err = create(&[
        "--server",
        "server1",
        "--on",
        "in",
        "--kind",
        "script",
        "--script",
        "/nonexistent/x.rhai",
    ]);
    assert!(err.contains("/nonexistent/x.rhai"), "{err}");
    let err = create(&[
        "--server", "server2", "--on", "far", "--kind", "forward", "--to", "out",
    ]);
    assert!(err.contains("bus1, bus2") && err.contains("--bus"), "{err}");
    let err = env.fails(&[
        "datasource",
        "create",
        "m2",
        "--kind",
        "mariadb",
        "--url",
        "postgresql://u:pw@h/db",
    ]);
    assert!(err.contains("mysql://") && !err.contains(":pw@"), "{err}");
    assert!(!env.profile.join("secrets/datasources/m2").exists());
    let r = env
        .cmd(&[
            "datasource",
            "create",
            "m2",
            "--kind",
            "mariadb",
            "--url",
            "mysql://127.0.0.1/db",
            "--password-env",
            "M2_PW",
        ])
        .env("M2_PW", "x")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        !r.status.success() && err.contains("names no user"),
        "{err}"
    );
    assert!(!env.profile.join("secrets/datasources/m2").exists());
    assert_eq!(
        std::fs::read_to_string(env.profile.join("config/cell.toml")).unwrap(),
        version,
        "refused commands save nothing"
    );
    env.ok(&["config", "validate"]);
}
