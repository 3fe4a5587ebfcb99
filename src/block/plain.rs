//! Synchronous engine: `pread`/`pwrite`/`fsync` at submit time, completions queued
//! for the next `wait`.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use nix::errno::Errno;

use super::buffers::BufferPool;
use super::{BlockError, BufId, Completion, EngineConfig, IoTarget, OpKind, Result, MAX_RETRIES};

/// The fallback engine. See the [module docs](super).
pub struct PlainEngine {
    pub(crate) pool: BufferPool,
    target: IoTarget,
    queue_depth: u32,
    done: VecDeque<Completion>,
}

impl PlainEngine {
    pub(crate) fn new(target: IoTarget, cfg: &EngineConfig) -> Result<PlainEngine> {
        Ok(PlainEngine {
            pool: BufferPool::new(cfg.buffer_bytes, cfg.buffer_count)?,
            target,
            queue_depth: cfg.queue_depth,
            done: VecDeque::with_capacity(cfg.queue_depth as usize),
        })
    }

    fn check_room(&self) -> Result<()> {
        if self.done.len() >= self.queue_depth as usize {
            return Err(BlockError::QueueFull {
                depth: self.queue_depth,
            });
        }
        Ok(())
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

    /// [`PlainEngine::submit_rw`]; a write with `dsync` is followed by fdatasync
    /// (durable when it completes).
    pub(crate) fn submit_rw_dsync(
        &mut self,
        kind: OpKind,
        buf: BufId,
        offset: u64,
        len: usize,
        user_data: u64,
        dsync: bool,
    ) -> Result<()> {
        self.check_room()?;
        self.target
            .check_rw(kind, offset, len, self.pool.buffer_bytes())?;
        let file = &self.target.file;
        let data = self.pool.slice_mut(buf).ok_or(BlockError::BadBuffer {
            id: buf.0,
            reason: "not owned by the caller (not acquired, or in flight)",
        })?;
        let result = match kind {
            OpKind::Read => pread_exact(file, &mut data[..len], offset),
            OpKind::Write => pwrite_all(file, &data[..len], offset).and_then(|()| {
                if !dsync {
                    return Ok(());
                }
                file.sync_data().map_err(|source| BlockError::Io {
                    op: "write (fdatasync for RWF_DSYNC)",
                    offset,
                    len,
                    source,
                })
            }),
        }
        .map(|()| len);
        self.pool.start_io(buf)?;
        self.done.push_back(Completion {
            user_data,
            buf: Some(buf),
            result,
        });
        Ok(())
    }

    pub(crate) fn submit_fsync(&mut self, user_data: u64) -> Result<()> {
        self.submit_sync(user_data, false)
    }

    /// fdatasync: makes durable every write completed before it.
    pub(crate) fn submit_datasync(&mut self, user_data: u64) -> Result<()> {
        self.submit_sync(user_data, true)
    }

    fn submit_sync(&mut self, user_data: u64, data_only: bool) -> Result<()> {
        self.check_room()?;
        let f = &self.target.file;
        let (op, r) = if data_only {
            ("fdatasync", f.sync_data())
        } else {
            ("fsync", f.sync_all())
        };
        let result = r.map(|()| 0).map_err(|source| BlockError::Io {
            op,
            offset: 0,
            len: 0,
            source,
        });
        self.done.push_back(Completion {
            user_data,
            buf: None,
            result,
        });
        Ok(())
    }

    /// fallocate(`mode`, `offset`, `len`), e.g. punch a hole or zero a range.
    pub(crate) fn submit_fallocate(
        &mut self,
        offset: u64,
        len: u64,
        mode: i32,
        user_data: u64,
    ) -> Result<()> {
        self.check_room()?;
        if len == 0
            || offset
                .checked_add(len)
                .is_none_or(|end| end > i64::MAX as u64)
        {
            return Err(BlockError::InvalidRequest {
                reason: format!("fallocate offset {offset} length {len} out of range"),
            });
        }
        let mut retries = 0u32;
        let result = loop {
            // SAFETY: fallocate takes the engine's open fd (owned by
            // `self.target.file` for the duration of the call) and plain integers;
            // it touches no memory of ours.
            let rc = unsafe {
                libc::fallocate(
                    self.target.file.as_raw_fd(),
                    mode,
                    offset as libc::off_t,
                    len as libc::off_t,
                )
            };
            if rc == 0 {
                break Ok(0);
            }
            let e = Errno::last();
            if !(retryable(e) && retries < MAX_RETRIES) {
                break Err(BlockError::Io {
                    op: "fallocate",
                    offset,
                    len: usize::try_from(len).unwrap_or(usize::MAX),
                    source: e.into(),
                });
            }
            retries += 1;
        };
        self.done.push_back(Completion {
            user_data,
            buf: None,
            result,
        });
        Ok(())
    }

    pub(crate) fn flush(&mut self) -> Result<()> {
        Ok(())
    }

    pub(crate) fn wait(&mut self, _min: usize) -> Result<Vec<Completion>> {
        // Everything queued has already completed.
        let out: Vec<Completion> = self.done.drain(..).collect();
        for c in &out {
            if let Some(b) = c.buf {
                self.pool.end_io(b);
            }
        }
        Ok(out)
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.done.len()
    }

    pub(crate) fn queue_depth(&self) -> u32 {
        self.queue_depth
    }
}

fn retryable(e: Errno) -> bool {
    matches!(e, Errno::EINTR | Errno::EAGAIN)
}

/// Read exactly `buf.len()` bytes at `offset`, looping over short reads and
/// retrying EINTR/EAGAIN; a 0-byte read is [`BlockError::UnexpectedEof`].
pub(crate) fn pread_exact(file: &File, buf: &mut [u8], offset: u64) -> Result<()> {
    let mut done = 0usize;
    let mut retries = 0u32;
    while done < buf.len() {
        let pos = offset + done as u64;
        match nix::sys::uio::pread(file, &mut buf[done..], pos as libc::off_t) {
            Ok(0) => {
                return Err(BlockError::UnexpectedEof {
                    offset: pos,
                    remaining: buf.len() - done,
                })
            }
            Ok(n) => done += n,
            Err(e) if retryable(e) && retries < MAX_RETRIES => retries += 1,
            Err(e) => {
                return Err(BlockError::Io {
                    op: "read",
                    offset: pos,
                    len: buf.len() - done,
                    source: e.into(),
                })
            }
        }
    }
    Ok(())
}

/// Write all of `buf` at `offset`, looping over short writes and retrying EINTR/EAGAIN.
pub(crate) fn pwrite_all(file: &File, buf: &[u8], offset: u64) -> Result<()> {
    let mut done = 0usize;
    let mut retries = 0u32;
    while done < buf.len() {
        let pos = offset + done as u64;
        match nix::sys::uio::pwrite(file, &buf[done..], pos as libc::off_t) {
            Ok(0) => {
                return Err(BlockError::Io {
                    op: "write",
                    offset: pos,
                    len: buf.len() - done,
                    source: io::ErrorKind::WriteZero.into(),
                })
            }
            Ok(n) => done += n,
            Err(e) if retryable(e) && retries < MAX_RETRIES => retries += 1,
            Err(e) => {
                return Err(BlockError::Io {
                    op: "write",
                    offset: pos,
                    len: buf.len() - done,
                    source: e.into(),
                })
            }
        }
    }
    Ok(())
}
