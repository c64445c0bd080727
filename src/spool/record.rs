//! One spooled Kafka message, and how it sits in a segment file.
//!
//! A frame is `[length: u32 LE][CRC-32 of the payload: u32 LE][payload]`;
//! the payload is the message as `write_kafka` would have produced it:
//! topic, key, headers (the `traceparent` among them), value (with its
//! `backend_id` and `upload_time`), and when it was spooled. A frame whose
//! length runs past the end of the file is a torn write; one whose checksum
//! does not match is corruption (`segment.rs` tells them apart).

/// The payload's format version: a later release that changes the layout
/// still reads what an earlier one spooled.
const VERSION: u8 = 1;

/// The frame header: length and checksum.
pub const FRAME_HEADER: usize = 8;

/// No frame is larger: a length beyond it is corruption, not a message
/// (the largest message the gateway sends is far smaller).
pub const MAX_PAYLOAD: usize = 64 * 1024 * 1024;

/// A Kafka message kept until Kafka takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpoolRecord {
    pub topic: String,
    pub key: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
    pub value: Vec<u8>,
    /// When it was spooled, in ms since the Unix epoch (the age metric).
    pub spooled_at_ms: u64,
}

/// Why a payload is not a record.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unreadable spool record: {0}")]
pub struct DecodeError(&'static str);

impl SpoolRecord {
    /// Appends this record's frame to `out`.
    pub fn write_frame(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0; FRAME_HEADER]);
        out.push(VERSION);
        put_bytes16(out, self.topic.as_bytes());
        match &self.key {
            Some(key) => {
                out.push(1);
                put_bytes32(out, key);
            }
            None => out.push(0),
        }
        out.extend_from_slice(&(self.headers.len() as u16).to_le_bytes());
        for (name, value) in &self.headers {
            put_bytes16(out, name.as_bytes());
            put_bytes32(out, value);
        }
        put_bytes32(out, &self.value);
        out.extend_from_slice(&self.spooled_at_ms.to_le_bytes());
        let payload = &out[start + FRAME_HEADER..];
        let length = (payload.len() as u32).to_le_bytes();
        let checksum = crc32fast::hash(payload).to_le_bytes();
        out[start..start + 4].copy_from_slice(&length);
        out[start + 4..start + 8].copy_from_slice(&checksum);
    }

    /// Reads a payload whose checksum matched.
    pub fn decode(payload: &[u8]) -> Result<Self, DecodeError> {
        let mut reader = Reader(payload);
        if reader.u8()? != VERSION {
            return Err(DecodeError("unknown version"));
        }
        let topic = String::from_utf8(reader.bytes16()?.to_vec())
            .map_err(|_| DecodeError("topic is not UTF-8"))?;
        let key = match reader.u8()? {
            0 => None,
            1 => Some(reader.bytes32()?.to_vec()),
            _ => return Err(DecodeError("bad key flag")),
        };
        let count = u16::from_le_bytes(reader.take(2)?.try_into().unwrap_or_default());
        let mut headers = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let name = String::from_utf8(reader.bytes16()?.to_vec())
                .map_err(|_| DecodeError("header name is not UTF-8"))?;
            headers.push((name, reader.bytes32()?.to_vec()));
        }
        let value = reader.bytes32()?.to_vec();
        let spooled_at_ms = u64::from_le_bytes(reader.take(8)?.try_into().unwrap_or_default());
        if !reader.0.is_empty() {
            return Err(DecodeError("bytes after the record"));
        }
        Ok(Self {
            topic,
            key,
            headers,
            value,
            spooled_at_ms,
        })
    }
}

fn put_bytes16(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
    out.extend_from_slice(bytes);
}

fn put_bytes32(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError("record cut short"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn bytes16(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = u16::from_le_bytes(self.take(2)?.try_into().unwrap_or_default());
        self.take(n as usize)
    }

    fn bytes32(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = u32::from_le_bytes(self.take(4)?.try_into().unwrap_or_default());
        self.take(n as usize)
    }
}

/// What the next frame of `bytes` (a segment from some offset) is.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// A whole frame whose checksum matches: its payload and total size.
    Whole { payload: &'a [u8], size: usize },
    /// The end of the data.
    End,
    /// A frame that runs past the end: a write cut short by a crash.
    Torn,
    /// A checksum that does not match, or a length no frame has.
    Corrupt,
}

/// Reads the frame at the start of `bytes`.
pub fn next_frame(bytes: &[u8]) -> Frame<'_> {
    if bytes.is_empty() {
        return Frame::End;
    }
    if bytes.len() < FRAME_HEADER {
        return Frame::Torn;
    }
    let length = u32::from_le_bytes(bytes[0..4].try_into().unwrap_or_default()) as usize;
    let checksum = u32::from_le_bytes(bytes[4..8].try_into().unwrap_or_default());
    if length == 0 || length > MAX_PAYLOAD {
        return Frame::Corrupt;
    }
    let Some(payload) = bytes.get(FRAME_HEADER..FRAME_HEADER + length) else {
        return Frame::Torn;
    };
    if crc32fast::hash(payload) != checksum {
        return Frame::Corrupt;
    }
    Frame::Whole {
        payload,
        size: FRAME_HEADER + length,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> SpoolRecord {
        SpoolRecord {
            topic: "to_analyzer__0.clicks".into(),
            key: Some(b"k".to_vec()),
            headers: vec![
                (
                    "traceparent".into(),
                    b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_vec(),
                ),
                ("request_id".into(), b"r-1".to_vec()),
            ],
            value: br#"{"backend_id":"x","data":{}}"#.to_vec(),
            spooled_at_ms: 1_765_000_000_000,
        }
    }

    #[test]
    fn a_record_reads_back_as_written() {
        let mut out = Vec::new();
        record().write_frame(&mut out);
        let keyless = SpoolRecord {
            key: None,
            headers: Vec::new(),
            ..record()
        };
        keyless.write_frame(&mut out);
        let Frame::Whole { payload, size } = next_frame(&out) else {
            panic!("a whole frame")
        };
        assert_eq!(SpoolRecord::decode(payload).unwrap(), record());
        let Frame::Whole {
            payload,
            size: second,
        } = next_frame(&out[size..])
        else {
            panic!("a whole frame")
        };
        assert_eq!(SpoolRecord::decode(payload).unwrap(), keyless);
        assert_eq!(next_frame(&out[size + second..]), Frame::End);
    }

    #[test]
    fn a_cut_frame_is_torn_and_a_flipped_byte_is_corrupt() {
        let mut out = Vec::new();
        record().write_frame(&mut out);
        for cut in [1, FRAME_HEADER, out.len() - 1] {
            assert_eq!(next_frame(&out[..cut]), Frame::Torn, "cut at {cut}");
        }
        for at in [FRAME_HEADER, FRAME_HEADER + 10, out.len() - 1] {
            let mut flipped = out.clone();
            flipped[at] ^= 0x40;
            assert_eq!(next_frame(&flipped), Frame::Corrupt, "flip at {at}");
        }
        let mut huge = out.clone();
        huge[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(next_frame(&huge), Frame::Corrupt);
        assert!(SpoolRecord::decode(&[2]).is_err());
    }
}
