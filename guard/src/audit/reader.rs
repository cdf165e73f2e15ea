//! Reading the trail back: rotated files oldest first, then the live file.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use time::OffsetDateTime;

use super::{
    AuditError,
    log::rotated_path,
    record::{AuditEvent, AuditRecord},
};

/// A line that is not a record: reported, never fatal (a report must still
/// come out of a damaged log).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnreadableLine {
    pub file: PathBuf,
    /// 1-based.
    pub line: usize,
    pub error: String,
}

/// Every readable record of a log and its rotated files, in order.
#[derive(Clone, Debug, Default)]
pub struct AuditTrail {
    pub records: Vec<AuditRecord>,
    pub unreadable: Vec<UnreadableLine>,
}

impl AuditTrail {
    /// Reads `path` and its rotated files (`path.N`, highest N first). A log
    /// that does not exist yet reads as empty.
    pub fn read(path: &Path) -> Result<Self, AuditError> {
        let mut trail = Self::default();
        let mut files = rotated_files(path)?;
        files.push(path.to_path_buf());
        for file in files {
            let text = match fs::read(&file) {
                Ok(t) => t,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(source) => {
                    return Err(AuditError::Io {
                        path: file,
                        op: "read",
                        source,
                    });
                }
            };
            for (i, line) in text.split(|b| *b == b'\n').enumerate() {
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                match serde_json::from_slice::<AuditRecord>(line) {
                    Ok(r) => trail.records.push(r),
                    Err(e) => trail.unreadable.push(UnreadableLine {
                        file: file.clone(),
                        line: i + 1,
                        error: e.to_string(),
                    }),
                }
            }
        }
        Ok(trail)
    }

    /// The record with this sequence number (a restore id).
    pub fn find(&self, seq: u64) -> Option<&AuditRecord> {
        self.records
            .binary_search_by_key(&seq, |r| r.seq)
            .ok()
            .map(|i| &self.records[i])
            .or_else(|| self.records.iter().find(|r| r.seq == seq))
    }

    /// The removal with this id, if the record is one `restore` can undo.
    pub fn removal(&self, seq: u64) -> Option<&AuditRecord> {
        self.find(seq).filter(|r| r.event.is_removal())
    }

    /// Records at or after `since`.
    pub fn since(&self, since: OffsetDateTime) -> impl Iterator<Item = &AuditRecord> {
        self.records.iter().filter(move |r| r.ts >= since)
    }

    /// Sequence numbers missing between the first and the last record.
    pub fn gaps(&self) -> Vec<u64> {
        let mut gaps = Vec::new();
        for w in self.records.windows(2) {
            gaps.extend(w[0].seq + 1..w[1].seq);
        }
        gaps
    }

    /// Records of one kind, for callers that want only `rule_removed`, say.
    pub fn of_kind<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = &'a AuditRecord> + 'a {
        self.records.iter().filter(move |r| r.event.kind() == kind)
    }

    pub fn last_event(&self) -> Option<&AuditEvent> {
        self.records.last().map(|r| &r.event)
    }
}

/// Rotated files of `path` that exist, oldest (highest N) first.
pub fn rotated_files(path: &Path) -> Result<Vec<PathBuf>, AuditError> {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return Ok(Vec::new());
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(AuditError::Io {
                path: dir.to_path_buf(),
                op: "list",
                source,
            });
        }
    };
    let mut numbered: Vec<usize> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let n = e.file_name();
            let n = n.to_str()?;
            n.strip_prefix(name)?.strip_prefix('.')?.parse().ok()
        })
        .collect();
    numbered.sort_unstable_by(|a, b| b.cmp(a));
    Ok(numbered
        .into_iter()
        .map(|n| rotated_path(path, n))
        .collect())
}
