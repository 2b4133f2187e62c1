//! The on-disk alert spool: while the broker is unreachable, alert payloads (serialized
//! [`AlertEvent`](crate::alert::AlertEvent)s) are appended here and published in order on
//! reconnect, so an outage loses no alert unless the spool is full.
//!
//! The MQTT publisher feeds it ([`Spool::append`]) and drains it ([`Spool::peek`], publish,
//! [`Spool::ack`]). Pure file logic: no async, no clock, no broker.
//!
//! # On disk
//!
//! `dir` holds segment files `00000001.spool`, `00000002.spool`, … (sequence numbers only
//! grow) and a `cursor` file. A segment is a run of records, each framed as
//!
//! ```text
//! len: u32 LE | crc: u32 LE | payload: len bytes
//! ```
//!
//! where `crc` is the CRC-32 (IEEE) of the four `len` bytes followed by the payload; covering
//! the length means a zero-filled tail (what some filesystems show after a crash) is never a
//! valid empty record. A segment grows to at most `max_bytes / 8`; then a new one starts.
//!
//! The `cursor` (`seq: u64 LE | offset: u64 LE | crc: u32 LE`) names the first
//! unacknowledged record: byte `offset` of segment `seq`. It is replaced atomically after
//! every [`Spool::ack`] (temp file, fsync, rename, fsync of the directory; on a full disk,
//! where the temp file cannot be written, the existing file is overwritten in place).
//! Segments before the cursor's are consumed and deleted; when the cursor's own segment is
//! gone, reading starts at the next segment that exists. So deleting a segment never needs
//! a cursor write. A restart redelivers the records sent but not yet acknowledged (at
//! most those in flight); after a cursor overwritten in place was torn by a crash, its CRC
//! fails and everything replays from the oldest segment left (see [`Spool::ack`]). Either
//! way delivery is at-least-once.
//!
//! # Compaction
//!
//! Acknowledged records do not stay on disk: an ack that empties the spool starts a new,
//! empty segment and deletes the consumed one instead of writing the cursor, and an append
//! once half the only segment is acknowledged starts a new segment, so the old one goes
//! with its last pending record. A crash between any two steps leaves a state that
//! [`Spool::open`] reads as before the step or after it: at worst records come again.
//!
//! # Bound
//!
//! The segment files never total more than `max_bytes` (framing and acknowledged records
//! still sitting in the oldest segment included). An append that would cross the bound
//! deletes the oldest segments first; their unacknowledged records are counted in
//! [`SpoolStats::dropped_oldest`] with a `warn!` per segment. A record larger than one
//! segment is refused ([`SpoolError::TooLarge`]).
//!
//! # Recovery
//!
//! [`Spool::open`] scans every segment, never panicking on any bytes. A record that is
//! torn (cut short) or fails its CRC starts a damaged run; the scan resynchronises at the
//! next offset where an intact record starts (a header whose length fits and whose CRC
//! matches the bytes it frames; a CRC over the length makes a false match about one in
//! 2^32). Lengths inside the run cannot be trusted, so it is searched byte by byte.
//!
//! - A run with intact records after it is skipped: the segment is rewritten without it
//!   (temp file, fsync, rename; the cursor, corrected first, moves with its record),
//!   counted in [`SpoolStats::resynced`], and logged with its offsets and size.
//! - A run with none after it is the segment's tail: the file is truncated where it
//!   starts, counted in [`SpoolStats::truncated_tail`]. In the newest segment a record
//!   cut short there is the torn tail of a crash mid-append.
//!
//! Unacknowledged records lost either way are counted in [`SpoolStats::dropped_corrupt`],
//! except that torn tail (its append never returned, so nothing spooled is lost). Each
//! damage is found, logged and counted once: the next open sees a clean segment. A
//! missing or corrupt cursor means "start at the oldest segment": duplicates, never loss.
//!
//! One process owns a spool directory: [`Spool::open`] takes an exclusive `flock` on its
//! `lock` file and refuses a directory another live spool holds (two agents sharing one
//! would each re-send the other's alerts and delete its segments). The lock dies with the
//! process.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

/// Bytes of framing before each payload: length and CRC.
pub const RECORD_HEADER_BYTES: u64 = 8;

/// How many segments `max_bytes` is split into: the most a single drop discards is about
/// one eighth of the spool.
pub const SEGMENTS_PER_SPOOL: u64 = 8;

/// Smallest `max_bytes` accepted: each segment must hold a one-byte record.
pub const MIN_MAX_BYTES: u64 = SEGMENTS_PER_SPOOL * (RECORD_HEADER_BYTES + 1);

const SEGMENT_SUFFIX: &str = ".spool";
const CURSOR_FILE: &str = "cursor";
const CURSOR_TMP_FILE: &str = "cursor.tmp";
/// A segment being rewritten without its damaged records (see [`Spool::open`]).
const SEGMENT_TMP_FILE: &str = "segment.tmp";
const CURSOR_BYTES: usize = 20;
const LOCK_FILE: &str = "lock";

/// Where the spool lives and how large it may grow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpoolConfig {
    /// Directory of the segment files and the cursor; created if missing.
    pub dir: PathBuf,
    /// Upper bound on the segment files' total size, framing included. Past it the oldest
    /// alerts are dropped. One record may take at most `max_bytes / 8`, so the agent's
    /// configuration needs at least [`crate::mqtt::MIN_SPOOL_MAX_BYTES`] (8 MiB less 32
    /// bytes): room for the largest alert an MQTT packet holds. The spool alone takes
    /// [`MIN_MAX_BYTES`] and up.
    pub max_bytes: u64,
    /// `fsync` every append and cursor update. Off trades durability across power loss for
    /// speed; a process crash still loses nothing that `append` returned `Ok` for.
    pub fsync: bool,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig {
            dir: PathBuf::from("/var/lib/darkwatch/spool"),
            max_bytes: 64 * 1024 * 1024,
            fsync: true,
        }
    }
}

impl SpoolConfig {
    /// Semantic checks the types cannot express. Returns the key and the reason.
    ///
    /// # Errors
    /// An empty `dir`, or `max_bytes` below [`MIN_MAX_BYTES`].
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.dir.as_os_str().is_empty() {
            return Err(("dir", "must not be empty".into()));
        }
        if self.max_bytes < MIN_MAX_BYTES {
            return Err((
                "max_bytes",
                format!("must be at least {MIN_MAX_BYTES}, got {}", self.max_bytes),
            ));
        }
        Ok(())
    }

    /// The most bytes one segment file (and so one framed record) may take.
    pub fn segment_limit_bytes(&self) -> u64 {
        self.max_bytes / SEGMENTS_PER_SPOOL
    }
}

/// Why the spool cannot open, take a record or read one. Each message names the file.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool config: `{key}` {reason}")]
    Config { key: &'static str, reason: String },
    #[error("{path}: cannot {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        source: io::Error,
    },
    #[error(
        "alert payload of {payload_bytes} bytes does not fit the spool: a record takes \
         {RECORD_HEADER_BYTES} bytes of framing plus its payload and at most \
         {segment_limit_bytes} bytes (max_bytes / {SEGMENTS_PER_SPOOL})"
    )]
    TooLarge {
        payload_bytes: usize,
        segment_limit_bytes: u64,
    },
    #[error(
        "{dir}: another darkwatch process holds this spool directory (its `lock` file); \
         give each agent its own [spool] dir"
    )]
    Locked { dir: PathBuf },
    #[error("{path}: corrupt record at byte {offset}: {reason}")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
}

/// Counters since [`Spool::open`] and the current backlog.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct SpoolStats {
    /// Records appended.
    pub appended: u64,
    /// Records acknowledged.
    pub acked: u64,
    /// Unacknowledged records deleted to stay within `max_bytes`.
    pub dropped_oldest: u64,
    /// Segments cut short at a torn or corrupt record while opening.
    pub truncated_tail: u64,
    /// Runs of corrupt records skipped while opening, with the intact records after each
    /// one kept.
    pub resynced: u64,
    /// Unacknowledged records lost to damage found while opening: in skipped runs, or in a
    /// cut tail other than a record torn at the end of the newest segment (an append a
    /// crash interrupted, which never returned). A run's record count follows its length
    /// fields: exact when only payloads were damaged, an estimate (at least one per run)
    /// otherwise.
    pub dropped_corrupt: u64,
    /// Records waiting to be acknowledged.
    pub pending: u64,
    /// Bytes of the segment files (see [`Spool::bytes`]).
    pub bytes: u64,
}

#[derive(Debug, Clone, Copy)]
struct Segment {
    seq: u64,
    /// Valid bytes (the file's length once recovered).
    bytes: u64,
    /// Records in the file, acknowledged or not.
    records: u64,
}

/// The record at the head: where it ends and, once read, its payload.
#[derive(Debug)]
struct Head {
    end: u64,
    payload: Vec<u8>,
}

/// An append-only, size-bounded, crash-safe FIFO of byte records. See the module docs.
#[derive(Debug)]
pub struct Spool {
    cfg: SpoolConfig,
    /// Oldest first; never empty; the last one is the one appended to. The first one holds
    /// the head (first unacknowledged record), if any.
    segments: VecDeque<Segment>,
    /// Byte offset of the head within `segments[0]`.
    head_offset: u64,
    /// Records of `segments[0]` before `head_offset`.
    head_consumed: u64,
    /// Open file of the last segment, positioned at its end.
    writer: File,
    /// Open file of `segments[0]` when it is being read, with its sequence number.
    reader: Option<(u64, File)>,
    /// The head record once read by `peek`, so `ack` need not read it again.
    head: Option<Head>,
    stats: SpoolStats,
    /// The directory's `lock` file, locked exclusively while this spool is open.
    _lock: File,
    /// Tests: every append's write fails, also after a rotation.
    #[cfg(test)]
    fail_writes: bool,
}

