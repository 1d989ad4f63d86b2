//! The Raft storage of one view-leader group member: its log, hard state, conf state and latest
//! snapshot, which [`raft::RawNode`] reads through [`raft::Storage`]. It lives in memory and,
//! when the member has a data directory (`--data-dir DIR`), on disk as well.
//!
//! [`GroupStorage`] owns that state and nothing else: it never runs Raft and never applies
//! entries. Every call that changes it is durable (written and fsynced) before it returns, so
//! the caller may send the messages a `Ready` holds back until persistence as soon as the call
//! returns. Without a directory the same calls only change memory.
//!
//! # Durable format (version [`FORMAT_VERSION`])
//!
//! The directory holds two files (and, briefly, `NAME.tmp` while one is being replaced):
//!
//! - `meta`: the magic `trvlmeta`, the format version (u32 LE), then one frame holding this
//!   member's incarnation (u64 LE), a count (u32 LE) and that many pairs of a peer's place in
//!   `--peers` (u32 LE) and the incarnation seen from it (u64 LE).
//! - `log`: the magic `trvl-log`, then frames appended in order. A frame is the payload's length
//!   (u32 LE), the same length bit-inverted (u32 LE), the first 8 bytes of the payload's
//!   SHA-256, then the payload: a kind byte and its body. Kinds: 1 a snapshot (protobuf
//!   `Snapshot`, with its data), 2 a conf state (protobuf `ConfState`), 3 a hard state (protobuf
//!   `HardState`), 4 entries (each a u32 LE length and a protobuf `Entry`).
//!
//! Replaying `log` in order rebuilds the state: a snapshot replaces the log and sets the conf
//! state; entries whose first index is at most the last index truncate the log there first (as
//! Raft requires), and must otherwise continue it; the last conf state and hard state win. The
//! log keeps the hard state too, so one `Ready` costs one fsync per call and no rename.
//!
//! A whole-file replacement writes `NAME.tmp`, fsyncs it, renames it over `NAME` and fsyncs the
//! directory. `meta` is replaced when an incarnation is remembered. `log` is replaced by
//! [`GroupStorage::compact`] and [`GroupStorage::apply_snapshot`] (snapshot, conf state, hard
//! state, remaining entries: one atomic step, so no crash leaves a snapshot beside a log it
//! does not continue), and by an append that finds the file more than twice as large as it was
//! when last written whole (plus 64 KiB), so records that later ones supersede (hard states,
//! truncated entries) never grow it without bound.
//!
//! # Recovery
//!
//! - No `meta`: the state is fresh (a new or empty directory, or a first start that crashed
//!   before writing `meta`, which is written last). A directory that holds anything but this
//!   format's files and no `meta` is refused ([`StorageError::Foreign`]), never overwritten.
//! - A `meta` of another format version is refused ([`StorageError::Version`]).
//! - In `log`, a torn last frame (the file ends inside it, or its checksum fails and only zero
//!   bytes follow it) is dropped with a warning and cut off the file: it was never
//!   acknowledged. A bad frame with data after it is [`StorageError::Corrupt`], and so is a
//!   frame whose length check fails unless only zeros follow it: losing an acknowledged vote or
//!   entry would break Raft's safety, so the member refuses to start instead.
//!
//! # Calling contract (the `Ready` loop)
//!
//! For each `Ready`: if its snapshot is not empty, restore the state machine from the
//! snapshot's data and call [`GroupStorage::apply_snapshot`]; then [`GroupStorage::append`] its
//! entries, then [`GroupStorage::set_hard_state`] its hard state, in that order (the hard
//! state's commit index may name the entries just appended, and is refused past the last
//! index); after `advance`, [`GroupStorage::set_commit`] the `LightReady`'s commit index. Call
//! [`GroupStorage::compact`] with an index the state machine has applied and its image at that
//! index. A member restarted on a directory rebuilds its state machine from
//! [`GroupStorage::latest_snapshot`], then Raft hands it the committed entries after it again.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use log::warn;
use protobuf::Message as _;
use raft::prelude::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, Storage};
use sha2::{Digest, Sha256};
use thiserror::Error;

/// The version of the durable format that this code reads and writes.
pub const FORMAT_VERSION: u32 = 1;

/// The first bytes of `meta`.
const META_MAGIC: [u8; 8] = *b"trvlmeta";
/// The first bytes of `log`.
const LOG_MAGIC: [u8; 8] = *b"trvl-log";
/// The name of the file holding the format version and the incarnations.
const META_FILE: &str = "meta";
/// The name of the file holding the Raft state.
const LOG_FILE: &str = "log";
/// The name of `meta` while it is being replaced.
const META_TMP: &str = "meta.tmp";
/// The name of `log` while it is being replaced.
const LOG_TMP: &str = "log.tmp";
/// Bytes of a frame before its payload: the length, the inverted length and the checksum.
const FRAME_HEADER: usize = 16;
/// How far the log may grow past twice its size when last written whole before it is
/// written whole again.
const REWRITE_SLACK: u64 = 64 * 1024;

/// Record kind: a snapshot (protobuf `Snapshot`).
const KIND_SNAPSHOT: u8 = 1;
/// Record kind: a conf state (protobuf `ConfState`).
const KIND_CONF: u8 = 2;
/// Record kind: a hard state (protobuf `HardState`).
const KIND_HARD: u8 = 3;
/// Record kind: consecutive entries (each a u32 LE length and a protobuf `Entry`).
const KIND_ENTRIES: u8 = 4;

/// Why the storage could not be opened or could not take a change.
#[derive(Debug, Error)]
pub enum StorageError {
    /// Reading or writing a file of the data directory failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: io::Error,
    },
    /// A file of the data directory does not hold what this format writes.
    #[error("{path} is corrupt: {message}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong, and where.
        message: String,
    },
    /// The data directory was written in another format version.
    #[error("{path} has format version {found}; this program reads version {expected}")]
    Version {
        /// The `meta` file.
        path: PathBuf,
        /// The version it names.
        found: u32,
        /// [`FORMAT_VERSION`].
        expected: u32,
    },
    /// The directory has no `meta` but holds other files: it is not a group member's.
    #[error("{dir} is not empty and is not a view-leader data directory (it holds {name})")]
    Foreign {
        /// The directory.
        dir: PathBuf,
        /// One of the files that do not belong.
        name: String,
    },
    /// Entries that do not continue the log (a gap, a compacted index, or not consecutive).
    #[error(
        "entries from {first} to {last} do not continue the log (first index {first_index}, \
         last index {last_index})"
    )]
    Discontinuous {
        /// The first entry's index.
        first: u64,
        /// The last entry's index.
        last: u64,
        /// The log's first index.
        first_index: u64,
        /// The log's last index.
        last_index: u64,
    },
    /// A snapshot no newer than the one held already.
    #[error("a snapshot at index {index} is out of date (the log starts at {first_index})")]
    SnapshotOutOfDate {
        /// The snapshot's index.
        index: u64,
        /// The log's first index.
        first_index: u64,
    },
    /// A compaction past the end of the log.
    #[error("cannot compact to index {applied}: the last index is {last_index}")]
    CompactBeyondLog {
        /// The index asked for.
        applied: u64,
        /// The log's last index.
        last_index: u64,
    },
    /// A hard state whose commit index is past the end of the log.
    #[error("commit index {commit} is past the last index {last_index}")]
    CommitBeyondLog {
        /// The commit index asked for.
        commit: u64,
        /// The log's last index.
        last_index: u64,
    },
    /// A protobuf message could not be encoded.
    #[error("cannot encode {what}: {source}")]
    Encode {
        /// Which message.
        what: &'static str,
        /// What the encoder said.
        #[source]
        source: protobuf::ProtobufError,
    },
    /// A record larger than a frame can hold (4 GiB).
    #[error("a record of {bytes} bytes does not fit in a frame")]
    TooLarge {
        /// The record's size.
        bytes: usize,
    },
    /// An earlier write failed, so the files may not match memory: the member must stop and
    /// recover from the directory when it starts again.
    #[error("an earlier write to {dir} failed; restart the member")]
    Poisoned {
        /// The data directory.
        dir: PathBuf,
    },
}

