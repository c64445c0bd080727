//! A Kafka message as the ingester carries it from the poll thread to the
//! processor: owned, with where it came from and which assignment of its
//! partition read it.
//!
//! A record is read once and held until its row is in ClickHouse (the
//! original bytes are what goes to the dead-letter topic should ClickHouse
//! reject the row), so it is kept compact: its value, key and headers share
//! one allocation, and the topic name is shared by every record of the
//! topic. Per message, that is two allocations fewer than five.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use opentelemetry::propagation::Extractor;
use rdkafka::message::{BorrowedMessage, Headers};
use rdkafka::Message;

/// Where a message came from. `epoch` numbers the assignments of the
/// partition in this process: a completion of a message read under an
/// earlier assignment (before a rebalance took the partition away) must not
/// move the new assignment's offsets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
    pub epoch: u64,
}

/// Where a header's name and value end in [`Record::bytes`].
#[derive(Debug, Clone, Copy)]
struct HeaderAt {
    name_end: u32,
    value_end: u32,
    /// A header may have no value at all (not even an empty one).
    has_value: bool,
}

/// The bytes held by records alive (`ingester.max_buffered_bytes`): each
/// record adds its share when the poll thread reads it and takes it back
/// when it is dropped, whichever path it took (row, dead letter, given up).
#[derive(Debug, Clone, Default)]
pub struct HeldBytes(Arc<AtomicI64>);

impl HeldBytes {
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A record's share of [`HeldBytes`]. A clone is not counted (only tests
/// and the dead-letter path's reads clone records, briefly).
#[derive(Debug, Default)]
struct Charge(Option<(HeldBytes, i64)>);

impl Clone for Charge {
    fn clone(&self) -> Self {
        Self(None)
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        if let Some((held, bytes)) = self.0.take() {
            held.0.fetch_sub(bytes, Ordering::Relaxed);
        }
    }
}

/// One consumed message.
#[derive(Debug, Clone)]
pub struct Record {
    pub source: Source,
    /// The value, then the key, then each header's name and value.
    bytes: Box<[u8]>,
    payload_end: u32,
    /// Where the key ends; `None` for a message without a key.
    key_end: Option<u32>,
    headers: Box<[HeaderAt]>,
    charge: Charge,
}

impl Record {
    /// A record of `payload`, `key` and `headers` (name, value) read from
    /// `source`.
    pub fn new<'a>(
        source: Source,
        payload: &[u8],
        key: Option<&[u8]>,
        headers: impl IntoIterator<Item = (&'a str, Option<&'a [u8]>)> + Clone,
    ) -> Self {
        let header_bytes: usize = headers
            .clone()
            .into_iter()
            .map(|(name, value)| name.len() + value.map_or(0, <[u8]>::len))
            .sum();
        let mut bytes =
            Vec::with_capacity(payload.len() + key.map_or(0, <[u8]>::len) + header_bytes);
        bytes.extend_from_slice(payload);
        let payload_end = offset(&bytes);
        let key_end = key.map(|key| {
            bytes.extend_from_slice(key);
            offset(&bytes)
        });
        let headers = headers
            .into_iter()
            .map(|(name, value)| {
                bytes.extend_from_slice(name.as_bytes());
                let name_end = offset(&bytes);
                bytes.extend_from_slice(value.unwrap_or_default());
                HeaderAt {
                    name_end,
                    value_end: offset(&bytes),
                    has_value: value.is_some(),
                }
            })
            .collect();
        Self {
            source,
            bytes: bytes.into_boxed_slice(),
            payload_end,
            key_end,
            headers,
            charge: Charge::default(),
        }
    }

    /// Counts this record in `held` until it is dropped: twice its bytes
    /// (the record, and its row in the batch's body, which lives as long)
    /// plus its fixed size.
    pub fn charged(mut self, held: &HeldBytes) -> Self {
        let bytes = 2 * self.bytes.len() as i64 + std::mem::size_of::<Self>() as i64;
        held.0.fetch_add(bytes, Ordering::Relaxed);
        self.charge = Charge(Some((held.clone(), bytes)));
        self
    }

    pub fn from_message(message: &BorrowedMessage<'_>, topic: Arc<str>, epoch: u64) -> Self {
        let source = Source {
            topic,
            partition: message.partition(),
            offset: message.offset(),
            epoch,
        };
        let payload = message.payload().unwrap_or_default();
        match message.headers() {
            Some(headers) => Self::new(
                source,
                payload,
                message.key(),
                (0..headers.count()).map(|i| {
                    let header = headers.get(i);
                    (header.key, header.value)
                }),
            ),
            None => Self::new(source, payload, message.key(), std::iter::empty()),
        }
    }

