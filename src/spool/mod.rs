//! The local spool (`spool.enabled`): where events go when Kafka is not
//! taking them, so that the gateway can still answer 0, and from where they
//! are replayed to Kafka when it is back.
//!
//! An event answered 0 is then either acknowledged by Kafka or written and
//! fsynced here (the part's `data` says which: `accepted` or `spooled`).
//! `write_kafka` spools only when Kafka is not taking events (a delivery
//! streak with no acknowledgement, a missing topic, or the events of an
//! attempt that failed or timed out), never for one slow acknowledgement.
//!
//! * `record.rs`: a spooled message and its frame (length, CRC-32);
//! * `segment.rs`: the files, recovery at start-up, `venus spool verify`;
//! * the writer thread here: group commit (every append waiting at one
//!   moment shares one `fdatasync`), the bounds (`max_bytes`, the free-disk
//!   floor), segment rolling;
//! * `replay.rs`: back to Kafka, oldest first, rate-limited, a record
//!   removed only once Kafka acknowledged it.

pub mod record;
pub mod replay;
pub mod segment;

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use record::SpoolRecord;

use crate::config::SpoolSettings;

/// A segment in use: the newest is appended to, the others wait for replay.
#[derive(Debug, Clone)]
struct SegmentState {
    /// Bytes in the file.
    bytes: u64,
    /// Records in the file.
    records: u64,
    /// Bytes and records Kafka acknowledged (the cursor).
    replayed_bytes: u64,
    replayed_records: u64,
    /// The spool time of the oldest record not replayed yet.
    oldest_pending_ms: Option<u64>,
    /// Still appended to (only the newest segment).
    open: bool,
}

#[derive(Debug, Default)]
struct State {
    segments: BTreeMap<u64, SegmentState>,
    next_id: u64,
}

impl State {
    fn bytes(&self) -> u64 {
        self.segments.values().map(|s| s.bytes).sum()
    }

    fn pending_records(&self) -> u64 {
        self.segments
            .values()
            .map(|s| s.records - s.replayed_records)
            .sum()
    }

    fn oldest_pending_ms(&self) -> Option<u64> {
        self.segments
            .values()
            .filter_map(|s| s.oldest_pending_ms)
            .min()
    }
}

/// What the spool holds now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Depth {
    /// Records not yet acknowledged by Kafka.
    pub records: u64,
    /// Bytes of segment files on disk.
    pub bytes: u64,
    /// Age of the oldest record not yet acknowledged.
    pub oldest_age: Option<Duration>,
}

/// Why an append was refused.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("the spool is full ({0})")]
    Full(String),
    #[error("the spool cannot write: {0}")]
    Io(String),
}

/// Counters the metrics read.
#[derive(Debug, Default)]
pub struct Counters {
    pub spooled: AtomicU64,
    pub replayed: AtomicU64,
    pub refused_full: AtomicU64,
    pub torn_tails: AtomicU64,
    pub quarantined: AtomicU64,
    pub fsyncs: AtomicU64,
    /// Records Kafka refused for their topic (missing, not authorized),
    /// moved to the spool's end so that the other topics go on.
    pub requeued: AtomicU64,
}

struct Shared {
    dir: PathBuf,
    /// Held for the process's life: an exclusive lock on `dir/LOCK`.
    _lock: File,
    /// Free bytes of the spool's file system, as the writer last saw them
    /// (`/readyz` reads this instead of asking the file system).
    free: AtomicU64,
    settings: SpoolSettings,
    state: Mutex<State>,
    counters: Counters,
    /// Wakes the replay when something was spooled.
    wake: tokio::sync::Notify,
}

/// One append: frames, how many records, a reply.
struct Append {
    frames: Vec<u8>,
    records: u64,
    oldest_ms: u64,
    reply: tokio::sync::oneshot::Sender<Result<(), SpoolError>>,
}

