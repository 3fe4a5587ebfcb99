//! Asynchronous I/O service: one dedicated thread owns an [`Engine`] and serves
//! `async` read / write / zero / flush requests from any number of tokio tasks.
//!
//! # Design
//!
//! * **Handles.** [`IoService`] is a cheap `Clone` (an `Arc`), `Send + Sync`.
//!   Requests travel to the I/O thread through a mutex-protected queue and an
//!   eventfd; each carries a `tokio::sync::oneshot` sender for its reply. The queue
//!   is not bounded by the service: callers bound it (the NBD front-end by its
//!   number of requests in flight). Inside the thread at most
//!   `2 * queue_depth` requests are *active* (being split into operations, read
//!   results allocated); the rest wait in arrival order.
//! * **Wake-ups and batching.** A producer writes the eventfd only if no wake-up is
//!   already pending (`Queue::wake_pending`), so a burst of requests costs one
//!   `write(2)`; the thread drains the whole queue every time it runs. With the
//!   io_uring engine the eventfd is watched *by the ring* (a multishot
//!   `PollAdd`, see [`UringEngine::set_waker`]): the thread sleeps in one
//!   `io_uring_enter` that returns on the first I/O completion *or* on a new
//!   request, so new requests are submitted at once even while other I/O is in
//!   flight, and with nothing in flight the thread simply sleeps there. All
//!   operations prepared in one turn of the loop are submitted by a single
//!   `io_uring_enter`. The ring is created by the I/O thread itself with
//!   `SINGLE_ISSUER | DEFER_TASKRUN` (completion work runs only when the thread
//!   waits; default ring before Linux 6.1). The plain engine is synchronous at
//!   submit; its thread blocks in `poll(2)` on the eventfd when idle.
//! * **Placement.** [`IoService::start`] gives the engine a thread of its own (as
//!   above). [`IoService::start_on_runtime`] instead returns a [`Driver`], a
//!   future to spawn on the caller's tokio runtime: it owns an io_uring (a
//!   default ring, so that the runtime may poll it from any of its threads),
//!   submits new requests from the task that drives it and learns of
//!   completions through an eventfd registered with the ring
//!   (`IORING_REGISTER_EVENTFD`) and watched by the runtime's epoll.
//!   Requests then reach the engine without a thread hand-off, and
//!   completions wake the runtime itself: on a small VM each request costs
//!   two thread wake-ups less (README, "The local device on the runtime").
//!   The plain engine blocks, so it always gets a thread.
//! * **Splitting.** Requests of up to [`MAX_IO_BYTES`] (zero: any length) are cut
//!   into operations of at most one buffer; operations of all active requests are
//!   issued round-robin (a 32 MiB request does not hold back a 4 KiB one) as long
//!   as an engine slot and a buffer are free. Completion order is free.
//! * **Alignment.** With `O_DIRECT`, offsets and lengths must be multiples of the
//!   logical block size ([`IoService::logical_block_bytes`]). Aligned parts go
//!   straight through the engine (`ReadFixed`/`WriteFixed` on registered buffers).
//!   Reads of unaligned ranges read the covering aligned blocks and copy out the
//!   requested bytes. The unaligned head and tail of a write (or zero) are done by
//!   **read-modify-write of the one covering block through the engine**, under a
//!   per-block lock so that concurrent writes to *different* bytes of the same
//!   block never lose each other's update (lock ownership is handed to the next
//!   waiter in FIFO order). Why not a second, buffered descriptor: mixing page-
//!   cache writes with `O_DIRECT` writes of the same file is coherent only if
//!   every buffered write is written back and invalidated before any direct I/O
//!   touching the same *page* (4 KiB, larger than a 512-byte block) runs, and the
//!   kernel's dirty page could otherwise be written back over a later direct
//!   write; we would need page-granular serialisation plus writeback calls anyway.
//!   One descriptor with `O_DIRECT` for everything is coherent by construction.
//! * **Zero.** The aligned middle of a zero request is one `fallocate` through the
//!   engine: `PUNCH_HOLE | KEEP_SIZE` for regular files (the range becomes a hole)
//!   and `ZERO_RANGE | KEEP_SIZE` for block devices (the kernel's implementation
//!   of `BLKZEROOUT`, which itself falls back to writing zeros). If the file
//!   system refuses (`EOPNOTSUPP`) the service switches for good to writing zeros
//!   from a buffer. Unaligned edges are read-modify-write as above.
//! * **Durability.** A FUA write carries `RWF_DSYNC` on every operation (plain
//!   engine: `pwrite` + `fdatasync`); a FUA zero ends with an `fdatasync`. A flush
//!   is one `fdatasync` submitted as soon as it is taken from the queue, without
//!   `IO_DRAIN`: it covers every write that had completed when it was requested
//!   and waits for nothing else.
//! * **Size.** With `O_DIRECT` the exported size is rounded down to the logical
//!   block size (a partial last block cannot be read-modify-written without
//!   changing the file's length).
//! * **Errors** are [`BlockError`]s with the operation and absolute device offset
//!   (the path is [`IoService::path`]; `BlockError::Io` has no path field).
//!   [`error_errno`] gives the errno an NBD server needs (ENOSPC, EIO, EINVAL...).
//! * **Shutdown.** [`IoService::shutdown`] (or dropping the last handle) closes the
//!   queue (later requests fail with `ESHUTDOWN`), lets the thread finish every
//!   request already queued, and joins it. Callers that drop a request's future
//!   do not cancel it; the operation completes and its reply is discarded. If
//!   the thread hits a fatal error (`io_uring_enter` failing) it answers every
//!   request with that error and stops; later requests fail with `ESHUTDOWN`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use bytes::Bytes;
use tokio::sync::oneshot;

use super::{
    BlockError, BufId, Completion, Device, DeviceKind, Engine, EngineConfig, EnginePreference,
    IoTarget, OpKind, PlainEngine, Result, UringEngine,
};

/// Largest read or write request (NBD's customary maximum).
pub const MAX_IO_BYTES: usize = 32 << 20;

/// Active requests inside the I/O thread per unit of queue depth.
const ACTIVE_PER_SLOT: usize = 2;

/// Handle of the asynchronous I/O service. See the [module docs](self).
#[derive(Clone)]
pub struct IoService {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for IoService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoService")
            .field("path", &self.inner.path)
            .field("size_bytes", &self.inner.size_bytes)
            .field("logical_block_bytes", &self.inner.align)
            .field("engine", &self.inner.engine_name)
            .finish()
    }
}

