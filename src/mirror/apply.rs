//! The mirror's apply loop: one thread per session that owns the replica and
//! its io_uring engine, checks every chunk (geometry, decompression, digest)
//! before writing it, and makes writes durable at barriers. In a synchronous
//! live session the task reading the data stream may borrow the applier to
//! apply a small write itself (see [`Shared::inline`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::block::{BufId, Engine, EngineConfig, EnginePreference};
use crate::config;
use crate::protocol::{
    self, ChunkFrame, Encoding, Frame, ProtocolError, ReplicaState, DIGESTS_PER_BATCH,
};
use crate::track::files::id_hex;

use super::direct::DirectWriter;
use super::store::{Replica, Role};
use crate::recovery::points::{PointKind, Points};

/// Work for the apply thread, in stream order.
pub enum Cmd {
    Chunk(ChunkFrame),
    ZeroRun {
        first: u64,
        count: u64,
    },
    Barrier(u64),
    Digests {
        first: u64,
        count: u64,
    },
    Done {
        chunks: u64,
        root: u128,
        generation: u64,
    },
    /// A frame of a live replication session, in sequence order.
    Live(Frame),
    /// The source won a split brain against this (promoted) replica.
    Takeover,
    /// Look for operator requests (sent a few times a second).
    Tick,
}

pub struct ApplyConfig {
    pub queue_depth: u32,
    pub engine: EnginePreference,
    pub source_id: u128,
    pub peer: String,
    /// Live session: `Some(sync_mode)`.
    pub live: Option<bool>,
    /// Chunks this node changed itself relative to the source (kept as a
    /// recovery point before a resync overwrites them).
    pub target_changed: u64,
    /// Take an automatic recovery point after each completed sync.
    pub points_after_sync: bool,
    /// Retention of automatic points (last, hourly, daily), applied after each.
    pub keep: (u32, u32, u32),
    /// Where to publish the live status (`STORE/NAME.status.json`).
    pub status_path: Option<std::path::PathBuf>,
    /// Runtime of the session, for timed waits in the apply thread.
    pub handle: Option<tokio::runtime::Handle>,
    /// Replies sent to the session's channel and not yet on the wire (the
    /// session decrements it once a reply is sent): a data task sends its
    /// own replies directly only while this is zero, keeping their order.
    pub relaying: Arc<AtomicUsize>,
    /// Asynchronous mode: the longest time between two commits while
    /// writes arrive (`serve --async-commit-ms`).
    pub async_commit: std::time::Duration,
}

struct Applier {
    r: Replica,
    engine: Engine,
    cfg: ApplyConfig,
    /// Writes in flight: chunk index -> buffer.
    inflight: HashMap<u64, BufId>,
    writing: bool,
    /// Bytes written since writeback was last started.
    unflushed_bytes: u64,
    /// Frames for the primary (taken when the session ends).
    reply: Option<mpsc::Sender<Frame>>,
    /// Set while a data task applies a frame: replies collect here.
    outbox: Option<Vec<Frame>>,
    /// The thread has finished: nothing more may be applied.
    closed: bool,
    live: LiveApply,
    points: Points,
    /// Chunk writes waiting for their undo records to be made durable
    /// (buffer, offset, length, chunk): issued together after one fsync.
    deferred: Vec<(BufId, u64, usize, u64)>,
    /// Live frames waiting for the undo records of the chunks they change
    /// to be made durable, in arrival order, and their bytes: applied
    /// together after one fsync of the undo log (see [`Held`]).
    live_held: Vec<Held>,
    live_held_bytes: usize,
    /// The source took this promoted replica over (split brain).
    takeover: bool,
    last_control: std::time::Instant,
    /// The replica opened `O_DIRECT | O_DSYNC`, for lone small writes (see
    /// [`Applier::write_durable`]); opened on first use.
    durable: DurableFile,
    /// Aligned staging for those writes (`INLINE_WRITE_MAX` + alignment).
    durable_buf: Vec<u8>,
    /// Large live writes with `O_DIRECT` (see [`Applier::write_direct`]);
    /// opened on first use.
    direct: DirectState,
}

enum DirectState {
    Untried,
    Open(Box<DirectWriter>),
    /// No `O_DIRECT` here (tmpfs) or the device refused it.
    Unavailable,
}

/// The replica's `O_DIRECT | O_DSYNC` descriptor.
enum DurableFile {
    Untried,
    Open(crate::block::Device),
    /// The filesystem refuses `O_DIRECT` (tmpfs): buffered write + fdatasync.
    Unavailable,
}

/// Chunk writes held for one fsync of their undo records at most.
const DEFERRED_WRITES_MAX: usize = 24;

/// A live frame held until the old contents of the chunks it changes are
/// durable in the undo log: during a resync, resync chunks and the small
/// writes and zero ranges that arrive among them, so that many share one
/// fsync of the log instead of one each.
#[derive(Debug)]
enum Held {
    /// A whole resync chunk (`None`: all zeros).
    Chunk(u64, Option<Vec<u8>>),
    /// A write's plaintext at an offset.
    Write(u64, bytes::Bytes),
    /// Zeros: offset, length.
    Zero(u64, u64),
}

/// Bytes of live resync chunks held for one fsync of their undo records at
/// most (besides `DEFERRED_WRITES_MAX` chunks).
const LIVE_HELD_BYTES_MAX: usize = 8 << 20;

/// How often a session looks for a fence or a point request.
pub const CONTROL_POLL: std::time::Duration = std::time::Duration::from_millis(200);

/// Progress of a live session on the mirror.
#[derive(Default)]
struct LiveApply {
    /// Last sequence number applied, and the last one acknowledged durable.
    applied: u64,
    acked: u64,
    /// Frames and bytes applied since the last commit.
    batch_frames: u64,
    batch_bytes: u64,
    written: bool,
    ended: bool,
    frames: u64,
    /// Frames applied by a data task (see `Shared::inline`).
    inline_frames: u64,
    /// Live writes and zero ranges held with the resync chunks for their
    /// undo records (see [`Held`]).
    held_writes: u64,
    /// Of those, writes written with `O_DIRECT | O_DSYNC`.
    direct_sync_writes: u64,
    /// Large writes written with `O_DIRECT`.
    direct_writes: u64,
    /// Frames in the last committed group: 1 when writes arrive one at a
    /// time (queue depth 1 at the primary).
    last_batch_frames: u64,
    /// The frame being applied is to be committed on its own (nothing else
    /// is waiting): a small write may then be written durable at once.
    lone: bool,
    last_status: Option<std::time::Instant>,
    /// The applied sequence the status file last showed.
    status_seq: u64,
    /// The last lazy write of the digest map (at a commit).
    last_map_flush: Option<std::time::Instant>,
    last_commit: Option<std::time::Instant>,
    /// Asynchronous mode: the last `Applied` sent (sequence, when), and
    /// the bytes applied since.
    reported: u64,
    last_report: Option<std::time::Instant>,
    unreported_bytes: u64,
}

/// Asynchronous mode: commit (fsync + `Ack`) at most every
/// [`ApplyConfig::async_commit`] (`serve --async-commit-ms`) unless a frame
/// asks for durability (flush, FUA, resync boundaries), or after this many
/// bytes or frames. Each commit flushes the device cache, which on a disk
/// shared with the primary stalls its writes (README, "Asynchronous mode:
/// applied, then durable" and "The commit interval").
const ASYNC_COMMIT_BYTES: u64 = 4 << 30;
pub const ASYNC_COMMIT_FRAMES: u64 = (crate::replication::primary::SENT_ENTRIES_MAX / 4) as u64;

/// The live status file (`status --store`) is refreshed at most this often.
const STATUS_INTERVAL: std::time::Duration = std::time::Duration::from_millis(500);

/// Asynchronous mode: report progress (`Applied`, which frees the
/// primary's queue) at most this often, or after this many bytes.
const ASYNC_APPLIED_INTERVAL: std::time::Duration = std::time::Duration::from_millis(20);
const ASYNC_APPLIED_BYTES: u64 = 2 << 20;

/// Commit (fsync + ack) at least every so many live frames or bytes.
const LIVE_BATCH_FRAMES: u64 = 1024;
const LIVE_BATCH_BYTES: u64 = 64 << 20;

/// Start writeback after this many bytes, so the fsync at a barrier or an
/// asynchronous commit does not find hundreds of MiB dirty (at most about
/// this much of a session's writes waits in the page cache before its
/// writeback starts).
const WRITEBACK_BYTES: u64 = 32 << 20;