impl Spool {
    /// Opens (creating if needed) the spool in `cfg.dir` and recovers its state: torn or
    /// corrupt records are cut away and the intact records after them kept (see the module
    /// docs), consumed segments are deleted, and the bound is enforced if `max_bytes`
    /// shrank since the last run.
    ///
    /// # Errors
    /// An invalid config ([`SpoolConfig::validate`]), or an I/O error on the directory, a
    /// segment or the cursor.
    pub fn open(cfg: SpoolConfig) -> Result<Spool, SpoolError> {
        cfg.validate()
            .map_err(|(key, reason)| SpoolError::Config { key, reason })?;
        let dir = cfg.dir.clone();
        fs::create_dir_all(&dir).map_err(io_err(&dir, "create the spool directory"))?;
        let lock = lock_dir(&dir)?;
        for (name, op) in [
            (CURSOR_TMP_FILE, "remove a stale temp cursor"),
            (SEGMENT_TMP_FILE, "remove a stale temp segment"),
        ] {
            let tmp = dir.join(name);
            match fs::remove_file(&tmp) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(io_err(&tmp, op)(e));
                }
                _ => {}
            }
        }

        let cursor = read_cursor(&dir)?;
        let mut seqs = list_segments(&dir)?;

        // Segments before the cursor's were fully consumed; a crash stopped their deletion.
        if let Some((cseq, _)) = cursor {
            for &seq in seqs.iter().filter(|&&s| s < cseq) {
                remove_file(&segment_path(&dir, seq))?;
            }
            seqs.retain(|&s| s >= cseq);
        }

        let mut segments = VecDeque::with_capacity(seqs.len() + 1);
        let mut head_offset = 0;
        let mut head_consumed = 0;
        let mut recovery = Recovery::default();
        for (i, &seq) in seqs.iter().enumerate() {
            let path = segment_path(&dir, seq);
            let data = fs::read(&path).map_err(io_err(&path, "read the segment"))?;
            let scan = scan_records(&data);
            let newest = i + 1 == seqs.len();
            let cursor_here = cursor.and_then(|(cseq, coffset)| (cseq == seq).then_some(coffset));
            recovery.account(&path, &scan, newest, cursor_here.unwrap_or(0));
            // Where each intact record ends once the damage is cut out.
            let ends: Vec<u64> = scan
                .records
                .iter()
                .scan(0, |end, &(start, stop)| {
                    *end += stop - start;
                    Some(*end)
                })
                .collect();
            let bytes = ends.last().copied().unwrap_or(0);
            if let Some(coffset) = cursor_here {
                // Round down to a record boundary: redeliver rather than skip.
                let consumed = scan.records.partition_point(|&(_, end)| end <= coffset);
                head_consumed = consumed as u64;
                head_offset = if consumed == 0 { 0 } else { ends[consumed - 1] };
                if coffset > scan.recovered_end() {
                    warn!(
                        path = %path.display(),
                        cursor = coffset,
                        valid_bytes = scan.recovered_end(),
                        "Spool cursor points past the recovered end of its segment; resuming at that end."
                    );
                } else if !scan.is_boundary(coffset) {
                    warn!(
                        path = %path.display(),
                        cursor = coffset,
                        head_offset,
                        "Spool cursor is not on a record boundary; resuming at the previous one."
                    );
                }
                if head_offset != coffset {
                    // Persist the correction before the segment is repaired: records
                    // appended at the recovered end must not look consumed to the next
                    // restart, and a crash between the two writes leaves a cursor that
                    // is at or before its place in the unrepaired file (redelivery, not
                    // loss).
                    write_cursor(&dir, seq, head_offset, cfg.fsync)?;
                }
            }
            if !scan.skipped.is_empty() {
                rewrite_segment(&dir, seq, &data, &scan.records, cfg.fsync)?;
            } else if scan.tail.is_some() {
                truncate_file(&path, bytes, cfg.fsync)?;
            }
            segments.push_back(Segment {
                seq,
                bytes,
                records: ends.len() as u64,
            });
        }

        let writer = match segments.back() {
            Some(last) => open_append(&segment_path(&dir, last.seq))?,
            None => {
                // Keep sequence numbers above the cursor's, or a new segment would read
                // as consumed.
                let seq = cursor.map_or(1, |(cseq, _)| cseq + 1);
                let file = create_segment(&dir, seq, cfg.fsync)?;
                segments.push_back(Segment {
                    seq,
                    bytes: 0,
                    records: 0,
                });
                file
            }
        };

        let mut spool = Spool {
            cfg,
            segments,
            head_offset,
            head_consumed,
            writer,
            reader: None,
            head: None,
            stats: SpoolStats {
                truncated_tail: recovery.truncated_tail,
                resynced: recovery.resynced,
                dropped_corrupt: recovery.dropped_corrupt,
                ..SpoolStats::default()
            },
            _lock: lock,
            #[cfg(test)]
            fail_writes: false,
        };
        spool.delete_consumed_segments()?;
        if spool.bytes() > spool.cfg.max_bytes {
            // `max_bytes` shrank: the newest segment alone may be too large, and only a
            // closed segment can be dropped.
            spool.rotate()?;
            spool.drop_oldest_until_fits(0)?;
        }
        Ok(spool)
    }

    /// Appends one record; when `fsync` is on it is on disk before this returns. If the
    /// spool would exceed `max_bytes`, the oldest segments (and their unacknowledged
    /// records, counted in `dropped_oldest`) are deleted first.
    ///
    /// # Errors
    /// [`SpoolError::TooLarge`] if the framed record exceeds `max_bytes / 8` (nothing is
    /// written or dropped), or an I/O error (the segment is cut back to its previous end,
    /// so the spool stays consistent).
    pub fn append(&mut self, payload: &[u8]) -> Result<(), SpoolError> {
        let limit = self.cfg.segment_limit_bytes();
        let record_bytes = payload.len() as u64 + RECORD_HEADER_BYTES;
        let len = match u32::try_from(payload.len()) {
            Ok(len) if record_bytes <= limit => len,
            _ => {
                return Err(SpoolError::TooLarge {
                    payload_bytes: payload.len(),
                    segment_limit_bytes: limit,
                });
            }
        };

        if self.last().bytes + record_bytes > limit {
            self.rotate()?;
        } else if self.head_segment_mostly_acked() {
            // Compaction: the acknowledged half of this segment goes with it once its
            // pending records are acknowledged. Best effort: without a new file (no
            // inode left) the record still fits the current segment.
            if let Err(error) = self.rotate() {
                debug!(%error, "Cannot start a new spool segment to compact; appending to the current one.");
            }
        }
        self.drop_oldest_until_fits(record_bytes)?;

        let mut record = Vec::with_capacity(record_bytes as usize);
        record.extend_from_slice(&len.to_le_bytes());
        record.extend_from_slice(&record_crc(payload).to_le_bytes());
        record.extend_from_slice(payload);

        let last = *self.last();
        let path = segment_path(&self.cfg.dir, last.seq);
        #[cfg(test)]
        if self.fail_writes {
            return Err(io_err(&path, "append to the segment")(io::Error::other(
                "write refused by the test",
            )));
        }
        let written = self.writer.write_all(&record).and_then(|()| {
            if self.cfg.fsync {
                self.writer.sync_data()
            } else {
                Ok(())
            }
        });
        if let Err(e) = written {
            // Cut a partial record away so the next append starts on a boundary. The file
            // was opened for appending, so later writes go to the new end.
            if let Err(e2) = self.writer.set_len(last.bytes) {
                warn!(path = %path.display(), error = %e2, "Cannot cut a failed spool append back.");
            }
            return Err(io_err(&path, "append to the segment")(e));
        }
        let seg = self.segments.back_mut().expect("segments is never empty");
        seg.bytes += record_bytes;
        seg.records += 1;
        self.stats.appended += 1;
        Ok(())
    }

    /// The oldest unacknowledged record, or `None` when the spool is empty. Calling it
    /// again without [`Spool::ack`] returns the same record.
    ///
    /// # Errors
    /// An I/O error reading the segment, or [`SpoolError::Corrupt`] if the record changed
    /// on disk since it was recovered or written.
    pub fn peek(&mut self) -> Result<Option<Vec<u8>>, SpoolError> {
        Ok(self.read_head()?.map(|h| h.payload.clone()))
    }

    /// Acknowledges (removes) the oldest record and persists the new read position, so a
    /// restart does not deliver it again. A fully consumed segment is deleted. Does nothing
    /// on an empty spool.
    ///
    /// When this ack empties the spool, no cursor is written: a new, empty segment is
    /// created and the consumed one deleted (a cursor naming a missing segment means "the
    /// next one"), so acknowledged records never pile up on disk. A crash between the two
    /// steps leaves the old segment and a cursor before its end: its records come again
    /// (duplicates, not loss). Otherwise the cursor is replaced atomically; if that fails
    /// (a full disk has no block for the temp file) the existing cursor file is overwritten
    /// in place, which needs no new block: a write torn by a crash fails its CRC and
    /// replays from the oldest segment (duplicates, not loss).
    ///
    /// # Errors
    /// As [`Spool::peek`], or an I/O error writing the cursor or deleting a segment; the
    /// record then counts as not acknowledged (it may come back after a restart).
    pub fn ack(&mut self) -> Result<(), SpoolError> {
        let Some(end) = self.read_head()?.map(|h| h.end) else {
            return Ok(());
        };
        let seq = self.segments[0].seq;
        if self.segments.len() == 1 && end >= self.segments[0].bytes {
            let next = seq + 1;
            match create_segment(&self.cfg.dir, next, self.cfg.fsync) {
                Ok(file) => {
                    self.writer = file;
                    self.segments.push_back(Segment {
                        seq: next,
                        bytes: 0,
                        records: 0,
                    });
                    self.advance_head(end);
                    if let Err(error) = self.delete_consumed_segments() {
                        // The consumed segment stays, with a cursor before its end: persist
                        // the position so a restart does not send its records again.
                        debug!(%error, "Cannot delete a consumed spool segment; writing the cursor instead.");
                        if let Err(error) = persist_cursor(&self.cfg.dir, seq, end, self.cfg.fsync)
                        {
                            warn!(%error, "Cannot record an acknowledged alert in the spool; it may be sent again after a restart.");
                        }
                    }
                    return Ok(());
                }
                Err(error) => {
                    debug!(%error, "Cannot start a new spool segment; writing the cursor instead.");
                }
            }
        }
        persist_cursor(&self.cfg.dir, seq, end, self.cfg.fsync)?;
        self.advance_head(end);
        self.delete_consumed_segments()
    }

    /// Moves the head past the record ending at `end` (in memory).
    fn advance_head(&mut self, end: u64) {
        self.head = None;
        self.head_offset = end;
        self.head_consumed += 1;
        self.stats.acked += 1;
    }

    /// Whether the segment holding the head is also the one appended to, and at least half
    /// of its bytes are acknowledged: appending to a new segment lets the old one, and its
    /// acknowledged records, be deleted once its pending records are acknowledged.
    fn head_segment_mostly_acked(&self) -> bool {
        self.segments.len() == 1
            && self.head_offset > 0
            && self.head_offset * 2 >= self.last().bytes
    }

    /// Records waiting to be acknowledged.
    pub fn len(&self) -> u64 {
        self.segments.iter().map(|s| s.records).sum::<u64>() - self.head_consumed
    }

    /// Whether no record waits to be acknowledged.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of the segment files: framing included, and acknowledged records that still
    /// share the oldest segment with pending ones. This is what `max_bytes` bounds.
    pub fn bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.bytes).sum()
    }

    /// Counters since [`Spool::open`] and the current backlog.
    pub fn stats(&self) -> SpoolStats {
        SpoolStats {
            pending: self.len(),
            bytes: self.bytes(),
            ..self.stats
        }
    }

    /// The configuration the spool was opened with.
    pub fn config(&self) -> &SpoolConfig {
        &self.cfg
    }

    /// Makes every later append's write fail, after the rotation and the drops of old
    /// segments it would make (a new segment's handle is not read-only, so
    /// [`Spool::break_appends_for_test`] lasts only until a rotation).
    #[cfg(test)]
    pub(crate) fn fail_writes_for_test(&mut self) {
        self.fail_writes = true;
    }

    /// Makes every later append fail with a real I/O error (the segment's handle turns
    /// read-only), as a full disk would.
    #[cfg(test)]
    pub(crate) fn break_appends_for_test(&mut self) {
        let path = segment_path(&self.cfg.dir, self.last().seq);
        self.writer = File::open(path).unwrap();
    }

    fn last(&self) -> &Segment {
        self.segments.back().expect("segments is never empty")
    }

    /// Reads (once) the record at the head, if there is one.
    fn read_head(&mut self) -> Result<Option<&Head>, SpoolError> {
        if self.head.is_none() {
            if self.is_empty() {
                return Ok(None);
            }
            let seg = self.segments[0];
            let path = segment_path(&self.cfg.dir, seg.seq);
            let file = match &mut self.reader {
                Some((seq, file)) if *seq == seg.seq => file,
                slot => {
                    let file = File::open(&path).map_err(io_err(&path, "open the segment"))?;
                    &mut slot.insert((seg.seq, file)).1
                }
            };
            let offset = self.head_offset;
            let corrupt = |reason: &str| SpoolError::Corrupt {
                path: path.clone(),
                offset,
                reason: reason.into(),
            };
            let mut header = [0u8; RECORD_HEADER_BYTES as usize];
            file.seek(SeekFrom::Start(offset))
                .and_then(|_| file.read_exact(&mut header))
                .map_err(io_err(&path, "read a record"))?;
            let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
            let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
            let end = offset + RECORD_HEADER_BYTES + u64::from(len);
            if end > seg.bytes {
                return Err(corrupt("length runs past the end of the segment"));
            }
            let mut payload = vec![0u8; len as usize];
            file.read_exact(&mut payload)
                .map_err(io_err(&path, "read a record"))?;
            if record_crc(&payload) != crc {
                return Err(corrupt("CRC mismatch"));
            }
            self.head = Some(Head { end, payload });
        }
        Ok(self.head.as_ref())
    }

    /// Starts a new, empty segment to append to.
    fn rotate(&mut self) -> Result<(), SpoolError> {
        let seq = self.last().seq + 1;
        self.writer = create_segment(&self.cfg.dir, seq, self.cfg.fsync)?;
        self.segments.push_back(Segment {
            seq,
            bytes: 0,
            records: 0,
        });
        self.delete_consumed_segments()
    }

    /// Deletes oldest segments whose records are all acknowledged, but never the last one.
    fn delete_consumed_segments(&mut self) -> Result<(), SpoolError> {
        while self.segments.len() > 1 && self.head_offset >= self.segments[0].bytes {
            self.remove_oldest()?;
        }
        Ok(())
    }

    /// Deletes oldest segments until `extra` more bytes fit under `max_bytes`.
    fn drop_oldest_until_fits(&mut self, extra: u64) -> Result<(), SpoolError> {
        while self.segments.len() > 1 && self.bytes() + extra > self.cfg.max_bytes {
            let seg = self.segments[0];
            let dropped = seg.records - self.head_consumed;
            if dropped > 0 {
                warn!(
                    segment = seg.seq,
                    dropped,
                    max_bytes = self.cfg.max_bytes,
                    "Spool full; dropping the oldest alerts."
                );
            }
            self.stats.dropped_oldest += dropped;
            self.remove_oldest()?;
        }
        // The head may now sit in an empty segment that is not the last.
        self.delete_consumed_segments()
    }

    /// Deletes `segments[0]`; the head moves to the start of the next segment. The cursor
    /// file is not rewritten: a cursor naming a missing segment means "the next one".
    fn remove_oldest(&mut self) -> Result<(), SpoolError> {
        let seg = self.segments[0];
        if matches!(self.reader, Some((seq, _)) if seq == seg.seq) {
            self.reader = None;
        }
        remove_file(&segment_path(&self.cfg.dir, seg.seq))?;
        if self.cfg.fsync {
            sync_dir(&self.cfg.dir)?;
        }
        self.segments.pop_front();
        self.head_offset = 0;
        self.head_consumed = 0;
        self.head = None;
        Ok(())
    }
}

