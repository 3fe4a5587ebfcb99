//! Recovery points of one replica, kept as undo deltas.
//!
//! Taking a point copies nothing. Afterwards, the first time a chunk is
//! overwritten after the NEWEST point, the caller hands the chunk's old
//! contents to [`Points::save`], makes them durable with [`Points::sync`], and
//! only then overwrites the chunk. The replica itself therefore always holds
//! the current contents, and point `k` is rebuilt chunk by chunk: the record
//! from the oldest log among points `>= k` that holds the chunk (the earliest
//! overwrite after `k`), else the replica's current contents.
//!
//! On disk, in `STORE/NAME.points/`:
//!
//! * `index.toml`: geometry, the next id and the list of points, replaced
//!   atomically. While [`Points::remove`] appends records to an older log the
//!   index also carries a `merging` mark (the older log's length before the
//!   merge) so that an interrupted merge is undone on open.
//! * `<id as 16 hex digits>.undo`: one append-only log per point. A record is
//!   a 48-byte header followed by the chunk's old contents:
//!
//!   | offset | size | field                                  |
//!   |-------:|-----:|----------------------------------------|
//!   | 0      | 4    | magic `0x52554d42` ("BMUR")            |
//!   | 4      | 2    | version = 1                            |
//!   | 6      | 2    | reserved = 0                           |
//!   | 8      | 8    | chunk index                            |
//!   | 16     | 4    | data length (the chunk's length)       |
//!   | 20     | 4    | reserved = 0                           |
//!   | 24     | 16   | xxh3-128 of the data                   |
//!   | 40     | 8    | xxh3-64 of header bytes 0..40          |
//!
//!   All integers little-endian.
//!
//! Only the newest log is ever appended to by [`Points::save`], so a torn
//! record can only be its tail (a crash before the fsync, whose overwrite
//! never happened): it is cut off on open. A torn record in an older log is
//! an error. Memory is one map entry (chunk -> data offset) per logged chunk.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use xxhash_rust::xxh3::{xxh3_128, xxh3_64};

use crate::config;
use crate::error::{Error, IoContext, Result};
use crate::track::files::{read_toml, sync_dir, write_toml};

/// Points per volume at most.
pub const POINTS_MAX: usize = 1024;
/// Longest point name, in bytes.
pub const POINT_NAME_BYTES_MAX: usize = 64;
/// Size of a record header in an undo log.
pub const RECORD_HEADER_BYTES: usize = 48;

