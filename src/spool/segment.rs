//! The spool directory: numbered segment files of frames, a cursor file
//! per segment being replayed, and `quarantine/` for what cannot be read.
//!
//! * `00000000000000000042.seg`: frames in the order they were spooled;
//!   only the newest segment is appended to.
//! * `00000000000000000042.cursor`: how many bytes of segment 42 Kafka has
//!   acknowledged (written after each acknowledged chunk; a crash replays at
//!   most the chunk after it again, with the same `backend_id`s).
//! * `quarantine/`: segments with a frame whose checksum fails, moved aside
//!   whole at start-up (what came before that frame is kept in a new copy).
//!
//! [`recover`] runs once at start-up: a torn tail (a frame cut short by a
//! crash) is cut off, a corrupt segment quarantined, both counted and
//! logged; it never fails on what it finds in a file, so a bad spool cannot
//! crash-loop the gateway. [`inspect`] reads the same without changing
//! anything (`venus spool verify`).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::record::{next_frame, Frame, SpoolRecord};

/// A segment's file name.
pub fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}.seg"))
}

/// A segment's cursor file name.
pub fn cursor_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}.cursor"))
}

/// The ids of the segment files in `dir`, oldest first.
pub fn segment_ids(dir: &Path) -> std::io::Result<Vec<u64>> {
    let mut ids: Vec<u64> = fs::read_dir(dir)?
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| {
            let name = entry.file_name();
            let name = name.to_str()?;
            name.strip_suffix(".seg")?.parse().ok()
        })
        .collect();
    ids.sort_unstable();
    Ok(ids)
}

/// How many bytes of segment `id` were replayed (0 without a cursor).
pub fn read_cursor(dir: &Path, id: u64) -> u64 {
    fs::read_to_string(cursor_path(dir, id))
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(0)
}

/// Records that segment `id` is replayed up to `offset` (write and
/// rename: a crash leaves the old cursor or the new one, never half).
pub fn write_cursor(dir: &Path, id: u64, offset: u64) -> std::io::Result<()> {
    let path = cursor_path(dir, id);
    let temporary = path.with_extension("cursor.tmp");
    fs::write(&temporary, offset.to_string())?;
    fs::rename(&temporary, &path)
}

/// Takes an exclusive lock on `dir/LOCK` (creating `dir`), held while the
/// returned file is open: two gateways on one spool would cut and delete
/// each other's segments.
pub fn lock(dir: &Path) -> std::io::Result<fs::File> {
    use std::os::unix::io::AsRawFd;
    fs::create_dir_all(dir)?;
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("LOCK"))?;
    // SAFETY: flock(2) on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(std::io::Error::other(
            "another process (a second gateway?) is using this spool directory",
        ));
    }
    Ok(file)
}

/// Moves segment `id` to `quarantine/`, under a name no earlier
/// quarantined file has; returns where it went.
pub fn quarantine(dir: &Path, id: u64) -> std::io::Result<PathBuf> {
    let quarantine = dir.join("quarantine");
    fs::create_dir_all(&quarantine)?;
    let mut aside = quarantine.join(format!("{id:020}.seg"));
    let mut n = 1;
    while aside.exists() {
        aside = quarantine.join(format!("{id:020}.{n}.seg"));
        n += 1;
    }
    fs::rename(segment_path(dir, id), &aside)?;
    Ok(aside)
}