/// Bytes of CRC one segment's resynchronisation may compute, per byte of the segment, on
/// top of [`RESYNC_BUDGET_MIN_BYTES`]. A few damaged records cost a small fraction of it;
/// a segment of noise (where about one offset in 500 claims a length that fits, each
/// asking for a CRC over up to the whole segment) would otherwise take minutes to open.
const RESYNC_BUDGET_PER_BYTE: u64 = 32;
const RESYNC_BUDGET_MIN_BYTES: u64 = 1 << 20;

const TORN_HEADER: &str = "torn record header";
const TORN_PAYLOAD: &str = "torn record payload";
const CRC_MISMATCH: &str = "CRC mismatch";

/// A run of bytes that recovery could not read as records.
#[derive(Debug)]
struct Damage {
    start: u64,
    end: u64,
    /// Where the records in the run start, as far as its length fields lead from its
    /// start (and one more where they stop leading): at least one, and exact when only
    /// payloads were damaged.
    record_starts: Vec<u64>,
    /// Why the record at `start` was refused.
    reason: &'static str,
}

impl Damage {
    fn new(data: &[u8], start: usize, end: usize, reason: &'static str) -> Damage {
        let header = RECORD_HEADER_BYTES as usize;
        let mut record_starts = Vec::new();
        let mut pos = start;
        while pos < end {
            record_starts.push(pos as u64);
            // A zeroed header says nothing (an empty record's CRC is not 0).
            let Some(frame) = data
                .get(pos..end)
                .and_then(|rest| rest.first_chunk::<{ RECORD_HEADER_BYTES as usize }>())
                .filter(|frame| frame.iter().any(|&b| b != 0))
            else {
                break;
            };
            let len = u32::from_le_bytes([frame[0], frame[1], frame[2], frame[3]]) as usize;
            match pos.checked_add(header).and_then(|p| p.checked_add(len)) {
                Some(next) if next <= end => pos = next,
                _ => break,
            }
        }
        Damage {
            start: start as u64,
            end: end as u64,
            record_starts,
            reason,
        }
    }

    fn bytes(&self) -> u64 {
        self.end - self.start
    }

    fn records(&self) -> u64 {
        self.record_starts.len() as u64
    }

    /// Records of the run not acknowledged yet: those starting at or after `acked_end`.
    fn pending(&self, acked_end: u64) -> u64 {
        self.record_starts
            .iter()
            .filter(|&&s| s >= acked_end)
            .count() as u64
    }

    /// Whether the run is a record cut short by the end of the data.
    fn torn(&self) -> bool {
        self.reason == TORN_HEADER || self.reason == TORN_PAYLOAD
    }
}