/// One session's applier, shared by its apply thread and, in a synchronous
/// live session, by the task that reads the data stream: that task applies
/// small writes itself when the thread holds nothing it queued (see
/// [`Shared::inline`]), which saves the two thread hand-offs per write
/// (to the apply thread and back) that dominate a write's round trip at
/// queue depth 1 (README, "Synchronous mode: writes applied on arrival").
pub struct Shared {
    applier: std::sync::Mutex<Applier>,
    /// Live frames the data task queued to the thread, and how many of them
    /// the thread has applied (counted under the lock).
    queued: AtomicU64,
    done: AtomicU64,
}

/// Largest write a data task applies itself; larger ones go to the thread,
/// which keeps receiving and writing in parallel.
pub const INLINE_WRITE_MAX: u32 = 128 << 10;

impl Shared {
    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Applier>, String> {
        self.applier
            .lock()
            .map_err(|_| "mirror apply state lost to a panic".to_string())
    }

    /// Count a live frame the data task hands to the thread.
    pub fn queued(&self) {
        self.queued.fetch_add(1, Ordering::AcqRel);
    }

    /// The applier for applying `f` on the caller's task, if that keeps
    /// the stream's order and `f` is small: a synchronous live session, the
    /// thread has applied everything queued to it, and is not using the
    /// applier right now. `None`: queue `f` to the thread.
    pub fn inline(&self, f: &Frame) -> Option<Inline<'_>> {
        let small = match f {
            Frame::Write(w) => w.raw_len <= INLINE_WRITE_MAX,
            Frame::ZeroRange { .. } | Frame::Flush { .. } => true,
            _ => false,
        };
        if !small {
            return None;
        }
        let mut a = self.applier.try_lock().ok()?;
        let idle = a.cfg.live == Some(true)
            && !a.closed
            && !a.live.ended
            && a.inflight.is_empty()
            && a.deferred.is_empty()
            && !matches!(&a.direct, DirectState::Open(w) if w.in_flight() > 0)
            && self.done.load(Ordering::Acquire) == self.queued.load(Ordering::Acquire);
        if !idle {
            return None;
        }
        a.outbox = Some(Vec::new());
        Some(Inline(a))
    }
}

/// The applier, borrowed by a data task for a live frame (see
/// [`Shared::inline`]). Frames for the primary are collected, to be sent
/// once the lock is released.
pub struct Inline<'a>(std::sync::MutexGuard<'a, Applier>);

impl Inline<'_> {
    /// Apply one live frame, as the thread would; `lone`: it will be
    /// committed on its own (no other frame is waiting).
    pub fn apply(&mut self, f: Frame, lone: bool) -> Result<(), String> {
        self.0.maybe_poll_control()?;
        self.0.live.lone = lone;
        let r = self.0.live_frame(f);
        self.0.live.lone = false;
        r?;
        self.0.live.inline_frames += 1;
        Ok(())
    }

    /// Whether writes arrive one at a time: the last commit covered a
    /// single frame. Then a frame is worth applying as a lone write when
    /// nothing follows it; otherwise the caller applies it (buffered) first
    /// and looks for more afterwards, which groups more frames per commit.
    pub fn one_at_a_time(&self) -> bool {
        self.0.live.last_batch_frames == 1
    }

    /// Commit (fsync, acknowledge) unless `more` frames are already waiting
    /// and the group is not yet full.
    pub fn commit_unless(&mut self, more: bool) -> Result<(), String> {
        let a = &mut self.0;
        if !more
            || a.live.batch_frames >= LIVE_BATCH_FRAMES
            || a.live.batch_bytes >= LIVE_BATCH_BYTES
        {
            a.live_commit()?;
        }
        Ok(())
    }

    /// Release the applier: the frames to send to the primary (in order,
    /// before anything later is queued to the thread), the channel to the
    /// session, and its count of replies not yet sent.
    pub fn finish(mut self) -> (Vec<Frame>, Option<mpsc::Sender<Frame>>, Arc<AtomicUsize>) {
        let out = self.0.outbox.take().unwrap_or_default();
        (out, self.0.reply.clone(), self.0.cfg.relaying.clone())
    }
}

impl Drop for Inline<'_> {
    fn drop(&mut self) {
        // On an error path the collected frames are dropped: the session ends.
        self.0.outbox = None;
    }
}

/// Run the apply loop until the command channel closes or an error occurs.
/// Errors are returned as the message to send to the primary. `ready`
/// receives the shared applier once it is open (the I/O engine is created
/// here: its ring belongs to this thread).
pub fn run(
    replica: Replica,
    cfg: ApplyConfig,
    cmds: mpsc::Receiver<Cmd>,
    reply: mpsc::Sender<Frame>,
    ready: Option<tokio::sync::oneshot::Sender<Arc<Shared>>>,
) -> Result<(), String> {
    let a = Applier::open(replica, cfg, reply)?;
    let shared = Arc::new(Shared {
        applier: std::sync::Mutex::new(a),
        queued: AtomicU64::new(0),
        done: AtomicU64::new(0),
    });
    if let Some(tx) = ready {
        let _ = tx.send(shared.clone());
    }
    let result = shared.serve(cmds);
    let mut a = shared.lock()?;
    let r = a.finish(result);
    // Close the reply channel (the session ends with it), even while a data
    // task still holds the shared applier; it applies nothing more.
    a.closed = true;
    a.reply = None;
    r
}

impl Shared {
    fn serve(&self, mut cmds: mpsc::Receiver<Cmd>) -> Result<(), String> {
        loop {
            // Live frames are committed (fsync, ack) in groups: whenever no
            // further frame is waiting, or the group is large.
            let pending = {
                let a = self.lock()?;
                a.live.applied > a.live.acked
            };
            let cmd = if pending {
                match cmds.try_recv() {
                    Ok(c) => c,
                    Err(mpsc::error::TryRecvError::Empty) => {
                        let (wait, handle) = {
                            let mut a = self.lock()?;
                            // Nothing waiting: apply the resync chunks held
                            // for their undo records.
                            a.flush_live_held()?;
                            let wait = a.commit_wait();
                            if !wait.is_zero() {
                                a.report_applied(false)?;
                            }
                            let wait = wait.min(a.report_wait()).min(a.status_wait());
                            (wait, a.cfg.handle.clone())
                        };
                        let Some(h) = handle.filter(|_| !wait.is_zero()) else {
                            let mut a = self.lock()?;
                            if a.commit_wait().is_zero() {
                                a.live_commit()?;
                            } else {
                                a.report_applied(true)?;
                            }
                            continue;
                        };
                        // Asynchronous mode: gather more frames until the
                        // commit is due. No writeback is started while
                        // waiting: the page cache keeps what was applied
                        // until `WRITEBACK_BYTES` are dirty or the commit is
                        // due, and writes it back in larger, sorted runs
                        // (README, "Asynchronous mode: writeback in 32 MiB
                        // steps").
                        match h.block_on(async { tokio::time::timeout(wait, cmds.recv()).await }) {
                            Ok(Some(c)) => c,
                            Ok(None) => break,
                            Err(_) => {
                                let mut a = self.lock()?;
                                if a.commit_wait().is_zero() {
                                    a.live_commit()?;
                                } else {
                                    a.report_applied(true)?;
                                }
                                continue;
                            }
                        }
                    }
                    Err(mpsc::error::TryRecvError::Disconnected) => break,
                }
            } else {
                match cmds.try_recv() {
                    Ok(c) => c,
                    Err(mpsc::error::TryRecvError::Disconnected) => break,
                    Err(mpsc::error::TryRecvError::Empty) => {
                        // Nothing waiting: issue the writes held for their
                        // undo records (one fsync for all of them).
                        {
                            let mut a = self.lock()?;
                            a.flush_deferred()?;
                            a.flush_live_held()?;
                        }
                        match cmds.blocking_recv() {
                            Some(c) => c,
                            None => break,
                        }
                    }
                }
            };
            let mut a = self.lock()?;
            let live = matches!(cmd, Cmd::Live(_));
            let ended = a.handle(cmd);
            if live {
                self.done.fetch_add(1, Ordering::AcqRel);
            }
            if ended? {
                break;
            }
        }
        Ok(())
    }
}

impl Applier {
    fn open(
        replica: Replica,
        cfg: ApplyConfig,
        reply: mpsc::Sender<Frame>,
    ) -> Result<Self, String> {
        let name = replica.name.clone();
        let buffer_bytes = (replica.meta.chunk_bytes as usize).max(4096);
        let engine = Engine::new(
            &replica.device,
            &EngineConfig {
                queue_depth: cfg.queue_depth,
                buffer_bytes,
                buffer_count: cfg.queue_depth as usize,
            },
            cfg.engine,
        )
        .map_err(|e| format!("mirror cannot start the I/O engine for volume '{name}': {e}"))?;
        let store_dir = replica
            .meta_path
            .parent()
            .map(|p| p.to_path_buf())
            .unwrap_or_default();
        let points = Points::open(
            &store_dir,
            &name,
            replica.meta.volume_bytes,
            replica.meta.chunk_bytes,
        )
        .map_err(|e| format!("mirror volume '{name}': recovery points: {e}"))?;
        Ok(Applier {
            points,
            deferred: Vec::new(),
            live_held: Vec::new(),
            live_held_bytes: 0,
            takeover: false,
            last_control: std::time::Instant::now(),
            r: replica,
            engine,
            cfg,
            inflight: HashMap::new(),
            writing: false,
            unflushed_bytes: 0,
            reply: Some(reply),
            outbox: None,
            closed: false,
            live: LiveApply::default(),
            durable: DurableFile::Untried,
            durable_buf: Vec::new(),
            direct: DirectState::Untried,
        })
    }