/// The highest id a segment, a cursor or a quarantined segment of `dir`
/// has (0: none).
fn highest_id(dir: &Path) -> u64 {
    let ids = |dir: &Path| -> Vec<u64> {
        fs::read_dir(dir)
            .map(|entries| {
                entries
                    .filter_map(|entry| entry.ok())
                    .filter_map(|entry| {
                        let name = entry.file_name();
                        name.to_str()?.split('.').next()?.parse().ok()
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    ids(dir)
        .into_iter()
        .chain(ids(&dir.join("quarantine")))
        .max()
        .unwrap_or(0)
}

/// Makes a new directory entry durable (a created, renamed or removed
/// file).
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

/// What one segment holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SegmentReport {
    pub id: u64,
    /// Whole frames with a matching checksum.
    pub records: u64,
    /// Bytes of those frames (from the start of the file).
    pub valid_bytes: u64,
    /// The file's size.
    pub file_bytes: u64,
    /// Bytes already replayed (its cursor).
    pub replayed_bytes: u64,
    /// Records at or past the cursor: still to send.
    pub pending_records: u64,
    /// The oldest pending record's spool time (ms since the epoch).
    pub oldest_pending_ms: Option<u64>,
    /// A frame cut short at the end (a crash during a write).
    pub torn_tail: bool,
    /// A frame whose checksum fails (or whose payload is not a record),
    /// after `valid_bytes`.
    pub corrupt: bool,
    /// Pending records per topic.
    pub topics: std::collections::BTreeMap<String, u64>,
}

/// Reads segment `id` of `dir` frame by frame, without changing it.
pub fn read_segment(dir: &Path, id: u64) -> std::io::Result<SegmentReport> {
    let bytes = fs::read(segment_path(dir, id))?;
    let replayed = read_cursor(dir, id);
    let mut report = SegmentReport {
        id,
        file_bytes: bytes.len() as u64,
        replayed_bytes: replayed,
        ..SegmentReport::default()
    };
    let mut offset = 0usize;
    loop {
        match next_frame(&bytes[offset..]) {
            Frame::End => break,
            Frame::Torn => {
                report.torn_tail = true;
                break;
            }
            Frame::Corrupt => {
                report.corrupt = true;
                break;
            }
            Frame::Whole { payload, size } => match SpoolRecord::decode(payload) {
                Ok(record) => {
                    if offset as u64 >= replayed {
                        report.pending_records += 1;
                        report.oldest_pending_ms.get_or_insert(record.spooled_at_ms);
                        *report.topics.entry(record.topic).or_default() += 1;
                    }
                    report.records += 1;
                    offset += size;
                }
                Err(_) => {
                    report.corrupt = true;
                    break;
                }
            },
        }
    }
    report.valid_bytes = offset as u64;
    Ok(report)
}

/// What [`recover`] did.
#[derive(Debug, Default)]
pub struct Recovery {
    /// The segments left to replay, oldest first.
    pub segments: Vec<SegmentReport>,
    /// Torn tails cut off.
    pub torn_tails: u64,
    /// Segments moved to `quarantine/` (or left aside unreadable).
    pub quarantined: u64,
    /// The highest segment id ever used here: new segments count on.
    pub highest_id: u64,
}

/// Readies `dir` at start-up (see the module doc). Errors are the
/// directory's own (cannot be created, read or written), not its contents'.
pub fn recover(dir: &Path) -> std::io::Result<Recovery> {
    fs::create_dir_all(dir)?;
    let mut recovery = Recovery {
        highest_id: highest_id(dir),
        ..Recovery::default()
    };
    let segments = segment_ids(dir)?;
    for leftover in fs::read_dir(dir)?.filter_map(|e| e.ok()) {
        let path = leftover.path();
        // A cursor write cut short, or a cursor whose segment is gone (a
        // crash between removing the two).
        let stray = path.extension().is_some_and(|e| e == "cursor")
            && path
                .file_stem()
                .and_then(|stem| stem.to_str()?.parse::<u64>().ok())
                .is_some_and(|id| !segments.contains(&id));
        if stray || path.extension().is_some_and(|e| e == "tmp") {
            let _ = fs::remove_file(&path);
        }
    }
    for id in segments {
        match recover_segment(dir, id, &mut recovery) {
            Ok(Some(report)) => recovery.segments.push(report),
            Ok(None) => {}
            // A segment that cannot be read or repaired is left aside, never
            // a reason not to start.
            Err(error) => {
                recovery.quarantined += 1;
                let moved = quarantine(dir, id);
                tracing::error!(
                    %error,
                    segment = id,
                    moved = moved.is_ok(),
                    "a spool segment cannot be read or repaired: left aside (quarantine/ when it could be moved)"
                );
            }
        }
    }
    sync_dir(dir)?;
    Ok(recovery)
}

/// Checks and repairs one segment at start-up: `Some` when it has records
/// left to send.
fn recover_segment(
    dir: &Path,
    id: u64,
    recovery: &mut Recovery,
) -> std::io::Result<Option<SegmentReport>> {
    {
        let report = read_segment(dir, id)?;
        let path = segment_path(dir, id);
        if report.corrupt {
            let aside = quarantine(dir, id)?;
            tracing::error!(
                segment = %aside.display(),
                kept_records = report.records,
                "a spool segment has a corrupt record: moved to quarantine; the records before it are kept (venus spool verify shows what it holds)"
            );
            recovery.quarantined += 1;
            if report.valid_bytes > 0 {
                let bytes = fs::read(&aside)?;
                let mut file = fs::File::create(&path)?;
                file.write_all(&bytes[..report.valid_bytes as usize])?;
                file.sync_all()?;
            }
        } else if report.torn_tail {
            tracing::warn!(
                segment = %path.display(),
                cut_bytes = report.file_bytes - report.valid_bytes,
                "a spool segment ends in a record cut short (a crash during a write): cut off"
            );
            recovery.torn_tails += 1;
            let file = fs::OpenOptions::new().write(true).open(&path)?;
            file.set_len(report.valid_bytes)?;
            file.sync_all()?;
        }
        if report.valid_bytes == 0 || report.replayed_bytes >= report.valid_bytes {
            // Nothing (left) to send.
            let _ = fs::remove_file(cursor_path(dir, id));
            let _ = fs::remove_file(&path);
            return Ok(None);
        }
        Ok(Some(SegmentReport {
            file_bytes: report.valid_bytes,
            torn_tail: false,
            corrupt: false,
            ..report
        }))
    }
}

/// What [`inspect`] found in a spool directory, for `venus spool verify`.
#[derive(Debug, Default)]
pub struct Inspection {
    pub segments: Vec<SegmentReport>,
    /// Segments in `quarantine/`.
    pub quarantined: Vec<SegmentReport>,
}

/// Reads every segment of `dir` (and of its quarantine) without changing
/// anything.
pub fn inspect(dir: &Path) -> std::io::Result<Inspection> {
    let mut inspection = Inspection::default();
    for id in segment_ids(dir)? {
        inspection.segments.push(read_segment(dir, id)?);
    }
    let quarantine = dir.join("quarantine");
    if quarantine.is_dir() {
        for id in segment_ids(&quarantine)? {
            inspection.quarantined.push(read_segment(&quarantine, id)?);
        }
    }
    Ok(inspection)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(n: u64) -> SpoolRecord {
        SpoolRecord {
            topic: format!("t{}", n % 2),
            key: None,
            headers: vec![("traceparent".into(), b"tp".to_vec())],
            value: format!("{{\"n\":{n}}}").into_bytes(),
            spooled_at_ms: 1_000 + n,
        }
    }

    fn write_segment(dir: &Path, id: u64, records: std::ops::Range<u64>) -> Vec<u8> {
        let mut bytes = Vec::new();
        for n in records {
            record(n).write_frame(&mut bytes);
        }
        fs::write(segment_path(dir, id), &bytes).unwrap();
        bytes
    }

    #[test]
    fn a_torn_tail_is_cut_and_the_rest_kept() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = write_segment(dir.path(), 1, 0..10);
        let whole = bytes.len();
        fs::write(segment_path(dir.path(), 1), &bytes[..whole - 3]).unwrap();
        let recovery = recover(dir.path()).unwrap();
        assert_eq!(recovery.torn_tails, 1);
        assert_eq!(recovery.quarantined, 0);
        assert_eq!(recovery.segments.len(), 1);
        assert_eq!(recovery.segments[0].records, 9);
        assert_eq!(recovery.segments[0].pending_records, 9);
        let after = read_segment(dir.path(), 1).unwrap();
        assert!(!after.torn_tail);
        assert_eq!(after.records, 9);
        assert_eq!(after.file_bytes, after.valid_bytes);
    }

    #[test]
    fn a_flipped_byte_quarantines_the_segment_and_keeps_what_came_before() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = write_segment(dir.path(), 7, 0..10);
        write_segment(dir.path(), 8, 10..12);
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x01;
        fs::write(segment_path(dir.path(), 7), &bytes).unwrap();
        let recovery = recover(dir.path()).unwrap();
        assert_eq!(recovery.quarantined, 1);
        let kept = &recovery.segments[0];
        assert_eq!(kept.id, 7);
        assert!(kept.records > 0 && kept.records < 10, "{kept:?}");
        assert_eq!(recovery.segments[1].records, 2);
        assert!(dir
            .path()
            .join("quarantine")
            .join(format!("{:020}.seg", 7))
            .is_file());
        let inspection = inspect(dir.path()).unwrap();
        assert_eq!(inspection.quarantined.len(), 1);
        assert!(inspection.quarantined[0].corrupt);
        assert!(inspection
            .segments
            .iter()
            .all(|s| !s.corrupt && !s.torn_tail));
        // Starting again finds nothing more to do.
        let again = recover(dir.path()).unwrap();
        assert_eq!((again.torn_tails, again.quarantined), (0, 0));
    }

    #[test]
    fn a_stray_cursor_is_removed_and_ids_are_never_reused() {
        let dir = tempfile::tempdir().unwrap();
        write_cursor(dir.path(), 5, 100).unwrap();
        fs::create_dir_all(dir.path().join("quarantine")).unwrap();
        fs::write(
            dir.path().join("quarantine").join(format!("{:020}.seg", 9)),
            b"x",
        )
        .unwrap();
        let recovery = recover(dir.path()).unwrap();
        assert!(!cursor_path(dir.path(), 5).exists());
        assert_eq!(recovery.highest_id, 9);
        // A second lock on the same directory is refused.
        let _held = lock(dir.path()).unwrap();
        let second = lock(dir.path());
        assert!(second.is_err());
    }

    #[test]
    fn a_cursor_counts_what_was_sent_and_a_finished_segment_goes() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = write_segment(dir.path(), 3, 0..4);
        let Frame::Whole { size, .. } = next_frame(&bytes) else {
            panic!()
        };
        write_cursor(dir.path(), 3, size as u64).unwrap();
        let report = read_segment(dir.path(), 3).unwrap();
        assert_eq!((report.records, report.pending_records), (4, 3));
        assert_eq!(report.oldest_pending_ms, Some(1_001));
        write_segment(dir.path(), 4, 4..6);
        write_cursor(dir.path(), 4, 1_000_000).unwrap();
        let recovery = recover(dir.path()).unwrap();
        assert_eq!(recovery.segments.len(), 1);
        assert!(!segment_path(dir.path(), 4).exists());
        assert!(!cursor_path(dir.path(), 4).exists());
    }
}
