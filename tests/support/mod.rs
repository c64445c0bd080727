//! What the integration tests share: a real Kafka-protocol broker (tansu),
//! the gateway spawned in-process on a random port with a generated GeoIP
//! database, and a reader for what reached a topic.
#![allow(dead_code)]

pub mod browser;
pub mod clickhouse;
pub mod dashboard;
pub mod gateway;
pub mod otlp;
pub mod proxy;
pub mod tls;
pub mod zookeeper;

use std::collections::HashMap;
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use opentelemetry_sdk::trace::SdkTracerProvider;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::OwnedMessage;
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio::sync::oneshot;

use venus::config::Settings;

/// Where the `tansu` binary is: `$TANSU_BIN`, `PATH`, or cargo's bin dir.
fn tansu_binary() -> PathBuf {
    if let Ok(path) = std::env::var("TANSU_BIN") {
        return PathBuf::from(path);
    }
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join("tansu")).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        candidates.push(PathBuf::from(home).join(".cargo/bin/tansu"));
    }
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .expect("the tansu broker is not installed: run scripts/install-deps (or set TANSU_BIN)")
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Spawns `command` from a thread that lives as long as the test process.
/// The parent-death signal is tied to the spawning *thread*, and test
/// threads end with their test: a broker shared by several tests must not
/// die with the first.
pub fn spawn_from_lasting_thread(command: Command) -> Child {
    type Request = (Command, std::sync::mpsc::Sender<std::io::Result<Child>>);
    static SPAWNER: OnceLock<std::sync::Mutex<std::sync::mpsc::Sender<Request>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<Request>();
        std::thread::spawn(move || {
            for (mut command, reply) in rx {
                let _ = reply.send(command.spawn());
            }
        });
        std::sync::Mutex::new(tx)
    });
    let (reply, child) = std::sync::mpsc::channel();
    spawner
        .lock()
        .unwrap()
        .send((command, reply))
        .expect("spawner thread");
    child.recv().unwrap().expect("start tansu")
}

/// Spawns `command` so that it dies with the test process (parent-death
/// signal, from a thread that lives as long as the test process).
pub fn spawn_tied_to_tests(mut command: Command) -> Child {
    // SAFETY: prctl is async-signal-safe; nothing else runs in pre_exec.
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    spawn_from_lasting_thread(command)
}

/// A tansu broker process with in-memory storage, killed on drop (and when
/// the test process dies, through the parent-death signal).
pub struct Broker {
    child: Child,
    pub port: u16,
    /// With [`Broker::start_tls`]: stunnel in front, `port` is its TLS port
    /// (the one tansu advertises), and the CA that signed its certificate.
    tls: Option<(tls::Stunnel, PathBuf)>,
}

impl Broker {
    pub fn start() -> Self {
        let port = free_port();
        Self::spawn(port, port, None)
    }

    /// A broker reachable only over TLS: tansu listens on a private port
    /// and advertises the port of a stunnel in front of it, which holds a
    /// certificate signed by `pki`'s CA.
    pub fn start_tls(pki: &tls::Pki) -> Self {
        let (listen, public) = (free_port(), free_port());
        let stunnel = tls::Stunnel::start(public, listen, pki);
        Self::spawn(listen, public, Some((stunnel, pki.ca())))
    }

    /// A broker started with `--authentication`: every client must log in
    /// with SASL (tansu 0.6.0 offers SCRAM-SHA-256 and -512; it knows no
    /// user, see docs/INGESTER.md, so every login is refused).
    pub fn start_authenticating() -> Self {
        let port = free_port();
        Self::spawn_with(port, port, None, &["--authentication"])
    }

    fn spawn(listen: u16, port: u16, tls: Option<(tls::Stunnel, PathBuf)>) -> Self {
        Self::spawn_with(listen, port, tls, &[])
    }

