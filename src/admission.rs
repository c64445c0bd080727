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
//! * **Memory, per client address.** One address ([`PeerKey`]: the client
//!   address resolved behind `server.trusted_proxies`) holds at most
//!   `server.max_in_flight_bytes_per_client` of the budget; past it its own
//!   upload ends with 429, and every other client still has the rest.
//! * **Rate.** [`BodyMeter`] counts what arrived, so the upload handler can
//!   end a body slower than `server.min_body_rate_bytes_per_sec`.
//! * **Processing slots.** Only once the whole body is in does an upload take
//!   one of `server.max_in_flight_requests` slots (parsing, Kafka), so slow
//!   bodies never hold them.

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use axum::body::Body;
use bytes::Bytes;
use dashmap::DashMap;
use http_body::{Frame, SizeHint};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::peers::PeerKey;

/// The byte budget shared by every upload in flight.
#[derive(Clone)]
pub struct MemoryBudget {
    semaphore: Arc<Semaphore>,
    total: usize,
    /// Bytes held per client address, each at most `per_client`.
    clients: Arc<DashMap<PeerKey, usize>>,
    /// 0: no share per client.
    per_client: usize,
}

/// Why a charge was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The whole budget is in use: the gateway is overloaded (503).
    Budget,
    /// This client address holds its share already (429).
    ClientShare,
}

const NOT_REFUSED: u8 = 0;
const REFUSED_BUDGET: u8 = 1;
const REFUSED_CLIENT: u8 = 2;

impl MemoryBudget {
    /// A budget of `total_bytes`, of which one client address may hold at
    /// most `per_client_bytes` (0: no share per client).
    pub fn new(total_bytes: usize, per_client_bytes: usize) -> Self {
        Self {
            semaphore: Arc::new(Semaphore::new(total_bytes.min(Semaphore::MAX_PERMITS))),
            total: total_bytes,
            clients: Arc::new(DashMap::new()),
            per_client: if per_client_bytes >= total_bytes {
                0
            } else {
                per_client_bytes
            },
        }
    }

    /// The share one client address may hold (0: none).
    pub fn per_client(&self) -> usize {
        self.per_client
    }

    /// Bytes of the budget held right now.
    pub fn in_use(&self) -> usize {
        self.total
            .saturating_sub(self.semaphore.available_permits())
    }

    /// Starts the account of an upload from `client`: nothing charged yet.
    pub fn account(&self, client: IpAddr) -> Arc<Account> {
        Arc::new(Account {
            budget: self.clone(),
            client: PeerKey::of(client),
            held: Mutex::new(None),
            received: AtomicU64::new(0),
            refused: AtomicU8::new(NOT_REFUSED),
        })
    }

    /// Adds `bytes` to `client`'s share; `false` (and nothing added) past it.
    fn take_share(&self, client: PeerKey, bytes: usize) -> bool {
        if self.per_client == 0 {
            return true;
        }
        let mut held = self.clients.entry(client).or_insert(0);
        if held.saturating_add(bytes) > self.per_client {
            return false;
        }
        *held += bytes;
        true
    }

    /// Gives `bytes` of `client`'s share back, forgetting a client that
    /// holds nothing.
    fn return_share(&self, client: PeerKey, bytes: usize) {
        if self.per_client == 0 || bytes == 0 {
            return;
        }
        self.clients.remove_if_mut(&client, |_, held| {
            *held = held.saturating_sub(bytes);
            *held == 0
        });
    }
}

/// What one upload holds of the budget and how much of its body arrived.
/// Dropping it gives the bytes back.
pub struct Account {
    budget: MemoryBudget,
    client: PeerKey,
    held: Mutex<Option<OwnedSemaphorePermit>>,
    received: AtomicU64,
    refused: AtomicU8,
}

impl Drop for Account {
    fn drop(&mut self) {
        let held = self.held();
        self.budget.return_share(self.client, held);
    }
}