    /// The message value (empty for a message without one).
    pub fn payload(&self) -> &[u8] {
        &self.bytes[..self.payload_end as usize]
    }

    /// The message key, if it has one.
    pub fn key(&self) -> Option<&[u8]> {
        self.key_end
            .map(|end| &self.bytes[self.payload_end as usize..end as usize])
    }

    /// Every header, in order: name and value (`None` when it has none).
    pub fn headers(&self) -> impl Iterator<Item = (&str, Option<&[u8]>)> + '_ {
        let mut start = self.key_end.unwrap_or(self.payload_end) as usize;
        self.headers.iter().map(move |at| {
            let name = &self.bytes[start..at.name_end as usize];
            let value = &self.bytes[at.name_end as usize..at.value_end as usize];
            start = at.value_end as usize;
            // Names were copied from `&str`s, so they are UTF-8.
            let name = std::str::from_utf8(name).unwrap_or_default();
            (name, at.has_value.then_some(value))
        })
    }

    /// The value of header `name` as text, when it is UTF-8. Names are
    /// compared as bytes; only the value found is checked.
    pub fn header(&self, name: &str) -> Option<&str> {
        let mut start = self.key_end.unwrap_or(self.payload_end) as usize;
        for at in self.headers.iter() {
            let (name_end, value_end) = (at.name_end as usize, at.value_end as usize);
            if &self.bytes[start..name_end] == name.as_bytes() {
                return at
                    .has_value
                    .then(|| std::str::from_utf8(&self.bytes[name_end..value_end]).ok())
                    .flatten();
            }
            start = value_end;
        }
        None
    }
}

/// The length of `bytes` as a record offset. Kafka messages are far below
/// 4 GiB (`message.max.bytes` tops out at 1 GB).
fn offset(bytes: &[u8]) -> u32 {
    u32::try_from(bytes.len()).expect("a Kafka message is under 4 GiB")
}

/// Reads W3C propagation headers (`traceparent`, `tracestate`, `baggage`)
/// from a record.
pub struct RecordHeaders<'a>(pub &'a Record);

impl Extractor for RecordHeaders<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.header(key)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.headers().map(|(k, _)| k).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source() -> Source {
        Source {
            topic: "t".into(),
            partition: 1,
            offset: 2,
            epoch: 3,
        }
    }

    #[test]
    fn value_key_and_headers_come_back_as_they_went_in() {
        let headers: [(&str, Option<&[u8]>); 4] = [
            ("traceparent", Some(b"00-abc-def-01")),
            ("empty", Some(b"")),
            ("none", None),
            ("binary", Some(&[0xff, 0x00])),
        ];
        let record = Record::new(source(), b"{\"a\":1}", Some(b"k1"), headers);
        assert_eq!(record.payload(), b"{\"a\":1}");
        assert_eq!(record.key(), Some(&b"k1"[..]));
        assert_eq!(record.headers().collect::<Vec<_>>(), headers.to_vec());
        assert_eq!(record.header("traceparent"), Some("00-abc-def-01"));
        assert_eq!(record.header("empty"), Some(""));
        assert_eq!(record.header("none"), None);
        assert_eq!(record.header("binary"), None, "not UTF-8");
        assert_eq!(record.header("missing"), None);
    }

    #[test]
    fn no_key_is_not_an_empty_key() {
        let record = Record::new(source(), b"v", None, [("h", Some(&b"x"[..]))]);
        assert_eq!(record.key(), None);
        assert_eq!(record.header("h"), Some("x"));
        let keyed = Record::new(source(), b"", Some(b""), std::iter::empty());
        assert_eq!(keyed.key(), Some(&b""[..]));
        assert_eq!(keyed.payload(), b"");
        assert_eq!(keyed.headers().count(), 0);
    }
}

#[cfg(test)]
mod charge_tests {
    use super::*;

    #[test]
    fn held_bytes_follow_the_records_alive() {
        let held = HeldBytes::default();
        let source = Source {
            topic: Arc::from("t"),
            partition: 0,
            offset: 1,
            epoch: 1,
        };
        let a = Record::new(source.clone(), &[0; 1000], None, std::iter::empty()).charged(&held);
        let b = Record::new(source, &[0; 10], Some(b"k"), std::iter::empty()).charged(&held);
        assert!(held.get() >= 2 * 1011, "{}", held.get());
        let copy = a.clone();
        drop(a);
        assert!(held.get() < 1000, "{}", held.get());
        drop(copy);
        drop(b);
        assert_eq!(held.get(), 0);
    }
}