/// What [`GroupStorage::open`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Recovered {
    /// No Raft state existed (memory only, a new directory or an empty one): the member starts
    /// from the initial voters and an empty log.
    pub fresh: bool,
    /// This member's incarnation: the one given to `open` when fresh, the stored one otherwise.
    pub incarnation: u64,
}

/// The Raft state that raft reads and that replaying the log rebuilds.
#[derive(Clone, Debug, Default)]
struct State {
    /// The latest hard state (term, vote, commit index).
    hard_state: HardState,
    /// The configuration (voters) now.
    conf_state: ConfState,
    /// The latest snapshot, with its data; index 0 means none yet.
    snapshot: Snapshot,
    /// The entries after the snapshot: `entries[i]` has index `snapshot index + 1 + i`.
    entries: Vec<Entry>,
}

impl State {
    /// The index the latest snapshot covers (0 before any).
    fn snapshot_index(&self) -> u64 {
        self.snapshot.get_metadata().index
    }

    /// The index of the first entry held (or that the next entry will have).
    fn first_index(&self) -> u64 {
        self.snapshot_index() + 1
    }

    /// The index of the last entry held, or the snapshot's index when none is.
    fn last_index(&self) -> u64 {
        self.snapshot_index() + self.entries.len() as u64
    }

    /// The term of the entry at `idx`, which may be the snapshot's index; raft's `Compacted`
    /// below it and `Unavailable` past the last index.
    fn term(&self, idx: u64) -> raft::Result<u64> {
        let meta = self.snapshot.get_metadata();
        if idx == meta.index {
            return Ok(meta.term);
        }
        if idx < self.first_index() {
            return Err(raft::Error::Store(raft::StorageError::Compacted));
        }
        if idx > self.last_index() {
            return Err(raft::Error::Store(raft::StorageError::Unavailable));
        }
        Ok(self.entries[(idx - self.first_index()) as usize].term)
    }

    /// Checks that `entries` (not empty) are consecutive and start within
    /// `first_index..=last_index + 1`, so [`State::append`] may take them.
    fn check_append(&self, entries: &[Entry]) -> Result<(), StorageError> {
        let (Some(first), Some(last)) = (entries.first(), entries.last()) else {
            return Ok(());
        };
        let consecutive = entries
            .windows(2)
            .all(|w| w[0].index.checked_add(1) == Some(w[1].index));
        if !consecutive || first.index < self.first_index() || first.index > self.last_index() + 1 {
            return Err(StorageError::Discontinuous {
                first: first.index,
                last: last.index,
                first_index: self.first_index(),
                last_index: self.last_index(),
            });
        }
        Ok(())
    }

    /// Appends `entries` (checked by [`State::check_append`]), dropping first every entry
    /// from the first one's index on.
    fn append(&mut self, entries: &[Entry]) {
        let Some(first) = entries.first() else {
            return;
        };
        debug_assert!(self.check_append(entries).is_ok());
        let keep = (first.index - self.first_index()) as usize;
        self.entries.truncate(keep);
        self.entries.extend_from_slice(entries);
    }

    /// The state after installing `snapshot` (newer than the one held): no entries, the
    /// snapshot's conf state, committed up to it, and a term no lower than its term.
    fn installed(&self, snapshot: Snapshot) -> State {
        let meta = snapshot.get_metadata();
        let mut hard_state = self.hard_state.clone();
        hard_state.term = hard_state.term.max(meta.term);
        hard_state.commit = meta.index;
        State {
            hard_state,
            conf_state: meta.get_conf_state().clone(),
            snapshot,
            entries: Vec::new(),
        }
    }

    /// Applies one record read back from the log.
    fn replay(&mut self, record: Decoded) -> Result<(), StorageError> {
        match record {
            Decoded::Snapshot(snapshot) => {
                self.conf_state = snapshot.get_metadata().get_conf_state().clone();
                self.snapshot = snapshot;
                self.entries.clear();
            }
            Decoded::Conf(conf) => self.conf_state = conf,
            Decoded::Hard(hard) => self.hard_state = hard,
            Decoded::Entries(entries) => {
                self.check_append(&entries)?;
                self.append(&entries);
            }
        }
        Ok(())
    }

    /// The log file that rebuilds this state: the magic, then the snapshot (if any), the conf
    /// state, the hard state and the entries (if any), one frame each.
    fn image(&self) -> Result<Vec<u8>, StorageError> {
        let mut out = LOG_MAGIC.to_vec();
        if !self.snapshot.is_empty() {
            push_frame(&mut out, &Record::Snapshot(&self.snapshot).encode()?)?;
        }
        push_frame(&mut out, &Record::Conf(&self.conf_state).encode()?)?;
        push_frame(&mut out, &Record::Hard(&self.hard_state).encode()?)?;
        if !self.entries.is_empty() {
            push_frame(&mut out, &Record::Entries(&self.entries).encode()?)?;
        }
        Ok(out)
    }
}

