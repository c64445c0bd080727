//! The signal that starts a shutdown, for both binaries (each then drains
//! in its own way: the gateway's `drain`, the ingester's `run_until`).

/// Completes on SIGINT (Ctrl-C) or SIGTERM (what orchestrators send): the
/// start of a shutdown, for both binaries.
pub async fn shutdown_requested() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
}
