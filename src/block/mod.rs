//! Block-device / image-file access with a pluggable asynchronous I/O engine.
//!
//! # Design
//!
//! * [`Device`] wraps an opened block device or regular (image) file. It knows its
//!   kind, size and logical block size, whether `O_DIRECT` is in effect, and offers
//!   the slow-path helpers (sparse-file [`Device::data_ranges`], [`Device::zero_range`],
//!   [`Device::set_len`], [`Device::sync_all`]).
//! * [`Engine`] performs the bulk reads and writes. It is an enum over two
//!   implementations with the same API:
//!   - [`UringEngine`]: one `io_uring` of `queue_depth` entries, `ReadFixed` /
//!     `WriteFixed` on registered buffers, `Fsync`. Requests are pushed to the
//!     submission queue and the `io_uring_enter` syscall is batched: it happens in
//!     [`Engine::wait`], [`Engine::flush`] or when the submission queue is full.
//!   - [`PlainEngine`]: synchronous `pread`/`pwrite`/`fsync` performed at submit
//!     time; the completion is queued and handed back by the next [`Engine::wait`].
//!
//!   [`Engine::new`] with [`EnginePreference::Auto`] probes io_uring (ring creation,
//!   opcode probe, buffer registration) and falls back to the plain engine, logging
//!   why. The engine holds its own duplicate of the device's file descriptor, so it
//!   does not borrow the [`Device`].
//! * Buffers: the engine allocates `buffer_count` buffers of `buffer_bytes` bytes
//!   (4096-aligned, zero-initialised) once, in [`Engine::new`]; nothing is allocated
//!   per operation except the `Vec` returned by [`Engine::wait`]. Ownership is
//!   handed out and back explicitly:
//!   [`Engine::acquire`] → (fill via [`Engine::buf_mut`]) → `submit_*` → the buffer
//!   is *in flight* and inaccessible → [`Engine::wait`] returns a [`Completion`]
//!   naming it → the caller owns it again (read it, resubmit it) →
//!   [`Engine::release`] returns it to the pool.
//! * At most `queue_depth` operations may be in flight (submitted and not yet
//!   returned by `wait`); a further `submit_*` fails with [`BlockError::QueueFull`]
//!   and the caller must `wait` first.
//! * Short reads/writes are resubmitted transparently for the remainder; a read that
//!   hits end-of-file yields [`BlockError::UnexpectedEof`]. A successful
//!   [`Completion`] always carries the full requested length.

mod buffers;
mod device;
mod plain;
mod service;
mod uring;

#[cfg(test)]
mod tests;

use std::io;
use std::path::PathBuf;

pub use device::{Device, DeviceKind, DirectIo, OpenOptions};
pub use plain::PlainEngine;
pub use service::{error_errno, Driver, IoService, MAX_IO_BYTES};
pub use uring::UringEngine;

/// Errors of the block layer. Messages name the path, operation and offset involved.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("cannot open {}: {source}", path.display())]
    Open { path: PathBuf, source: io::Error },
    #[error("{} is neither a block device nor a regular file", path.display())]
    NotBlockOrFile { path: PathBuf },
    #[error("{} is not a regular file (operation {op} needs one)", path.display())]
    NotRegularFile { path: PathBuf, op: &'static str },
    #[error("O_DIRECT is not supported for {}", path.display())]
    DirectUnsupported { path: PathBuf },
    #[error("{op} on {} failed: {source}", path.display())]
    Ioctl {
        path: PathBuf,
        op: &'static str,
        source: io::Error,
    },
    #[error("{op} at offset {offset} (length {len}) failed: {source}")]
    Io {
        op: &'static str,
        offset: u64,
        len: usize,
        source: io::Error,
    },
    #[error("unexpected end of file reading at offset {offset} ({remaining} bytes still missing)")]
    UnexpectedEof { offset: u64, remaining: usize },
    #[error("io_uring: {reason}")]
    Uring { reason: String },
    #[error("{op} at offset {offset} length {len} is not aligned to the {align}-byte logical block size required by O_DIRECT")]
    Unaligned {
        op: &'static str,
        offset: u64,
        len: u64,
        align: u32,
    },
    #[error("no free buffer")]
    NoBuffer,
    #[error("buffer {id}: {reason}")]
    BadBuffer { id: u32, reason: &'static str },
    #[error("invalid request: {reason}")]
    InvalidRequest { reason: String },
    #[error("invalid engine configuration: {reason}")]
    InvalidConfig { reason: String },
    #[error("queue full: {depth} operations already in flight; wait() for completions first")]
    QueueFull { depth: u32 },
    #[error("cannot allocate {bytes} bytes of I/O buffers")]
    OutOfMemory { bytes: usize },
}

pub type Result<T> = std::result::Result<T, BlockError>;

/// Handle of one preallocated, 4096-aligned I/O buffer owned by an [`Engine`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BufId(pub u32);

/// Which I/O engine to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EnginePreference {
    /// io_uring if it works here, else the plain engine (with a warning).
    Auto,
    /// io_uring or an error.
    Uring,
    /// Synchronous pread/pwrite.
    Plain,
}

