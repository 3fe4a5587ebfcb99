//! The primary side of live replication as a pure state machine.
//!
//! [`LiveCore`] decides, for every write the NBD front-end receives, what must
//! happen before and after it; it does no I/O. The caller (see
//! `replication::live`) performs the steps it asks for and reports back:
//!
//! 1. [`LiveCore::try_lock`] serialises overlapping operations (writes, zero
//!    ranges, resync reads of a chunk), so the mirror applies overlapping
//!    writes in the order the local device did.
//! 2. [`LiveCore::prepare`] marks the chunks dirty. If a chunk's bit is not
//!    yet set in the persistent write-intent bitmap, the whole 64-chunk word
//!    is set (an activity-log-like extent) and the caller must wait until
//!    bitmap batch [`Prepared::wait_batch`] is durable before writing.
//! 3. [`LiveCore::send_write`] (or `send_zero`, `send_flush`) assigns the next
//!    sequence number and queues the frame in the outbox, or, when the link is
//!    down or (async) the queue is full, leaves the chunks marked for resync.
//! 4. The caller writes locally, unlocks, and in sync mode waits until
//!    [`LiveCore::covered`] reaches the returned target.
//!
//! The mirror acknowledges durable sequence numbers ([`LiveCore::on_ack`]);
//! a chunk's bit is cleared once the last frame that carried it is durable.
//! After a disconnect or a pull-ahead, [`LiveCore::next_resync`] yields the
//! dirty chunks nobody sent, then an `InSync` frame closes the resync.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use bytes::Bytes;

use crate::protocol::{ChunkFrame, Frame, LiveWrite, ReplicaState};
use crate::track::{Bitmap, UNKNOWN_DIGEST};

/// Synchronous (RPO 0) or asynchronous replication.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Sync,
    Async,
}

/// What writes do while the mirror is unreachable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnDisconnect {
    /// Hold writes until the mirror is back and in sync, up to a timeout, then fail them.
    Suspend,
    /// Keep serving; mark the chunks for resync.
    Continue,
}

#[derive(Clone, Debug)]
pub struct CoreConfig {
    pub volume_bytes: u64,
    pub chunk_bytes: u32,
    pub mode: Mode,
    pub on_disconnect: OnDisconnect,
    /// Bytes of frames sent and not yet acknowledged durable.
    pub queue_bytes_max: u64,
    /// How long writes are held while disconnected in `Suspend` mode.
    pub suspend_timeout: Duration,
    /// Bytes per second the live resync may read and send (whole chunks);
    /// 0: as fast as the source, the link and the mirror allow.
    pub resync_rate: u64,
}

/// Where the mirror stands relative to the primary.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Every write since the last `InSync` went to the mirror in order.
    Live,
    /// Writes were skipped (pull-ahead or disconnect); no resync started yet.
    Behind,
    /// `StartResync` sent: dirty chunks are being sent; the replica is Inconsistent.
    Resync,
}

/// Identifies a locked range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct OpId(u64);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prepared {
    /// Wait until the bitmap batch with this number is durable (0: nothing to wait for).
    pub wait_batch: u64,
}

/// Result of trying to send an operation to the mirror.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sent {
    /// Queued with this sequence number; covered once `covered() >= seq`.
    Queued(u64),
    /// Not sent (link down or pull-ahead); the chunks will be resynced. Covered
    /// once `covered() >= target`.
    Skipped { target: u64 },
    /// Sync mode, queue full: wait for acknowledgements, then try again.
    Full,
}

impl Sent {
    pub fn target(self) -> Option<u64> {
        match self {
            Sent::Queued(s) => Some(s),
            Sent::Skipped { target } => Some(target),
            Sent::Full => None,
        }
    }
}

struct SentEntry {
    seq: u64,
    first: u64,
    last: u64,
    bytes: u64,
    at: Duration,
}

/// A snapshot for `blkmirror status`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CoreStatus {
    pub mode: Mode,
    pub connected: bool,
    pub phase: Phase,
    pub in_sync: bool,
    pub dirty_chunks: u64,
    pub queued_bytes: u64,
    pub last_seq: u64,
    pub durable_seq: u64,
    pub lag_writes: u64,
    pub lag_seconds: f64,
    pub resync_total: u64,
    pub resync_done: u64,
    /// The resync's rate limit in bytes per second (0: none).
    pub resync_rate: u64,
    /// Writes not sent because the link was down or the queue full (pull-ahead).
    pub skipped_writes: u64,
    #[serde(rename = "replica_state")]
    pub mirror_state: Option<ReplicaState>,
}

