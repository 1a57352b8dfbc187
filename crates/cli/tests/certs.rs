//! The cell's certificates (issue 21, DESIGN §10): `keel profile create` makes a CA and a
//! certificate per process that OpenSSL verifies against it, owner-only; `keel cert show` and
//! `keel cert renew` (one, all, or a new CA); a profile without certificates gets them when
//! its node agent starts (ADMN0040I), and the node agent shows their expiry as an attribute.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use common::Env;
use serde_json::Value;

fn show(env: &Env) -> Vec<Value> {
    serde_json::from_str::<Value>(&env.ok(&["cert", "show", "--json"]))
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn tls_dir(env: &Env) -> PathBuf {
    env.profile.join("secrets").join("tls")
}

/// `openssl verify` of `name`'s certificate against the profile's CA: its output.
fn openssl_verify(env: &Env, name: &str) -> (bool, String) {
    let dir = tls_dir(env);
    let out = std::process::Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(dir.join("ca.pem"))
        .arg("-purpose")
        .arg("sslserver")
        .arg(dir.join(format!("{name}.pem")))
        .output()
        .expect("openssl runs");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn a_new_profile_has_a_ca_and_process_certificates_openssl_verifies() {
    let env = Env::new();
    let certs = show(&env);
    let names: Vec<&str> = certs.iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["ca", "node01.nodeagent", "node01.server1"]);
    assert_eq!(certs[0]["is_ca"], true);
    assert!(
        certs[0]["days_left"].as_i64().unwrap() >= 3_649,
        "{}",
        certs[0]
    );
    let server = &certs[2];
    assert_eq!(server["is_ca"], false);
    assert_eq!(server["issuer"], certs[0]["subject"]);
    assert!(server["subject"]
        .as_str()
        .unwrap()
        .contains("node01/server1"));
    assert_eq!(
        server["names"],
        serde_json::json!(["localhost", "127.0.0.1"])
    );
    assert!(
        (396..=397).contains(&server["days_left"].as_i64().unwrap()),
        "{server}"
    );
    for name in ["node01.nodeagent", "node01.server1"] {
        let (ok, out) = openssl_verify(&env, name);
        assert!(ok, "{name}: {out}");
    }
    // Owner only: the keys are the cell's identity.
    let dir = tls_dir(&env);
    assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
    for f in std::fs::read_dir(&dir).unwrap() {
        let f = f.unwrap();
        assert_eq!(
            f.metadata().unwrap().mode() & 0o777,
            0o600,
            "{}",
            f.path().display()
        );
    }
    let table = env.ok(&["cert", "show"]);
    assert!(
        table.contains("DAYS LEFT") && table.contains("node01.server1"),
        "{table}"
    );
    assert!(!table.contains("Expiring"), "{table}");
}

#[test]
fn renewing_one_or_all_keeps_the_ca_and_a_new_ca_reissues_everything() {
    let env = Env::new();
    let before = show(&env);
    let out: Value =
        serde_json::from_str(&env.ok(&["cert", "renew", "node01.server1", "--json"])).unwrap();
    assert_eq!(out["renewed"], serde_json::json!(["node01.server1"]));
    let after = show(&env);
    assert_eq!(after[0]["sha256"], before[0]["sha256"], "the CA stays");
    assert_eq!(
        after[1]["sha256"], before[1]["sha256"],
        "the node agent's stays"
    );
    assert_ne!(
        after[2]["sha256"], before[2]["sha256"],
        "the server's is new"
    );
    assert!(openssl_verify(&env, "node01.server1").0);

    let text = env.ok(&["cert", "renew", "--ca"]);
    assert!(
        text.contains("Renewed certificate ca") && text.contains("restart"),
        "{text}"
    );
    let again = show(&env);
    assert_ne!(again[0]["sha256"], after[0]["sha256"], "a new CA");
    for name in ["node01.nodeagent", "node01.server1"] {
        let (ok, out) = openssl_verify(&env, name);
        assert!(ok, "{name} signed by the new CA: {out}");
    }

    let e = env.fails(&["cert", "renew", "node01.nobody"]);
    assert!(
        e.contains("no process node01.nobody") && e.contains("node01.server1"),
        "{e}"
    );
    let e = env.fails(&["cert", "renew"]);
    assert!(e.contains("--all or --ca"), "{e}");
    let e = env.fails(&["cert", "show", "nobody"]);
    assert!(e.contains("no certificate named nobody"), "{e}");
}

#[test]
fn a_profile_without_certificates_gets_them_when_its_node_agent_starts() {
    let env = Env::new();
    std::fs::remove_dir_all(tls_dir(&env)).unwrap();
    let e = env.fails(&["cert", "show"]);
    assert!(e.contains("keel cert renew --ca"), "{e}");
    env.ok(&["node", "start"]);
    let log = env.log("nodeagent");
    assert!(log.contains("ADMN0040I"), "{log}");
    assert_eq!(show(&env).len(), 3);
    // The node agent shows expiry as an attribute.
    let name = env
        .ok(&["admin", "query", "type=NodeAgent,*"])
        .trim()
        .to_string();
    let attr: Value =
        serde_json::from_str(&env.ok(&["admin", "get", &name, "certificates"])).unwrap();
    let list = attr.as_array().unwrap_or_else(|| panic!("{attr}"));
    assert_eq!(list.len(), 3, "{attr}");
    assert!(
        list.iter().all(|c| c["days_left"].as_i64().unwrap() > 30),
        "{attr}"
    );
    // Nothing is made twice.
    env.ok(&["node", "stop"]);
    env.ok(&["node", "start"]);
    assert_eq!(env.log("nodeagent").matches("ADMN0040I").count(), 1);
    env.ok(&["node", "stop"]);
}

/// `curl --cacert` (a client Keel did not build) against the admin API of a running server
/// and of the node agent over HTTPS on their admin ports; plain HTTP still answers on
/// loopback; a client without the CA is refused by its own certificate check.
#[test]
fn curl_reaches_the_admin_api_over_https_with_the_cell_ca() {
    let env = Env::new();
    env.ok(&["node", "start"]);
    env.ok(&["server", "start", "server1"]);
    let ca = tls_dir(&env).join("ca.pem");
    let user = format!("admin:{}", env.admin_password());
    let curl = |args: &[&str]| {
        let out = std::process::Command::new("curl")
            .args(["-sS", "--max-time", "10", "-u", &user])
            .args(args)
            .output()
            .expect("curl runs");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    for (who, port) in [
        ("node agent", env.base_port),
        ("server1", env.base_port + 1),
    ] {
        let url = format!("https://127.0.0.1:{port}/v1/ping");
        let (code, body, err) = curl(&["--cacert", ca.to_str().unwrap(), &url]);
        assert_eq!(code, 0, "{who}: {err}");
        let pong: Value =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("{who}: {e}: {body}"));
        assert_eq!(pong["ok"], true, "{who}: {pong}");
        // By name too (the certificate holds localhost).
        let url = format!("https://localhost:{port}/v1/ping");
        let (code, _, err) = curl(&["--cacert", ca.to_str().unwrap(), &url]);
        assert_eq!(code, 0, "{who} by name: {err}");
        // Without the CA, curl's own check refuses the certificate (exit 60).
        let (code, _, err) = curl(&[&format!("https://127.0.0.1:{port}/v1/ping")]);
        assert_eq!(code, 60, "{who} without the CA: {err}");
        // Plain HTTP on loopback, as the CLI uses it.
        let (code, body, err) = curl(&[&format!("http://127.0.0.1:{port}/v1/ping")]);
        assert_eq!(code, 0, "{who} plain: {err}");
        assert!(body.contains("\"ok\""), "{body}");
    }
    env.ok(&["node", "stop", "--stop-servers"]);
}

/// Runs `openssl` with the words of `command` in `dir`; panics with its output when it fails.
fn openssl(dir: &std::path::Path, command: &str) -> String {
    let out = std::process::Command::new("openssl")
        .current_dir(dir)
        .args(command.split_whitespace())
        .output()
        .expect("openssl runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "openssl {command}: {text}");
    text
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// An operator's own CA and server certificate, made with OpenSSL (not by Keel): refused while
/// the cell's CA does not sign it, and a CA that does not sign the certificates in place is
/// refused unless they are re-issued; once installed, the server presents the operator's
/// certificate on its admin port.
#[test]
fn an_operators_own_pem_files_are_checked_and_then_served() {
    let env = Env::new();
    let ops = env.dir().join("operator");
    std::fs::create_dir(&ops).unwrap();
    const P256: &str = "-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes";
    openssl(&ops, &format!("req -x509 {P256} -keyout ca.key -out ca.pem -subj /CN=Operator-CA -days 3650 -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign"));
    openssl(
        &ops,
        &format!("req {P256} -keyout server1.key -out server1.csr -subj /CN=operator-server1"),
    );
    std::fs::write(
        ops.join("ext.cnf"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n",
    )
    .unwrap();
    openssl(&ops, "x509 -req -in server1.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server1.pem -days 20 -extfile ext.cnf");
    let p = |f: &str| ops.join(f).to_str().unwrap().to_string();

    // `keel cert use node01.server1` with the operator's certificate and the key named.
    let (cert, server_key, ca_key) = (p("server1.pem"), p("server1.key"), p("ca.key"));
    let use_server = |key: &str| -> Vec<String> {
        [
            "cert",
            "use",
            "node01.server1",
            "--tls-cert",
            &cert,
            "--tls-key",
            key,
        ]
        .iter()
        .map(|a| a.to_string())
        .collect()
    };
    let e = env.fails(&strs(&use_server(&server_key)));
    assert!(
        e.contains("refused by a client trusting the cell's CA"),
        "{e}"
    );
    let e = env.fails(&["cert", "use", "ca", "--tls-ca", &p("ca.pem")]);
    assert!(
        e.contains("does not sign the certificates of node01.nodeagent, node01.server1"),
        "{e}"
    );
    let e = env.fails(&strs(&use_server(&ca_key)));
    assert!(
        e.contains("does not go with its key") || e.contains("refused"),
        "{e}"
    );

    let out = env.ok(&[
        "cert",
        "use",
        "ca",
        "--tls-ca",
        &p("ca.pem"),
        "--tls-key",
        &p("ca.key"),
        "--reissue",
    ]);
    assert!(out.contains("re-issued"), "{out}");
    let mut with_json = use_server(&server_key);
    with_json.push("--json".into());
    let out: Value = serde_json::from_str(&env.ok(&strs(&with_json))).unwrap();
    assert_eq!(out["missing_names"], serde_json::json!([]), "{out}");
    assert!(
        out["certificate"]["subject"]
            .as_str()
            .unwrap()
            .contains("operator-server1"),
        "{out}"
    );
    // Twenty days left: `show` warns.
    let table = env.ok(&["cert", "show"]);
    assert!(
        table.contains("Expiring within 30 days") && table.contains("node01.server1"),
        "{table}"
    );

    env.ok(&["node", "start"]);
    env.ok(&["server", "start", "server1"]);
    let port = (env.base_port + 1).to_string();
    let seen = openssl(&ops, &format!("s_client -connect 127.0.0.1:{port} -CAfile ca.pem -verify_return_error -verify_ip 127.0.0.1"));
    assert!(
        seen.contains("operator-server1") && seen.contains("Verify return code: 0"),
        "{seen}"
    );
    // The node agent warns of the certificate that expires within 30 days.
    let log = env.log("nodeagent");
    assert!(
        log.contains("ADMN0041W") && log.contains("node01.server1"),
        "{log}"
    );
    env.ok(&["node", "stop", "--stop-servers"]);
}
