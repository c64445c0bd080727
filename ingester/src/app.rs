//! Wires the ingester together and runs it until a shutdown signal:
//! poll thread -> processor -> writer, the dead-letter producer, the
//! ClickHouse probe and the HTTP endpoints; then the drain.
//!
//! Shutdown (SIGTERM): the poll thread stops fetching and closes the record
//! channel; the processor flushes its batch; the writer inserts what is
//! queued (still retrying); the poll thread then stores and commits what is
//! done and leaves the group. All within `ingester.shutdown_grace_ms`; past
//! it, unfinished inserts are given up, stay uncommitted, and are read again
//! by the next instance.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use opentelemetry_sdk::trace::SdkTracer;
use tokio::sync::{mpsc, watch};
use venus_shared::telemetry::Metering;

use crate::batch::{Batch, Limits};
use crate::clickhouse::ClickHouse;
use crate::config::Settings;
use crate::consumer::PollThread;
use crate::dead_letter::{self, DeadLetters};
use crate::health::{self, Health};
use crate::metrics::Metrics;
use crate::offsets::Offsets;
use crate::processor::{Processor, SpanAttributes};
use crate::record::HeldBytes;
use crate::server::{self, AppState};
use crate::writer::{Backoff, Writer};

/// How often ClickHouse is pinged for `/readyz`.
const PROBE_INTERVAL: Duration = Duration::from_millis(500);

/// A started ingester.
pub struct Ingester {
    settings: Settings,
    listener: tokio::net::TcpListener,
    metering: Arc<Metering>,
    tracer: SdkTracer,
}

impl Ingester {
    /// Binds the HTTP listener and sets up metrics; nothing is consumed yet.
    /// `tracer` makes the span of each message (the installed provider's,
    /// see `venus_shared::telemetry::TracingGuard::tracer`).
    pub async fn build(settings: Settings, tracer: SdkTracer) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind(settings.listen_addr()).await?;
        let metering = Arc::new(Metering::new(&settings.telemetry)?);
        Ok(Self {
            settings,
            listener,
            metering,
            tracer,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Runs until `shutdown` completes, then drains within the grace.
    pub async fn run_until(
        self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> anyhow::Result<()> {
        let Self {
            settings,
            listener,
            metering,
            tracer,
        } = self;
        let ingester = &settings.ingester;
        let metrics = Metrics::new(&metering.provider);
        let health = Arc::new(Health::default());
        let clickhouse = ClickHouse::new(&ingester.clickhouse)?;
        let offsets = Arc::new(Offsets::default());
        let (cancel_tx, cancel) = watch::channel(false);

        let http = axum::serve(
            listener,
            server::router(AppState {
                health: health.clone(),
                metering: metering.clone(),
            }),
        );
        let (http_stop, http_stopped) = tokio::sync::oneshot::channel::<()>();
        let http = tokio::spawn(async move {
            let _ = http
                .with_graceful_shutdown(async {
                    let _ = http_stopped.await;
                })
                .await;
        });
        let probe = tokio::spawn(health::probe(
            health.clone(),
            clickhouse.clone(),
            PROBE_INTERVAL,
        ));

        let topic_creation =
            tokio::spawn(dead_letter::create_topic(settings.clone(), health.clone()));
        let dead_letters = DeadLetters::new(&settings, metrics.clone(), health.clone())?;
        let (records_tx, records_rx) = mpsc::unbounded_channel();
        // A batch queued behind each one being written: more waits in the
        // record channel, where the poll thread counts it and pauses.
        let (batches_tx, batches_rx) = mpsc::channel(ingester.insert_concurrency);
        let batches_rx = Arc::new(tokio::sync::Mutex::new(batches_rx));
        // Marks run ahead of the inserts by a full buffer's worth of
        // messages: one small insert into the marks table per that many.
        let marks = crate::marks::Marks::new(&ingester.group_id, ingester.max_buffered_rows as i64);
        let writers: Vec<_> = (0..ingester.insert_concurrency)
            .map(|id| {
                tokio::spawn(
                    Writer {
                        id,
                        clickhouse: clickhouse.clone(),
                        offsets: offsets.clone(),
                        metrics: metrics.clone(),
                        health: health.clone(),
                        dead_letters: dead_letters.for_sender(&format!("writer {id}")),
                        backoff: Backoff::new(
                            Duration::from_millis(ingester.retry_initial_ms),
                            Duration::from_millis(ingester.retry_max_ms),
                        ),
                        cancel: cancel.clone(),
                        schema_ready: false,
                        deduplicate: ingester.deduplicate,
                        marks: marks.clone(),
                    }
                    .run(batches_rx.clone()),
                )
            })
            .collect();
        let processor = Processor {
            batch: Batch::new(Limits {
                rows: ingester.batch_rows,
                bytes: ingester.batch_bytes,
                interval: ingester.flush_interval(),
            }),
            writer: batches_tx,
            dead_letters: dead_letters.for_sender("processor"),
            offsets: offsets.clone(),
            tracer,
            attributes: SpanAttributes::new(&ingester.group_id),
            cancel: cancel.clone(),
            layout: clickhouse.layout_receiver(),
        }
        .run(records_rx);
        let processor = {
            let health = health.clone();
            tokio::spawn(async move {
                // Ends when the poll thread closes the channel (shutdown,
                // or the thread died) or by a panic: either way, nothing
                // is processed any more.
                let result = tokio::spawn(processor).await;
                let reason = match result {
                    Ok(()) => "the processor stopped".to_owned(),
                    Err(error) => format!("the processor failed: {error}"),
                };
                health.fail("processor", reason);
            })
        };
        let grace = ingester.shutdown_grace();
        let poll = PollThread::start(
            &settings,
            offsets.clone(),
            metrics,
            records_tx,
            HeldBytes::default(),
            health.clone(),
            grace,
        )?;

        shutdown.await;
        tracing::info!(
            grace_ms = grace.as_millis() as u64,
            "shutting down: flushing"
        );
        let deadline = tokio::time::Instant::now() + grace;
        poll.stop_fetching();
        let drained = async {
            let _ = processor.await;
            for writer in writers {
                let _ = writer.await;
            }
        };
        // Leave a little of the grace for the final commit.
        let flush_deadline = deadline - grace / 10;
        if tokio::time::timeout_at(flush_deadline, drained)
            .await
            .is_err()
        {
            tracing::warn!(
                in_flight = offsets.in_flight(),
                "grace ran out: unfinished messages stay uncommitted and are read again after a restart"
            );
            let _ = cancel_tx.send(true);
        }
        poll.drained();
        poll.join().await;
        probe.abort();
        topic_creation.abort();
        let _ = http_stop.send(());
        let _ = tokio::time::timeout_at(deadline, http).await;
        tracing::info!("stopped");
        Ok(())
    }
}