/// Engine sizing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineConfig {
    /// Maximum number of operations in flight (1..=4096). Default 32.
    pub queue_depth: u32,
    /// Size of each buffer: a non-zero multiple of 4096, at most 1 GiB. Default 1 MiB.
    pub buffer_bytes: usize,
    /// Number of buffers (1..=16384). Default 32.
    pub buffer_count: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            queue_depth: 32,
            buffer_bytes: 1 << 20,
            buffer_count: 32,
        }
    }
}

/// Alignment (and granularity) of every buffer.
pub const BUFFER_ALIGN: usize = 4096;
const MAX_QUEUE_DEPTH: u32 = 4096;
const MAX_BUFFER_BYTES: usize = 1 << 30;
const MAX_BUFFER_COUNT: usize = 1 << 14;

impl EngineConfig {
    fn validate(&self) -> Result<()> {
        let bad = |reason: String| Err(BlockError::InvalidConfig { reason });
        if self.queue_depth == 0 || self.queue_depth > MAX_QUEUE_DEPTH {
            return bad(format!(
                "queue_depth {} must be in 1..={MAX_QUEUE_DEPTH}",
                self.queue_depth
            ));
        }
        if self.buffer_bytes == 0
            || self.buffer_bytes % BUFFER_ALIGN != 0
            || self.buffer_bytes > MAX_BUFFER_BYTES
        {
            return bad(format!(
                "buffer_bytes {} must be a non-zero multiple of {BUFFER_ALIGN} and at most {MAX_BUFFER_BYTES}",
                self.buffer_bytes
            ));
        }
        if self.buffer_count == 0 || self.buffer_count > MAX_BUFFER_COUNT {
            return bad(format!(
                "buffer_count {} must be in 1..={MAX_BUFFER_COUNT}",
                self.buffer_count
            ));
        }
        if self.buffer_bytes.checked_mul(self.buffer_count).is_none() {
            return bad("buffer_bytes * buffer_count overflows".to_string());
        }
        Ok(())
    }
}

/// Result of one submitted operation.
#[derive(Debug)]
pub struct Completion {
    /// The value passed to `submit_*`.
    pub user_data: u64,
    /// The buffer of a read/write (owned by the caller again); `None` for fsync.
    pub buf: Option<BufId>,
    /// Bytes transferred — always the full requested length on `Ok` (0 for fsync).
    pub result: Result<usize>,
}

/// The I/O engine: io_uring or plain synchronous syscalls, same API.
// The io_uring variant is a few hundred bytes bigger; an engine is created once and
// not moved around in hot paths, so boxing it would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum Engine {
    Uring(UringEngine),
    Plain(PlainEngine),
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("name", &self.name())
            .field("queue_depth", &self.queue_depth())
            .field("buffer_bytes", &self.buffer_bytes())
            .field("in_flight", &self.in_flight())
            .finish()
    }
}