    /// Apply one command; `true` when the live session has ended.
    fn handle(&mut self, cmd: Cmd) -> Result<bool, String> {
        self.maybe_poll_control()?;
        if !matches!(cmd, Cmd::Live(_)) {
            self.flush_live_held()?;
            self.direct_drain()?;
        }
        match cmd {
            Cmd::Live(f) => {
                self.live_frame(f)?;
                if self.live.ended {
                    return Ok(true);
                }
                if self.cfg.live == Some(false) {
                    // Asynchronous: durable now and then, progress often.
                    if self.live.batch_frames >= ASYNC_COMMIT_FRAMES {
                        self.live_commit()?;
                    } else {
                        self.report_applied(false)?;
                    }
                } else if self.live.batch_frames >= LIVE_BATCH_FRAMES
                    || self.live.batch_bytes >= LIVE_BATCH_BYTES
                {
                    self.live_commit()?;
                }
            }
            Cmd::Chunk(c) => self.chunk(c)?,
            Cmd::ZeroRun { first, count } => self.zero_run(first, count)?,
            Cmd::Barrier(seq) => {
                self.durable()?;
                self.send(Frame::BarrierAck { seq })?;
            }
            Cmd::Digests { first, count } => self.digests(first, count)?,
            Cmd::Takeover => self.take_over()?,
            Cmd::Tick => self.poll_control()?,
            Cmd::Done {
                chunks,
                root,
                generation,
            } => self.done(chunks, root, generation)?,
        }
        Ok(false)
    }

    /// End of the session: nothing left in flight, whatever was applied
    /// durable, the status written.
    fn finish(&mut self, result: Result<(), String>) -> Result<(), String> {
        // Never leave writes in flight behind us.
        let mut drained = self.drain();
        if self.cfg.live.is_some() {
            // Whatever was applied becomes durable; the status says the primary is gone.
            if drained.is_ok() && !self.live.ended {
                drained = self.live_sync();
            }
            if drained.is_ok() {
                drained = self
                    .r
                    .map
                    .flush()
                    .map_err(|e| self.io_err("writing the digest map", e));
            }
            // A session that ends without an error (the mirror shutting
            // down) acknowledges what it just made durable, so that the
            // primary need not send it again. Not after an error: a failed
            // fsync may have lost pages that a later one does not report.
            if result.is_ok() && drained.is_ok() {
                // The session relays it before its reply channel closes;
                // if the connection is gone, nobody needs it.
                let _ = self.ack_applied();
            }
            self.write_status(false);
        }
        match (result, drained) {
            (Err(e), _) | (Ok(()), Err(e)) => Err(e),
            _ => Ok(()),
        }
    }
}

impl Applier {
    fn name(&self) -> &str {
        &self.r.name
    }

    fn send(&mut self, f: Frame) -> Result<(), String> {
        if let Some(out) = &mut self.outbox {
            out.push(f);
            return Ok(());
        }
        self.cfg.relaying.fetch_add(1, Ordering::AcqRel);
        match &self.reply {
            Some(r) => r
                .blocking_send(f)
                .map_err(|_| "connection closed".to_string()),
            None => Err("connection closed".to_string()),
        }
    }

    fn io_err(&self, what: &str, e: impl std::fmt::Display) -> String {
        format!("mirror volume '{}': {what}: {e}", self.name())
    }

    /// Mark the replica Inconsistent (durably) before its first write.
    fn begin_writing(&mut self) -> Result<(), String> {
        if self.writing {
            return Ok(());
        }
        self.check_role()?;
        self.protect_consistent_state()?;
        self.r.meta.state = ReplicaState::Inconsistent;
        self.r.meta.source_id = id_hex(self.cfg.source_id);
        self.r.meta.last_primary = self.cfg.peer.clone();
        self.r
            .save_meta()
            .map_err(|e| self.io_err("cannot record state Inconsistent", e))?;
        metrics::gauge!("blkmirror_replica_state", "volume" => self.r.name.clone()).set(2.0);
        self.writing = true;
        Ok(())
    }

    fn complete(&mut self, c: crate::block::Completion) -> Result<(), String> {
        let index = c.user_data;
        if let Some(b) = c.buf {
            self.engine.release(b);
        }
        self.inflight.remove(&index);
        match c.result {
            Ok(_) => Ok(()),
            Err(e) => Err(self.io_err(
                &format!(
                    "writing chunk {index} at offset {}",
                    index * self.r.meta.chunk_bytes as u64
                ),
                e,
            )),
        }
    }

    fn reap(&mut self, min: usize) -> Result<(), String> {
        let done = self
            .engine
            .wait(min)
            .map_err(|e| self.io_err("waiting for writes", e))?;
        for c in done {
            self.complete(c)?;
        }
        Ok(())
    }

    fn drain(&mut self) -> Result<(), String> {
        self.direct_drain()?;
        self.flush_deferred()?;
        while self.engine.in_flight() > 0 {
            self.reap(1)?;
        }
        Ok(())
    }

    fn chunk(&mut self, c: ChunkFrame) -> Result<(), String> {
        let vb = self.r.meta.volume_bytes;
        let cb = self.r.meta.chunk_bytes;
        let chunks = config::chunk_count(vb, cb);
        if c.index >= chunks {
            return Err(ProtocolError::ChunkOutOfRange {
                index: c.index,
                chunks,
            }
            .to_string());
        }
        if self.deferred.iter().any(|d| d.3 == c.index) {
            self.flush_deferred()?;
        }
        while self.inflight.contains_key(&c.index) {
            self.reap(1)?;
        }
        if c.encoding == Encoding::Zero {
            let expected = config::chunk_len(vb, cb, c.index);
            if c.raw_len != expected {
                return Err(ProtocolError::ChunkLength {
                    index: c.index,
                    len: c.raw_len,
                    expected,
                }
                .to_string());
            }
            let zd = self.r.zeros.of(c.index);
            if c.digest != zd {
                return Err(ProtocolError::DigestMismatch {
                    index: c.index,
                    expected: c.digest,
                    actual: zd,
                }
                .to_string());
            }
            return self.zero_run(c.index, 1);
        }
        let offset = c.index * cb as u64;
        let buf = loop {
            if let Some(b) = self.engine.acquire() {
                break b;
            }
            self.flush_deferred()?;
            if self.engine.in_flight() > 0 {
                self.reap(1)?;
            }
        };
        let n = match protocol::open_chunk(&c, vb, cb, self.engine.buf_mut(buf)) {
            Ok(n) => n,
            Err(e) => {
                self.engine.release(buf);
                return Err(e.to_string());
            }
        };
        if let Err(e) = self.begin_writing() {
            self.engine.release(buf);
            return Err(e);
        }
        if self.points.needs_save(c.index) {
            // Its old contents go to the undo log first: hold the write,
            // start reading the old contents into the page cache, and
            // issue the write with others after their undo records
            // are written and made durable by one fsync.
            self.r.device.prefetch(offset, n as u64);
            self.deferred.push((buf, offset, n, c.index));
            self.r.map.set(c.index, c.digest);
            metrics::counter!("blkmirror_mirror_chunks_written_total").increment(1);
            metrics::counter!("blkmirror_mirror_bytes_written_total").increment(n as u64);
            if self.deferred.len() >= DEFERRED_WRITES_MAX {
                self.flush_deferred()?;
            }
            return Ok(());
        }
        if self.engine.in_flight() >= self.engine.queue_depth() as usize {
            self.reap(1)?;
        }
        if let Err(e) = self.engine.submit_write(buf, offset, n, c.index) {
            self.engine.release(buf);
            return Err(self.io_err(&format!("writing chunk {}", c.index), e));
        }
        self.inflight.insert(c.index, buf);
        self.r.map.set(c.index, c.digest);
        self.unflushed_bytes += n as u64;
        if self.unflushed_bytes >= WRITEBACK_BYTES {
            self.r.device.start_writeback();
            self.unflushed_bytes = 0;
        }
        metrics::counter!("blkmirror_mirror_chunks_written_total").increment(1);
        metrics::counter!("blkmirror_mirror_bytes_written_total").increment(n as u64);
        Ok(())
    }

