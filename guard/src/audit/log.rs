//! The append-only writer: one JSON line per record, durable before `append`
//! returns, gapless sequence numbers across restarts and rotations.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Read as _, Write as _},
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
};

use time::OffsetDateTime;

use super::{
    host::Host,
    journal::JournalExport,
    record::{AuditEvent, AuditRecord},
};

pub const DEFAULT_AUDIT_PATH: &str = "/var/lib/portguard/audit.jsonl";
/// The log holds what was removed, whole: readable by root and the admin group only.
pub const AUDIT_FILE_MODE: u32 = 0o640;

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit log {}: {op}: {source}", path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        source: io::Error,
    },
    #[error("audit record does not serialise: {0}")]
    Encode(#[from] serde_json::Error),
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(io::Error) -> AuditError + 'a {
    move |source| AuditError::Io {
        path: path.to_path_buf(),
        op,
        source,
    }
}

/// Rotation by size: when the next record would take the file past
/// `max_bytes`, it becomes `FILE.1` (older ones shift up) and at most `keep`
/// rotated files stay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rotation {
    pub max_bytes: u64,
    pub keep: usize,
}

impl Default for Rotation {
    fn default() -> Self {
        Self {
            max_bytes: 16 * 1024 * 1024,
            keep: 8,
        }
    }
}

/// A partial or unreadable tail found on open (a crash mid-write, or a
/// power loss), moved to `saved_to` and cut from the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TornTail {
    /// Where the tail started in the log.
    pub offset: u64,
    pub bytes: u64,
    pub saved_to: PathBuf,
}

#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    file: File,
    size: u64,
    next_seq: u64,
    rotation: Rotation,
    torn: Option<TornTail>,
    /// This host, named in every record (read once, when the log opens).
    host: Host,
    /// Where records also go once written (the systemd journal).
    journal: Option<JournalExport>,
    /// Tests: every append fails with this errno (a full disk, without one).
    #[cfg(test)]
    failing: Option<i32>,
}

impl AuditLog {
    /// Opens (or creates) the log, repairs a torn tail, and continues the
    /// sequence where the last durable record left it. A repair is itself
    /// recorded (`audit_torn_tail`) and reported by [`Self::torn_tail`].
    pub fn open(path: impl Into<PathBuf>, rotation: Rotation) -> Result<Self, AuditError> {
        let path = path.into();
        let rotation = Rotation {
            // A rotated file carries the sequence across restarts: keep one at least.
            keep: rotation.keep.max(1),
            ..rotation
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            create_private_dir(dir)?;
        }
        let (mut file, created) = open_for_append(&path)?;
        if created {
            sync_dir(&path)?;
        }
        let mut content = Vec::new();
        file.read_to_end(&mut content)
            .map_err(io_err(&path, "read"))?;

        let (valid_end, last_seq) = scan_tail(&content);
        let mut torn = None;
        if valid_end < content.len() {
            let saved_to = side_path(&path, "torn");
            save_torn(&saved_to, &content[valid_end..])?;
            file.set_len(valid_end as u64)
                .map_err(io_err(&path, "truncate torn tail"))?;
            file.sync_all().map_err(io_err(&path, "fsync"))?;
            torn = Some(TornTail {
                offset: valid_end as u64,
                bytes: (content.len() - valid_end) as u64,
                saved_to,
            });
        }
        let last_seq = match last_seq {
            Some(s) => Some(s),
            // Just rotated (or crashed mid-rotation): the newest rotated file knows.
            None => last_seq_of(&rotated_path(&path, 1))?,
        };
        let mut log = Self {
            size: valid_end as u64,
            next_seq: last_seq.map_or(1, |s| s + 1),
            path,
            file,
            rotation,
            torn: None,
            host: Host::this(),
            journal: None,
            #[cfg(test)]
            failing: None,
        };
        if let Some(t) = &torn {
            log.append(AuditEvent::AuditTornTail {
                offset: t.offset,
                bytes: t.bytes,
                saved_to: t.saved_to.display().to_string(),
            })?;
        }
        log.torn = torn;
        Ok(log)
    }

    /// Appends one record and returns only once it is on disk (fdatasync):
    /// an action may be reported done after this returns, never before.
    pub fn append(&mut self, event: AuditEvent) -> Result<AuditRecord, AuditError> {
        let record = self.append_unsynced(event)?;
        self.sync()?;
        Ok(record)
    }