enum Job {
    Append(Append),
    /// Close the open segment so that the replay can take it.
    Seal,
}

/// The spool: cheap to clone.
#[derive(Clone)]
pub struct Spool {
    shared: Arc<Shared>,
    jobs: mpsc::Sender<Job>,
}

impl Spool {
    /// Recovers `settings.path` (torn tails cut, corrupt segments
    /// quarantined, both counted) and starts the writer thread.
    pub fn open(settings: &SpoolSettings) -> anyhow::Result<Self> {
        let dir = settings.path.clone();
        let lock = segment::lock(&dir).map_err(|e| {
            anyhow::anyhow!("configuration key `spool.path`: {}: {e}", dir.display())
        })?;
        let recovery = segment::recover(&dir).map_err(|e| {
            anyhow::anyhow!("configuration key `spool.path`: {}: {e}", dir.display())
        })?;
        let mut state = State::default();
        for report in &recovery.segments {
            state.segments.insert(
                report.id,
                SegmentState {
                    bytes: report.file_bytes,
                    records: report.records,
                    replayed_bytes: report.replayed_bytes,
                    replayed_records: report.records - report.pending_records,
                    oldest_pending_ms: report.oldest_pending_ms,
                    open: false,
                },
            );
        }
        // Never an id used before (a leftover cursor or a quarantined
        // segment of that name would be taken for the new one's).
        state.next_id = recovery.highest_id + 1;
        let pending = state.pending_records();
        if pending > 0 {
            tracing::info!(
                records = pending,
                segments = recovery.segments.len(),
                path = %dir.display(),
                "the spool holds records from before the restart: they are replayed when Kafka takes events"
            );
        }
        let counters = Counters::default();
        counters
            .torn_tails
            .store(recovery.torn_tails, Ordering::Relaxed);
        counters
            .quarantined
            .store(recovery.quarantined, Ordering::Relaxed);
        let free = free_bytes(&dir).unwrap_or(u64::MAX);
        let shared = Arc::new(Shared {
            dir,
            _lock: lock,
            free: AtomicU64::new(free),
            settings: settings.clone(),
            state: Mutex::new(state),
            counters,
            wake: tokio::sync::Notify::new(),
        });
        let (jobs, receiver) = mpsc::channel();
        let writer = shared.clone();
        std::thread::Builder::new()
            .name("venus-spool".into())
            .spawn(move || Writer::new(writer).run(receiver))?;
        Ok(Self { shared, jobs })
    }

    /// Writes `records` and returns once they are on disk (fsynced), or
    /// refuses them all when the spool is full.
    pub async fn append(&self, records: &[SpoolRecord]) -> Result<(), SpoolError> {
        if records.is_empty() {
            return Ok(());
        }
        let mut frames = Vec::with_capacity(records.iter().map(|r| r.value.len() + 256).sum());
        for record in records {
            record.write_frame(&mut frames);
        }
        let (reply, answer) = tokio::sync::oneshot::channel();
        let job = Job::Append(Append {
            frames,
            records: records.len() as u64,
            oldest_ms: records.iter().map(|r| r.spooled_at_ms).min().unwrap_or(0),
            reply,
        });
        self.jobs
            .send(job)
            .map_err(|_| SpoolError::Io("the spool writer stopped".into()))?;
        answer
            .await
            .unwrap_or_else(|_| Err(SpoolError::Io("the spool writer stopped".into())))
    }

    /// What the spool holds now.
    pub fn depth(&self) -> Depth {
        let state = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = now_ms();
        Depth {
            records: state.pending_records(),
            bytes: state.bytes(),
            oldest_age: state
                .oldest_pending_ms()
                .map(|ms| Duration::from_millis(now.saturating_sub(ms))),
        }
    }