    /// A run of all-zero chunks: chunks already known to be zero are skipped,
    /// the others are zeroed (holes punched in a file).
    fn zero_run(&mut self, first: u64, count: u64) -> Result<(), String> {
        let vb = self.r.meta.volume_bytes;
        let cb = self.r.meta.chunk_bytes;
        let chunks = config::chunk_count(vb, cb);
        let end = first
            .checked_add(count)
            .filter(|&e| e <= chunks)
            .ok_or_else(|| {
                ProtocolError::ChunkOutOfRange {
                    index: first.saturating_add(count).saturating_sub(1),
                    chunks,
                }
                .to_string()
            })?;
        metrics::counter!("blkmirror_mirror_chunks_zero_total").increment(count);
        let mut i = first;
        while i < end {
            if self.r.map.get(i) == self.r.zeros.of(i) {
                i += 1;
                continue;
            }
            // Zero the longest stretch of chunks not yet known to be zero.
            let mut j = i;
            while j < end && self.r.map.get(j) != self.r.zeros.of(j) {
                j += 1;
            }
            while (i..j).any(|k| self.inflight.contains_key(&k)) {
                self.reap(1)?;
            }
            self.begin_writing()?;
            self.flush_deferred()?;
            self.protect(i, j - 1)?;
            let offset = i * cb as u64;
            let len = (j * cb as u64).min(vb) - offset;
            self.r
                .device
                .zero_range(offset, len)
                .map_err(|e| self.io_err(&format!("zeroing chunks {i}..{j}"), e))?;
            for k in i..j {
                let z = self.r.zeros.of(k);
                self.r.map.set(k, z);
            }
            i = j;
        }
        Ok(())
    }

    /// Everything applied so far becomes durable: writes complete, replica
    /// fsynced, then the digest map written and fsynced.
    fn durable(&mut self) -> Result<(), String> {
        self.drain()?;
        if self.writing {
            self.r
                .device
                .sync_all()
                .map_err(|e| self.io_err("fsync of the replica", e))?;
        }
        self.r
            .map
            .flush()
            .map_err(|e| self.io_err("writing the digest map", e))?;
        Ok(())
    }

    /// Compute digests of the replica for chunks [first, first+count).
    fn digests(&mut self, first: u64, count: u64) -> Result<(), String> {
        let vb = self.r.meta.volume_bytes;
        let cb = self.r.meta.chunk_bytes;
        let chunks = config::chunk_count(vb, cb);
        let end = first.checked_add(count).filter(|&e| e <= chunks).ok_or_else(|| {
            format!("digest request for chunks {first}+{count} is beyond the volume ({chunks} chunks)")
        })?;
        self.durable()?;
        let ranges = self
            .r
            .device
            .data_ranges(first * cb as u64, (end * cb as u64).min(vb))
            .map_err(|e| self.io_err("finding data ranges", e))?;
        let has_data = |i: u64| -> bool {
            let s = i * cb as u64;
            let e = (s + cb as u64).min(vb);
            // ranges are sorted; a linear scan per chunk would be quadratic, so binary search.
            let k = ranges.partition_point(|&(o, l)| o + l <= s);
            k < ranges.len() && ranges[k].0 < e
        };
        let mut batch_first = first;
        while batch_first < end {
            let batch_end = (batch_first + DIGESTS_PER_BATCH as u64).min(end);
            let mut out = vec![0u128; (batch_end - batch_first) as usize];
            let mut next = batch_first;
            let mut pending = 0usize;
            while next < batch_end || pending > 0 {
                while next < batch_end {
                    if !has_data(next) {
                        out[(next - batch_first) as usize] = self.r.zeros.of(next);
                        next += 1;
                        continue;
                    }
                    let Some(b) = self.engine.acquire() else {
                        break;
                    };
                    if self.engine.in_flight() >= self.engine.queue_depth() as usize {
                        self.engine.release(b);
                        break;
                    }
                    let len = config::chunk_len(vb, cb, next) as usize;
                    self.engine
                        .submit_read(b, next * cb as u64, len, next)
                        .map_err(|e| self.io_err(&format!("reading chunk {next}"), e))?;
                    pending += 1;
                    next += 1;
                }
                if pending == 0 {
                    continue;
                }
                let done = self
                    .engine
                    .wait(1)
                    .map_err(|e| self.io_err("reading the replica", e))?;
                for c in done {
                    pending -= 1;
                    let i = c.user_data;
                    let b = c.buf;
                    let res = c.result;
                    if let Some(b) = b {
                        let len = config::chunk_len(vb, cb, i) as usize;
                        if res.is_ok() {
                            out[(i - batch_first) as usize] =
                                protocol::digest(&self.engine.buf(b)[..len]);
                        }
                        self.engine.release(b);
                    }
                    res.map_err(|e| self.io_err(&format!("reading chunk {i}"), e))?;
                }
            }
            for (k, d) in out.iter().enumerate() {
                self.r.map.set(batch_first + k as u64, *d);
            }
            self.send(Frame::DigestBatch {
                first: batch_first,
                digests: out,
            })?;
            batch_first = batch_end;
        }
        self.r
            .map
            .flush()
            .map_err(|e| self.io_err("writing the digest map", e))?;
        Ok(())
    }

    // ---- live replication ------------------------------------------------

    fn live_frame(&mut self, f: Frame) -> Result<(), String> {
        let seq = f
            .live_seq()
            .ok_or_else(|| format!("protocol error: {} frame in a live session", f.name()))?;
        if seq <= self.live.applied {
            return Err(format!(
                "protocol error: live frame {} has sequence {seq}, not after {}",
                f.name(),
                self.live.applied
            ));
        }
        if !matches!(f, Frame::LiveEnd { .. } | Frame::Flush { .. }) {
            self.check_role()?;
        }
        let hold = self.holds(&f);
        let reorderable = match &f {
            // A resync chunk whose old contents are saved already may go
            // before the held items if it shares no chunk with them: the
            // replica is Inconsistent until `InSync` either way.
            Frame::LiveChunk { chunk, .. } => !self.overlaps_held(chunk.index..=chunk.index),
            _ => false,
        };
        if !hold && !reorderable {
            // Frames held for their undo records come first.
            self.flush_live_held()?;
        }
        if !matches!(&f, Frame::Write(w) if w.raw_len > INLINE_WRITE_MAX) {
            // Nothing may overtake a large write in flight.
            self.direct_drain()?;
        }
        let vb = self.r.meta.volume_bytes;
        let cb = self.r.meta.chunk_bytes as u64;
        match f {
            Frame::Write(w) => {
                let data = protocol::write_plaintext(&w, vb).map_err(|e| e.to_string())?;
                let n = data.len();
                if hold {
                    self.hold(Held::Write(w.offset, data))?;
                } else {
                    // Small lone writes durable in one call, large ones
                    // O_DIRECT in flight, the rest through the page cache.
                    let done = if self.live.lone && self.write_durable(w.offset, &data)? {
                        true
                    } else {
                        self.write_direct(w.offset, &data)?
                    };
                    if !done {
                        self.direct_drain()?;
                        self.write_bytes(w.offset, &data)?;
                    }
                    if w.flags & protocol::LIVE_FLAG_FUA != 0 {
                        self.live.applied = seq;
                        self.live_commit()?;
                    }
                }
                self.unknown(w.offset, n as u64);
                self.live.batch_bytes += n as u64;
                self.live.unreported_bytes += n as u64;
            }
            Frame::ZeroRange {
                offset, len, flags, ..
            } => {
                if len == 0 || offset.checked_add(len).is_none_or(|e| e > vb) {
                    return Err(format!(
                        "protocol error: zero range of {len} bytes at offset {offset} does not fit the volume ({vb} bytes)"
                    ));
                }
                if hold {
                    self.hold(Held::Zero(offset, len))?;
                } else {
                    self.zero_bytes(offset, len)?;
                    if flags & protocol::LIVE_FLAG_FUA != 0 {
                        self.live.applied = seq;
                        self.live_commit()?;
                    }
                }
                self.unknown(offset, len);
            }
            Frame::Flush { .. } => {
                // Nothing after a flush may reach the disk before what came before it.
                self.live.applied = seq;
                self.live_commit()?;
            }
            Frame::LiveChunk { chunk, .. } => {
                if self.r.meta.state == ReplicaState::UpToDate {
                    return Err(
                        "protocol error: resync chunk without StartResync on an UpToDate replica"
                            .into(),
                    );
                }
                let mut buf = vec![0u8; chunk.raw_len as usize];
                let n = protocol::open_chunk(&chunk, vb, cb as u32, &mut buf)
                    .map_err(|e| e.to_string())?;
                buf.truncate(n);
                let data = (chunk.encoding != Encoding::Zero).then_some(buf);
                if hold {
                    // Its old contents go to the undo log first (see `hold`).
                    self.hold(Held::Chunk(chunk.index, data))?;
                } else {
                    self.apply_held(Held::Chunk(chunk.index, data))?;
                }
                self.r.map.set(chunk.index, chunk.digest);
                self.live.batch_bytes += n as u64;
                self.live.unreported_bytes += n as u64;
            }
            Frame::StartResync { .. } => {
                // The undo log's reads of old contents are random from here on.
                self.r.device.advise_random();
                // Chunks now arrive out of write order: durably Inconsistent first.
                self.live_sync()?;
                self.set_state(ReplicaState::Inconsistent)?;
            }
            Frame::InSync { generation, .. } => {
                self.live_sync()?;
                self.finish_consistent(generation)?;
                tracing::info!(volume = %self.r.name, seq, "replica is in sync with the primary");
                self.live.applied = seq;
                self.live_commit()?;
            }
            Frame::VerifyChunk { index, digest, .. } => {
                use std::os::unix::fs::FileExt;
                let chunks = config::chunk_count(vb, cb as u32);
                if index >= chunks {
                    return Err(ProtocolError::ChunkOutOfRange { index, chunks }.to_string());
                }
                let len = config::chunk_len(vb, cb as u32, index) as usize;
                let mut buf = vec![0u8; len];
                self.r
                    .device
                    .file()
                    .read_exact_at(&mut buf, index * cb)
                    .map_err(|e| self.io_err(&format!("reading chunk {index} to verify it"), e))?;
                let ours = protocol::digest(&buf);
                if ours != digest {
                    tracing::warn!(volume = %self.r.name, chunk = index, "verify: the replica's chunk differs from the primary's");
                    self.send(Frame::VerifyMismatch {
                        index,
                        digest: ours,
                    })?;
                }
            }
            Frame::LiveEnd { .. } => {
                self.live.applied = seq;
                self.live_commit()?;
                self.live.ended = true;
                tracing::info!(volume = %self.r.name, seq, "live session ended by the primary");
                return Ok(());
            }
            other => {
                return Err(format!(
                    "protocol error: {} frame in a live session",
                    other.name()
                ))
            }
        }
        self.live.applied = seq;
        self.live.batch_frames += 1;
        self.live.frames += 1;
        Ok(())
    }

