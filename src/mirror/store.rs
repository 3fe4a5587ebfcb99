//! The mirror's volume store: `STORE/NAME.img` (the replica, a sparse file or
//! a symlink to a block device), `STORE/NAME.meta` (TOML, replaced
//! atomically), `STORE/NAME.digests` (digest map) and `STORE/NAME.lock`.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::block::{Device, DeviceKind, DirectIo, OpenOptions as DevOpen};
use crate::config::{self, CHUNK_BYTES_MAX, CHUNK_BYTES_MIN, VOLUME_BYTES_MAX};
use crate::error::{Error, IoContext, Result};
use crate::protocol::{Hello, HelloAck, ReplicaState, HELLO_FLAG_REINIT, HELLO_FLAG_RESIZE};
use crate::track::files::{
    check_id, id_hex, new_id, parse_id, read_valid_toml, validate_stored_geometry, write_toml,
    Validate,
};
use crate::track::{DigestMap, ZeroDigests, UNKNOWN_DIGEST};

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct VolumeMeta {
    pub format: u32,
    pub replica_id: String,
    pub source_id: String,
    pub state: ReplicaState,
    #[serde(with = "crate::track::files::hex_u64")]
    pub generation: u64,
    pub volume_bytes: u64,
    pub chunk_bytes: u32,
    pub updated_unix: u64,
    #[serde(default)]
    pub last_primary: String,
    /// Generation ids beyond `generation` (the current one): see `protocol::genid`.
    #[serde(default, with = "crate::track::files::hex_u64")]
    pub gen_bitmap: u64,
    #[serde(default, with = "crate::track::files::hex_u64")]
    pub gen_history0: u64,
    #[serde(default, with = "crate::track::files::hex_u64")]
    pub gen_history1: u64,
    /// Secondary (receives syncs) or Primary (promoted: refuses them).
    #[serde(default)]
    pub role: Role,
    #[serde(default)]
    pub promoted_unix: u64,
    /// Primary state directory made by `promote` (its bitmap tracks the
    /// chunks changed since).
    #[serde(default)]
    pub primary_state: String,
    /// Recovery point holding the replica's last consistent state while it
    /// is Inconsistent (0: none; a first full sync has nothing to go back to).
    #[serde(default)]
    pub undo_point: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Role {
    #[default]
    Secondary,
    Primary,
}

impl Validate for VolumeMeta {
    fn validate(&self) -> std::result::Result<(), String> {
        if self.format != 1 {
            return Err(format!("unsupported format {}", self.format));
        }
        check_id("replica_id", &self.replica_id)?;
        check_id("source_id", &self.source_id)?;
        if self.volume_bytes == 0 {
            return Err("volume_bytes is 0".into());
        }
        validate_stored_geometry(self.volume_bytes, self.chunk_bytes)
    }
}

impl VolumeMeta {
    pub fn gen(&self) -> crate::protocol::GenIds {
        crate::protocol::GenIds {
            current: self.generation,
            bitmap: self.gen_bitmap,
            history: [self.gen_history0, self.gen_history1],
        }
    }
    /// The hello answer describing this replica (`meta_path` names the file
    /// in errors about its ids).
    pub fn hello_ack(&self, meta_path: &Path, created: bool, changed: u64) -> Result<HelloAck> {
        Ok(HelloAck {
            replica_id: parse_id(meta_path, "replica_id", &self.replica_id)?,
            state: self.state,
            source_id: parse_id(meta_path, "source_id", &self.source_id)?,
            gen: self.gen(),
            volume_bytes: self.volume_bytes,
            chunk_bytes: self.chunk_bytes,
            created,
            primary: self.role == Role::Primary,
            changed,
            promoted_unix: self.promoted_unix,
        })
    }

    pub fn set_gen(&mut self, g: crate::protocol::GenIds) {
        self.generation = g.current;
        self.gen_bitmap = g.bitmap;
        self.gen_history0 = g.history[0];
        self.gen_history1 = g.history[1];
    }
}

/// Path of the bitmap of chunks the node holding this replica changed itself
/// (`NAME.changed`, written by `demote`), or the promoted volume's primary
/// bitmap.
pub fn changed_bitmap_path(store: &Path, name: &str, meta: &VolumeMeta) -> PathBuf {
    if !meta.primary_state.is_empty() {
        Path::new(&meta.primary_state).join("bitmap")
    } else {
        store.join(format!("{name}.changed"))
    }
}

/// Bitmap words of the chunks the node holding replica `name` changed itself
/// relative to `peer` (empty if it changed nothing).
pub fn changed_words(store: &Path, name: &str, meta: &VolumeMeta, peer: &str) -> Result<Vec<u64>> {
    let path = changed_bitmap_path(store, name, meta);
    if !path.exists() {
        return Ok(Vec::new());
    }
    let chunks = meta.volume_bytes.div_ceil(meta.chunk_bytes as u64);
    let bm = crate::track::Bitmap::load(&path, chunks)?;
    let fp: crate::transport::Fingerprint = match peer.parse() {
        Ok(f) => f,
        Err(_) => return Ok(Vec::new()),
    };
    let Some(slot) = bm.find_slot(&fp.0) else {
        // The node never tracked this peer: if it has bits for any other
        // peer, those chunks changed (a promoted replica's first peer).
        if bm.peer_count() == 0 {
            return Ok(Vec::new());
        }
        return Ok((0..bm.word_count())
            .map(|w| (0..bm.peer_count()).fold(0, |acc, s| acc | bm.word(s, w)))
            .collect());
    };
    let words: Vec<u64> = (0..bm.word_count()).map(|w| bm.word(slot, w)).collect();
    if words.iter().all(|&w| w == 0) {
        return Ok(Vec::new());
    }
    Ok(words)
}

pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Holds a volume for one session: in-process set plus an flock on NAME.lock.
/// A session holding a volume: which primary, and how to end it.
pub struct Holder {
    pub peer: String,
    pub closer: Option<Box<dyn Fn() + Send + Sync>>,
}

type Active = Arc<Mutex<HashMap<String, Holder>>>;

pub struct VolumeLock {
    name: String,
    active: Active,
    file: Option<nix::fcntl::Flock<std::fs::File>>,
}

impl Drop for VolumeLock {
    fn drop(&mut self) {
        // Release the flock before the name, so whoever sees the name free
        // can take the file lock too.
        drop(self.file.take());
        if let Ok(mut a) = self.active.lock() {
            a.remove(&self.name);
        }
    }
}

pub struct Store {
    dir: PathBuf,
    active: Active,
}

/// An opened replica, ready for a sync session.
pub struct Replica {
    pub name: String,
    pub meta: VolumeMeta,
    pub meta_path: PathBuf,
    pub device: Device,
    pub map: DigestMap,
    pub zeros: ZeroDigests,
    pub created: bool,
    pub lock: VolumeLock,
}

impl Replica {
    pub fn replica_id(&self) -> u128 {
        parse_id(&self.meta_path, "replica_id", &self.meta.replica_id).unwrap_or(0)
    }
    pub fn save_meta(&mut self) -> Result<()> {
        self.meta.updated_unix = now_unix();
        write_toml(&self.meta_path, &self.meta)
    }
    pub fn ack(&self, changed: u64) -> Result<HelloAck> {
        self.meta.hello_ack(&self.meta_path, self.created, changed)
    }

    /// Bitmap words of the chunks this node changed itself relative to
    /// `peer` (none: empty).
    pub fn changed_words(&self, store: &Path, peer: &str) -> Result<Vec<u64>> {
        changed_words(store, &self.name, &self.meta, peer)
    }
}

impl Store {
    pub fn open(dir: &Path) -> Result<Store> {
        std::fs::create_dir_all(dir).ctx(|| format!("creating store {}", dir.display()))?;
        let md = std::fs::metadata(dir).ctx(|| format!("store {}", dir.display()))?;
        if !md.is_dir() {
            return Err(Error::Config(format!(
                "store {} is not a directory",
                dir.display()
            )));
        }
        Ok(Store {
            dir: dir.to_path_buf(),
            active: Arc::new(Mutex::new(HashMap::new())),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// If volume `name` is held by an earlier session of the same primary
    /// (`peer`), that session is stale (the primary's own state lock allows
    /// one sync per volume): end it. Returns whether one was ended.
    pub fn end_stale_session(&self, name: &str, peer: &str) -> bool {
        let Ok(a) = self.active.lock() else {
            return false;
        };
        match a.get(name) {
            Some(h) if h.peer == peer => {
                if let Some(close) = &h.closer {
                    close();
                }
                true
            }
            _ => false,
        }
    }

    /// Whether a session holds volume `name`.
    /// Where a live session publishes its status.
    pub fn status_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.status.json"))
    }

    pub fn is_held(&self, name: &str) -> bool {
        self.active
            .lock()
            .map(|a| a.contains_key(name))
            .unwrap_or(false)
    }

    fn lock(
        &self,
        name: &str,
        peer: &str,
        closer: Option<Box<dyn Fn() + Send + Sync>>,
    ) -> std::result::Result<VolumeLock, String> {
        {
            let mut a = self
                .active
                .lock()
                .map_err(|_| "store lock poisoned".to_string())?;
            if a.contains_key(name) {
                return Err(format!(
                    "volume '{name}' is busy: another session is syncing it"
                ));
            }
            a.insert(
                name.to_string(),
                Holder {
                    peer: peer.to_string(),
                    closer,
                },
            );
        }
        let path = self.dir.join(format!("{name}.lock"));
        let release = || {
            if let Ok(mut a) = self.active.lock() {
                a.remove(name);
            }
        };
        let f = match OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) => {
                release();
                return Err(format!("cannot open {}: {e}", path.display()));
            }
        };
        match nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(l) => Ok(VolumeLock {
                name: name.to_string(),
                active: self.active.clone(),
                file: Some(l),
            }),
            Err((_, e)) => {
                release();
                Err(format!(
                    "volume '{name}' is busy: {} is locked by another process ({e})",
                    path.display()
                ))
            }
        }
    }

    /// Open or create the replica named in `hello`. A refusal (`Err(String)`)
    /// is sent to the primary verbatim.
    pub fn open_volume(
        &self,
        hello: &Hello,
        peer: &str,
        closer: Option<Box<dyn Fn() + Send + Sync>>,
    ) -> std::result::Result<Replica, String> {
        let name = &hello.volume;
        config::validate_volume_name(name)?;
        let cb = hello.chunk_bytes;
        if !cb.is_power_of_two() || !(CHUNK_BYTES_MIN..=CHUNK_BYTES_MAX).contains(&cb) {
            return Err(format!(
                "chunk size {cb} is not a power of two in {CHUNK_BYTES_MIN}..={CHUNK_BYTES_MAX}"
            ));
        }
        if hello.volume_bytes == 0 || hello.volume_bytes > VOLUME_BYTES_MAX {
            return Err(format!(
                "volume size {} is outside 1..={VOLUME_BYTES_MAX} bytes",
                hello.volume_bytes
            ));
        }
        if hello.volume_bytes % 512 != 0 {
            return Err(format!(
                "volume size {} is not a multiple of 512 bytes",
                hello.volume_bytes
            ));
        }
        config::validate_geometry(hello.volume_bytes, cb)?;
        if super::roles::fence_path(&self.dir, name).exists() {
            return Err(format!(
                "volume '{name}' is being taken over on this mirror (promote --force); try again later"
            ));
        }
        let lock = self.lock(name, peer, closer)?;
        self.open_locked(hello, peer, lock)
            .map_err(|e| e.to_string())
    }

    fn open_locked(&self, hello: &Hello, peer: &str, lock: VolumeLock) -> Result<Replica> {
        let name = hello.volume.clone();
        let img = self.dir.join(format!("{name}.img"));
        let meta_path = self.dir.join(format!("{name}.meta"));
        let map_path = self.dir.join(format!("{name}.digests"));
        let resize = hello.flags & HELLO_FLAG_RESIZE != 0;
        let reinit = hello.flags & HELLO_FLAG_REINIT != 0;
        let meta: Option<VolumeMeta> = read_valid_toml(&meta_path)?;
        let img_exists = img.exists() || std::fs::symlink_metadata(&img).is_ok();

        let Some(mut meta) = meta else {
            // New volume, or an image placed here by other means (adopted:
            // its contents are unknown until a checksum or full sync).
            let (device, created) = if img_exists {
                let d = Device::open(
                    &img,
                    &DevOpen {
                        write: true,
                        direct: DirectIo::Off,
                    },
                )?;
                (d, false)
            } else {
                (
                    Device::create_file(&img, hello.volume_bytes, DirectIo::Off)?,
                    true,
                )
            };
            let mut device = device;
            if device.size_bytes() != hello.volume_bytes {
                device = self.resize_device(device, &img, &name, hello.volume_bytes, resize)?;
            }
            let zeros = ZeroDigests::new(hello.volume_bytes, hello.chunk_bytes);
            let mut map = if created {
                let mut m = DigestMap::new(hello.volume_bytes, hello.chunk_bytes, zeros.full);
                let n = m.len();
                if n > 0 {
                    m.set(n - 1, zeros.of(n - 1));
                }
                m
            } else {
                DigestMap::new(hello.volume_bytes, hello.chunk_bytes, UNKNOWN_DIGEST)
            };
            map.create_file(&map_path)?;
            let meta = VolumeMeta {
                format: 1,
                replica_id: id_hex(new_id()),
                source_id: id_hex(0),
                state: if created {
                    ReplicaState::New
                } else {
                    ReplicaState::Inconsistent
                },
                generation: 0,
                volume_bytes: hello.volume_bytes,
                chunk_bytes: hello.chunk_bytes,
                updated_unix: now_unix(),
                last_primary: peer.to_string(),
                gen_bitmap: 0,
                gen_history0: 0,
                gen_history1: 0,
                role: Role::Secondary,
                promoted_unix: 0,
                primary_state: String::new(),
                undo_point: 0,
            };
            let mut r = Replica {
                name,
                meta,
                meta_path,
                device,
                map,
                zeros,
                created: true,
                lock,
            };
            r.save_meta()?;
            tracing::info!(volume = %r.name, "created replica {}", img.display());
            return Ok(r);
        };

        // The format, ids and geometry were checked as it was read.
        let mut device = Device::open(
            &img,
            &DevOpen {
                write: true,
                direct: DirectIo::Off,
            },
        )?;
        let device_fits = match device.kind() {
            DeviceKind::BlockDevice => device.size_bytes() >= hello.volume_bytes,
            DeviceKind::RegularFile => device.size_bytes() == hello.volume_bytes,
        };
        if hello.volume_bytes != meta.volume_bytes || !device_fits {
            if !resize {
                return Err(Error::Refused(format!(
                    "volume '{name}' exists on this mirror with {} bytes, the source has {} bytes; pass --resize to resize the replica",
                    meta.volume_bytes, hello.volume_bytes
                )));
            }
            if !device_fits {
                device = self.resize_device(device, &img, &name, hello.volume_bytes, true)?;
            }
        }
        // A new chunk size re-initialises the map: nothing is known about
        // the replica in the new chunking until a full sync.
        let created = hello.chunk_bytes != meta.chunk_bytes;
        if created && !reinit {
            return Err(Error::Refused(format!(
                "volume '{name}' exists on this mirror with {}-byte chunks, the primary asked for {}; pass --full to re-initialise it",
                meta.chunk_bytes, hello.chunk_bytes
            )));
        }
        let zeros = ZeroDigests::new(hello.volume_bytes, hello.chunk_bytes);
        let map = if created {
            let mut m = DigestMap::new(hello.volume_bytes, hello.chunk_bytes, UNKNOWN_DIGEST);
            m.create_file(&map_path)?;
            m
        } else {
            let mut m = match DigestMap::load(&map_path, meta.volume_bytes, meta.chunk_bytes) {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(
                        "{e}; treating every chunk as unknown (a checksum or full sync rebuilds it)"
                    );
                    let mut m = DigestMap::new(meta.volume_bytes, meta.chunk_bytes, UNKNOWN_DIGEST);
                    m.create_file(&map_path)?;
                    m
                }
            };
            if hello.volume_bytes != meta.volume_bytes {
                m.resize(hello.volume_bytes, UNKNOWN_DIGEST)?;
            }
            m
        };
        let resized = hello.volume_bytes != meta.volume_bytes;
        meta.volume_bytes = hello.volume_bytes;
        meta.chunk_bytes = hello.chunk_bytes;
        meta.last_primary = peer.to_string();
        if resized || created {
            meta.state = ReplicaState::Inconsistent;
        }
        let mut r = Replica {
            name,
            meta,
            meta_path,
            device,
            map,
            zeros,
            created,
            lock,
        };
        if resized || created {
            r.save_meta()?;
        }
        Ok(r)
    }

    fn resize_device(
        &self,
        device: Device,
        img: &Path,
        name: &str,
        want: u64,
        resize: bool,
    ) -> Result<Device> {
        if device.kind() == DeviceKind::BlockDevice {
            // A block device replica may be larger than the volume; only its
            // first `want` bytes are used.
            if device.size_bytes() < want {
                return Err(Error::Refused(format!(
                    "replica of '{name}' is block device {} of {} bytes, too small for {} bytes",
                    img.display(),
                    device.size_bytes(),
                    want
                )));
            }
            return Ok(device);
        }
        if !resize {
            return Err(Error::Refused(format!(
                "replica image {} has {} bytes, the source has {want} bytes; pass --resize to resize it",
                img.display(),
                device.size_bytes()
            )));
        }
        device.set_len(want)?;
        drop(device);
        Ok(Device::open(
            img,
            &DevOpen {
                write: true,
                direct: DirectIo::Off,
            },
        )?)
    }

    /// `--dry-run`: what a hello for `hello.volume` would be answered with,
    /// and the changed-chunk words, without creating, locking or writing
    /// anything.
    pub fn probe(
        &self,
        hello: &Hello,
        peer: &str,
    ) -> std::result::Result<(HelloAck, Vec<u64>), String> {
        let name = &hello.volume;
        config::validate_volume_name(name)?;
        let meta_path = self.dir.join(format!("{name}.meta"));
        let meta: Option<VolumeMeta> = read_valid_toml(&meta_path).map_err(|e| e.to_string())?;
        let Some(meta) = meta else {
            return Ok((
                HelloAck {
                    replica_id: 0,
                    state: ReplicaState::New,
                    source_id: 0,
                    gen: Default::default(),
                    volume_bytes: hello.volume_bytes,
                    chunk_bytes: hello.chunk_bytes,
                    created: true,
                    primary: false,
                    changed: 0,
                    promoted_unix: 0,
                },
                Vec::new(),
            ));
        };
        let words = changed_words(&self.dir, name, &meta, peer).map_err(|e| e.to_string())?;
        let changed = words.iter().map(|w| w.count_ones() as u64).sum();
        let ack = meta
            .hello_ack(&meta_path, false, changed)
            .map_err(|e| e.to_string())?;
        Ok((ack, words))
    }

    /// Hold volume `name` outside a replication session (promote, points).
    pub fn lock_volume(&self, name: &str, what: &str) -> std::result::Result<VolumeLock, String> {
        self.lock(name, what, None)
    }

    /// Names and metadata of every volume in the store.
    pub fn list(&self) -> Result<Vec<(String, VolumeMeta)>> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.dir).ctx(|| format!("reading {}", self.dir.display()))? {
            let e = e.ctx(|| format!("reading {}", self.dir.display()))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(vol) = name.strip_suffix(".meta") {
                if config::validate_volume_name(vol).is_ok() {
                    if let Some(m) = read_valid_toml::<VolumeMeta>(&e.path())? {
                        out.push((vol.to_string(), m));
                    }
                }
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// Hold volume `name` for a read (`restore`) so that nothing writes it
    /// meanwhile. Busy: the message tells the operator what to do.
    pub fn lock_for_read(&self, name: &str, peer: &str) -> std::result::Result<VolumeLock, String> {
        if self.is_held(name) {
            return Err(format!(
                "volume {name} is busy (a replication session is active); stop it or restore a recovery point later"
            ));
        }
        self.lock(name, peer, None).map_err(|e| {
            if e.contains("is busy") {
                format!(
                    "volume {name} is busy (a replication session is active); stop it or restore a recovery point later ({e})"
                )
            } else {
                e
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::track::files::read_toml;

    /// A damaged `NAME.meta` is an error naming it wherever it is read. A
    /// chunk size of 0 in it used to divide by zero in a probe of a volume
    /// with a `NAME.changed` bitmap (left by `demote`).
    #[test]
    fn damaged_geometry_in_meta_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let hello = Hello {
            volume: "v".into(),
            volume_bytes: 1 << 20,
            chunk_bytes: 65536,
            flags: 0,
            source_id: 1,
        };
        let mut r = store.open_volume(&hello, "p", None).unwrap();
        r.save_meta().unwrap();
        drop(r);
        crate::track::Bitmap::new(16)
            .save(&dir.path().join("v.changed"))
            .unwrap();
        let meta_path = dir.path().join("v.meta");
        let good = std::fs::read_to_string(&meta_path).unwrap();
        for (field, bad, what) in [
            (
                "chunk_bytes = 65536",
                "chunk_bytes = 0",
                "chunk_bytes 0 is not a power of two",
            ),
            (
                "chunk_bytes = 65536",
                "chunk_bytes = 65537",
                "chunk_bytes 65537 is not a power of two",
            ),
            (
                "volume_bytes = 1048576",
                "volume_bytes = 0",
                "volume_bytes is 0",
            ),
            (
                "volume_bytes = 1048576",
                "volume_bytes = 9223372036854775807",
                "above the limit",
            ),
            ("format = 1", "format = 2", "unsupported format 2"),
        ] {
            assert!(good.contains(field), "{good}");
            std::fs::write(&meta_path, good.replace(field, bad)).unwrap();
            let check = |e: String| {
                assert!(e.contains("v.meta") && e.contains(what), "{bad}: {e}");
            };
            check(store.probe(&hello, "p").unwrap_err());
            check(store.open_volume(&hello, "p", None).err().unwrap());
            check(store.list().unwrap_err().to_string());
        }
    }

    #[test]
    fn meta_round_trips_every_generation() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("v.meta");
        for g in [0, 1, i64::MAX as u64, u64::MAX] {
            let m = VolumeMeta {
                format: 1,
                replica_id: id_hex(u128::MAX),
                source_id: id_hex(1),
                state: ReplicaState::UpToDate,
                generation: g,
                volume_bytes: 1 << 40,
                chunk_bytes: 65536,
                updated_unix: now_unix(),
                last_primary: String::new(),
                gen_bitmap: 0,
                gen_history0: 0,
                gen_history1: 0,
                role: Role::Secondary,
                promoted_unix: 0,
                primary_state: String::new(),
                undo_point: 0,
            };
            write_toml(&p, &m).unwrap();
            let r: VolumeMeta = read_toml(&p).unwrap().unwrap();
            assert_eq!(r.generation, g);
            assert_eq!(r.state, ReplicaState::UpToDate);
        }
        std::fs::write(&p, "format = 1\nstate = \"Bogus\"\n").unwrap();
        let e = read_toml::<VolumeMeta>(&p).unwrap_err().to_string();
        assert!(e.contains("v.meta"), "{e}");
    }
}
