//! `blkmirror replicate`: the I/O around [`LiveCore`].
//!
//! Tasks, all on one tokio runtime, sharing [`Shared`] (the core behind a
//! mutex plus wake-ups):
//!
//! * the NBD server ([`crate::frontend`]) calls [`ReplBackend`] for every request;
//! * the bitmap writer persists write-intent batches (group commit) and, lazily,
//!   the digest map followed by cleared bits;
//! * the link task connects to the mirror, sends the outbox in sequence order,
//!   receives acknowledgements, and reconnects after a loss;
//! * the resync task sends dirty chunks nobody sent (after a disconnect, a
//!   pull-ahead, or a crash of the primary);
//! * the status task publishes `STATE/NAME/status.json`.

use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{watch, Notify};

use crate::block::IoService;
use crate::block::{Device, DirectIo, EngineConfig, EnginePreference, OpenOptions};
use crate::busy_poll::BusyPoll;
use crate::config::FRAME_PAYLOAD_BYTES_MAX;
use crate::error::{Error, Result};
use crate::frontend::nbd::{Backend, Listen, NbdError, NbdServer};
use crate::primary::state::PrimaryState;
use crate::primary::sync::{link_err, next_control, resolve, spawn_control_reader};
use crate::primary::{run_sync, SyncOptions};
use crate::protocol::{self, Frame, Hello, HELLO_FLAG_LIVE, HELLO_FLAG_SYNC_MODE};
use crate::track::files::{id_hex, read_toml};
use crate::track::ZeroDigests;
use crate::transport::stream::{Link, CLOSE_OK};
use crate::transport::{self, Fingerprint, Identity, Tuning};

use super::primary::{CoreConfig, LiveCore, Mode, OnDisconnect, OpId, Sent};
use super::status::PrimaryStatus;

/// How long to wait before connecting again after the connect decision
/// refused the pairing.
const REFUSED_RETRY: Duration = Duration::from_secs(10);

/// Largest piece of a write carried by one frame.
const WRITE_PIECE_BYTES: usize = crate::protocol::WRITE_BYTES_MAX as usize;

pub struct ReplicateOptions {
    /// The catch-up sync (its `full`/`checksum` are ignored).
    pub sync: SyncOptions,
    /// Identity again, for the live link (the catch-up consumes the first).
    pub identity: Identity,
    pub mode: Mode,
    pub on_disconnect: OnDisconnect,
    pub suspend_timeout: Duration,
    pub queue_bytes: u64,
    /// Bytes per second the live resync may read and send (0: no limit).
    pub resync_rate: u64,
    /// Asynchronous mode: how long a small write may wait for others to
    /// share its QUIC packet.
    pub linger: Duration,
    pub nbd: Listen,
    pub export: String,
    /// Read the whole source before going live even if the bitmap is trusted.
    pub scan: bool,
    /// How often cleared bits and the digest map are written.
    pub lazy_interval: Duration,
    /// Give the source's I/O engine a thread of its own instead of driving
    /// it from the runtime (README, "The local device on the runtime").
    pub io_thread: bool,
    /// Print a line when listening (tests and scripts wait for it).
    pub announce: bool,
    /// Keep the runtime polling this long after each NBD request and reply
    /// (`Duration::ZERO`: never; README, "Busy polling").
    pub busy_poll: Duration,
}

struct Shared {
    core: Mutex<LiveCore>,
    changed: Notify,
    kick_sender: Notify,
    kick_writer: Notify,
    io: IoService,
    started: Instant,
    /// Set when the state directory can no longer be written: writes fail.
    broken: Mutex<Option<String>>,
    writes: AtomicU64,
    bytes_written: AtomicU64,
    /// Generation ids of the volume here, and what the mirror shares.
    gen: Mutex<Generations>,
    /// Why the last session ended or was refused (cleared when connected).
    link_error: Mutex<Option<String>>,
    /// Chunks the mirror reported different during an online verify.
    verify_mismatches: Mutex<Vec<u64>>,
}

/// Most differing chunks an online verify remembers (it counts them all).
const VERIFY_LIST_MAX: usize = 1 << 20;
/// Verify frames in flight at most.
const VERIFY_WINDOW: u64 = 256;

/// `blkmirror verify` asks a running `replicate` through this file.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct VerifyRequest {
    pub nonce: u64,
    pub repair: bool,
}

/// And gets the answer here.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct VerifyReport {
    pub nonce: u64,
    pub volume: String,
    pub online: bool,
    pub chunks_checked: u64,
    pub chunks_differ: u64,
    /// Differing chunks (at most the first 1000) with their byte offsets.
    pub differ: Vec<(u64, u64)>,
    pub repaired: bool,
    pub seconds: f64,
    pub error: String,
}

pub fn verify_paths(state_dir: &std::path::Path, volume: &str) -> (PathBuf, PathBuf) {
    let d = state_dir.join(volume);
    (d.join("verify-request"), d.join("verify-result"))
}

