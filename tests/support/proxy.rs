//! A TCP proxy that can lose answers: requests always reach the server,
//! and while `swallow` is on, the server's answers are read and dropped,
//! so the client sees a timeout for work the server did (an insert whose
//! answer was lost).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub struct AnswerLosingProxy {
    pub port: u16,
    swallow: Arc<AtomicBool>,
}

impl AnswerLosingProxy {
    /// Forwards `127.0.0.1:<port>` to `127.0.0.1:<upstream>`, on a thread
    /// and runtime of its own (tests each have theirs, which end with them).
    pub fn start(upstream: u16) -> Self {
        let swallow = Arc::new(AtomicBool::new(false));
        let flag = swallow.clone();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                loop {
                    let Ok((client, _)) = listener.accept().await else {
                        continue;
                    };
                    let flag = flag.clone();
                    tokio::spawn(async move {
                        let Ok(server) =
                            tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                        else {
                            return;
                        };
                        let (mut client_read, mut client_write) = client.into_split();
                        let (mut server_read, mut server_write) = server.into_split();
                        let up = tokio::spawn(async move {
                            let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
                            let _ = server_write.shutdown().await;
                        });
                        let mut buffer = vec![0u8; 16 * 1024];
                        loop {
                            match server_read.read(&mut buffer).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
                                    if flag.load(Ordering::SeqCst) {
                                        continue;
                                    }
                                    if client_write.write_all(&buffer[..n]).await.is_err() {
                                        break;
                                    }
                                }
                            }
                        }
                        let _ = client_write.shutdown().await;
                        up.abort();
                    });
                }
            });
        });
        Self { port, swallow }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// From now on answers are dropped (`true`) or passed on (`false`).
    pub fn swallow(&self, on: bool) {
        self.swallow.store(on, Ordering::SeqCst);
    }
}