    fn spawn_with(
        listen: u16,
        port: u16,
        tls: Option<(tls::Stunnel, PathBuf)>,
        extra: &[&str],
    ) -> Self {
        let listener = format!("tcp://127.0.0.1:{listen}");
        let advertised = format!("tcp://127.0.0.1:{port}");
        let mut command = Command::new(tansu_binary());
        command
            .args([
                "broker",
                "--storage-engine",
                "memory://tansu/",
                "--listener-url",
                &listener,
                "--advertised-listener-url",
                &advertised,
            ])
            .args(extra)
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = spawn_tied_to_tests(command);
        let broker = Self { child, port, tls };
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", listen)).is_err() {
            assert!(
                Instant::now() < deadline,
                "tansu did not listen on {listen}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        broker
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The CA file a client needs, for a TLS broker.
    pub fn ca_file(&self) -> Option<&std::path::Path> {
        self.tls.as_ref().map(|(_, ca)| ca.as_path())
    }

    /// `VENUS__KAFKA__SECURITY__*` variables for a client of this broker.
    pub fn security_env(&self) -> Vec<(&'static str, String)> {
        match self.ca_file() {
            Some(ca) => vec![
                ("VENUS__KAFKA__SECURITY__PROTOCOL", "ssl".into()),
                ("VENUS__KAFKA__SECURITY__CA_FILE", ca.display().to_string()),
            ],
            None => Vec::new(),
        }
    }

    /// The base of the tests' own Kafka clients (TLS for a TLS broker).
    pub fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", self.address());
        if let Some(ca) = self.ca_file() {
            config
                .set("security.protocol", "ssl")
                .set("ssl.ca.location", ca.display().to_string());
        }
        config
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Kills the broker (-9) and starts an empty one on the same port: with
    /// in-memory storage every topic and message is gone.
    pub fn restart_empty(&mut self) {
        assert!(self.tls.is_none(), "a plain broker only");
        self.stop();
        let fresh = Self::spawn(self.port, self.port, None);
        // The old one is dead: dropping it kills nothing more.
        drop(std::mem::replace(self, fresh));
    }

    /// Freezes the broker (SIGSTOP): connections stay open, nothing answers.
    pub fn pause(&self) {
        // SAFETY: kill(2) on our own child.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGSTOP);
        }
    }

    /// Lets a paused broker go on (SIGCONT).
    pub fn resume(&self) {
        // SAFETY: kill(2) on our own child.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGCONT);
        }
    }

    /// Creates `topic` (tansu does not create topics on first produce).
    pub async fn create_topic(&self, topic: &str) {
        self.create_topic_with_partitions(topic, 1).await
    }

    /// Creates `topic` with `partitions` partitions.
    pub async fn create_topic_with_partitions(&self, topic: &str, partitions: i32) {
        let admin: AdminClient<DefaultClientContext> =
            self.client_config().create().expect("admin client");
        let results = admin
            .create_topics(
                &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
            )
            .await
            .expect("create topic");
        for result in results {
            if let Err((name, code)) = result {
                assert_eq!(
                    code,
                    rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists,
                    "create {name}"
                );
            }
        }
    }

    /// Reads `topic` from the beginning until `expected` messages arrived or
    /// nothing came for `idle` (tansu's watermarks cannot be trusted).
    pub fn read(&self, topic: &str, expected: usize, idle: Duration) -> Vec<OwnedMessage> {
        let consumer: BaseConsumer = self
            .client_config()
            .set("group.id", format!("venus-test-{}", uuid::Uuid::new_v4()))
            .set("enable.auto.commit", "false")
            .set("session.timeout.ms", "6000")
            .create()
            .expect("consumer");
        // Every partition of the topic (venus may create it with several).
        let metadata = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .expect("topic metadata");
        let partitions: Vec<i32> = metadata
            .topics()
            .iter()
            .filter(|t| t.name() == topic)
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        let mut assignment = TopicPartitionList::new();
        for partition in if partitions.is_empty() {
            vec![0]
        } else {
            partitions
        } {
            assignment
                .add_partition_offset(topic, partition, Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&assignment).expect("assign");
        let mut messages = Vec::new();
        let mut last = Instant::now();
        while messages.len() < expected && last.elapsed() < idle {
            if let Some(Ok(message)) = consumer.poll(Duration::from_millis(100)) {
                messages.push(message.detach());
                last = Instant::now();
            }
        }
        // A little longer, to catch messages beyond the expected count.
        let extra_until = Instant::now() + Duration::from_millis(300);
        while Instant::now() < extra_until {
            if let Some(Ok(message)) = consumer.poll(Duration::from_millis(50)) {
                messages.push(message.detach());
            }
        }
        messages
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One broker for all tests of a test binary; each test uses its own topics.
pub fn shared_broker() -> &'static Broker {
    static BROKER: OnceLock<Broker> = OnceLock::new();
    BROKER.get_or_init(Broker::start)
}

/// A unique category (and so a unique topic) for one test.
pub fn unique_category(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}

pub fn topic_of(category: &str) -> String {
    format!("to_analyzer__0.{category}")
}

/// A unique category and its topic, created on the shared broker.
pub async fn fresh_topic(prefix: &str) -> (String, String) {
    let category = unique_category(prefix);
    let topic = topic_of(&category);
    shared_broker().create_topic(&topic).await;
    (category, topic)
}

/// The generated GeoIP database, written once per test binary.
pub fn geoip_database() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("venus-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("city.mmdb");
        let mut file = std::fs::File::create(&path).unwrap();
        file.write_all(&venus::geoip::test_support::city_database())
            .unwrap();
        path
    })
    .clone()
}

