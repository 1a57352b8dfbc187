//! A throwaway PostgreSQL cluster for tests (initdb + pg_ctl from /usr/lib/postgresql/*/bin,
//! run as the `postgres` user when we are root, data and socket in a temp dir, a free port,
//! trust authentication on the unix socket and 127.0.0.1). Shared by the store's and the
//! product's integration tests and by `keel-bench`.

use std::path::PathBuf;
use std::process::Command;

/// The newest installed PostgreSQL bin directory holding initdb and pg_ctl.
pub fn pg_bin() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("bin"))
        .filter(|b| b.join("initdb").is_file() && b.join("pg_ctl").is_file())
        .collect();
    dirs.sort_by_key(|d| {
        d.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    dirs.pop()
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A running throwaway cluster; stopped (immediately) on drop.
pub struct Cluster {
    bin: PathBuf,
    data: PathBuf,
    root: bool,
    socket_dir: PathBuf,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Cluster {
    fn run(&self, program: &str, args: &[&str]) -> std::process::Output {
        let exe = self.bin.join(program);
        let mut cmd = if self.root {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        let out = cmd.args(args).output().expect("run a PostgreSQL tool");
        assert!(
            out.status.success(),
            "{program} {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    pub fn start(bin: PathBuf) -> Cluster {
        Cluster::start_with(bin, 64)
    }

    /// A cluster allowing `max_prepared` prepared transactions (benchmarks of recovery hold
    /// thousands at once).
    pub fn start_with(bin: PathBuf, max_prepared: u32) -> Cluster {
        Cluster::start_full(bin, max_prepared, None)
    }

    /// A cluster that takes TCP connections over TLS only (`hostssl` in pg_hba.conf), with
    /// this certificate and key (PEM); the unix socket stays open for `psql`.
    pub fn start_tls(bin: PathBuf, cert_pem: &str, key_pem: &str) -> Cluster {
        Cluster::start_full(bin, 64, Some((cert_pem, key_pem)))
    }

    fn start_full(bin: PathBuf, max_prepared: u32, tls: Option<(&str, &str)>) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let root = is_root();
        if root {
            let out = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .output()
                .unwrap();
            assert!(out.status.success(), "chown the cluster dir to postgres");
        }
        let port = free_port_below_ephemeral();
        let c = Cluster {
            bin,
            data: dir.path().join("data"),
            root,
            socket_dir: dir.path().to_path_buf(),
            port,
            _dir: dir,
        };
        let data = c.data.display().to_string();
        c.run(
            "initdb",
            &[
                "-D",
                &data,
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        );
        let mut opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=100 -c max_prepared_transactions={max_prepared}",
            c.port,
            c.socket_dir.display()
        );
        if let Some((cert, key)) = tls {
            // Owned by the server's user, key 0600 (PostgreSQL refuses a key others can read).
            let hba = "local all all trust\nhostssl all all 127.0.0.1/32 trust\n";
            for (name, text) in [
                ("server.crt", cert),
                ("server.key", key),
                ("pg_hba.conf", hba),
            ] {
                let path = c.data.join(name);
                std::fs::write(&path, text).unwrap();
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
                if root {
                    let out = Command::new("chown")
                        .arg("postgres:postgres")
                        .arg(&path)
                        .output()
                        .unwrap();
                    assert!(out.status.success(), "chown {name} to postgres");
                }
            }
            opts.push_str(" -c ssl=on -c ssl_cert_file=server.crt -c ssl_key_file=server.key");
        }
        let log = c.socket_dir.join("server.log").display().to_string();
        c.run(
            "pg_ctl",
            &[
                "-D", &data, "-o", &opts, "-l", &log, "-w", "-t", "60", "start",
            ],
        );
        c
    }

    /// libpq key-value form over the unix socket.
    pub fn url(&self) -> String {
        format!(
            "host={} port={} user=postgres dbname=postgres",
            self.socket_dir.display(),
            self.port
        )
    }
}

impl Cluster {
    /// The `psql` client of this cluster's installation, connected over its socket.
    pub fn psql(&self) -> Command {
        let mut c = if self.root {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(self.bin.join("psql"));
            c
        } else {
            Command::new(self.bin.join("psql"))
        };
        c.arg("-X")
            .args(["-v", "ON_ERROR_STOP=1", "-At", "-d"])
            .arg(self.url());
        c
    }

    /// URL form over TCP on 127.0.0.1 (trust authentication, no password).
    pub fn tcp_url(&self) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let data = self.data.display().to_string();
        let exe = self.bin.join("pg_ctl");
        let mut cmd = if self.root {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        let _ = cmd
            .args(["-D", &data, "-m", "immediate", "-w", "stop"])
            .output();
    }
}

/// A free port in 11000..20000: below the kernel's ephemeral range (a port from that range,
/// which binding port 0 gives, can be taken by any outgoing connection before PostgreSQL binds
/// it) and apart from the 20000+ ranges the integration tests give their servers.
pub(crate) fn free_port_below_ephemeral() -> u16 {
    let low: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768);
    if low <= 20_000 {
        // An unusual range: fall back to whatever the kernel gives.
        return std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
    }
    let seed = std::process::id()
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
    for i in 0..2_000u32 {
        let port = 11_000 + (seed.wrapping_add(i.wrapping_mul(7_919)) % 9_000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in 11000..20000 for the test PostgreSQL cluster");
}