    /// Appends one record without waiting for the disk: it is in the file
    /// (readers see it, a crash of the process keeps it), and durable with
    /// the next [`Self::sync`] or durable append. For records that follow a
    /// durable one holding the same facts.
    pub fn append_unsynced(&mut self, event: AuditEvent) -> Result<AuditRecord, AuditError> {
        #[cfg(test)]
        if let Some(errno) = self.failing {
            return Err(io_err(&self.path, "append")(io::Error::from_raw_os_error(
                errno,
            )));
        }
        let record = AuditRecord {
            seq: self.next_seq,
            ts: OffsetDateTime::now_utc(),
            host: Some(self.host.clone()),
            event,
        };
        let mut line = serde_json::to_vec(&record)?;
        line.push(b'\n');
        if self.size > 0 && self.size + line.len() as u64 > self.rotation.max_bytes {
            self.rotate()?;
        }
        // One write of a whole line: a kill between writes tears nothing.
        if let Err(e) = self.file.write_all(&line) {
            // Take back a partial line (ENOSPC...) so the next record starts clean.
            let _ = self.file.set_len(self.size);
            return Err(io_err(&self.path, "append")(e));
        }
        // From here the line is in the file, durable or not: its number is
        // spent whatever fdatasync says, so no later record can share it
        // (`restore N` must never find two records N).
        self.size += line.len() as u64;
        self.next_seq += 1;
        if let Some(journal) = &self.journal {
            journal.offer(&record);
        }
        Ok(record)
    }

    /// Makes every record appended so far durable (fdatasync).
    pub fn sync(&mut self) -> Result<(), AuditError> {
        self.file
            .sync_data()
            .map_err(io_err(&self.path, "fdatasync"))
    }

    /// Flushes everything, metadata included (on SIGTERM).
    pub fn flush(&mut self) -> Result<(), AuditError> {
        self.file.sync_all().map_err(io_err(&self.path, "fsync"))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// From now on, every record written also goes to the journal.
    pub fn export_to_journal(&mut self, journal: JournalExport) {
        self.journal = Some(journal);
    }

    /// Journal entries dropped so far (see [`JournalExport`]).
    pub fn journal_dropped(&self) -> Option<u64> {
        self.journal.as_ref().map(JournalExport::dropped)
    }

    /// The number the next record gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The torn tail repaired on open, if there was one.
    pub fn torn_tail(&self) -> Option<&TornTail> {
        self.torn.as_ref()
    }

    fn rotate(&mut self) -> Result<(), AuditError> {
        self.file.sync_all().map_err(io_err(&self.path, "fsync"))?;
        let oldest = rotated_path(&self.path, self.rotation.keep);
        match fs::remove_file(&oldest) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(io_err(&oldest, "remove oldest rotated log")(e));
            }
            _ => {}
        }
        for n in (1..self.rotation.keep).rev() {
            let from = rotated_path(&self.path, n);
            if from.exists() {
                let to = rotated_path(&self.path, n + 1);
                fs::rename(&from, &to).map_err(io_err(&from, "rotate"))?;
            }
        }
        let first = rotated_path(&self.path, 1);
        fs::rename(&self.path, &first).map_err(io_err(&self.path, "rotate"))?;
        let (file, _) = open_for_append(&self.path)?;
        sync_dir(&self.path)?;
        self.file = file;
        self.size = 0;
        Ok(())
    }
}

/// The log shared by the agent's tasks. Appends run on the blocking pool
/// (fdatasync blocks) and one at a time, so sequence numbers stay in order.
#[derive(Clone, Debug)]
pub struct AuditHandle(Arc<Mutex<AuditLog>>);

impl AuditHandle {
    pub fn new(log: AuditLog) -> Self {
        Self(Arc::new(Mutex::new(log)))
    }

    /// Records `event`; returns once it is durable.
    ///
    /// On a multi-threaded runtime (the agent's) the write and its fdatasync
    /// run right here, the worker handing its other tasks to another thread
    /// meanwhile (`block_in_place`): the removal path does not wait for two
    /// thread wake-ups around the disk. Elsewhere, on the blocking pool.
    pub async fn record(&self, event: AuditEvent) -> Result<AuditRecord, AuditError> {
        let log = self.0.clone();
        let append = move || {
            log.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .append(event)
        };
        if multi_threaded() {
            tokio::task::block_in_place(append)
        } else {
            tokio::task::spawn_blocking(append)
                .await
                .expect("an audit append never panics")
        }
    }

