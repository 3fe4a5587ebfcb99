//! `blkmirror restore`: write a mirror's replica of a volume, or one of its
//! recovery points, onto a block device or an image file.
//!
//! * **full** (a missing or empty target file): every chunk is asked for;
//!   zero chunks travel as markers and are not written (the new file is
//!   sparse).
//! * **differential** (a target that holds something, e.g. an older copy):
//!   the mirror sends the digest of every chunk as of the requested point,
//!   the target is read and hashed meanwhile (holes cost nothing), and only
//!   chunks whose digests differ are asked for.
//!
//! Every chunk is checked ([`protocol::open_chunk`]: index, length, digest)
//! before it is written, and the target is fsynced before success is
//! reported. See `mirror::reader` for the mirror's side and the frames.

use std::collections::VecDeque;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::sync::mpsc;

use crate::block::{Device, DirectIo, OpenOptions as DevOpen};
use crate::config::{self, FRAME_PAYLOAD_BYTES_MAX};
use crate::error::{Error, Result};
use crate::protocol::{
    self, Encoding, Frame, Hello, ProtocolError, CHANGED_WORDS_PER_BATCH, DIGESTS_PER_BATCH,
    HELLO_FLAG_READ,
};
use crate::track::ZeroDigests;
use crate::transport::stream::{FrameReceiver, Link, LinkError, CLOSE_ERROR, CLOSE_OK};
use crate::transport::{self, Fingerprint, Identity, Tuning};

/// Bytes of the target read at once while computing its digests.
const READ_BYTES_MAX: usize = 1 << 20;
/// Bytes of received chunk frames queued for the writer thread.
const QUEUED_BYTES_MAX: usize = 4 << 20;
/// Digests buffered on either side of the comparison (mirror's, target's).
const PENDING_DIGESTS_MAX: usize = 4 * DIGESTS_PER_BATCH as usize;
/// How long the mirror may take to answer the hello and the request.
const ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

pub struct RestoreOptions {
    pub identity: Identity,
    /// Mirror address HOST:PORT.
    pub from: String,
    /// Pinned fingerprint of the mirror.
    pub peer: Fingerprint,
    pub volume: String,
    /// Recovery point id (0: the replica as it is).
    pub point: u64,
    /// Block device or image file to write.
    pub target: PathBuf,
    pub tuning: Tuning,
    pub progress: bool,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct RestoreReport {
    pub volume: String,
    /// 0: the current replica.
    pub point: u64,
    /// `full` or `differential`.
    pub mode: &'static str,
    pub chunks_total: u64,
    /// Chunks received with data.
    pub chunks_sent: u64,
    /// Chunks received as zero markers (zero chunks or runs of holes).
    pub chunks_zero: u64,
    /// Bytes of frames received from the mirror (QUIC and TLS overhead not included).
    pub bytes_on_wire: u64,
    pub seconds: f64,
    pub volume_bytes: u64,
    pub chunk_bytes: u32,
    pub target: String,
}

impl RestoreReport {
    /// One line for humans.
    pub fn describe(&self) -> String {
        let what = if self.point == 0 {
            "the replica".to_string()
        } else {
            format!("recovery point {}", self.point)
        };
        format!(
            "restored {what} of volume {} onto {} ({} restore): {} of {} chunks sent, {} as zeros, {} bytes received in {:.2} s",
            self.volume,
            self.target,
            self.mode,
            self.chunks_sent,
            self.chunks_total,
            self.chunks_zero,
            self.bytes_on_wire,
            self.seconds
        )
    }
}

/// What the target is before the restore.
#[derive(Clone, Copy, Debug)]
enum Target {
    Missing,
    File { len: u64 },
    Block { size: u64 },
}

fn inspect_target(path: &Path) -> Result<Target> {
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let parent = path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            if !parent.is_dir() {
                return Err(Error::Config(format!(
                    "target {}: directory {} does not exist",
                    path.display(),
                    parent.display()
                )));
            }
            Ok(Target::Missing)
        }
        Err(e) => Err(Error::io(format!("target {}", path.display()), e)),
        Ok(m) if m.is_file() => Ok(Target::File { len: m.len() }),
        Ok(m) if m.file_type().is_block_device() => {
            let d = Device::open(
                path,
                &DevOpen {
                    write: false,
                    direct: DirectIo::Off,
                },
            )?;
            Ok(Target::Block {
                size: d.size_bytes(),
            })
        }
        Ok(_) => Err(Error::Config(format!(
            "target {} is neither a block device nor a regular file",
            path.display()
        ))),
    }
}