/// Result of scanning one segment's bytes.
#[derive(Debug)]
struct Scan {
    /// Start and end of every intact record, ascending.
    records: Vec<(u64, u64)>,
    /// Damaged runs with an intact record after each: skipped.
    skipped: Vec<Damage>,
    /// A damaged run at the end, with no intact record after it: cut away.
    tail: Option<Damage>,
    /// The resync budget ran out, so the tail may hold intact records.
    gave_up: bool,
    /// Bytes scanned.
    len: u64,
}

impl Scan {
    /// Where the readable part of the segment ends: the start of its tail, if any.
    fn recovered_end(&self) -> u64 {
        self.tail.as_ref().map_or(self.len, |t| t.start)
    }

    /// Whether `offset` is where a read position may rest: the start, a record's start or
    /// end, or inside a skipped run (whose records are gone either way).
    fn is_boundary(&self, offset: u64) -> bool {
        offset == 0
            || self.records.binary_search_by_key(&offset, |r| r.0).is_ok()
            || self.records.binary_search_by_key(&offset, |r| r.1).is_ok()
            || self
                .skipped
                .iter()
                .any(|d| d.start <= offset && offset <= d.end)
    }
}

/// Reads a segment's records. A record that is torn or fails its CRC starts a damaged run,
/// which ends at the next offset where an intact record (header, length that fits, CRC)
/// starts; with none, the run is the segment's tail. Never panics, whatever the bytes.
fn scan_records(data: &[u8]) -> Scan {
    let mut budget = (data.len() as u64)
        .saturating_mul(RESYNC_BUDGET_PER_BYTE)
        .saturating_add(RESYNC_BUDGET_MIN_BYTES);
    let mut records = Vec::new();
    let mut skipped = Vec::new();
    let mut gave_up = false;
    let mut pos = 0usize;
    let tail = loop {
        if pos >= data.len() {
            break None;
        }
        let reason = match check_record(data, pos) {
            Ok(end) => {
                records.push((pos as u64, end as u64));
                pos = end;
                continue;
            }
            Err(reason) => reason,
        };
        match resync(data, pos + 1, &mut budget) {
            Ok(next) => {
                skipped.push(Damage::new(data, pos, next, reason));
                pos = next;
            }
            Err(spent) => {
                gave_up = spent;
                break Some(Damage::new(data, pos, data.len(), reason));
            }
        }
    };
    Scan {
        records,
        skipped,
        tail,
        gave_up,
        len: data.len() as u64,
    }
}

/// The end of the intact record framed at `pos`, or why there is none.
fn check_record(data: &[u8], pos: usize) -> Result<usize, &'static str> {
    let rest = data.get(pos..).unwrap_or_default();
    let Some((header, body)) = rest.split_first_chunk::<{ RECORD_HEADER_BYTES as usize }>() else {
        return Err(TORN_HEADER);
    };
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    let Some(payload) = body.get(..len) else {
        return Err(TORN_PAYLOAD);
    };
    if record_crc(payload) != crc {
        return Err(CRC_MISMATCH);
    }
    Ok(pos + header.len() + len)
}

/// The first offset from `from` on where an intact record starts. `Err(true)` if `budget`
/// (bytes of CRC left to compute) ran out first, `Err(false)` if there is none.
fn resync(data: &[u8], from: usize, budget: &mut u64) -> Result<usize, bool> {
    let header = RECORD_HEADER_BYTES as usize;
    for pos in from..data.len().saturating_sub(header - 1) {
        let len = u32::from_le_bytes([data[pos], data[pos + 1], data[pos + 2], data[pos + 3]]);
        if u64::from(len) > (data.len() - pos - header) as u64 {
            continue;
        }
        let cost = u64::from(len) + 4;
        if *budget < cost {
            *budget = 0;
            return Err(true);
        }
        *budget -= cost;
        if check_record(data, pos).is_ok() {
            return Ok(pos);
        }
    }
    Err(false)
}

/// Writes the segment `seq` anew with only `records` (start and end in `data`, its old
/// bytes): temp file, fsync, rename, fsync of the directory.
fn rewrite_segment(
    dir: &Path,
    seq: u64,
    data: &[u8],
    records: &[(u64, u64)],
    fsync: bool,
) -> Result<(), SpoolError> {
    let tmp = dir.join(SEGMENT_TMP_FILE);
    let mut file = File::create(&tmp).map_err(io_err(&tmp, "create the temp segment"))?;
    records
        .iter()
        .try_for_each(|&(start, end)| file.write_all(&data[start as usize..end as usize]))
        .and_then(|()| if fsync { file.sync_all() } else { Ok(()) })
        .map_err(io_err(&tmp, "write the temp segment"))?;
    drop(file);
    let path = segment_path(dir, seq);
    fs::rename(&tmp, &path).map_err(io_err(&path, "replace the segment"))?;
    if fsync {
        sync_dir(dir)?;
    }
    Ok(())
}

/// What [`Spool::open`] found damaged in the segments, for [`SpoolStats`].
#[derive(Debug, Default)]
struct Recovery {
    truncated_tail: u64,
    resynced: u64,
    dropped_corrupt: u64,
}

impl Recovery {
    /// Logs and counts the damage `scan` found in the segment at `path`. `acked_end`: the
    /// bytes of this segment already acknowledged (the cursor's offset when it names this
    /// segment, else 0).
    fn account(&mut self, path: &Path, scan: &Scan, newest: bool, acked_end: u64) {
        if !scan.skipped.is_empty() {
            const SHOWN: usize = 8;
            let mut at: Vec<String> = scan
                .skipped
                .iter()
                .take(SHOWN)
                .map(|d| format!("{}..{}", d.start, d.end))
                .collect();
            if scan.skipped.len() > SHOWN {
                at.push(format!("and {} more", scan.skipped.len() - SHOWN));
            }
            let lost: u64 = scan.skipped.iter().map(|d| d.pending(acked_end)).sum();
            warn!(
                path = %path.display(),
                runs = scan.skipped.len(),
                skipped_bytes = scan.skipped.iter().map(Damage::bytes).sum::<u64>(),
                records = scan.skipped.iter().map(Damage::records).sum::<u64>(),
                lost,
                at = %at.join(", "),
                reason = scan.skipped[0].reason,
                "Spool segment has corrupt records; skipping them and keeping the intact records after them. Unacknowledged ones are lost and counted as dropped."
            );
            self.resynced += scan.skipped.len() as u64;
            self.dropped_corrupt += lost;
        }
        if let Some(tail) = &scan.tail {
            // A record cut short at the end of the newest segment is an append that a
            // crash interrupted: it never returned, so no spooled alert is lost.
            let lost = if newest && tail.torn() {
                0
            } else {
                tail.pending(acked_end)
            };
            warn!(
                path = %path.display(),
                offset = tail.start,
                lost_bytes = tail.bytes(),
                lost,
                newest,
                reason = tail.reason,
                gave_up_resync = scan.gave_up,
                "Spool segment ends in a torn or corrupt record; truncating it there."
            );
            self.truncated_tail += 1;
            self.dropped_corrupt += lost;
        }
    }
}

/// CRC-32 (IEEE 802.3, reflected polynomial 0xEDB88320) lookup table, built at compile time.
const CRC_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
};

fn crc32_update(crc: u32, bytes: &[u8]) -> u32 {
    let mut c = !crc;
    for &b in bytes {
        c = CRC_TABLE[((c ^ u32::from(b)) & 0xFF) as usize] ^ (c >> 8);
    }
    !c
}

/// CRC-32 of a byte string (the common `crc32` of zlib and Ethernet).
fn crc32(bytes: &[u8]) -> u32 {
    crc32_update(0, bytes)
}

/// The CRC stored in a record's frame: over the length bytes, then the payload.
fn record_crc(payload: &[u8]) -> u32 {
    let len = payload.len() as u32;
    crc32_update(crc32(&len.to_le_bytes()), payload)
}

/// Opens `dir/lock` and takes an exclusive, non-blocking `flock` on it.
fn lock_dir(dir: &Path) -> Result<File, SpoolError> {
    use std::os::fd::AsRawFd;
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_err(&path, "open the lock file"))?;
    // SAFETY: flock on a descriptor this function owns; no memory is passed.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::WouldBlock {
            return Err(SpoolError::Locked {
                dir: dir.to_path_buf(),
            });
        }
        // A file system without locks (NFS without lockd, some FUSE mounts): go on unlocked.
        warn!(path = %path.display(), error = %e, "cannot lock the spool directory; a second agent on it would not be noticed");
    }
    Ok(file)
}

/// Fails with [`SpoolError::Locked`] if another live process holds the spool in `dir`;
/// otherwise takes its lock and releases it at once. Creates nothing: a missing folder or
/// `lock` file means no spool holds it.
///
/// # Errors
/// [`SpoolError::Locked`], or an I/O error opening the lock file.
pub fn probe_lock(dir: &Path) -> Result<(), SpoolError> {
    use std::os::fd::AsRawFd;
    let path = dir.join(LOCK_FILE);
    let file = match OpenOptions::new().write(true).open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(&path, "open the lock file")(e)),
    };
    // SAFETY: flock on a descriptor this function owns; no memory is passed.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0
        && io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock
    {
        return Err(SpoolError::Locked {
            dir: dir.to_path_buf(),
        });
    }
    // Closing the file releases the lock.
    Ok(())
}

fn io_err(path: &Path, op: &'static str) -> impl FnOnce(io::Error) -> SpoolError {
    let path = path.to_path_buf();
    move |source| SpoolError::Io { path, op, source }
}

fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:08}{SEGMENT_SUFFIX}"))
}

