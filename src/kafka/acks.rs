//! The acknowledgements of one batch, gathered where librdkafka reports them.
//!
//! librdkafka reports each message's outcome on the producer's polling
//! thread. A future per message (rdkafka's `FutureProducer`: a oneshot
//! channel, a boxed sender, a task in a `FuturesUnordered`, a wake-up per
//! acknowledgement) cost about 6% of the gateway's CPU per event
//! (docs/BENCHMARKS.md). Here a batch has one [`BatchAcks`]: the callback
//! writes each outcome into its slot and counts down, and the request is
//! woken once, when the last one is in.
//!
//! The count starts at one, held by the request while it hands messages
//! over ([`BatchAcks::sent`] per message taken, [`BatchAcks::all_sent`] at
//! the end), so the request cannot be woken before it has sent everything,
//! however fast the acknowledgements come back.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use rdkafka::error::KafkaError;
use tokio::sync::Notify;

/// What Kafka answered for one message: `Ok` acknowledged, `Err` refused or
/// given up (including a purge when the producer is replaced).
pub type Ack = Result<(), KafkaError>;

/// One batch's outcomes, by index of the event.
pub struct BatchAcks {
    outcomes: Mutex<Vec<Option<Ack>>>,
    /// Messages taken by the producer and not answered yet, plus one while
    /// the request is still sending.
    unanswered: AtomicUsize,
    answered: Notify,
}

/// What a message carries through librdkafka to its delivery report: its
/// batch and its event's index.
pub struct Delivery {
    acks: Arc<BatchAcks>,
    index: usize,
}

impl Delivery {
    /// Called by the producer's context with the message's outcome.
    pub fn report(self, ack: Ack) {
        self.acks.record(self.index, ack);
    }
}

impl BatchAcks {
    /// Room for the outcomes of events `0..events`.
    pub fn new(events: usize) -> Arc<Self> {
        Arc::new(Self {
            outcomes: Mutex::new((0..events).map(|_| None).collect()),
            unanswered: AtomicUsize::new(1),
            answered: Notify::new(),
        })
    }

    /// The opaque for the message of event `index`; count it with
    /// [`BatchAcks::sent`] once the producer took it.
    pub fn delivery(self: &Arc<Self>, index: usize) -> Box<Delivery> {
        Box::new(Delivery {
            acks: Arc::clone(self),
            index,
        })
    }

    /// One more message to wait for. Call it before the producer can report
    /// it, i.e. before handing it over, and [`BatchAcks::not_sent`] if the
    /// producer refused it.
    pub fn sent(&self) {
        self.unanswered.fetch_add(1, Ordering::AcqRel);
    }

    /// The producer refused a message counted by [`BatchAcks::sent`]; no
    /// report will come for it.
    pub fn not_sent(&self) {
        self.count_down();
    }

    /// The request handed over everything it will; from now on the last
    /// answer wakes it.
    pub fn all_sent(&self) {
        self.count_down();
    }

    /// Waits until every message sent was answered (call after
    /// [`BatchAcks::all_sent`]).
    pub async fn all_answered(&self) {
        // `notify_one` keeps a permit when no one waits yet, so an answer
        // that came before this wait is not missed.
        while self.unanswered.load(Ordering::Acquire) > 0 {
            self.answered.notified().await;
        }
    }

    /// The outcomes so far, by event index (`None`: not answered, or never
    /// sent).
    pub fn take(&self) -> Vec<Option<Ack>> {
        std::mem::take(&mut *self.lock())
    }

    fn record(&self, index: usize, ack: Ack) {
        if let Some(slot) = self.lock().get_mut(index) {
            *slot = Some(ack);
        }
        self.count_down();
    }

    fn count_down(&self) {
        if self.unanswered.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.answered.notify_one();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Option<Ack>>> {
        // A panic while holding it leaves plain data behind.
        self.outcomes.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rdkafka::types::RDKafkaErrorCode;

    use super::*;

    fn refused() -> KafkaError {
        KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut)
    }

    #[tokio::test]
    async fn the_wait_ends_with_the_last_answer_and_keeps_every_outcome() {
        let acks = BatchAcks::new(3);
        let deliveries: Vec<_> = [0, 2].iter().map(|&i| acks.delivery(i)).collect();
        for _ in &deliveries {
            acks.sent();
        }
        acks.all_sent();
        let waiting = tokio::spawn({
            let acks = Arc::clone(&acks);
            async move { acks.all_answered().await }
        });
        let mut deliveries = deliveries.into_iter();
        deliveries.next().unwrap().report(Ok(()));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "one answer is still out");
        deliveries.next().unwrap().report(Err(refused()));
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("woken by the last answer")
            .unwrap();
        let outcomes = acks.take();
        assert!(matches!(outcomes[0], Some(Ok(()))));
        assert!(outcomes[1].is_none(), "never sent");
        assert!(matches!(outcomes[2], Some(Err(_))));
    }

    #[tokio::test]
    async fn answers_before_the_wait_or_before_all_sent_are_not_missed() {
        let acks = BatchAcks::new(2);
        acks.sent();
        acks.delivery(0).report(Ok(()));
        // Answered already, but the request is still sending: not done.
        assert_eq!(acks.unanswered.load(Ordering::Acquire), 1);
        acks.sent();
        acks.not_sent();
        acks.all_sent();
        tokio::time::timeout(Duration::from_secs(5), acks.all_answered())
            .await
            .expect("nothing left to wait for");
    }

    #[tokio::test]
    async fn an_unanswered_message_keeps_the_wait_going() {
        let acks = BatchAcks::new(1);
        acks.sent();
        let _lost = acks.delivery(0);
        acks.all_sent();
        let waited = tokio::time::timeout(Duration::from_millis(50), acks.all_answered()).await;
        assert!(waited.is_err(), "the caller's deadline must end this wait");
        assert!(acks.take()[0].is_none());
    }
}