    fn set_state(&mut self, state: ReplicaState) -> Result<(), String> {
        if self.r.meta.state == state {
            return Ok(());
        }
        if state == ReplicaState::Inconsistent {
            self.protect_consistent_state()?;
        }
        self.r.meta.state = state;
        self.r.meta.source_id = id_hex(self.cfg.source_id);
        self.r.meta.last_primary = self.cfg.peer.clone();
        self.r
            .save_meta()
            .map_err(|e| self.io_err(&format!("cannot record state {state}"), e))?;
        let g = if state == ReplicaState::UpToDate {
            1.0
        } else {
            2.0
        };
        metrics::gauge!("blkmirror_replica_state", "volume" => self.r.name.clone()).set(g);
        Ok(())
    }

    /// Chunks overlapping `offset..offset+len` no longer match the digest map.
    /// The chunks that `len` bytes at `offset` touch (at least one).
    fn chunks_of(&self, offset: u64, len: u64) -> std::ops::RangeInclusive<u64> {
        let cb = self.r.meta.chunk_bytes as u64;
        offset / cb..=(offset + len.max(1) - 1) / cb
    }

    fn unknown(&mut self, offset: u64, len: u64) {
        let (first, last) = self.chunks_of(offset, len).into_inner();
        for c in first..=last.min(self.r.map.len().saturating_sub(1)) {
            self.r.map.set(c, crate::track::UNKNOWN_DIGEST);
        }
    }

    fn write_bytes(&mut self, offset: u64, data: &[u8]) -> Result<(), String> {
        use std::os::unix::fs::FileExt;
        self.protect_bytes(offset, data.len() as u64)?;
        self.r
            .device
            .file()
            .write_all_at(data, offset)
            .map_err(|e| {
                self.io_err(
                    &format!("writing {} bytes at offset {offset}", data.len()),
                    e,
                )
            })?;
        self.live.written = true;
        self.unflushed_bytes += data.len() as u64;
        if self.unflushed_bytes >= WRITEBACK_BYTES {
            self.r.device.start_writeback();
            self.unflushed_bytes = 0;
        }
        metrics::counter!("blkmirror_mirror_bytes_written_total").increment(data.len() as u64);
        Ok(())
    }

    /// Write `data` at `offset` durably in one system call (`O_DIRECT |
    /// O_DSYNC`: the device write, then its cache flush), if nothing else
    /// awaits an fsync and the range is aligned for `O_DIRECT`. `false`:
    /// not done, use [`Applier::write_bytes`]. For a lone write this saves
    /// the page cache's writeback path (README, "Synchronous mode: lone
    /// writes durable in one call").
    fn write_durable(&mut self, offset: u64, data: &[u8]) -> Result<bool, String> {
        if self.live.written || data.is_empty() || data.len() > INLINE_WRITE_MAX as usize {
            return Ok(false);
        }
        if matches!(self.durable, DurableFile::Untried) {
            self.durable = match crate::block::Device::open_durable_direct(self.r.device.path()) {
                Ok(d) => DurableFile::Open(d),
                Err(e) => {
                    tracing::debug!(volume = %self.r.name, "no O_DIRECT|O_DSYNC replica descriptor: {e}");
                    DurableFile::Unavailable
                }
            };
        }
        let DurableFile::Open(dev) = &self.durable else {
            return Ok(false);
        };
        let align = (dev.logical_block_bytes() as usize).max(512);
        if offset % align as u64 != 0 || data.len() % align != 0 {
            return Ok(false);
        }
        self.protect_bytes(offset, data.len() as u64)?;
        let want = INLINE_WRITE_MAX as usize + 4096;
        if self.durable_buf.len() < want {
            self.durable_buf = vec![0u8; want];
        }
        let start = self.durable_buf.as_ptr().align_offset(4096);
        let buf = &mut self.durable_buf[start..start + data.len()];
        buf.copy_from_slice(data);
        let DurableFile::Open(dev) = &self.durable else {
            return Ok(false);
        };
        if let Err(e) = std::os::unix::fs::FileExt::write_all_at(dev.file(), buf, offset) {
            if e.raw_os_error() == Some(libc::EINVAL) {
                // Stricter alignment than the filesystem reported: nothing
                // was written; the buffered path takes this and later writes.
                tracing::debug!(volume = %self.r.name, "O_DIRECT|O_DSYNC write refused: {e}");
                self.durable = DurableFile::Unavailable;
                return Ok(false);
            }
            return Err(self.io_err(
                &format!(
                    "writing {} bytes at offset {offset} (O_DIRECT|O_DSYNC)",
                    data.len()
                ),
                e,
            ));
        }
        metrics::counter!("blkmirror_mirror_bytes_written_total").increment(data.len() as u64);
        self.live.direct_sync_writes += 1;
        Ok(true)
    }

    /// Write a large live write (over `INLINE_WRITE_MAX`) with `O_DIRECT`
    /// through the [`DirectWriter`] (see `mirror::direct`). `false`: not
    /// taken (small, unaligned, or no `O_DIRECT` here): the caller drains
    /// the writer and uses `write_bytes`.
    fn write_direct(&mut self, offset: u64, data: &[u8]) -> Result<bool, String> {
        if data.len() <= INLINE_WRITE_MAX as usize {
            return Ok(false);
        }
        if matches!(self.direct, DirectState::Untried) {
            self.direct = match DirectWriter::open(self.r.device.path(), self.cfg.engine) {
                Ok(w) => DirectState::Open(Box::new(w)),
                Err(e) => {
                    tracing::debug!(volume = %self.r.name, "large writes go through the page cache: {e}");
                    DirectState::Unavailable
                }
            };
        }
        let DirectState::Open(w) = &self.direct else {
            return Ok(false);
        };
        if !w.takes(offset, data.len()) {
            return Ok(false);
        }
        self.protect_bytes(offset, data.len() as u64)?;
        let DirectState::Open(w) = &mut self.direct else {
            return Ok(false);
        };
        let refused = w.write(offset, data).map_err(|e| {
            format!(
                "mirror volume '{}': writing {} bytes at offset {offset} (O_DIRECT): {e}",
                self.r.name,
                data.len()
            )
        })?;
        self.rewrite_refused(refused)?;
        // Durable at the next commit: drained, then the fdatasync's flush.
        self.live.written = true;
        metrics::counter!("blkmirror_mirror_bytes_written_total").increment(data.len() as u64);
        self.live.direct_writes += 1;
        Ok(true)
    }