fn link_err(e: LinkError) -> Error {
    match e {
        LinkError::Protocol(p) => Error::Protocol(p),
        LinkError::Closed(m) => Error::ConnectionLost(m),
        LinkError::Truncated => {
            Error::ConnectionLost("stream ended in the middle of a frame".into())
        }
    }
}

type Incoming = mpsc::Receiver<std::result::Result<Option<(Frame, u64)>, LinkError>>;

/// Frames of one stream with their encoded size, read by a task of their own
/// (reads are not cancel-safe). `Ok(None)`: the stream ended cleanly.
fn spawn_reader(mut rx: FrameReceiver) -> Incoming {
    let (tx, out) = mpsc::channel(16);
    tokio::spawn(async move {
        let mut scratch = BytesMut::new();
        loop {
            let r = rx.recv().await.map(|f| {
                f.map(|f| {
                    scratch.clear();
                    let tail = protocol::encode(&f, &mut scratch);
                    let n = scratch.len() + tail.map_or(0, |t| t.len());
                    (f, n as u64)
                })
            });
            let stop = !matches!(r, Ok(Some(_)));
            if tx.send(r).await.is_err() || stop {
                return;
            }
        }
    });
    out
}

/// The next control frame; an `Error` frame is the mirror's refusal.
/// `Ok(None)`: the control stream ended cleanly.
async fn next_ctl(ctl: &mut Incoming, wire: &mut u64) -> Result<Option<Frame>> {
    match ctl.recv().await {
        Some(Ok(Some((Frame::Error { message }, _)))) => Err(Error::Refused(message)),
        Some(Ok(Some((f, n)))) => {
            *wire += n;
            Ok(Some(f))
        }
        Some(Ok(None)) => Ok(None),
        Some(Err(e)) => Err(link_err(e)),
        None => Err(Error::ConnectionLost("control stream ended".into())),
    }
}

/// A control frame that must come now; a lost connection with a reason is
/// the mirror's refusal.
async fn expect_ctl(
    ctl: &mut Incoming,
    wire: &mut u64,
    waiting_for: &'static str,
) -> Result<Frame> {
    match tokio::time::timeout(ANSWER_TIMEOUT, next_ctl(ctl, wire)).await {
        Err(_) => Err(Error::ConnectionLost(format!(
            "the mirror did not answer within {} s ({waiting_for})",
            ANSWER_TIMEOUT.as_secs()
        ))),
        Ok(Ok(Some(f))) => Ok(f),
        Ok(Ok(None)) => Err(Error::ConnectionLost(format!(
            "the mirror ended the session ({waiting_for})"
        ))),
        Ok(Err(Error::ConnectionLost(m))) => Err(Error::Refused(m)),
        Ok(Err(e)) => Err(e),
    }
}

/// The mirror's own explanation after a failure, if it sends one soon.
async fn mirror_reason(ctl: &mut Incoming) -> Option<Error> {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(3);
    let mut wire = 0;
    loop {
        match tokio::time::timeout_at(deadline, next_ctl(ctl, &mut wire)).await {
            Err(_) | Ok(Ok(None)) => return None,
            Ok(Ok(Some(_))) => continue,
            Ok(Err(e @ Error::Refused(_))) => return Some(e),
            Ok(Err(_)) => return None,
        }
    }
}

fn malformed(kind: &'static str, reason: String) -> Error {
    Error::Protocol(ProtocolError::Malformed { kind, reason })
}

pub async fn run_restore(opts: RestoreOptions) -> Result<RestoreReport> {
    let started = Instant::now();
    config::validate_volume_name(&opts.volume).map_err(Error::Config)?;
    let target = inspect_target(&opts.target)?;
    let addr = crate::primary::sync::resolve(&opts.from).await?;
    let endpoint = transport::client_endpoint(
        &opts.identity,
        transport::unspecified_for(addr),
        &opts.tuning,
    )?;
    let conn = transport::connect(&endpoint, addr, &opts.peer, &opts.tuning).await?;
    let link = Link::new(conn, FRAME_PAYLOAD_BYTES_MAX);
    let result = restore_on_link(&opts, &link, target, started).await;
    match &result {
        Ok(_) => link.close(CLOSE_OK, "done"),
        Err(e) => link.close(CLOSE_ERROR, &e.to_string()),
    }
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), endpoint.wait_idle()).await;
    result
}

