//! The load generator's HTTP/1.1 client: a pool of keep-alive connections,
//! one request at a time on each, and nothing else.
//!
//! The load generator shares two cores with the gateway and the broker it
//! measures, so every microsecond it spends per request is taken from them
//! and shows up in the gateway's latency. reqwest's general client (its own
//! URL-to-URI conversion, header merging, boxed timeout and decoder per
//! request) cost about three times wrk's CPU per request; this client does
//! what wrk does: write the request, read the answer, keep the connection.

use std::sync::Mutex;
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Method, Request, Uri};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

type Sender = SendRequest<Full<Bytes>>;

/// Why a request got no answer.
#[derive(Debug)]
pub(crate) enum Failure {
    /// No connection could be opened (or its handshake failed).
    Connect,
    /// The request could not be written or its response head not read.
    Request,
    /// The response body broke off.
    Body,
    /// No full answer within the timeout.
    Timeout,
}

impl Failure {
    /// A short name for the report's error kinds.
    pub fn kind(&self) -> &'static str {
        match self {
            Failure::Connect => "connect",
            Failure::Request => "request",
            Failure::Body => "body",
            Failure::Timeout => "timeout",
        }
    }
}

/// A response, read in full.
pub(crate) struct Answer {
    pub status: u16,
    pub body: Bytes,
}

/// Posts bodies to one URL over pooled HTTP/1.1 connections.
pub(crate) struct Client {
    /// `host[:port]`, dialled and sent as `Host`.
    authority: String,
    host: HeaderValue,
    /// The request target: path and query.
    target: Uri,
    /// Idle connections, most recently used last.
    idle: Mutex<Vec<Sender>>,
    /// Idle connections kept at most; more are closed when their request ends.
    max_idle: usize,
    /// For the whole exchange: connecting, sending, reading the body.
    timeout: Duration,
}

impl Client {
    /// A client for `url` (`http://host[:port]/path[?query]`).
    pub fn new(url: &str, max_idle: usize, timeout: Duration) -> anyhow::Result<Self> {
        let uri: Uri = url
            .parse()
            .with_context(|| format!("--url {url} is not a URL"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some(other) => bail!(
                "--url {url}: the load generator speaks plain HTTP/1.1, not {other} \
                 (put it next to the gateway, or behind the TLS terminator)"
            ),
            None => bail!("--url {url} needs a scheme: http://host:port/path"),
        }
        let Some(authority) = uri.authority() else {
            bail!("--url {url} names no host");
        };
        if authority.as_str().contains('@') {
            bail!("--url {url}: credentials in the URL are not sent; a write key goes in --key");
        }
        let authority = match authority.port() {
            Some(_) => authority.as_str().to_owned(),
            None => format!("{}:80", authority.host()),
        };
        let host = HeaderValue::from_str(uri.authority().map_or("", |a| a.as_str()))
            .with_context(|| format!("--url {url}: the host is not a header value"))?;
        let target: Uri = uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .parse()
            .with_context(|| format!("--url {url}: bad path"))?;
        Ok(Self {
            authority,
            host,
            target,
            idle: Mutex::new(Vec::with_capacity(max_idle)),
            max_idle,
            timeout,
        })
    }

    /// `POST`s `body` and reads the whole answer, within the timeout.
    pub async fn post(
        &self,
        content_type: &HeaderValue,
        authorization: Option<&HeaderValue>,
        body: Bytes,
    ) -> Result<Answer, Failure> {
        let mut request = Request::new(Full::new(body));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = self.target.clone();
        let headers = request.headers_mut();
        headers.insert(HOST, self.host.clone());
        headers.insert(CONTENT_TYPE, content_type.clone());
        if let Some(authorization) = authorization {
            headers.insert(AUTHORIZATION, authorization.clone());
        }
        match tokio::time::timeout(self.timeout, self.exchange(request)).await {
            Ok(answer) => answer,
            // The connection is dropped with the future: never reused
            // half-way through an answer.
            Err(_) => Err(Failure::Timeout),
        }
    }

    async fn exchange(&self, mut request: Request<Full<Bytes>>) -> Result<Answer, Failure> {
        loop {
            let (mut sender, reused) = match self.take_idle() {
                Some(sender) => (sender, true),
                None => (self.connect().await?, false),
            };
            if sender.ready().await.is_err() {
                if reused {
                    // The gateway closed it while idle (its idle timeout).
                    continue;
                }
                return Err(Failure::Connect);
            }
            match sender.try_send_request(request).await {
                Ok(response) => {
                    let status = response.status().as_u16();
                    let body = response
                        .into_body()
                        .collect()
                        .await
                        .map_err(|_| Failure::Body)?
                        .to_bytes();
                    self.put_back(sender);
                    return Ok(Answer { status, body });
                }
                Err(mut error) => match error.take_message() {
                    // Never written: the idle connection had closed. Safe
                    // to send again, on another one.
                    Some(unsent) if reused => request = unsent,
                    _ => return Err(Failure::Request),
                },
            }
        }
    }

    fn take_idle(&self) -> Option<Sender> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(sender) = idle.pop() {
            if !sender.is_closed() {
                return Some(sender);
            }
        }
        None
    }