    /// Wait for the large writes in flight (before anything that must come
    /// after them: another frame, a commit, a read of the replica).
    fn direct_drain(&mut self) -> Result<(), String> {
        let DirectState::Open(w) = &mut self.direct else {
            return Ok(());
        };
        if w.in_flight() == 0 {
            return Ok(());
        }
        let refused = w.drain().map_err(|e| {
            format!(
                "mirror volume '{}': large writes (O_DIRECT): {e}",
                self.r.name
            )
        })?;
        self.rewrite_refused(refused)
    }

    /// The device refused `O_DIRECT` for these (stricter alignment than
    /// reported): write them through the page cache, and all later ones too.
    fn rewrite_refused(
        &mut self,
        refused: Vec<crate::mirror::direct::Refused>,
    ) -> Result<(), String> {
        if refused.is_empty() {
            return Ok(());
        }
        tracing::debug!(volume = %self.r.name, "O_DIRECT writes refused; using the page cache");
        self.direct_drain_unchecked()?;
        for r in refused {
            self.write_bytes(r.offset, &r.data)?;
        }
        Ok(())
    }

    /// Drain and drop the writer after a refusal (its later completions are
    /// rewritten too).
    fn direct_drain_unchecked(&mut self) -> Result<(), String> {
        let state = std::mem::replace(&mut self.direct, DirectState::Unavailable);
        if let DirectState::Open(mut w) = state {
            let refused = w.drain().map_err(|e| {
                format!(
                    "mirror volume '{}': large writes (O_DIRECT): {e}",
                    self.r.name
                )
            })?;
            for r in refused {
                self.write_bytes(r.offset, &r.data)?;
            }
        }
        Ok(())
    }

    /// Zero a byte range: whole logical blocks with `zero_range`, the
    /// unaligned edges with written zeros.
    fn zero_bytes(&mut self, offset: u64, len: u64) -> Result<(), String> {
        self.protect_bytes(offset, len)?;
        let align = (self.r.device.logical_block_bytes() as u64).max(512);
        let end = offset + len;
        let a0 = offset.div_ceil(align) * align;
        let a1 = end / align * align;
        if a0 < a1 {
            if offset < a0 {
                self.write_bytes(offset, &vec![0u8; (a0 - offset) as usize])?;
            }
            self.r.device.zero_range(a0, a1 - a0).map_err(|e| {
                self.io_err(&format!("zeroing {} bytes at offset {a0}", a1 - a0), e)
            })?;
            if a1 < end {
                self.write_bytes(a1, &vec![0u8; (end - a1) as usize])?;
            }
        } else {
            self.write_bytes(offset, &vec![0u8; len as usize])?;
        }
        self.live.written = true;
        Ok(())
    }

    /// fdatasync the replica if anything was written since the last one.
    fn live_sync(&mut self) -> Result<(), String> {
        self.flush_live_held()?;
        self.direct_drain()?;
        if self.live.written {
            self.r
                .device
                .file()
                .sync_data()
                .map_err(|e| self.io_err("fsync of the replica", e))?;
            self.live.written = false;
            self.unflushed_bytes = 0;
        }
        Ok(())
    }

    /// How long to wait for more frames before committing (zero: now).
    fn commit_wait(&self) -> std::time::Duration {
        if self.cfg.live != Some(false) || self.live.batch_bytes >= ASYNC_COMMIT_BYTES {
            return std::time::Duration::ZERO;
        }
        match self.live.last_commit {
            Some(t) => self.cfg.async_commit.saturating_sub(t.elapsed()),
            None => std::time::Duration::ZERO,
        }
    }

    /// Asynchronous mode: tell the primary how far the replica has applied
    /// (not durable yet), when it is due (`ASYNC_APPLIED_INTERVAL` since the
    /// last report, or `ASYNC_APPLIED_BYTES` since) or, with `now`, whenever
    /// there is progress to report.
    fn report_applied(&mut self, now: bool) -> Result<(), String> {
        self.refresh_status();
        if self.cfg.live != Some(false) || self.live.applied <= self.live.reported {
            return Ok(());
        }
        let due = now
            || self.live.unreported_bytes >= ASYNC_APPLIED_BYTES
            || self
                .live
                .last_report
                .is_none_or(|t| t.elapsed() >= ASYNC_APPLIED_INTERVAL);
        if !due {
            return Ok(());
        }
        self.live.reported = self.live.applied;
        self.live.last_report = Some(std::time::Instant::now());
        self.live.unreported_bytes = 0;
        self.send(Frame::Applied {
            seq: self.live.applied,
        })
    }

    /// Asynchronous mode: the status file follows the applied sequence, not
    /// only the commits, which may be seconds apart (`--async-commit-ms`):
    /// refreshed when it shows an older one and is due.
    fn refresh_status(&mut self) {
        if self.cfg.live == Some(false)
            && self.live.applied != self.live.status_seq
            && self.status_due()
        {
            self.write_status(true);
        }
    }

    /// How long until [`Applier::refresh_status`] has something to do (the
    /// commit interval when the status is current).
    fn status_wait(&self) -> std::time::Duration {
        if self.cfg.live != Some(false) || self.live.applied == self.live.status_seq {
            return self.cfg.async_commit;
        }
        match self.live.last_status {
            Some(t) => STATUS_INTERVAL.saturating_sub(t.elapsed()),
            None => std::time::Duration::ZERO,
        }
    }

    /// Whether the live status file is due for a refresh.
    fn status_due(&self) -> bool {
        self.live
            .last_status
            .is_none_or(|t| t.elapsed() >= STATUS_INTERVAL)
    }

    /// How long until unreported progress is due for an `Applied` (the
    /// commit interval when there is none).
    fn report_wait(&self) -> std::time::Duration {
        if self.cfg.live != Some(false) || self.live.applied <= self.live.reported {
            return self.cfg.async_commit;
        }
        match self.live.last_report {
            Some(t) => ASYNC_APPLIED_INTERVAL.saturating_sub(t.elapsed()),
            None => std::time::Duration::ZERO,
        }
    }

    /// Acknowledge everything applied as durable (the caller made it so).
    fn ack_applied(&mut self) -> Result<(), String> {
        if self.live.applied <= self.live.acked {
            return Ok(());
        }
        self.live.acked = self.live.applied;
        // An Ack also reports everything up to it applied.
        self.live.reported = self.live.reported.max(self.live.applied);
        self.live.unreported_bytes = 0;
        self.send(Frame::Ack {
            seq: self.live.acked,
            state: self.r.meta.state,
        })
    }

    /// Make everything applied durable and acknowledge it.
    fn live_commit(&mut self) -> Result<(), String> {
        self.live.last_commit = Some(std::time::Instant::now());
        self.live_sync()?;
        self.live.last_batch_frames = self.live.batch_frames;
        self.live.batch_frames = 0;
        self.live.batch_bytes = 0;
        self.ack_applied()?;
        if self
            .live
            .last_map_flush
            .is_none_or(|t| t.elapsed() >= STATUS_INTERVAL)
        {
            // The map is written lazily: entries of live-written chunks are
            // "unknown", which only makes a later scan resend them.
            self.live.last_map_flush = Some(std::time::Instant::now());
            self.r
                .map
                .flush()
                .map_err(|e| self.io_err("writing the digest map", e))?;
        }
        // Asynchronous commits are rare (the interval, FLUSH, FUA): each
        // shows in the status at once. Synchronous ones come per group.
        if self.status_due() || self.cfg.live == Some(false) {
            self.write_status(true);
        }
        Ok(())
    }

    fn write_status(&mut self, connected: bool) {
        self.live.last_status = Some(std::time::Instant::now());
        self.live.status_seq = self.live.applied;
        let Some(path) = self.cfg.status_path.clone() else {
            return;
        };
        let st = crate::replication::status::MirrorStatus {
            role: "mirror".into(),
            volume: self.r.name.clone(),
            pid: std::process::id(),
            pid_start: crate::replication::status::own_start(),
            updated_unix: crate::replication::status::now_unix(),
            mode: if self.cfg.live == Some(true) {
                "sync"
            } else {
                "async"
            }
            .into(),
            connected,
            primary: self.cfg.peer.clone(),
            replica_state: self.r.meta.state.to_string(),
            applied_seq: self.live.applied,
            durable_seq: self.live.acked,
            frames_applied: self.live.frames,
            frames_inline: self.live.inline_frames,
            writes_held: self.live.held_writes,
            writes_direct_sync: self.live.direct_sync_writes,
            writes_direct: self.live.direct_writes,
        };
        if let Err(e) = crate::replication::status::write(&path, &st) {
            tracing::debug!("cannot write status {}: {e}", path.display());
        }
    }

