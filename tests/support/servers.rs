//! Private Valkey and Postgres servers, for the tests that flush, freeze
//! or restart them.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::env::{env_var, free_port, short_id};

/// A private valkey-server on a free port, killed on drop.
pub struct ValkeyServer {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl ValkeyServer {
    pub fn start() -> ValkeyServer {
        let bin = env_var("ORCH_VALKEY_SERVER");
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let child = Command::new(bin)
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start valkey-server");
        wait_port(port, Duration::from_secs(10));
        ValkeyServer {
            child,
            port,
            _dir: dir,
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub async fn flushall(&self) {
        let client = redis::Client::open(self.url()).expect("client");
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("connect");
        let _: () = redis::cmd("FLUSHALL")
            .query_async(&mut conn)
            .await
            .expect("FLUSHALL");
    }
}

impl Drop for ValkeyServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn wait_port(port: u16, limit: Duration) {
    let deadline = Instant::now() + limit;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "nothing listens on port {port} after {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A private PostgreSQL cluster (initdb) on a free port, run as the
/// `postgres` OS user; stopped on drop.
pub struct PgServer {
    dir: PathBuf,
    pub port: u16,
}

fn pg_bin(name: &str) -> PathBuf {
    Path::new("/usr/lib/postgresql/15/bin").join(name)
}

fn as_postgres(program: &Path, args: &[&str]) -> std::process::Output {
    Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(program)
        .args(args)
        .output()
        .expect("run as postgres")
}

impl PgServer {
    pub fn start() -> PgServer {
        let dir = std::env::temp_dir().join(format!("orch-pg-{}", short_id()));
        std::fs::create_dir_all(&dir).expect("pg dir");
        let status = Command::new("chown")
            .arg("postgres:postgres")
            .arg(&dir)
            .status()
            .expect("chown");
        assert!(status.success());
        let data = dir.join("data");
        let out = as_postgres(
            &pg_bin("initdb"),
            &[
                "-D",
                data.to_str().expect("utf-8 path"),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
            ],
        );
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let server = PgServer {
            dir,
            port: free_port(),
        };
        server.resume();
        server
    }

    fn data(&self) -> String {
        self.dir.join("data").to_string_lossy().into_owned()
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Starts (again) on the same port and data.
    pub fn resume(&self) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.display()
        );
        let log = self.dir.join("log").to_string_lossy().into_owned();
        let out = as_postgres(
            &pg_bin("pg_ctl"),
            &["-D", &self.data(), "-o", &opts, "-l", &log, "-w", "start"],
        );
        assert!(
            out.status.success(),
            "pg_ctl start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Stops immediately (connections are cut, as in a crash).
    pub fn halt(&self) {
        let out = as_postgres(
            &pg_bin("pg_ctl"),
            &["-D", &self.data(), "-m", "immediate", "-w", "stop"],
        );
        assert!(
            out.status.success(),
            "pg_ctl stop: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl PgServer {
    fn postmaster(&self) -> String {
        let pidfile = std::fs::read_to_string(self.dir.join("data").join("postmaster.pid"))
            .expect("postmaster.pid");
        pidfile.lines().next().expect("pid").trim().to_owned()
    }

    /// Sends `signal` to the postmaster, then to every backend (listed
    /// after, so none forked in between is missed); `false` if one failed.
    fn signal_all(&self, signal: &str) -> bool {
        let main = self.postmaster();
        let send = |pids: &[String]| {
            Command::new("kill")
                .arg(signal)
                .args(pids)
                .status()
                .is_ok_and(|s| s.success())
        };
        let first = send(std::slice::from_ref(&main));
        let children = Command::new("pgrep")
            .args(["-P", &main])
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        first && (children.is_empty() || send(&children))
    }

    /// Hangs every Postgres process (SIGSTOP) until the guard drops:
    /// statements and new connections wait, nothing is refused; a slow
    /// Postgres at its worst.
    pub fn freeze(&self) -> Frozen<'_> {
        assert!(self.signal_all("-STOP"), "SIGSTOP Postgres");
        Frozen(self)
    }
}

/// A frozen Postgres; thawed (SIGCONT) on drop, also when a test fails.
pub struct Frozen<'a>(&'a PgServer);

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        // No panic here: this may run while a failed test unwinds.
        if !self.0.signal_all("-CONT") {
            eprintln!("could not SIGCONT every Postgres process");
        }
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let _ = as_postgres(
            &pg_bin("pg_ctl"),
            &["-D", &self.data(), "-m", "immediate", "stop"],
        );
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