async fn restore_on_link(
    opts: &RestoreOptions,
    link: &Link,
    target: Target,
    started: Instant,
) -> Result<RestoreReport> {
    let mut wire = 0u64;
    let (mut ctl_tx, ctl_rx) = link.open_control().await.map_err(link_err)?;
    let mut ctl = spawn_reader(ctl_rx);
    ctl_tx
        .send(&Frame::Hello(Hello {
            volume: opts.volume.clone(),
            volume_bytes: 0,
            chunk_bytes: 0,
            flags: HELLO_FLAG_READ,
            source_id: 0,
        }))
        .await
        .map_err(link_err)?;
    let ack = match expect_ctl(&mut ctl, &mut wire, "waiting for HelloAck").await? {
        Frame::HelloAck(a) => a,
        other => return Err(Error::unexpected(&other, "waiting for HelloAck")),
    };
    let (vb, cb) = (ack.volume_bytes, ack.chunk_bytes);
    if !cb.is_power_of_two()
        || !(config::CHUNK_BYTES_MIN..=config::CHUNK_BYTES_MAX).contains(&cb)
        || vb == 0
        || vb > config::VOLUME_BYTES_MAX
    {
        return Err(malformed(
            "HelloAck",
            format!("volume of {vb} bytes in {cb}-byte chunks"),
        ));
    }
    config::validate_geometry(vb, cb).map_err(|e| malformed("HelloAck", e))?;
    let chunks = config::chunk_count(vb, cb);
    let path = &opts.target;
    if let Target::Block { size } = target {
        if size < vb {
            return Err(Error::Config(format!(
                "target {} is a block device of {size} bytes, too small for volume {} of {vb} bytes",
                path.display(),
                opts.volume
            )));
        }
    }
    let differential = match target {
        Target::Missing => false,
        Target::File { len } => len > 0,
        Target::Block { .. } => true,
    };
    ctl_tx
        .send(&Frame::RestoreRequest {
            point: opts.point,
            digests: differential,
        })
        .await
        .map_err(link_err)?;
    match expect_ctl(&mut ctl, &mut wire, "waiting for RestoreReady").await? {
        Frame::RestoreReady { point } if point == opts.point => {}
        other => return Err(Error::unexpected(&other, "waiting for RestoreReady")),
    }

    // The request is accepted: only now is the target created or resized.
    let write = DevOpen {
        write: true,
        direct: DirectIo::Off,
    };
    let (device, created) = match target {
        Target::Missing => (Device::create_file(path, vb, DirectIo::Off)?, true),
        Target::File { len } => {
            let d = Device::open(path, &write)?;
            if len != vb {
                d.set_len(vb)?;
            }
            (d, false)
        }
        Target::Block { .. } => (Device::open(path, &write)?, false),
    };
    let device = Arc::new(device);
    let zeros = ZeroDigests::new(vb, cb);
    let progress = if opts.progress {
        let pb = ProgressBar::with_draw_target(Some(vb), ProgressDrawTarget::stderr());
        if let Ok(style) = ProgressStyle::with_template(
            "{spinner} {msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        ) {
            pb.set_style(style.progress_chars("=> "));
        }
        pb
    } else {
        ProgressBar::hidden()
    };

    let words_total = chunks.div_ceil(64) as usize;
    let mut want = vec![0u64; words_total];
    let wanted = if differential {
        progress.set_message(format!("{} (comparing)", opts.volume));
        compare(
            &device, zeros, chunks, &mut ctl, &mut wire, &mut want, &progress,
        )
        .await?
    } else {
        want.fill(u64::MAX);
        if chunks % 64 != 0 {
            want[words_total - 1] = (1u64 << (chunks % 64)) - 1;
        }
        chunks
    };
    tracing::info!(volume = %opts.volume, point = opts.point, differential, wanted, "restore: transferring");
    progress.set_message(format!("{} (restoring)", opts.volume));
    progress.set_length(wanted.saturating_mul(cb as u64).min(vb));
    progress.set_position(0);

    // Requests go out from a task of their own while chunks come in.
    let words = want.clone();
    let requests = tokio::spawn(async move {
        for (k, batch) in words.chunks(CHANGED_WORDS_PER_BATCH as usize).enumerate() {
            if batch.iter().all(|&w| w == 0) {
                continue;
            }
            ctl_tx
                .send(&Frame::ReadChunks {
                    first_word: (k * CHANGED_WORDS_PER_BATCH as usize) as u64,
                    words: batch.to_vec(),
                })
                .await?;
        }
        ctl_tx.send(&Frame::ReadEnd { chunks: wanted }).await?;
        Ok::<_, LinkError>(ctl_tx)
    });

    // Whether the mirror already ended its control stream (cleanly).
    let mut ctl_ended = false;
    let mut data = {
        let accepted = tokio::select! {
            d = link.accept_data() => d,
            c = next_ctl(&mut ctl, &mut wire) => match c {
                Err(e) => return Err(e),
                Ok(Some(f)) => return Err(Error::unexpected(&f, "waiting for the data stream")),
                // The mirror may finish its control stream as soon as it
                // has sent everything: the data stream is still there.
                Ok(None) => {
                    ctl_ended = true;
                    match tokio::time::timeout(ANSWER_TIMEOUT, link.accept_data()).await {
                        Ok(d) => d,
                        Err(_) => Err(LinkError::Closed("the mirror ended the session".into())),
                    }
                }
            },
        };
        match accepted {
            Ok(rx) => spawn_reader(rx),
            Err(e) => return Err(mirror_reason(&mut ctl).await.unwrap_or(link_err(e))),
        }
    };

    let cap = (QUEUED_BYTES_MAX / cb as usize).max(2);
    let (frames_tx, frames_rx) = mpsc::channel::<Frame>(cap);
    let writer = {
        let device = device.clone();
        let pb = progress.clone();
        std::thread::Builder::new()
            .name("restore-writer".into())
            .spawn(move || write_chunks(&device, vb, cb, !differential, want, frames_rx, &pb))
            .map_err(|e| Error::Other(format!("cannot start the writer thread: {e}")))?
    };
    let mut ctl_open = !ctl_ended;
    let received: Result<u64> = async {
        loop {
            tokio::select! {
                biased;
                c = next_ctl(&mut ctl, &mut wire), if ctl_open => match c? {
                    Some(f) => return Err(Error::unexpected(&f, "restoring")),
                    None => ctl_open = false,
                },
                d = data.recv() => match d {
                    Some(Ok(Some((Frame::RestoreEnd { chunks }, n)))) => {
                        wire += n;
                        return Ok(chunks);
                    }
                    Some(Ok(Some((f @ (Frame::Chunk(_) | Frame::ZeroRun { .. }), n)))) => {
                        wire += n;
                        if frames_tx.send(f).await.is_err() {
                            // The writer failed: its error is the one to report.
                            return Ok(u64::MAX);
                        }
                    }
                    Some(Ok(Some((f, _)))) => return Err(Error::unexpected(&f, "restoring")),
                    Some(Ok(None)) | None => {
                        return Err(mirror_reason(&mut ctl).await.unwrap_or_else(|| {
                            Error::ConnectionLost("the mirror's data stream ended before RestoreEnd".into())
                        }))
                    }
                    Some(Err(e)) => {
                        return Err(mirror_reason(&mut ctl).await.unwrap_or(link_err(e)))
                    }
                },
            }
        }
    }
    .await;
    drop(frames_tx);
    let written = tokio::task::spawn_blocking(move || writer.join())
        .await
        .map_err(|e| Error::Other(format!("writer join: {e}")))?
        .unwrap_or_else(|_| Err(Error::Other("the writer thread panicked".into())));
    progress.finish_and_clear();
    let end_chunks = received?;
    let stats = written?;
    if end_chunks != wanted || stats.sent + stats.zero != wanted || stats.missing != 0 {
        return Err(malformed(
            "RestoreEnd",
            format!(
                "the mirror says it sent {end_chunks} chunks; {wanted} were asked for, {} arrived, {} are missing",
                stats.sent + stats.zero,
                stats.missing
            ),
        ));
    }
    tokio::task::spawn_blocking(move || -> Result<()> {
        device.sync_all()?;
        Ok(())
    })
    .await
    .map_err(|e| Error::Other(format!("fsync join: {e}")))??;
    if created {
        let parent = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        crate::track::files::sync_dir(parent)?;
    }
    if let Ok(Ok(mut tx)) = requests.await {
        tx.finish();
    }
    Ok(RestoreReport {
        volume: opts.volume.clone(),
        point: opts.point,
        mode: if differential { "differential" } else { "full" },
        chunks_total: chunks,
        chunks_sent: stats.sent,
        chunks_zero: stats.zero,
        bytes_on_wire: wire,
        seconds: started.elapsed().as_secs_f64(),
        volume_bytes: vb,
        chunk_bytes: cb,
        target: path.display().to_string(),
    })
}