/// Sequence numbers of the segment files in `dir`, ascending. Other files are ignored.
fn list_segments(dir: &Path) -> Result<Vec<u64>, SpoolError> {
    let mut seqs = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err(dir, "list the spool directory"))? {
        let entry = entry.map_err(io_err(dir, "list the spool directory"))?;
        let name = entry.file_name();
        let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(SEGMENT_SUFFIX)) else {
            continue;
        };
        if !stem.is_empty() && stem.bytes().all(|b| b.is_ascii_digit()) {
            match stem.parse() {
                Ok(seq) => seqs.push(seq),
                Err(_) => warn!(file = %stem, "Ignoring a spool segment name out of range."),
            }
        }
    }
    seqs.sort_unstable();
    Ok(seqs)
}

fn create_segment(dir: &Path, seq: u64, fsync: bool) -> Result<File, SpoolError> {
    let path = segment_path(dir, seq);
    let file = OpenOptions::new()
        .append(true)
        .create(true)
        .open(&path)
        .map_err(io_err(&path, "create the segment"))?;
    if fsync {
        sync_dir(dir)?;
    }
    Ok(file)
}

fn open_append(path: &Path) -> Result<File, SpoolError> {
    OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(io_err(path, "open the segment for appending"))
}

fn truncate_file(path: &Path, len: u64, fsync: bool) -> Result<(), SpoolError> {
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io_err(path, "open the segment to truncate it"))?;
    file.set_len(len)
        .and_then(|()| if fsync { file.sync_all() } else { Ok(()) })
        .map_err(io_err(path, "truncate the segment"))
}

fn remove_file(path: &Path) -> Result<(), SpoolError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err(path, "delete the segment")(e)),
        _ => Ok(()),
    }
}

/// Makes creations, renames and deletions in `dir` durable.
fn sync_dir(dir: &Path) -> Result<(), SpoolError> {
    #[cfg(unix)]
    {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(dir, "sync the spool directory"))?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// The persisted read position, or `None` if there is none or it is unreadable.
fn read_cursor(dir: &Path) -> Result<Option<(u64, u64)>, SpoolError> {
    let path = dir.join(CURSOR_FILE);
    let data = match fs::read(&path) {
        Ok(data) => data,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(&path, "read the cursor")(e)),
    };
    let parsed = <[u8; CURSOR_BYTES]>::try_from(data.as_slice())
        .ok()
        .and_then(|b| {
            let seq = u64::from_le_bytes(b[0..8].try_into().ok()?);
            let offset = u64::from_le_bytes(b[8..16].try_into().ok()?);
            let crc = u32::from_le_bytes(b[16..20].try_into().ok()?);
            (crc32(&b[..16]) == crc).then_some((seq, offset))
        });
    if parsed.is_none() {
        warn!(
            path = %path.display(),
            "Spool cursor is corrupt; replaying from the oldest segment."
        );
    }
    Ok(parsed)
}

/// Writes the cursor: atomically ([`write_cursor`]), or, if that fails, over the existing
/// cursor file in place ([`overwrite_cursor`]). The error is the atomic write's.
fn persist_cursor(dir: &Path, seq: u64, offset: u64, fsync: bool) -> Result<(), SpoolError> {
    let Err(error) = write_cursor(dir, seq, offset, fsync) else {
        return Ok(());
    };
    let _ = fs::remove_file(dir.join(CURSOR_TMP_FILE));
    match overwrite_cursor(dir, seq, offset, fsync) {
        Ok(()) => {
            debug!(%error, "Cannot replace the spool cursor; overwrote it in place.");
            Ok(())
        }
        Err(_) => Err(error),
    }
}

fn cursor_bytes(seq: u64, offset: u64) -> [u8; CURSOR_BYTES] {
    let mut buf = [0u8; CURSOR_BYTES];
    buf[0..8].copy_from_slice(&seq.to_le_bytes());
    buf[8..16].copy_from_slice(&offset.to_le_bytes());
    let crc = crc32(&buf[..16]);
    buf[16..20].copy_from_slice(&crc.to_le_bytes());
    buf
}

/// Rewrites the existing cursor file's 20 bytes in place: its blocks are already
/// allocated, so this works on a full disk. A write torn by a crash fails the CRC, which
/// means "replay from the oldest segment": duplicates, never loss.
fn overwrite_cursor(dir: &Path, seq: u64, offset: u64, fsync: bool) -> Result<(), SpoolError> {
    let path = dir.join(CURSOR_FILE);
    let mut file = OpenOptions::new()
        .write(true)
        .open(&path)
        .map_err(io_err(&path, "open the cursor"))?;
    file.write_all(&cursor_bytes(seq, offset))
        .and_then(|()| if fsync { file.sync_data() } else { Ok(()) })
        .map_err(io_err(&path, "overwrite the cursor"))
}

