//! Certificates and TLS endpoints for the tests, made with the real tools:
//! `openssl` for a certificate authority and a server certificate (for
//! `127.0.0.1` and `localhost`), and Debian's `stunnel4` in front of tansu
//! (whose own TLS does not work in 0.6.0), so that every Kafka client meets
//! a real TLS endpoint.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A certificate authority and a server certificate it signed, as PEM
/// files in a directory of their own.
pub struct Pki {
    dir: tempfile::TempDir,
}

fn openssl(dir: &Path, args: &[&str]) {
    let output = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("openssl is installed (scripts/install-deps)");
    assert!(
        output.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

impl Pki {
    /// A new CA named `name`, and a server certificate signed by it.
    pub fn new(name: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("venus-pki-")
            .tempdir()
            .unwrap();
        let d = dir.path();
        let subject = format!("/CN={name} test CA");
        openssl(
            d,
            &[
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-keyout", "ca.key",
                "-out", "ca.pem", "-subj", &subject,
            ],
        );
        std::fs::write(
            d.join("server.ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        openssl(
            d,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
                "-subj",
                "/CN=localhost",
            ],
        );
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-out",
                "server.pem",
                "-extfile",
                "server.ext",
            ],
        );
        Self { dir }
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    pub fn server_certificate(&self) -> PathBuf {
        self.dir.path().join("server.pem")
    }

    pub fn server_key(&self) -> PathBuf {
        self.dir.path().join("server.key")
    }
}

/// `stunnel4` taking TLS on `accept` and forwarding plaintext to `connect`;
/// killed on drop.
pub struct Stunnel {
    child: Child,
    _config: tempfile::NamedTempFile,
}

impl Stunnel {
    pub fn start(accept: u16, connect: u16, pki: &Pki) -> Self {
        let config = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(
            config.path(),
            format!(
                "foreground = yes\npid =\n[tls]\naccept = 127.0.0.1:{accept}\nconnect = 127.0.0.1:{connect}\ncert = {}\nkey = {}\n",
                pki.server_certificate().display(),
                pki.server_key().display()
            ),
        )
        .unwrap();
        let mut command = Command::new("stunnel4");
        command
            .arg(config.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = super::spawn_tied_to_tests(command);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", accept)).is_err() {
            assert!(
                Instant::now() < deadline,
                "stunnel did not listen on {accept}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Self {
            child,
            _config: config,
        }
    }
}

impl Drop for Stunnel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