pub struct LiveCore {
    cfg: CoreConfig,
    chunks: u64,
    slot: usize,
    /// Chunks not known to be durable on the mirror.
    dirty: Vec<u64>,
    /// Dirty chunks whose mirror copy misses a change no queued frame
    /// carries (skipped writes, frames lost with a link): they need a resync
    /// of the whole chunk. A subset of `dirty`.
    stale: Vec<u64>,
    /// The bitmap as written (or being written) on disk, every peer.
    persisted: Bitmap,
    /// Words touched since the last lazy flush (kept set on disk).
    touched: Vec<u64>,
    /// Words to write in the open batch, and the batch each pending word is in.
    batch_words: Vec<usize>,
    pending: HashMap<usize, u64>,
    open_batch: u64,
    durable_batch: u64,
    /// Digest map updates not yet handed to the map writer.
    map_pending: HashMap<u64, u128>,
    locks: Vec<(OpId, u64, u64)>,
    next_op: u64,
    next_seq: u64,
    connected: bool,
    phase: Phase,
    insync_pending: Option<u64>,
    last_sent: HashMap<u64, u64>,
    sent: VecDeque<SentEntry>,
    /// Bytes of sent frames the mirror has not reported applied: the queue
    /// that `queue_bytes_max` bounds.
    queued_bytes: u64,
    /// Leading entries of `sent` the mirror reported applied (their bytes
    /// are out of `queued_bytes`; they wait for `Ack` to settle their chunks).
    released: usize,
    /// Highest sequence number reported applied in this session.
    applied: u64,
    durable: u64,
    covered: u64,
    mirror_state: Option<ReplicaState>,
    cursor: u64,
    /// Chunks handed out by [`LiveCore::next_resync`] in this session and
    /// not yet sent or released (at most [`RESYNC_READS_MAX`]).
    resync_claims: Vec<u64>,
    /// When the application last wrote (or zeroed): the resync reads fewer
    /// chunks at once while it does.
    last_write_at: Option<Duration>,
    /// Counts sessions (and resets of one): a claim from an earlier one is void.
    link_epoch: u64,
    /// With a resync rate: when the next chunk is due (each claim moves it
    /// on by one chunk's time at the rate).
    resync_due: Duration,
    resync_total: u64,
    resync_done: u64,
    skipped: u64,
    disconnected_at: Option<Duration>,
    outbox: VecDeque<Frame>,
    /// When the oldest frame in the outbox was queued, and the outbox's bytes.
    outbox_since: Option<Duration>,
    outbox_bytes: u64,
    /// Frames in the outbox that are not batched (see [`batchable`]).
    outbox_urgent: usize,
    /// Generation id the mirror holds once in sync (the source's current).
    generation: u64,
}

/// Frames sent and not yet durable at most (the mirror commits an
/// asynchronous session at least every `mirror::apply::ASYNC_COMMIT_FRAMES`,
/// a quarter of this).
pub const SENT_ENTRIES_MAX: usize = 1 << 18;

/// Resync reads in flight at once: chunks claimed by [`LiveCore::next_resync`]
/// and not yet sent. More than one keeps the source's disk and the mirror
/// busy; the mirror groups the undo records of the chunks that arrive
/// together under one fsync.
pub const RESYNC_READS_MAX: usize = 8;

/// Resync reads in flight at once while the application writes (a write
/// within [`RESYNC_BUSY_WINDOW`]): one, so that the resync takes the disk
/// from the writes no more than a single reader did.
pub const RESYNC_READS_BUSY: usize = 1;

/// How long after an application write the resync counts the device as busy.
pub const RESYNC_BUSY_WINDOW: Duration = Duration::from_millis(100);

/// With a resync rate set, how far ahead of its schedule the resync may
/// claim chunks: timers fire in steps of a millisecond or more, so a
/// chunk's due time is not hit exactly; over any span the resync sends at
/// most `rate × (span + this)` bytes, plus one chunk.
pub const RESYNC_RATE_SLACK: Duration = Duration::from_millis(10);

/// A chunk handed out for a resync read; see [`LiveCore::next_resync`].
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a claim must be sent or released"]
pub struct ResyncClaim {
    pub chunk: u64,
    epoch: u64,
}

/// Asynchronous mode: the sender sends at once when this many bytes wait.
pub const OUTBOX_BATCH_BYTES: u64 = 256 << 10;