    /// Whether another segment's worth of records still fits (`/readyz`).
    pub fn has_room(&self) -> bool {
        let settings = &self.shared.settings;
        let bytes = self.depth().bytes;
        let margin = settings.segment_bytes.min(settings.max_bytes / 10);
        let free = self.shared.free.load(Ordering::Relaxed);
        bytes + margin <= settings.max_bytes && free >= settings.min_free_bytes + margin
    }

    pub fn counters(&self) -> &Counters {
        &self.shared.counters
    }

    pub fn path(&self) -> &Path {
        &self.shared.dir
    }

    /// The oldest segment, sealing the open one when it is the only one
    /// with records: `(id, replayed bytes, bytes written)`.
    fn oldest_sealed(&self) -> Option<(u64, u64, u64)> {
        let state = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        let (id, segment) = state.segments.iter().next()?;
        if segment.open {
            if segment.records > segment.replayed_records {
                let _ = self.jobs.send(Job::Seal);
            }
            return None;
        }
        Some((*id, segment.replayed_bytes, segment.bytes))
    }

    /// The records of segment `id` up to `offset` are done: `acked` of
    /// them acknowledged by Kafka, the rest of `records` requeued (appended
    /// at the end first). Blocking file work: called off the runtime.
    fn replayed(
        &self,
        id: u64,
        offset: u64,
        records: u64,
        acked: u64,
        next_pending_ms: Option<u64>,
    ) {
        let done = {
            let mut state = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
            let Some(segment) = state.segments.get_mut(&id) else {
                return;
            };
            segment.replayed_bytes = offset;
            segment.replayed_records += records;
            segment.oldest_pending_ms = next_pending_ms;
            let done = segment.replayed_bytes >= segment.bytes;
            if done {
                state.segments.remove(&id);
            }
            done
        };
        self.shared
            .counters
            .replayed
            .fetch_add(acked, Ordering::Relaxed);
        let dir = &self.shared.dir;
        if done {
            // Removed only once every record of it was acknowledged; the
            // cursor first (a cursor left without its segment is removed at
            // start, and ids are never reused).
            let _ = std::fs::remove_file(segment::cursor_path(dir, id));
            let _ = std::fs::remove_file(segment::segment_path(dir, id));
            let _ = segment::sync_dir(dir);
        } else if let Err(error) = segment::write_cursor(dir, id, offset) {
            tracing::warn!(%error, "cannot write a spool cursor: records may be replayed again after a restart");
        }
    }
}

impl Spool {
    /// A segment found damaged while replaying (a record that no longer
    /// reads back): moved to `quarantine/` as it is, counted and logged;
    /// the replay goes on with the next one. Blocking file work.
    fn quarantine(&self, id: u64, offset: u64) {
        let dir = &self.shared.dir;
        let moved = segment::quarantine(dir, id);
        let _ = std::fs::remove_file(segment::cursor_path(dir, id));
        let _ = segment::sync_dir(dir);
        self.shared
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .segments
            .remove(&id);
        self.shared
            .counters
            .quarantined
            .fetch_add(1, Ordering::Relaxed);
        match moved {
            Ok(aside) => tracing::error!(
                segment = %aside.display(),
                replayed_bytes = offset,
                "a spool segment no longer reads back past its cursor: moved to quarantine (venus spool verify shows what it holds)"
            ),
            Err(error) => tracing::error!(
                %error,
                segment = id,
                "a damaged spool segment could not be moved to quarantine"
            ),
        }
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The free bytes of the file system holding `dir`.
fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut stats: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and a zeroed struct for statvfs to fill.
    if unsafe { libc::statvfs(path.as_ptr(), &mut stats) } != 0 {
        return None;
    }
    Some(stats.f_bavail as u64 * stats.f_frsize as u64)
}

/// The thread that owns the open segment.
struct Writer {
    shared: Arc<Shared>,
    file: Option<(u64, File, Instant)>,
}

/// An open segment is sealed this long after it was opened, so that the
/// replay never waits long for records to become readable.
const SEAL_AFTER: Duration = Duration::from_secs(1);

/// Appends written together under one fsync at most.
const MAX_GROUP: usize = 1024;

impl Writer {
    fn new(shared: Arc<Shared>) -> Self {
        Self { shared, file: None }
    }