const INDEX_FORMAT: u32 = 1;
const INDEX_FILE: &str = "index.toml";
const RECORD_MAGIC: u32 = 0x5255_4d42;
const RECORD_VERSION: u16 = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum PointKind {
    Manual,
    Auto,
    Resync,
    Failback,
    SplitBrain,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct PointInfo {
    pub id: u64,
    pub name: String,
    pub kind: PointKind,
    pub created_unix: u64,
    /// Chunks saved in its undo log.
    pub chunks: u64,
    /// Size of its undo log in bytes.
    pub bytes: u64,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct IndexFile {
    format: u32,
    volume_bytes: u64,
    chunk_bytes: u32,
    #[serde(with = "crate::track::files::hex_u64")]
    next_id: u64,
    /// Present only while `remove` appends records to an older log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    merging: Option<MergeMark>,
    #[serde(default)]
    points: Vec<IndexPoint>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct MergeMark {
    /// The point whose log receives the records.
    #[serde(with = "crate::track::files::hex_u64")]
    into: u64,
    /// The point being removed.
    #[serde(with = "crate::track::files::hex_u64")]
    from: u64,
    /// Length of `into`'s log before the merge.
    into_bytes: u64,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct IndexPoint {
    #[serde(with = "crate::track::files::hex_u64")]
    id: u64,
    name: String,
    kind: PointKind,
    created_unix: u64,
}

/// One point and its loaded undo log.
struct Log {
    id: u64,
    name: String,
    kind: PointKind,
    created_unix: u64,
    path: PathBuf,
    /// Chunk index -> file offset of its data (first record wins).
    data_at: HashMap<u64, u64>,
    /// Valid length of the log file.
    bytes: u64,
}

impl Log {
    fn info(&self) -> PointInfo {
        PointInfo {
            id: self.id,
            name: self.name.clone(),
            kind: self.kind,
            created_unix: self.created_unix,
            chunks: self.data_at.len() as u64,
            bytes: self.bytes,
        }
    }
}

/// The recovery points of one volume.
pub struct Points {
    volume: String,
    dir: PathBuf,
    index_path: PathBuf,
    volume_bytes: u64,
    chunk_bytes: u32,
    next_id: u64,
    logs: Vec<Log>,
    /// The newest log, opened for writing (lazily).
    writer: Option<File>,
    /// Records appended to the newest log since its last fdatasync.
    unsynced: bool,
    /// A merge mark that could not be cleared after a failed merge; kept in
    /// every index written until the next open undoes it.
    merging: Option<MergeMark>,
}

/// Check a point name: 1..=64 characters of `[A-Za-z0-9._:-]`.
pub fn validate_point_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > POINT_NAME_BYTES_MAX {
        return Err(Error::Config(format!(
            "recovery point name {name:?} must be 1 to {POINT_NAME_BYTES_MAX} characters"
        )));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')))
    {
        return Err(Error::Config(format!(
            "recovery point name {name:?} contains {c:?}; allowed are A-Z a-z 0-9 . _ : -"
        )));
    }
    Ok(())
}

fn log_file_name(id: u64) -> String {
    format!("{id:016x}.undo")
}

/// The id of a `<16 hex digits>.undo` file name.
fn parse_log_file_name(name: &str) -> Option<u64> {
    let stem = name.strip_suffix(".undo")?;
    if stem.len() != 16 || !stem.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(stem, 16).ok()
}

fn encode_header(chunk: u64, data: &[u8]) -> [u8; RECORD_HEADER_BYTES] {
    let mut h = [0u8; RECORD_HEADER_BYTES];
    h[0..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
    h[4..6].copy_from_slice(&RECORD_VERSION.to_le_bytes());
    h[8..16].copy_from_slice(&chunk.to_le_bytes());
    h[16..20].copy_from_slice(&(data.len() as u32).to_le_bytes());
    h[24..40].copy_from_slice(&xxh3_128(data).to_le_bytes());
    let check = xxh3_64(&h[..40]);
    h[40..48].copy_from_slice(&check.to_le_bytes());
    h
}

struct RecordHeader {
    chunk: u64,
    len: u32,
    data_hash: u128,
}

fn decode_header(h: &[u8; RECORD_HEADER_BYTES]) -> std::result::Result<RecordHeader, String> {
    let u16_at = |o: usize| u16::from_le_bytes([h[o], h[o + 1]]);
    let u32_at = |o: usize| u32::from_le_bytes(h[o..o + 4].try_into().expect("4 bytes"));
    let u64_at = |o: usize| u64::from_le_bytes(h[o..o + 8].try_into().expect("8 bytes"));
    let magic = u32_at(0);
    if magic != RECORD_MAGIC {
        return Err(format!("bad magic {magic:#010x}"));
    }
    let check = u64_at(40);
    if check != xxh3_64(&h[..40]) {
        return Err("header checksum mismatch".into());
    }
    let version = u16_at(4);
    if version != RECORD_VERSION {
        return Err(format!("unsupported record version {version}"));
    }
    if u16_at(6) != 0 || u32_at(20) != 0 {
        return Err("reserved header fields are not zero".into());
    }
    Ok(RecordHeader {
        chunk: u64_at(8),
        len: u32_at(16),
        data_hash: u128::from_le_bytes(h[24..40].try_into().expect("16 bytes")),
    })
}

/// Result of scanning one undo log.
struct Scan {
    data_at: HashMap<u64, u64>,
    /// Length up to the end of the last valid record.
    valid: u64,
    /// Why the scan stopped before the end of the file, if it did.
    torn: Option<String>,
    /// Offset and header of the last valid record.
    last: Option<(u64, RecordHeader)>,
}

impl Points {
    /// Open the points of volume `name` in `store_dir` (nothing on disk yet is
    /// fine: no points). A geometry different from the index's is an error
    /// unless there are no points (then the index is rewritten).
    pub fn open(
        store_dir: &Path,
        name: &str,
        volume_bytes: u64,
        chunk_bytes: u32,
    ) -> Result<Points> {
        config::validate_volume_name(name).map_err(Error::Config)?;
        if !chunk_bytes.is_power_of_two()
            || !(config::CHUNK_BYTES_MIN..=config::CHUNK_BYTES_MAX).contains(&chunk_bytes)
        {
            return Err(Error::Config(format!(
                "volume {name}: chunk size {chunk_bytes} is not a power of two in {}..={}",
                config::CHUNK_BYTES_MIN,
                config::CHUNK_BYTES_MAX
            )));
        }
        if volume_bytes == 0 || volume_bytes > config::VOLUME_BYTES_MAX {
            return Err(Error::Config(format!(
                "volume {name}: size {volume_bytes} is outside 1..={}",
                config::VOLUME_BYTES_MAX
            )));
        }
        config::validate_geometry(volume_bytes, chunk_bytes).map_err(Error::Config)?;

        let dir = store_dir.join(format!("{name}.points"));
        let index_path = dir.join(INDEX_FILE);
        let mut points = Points {
            volume: name.to_string(),
            dir,
            index_path,
            volume_bytes,
            chunk_bytes,
            next_id: 1,
            logs: Vec::new(),
            writer: None,
            unsynced: false,
            merging: None,
        };
        let index: Option<IndexFile> = read_toml(&points.index_path)?;
        let Some(index) = index else {
            if points.dir.is_dir() {
                points.remove_orphans()?;
            }
            return Ok(points);
        };
        points.check_index(&index)?;
        points.next_id = index.next_id;
        let same_geometry = index.volume_bytes == volume_bytes && index.chunk_bytes == chunk_bytes;
        if !same_geometry && !index.points.is_empty() {
            return Err(Error::metadata(
                &points.index_path,
                format!(
                    "its {} recovery points were taken of a volume of {} bytes in {}-byte chunks, \
                     but volume {name} now has {volume_bytes} bytes in {chunk_bytes}-byte chunks; \
                     remove the points (the directory {}) to continue",
                    index.points.len(),
                    index.volume_bytes,
                    index.chunk_bytes,
                    points.dir.display()
                ),
            ));
        }

        if let Some(mark) = index.merging {
            points.undo_merge(&index, mark)?;
        }

        let count = index.points.len();
        for (k, p) in index.points.iter().enumerate() {
            let newest = k + 1 == count;
            let log = points.load_log(p, newest)?;
            points.logs.push(log);
        }
        if !same_geometry || index.merging.is_some() {
            points.write_index(|_| true)?;
        }
        points.remove_orphans()?;
        Ok(points)
    }

    fn check_index(&self, index: &IndexFile) -> Result<()> {
        let bad = |reason: String| Err(Error::metadata(&self.index_path, reason));
        if index.format != INDEX_FORMAT {
            return bad(format!(
                "format {} is not supported (expected {INDEX_FORMAT})",
                index.format
            ));
        }
        if index.points.len() > POINTS_MAX {
            return bad(format!(
                "lists {} points, more than the limit of {POINTS_MAX}",
                index.points.len()
            ));
        }
        if index.next_id == 0 {
            return bad("next_id is 0".into());
        }
        let mut prev = 0u64;
        for p in &index.points {
            if p.id == 0 || p.id <= prev || p.id >= index.next_id {
                return bad(format!(
                    "point id {} is out of order or not below next_id {}",
                    p.id, index.next_id
                ));
            }
            if let Err(e) = validate_point_name(&p.name) {
                return bad(format!("point {}: {e}", p.id));
            }
            prev = p.id;
        }
        Ok(())
    }

    /// An interrupted `remove` left records appended to `mark.into`'s log:
    /// cut them off (the removed point's log still holds them).
    fn undo_merge(&self, index: &IndexFile, mark: MergeMark) -> Result<()> {
        if !index.points.iter().any(|p| p.id == mark.into) {
            // Its log is no longer listed: deleted with the other orphans.
            return Ok(());
        }
        let path = self.dir.join(log_file_name(mark.into));
        let f = OpenOptions::new()
            .write(true)
            .open(&path)
            .ctx(|| format!("opening {} to undo an interrupted merge", path.display()))?;
        let len = f
            .metadata()
            .ctx(|| format!("stat {}", path.display()))?
            .len();
        if len > mark.into_bytes {
            tracing::warn!(
                volume = %self.volume,
                file = %path.display(),
                "undoing an interrupted removal of recovery point {}: cutting {} merged bytes",
                mark.from,
                len - mark.into_bytes
            );
            f.set_len(mark.into_bytes)
                .ctx(|| format!("truncating {}", path.display()))?;
            f.sync_data()
                .ctx(|| format!("fdatasync {}", path.display()))?;
        }
        Ok(())
    }

    fn load_log(&self, p: &IndexPoint, newest: bool) -> Result<Log> {
        let path = self.dir.join(log_file_name(p.id));
        let file = File::open(&path).ctx(|| {
            format!(
                "opening undo log {} of recovery point {} ({})",
                path.display(),
                p.id,
                p.name
            )
        })?;
        let mut scan = self.scan(&path, &file)?;
        if newest && scan.torn.is_none() {
            // The data of the last record is the part most likely torn by a
            // crash before the fsync; check it (one chunk read).
            if let Some((at, h)) = &scan.last {
                let mut data = vec![0u8; h.len as usize];
                file.read_exact_at(&mut data, at + RECORD_HEADER_BYTES as u64)
                    .ctx(|| format!("reading {}", path.display()))?;
                if xxh3_128(&data) != h.data_hash {
                    scan.torn = Some(format!(
                        "data checksum mismatch in the record at offset {at}"
                    ));
                    scan.valid = *at;
                    let cut = *at;
                    scan.data_at.retain(|_, off| *off < cut);
                }
            }
        }
        if let Some(reason) = &scan.torn {
            if !newest {
                return Err(Error::metadata(
                    &path,
                    format!(
                        "undo log of recovery point {} ({}) is damaged after {} valid bytes: {reason}",
                        p.id, p.name, scan.valid
                    ),
                ));
            }
            tracing::warn!(
                volume = %self.volume,
                file = %path.display(),
                "cutting a torn tail of the newest undo log at offset {}: {reason}",
                scan.valid
            );
            let w = OpenOptions::new()
                .write(true)
                .open(&path)
                .ctx(|| format!("opening {} to cut its torn tail", path.display()))?;
            w.set_len(scan.valid)
                .ctx(|| format!("truncating {}", path.display()))?;
            w.sync_data()
                .ctx(|| format!("fdatasync {}", path.display()))?;
        }
        Ok(Log {
            id: p.id,
            name: p.name.clone(),
            kind: p.kind,
            created_unix: p.created_unix,
            path,
            data_at: scan.data_at,
            bytes: scan.valid,
        })
    }

    /// Read the record headers of a log, seeking over the data.
    fn scan(&self, path: &Path, file: &File) -> Result<Scan> {
        let file_len = file
            .metadata()
            .ctx(|| format!("stat {}", path.display()))?
            .len();
        let chunks = self.chunk_count();
        let mut scan = Scan {
            data_at: HashMap::new(),
            valid: 0,
            torn: None,
            last: None,
        };
        let mut pos = 0u64;
        let mut h = [0u8; RECORD_HEADER_BYTES];
        while pos < file_len {
            if file_len - pos < RECORD_HEADER_BYTES as u64 {
                scan.torn = Some(format!(
                    "the record header at offset {pos} is cut short ({} of {RECORD_HEADER_BYTES} bytes)",
                    file_len - pos
                ));
                break;
            }
            file.read_exact_at(&mut h, pos)
                .ctx(|| format!("reading {} at offset {pos}", path.display()))?;
            let header = match decode_header(&h) {
                Ok(header) => header,
                Err(reason) => {
                    scan.torn = Some(format!("record at offset {pos}: {reason}"));
                    break;
                }
            };
            if header.chunk >= chunks {
                scan.torn = Some(format!(
                    "record at offset {pos}: chunk {} is beyond the volume's {chunks} chunks",
                    header.chunk
                ));
                break;
            }
            let want = self.chunk_len(header.chunk);
            if header.len != want {
                scan.torn = Some(format!(
                    "record at offset {pos}: data length {} is not chunk {}'s length {want}",
                    header.len, header.chunk
                ));
                break;
            }
            let end = pos + RECORD_HEADER_BYTES as u64 + header.len as u64;
            if end > file_len {
                scan.torn = Some(format!(
                    "record at offset {pos}: data cut short ({} of {} bytes)",
                    file_len - pos - RECORD_HEADER_BYTES as u64,
                    header.len
                ));
                break;
            }
            scan.data_at
                .entry(header.chunk)
                .or_insert(pos + RECORD_HEADER_BYTES as u64);
            scan.last = Some((pos, header));
            pos = end;
            scan.valid = end;
        }
        Ok(scan)
    }

    /// Delete `.undo` files whose point is not listed: left by a crash during
    /// `create` (before the index) or `remove`/`rollback` (after the index).
    fn remove_orphans(&self) -> Result<()> {
        let listed: HashSet<u64> = self.logs.iter().map(|l| l.id).collect();
        let entries = fs::read_dir(&self.dir).ctx(|| format!("listing {}", self.dir.display()))?;
        let mut removed = false;
        for entry in entries {
            let entry = entry.ctx(|| format!("listing {}", self.dir.display()))?;
            let file_name = entry.file_name();
            let Some(id) = file_name.to_str().and_then(parse_log_file_name) else {
                continue;
            };
            if listed.contains(&id) {
                continue;
            }
            let path = entry.path();
            tracing::info!(volume = %self.volume, file = %path.display(), "removing an undo log no point refers to");
            fs::remove_file(&path).ctx(|| format!("removing {}", path.display()))?;
            removed = true;
        }
        if removed {
            sync_dir(&self.dir)?;
        }
        Ok(())
    }

    fn chunk_count(&self) -> u64 {
        config::chunk_count(self.volume_bytes, self.chunk_bytes)
    }

    fn chunk_len(&self, i: u64) -> u32 {
        config::chunk_len(self.volume_bytes, self.chunk_bytes, i)
    }

    fn position(&self, id: u64) -> Result<usize> {
        self.logs.iter().position(|l| l.id == id).ok_or_else(|| {
            Error::Other(format!(
                "volume {}: there is no recovery point {id}",
                self.volume
            ))
        })
    }

    fn check_chunk(&self, i: u64) -> Result<()> {
        let chunks = self.chunk_count();
        if i >= chunks {
            return Err(Error::Other(format!(
                "volume {}: chunk {i} is beyond its {chunks} chunks",
                self.volume
            )));
        }
        Ok(())
    }

    /// Write the index listing the points for which `keep(id)` holds.
    fn write_index(&self, keep: impl Fn(u64) -> bool) -> Result<()> {
        let index = IndexFile {
            format: INDEX_FORMAT,
            volume_bytes: self.volume_bytes,
            chunk_bytes: self.chunk_bytes,
            next_id: self.next_id,
            merging: self.merging,
            points: self
                .logs
                .iter()
                .filter(|l| keep(l.id))
                .map(|l| IndexPoint {
                    id: l.id,
                    name: l.name.clone(),
                    kind: l.kind,
                    created_unix: l.created_unix,
                })
                .collect(),
        };
        write_toml(&self.index_path, &index)
    }

    /// Open the newest log for writing if it is not open yet.
    fn ensure_writer(&mut self) -> Result<()> {
        if self.writer.is_some() {
            return Ok(());
        }
        let log = self.logs.last().ok_or_else(|| {
            Error::Other(format!(
                "volume {}: there is no recovery point",
                self.volume
            ))
        })?;
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&log.path)
            .ctx(|| format!("opening undo log {}", log.path.display()))?;
        self.writer = Some(f);
        Ok(())
    }

    /// Read and verify the record of chunk `i` whose data is at `data_at` in
    /// `log`; returns header and data together.
    fn read_record(&self, log: &Log, file: &File, i: u64, data_at: u64) -> Result<Vec<u8>> {
        let len = self.chunk_len(i) as usize;
        let at = data_at - RECORD_HEADER_BYTES as u64;
        let mut buf = vec![0u8; RECORD_HEADER_BYTES + len];
        file.read_exact_at(&mut buf, at).ctx(|| {
            format!(
                "reading chunk {i} from undo log {} at offset {at}",
                log.path.display()
            )
        })?;
        let h: &[u8; RECORD_HEADER_BYTES] = buf[..RECORD_HEADER_BYTES].try_into().expect("header");
        let header = decode_header(h).map_err(|reason| {
            Error::metadata(
                &log.path,
                format!("record of chunk {i} at offset {at}: {reason}"),
            )
        })?;
        if header.chunk != i || header.len as usize != len {
            return Err(Error::metadata(
                &log.path,
                format!(
                    "record at offset {at} holds chunk {} ({} bytes), expected chunk {i} ({len} bytes)",
                    header.chunk, header.len
                ),
            ));
        }
        if xxh3_128(&buf[RECORD_HEADER_BYTES..]) != header.data_hash {
            return Err(Error::metadata(
                &log.path,
                format!(
                    "the saved contents of chunk {i} (record at offset {at}) do not match their checksum"
                ),
            ));
        }
        Ok(buf)
    }

    fn open_log(log: &Log) -> Result<File> {
        File::open(&log.path).ctx(|| {
            format!(
                "opening undo log {} of recovery point {} ({})",
                log.path.display(),
                log.id,
                log.name
            )
        })
    }

    /// All points, oldest first.
    pub fn list(&self) -> Vec<PointInfo> {
        self.logs.iter().map(Log::info).collect()
    }

    pub fn get(&self, id: u64) -> Option<PointInfo> {
        self.logs.iter().find(|l| l.id == id).map(Log::info)
    }

    /// No points: nothing is ever saved.
    pub fn is_empty(&self) -> bool {
        self.logs.is_empty()
    }

    pub fn newest(&self) -> Option<PointInfo> {
        self.logs.last().map(Log::info)
    }

    /// Take a point now. The caller has made the replica durable first.
    /// Returns the new point's id.
    pub fn create(&mut self, name: &str, kind: PointKind, now_unix: u64) -> Result<u64> {
        validate_point_name(name)?;
        if self.logs.len() >= POINTS_MAX {
            return Err(Error::Other(format!(
                "volume {}: cannot create recovery point {name:?}: it already has {POINTS_MAX} points, the limit; remove some first",
                self.volume
            )));
        }
        self.settle_merge()?;
        // The current newest log stops being appended to: its records must
        // be complete on disk before it becomes an older log.
        self.sync()?;
        if !self.dir.is_dir() {
            fs::create_dir_all(&self.dir)
                .ctx(|| format!("creating directory {}", self.dir.display()))?;
            if let Some(parent) = self.dir.parent() {
                sync_dir(parent)?;
            }
        }
        let id = self.next_id;
        let path = self.dir.join(log_file_name(id));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .ctx(|| format!("creating undo log {}", path.display()))?;
        file.sync_all()
            .ctx(|| format!("fsync {}", path.display()))?;
        sync_dir(&self.dir)?;
        self.logs.push(Log {
            id,
            name: name.to_string(),
            kind,
            created_unix: now_unix,
            path: path.clone(),
            data_at: HashMap::new(),
            bytes: 0,
        });
        self.next_id += 1;
        if let Err(e) = self.write_index(|_| true) {
            self.logs.pop();
            self.next_id -= 1;
            let _ = fs::remove_file(&path);
            return Err(e);
        }
        self.writer = Some(file);
        self.unsynced = false;
        Ok(id)
    }

    /// Whether the old contents of chunk `i` must be saved before it is
    /// overwritten: a point exists and the newest point's log lacks `i`
    /// (false for a chunk beyond the volume).
    pub fn needs_save(&self, i: u64) -> bool {
        match self.logs.last() {
            Some(log) => i < self.chunk_count() && !log.data_at.contains_key(&i),
            None => false,
        }
    }

    /// Append the old contents of chunk `i` to the newest point's log. Not
    /// durable until [`Points::sync`]. Saving a chunk the log already holds
    /// is a no-op (the first record is the right one).
    pub fn save(&mut self, i: u64, old: &[u8]) -> Result<()> {
        self.check_chunk(i)?;
        let want = self.chunk_len(i) as usize;
        let Some(log) = self.logs.last() else {
            return Err(Error::Other(format!(
                "volume {}: no recovery point to save chunk {i} for",
                self.volume
            )));
        };
        if old.len() != want {
            return Err(Error::Other(format!(
                "volume {}: saving chunk {i} into {}: {} bytes given, the chunk has {want}",
                self.volume,
                log.path.display(),
                old.len()
            )));
        }
        if log.data_at.contains_key(&i) {
            return Ok(());
        }
        self.settle_merge()?;
        let log = self.logs.last().expect("checked above");
        let at = log.bytes;
        let mut buf = Vec::with_capacity(RECORD_HEADER_BYTES + old.len());
        buf.extend_from_slice(&encode_header(i, old));
        buf.extend_from_slice(old);
        self.ensure_writer()?;
        let file = self.writer.as_ref().expect("just opened");
        let log = self.logs.last_mut().expect("checked above");
        if let Err(e) = file.write_all_at(&buf, at) {
            // Leave no partial record behind the valid length.
            let _ = file.set_len(at);
            return Err(Error::io(
                format!(
                    "appending chunk {i} to undo log {} at offset {at}",
                    log.path.display()
                ),
                e,
            ));
        }
        log.data_at.insert(i, at + RECORD_HEADER_BYTES as u64);
        log.bytes = at + buf.len() as u64;
        self.unsynced = true;
        Ok(())
    }

    /// Make every saved record durable (fdatasync of the newest log).
    pub fn sync(&mut self) -> Result<()> {
        if !self.unsynced {
            return Ok(());
        }
        self.ensure_writer()?;
        let file = self.writer.as_ref().expect("just opened");
        let log = self.logs.last().expect("a writer implies a point");
        file.sync_data()
            .ctx(|| format!("fdatasync undo log {}", log.path.display()))?;
        self.unsynced = false;
        Ok(())
    }

    /// Contents of chunk `i` as of point `id`: `Some` from the oldest log
    /// among points `>= id` that holds it, `None` if unchanged since the
    /// point (read the replica).
    pub fn chunk_at(&self, id: u64, i: u64) -> Result<Option<Vec<u8>>> {
        let k = self.position(id)?;
        self.check_chunk(i)?;
        for log in &self.logs[k..] {
            if let Some(&off) = log.data_at.get(&i) {
                let file = Self::open_log(log)?;
                let mut buf = self.read_record(log, &file, i, off)?;
                buf.drain(..RECORD_HEADER_BYTES);
                return Ok(Some(buf));
            }
        }
        Ok(None)
    }

    /// Chunks whose contents at point `id` may differ from the replica's:
    /// the sorted union of the chunk sets of points `>= id`.
    pub fn changed_since(&self, id: u64) -> Result<Vec<u64>> {
        let k = self.position(id)?;
        let mut out: Vec<u64> = self.logs[k..]
            .iter()
            .flat_map(|l| l.data_at.keys().copied())
            .collect();
        out.sort_unstable();
        out.dedup();
        Ok(out)
    }

    /// Remove point `id`, keeping older points restorable: records of its
    /// log for chunks the next older point's log lacks are appended there
    /// (then fdatasync), then the index is rewritten, then the file deleted.
    /// Returns bytes freed (its log's size minus bytes appended).
    pub fn remove(&mut self, id: u64) -> Result<u64> {
        let k = self.position(id)?;
        self.settle_merge()?;
        let removed_bytes = self.logs[k].bytes;
        let mark = if k > 0 {
            self.merge_into_older(k)?
        } else {
            None
        };
        if let Err(e) = self.write_index(|p| p != id) {
            if let Some(mark) = mark {
                self.cut_back(k - 1, mark);
            }
            return Err(e);
        }
        let appended = mark.map_or(0, |m| self.logs[k - 1].bytes - m.into_bytes);
        if k + 1 == self.logs.len() {
            // The writer belonged to the removed (newest) log.
            self.writer = None;
            self.unsynced = false;
        }
        let log = self.logs.remove(k);
        self.delete_logs(std::slice::from_ref(&log))?;
        Ok(removed_bytes.saturating_sub(appended))
    }

    /// Delete the files of logs the index no longer lists. A failure is only
    /// logged: the next open deletes unlisted files.
    fn delete_logs(&self, logs: &[Log]) -> Result<()> {
        let mut deleted = false;
        for log in logs {
            match fs::remove_file(&log.path) {
                Ok(()) => deleted = true,
                Err(e) => tracing::warn!(
                    volume = %self.volume,
                    file = %log.path.display(),
                    "cannot delete the undo log of removed point {}: {e}",
                    log.id
                ),
            }
        }
        if deleted {
            sync_dir(&self.dir)?;
        }
        Ok(())
    }

    /// After a failed merge whose cut-back failed too, retry the cut; until
    /// it succeeds (or the points are reopened) nothing else may change.
    fn settle_merge(&mut self) -> Result<()> {
        let Some(stale) = self.merging else {
            return Ok(());
        };
        match self.logs.iter().position(|l| l.id == stale.into) {
            Some(j) => {
                self.merging = None;
                self.cut_back(j, stale);
            }
            None => self.merging = None,
        }
        match self.merging {
            None => Ok(()),
            Some(stale) => Err(Error::Other(format!(
                "volume {}: an interrupted merge into recovery point {} could not be undone; reopen the points",
                self.volume, stale.into
            ))),
        }
    }

    /// Append the records of `logs[k]` whose chunks `logs[k - 1]` lacks to
    /// `logs[k - 1]`, durably, under a merge mark in the index. Returns the
    /// mark (the older log's previous length) if anything was appended. On
    /// error the older log is cut back.
    fn merge_into_older(&mut self, k: usize) -> Result<Option<MergeMark>> {
        let (older, this) = (&self.logs[k - 1], &self.logs[k]);
        let mut missing: Vec<(u64, u64)> = this
            .data_at
            .iter()
            .filter(|(c, _)| !older.data_at.contains_key(c))
            .map(|(&c, &off)| (c, off))
            .collect();
        if missing.is_empty() {
            return Ok(None);
        }
        missing.sort_unstable_by_key(|&(_, off)| off);
        let mark = MergeMark {
            into: older.id,
            from: this.id,
            into_bytes: older.bytes,
        };
        self.merging = Some(mark);
        let marked = self.write_index(|_| true);
        self.merging = None;
        marked?;
        let (older, this) = (&self.logs[k - 1], &self.logs[k]);
        let result = (|| {
            let dst = OpenOptions::new()
                .write(true)
                .open(&older.path)
                .ctx(|| format!("opening undo log {}", older.path.display()))?;
            let src = Self::open_log(this)?;
            let mut pos = mark.into_bytes;
            let mut added = Vec::with_capacity(missing.len());
            for &(c, off) in &missing {
                let buf = self.read_record(this, &src, c, off)?;
                dst.write_all_at(&buf, pos).ctx(|| {
                    format!(
                        "appending chunk {c} to undo log {} at offset {pos}",
                        older.path.display()
                    )
                })?;
                added.push((c, pos + RECORD_HEADER_BYTES as u64));
                pos += buf.len() as u64;
            }
            dst.sync_data()
                .ctx(|| format!("fdatasync undo log {}", older.path.display()))?;
            Ok((added, pos))
        })();
        match result {
            Ok((added, pos)) => {
                let older = &mut self.logs[k - 1];
                older.data_at.extend(added);
                older.bytes = pos;
                Ok(Some(mark))
            }
            Err(e) => {
                self.cut_back(k - 1, mark);
                Err(e)
            }
        }
    }

    /// Cut `logs[j]` back to `mark.into_bytes` after a failed merge and clear
    /// the mark on disk. If the cut fails, keep the mark in every index
    /// written so that the next open cuts the log.
    fn cut_back(&mut self, j: usize, mark: MergeMark) {
        let log = &mut self.logs[j];
        let end = mark.into_bytes;
        log.data_at.retain(|_, off| *off < end);
        log.bytes = end;
        let cut = OpenOptions::new()
            .write(true)
            .open(&log.path)
            .and_then(|f| {
                f.set_len(end)?;
                f.sync_data()
            });
        match cut {
            Ok(()) => {
                if let Err(e) = self.write_index(|_| true) {
                    // The index on disk keeps the mark: harmless, the next
                    // open cuts the log to the same length.
                    tracing::warn!(volume = %self.volume, "cannot clear a merge mark: {e}");
                }
            }
            Err(e) => {
                tracing::warn!(
                    volume = %self.volume,
                    file = %log.path.display(),
                    "cannot cut back an interrupted merge: {e}; the next open will"
                );
                self.merging = Some(mark);
            }
        }
    }

    /// Roll the replica back to point `id`: write every chunk of
    /// `changed_since(id)` with its contents at the point, call
    /// `sync_replica`, then delete points `>= id` without merging (index
    /// first, then files). Returns chunks written. After a crash or an error
    /// the points are still in place and the rollback can be repeated.
    pub fn rollback(
        &mut self,
        id: u64,
        write: &mut dyn FnMut(u64, &[u8]) -> Result<()>,
        sync_replica: &mut dyn FnMut() -> Result<()>,
    ) -> Result<u64> {
        let k = self.position(id)?;
        self.settle_merge()?;
        // Each changed chunk comes from the oldest log >= id holding it; read
        // log by log in file order.
        let mut taken: HashSet<u64> = HashSet::new();
        let mut written = 0u64;
        for log in &self.logs[k..] {
            let mut mine: Vec<(u64, u64)> = log
                .data_at
                .iter()
                .filter(|(c, _)| !taken.contains(c))
                .map(|(&c, &off)| (c, off))
                .collect();
            if mine.is_empty() {
                continue;
            }
            mine.sort_unstable_by_key(|&(_, off)| off);
            let file = Self::open_log(log)?;
            for &(c, off) in &mine {
                let buf = self.read_record(log, &file, c, off)?;
                write(c, &buf[RECORD_HEADER_BYTES..])?;
                taken.insert(c);
                written += 1;
            }
        }
        sync_replica()?;
        let first_removed = self.logs[k].id;
        self.write_index(|p| p < first_removed)?;
        self.writer = None;
        self.unsynced = false;
        let removed = self.logs.split_off(k);
        self.delete_logs(&removed)?;
        Ok(written)
    }

    /// Retention for points of kind `Auto`: keep the newest Auto point of
    /// each of the last `keep_hourly` hours and of each of the last
    /// `keep_daily` days (counting back from `now_unix`'s hour and day; a
    /// timestamp in the future counts as now), remove every other Auto point
    /// with [`Points::remove`]. Returns the removed ids and bytes freed.
    pub fn prune(
        &mut self,
        keep_hourly: u32,
        keep_daily: u32,
        now_unix: u64,
    ) -> Result<(Vec<u64>, u64)> {
        self.prune_keep(0, keep_hourly, keep_daily, now_unix)
    }

    /// [`Points::prune`], also keeping the `keep_last` newest Auto points.
    pub fn prune_keep(
        &mut self,
        keep_last: u32,
        keep_hourly: u32,
        keep_daily: u32,
        now_unix: u64,
    ) -> Result<(Vec<u64>, u64)> {
        let newest: Vec<u64> = self
            .logs
            .iter()
            .rev()
            .filter(|l| l.kind == PointKind::Auto)
            .take(keep_last as usize)
            .map(|l| l.id)
            .collect();
        let mut hourly: HashMap<u64, u64> = HashMap::new();
        let mut daily: HashMap<u64, u64> = HashMap::new();
        let now_hour = now_unix / 3600;
        let now_day = now_unix / 86400;
        // Oldest first: a later point of the same bucket replaces an earlier.
        for log in self.logs.iter().filter(|l| l.kind == PointKind::Auto) {
            let t = log.created_unix.min(now_unix);
            if now_hour - t / 3600 < keep_hourly as u64 {
                hourly.insert(t / 3600, log.id);
            }
            if now_day - t / 86400 < keep_daily as u64 {
                daily.insert(t / 86400, log.id);
            }
        }
        let keep: HashSet<u64> = hourly
            .values()
            .chain(daily.values())
            .chain(newest.iter())
            .copied()
            .collect();
        let doomed: Vec<u64> = self
            .logs
            .iter()
            .filter(|l| l.kind == PointKind::Auto && !keep.contains(&l.id))
            .map(|l| l.id)
            .collect();
        let mut freed = 0u64;
        let mut removed = Vec::with_capacity(doomed.len());
        // Oldest first: removing the oldest point merges nothing.
        for id in doomed {
            freed += self.remove(id)?;
            removed.push(id);
        }
        Ok((removed, freed))
    }

    /// Bytes used by all undo logs.
    pub fn total_bytes(&self) -> u64 {
        self.logs.iter().map(|l| l.bytes).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use std::collections::BTreeMap;
    use std::ops::Range;

    const CHUNK: u32 = 4096;
    /// 64 chunks, the last one 3072 bytes.
    const VOLUME: u64 = 64 * 4096 - 1024;

    /// A simulated replica with its points and a snapshot taken at each point.
    struct Sim {
        dir: tempfile::TempDir,
        points: Points,
        image: Vec<u8>,
        snaps: BTreeMap<u64, Vec<u8>>,
        now: u64,
    }

    impl Sim {
        fn new(rng: &mut StdRng) -> Sim {
            let dir = tempfile::tempdir().unwrap();
            let points = Points::open(dir.path(), "vol", VOLUME, CHUNK).unwrap();
            let mut image = vec![0u8; VOLUME as usize];
            rng.fill(&mut image[..]);
            Sim {
                dir,
                points,
                image,
                snaps: BTreeMap::new(),
                now: 1_700_000_000,
            }
        }

        fn chunks(&self) -> u64 {
            VOLUME.div_ceil(CHUNK as u64)
        }

        fn range(i: u64) -> Range<usize> {
            let start = (i * CHUNK as u64) as usize;
            start..(start + CHUNK as usize).min(VOLUME as usize)
        }

        /// The caller's protocol: save old contents, sync, then overwrite.
        fn write(&mut self, rng: &mut StdRng, touched: &[u64]) {
            for &i in touched {
                if self.points.needs_save(i) {
                    self.points.save(i, &self.image[Self::range(i)]).unwrap();
                }
            }
            self.points.sync().unwrap();
            for &i in touched {
                let r = Self::range(i);
                let a = rng.gen_range(r.start..r.end);
                let b = rng.gen_range(a..r.end) + 1;
                rng.fill(&mut self.image[a..b]);
            }
        }

        fn random_write(&mut self, rng: &mut StdRng, n: usize) {
            let chunks = self.chunks();
            let touched: Vec<u64> = (0..n).map(|_| rng.gen_range(0..chunks)).collect();
            self.write(rng, &touched);
        }

        fn take(&mut self, kind: PointKind) -> u64 {
            let name = format!("p-{}", self.now);
            let id = self.points.create(&name, kind, self.now).unwrap();
            self.snaps.insert(id, self.image.clone());
            self.now += 600;
            id
        }

        fn rebuild(&self, id: u64) -> Vec<u8> {
            let changed: HashSet<u64> =
                self.points.changed_since(id).unwrap().into_iter().collect();
            let mut out = self.image.clone();
            for i in 0..self.chunks() {
                match self.points.chunk_at(id, i).unwrap() {
                    Some(data) => {
                        assert!(changed.contains(&i), "chunk {i} of point {id}");
                        out[Self::range(i)].copy_from_slice(&data);
                    }
                    None => assert!(!changed.contains(&i), "chunk {i} of point {id}"),
                }
            }
            out
        }

        fn check(&self) {
            let list = self.points.list();
            let ids: Vec<u64> = list.iter().map(|p| p.id).collect();
            let want: Vec<u64> = self.snaps.keys().copied().collect();
            assert_eq!(ids, want);
            let mut total = 0;
            for p in &list {
                assert!(
                    self.rebuild(p.id) == self.snaps[&p.id],
                    "point {} differs",
                    p.id
                );
                let path = self.points.dir.join(log_file_name(p.id));
                assert_eq!(fs::metadata(&path).unwrap().len(), p.bytes);
                total += p.bytes;
            }
            assert_eq!(self.points.total_bytes(), total);
            assert_eq!(self.points.newest().map(|p| p.id), ids.last().copied());
        }

        fn reopen(&mut self) {
            self.points = Points::open(self.dir.path(), "vol", VOLUME, CHUNK).unwrap();
        }

        fn log_path(&self, id: u64) -> PathBuf {
            self.dir.path().join("vol.points").join(log_file_name(id))
        }
    }

    fn err_text<T>(r: Result<T>) -> String {
        match r {
            Ok(_) => panic!("expected an error"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn model_points_rebuild_exactly() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut sim = Sim::new(&mut rng);
        assert!(!sim.points.needs_save(0));
        sim.random_write(&mut rng, 10);
        for phase in 0..6 {
            sim.take(if phase % 2 == 0 {
                PointKind::Manual
            } else {
                PointKind::Auto
            });
            sim.random_write(&mut rng, 5 + phase * 4);
            sim.check();
        }
        // The last chunk (shorter) and the first are covered too.
        sim.write(&mut rng, &[0, 63]);
        sim.check();
        sim.reopen();
        sim.check();
        let info = sim.points.newest().unwrap();
        assert!(info.chunks > 0 && info.bytes > 0);
        assert_eq!(
            info.bytes,
            info.chunks * RECORD_HEADER_BYTES as u64
                + sim
                    .points
                    .changed_since(info.id)
                    .unwrap()
                    .iter()
                    .map(|&i| sim.points.chunk_len(i) as u64)
                    .sum::<u64>()
        );
    }

    #[test]
    fn remove_middle_oldest_newest_keeps_others_exact() {
        let mut rng = StdRng::seed_from_u64(2);
        let mut sim = Sim::new(&mut rng);
        let mut ids = Vec::new();
        for _ in 0..5 {
            ids.push(sim.take(PointKind::Manual));
            sim.random_write(&mut rng, 20);
        }
        sim.check();
        for id in [ids[2], ids[0], ids[4]] {
            let before = sim.points.total_bytes();
            let freed = sim.points.remove(id).unwrap();
            sim.snaps.remove(&id);
            assert_eq!(before - sim.points.total_bytes(), freed);
            assert!(!sim.log_path(id).exists());
            assert!(sim.points.get(id).is_none());
            sim.check();
        }
        // The newest is now ids[3]: writing continues into it.
        assert_eq!(sim.points.newest().unwrap().id, ids[3]);
        sim.random_write(&mut rng, 20);
        sim.check();
        sim.reopen();
        sim.check();
        sim.random_write(&mut rng, 10);
        sim.check();
        // Removing everything leaves no files.
        for id in [ids[3], ids[1]] {
            sim.points.remove(id).unwrap();
            sim.snaps.remove(&id);
            sim.check();
        }
        assert!(!sim.points.needs_save(5));
        assert_eq!(sim.points.total_bytes(), 0);
        sim.reopen();
        sim.check();
    }

    #[test]
    fn prune_keeps_newest_auto_per_hour_and_day() {
        let mut rng = StdRng::seed_from_u64(3);
        let mut sim = Sim::new(&mut rng);
        let day = 86400u64;
        let hour = 3600u64;
        let now = 10 * day + 5 * hour + 100;
        let at = |sim: &mut Sim, kind, t: u64, rng: &mut StdRng| {
            sim.now = t;
            let id = sim.take(kind);
            sim.random_write(rng, 8);
            id
        };
        let a = at(&mut sim, PointKind::Auto, 7 * day + hour, &mut rng);
        let b = at(&mut sim, PointKind::Auto, 8 * day + 2 * hour, &mut rng);
        let c = at(&mut sim, PointKind::Auto, 8 * day + 20 * hour, &mut rng);
        let m = at(&mut sim, PointKind::Manual, 9 * day + hour, &mut rng);
        let d = at(&mut sim, PointKind::Auto, 9 * day + 5 * hour, &mut rng);
        let e = at(&mut sim, PointKind::Auto, 10 * day + 3 * hour, &mut rng);
        let f = at(&mut sim, PointKind::Auto, 10 * day + 4 * hour, &mut rng);
        let g = at(
            &mut sim,
            PointKind::Auto,
            10 * day + 4 * hour + 1800,
            &mut rng,
        );
        let h = at(&mut sim, PointKind::Auto, 10 * day + 5 * hour, &mut rng);
        let r = at(
            &mut sim,
            PointKind::Resync,
            10 * day + 5 * hour + 50,
            &mut rng,
        );
        sim.check();
        let before = sim.points.total_bytes();
        let (removed, freed) = sim.points.prune(2, 3, now).unwrap();
        assert_eq!(removed, vec![a, b, e, f]);
        assert!(freed > 0);
        assert_eq!(before - sim.points.total_bytes(), freed);
        for id in &removed {
            sim.snaps.remove(id);
        }
        let kept: Vec<u64> = sim.points.list().iter().map(|p| p.id).collect();
        assert_eq!(kept, vec![c, m, d, g, h, r]);
        sim.check();
        // Nothing more to prune with the same policy.
        assert_eq!(sim.points.prune(2, 3, now).unwrap().0, Vec::<u64>::new());
        // A day later, keeping one hour and one day keeps nothing of these.
        let (removed, _) = sim.points.prune(1, 1, now + day).unwrap();
        assert_eq!(removed, vec![c, d, g, h]);
        for id in &removed {
            sim.snaps.remove(id);
        }
        sim.check();
        sim.reopen();
        sim.check();
    }

    #[test]
    fn rollback_restores_snapshot_and_drops_newer_points() {
        let mut rng = StdRng::seed_from_u64(4);
        let mut sim = Sim::new(&mut rng);
        let mut ids = Vec::new();
        for _ in 0..4 {
            ids.push(sim.take(PointKind::Resync));
            sim.random_write(&mut rng, 15);
        }
        let target = ids[1];
        let changed = sim.points.changed_since(target).unwrap();

        // An error in the middle leaves the points in place.
        let mut image = sim.image.clone();
        let mut n = 0;
        let err = sim.points.rollback(
            target,
            &mut |i, data| {
                if n == 5 {
                    return Err(Error::Other("disk full".into()));
                }
                n += 1;
                image[Sim::range(i)].copy_from_slice(data);
                Ok(())
            },
            &mut || Ok(()),
        );
        assert!(err.is_err());
        assert_eq!(sim.points.list().len(), 4);
        sim.image = image;
        sim.reopen();

        // Repeating it completes.
        let mut image = sim.image.clone();
        let synced = std::cell::Cell::new(false);
        let written = sim
            .points
            .rollback(
                target,
                &mut |i, data| {
                    assert!(!synced.get());
                    image[Sim::range(i)].copy_from_slice(data);
                    Ok(())
                },
                &mut || {
                    synced.set(true);
                    Ok(())
                },
            )
            .unwrap();
        assert!(synced.get());
        assert_eq!(written, changed.len() as u64);
        assert!(image == sim.snaps[&target]);
        sim.image = image;
        for id in &ids[1..] {
            sim.snaps.remove(id);
            assert!(!sim.log_path(*id).exists());
        }
        sim.check();
        // Life goes on: writes are saved into the older point, new points work.
        sim.random_write(&mut rng, 10);
        sim.take(PointKind::Manual);
        sim.random_write(&mut rng, 10);
        sim.check();
        sim.reopen();
        sim.check();
    }

    /// Save (and sync) a few chunks the newest log lacks without overwriting
    /// them, as if a crash came before the overwrite. Returns the log's size
    /// before the last record.
    fn save_pending(sim: &mut Sim, n: usize) -> u64 {
        let mut before_last = 0;
        let mut saved = 0;
        for i in 0..sim.chunks() {
            if saved == n {
                break;
            }
            if sim.points.needs_save(i) {
                before_last = sim.points.newest().unwrap().bytes;
                sim.points.save(i, &sim.image[Sim::range(i)]).unwrap();
                saved += 1;
            }
        }
        assert_eq!(saved, n);
        sim.points.sync().unwrap();
        before_last
    }

    #[test]
    fn torn_tail_of_newest_log_is_cut_on_reopen() {
        let mut rng = StdRng::seed_from_u64(5);
        let mut sim = Sim::new(&mut rng);
        sim.take(PointKind::Manual);
        sim.random_write(&mut rng, 10);
        let newest = sim.take(PointKind::Manual);
        sim.random_write(&mut rng, 10);
        let path = sim.log_path(newest);

        // Cut in the middle of the last record's data.
        let before_last = save_pending(&mut sim, 3);
        let len = fs::metadata(&path).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len - 100)
            .unwrap();
        sim.reopen();
        assert_eq!(fs::metadata(&path).unwrap().len(), before_last);
        sim.check();

        // Cut in the middle of the last record's header.
        let before_last = save_pending(&mut sim, 2);
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(before_last + 20)
            .unwrap();
        sim.reopen();
        assert_eq!(fs::metadata(&path).unwrap().len(), before_last);
        sim.check();

        // Garbage appended.
        let len = fs::metadata(&path).unwrap().len();
        let mut garbage = vec![0u8; 5000];
        rng.fill(&mut garbage[..]);
        OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all_at(&garbage, len)
            .unwrap();
        sim.reopen();
        assert_eq!(fs::metadata(&path).unwrap().len(), len);
        sim.check();

        // A complete header whose data did not make it to disk.
        let before_last = save_pending(&mut sim, 2);
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[0u8; 64], before_last + RECORD_HEADER_BYTES as u64 + 10)
            .unwrap();
        sim.reopen();
        assert_eq!(fs::metadata(&path).unwrap().len(), before_last);
        sim.check();

        // Writing goes on after the cut.
        sim.random_write(&mut rng, 20);
        sim.check();
        sim.reopen();
        sim.check();
    }

    #[test]
    fn damaged_older_log_is_an_error_naming_the_file() {
        let mut rng = StdRng::seed_from_u64(6);
        let mut sim = Sim::new(&mut rng);
        let old = sim.take(PointKind::Manual);
        sim.write(&mut rng, &[3, 7, 9]);
        sim.take(PointKind::Manual);
        sim.random_write(&mut rng, 10);
        let path = sim.log_path(old);
        let file_name = log_file_name(old);

        // Corrupt data: open still works (data is not read), reading fails.
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let at = RECORD_HEADER_BYTES as u64 + 100;
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, at).unwrap();
        f.write_all_at(&[b[0] ^ 0x40], at).unwrap();
        sim.reopen();
        let msg = err_text(sim.points.chunk_at(old, 3));
        assert!(msg.contains(&file_name) && msg.contains("chunk 3"), "{msg}");
        assert!(sim.points.chunk_at(old, 7).unwrap().is_some());
        // Repaired, everything rebuilds again.
        f.write_all_at(&b, at).unwrap();
        sim.check();

        // A torn record in an older log: open fails naming the file.
        let len = fs::metadata(&path).unwrap().len();
        f.set_len(len - 10).unwrap();
        let msg = err_text(Points::open(sim.dir.path(), "vol", VOLUME, CHUNK));
        assert!(msg.contains(&file_name), "{msg}");
        // A bad header checksum likewise.
        f.set_len(len).unwrap();
        f.write_all_at(&[0xff], 9).unwrap();
        let msg = err_text(Points::open(sim.dir.path(), "vol", VOLUME, CHUNK));
        assert!(msg.contains(&file_name), "{msg}");
    }

    #[test]
    fn interrupted_merge_is_undone_on_open() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut sim = Sim::new(&mut rng);
        let a = sim.take(PointKind::Manual);
        sim.write(&mut rng, &[1, 2]);
        let b = sim.take(PointKind::Manual);
        sim.write(&mut rng, &[2, 3, 4, 5]);
        sim.take(PointKind::Manual);
        sim.random_write(&mut rng, 5);
        sim.check();

        // Crash in remove(b) after the mark and part of the append.
        let a_len = sim.points.get(a).unwrap().bytes;
        sim.points.merging = Some(MergeMark {
            into: a,
            from: b,
            into_bytes: a_len,
        });
        sim.points.write_index(|_| true).unwrap();
        let b_log = fs::read(sim.log_path(b)).unwrap();
        let f = OpenOptions::new()
            .write(true)
            .open(sim.log_path(a))
            .unwrap();
        f.write_all_at(&b_log[..b_log.len() / 2 + 7], a_len)
            .unwrap();
        sim.reopen();
        assert_eq!(sim.points.get(a).unwrap().bytes, a_len);
        assert!(sim.points.merging.is_none());
        let index: IndexFile = read_toml(&sim.points.index_path).unwrap().unwrap();
        assert!(index.merging.is_none());
        sim.check();

        // Crash after the complete append, before the index update.
        sim.points.merging = Some(MergeMark {
            into: a,
            from: b,
            into_bytes: a_len,
        });
        sim.points.write_index(|_| true).unwrap();
        f.write_all_at(&b_log, a_len).unwrap();
        sim.reopen();
        assert_eq!(sim.points.get(a).unwrap().bytes, a_len);
        sim.check();

        // The real removal works afterwards.
        sim.points.remove(b).unwrap();
        sim.snaps.remove(&b);
        sim.check();
        sim.reopen();
        sim.check();
    }

    #[test]
    fn failed_merge_leaves_points_unchanged() {
        let mut rng = StdRng::seed_from_u64(11);
        let mut sim = Sim::new(&mut rng);
        let a = sim.take(PointKind::Manual);
        sim.write(&mut rng, &[1]);
        let b = sim.take(PointKind::Manual);
        sim.write(&mut rng, &[2, 3, 4]);
        sim.check();
        // Damage the data of b's last record: the merge into a fails there,
        // after appending the first records.
        let path = sim.log_path(b);
        let len = fs::metadata(&path).unwrap().len();
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[0xaa; 8], len - 8).unwrap();
        let a_bytes = sim.points.get(a).unwrap().bytes;
        let msg = err_text(sim.points.remove(b));
        assert!(msg.contains(&log_file_name(b)), "{msg}");
        assert_eq!(sim.points.get(a).unwrap().bytes, a_bytes);
        assert_eq!(fs::metadata(sim.log_path(a)).unwrap().len(), a_bytes);
        assert!(sim.points.get(b).is_some());
        let index: IndexFile = read_toml(&sim.points.index_path).unwrap().unwrap();
        assert!(index.merging.is_none());
        // Removing the oldest still works (no merge needed).
        sim.points.remove(a).unwrap();
        sim.snaps.remove(&a);
        assert_eq!(sim.points.list().len(), 1);
    }

    #[test]
    fn orphan_logs_are_deleted_on_open() {
        let mut rng = StdRng::seed_from_u64(8);
        let mut sim = Sim::new(&mut rng);
        let id = sim.take(PointKind::Manual);
        sim.random_write(&mut rng, 4);
        let dir = sim.dir.path().join("vol.points");
        let orphan = dir.join(log_file_name(id + 1));
        let other = dir.join("notes.txt");
        fs::write(&orphan, b"x").unwrap();
        fs::write(&other, b"y").unwrap();
        sim.reopen();
        assert!(!orphan.exists());
        assert!(other.exists());
        sim.check();
        // The id is reused by the next create, which starts empty.
        let next = sim.take(PointKind::Auto);
        assert_eq!(next, id + 1);
        assert_eq!(sim.points.get(next).unwrap().bytes, 0);
        sim.check();
    }

    #[test]
    fn names_and_arguments_are_checked() {
        let mut rng = StdRng::seed_from_u64(9);
        let mut sim = Sim::new(&mut rng);
        for bad in ["", "a b", "x/y", "caf\u{e9}", &"n".repeat(65), "tab\t"] {
            let msg = err_text(sim.points.create(bad, PointKind::Manual, 1));
            assert!(msg.contains("recovery point name"), "{msg}");
        }
        assert!(sim.points.list().is_empty());
        // No point: nothing to save.
        assert!(!sim.points.needs_save(0));
        assert!(sim.points.save(0, &sim.image[Sim::range(0)]).is_err());
        assert!(sim.points.sync().is_ok());

        let id = sim
            .points
            .create(&"n".repeat(64), PointKind::Manual, 1)
            .unwrap();
        sim.snaps.insert(id, sim.image.clone());
        let ok = sim
            .points
            .create("auto:2024-01-01T00.00_x-1", PointKind::Failback, 2)
            .unwrap();
        sim.snaps.insert(ok, sim.image.clone());
        assert_eq!(sim.points.get(ok).unwrap().kind, PointKind::Failback);
        assert_eq!(
            sim.points.get(ok).unwrap().name,
            "auto:2024-01-01T00.00_x-1"
        );

        // Wrong lengths, chunks beyond the volume.
        assert!(sim.points.save(0, &[0u8; 100]).is_err());
        assert!(sim.points.save(63, &[0u8; 4096]).is_err());
        assert!(sim.points.save(64, &[0u8; 3072]).is_err());
        assert!(!sim.points.needs_save(64));
        // A duplicate save is a no-op.
        sim.write(&mut rng, &[63]);
        let bytes = sim.points.total_bytes();
        sim.points.save(63, &[0u8; 3072]).unwrap();
        assert_eq!(sim.points.total_bytes(), bytes);
        sim.check();

        // Unknown points.
        let msg = err_text(sim.points.chunk_at(99, 0));
        assert!(msg.contains("recovery point 99"), "{msg}");
        assert!(err_text(sim.points.remove(99)).contains("99"));
        assert!(err_text(sim.points.changed_since(99)).contains("99"));
        assert!(
            err_text(sim.points.rollback(99, &mut |_, _| Ok(()), &mut || Ok(()))).contains("99")
        );
        assert!(sim.points.chunk_at(id, 64).is_err());

        // Bad volume name or geometry.
        assert!(Points::open(sim.dir.path(), "../x", VOLUME, CHUNK).is_err());
        assert!(Points::open(sim.dir.path(), "v", VOLUME, 3000).is_err());
        assert!(Points::open(sim.dir.path(), "v", VOLUME, 2048).is_err());
        assert!(Points::open(sim.dir.path(), "v", 0, CHUNK).is_err());
    }

    #[test]
    fn geometry_mismatch_is_an_error_unless_no_points() {
        let mut rng = StdRng::seed_from_u64(10);
        let mut sim = Sim::new(&mut rng);
        let id = sim.take(PointKind::Manual);
        sim.random_write(&mut rng, 4);
        for (v, c) in [(VOLUME + 512, CHUNK), (VOLUME, CHUNK * 2)] {
            let msg = err_text(Points::open(sim.dir.path(), "vol", v, c));
            assert!(msg.contains("index.toml") && msg.contains("vol"), "{msg}");
        }
        sim.points.remove(id).unwrap();
        drop(sim.points);
        let mut p = Points::open(sim.dir.path(), "vol", VOLUME * 2, CHUNK * 4).unwrap();
        let index: IndexFile = read_toml(&p.index_path).unwrap().unwrap();
        assert_eq!(
            (index.volume_bytes, index.chunk_bytes),
            (VOLUME * 2, CHUNK * 4)
        );
        // Ids keep growing across the rewrite.
        let next = p.create("again", PointKind::Manual, 5).unwrap();
        assert!(next > id);
        p.save(1, &vec![7u8; (CHUNK * 4) as usize]).unwrap();
        p.sync().unwrap();
        drop(p);
        let p = Points::open(sim.dir.path(), "vol", VOLUME * 2, CHUNK * 4).unwrap();
        assert_eq!(
            p.chunk_at(next, 1).unwrap().unwrap(),
            vec![7u8; (CHUNK * 4) as usize]
        );
        assert!(Points::open(sim.dir.path(), "vol", VOLUME, CHUNK).is_err());
    }

    #[test]
    fn point_limit_is_enforced() {
        let dir = tempfile::tempdir().unwrap();
        let pdir = dir.path().join("vol.points");
        fs::create_dir_all(&pdir).unwrap();
        let index = IndexFile {
            format: INDEX_FORMAT,
            volume_bytes: VOLUME,
            chunk_bytes: CHUNK,
            next_id: POINTS_MAX as u64 + 1,
            merging: None,
            points: (1..=POINTS_MAX as u64)
                .map(|id| IndexPoint {
                    id,
                    name: format!("p{id}"),
                    kind: PointKind::Auto,
                    created_unix: id,
                })
                .collect(),
        };
        for p in &index.points {
            fs::write(pdir.join(log_file_name(p.id)), b"").unwrap();
        }
        write_toml(&pdir.join(INDEX_FILE), &index).unwrap();
        let mut points = Points::open(dir.path(), "vol", VOLUME, CHUNK).unwrap();
        assert_eq!(points.list().len(), POINTS_MAX);
        let msg = err_text(points.create("one-more", PointKind::Manual, 1));
        assert!(msg.contains("1024"), "{msg}");
        // Freeing one makes room.
        points.remove(1).unwrap();
        points.create("one-more", PointKind::Manual, 1).unwrap();
    }

    #[test]
    fn index_round_trips_ids_as_hex() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = Points::open(dir.path(), "vol", VOLUME, CHUNK).unwrap();
        let id = p
            .create("first", PointKind::SplitBrain, u32::MAX as u64 * 3)
            .unwrap();
        let text = fs::read_to_string(dir.path().join("vol.points").join(INDEX_FILE)).unwrap();
        assert!(text.contains("next_id = \"0000000000000002\""), "{text}");
        assert!(text.contains("id = \"0000000000000001\""), "{text}");
        assert!(!text.contains("merging"), "{text}");
        drop(p);
        let p = Points::open(dir.path(), "vol", VOLUME, CHUNK).unwrap();
        let info = p.get(id).unwrap();
        assert_eq!(info.kind, PointKind::SplitBrain);
        assert_eq!(info.created_unix, u32::MAX as u64 * 3);
    }

    #[test]
    fn record_header_layout() {
        let data = vec![5u8; 3072];
        let h = encode_header(63, &data);
        assert_eq!(&h[0..4], b"BMUR");
        assert_eq!(u16::from_le_bytes([h[4], h[5]]), 1);
        assert_eq!(u64::from_le_bytes(h[8..16].try_into().unwrap()), 63);
        assert_eq!(u32::from_le_bytes(h[16..20].try_into().unwrap()), 3072);
        assert_eq!(
            u128::from_le_bytes(h[24..40].try_into().unwrap()),
            xxh3_128(&data)
        );
        assert_eq!(
            u64::from_le_bytes(h[40..48].try_into().unwrap()),
            xxh3_64(&h[..40])
        );
        let d = decode_header(&h).unwrap();
        assert_eq!((d.chunk, d.len), (63, 3072));
        let mut bad = h;
        bad[12] ^= 1;
        assert!(decode_header(&bad).is_err());
    }

    #[test]
    fn seeded_random_operations() {
        for seed in 0..60u64 {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut sim = Sim::new(&mut rng);
            for _ in 0..40 {
                let op = rng.gen_range(0..100);
                match op {
                    0..=34 => {
                        let n = rng.gen_range(1..12);
                        sim.random_write(&mut rng, n);
                    }
                    35..=54 => {
                        sim.now += rng.gen_range(0..4 * 3600);
                        let kind = if rng.gen_bool(0.6) {
                            PointKind::Auto
                        } else {
                            PointKind::Manual
                        };
                        sim.take(kind);
                    }
                    55..=66 => {
                        let list = sim.points.list();
                        if !list.is_empty() {
                            let id = list[rng.gen_range(0..list.len())].id;
                            let before = sim.points.total_bytes();
                            let freed = sim.points.remove(id).unwrap();
                            assert_eq!(before - sim.points.total_bytes(), freed);
                            sim.snaps.remove(&id);
                        }
                    }
                    67..=71 => {
                        let list = sim.points.list();
                        if !list.is_empty() {
                            let id = list[rng.gen_range(0..list.len())].id;
                            let mut image = sim.image.clone();
                            sim.points
                                .rollback(
                                    id,
                                    &mut |i, data| {
                                        image[Sim::range(i)].copy_from_slice(data);
                                        Ok(())
                                    },
                                    &mut || Ok(()),
                                )
                                .unwrap();
                            assert!(image == sim.snaps[&id], "seed {seed}");
                            sim.image = image;
                            sim.snaps.retain(|&k, _| k < id);
                        }
                    }
                    72..=77 => {
                        let kinds: HashMap<u64, PointKind> =
                            sim.points.list().iter().map(|p| (p.id, p.kind)).collect();
                        let (removed, _) = sim
                            .points
                            .prune(rng.gen_range(0..4), rng.gen_range(0..3), sim.now)
                            .unwrap();
                        for id in removed {
                            assert_eq!(kinds[&id], PointKind::Auto);
                            sim.snaps.remove(&id);
                        }
                    }
                    78..=89 => sim.reopen(),
                    _ => {
                        // Crash with torn pending records in the newest log.
                        if let Some(newest) = sim.points.newest() {
                            let free = (0..sim.chunks())
                                .filter(|&i| sim.points.needs_save(i))
                                .count();
                            if free > 0 {
                                let n = rng.gen_range(1..=free.min(3));
                                save_pending(&mut sim, n);
                                let path = sim.log_path(newest.id);
                                let len = fs::metadata(&path).unwrap().len();
                                let cut = rng.gen_range(newest.bytes..len);
                                OpenOptions::new()
                                    .write(true)
                                    .open(&path)
                                    .unwrap()
                                    .set_len(cut)
                                    .unwrap();
                            }
                            sim.reopen();
                        }
                    }
                }
                sim.check();
            }
        }
    }
}