/// Compare the mirror's digests (as of the point) with the target's, chunk
/// by chunk as both arrive; set the bits of chunks that differ in `want`.
/// Returns how many differ.
#[allow(clippy::too_many_arguments)]
async fn compare(
    device: &Arc<Device>,
    zeros: ZeroDigests,
    chunks: u64,
    ctl: &mut Incoming,
    wire: &mut u64,
    want: &mut [u64],
    progress: &ProgressBar,
) -> Result<u64> {
    let (tx, mut local) = mpsc::channel::<Result<Vec<u128>>>(4);
    let hasher = {
        let device = device.clone();
        let pb = progress.clone();
        std::thread::Builder::new()
            .name("restore-digests".into())
            .spawn(move || {
                if let Err(e) = target_digests(&device, zeros, chunks, &tx, &pb) {
                    let _ = tx.blocking_send(Err(e));
                }
            })
            .map_err(|e| Error::Other(format!("cannot start the digest thread: {e}")))?
    };
    let mut theirs: VecDeque<u128> = VecDeque::new();
    let mut mine: VecDeque<u128> = VecDeque::new();
    let mut next_theirs = 0u64;
    let mut i = 0u64;
    let mut differ = 0u64;
    let mut local_open = true;
    let result: Result<()> = async {
        while i < chunks {
            tokio::select! {
                c = next_ctl(ctl, wire), if theirs.len() < PENDING_DIGESTS_MAX => match c? {
                    Some(Frame::DigestBatch { first, digests }) => {
                        let n = digests.len() as u64;
                        if first != next_theirs || n == 0 || first + n > chunks {
                            return Err(malformed(
                                "DigestBatch",
                                format!("{n} digests from chunk {first}, expected chunk {next_theirs} of {chunks}"),
                            ));
                        }
                        next_theirs += n;
                        theirs.extend(digests);
                    }
                    Some(f) => return Err(Error::unexpected(&f, "comparing digests")),
                    None => return Err(Error::ConnectionLost("the mirror ended the session while sending digests".into())),
                },
                l = local.recv(), if local_open && mine.len() < PENDING_DIGESTS_MAX => match l {
                    Some(Ok(d)) => mine.extend(d),
                    Some(Err(e)) => return Err(e),
                    None => local_open = false,
                },
                else => return Err(Error::Other(format!(
                    "internal error: the target's digests ended at chunk {i} of {chunks}"
                ))),
            }
            while let (Some(&a), Some(&b)) = (mine.front(), theirs.front()) {
                if a != b {
                    want[(i / 64) as usize] |= 1 << (i % 64);
                    differ += 1;
                }
                mine.pop_front();
                theirs.pop_front();
                i += 1;
            }
        }
        Ok(())
    }
    .await;
    drop(local);
    let _ = tokio::task::spawn_blocking(move || hasher.join()).await;
    result?;
    Ok(differ)
}