struct Inner {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<Result<()>>>>,
    path: PathBuf,
    size_bytes: u64,
    align: u32,
    writable: bool,
    engine_name: &'static str,
}

/// State shared between the handles and the I/O thread.
struct Shared {
    queue: Mutex<Queue>,
    /// Non-blocking eventfd signalled when requests are queued (thread placement).
    wake: File,
    /// Runtime placement: the driver task is woken through this instead.
    notify: Option<Arc<tokio::sync::Notify>>,
}

#[derive(Default)]
struct Queue {
    items: VecDeque<Request>,
    /// No more requests are accepted; the thread exits once everything is done.
    closed: bool,
    /// The eventfd has been (or is about to be) written and the thread has not
    /// consumed that wake-up yet: producers need not write it again.
    wake_pending: bool,
}

enum Request {
    Read {
        offset: u64,
        len: usize,
        reply: oneshot::Sender<Result<Vec<u8>>>,
    },
    Write {
        offset: u64,
        data: Bytes,
        fua: bool,
        reply: oneshot::Sender<Result<()>>,
    },
    Zero {
        offset: u64,
        len: u64,
        fua: bool,
        reply: oneshot::Sender<Result<()>>,
    },
    Flush {
        reply: oneshot::Sender<Result<()>>,
    },
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // A panic while holding the lock leaves the queue consistent (pushes and
        // drains are single operations), so poisoning is ignored.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn signal(&self) {
        if let Some(n) = &self.notify {
            // Stores a permit if the driver is not waiting: never lost.
            n.notify_one();
            return;
        }
        let one = 1u64.to_ne_bytes();
        loop {
            match (&self.wake).write(&one) {
                Ok(_) => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Cannot happen for an eventfd short of counter overflow
                    // (2^64 - 2 writes); the thread drains the queue whenever it runs.
                    tracing::error!("cannot signal the I/O thread: {e}");
                    return;
                }
            }
        }
    }

    /// Queue a request, or give it back if the service is closed.
    fn send(&self, req: Request) -> std::result::Result<(), Request> {
        let need_signal = {
            let mut q = self.lock();
            if q.closed {
                return Err(req);
            }
            q.items.push_back(req);
            !std::mem::replace(&mut q.wake_pending, true)
        };
        if need_signal {
            self.signal();
        }
        Ok(())
    }

    fn close(&self) {
        self.lock().closed = true;
        self.signal();
    }
}

/// Error for a request made after shutdown (or after the I/O thread died).
fn shut_down(op: &'static str, offset: u64, len: u64) -> BlockError {
    BlockError::Io {
        op,
        offset,
        len: usize::try_from(len).unwrap_or(usize::MAX),
        source: io::Error::from_raw_os_error(libc::ESHUTDOWN),
    }
}

/// The errno that best describes `err`, for protocols that report errnos (NBD):
/// the OS error of failed I/O (`ENOSPC`, `EIO`, `EDQUOT`, ...), `EINVAL` for
/// invalid or unaligned requests (including ranges past the end), `ESHUTDOWN` for
/// requests to a stopped service, `ENOMEM` for allocation failures, else `EIO`.
pub fn error_errno(err: &BlockError) -> i32 {
    match err {
        BlockError::Io { source, .. }
        | BlockError::Open { source, .. }
        | BlockError::Ioctl { source, .. } => {
            source.raw_os_error().unwrap_or(match source.kind() {
                io::ErrorKind::StorageFull => libc::ENOSPC,
                io::ErrorKind::InvalidInput => libc::EINVAL,
                io::ErrorKind::PermissionDenied => libc::EPERM,
                _ => libc::EIO,
            })
        }
        BlockError::Unaligned { .. }
        | BlockError::InvalidRequest { .. }
        | BlockError::InvalidConfig { .. } => libc::EINVAL,
        BlockError::OutOfMemory { .. } => libc::ENOMEM,
        BlockError::NotRegularFile { .. }
        | BlockError::NotBlockOrFile { .. }
        | BlockError::DirectUnsupported { .. } => libc::EOPNOTSUPP,
        BlockError::UnexpectedEof { .. }
        | BlockError::Uring { .. }
        | BlockError::NoBuffer
        | BlockError::BadBuffer { .. }
        | BlockError::QueueFull { .. } => libc::EIO,
    }
}

/// What the I/O thread needs to know about its target.
struct Target {
    path: PathBuf,
    size_bytes: u64,
    /// Alignment of engine operations (1 without O_DIRECT).
    align: u32,
    /// `fallocate` mode that zeroes a range, or `None` to write zeros.
    zero_mode: Option<i32>,
    writable: bool,
}

impl Target {
    fn of(device: &Device) -> Target {
        let align = if device.is_direct() {
            device.logical_block_bytes().max(1)
        } else {
            1
        };
        let raw_size = device.size_bytes();
        let size_bytes = raw_size - raw_size % u64::from(align);
        if size_bytes != raw_size {
            tracing::warn!(
                path = %device.path().display(),
                "size {raw_size} is not a multiple of the {align}-byte O_DIRECT block; serving {size_bytes} bytes"
            );
        }
        let zero_mode = match device.kind() {
            DeviceKind::RegularFile => libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            DeviceKind::BlockDevice => libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
        };
        let writable = nix::fcntl::fcntl(device.raw_fd(), nix::fcntl::FcntlArg::F_GETFL)
            .map(|fl| fl & libc::O_ACCMODE != libc::O_RDONLY)
            .unwrap_or(true);
        Target {
            path: device.path().to_path_buf(),
            size_bytes,
            align,
            zero_mode: Some(zero_mode),
            writable,
        }
    }
}

/// An engine's buffers must hold at least one logical block.
fn check_buffer(engine: &Engine, target: &Target) -> Result<()> {
    if engine.buffer_bytes() < target.align as usize {
        return Err(BlockError::InvalidConfig {
            reason: format!(
                "buffer_bytes {} is smaller than the {}-byte logical block of {}",
                engine.buffer_bytes(),
                target.align,
                target.path.display()
            ),
        });
    }
    Ok(())
}

/// The task that drives an [`IoService`] started with
/// [`IoService::start_on_runtime`]: spawn it on the runtime whose handles use
/// the service. It resolves once the service is shut down and every queued
/// request is answered, with the error that stopped the engine if one did.
#[must_use = "the I/O service serves nothing until its driver is spawned"]
pub struct Driver(std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + Send>>);