macro_rules! dispatch {
    ($self:expr, $e:ident => $body:expr) => {
        match $self {
            Engine::Uring($e) => $body,
            Engine::Plain($e) => $body,
        }
    };
}

impl Engine {
    /// Create an engine for `device`, allocating all buffers.
    ///
    /// `Auto` probes io_uring (ring creation, opcodes Read/Write/ReadFixed/WriteFixed/
    /// Fsync, buffer registration) and falls back to the plain engine with a
    /// `warn!` naming the reason; `Uring` returns [`BlockError::Uring`] instead.
    pub fn new(device: &Device, cfg: &EngineConfig, pref: EnginePreference) -> Result<Engine> {
        cfg.validate()?;
        let target = IoTarget::from_device(device)?;
        match pref {
            EnginePreference::Plain => {
                tracing::info!(path = %device.path().display(), "I/O engine: plain (requested)");
                Ok(Engine::Plain(PlainEngine::new(target, cfg)?))
            }
            EnginePreference::Uring => {
                let e = UringEngine::new(target, cfg)?;
                tracing::info!(path = %device.path().display(), "I/O engine: io_uring (requested)");
                Ok(Engine::Uring(e))
            }
            EnginePreference::Auto => match UringEngine::new(target, cfg) {
                Ok(e) => {
                    tracing::info!(path = %device.path().display(), "I/O engine: io_uring (auto: probe succeeded)");
                    Ok(Engine::Uring(e))
                }
                Err(err @ BlockError::Uring { .. }) => {
                    tracing::warn!(
                        path = %device.path().display(),
                        "io_uring unavailable, falling back to plain pread/pwrite: {err}"
                    );
                    let target = IoTarget::from_device(device)?;
                    tracing::info!(path = %device.path().display(), "I/O engine: plain (auto: io_uring unavailable)");
                    Ok(Engine::Plain(PlainEngine::new(target, cfg)?))
                }
                Err(err) => Err(err),
            },
        }
    }

    /// `"io_uring"` or `"plain"`.
    pub fn name(&self) -> &'static str {
        match self {
            Engine::Uring(_) => "io_uring",
            Engine::Plain(_) => "plain",
        }
    }

    /// A free buffer (now owned by the caller), or `None` if all are in use.
    pub fn acquire(&mut self) -> Option<BufId> {
        dispatch!(self, e => e.pool.acquire())
    }

    /// Return a caller-owned buffer to the pool. Releasing an unknown, free or
    /// in-flight buffer is ignored (with a warning).
    pub fn release(&mut self, buf: BufId) {
        dispatch!(self, e => e.pool.release(buf))
    }

    /// The whole buffer (`buffer_bytes` long). Returns an empty slice if `buf` is not
    /// a buffer currently owned by the caller (unknown, free, or in flight).
    pub fn buf(&self, buf: BufId) -> &[u8] {
        self.try_buf(buf).unwrap_or(&[])
    }

    /// Mutable access to the whole buffer; empty slice under the same conditions as [`Engine::buf`].
    pub fn buf_mut(&mut self, buf: BufId) -> &mut [u8] {
        dispatch!(self, e => e.pool.slice_mut(buf).unwrap_or(&mut []))
    }

    /// Like [`Engine::buf`] but `None` instead of an empty slice.
    pub fn try_buf(&self, buf: BufId) -> Option<&[u8]> {
        dispatch!(self, e => e.pool.slice(buf))
    }

    /// Size of every buffer.
    pub fn buffer_bytes(&self) -> usize {
        dispatch!(self, e => e.pool.buffer_bytes())
    }

    /// Number of buffers.
    pub fn buffer_count(&self) -> usize {
        dispatch!(self, e => e.pool.count())
    }

    /// Queue a read of `len` bytes at `offset` into the start of `buf`.
    ///
    /// `buf` must be owned by the caller (acquired, not in flight) and
    /// `0 < len <= buffer_bytes`. With `O_DIRECT`, `offset` and `len` must be
    /// multiples of the logical block size ([`BlockError::Unaligned`]). Fails with
    /// [`BlockError::QueueFull`] when `queue_depth` operations are in flight.
    pub fn submit_read(
        &mut self,
        buf: BufId,
        offset: u64,
        len: usize,
        user_data: u64,
    ) -> Result<()> {
        dispatch!(self, e => e.submit_rw(OpKind::Read, buf, offset, len, user_data))
    }

    /// Queue a write of the first `len` bytes of `buf` at `offset`; same rules as [`Engine::submit_read`].
    pub fn submit_write(
        &mut self,
        buf: BufId,
        offset: u64,
        len: usize,
        user_data: u64,
    ) -> Result<()> {
        dispatch!(self, e => e.submit_rw(OpKind::Write, buf, offset, len, user_data))
    }

    /// Queue an fsync. It makes durable every write that *completed* (was returned
    /// by `wait`) before it was submitted: callers wait for their writes first.
    /// (The io_uring engine additionally drains earlier submissions before it.)
    pub fn submit_fsync(&mut self, user_data: u64) -> Result<()> {
        dispatch!(self, e => e.submit_fsync(user_data))
    }

    /// Start any queued-but-not-yet-submitted operations without waiting.
    pub fn flush(&mut self) -> Result<()> {
        dispatch!(self, e => e.flush())
    }

    /// Wait until at least `min` completions are available (`min` is clamped to
    /// [`Engine::in_flight`]) and return all available ones. `wait(0)` never blocks.
    pub fn wait(&mut self, min: usize) -> Result<Vec<Completion>> {
        dispatch!(self, e => e.wait(min))
    }

    /// Operations submitted and not yet returned by `wait`.
    pub fn in_flight(&self) -> usize {
        dispatch!(self, e => e.in_flight())
    }

    /// Maximum operations in flight.
    pub fn queue_depth(&self) -> u32 {
        dispatch!(self, e => e.queue_depth())
    }
}

