//! io_uring engine: one ring, registered buffers, `ReadFixed`/`WriteFixed`/`Fsync`.
//!
//! Every operation occupies a *slot* (index = SQE `user_data`) from submission until
//! its final completion; short transfers and EINTR/EAGAIN are resubmitted from the
//! same slot, so at most `queue_depth` operations are ever in the kernel and the
//! completion queue (twice the submission queue) cannot overflow.
//!
//! An optional *waker* (an eventfd, see [`UringEngine::set_waker`]) lets a thread
//! that owns the engine sleep in `io_uring_enter` and still be woken by other
//! threads: a multishot `PollAdd(POLLIN)` of the eventfd is kept armed on the ring
//! under the reserved `user_data` [`WAKE_USER_DATA`]. It is not counted in
//! `in_flight`; it references no memory, only the eventfd, which the engine owns.
//! (A `Read` of the eventfd would be punted to an io-wq worker thread that blocks
//! in `read(2)`: two extra thread wake-ups per request.) A multishot poll posts one
//! completion per `write(2)` to the eventfd, so its counter is only drained when
//! the poll ends (one-shot fallback on kernels older than 5.13).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use io_uring::{opcode, squeue, types, IoUring, Probe};

use super::buffers::BufferPool;
use super::{BlockError, BufId, Completion, EngineConfig, IoTarget, OpKind, Result, MAX_RETRIES};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum UKind {
    Rw(OpKind),
    /// fsync with IO_DRAIN (waits for every earlier submission).
    Fsync,
    /// fdatasync without IO_DRAIN: covers the writes that completed before it.
    Datasync,
    /// fallocate(mode) of `len` bytes at `offset`.
    Fallocate {
        mode: i32,
        len: u64,
    },
}

/// `user_data` of the waker's eventfd poll (slots are `< queue_depth <= 4096`).
pub(crate) const WAKE_USER_DATA: u64 = u64::MAX;

/// See the module docs and [`UringEngine::set_waker`].
struct Waker {
    /// The eventfd (non-blocking: it is only read to reset its counter).
    fd: OwnedFd,
    /// A poll is submitted (or queued in the SQ) and has not ended.
    armed: bool,
    /// Use multishot polls (cleared if the kernel rejects them).
    multishot: bool,
    /// The poll fired since the last `wait_or_wake` returned.
    fired: bool,
}

#[derive(Clone, Copy, Debug)]
struct Op {
    kind: UKind,
    buf: Option<BufId>,
    offset: u64,
    len: usize,
    /// Bytes already transferred (short I/O progress).
    done: usize,
    user_data: u64,
    retries: u32,
    /// `RWF_*` flags of a write (e.g. `RWF_DSYNC`), 0 otherwise.
    rw_flags: i32,
}

/// The io_uring engine. See the [module docs](super).
pub struct UringEngine {
    // Field order matters only for the leak case; `Drop` drains the ring first.
    ring: IoUring,
    target: IoTarget,
    slots: Vec<Option<Op>>,
    free_slots: Vec<u32>,
    in_flight: usize,
    queue_depth: u32,
    /// Reused scratch space for (user_data, result, flags) copied out of the CQ.
    cqes: Vec<(u64, i32, u32)>,
    /// The kernel supports IORING_OP_FALLOCATE (5.6+).
    has_fallocate: bool,
    waker: Option<Waker>,
    pub(crate) pool: BufferPool,
}

fn uring_err(what: &str, e: &io::Error) -> BlockError {
    let hint = match e.raw_os_error() {
        Some(libc::ENOSYS) => " (kernel built without io_uring)",
        Some(libc::EPERM) => {
            " (io_uring disabled: kernel.io_uring_disabled sysctl, seccomp or container policy)"
        }
        Some(libc::ENOMEM) => " (RLIMIT_MEMLOCK too low for registered buffers? see ulimit -l)",
        Some(libc::EINVAL) => " (kernel too old?)",
        _ => "",
    };
    BlockError::Uring {
        reason: format!("{what}: {e}{hint}"),
    }
}