/// A record to append to the log, borrowing what it holds.
enum Record<'a> {
    /// A snapshot with its data.
    Snapshot(&'a Snapshot),
    /// The conf state.
    Conf(&'a ConfState),
    /// The hard state.
    Hard(&'a HardState),
    /// Consecutive entries.
    Entries(&'a [Entry]),
}

/// A record read back from the log.
enum Decoded {
    /// A snapshot with its data.
    Snapshot(Snapshot),
    /// The conf state.
    Conf(ConfState),
    /// The hard state.
    Hard(HardState),
    /// Consecutive entries.
    Entries(Vec<Entry>),
}

impl Record<'_> {
    /// The payload of this record's frame: its kind byte, then its protobuf body.
    fn encode(&self) -> Result<Vec<u8>, StorageError> {
        /// Encodes one protobuf message, naming it in the error.
        fn pb(what: &'static str, m: &impl protobuf::Message) -> Result<Vec<u8>, StorageError> {
            m.write_to_bytes()
                .map_err(|source| StorageError::Encode { what, source })
        }
        let (kind, body) = match self {
            Record::Snapshot(s) => (KIND_SNAPSHOT, pb("snapshot", *s)?),
            Record::Conf(c) => (KIND_CONF, pb("conf state", *c)?),
            Record::Hard(h) => (KIND_HARD, pb("hard state", *h)?),
            Record::Entries(entries) => {
                let mut body = Vec::new();
                for e in entries.iter() {
                    let bytes = pb("entry", e)?;
                    body.extend_from_slice(&frame_len(bytes.len())?.to_le_bytes());
                    body.extend_from_slice(&bytes);
                }
                (KIND_ENTRIES, body)
            }
        };
        let mut payload = Vec::with_capacity(1 + body.len());
        payload.push(kind);
        payload.extend_from_slice(&body);
        Ok(payload)
    }
}

impl Decoded {
    /// Decodes a frame's payload; the error says what is malformed.
    fn decode(payload: &[u8]) -> Result<Decoded, String> {
        let (&kind, body) = payload.split_first().ok_or("an empty record")?;
        let bad = |what: &str, e: protobuf::ProtobufError| format!("a bad {what}: {e}");
        match kind {
            KIND_SNAPSHOT => Snapshot::parse_from_bytes(body)
                .map(Decoded::Snapshot)
                .map_err(|e| bad("snapshot", e)),
            KIND_CONF => ConfState::parse_from_bytes(body)
                .map(Decoded::Conf)
                .map_err(|e| bad("conf state", e)),
            KIND_HARD => HardState::parse_from_bytes(body)
                .map(Decoded::Hard)
                .map_err(|e| bad("hard state", e)),
            KIND_ENTRIES => {
                let mut entries = Vec::new();
                let mut rest = body;
                while !rest.is_empty() {
                    let (len, tail) = split_u32(rest).ok_or("a truncated entry length")?;
                    let bytes = tail.get(..len as usize).ok_or("a truncated entry")?;
                    entries.push(Entry::parse_from_bytes(bytes).map_err(|e| bad("entry", e))?);
                    rest = &tail[len as usize..];
                }
                if entries.is_empty() {
                    return Err("an entries record without entries".to_string());
                }
                Ok(Decoded::Entries(entries))
            }
            other => Err(format!("an unknown record kind {other}")),
        }
    }
}

/// The data directory's files, when the member has one.
#[derive(Debug)]
struct Disk {
    /// The data directory.
    dir: PathBuf,
    /// The log, open for appending.
    log: File,
    /// Bytes in the log file now.
    log_bytes: u64,
    /// The log is written whole again once it grows past this many bytes.
    rewrite_at: u64,
    /// Set when a write failed: the files may then not match memory, so nothing more is
    /// written ([`StorageError::Poisoned`]).
    poisoned: bool,
}

impl Disk {
    /// The path of the file `name` in the directory.
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Fails with [`StorageError::Poisoned`] once a write has failed.
    fn check_usable(&self) -> Result<(), StorageError> {
        if self.poisoned {
            return Err(StorageError::Poisoned {
                dir: self.dir.clone(),
            });
        }
        Ok(())
    }

    /// Appends `payload` as one frame and fsyncs the log.
    fn append(&mut self, payload: &[u8]) -> Result<(), StorageError> {
        self.check_usable()?;
        let mut frame = Vec::with_capacity(FRAME_HEADER + payload.len());
        push_frame(&mut frame, payload)?;
        let written = self
            .log
            .write_all(&frame)
            .and_then(|()| self.log.sync_data());
        if let Err(source) = written {
            self.poisoned = true;
            return Err(StorageError::Io {
                path: self.path(LOG_FILE),
                source,
            });
        }
        self.log_bytes += frame.len() as u64;
        Ok(())
    }

    /// Whether the log has grown enough since it was last written whole to be written again.
    fn wants_rewrite(&self) -> bool {
        self.log_bytes > self.rewrite_at
    }

    /// Replaces the log with `image` (temp file, fsync, rename, directory fsync) and reopens it
    /// for appending.
    fn replace_log(&mut self, image: &[u8]) -> Result<(), StorageError> {
        self.check_usable()?;
        let replaced = write_atomically(&self.dir, LOG_TMP, LOG_FILE, image)
            .and_then(|()| open_append(&self.path(LOG_FILE)));
        match replaced {
            Ok(log) => {
                self.log = log;
                self.log_bytes = image.len() as u64;
                self.rewrite_at = rewrite_threshold(self.log_bytes);
                Ok(())
            }
            Err(e) => {
                self.poisoned = true;
                Err(e)
            }
        }
    }

    /// Replaces `meta` with the given incarnations.
    fn write_meta(
        &mut self,
        incarnation: u64,
        known: &BTreeMap<u32, u64>,
    ) -> Result<(), StorageError> {
        self.check_usable()?;
        let written = encode_meta(incarnation, known)
            .and_then(|meta| write_atomically(&self.dir, META_TMP, META_FILE, &meta));
        if written.is_err() {
            self.poisoned = true;
        }
        written
    }
}

/// The Raft storage of one group member (see the module doc for the format and the calling
/// contract). It implements [`raft::Storage`]; a `RawNode` owns it and the member reaches it
/// through `RawNode::store` and `RawNode::mut_store`.
#[derive(Debug)]
pub struct GroupStorage {
    /// The Raft state: always what the directory (if any) rebuilds.
    state: State,
    /// This member's incarnation, drawn when its state was created and kept with it.
    incarnation: u64,
    /// The incarnation last seen from each peer, by its place in `--peers`.
    known: BTreeMap<u32, u64>,
    /// The files, when the member has a data directory.
    disk: Option<Disk>,
}

impl GroupStorage {
    /// Opens the storage of a member: in memory only when `dir` is `None` (always fresh),
    /// otherwise in `dir` (created if missing), recovering the state stored there. When fresh,
    /// the conf state has `voters` (raft ids) and the incarnation is `new_incarnation`
    /// (persisted). Returns the storage and what was found; fails on a directory that cannot
    /// be read or written, is corrupt, is of another format version or is not a member's.
    pub fn open(
        dir: Option<&Path>,
        voters: &[u64],
        new_incarnation: u64,
    ) -> Result<(GroupStorage, Recovered), StorageError> {
        let fresh_state = State {
            conf_state: ConfState::from((voters.to_vec(), Vec::new())),
            ..State::default()
        };
        let fresh = Recovered {
            fresh: true,
            incarnation: new_incarnation,
        };
        let Some(dir) = dir else {
            let storage = GroupStorage {
                state: fresh_state,
                incarnation: new_incarnation,
                known: BTreeMap::new(),
                disk: None,
            };
            return Ok((storage, fresh));
        };
        fs::create_dir_all(dir).map_err(io_error(dir))?;
        let meta_path = dir.join(META_FILE);
        match fs::read(&meta_path) {
            Ok(meta) => {
                let (incarnation, known) = decode_meta(&meta_path, &meta)?;
                let (state, disk) = recover_log(dir)?;
                let storage = GroupStorage {
                    state,
                    incarnation,
                    known,
                    disk: Some(disk),
                };
                let recovered = Recovered {
                    fresh: false,
                    incarnation,
                };
                Ok((storage, recovered))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let disk = create(dir, &fresh_state, new_incarnation)?;
                let storage = GroupStorage {
                    state: fresh_state,
                    incarnation: new_incarnation,
                    known: BTreeMap::new(),
                    disk: Some(disk),
                };
                Ok((storage, fresh))
            }
            Err(source) => Err(StorageError::Io {
                path: meta_path,
                source,
            }),
        }
    }

    /// Appends `entries` (consecutive; the first may have any index from the first index to
    /// the last index + 1, and drops the entries from its index on first, as Raft requires),
    /// durably. Fails with [`StorageError::Discontinuous`] if they do not fit.
    pub fn append(&mut self, entries: &[Entry]) -> Result<(), StorageError> {
        if entries.is_empty() {
            return Ok(());
        }
        self.state.check_append(entries)?;
        if let Some(disk) = &mut self.disk {
            disk.append(&Record::Entries(entries).encode()?)?;
        }
        self.state.append(entries);
        self.rewrite_if_grown()
    }

    /// Stores the hard state `hs`, its term and vote durably. Its commit index must not pass
    /// the last index
    /// (append a `Ready`'s entries first), else [`StorageError::CommitBeyondLog`].
    pub fn set_hard_state(&mut self, hs: &HardState) -> Result<(), StorageError> {
        if hs.commit > self.state.last_index() {
            return Err(StorageError::CommitBeyondLog {
                commit: hs.commit,
                last_index: self.state.last_index(),
            });
        }
        if *hs == self.state.hard_state {
            return Ok(());
        }
        // Only the term and the vote must survive a crash; the commit index is relearned
        // from the leader (Raft never needs it durable), so a change of it alone costs no
        // write: one fsync per Ready (its entries) instead of two or three. Records that
        // are written (a vote, a snapshot) carry the newest commit index.
        let durable_change =
            hs.term != self.state.hard_state.term || hs.vote != self.state.hard_state.vote;
        if durable_change && let Some(disk) = &mut self.disk {
            disk.append(&Record::Hard(hs).encode()?)?;
        }
        self.state.hard_state = hs.clone();
        if durable_change {
            return self.rewrite_if_grown();
        }
        Ok(())
    }

    /// Sets only the commit index of the hard state to `commit` (in memory: see
    /// [`GroupStorage::set_hard_state`]).
    pub fn set_commit(&mut self, commit: u64) -> Result<(), StorageError> {
        let mut hs = self.state.hard_state.clone();
        hs.commit = commit;
        self.set_hard_state(&hs)
    }

    /// Stores the conf state `cs` durably (after applying a conf change; a group with fixed
    /// `--peers` never needs it).
    pub fn set_conf_state(&mut self, cs: &ConfState) -> Result<(), StorageError> {
        if *cs == self.state.conf_state {
            return Ok(());
        }
        if let Some(disk) = &mut self.disk {
            disk.append(&Record::Conf(cs).encode()?)?;
        }
        self.state.conf_state = cs.clone();
        self.rewrite_if_grown()
    }

    /// Installs `snapshot`, received from the leader, durably: the log is dropped, the conf
    /// state becomes the snapshot's, the commit index its index, and [`Storage::snapshot`]
    /// returns it. Fails with [`StorageError::SnapshotOutOfDate`] unless it is newer than the
    /// snapshot held.
    pub fn apply_snapshot(&mut self, snapshot: Snapshot) -> Result<(), StorageError> {
        let index = snapshot.get_metadata().index;
        if index < self.state.first_index() {
            return Err(StorageError::SnapshotOutOfDate {
                index,
                first_index: self.state.first_index(),
            });
        }
        let installed = self.state.installed(snapshot);
        if let Some(disk) = &mut self.disk {
            disk.replace_log(&installed.image()?)?;
        }
        self.state = installed;
        Ok(())
    }

    /// Takes a snapshot at `applied` (an index the state machine has applied, at most the last
    /// index) holding the state machine's image `data` and the conf state `conf` at that index,
    /// then drops the entries up to it, durably (the log file is written whole, so it shrinks).
    /// Afterwards [`Storage::snapshot`] returns it. An `applied` at or below the snapshot held
    /// changes nothing.
    pub fn compact(
        &mut self,
        applied: u64,
        data: Vec<u8>,
        conf: ConfState,
    ) -> Result<(), StorageError> {
        if applied <= self.state.snapshot_index() {
            return Ok(());
        }
        if applied > self.state.last_index() {
            return Err(StorageError::CompactBeyondLog {
                applied,
                last_index: self.state.last_index(),
            });
        }
        let term = self
            .state
            .term(applied)
            .expect("an index between the snapshot and the last index has a term");
        let mut snapshot = Snapshot {
            data: data.into(),
            ..Snapshot::default()
        };
        let meta = snapshot.mut_metadata();
        meta.index = applied;
        meta.term = term;
        meta.set_conf_state(conf.clone());
        let mut hard_state = self.state.hard_state.clone();
        // An applied entry is committed, whatever the stored commit index says.
        hard_state.commit = hard_state.commit.max(applied);
        let dropped = (applied - self.state.snapshot_index()) as usize;
        let compacted = State {
            hard_state,
            conf_state: conf,
            snapshot,
            entries: self.state.entries[dropped..].to_vec(),
        };
        if let Some(disk) = &mut self.disk {
            disk.replace_log(&compacted.image()?)?;
        }
        self.state = compacted;
        Ok(())
    }

    /// The incarnation last seen from the peer at place `member` in `--peers`, if any.
    pub fn known_incarnation(&self, member: u32) -> Option<u64> {
        self.known.get(&member).copied()
    }

    /// Remembers that the peer at place `member` in `--peers` has `incarnation`, durably
    /// (nothing is written when it is the one remembered already).
    pub fn remember_incarnation(
        &mut self,
        member: u32,
        incarnation: u64,
    ) -> Result<(), StorageError> {
        if self.known.get(&member) == Some(&incarnation) {
            return Ok(());
        }
        let mut known = self.known.clone();
        known.insert(member, incarnation);
        if let Some(disk) = &mut self.disk {
            disk.write_meta(self.incarnation, &known)?;
        }
        self.known = known;
        Ok(())
    }

    /// This member's incarnation (see [`Recovered::incarnation`]).
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// The hard state stored now.
    pub fn hard_state(&self) -> &HardState {
        &self.state.hard_state
    }

    /// The conf state stored now.
    pub fn conf_state(&self) -> &ConfState {
        &self.state.conf_state
    }

    /// The latest snapshot (taken by [`GroupStorage::compact`] or installed by
    /// [`GroupStorage::apply_snapshot`]), with its data; `None` before any. A restarted member
    /// rebuilds its state machine from it.
    pub fn latest_snapshot(&self) -> Option<&Snapshot> {
        Some(&self.state.snapshot).filter(|s| !s.is_empty())
    }

    /// The number of entries in the log now (after the latest snapshot).
    pub fn log_len(&self) -> usize {
        self.state.entries.len()
    }

    /// The size of the log file in bytes, or `None` in memory only.
    pub fn disk_bytes(&self) -> Option<u64> {
        self.disk.as_ref().map(|d| d.log_bytes)
    }

    /// The data directory, or `None` in memory only.
    pub fn data_dir(&self) -> Option<&Path> {
        self.disk.as_ref().map(|d| d.dir.as_path())
    }

    /// Writes the log whole again once superseded records have made it much larger than the
    /// state it holds.
    fn rewrite_if_grown(&mut self) -> Result<(), StorageError> {
        match &mut self.disk {
            Some(disk) if disk.wants_rewrite() => disk.replace_log(&self.state.image()?),
            _ => Ok(()),
        }
    }
}

impl Storage for GroupStorage {
    /// The hard state and the conf state stored now.
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(
            self.state.hard_state.clone(),
            self.state.conf_state.clone(),
        ))
    }

    /// The entries in `[low, high)`, cut to `max_size` bytes (but at least one), as raft's
    /// `limit_size` does; `Compacted` below the first index, `Unavailable` past the last.
    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let first = self.state.first_index();
        if low < first {
            return Err(raft::Error::Store(raft::StorageError::Compacted));
        }
        if high > self.state.last_index() + 1 || low > high {
            return Err(raft::Error::Store(raft::StorageError::Unavailable));
        }
        let mut entries =
            self.state.entries[(low - first) as usize..(high - first) as usize].to_vec();
        raft::util::limit_size(&mut entries, max_size.into());
        Ok(entries)
    }

    /// The term of the entry at `idx`, from the snapshot's index to the last index.
    fn term(&self, idx: u64) -> raft::Result<u64> {
        self.state.term(idx)
    }

    /// The index after the latest snapshot's (1 before any).
    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.state.first_index())
    }

    /// The index of the last entry (the snapshot's when the log is empty).
    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.state.last_index())
    }

    /// The latest snapshot with its data, or `SnapshotTemporarilyUnavailable` when there is
    /// none yet or it is older than `request_index` (raft then tries again later).
    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        match self.latest_snapshot() {
            Some(s) if s.get_metadata().index >= request_index => Ok(s.clone()),
            _ => Err(raft::Error::Store(
                raft::StorageError::SnapshotTemporarilyUnavailable,
            )),
        }
    }
}

