//! A real ClickHouse server for the tests: Debian's `clickhouse-server`
//! (18.16 here; any version with the HTTP interface works) started as a
//! plain process on free ports with a generated config and a data
//! directory of its own, killed with the test process. It can be paused
//! (SIGSTOP: a server that hangs), killed and started again on the same
//! ports and data.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{free_port, spawn_from_lasting_thread};

/// Where `clickhouse-server` is: `$CLICKHOUSE_SERVER_BIN`, `PATH`, or Debian's
/// `/usr/sbin` (not on a user's `PATH`).
fn server_binary() -> PathBuf {
    if let Ok(path) = std::env::var("CLICKHOUSE_SERVER_BIN") {
        return PathBuf::from(path);
    }
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("clickhouse-server"))
                .collect()
        })
        .unwrap_or_default();
    candidates.push(PathBuf::from("/usr/sbin/clickhouse-server"));
    candidates.push(PathBuf::from("/usr/bin/clickhouse-server"));
    candidates.into_iter().find(|p| p.is_file()).expect(
        "clickhouse-server is not installed: run scripts/install-deps (or set CLICKHOUSE_SERVER_BIN)",
    )
}

/// The server's config.xml and users.xml for `dir`: the HTTP and native
/// ports, every path under `dir`, logs to files there, one passwordless
/// `default` user.
pub fn write_config(dir: &Path, http_port: u16, tcp_port: u16) -> PathBuf {
    let d = dir.display();
    let config = format!(
        r#"<?xml version="1.0"?>
<yandex>
  <logger><level>warning</level><log>{d}/log/server.log</log><errorlog>{d}/log/error.log</errorlog><console>0</console></logger>
  <http_port>{http_port}</http_port>
  <tcp_port>{tcp_port}</tcp_port>
  <listen_host>127.0.0.1</listen_host>
  <path>{d}/data/</path>
  <tmp_path>{d}/tmp/</tmp_path>
  <user_files_path>{d}/user_files/</user_files_path>
  <format_schema_path>{d}/format_schemas/</format_schema_path>
  <users_config>{d}/users.xml</users_config>
  <default_profile>default</default_profile>
  <default_database>default</default_database>
  <mark_cache_size>5368709120</mark_cache_size>
</yandex>
"#
    );
    let users = r#"<?xml version="1.0"?>
<yandex>
  <profiles><default></default></profiles>
  <users><default><password></password><networks><ip>::/0</ip></networks><profile>default</profile><quota>default</quota></default></users>
  <quotas><default></default></quotas>
</yandex>
"#;
    std::fs::create_dir_all(dir.join("log")).unwrap();
    std::fs::write(dir.join("users.xml"), users).unwrap();
    let path = dir.join("config.xml");
    std::fs::write(&path, config).unwrap();
    path
}

pub struct ClickHouseServer {
    child: Option<Child>,
    pub http_port: u16,
    config: PathBuf,
    _dir: tempfile::TempDir,
}

impl ClickHouseServer {
    pub fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("venus-clickhouse-")
            .tempdir()
            .unwrap();
        let http_port = free_port();
        let config = write_config(dir.path(), http_port, free_port());
        let mut server = Self {
            child: None,
            http_port,
            config,
            _dir: dir,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let mut command = Command::new(server_binary());
        command
            .arg(format!("--config-file={}", self.config.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: prctl is async-signal-safe; nothing else runs in pre_exec.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        self.child = Some(spawn_from_lasting_thread(command));
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
