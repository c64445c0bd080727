//! A real ZooKeeper for the tests' ClickHouse cluster: Debian's `zookeeper`
//! package, standalone, started as a plain process on a free port by
//! `scripts/zookeeper-local` with a data directory of its own, killed with
//! the test process.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::free_port;

pub struct ZooKeeper {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl ZooKeeper {
    pub fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("venus-zookeeper-")
            .tempdir()
            .unwrap();
        let port = free_port();
        let mut command = Command::new(super::repo_root().join("scripts/zookeeper-local"));
        command
            .arg(dir.path())
            .arg(port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let zookeeper = Self {
            child: Some(super::spawn_tied_to_tests(command)),
            port,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !zookeeper.answers() {
            assert!(
                Instant::now() < deadline,
                "ZooKeeper did not answer on {port} (is Debian's zookeeper installed? scripts/install-deps)"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        zookeeper
    }

    /// `127.0.0.1:<port>`.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The four-letter `ruok` answered `imok`.
    fn answers(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
        let _ = stream.write_all(b"ruok");
        let mut response = String::new();
        let _ = stream.read_to_string(&mut response);
        response == "imok"
    }
}

impl Drop for ZooKeeper {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