/// Creates the files of a fresh member in `dir` (which holds no `meta`): fsyncs `dir`'s parent
/// (`dir` may have just been created), writes the log of `state`, then `meta` (written last,
/// so a crash in between leaves a directory that is fresh again).
/// Fails with [`StorageError::Foreign`] if `dir` holds files that are not this format's.
fn create(dir: &Path, state: &State, incarnation: u64) -> Result<Disk, StorageError> {
    for entry in fs::read_dir(dir).map_err(io_error(dir))? {
        let name = entry.map_err(io_error(dir))?.file_name();
        let name = name.to_string_lossy();
        if ![LOG_FILE, LOG_TMP, META_TMP].contains(&name.as_ref()) {
            return Err(StorageError::Foreign {
                dir: dir.to_path_buf(),
                name: name.into_owned(),
            });
        }
    }
    // The directory may be new: make its own entry durable before anything is stored in it.
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(parent)
        .and_then(|d| d.sync_all())
        .map_err(io_error(parent))?;
    let image = state.image()?;
    write_atomically(dir, LOG_TMP, LOG_FILE, &image)?;
    write_atomically(
        dir,
        META_TMP,
        META_FILE,
        &encode_meta(incarnation, &BTreeMap::new())?,
    )?;
    let log = open_append(&dir.join(LOG_FILE))?;
    Ok(Disk {
        dir: dir.to_path_buf(),
        log,
        log_bytes: image.len() as u64,
        rewrite_at: rewrite_threshold(image.len() as u64),
        poisoned: false,
    })
}

