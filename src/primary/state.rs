//! The primary's per-volume state: `STATE/NAME/volume.toml`, `digests`,
//! `bitmap`, `lock`.

use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};
use crate::track::files::{
    check_id, id_hex, new_id, read_valid_toml, validate_stored_geometry, write_toml, Validate,
};
use crate::track::{Bitmap, DigestMap, UNKNOWN_DIGEST};

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct PeerRecord {
    pub fingerprint: String,
    pub replica_id: String,
    /// A sync to this peer completed at least once for this replica.
    pub synced: bool,
    #[serde(with = "crate::track::files::hex_u64")]
    pub generation: u64,
    pub last_sync_unix: u64,
    /// The bitmap tracks every write since the last completed sync
    /// (`replicate` owns the device): a restart resyncs the set bits only.
    #[serde(default)]
    pub tracked: bool,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct VolumeState {
    pub format: u32,
    pub source_id: String,
    pub source: String,
    pub volume_bytes: u64,
    pub chunk_bytes: u32,
    #[serde(default)]
    pub peers: Vec<PeerRecord>,
    /// Generation ids (see `protocol::genid`); 0 in files from before they
    /// existed (a fresh current id is made on open).
    #[serde(default, with = "crate::track::files::hex_u64")]
    pub gen_current: u64,
    #[serde(default, with = "crate::track::files::hex_u64")]
    pub gen_bitmap: u64,
    #[serde(default, with = "crate::track::files::hex_u64")]
    pub gen_history0: u64,
    #[serde(default, with = "crate::track::files::hex_u64")]
    pub gen_history1: u64,
    /// When this node became primary for the volume (unix seconds).
    #[serde(default)]
    pub primary_since_unix: u64,
    /// Set by `demote`: the volume now lives in a mirror store and this
    /// state may not be used as a primary until it is promoted again.
    #[serde(default)]
    pub demoted_to: String,
}

impl Validate for VolumeState {
    fn validate(&self) -> std::result::Result<(), String> {
        if self.format != 1 {
            return Err(format!("unsupported format {}", self.format));
        }
        check_id("source_id", &self.source_id)?;
        validate_stored_geometry(self.volume_bytes, self.chunk_bytes)
    }
}

impl VolumeState {
    pub fn gen(&self) -> crate::protocol::GenIds {
        crate::protocol::GenIds {
            current: self.gen_current,
            bitmap: self.gen_bitmap,
            history: [self.gen_history0, self.gen_history1],
        }
    }
    pub fn set_gen(&mut self, g: crate::protocol::GenIds) {
        self.gen_current = g.current;
        self.gen_bitmap = g.bitmap;
        self.gen_history0 = g.history[0];
        self.gen_history1 = g.history[1];
    }
}

/// A random non-zero generation id.
pub fn new_gen() -> u64 {
    loop {
        let v: u64 = rand::random();
        if v != 0 {
            return v;
        }
    }
}

pub struct PrimaryState {
    pub dir: PathBuf,
    pub vol: VolumeState,
    pub map: DigestMap,
    pub bitmap: Bitmap,
    _lock: nix::fcntl::Flock<std::fs::File>,
}

impl PrimaryState {
    fn vol_path(dir: &Path) -> PathBuf {
        dir.join("volume.toml")
    }

    /// Open (or create) the state of volume `name` under `state_dir`.
    /// `chunk_bytes`: `Some` if the user asked for a chunk size.
    /// `full`: the user asked for a full sync (allows changing the chunk size).
    pub fn open(
        state_dir: &Path,
        name: &str,
        source: &Path,
        volume_bytes: u64,
        chunk_bytes: Option<u32>,
        full: bool,
        resize: bool,
    ) -> Result<PrimaryState> {
        let dir = state_dir.join(name);
        std::fs::create_dir_all(&dir)
            .ctx(|| format!("creating state directory {}", dir.display()))?;
        let lock_path = dir.join("lock");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .ctx(|| format!("opening {}", lock_path.display()))?;
        let lock = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|(_, e)| {
                Error::Other(
                    format!(
                        "volume '{name}' is busy: another blkmirror process holds {}",
                        lock_path.display()
                    ) + &format!(" ({e})"),
                )
            })?;
        let vpath = Self::vol_path(&dir);
        let existing: Option<VolumeState> = read_valid_toml(&vpath)?;
        let fresh = |cb: u32| -> Result<(VolumeState, DigestMap, Bitmap)> {
            crate::config::validate_geometry(volume_bytes, cb).map_err(Error::Config)?;
            let vol = VolumeState {
                format: 1,
                source_id: id_hex(new_id()),
                source: source.display().to_string(),
                volume_bytes,
                chunk_bytes: cb,
                peers: Vec::new(),
                gen_current: new_gen(),
                gen_bitmap: 0,
                gen_history0: 0,
                gen_history1: 0,
                primary_since_unix: crate::mirror::store::now_unix(),
                demoted_to: String::new(),
            };
            let mut map = DigestMap::new(volume_bytes, cb, UNKNOWN_DIGEST);
            map.create_file(&dir.join("digests"))?;
            let bitmap = Bitmap::new(map.len());
            bitmap.save(&dir.join("bitmap"))?;
            write_toml(&vpath, &vol)?;
            Ok((vol, map, bitmap))
        };
        let (vol, map, bitmap) = match existing {
            None => fresh(chunk_bytes.unwrap_or(crate::config::CHUNK_BYTES_DEFAULT))?,
            Some(v) => {
                // Its format, id and geometry were checked as it was read.
                if !v.demoted_to.is_empty() {
                    return Err(Error::Other(format!(
                        "volume '{name}' was demoted on this node: it is now a secondary in store {}; \
                         it can only become primary again with `blkmirror promote --store {} --volume {name}`",
                        v.demoted_to, v.demoted_to
                    )));
                }
                let mut v = v;
                if v.gen_current == 0 {
                    v.gen_current = new_gen();
                    if v.primary_since_unix == 0 {
                        v.primary_since_unix = crate::mirror::store::now_unix();
                    }
                    write_toml(&vpath, &v)?;
                }
                if let Some(cb) = chunk_bytes {
                    if cb != v.chunk_bytes && !full {
                        return Err(Error::Config(format!(
                            "volume '{name}' was synced with {}-byte chunks; pass --full to change to {cb}",
                            v.chunk_bytes
                        )));
                    }
                }
                let cb = chunk_bytes.unwrap_or(v.chunk_bytes);
                crate::config::validate_geometry(volume_bytes, cb).map_err(Error::Config)?;
                if v.volume_bytes != volume_bytes && !resize {
                    return Err(Error::Config(format!(
                        "source {} now has {volume_bytes} bytes but volume '{name}' had {} bytes; pass --resize to resize the volume",
                        source.display(),
                        v.volume_bytes
                    )));
                }
                if cb != v.chunk_bytes || v.volume_bytes != volume_bytes {
                    // New geometry: keep the lineage, forget per-chunk knowledge.
                    let mut v2 = v.clone();
                    v2.chunk_bytes = cb;
                    v2.volume_bytes = volume_bytes;
                    for p in &mut v2.peers {
                        p.synced = false;
                    }
                    let mut map = DigestMap::new(volume_bytes, cb, UNKNOWN_DIGEST);
                    map.create_file(&dir.join("digests"))?;
                    let bitmap = Bitmap::new(map.len());
                    bitmap.save(&dir.join("bitmap"))?;
                    write_toml(&vpath, &v2)?;
                    (v2, map, bitmap)
                } else {
                    let map = DigestMap::load(&dir.join("digests"), volume_bytes, cb)
                        .map_err(|e| {
                            Error::Other(format!(
                                "{e}; the primary's state for '{name}' is damaged: remove {} and sync with --checksum",
                                dir.display()
                            ))
                        })?;
                    let bitmap = Bitmap::load(&dir.join("bitmap"), map.len()).map_err(|e| {
                        Error::Other(format!(
                            "{e}; the primary's state for '{name}' is damaged: remove {} and sync with --checksum",
                            dir.display()
                        ))
                    })?;
                    (v, map, bitmap)
                }
            }
        };
        Ok(PrimaryState {
            dir,
            vol,
            map,
            bitmap,
            _lock: lock,
        })
    }

    pub fn source_id(&self) -> u128 {
        u128::from_str_radix(&self.vol.source_id, 16).unwrap_or(0)
    }

    pub fn peer(&self, fp: &str) -> Option<&PeerRecord> {
        self.vol.peers.iter().find(|p| p.fingerprint == fp)
    }

    pub fn set_peer(&mut self, rec: PeerRecord) -> Result<()> {
        if let Some(p) = self
            .vol
            .peers
            .iter_mut()
            .find(|p| p.fingerprint == rec.fingerprint)
        {
            *p = rec;
        } else {
            self.vol.peers.push(rec);
        }
        self.save_volume()
    }

    pub fn save_volume(&self) -> Result<()> {
        write_toml(&Self::vol_path(&self.dir), &self.vol)
    }

    pub fn save_bitmap(&self) -> Result<()> {
        self.bitmap.save(&self.dir.join("bitmap"))
    }

    /// Record that peer `slot` durably holds `(index, digest)` for each entry,
    /// keeping the invariant (see `track`): other peers' bits first, then the
    /// map, then this peer's bits.
    pub fn checkpoint(&mut self, slot: usize, durable: &[(u64, u128)]) -> Result<()> {
        let mut others_changed = false;
        if self.bitmap.peer_count() > 1 {
            for &(i, d) in durable {
                if self.map.get(i) != d {
                    self.bitmap.set_others(slot, i);
                    others_changed = true;
                }
            }
        }
        if others_changed {
            self.save_bitmap()?;
        }
        for &(i, d) in durable {
            self.map.set(i, d);
        }
        self.map.flush()?;
        for &(i, _) in durable {
            self.bitmap.clear(slot, i);
        }
        self.save_bitmap()
    }

    /// Replace the map with digests learned from peer `slot`'s replica; bits
    /// of that peer are cleared (it holds exactly those contents).
    pub fn adopt_peer_digests(&mut self, slot: usize, digests: &[u128]) -> Result<()> {
        let all: Vec<(u64, u128)> = digests
            .iter()
            .enumerate()
            .map(|(i, &d)| (i as u64, d))
            .collect();
        self.checkpoint(slot, &all)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A damaged `volume.toml` is an error naming it, for `sync` and
    /// `replicate` (which open the state) and for `status`. A chunk size of
    /// 0 in it (and in the digest map's header) used to divide by zero in
    /// both.
    #[test]
    fn damaged_geometry_in_volume_toml_is_an_error_naming_the_file() {
        let root = tempfile::tempdir().unwrap();
        let volume_bytes = 5 * 65536;
        let open = || {
            PrimaryState::open(
                root.path(),
                "v",
                Path::new("/dev/null"),
                volume_bytes,
                None,
                false,
                false,
            )
        };
        drop(open().unwrap());
        let dir = root.path().join("v");
        let vpath = dir.join("volume.toml");
        let good = std::fs::read_to_string(&vpath).unwrap();
        let digests = std::fs::read(dir.join("digests")).unwrap();
        for (field, bad, what) in [
            (
                "chunk_bytes = 65536",
                "chunk_bytes = 0",
                "chunk_bytes 0 is not a power of two",
            ),
            (
                "chunk_bytes = 65536",
                "chunk_bytes = 3000",
                "chunk_bytes 3000 is not a power of two",
            ),
            (
                "chunk_bytes = 65536",
                "chunk_bytes = 2097152",
                "chunk_bytes 2097152 is not a power of two",
            ),
            (
                "volume_bytes = 327680",
                "volume_bytes = 9223372036854775807",
                "above the limit",
            ),
        ] {
            assert!(good.contains(field), "{good}");
            std::fs::write(&vpath, good.replace(field, bad)).unwrap();
            // The digest map agrees with the damaged chunk size, so that
            // only the check on volume.toml stands between it and its use.
            let mut d = digests.clone();
            if let Some(cb) = bad.strip_prefix("chunk_bytes = ") {
                let cb: u32 = cb.parse().unwrap();
                d[12..16].copy_from_slice(&cb.to_le_bytes());
                let sum = xxhash_rust::xxh3::xxh3_64(&d[0..32]);
                d[32..40].copy_from_slice(&sum.to_le_bytes());
            }
            std::fs::write(dir.join("digests"), &d).unwrap();
            let e = open()
                .err()
                .unwrap_or_else(|| panic!("{bad} was accepted"))
                .to_string();
            assert!(e.contains("volume.toml") && e.contains(what), "{bad}: {e}");
            // `blkmirror status` reads the same file.
            let e = crate::replication::status::collect(root.path(), true, None)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("volume.toml") && e.contains(what),
                "status, {bad}: {e}"
            );
        }
    }
}