impl std::future::Future for Driver {
    type Output = Result<()>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<()>> {
        self.0.as_mut().poll(cx)
    }
}

impl IoService {
    /// Take ownership of `device` (opened read-write for writes and zeroes) and
    /// start the I/O thread with an [`Engine`] built from `cfg` and `pref`.
    /// `cfg.buffer_count` should be at least `cfg.queue_depth` (fewer buffers
    /// limit the operations in flight to the number of buffers).
    pub fn start(device: Device, cfg: &EngineConfig, pref: EnginePreference) -> Result<IoService> {
        cfg.validate()?;
        let target = Target::of(&device);
        let cfg = cfg.clone();
        Self::spawn(
            move |device: &Option<Device>| match device {
                Some(d) => new_engine(d, &cfg, pref),
                None => Err(BlockError::InvalidRequest {
                    reason: "no device".to_string(),
                }),
            },
            target,
            Some(device),
        )
    }

    /// Like [`IoService::start`], but with the io_uring engine driven by a task
    /// on the caller's tokio runtime: the returned [`Driver`] must be spawned
    /// (or otherwise polled) there; it ends once the service is shut down (or
    /// every handle dropped) and the requests already queued are answered.
    /// Returns no driver when the engine is the plain one (requested, or
    /// io_uring unavailable with [`EnginePreference::Auto`]): that engine
    /// blocks, so it gets a thread as with `start`.
    pub fn start_on_runtime(
        device: Device,
        cfg: &EngineConfig,
        pref: EnginePreference,
    ) -> Result<(IoService, Option<Driver>)> {
        cfg.validate()?;
        if pref == EnginePreference::Plain {
            return Ok((Self::start(device, cfg, pref)?, None));
        }
        let engine = match UringEngine::new(IoTarget::from_device(&device)?, cfg) {
            Ok(e) => e,
            Err(err @ BlockError::Uring { .. }) if pref == EnginePreference::Auto => {
                tracing::warn!(
                    path = %device.path().display(),
                    "io_uring unavailable, falling back to plain pread/pwrite on a thread: {err}"
                );
                return Ok((Self::start(device, cfg, EnginePreference::Plain)?, None));
            }
            Err(err) => return Err(err),
        };
        tracing::info!(path = %device.path().display(), "I/O service engine: io_uring on the runtime");
        let (svc, driver) = Self::spawn_on_runtime(engine, Target::of(&device), Some(device))?;
        Ok((svc, Some(driver)))
    }

    /// The runtime placement of `engine` serving `target`.
    fn spawn_on_runtime(
        mut engine: UringEngine,
        mut target: Target,
        device: Option<Device>,
    ) -> Result<(IoService, Driver)> {
        if !engine.has_fallocate() {
            target.zero_mode = None;
        }
        let eventfd = |source| BlockError::Open {
            path: PathBuf::from("eventfd"),
            source,
        };
        let completions = new_eventfd().map_err(eventfd)?;
        engine.register_eventfd(&completions)?;
        let engine = Engine::Uring(engine);
        check_buffer(&engine, &target)?;
        let notify = Arc::new(tokio::sync::Notify::new());
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            wake: new_eventfd().map_err(eventfd)?,
            notify: Some(notify.clone()),
        });
        let svc = IoService {
            inner: Arc::new(Inner {
                shared: Arc::clone(&shared),
                thread: Mutex::new(None),
                path: target.path.clone(),
                size_bytes: target.size_bytes,
                align: target.align,
                writable: target.writable,
                engine_name: engine.name(),
            }),
        };
        let worker = Worker::new(engine, target, shared, device);
        Ok((
            svc,
            Driver(Box::pin(worker.run_on_runtime(notify, completions))),
        ))
    }

    /// Start the I/O thread; it builds its engine with `make_engine` (so that an
    /// io_uring is created by, and bound to, the thread that uses it) and reports
    /// the outcome before `spawn` returns.
    fn spawn(
        make_engine: impl FnOnce(&Option<Device>) -> Result<Engine> + Send + 'static,
        mut target: Target,
        device: Option<Device>,
    ) -> Result<IoService> {
        let wake = new_eventfd().map_err(|source| BlockError::Open {
            path: PathBuf::from("eventfd"),
            source,
        })?;
        let wake_dup = wake.try_clone().map_err(|source| BlockError::Open {
            path: PathBuf::from("eventfd"),
            source,
        })?;
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            wake,
            notify: None,
        });
        let (path, size_bytes, align, writable) = (
            target.path.clone(),
            target.size_bytes,
            target.align,
            target.writable,
        );
        let (started_tx, started_rx) = std::sync::mpsc::sync_channel(1);
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("blkmirror-io".to_string())
            .spawn(move || {
                let engine = make_engine(&device).and_then(|mut engine| {
                    check_buffer(&engine, &target)?;
                    if let Engine::Uring(e) = &mut engine {
                        if !e.has_fallocate() {
                            target.zero_mode = None;
                        }
                        e.set_waker(OwnedFd::from(wake_dup))?;
                    }
                    Ok(engine)
                });
                let engine = match engine {
                    Ok(engine) => {
                        let _ = started_tx.send(Ok(engine.name()));
                        engine
                    }
                    Err(e) => {
                        let _ = started_tx.send(Err(e));
                        return Ok(());
                    }
                };
                Worker::new(engine, target, thread_shared, device).run()
            })
            .map_err(|e| BlockError::Uring {
                reason: format!("cannot start the I/O thread: {e}"),
            })?;
        let started = started_rx.recv().unwrap_or_else(|_| {
            Err(BlockError::Uring {
                reason: "the I/O thread died while starting".to_string(),
            })
        });
        let engine_name = match started {
            Ok(name) => name,
            Err(e) => {
                let _ = thread.join();
                return Err(e);
            }
        };
        Ok(IoService {
            inner: Arc::new(Inner {
                shared,
                thread: Mutex::new(Some(thread)),
                path,
                size_bytes,
                align,
                writable,
                engine_name,
            }),
        })
    }

    /// Bytes served (with O_DIRECT rounded down to the logical block size).
    pub fn size_bytes(&self) -> u64 {
        self.inner.size_bytes
    }

    /// Alignment that keeps requests on the fast path: the logical block size
    /// under O_DIRECT, 1 otherwise. Unaligned requests work, slower.
    pub fn logical_block_bytes(&self) -> u32 {
        self.inner.align
    }

    /// `"io_uring"` or `"plain"`.
    pub fn engine_name(&self) -> &'static str {
        self.inner.engine_name
    }

    /// The device or image path (for error messages).
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    fn check_range(&self, op: &'static str, offset: u64, len: u64) -> Result<()> {
        let size = self.inner.size_bytes;
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(BlockError::InvalidRequest {
                reason: format!(
                    "{op} at offset {offset} length {len} extends past the end of {} ({size} bytes)",
                    self.inner.path.display()
                ),
            });
        }
        Ok(())
    }

    fn check_len(&self, op: &'static str, len: usize) -> Result<()> {
        if len > MAX_IO_BYTES {
            return Err(BlockError::InvalidRequest {
                reason: format!("{op} length {len} exceeds the maximum of {MAX_IO_BYTES} bytes"),
            });
        }
        Ok(())
    }

    fn check_writable(&self, op: &'static str) -> Result<()> {
        if !self.inner.writable {
            return Err(BlockError::InvalidRequest {
                reason: format!("{op}: {} is open read-only", self.inner.path.display()),
            });
        }
        Ok(())
    }

    /// Read `len` bytes at `offset` (any alignment, at most [`MAX_IO_BYTES`]).
    pub async fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        self.check_len("read", len)?;
        self.check_range("read", offset, len as u64)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let (reply, rx) = oneshot::channel();
        if self
            .inner
            .shared
            .send(Request::Read { offset, len, reply })
            .is_err()
        {
            return Err(shut_down("read", offset, len as u64));
        }
        rx.await
            .unwrap_or_else(|_| Err(shut_down("read", offset, len as u64)))
    }

    /// Write `data` at `offset` (any alignment, at most [`MAX_IO_BYTES`]); with
    /// `fua` the data is durable when this returns.
    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<()> {
        let len = data.len();
        self.check_len("write", len)?;
        self.check_range("write", offset, len as u64)?;
        self.check_writable("write")?;
        if len == 0 {
            return Ok(());
        }
        let (reply, rx) = oneshot::channel();
        let req = Request::Write {
            offset,
            data,
            fua,
            reply,
        };
        if self.inner.shared.send(req).is_err() {
            return Err(shut_down("write", offset, len as u64));
        }
        rx.await
            .unwrap_or_else(|_| Err(shut_down("write", offset, len as u64)))
    }

    /// Make `[offset, offset + len)` read back as zeros (any alignment and
    /// length): files get a hole punched, block devices `BLKZEROOUT` semantics,
    /// with writes of zeros as the fallback. With `fua` it is durable on return.
    pub async fn zero(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.check_range("zero", offset, len)?;
        self.check_writable("zero")?;
        if len == 0 {
            return Ok(());
        }
        let (reply, rx) = oneshot::channel();
        let req = Request::Zero {
            offset,
            len,
            fua,
            reply,
        };
        if self.inner.shared.send(req).is_err() {
            return Err(shut_down("zero", offset, len));
        }
        rx.await
            .unwrap_or_else(|_| Err(shut_down("zero", offset, len)))
    }

    /// `fdatasync`: makes durable every write that completed before this call
    /// was made (it does not wait for writes still in flight).
    pub async fn flush(&self) -> Result<()> {
        let (reply, rx) = oneshot::channel();
        if self.inner.shared.send(Request::Flush { reply }).is_err() {
            return Err(shut_down("flush", 0, 0));
        }
        rx.await.unwrap_or_else(|_| Err(shut_down("flush", 0, 0)))
    }

    /// Refuse new requests (from every handle), let the thread finish the queued
    /// ones, and join it. Blocks the calling thread meanwhile (from async code,
    /// call it in `spawn_blocking`). Returns the thread's error if it failed.
    pub fn shutdown(self) -> Result<()> {
        self.inner.stop()
    }
}