/// Rebuilds the state from the log in `dir`, cutting a torn last frame off the file, and
/// opens the log for appending.
fn recover_log(dir: &Path) -> Result<(State, Disk), StorageError> {
    let path = dir.join(LOG_FILE);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(corrupt(&path, "meta exists but the log does not"));
        }
        Err(source) => return Err(StorageError::Io { path, source }),
    };
    let (state, valid) = replay(&path, &bytes)?;
    if valid < bytes.len() {
        warn!(
            "{}: dropping a torn last record ({} bytes at offset {valid}): it was never acknowledged",
            path.display(),
            bytes.len() - valid
        );
        let file = OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(io_error(&path))?;
        file.set_len(valid as u64)
            .and_then(|()| file.sync_all())
            .map_err(io_error(&path))?;
    }
    let hs = &state.hard_state;
    if hs.commit < state.snapshot_index() || hs.commit > state.last_index() {
        return Err(corrupt(
            &path,
            format!(
                "the commit index {} is outside the log [{}, {}]",
                hs.commit,
                state.snapshot_index(),
                state.last_index()
            ),
        ));
    }
    let log = open_append(&path)?;
    let disk = Disk {
        dir: dir.to_path_buf(),
        log,
        log_bytes: valid as u64,
        rewrite_at: rewrite_threshold(valid as u64),
        poisoned: false,
    };
    Ok((state, disk))
}

/// Replays the log file `bytes` (read from `path`). Returns the state and how many leading
/// bytes are valid: fewer than all when a torn last frame is to be dropped.
fn replay(path: &Path, bytes: &[u8]) -> Result<(State, usize), StorageError> {
    if bytes.get(..LOG_MAGIC.len()) != Some(&LOG_MAGIC[..]) {
        return Err(corrupt(path, "not a view-leader log (bad magic)"));
    }
    let mut state = State::default();
    let mut pos = LOG_MAGIC.len();
    while pos < bytes.len() {
        match read_frame(&bytes[pos..]) {
            FrameRead::Whole { payload, len } => {
                let record = Decoded::decode(payload)
                    .map_err(|m| corrupt(path, format!("record at offset {pos}: {m}")))?;
                state
                    .replay(record)
                    .map_err(|e| corrupt(path, format!("record at offset {pos}: {e}")))?;
                pos += len;
            }
            FrameRead::Torn => return Ok((state, pos)),
            FrameRead::Bad { reason } => {
                return Err(corrupt(path, format!("record at offset {pos}: {reason}")));
            }
        }
    }
    Ok((state, pos))
}

/// What [`read_frame`] found at the start of a byte slice.
#[derive(Debug, PartialEq)]
enum FrameRead<'a> {
    /// A whole frame with a good checksum, `len` bytes long in all.
    Whole {
        /// The payload.
        payload: &'a [u8],
        /// The frame's length, header included.
        len: usize,
    },
    /// The end of a write that never completed: the slice ends inside the frame, or the frame
    /// is bad and only zero bytes follow it. Nothing after it counts.
    Torn,
    /// A bad frame with data after it.
    Bad {
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// Reads the frame at the start of `rest` (not empty), telling a torn tail from corruption.
fn read_frame(rest: &[u8]) -> FrameRead<'_> {
    let zeros_from = |at: usize| {
        rest.get(at..)
            .is_none_or(|tail| tail.iter().all(|&b| b == 0))
    };
    let Some(header) = rest.get(..FRAME_HEADER) else {
        return FrameRead::Torn;
    };
    let len = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
    let check = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes"));
    if check != !len || len == 0 {
        return if zeros_from(0) {
            FrameRead::Torn
        } else {
            FrameRead::Bad {
                reason: "a bad frame header",
            }
        };
    }
    let end = FRAME_HEADER + len as usize;
    let Some(payload) = rest.get(FRAME_HEADER..end) else {
        return FrameRead::Torn;
    };
    if checksum(payload) != header[8..16] {
        return if zeros_from(end) {
            FrameRead::Torn
        } else {
            FrameRead::Bad {
                reason: "a bad checksum",
            }
        };
    }
    FrameRead::Whole { payload, len: end }
}

/// Appends to `out` a frame holding `payload`.
fn push_frame(out: &mut Vec<u8>, payload: &[u8]) -> Result<(), StorageError> {
    let len = frame_len(payload.len())?;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&(!len).to_le_bytes());
    out.extend_from_slice(&checksum(payload));
    out.extend_from_slice(payload);
    Ok(())
}

/// `len` as a frame or entry length, or [`StorageError::TooLarge`].
fn frame_len(len: usize) -> Result<u32, StorageError> {
    u32::try_from(len).map_err(|_| StorageError::TooLarge { bytes: len })
}

/// The checksum of a frame's payload: the first 8 bytes of its SHA-256.
fn checksum(payload: &[u8]) -> [u8; 8] {
    let digest = Sha256::digest(payload);
    let mut sum = [0u8; 8];
    sum.copy_from_slice(&digest[..8]);
    sum
}

/// Splits a u32 LE off the front of `bytes`.
fn split_u32(bytes: &[u8]) -> Option<(u32, &[u8])> {
    let (head, tail) = bytes.split_first_chunk::<4>()?;
    Some((u32::from_le_bytes(*head), tail))
}

/// The contents of `meta`: magic, version, then a frame with `incarnation` and `known`.
fn encode_meta(incarnation: u64, known: &BTreeMap<u32, u64>) -> Result<Vec<u8>, StorageError> {
    let mut payload = incarnation.to_le_bytes().to_vec();
    payload.extend_from_slice(&frame_len(known.len())?.to_le_bytes());
    for (member, inc) in known {
        payload.extend_from_slice(&member.to_le_bytes());
        payload.extend_from_slice(&inc.to_le_bytes());
    }
    let mut out = META_MAGIC.to_vec();
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    push_frame(&mut out, &payload)?;
    Ok(out)
}

/// Reads `meta` (from `path`): this member's incarnation and the peers' known incarnations.
/// Fails with [`StorageError::Version`] on another format version.
fn decode_meta(path: &Path, bytes: &[u8]) -> Result<(u64, BTreeMap<u32, u64>), StorageError> {
    let rest = bytes
        .strip_prefix(&META_MAGIC[..])
        .ok_or_else(|| corrupt(path, "not a view-leader meta file (bad magic)"))?;
    let (version, rest) = split_u32(rest).ok_or_else(|| corrupt(path, "no format version"))?;
    if version != FORMAT_VERSION {
        return Err(StorageError::Version {
            path: path.to_path_buf(),
            found: version,
            expected: FORMAT_VERSION,
        });
    }
    let payload = match read_frame(rest) {
        FrameRead::Whole { payload, len } if len == rest.len() => payload,
        _ => return Err(corrupt(path, "a bad or incomplete frame")),
    };
    let malformed = || corrupt(path, "a malformed payload");
    let (head, rest) = payload.split_first_chunk::<8>().ok_or_else(malformed)?;
    let incarnation = u64::from_le_bytes(*head);
    let (count, mut rest) = split_u32(rest).ok_or_else(malformed)?;
    let mut known = BTreeMap::new();
    for _ in 0..count {
        let (member, tail) = split_u32(rest).ok_or_else(malformed)?;
        let (inc, tail) = tail.split_first_chunk::<8>().ok_or_else(malformed)?;
        known.insert(member, u64::from_le_bytes(*inc));
        rest = tail;
    }
    if !rest.is_empty() {
        return Err(malformed());
    }
    Ok((incarnation, known))
}