/// Replaces the cursor atomically: temp file, fsync, rename, fsync of the directory.
fn write_cursor(dir: &Path, seq: u64, offset: u64, fsync: bool) -> Result<(), SpoolError> {
    let buf = cursor_bytes(seq, offset);
    let tmp = dir.join(CURSOR_TMP_FILE);
    let mut file = File::create(&tmp).map_err(io_err(&tmp, "create the temp cursor"))?;
    file.write_all(&buf)
        .and_then(|()| if fsync { file.sync_all() } else { Ok(()) })
        .map_err(io_err(&tmp, "write the temp cursor"))?;
    drop(file);
    let path = dir.join(CURSOR_FILE);
    fs::rename(&tmp, &path).map_err(io_err(&path, "replace the cursor"))?;
    if fsync {
        sync_dir(dir)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn cfg(dir: &Path, max_bytes: u64) -> SpoolConfig {
        SpoolConfig {
            dir: dir.to_path_buf(),
            max_bytes,
            fsync: false,
        }
    }

    /// A payload that names its id, of `len` bytes (at least 8).
    fn payload(id: u64, len: usize) -> Vec<u8> {
        let mut p = id.to_le_bytes().to_vec();
        p.resize(len.max(8), (id % 251) as u8);
        p
    }

    fn segment_files(dir: &Path) -> Vec<u64> {
        list_segments(dir).unwrap()
    }

    fn drain(spool: &mut Spool) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while let Some(p) = spool.peek().unwrap() {
            out.push(p);
            spool.ack().unwrap();
        }
        out
    }

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
        // A zero-filled frame must not pass as an empty record.
        assert_ne!(record_crc(b""), 0);
    }

    #[test]
    fn empty_spool_peeks_none() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(cfg(dir.path(), 800)).unwrap();
        assert_eq!(spool.peek().unwrap(), None);
        spool.ack().unwrap();
        assert_eq!(spool.len(), 0);
        assert!(spool.is_empty());
        assert_eq!(spool.stats(), SpoolStats::default());
    }

    #[test]
    fn delivers_in_order_across_segment_boundaries() {
        let dir = tempfile::tempdir().unwrap();
        // Segments of 100 bytes: five 18-byte records each.
        let mut spool = Spool::open(cfg(dir.path(), 800)).unwrap();
        for id in 0..17 {
            spool.append(&payload(id, 10)).unwrap();
        }
        assert_eq!(spool.len(), 17);
        assert_eq!(spool.bytes(), 17 * 18);
        assert_eq!(segment_files(dir.path()), vec![1, 2, 3, 4]);
        // Peek is idempotent.
        assert_eq!(spool.peek().unwrap(), Some(payload(0, 10)));
        assert_eq!(spool.peek().unwrap(), Some(payload(0, 10)));
        for id in 0..12 {
            assert_eq!(spool.peek().unwrap(), Some(payload(id, 10)));
            spool.ack().unwrap();
        }
        // Two segments fully consumed and deleted; the third is half read.
        assert_eq!(segment_files(dir.path()), vec![3, 4]);
        for id in 17..20 {
            spool.append(&payload(id, 10)).unwrap();
        }
        let rest: Vec<_> = (12..20).map(|id| payload(id, 10)).collect();
        assert_eq!(drain(&mut spool), rest);
        assert_eq!(spool.len(), 0);
        // The emptied spool was compacted: a new, empty segment.
        assert_eq!(segment_files(dir.path()), vec![5]);
        let stats = spool.stats();
        assert_eq!((stats.appended, stats.acked, stats.pending), (20, 20, 0));
    }

    /// Sizes of the segment files on disk.
    fn segment_bytes_on_disk(dir: &Path) -> u64 {
        segment_files(dir)
            .iter()
            .map(|&seq| fs::metadata(segment_path(dir, seq)).unwrap().len())
            .sum()
    }

    /// The trial's case: with the broker connected every record is acknowledged soon, and
    /// the one segment kept them all (28 KB after ~70 alerts, until the disk was full).
    #[test]
    fn an_emptied_spool_keeps_no_acknowledged_record_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(cfg(dir.path(), 1 << 20)).unwrap();
        for id in 0..70 {
            spool.append(&payload(id, 400)).unwrap();
            assert_eq!(spool.peek().unwrap(), Some(payload(id, 400)));
            spool.ack().unwrap();
            assert_eq!(spool.bytes(), 0);
            assert_eq!(segment_bytes_on_disk(dir.path()), 0);
            assert_eq!(segment_files(dir.path()).len(), 1);
        }
        assert_eq!(spool.stats().acked, 70);
        drop(spool);
        let mut spool = Spool::open(cfg(dir.path(), 1 << 20)).unwrap();
        assert_eq!(
            spool.peek().unwrap(),
            None,
            "nothing acknowledged comes back"
        );
        spool.append(&payload(70, 10)).unwrap();
        drop(spool);
        let mut spool = Spool::open(cfg(dir.path(), 1 << 20)).unwrap();
        assert_eq!(drain(&mut spool), vec![payload(70, 10)]);
    }

    /// With records pending, an append once half the segment is acknowledged starts a new
    /// one, and the old one goes with its last pending record; a restart keeps the rest.
    #[test]
    fn compaction_with_pending_records_shrinks_the_files_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(cfg(dir.path(), 1 << 20)).unwrap();
        for id in 0..10 {
            spool.append(&payload(id, 100)).unwrap();
        }
        for _ in 0..6 {
            spool.ack().unwrap();
        }
        assert_eq!(segment_bytes_on_disk(dir.path()), 10 * 108);
        spool.append(&payload(10, 100)).unwrap();
        assert_eq!(segment_files(dir.path()), vec![1, 2], "a new segment");
        for _ in 0..4 {
            spool.ack().unwrap();
        }
        assert_eq!(segment_files(dir.path()), vec![2], "the old one is gone");
        assert_eq!(segment_bytes_on_disk(dir.path()), 108);
        assert_eq!(spool.bytes(), 108);
        spool.append(&payload(11, 100)).unwrap();
        drop(spool);
        let mut spool = Spool::open(cfg(dir.path(), 1 << 20)).unwrap();
        assert_eq!(spool.len(), 2);
        assert_eq!(drain(&mut spool), vec![payload(10, 100), payload(11, 100)]);
        assert_eq!(segment_bytes_on_disk(dir.path()), 0);
    }

    /// A crash inside the compaction of an emptied spool, at each step: after the new
    /// segment is made (the old one and a cursor before its last record are still there),
    /// and after the old one is deleted (the cursor names a missing segment). Nothing is
    /// lost; the first state sends its last record again (at-least-once).
    #[test]
    fn a_crash_between_compaction_steps_loses_nothing() {
        for deleted in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let mut spool = Spool::open(cfg(dir.path(), 1 << 20)).unwrap();
            spool.append(b"a").unwrap();
            spool.append(b"b").unwrap();
            spool.ack().unwrap(); // a: cursor written, b pending
            assert_eq!(spool.peek().unwrap().as_deref(), Some(&b"b"[..]));
            drop(spool); // crashed while compacting after b's ack:
            File::create(segment_path(dir.path(), 2)).unwrap();
            if deleted {
                fs::remove_file(segment_path(dir.path(), 1)).unwrap();
            }
            let mut spool = Spool::open(cfg(dir.path(), 1 << 20)).unwrap();
            let expected: Vec<Vec<u8>> = if deleted { vec![] } else { vec![b"b".to_vec()] };
            assert_eq!(spool.len(), expected.len() as u64, "deleted: {deleted}");
            spool.append(b"c").unwrap();
            drop(spool);
            let mut spool = Spool::open(cfg(dir.path(), 1 << 20)).unwrap();
            let mut want = expected.clone();
            want.push(b"c".to_vec());
            assert_eq!(drain(&mut spool), want, "deleted: {deleted}");
            assert_eq!(segment_bytes_on_disk(dir.path()), 0);
        }
    }

    /// A full disk has no block for the temp cursor; the existing cursor is overwritten in
    /// place, and a restart resumes there. (A directory in the temp cursor's place makes
    /// its creation fail.)
    #[test]
    fn ack_overwrites_the_cursor_in_place_when_the_temp_cursor_cannot_be_written() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(cfg(dir.path(), 1 << 20)).unwrap();
        for id in 0..4 {
            spool.append(&payload(id, 10)).unwrap();
        }
        spool.ack().unwrap();
        fs::create_dir(dir.path().join(CURSOR_TMP_FILE)).unwrap();
        spool.ack().unwrap();
        assert_eq!(spool.len(), 2);
        assert_eq!(spool.stats().acked, 2);
        drop(spool);
        fs::remove_dir(dir.path().join(CURSOR_TMP_FILE)).unwrap();
        let mut spool = Spool::open(cfg(dir.path(), 1 << 20)).unwrap();
        assert_eq!(drain(&mut spool), vec![payload(2, 10), payload(3, 10)]);
    }

    #[test]
    fn probe_lock_tells_a_held_spool_from_a_free_one() {
        let dir = tempfile::tempdir().unwrap();
        probe_lock(&dir.path().join("missing")).unwrap();
        let spool = Spool::open(cfg(dir.path(), 1 << 20)).unwrap();
        let err = probe_lock(dir.path()).unwrap_err();
        assert!(matches!(err, SpoolError::Locked { .. }), "{err}");
        drop(spool);
        probe_lock(dir.path()).unwrap();
        // The probe released it.
        Spool::open(cfg(dir.path(), 1 << 20)).unwrap();
    }

    #[test]
    fn a_directory_held_by_an_open_spool_is_refused_until_it_closes() {
        let dir = tempfile::tempdir().unwrap();
        let mut first = Spool::open(cfg(dir.path(), 1 << 20)).unwrap();
        first.append(b"a").unwrap();
        let err = Spool::open(cfg(dir.path(), 1 << 20)).unwrap_err();
        assert!(matches!(err, SpoolError::Locked { .. }), "{err}");
        assert!(err.to_string().contains("[spool] dir"), "{err}");
        drop(first);
        let mut again = Spool::open(cfg(dir.path(), 1 << 20)).unwrap();
        assert_eq!(again.peek().unwrap().as_deref(), Some(&b"a"[..]));
    }

    #[test]
    fn reopen_keeps_pending_and_forgets_acked() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(cfg(dir.path(), 800)).unwrap();
        for id in 0..13 {
            spool.append(&payload(id, 10)).unwrap();
        }
        for _ in 0..7 {
            spool.ack().unwrap();
        }
        drop(spool);

        let mut spool = Spool::open(cfg(dir.path(), 800)).unwrap();
        assert_eq!(spool.len(), 6);
        assert_eq!(spool.stats().truncated_tail, 0);
        spool.append(&payload(13, 10)).unwrap();
        let expected: Vec<_> = (7..14).map(|id| payload(id, 10)).collect();
        assert_eq!(drain(&mut spool), expected);
        drop(spool);

        let mut spool = Spool::open(cfg(dir.path(), 800)).unwrap();
        assert_eq!(spool.peek().unwrap(), None);
        // New segments keep growing past the consumed ones.
        spool.append(&payload(14, 10)).unwrap();
        drop(spool);
        let mut spool = Spool::open(cfg(dir.path(), 800)).unwrap();
        assert_eq!(drain(&mut spool), vec![payload(14, 10)]);
    }

    #[test]
    fn unacked_peek_is_redelivered_after_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(cfg(dir.path(), 800)).unwrap();
        spool.append(b"first-alert").unwrap();
        spool.append(b"second-alert").unwrap();
        assert_eq!(spool.peek().unwrap().as_deref(), Some(&b"first-alert"[..]));
        drop(spool); // crashed while publishing: never acked
        let mut spool = Spool::open(cfg(dir.path(), 800)).unwrap();
        assert_eq!(spool.peek().unwrap().as_deref(), Some(&b"first-alert"[..]));
    }

    fn last_segment(dir: &Path) -> PathBuf {
        segment_path(dir, *segment_files(dir).last().unwrap())
    }

    #[test]
    fn torn_tail_is_truncated_and_earlier_records_survive() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(cfg(dir.path(), 800)).unwrap();
        for id in 0..8 {
            spool.append(&payload(id, 10)).unwrap();
        }
        drop(spool);
        // Cut the last record short, as a crash mid-append would.
        let path = last_segment(dir.path());
        let len = fs::metadata(&path).unwrap().len();
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len - 3)
            .unwrap();

        let mut spool = Spool::open(cfg(dir.path(), 800)).unwrap();
        assert_eq!(spool.stats().truncated_tail, 1);
        // The torn append never returned: no spooled alert was lost.
        assert_eq!(spool.stats().dropped_corrupt, 0);
        assert_eq!(spool.len(), 7);
        assert_eq!(fs::metadata(&path).unwrap().len(), len - 18);
        // Appends continue on a record boundary.
        spool.append(&payload(8, 10)).unwrap();
        let expected: Vec<_> = (0..7).chain([8]).map(|id| payload(id, 10)).collect();
        assert_eq!(drain(&mut spool), expected);
    }

    #[test]
    fn corrupt_last_record_is_truncated() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(cfg(dir.path(), 800)).unwrap();
        for id in 0..8 {
            spool.append(&payload(id, 10)).unwrap();
        }
        drop(spool);
        let path = last_segment(dir.path());
        let mut data = fs::read(&path).unwrap();
        let n = data.len();
        data[n - 2] ^= 0x40;
        fs::write(&path, &data).unwrap();

        let mut spool = Spool::open(cfg(dir.path(), 800)).unwrap();
        assert_eq!(spool.stats().truncated_tail, 1);
        // A whole record that fails its CRC is damage, not a crash mid-append: counted.
        assert_eq!(spool.stats().dropped_corrupt, 1);
        let expected: Vec<_> = (0..7).map(|id| payload(id, 10)).collect();
        assert_eq!(drain(&mut spool), expected);
        drop(spool);
        // Recovery is done once: the next open finds nothing to cut.
        let spool = Spool::open(cfg(dir.path(), 800)).unwrap();
        assert_eq!(spool.stats().truncated_tail, 0);
    }

    /// Overwrites `bytes` at `offset` of segment `seq`.
    fn overwrite(dir: &Path, seq: u64, offset: usize, bytes: &[u8]) {
        let path = segment_path(dir, seq);
        let mut data = fs::read(&path).unwrap();
        data[offset..offset + bytes.len()].copy_from_slice(bytes);
        fs::write(&path, &data).unwrap();
    }

    /// The trial's case: two alerts spooled while the broker was down, four bytes of the
    /// first one's payload overwritten, a restart. Both were lost, uncounted.
    #[test]
    fn a_corrupt_first_record_loses_only_itself_and_is_counted() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(cfg(dir.path(), 1 << 20)).unwrap();
        spool.append(&payload(0, 40)).unwrap();
        spool.append(&payload(1, 40)).unwrap();
        drop(spool);
        overwrite(dir.path(), 1, 8 + 20, b"XXXX");

        let mut spool = Spool::open(cfg(dir.path(), 1 << 20)).unwrap();
        let stats = spool.stats();
        assert_eq!((stats.resynced, stats.dropped_corrupt), (1, 1));
        assert_eq!(stats.truncated_tail, 0);
        assert_eq!(spool.len(), 1);
        assert_eq!(spool.bytes(), 48);
        assert_eq!(fs::metadata(segment_path(dir.path(), 1)).unwrap().len(), 48);
        spool.append(&payload(2, 40)).unwrap();
        drop(spool);
        // Repaired once: the next open finds nothing wrong and keeps both.
        let mut spool = Spool::open(cfg(dir.path(), 1 << 20)).unwrap();
        let stats = spool.stats();
        assert_eq!((stats.resynced, stats.dropped_corrupt), (0, 0));
        assert_eq!(drain(&mut spool), vec![payload(1, 40), payload(2, 40)]);
        assert!(!dir.path().join(SEGMENT_TMP_FILE).exists());
    }

    #[test]
    fn corrupt_middle_record_is_skipped_and_the_rest_of_its_segment_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(cfg(dir.path(), 800)).unwrap();
        for id in 0..12 {
            spool.append(&payload(id, 10)).unwrap();
        }
        drop(spool);
        // Segment 1 holds ids 0..5; damage id 2's payload and id 3's length (so lengths
        // cannot lead past it: the scan searches for the next intact header).
        let path = segment_path(dir.path(), 1);
        let mut data = fs::read(&path).unwrap();
        data[2 * 18 + 9] ^= 1;
        data[3 * 18 + 1] ^= 0x80;
        fs::write(&path, &data).unwrap();

        let mut spool = Spool::open(cfg(dir.path(), 800)).unwrap();
        let stats = spool.stats();
        assert_eq!(stats.truncated_tail, 0);
        assert_eq!(stats.resynced, 1);
        // One run of 36 bytes: its first length leads to the second record, whose own
        // length is garbage, so both are counted.
        assert_eq!(stats.dropped_corrupt, 2);
        let expected: Vec<_> = [0, 1]
            .into_iter()
            .chain(4..12)
            .map(|id| payload(id, 10))
            .collect();
        assert_eq!(drain(&mut spool), expected);
    }

    #[test]
    fn corrupt_records_already_acknowledged_are_not_counted_and_the_cursor_follows() {
        let dir = tempfile::tempdir().unwrap();
        // Segments of 200 bytes: 11 records of 18 bytes each.
        let mut spool = Spool::open(cfg(dir.path(), 1600)).unwrap();
        for id in 0..8 {
            spool.append(&payload(id, 10)).unwrap();
        }
        for _ in 0..3 {
            spool.ack().unwrap();
        }
        drop(spool);
        overwrite(dir.path(), 1, 18 + 12, b"XXXX"); // id 1: acknowledged
        overwrite(dir.path(), 1, 5 * 18 + 12, b"XXXX"); // id 5: pending

        let spool = Spool::open(cfg(dir.path(), 1600)).unwrap();
        let stats = spool.stats();
        assert_eq!((stats.resynced, stats.dropped_corrupt), (2, 1));
        assert_eq!(spool.len(), 4);
        drop(spool);
        // The cursor was moved with its record: a restart neither repeats nor skips one.
        let mut spool = Spool::open(cfg(dir.path(), 1600)).unwrap();
        assert_eq!(spool.len(), 4);
        let expected: Vec<_> = [3, 4, 6, 7].map(|id| payload(id, 10)).into();
        assert_eq!(drain(&mut spool), expected);
    }

    #[test]
    fn a_zeroed_block_inside_a_segment_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(cfg(dir.path(), 1 << 16)).unwrap();
        for id in 0..40 {
            spool.append(&payload(id, 30)).unwrap();
        }
        drop(spool);
        // Records of 38 bytes: bytes 100..300 hold the end of id 2, ids 3..=6 and most of
        // id 7.
        overwrite(dir.path(), 1, 100, &[0; 200]);
        let mut spool = Spool::open(cfg(dir.path(), 1 << 16)).unwrap();
        let stats = spool.stats();
        assert_eq!(stats.resynced, 1);
        // Id 2's intact length leads to the zeros, which hide the rest: two counted, a
        // lower bound (zeroed length fields do not chain on as empty records).
        assert_eq!(stats.dropped_corrupt, 2);
        let expected: Vec<_> = (0..2).chain(8..40).map(|id| payload(id, 30)).collect();
        assert_eq!(drain(&mut spool), expected);
    }

    #[test]
    fn appends_after_a_torn_acked_tail_are_not_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(cfg(dir.path(), 800)).unwrap();
        for id in 0..3 {
            spool.append(&payload(id, 10)).unwrap();
        }
        // All three acknowledged with the cursor at the segment's end: what an ack that
        // cannot compact writes (an emptying ack otherwise deletes the segment).
        spool.ack().unwrap();
        spool.ack().unwrap();
        write_cursor(dir.path(), 1, 3 * 18, false).unwrap();
        drop(spool);
        // The acked newest record is torn (fsync off, power lost): the cursor now points
        // past the recovered end of the segment.
        let path = last_segment(dir.path());
        let len = fs::metadata(&path).unwrap().len();
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len - 4)
            .unwrap();
        let mut spool = Spool::open(cfg(dir.path(), 800)).unwrap();
        assert_eq!(spool.len(), 0);
        spool.append(&payload(3, 10)).unwrap();
        drop(spool);
        let mut spool = Spool::open(cfg(dir.path(), 800)).unwrap();
        assert_eq!(drain(&mut spool), vec![payload(3, 10)]);
    }

    #[test]
    fn corrupt_cursor_replays_from_the_oldest_segment() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(cfg(dir.path(), 800)).unwrap();
        for id in 0..3 {
            spool.append(&payload(id, 10)).unwrap();
        }
        spool.ack().unwrap();
        drop(spool);
        fs::write(dir.path().join(CURSOR_FILE), b"garbage").unwrap();
        let mut spool = Spool::open(cfg(dir.path(), 800)).unwrap();
        assert_eq!(spool.len(), 3);
        assert_eq!(spool.peek().unwrap(), Some(payload(0, 10)));
    }

    #[test]
    fn drops_oldest_when_full() {
        let dir = tempfile::tempdir().unwrap();
        let max_bytes = 800;
        let mut spool = Spool::open(cfg(dir.path(), max_bytes)).unwrap();
        let n = 100u64; // 1800 bytes of records
        for id in 0..n {
            spool.append(&payload(id, 10)).unwrap();
            assert!(
                spool.bytes() <= max_bytes,
                "{} > {max_bytes}",
                spool.bytes()
            );
        }
        let stats = spool.stats();
        assert!(stats.dropped_oldest > 0);
        assert_eq!(stats.appended, n);
        assert_eq!(stats.dropped_oldest + stats.pending, n);
        // What is left is the newest records, in order, with no gap.
        let got = drain(&mut spool);
        let first = n - got.len() as u64;
        let expected: Vec<_> = (first..n).map(|id| payload(id, 10)).collect();
        assert_eq!(got, expected);
        assert_eq!(first, stats.dropped_oldest);
    }

    #[test]
    fn shrinking_max_bytes_drops_at_open() {
        let dir = tempfile::tempdir().unwrap();
        // Segments of 1000 bytes: 55, 55 and 10 records.
        let mut spool = Spool::open(cfg(dir.path(), 8000)).unwrap();
        for id in 0..120 {
            spool.append(&payload(id, 10)).unwrap();
        }
        drop(spool);
        let mut spool = Spool::open(cfg(dir.path(), 2000)).unwrap();
        assert!(spool.bytes() <= 2000);
        assert_eq!(spool.stats().dropped_oldest, 55);
        assert_eq!(spool.len(), 65);
        assert_eq!(spool.peek().unwrap(), Some(payload(55, 10)));
        drop(spool);
        // Smaller than the newest segment alone: everything goes, nothing breaks.
        let mut spool = Spool::open(cfg(dir.path(), 100)).unwrap();
        assert_eq!(spool.stats().dropped_oldest, 65);
        assert_eq!(spool.peek().unwrap(), None);
        spool.append(b"last").unwrap();
        assert_eq!(spool.peek().unwrap().as_deref(), Some(&b"last"[..]));
    }

    #[test]
    fn oversized_payload_is_rejected_with_both_sizes() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(cfg(dir.path(), 800)).unwrap();
        spool.append(&[7u8; 92]).unwrap(); // 100 bytes framed: exactly one segment
        let err = spool.append(&[7u8; 93]).unwrap_err();
        assert!(matches!(
            err,
            SpoolError::TooLarge {
                payload_bytes: 93,
                segment_limit_bytes: 100
            }
        ));
        let msg = err.to_string();
        assert!(msg.contains("93") && msg.contains("100"), "{msg}");
        assert_eq!(spool.len(), 1);
        assert_eq!(spool.stats().dropped_oldest, 0);
    }

    #[test]
    fn config_defaults_validation_and_unknown_keys() {
        let d = SpoolConfig::default();
        assert_eq!(d.dir, PathBuf::from("/var/lib/darkwatch/spool"));
        assert_eq!(d.max_bytes, 64 << 20);
        assert!(d.fsync);
        let parsed: SpoolConfig = serde_json::from_str(r#"{"max_bytes": 4096}"#).unwrap();
        assert_eq!(parsed.max_bytes, 4096);
        assert!(parsed.fsync);
        assert!(serde_json::from_str::<SpoolConfig>(r#"{"max_byte": 1}"#).is_err());

        let dir = tempfile::tempdir().unwrap();
        let err = Spool::open(cfg(dir.path(), 10)).unwrap_err();
        assert!(
            matches!(
                err,
                SpoolError::Config {
                    key: "max_bytes",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn fsync_on_works_end_to_end() {
        let dir = tempfile::tempdir().unwrap();
        let c = SpoolConfig {
            fsync: true,
            ..cfg(dir.path(), 800)
        };
        let mut spool = Spool::open(c.clone()).unwrap();
        for id in 0..12 {
            spool.append(&payload(id, 10)).unwrap();
        }
        for _ in 0..6 {
            spool.ack().unwrap();
        }
        drop(spool);
        let mut spool = Spool::open(c).unwrap();
        let expected: Vec<_> = (6..12).map(|id| payload(id, 10)).collect();
        assert_eq!(drain(&mut spool), expected);
        assert!(!dir.path().join(CURSOR_TMP_FILE).exists());
    }

    /// Whatever a segment's bytes become (bits flipped, a block overwritten with noise or
    /// zeros, bytes inserted, a cut, pure noise), opening never panics, reads back only
    /// records that were written, in order, and keeps every pending record the damage
    /// did not touch.
    #[test]
    fn any_damage_opens_without_panic_and_keeps_untouched_records() {
        for seed in 0..300u64 {
            let ctx = format!("seed {seed}");
            let dir = tempfile::tempdir().unwrap();
            let mut rng = Rng::new(seed);
            let c = cfg(dir.path(), 1 << 16);
            let mut spool = Spool::open(c.clone()).unwrap();
            let n = rng.below(30);
            let written: Vec<Vec<u8>> = (0..n)
                .map(|id| payload(id as u64, 8 + rng.below(60)))
                .collect();
            let mut spans = Vec::new();
            for p in &written {
                let start = spool.bytes() as usize;
                spool.append(p).unwrap();
                spans.push(start..spool.bytes() as usize);
            }
            // At least one left pending: an ack that empties the spool deletes segment 1.
            let acked = rng.below(n + 1).min(n.saturating_sub(1));
            for _ in 0..acked {
                spool.ack().unwrap();
            }
            drop(spool);
            let path = segment_path(dir.path(), 1);
            let mut data = fs::read(&path).unwrap();
            let noise = |rng: &mut Rng, len: usize| -> Vec<u8> {
                (0..len).map(|_| rng.next_u64() as u8).collect()
            };
            let len = data.len();
            // Which original bytes the damage touched; an insertion touches the record it
            // splits.
            let mut touched = vec![false; len];
            match rng.below(6) {
                0 => {
                    for _ in 0..1 + rng.below(4) {
                        if len > 0 {
                            let at = rng.below(len);
                            data[at] ^= 1 << rng.below(8);
                            touched[at] = true;
                        }
                    }
                }
                1 | 2 => {
                    let at = rng.below(len + 1);
                    let block = rng.below(len - at + 1).min(200);
                    let fill = if rng.below(2) == 0 {
                        noise(&mut rng, block)
                    } else {
                        vec![0; block]
                    };
                    data[at..at + block].copy_from_slice(&fill);
                    touched[at..at + block].fill(true);
                }
                3 => {
                    let at = rng.below(len + 1);
                    let n = 1 + rng.below(40);
                    let extra = noise(&mut rng, n);
                    data.splice(at..at, extra);
                    for span in spans.iter().filter(|s| s.start < at && at < s.end) {
                        touched[span.clone()].fill(true);
                    }
                }
                4 => {
                    let cut = rng.below(len + 1);
                    data.truncate(cut);
                    touched[cut..].fill(true);
                }
                _ => {
                    let n = rng.below(3000);
                    data = noise(&mut rng, n);
                    touched.fill(true);
                }
            }
            fs::write(&path, &data).unwrap();
            let mut spool = Spool::open(c.clone()).unwrap();
            let got = drain(&mut spool);
            let mut rest = written.iter();
            for p in &got {
                assert!(rest.any(|w| w == p), "{ctx}: unknown or reordered record");
            }
            for (i, (p, span)) in written.iter().zip(&spans).enumerate().skip(acked) {
                if !touched[span.clone()].contains(&true) {
                    assert!(got.contains(p), "{ctx}: untouched record {i} lost");
                }
            }
            drop(spool);
            let spool = Spool::open(c).unwrap();
            let stats = spool.stats();
            assert_eq!(
                stats.resynced + stats.truncated_tail,
                0,
                "{ctx}: repaired twice"
            );
        }
    }

    /// Random append / peek / ack / reopen / torn-tail sequences, with `max_bytes` changing
    /// between runs, against an in-memory FIFO.
    #[test]
    fn random_operations_match_a_fifo_model() {
        const SIZES: [u64; 4] = [400, 700, 1000, 1600];
        for seed in 0..16u64 {
            let dir = tempfile::tempdir().unwrap();
            let mut rng = Rng::new(seed);
            let mut c = cfg(dir.path(), SIZES[rng.below(SIZES.len())]);
            let mut spool = Spool::open(c.clone()).unwrap();
            let mut model: VecDeque<Vec<u8>> = VecDeque::new();
            let mut next_id = 0u64;
            for step in 0..800 {
                let ctx = format!("seed {seed} step {step}");
                match rng.below(100) {
                    0..=44 => {
                        let limit = c.segment_limit_bytes() as usize;
                        let len = 8 + rng.below(limit - 2 * RECORD_HEADER_BYTES as usize + 1);
                        let p = payload(next_id, len);
                        next_id += 1;
                        let before = spool.stats().dropped_oldest;
                        spool.append(&p).unwrap();
                        let dropped = spool.stats().dropped_oldest - before;
                        assert!(dropped as usize <= model.len(), "{ctx}");
                        model.drain(..dropped as usize);
                        model.push_back(p);
                    }
                    45..=84 => {
                        assert_eq!(spool.peek().unwrap().as_ref(), model.front(), "{ctx}");
                        spool.ack().unwrap();
                        model.pop_front();
                    }
                    85..=91 => {
                        assert_eq!(spool.peek().unwrap().as_ref(), model.front(), "{ctx}");
                    }
                    92..=94 => {
                        // Restart, sometimes with another bound.
                        drop(spool);
                        c.max_bytes = SIZES[rng.below(SIZES.len())];
                        spool = Spool::open(c.clone()).unwrap();
                        let stats = spool.stats();
                        assert_eq!(stats.truncated_tail, 0, "{ctx}");
                        model.drain(..stats.dropped_oldest as usize);
                    }
                    95..=96 => {
                        // Disk damage: a bit of one record's payload flips. A pending
                        // record is then lost (and counted); an acknowledged one still in
                        // the oldest segment is not missed.
                        drop(spool);
                        let segs = segment_files(dir.path());
                        let path = segment_path(dir.path(), segs[rng.below(segs.len())]);
                        let mut data = fs::read(&path).unwrap();
                        let scan = scan_records(&data);
                        assert!(scan.skipped.is_empty() && scan.tail.is_none(), "{ctx}");
                        let mut hit = None;
                        if !scan.records.is_empty() {
                            let (start, end) = scan.records[rng.below(scan.records.len())];
                            let (body, end) = (start as usize + 8, end as usize);
                            hit = Some(model.iter().position(|p| p[..] == data[body..end]));
                            data[body + rng.below(end - body)] ^= 1 << rng.below(8);
                            fs::write(&path, &data).unwrap();
                        }
                        spool = Spool::open(c.clone()).unwrap();
                        let stats = spool.stats();
                        let damaged = u64::from(hit.is_some());
                        assert_eq!(stats.resynced + stats.truncated_tail, damaged, "{ctx}");
                        let lost = hit.flatten().and_then(|i| model.remove(i));
                        assert_eq!(stats.dropped_corrupt, u64::from(lost.is_some()), "{ctx}");
                        model.drain(..stats.dropped_oldest as usize);
                    }
                    _ => {
                        // Crash mid-append: the newest record loses its last bytes.
                        drop(spool);
                        let path =
                            segment_path(dir.path(), *segment_files(dir.path()).last().unwrap());
                        let len = fs::metadata(&path).unwrap().len();
                        let torn = len > 0;
                        if torn {
                            let cut = 1 + rng.below(RECORD_HEADER_BYTES as usize) as u64;
                            let file = File::options().write(true).open(&path).unwrap();
                            file.set_len(len - cut).unwrap();
                            // The newest record on disk is the newest pending one, if any
                            // is pending; otherwise it was already acknowledged.
                            model.pop_back();
                        }
                        spool = Spool::open(c.clone()).unwrap();
                        let stats = spool.stats();
                        assert_eq!(stats.truncated_tail, u64::from(torn), "{ctx}");
                        assert_eq!(stats.dropped_corrupt, 0, "{ctx}");
                        model.drain(..stats.dropped_oldest as usize);
                    }
                }
                assert_eq!(spool.len(), model.len() as u64, "{ctx}");
                assert!(spool.bytes() <= c.max_bytes, "{ctx}");
                let on_disk: u64 = segment_files(dir.path())
                    .iter()
                    .map(|&s| fs::metadata(segment_path(dir.path(), s)).unwrap().len())
                    .sum();
                assert_eq!(on_disk, spool.bytes(), "{ctx}");
            }
            drop(spool);
            let mut spool = Spool::open(c).unwrap();
            assert_eq!(drain(&mut spool), Vec::from(model), "seed {seed}");
        }
    }
}