/// Frames the asynchronous sender may hold back for a batch: writes, zero
/// ranges and flush barriers (their client was answered without the mirror).
fn batchable(f: &Frame) -> bool {
    matches!(
        f,
        Frame::Write(_) | Frame::ZeroRange { .. } | Frame::Flush { .. }
    )
}

fn bit(v: &[u64], i: u64) -> bool {
    v[(i / 64) as usize] & (1 << (i % 64)) != 0
}

impl LiveCore {
    /// `bitmap`: the persistent bitmap as loaded (its `slot` bits are the
    /// chunks that may differ on this mirror). Starts disconnected.
    pub fn new(cfg: CoreConfig, bitmap: Bitmap, slot: usize) -> LiveCore {
        let chunks = bitmap.chunks();
        let words = bitmap.word_count();
        let dirty: Vec<u64> = (0..words).map(|w| bitmap.word(slot, w)).collect();
        LiveCore {
            cfg,
            chunks,
            slot,
            stale: dirty.clone(),
            dirty,
            persisted: bitmap,
            touched: vec![0; words.div_ceil(64)],
            batch_words: Vec::new(),
            pending: HashMap::new(),
            open_batch: 1,
            durable_batch: 0,
            map_pending: HashMap::new(),
            locks: Vec::new(),
            next_op: 1,
            next_seq: 1,
            connected: false,
            phase: Phase::Behind,
            insync_pending: None,
            last_sent: HashMap::new(),
            sent: VecDeque::new(),
            queued_bytes: 0,
            released: 0,
            applied: 0,
            durable: 0,
            covered: 0,
            mirror_state: None,
            cursor: 0,
            resync_claims: Vec::new(),
            last_write_at: None,
            link_epoch: 0,
            resync_due: Duration::ZERO,
            resync_total: 0,
            resync_done: 0,
            skipped: 0,
            disconnected_at: Some(Duration::ZERO),
            outbox: VecDeque::new(),
            outbox_since: None,
            outbox_bytes: 0,
            outbox_urgent: 0,
            generation: 0,
        }
    }

    /// The generation id to announce with `InSync`.
    pub fn set_generation(&mut self, generation: u64) {
        self.generation = generation;
    }

    /// Chunks the mirror's node changed itself (an old primary's
    /// unreplicated writes, a split-brain loser's changes): they join the
    /// coming resync as whole chunks. Call right after `on_connected`.
    pub fn add_target_changes(&mut self, words: &[u64]) {
        let last = self.dirty.len().saturating_sub(1);
        for (w, &word) in words.iter().enumerate().take(self.dirty.len()) {
            let mut bits = word;
            if w == last && self.chunks % 64 != 0 {
                bits &= (1u64 << (self.chunks % 64)) - 1;
            }
            if bits != 0 {
                self.dirty[w] |= bits;
                self.stale[w] |= bits;
                self.touched[w / 64] |= 1 << (w % 64);
            }
        }
    }

    pub fn config(&self) -> &CoreConfig {
        &self.cfg
    }

    pub fn chunk_range(&self, offset: u64, len: u64) -> (u64, u64) {
        let cb = self.cfg.chunk_bytes as u64;
        let first = offset / cb;
        let last = (offset + len.max(1) - 1) / cb;
        (first, last.min(self.chunks.saturating_sub(1)))
    }

    // ---- range locks -------------------------------------------------------

    /// Lock byte range `[start, end)` unless an overlapping operation holds it.
    pub fn try_lock(&mut self, start: u64, end: u64) -> Option<OpId> {
        if self.locks.iter().any(|&(_, s, e)| s < end && start < e) {
            return None;
        }
        let id = OpId(self.next_op);
        self.next_op += 1;
        self.locks.push((id, start, end));
        Some(id)
    }

    pub fn unlock(&mut self, id: OpId) {
        let Some(k) = self.locks.iter().position(|&(i, _, _)| i == id) else {
            return;
        };
        let (_, start, end) = self.locks.swap_remove(k);
        // Acks that arrived while the range was locked left its bits set.
        let (first, last) = self.chunk_range(start, end - start);
        for c in first..=last {
            self.settle_chunk(c);
        }
    }

    fn chunk_locked(&self, c: u64) -> bool {
        let cb = self.cfg.chunk_bytes as u64;
        let (s, e) = (c * cb, (c + 1) * cb);
        self.locks.iter().any(|&(_, ls, le)| ls < e && s < le)
    }

