//! Opening block devices / image files and their metadata and slow-path helpers.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;

use super::{BlockError, Result, BUFFER_ALIGN};

mod ioctls {
    // BLKGETSIZE64 = _IOR(0x12, 114, size_t): device size in bytes (u64).
    nix::ioctl_read!(blkgetsize64, 0x12, 114, u64);
    // BLKSSZGET = _IO(0x12, 104) taking an `int *`: logical block size.
    nix::ioctl_read_bad!(blksszget, libc::BLKSSZGET, libc::c_int);
    // BLKZEROOUT = _IO(0x12, 127) taking `uint64_t range[2]` = {start, len}.
    nix::ioctl_write_ptr_bad!(blkzeroout, nix::request_code_none!(0x12, 127), [u64; 2]);
}

/// What was opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    BlockDevice,
    RegularFile,
}

/// Whether to open with `O_DIRECT`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DirectIo {
    /// Try `O_DIRECT`; if `open` fails with `EINVAL` (e.g. tmpfs) use buffered I/O.
    Auto,
    /// Buffered I/O.
    Off,
    /// `O_DIRECT` or [`BlockError::DirectUnsupported`].
    Require,
}

/// How to open a [`Device`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpenOptions {
    /// Open read-write (else read-only).
    pub write: bool,
    pub direct: DirectIo,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            write: false,
            direct: DirectIo::Auto,
        }
    }
}

/// An opened block device or regular file.
#[derive(Debug)]
pub struct Device {
    file: File,
    path: PathBuf,
    kind: DeviceKind,
    direct: bool,
    /// Size at open (block devices never change it while open here).
    size_at_open: u64,
    logical_block: u32,
}

