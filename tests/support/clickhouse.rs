//! A real ClickHouse server for the tests: Debian's `clickhouse-server`
//! (18.16 here; any version with the HTTP interface works) started as a
//! plain process on free ports by `scripts/clickhouse-local` (the script
//! `scripts/run` and `scripts/bench` use: one config generator) with a data
//! directory of its own, killed with the test process. It can be paused
//! (SIGSTOP: a server that hangs), killed and started again on the same
//! ports and data.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::free_port;

pub struct ClickHouseServer {
    child: Option<Child>,
    pub http_port: u16,
    tcp_port: u16,
    /// With [`ClickHouseServer::start_https`]: the HTTPS port.
    pub https_port: Option<u16>,
    /// `scripts/clickhouse-local`'s optional variables.
    env: Vec<(&'static str, String)>,
    dir: tempfile::TempDir,
}

impl ClickHouseServer {
    pub fn start() -> Self {
        Self::start_with(Vec::new())
    }

    /// A server that also serves HTTPS with `pki`'s server certificate.
    pub fn start_https(pki: &super::tls::Pki) -> Self {
        let port = free_port();
        let mut server = Self::start_with(vec![
            ("CLICKHOUSE_HTTPS_PORT", port.to_string()),
            (
                "CLICKHOUSE_CERT",
                pki.server_certificate().display().to_string(),
            ),
            ("CLICKHOUSE_KEY", pki.server_key().display().to_string()),
        ]);
        server.https_port = Some(port);
        server
    }

    /// A server with a user `name` that may insert and select but not run
    /// DDL (`allow_ddl=0`: ClickHouse 18.16 has no GRANT).
    pub fn start_with_inserter(name: &str, password: &str) -> Self {
        Self::start_with(vec![("CLICKHOUSE_INSERTER", format!("{name}:{password}"))])
    }

    fn start_with(env: Vec<(&'static str, String)>) -> Self {
        Self::start_on(free_port(), free_port(), env)
    }

    fn start_on(http_port: u16, tcp_port: u16, env: Vec<(&'static str, String)>) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("venus-clickhouse-")
            .tempdir()
            .unwrap();
        let mut server = Self {
            child: None,
            http_port,
            tcp_port,
            https_port: None,
            env,
            dir,
        };
        server.spawn();
        server
    }

    /// `https://127.0.0.1:<https_port>`.
    pub fn https_url(&self) -> String {
        format!(
            "https://127.0.0.1:{}",
            self.https_port.expect("started with HTTPS")
        )
    }

    fn spawn(&mut self) {
        // The script execs the server: the child's pid is the server's.
        let mut command = Command::new(super::repo_root().join("scripts/clickhouse-local"));
        command
            .arg(self.dir.path())
            .arg(self.http_port.to_string())
            .arg(self.tcp_port.to_string())
            .envs(self.env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        self.child = Some(super::spawn_tied_to_tests(command));
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.answers() {
            assert!(
                Instant::now() < deadline,
                "ClickHouse did not answer on {}",
                self.http_port
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn answers(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", self.http_port)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
        let _ = stream.write_all(b"GET /ping HTTP/1.0\r\n\r\n");
        let mut response = String::new();
        let _ = stream.read_to_string(&mut response);
        response.ends_with("Ok.\n")
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    /// SIGSTOP: the server keeps its sockets but answers nothing.
    pub fn pause(&self) {
        // SAFETY: a plain kill(2) on our child.
        unsafe { libc::kill(self.pid(), libc::SIGSTOP) };
    }

    /// SIGCONT after [`ClickHouseServer::pause`].
    pub fn resume(&self) {
        // SAFETY: a plain kill(2) on our child.
        unsafe { libc::kill(self.pid(), libc::SIGCONT) };
    }

    /// kill -9.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same ports and data.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Runs `sql` and returns the response body (panics on an error).
    pub async fn query(&self, sql: &str) -> String {
        let response = reqwest::Client::new()
            .post(format!("{}/", self.url()))
            .timeout(Duration::from_secs(30))
            .body(sql.to_owned())
            .send()
            .await
            .expect("ClickHouse query");
        let status = response.status();
        let body = response.text().await.unwrap();
        assert!(status.is_success(), "{sql}: {status} {body}");
        body
    }

    /// The rows of `sql` (which must not name a FORMAT) as JSON objects.
    pub async fn rows(&self, sql: &str) -> Vec<serde_json::Value> {
        self.query(&format!("{sql} FORMAT JSONEachRow"))
            .await
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    }

    /// A single number from `sql`.
    pub async fn count(&self, sql: &str) -> u64 {
        self.query(sql).await.trim().parse().unwrap_or(0)
    }
}

impl Drop for ClickHouseServer {
    fn drop(&mut self) {
        if let Some(child) = &self.child {
            // A stopped process must be continued to die promptly.
            // SAFETY: kill(2) on our child.
            unsafe { libc::kill(child.id() as i32, libc::SIGCONT) };
        }
        self.kill();
    }
}

/// The replicas of one shard of the cluster [`ClickHouseCluster::NAME`]
/// (`remote_servers`, `internal_replication`), over a real ZooKeeper: what
/// Replicated tables and `ON CLUSTER` DDL need. Each replica can be killed
/// and started again on its ports and data like any server.
pub struct ClickHouseCluster {
    pub replicas: Vec<ClickHouseServer>,
    /// Dropped after the replicas (field order).
    pub zookeeper: super::zookeeper::ZooKeeper,
}

impl ClickHouseCluster {
    /// The cluster's name in the servers' `remote_servers`.
    pub const NAME: &'static str = "venus_cluster";

    /// `count` replicas (macros `{shard}` 01, `{replica}` r1, r2, ...).
    pub fn start(count: usize) -> Self {
        let zookeeper = super::zookeeper::ZooKeeper::start();
        let ports: Vec<(u16, u16)> = (0..count).map(|_| (free_port(), free_port())).collect();
        let members: Vec<String> = ports
            .iter()
            .map(|(_, tcp)| format!("127.0.0.1:{tcp}"))
            .collect();
        let replicas = ports
            .iter()
            .enumerate()
            .map(|(i, (http, tcp))| {
                ClickHouseServer::start_on(
                    *http,
                    *tcp,
                    vec![
                        ("CLICKHOUSE_ZOOKEEPER", zookeeper.address()),
                        ("CLICKHOUSE_CLUSTER", Self::NAME.to_owned()),
                        ("CLICKHOUSE_REPLICAS", members.join(",")),
                        ("CLICKHOUSE_REPLICA", format!("r{}", i + 1)),
                        ("CLICKHOUSE_INTERSERVER_PORT", free_port().to_string()),
                    ],
                )
            })
            .collect();
        Self {
            replicas,
            zookeeper,
        }
    }
}