/// Online verify: every chunk's digest, read under its lock, travels in
/// write order; the mirror compares after applying everything before it.
/// With `repair`, differing chunks are resent through a resync.
async fn verify_job(
    sh: Arc<Shared>,
    volume: String,
    req: VerifyRequest,
    mut stop: watch::Receiver<bool>,
) -> VerifyReport {
    let started = Instant::now();
    let (volume_bytes, chunk_bytes) = {
        let c = sh.core();
        (c.config().volume_bytes, c.config().chunk_bytes)
    };
    let cb = chunk_bytes as u64;
    let chunks = volume_bytes.div_ceil(cb);
    sh.verify_mismatches
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clear();
    let mut report = VerifyReport {
        nonce: req.nonce,
        volume,
        online: true,
        ..Default::default()
    };
    let mut last_seq = 0u64;
    let mut c = 0u64;
    while c < chunks {
        if *stop.borrow() {
            report.error = "replicate is stopping; verify interrupted".into();
            return report;
        }
        // Bound the frames in flight.
        let window_ok =
            |core: &mut LiveCore, _| (core.durable_seq() + VERIFY_WINDOW >= last_seq).then_some(());
        tokio::select! {
            _ = sh.wait_until(Some(Duration::from_millis(200)), window_ok) => {}
            _ = stop.changed() => continue,
        }
        let start = c * cb;
        let len = crate::config::chunk_len(volume_bytes, chunk_bytes, c) as u64;
        let op = sh.lock_range(start, start + len).await;
        let data = match sh.io.read(start, len as usize).await {
            Ok(d) => d,
            Err(e) => {
                sh.unlock(op);
                report.error = format!("cannot read chunk {c} of the source: {e}");
                return report;
            }
        };
        let digest = protocol::digest(&data);
        let seq = sh.core().send_verify(c, digest, sh.now());
        sh.unlock(op);
        match seq {
            Some(s) => {
                last_seq = s;
                sh.kick_sender.notify_one();
                c += 1;
            }
            None => {
                // Not in sync now (disconnected, resyncing): wait, then retry this chunk.
                let in_sync = |core: &mut LiveCore, _| core.in_sync().then_some(());
                tokio::select! {
                    _ = sh.wait_until(Some(Duration::from_millis(200)), in_sync) => {}
                    _ = stop.changed() => {}
                }
            }
        }
    }
    // Every verdict is in once the last verify frame is acknowledged.
    let acked = |core: &mut LiveCore, _| (core.durable_seq() >= last_seq).then_some(());
    tokio::select! {
        _ = sh.wait_until(Some(Duration::from_millis(200)), acked) => {}
        _ = stop.changed() => {
            report.error = "replicate is stopping; verify interrupted".into();
            return report;
        }
    }
    let differ: Vec<u64> = {
        let mut m = sh
            .verify_mismatches
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        m.sort_unstable();
        m.dedup();
        m.clone()
    };
    report.chunks_checked = chunks;
    report.chunks_differ = differ.len() as u64;
    report.differ = differ.iter().take(1000).map(|&i| (i, i * cb)).collect();
    if req.repair && !differ.is_empty() {
        {
            let mut core = sh.core();
            for &i in &differ {
                core.mark_for_resync(i);
            }
        }
        sh.changed.notify_waiters();
        sh.kick_writer.notify_one();
        let repaired = |core: &mut LiveCore, _| {
            (core.in_sync() && differ.iter().all(|&i| !core.is_dirty(i))).then_some(())
        };
        tokio::select! {
            _ = sh.wait_until(Some(Duration::from_millis(200)), repaired) => report.repaired = true,
            _ = stop.changed() => report.error = "replicate is stopping; repair interrupted".into(),
        }
    }
    report.seconds = started.elapsed().as_secs_f64();
    report
}

/// Generation bookkeeping shared by the link (reads, requests) and the
/// bitmap writer (persists).
struct Generations {
    ids: crate::protocol::GenIds,
    /// The id this node and the mirror shared when last in sync.
    shared: u64,
    primary_since_unix: u64,
    policy: crate::protocol::genid::SplitBrainPolicy,
    peer_fp: String,
    /// To persist: the mirror's replica id (it changed: failback to a new
    /// replica), the peer is now in sync at `ids.current`, a new current id.
    new_replica_id: Option<String>,
    record_in_sync: bool,
    rotate: bool,
}

impl Shared {
    fn gens(&self) -> MutexGuard<'_, Generations> {
        self.gen.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn now(&self) -> Duration {
        self.started.elapsed()
    }

    fn core(&self) -> MutexGuard<'_, LiveCore> {
        // A panic while holding the lock is a bug; the state is still the
        // best information there is.
        self.core.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn broken(&self) -> Option<String> {
        self.broken
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set_broken(&self, msg: String) {
        tracing::error!("{msg}");
        *self.broken.lock().unwrap_or_else(|p| p.into_inner()) = Some(msg);
        self.changed.notify_waiters();
    }

    /// Wait until `f` returns `Some`, re-checking on every state change (and
    /// every `tick`, for time-based conditions).
    async fn wait_until<T>(
        &self,
        tick: Option<Duration>,
        mut f: impl FnMut(&mut LiveCore, Duration) -> Option<T>,
    ) -> T {
        self.wait_for(|c, now| f(c, now).ok_or(tick)).await
    }

    /// Like [`Shared::wait_until`], with the condition also saying how
    /// long to sleep at most before it is checked again (`Err(None)`: until
    /// the state changes).
    async fn wait_for<T>(
        &self,
        mut f: impl FnMut(&mut LiveCore, Duration) -> std::result::Result<T, Option<Duration>>,
    ) -> T {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let before;
            let tick;
            {
                let mut core = self.core();
                before = core.outbox_len();
                let r = f(&mut core, self.now());
                if core.outbox_len() != before {
                    self.kick_sender.notify_one();
                }
                match r {
                    Ok(v) => return v,
                    Err(t) => tick = t,
                }
            }
            match tick {
                Some(t) => {
                    let _ = tokio::time::timeout(t, notified).await;
                }
                None => notified.await,
            }
        }
    }

    async fn lock_range(&self, start: u64, end: u64) -> OpId {
        self.wait_until(None, |c, _| c.try_lock(start, end)).await
    }

    fn unlock(&self, op: OpId) {
        self.core().unlock(op);
        self.changed.notify_waiters();
    }

    /// Mark chunks dirty; wait until the bitmap says so on disk.
    async fn intent(&self, offset: u64, len: u64) -> std::result::Result<(), NbdError> {
        let batch = {
            let mut c = self.core();
            let (first, last) = c.chunk_range(offset, len);
            c.prepare(first, last).wait_batch
        };
        if batch == 0 {
            return Ok(());
        }
        self.kick_writer.notify_one();
        self.wait_until(None, |c, _| {
            if c.batch_is_durable(batch) {
                Some(Ok(()))
            } else if self.broken().is_some() {
                Some(Err(NbdError::Io))
            } else {
                None
            }
        })
        .await
    }

    /// Sync mode: wait until the mirror durably holds everything up to
    /// `target` in a replica that is in sync. While it is not (the link is
    /// down, or a resync after a reconnect runs), the policy decides:
    /// `continue` answers at once (the write is on the local device; its
    /// frame, if one was queued, still goes to the mirror, and its chunks
    /// stay marked until the mirror has them); `suspend` holds the write
    /// until the replica is in sync again, at most the suspend timeout,
    /// counted from the disconnect while the link is down and from the
    /// write's own arrival otherwise, then fails it with EIO.
    async fn covered(&self, target: u64) -> std::result::Result<(), NbdError> {
        let (on_disc, timeout) = {
            let c = self.core();
            (c.config().on_disconnect, c.config().suspend_timeout)
        };
        let since = self.now();
        self.wait_until(Some(Duration::from_millis(100)), |c, now| {
            if c.covered() >= target {
                return Some(Ok(()));
            }
            if c.in_sync() {
                // Connected and live: the acknowledgement is on its way.
                return None;
            }
            match on_disc {
                OnDisconnect::Continue => Some(Ok(())),
                // Rather fail than acknowledge what the mirror does not hold.
                OnDisconnect::Suspend
                    if c.suspend_expired(now) || now.saturating_sub(since) >= timeout =>
                {
                    Some(Err(NbdError::Io))
                }
                OnDisconnect::Suspend => None,
            }
        })
        .await
    }