impl Inner {
    fn stop(&self) -> Result<()> {
        let handle = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some(handle) = handle else {
            // Runtime placement (or already stopped): the driver finishes the
            // queued requests and ends on its own.
            self.shared.close();
            return Ok(());
        };
        self.shared.close();
        match handle.join() {
            Ok(result) => result,
            Err(_) => Err(BlockError::Uring {
                reason: format!("the I/O thread of {} panicked", self.path.display()),
            }),
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            tracing::error!(path = %self.path.display(), "I/O service: {e}");
        }
    }
}

/// [`Engine::new`] for the calling thread only: the io_uring variant uses
/// [`UringEngine::new_single_thread`]. Same preference and fallback rules.
fn new_engine(device: &Device, cfg: &EngineConfig, pref: EnginePreference) -> Result<Engine> {
    let path = device.path().display();
    match pref {
        EnginePreference::Plain => {
            tracing::info!(%path, "I/O service engine: plain (requested)");
            Ok(Engine::Plain(PlainEngine::new(
                IoTarget::from_device(device)?,
                cfg,
            )?))
        }
        EnginePreference::Uring => {
            let e = UringEngine::new_single_thread(IoTarget::from_device(device)?, cfg)?;
            tracing::info!(%path, "I/O service engine: io_uring (requested)");
            Ok(Engine::Uring(e))
        }
        EnginePreference::Auto => {
            match UringEngine::new_single_thread(IoTarget::from_device(device)?, cfg) {
                Ok(e) => {
                    tracing::info!(%path, "I/O service engine: io_uring (auto)");
                    Ok(Engine::Uring(e))
                }
                Err(err @ BlockError::Uring { .. }) => {
                    tracing::warn!(
                        %path,
                        "io_uring unavailable, falling back to plain pread/pwrite: {err}"
                    );
                    Ok(Engine::Plain(PlainEngine::new(
                        IoTarget::from_device(device)?,
                        cfg,
                    )?))
                }
                Err(err) => Err(err),
            }
        }
    }
}