/// Read or write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum OpKind {
    Read,
    Write,
}

impl OpKind {
    pub(crate) fn name(self) -> &'static str {
        match self {
            OpKind::Read => "read",
            OpKind::Write => "write",
        }
    }
}

/// What an engine needs to know about the device: its own fd, O_DIRECT, alignment.
pub(crate) struct IoTarget {
    pub(crate) file: std::fs::File,
    pub(crate) direct: bool,
    pub(crate) align: u32,
}

impl IoTarget {
    fn from_device(device: &Device) -> Result<IoTarget> {
        let file = device
            .file()
            .try_clone()
            .map_err(|source| BlockError::Open {
                path: device.path().to_path_buf(),
                source,
            })?;
        Ok(IoTarget {
            file,
            direct: device.is_direct(),
            align: device.logical_block_bytes(),
        })
    }

    /// Common argument checks for `submit_read` / `submit_write`.
    pub(crate) fn check_rw(
        &self,
        kind: OpKind,
        offset: u64,
        len: usize,
        buffer_bytes: usize,
    ) -> Result<()> {
        if len == 0 || len > buffer_bytes {
            return Err(BlockError::InvalidRequest {
                reason: format!(
                    "{} length {len} must be in 1..={buffer_bytes} (buffer size)",
                    kind.name()
                ),
            });
        }
        if offset
            .checked_add(len as u64)
            .is_none_or(|end| end > i64::MAX as u64)
        {
            return Err(BlockError::InvalidRequest {
                reason: format!(
                    "{} offset {offset} + length {len} out of range",
                    kind.name()
                ),
            });
        }
        if self.direct {
            let a = u64::from(self.align.max(1));
            if offset % a != 0 || len as u64 % a != 0 {
                return Err(BlockError::Unaligned {
                    op: kind.name(),
                    offset,
                    len: len as u64,
                    align: self.align,
                });
            }
        }
        Ok(())
    }
}

/// Maximum consecutive EINTR/EAGAIN retries of one operation before giving up.
pub(crate) const MAX_RETRIES: u32 = 10_000;