    fn done(&mut self, chunks: u64, root: u128, generation: u64) -> Result<(), String> {
        self.durable()?;
        // Always fsync at completion, even if this session wrote nothing.
        self.r
            .device
            .sync_all()
            .map_err(|e| self.io_err("fsync of the replica", e))?;
        let ours = self.r.map.root();
        if chunks != self.r.map.len() || root != ours {
            self.r.meta.state = ReplicaState::Inconsistent;
            let _ = self.r.save_meta();
            return Err(format!(
                "mirror volume '{}': after the sync the replica's digest map differs from the primary's; \
                 the replica stays Inconsistent (run sync with --checksum to compare real contents)",
                self.name()
            ));
        }
        self.finish_consistent(generation)?;
        self.writing = false;
        tracing::info!(volume = %self.r.name, generation, "replica is UpToDate");
        self.send(Frame::SyncComplete {
            state: ReplicaState::UpToDate,
        })
    }

    // ---- generations, roles and recovery points ---------------------------

    fn maybe_poll_control(&mut self) -> Result<(), String> {
        if self.last_control.elapsed() >= CONTROL_POLL {
            self.poll_control()?;
        }
        Ok(())
    }

    /// Operator requests through the store: a fence (`promote --force`)
    /// ends the session; a point request takes a recovery point now.
    fn poll_control(&mut self) -> Result<(), String> {
        self.last_control = std::time::Instant::now();
        let store = self
            .r
            .meta_path
            .parent()
            .map(|p| p.to_path_buf())
            .unwrap_or_default();
        if super::roles::fence_path(&store, &self.r.name).exists() {
            if self.cfg.live.is_some() {
                let _ = self.live_sync();
                let _ = self.live_commit();
            }
            return Err(format!(
                "volume '{}' is being promoted on this mirror (promote --force); session ended",
                self.name()
            ));
        }
        if let Some(req) = super::roles::take_point_request(&store, &self.r.name) {
            if req.list {
                super::roles::answer_point_request(
                    &store,
                    &self.r.name,
                    &super::roles::PointReply {
                        nonce: req.nonce,
                        id: 0,
                        error: String::new(),
                        points: self.points.list(),
                    },
                );
                return Ok(());
            }
            let r = self.point_now(&req.name, req.auto, req.keep);
            let reply = match r {
                Ok(id) => super::roles::PointReply {
                    nonce: req.nonce,
                    id,
                    error: String::new(),
                    points: Vec::new(),
                },
                Err(e) => super::roles::PointReply {
                    nonce: req.nonce,
                    id: 0,
                    error: e,
                    points: Vec::new(),
                },
            };
            super::roles::answer_point_request(&store, &self.r.name, &reply);
        }
        Ok(())
    }

    /// A recovery point of what is applied now (durable first).
    fn point_now(
        &mut self,
        label: &str,
        auto: bool,
        keep: Option<(u32, u32, u32)>,
    ) -> Result<u64, String> {
        if self.r.meta.state != ReplicaState::UpToDate || self.writing {
            return Err(format!(
                "volume '{}' is {} (a sync or resync is being applied): a point now would not be consistent",
                self.name(),
                if self.writing { ReplicaState::Inconsistent } else { self.r.meta.state }
            ));
        }
        self.drain()?;
        self.live_sync()?;
        self.r
            .device
            .sync_all()
            .map_err(|e| self.io_err("fsync of the replica", e))?;
        let kind = if auto {
            PointKind::Auto
        } else {
            PointKind::Manual
        };
        let now = super::store::now_unix();
        let id = self
            .points
            .create(label, kind, now)
            .map_err(|e| e.to_string())?;
        if let Some((l, h, d)) = keep {
            self.points
                .prune_keep(l, h, d, now)
                .map_err(|e| e.to_string())?;
        }
        tracing::info!(volume = %self.r.name, point = id, "recovery point taken");
        Ok(id)
    }

    /// A promoted replica accepts no data unless the source took it over.
    fn check_role(&self) -> Result<(), String> {
        if self.r.meta.role == Role::Primary && !self.takeover {
            return Err(format!(
                "volume '{}' was promoted to primary on this mirror; it accepts no replication \
                 (split brain or reversed roles: demote it, or resolve with --after-split-brain)",
                self.name()
            ));
        }
        Ok(())
    }