    /// Queue one operation's frames; sync mode waits for room.
    async fn send(&self, mut op: impl FnMut(&mut LiveCore, Duration) -> Sent) -> u64 {
        let t = self.wait_until(None, |c, now| op(c, now).target()).await;
        self.kick_sender.notify_one();
        t
    }

    /// Queue one operation's frames; with `quiet` (asynchronous mode) the
    /// sender is not woken: the caller wakes it once the local write is
    /// done, so on this 2-core machine the client's reply goes out before
    /// the QUIC send instead of waiting behind it (the frames are queued in
    /// order either way; another write's wake-up may send them sooner).
    async fn queue(&self, quiet: bool, mut op: impl FnMut(&mut LiveCore, Duration) -> Sent) -> u64 {
        if quiet {
            let now = self.now();
            if let Some(t) = op(&mut self.core(), now).target() {
                return t;
            }
        }
        self.send(op).await
    }
}

/// The NBD backend: every request goes through the core, then the device.
pub struct ReplBackend {
    sh: Arc<Shared>,
    size: u64,
    mode: Mode,
    poll: Option<Arc<BusyPoll>>,
}

fn io_to_nbd(e: crate::block::BlockError) -> NbdError {
    tracing::warn!("local I/O failed: {e}");
    NbdError::from_errno(crate::block::error_errno(&e) as u32).unwrap_or(NbdError::Io)
}

impl ReplBackend {
    async fn write_inner(
        &self,
        offset: u64,
        data: Bytes,
        fua: bool,
    ) -> std::result::Result<u64, NbdError> {
        let sh = &self.sh;
        let len = data.len() as u64;
        sh.intent(offset, len).await?;
        // The local write is started first (join! polls in order), then the
        // frames are queued: the two proceed in parallel.
        let quiet = self.mode == Mode::Async;
        let local = sh.io.write(offset, data.clone(), fua);
        let remote = async {
            let mut target = 0;
            let mut pos = 0usize;
            while pos < data.len() {
                let end = (pos + WRITE_PIECE_BYTES).min(data.len());
                let piece = data.slice(pos..end);
                let off = offset + pos as u64;
                let digest = protocol::digest(&piece);
                target = sh
                    .queue(quiet, |c, now| c.send_write(off, &piece, digest, fua, now))
                    .await;
                pos = end;
            }
            target
        };
        let (l, target) = tokio::join!(local, remote);
        if quiet {
            sh.kick_sender.notify_one();
        }
        l.map_err(io_to_nbd)?;
        Ok(target)
    }

    async fn zero_inner(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
    ) -> std::result::Result<u64, NbdError> {
        let sh = &self.sh;
        sh.intent(offset, len).await?;
        let quiet = self.mode == Mode::Async;
        let local = sh.io.zero(offset, len, fua);
        let remote = sh.queue(quiet, |c, now| c.send_zero(offset, len, fua, now));
        let (l, target) = tokio::join!(local, remote);
        if quiet {
            sh.kick_sender.notify_one();
        }
        l.map_err(io_to_nbd)?;
        Ok(target)
    }

    fn check(&self, offset: u64, len: u64) -> std::result::Result<(), NbdError> {
        if offset.checked_add(len).is_none_or(|e| e > self.size) {
            return Err(NbdError::Invalid);
        }
        if self.sh.broken().is_some() {
            return Err(NbdError::Io);
        }
        Ok(())
    }

    async fn finish(&self, target: u64) -> std::result::Result<(), NbdError> {
        if self.mode == Mode::Sync {
            self.sh.covered(target).await?;
        }
        Ok(())
    }
}