impl Account {
    /// Charges `bytes` more; `false` (and nothing charged) when the budget,
    /// or the client's share of it, cannot give them now. Never waits: an
    /// overloaded gateway answers at once rather than queueing bodies.
    pub fn charge(&self, bytes: usize) -> bool {
        if bytes == 0 {
            return true;
        }
        if !self.budget.take_share(self.client, bytes) {
            self.refused.store(REFUSED_CLIENT, Ordering::Relaxed);
            return false;
        }
        let granted = u32::try_from(bytes)
            .ok()
            .and_then(|n| self.budget.semaphore.clone().try_acquire_many_owned(n).ok());
        let Some(permit) = granted else {
            self.budget.return_share(self.client, bytes);
            self.refused.store(REFUSED_BUDGET, Ordering::Relaxed);
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
        self.refusal().is_some()
    }

    /// Why a charge was refused, if one was.
    pub fn refusal(&self) -> Option<Refused> {
        match self.refused.load(Ordering::Relaxed) {
            REFUSED_BUDGET => Some(Refused::Budget),
            REFUSED_CLIENT => Some(Refused::ClientShare),
            _ => None,
        }
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

    fn client(n: u8) -> IpAddr {
        IpAddr::from([192, 0, 2, n])
    }

    #[test]
    fn charges_add_up_and_come_back_on_drop() {
        let budget = MemoryBudget::new(100, 0);
        let a = budget.account(client(1));
        assert!(a.charge(60));
        assert!(a.charge(30));
        assert_eq!(a.held(), 90);
        assert_eq!(budget.in_use(), 90);
        let b = budget.account(client(1));
        assert!(!b.charge(20), "only 10 bytes are left");
        assert_eq!(b.refusal(), Some(Refused::Budget));
        assert!(b.exhausted());
        assert!(b.charge(10));
        drop(a);
        assert_eq!(budget.in_use(), 10);
        drop(b);
        assert_eq!(budget.in_use(), 0);
    }

    #[test]
    fn one_client_holds_at_most_its_share_and_others_keep_the_rest() {
        let budget = MemoryBudget::new(100, 40);
        let a = budget.account(client(1));
        assert!(a.charge(30));
        let a2 = budget.account(client(1));
        assert!(!a2.charge(20), "30 + 20 is past the share of 40");
        assert_eq!(a2.refusal(), Some(Refused::ClientShare));
        assert!(a2.charge(10), "up to the share is fine");
        let b = budget.account(client(2));
        assert!(b.charge(40), "another client has its own share");
        let c = budget.account(client(3));
        assert!(!c.charge(40), "but not more than the whole budget");
        assert_eq!(c.refusal(), Some(Refused::Budget));
        assert!(c.charge(20));
        assert_eq!(budget.in_use(), 100);
        drop((a, a2));
        assert_eq!(budget.in_use(), 60);
        let a3 = budget.account(client(1));
        assert!(a3.charge(40), "the share came back with the bytes");
        drop((a3, b, c));
        assert_eq!(budget.in_use(), 0);
        assert!(
            budget.clients.is_empty(),
            "clients holding nothing are forgotten"
        );
    }

    #[test]
    fn a_share_as_large_as_the_budget_is_no_share() {
        let budget = MemoryBudget::new(100, 100);
        assert_eq!(budget.per_client(), 0);
        assert!(budget.account(client(1)).charge(100));
    }

    #[tokio::test]
    async fn a_body_past_the_budget_fails_and_says_why() {
        let budget = MemoryBudget::new(8, 0);
        let account = budget.account(client(1));
        let body = MeteredBody::wrap(Body::from("0123456789"), account.clone());
        let error = body.collect().await.unwrap_err();
        assert!(account.exhausted());
        assert!(error.to_string().contains("memory budget"), "{error}");
        assert_eq!(account.received(), 10);
        assert_eq!(budget.in_use(), 0, "nothing charged for the refused frame");

        let account = budget.account(client(1));
        let body = MeteredBody::wrap(Body::from("01234567"), account.clone());
        assert_eq!(body.collect().await.unwrap().to_bytes(), "01234567");
        assert_eq!(budget.in_use(), 8);
        drop(account);
        assert_eq!(budget.in_use(), 0);
    }
}