/// The target's digest of every chunk, in order, in batches.
fn target_digests(
    device: &Device,
    zeros: ZeroDigests,
    chunks: u64,
    tx: &mpsc::Sender<Result<Vec<u128>>>,
    progress: &ProgressBar,
) -> Result<()> {
    let vb = zeros.volume_bytes;
    let cb = zeros.chunk_bytes as u64;
    let ranges = device.data_ranges(0, vb)?;
    let has_data = |i: u64| {
        let s = i * cb;
        let e = (s + cb).min(vb);
        let k = ranges.partition_point(|&(o, l)| o + l <= s);
        k < ranges.len() && ranges[k].0 < e
    };
    let per_read = (READ_BYTES_MAX as u64 / cb).max(1);
    let mut buf = vec![0u8; (per_read * cb) as usize];
    let mut batch = Vec::with_capacity(DIGESTS_PER_BATCH as usize);
    let gone = || Error::Other("restore: digest comparison stopped".into());
    let mut i = 0u64;
    while i < chunks {
        let mut j = i + 1;
        let data = has_data(i);
        while j < chunks && j - i < per_read && has_data(j) == data {
            j += 1;
        }
        let start = i * cb;
        let len = ((j * cb).min(vb) - start) as usize;
        if data {
            device
                .file()
                .read_exact_at(&mut buf[..len], start)
                .map_err(|e| {
                    Error::io(
                        format!(
                            "reading target {} at offset {start} ({len} bytes)",
                            device.path().display()
                        ),
                        e,
                    )
                })?;
        }
        for k in i..j {
            let d = if data {
                let off = ((k - i) * cb) as usize;
                let l = config::chunk_len(vb, zeros.chunk_bytes, k) as usize;
                protocol::digest(&buf[off..off + l])
            } else {
                zeros.of(k)
            };
            batch.push(d);
            if batch.len() == DIGESTS_PER_BATCH as usize {
                let b =
                    std::mem::replace(&mut batch, Vec::with_capacity(DIGESTS_PER_BATCH as usize));
                tx.blocking_send(Ok(b)).map_err(|_| gone())?;
            }
        }
        progress.inc(len as u64);
        i = j;
    }
    if !batch.is_empty() {
        tx.blocking_send(Ok(batch)).map_err(|_| gone())?;
    }
    Ok(())
}