/// The repository root, for the gateway's tests and for the workspace
/// members that include this module (`ingester/tests`).
pub fn repo_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    if manifest.join("config.yaml").is_file() {
        manifest
    } else {
        manifest.parent().expect("a workspace member").to_path_buf()
    }
}

/// Settings from the repository's `config.yaml`, pointed at `brokers`, with
/// `overrides` as `VENUS__*` variables.
pub fn settings(brokers: &str, overrides: &[(&str, &str)]) -> Settings {
    settings_from(&repo_root().join("config.yaml"), brokers, overrides)
}

/// The repository's `config.yaml` with `extra` YAML appended (sections it
/// does not have, such as `auth` and `apps`), as a file of its own.
pub fn config_file(extra: &str) -> tempfile::NamedTempFile {
    let file = tempfile::Builder::new().suffix(".yaml").tempfile().unwrap();
    write_config(file.path(), extra);
    file
}

/// (Re)writes `path` as the repository's `config.yaml` plus `extra`, by
/// rename, as an operator should. Top-level sections of `extra` replace the
/// file's own.
pub fn write_config(path: &std::path::Path, extra: &str) {
    let base = std::fs::read_to_string(repo_root().join("config.yaml")).unwrap();
    let replaced: Vec<&str> = extra
        .lines()
        .filter(|l| !l.starts_with([' ', '#']) && !l.is_empty())
        .filter_map(|l| l.split(':').next())
        .collect();
    let mut kept = String::new();
    let mut skipping = false;
    for line in base.lines() {
        if !line.starts_with([' ', '#']) && !line.is_empty() {
            skipping = replaced.contains(&line.split(':').next().unwrap_or(""));
        }
        if !skipping {
            kept.push_str(line);
            kept.push('\n');
        }
    }
    let base = kept;
    let next = path.with_extension("next");
    std::fs::write(&next, format!("{base}\n{extra}\n")).unwrap();
    std::fs::rename(&next, path).unwrap();
}

/// Like [`settings`], from the configuration file at `path`.
pub fn settings_from(
    path: &std::path::Path,
    brokers: &str,
    overrides: &[(&str, &str)],
) -> Settings {
    let mut env: HashMap<String, String> = HashMap::from([
        ("VENUS__SERVER__LISTEN".into(), "127.0.0.1:0".into()),
        ("VENUS__KAFKA__BROKERS".into(), brokers.into()),
        (
            "VENUS__GEOIP__DATABASE".into(),
            geoip_database().display().to_string(),
        ),
        ("VENUS__KAFKA__DELIVERY_TIMEOUT_MS".into(), "5000".into()),
        ("VENUS__KAFKA__LINGER_MS".into(), "1".into()),
    ]);
    for (key, value) in overrides {
        env.insert(key.to_string(), value.to_string());
    }
    Settings::load_with_env(path, Some(env)).expect("test settings")
}

/// Installs the tracing subscriber once per test binary, with a tracer
/// provider that samples everything and exports nowhere (trace context is
/// still created and propagated).
pub fn init_tracing() -> &'static SdkTracerProvider {
    init_tracing_exporting_to("")
}

