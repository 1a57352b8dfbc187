//! A throwaway MariaDB server for tests (mariadb-install-db into a temp dir, `mariadbd` on a
//! free port of 127.0.0.1, root without a password, no binary log). Test support shared by the
//! transaction service's and the product's integration tests.

use std::path::Path;
use std::process::{Child, Command};

/// A running throwaway server; killed on drop.
pub struct Maria {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

/// Whether MariaDB's server and install tool are here.
pub fn available() -> bool {
    server_bin().is_some()
        && Command::new("mariadb-install-db")
            .arg("--help")
            .output()
            .is_ok()
}

fn server_bin() -> Option<&'static str> {
    // Debian puts it in /usr/sbin, which a non-root PATH may lack.
    ["/usr/sbin/mariadbd", "/usr/bin/mariadbd"]
        .into_iter()
        .find(|p| Path::new(p).is_file())
}

impl Maria {
    pub fn start() -> Maria {
        Maria::start_with(None)
    }

    /// A server that takes TCP connections over TLS only (`require_secure_transport`), with
    /// this certificate and key (PEM); its socket stays open for the `mariadb` client.
    pub fn start_tls(cert_pem: &str, key_pem: &str) -> Maria {
        Maria::start_with(Some((cert_pem, key_pem)))
    }

    fn start_with(tls: Option<(&str, &str)>) -> Maria {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        // Its own temp dir: two servers bootstrapping at once in one /tmp collided ("Unknown
        // table mysql.tmp_user_sys").
        let tmp = dir.path().join("tmp");
        std::fs::create_dir_all(&tmp).unwrap();
        let out = Command::new("mariadb-install-db")
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .arg(format!("--tmpdir={}", tmp.display()))
            .args([
                "--user=root",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
            ])
            .output()
            .expect("mariadb-install-db (MariaDB is installed)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = crate::pgtest::free_port_below_ephemeral();
        let mut tls_args = Vec::new();
        if let Some((cert, key)) = tls {
            let (cert_path, key_path) =
                (dir.path().join("server.crt"), dir.path().join("server.key"));
            std::fs::write(&cert_path, cert).unwrap();
            std::fs::write(&key_path, key).unwrap();
            tls_args = vec![
                format!("--ssl-cert={}", cert_path.display()),
                format!("--ssl-key={}", key_path.display()),
                "--require-secure-transport=ON".to_string(),
            ];
        }
        let child = Command::new(server_bin().unwrap_or("mariadbd"))
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .arg(format!("--socket={}", dir.path().join("sock").display()))
            .arg(format!("--tmpdir={}", tmp.display()))
            .arg(format!("--port={port}"))
            .args([
                "--bind-address=127.0.0.1",
                "--user=root",
                "--skip-log-bin",
                "--innodb-buffer-pool-size=16M",
            ])
            .args(&tls_args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("mariadbd");
        let m = Maria { child, port, dir };
        for _ in 0..600 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return m;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!("MariaDB did not start");
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self, db: &str) -> String {
        format!("mysql://root@127.0.0.1:{}/{db}", self.port)
    }

    /// The `mariadb` command-line client connected to this server (over its socket).
    pub fn client(&self) -> Command {
        let mut c = Command::new("mariadb");
        c.arg("--no-defaults")
            .arg(format!(
                "--socket={}",
                self.dir.path().join("sock").display()
            ))
            .args(["--user=root", "--batch", "--skip-column-names"]);
        c
    }
}

impl Drop for Maria {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