impl Backend for ReplBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn min_block(&self) -> u32 {
        self.sh.io.logical_block_bytes().max(512)
    }

    fn activity(&self) {
        if let Some(p) = &self.poll {
            p.touch();
        }
    }

    async fn read(&self, offset: u64, len: u32) -> std::result::Result<Vec<u8>, NbdError> {
        self.check(offset, len as u64)?;
        self.sh
            .io
            .read(offset, len as usize)
            .await
            .map_err(io_to_nbd)
    }

    async fn write(
        &self,
        offset: u64,
        data: Vec<u8>,
        fua: bool,
    ) -> std::result::Result<(), NbdError> {
        let len = data.len() as u64;
        self.check(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let op = self.sh.lock_range(offset, offset + len).await;
        let r = self.write_inner(offset, Bytes::from(data), fua).await;
        self.sh.unlock(op);
        let target = r?;
        self.sh.writes.fetch_add(1, Ordering::Relaxed);
        self.sh.bytes_written.fetch_add(len, Ordering::Relaxed);
        metrics::counter!("blkmirror_live_writes_total").increment(1);
        metrics::counter!("blkmirror_live_bytes_written_total").increment(len);
        self.finish(target).await
    }

    async fn flush(&self) -> std::result::Result<(), NbdError> {
        if self.sh.broken().is_some() {
            return Err(NbdError::Io);
        }
        // The barrier covers every write completed before this request.
        let target = self.sh.send(|c, now| c.send_flush(now)).await;
        self.sh.io.flush().await.map_err(io_to_nbd)?;
        self.finish(target).await
    }

    async fn trim(&self, offset: u64, len: u64) -> std::result::Result<(), NbdError> {
        // A trimmed range reads back as zeros on both sides, so the replica
        // stays bit-identical.
        self.write_zeroes(offset, len, false).await
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
    ) -> std::result::Result<(), NbdError> {
        self.check(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let op = self.sh.lock_range(offset, offset + len).await;
        let r = self.zero_inner(offset, len, fua).await;
        self.sh.unlock(op);
        let target = r?;
        self.finish(target).await
    }
}

/// Persist write-intent batches as they come, and lazily the digest map
/// followed by cleared bits.
async fn bitmap_writer(
    sh: Arc<Shared>,
    mut st: PrimaryState,
    file: File,
    path: PathBuf,
    lazy_interval: Duration,
    mut stop: watch::Receiver<bool>,
) -> PrimaryState {
    let mut next_lazy = tokio::time::Instant::now() + lazy_interval;
    loop {
        let stopping = *stop.borrow();
        let lazy_due = stopping || tokio::time::Instant::now() >= next_lazy;
        // Intent first: writes are waiting for it.
        let batch = {
            let mut core = sh.core();
            core.take_batch()
                .map(|(b, words)| (b, core.persisted().write_words(&file, &path, &words)))
        };
        if let Some((b, wr)) = batch {
            let r = wr.and_then(|_| {
                tokio::task::block_in_place(|| file.sync_data())
                    .map_err(|e| Error::io(format!("fsync of {}", path.display()), e))
            });
            match r {
                Ok(()) => {
                    sh.core().batch_durable(b);
                    sh.changed.notify_waiters();
                }
                Err(e) => {
                    sh.set_broken(format!("cannot write the write-intent bitmap: {e}"));
                    return st;
                }
            }
            continue;
        }
        if let Err(e) = persist_generations(&sh, &mut st) {
            sh.set_broken(format!("cannot write the primary's state: {e}"));
            return st;
        }
        if lazy_due {
            if let Err(e) = lazy_flush(&sh, &mut st, &file, &path, stopping) {
                sh.set_broken(format!("cannot write the primary's state: {e}"));
                return st;
            }
            next_lazy = tokio::time::Instant::now() + lazy_interval;
            if stopping {
                return st;
            }
        }
        tokio::select! {
            _ = sh.kick_writer.notified() => {}
            _ = tokio::time::sleep_until(next_lazy) => {}
            _ = stop.changed() => {}
        }
    }
}

/// Write what the link learned about generations into `volume.toml`.
fn persist_generations(sh: &Shared, st: &mut PrimaryState) -> Result<()> {
    let (replica, in_sync, fp) = {
        let mut g = sh.gens();
        if g.new_replica_id.is_none() && !g.record_in_sync && !g.rotate {
            return Ok(());
        }
        if std::mem::take(&mut g.rotate) && g.ids.current == g.shared {
            // This node writes on without its mirror: a new current id, so a
            // mirror promoted meanwhile is seen as a split brain.
            let fresh = crate::primary::state::new_gen();
            g.ids.rotate(fresh);
        }
        let in_sync = std::mem::take(&mut g.record_in_sync);
        if in_sync {
            g.shared = g.ids.current;
        }
        st.vol.set_gen(g.ids);
        (g.new_replica_id.take(), in_sync, g.peer_fp.clone())
    };
    if let Some(p) = st.vol.peers.iter_mut().find(|p| p.fingerprint == fp) {
        if let Some(r) = replica {
            p.replica_id = r;
        }
        if in_sync {
            p.generation = st.vol.gen_current;
            p.last_sync_unix = crate::mirror::store::now_unix();
        }
    }
    tokio::task::block_in_place(|| st.save_volume())
}

fn lazy_flush(
    sh: &Shared,
    st: &mut PrimaryState,
    file: &File,
    path: &std::path::Path,
    all: bool,
) -> Result<()> {
    let map = sh.core().take_map_updates();
    for (c, d) in map {
        st.map.set(c, d);
    }
    let (late, words) = {
        let mut core = sh.core();
        let late = core.take_map_updates();
        (late, core.take_clearable_words(all))
    };
    for (c, d) in late {
        st.map.set(c, d);
    }
    // The map first: a bit may only be cleared on disk once the map says
    // what the mirror holds for that chunk.
    if st.map.is_dirty() {
        tokio::task::block_in_place(|| st.map.flush())?;
    }
    if !words.is_empty() {
        sh.core().persisted().write_words(file, path, &words)?;
        tokio::task::block_in_place(|| file.sync_data())
            .map_err(|e| Error::io(format!("fsync of {}", path.display()), e))?;
    }
    Ok(())
}

/// Why a live session ended.
enum SessionEnd {
    /// The primary is stopping and the mirror acknowledged the end.
    Finished,
    /// The mirror cannot take this volume from this primary; do not retry.
    Fatal(Error),
    /// Lost; reconnect.
    Lost(Error),
    /// The connect decision refused this pairing (split brain, the mirror
    /// is newer): keep serving, retry now and then (an operator may resolve
    /// it on the other side), and say so in the status.
    Refused(Error),
}

struct LinkParams {
    to: String,
    peer: Fingerprint,
    volume: String,
    volume_bytes: u64,
    chunk_bytes: u32,
    source_id: u128,
    replica_id: String,
    sync_mode: bool,
    linger: Duration,
    tuning: Tuning,
}

async fn link_loop(
    sh: Arc<Shared>,
    identity: Identity,
    p: LinkParams,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    let addr = resolve(&p.to).await?;
    let bind: std::net::SocketAddr = if addr.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let endpoint = transport::client_endpoint(&identity, bind, &p.tuning)?;
    let mut backoff = Duration::from_millis(100);
    loop {
        if *stop.borrow() {
            return Ok(());
        }
        let end = session(&sh, &endpoint, addr, &p, &mut stop).await;
        sh.core().on_disconnected(sh.now());
        if sh.core().config().on_disconnect == OnDisconnect::Continue
            && !matches!(end, SessionEnd::Finished)
        {
            sh.gens().rotate = true;
            sh.kick_writer.notify_one();
        }
        sh.changed.notify_waiters();
        match end {
            SessionEnd::Finished => return Ok(()),
            SessionEnd::Fatal(e) => return Err(e),
            SessionEnd::Lost(e) => {
                tracing::warn!(volume = %p.volume, "mirror link lost: {e}; reconnecting");
                *sh.link_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
            }
            SessionEnd::Refused(e) => {
                tracing::error!(volume = %p.volume, "{e}; retrying in {} s", REFUSED_RETRY.as_secs());
                *sh.link_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                backoff = REFUSED_RETRY;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => {}
        }
        backoff = if backoff >= REFUSED_RETRY {
            Duration::from_millis(100)
        } else {
            (backoff * 2).min(Duration::from_secs(2))
        };
    }
}

async fn session(
    sh: &Shared,
    endpoint: &transport::ClientEndpoint,
    addr: std::net::SocketAddr,
    p: &LinkParams,
    stop: &mut watch::Receiver<bool>,
) -> SessionEnd {
    let conn = match transport::connect(endpoint, addr, &p.peer, &p.tuning).await {
        Ok(c) => c,
        Err(e) => return SessionEnd::Lost(e.into()),
    };
    let link = Link::new(conn, FRAME_PAYLOAD_BYTES_MAX);
    let end = session_on_link(sh, &link, p, stop).await;
    match &end {
        SessionEnd::Finished => link.close(CLOSE_OK, "done"),
        SessionEnd::Fatal(e) | SessionEnd::Lost(e) | SessionEnd::Refused(e) => {
            link.close(crate::transport::stream::CLOSE_ERROR, &e.to_string())
        }
    }
    end
}

async fn session_on_link(
    sh: &Shared,
    link: &Link,
    p: &LinkParams,
    stop: &mut watch::Receiver<bool>,
) -> SessionEnd {
    let lost = SessionEnd::Lost;
    let linger = p.linger;
    let (mut ctl_tx, ctl_rx) = match link.open_control().await {
        Ok(x) => x,
        Err(e) => return lost(link_err(e)),
    };
    let mut ctl = spawn_control_reader(ctl_rx);
    let mut flags = HELLO_FLAG_LIVE;
    if p.sync_mode {
        flags |= HELLO_FLAG_SYNC_MODE;
    }
    let hello = Frame::Hello(Hello {
        volume: p.volume.clone(),
        volume_bytes: p.volume_bytes,
        chunk_bytes: p.chunk_bytes,
        flags,
        source_id: p.source_id,
    });
    if let Err(e) = ctl_tx.send(&hello).await {
        return lost(link_err(e));
    }
    let ack = match tokio::time::timeout(Duration::from_secs(30), next_control(&mut ctl)).await {
        Err(_) => {
            return lost(Error::ConnectionLost(
                "mirror did not answer the hello".into(),
            ))
        }
        Ok(Ok(Frame::HelloAck(a))) => a,
        Ok(Ok(other)) => {
            return SessionEnd::Fatal(Error::unexpected(&other, "waiting for HelloAck"))
        }
        // A refusal ("busy" while the old session is replaced) is retried.
        Ok(Err(e)) => return lost(e),
    };
    if ack.volume_bytes != p.volume_bytes || ack.chunk_bytes != p.chunk_bytes {
        return SessionEnd::Fatal(Error::Refused(format!(
            "the mirror's replica of '{}' has {} bytes in {}-byte chunks, this volume {} in {}",
            p.volume, ack.volume_bytes, ack.chunk_bytes, p.volume_bytes, p.chunk_bytes
        )));
    }
    let chunks = p.volume_bytes.div_ceil(p.chunk_bytes as u64);
    let target_words = match crate::primary::connect::read_changed(&mut ctl, &ack, chunks).await {
        Ok(w) => w,
        Err(e) => return lost(e),
    };
    let (view, since, policy) = {
        let g = sh.gens();
        (
            crate::protocol::genid::SourceView {
                gen: g.ids,
                shared: g.shared,
                changed: 0,
                untracked: false,
            },
            g.primary_since_unix,
            g.policy,
        )
    };
    let source_bits = sh.core().dirty_words().to_vec();
    let plan = match crate::primary::connect::plan_from(
        view,
        &source_bits,
        since,
        &p.volume,
        &ack,
        target_words,
        policy,
    ) {
        Ok(plan) => plan,
        Err(e) => return SessionEnd::Refused(e),
    };
    if let crate::protocol::genid::Decision::Full { reason } = &plan.decision {
        return SessionEnd::Fatal(Error::Refused(format!(
            "the mirror's replica of '{}' is not one this primary can resync by bitmap ({reason}; replica {}, state {}); \
             run `blkmirror replicate` with --scan (or `blkmirror sync --full`) to rebuild it",
            p.volume,
            id_hex(ack.replica_id),
            ack.state,
        )));
    }
    tracing::info!("{}", plan.describe(&p.volume));
    if plan.takeover {
        if let Err(e) = crate::primary::connect::take_over(&mut ctl_tx, &mut ctl).await {
            return lost(e);
        }
    }
    if id_hex(ack.replica_id) != p.replica_id {
        // A new replica of the same lineage (an old primary that came back
        // as a secondary): remember it.
        sh.gens().new_replica_id = Some(id_hex(ack.replica_id));
        sh.kick_writer.notify_one();
    }
    let mut data = match link.open_data().await {
        Ok(d) => d,
        Err(e) => return lost(link_err(e)),
    };
    {
        let generation = sh.gens().ids.current;
        let mut core = sh.core();
        core.on_connected(ack.state);
        core.add_target_changes(&plan.target_words);
        *sh.link_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
        core.set_generation(generation);
    }
    sh.changed.notify_waiters();
    tracing::info!(volume = %p.volume, state = %ack.state, "live session with the mirror");
    let mut end_seq: Option<u64> = None;
    let mut stopping = *stop.borrow();
    loop {
        if stopping && end_seq.is_none() {
            // Everything the NBD clients got a reply for is in the outbox
            // (the server has stopped): end after it.
            let seq = sh.core().send_end(sh.now());
            end_seq = Some(seq);
        }
        // Send everything queued, in order, without holding the lock across
        // awaits; asynchronous mode may hold small writes for a batch.
        let kicked = sh.kick_sender.notified();
        tokio::pin!(kicked);
        kicked.as_mut().enable();
        let mut hold = None;
        loop {
            let f = {
                let mut core = sh.core();
                match core.hold_outbox_until(linger) {
                    Some(t) if !stopping && t > sh.now() => {
                        hold = Some(t);
                        None
                    }
                    _ => core.poll_outbox(),
                }
            };
            let Some(f) = f else { break };
            if let Err(e) = data.send(&f).await {
                return lost(link_err(e));
            }
        }
        let hold_until = tokio::time::Instant::from_std(sh.started + hold.unwrap_or_default());
        tokio::select! {
            _ = &mut kicked => {}
            _ = tokio::time::sleep_until(hold_until), if hold.is_some() => {}
            r = next_control(&mut ctl) => match r {
                Ok(Frame::Ack { seq, state }) => {
                    let (r, now_in_sync) = {
                        let mut core = sh.core();
                        let before = core.in_sync();
                        let r = core.on_ack(seq, state);
                        (r, !before && core.in_sync())
                    };
                    if now_in_sync {
                        sh.gens().record_in_sync = true;
                        sh.kick_writer.notify_one();
                    }
                    if let Err(m) = r {
                        return SessionEnd::Fatal(Error::Protocol(protocol::ProtocolError::Malformed {
                            kind: "Ack",
                            reason: m,
                        }));
                    }
                    sh.changed.notify_waiters();
                    if end_seq.is_some_and(|e| seq >= e) {
                        return SessionEnd::Finished;
                    }
                }
                Ok(Frame::Applied { seq }) => {
                    let r = sh.core().on_applied(seq);
                    if let Err(m) = r {
                        return SessionEnd::Fatal(Error::Protocol(protocol::ProtocolError::Malformed {
                            kind: "Applied",
                            reason: m,
                        }));
                    }
                    // Room in the queue: a sync-mode writer or the resync may go on.
                    sh.changed.notify_waiters();
                }
                Ok(Frame::VerifyMismatch { index, .. }) => {
                    let mut m = sh.verify_mismatches.lock().unwrap_or_else(|p| p.into_inner());
                    if m.len() < VERIFY_LIST_MAX {
                        m.push(index);
                    }
                }
                Ok(other) => {
                    return SessionEnd::Fatal(Error::unexpected(&other, "in a live session"))
                }
                Err(e) => return lost(e),
            },
            _ = stop.changed(), if !stopping => {
                stopping = true;
            }
            _ = tokio::time::sleep(Duration::from_secs(10)), if end_seq.is_some() => {
                return lost(Error::ConnectionLost("the mirror did not acknowledge the end of the session within 10 s".into()));
            }
        }
    }
}

/// Chunks nobody sent: read each while it is locked, queue it. One task
/// claims the chunks (a single waiter on the state, so a write wakes one
/// task, not one per reader); each claim is read by a task of its own, up
/// to [`crate::replication::primary::RESYNC_READS_MAX`] at once (the core
/// hands out no more claims than that).
async fn resync_task(sh: Arc<Shared>, compress: bool, mut stop: watch::Receiver<bool>) {
    let (volume_bytes, chunk_bytes) = {
        let c = sh.core();
        (c.config().volume_bytes, c.config().chunk_bytes)
    };
    let zeros = Arc::new(ZeroDigests::new(volume_bytes, chunk_bytes));
    let mut readers = tokio::task::JoinSet::new();
    loop {
        let claim = tokio::select! {
            c = sh.wait_for(|core, now| {
                core.next_resync(now).ok_or_else(|| {
                    // Checked again at a state change, when the rate allows
                    // the next chunk, or after 200 ms (the busy window ends).
                    let tick = Duration::from_millis(200);
                    Some(core.resync_rate_wait(now).map_or(tick, |w| w.min(tick)))
                })
            }) => c,
            _ = stop.changed() => break,
        };
        while readers.try_join_next().is_some() {}
        if sh.broken().is_some() {
            // A read failed: replicate is stopping.
            sh.core().release_resync(claim);
            break;
        }
        let len = crate::config::chunk_len(volume_bytes, chunk_bytes, claim.chunk) as u64;
        let start = claim.chunk * chunk_bytes as u64;
        readers.spawn(resync_read(
            sh.clone(),
            zeros.clone(),
            compress,
            claim,
            start,
            len,
        ));
    }
    while readers.join_next().await.is_some() {}
}

/// Read one claimed chunk (`len` bytes at `start`) while it is locked and queue it.
async fn resync_read(
    sh: Arc<Shared>,
    zeros: Arc<ZeroDigests>,
    compress: bool,
    claim: crate::replication::primary::ResyncClaim,
    start: u64,
    len: u64,
) {
    let c = claim.chunk;
    let op = sh.lock_range(start, start + len).await;
    if !sh.core().needs_resync(&claim) {
        sh.core().release_resync(claim);
        sh.unlock(op);
        return;
    }
    let data = match sh.io.read(start, len as usize).await {
        Ok(d) => d,
        Err(e) => {
            sh.core().release_resync(claim);
            sh.unlock(op);
            sh.set_broken(format!("resync cannot read chunk {c} of the source: {e}"));
            return;
        }
    };
    let digest = protocol::digest(&data);
    let chunk = tokio::task::block_in_place(|| {
        protocol::seal_chunk(c, data, digest, zeros.of(c), compress)
    });
    let _ = sh.core().send_resync_chunk(claim, chunk, sh.now());
    sh.unlock(op);
    sh.kick_sender.notify_one();
}

fn status_of(sh: &Shared, opts: &StatusInfo, stopped: bool) -> PrimaryStatus {
    let s = sh.core().status(sh.now());
    metrics::gauge!("blkmirror_live_dirty_chunks").set(s.dirty_chunks as f64);
    metrics::gauge!("blkmirror_live_queued_bytes").set(s.queued_bytes as f64);
    metrics::gauge!("blkmirror_live_lag_seconds").set(s.lag_seconds);
    PrimaryStatus {
        role: "primary".into(),
        volume: opts.volume.clone(),
        pid: std::process::id(),
        pid_start: super::status::own_start(),
        stopped,
        updated_unix: super::status::now_unix(),
        on_disconnect: opts.on_disconnect.clone(),
        mirror: opts.mirror.clone(),
        nbd: opts.nbd.clone(),
        core: s,
        writes: sh.writes.load(Ordering::Relaxed),
        bytes_written: sh.bytes_written.load(Ordering::Relaxed),
        link_error: sh
            .link_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone(),
    }
}

struct StatusInfo {
    volume: String,
    mirror: String,
    nbd: String,
    on_disconnect: String,
}

/// The second stop request (`force` of [`run_replicate`]): once it came,
/// the stop waits for nothing on the network any more.
struct Force<F> {
    signal: std::pin::Pin<Box<F>>,
    fired: bool,
}

/// How a bounded wait of the stop ended.
enum Waited<T> {
    Done(T),
    TimedOut,
    Forced,
}

impl<F: std::future::Future<Output = ()>> Force<F> {
    /// `fut` for at most `limit`, unless the stop is (or gets) forced first.
    async fn within<T>(
        &mut self,
        limit: Duration,
        fut: impl std::future::Future<Output = T>,
    ) -> Waited<T> {
        if self.fired {
            return Waited::Forced;
        }
        tokio::select! {
            r = tokio::time::timeout(limit, fut) => match r {
                Ok(v) => Waited::Done(v),
                Err(_) => Waited::TimedOut,
            },
            _ = self.signal.as_mut() => {
                self.fired = true;
                Waited::Forced
            }
        }
    }
}

/// Serve `opts.sync.source` over NBD and replicate every write until
/// `shutdown` resolves; then stop cleanly: answer the requests in flight,
/// flush the source, end the session with the mirror once it has
/// acknowledged what it got, and write the bitmap's cleared bits. If `force`
/// resolves during that stop (a second signal), the waits for NBD clients,
/// the mirror and the resync are cut short: requests in flight get no
/// answer, and chunks the mirror did not acknowledge stay marked in the
/// bitmap (they were marked before their local write), so the next start
/// resyncs them. The stop then ends in an error that says so. A fatal
/// error (the link refused, the local device failed) ends it too.
pub async fn run_replicate(
    opts: ReplicateOptions,
    shutdown: impl std::future::Future<Output = ()>,
    force: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let so = &opts.sync;
    crate::config::validate_volume_name(&so.volume).map_err(Error::Config)?;
    let fp = so.peer.to_string();
    // 1. Catch up unless the bitmap is known to track every write.
    let vol_toml = so.state_dir.join(&so.volume).join("volume.toml");
    let known: Option<crate::primary::state::VolumeState> =
        crate::track::files::read_valid_toml(&vol_toml)?;
    let tracked = known
        .as_ref()
        .and_then(|v| v.peers.iter().find(|p| p.fingerprint == fp))
        .is_some_and(|p| p.synced && p.tracked);
    let SyncOptionsParts {
        sync_opts,
        source,
        state_dir,
        volume,
        to,
        peer,
        tuning,
        engine,
        queue_depth,
        compress,
        resize,
        split_brain,
    } = split(opts.sync);
    if sync_opts.dry_run {
        let report = run_sync(sync_opts).await?;
        println!("{}", report.decision);
        return Ok(());
    }
    if !tracked || opts.scan {
        let report = run_sync(sync_opts).await?;
        tracing::info!(mode = report.mode, sent = report.chunks_sent, "caught up");
        if opts.announce {
            eprintln!("{}", crate::demo::describe(&report));
        }
    } else {
        drop(sync_opts);
        tracing::info!(volume = %volume, "bitmap is trusted: resyncing dirty chunks live");
    }
    // 2. The primary's state, now owned by this process.
    let device = Device::open(
        &source,
        &OpenOptions {
            write: true,
            direct: DirectIo::Auto,
        },
    )?;
    let volume_bytes = device.size_bytes();
    let mut st = PrimaryState::open(
        &state_dir,
        &volume,
        &source,
        volume_bytes,
        None,
        false,
        resize,
    )?;
    let slot = st.bitmap.peer_slot(&peer.0)?;
    let mut rec = st.peer(&fp).cloned().ok_or_else(|| {
        Error::Other(format!(
            "volume '{volume}' has no record of mirror {fp}; run with --scan"
        ))
    })?;
    if !rec.synced {
        return Err(Error::Other(format!(
            "mirror {fp} never completed a sync of '{volume}'; run with --scan"
        )));
    }
    rec.tracked = true;
    st.set_peer(rec.clone())?;
    st.save_bitmap()?;
    let bitmap_path = st.dir.join("bitmap");
    let bitmap_file = std::fs::OpenOptions::new()
        .write(true)
        .open(&bitmap_path)
        .map_err(|e| Error::io(format!("opening {}", bitmap_path.display()), e))?;
    let chunk_bytes = st.vol.chunk_bytes;
    let core = LiveCore::new(
        CoreConfig {
            volume_bytes,
            chunk_bytes,
            mode: opts.mode,
            on_disconnect: opts.on_disconnect,
            queue_bytes_max: opts.queue_bytes,
            suspend_timeout: opts.suspend_timeout,
            resync_rate: opts.resync_rate,
        },
        st.bitmap.clone(),
        slot,
    );
    let source_id = st.source_id();
    let gens = Generations {
        ids: st.vol.gen(),
        shared: rec.generation,
        primary_since_unix: st.vol.primary_since_unix,
        policy: split_brain,
        peer_fp: fp.clone(),
        new_replica_id: None,
        record_in_sync: false,
        rotate: false,
    };
    // 3. The device through io_uring.
    let engine_cfg = EngineConfig {
        queue_depth,
        buffer_bytes: 1 << 20,
        buffer_count: queue_depth as usize,
    };
    let (io, io_driver) = if opts.io_thread {
        (IoService::start(device, &engine_cfg, engine)?, None)
    } else {
        IoService::start_on_runtime(device, &engine_cfg, engine)?
    };
    let io_driver = io_driver.map(tokio::spawn);
    tracing::info!(engine = io.engine_name(), "local I/O engine");
    let sh = Arc::new(Shared {
        core: Mutex::new(core),
        changed: Notify::new(),
        kick_sender: Notify::new(),
        kick_writer: Notify::new(),
        io,
        started: Instant::now(),
        broken: Mutex::new(None),
        writes: AtomicU64::new(0),
        bytes_written: AtomicU64::new(0),
        gen: Mutex::new(gens),
        link_error: Mutex::new(None),
        verify_mismatches: Mutex::new(Vec::new()),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    // The bitmap writer stops last: its final lazy flush clears the bits the
    // mirror acknowledged at the end of the session.
    let (writer_stop_tx, writer_stop_rx) = watch::channel(false);
    let writer = tokio::spawn(bitmap_writer(
        sh.clone(),
        st,
        bitmap_file,
        bitmap_path,
        opts.lazy_interval,
        writer_stop_rx,
    ));
    let mut link = tokio::spawn(link_loop(
        sh.clone(),
        opts.identity,
        LinkParams {
            to: to.clone(),
            peer,
            volume: volume.clone(),
            volume_bytes,
            chunk_bytes,
            source_id,
            replica_id: rec.replica_id.clone(),
            sync_mode: opts.mode == Mode::Sync,
            linger: opts.linger,
            tuning,
        },
        stop_rx.clone(),
    ));
    let mut resync = tokio::spawn(resync_task(sh.clone(), compress, stop_rx.clone()));
    let info = StatusInfo {
        volume: volume.clone(),
        mirror: to.clone(),
        nbd: opts.nbd.to_string(),
        on_disconnect: format!("{:?}", opts.on_disconnect).to_lowercase(),
    };
    let status_path = state_dir.join(&volume).join("status.json");
    let status_sh = sh.clone();
    let status_path2 = status_path.clone();
    let mut status_stop = stop_rx.clone();
    let (verify_req, verify_res) = verify_paths(&state_dir, &volume);
    let verify_stop = stop_rx.clone();
    let status_task = tokio::spawn(async move {
        let mut verifying: Option<tokio::task::JoinHandle<()>> = None;
        loop {
            let s = status_of(&status_sh, &info, false);
            let _ = super::status::write(&status_path2, &s);
            if verifying.as_ref().is_none_or(|t| t.is_finished()) && verify_req.exists() {
                let req: Option<VerifyRequest> = read_toml(&verify_req).ok().flatten();
                let _ = std::fs::remove_file(&verify_req);
                if let Some(req) = req {
                    let (sh2, vol, res, st) = (
                        status_sh.clone(),
                        info.volume.clone(),
                        verify_res.clone(),
                        verify_stop.clone(),
                    );
                    verifying = Some(tokio::spawn(async move {
                        let report = verify_job(sh2, vol, req, st).await;
                        let _ = crate::track::files::write_toml(&res, &report);
                    }));
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = status_stop.changed() => return info,
            }
        }
    });
    // 4. The export.
    let poll = (!opts.busy_poll.is_zero()).then(|| BusyPoll::new(opts.busy_poll));
    let poller = poll.as_ref().map(BusyPoll::spawn);
    let backend = ReplBackend {
        sh: sh.clone(),
        size: volume_bytes,
        mode: opts.mode,
        poll,
    };
    let server = NbdServer::bind(&opts.nbd, &opts.export, Arc::new(backend))
        .map_err(|e| Error::io(format!("listening for NBD on {}", opts.nbd), e))?;
    if opts.announce {
        println!("nbd {}", server.local_addr());
    }
    tracing::info!(nbd = %opts.nbd, mode = ?opts.mode, "serving");
    let (srv_stop_tx, srv_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut server_task = tokio::spawn(server.run(async move {
        let _ = srv_stop_rx.await;
    }));
    tokio::pin!(shutdown);
    let mut fatal: Option<Error> = None;
    tokio::select! {
        _ = &mut shutdown => {}
        r = &mut link => {
            fatal = Some(match r {
                Ok(Err(e)) => e,
                Ok(Ok(())) => Error::Other("mirror link ended".into()),
                Err(e) => Error::Other(format!("link task failed: {e}")),
            });
        }
        r = &mut server_task => {
            fatal = Some(match r {
                Ok(Err(e)) => Error::io("NBD server", e),
                _ => Error::Other("NBD server stopped".into()),
            });
        }
    }
    // 5. Stop: no new requests, local data durable, the mirror told, the
    // state written.
    let mut force = Force {
        signal: Box::pin(force),
        fired: false,
    };
    let _ = srv_stop_tx.send(());
    if !server_task.is_finished() {
        let waited = force
            .within(Duration::from_secs(30), &mut server_task)
            .await;
        if let Waited::Forced = waited {
            // Drops every connection with what it had in flight, unanswered.
            server_task.abort();
        }
    }
    let local_flush = sh.io.flush().await;
    let _ = stop_tx.send(true);
    let link_result = if link.is_finished() {
        Ok(())
    } else {
        match force.within(Duration::from_secs(15), &mut link).await {
            Waited::Done(Ok(r)) => r,
            Waited::Done(Err(e)) => Err(Error::Other(format!("link task failed: {e}"))),
            Waited::TimedOut => Err(Error::ConnectionLost(
                "the mirror did not confirm the end of the session".into(),
            )),
            Waited::Forced => {
                link.abort();
                Ok(())
            }
        }
    };
    match force.within(Duration::from_secs(30), &mut resync).await {
        Waited::Done(_) => {}
        Waited::TimedOut => {
            tracing::warn!("the resync did not end within 30 s of the stop; abandoning it");
            resync.abort();
        }
        Waited::Forced => resync.abort(),
    }
    let _ = writer_stop_tx.send(true);
    let st = writer
        .await
        .map_err(|e| Error::Other(format!("bitmap writer failed: {e}")))?;
    let info = status_task
        .await
        .map_err(|e| Error::Other(format!("status task failed: {e}")))?;
    let _ = super::status::write(&status_path, &status_of(&sh, &info, true));
    drop(st);
    if let Some(driver) = io_driver {
        // Every request was answered (the final flush came last); the
        // driver ends once the queue is closed.
        let _ = sh.io.clone().shutdown();
        match tokio::time::timeout(Duration::from_secs(30), driver).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!("local I/O driver ended with an error: {e}"),
            Ok(Err(e)) => tracing::warn!("local I/O driver task failed: {e}"),
            Err(_) => tracing::warn!("local I/O driver did not end within 30 s"),
        }
    }
    drop(poller);
    let quiet = sh.core().quiet();
    if let Some(b) = sh.broken() {
        return Err(Error::Other(b));
    }
    if let Some(e) = fatal {
        if matches!(e, Error::Refused(_)) {
            // The mirror's replica is not ours: the next start must catch up.
            clear_tracked(&state_dir, &volume, &fp);
        }
        return Err(e);
    }
    local_flush.map_err(|e| Error::Other(format!("final flush of the source: {e}")))?;
    if force.fired {
        let dirty = sh.core().dirty_count();
        return Err(Error::Other(format!(
            "stopped at a second signal without waiting for NBD clients and the mirror: \
             requests in flight were not answered, and {dirty} chunk(s) the mirror has not \
             acknowledged stay marked for a resync at the next start"
        )));
    }
    link_result?;
    tracing::info!(volume = %volume, in_sync = quiet, "replicate stopped");
    Ok(())
}

fn clear_tracked(state_dir: &std::path::Path, volume: &str, fp: &str) {
    let path = state_dir.join(volume).join("volume.toml");
    if let Ok(Some(mut v)) =
        crate::track::files::read_valid_toml::<crate::primary::state::VolumeState>(&path)
    {
        for p in &mut v.peers {
            if p.fingerprint == fp {
                p.tracked = false;
            }
        }
        let _ = crate::track::files::write_toml(&path, &v);
    }
}

struct SyncOptionsParts {
    sync_opts: SyncOptions,
    source: PathBuf,
    state_dir: PathBuf,
    volume: String,
    to: String,
    peer: Fingerprint,
    tuning: Tuning,
    engine: EnginePreference,
    queue_depth: u32,
    compress: bool,
    resize: bool,
    split_brain: crate::protocol::genid::SplitBrainPolicy,
}

fn split(mut s: SyncOptions) -> SyncOptionsParts {
    s.full = false;
    s.checksum = false;
    SyncOptionsParts {
        source: s.source.clone(),
        state_dir: s.state_dir.clone(),
        volume: s.volume.clone(),
        to: s.to.clone(),
        peer: s.peer,
        tuning: s.tuning.clone(),
        engine: s.engine,
        queue_depth: s.limits.queue_depth,
        compress: s.compress,
        resize: s.resize,
        split_brain: s.split_brain,
        sync_opts: s,
    }
}