/// A non-blocking eventfd.
fn new_eventfd() -> io::Result<File> {
    // SAFETY: eventfd(2) takes plain integers and returns a new descriptor or -1.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by eventfd(2), is open and owned by no one else.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

// ---------------------------------------------------------------------------
// The I/O thread.

/// A request being served.
struct Active {
    kind: ActiveKind,
    /// Absolute device range of the request.
    offset: u64,
    end: u64,
    /// Next device offset to cut an operation from.
    cursor: u64,
    /// A zero range whose fallocate was refused, to be written with zeros:
    /// `(next, end)`, aligned.
    redo: Option<(u64, u64)>,
    fua: bool,
    /// Issue an fdatasync once every operation is done (flush, FUA zero).
    needs_sync: bool,
    /// Segments created and not finished (in flight, ready or waiting for a lock).
    outstanding: u32,
    /// Present in the round-robin list.
    in_rr: bool,
    error: Option<BlockError>,
}

enum ActiveKind {
    Read {
        out: Vec<u8>,
        reply: oneshot::Sender<Result<Vec<u8>>>,
    },
    Write {
        data: Bytes,
        reply: oneshot::Sender<Result<()>>,
    },
    Zero {
        reply: oneshot::Sender<Result<()>>,
    },
    Flush {
        reply: oneshot::Sender<Result<()>>,
    },
}

impl Active {
    fn has_more(&self) -> bool {
        self.error.is_none() && (self.cursor < self.end || self.redo.is_some())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SegKind {
    /// Read `dev_len` bytes, copy `n` bytes from `skip` to the output at `data_pos`.
    Read,
    /// Copy `n` bytes of data from `data_pos` and write them (aligned).
    Write,
    /// Write `n` zero bytes (aligned).
    WriteZeros,
    /// Read the block under the per-block lock (first half of read-modify-write).
    RmwRead,
    /// Write the patched block back (second half).
    RmwWrite,
    /// fallocate(zero_mode) of `dev_len` bytes.
    Fallocate,
    /// fdatasync.
    Sync,
}

/// One engine operation of a request.
#[derive(Debug)]
struct Seg {
    req: u32,
    kind: SegKind,
    /// Device offset of the operation (aligned).
    dev_off: u64,
    /// Device bytes of the operation.
    dev_len: u64,
    /// Start of the request's bytes inside the buffer.
    skip: usize,
    /// Request bytes covered.
    n: usize,
    /// Position of those bytes in the request's data.
    data_pos: usize,
    buf: Option<BufId>,
}

impl SegKind {
    fn needs_buffer(self) -> bool {
        !matches!(self, SegKind::Fallocate | SegKind::Sync)
    }
}

struct Worker {
    engine: Engine,
    target: Target,
    shared: Arc<Shared>,
    /// Kept open (and closed) by the thread.
    _device: Option<Device>,
    align: u64,
    /// Largest aligned operation (one buffer, rounded down to `align`).
    chunk: u64,
    incoming: VecDeque<Request>,
    reqs: Vec<Option<Active>>,
    free_reqs: Vec<u32>,
    active: usize,
    max_active: usize,
    /// Requests that can still cut segments, served round-robin.
    rr: VecDeque<u32>,
    /// Segments ready to submit before any new one (RMW second halves, lock
    /// hand-overs, syncs).
    ready: VecDeque<Seg>,
    /// Segments in the engine, indexed by `user_data`.
    ops: Vec<Option<Seg>>,
    free_ops: Vec<u32>,
    /// Blocks (device offsets) owned by a read-modify-write.
    locked: HashSet<u64>,
    lock_waiters: HashMap<u64, VecDeque<Seg>>,
    closing: bool,
}

impl Drop for Worker {
    fn drop(&mut self) {
        // Also runs on panic: refuse further requests and answer the queued ones
        // (their reply senders are dropped, callers get ESHUTDOWN).
        let mut q = self.shared.lock();
        q.closed = true;
        q.items.clear();
    }
}

impl Worker {
    fn new(engine: Engine, target: Target, shared: Arc<Shared>, device: Option<Device>) -> Worker {
        let align = u64::from(target.align.max(1));
        let chunk = engine.buffer_bytes() as u64 / align * align;
        let qd = engine.queue_depth() as usize;
        Worker {
            align,
            chunk,
            incoming: VecDeque::new(),
            reqs: Vec::new(),
            free_reqs: Vec::new(),
            active: 0,
            max_active: qd * ACTIVE_PER_SLOT,
            rr: VecDeque::new(),
            ready: VecDeque::new(),
            ops: (0..qd).map(|_| None).collect(),
            free_ops: (0..qd as u32).rev().collect(),
            locked: HashSet::new(),
            lock_waiters: HashMap::new(),
            closing: false,
            engine,
            target,
            shared,
            _device: device,
        }
    }

    fn run(mut self) -> Result<()> {
        let mut woken = true;
        loop {
            {
                let mut q = self.shared.lock();
                if woken {
                    q.wake_pending = false;
                }
                self.incoming.append(&mut q.items);
                self.closing |= q.closed;
            }
            while self.active < self.max_active {
                let Some(req) = self.incoming.pop_front() else {
                    break;
                };
                self.activate(req);
            }
            self.issue();
            if self.engine.in_flight() == 0 {
                if self.closing && self.active == 0 && self.incoming.is_empty() {
                    return Ok(());
                }
                if self.active > 0 {
                    // Nothing in flight, so every buffer and slot is free: issue()
                    // cannot have stopped for lack of resources.
                    let e = BlockError::Uring {
                        reason: "I/O service stalled with work pending (bug)".to_string(),
                    };
                    self.fail_everything(&e);
                    return Err(e);
                }
            }
            let (completions, w) = match self.wait_or_wake() {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(path = %self.target.path.display(), "I/O thread stops: {e}");
                    self.fail_everything(&e);
                    return Err(e);
                }
            };
            woken = w;
            for c in completions {
                self.on_completion(c);
            }
        }
    }

    /// [`Worker::run`] for the runtime placement: the same steps, with the
    /// waiting done by the runtime. `completions` is the eventfd the ring
    /// signals on every completion; new requests arrive with `notify`.
    async fn run_on_runtime(
        mut self,
        notify: Arc<tokio::sync::Notify>,
        completions: File,
    ) -> Result<()> {
        // SAFETY: `completions` is an open eventfd owned by the `AsyncFd` for
        // its whole lifetime; nothing else closes or replaces its descriptor.
        let completions =
            unsafe { tokio::io::unix::AsyncFd::register(completions) }.map_err(|e| {
                BlockError::Uring {
                    reason: format!("cannot watch the completion eventfd: {}", e.into_parts().1),
                }
            })?;
        loop {
            // Armed before the queue is read: a request queued after that
            // read leaves a permit, so no wake-up is lost.
            let requested = notify.notified();
            tokio::pin!(requested);
            requested.as_mut().enable();
            {
                let mut q = self.shared.lock();
                q.wake_pending = false;
                self.incoming.append(&mut q.items);
                self.closing |= q.closed;
            }
            while self.active < self.max_active {
                let Some(req) = self.incoming.pop_front() else {
                    break;
                };
                self.activate(req);
            }
            self.issue();
            if let Err(e) = self.engine.flush() {
                tracing::error!(path = %self.target.path.display(), "I/O driver stops: {e}");
                self.fail_everything(&e);
                return Err(e);
            }
            if self.engine.in_flight() == 0 {
                if self.closing && self.active == 0 && self.incoming.is_empty() {
                    return Ok(());
                }
                if self.active > 0 {
                    let e = BlockError::Uring {
                        reason: "I/O service stalled with work pending (bug)".to_string(),
                    };
                    self.fail_everything(&e);
                    return Err(e);
                }
            }
            tokio::select! {
                biased;
                ready = completions.readable() => match ready {
                    Ok(mut guard) => {
                        // Reset the counter, then the readiness: a completion
                        // posted after the read signals the eventfd again.
                        let mut value = [0u8; 8];
                        let _ = guard.get_inner().read(&mut value);
                        guard.clear_ready();
                    }
                    Err(source) => {
                        let e = BlockError::Io { op: "epoll(completion eventfd)", offset: 0, len: 0, source };
                        self.fail_everything(&e);
                        return Err(e);
                    }
                },
                _ = &mut requested => {}
            }
            // Does not block: with nothing to submit and no minimum it only
            // copies out the completions already posted.
            let done = match self.engine.wait(0) {
                Ok(done) => done,
                Err(e) => {
                    tracing::error!(path = %self.target.path.display(), "I/O driver stops: {e}");
                    self.fail_everything(&e);
                    return Err(e);
                }
            };
            for c in done {
                self.on_completion(c);
            }
        }
    }

    /// Sleep until an operation completes or a request arrives.
    fn wait_or_wake(&mut self) -> Result<(Vec<Completion>, bool)> {
        match &mut self.engine {
            Engine::Uring(e) => e.wait_or_wake(),
            Engine::Plain(e) => {
                if e.in_flight() > 0 {
                    return Ok((e.wait(0)?, false));
                }
                let mut value = [0u8; 8];
                loop {
                    match (&self.shared.wake).read(&mut value) {
                        Ok(_) => return Ok((Vec::new(), true)),
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(source) => {
                            return Err(BlockError::Io {
                                op: "read(eventfd)",
                                offset: 0,
                                len: 8,
                                source,
                            })
                        }
                    }
                    let mut pfd = libc::pollfd {
                        fd: self.shared.wake.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: `pfd` is one valid pollfd naming the open eventfd
                    // (owned by `self.shared`), and the count passed is 1.
                    let rc = unsafe { libc::poll(&mut pfd, 1, -1) };
                    if rc < 0 {
                        let source = io::Error::last_os_error();
                        if source.kind() != io::ErrorKind::Interrupted {
                            return Err(BlockError::Io {
                                op: "poll(eventfd)",
                                offset: 0,
                                len: 0,
                                source,
                            });
                        }
                    }
                }
            }
        }
    }

    /// Answer every request with an error (the thread is about to stop).
    fn fail_everything(&mut self, why: &BlockError) {
        let err = || BlockError::Uring {
            reason: format!(
                "I/O thread of {} stopped: {why}",
                self.target.path.display()
            ),
        };
        for slot in &mut self.reqs {
            if let Some(mut r) = slot.take() {
                r.error = Some(err());
                reply(r);
            }
        }
        let mut q = self.shared.lock();
        q.closed = true;
        q.items.clear();
        self.incoming.clear();
    }

    fn activate(&mut self, req: Request) {
        let size = self.target.size_bytes;
        let in_range = |offset: u64, len: u64| offset.checked_add(len).is_some_and(|e| e <= size);
        let (kind, offset, len, fua) = match req {
            Request::Read { offset, len, reply } => {
                // Checked by the handle; asserted again at the trust boundary.
                if !in_range(offset, len as u64) || len > MAX_IO_BYTES {
                    let _ = reply.send(Err(self.out_of_range("read", offset, len as u64)));
                    return;
                }
                let out = vec![0u8; len];
                (ActiveKind::Read { out, reply }, offset, len as u64, false)
            }
            Request::Write {
                offset,
                data,
                fua,
                reply,
            } => {
                let len = data.len() as u64;
                if !in_range(offset, len) || data.len() > MAX_IO_BYTES {
                    let _ = reply.send(Err(self.out_of_range("write", offset, len)));
                    return;
                }
                (ActiveKind::Write { data, reply }, offset, len, fua)
            }
            Request::Zero {
                offset,
                len,
                fua,
                reply,
            } => {
                if !in_range(offset, len) {
                    let _ = reply.send(Err(self.out_of_range("zero", offset, len)));
                    return;
                }
                (ActiveKind::Zero { reply }, offset, len, fua)
            }
            Request::Flush { reply } => (ActiveKind::Flush { reply }, 0, 0, false),
        };
        let needs_sync = match kind {
            ActiveKind::Flush { .. } => true,
            ActiveKind::Zero { .. } => fua,
            _ => false,
        };
        let active = Active {
            kind,
            offset,
            end: offset + len,
            cursor: offset,
            redo: None,
            fua,
            needs_sync,
            outstanding: 0,
            in_rr: len > 0,
            error: None,
        };
        let id = match self.free_reqs.pop() {
            Some(id) => {
                self.reqs[id as usize] = Some(active);
                id
            }
            None => {
                self.reqs.push(Some(active));
                (self.reqs.len() - 1) as u32
            }
        };
        self.active += 1;
        if len > 0 {
            self.rr.push_back(id);
        } else {
            self.maybe_finish(id);
        }
    }

    fn out_of_range(&self, op: &str, offset: u64, len: u64) -> BlockError {
        BlockError::InvalidRequest {
            reason: format!(
                "{op} at offset {offset} length {len} extends past the end of {} ({} bytes)",
                self.target.path.display(),
                self.target.size_bytes
            ),
        }
    }

    fn req(&mut self, id: u32) -> Option<&mut Active> {
        self.reqs.get_mut(id as usize).and_then(Option::as_mut)
    }

    fn has_slot(&self) -> bool {
        self.engine.in_flight() < self.engine.queue_depth() as usize && !self.free_ops.is_empty()
    }

    /// Submit as many operations as slots and buffers allow.
    fn issue(&mut self) {
        // 1. Segments already cut (they own their block lock, if any).
        while self.has_slot() {
            let Some(seg) = self.ready.pop_front() else {
                break;
            };
            let mut seg = seg;
            if seg.kind.needs_buffer() && seg.buf.is_none() {
                match self.engine.acquire() {
                    Some(b) => seg.buf = Some(b),
                    None => {
                        self.ready.push_front(seg);
                        return;
                    }
                }
            }
            self.submit(seg);
        }
        // 2. New segments, one per request in turn.
        while self.has_slot() {
            let Some(id) = self.rr.pop_front() else {
                break;
            };
            let Some(buf) = self.engine.acquire() else {
                self.rr.push_front(id);
                return;
            };
            let Some(seg) = self.next_seg(id) else {
                self.engine.release(buf);
                if let Some(r) = self.req(id) {
                    r.in_rr = false;
                }
                self.maybe_finish(id);
                continue;
            };
            let more = self.req(id).is_some_and(|r| r.has_more());
            if more {
                self.rr.push_back(id);
            } else if let Some(r) = self.req(id) {
                r.in_rr = false;
            }
            self.start(seg, buf);
        }
    }

    /// Cut the next segment of request `id` (advancing its cursor).
    fn next_seg(&mut self, id: u32) -> Option<Seg> {
        let align = self.align;
        let chunk = self.chunk;
        let zero_mode = self.target.zero_mode;
        let r = self.reqs.get_mut(id as usize)?.as_mut()?;
        if r.error.is_some() {
            return None;
        }
        let seg = |kind, dev_off: u64, dev_len: u64, skip: u64, n: u64, pos: u64| Seg {
            req: id,
            kind,
            dev_off,
            dev_len,
            skip: skip as usize,
            n: n as usize,
            data_pos: pos as usize,
            buf: None,
        };
        if let Some((next, end)) = r.redo {
            let n = (end - next).min(chunk);
            r.redo = (next + n < end).then_some((next + n, end));
            r.outstanding += 1;
            return Some(seg(SegKind::WriteZeros, next, n, 0, n, next - r.offset));
        }
        if r.cursor >= r.end {
            return None;
        }
        let p = r.cursor;
        let end = r.end;
        let pos = p - r.offset;
        let out = match r.kind {
            ActiveKind::Flush { .. } => return None,
            ActiveKind::Read { .. } => {
                let a = p / align * align;
                let covering_end = end.div_ceil(align) * align;
                let op_end = covering_end.min(a + chunk);
                let n = end.min(op_end) - p;
                r.cursor = p + n;
                seg(SegKind::Read, a, op_end - a, p - a, n, pos)
            }
            ActiveKind::Write { .. } | ActiveKind::Zero { .. } => {
                let is_zero = matches!(r.kind, ActiveKind::Zero { .. });
                if p % align != 0 || end - p < align {
                    // Partial block: read-modify-write of the one covering block.
                    let b = p / align * align;
                    let n = end.min(b + align) - p;
                    r.cursor = p + n;
                    seg(SegKind::RmwRead, b, align, p - b, n, pos)
                } else {
                    let q = end / align * align;
                    match (is_zero, zero_mode) {
                        (true, Some(_)) => {
                            r.cursor = q;
                            seg(SegKind::Fallocate, p, q - p, 0, q - p, pos)
                        }
                        (true, None) => {
                            let n = (q - p).min(chunk);
                            r.cursor = p + n;
                            seg(SegKind::WriteZeros, p, n, 0, n, pos)
                        }
                        (false, _) => {
                            let n = (q - p).min(chunk);
                            r.cursor = p + n;
                            seg(SegKind::Write, p, n, 0, n, pos)
                        }
                    }
                }
            }
        };
        r.outstanding += 1;
        Some(out)
    }

    /// Start a freshly cut segment with `buf` (released if not needed).
    fn start(&mut self, mut seg: Seg, buf: BufId) {
        if seg.kind == SegKind::RmwRead {
            if self.locked.contains(&seg.dev_off) {
                self.engine.release(buf);
                self.lock_waiters
                    .entry(seg.dev_off)
                    .or_default()
                    .push_back(seg);
                return;
            }
            self.locked.insert(seg.dev_off);
        }
        if seg.kind.needs_buffer() {
            seg.buf = Some(buf);
        } else {
            self.engine.release(buf);
        }
        self.submit(seg);
    }

    /// Hand a segment to the engine (a slot is free; the buffer is attached).
    fn submit(&mut self, seg: Seg) {
        let Some(r) = self.reqs.get(seg.req as usize).and_then(Option::as_ref) else {
            return self.seg_finished(seg, Ok(()));
        };
        if r.error.is_some() {
            // The request already failed: skip the rest of its work.
            return self.seg_finished(seg, Ok(()));
        }
        let dsync = r.fua && matches!(r.kind, ActiveKind::Write { .. });
        let Some(ud) = self.free_ops.pop() else {
            let e = BlockError::QueueFull {
                depth: self.engine.queue_depth(),
            };
            return self.seg_finished(seg, Err(e));
        };
        let result = match (seg.kind, seg.buf) {
            (SegKind::Read | SegKind::RmwRead, Some(b)) => {
                self.engine
                    .submit_read(b, seg.dev_off, seg.dev_len as usize, u64::from(ud))
            }
            (SegKind::Write, Some(b)) => {
                if let ActiveKind::Write { data, .. } = &r.kind {
                    let src = &data[seg.data_pos..seg.data_pos + seg.n];
                    self.engine.buf_mut(b)[..seg.n].copy_from_slice(src);
                }
                submit_write(&mut self.engine, b, seg.dev_off, seg.n, ud, dsync)
            }
            (SegKind::WriteZeros, Some(b)) => {
                self.engine.buf_mut(b)[..seg.n].fill(0);
                submit_write(&mut self.engine, b, seg.dev_off, seg.n, ud, dsync)
            }
            (SegKind::RmwWrite, Some(b)) => submit_write(
                &mut self.engine,
                b,
                seg.dev_off,
                seg.dev_len as usize,
                ud,
                dsync,
            ),
            (SegKind::Fallocate, _) => match (&mut self.engine, self.target.zero_mode) {
                (Engine::Uring(e), Some(mode)) => {
                    e.submit_fallocate(seg.dev_off, seg.dev_len, mode, u64::from(ud))
                }
                (Engine::Plain(e), Some(mode)) => {
                    e.submit_fallocate(seg.dev_off, seg.dev_len, mode, u64::from(ud))
                }
                (_, None) => {
                    // Disabled since this segment was cut: write zeros instead.
                    self.free_ops.push(ud);
                    return self.redo_as_writes(seg);
                }
            },
            (SegKind::Sync, _) => match &mut self.engine {
                Engine::Uring(e) => e.submit_datasync(u64::from(ud)),
                Engine::Plain(e) => e.submit_datasync(u64::from(ud)),
            },
            (_, None) => Err(BlockError::NoBuffer),
        };
        match result {
            Ok(()) => self.ops[ud as usize] = Some(seg),
            Err(e) => {
                self.free_ops.push(ud);
                self.seg_finished(seg, Err(e));
            }
        }
    }

    fn on_completion(&mut self, c: Completion) {
        let Some(seg) = usize::try_from(c.user_data)
            .ok()
            .and_then(|i| self.ops.get_mut(i))
            .and_then(Option::take)
        else {
            tracing::warn!(
                user_data = c.user_data,
                "completion of an unknown operation ignored"
            );
            if let Some(b) = c.buf {
                self.engine.release(b);
            }
            return;
        };
        self.free_ops.push(c.user_data as u32);
        let result = c.result.map(|_| ());
        match (seg.kind, result) {
            (SegKind::Read, Ok(())) => {
                if let (Some(b), Some(r)) = (seg.buf, self.reqs[seg.req as usize].as_mut()) {
                    if let ActiveKind::Read { out, .. } = &mut r.kind {
                        let src = &self.engine.buf(b)[seg.skip..seg.skip + seg.n];
                        out[seg.data_pos..seg.data_pos + seg.n].copy_from_slice(src);
                    }
                }
                self.seg_finished(seg, Ok(()));
            }
            (SegKind::RmwRead, Ok(())) => self.patch_and_write(seg),
            (SegKind::Fallocate, Err(BlockError::Io { source, .. }))
                if matches!(source.raw_os_error(), Some(libc::EOPNOTSUPP | libc::ENOSYS)) =>
            {
                tracing::info!(
                    path = %self.target.path.display(),
                    "fallocate mode unsupported ({source}); zeroing by writing zeros from now on"
                );
                self.target.zero_mode = None;
                self.redo_as_writes(seg);
            }
            (_, result) => self.seg_finished(seg, result),
        }
    }

    /// A fallocate segment that cannot be done: its range is written with zeros.
    fn redo_as_writes(&mut self, seg: Seg) {
        let (start, end) = (seg.dev_off, seg.dev_off + seg.dev_len);
        let id = seg.req;
        if let Some(r) = self.req(id) {
            r.redo = Some((start, end));
            if !r.in_rr {
                r.in_rr = true;
                self.rr.push_back(id);
            }
        }
        self.seg_finished(seg, Ok(()));
    }

    /// First half of a read-modify-write done: patch the block, queue the write.
    fn patch_and_write(&mut self, mut seg: Seg) {
        let Some(b) = seg.buf else {
            return self.seg_finished(seg, Err(BlockError::NoBuffer));
        };
        let Some(r) = self.reqs.get(seg.req as usize).and_then(Option::as_ref) else {
            return self.seg_finished(seg, Ok(()));
        };
        let dst = &mut self.engine.buf_mut(b)[seg.skip..seg.skip + seg.n];
        match &r.kind {
            ActiveKind::Write { data, .. } => {
                dst.copy_from_slice(&data[seg.data_pos..seg.data_pos + seg.n])
            }
            _ => dst.fill(0),
        }
        seg.kind = SegKind::RmwWrite;
        // Ahead of everything else: it holds a buffer and a block lock.
        self.ready.push_front(seg);
    }

    /// A segment is over (done, failed or skipped): free its resources and
    /// account for it in its request.
    fn seg_finished(&mut self, seg: Seg, result: Result<()>) {
        if let Some(b) = seg.buf {
            self.engine.release(b);
        }
        if matches!(seg.kind, SegKind::RmwRead | SegKind::RmwWrite) {
            self.unlock(seg.dev_off);
        }
        let id = seg.req;
        if let Some(r) = self.req(id) {
            r.outstanding -= 1;
            if let Err(e) = result {
                if r.error.is_none() {
                    r.error = Some(e);
                }
            }
        }
        self.maybe_finish(id);
    }

    /// Release a block lock, handing it to the first waiter if any.
    fn unlock(&mut self, block: u64) {
        let next = self
            .lock_waiters
            .get_mut(&block)
            .and_then(VecDeque::pop_front);
        match next {
            Some(seg) => {
                if self
                    .lock_waiters
                    .get(&block)
                    .is_some_and(VecDeque::is_empty)
                {
                    self.lock_waiters.remove(&block);
                }
                // The lock stays taken, now on behalf of `seg`.
                self.ready.push_back(seg);
            }
            None => {
                self.locked.remove(&block);
            }
        }
    }

    /// Reply to request `id` if all its work is done (or queue its final sync).
    fn maybe_finish(&mut self, id: u32) {
        let Some(r) = self.req(id) else {
            return;
        };
        if r.outstanding > 0 || r.in_rr || r.has_more() {
            return;
        }
        if r.error.is_none() && r.needs_sync {
            r.needs_sync = false;
            r.outstanding += 1;
            self.ready.push_back(Seg {
                req: id,
                kind: SegKind::Sync,
                dev_off: 0,
                dev_len: 0,
                skip: 0,
                n: 0,
                data_pos: 0,
                buf: None,
            });
            return;
        }
        let Some(r) = self.reqs[id as usize].take() else {
            return;
        };
        self.free_reqs.push(id);
        self.active -= 1;
        reply(r);
    }
}

fn submit_write(
    engine: &mut Engine,
    buf: BufId,
    offset: u64,
    len: usize,
    ud: u32,
    dsync: bool,
) -> Result<()> {
    let ud = u64::from(ud);
    match engine {
        Engine::Uring(e) => e.submit_rw_dsync(OpKind::Write, buf, offset, len, ud, dsync),
        Engine::Plain(e) => e.submit_rw_dsync(OpKind::Write, buf, offset, len, ud, dsync),
    }
}

/// Send a finished request's result.
fn reply(r: Active) {
    let err = r.error;
    // A caller that dropped its future has no receiver: ignore send errors.
    match r.kind {
        ActiveKind::Read { out, reply } => {
            let _ = reply.send(match err {
                Some(e) => Err(e),
                None => Ok(out),
            });
        }
        ActiveKind::Write { reply, .. }
        | ActiveKind::Zero { reply }
        | ActiveKind::Flush { reply } => {
            let _ = reply.send(err.map_or(Ok(()), Err));
        }
    }
}

#[cfg(test)]
#[path = "service_tests.rs"]
mod tests;
