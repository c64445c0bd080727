//! A Kafka message as the ingester carries it from the poll thread to the
//! processor: owned, with where it came from and which assignment of its
//! partition read it.

use opentelemetry::propagation::Extractor;
use rdkafka::message::{BorrowedMessage, Headers};
use rdkafka::Message;

/// Where a message came from. `epoch` numbers the assignments of the
/// partition in this process: a completion of a message read under an
/// earlier assignment (before a rebalance took the partition away) must not
/// move the new assignment's offsets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub epoch: u64,
}

/// One consumed message.
#[derive(Debug, Clone)]
pub struct Record {
    pub source: Source,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl Record {
    pub fn from_message(message: &BorrowedMessage<'_>, epoch: u64) -> Self {
        let headers = message
            .headers()
            .map(|headers| {
                headers
                    .iter()
                    .map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec()))
                    .collect()
            })
            .unwrap_or_default();
        Self {
            source: Source {
                topic: message.topic().to_owned(),
                partition: message.partition(),
                offset: message.offset(),
                epoch,
            },
            key: message.key().map(<[u8]>::to_vec),
            payload: message.payload().unwrap_or_default().to_vec(),
            headers,
        }
    }

    /// The value of header `name` as text, when it is UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key == name)
            .and_then(|(_, value)| std::str::from_utf8(value).ok())
    }

    /// Approximate bytes held, for the buffer accounting.
    pub fn size(&self) -> usize {
        self.payload.len()
            + self.key.as_ref().map_or(0, Vec::len)
            + self
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
    }
}

/// Reads W3C propagation headers (`traceparent`, `tracestate`, `baggage`)
/// from a record.
pub struct RecordHeaders<'a>(pub &'a Record);

impl Extractor for RecordHeaders<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.header(key)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.headers.iter().map(|(k, _)| k.as_str()).collect()
    }
}