    fn put_back(&self, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < self.max_idle {
            idle.push(sender);
        }
    }

    async fn connect(&self) -> Result<Sender, Failure> {
        let stream = TcpStream::connect(&self.authority)
            .await
            .map_err(|_| Failure::Connect)?;
        // Each request is written in one go; do not hold its last segment
        // back waiting for the previous answer's ACK.
        stream.set_nodelay(true).map_err(|_| Failure::Connect)?;
        let (sender, connection) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|_| Failure::Connect)?;
        // Drives the connection; ends when the sender is dropped or the
        // gateway closes it.
        tokio::spawn(connection);
        Ok(sender)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A server that answers every request on a connection with `reply`,
    /// closing each connection after `per_connection` answers; returns its
    /// URL and a count of the connections it accepted.
    async fn server(
        per_connection: usize,
    ) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "http://{}/api/v1/upload?x=1",
            listener.local_addr().unwrap()
        );
        let accepted = std::sync::Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    for answered in 0..per_connection {
                        // Read one request: head, then content-length bytes.
                        let body_at = loop {
                            let mut chunk = [0u8; 4096];
                            let n = stream.read(&mut chunk).await.unwrap();
                            if n == 0 {
                                return;
                            }
                            buf.extend_from_slice(&chunk[..n]);
                            if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                                break at + 4;
                            }
                        };
                        let head = String::from_utf8_lossy(&buf[..body_at]).to_lowercase();
                        assert!(head.starts_with("post /api/v1/upload?x=1 http/1.1\r\n"));
                        assert!(head.contains("\r\nhost: 127.0.0.1:"));
                        assert!(head.contains("\r\ncontent-type: text/plain\r\n"));
                        let length: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length: "))
                            .unwrap()
                            .trim()
                            .parse()
                            .unwrap();
                        while buf.len() < body_at + length {
                            let mut chunk = [0u8; 4096];
                            let n = stream.read(&mut chunk).await.unwrap();
                            buf.extend_from_slice(&chunk[..n]);
                        }
                        let body = buf[body_at..body_at + length].to_vec();
                        buf.drain(..body_at + length);
                        let last = answered + 1 == per_connection;
                        let reply = format!(
                            "HTTP/1.1 201 Created\r\ncontent-length: {}\r\n{}\r\n",
                            body.len() + 1,
                            if last { "connection: close\r\n" } else { "" }
                        );
                        stream.write_all(reply.as_bytes()).await.unwrap();
                        stream.write_all(&body).await.unwrap();
                        stream.write_all(b"!").await.unwrap();
                    }
                });
            }
        });
        (url, accepted)
    }

    #[tokio::test]
    async fn posts_reuse_a_connection_and_survive_the_server_closing_it() {
        let (url, accepted) = server(2).await;
        let client = Client::new(&url, 4, Duration::from_secs(5)).unwrap();
        let content_type = HeaderValue::from_static("text/plain");
        for n in 0..5 {
            let body = Bytes::from(format!("request {n}"));
            let answer = client.post(&content_type, None, body).await.unwrap();
            assert_eq!(answer.status, 201);
            assert_eq!(&answer.body[..], format!("request {n}!").as_bytes());
        }
        // Two answers per connection: 5 requests need 3 connections, and
        // none failed when the server closed one under the pool.
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_silent_server_times_out_and_a_closed_port_fails_to_connect() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        let client = Client::new(&url, 1, Duration::from_millis(200)).unwrap();
        let content_type = HeaderValue::from_static("text/plain");
        let failure = || async {
            let answer = client
                .post(&content_type, None, Bytes::from_static(b"x"))
                .await;
            answer.err().expect("no answer expected").kind()
        };
        assert_eq!(failure().await, "timeout");
        drop(listener);
        assert_eq!(failure().await, "connect");
    }

    #[test]
    fn only_plain_http_urls_are_taken() {
        let timeout = Duration::from_secs(1);
        assert!(Client::new("https://example.com/", 1, timeout).is_err());
        assert!(Client::new("example.com/upload", 1, timeout).is_err());
        assert!(Client::new("http://user:pw@example.com/", 1, timeout).is_err());
        let client = Client::new("http://[::1]/x?y=1", 1, timeout).unwrap();
        assert_eq!(client.authority, "[::1]:80");
        assert_eq!(client.target, "/x?y=1");
        let client = Client::new("http://example.com/api/v1/upload", 1, timeout).unwrap();
        assert_eq!(client.authority, "example.com:80");
        assert_eq!(client.host, "example.com");
        assert_eq!(client.target, "/api/v1/upload");
    }
}