    /// The source won a split brain: keep this node's state as a recovery
    /// point, mark the promoted state as demoted, and accept data.
    fn take_over(&mut self) -> Result<(), String> {
        if self.r.meta.role == Role::Primary {
            if !self.r.meta.primary_state.is_empty() {
                let dir = std::path::PathBuf::from(&self.r.meta.primary_state);
                let lock_path = dir.join("lock");
                let f = std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(&lock_path)
                    .map_err(|e| self.io_err(&format!("opening {}", lock_path.display()), e))?;
                let _held = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock)
                    .map_err(|_| {
                        format!(
                            "volume '{}' is in use by a running `blkmirror replicate` on this node ({}); \
                             it cannot be taken over",
                            self.name(),
                            dir.display()
                        )
                    })?;
                let vpath = dir.join("volume.toml");
                if let Ok(Some(mut v)) = crate::track::files::read_valid_toml::<
                    crate::primary::state::VolumeState,
                >(&vpath)
                {
                    v.demoted_to = self
                        .r
                        .meta_path
                        .parent()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default();
                    crate::track::files::write_toml(&vpath, &v)
                        .map_err(|e| self.io_err("marking the promoted state demoted", e))?;
                }
            }
            self.takeover = true;
            self.protect_consistent_state()?;
            self.r.meta.role = Role::Secondary;
            self.r
                .save_meta()
                .map_err(|e| self.io_err("recording the takeover", e))?;
            tracing::warn!(volume = %self.r.name, peer = %self.cfg.peer,
                "split brain: this node's changes are discarded by the peer's policy; they are kept as recovery point {}",
                self.r.meta.undo_point);
        }
        self.takeover = true;
        self.send(Frame::Takeover)
    }

    /// Before the replica leaves its consistent state: take a recovery point
    /// of it (the undo log of this resync). Nothing to keep if it never was
    /// consistent, or if one is already kept for this Inconsistent period.
    fn protect_consistent_state(&mut self) -> Result<(), String> {
        if self.r.meta.undo_point != 0 || self.r.meta.state != ReplicaState::UpToDate {
            return Ok(());
        }
        self.drain()?;
        self.r
            .device
            .sync_all()
            .map_err(|e| self.io_err("fsync of the replica", e))?;
        let kind = if self.takeover {
            PointKind::SplitBrain
        } else if self.cfg.target_changed > 0 {
            PointKind::Failback
        } else {
            PointKind::Resync
        };
        let now = super::store::now_unix();
        let label = match kind {
            PointKind::SplitBrain => "split-brain",
            PointKind::Failback => "before-failback",
            _ => "before-resync",
        };
        let id = self
            .points
            .create(&format!("{label}-{now}"), kind, now)
            .map_err(|e| self.io_err("creating the undo point", e))?;
        self.r.meta.undo_point = id;
        self.r
            .save_meta()
            .map_err(|e| self.io_err("recording the undo point", e))?;
        tracing::info!(volume = %self.r.name, point = id, ?kind, "kept the last consistent state as a recovery point");
        Ok(())
    }

    /// Save the old contents of chunks `first..=last` to the newest recovery
    /// point (once per chunk per point) and make them durable, before they
    /// are overwritten.
    fn protect(&mut self, first: u64, last: u64) -> Result<(), String> {
        if self.points.is_empty() {
            return Ok(());
        }
        let mut saved = false;
        for c in first..=last {
            saved |= self.save_old(c)?;
        }
        if saved {
            self.points
                .sync()
                .map_err(|e| self.io_err("fsync of the undo log", e))?;
        }
        Ok(())
    }

    /// Append the old contents of chunk `c` to the newest point's undo log
    /// if it needs saving (not yet durable). Returns whether it did.
    fn save_old(&mut self, c: u64) -> Result<bool, String> {
        use std::os::unix::fs::FileExt;
        // Cheap when there is no point: nothing needs saving then.
        if !self.points.needs_save(c) {
            return Ok(false);
        }
        while self.inflight.contains_key(&c) {
            self.reap(1)?;
        }
        let vb = self.r.meta.volume_bytes;
        let cb = self.r.meta.chunk_bytes;
        let len = config::chunk_len(vb, cb, c) as usize;
        let mut buf = vec![0u8; len];
        self.r
            .device
            .file()
            .read_exact_at(&mut buf, c * cb as u64)
            .map_err(|e| self.io_err(&format!("reading chunk {c} for the undo log"), e))?;
        self.points
            .save(c, &buf)
            .map_err(|e| self.io_err("writing the undo log", e))?;
        Ok(true)
    }

    /// Save the held writes' old contents in the undo log, make the records
    /// durable (one fsync), then issue the writes.
    fn flush_deferred(&mut self) -> Result<(), String> {
        if self.deferred.is_empty() {
            return Ok(());
        }
        let indices: Vec<u64> = self.deferred.iter().map(|d| d.3).collect();
        let mut saved = Ok(());
        for c in indices {
            saved = self.save_old(c).map(|_| ());
            if saved.is_err() {
                break;
            }
        }
        let saved = saved.and_then(|()| {
            self.points
                .sync()
                .map_err(|e| self.io_err("fsync of the undo log", e))
        });
        if let Err(e) = saved {
            for (buf, ..) in std::mem::take(&mut self.deferred) {
                self.engine.release(buf);
            }
            return Err(e);
        }
        let held = std::mem::take(&mut self.deferred);
        let mut result = Ok(());
        for (buf, offset, n, index) in held {
            if result.is_err() {
                self.engine.release(buf);
                continue;
            }
            while result.is_ok() && self.engine.in_flight() >= self.engine.queue_depth() as usize {
                result = self.reap(1);
            }
            if result.is_err() {
                self.engine.release(buf);
                continue;
            }
            if let Err(e) = self.engine.submit_write(buf, offset, n, index) {
                self.engine.release(buf);
                result = Err(self.io_err(&format!("writing chunk {index}"), e));
                continue;
            }
            self.inflight.insert(index, buf);
            self.unflushed_bytes += n as u64;
        }
        result
    }

    /// Whether live frame `f` is held (see [`Held`]): a resync chunk, or a
    /// small write or zero range without FUA that arrives while the replica
    /// is `Inconsistent`, if a chunk it changes still needs its old
    /// contents saved in the undo log.
    fn holds(&self, f: &Frame) -> bool {
        let resyncing = self.r.meta.state == ReplicaState::Inconsistent;
        let (offset, len) = match f {
            Frame::LiveChunk { chunk, .. } => return self.points.needs_save(chunk.index),
            Frame::Write(w)
                if resyncing
                    && w.raw_len <= INLINE_WRITE_MAX
                    && w.flags & protocol::LIVE_FLAG_FUA == 0 =>
            {
                (w.offset, w.raw_len as u64)
            }
            Frame::ZeroRange {
                offset, len, flags, ..
            } if resyncing
                && *len <= INLINE_WRITE_MAX as u64
                && flags & protocol::LIVE_FLAG_FUA == 0 =>
            {
                (*offset, *len)
            }
            _ => return false,
        };
        if len == 0
            || offset
                .checked_add(len)
                .is_none_or(|e| e > self.r.meta.volume_bytes)
        {
            // Refused when applied, with the usual error.
            return false;
        }
        self.chunks_of(offset, len)
            .any(|c| self.points.needs_save(c))
    }

    /// The chunks `item` changes.
    fn held_chunks(&self, item: &Held) -> std::ops::RangeInclusive<u64> {
        match item {
            Held::Chunk(c, _) => *c..=*c,
            Held::Write(offset, data) => self.chunks_of(*offset, data.len() as u64),
            Held::Zero(offset, len) => self.chunks_of(*offset, *len),
        }
    }

    /// Whether a held item changes any of `chunks`.
    fn overlaps_held(&self, chunks: std::ops::RangeInclusive<u64>) -> bool {
        self.live_held.iter().any(|h| {
            let r = self.held_chunks(h);
            r.start() <= chunks.end() && chunks.start() <= r.end()
        })
    }

    /// Hold `item`: the old contents of its chunks are read into the page
    /// cache meanwhile (without waiting), and at the flush the held items'
    /// undo records are written together, made durable by one fsync, and
    /// only then are the items applied, in arrival order.
    fn hold(&mut self, item: Held) -> Result<(), String> {
        let chunks = self.held_chunks(&item);
        if self.overlaps_held(chunks.clone()) {
            // One chunk in the group once: a later item on the same chunk
            // goes after the group is applied.
            self.flush_live_held()?;
        }
        let cb = self.r.meta.chunk_bytes as u64;
        let vb = self.r.meta.volume_bytes;
        for c in chunks {
            if self.points.needs_save(c) {
                let n = config::chunk_len(vb, cb as u32, c) as u64;
                self.r.device.prefetch(c * cb, n);
            }
        }
        if !matches!(item, Held::Chunk(..)) {
            self.live.held_writes += 1;
        }
        self.live_held_bytes += match &item {
            Held::Chunk(_, Some(d)) => d.len(),
            Held::Write(_, d) => d.len(),
            Held::Chunk(_, None) | Held::Zero(..) => 0,
        };
        self.live_held.push(item);
        if self.live_held.len() >= DEFERRED_WRITES_MAX
            || self.live_held_bytes >= LIVE_HELD_BYTES_MAX
        {
            self.flush_live_held()?;
        }
        Ok(())
    }

    /// Apply one held item (its undo records, if any, already durable).
    fn apply_held(&mut self, item: Held) -> Result<(), String> {
        match item {
            Held::Chunk(c, data) => {
                let cb = self.r.meta.chunk_bytes;
                let offset = c * cb as u64;
                match data {
                    None => {
                        let n = config::chunk_len(self.r.meta.volume_bytes, cb, c) as u64;
                        self.zero_bytes(offset, n)
                    }
                    Some(d) => self.write_bytes(offset, &d),
                }
            }
            Held::Write(offset, data) => self.write_bytes(offset, &data),
            Held::Zero(offset, len) => self.zero_bytes(offset, len),
        }
    }

    /// Save the held items' old contents in the undo log, make the records
    /// durable (one fsync), then apply the items, in the order they arrived.
    fn flush_live_held(&mut self) -> Result<(), String> {
        if self.live_held.is_empty() {
            return Ok(());
        }
        let held = std::mem::take(&mut self.live_held);
        self.live_held_bytes = 0;
        // On an error the held items are dropped: the session ends, and
        // the primary resends every chunk not acknowledged durable.
        for item in &held {
            for c in self.held_chunks(item) {
                self.save_old(c)?;
            }
        }
        self.points
            .sync()
            .map_err(|e| self.io_err("fsync of the undo log", e))?;
        for item in held {
            self.apply_held(item)?;
        }
        Ok(())
    }

    fn protect_bytes(&mut self, offset: u64, len: u64) -> Result<(), String> {
        if len == 0 || self.points.is_empty() {
            return Ok(());
        }
        let cb = self.r.meta.chunk_bytes as u64;
        self.protect(offset / cb, (offset + len - 1) / cb)
    }

    /// A sync or resync completed: the replica holds the source's state
    /// `generation`. Record it, drop the undo log of the resync (a kept
    /// failback or split-brain point stays), forget this node's own changes.
    fn finish_consistent(&mut self, generation: u64) -> Result<(), String> {
        // Both callers have just made every write durable, so the replica's
        // cached pages are clean: drop what the sync left cached (see
        // `Device::drop_cache`).
        self.r.device.drop_cache();
        let mut g = self.r.meta.gen();
        g.synced(generation);
        self.r.meta.set_gen(g);
        self.r.meta.state = ReplicaState::UpToDate;
        self.r.meta.source_id = id_hex(self.cfg.source_id);
        self.r.meta.last_primary = self.cfg.peer.clone();
        self.r.meta.role = Role::Secondary;
        self.r.meta.promoted_unix = 0;
        let undo = std::mem::take(&mut self.r.meta.undo_point);
        let had_changes = !self.r.meta.primary_state.is_empty();
        self.r.meta.primary_state.clear();
        self.r
            .save_meta()
            .map_err(|e| self.io_err("cannot record state UpToDate", e))?;
        metrics::gauge!("blkmirror_replica_state", "volume" => self.r.name.clone()).set(1.0);
        let changed = self
            .r
            .meta_path
            .with_file_name(format!("{}.changed", self.r.name));
        if changed.exists() || had_changes {
            let _ = std::fs::remove_file(&changed);
        }
        if undo != 0
            && self
                .points
                .get(undo)
                .is_some_and(|p| p.kind == PointKind::Resync)
        {
            self.points
                .remove(undo)
                .map_err(|e| self.io_err("dropping the undo log", e))?;
        }
        if self.cfg.points_after_sync {
            let now = super::store::now_unix();
            self.points
                .create(&format!("sync-{now}"), PointKind::Auto, now)
                .map_err(|e| self.io_err("creating the automatic recovery point", e))?;
            let (l, h, d) = self.cfg.keep;
            self.points
                .prune_keep(l, h, d, now)
                .map_err(|e| self.io_err("applying the retention of automatic points", e))?;
        }
        Ok(())
    }
}