struct WriteStats {
    sent: u64,
    zero: u64,
    /// Chunks asked for that did not arrive.
    missing: u64,
}

/// Check and write received chunks. `fresh`: the target reads as zeros
/// already (a new or empty file), so zero chunks need no write.
fn write_chunks(
    device: &Device,
    vb: u64,
    cb: u32,
    fresh: bool,
    mut pending: Vec<u64>,
    mut frames: mpsc::Receiver<Frame>,
    progress: &ProgressBar,
) -> Result<WriteStats> {
    let chunks = config::chunk_count(vb, cb);
    let mut buf = vec![0u8; cb as usize];
    let mut stats = WriteStats {
        sent: 0,
        zero: 0,
        missing: 0,
    };
    let path = device.path().display().to_string();
    let mut take = |i: u64| -> Result<()> {
        let bit = 1u64 << (i % 64);
        match pending.get_mut((i / 64) as usize) {
            Some(w) if i < chunks && *w & bit != 0 => {
                *w &= !bit;
                Ok(())
            }
            _ => Err(malformed(
                "Chunk",
                format!("the mirror sent chunk {i}, which was not asked for (or twice)"),
            )),
        }
    };
    let zero = |offset: u64, len: u64| -> Result<()> {
        if fresh {
            return Ok(());
        }
        if device.zero_range(offset, len).is_ok() {
            return Ok(());
        }
        let zeros = vec![0u8; (len.min(1 << 20)) as usize];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(zeros.len() as u64) as usize;
            device
                .file()
                .write_all_at(&zeros[..n], offset + done)
                .map_err(|e| {
                    Error::io(
                        format!("writing zeros to {path} at offset {}", offset + done),
                        e,
                    )
                })?;
            done += n as u64;
        }
        Ok(())
    };
    while let Some(f) = frames.blocking_recv() {
        match f {
            Frame::Chunk(c) => {
                let n = protocol::open_chunk(&c, vb, cb, &mut buf)?;
                take(c.index)?;
                let offset = c.index * cb as u64;
                if c.encoding == Encoding::Zero {
                    zero(offset, n as u64)?;
                    stats.zero += 1;
                } else {
                    device.file().write_all_at(&buf[..n], offset).map_err(|e| {
                        Error::io(
                            format!("writing chunk {} to {path} at offset {offset}", c.index),
                            e,
                        )
                    })?;
                    stats.sent += 1;
                }
                progress.inc(n as u64);
            }
            Frame::ZeroRun { first, count } => {
                let end = first.checked_add(count).filter(|&e| e <= chunks).ok_or_else(|| {
                    malformed(
                        "ZeroRun",
                        format!("{count} chunks from {first} lie beyond the volume ({chunks} chunks)"),
                    )
                })?;
                for i in first..end {
                    take(i)?;
                }
                let offset = first * cb as u64;
                let len = (end * cb as u64).min(vb) - offset;
                zero(offset, len)?;
                stats.zero += count;
                progress.inc(len);
            }
            other => return Err(Error::unexpected(&other, "restoring")),
        }
    }
    stats.missing = pending.iter().map(|w| w.count_ones() as u64).sum();
    Ok(stats)
}
