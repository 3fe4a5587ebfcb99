//! Role changes of a volume: `promote` (a mirror's replica becomes a
//! primary) and `demote` (a primary's device becomes a secondary replica in a
//! store), plus the recovery-point commands that work on a store.
//!
//! A session holding a volume is told to let go through a *fence* file
//! (`STORE/NAME.fence`): the apply thread checks for it a few times a second
//! and ends the session. Recovery-point requests reach a running session
//! through a mailbox (`STORE/NAME.point-request` / `.point-reply`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{Error, IoContext, Result};
use crate::primary::state::{new_gen, PeerRecord, VolumeState};
use crate::protocol::ReplicaState;
use crate::recovery::points::{PointInfo, PointKind, Points};
use crate::track::files::{id_hex, new_id, read_toml, read_valid_toml, write_toml};
use crate::track::{Bitmap, DigestMap, UNKNOWN_DIGEST};

use super::store::{now_unix, Role, Store, VolumeMeta};

/// How long `--force` waits for a session to let go of a fenced volume.
const FENCE_WAIT: Duration = Duration::from_secs(20);

pub fn fence_path(store: &Path, name: &str) -> PathBuf {
    store.join(format!("{name}.fence"))
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct PromoteReport {
    pub volume: String,
    pub image: String,
    pub state_dir: String,
    pub rolled_back_chunks: Option<u64>,
    pub rolled_back_to_point: Option<u64>,
    pub generation: String,
    pub previous_generation: String,
    pub old_primary: String,
}

fn load_meta(store: &Path, name: &str) -> Result<(PathBuf, VolumeMeta)> {
    crate::config::validate_volume_name(name).map_err(Error::Config)?;
    let path = store.join(format!("{name}.meta"));
    let meta: VolumeMeta = read_valid_toml(&path)?.ok_or_else(|| {
        Error::Config(format!(
            "store {} has no volume '{name}' ({} does not exist)",
            store.display(),
            path.display()
        ))
    })?;
    Ok((path, meta))
}

/// Describe who holds a volume (from its live status file).
fn holder_of(store: &Store, name: &str) -> String {
    match crate::replication::status::read(&store.status_path(name)) {
        Ok(v) => {
            let connected = v
                .get("connected")
                .and_then(|c| c.as_bool())
                .unwrap_or(false);
            let primary = v.get("primary").and_then(|c| c.as_str()).unwrap_or("?");
            let age = v
                .get("updated_unix")
                .and_then(|u| u.as_f64())
                .map(|u| crate::replication::status::now_unix() - u)
                .unwrap_or(0.0);
            if connected {
                format!(
                    "the old primary {primary} is still connected (status updated {age:.0} s ago)"
                )
            } else {
                "a session is active".into()
            }
        }
        Err(_) => "a session is active".into(),
    }
}

/// Take the volume's lock; with `force`, fence the session holding it and
/// wait for it to let go.
fn take_volume(
    store: &Store,
    name: &str,
    force: bool,
    what: &str,
) -> Result<super::store::VolumeLock> {
    match store.lock_volume(name, what) {
        Ok(l) => return Ok(l),
        Err(msg) if !force => {
            return Err(Error::Other(format!(
            "refusing to {what} volume '{name}': {} ({msg}). Stop the old primary or wait for its \
                 connection to time out, or pass --force to end the session",
            holder_of(store, name)
        )))
        }
        Err(_) => {}
    }
    let fence = fence_path(store.dir(), name);
    std::fs::write(&fence, format!("{what} by pid {}\n", std::process::id()))
        .ctx(|| format!("creating {}", fence.display()))?;
    let deadline = Instant::now() + FENCE_WAIT;
    let r = loop {
        match store.lock_volume(name, what) {
            Ok(l) => break Ok(l),
            Err(msg) if Instant::now() >= deadline => {
                break Err(Error::Other(format!(
                    "volume '{name}' is still held after {} s of fencing: {msg}",
                    FENCE_WAIT.as_secs()
                )))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    let _ = std::fs::remove_file(&fence);
    r
}

/// Make the replica of `name` in `store_dir` a primary. Its primary state
/// (digest map, bitmap tracking the changes from now on, generation ids) is
/// written to `state_dir/NAME`, ready for `replicate STORE/NAME.img`.
pub fn promote(
    store_dir: &Path,
    name: &str,
    state_dir: &Path,
    force: bool,
) -> Result<PromoteReport> {
    let store = Store::open(store_dir)?;
    let (meta_path, _) = load_meta(store_dir, name)?;
    let _lock = take_volume(&store, name, force, "promote")?;
    // Re-read under the lock: the session may have changed it.
    let (_, mut meta) = load_meta(store_dir, name)?;
    if meta.role == Role::Primary {
        return Err(Error::Other(format!(
            "volume '{name}' is already primary on this node (promoted at unix time {})",
            meta.promoted_unix
        )));
    }
    let img = store_dir.join(format!("{name}.img"));
    let mut rolled_back = None;
    let mut rolled_to = None;
    match meta.state {
        ReplicaState::UpToDate => {}
        ReplicaState::New => {
            return Err(Error::Other(format!(
                "volume '{name}' never completed a sync: there is nothing to promote"
            )))
        }
        ReplicaState::Inconsistent => {
            let mut points = Points::open(store_dir, name, meta.volume_bytes, meta.chunk_bytes)?;
            let undo = meta.undo_point;
            if undo != 0 && points.get(undo).is_some() {
                let dev = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&img)
                    .ctx(|| format!("opening {}", img.display()))?;
                let cb = meta.chunk_bytes as u64;
                let mut write = |i: u64, data: &[u8]| -> Result<()> {
                    use std::os::unix::fs::FileExt;
                    dev.write_all_at(data, i * cb)
                        .ctx(|| format!("rolling back chunk {i} of {}", img.display()))
                };
                let mut sync = || dev.sync_all().ctx(|| format!("fsync of {}", img.display()));
                let n = points.rollback(undo, &mut write, &mut sync)?;
                rolled_back = Some(n);
                rolled_to = Some(undo);
                meta.undo_point = 0;
                meta.state = ReplicaState::UpToDate;
                write_toml(&meta_path, &meta)?;
                // The digest map may describe the half-applied resync.
                let map_path = store_dir.join(format!("{name}.digests"));
                let mut m = DigestMap::new(meta.volume_bytes, meta.chunk_bytes, UNKNOWN_DIGEST);
                m.create_file(&map_path)?;
                eprintln!(
                    "volume '{name}' was Inconsistent (a resync was half applied): rolled back {n} chunks \
                     to its last consistent state (recovery point {undo})"
                );
            } else if force {
                eprintln!(
                    "warning: volume '{name}' is Inconsistent and has no consistent state to return to; \
                     promoting it as it is (--force)"
                );
            } else {
                return Err(Error::Other(format!(
                    "volume '{name}' is Inconsistent and has no undo log to return to a consistent state \
                     (its first full sync never completed); pass --force to promote it as it is"
                )));
            }
        }
    }

    // The new primary's state.
    let chunks = meta.volume_bytes.div_ceil(meta.chunk_bytes as u64);
    let dir = state_dir.join(name);
    std::fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
    let state_lock = lock_state(&dir, name)?;
    let previous = meta.generation;
    let mut g = meta.gen();
    g.rotate(new_gen());
    let now = now_unix();
    let mut peers = Vec::new();
    let mut bitmap = Bitmap::new(chunks);
    if let Ok(fp) = meta.last_primary.parse::<crate::transport::Fingerprint>() {
        let slot = bitmap.peer_slot(&fp.0)?;
        for w in 0..bitmap.word_count() {
            bitmap.set_word(slot, w, 0);
        }
        peers.push(PeerRecord {
            fingerprint: meta.last_primary.clone(),
            replica_id: String::new(),
            synced: true,
            generation: previous,
            last_sync_unix: meta.updated_unix,
            tracked: true,
        });
    }
    let map = match DigestMap::load(
        &store_dir.join(format!("{name}.digests")),
        meta.volume_bytes,
        meta.chunk_bytes,
    ) {
        Ok(m) => m.all().to_vec(),
        Err(_) => vec![UNKNOWN_DIGEST; chunks as usize],
    };
    let mut dm = DigestMap::new(meta.volume_bytes, meta.chunk_bytes, UNKNOWN_DIGEST);
    for (i, d) in map.iter().enumerate() {
        dm.set(i as u64, *d);
    }
    dm.create_file(&dir.join("digests"))?;
    bitmap.save(&dir.join("bitmap"))?;
    let abs_img = std::fs::canonicalize(&img).unwrap_or(img.clone());
    let vol = VolumeState {
        format: 1,
        source_id: id_hex(new_id()),
        source: abs_img.display().to_string(),
        volume_bytes: meta.volume_bytes,
        chunk_bytes: meta.chunk_bytes,
        peers,
        gen_current: g.current,
        gen_bitmap: g.bitmap,
        gen_history0: g.history[0],
        gen_history1: g.history[1],
        primary_since_unix: now,
        demoted_to: String::new(),
    };
    write_toml(&dir.join("volume.toml"), &vol)?;
    drop(state_lock);
    // Commit: the store's record says Primary.
    let abs_dir = std::fs::canonicalize(&dir).unwrap_or(dir.clone());
    meta.set_gen(g);
    meta.role = Role::Primary;
    meta.promoted_unix = now;
    meta.primary_state = abs_dir.display().to_string();
    meta.updated_unix = now;
    write_toml(&meta_path, &meta)?;
    let _ = std::fs::remove_file(store_dir.join(format!("{name}.changed")));
    tracing::info!(volume = name, "promoted to primary");
    Ok(PromoteReport {
        volume: name.to_string(),
        image: abs_img.display().to_string(),
        state_dir: state_dir.display().to_string(),
        rolled_back_chunks: rolled_back,
        rolled_back_to_point: rolled_to,
        generation: format!("{:016x}", g.current),
        previous_generation: format!("{previous:016x}"),
        old_primary: meta.last_primary.clone(),
    })
}

fn lock_state(dir: &Path, name: &str) -> Result<nix::fcntl::Flock<std::fs::File>> {
    let lock_path = dir.join("lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .ctx(|| format!("opening {}", lock_path.display()))?;
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
        Error::Other(format!(
            "volume '{name}' is busy: another blkmirror process holds {} ({e})",
            lock_path.display()
        ))
    })
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct DemoteReport {
    pub volume: String,
    pub store: String,
    pub image: String,
    pub changed_chunks: u64,
    pub generation: String,
}

/// Make this node's copy of `name` (a primary's state in `state_dir`) a
/// secondary replica in `store_dir`: the image becomes a link to the source,
/// the chunks this node wrote that its mirrors may lack are kept in
/// `NAME.changed` (a failback resends them, after keeping them as a recovery
/// point), and the state may not be used as a primary again.
pub fn demote(state_dir: &Path, name: &str, store_dir: &Path) -> Result<DemoteReport> {
    crate::config::validate_volume_name(name).map_err(Error::Config)?;
    let dir = state_dir.join(name);
    let vpath = dir.join("volume.toml");
    let _state_lock = lock_state(&dir, name)?;
    let mut vol: VolumeState = read_valid_toml(&vpath)?.ok_or_else(|| {
        Error::Config(format!(
            "no primary state for volume '{name}' in {} ({} does not exist)",
            state_dir.display(),
            vpath.display()
        ))
    })?;
    if !vol.demoted_to.is_empty() {
        return Err(Error::Other(format!(
            "volume '{name}' was already demoted into store {}",
            vol.demoted_to
        )));
    }
    let store = Store::open(store_dir)?;
    let meta_path = store_dir.join(format!("{name}.meta"));
    if meta_path.exists() {
        return Err(Error::Other(format!(
            "store {} already holds a volume '{name}'; remove it or choose another store",
            store_dir.display()
        )));
    }
    let _vol_lock = store
        .lock_volume(name, "demote")
        .map_err(|m| Error::Other(format!("cannot demote '{name}': {m}")))?;
    let chunks = vol.volume_bytes.div_ceil(vol.chunk_bytes as u64);
    let bitmap = Bitmap::load(&dir.join("bitmap"), chunks)?;
    let mut map = DigestMap::load(&dir.join("digests"), vol.volume_bytes, vol.chunk_bytes)?;
    // Chunks written here that any mirror may lack: their digests are unknown.
    let mut changed = 0u64;
    for w in 0..bitmap.word_count() {
        let bits = (0..bitmap.peer_count()).fold(0u64, |a, s| a | bitmap.word(s, w));
        let mut b = bits;
        while b != 0 {
            let i = w as u64 * 64 + b.trailing_zeros() as u64;
            b &= b - 1;
            if i < chunks {
                map.set(i, UNKNOWN_DIGEST);
                changed += 1;
            }
        }
    }
    let source = PathBuf::from(&vol.source);
    let source = std::fs::canonicalize(&source).ctx(|| format!("source {}", source.display()))?;
    let img = store_dir.join(format!("{name}.img"));
    if std::fs::symlink_metadata(&img).is_ok() {
        return Err(Error::Other(format!(
            "{} already exists; remove it first",
            img.display()
        )));
    }
    std::os::unix::fs::symlink(&source, &img)
        .ctx(|| format!("linking {} to {}", img.display(), source.display()))?;
    let mut map_copy = DigestMap::new(vol.volume_bytes, vol.chunk_bytes, UNKNOWN_DIGEST);
    for (i, d) in map.all().iter().enumerate() {
        map_copy.set(i as u64, *d);
    }
    map_copy.create_file(&store_dir.join(format!("{name}.digests")))?;
    bitmap.save(&store_dir.join(format!("{name}.changed")))?;
    let g = vol.gen();
    let meta = VolumeMeta {
        format: 1,
        replica_id: id_hex(new_id()),
        source_id: vol.source_id.clone(),
        state: ReplicaState::UpToDate,
        generation: g.current,
        volume_bytes: vol.volume_bytes,
        chunk_bytes: vol.chunk_bytes,
        updated_unix: now_unix(),
        last_primary: String::new(),
        gen_bitmap: g.bitmap,
        gen_history0: g.history[0],
        gen_history1: g.history[1],
        role: Role::Secondary,
        promoted_unix: 0,
        primary_state: String::new(),
        undo_point: 0,
    };
    write_toml(&meta_path, &meta)?;
    let abs_store = std::fs::canonicalize(store_dir).unwrap_or(store_dir.to_path_buf());
    vol.demoted_to = abs_store.display().to_string();
    write_toml(&vpath, &vol)?;
    Ok(DemoteReport {
        volume: name.to_string(),
        store: abs_store.display().to_string(),
        image: img.display().to_string(),
        changed_chunks: changed,
        generation: format!("{:016x}", g.current),
    })
}

// ---- recovery points on a store ---------------------------------------------

fn mailbox(store: &Path, name: &str) -> (PathBuf, PathBuf) {
    (
        store.join(format!("{name}.point-request")),
        store.join(format!("{name}.point-reply")),
    )
}

#[derive(serde::Serialize, serde::Deserialize)]
pub struct PointRequest {
    pub name: String,
    pub nonce: u64,
    /// An automatic (scheduled) point rather than a manual one.
    #[serde(default)]
    pub auto: bool,
    /// Then apply this retention (last, hourly, daily) to the automatic points.
    #[serde(default)]
    pub keep: Option<(u32, u32, u32)>,
    /// Only list the points (take none).
    #[serde(default)]
    pub list: bool,
}

#[derive(serde::Serialize, serde::Deserialize)]
pub struct PointReply {
    pub nonce: u64,
    pub id: u64,
    pub error: String,
    #[serde(default)]
    pub points: Vec<PointInfo>,
}

/// For the apply thread: a pending point request, if any.
pub fn take_point_request(store: &Path, name: &str) -> Option<PointRequest> {
    let (req, _) = mailbox(store, name);
    if !req.exists() {
        return None;
    }
    let r: Option<PointRequest> = read_toml(&req).ok().flatten();
    let _ = std::fs::remove_file(&req);
    r
}

pub fn answer_point_request(store: &Path, name: &str, reply: &PointReply) {
    let (_, rep) = mailbox(store, name);
    let _ = write_toml(&rep, reply);
}

/// Take a recovery point of `name` now. If a session holds the volume the
/// request goes through its mailbox (the point is taken between two applied
/// writes, after they are durable).
pub fn create_point(
    store_dir: &Path,
    name: &str,
    label: Option<&str>,
    auto: bool,
    keep: Option<(u32, u32, u32)>,
) -> Result<u64> {
    let store = Store::open(store_dir)?;
    load_meta(store_dir, name)?;
    let now = now_unix();
    let label = label
        .map(str::to_string)
        .unwrap_or_else(|| format!("manual-{now}"));
    crate::recovery::points::validate_point_name(&label)?;
    loop {
        if let Ok(_lock) = store.lock_volume(name, "points") {
            let (_, meta) = load_meta(store_dir, name)?;
            if meta.state != ReplicaState::UpToDate {
                return Err(Error::Other(format!(
                    "volume '{name}' is {}: a point now would not be a consistent state",
                    meta.state
                )));
            }
            let img = store_dir.join(format!("{name}.img"));
            let f = std::fs::File::open(&img).ctx(|| format!("opening {}", img.display()))?;
            f.sync_all().ctx(|| format!("fsync of {}", img.display()))?;
            let mut points = Points::open(store_dir, name, meta.volume_bytes, meta.chunk_bytes)?;
            let kind = if auto {
                PointKind::Auto
            } else {
                PointKind::Manual
            };
            let id = points.create(&label, kind, now)?;
            if let Some((l, h, d)) = keep {
                points.prune_keep(l, h, d, now)?;
            }
            return Ok(id);
        }
        let request = PointRequest {
            name: label.clone(),
            nonce: 0,
            auto,
            keep,
            list: false,
        };
        if let Some(r) = ask_session(&store, name, request)? {
            return Ok(r.id);
        }
    }
}

/// Hand a request to the session holding the volume and wait for its
/// answer. `None`: the volume became free meanwhile (the holder was not a
/// session, or it ended): the caller does the work itself.
fn ask_session(store: &Store, name: &str, mut request: PointRequest) -> Result<Option<PointReply>> {
    let (req, rep) = mailbox(store.dir(), name);
    let _ = std::fs::remove_file(&rep);
    let nonce = rand::random::<u32>() as u64;
    request.nonce = nonce;
    write_toml(&req, &request)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(Some(r)) = read_toml::<PointReply>(&rep) {
            if r.nonce == nonce {
                let _ = std::fs::remove_file(&rep);
                if !r.error.is_empty() {
                    return Err(Error::Other(r.error));
                }
                return Ok(Some(r));
            }
        }
        if let Ok(lock) = store.lock_volume(name, "points") {
            drop(lock);
            if std::fs::remove_file(&req).is_ok() {
                return Ok(None);
            }
            // The request was taken just now: its answer follows.
        }
        if Instant::now() >= deadline {
            let _ = std::fs::remove_file(&req);
            return Err(Error::Other(format!(
                "volume '{name}' is held by a session that did not answer within 30 s"
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Points of `name`, oldest first.
pub fn list_points(store_dir: &Path, name: &str) -> Result<Vec<PointInfo>> {
    let store = Store::open(store_dir)?;
    load_meta(store_dir, name)?;
    loop {
        if let Ok(_lock) = store.lock_volume(name, "points") {
            let (_, meta) = load_meta(store_dir, name)?;
            let points = Points::open(store_dir, name, meta.volume_bytes, meta.chunk_bytes)?;
            return Ok(points.list());
        }
        // A session owns the points now: ask it.
        let request = PointRequest {
            name: String::new(),
            nonce: 0,
            auto: false,
            keep: None,
            list: true,
        };
        if let Some(r) = ask_session(&store, name, request)? {
            return Ok(r.points);
        }
    }
}

/// Remove points: `ids`, then the retention policy over automatic points.
/// Returns the removed ids and the bytes freed. Needs the volume idle.
pub fn prune_points(
    store_dir: &Path,
    name: &str,
    ids: &[u64],
    keep: Option<(u32, u32, u32)>,
) -> Result<(Vec<u64>, u64)> {
    let store = Store::open(store_dir)?;
    let (_, meta) = load_meta(store_dir, name)?;
    // A brief holder (a scheduled point, a restore starting) is waited for.
    let deadline = Instant::now() + Duration::from_secs(5);
    let _lock = loop {
        match store.lock_volume(name, "points") {
            Ok(l) => break l,
            Err(m) if Instant::now() >= deadline => {
                return Err(Error::Other(format!(
                    "cannot prune the points of '{name}' while a session holds it: {m}"
                )))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    let mut points = Points::open(store_dir, name, meta.volume_bytes, meta.chunk_bytes)?;
    let mut removed = Vec::new();
    let mut freed = 0u64;
    for &id in ids {
        if meta.undo_point == id {
            return Err(Error::Other(format!(
                "point {id} holds the last consistent state of '{name}' while it is Inconsistent; it cannot be removed"
            )));
        }
        freed += points.remove(id)?;
        removed.push(id);
    }
    if let Some((l, h, d)) = keep {
        let (r, f) = points.prune_keep(l, h, d, now_unix())?;
        removed.extend(r);
        freed += f;
    }
    Ok((removed, freed))
}