    /// Records `event` now and makes it durable in the background, for a
    /// record that follows a durable one holding the same facts (a
    /// `rule_removed` after its `rule_removing` intent): the caller does not
    /// wait for the second fdatasync. Until it completes, only a crash of the
    /// machine (not of the agent) can lose the record, and the intent stays.
    /// A failing background sync is logged; the next durable append tries again.
    pub async fn record_soon_durable(&self, event: AuditEvent) -> Result<AuditRecord, AuditError> {
        let log = self.0.clone();
        let record = tokio::task::spawn_blocking(move || {
            log.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .append_unsynced(event)
        })
        .await
        .expect("an audit append never panics")?;
        let log = self.0.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = log.lock().unwrap_or_else(PoisonError::into_inner).sync() {
                tracing::warn!(event = "audit_sync_failed", error = %e, "audit log fdatasync failed");
            }
        });
        Ok(record)
    }

    /// Records `event` from synchronous code.
    pub fn record_blocking(&self, event: AuditEvent) -> Result<AuditRecord, AuditError> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .append(event)
    }

    pub fn flush(&self) -> Result<(), AuditError> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .flush()
    }

    /// Tests: every append fails with `errno` from now on (`None`: works again).
    #[cfg(test)]
    pub(crate) fn fail_appends(&self, errno: Option<i32>) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .failing = errno;
    }
}

/// Whether this runs on a multi-threaded Tokio runtime (where
/// `block_in_place` may be used).
fn multi_threaded() -> bool {
    tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread)
}

/// `FILE.N`
pub(super) fn rotated_path(path: &Path, n: usize) -> PathBuf {
    side_path(path, &n.to_string())
}

fn side_path(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".");
    s.push(suffix);
    PathBuf::from(s)
}

fn create_private_dir(dir: &Path) -> Result<(), AuditError> {
    if dir.is_dir() {
        return Ok(());
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o750)
        .create(dir)
        .map_err(io_err(dir, "create directory"))
}

/// Opens for append with mode 0640, root-owned when we are root (an existing
/// file with looser bits is tightened).
fn open_for_append(path: &Path) -> Result<(File, bool), AuditError> {
    let created = !path.exists();
    let file = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .mode(AUDIT_FILE_MODE)
        .open(path)
        .map_err(io_err(path, "open"))?;
    tighten(&file, path)?;
    Ok((file, created))
}

fn tighten(file: &File, path: &Path) -> Result<(), AuditError> {
    file.set_permissions(fs::Permissions::from_mode(AUDIT_FILE_MODE))
        .map_err(io_err(path, "chmod 0640"))?;
    // SAFETY: no arguments, no side effects.
    if unsafe { libc::geteuid() } == 0 {
        std::os::unix::fs::fchown(file, Some(0), Some(0)).map_err(io_err(path, "chown root"))?;
    }
    Ok(())
}

fn sync_dir(path: &Path) -> Result<(), AuditError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir, "fsync directory"))
}

fn save_torn(side: &Path, bytes: &[u8]) -> Result<(), AuditError> {
    let (mut f, _) = open_for_append(side)?;
    f.write_all(bytes)
        .and_then(|()| f.write_all(b"\n"))
        .and_then(|()| f.sync_all())
        .map_err(io_err(side, "save torn tail"))
}

/// Where the durable records end, and the last one's sequence number.
///
/// The tail is everything after the last line that ends in `\n` and parses as
/// a record: a partial line (kill mid-write) and lines of garbage after it (a
/// power loss can leave zeros) both belong to it.
fn scan_tail(content: &[u8]) -> (usize, Option<u64>) {
    let mut end = content.len();
    // A partial last line has no newline.
    if let Some(nl) = content.iter().rposition(|b| *b == b'\n') {
        end = end.min(nl + 1);
    } else {
        end = 0;
    }
    while end > 0 {
        let start = content[..end - 1]
            .iter()
            .rposition(|b| *b == b'\n')
            .map_or(0, |p| p + 1);
        if let Some(seq) = parse_seq(&content[start..end - 1]) {
            return (end, Some(seq));
        }
        end = start;
    }
    (0, None)
}

fn parse_seq(line: &[u8]) -> Option<u64> {
    serde_json::from_slice::<AuditRecord>(line)
        .ok()
        .map(|r| r.seq)
}