    /// Clear chunk `c`'s dirty bit if the last frame that carried it is
    /// durable, no change is missing (stale) and no operation holds it.
    fn settle_chunk(&mut self, c: u64) {
        let Some(&seq) = self.last_sent.get(&c) else {
            return;
        };
        if seq <= self.durable && !bit(&self.stale, c) && !self.chunk_locked(c) {
            self.last_sent.remove(&c);
            self.dirty[(c / 64) as usize] &= !(1 << (c % 64));
        }
    }

    // ---- write intent --------------------------------------------------------

    /// Mark chunks `first..=last` dirty (their digests unknown) and make sure
    /// the persistent bitmap will say so before the caller writes.
    pub fn prepare(&mut self, first: u64, last: u64) -> Prepared {
        let mut wait = 0;
        for c in first..=last {
            let w = (c / 64) as usize;
            self.dirty[w] |= 1 << (c % 64);
            self.touched[w / 64] |= 1 << (w % 64);
            self.map_pending.insert(c, UNKNOWN_DIGEST);
            if let Some(&b) = self.pending.get(&w) {
                wait = wait.max(b);
            } else if self.persisted.word(self.slot, w) & (1 << (c % 64)) == 0 {
                self.persisted.or_word_all(w, u64::MAX);
                self.pending.insert(w, self.open_batch);
                self.batch_words.push(w);
                wait = wait.max(self.open_batch);
            }
        }
        if wait <= self.durable_batch {
            wait = 0;
        }
        Prepared { wait_batch: wait }
    }

    /// The bitmap writer takes the open batch: the words to write, and the
    /// batch number to report to [`LiveCore::batch_durable`] afterwards.
    pub fn take_batch(&mut self) -> Option<(u64, Vec<usize>)> {
        if self.batch_words.is_empty() {
            return None;
        }
        let b = self.open_batch;
        self.open_batch += 1;
        Some((b, std::mem::take(&mut self.batch_words)))
    }

    pub fn batch_durable(&mut self, batch: u64) {
        self.durable_batch = self.durable_batch.max(batch);
        let d = self.durable_batch;
        self.pending.retain(|_, b| *b > d);
    }

    pub fn batch_is_durable(&self, batch: u64) -> bool {
        batch <= self.durable_batch
    }

    /// The persistent bitmap image (for the writer; read under the same lock).
    pub fn persisted(&self) -> &Bitmap {
        &self.persisted
    }

    /// Digest-map updates since the last call (unknown digests of written
    /// chunks, digests of resynced chunks). They must be durable before any
    /// bit cleared afterwards by [`LiveCore::take_clearable_words`] is written.
    pub fn take_map_updates(&mut self) -> Vec<(u64, u128)> {
        self.map_pending.drain().collect()
    }

    /// Lazy flush: words whose on-disk bits can now be cleared (chunks
    /// durable on the mirror), skipping words touched since the last call
    /// unless `all`. The persisted image is updated; the caller writes those
    /// words (their current image) after making the map durable.
    pub fn take_clearable_words(&mut self, all: bool) -> Vec<usize> {
        let mut words = Vec::new();
        for w in 0..self.dirty.len() {
            let hot = !all && self.touched[w / 64] & (1 << (w % 64)) != 0;
            let on_disk = self.persisted.word(self.slot, w);
            if !hot && !self.pending.contains_key(&w) && on_disk != self.dirty[w] {
                self.persisted.set_word(self.slot, w, self.dirty[w]);
                words.push(w);
            }
        }
        self.touched.fill(0);
        words
    }

    // ---- sending --------------------------------------------------------------

    fn room(&self, bytes: u64) -> bool {
        if self.sent.len() >= SENT_ENTRIES_MAX {
            // Applied but not yet durable: bounded by count too.
            return false;
        }
        self.queued_bytes == 0 || self.queued_bytes + bytes <= self.cfg.queue_bytes_max
    }

    fn skip(&mut self, first: u64, last: u64) -> Sent {
        for c in first..=last {
            self.last_sent.remove(&c);
            if self.phase == Phase::Resync && !bit(&self.stale, c) {
                // Newly behind during a resync: it joins this resync.
                self.resync_total += 1;
            }
            self.stale[(c / 64) as usize] |= 1 << (c % 64);
        }
        self.skipped += 1;
        // If the mirror would be consistent after the queued frames (live,
        // or an InSync queued), nothing more may be sent until a
        // StartResync tells it the order is broken.
        if self.phase == Phase::Live || self.insync_pending.is_some() {
            self.phase = Phase::Behind;
        }
        self.insync_pending = None;
        Sent::Skipped {
            target: self.next_seq,
        }
    }