impl Device {
    /// Open an existing block device or regular file.
    pub fn open(path: &Path, opts: &OpenOptions) -> Result<Device> {
        // Check the type first so that e.g. a FIFO is never opened (that could block).
        let meta = std::fs::metadata(path).map_err(|source| BlockError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        if !(meta.is_file() || meta.file_type().is_block_device()) {
            return Err(BlockError::NotBlockOrFile {
                path: path.to_path_buf(),
            });
        }
        let (file, direct) = open_with_direct(path, opts.direct, 0, |o| {
            o.read(true).write(opts.write);
        })?;
        Device::from_file(file, path, direct)
    }

    /// Open an existing regular file or block device for writes that are
    /// durable when they return: `O_DIRECT | O_DSYNC` (each write waits for
    /// the device, and for a cache flush where the device has a volatile
    /// cache). [`BlockError::DirectUnsupported`] where the filesystem
    /// refuses `O_DIRECT`.
    pub fn open_durable_direct(path: &Path) -> Result<Device> {
        let (file, direct) = open_with_direct(path, DirectIo::Require, libc::O_DSYNC, |o| {
            o.read(true).write(true);
        })?;
        Device::from_file(file, path, direct)
    }

    /// Open an existing regular file or block device read-write with
    /// `O_DIRECT` (writes bypass the page cache; they are durable only after
    /// an fdatasync). [`BlockError::DirectUnsupported`] where the filesystem
    /// refuses `O_DIRECT`.
    pub fn open_direct(path: &Path) -> Result<Device> {
        let (file, direct) = open_with_direct(path, DirectIo::Require, 0, |o| {
            o.read(true).write(true);
        })?;
        Device::from_file(file, path, direct)
    }

    /// Create (or open an existing) regular file read-write and make its length
    /// exactly `size_bytes` (a newly created file is sparse).
    pub fn create_file(path: &Path, size_bytes: u64, direct: DirectIo) -> Result<Device> {
        if let Ok(meta) = std::fs::metadata(path) {
            if !meta.is_file() {
                return Err(BlockError::NotRegularFile {
                    path: path.to_path_buf(),
                    op: "create_file",
                });
            }
        }
        let (file, direct) = open_with_direct(path, direct, 0, |o| {
            o.read(true).write(true).create(true);
        })?;
        let dev = Device::from_file(file, path, direct)?;
        if dev.kind != DeviceKind::RegularFile {
            return Err(BlockError::NotRegularFile {
                path: path.to_path_buf(),
                op: "create_file",
            });
        }
        if dev.size_bytes() != size_bytes {
            dev.set_len(size_bytes)?;
        }
        Ok(dev)
    }

    fn from_file(file: File, path: &Path, direct: bool) -> Result<Device> {
        let meta = file.metadata().map_err(|source| BlockError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        let path = path.to_path_buf();
        let fd = file.as_raw_fd();
        if meta.file_type().is_block_device() {
            let mut size: u64 = 0;
            // SAFETY: `fd` is an open block device and `size` is a valid, writable
            // u64 for BLKGETSIZE64 to store the size into.
            unsafe { ioctls::blkgetsize64(fd, &mut size) }.map_err(|e| BlockError::Ioctl {
                path: path.clone(),
                op: "BLKGETSIZE64",
                source: e.into(),
            })?;
            let mut lbs: libc::c_int = 0;
            // SAFETY: `fd` is an open block device and `lbs` is a valid, writable int
            // for BLKSSZGET to store the logical block size into.
            unsafe { ioctls::blksszget(fd, &mut lbs) }.map_err(|e| BlockError::Ioctl {
                path: path.clone(),
                op: "BLKSSZGET",
                source: e.into(),
            })?;
            let logical_block = u32::try_from(lbs)
                .ok()
                .filter(|b| b.is_power_of_two() && *b as usize <= BUFFER_ALIGN)
                .ok_or_else(|| BlockError::Ioctl {
                    path: path.clone(),
                    op: "BLKSSZGET",
                    source: io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("unsupported logical block size {lbs}"),
                    ),
                })?;
            Ok(Device {
                file,
                path,
                kind: DeviceKind::BlockDevice,
                direct,
                size_at_open: size,
                logical_block,
            })
        } else if meta.is_file() {
            let logical_block = if direct {
                dio_offset_align(fd).unwrap_or(512).max(512)
            } else {
                512
            };
            Ok(Device {
                file,
                path,
                kind: DeviceKind::RegularFile,
                direct,
                size_at_open: meta.len(),
                logical_block,
            })
        } else {
            Err(BlockError::NotBlockOrFile { path })
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn kind(&self) -> DeviceKind {
        self.kind
    }

    /// Size in bytes: BLKGETSIZE64 (at open) for block devices, the current
    /// length for regular files.
    pub fn size_bytes(&self) -> u64 {
        match self.kind {
            DeviceKind::BlockDevice => self.size_at_open,
            DeviceKind::RegularFile => self
                .file
                .metadata()
                .map(|m| m.len())
                .unwrap_or(self.size_at_open),
        }
    }

    /// Alignment unit for offsets/lengths: BLKSSZGET for block devices; 512 for
    /// regular files (or the filesystem's larger O_DIRECT alignment, from `statx`,
    /// when O_DIRECT is in effect).
    pub fn logical_block_bytes(&self) -> u32 {
        self.logical_block
    }

    /// Whether `O_DIRECT` is in effect.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    pub fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    pub(crate) fn file(&self) -> &File {
        &self.file
    }

    /// Ranges `(offset, len)` of `[start, end)` (clamped to the size) that may hold
    /// data. Regular files use `SEEK_DATA`/`SEEK_HOLE`, so holes are skipped; block
    /// devices and filesystems without hole reporting yield one range covering all.
    pub fn data_ranges(&self, start: u64, end: u64) -> Result<Vec<(u64, u64)>> {
        let end = end.min(self.size_bytes());
        if start >= end {
            return Ok(Vec::new());
        }
        let whole = vec![(start, end - start)];
        if self.kind == DeviceKind::BlockDevice {
            return Ok(whole);
        }
        let fd = self.raw_fd();
        let seek_err = |op: &'static str, offset: u64, e: Errno| BlockError::Io {
            op,
            offset,
            len: 0,
            source: e.into(),
        };
        let mut ranges = Vec::new();
        let mut pos = start;
        while pos < end {
            let data =
                match nix::unistd::lseek(fd, pos as libc::off_t, nix::unistd::Whence::SeekData) {
                    Ok(d) => d as u64,
                    Err(Errno::ENXIO) => break, // no data at or after `pos`
                    Err(Errno::EINVAL | Errno::EOPNOTSUPP) if ranges.is_empty() => {
                        return Ok(whole)
                    }
                    Err(e) => return Err(seek_err("lseek(SEEK_DATA)", pos, e)),
                };
            if data >= end {
                break;
            }
            let hole =
                match nix::unistd::lseek(fd, data as libc::off_t, nix::unistd::Whence::SeekHole) {
                    Ok(h) => (h as u64).min(end),
                    Err(Errno::ENXIO) => end, // file shrank concurrently
                    Err(e) => return Err(seek_err("lseek(SEEK_HOLE)", data, e)),
                };
            if hole <= data {
                break;
            }
            ranges.push((data, hole - data));
            pos = hole;
        }
        Ok(ranges)
    }

    /// Make `[offset, offset + len)` read as zeros: regular files punch a hole
    /// (`fallocate(PUNCH_HOLE | KEEP_SIZE)`), block devices use `BLKZEROOUT`; both
    /// fall back to writing zeros when the kernel/filesystem does not support it.
    /// Needs the device opened for writing.
    pub fn zero_range(&self, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        if offset.checked_add(len).is_none_or(|e| e > i64::MAX as u64) {
            return Err(BlockError::InvalidRequest {
                reason: format!("zero_range offset {offset} + length {len} out of range"),
            });
        }
        let align = u64::from(self.logical_block);
        let aligned = offset % align == 0 && len % align == 0;
        let unaligned = || BlockError::Unaligned {
            op: "zero_range",
            offset,
            len,
            align: self.logical_block,
        };
        let fd = self.raw_fd();
        match self.kind {
            DeviceKind::RegularFile => {
                let mode = nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
                    | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE;
                match nix::fcntl::fallocate(fd, mode, offset as libc::off_t, len as libc::off_t) {
                    Ok(()) => return Ok(()),
                    Err(Errno::EOPNOTSUPP | Errno::ENOSYS | Errno::EINVAL) => {
                        tracing::debug!(path = %self.path.display(), "hole punching unsupported, writing zeros");
                    }
                    Err(e) => {
                        return Err(BlockError::Io {
                            op: "fallocate(PUNCH_HOLE)",
                            offset,
                            len: len as usize,
                            source: e.into(),
                        })
                    }
                }
            }
            DeviceKind::BlockDevice => {
                if !aligned {
                    return Err(unaligned());
                }
                let range = [offset, len];
                // SAFETY: `fd` is an open block device; `range` is a valid [u64; 2]
                // that BLKZEROOUT only reads.
                match unsafe { ioctls::blkzeroout(fd, &range) } {
                    Ok(_) => return Ok(()),
                    Err(Errno::EOPNOTSUPP | Errno::ENOTTY | Errno::ENOSYS) => {
                        tracing::debug!(path = %self.path.display(), "BLKZEROOUT unsupported, writing zeros");
                    }
                    Err(e) => {
                        return Err(BlockError::Ioctl {
                            path: self.path.clone(),
                            op: "BLKZEROOUT",
                            source: e.into(),
                        })
                    }
                }
            }
        }
        if self.direct && !aligned {
            return Err(unaligned());
        }
        self.write_zeros(offset, len)
    }

    fn write_zeros(&self, offset: u64, len: u64) -> Result<()> {
        const CHUNK: usize = 1 << 20;
        let mut pool = super::buffers::BufferPool::new(CHUNK, 1)?;
        let id = pool.acquire().ok_or(BlockError::NoBuffer)?;
        let zeros = pool.slice(id).ok_or(BlockError::NoBuffer)?;
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(CHUNK as u64) as usize;
            super::plain::pwrite_all(&self.file, &zeros[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }

    /// Truncate or extend a regular file; error for block devices.
    pub fn set_len(&self, size_bytes: u64) -> Result<()> {
        if self.kind != DeviceKind::RegularFile {
            return Err(BlockError::NotRegularFile {
                path: self.path.clone(),
                op: "set_len",
            });
        }
        self.file
            .set_len(size_bytes)
            .map_err(|source| BlockError::Io {
                op: "set_len",
                offset: size_bytes,
                len: 0,
                source,
            })
    }

    /// Start writeback of every dirty page of a regular file without waiting
    /// for it (`sync_file_range(SYNC_FILE_RANGE_WRITE)`), so that a later
    /// fsync has less to do. A hint only: it gives no durability. Block
    /// devices and errors are ignored.
    pub fn start_writeback(&self) {
        if self.kind() != DeviceKind::RegularFile || self.is_direct() {
            return;
        }
        // SAFETY: sync_file_range takes a valid open fd (owned by self.file
        // for the duration of the call) and plain integers; it touches no
        // memory of ours.
        let _ = unsafe {
            libc::sync_file_range(self.file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE)
        };
    }

    /// Drop the clean cached pages of the whole device or file
    /// (`posix_fadvise(POSIX_FADV_DONTNEED)`); dirty pages stay, so call it
    /// after an fsync. A hint only: it changes no data, so errors are
    /// ignored. The mirror calls it once a sync has made its replica
    /// consistent: the sync leaves the replica cached, partly in large
    /// folios, and small live writes into those cost the mirror more CPU
    /// than into pages they allocate themselves (README, "The replica's
    /// page cache after a sync").
    pub fn drop_cache(&self) {
        self.fadvise(libc::POSIX_FADV_DONTNEED);
    }

    /// Tell the kernel that reads through this descriptor are random
    /// (`posix_fadvise(POSIX_FADV_RANDOM)`): no readahead. A hint only:
    /// errors are ignored. The mirror reads each resync chunk's old contents
    /// for the undo log, one chunk here and one there; with readahead every
    /// such read also fetched the next chunk from the disk, which the resync
    /// then overwrote without reading.
    pub fn advise_random(&self) {
        self.fadvise(libc::POSIX_FADV_RANDOM);
    }

    /// Start reading `len` bytes at `offset` into the page cache without
    /// waiting for them (`posix_fadvise(POSIX_FADV_WILLNEED)`), so that a
    /// later read of the range finds them there. A hint: errors are ignored.
    /// The mirror starts the reads of several resync chunks' old contents
    /// this way, then reads them for the undo log together.
    pub fn prefetch(&self, offset: u64, len: u64) {
        self.fadvise_range(offset, len, libc::POSIX_FADV_WILLNEED);
    }

    /// `posix_fadvise(advice)` over the whole file, unless it bypasses the
    /// page cache (`O_DIRECT`). A hint: errors are ignored.
    fn fadvise(&self, advice: libc::c_int) {
        self.fadvise_range(0, 0, advice);
    }

    /// `posix_fadvise(advice)` over `len` bytes at `offset` (0: to the end).
    fn fadvise_range(&self, offset: u64, len: u64, advice: libc::c_int) {
        if self.is_direct() {
            return;
        }
        let (Ok(offset), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len))
        else {
            return;
        };
        // SAFETY: posix_fadvise takes a valid open fd (owned by self.file
        // for the duration of the call) and plain integers; it touches no
        // memory of ours.
        let _ = unsafe { libc::posix_fadvise(self.file.as_raw_fd(), offset, len, advice) };
    }

    /// `fsync`.
    pub fn sync_all(&self) -> Result<()> {
        self.file.sync_all().map_err(|source| BlockError::Io {
            op: "fsync",
            offset: 0,
            len: 0,
            source,
        })
    }
}

/// Open with `O_DIRECT` per `mode`; returns the file and whether O_DIRECT is on.
fn open_with_direct(
    path: &Path,
    mode: DirectIo,
    extra_flags: i32,
    configure: impl Fn(&mut std::fs::OpenOptions),
) -> Result<(File, bool)> {
    let open = |direct: bool| {
        let mut o = std::fs::OpenOptions::new();
        configure(&mut o);
        o.custom_flags(if direct {
            libc::O_DIRECT | extra_flags
        } else {
            extra_flags
        });
        o.open(path)
    };
    let err = |source| BlockError::Open {
        path: path.to_path_buf(),
        source,
    };
    match mode {
        DirectIo::Off => open(false).map(|f| (f, false)).map_err(err),
        DirectIo::Require => match open(true) {
            Ok(f) => Ok((f, true)),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                Err(BlockError::DirectUnsupported {
                    path: path.to_path_buf(),
                })
            }
            Err(e) => Err(err(e)),
        },
        DirectIo::Auto => match open(true) {
            Ok(f) => Ok((f, true)),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                tracing::info!(path = %path.display(), "O_DIRECT not supported, using buffered I/O");
                open(false).map(|f| (f, false)).map_err(err)
            }
            Err(e) => Err(err(e)),
        },
    }
}

/// The filesystem's required O_DIRECT file-offset alignment (statx STATX_DIOALIGN,
/// Linux 6.1+), if reported.
fn dio_offset_align(fd: RawFd) -> Option<u32> {
    let mut stx = std::mem::MaybeUninit::<libc::statx>::zeroed();
    // SAFETY: `fd` is open, the path is a valid NUL-terminated empty string used with
    // AT_EMPTY_PATH, and `stx` points to writable memory of the size of `struct statx`.
    let rc = unsafe {
        libc::statx(
            fd,
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            stx.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return None;
    }
    // SAFETY: statx succeeded and filled the struct (which was zero-initialised anyway).
    let stx = unsafe { stx.assume_init() };
    if stx.stx_mask & libc::STATX_DIOALIGN != 0
        && stx.stx_dio_offset_align.is_power_of_two()
        && stx.stx_dio_offset_align <= 1 << 16
    {
        Some(stx.stx_dio_offset_align)
    } else {
        None
    }
}
