//! Private Valkey and Postgres servers, for the tests that flush, freeze
//! or restart them.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::env::{env_var, free_port, short_id};

/// A private Valkey on free ports, killed on drop: one server, or (with
/// `ORCH_TEST_VALKEY_CLUSTER=1`, as scripts/test.sh's cluster pass sets) a
/// three-master Valkey Cluster, so the tests that flush Valkey mid-run run
/// against both.
pub struct ValkeyServer {
    nodes: Vec<ValkeyNode>,
    cluster: bool,
}

struct ValkeyNode {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl ValkeyNode {
    fn start(cluster: bool) -> ValkeyNode {
        let bin = env_var("ORCH_VALKEY_SERVER");
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let mut cmd = Command::new(bin);
        cmd.args([
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
        .arg(dir.path());
        if cluster {
            cmd.args(["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"]);
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start valkey-server");
        wait_port(port, Duration::from_secs(10));
        ValkeyNode {
            child,
            port,
            _dir: dir,
        }
    }

    fn connection(&self) -> redis::Connection {
        redis::Client::open(format!("redis://127.0.0.1:{}", self.port))
            .expect("client")
            .get_connection()
            .expect("connect")
    }

    fn query<T: redis::FromRedisValue>(&self, cmd: &mut redis::Cmd) -> T {
        cmd.query(&mut self.connection())
            .unwrap_or_else(|e| panic!("node {}: {e}", self.port))
    }
}

impl ValkeyServer {
    pub fn start() -> ValkeyServer {
        if std::env::var("ORCH_TEST_VALKEY_CLUSTER").is_ok_and(|v| v == "1") {
            return Self::start_cluster(3, 0);
        }
        ValkeyServer {
            nodes: vec![ValkeyNode::start(false)],
            cluster: false,
        }
    }

    /// A Valkey Cluster: `masters` primaries sharing the 16384 slots, each
    /// with `replicas` replicas, formed with CLUSTER ADDSLOTSRANGE, MEET
    /// and REPLICATE; returns once every node sees the cluster ok and
    /// every replica is in sync.
    pub fn start_cluster(masters: usize, replicas: usize) -> ValkeyServer {
        let nodes: Vec<ValkeyNode> = (0..masters * (1 + replicas))
            .map(|_| ValkeyNode::start(true))
            .collect();
        let per = 16384 / masters;
        for (i, node) in nodes[..masters].iter().enumerate() {
            let last = if i + 1 == masters {
                16383
            } else {
                (i + 1) * per - 1
            };
            let _: () = node.query(
                redis::cmd("CLUSTER")
                    .arg("ADDSLOTSRANGE")
                    .arg(i * per)
                    .arg(last),
            );
        }
        for node in &nodes[1..] {
            let _: () = nodes[0].query(
                redis::cmd("CLUSTER")
                    .arg("MEET")
                    .arg("127.0.0.1")
                    .arg(node.port),
            );
        }
        let server = ValkeyServer {
            nodes,
            cluster: true,
        };
        server.wait_until("every node knows every other", |s| {
            s.nodes.iter().all(|n| {
                let known: String = n.query(redis::cmd("CLUSTER").arg("NODES"));
                known.lines().count() == s.nodes.len()
            })
        });
        for (i, replica) in server.nodes[masters..].iter().enumerate() {
            let master = &server.nodes[i % masters];
            let id: String = master.query(redis::cmd("CLUSTER").arg("MYID"));
            let _: () = replica.query(redis::cmd("CLUSTER").arg("REPLICATE").arg(id));
        }
        server.wait_until("the cluster is ok and every replica in sync", |s| {
            s.nodes.iter().enumerate().all(|(i, n)| {
                let info: String = n.query(redis::cmd("CLUSTER").arg("INFO"));
                let ok = info.contains("cluster_state:ok");
                ok && (i < masters || {
                    let repl: String = n.query(redis::cmd("INFO").arg("replication"));
                    repl.contains("master_link_status:up")
                })
            })
        });
        server
    }

    fn wait_until(&self, what: &str, done: impl Fn(&Self) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !done(self) {
            assert!(
                Instant::now() < deadline,
                "Valkey Cluster: {what}: not after 30s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The URL, or the cluster nodes' URLs comma-separated (as
    /// `ORCH_VALKEY_URL` takes them).
    pub fn url(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("redis://127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Empties every primary (replicas follow).
    pub async fn flushall(&self) {
        for node in self.primaries() {
            let _: () = node.query(&mut redis::cmd("FLUSHALL"));
        }
    }

    fn primaries(&self) -> Vec<&ValkeyNode> {
        self.nodes
            .iter()
            .filter(|n| {
                if !self.cluster {
                    return true;
                }
                let role: Vec<redis::Value> = n.query(&mut redis::cmd("ROLE"));
                matches!(role.first(), Some(redis::Value::BulkString(b)) if b == b"master")
            })
            .collect()
    }

    /// The primary that owns `key`'s slot, and one of its replicas (ports).
    pub fn owners(&self, key: &str) -> (u16, Option<u16>) {
        let slot: u16 = self.nodes[0].query(redis::cmd("CLUSTER").arg("KEYSLOT").arg(key));
        let nodes: String = self.nodes[0].query(redis::cmd("CLUSTER").arg("NODES"));
        // <id> <ip:port@bus> <flags> <master-id|-> <ping> <pong> <epoch> <link> <slot>...
        let rows: Vec<Vec<&str>> = nodes.lines().map(|l| l.split(' ').collect()).collect();
        let port_of = |row: &[&str]| -> u16 {
            row[1]
                .split(['@', ','])
                .next()
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| p.parse().ok())
                .expect("a node address")
        };
        let owner = rows
            .iter()
            .find(|row| {
                row[2].contains("master")
                    && row[8..].iter().any(|range| {
                        let (a, b) = range.split_once('-').unwrap_or((range, range));
                        match (a.parse::<u16>(), b.parse::<u16>()) {
                            (Ok(a), Ok(b)) => (a..=b).contains(&slot),
                            _ => false,
                        }
                    })
            })
            .expect("an owner of the slot");
        let replica = rows
            .iter()
            .find(|row| row[3] == owner[0] && row[2].contains("slave"))
            .map(|row| port_of(row));
        (port_of(owner), replica)
    }

    /// `CLUSTER FAILOVER` on the replica at `port`: it takes over its
    /// primary's slots once in sync. Returns when every node sees it as a
    /// primary and the cluster is ok.
    pub fn failover(&self, port: u16) {
        let node = self
            .nodes
            .iter()
            .find(|n| n.port == port)
            .expect("a node of this cluster");
        let _: () = node.query(redis::cmd("CLUSTER").arg("FAILOVER"));
        let id: String = node.query(redis::cmd("CLUSTER").arg("MYID"));
        self.wait_until("the replica took over", |s| {
            s.nodes.iter().all(|n| {
                let nodes: String = n.query(redis::cmd("CLUSTER").arg("NODES"));
                let info: String = n.query(redis::cmd("CLUSTER").arg("INFO"));
                info.contains("cluster_state:ok")
                    && nodes.lines().any(|l| {
                        l.starts_with(&id)
                            && l.split(' ').nth(2).is_some_and(|f| f.contains("master"))
                    })
            })
        });
    }
}

impl Drop for ValkeyServer {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            let _ = node.child.kill();
            let _ = node.child.wait();
        }
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