/// Like [`init_tracing`], exporting spans over OTLP/HTTP to `endpoint`.
/// The first call in a test binary decides.
pub fn init_tracing_exporting_to(endpoint: &str) -> &'static SdkTracerProvider {
    static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();
    PROVIDER.get_or_init(|| {
        let telemetry = venus::config::TelemetrySettings {
            log_level: "warn,rdkafka=off,librdkafka=off".into(),
            otlp_endpoint: endpoint.to_owned(),
            ..Default::default()
        };
        let provider = venus::telemetry::tracer_provider(&telemetry).unwrap();
        // The log writer lives as long as the test process.
        std::mem::forget(venus::telemetry::install_subscriber(&telemetry, &provider).unwrap());
        provider
    })
}

/// The gateway running in this process.
pub struct TestApp {
    pub address: SocketAddr,
    pub client: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestApp {
    pub async fn spawn(settings: Settings) -> Self {
        init_tracing();
        let app = venus::Application::build(settings)
            .await
            .expect("build app");
        let address = app.local_addr();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(app.run_until(async move {
            let _ = stopped.await;
        }));
        Self {
            address,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .unwrap(),
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }

    /// Uploads `document` as the `batch` part of a multipart body.
    pub async fn upload_multipart(&self, document: &str) -> reqwest::Response {
        let part = reqwest::multipart::Part::bytes(document.as_bytes().to_vec())
            .file_name("batch.json")
            .mime_str("application/json")
            .unwrap();
        let form = reqwest::multipart::Form::new().part("batch", part);
        self.client
            .post(self.url("/api/v1/upload"))
            .multipart(form)
            .send()
            .await
            .expect("upload")
    }

    pub async fn upload_json(&self, document: &str) -> reqwest::Response {
        self.client
            .post(self.url("/api/v1/upload"))
            .header("content-type", "application/json")
            .body(document.to_owned())
            .send()
            .await
            .expect("upload")
    }

    /// The Prometheus text of `/metrics`.
    pub async fn metrics(&self) -> String {
        fetch_text(&self.client, &self.url("/metrics")).await
    }

    /// Stops the gateway and waits for its drain.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap();
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

/// The value of header `name` of a Kafka message, as text.
pub fn header(message: &OwnedMessage, name: &str) -> Option<String> {
    use rdkafka::message::Headers;
    let headers = message.headers()?;
    headers
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// The names of a message's headers.
pub fn header_names(message: &OwnedMessage) -> Vec<String> {
    use rdkafka::message::Headers;
    message
        .headers()
        .map(|headers| headers.iter().map(|h| h.key.to_owned()).collect())
        .unwrap_or_default()
}

pub fn value_json(message: &OwnedMessage) -> serde_json::Value {
    serde_json::from_slice(message.payload().expect("a payload")).expect("JSON value")
}

/// The event's `id` (`data.id`) of a gateway message.
pub fn event_id(message: &OwnedMessage) -> String {
    value_json(message)["data"]["id"]
        .as_str()
        .expect("data.id is a string")
        .to_owned()
}

/// The body of a GET, as text.
pub async fn fetch_text(client: &reqwest::Client, url: &str) -> String {
    client
        .get(url)
        .send()
        .await
        .expect("GET")
        .text()
        .await
        .expect("a text body")
}

/// The sum of the samples of metric `name` (exactly that name) whose labels
/// contain `labels` (e.g. `result="rejected"`; empty: all), in Prometheus
/// text; 0 when there is none.
pub fn metric(text: &str, name: &str, labels: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .filter(|l| l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Everything the server sends on `stream` until it closes, within
/// `patience` (a reset or a server that keeps the connection open fails).
pub async fn read_to_close(stream: &mut tokio::net::TcpStream, patience: Duration) -> String {
    use tokio::io::AsyncReadExt;
    let mut answer = Vec::new();
    tokio::time::timeout(patience, stream.read_to_end(&mut answer))
        .await
        .expect("the server kept the connection open")
        .expect("an answer, not a reset");
    String::from_utf8_lossy(&answer).into_owned()
}
