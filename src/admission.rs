//! What an upload must be granted before the gateway spends memory and CPU
//! on it, so that one client (or a thousand slow ones) cannot take from the
//! others.
//!
//! * **Memory, in bytes.** [`MemoryBudget`] is a weighted semaphore of
//!   `server.max_in_flight_bytes`. A body is charged as its bytes arrive
//!   ([`MeteredBody`]), and the inflated document once it exists; the charge
//!   is held until the upload is answered. A body that would pass the budget
//!   ends at once with 503. A client that trickles a byte a second holds a
//!   byte, not a slot.
//! * **Rate.** [`BodyMeter`] counts what arrived, so the upload handler can
//!   end a body slower than `server.min_body_rate_bytes_per_sec`.
//! * **Processing slots.** Only once the whole body is in does an upload take
//!   one of `server.max_in_flight_requests` slots (parsing, Kafka), so slow
//!   bodies never hold them.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use axum::body::Body;
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The byte budget shared by every upload in flight.
#[derive(Clone)]
pub struct MemoryBudget {
    semaphore: Arc<Semaphore>,
    total: usize,
}

impl MemoryBudget {
    pub fn new(total_bytes: usize) -> Self {
        Self {
            semaphore: Arc::new(Semaphore::new(total_bytes.min(Semaphore::MAX_PERMITS))),
            total: total_bytes,
        }
    }

    /// Bytes of the budget held right now.
    pub fn in_use(&self) -> usize {
        self.total
            .saturating_sub(self.semaphore.available_permits())
    }

    /// Starts an upload's account: nothing charged yet.
    pub fn account(&self) -> Arc<Account> {
        Arc::new(Account {
            budget: self.semaphore.clone(),
            held: Mutex::new(None),
            received: AtomicU64::new(0),
            exhausted: AtomicBool::new(false),
        })
    }
}

/// What one upload holds of the budget and how much of its body arrived.
/// Dropping it gives the bytes back.
pub struct Account {
    budget: Arc<Semaphore>,
    held: Mutex<Option<OwnedSemaphorePermit>>,
    received: AtomicU64,
    exhausted: AtomicBool,
}

impl Account {
    /// Charges `bytes` more; `false` (and nothing charged) when the budget
    /// cannot give them now. Never waits: an overloaded gateway answers 503
    /// rather than queueing bodies.
    pub fn charge(&self, bytes: usize) -> bool {
        if bytes == 0 {
            return true;
        }
        let granted = u32::try_from(bytes)
            .ok()
            .and_then(|n| self.budget.clone().try_acquire_many_owned(n).ok());
        let Some(permit) = granted else {
            self.exhausted.store(true, Ordering::Relaxed);
            return false;
        };
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        match held.as_mut() {
            Some(existing) => existing.merge(permit),
            None => *held = Some(permit),
        }
        true
    }

    /// Body bytes that arrived so far.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Whether a charge was refused (the reason a body ended early).
    pub fn exhausted(&self) -> bool {
        self.exhausted.load(Ordering::Relaxed)
    }

    /// Bytes charged so far.
    pub fn held(&self) -> usize {
        self.held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map_or(0, |p| p.num_permits())
    }
}

/// A request body that charges every frame to an [`Account`] before
/// handing it on, and fails once the budget says no.
pub struct MeteredBody {
    inner: Body,
    account: Arc<Account>,
}

/// The error a [`MeteredBody`] ends with when the budget is exhausted.
#[derive(Debug, thiserror::Error)]
#[error("the gateway's memory budget for request bodies is exhausted")]
pub struct BudgetExhausted;

impl MeteredBody {
    pub fn wrap(inner: Body, account: Arc<Account>) -> Body {
        Body::new(Self { inner, account })
    }
}

impl http_body::Body for MeteredBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                self.account
                    .received
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
                if !self.account.charge(data.len()) {
                    return Poll::Ready(Some(Err(axum::Error::new(BudgetExhausted))));
                }
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[test]
    fn charges_add_up_and_come_back_on_drop() {
        let budget = MemoryBudget::new(100);
        let a = budget.account();
        assert!(a.charge(60));
        assert!(a.charge(30));
        assert_eq!(a.held(), 90);
        assert_eq!(budget.in_use(), 90);
        let b = budget.account();
        assert!(!b.charge(20), "only 10 bytes are left");
        assert!(b.exhausted());
        assert!(b.charge(10));
        drop(a);
        assert_eq!(budget.in_use(), 10);
        drop(b);
        assert_eq!(budget.in_use(), 0);
    }

    #[tokio::test]
    async fn a_body_past_the_budget_fails_and_says_why() {
        let budget = MemoryBudget::new(8);
        let account = budget.account();
        let body = MeteredBody::wrap(Body::from("0123456789"), account.clone());
        let error = body.collect().await.unwrap_err();
        assert!(account.exhausted());
        assert!(error.to_string().contains("memory budget"), "{error}");
        assert_eq!(account.received(), 10);
        assert_eq!(budget.in_use(), 0, "nothing charged for the refused frame");

        let account = budget.account();
        let body = MeteredBody::wrap(Body::from("01234567"), account.clone());
        assert_eq!(body.collect().await.unwrap().to_bytes(), "01234567");
        assert_eq!(budget.in_use(), 8);
        drop(account);
        assert_eq!(budget.in_use(), 0);
    }
}