    fn run(mut self, jobs: mpsc::Receiver<Job>) {
        loop {
            let first = match jobs.recv_timeout(SEAL_AFTER) {
                Ok(job) => job,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if let Some(free) = free_bytes(&self.shared.dir) {
                        self.shared.free.store(free, Ordering::Relaxed);
                    }
                    if self
                        .file
                        .as_ref()
                        .is_some_and(|(_, _, opened)| opened.elapsed() >= SEAL_AFTER)
                    {
                        self.seal();
                    }
                    continue;
                }
                // Every sender is gone: the gateway stopped. Everything
                // answered was fsynced already.
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    self.seal();
                    return;
                }
            };
            // Group commit: everything already waiting shares one fsync.
            let mut group = Vec::new();
            let mut seal = false;
            for job in std::iter::once(first)
                .chain(std::iter::from_fn(|| jobs.try_recv().ok()))
                .take(MAX_GROUP)
            {
                match job {
                    Job::Append(append) => group.push(append),
                    Job::Seal => seal = true,
                }
            }
            if !group.is_empty() {
                self.write(group);
            }
            let old = self
                .file
                .as_ref()
                .is_some_and(|(_, _, opened)| opened.elapsed() >= SEAL_AFTER);
            if seal || old {
                self.seal();
            }
        }
    }

    /// Writes a group of appends with one fsync and answers each.
    fn write(&mut self, group: Vec<Append>) {
        let settings = self.shared.settings.clone();
        let on_disk = self
            .shared
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .bytes();
        let free = free_bytes(&self.shared.dir);
        if let Some(free) = free {
            self.shared.free.store(free, Ordering::Relaxed);
        }
        let mut taken: Vec<Append> = Vec::with_capacity(group.len());
        let mut adding = 0u64;
        for append in group {
            let size = append.frames.len() as u64;
            let full = if on_disk + adding + size > settings.max_bytes {
                Some(format!("spool.max_bytes {} reached", settings.max_bytes))
            } else if free.is_some_and(|free| free < adding + size + settings.min_free_bytes) {
                Some(format!(
                    "less than spool.min_free_bytes {} free on its disk",
                    settings.min_free_bytes
                ))
            } else {
                None
            };
            match full {
                Some(reason) => {
                    self.shared
                        .counters
                        .refused_full
                        .fetch_add(append.records, Ordering::Relaxed);
                    let _ = append.reply.send(Err(SpoolError::Full(reason)));
                }
                None => {
                    adding += size;
                    taken.push(append);
                }
            }
        }
        if taken.is_empty() {
            return;
        }
        let result = self.write_and_sync(&taken);
        match result {
            Ok(id) => {
                let records: u64 = taken.iter().map(|a| a.records).sum();
                let oldest = taken.iter().map(|a| a.oldest_ms).min();
                {
                    let mut state = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
                    let segment = state.segments.entry(id).or_insert(SegmentState {
                        bytes: 0,
                        records: 0,
                        replayed_bytes: 0,
                        replayed_records: 0,
                        oldest_pending_ms: None,
                        open: true,
                    });
                    segment.bytes += adding;
                    segment.records += records;
                    if segment.oldest_pending_ms.is_none() {
                        segment.oldest_pending_ms = oldest;
                    }
                }
                self.shared
                    .counters
                    .spooled
                    .fetch_add(records, Ordering::Relaxed);
                for append in taken {
                    let _ = append.reply.send(Ok(()));
                }
                self.shared.wake.notify_one();
                if self.file.as_ref().is_some_and(|_| {
                    self.shared
                        .state
                        .lock()
                        .map(|s| {
                            s.segments
                                .get(&id)
                                .is_some_and(|seg| seg.bytes >= settings.segment_bytes)
                        })
                        .unwrap_or(false)
                }) {
                    self.seal();
                }
            }
            Err(error) => {
                tracing::error!(%error, path = %self.shared.dir.display(), "the spool cannot write");
                // The open segment may end in part of this group: a new
                // segment for whatever comes next (recovery cuts the tail).
                self.seal();
                for append in taken {
                    let _ = append.reply.send(Err(SpoolError::Io(error.to_string())));
                }
            }
        }
    }

    /// Appends the group to the open segment (opening one if needed) and
    /// fdatasyncs it; returns the segment's id.
    fn write_and_sync(&mut self, group: &[Append]) -> std::io::Result<u64> {
        if self.file.is_none() {
            let id = {
                let mut state = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
                let id = state.next_id;
                state.next_id += 1;
                id
            };
            let file = OpenOptions::new()
                .create_new(true)
                .append(true)
                .open(segment::segment_path(&self.shared.dir, id))?;
            // The new file's directory entry must survive a crash too.
            segment::sync_dir(&self.shared.dir)?;
            self.file = Some((id, file, Instant::now()));
        }
        let Some((id, file, _)) = self.file.as_mut() else {
            unreachable!("opened above")
        };
        for append in group {
            file.write_all(&append.frames)?;
        }
        file.sync_data()?;
        self.shared.counters.fsyncs.fetch_add(1, Ordering::Relaxed);
        Ok(*id)
    }

    /// Closes the open segment: the replay may take it.
    fn seal(&mut self) {
        if let Some((id, _, _)) = self.file.take() {
            let mut state = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(segment) = state.segments.get_mut(&id) {
                segment.open = false;
            }
            drop(state);
            self.shared.wake.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(n: u64) -> SpoolRecord {
        SpoolRecord {
            topic: "t".into(),
            key: None,
            headers: Vec::new(),
            value: vec![b'x'; 100 + n as usize],
            spooled_at_ms: now_ms(),
        }
    }

    #[tokio::test]
    async fn an_answered_append_is_on_disk_and_leaves_only_when_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let settings = SpoolSettings {
            enabled: true,
            path: dir.path().to_owned(),
            max_bytes: 1_000,
            min_free_bytes: 0,
            ..SpoolSettings::default()
        };
        let spool = Spool::open(&settings).unwrap();
        spool.append(&[record(0), record(1)]).await.unwrap();
        assert_eq!(spool.depth().records, 2);
        // Answered: the records read back from the file, now.
        let on_disk = segment::inspect(dir.path()).unwrap();
        assert_eq!(on_disk.segments.iter().map(|s| s.records).sum::<u64>(), 2);
        // Past max_bytes: refused, and nothing of it written.
        let refused = spool.append(&[record(900)]).await;
        assert!(matches!(refused, Err(SpoolError::Full(_))), "{refused:?}");
        assert_eq!(spool.depth().records, 2);
        // The replay takes the segment once sealed, and it goes only when
        // every record is done.
        let (id, offset, limit) = loop {
            if let Some(found) = spool.oldest_sealed() {
                break found;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(offset, 0);
        spool.replayed(id, limit / 2, 1, 1, Some(now_ms()));
        assert!(segment::segment_path(dir.path(), id).exists());
        assert_eq!(segment::read_cursor(dir.path(), id), limit / 2);
        spool.replayed(id, limit, 1, 1, None);
        assert_eq!(spool.depth().records, 0);
        assert!(!segment::segment_path(dir.path(), id).exists());
        assert!(!segment::cursor_path(dir.path(), id).exists());
        assert_eq!(spool.counters().replayed.load(Ordering::Relaxed), 2);
        // The next segment gets a new id.
        spool.append(&[record(2)]).await.unwrap();
        let next = segment::segment_ids(dir.path()).unwrap();
        assert!(next.iter().all(|n| *n > id), "{next:?}");
    }
}