/// The sequence number of the last readable record in a (rotated) file.
fn last_seq_of(path: &Path) -> Result<Option<u64>, AuditError> {
    match fs::read(path) {
        Ok(content) => Ok(scan_tail(&content).1),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path, "read")(e)),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt as _;

    use super::*;
    use crate::audit::AuditTrail;

    fn stopped(reason: &str) -> AuditEvent {
        AuditEvent::AgentStopped {
            reason: reason.into(),
        }
    }

    #[test]
    fn an_unsynced_append_is_in_the_file_and_in_sequence() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let mut log = AuditLog::open(&path, Rotation::default()).unwrap();
        assert_eq!(log.append(stopped("a")).unwrap().seq, 1);
        assert_eq!(log.append_unsynced(stopped("b")).unwrap().seq, 2);
        // Readers (restore, report) see it before any sync.
        let seqs: Vec<_> = AuditTrail::read(&path)
            .unwrap()
            .records
            .iter()
            .map(|r| r.seq)
            .collect();
        assert_eq!(seqs, [1, 2]);
        log.sync().unwrap();
        drop(log);
        let mut log = AuditLog::open(&path, Rotation::default()).unwrap();
        assert_eq!(log.append(stopped("c")).unwrap().seq, 3);
    }

    #[test]
    fn appends_are_sequenced_and_continue_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/audit.jsonl");
        let mut log = AuditLog::open(&path, Rotation::default()).unwrap();
        assert_eq!(log.append(stopped("a")).unwrap().seq, 1);
        assert_eq!(log.append(stopped("b")).unwrap().seq, 2);
        drop(log);
        let mut log = AuditLog::open(&path, Rotation::default()).unwrap();
        assert!(log.torn_tail().is_none());
        assert_eq!(log.append(stopped("c")).unwrap().seq, 3);
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 3);
        assert!(text.ends_with('\n'));
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o640);
        assert_eq!(
            fs::metadata(path.parent().unwrap()).unwrap().mode() & 0o777,
            0o750
        );
    }

    #[test]
    fn loose_mode_is_tightened() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        fs::write(&path, "").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o666)).unwrap();
        AuditLog::open(&path, Rotation::default()).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o640);
    }

    #[test]
    fn torn_tail_is_cut_saved_and_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let mut log = AuditLog::open(&path, Rotation::default()).unwrap();
        log.append(stopped("a")).unwrap();
        log.append(stopped("b")).unwrap();
        drop(log);
        let good_len = fs::metadata(&path).unwrap().len();
        // A kill mid-write, then a power loss's zeros.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"seq\":3,\"ts\":\"2026-").unwrap();
        drop(f);

        let mut log = AuditLog::open(&path, Rotation::default()).unwrap();
        let torn = log.torn_tail().cloned().expect("torn tail reported");
        assert_eq!(torn.offset, good_len);
        assert_eq!(torn.bytes, 20);
        assert_eq!(
            fs::read_to_string(&torn.saved_to).unwrap(),
            "{\"seq\":3,\"ts\":\"2026-\n"
        );
        // Seq 3 was never durable, so it is not a gap to reuse it for the repair record.
        assert_eq!(log.append(stopped("c")).unwrap().seq, 4);
        let trail = AuditTrail::read(&path).unwrap();
        let seqs: Vec<_> = trail.records.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, [1, 2, 3, 4]);
        assert!(matches!(
            trail.records[2].event,
            AuditEvent::AuditTornTail { bytes: 20, .. }
        ));
        assert!(trail.unreadable.is_empty());
    }

    #[test]
    fn garbage_lines_at_the_tail_are_torn_too() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let mut log = AuditLog::open(&path, Rotation::default()).unwrap();
        log.append(stopped("a")).unwrap();
        drop(log);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[0u8; 64]).unwrap();
        f.write_all(b"\n\0\0\0").unwrap();
        drop(f);
        let log = AuditLog::open(&path, Rotation::default()).unwrap();
        assert_eq!(log.torn_tail().unwrap().bytes, 68);
        assert_eq!(log.next_seq(), 3);
    }

    #[test]
    fn rotation_keeps_the_sequence_and_the_retention_count() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let rotation = Rotation {
            max_bytes: 300,
            keep: 2,
        };
        let mut log = AuditLog::open(&path, rotation).unwrap();
        for i in 0..40 {
            log.append(stopped(&format!("r{i}"))).unwrap();
        }
        assert!(rotated_path(&path, 1).exists());
        assert!(rotated_path(&path, 2).exists());
        assert!(!rotated_path(&path, 3).exists(), "keep = 2");
        for p in [path.clone(), rotated_path(&path, 1), rotated_path(&path, 2)] {
            assert!(fs::metadata(&p).unwrap().len() <= 300, "{}", p.display());
            assert_eq!(fs::metadata(&p).unwrap().mode() & 0o777, 0o640);
        }
        let trail = AuditTrail::read(&path).unwrap();
        let seqs: Vec<_> = trail.records.iter().map(|r| r.seq).collect();
        let first = seqs[0];
        assert!(first > 1, "old records were dropped by retention");
        assert_eq!(seqs, (first..=40).collect::<Vec<_>>());

        // Crashed right after the rename: the current file is gone.
        fs::remove_file(&path).unwrap();
        let mut log = AuditLog::open(&path, rotation).unwrap();
        let last_rotated = AuditTrail::read(&path).unwrap().records.last().unwrap().seq;
        assert_eq!(log.append(stopped("after")).unwrap().seq, last_rotated + 1);
    }
}