/// Replaces `dir/name` with `bytes`: writes `dir/tmp`, fsyncs it, renames it over `name` and
/// fsyncs the directory, so a crash leaves either the old file or the new one.
fn write_atomically(dir: &Path, tmp: &str, name: &str, bytes: &[u8]) -> Result<(), StorageError> {
    let tmp_path = dir.join(tmp);
    let mut file = File::create(&tmp_path).map_err(io_error(&tmp_path))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(io_error(&tmp_path))?;
    drop(file);
    let path = dir.join(name);
    fs::rename(&tmp_path, &path).map_err(io_error(&path))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error(dir))
}

/// Opens the file at `path` for appending.
fn open_append(path: &Path) -> Result<File, StorageError> {
    OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(io_error(path))
}

/// The size past which a log of `bytes` bytes (just written whole) is written whole again.
fn rewrite_threshold(bytes: u64) -> u64 {
    bytes.saturating_mul(2).saturating_add(REWRITE_SLACK)
}

/// Turns an I/O error on `path` into [`StorageError::Io`].
fn io_error(path: &Path) -> impl FnOnce(io::Error) -> StorageError + '_ {
    move |source| StorageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A [`StorageError::Corrupt`] of `path` saying `message`.
fn corrupt(path: &Path, message: impl Into<String>) -> StorageError {
    StorageError::Corrupt {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use raft::storage::MemStorage;
    use raft::{Config, RawNode};
    use slog::Drain;

    /// A directory under the system's temp dir with a random name, removed when dropped.
    struct TempDir {
        /// The directory (not created until something creates it).
        path: PathBuf,
    }

    impl TempDir {
        /// A fresh, not yet created, directory name for the test `name`.
        fn new(name: &str) -> TempDir {
            let random = getrandom::u64().expect("randomness");
            let path = std::env::temp_dir().join(format!("trireme-storage-{name}-{random:016x}"));
            TempDir { path }
        }
    }

    impl Drop for TempDir {
        /// Removes the directory and everything in it.
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.path);
        }
    }

    /// An entry at `index` of `term` whose data is the index's low byte.
    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            data: vec![index as u8; 10].into(),
            ..Entry::default()
        }
    }

    /// Entries `from..=to`, all of `term`.
    fn entries(from: u64, to: u64, term: u64) -> Vec<Entry> {
        (from..=to).map(|i| entry(i, term)).collect()
    }

    /// A hard state of `term`, voting for `vote`, committed to `commit`.
    fn hard(term: u64, vote: u64, commit: u64) -> HardState {
        HardState {
            term,
            vote,
            commit,
            ..HardState::default()
        }
    }

    /// Opens durable storage in `dir` for three voters, fresh incarnation `inc`.
    fn open_in(dir: &Path, inc: u64) -> Result<(GroupStorage, Recovered), StorageError> {
        GroupStorage::open(Some(dir), &[1, 2, 3], inc)
    }

    /// All entries the storage holds.
    fn all(s: &GroupStorage) -> Vec<Entry> {
        let (first, last) = (s.first_index().unwrap(), s.last_index().unwrap());
        s.entries(first, last + 1, None, GetEntriesContext::empty(false))
            .unwrap()
    }

    /// A snapshot at `index` of `term` with `data`, voters 1..=3.
    fn snapshot(index: u64, term: u64, data: &[u8]) -> Snapshot {
        let mut s = Snapshot {
            data: data.to_vec().into(),
            ..Snapshot::default()
        };
        let meta = s.mut_metadata();
        meta.index = index;
        meta.term = term;
        meta.set_conf_state(ConfState::from((vec![1, 2, 3], vec![])));
        s
    }

    #[test]
    fn memory_mode_matches_mem_storage_for_append_truncate_term_and_entries() {
        let (mut ours, recovered) = GroupStorage::open(None, &[1, 2, 3], 9).unwrap();
        assert_eq!(
            recovered,
            Recovered {
                fresh: true,
                incarnation: 9
            }
        );
        let theirs = MemStorage::new_with_conf_state((vec![1, 2, 3], vec![]));
        let batches = [
            entries(1, 5, 1),
            entries(6, 8, 1),
            entries(4, 6, 2), // overwrites a suffix
            entries(7, 7, 3),
            entries(8, 12, 3),
            entries(12, 13, 4),
        ];
        for batch in &batches {
            ours.append(batch).unwrap();
            theirs.wl().append(batch).unwrap();
            assert_eq!(ours.first_index(), theirs.first_index());
            assert_eq!(ours.last_index(), theirs.last_index());
            let last = theirs.last_index().unwrap();
            for idx in 0..=last + 2 {
                assert_eq!(ours.term(idx), theirs.term(idx), "term({idx})");
            }
            for low in 1..=last + 1 {
                for high in low..=last + 1 {
                    for max in [None, Some(0), Some(20), Some(45), Some(u64::MAX)] {
                        let ctx = || GetEntriesContext::empty(false);
                        assert_eq!(
                            ours.entries(low, high, max, ctx()),
                            theirs.entries(low, high, max, ctx()),
                            "entries({low}, {high}, {max:?})"
                        );
                    }
                }
            }
        }
        assert_eq!(
            ours.initial_state().unwrap().conf_state,
            theirs.initial_state().unwrap().conf_state
        );
        assert_eq!(ours.log_len(), 13);
        assert_eq!(ours.disk_bytes(), None);
    }

    #[test]
    fn append_refuses_gaps_compacted_indexes_and_non_consecutive_entries() {
        let (mut s, _) = GroupStorage::open(None, &[1], 1).unwrap();
        s.append(&entries(1, 3, 1)).unwrap();
        let gap = s.append(&entries(5, 6, 1));
        assert!(
            matches!(gap, Err(StorageError::Discontinuous { first: 5, .. })),
            "{gap:?}"
        );
        let holes = s.append(&[entry(4, 1), entry(6, 1)]);
        assert!(
            matches!(holes, Err(StorageError::Discontinuous { .. })),
            "{holes:?}"
        );
        s.compact(2, vec![], ConfState::from((vec![1], vec![])))
            .unwrap();
        let compacted = s.append(&entries(2, 4, 2));
        assert!(
            matches!(compacted, Err(StorageError::Discontinuous { .. })),
            "{compacted:?}"
        );
        assert_eq!(s.last_index(), Ok(3));
    }

    #[test]
    fn durable_state_survives_reopen_with_the_same_incarnations() {
        let dir = TempDir::new("reopen");
        let (mut s, recovered) = open_in(&dir.path, 42).unwrap();
        assert!(recovered.fresh);
        assert_eq!(recovered.incarnation, 42);
        s.append(&entries(1, 5, 1)).unwrap();
        s.set_hard_state(&hard(1, 2, 3)).unwrap();
        s.remember_incarnation(1, 1111).unwrap();
        s.remember_incarnation(2, 2222).unwrap();
        s.set_commit(4).unwrap();
        drop(s);

        let (s, recovered) = open_in(&dir.path, 77).unwrap();
        assert_eq!(
            recovered,
            Recovered {
                fresh: false,
                incarnation: 42
            }
        );
        assert_eq!(s.incarnation(), 42);
        assert_eq!(s.known_incarnation(1), Some(1111));
        assert_eq!(s.known_incarnation(2), Some(2222));
        assert_eq!(s.known_incarnation(0), None);
        let state = s.initial_state().unwrap();
        // Term and vote are durable; a commit index moved alone is not (Raft relearns it).
        assert_eq!(state.hard_state, hard(1, 2, 3));
        assert_eq!(state.conf_state.voters, vec![1, 2, 3]);
        assert_eq!(all(&s), entries(1, 5, 1));
        assert_eq!(s.term(0), Ok(0));
        assert_eq!(
            s.snapshot(0, 2),
            Err(raft::Error::Store(
                raft::StorageError::SnapshotTemporarilyUnavailable
            ))
        );
    }

    #[test]
    fn an_overwritten_suffix_survives_reopen() {
        let dir = TempDir::new("overwrite");
        let (mut s, _) = open_in(&dir.path, 1).unwrap();
        s.append(&entries(1, 6, 1)).unwrap();
        s.append(&entries(4, 5, 2)).unwrap();
        s.append(&entries(6, 6, 2)).unwrap();
        s.append(&entries(3, 3, 3)).unwrap();
        let expected = all(&s);
        assert_eq!(expected.len(), 3);
        drop(s);
        let (s, _) = open_in(&dir.path, 1).unwrap();
        assert_eq!(all(&s), expected);
        assert_eq!(s.term(3), Ok(3));
        assert_eq!(s.last_index(), Ok(3));
    }

    #[test]
    fn compaction_moves_the_first_index_keeps_the_snapshot_and_shrinks_the_file() {
        let dir = TempDir::new("compact");
        let (mut s, _) = open_in(&dir.path, 1).unwrap();
        for i in 1..=100 {
            s.append(&[entry(i, 1 + i / 50)]).unwrap();
            s.set_commit(i).unwrap();
        }
        let before = fs::metadata(dir.path.join(LOG_FILE)).unwrap().len();
        assert_eq!(s.disk_bytes(), Some(before));
        let conf = ConfState::from((vec![1, 2, 3], vec![]));
        s.compact(90, b"image at 90".to_vec(), conf.clone())
            .unwrap();
        assert_eq!(s.log_len(), 10);
        // Compacting to an older index changes nothing.
        s.compact(50, b"older".to_vec(), conf.clone()).unwrap();
        assert!(matches!(
            s.compact(101, vec![], conf.clone()),
            Err(StorageError::CompactBeyondLog {
                applied: 101,
                last_index: 100
            })
        ));
        drop(s);

        let after = fs::metadata(dir.path.join(LOG_FILE)).unwrap().len();
        assert!(
            after < before / 4,
            "{after} bytes after compaction, {before} before"
        );
        let (s, recovered) = open_in(&dir.path, 1).unwrap();
        assert!(!recovered.fresh);
        assert_eq!(s.first_index(), Ok(91));
        assert_eq!(s.last_index(), Ok(100));
        assert_eq!(s.log_len(), 10);
        assert_eq!(s.term(90), Ok(2));
        assert_eq!(
            s.term(89),
            Err(raft::Error::Store(raft::StorageError::Compacted))
        );
        assert_eq!(
            s.entries(90, 92, None, GetEntriesContext::empty(false)),
            Err(raft::Error::Store(raft::StorageError::Compacted))
        );
        assert_eq!(
            all(&s),
            (91..=100).map(|i| entry(i, 1 + i / 50)).collect::<Vec<_>>()
        );
        let snap = s.snapshot(0, 2).unwrap();
        assert_eq!(snap.get_metadata().index, 90);
        assert_eq!(snap.get_metadata().term, 2);
        assert_eq!(&snap.data[..], b"image at 90");
        assert_eq!(s.initial_state().unwrap().conf_state, conf);
        assert_eq!(s.hard_state().commit, 100);
        // Asked for a newer snapshot than it has, it says "later".
        assert_eq!(
            s.snapshot(95, 2),
            Err(raft::Error::Store(
                raft::StorageError::SnapshotTemporarilyUnavailable
            ))
        );
    }

    #[test]
    fn compacting_everything_then_appending_survives_reopen() {
        let dir = TempDir::new("compact-all");
        let (mut s, _) = open_in(&dir.path, 1).unwrap();
        s.append(&entries(1, 4, 1)).unwrap();
        s.set_commit(4).unwrap();
        s.compact(4, b"all".to_vec(), s.conf_state().clone())
            .unwrap();
        assert_eq!(s.log_len(), 0);
        assert_eq!((s.first_index(), s.last_index()), (Ok(5), Ok(4)));
        s.append(&entries(5, 6, 2)).unwrap();
        drop(s);
        let (s, _) = open_in(&dir.path, 1).unwrap();
        assert_eq!(all(&s), entries(5, 6, 2));
        assert_eq!(s.term(4), Ok(1));
    }

    #[test]
    fn an_applied_snapshot_replaces_the_log_and_survives_reopen() {
        let dir = TempDir::new("apply");
        let (mut s, _) = open_in(&dir.path, 1).unwrap();
        s.append(&entries(1, 5, 1)).unwrap();
        s.set_hard_state(&hard(1, 1, 2)).unwrap();
        s.apply_snapshot(snapshot(20, 4, b"leader's image"))
            .unwrap();
        assert_eq!(s.log_len(), 0);
        assert_eq!(s.hard_state(), &hard(4, 1, 20));
        let stale = s.apply_snapshot(snapshot(20, 4, b"again"));
        assert!(
            matches!(
                stale,
                Err(StorageError::SnapshotOutOfDate { index: 20, .. })
            ),
            "{stale:?}"
        );
        s.append(&entries(21, 22, 4)).unwrap();
        drop(s);

        let (s, _) = open_in(&dir.path, 1).unwrap();
        assert_eq!((s.first_index(), s.last_index()), (Ok(21), Ok(22)));
        assert_eq!(s.term(20), Ok(4));
        assert_eq!(s.hard_state(), &hard(4, 1, 20));
        let snap = s.snapshot(0, 3).unwrap();
        assert_eq!(&snap.data[..], b"leader's image");
        assert_eq!(s.latest_snapshot(), Some(&snap));
        assert_eq!(s.conf_state().voters, vec![1, 2, 3]);
    }

    #[test]
    fn a_torn_last_record_is_dropped_on_reopen() {
        let dir = TempDir::new("torn");
        let (mut s, _) = open_in(&dir.path, 1).unwrap();
        s.append(&entries(1, 3, 1)).unwrap();
        s.append(&entries(4, 6, 1)).unwrap();
        drop(s);
        let path = dir.path.join(LOG_FILE);
        let len = fs::metadata(&path).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len - 5)
            .unwrap();

        let (mut s, recovered) = open_in(&dir.path, 1).unwrap();
        assert!(!recovered.fresh);
        assert_eq!(all(&s), entries(1, 3, 1));
        // The torn bytes were cut off, so what follows is readable.
        s.append(&entries(4, 4, 2)).unwrap();
        drop(s);
        let (s, _) = open_in(&dir.path, 1).unwrap();
        let mut expected = entries(1, 3, 1);
        expected.push(entry(4, 2));
        assert_eq!(all(&s), expected);
    }

    #[test]
    fn a_zero_filled_tail_is_torn_too() {
        let dir = TempDir::new("zeros");
        let (mut s, _) = open_in(&dir.path, 1).unwrap();
        s.append(&entries(1, 2, 1)).unwrap();
        drop(s);
        let path = dir.path.join(LOG_FILE);
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(&[0; 100]).unwrap();
        drop(file);
        let (s, _) = open_in(&dir.path, 1).unwrap();
        assert_eq!(all(&s), entries(1, 2, 1));
    }

    #[test]
    fn a_corrupt_record_in_the_middle_is_an_error() {
        let dir = TempDir::new("corrupt");
        let (mut s, _) = open_in(&dir.path, 1).unwrap();
        s.append(&entries(1, 3, 1)).unwrap();
        let before = s.disk_bytes().unwrap();
        s.append(&entries(4, 6, 1)).unwrap();
        drop(s);
        let path = dir.path.join(LOG_FILE);
        let mut bytes = fs::read(&path).unwrap();
        // The last byte of the first entries record (its data).
        bytes[before as usize - 1] ^= 0x40;
        fs::write(&path, &bytes).unwrap();
        let opened = open_in(&dir.path, 1);
        assert!(
            matches!(opened, Err(StorageError::Corrupt { .. })),
            "{opened:?}"
        );

        // A flipped length is corruption too, not a torn tail.
        bytes[before as usize - 1] ^= 0x40;
        bytes[before as usize] ^= 0x01;
        fs::write(&path, &bytes).unwrap();
        let opened = open_in(&dir.path, 1);
        assert!(
            matches!(opened, Err(StorageError::Corrupt { .. })),
            "{opened:?}"
        );
    }

    #[test]
    fn an_empty_or_missing_directory_is_fresh_and_a_foreign_one_is_refused() {
        let dir = TempDir::new("fresh");
        fs::create_dir_all(&dir.path).unwrap();
        let (_, recovered) = open_in(&dir.path, 5).unwrap();
        assert_eq!(
            recovered,
            Recovered {
                fresh: true,
                incarnation: 5
            }
        );

        let missing = TempDir::new("missing");
        let (s, recovered) = open_in(&missing.path.join("a/b"), 6).unwrap();
        assert!(recovered.fresh);
        assert_eq!(s.data_dir(), Some(missing.path.join("a/b").as_path()));

        let foreign = TempDir::new("foreign");
        fs::create_dir_all(&foreign.path).unwrap();
        fs::write(foreign.path.join("important.txt"), b"not ours").unwrap();
        let opened = open_in(&foreign.path, 7);
        assert!(
            matches!(opened, Err(StorageError::Foreign { .. })),
            "{opened:?}"
        );
    }

    #[test]
    fn another_format_version_is_refused() {
        let dir = TempDir::new("version");
        drop(open_in(&dir.path, 1).unwrap());
        let path = dir.path.join(META_FILE);
        let mut bytes = fs::read(&path).unwrap();
        bytes[8..12].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
        fs::write(&path, &bytes).unwrap();
        let opened = open_in(&dir.path, 1);
        assert!(
            matches!(opened, Err(StorageError::Version { found, .. }) if found == FORMAT_VERSION + 1),
            "{opened:?}"
        );
    }

    #[test]
    fn a_commit_past_the_log_is_refused() {
        let (mut s, _) = GroupStorage::open(None, &[1], 1).unwrap();
        s.append(&entries(1, 2, 1)).unwrap();
        let refused = s.set_commit(3);
        assert!(
            matches!(
                refused,
                Err(StorageError::CommitBeyondLog {
                    commit: 3,
                    last_index: 2
                })
            ),
            "{refused:?}"
        );
        s.set_commit(2).unwrap();
    }

    #[test]
    fn superseded_records_never_grow_the_log_without_bound() {
        let dir = TempDir::new("bounded");
        let (mut s, _) = open_in(&dir.path, 1).unwrap();
        s.append(&entries(1, 1, 1)).unwrap();
        // 50 rounds append over 200 KiB, of which 4 KiB and a hard state stay live.
        for term in 1..=50 {
            // Each round overwrites entry 2 (4 KiB) and the hard state: only the last live.
            let mut big = entry(2, term);
            big.data = vec![term as u8; 4096].into();
            s.append(&[big]).unwrap();
            s.set_hard_state(&hard(term, 1, 1)).unwrap();
        }
        let bytes = s.disk_bytes().unwrap();
        assert!(bytes < REWRITE_SLACK + 16 * 1024, "{bytes} bytes");
        assert_eq!(fs::metadata(dir.path.join(LOG_FILE)).unwrap().len(), bytes);
        drop(s);
        let (s, _) = open_in(&dir.path, 1).unwrap();
        assert_eq!(s.hard_state(), &hard(50, 1, 1));
        assert_eq!(s.term(2), Ok(50));
        assert_eq!(s.log_len(), 2);
    }

    /// A single-voter state machine: the bytes of every applied normal entry, in order.
    #[derive(Default)]
    struct Machine {
        /// The applied data.
        data: Vec<u8>,
        /// The index applied last.
        applied: u64,
    }

    impl Machine {
        /// Applies committed entries.
        fn apply(&mut self, entries: Vec<Entry>) {
            for e in entries {
                self.data.extend_from_slice(&e.data);
                self.applied = e.index;
            }
        }
    }

    /// Runs the `Ready` loop of a single-voter node until it has nothing more to do,
    /// persisting through the storage as the module doc says.
    fn drive(node: &mut RawNode<GroupStorage>, machine: &mut Machine) {
        while node.has_ready() {
            let mut ready = node.ready();
            assert!(ready.messages().is_empty(), "a group of one sends nothing");
            if !ready.snapshot().is_empty() {
                let snap = ready.snapshot().clone();
                machine.data = snap.data.to_vec();
                machine.applied = snap.get_metadata().index;
                node.mut_store().apply_snapshot(snap).unwrap();
            }
            machine.apply(ready.take_committed_entries());
            node.mut_store().append(ready.entries()).unwrap();
            if let Some(hs) = ready.hs() {
                node.mut_store().set_hard_state(hs).unwrap();
            }
            assert!(ready.persisted_messages().is_empty());
            let mut light = node.advance(ready);
            if let Some(commit) = light.commit_index() {
                node.mut_store().set_commit(commit).unwrap();
            }
            machine.apply(light.take_committed_entries());
            node.advance_apply();
        }
    }

    /// A raft node of the single voter 1 on `storage`.
    fn node(storage: GroupStorage) -> RawNode<GroupStorage> {
        let logger = slog::Logger::root(slog_stdlog::StdLog.fuse(), slog::o!());
        let config = Config {
            id: 1,
            election_tick: 10,
            heartbeat_tick: 1,
            ..Config::default()
        };
        config.validate().unwrap();
        RawNode::new(&config, storage, &logger).unwrap()
    }

    /// Proposes `data` and runs the loop until it is applied.
    fn propose(node: &mut RawNode<GroupStorage>, machine: &mut Machine, data: &[u8]) {
        node.propose(vec![], data.to_vec()).unwrap();
        drive(node, machine);
        assert!(machine.data.ends_with(data), "{data:?} was not applied");
    }

    #[test]
    fn a_raw_node_runs_on_the_storage_through_compaction_and_restart() {
        let dir = TempDir::new("rawnode");
        let (storage, _) = GroupStorage::open(Some(&dir.path), &[1], 3).unwrap();
        let mut raft = node(storage);
        let mut machine = Machine::default();
        raft.campaign().unwrap();
        drive(&mut raft, &mut machine);
        assert_eq!(raft.raft.state, raft::StateRole::Leader);
        for b in b"abc" {
            propose(&mut raft, &mut machine, &[*b]);
        }
        let conf = raft.store().conf_state().clone();
        let (applied, image) = (machine.applied, machine.data.clone());
        raft.mut_store().compact(applied, image, conf).unwrap();
        for b in b"de" {
            propose(&mut raft, &mut machine, &[*b]);
        }
        assert_eq!(machine.data, b"abcde");
        let last = raft.store().last_index().unwrap();
        assert_eq!(raft.store().hard_state().commit, last);
        drop(raft);

        // Restart: the machine comes back from the snapshot, then the entries after it.
        let (storage, recovered) = GroupStorage::open(Some(&dir.path), &[1], 4).unwrap();
        assert!(!recovered.fresh);
        let snap = storage.latest_snapshot().unwrap().clone();
        let mut machine = Machine {
            data: snap.data.to_vec(),
            applied: snap.get_metadata().index,
        };
        assert_eq!(machine.data, b"abc");
        let mut raft = node(storage);
        drive(&mut raft, &mut machine);
        // The commit index is not durable: entries after the snapshot are committed again
        // once the node leads (a leader commits its log with its first entry).
        raft.campaign().unwrap();
        drive(&mut raft, &mut machine);
        assert_eq!(raft.raft.state, raft::StateRole::Leader);
        assert_eq!(machine.data, b"abcde");
        propose(&mut raft, &mut machine, b"f");
        assert_eq!(machine.data, b"abcdef");
    }
}