    fn decide(&mut self, bytes: u64, first: u64, last: u64) -> Option<Sent> {
        if !self.connected {
            return Some(self.skip(first, last));
        }
        if self.phase == Phase::Behind {
            // Pull-ahead in progress: keep marking until the resync starts.
            return Some(self.skip(first, last));
        }
        if !self.room(bytes) {
            return Some(match self.cfg.mode {
                Mode::Sync => Sent::Full,
                Mode::Async => self.skip(first, last),
            });
        }
        None
    }

    fn push(&mut self, frame: Frame, first: u64, last: u64, bytes: u64, now: Duration) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        for c in first..=last {
            self.last_sent.insert(c, seq);
        }
        self.sent.push_back(SentEntry {
            seq,
            first,
            last,
            bytes,
            at: now,
        });
        self.queued_bytes += bytes;
        self.enqueue(frame, bytes, now);
        seq
    }

    fn enqueue(&mut self, frame: Frame, bytes: u64, now: Duration) {
        self.outbox_since.get_or_insert(now);
        self.outbox_bytes += bytes;
        self.outbox_urgent += usize::from(!batchable(&frame));
        self.outbox.push_back(frame);
    }

    /// Send a write of `data` at `offset` (at most one frame's worth; the
    /// caller splits larger writes); `digest` is its xxh3-128, computed by
    /// the caller outside any lock. The frame gets the sequence number.
    pub fn send_write(
        &mut self,
        offset: u64,
        data: &Bytes,
        digest: u128,
        fua: bool,
        now: Duration,
    ) -> Sent {
        self.last_write_at = Some(now);
        let (first, last) = self.chunk_range(offset, data.len() as u64);
        let bytes = data.len() as u64 + 64;
        if let Some(s) = self.decide(bytes, first, last) {
            return s;
        }
        let frame = Frame::Write(LiveWrite {
            seq: self.next_seq,
            offset,
            flags: if fua {
                crate::protocol::LIVE_FLAG_FUA
            } else {
                0
            },
            encoding: crate::protocol::Encoding::Raw,
            raw_len: data.len() as u32,
            digest,
            payload: data.clone(),
        });
        Sent::Queued(self.push(frame, first, last, bytes, now))
    }

    /// Send "bytes `offset..offset+len` read as zeros".
    pub fn send_zero(&mut self, offset: u64, len: u64, fua: bool, now: Duration) -> Sent {
        self.last_write_at = Some(now);
        let (first, last) = self.chunk_range(offset, len);
        if let Some(s) = self.decide(64, first, last) {
            return s;
        }
        let frame = Frame::ZeroRange {
            seq: self.next_seq,
            offset,
            len,
            flags: if fua {
                crate::protocol::LIVE_FLAG_FUA
            } else {
                0
            },
        };
        Sent::Queued(self.push(frame, first, last, 64, now))
    }

    /// Send a flush barrier. It carries no chunks.
    pub fn send_flush(&mut self, now: Duration) -> Sent {
        if !self.connected || self.phase == Phase::Behind {
            return Sent::Skipped {
                target: self.next_seq,
            };
        }
        Sent::Queued(self.push_marker(|seq| Frame::Flush { seq }, now))
    }

    /// The primary stops: queue `LiveEnd` after everything else.
    pub fn send_end(&mut self, now: Duration) -> u64 {
        self.push_marker(|seq| Frame::LiveEnd { seq }, now)
    }

    /// Queue a frame that carries no chunks but is acknowledged like the others.
    fn push_marker(&mut self, frame: impl FnOnce(u64) -> Frame, now: Duration) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.sent.push_back(SentEntry {
            seq,
            first: 1,
            last: 0,
            bytes: 0,
            at: now,
        });
        self.enqueue(frame(seq), 0, now);
        seq
    }

    /// Frames to send, in sequence order.
    pub fn poll_outbox(&mut self) -> Option<Frame> {
        let f = self.outbox.pop_front();
        if let Some(f) = &f {
            self.outbox_urgent -= usize::from(!batchable(f));
        }
        if self.outbox.is_empty() {
            self.outbox_since = None;
            self.outbox_bytes = 0;
        }
        f
    }

    /// Asynchronous mode batches small writes: the sender may hold the
    /// outbox until the returned time (the oldest frame's age reaching
    /// `linger`), so that several writes share one QUIC packet and one UDP
    /// send. `None`: send now (sync mode, a zero linger, a resync running,
    /// [`OUTBOX_BATCH_BYTES`] waiting, or a frame other than a write, zero
    /// range or flush queued).
    pub fn hold_outbox_until(&self, linger: Duration) -> Option<Duration> {
        if self.cfg.mode != Mode::Async || linger.is_zero() || self.phase != Phase::Live {
            return None;
        }
        let since = self.outbox_since?;
        if self.outbox_bytes >= OUTBOX_BATCH_BYTES || self.outbox_urgent > 0 {
            return None;
        }
        Some(since + linger)
    }

    pub fn outbox_len(&self) -> usize {
        self.outbox.len()
    }

    // ---- resync ------------------------------------------------------------------

    /// Claim the next dirty chunk that no queued frame carries and no other
    /// claim holds, if a resync may send one now. The caller locks the
    /// chunk, checks [`LiveCore::needs_resync`], reads it and hands it to
    /// [`LiveCore::send_resync_chunk`], or gives the claim back with
    /// [`LiveCore::release_resync`]. Up to [`RESYNC_READS_MAX`] claims may be
    /// out at once, [`RESYNC_READS_BUSY`] while the application writes.
    /// When no chunk is left and no claim is out, queues `InSync` (once) and
    /// returns `None`.
    pub fn next_resync(&mut self, now: Duration) -> Option<ResyncClaim> {
        if !self.connected {
            return None;
        }
        if self.phase == Phase::Behind {
            if self.queued_bytes > self.cfg.queue_bytes_max / 2 {
                return None;
            }
            self.cursor = 0;
            self.resync_done = 0;
            self.resync_total = self.unsent_count();
            if self.resync_total == 0 {
                // Nothing to resend: the mirror only needs to hear it is in sync.
                self.phase = Phase::Resync;
                return self.next_resync(now);
            }
            let seq = self.next_seq;
            self.next_seq += 1;
            self.enqueue(Frame::StartResync { seq }, 0, now);
            self.phase = Phase::Resync;
        }
        if self.phase != Phase::Resync || self.insync_pending.is_some() {
            return None;
        }
        if self.resync_claims.len() >= self.resync_reads_allowed(now) {
            return None;
        }
        if self.resync_rate_wait(now).is_some() {
            return None;
        }
        // Room for every chunk claimed and this one, in half the queue:
        // the other half stays free for the application's writes, which
        // would otherwise find the queue full of resync chunks and be
        // marked for the resync instead (a 4 KiB write resent as a whole
        // chunk in async mode, a write waiting for the resync to drain in
        // sync mode).
        let claimed = self.resync_claims.len() as u64 + 1;
        let want = self.cfg.chunk_bytes as u64 * claimed;
        if !self.room(want)
            || (self.queued_bytes > 0 && self.queued_bytes + want > self.cfg.queue_bytes_max / 2)
        {
            return None;
        }
        if let Some(c) = self.find_unsent() {
            self.resync_claims.push(c);
            if self.cfg.resync_rate > 0 {
                // One chunk's time at the rate, from its due time or from
                // now if the resync was idle (no credit for idle time
                // beyond the slack).
                let step = Duration::from_secs_f64(
                    self.cfg.chunk_bytes as f64 / self.cfg.resync_rate as f64,
                );
                self.resync_due = self.resync_due.max(now) + step;
            }
            return Some(ResyncClaim {
                chunk: c,
                epoch: self.link_epoch,
            });
        }
        if !self.resync_claims.is_empty() {
            // The last chunks are being read: `InSync` must follow them.
            return None;
        }
        let generation = self.generation;
        let seq = self.push_marker(|seq| Frame::InSync { seq, generation }, now);
        self.insync_pending = Some(seq);
        None
    }

    /// With a resync rate set: how long until the next chunk may be
    /// claimed (`None`: now, or no rate set).
    pub fn resync_rate_wait(&self, now: Duration) -> Option<Duration> {
        if self.cfg.resync_rate == 0 {
            return None;
        }
        let wait = self.resync_due.saturating_sub(now + RESYNC_RATE_SLACK);
        (!wait.is_zero()).then_some(wait)
    }

    /// How many resync reads may be in flight now: fewer while the
    /// application writes.
    pub fn resync_reads_allowed(&self, now: Duration) -> usize {
        match self.last_write_at {
            Some(t) if now.saturating_sub(t) < RESYNC_BUSY_WINDOW => RESYNC_READS_BUSY,
            _ => RESYNC_READS_MAX,
        }
    }

    /// First chunk from the cursor on that is stale and not claimed.
    fn find_unsent(&mut self) -> Option<u64> {
        let words = self.dirty.len() as u64;
        if words == 0 {
            return None;
        }
        let start_w = self.cursor / 64;
        for k in 0..=words {
            let w = ((start_w + k) % words) as usize;
            let mut bits = self.stale[w];
            if k == 0 {
                bits &= u64::MAX << (self.cursor % 64);
            }
            while bits != 0 {
                let b = bits.trailing_zeros() as u64;
                let c = w as u64 * 64 + b;
                bits &= bits - 1;
                if c < self.chunks && !self.resync_claims.contains(&c) {
                    self.cursor = c;
                    return Some(c);
                }
            }
        }
        None
    }

    fn unsent_count(&self) -> u64 {
        self.stale.iter().map(|w| w.count_ones() as u64).sum()
    }

    /// Whether the claimed chunk still needs a resync (check again after
    /// locking it): false once its session ended or a frame carried it.
    pub fn needs_resync(&self, claim: &ResyncClaim) -> bool {
        let c = claim.chunk;
        claim.epoch == self.link_epoch
            && self.connected
            && self.phase == Phase::Resync
            && c < self.chunks
            && bit(&self.stale, c)
    }

    /// Give a claim back without sending (the chunk no longer needs it, or
    /// it could not be read).
    pub fn release_resync(&mut self, claim: ResyncClaim) {
        if claim.epoch == self.link_epoch {
            self.resync_claims.retain(|&c| c != claim.chunk);
        }
    }

    /// Queue the claimed chunk's current contents (read while it was
    /// locked, after [`LiveCore::needs_resync`] said yes). Returns its
    /// sequence number, or `None` if the claim went void meanwhile (the
    /// session ended while the chunk was read): nothing is sent then, and
    /// the chunk stays marked for the next resync.
    pub fn send_resync_chunk(
        &mut self,
        claim: ResyncClaim,
        chunk: ChunkFrame,
        now: Duration,
    ) -> Option<u64> {
        let c = claim.chunk;
        debug_assert_eq!(c, chunk.index, "the chunk read is the one claimed");
        let valid = self.needs_resync(&claim) && chunk.index == c;
        self.release_resync(claim);
        if !valid {
            return None;
        }
        let bytes = chunk.payload.len() as u64 + 64;
        self.map_pending.insert(c, chunk.digest);
        self.stale[(c / 64) as usize] &= !(1 << (c % 64));
        let seq = self.next_seq;
        self.resync_done += 1;
        let frame = Frame::LiveChunk { seq, chunk };
        Some(self.push(frame, c, c, bytes, now))
    }

    // ---- link ---------------------------------------------------------------------

    /// A live session is established with the mirror.
    pub fn on_connected(&mut self, mirror_state: ReplicaState) {
        self.connected = true;
        self.disconnected_at = None;
        self.mirror_state = Some(mirror_state);
        self.reset_link();
    }

    pub fn on_disconnected(&mut self, now: Duration) {
        if self.connected {
            self.disconnected_at = Some(now);
        }
        self.connected = false;
        self.mirror_state = None;
        self.reset_link();
    }

    /// A session began or ended: frames queued or in flight are lost, so
    /// every dirty chunk must be resent whole, after a `StartResync`.
    fn reset_link(&mut self) {
        self.link_epoch += 1;
        self.resync_claims.clear();
        for (s, d) in self.stale.iter_mut().zip(&self.dirty) {
            *s |= *d;
        }
        self.phase = Phase::Behind;
        self.insync_pending = None;
        self.last_sent.clear();
        self.sent.clear();
        self.queued_bytes = 0;
        self.released = 0;
        self.applied = 0;
        self.outbox.clear();
        self.outbox_since = None;
        self.outbox_bytes = 0;
        self.outbox_urgent = 0;
    }

    /// The mirror reports everything up to `seq` durable.
    pub fn on_ack(&mut self, seq: u64, state: ReplicaState) -> Result<(), String> {
        if seq < self.durable || seq >= self.next_seq {
            return Err(format!(
                "mirror acknowledged sequence {seq}, outside {}..{}",
                self.durable, self.next_seq
            ));
        }
        self.durable = seq;
        self.applied = self.applied.max(seq);
        self.mirror_state = Some(state);
        while let Some(e) = self.sent.front() {
            if e.seq > seq {
                break;
            }
            let e = self.sent.pop_front().expect("front exists");
            if self.released > 0 {
                self.released -= 1;
            } else {
                self.queued_bytes -= e.bytes;
            }
            for c in e.first..=e.last {
                if self.last_sent.get(&c) == Some(&e.seq) {
                    self.settle_chunk(c);
                }
            }
        }
        if let Some(x) = self.insync_pending {
            if x <= seq {
                self.insync_pending = None;
                self.phase = Phase::Live;
            }
        }
        if self.in_sync() {
            self.covered = self.covered.max(seq);
        }
        Ok(())
    }

    /// The mirror reports everything up to `seq` applied, not yet durable
    /// (asynchronous mode): those frames leave the queue; their chunks stay
    /// dirty until [`LiveCore::on_ack`] covers them.
    pub fn on_applied(&mut self, seq: u64) -> Result<(), String> {
        if seq < self.applied || seq >= self.next_seq {
            return Err(format!(
                "mirror reported sequence {seq} applied, outside {}..{}",
                self.applied, self.next_seq
            ));
        }
        self.applied = seq;
        while let Some(e) = self.sent.get(self.released) {
            if e.seq > seq {
                break;
            }
            self.queued_bytes -= e.bytes;
            self.released += 1;
        }
        Ok(())
    }

    /// Highest sequence number such that the mirror durably holds every
    /// write up to it.
    pub fn covered(&self) -> u64 {
        self.covered
    }

    /// In `Suspend` mode, whether held writes must now fail.
    pub fn suspend_expired(&self, now: Duration) -> bool {
        match self.disconnected_at {
            Some(t) => now.saturating_sub(t) >= self.cfg.suspend_timeout,
            None => false,
        }
    }

    /// Every write since the last acknowledged `InSync` reached the mirror in order.
    pub fn in_sync(&self) -> bool {
        self.phase == Phase::Live
    }

    pub fn connected(&self) -> bool {
        self.connected
    }

    pub fn is_dirty(&self, c: u64) -> bool {
        bit(&self.dirty, c)
    }

    /// Queue a verify of chunk `c` whose contents hash to `digest` (read
    /// while the caller held the chunk's lock). Only while in sync: otherwise
    /// the mirror may lack changes it is owed. Returns the frame's sequence.
    pub fn send_verify(&mut self, c: u64, digest: u128, now: Duration) -> Option<u64> {
        if !self.connected || self.phase != Phase::Live || c >= self.chunks {
            return None;
        }
        Some(self.push_marker(
            |seq| Frame::VerifyChunk {
                seq,
                index: c,
                digest,
            },
            now,
        ))
    }

    /// The mirror's copy of chunk `c` is wrong (a verify found it): resend it
    /// whole, through a resync.
    pub fn mark_for_resync(&mut self, c: u64) {
        if c >= self.chunks {
            return;
        }
        let w = (c / 64) as usize;
        self.dirty[w] |= 1 << (c % 64);
        self.touched[w / 64] |= 1 << (w % 64);
        self.skip(c, c);
        self.skipped -= 1;
    }

    /// Highest sequence number the mirror acknowledged as durable.
    pub fn durable_seq(&self) -> u64 {
        self.durable
    }

    /// The dirty bits as words (chunks the mirror may lack).
    pub fn dirty_words(&self) -> &[u64] {
        &self.dirty
    }

    pub fn dirty_count(&self) -> u64 {
        self.dirty.iter().map(|w| w.count_ones() as u64).sum()
    }

    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Nothing queued, nothing dirty, nothing in flight: the mirror equals the device.
    pub fn quiet(&self) -> bool {
        self.in_sync() && self.sent.is_empty() && self.outbox.is_empty() && self.dirty_count() == 0
    }

    pub fn status(&self, now: Duration) -> CoreStatus {
        let last = self.next_seq - 1;
        CoreStatus {
            mode: self.cfg.mode,
            connected: self.connected,
            phase: self.phase,
            in_sync: self.in_sync(),
            dirty_chunks: self.dirty_count(),
            queued_bytes: self.queued_bytes,
            last_seq: last,
            durable_seq: self.durable,
            lag_writes: self.sent.len() as u64,
            lag_seconds: self
                .sent
                .front()
                .map_or(0.0, |e| now.saturating_sub(e.at).as_secs_f64()),
            resync_total: self.resync_total,
            resync_done: self.resync_done,
            resync_rate: self.cfg.resync_rate,
            skipped_writes: self.skipped,
            mirror_state: self.mirror_state,
        }
    }
}

#[cfg(test)]
#[path = "primary_tests.rs"]
mod tests;