impl UringEngine {
    pub(crate) fn new(target: IoTarget, cfg: &EngineConfig) -> Result<UringEngine> {
        let ring = IoUring::new(cfg.queue_depth).map_err(|e| uring_err("io_uring_setup", &e))?;
        Self::with_ring(ring, target, cfg)
    }

    /// An engine for use by the calling thread only: the ring is set up with
    /// `IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN` (Linux 6.1+), so
    /// completion work runs only when this thread waits for completions, without
    /// interrupting it otherwise. Falls back to a default ring on older kernels.
    /// The engine must not be used (or dropped) from another thread.
    pub(crate) fn new_single_thread(target: IoTarget, cfg: &EngineConfig) -> Result<UringEngine> {
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .build(cfg.queue_depth);
        match ring {
            Ok(ring) => Self::with_ring(ring, target, cfg),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                tracing::debug!("io_uring DEFER_TASKRUN unavailable ({e}); default ring");
                Self::new(target, cfg)
            }
            Err(e) => Err(uring_err("io_uring_setup", &e)),
        }
    }

    fn with_ring(ring: IoUring, target: IoTarget, cfg: &EngineConfig) -> Result<UringEngine> {
        let qd = cfg.queue_depth;
        let mut probe = Probe::new();
        ring.submitter()
            .register_probe(&mut probe)
            .map_err(|e| uring_err("opcode probe (IORING_REGISTER_PROBE)", &e))?;
        let required = [
            ("Read", opcode::Read::CODE),
            ("Write", opcode::Write::CODE),
            ("ReadFixed", opcode::ReadFixed::CODE),
            ("WriteFixed", opcode::WriteFixed::CODE),
            ("Fsync", opcode::Fsync::CODE),
        ];
        let missing: Vec<&str> = required
            .iter()
            .filter(|(_, code)| !probe.is_supported(*code))
            .map(|(name, _)| *name)
            .collect();
        if !missing.is_empty() {
            return Err(BlockError::Uring {
                reason: format!("kernel lacks opcodes {}", missing.join(", ")),
            });
        }
        let has_fallocate = probe.is_supported(opcode::Fallocate::CODE);
        if cfg.buffer_count > usize::from(u16::MAX) {
            return Err(BlockError::Uring {
                reason: format!(
                    "{} buffers exceed the registrable maximum",
                    cfg.buffer_count
                ),
            });
        }
        let pool = BufferPool::new(cfg.buffer_bytes, cfg.buffer_count)?;
        let iovecs = pool.iovecs();
        // SAFETY: every iovec describes one buffer inside `pool`'s live allocation.
        // The pool is owned by the engine together with the ring, and `Drop` waits for
        // all operations to finish (or leaks the pool), so the kernel never accesses
        // the memory after it is freed.
        unsafe { ring.submitter().register_buffers(&iovecs) }
            .map_err(|e| uring_err("register_buffers", &e))?;
        Ok(UringEngine {
            ring,
            target,
            slots: vec![None; qd as usize],
            free_slots: (0..qd).rev().collect(),
            in_flight: 0,
            queue_depth: qd,
            cqes: Vec::with_capacity(2 * qd as usize),
            has_fallocate,
            waker: None,
            pool,
        })
    }

    /// Whether [`UringEngine::submit_fallocate`] can work on this kernel.
    pub(crate) fn has_fallocate(&self) -> bool {
        self.has_fallocate
    }

    pub(crate) fn submit_rw(
        &mut self,
        kind: OpKind,
        buf: BufId,
        offset: u64,
        len: usize,
        user_data: u64,
    ) -> Result<()> {
        self.submit_rw_dsync(kind, buf, offset, len, user_data, false)
    }

    /// [`UringEngine::submit_rw`]; a write with `dsync` carries `RWF_DSYNC` (it is
    /// durable when it completes, like a write followed by fdatasync of its range).
    pub(crate) fn submit_rw_dsync(
        &mut self,
        kind: OpKind,
        buf: BufId,
        offset: u64,
        len: usize,
        user_data: u64,
        dsync: bool,
    ) -> Result<()> {
        self.target
            .check_rw(kind, offset, len, self.pool.buffer_bytes())?;
        self.submit_op(Op {
            kind: UKind::Rw(kind),
            buf: Some(buf),
            offset,
            len,
            done: 0,
            user_data,
            retries: 0,
            rw_flags: if dsync && kind == OpKind::Write {
                libc::RWF_DSYNC
            } else {
                0
            },
        })
    }

    pub(crate) fn submit_fsync(&mut self, user_data: u64) -> Result<()> {
        self.submit_other(UKind::Fsync, 0, user_data)
    }

    /// fdatasync *without* IO_DRAIN: it makes durable the writes that completed
    /// before it was submitted and waits for nothing else.
    pub(crate) fn submit_datasync(&mut self, user_data: u64) -> Result<()> {
        self.submit_other(UKind::Datasync, 0, user_data)
    }

    /// fallocate(`mode`, `offset`, `len`) (e.g. punch a hole, zero a range).
    pub(crate) fn submit_fallocate(
        &mut self,
        offset: u64,
        len: u64,
        mode: i32,
        user_data: u64,
    ) -> Result<()> {
        if !self.has_fallocate {
            return Err(BlockError::Uring {
                reason: "kernel lacks IORING_OP_FALLOCATE".to_string(),
            });
        }
        if len == 0
            || offset
                .checked_add(len)
                .is_none_or(|end| end > i64::MAX as u64)
        {
            return Err(BlockError::InvalidRequest {
                reason: format!("fallocate offset {offset} length {len} out of range"),
            });
        }
        self.submit_other(UKind::Fallocate { mode, len }, offset, user_data)
    }

    fn submit_other(&mut self, kind: UKind, offset: u64, user_data: u64) -> Result<()> {
        self.submit_op(Op {
            kind,
            buf: None,
            offset,
            len: 0,
            done: 0,
            user_data,
            retries: 0,
            rw_flags: 0,
        })
    }

    fn submit_op(&mut self, op: Op) -> Result<()> {
        let Some(&slot) = self.free_slots.last() else {
            return Err(BlockError::QueueFull {
                depth: self.queue_depth,
            });
        };
        if let Some(b) = op.buf {
            self.pool.start_io(b)?;
        }
        if let Err(e) = self.push(slot, &op) {
            if let Some(b) = op.buf {
                self.pool.end_io(b);
            }
            return Err(e);
        }
        self.free_slots.pop();
        self.slots[slot as usize] = Some(op);
        self.in_flight += 1;
        Ok(())
    }

    /// Push the SQE for (the remainder of) `op`; submits first if the SQ is full.
    fn push(&mut self, slot: u32, op: &Op) -> Result<()> {
        let fd = types::Fd(self.target.file.as_raw_fd());
        let entry = match op.kind {
            UKind::Fsync => opcode::Fsync::new(fd)
                .build()
                .flags(squeue::Flags::IO_DRAIN),
            UKind::Datasync => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            UKind::Fallocate { mode, len } => opcode::Fallocate::new(fd, len)
                .offset(op.offset)
                .mode(mode)
                .build(),
            UKind::Rw(kind) => {
                let Some(buf) = op.buf else {
                    return Err(BlockError::InvalidRequest {
                        reason: "read/write without buffer".to_string(),
                    });
                };
                let ptr = self.pool.ptr(buf.0).wrapping_add(op.done);
                // Lengths are <= buffer_bytes <= 1 GiB and buffer ids < 2^16 (checked).
                let len = (op.len - op.done) as u32;
                let off = op.offset + op.done as u64;
                let idx = buf.0 as u16;
                match kind {
                    OpKind::Read => opcode::ReadFixed::new(fd, ptr, len, idx)
                        .offset(off)
                        .build(),
                    OpKind::Write => opcode::WriteFixed::new(fd, ptr, len, idx)
                        .offset(off)
                        .rw_flags(op.rw_flags)
                        .build(),
                }
            }
        }
        .user_data(u64::from(slot));
        for attempt in 0..2 {
            // SAFETY: the SQE refers to (a) the engine's own fd, kept open until the
            // ring is drained in Drop (fsync/fallocate reference no memory), and (b)
            // for reads/writes, a sub-range
            // [done, len) of registered buffer `idx` (len <= buffer_bytes was checked),
            // which is marked in flight so no Rust reference to it is handed out until
            // the final completion is reaped, and which outlives the operation (Drop).
            let pushed = unsafe { self.ring.submission().push(&entry) };
            if pushed.is_ok() {
                return Ok(());
            }
            if attempt == 0 {
                self.ring
                    .submit()
                    .map_err(|e| uring_err("io_uring_enter (SQ full)", &e))?;
            }
        }
        Err(BlockError::Uring {
            reason: "submission queue full".to_string(),
        })
    }

    pub(crate) fn flush(&mut self) -> Result<()> {
        if self.ring.submission().is_empty() {
            return Ok(());
        }
        loop {
            match self.ring.submit() {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                // The kernel is short of resources or the CQ is backed up: the SQEs
                // stay queued and are submitted by the next wait().
                Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EBUSY)) => {
                    return Ok(())
                }
                Err(e) => return Err(uring_err("io_uring_enter", &e)),
            }
        }
    }

    /// One `io_uring_enter` (submit, wait for `want` completions). Interrupted
    /// or momentarily busy calls count as done (the caller loops), up to
    /// `MAX_RETRIES` busy results in a row.
    fn enter(&mut self, want: usize, busy: &mut u32) -> std::io::Result<()> {
        match self.ring.submit_and_wait(want) {
            Ok(_) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => Ok(()),
            Err(e)
                if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EBUSY))
                    && *busy < MAX_RETRIES =>
            {
                *busy += 1;
                std::thread::yield_now();
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    pub(crate) fn wait(&mut self, min: usize) -> Result<Vec<Completion>> {
        let min = min.min(self.in_flight);
        let mut out = Vec::new();
        let mut busy = 0u32;
        loop {
            self.reap(&mut out);
            let want = usize::from(out.len() < min);
            if want == 0 && self.ring.submission().is_empty() {
                return Ok(out);
            }
            match self.enter(want, &mut busy) {
                Ok(()) => {}
                Err(e) => {
                    // Completions already reaped are not lost: their ops are finished
                    // and their slots freed; report them before the error next time.
                    if out.is_empty() {
                        return Err(uring_err("io_uring_enter", &e));
                    }
                    tracing::warn!(
                        "io_uring_enter failed: {e}; returning {} completions",
                        out.len()
                    );
                    return Ok(out);
                }
            }
        }
    }

    /// Drain the completion queue, resubmitting partial operations and appending
    /// finished ones to `out`.
    fn reap(&mut self, out: &mut Vec<Completion>) {
        let mut cqes = std::mem::take(&mut self.cqes);
        cqes.clear();
        cqes.extend(
            self.ring
                .completion()
                .map(|c| (c.user_data(), c.result(), c.flags())),
        );
        for &(slot, res, flags) in &cqes {
            if slot == WAKE_USER_DATA {
                self.wake_completed(res, io_uring::cqueue::more(flags));
                continue;
            }
            self.complete(slot, res, out);
        }
        self.cqes = cqes;
    }

    fn complete(&mut self, slot: u64, res: i32, out: &mut Vec<Completion>) {
        let Some(Some(op)) = usize::try_from(slot)
            .ok()
            .and_then(|s| self.slots.get_mut(s))
        else {
            tracing::warn!(slot, res, "io_uring completion for an unknown slot ignored");
            return;
        };
        let slot = slot as u32;
        let op_name = match op.kind {
            UKind::Rw(k) => k.name(),
            UKind::Fsync => "fsync",
            UKind::Datasync => "fdatasync",
            UKind::Fallocate { .. } => "fallocate",
        };
        let pos = op.offset + op.done as u64;
        let remaining = op.len - op.done;
        let result = if res < 0 {
            let errno = -res;
            if matches!(errno, libc::EINTR | libc::EAGAIN) && op.retries < MAX_RETRIES {
                op.retries += 1;
                return self.resubmit(slot, out);
            }
            Err(BlockError::Io {
                op: op_name,
                offset: pos,
                len: remaining,
                source: io::Error::from_raw_os_error(errno),
            })
        } else {
            match op.kind {
                UKind::Fsync | UKind::Datasync | UKind::Fallocate { .. } => Ok(0),
                UKind::Rw(_) if res == 0 && remaining > 0 => Err(match op.kind {
                    UKind::Rw(OpKind::Read) => BlockError::UnexpectedEof {
                        offset: pos,
                        remaining,
                    },
                    _ => BlockError::Io {
                        op: op_name,
                        offset: pos,
                        len: remaining,
                        source: io::ErrorKind::WriteZero.into(),
                    },
                }),
                UKind::Rw(_) => {
                    op.done += (res as usize).min(remaining);
                    if op.done < op.len {
                        op.retries = 0;
                        return self.resubmit(slot, out);
                    }
                    Ok(op.len)
                }
            }
        };
        self.finish(slot, result, out);
    }

    fn resubmit(&mut self, slot: u32, out: &mut Vec<Completion>) {
        let Some(op) = self.slots[slot as usize] else {
            return;
        };
        if let Err(e) = self.push(slot, &op) {
            self.finish(slot, Err(e), out);
        }
    }

    fn finish(&mut self, slot: u32, result: Result<usize>, out: &mut Vec<Completion>) {
        let Some(op) = self.slots[slot as usize].take() else {
            return;
        };
        self.free_slots.push(slot);
        self.in_flight -= 1;
        if let Some(b) = op.buf {
            self.pool.end_io(b);
        }
        out.push(Completion {
            user_data: op.user_data,
            buf: op.buf,
            result,
        });
    }

    /// Have the kernel signal `eventfd` whenever it posts a completion
    /// (`IORING_REGISTER_EVENTFD`), so that an event loop can watch the ring.
    /// The kernel keeps its own reference to the eventfd while it is
    /// registered, so closing the caller's descriptor earlier is harmless.
    pub(crate) fn register_eventfd(&mut self, eventfd: &impl AsRawFd) -> Result<()> {
        self.ring
            .submitter()
            .register_eventfd(eventfd.as_raw_fd())
            .map_err(|e| uring_err("io_uring_register(EVENTFD)", &e))
    }

    /// Install `fd` (a non-blocking eventfd, owned by the engine from now on) as
    /// the wake-up source of [`UringEngine::wait_or_wake`]. Replaces nothing: an
    /// error if a waker is already installed.
    pub(crate) fn set_waker(&mut self, fd: OwnedFd) -> Result<()> {
        if self.waker.is_some() {
            return Err(BlockError::InvalidRequest {
                reason: "io_uring waker already installed".to_string(),
            });
        }
        self.waker = Some(Waker {
            fd,
            armed: false,
            multishot: true,
            fired: false,
        });
        Ok(())
    }

    /// Wait until at least one operation completes *or* the waker's eventfd is
    /// signalled, submitting everything queued on the way (one `io_uring_enter`
    /// submits new operations, re-arms the waker and sleeps). Blocks even when
    /// nothing is in flight. Returns the completions and whether the waker fired.
    /// Without a waker this is `wait(1)` (which does not block with nothing in flight).
    pub(crate) fn wait_or_wake(&mut self) -> Result<(Vec<Completion>, bool)> {
        if self.waker.is_none() {
            return Ok((self.wait(1)?, false));
        }
        self.arm_waker()?;
        let mut out = Vec::new();
        let mut busy = 0u32;
        loop {
            self.reap(&mut out);
            let fired = self.waker.as_ref().is_some_and(|w| w.fired);
            let ready = fired || !out.is_empty();
            if ready && self.ring.submission().is_empty() {
                if let Some(w) = self.waker.as_mut() {
                    w.fired = false;
                }
                return Ok((out, fired));
            }
            match self.enter(usize::from(!ready), &mut busy) {
                Ok(()) => {}
                Err(e) => {
                    if out.is_empty() && !fired {
                        return Err(uring_err("io_uring_enter", &e));
                    }
                    tracing::warn!(
                        "io_uring_enter failed: {e}; returning {} completions",
                        out.len()
                    );
                    if let Some(w) = self.waker.as_mut() {
                        w.fired = false;
                    }
                    return Ok((out, fired));
                }
            }
        }
    }

    /// Queue the waker's eventfd poll unless it is already armed.
    fn arm_waker(&mut self) -> Result<()> {
        let Some(w) = self.waker.as_mut() else {
            return Ok(());
        };
        if w.armed {
            return Ok(());
        }
        let entry = opcode::PollAdd::new(types::Fd(w.fd.as_raw_fd()), libc::POLLIN as u32)
            .multi(w.multishot)
            .build()
            .user_data(WAKE_USER_DATA);
        for attempt in 0..2 {
            // SAFETY: a poll references no user memory, only the waker's eventfd,
            // of whose file the kernel holds its own reference while the poll
            // lives (the engine also keeps the fd open until the ring is dropped).
            let pushed = unsafe { self.ring.submission().push(&entry) };
            if pushed.is_ok() {
                w.armed = true;
                return Ok(());
            }
            if attempt == 0 {
                self.ring
                    .submit()
                    .map_err(|e| uring_err("io_uring_enter (SQ full)", &e))?;
            }
        }
        Err(BlockError::Uring {
            reason: "submission queue full".to_string(),
        })
    }

    /// A completion of the waker's poll; `more`: the poll stays armed.
    fn wake_completed(&mut self, res: i32, more: bool) {
        let Some(w) = self.waker.as_mut() else {
            tracing::warn!(res, "io_uring waker completion without a waker ignored");
            return;
        };
        w.fired = true;
        if more {
            return;
        }
        // The poll has ended: drain the counter so that the next poll does not
        // fire at once (a multishot poll leaves it growing), then re-arm later.
        w.armed = false;
        let mut value = [0u8; 8];
        // SAFETY: `w.fd` is an open eventfd owned by the engine and `value` a valid,
        // writable 8-byte buffer for the duration of the call. The fd is
        // non-blocking, so the read returns at once (EAGAIN when the counter is 0).
        let _ = unsafe { libc::read(w.fd.as_raw_fd(), value.as_mut_ptr().cast(), value.len()) };
        if res == -libc::EINVAL && w.multishot {
            tracing::debug!("multishot poll unsupported, waker falls back to one-shot polls");
            w.multishot = false;
        } else if res < 0 && !matches!(-res, libc::EINTR | libc::EAGAIN | libc::ECANCELED) {
            tracing::warn!(
                "io_uring waker poll failed: {}",
                io::Error::from_raw_os_error(-res)
            );
        }
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight
    }

    pub(crate) fn queue_depth(&self) -> u32 {
        self.queue_depth
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        // The kernel may still DMA into / read from the registered buffers of
        // in-flight operations. Wait for every one of them (without resubmitting
        // remainders) before the pool is freed; if that is impossible, leak the pool.
        // (The waker's poll references no memory: it is cancelled with the ring.)
        let mut errors = 0u32;
        while self.in_flight > 0 {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) if errors < MAX_RETRIES => {
                    errors += 1;
                    if errors == 1 {
                        tracing::warn!("io_uring_enter while draining on drop: {e}");
                    }
                    std::thread::yield_now();
                }
                Err(_) => {
                    self.pool.leak();
                    return;
                }
            }
            let done: Vec<u64> = self.ring.completion().map(|c| c.user_data()).collect();
            for slot in done {
                if slot == WAKE_USER_DATA {
                    continue;
                }
                if let Some(Some(_)) = self.slots.get(slot as usize) {
                    self.slots[slot as usize] = None;
                    self.in_flight -= 1;
                }
            }
        }
    }
}
