//! Mirror side of `blkmirror restore`: a read session on one volume.
//!
//! ```text
//! client                                   mirror
//! Hello (HELLO_FLAG_READ)          ──►     lock the volume (nothing may write it), read its meta
//!                                  ◄──     HelloAck (geometry, state) | Error
//! RestoreRequest {point, digests}  ──►     check the point (replica: not Inconsistent)
//!                                  ◄──     RestoreReady | Error
//!                                  ◄──     DigestBatch ... (if asked: every chunk as of the point)
//! ReadChunks {words} ... ReadEnd   ──►     reader thread: the chunks asked for, in order
//!                   data stream    ◄──     Chunk | ZeroRun ... RestoreEnd {chunks}
//! ```
//!
//! A read never creates a volume and never writes the store. Chunk contents
//! as of point `id` come from the point's undo logs where they hold the
//! chunk, from the replica otherwise. Memory per session is bounded: one
//! read buffer of [`READ_BYTES_MAX`] plus [`FRAMES_BYTES_MAX`] of frames
//! queued for the data stream.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::block::{Device, DeviceKind, DirectIo, OpenOptions as DevOpen};
use crate::config;
use crate::protocol::{
    self, Frame, Hello, HelloAck, ReplicaState, CHANGED_WORDS_PER_BATCH, DIGESTS_PER_BATCH,
    ZERO_RUN_CHUNKS_MAX,
};
use crate::recovery::points::Points;
use crate::track::files::read_valid_toml;
use crate::track::ZeroDigests;
use crate::transport::stream::{FrameReceiver, FrameSender, Link, LinkError};

use super::store::{Store, VolumeLock, VolumeMeta};

/// Bytes of the replica read at once (runs of adjacent chunks).
pub const READ_BYTES_MAX: usize = 1 << 20;
/// Bytes of chunk frames queued between the reader thread and the data stream.
pub const FRAMES_BYTES_MAX: usize = 4 << 20;
/// How long the client may take to send its request.
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

type SessionResult = std::result::Result<(), String>;

/// Serve one read session; `Err` is the message the session ends with (it
/// was sent to the client as an `Error` frame as well).
pub async fn serve_read(
    link: &Link,
    store: Arc<Store>,
    hello: Hello,
    peer: String,
    mut ctl_tx: FrameSender,
    ctl_rx: FrameReceiver,
) -> SessionResult {
    let r = serve(link, store, &hello, &peer, &mut ctl_tx, ctl_rx).await;
    match r {
        Ok(()) => {
            ctl_tx
                .finish_and_wait(std::time::Duration::from_secs(5))
                .await;
            tracing::info!(%peer, volume = %hello.volume, "restore session done");
            Ok(())
        }
        Err(msg) => super::refuse(&mut ctl_tx, msg).await,
    }
}

/// What the session reads from, opened under the volume's lock.
struct Opened {
    _lock: VolumeLock,
    meta: VolumeMeta,
    ack: HelloAck,
    device: Device,
}

async fn serve(
    link: &Link,
    store: Arc<Store>,
    hello: &Hello,
    peer: &str,
    ctl_tx: &mut FrameSender,
    mut ctl_rx: FrameReceiver,
) -> SessionResult {
    let name = hello.volume.clone();
    config::validate_volume_name(&name)?;
    tracing::info!(%peer, volume = %name, "restore session");
    let (st, n2, p2) = (store.clone(), name.clone(), peer.to_string());
    let opened = tokio::task::spawn_blocking(move || open(&st, &n2, &p2))
        .await
        .map_err(|e| format!("internal error: {e}"))??;
    ctl_tx
        .send(&Frame::HelloAck(opened.ack.clone()))
        .await
        .map_err(|e| e.to_string())?;

    let (point, digests) = match tokio::time::timeout(REQUEST_TIMEOUT, ctl_rx.recv()).await {
        Err(_) => return Err("restore: no request within 60 s".into()),
        Ok(Ok(Some(Frame::RestoreRequest { point, digests }))) => (point, digests),
        Ok(Ok(Some(Frame::Error { message }))) => {
            return Err(format!("restore client reported: {message}"))
        }
        Ok(Ok(Some(other))) => {
            return Err(format!(
                "protocol error: expected RestoreRequest, got {}",
                other.name()
            ))
        }
        Ok(Ok(None)) | Ok(Err(LinkError::Closed(_))) => return Ok(()),
        Ok(Err(e)) => return Err(format!("control stream: {e}")),
    };
    let dir = store.dir().to_path_buf();
    let source = tokio::task::spawn_blocking(move || Source::new(&dir, &name, opened, point))
        .await
        .map_err(|e| format!("internal error: {e}"))??;
    let source = Arc::new(source);
    ctl_tx
        .send(&Frame::RestoreReady { point })
        .await
        .map_err(|e| e.to_string())?;
    tracing::info!(volume = %source.name, point, digests, "restore accepted");

    if digests {
        let (tx, mut rx) = mpsc::channel::<Frame>(4);
        let src = source.clone();
        let worker = std::thread::Builder::new()
            .name(format!("restore-digests-{}", source.name))
            .spawn(move || src.send_digests(&tx))
            .map_err(|e| format!("cannot start a reader thread: {e}"))?;
        let mut sent: SessionResult = Ok(());
        while let Some(f) = rx.recv().await {
            if let Err(e) = ctl_tx.send(&f).await {
                sent = Err(e.to_string());
                break;
            }
        }
        drop(rx);
        let read = tokio::task::spawn_blocking(move || worker.join())
            .await
            .map_err(|e| format!("internal error: {e}"))?
            .unwrap_or_else(|_| Err("the digest thread panicked".into()));
        if let Err(e) = sent {
            // The client went away: nothing to tell it.
            tracing::debug!("restore: sending digests: {e}");
            return Ok(());
        }
        read?;
    }

    // Requests arrive on the control stream, chunks leave on a data stream.
    let (cmd_tx, cmd_rx) = mpsc::channel::<Cmd>(4);
    let ctl_task = tokio::spawn(async move {
        loop {
            let cmd = match ctl_rx.recv().await {
                Ok(Some(Frame::ReadChunks { first_word, words })) => {
                    Cmd::Words { first_word, words }
                }
                Ok(Some(Frame::ReadEnd { chunks })) => Cmd::End { chunks },
                Ok(Some(Frame::Error { message })) => {
                    return Err(format!("restore client reported: {message}"))
                }
                Ok(Some(other)) => {
                    return Err(format!(
                        "protocol error: unexpected {} frame in a restore session",
                        other.name()
                    ))
                }
                Ok(None) | Err(LinkError::Closed(_)) => return Ok(()),
                Err(e) => return Err(format!("control stream: {e}")),
            };
            let end = matches!(cmd, Cmd::End { .. });
            if cmd_tx.send(cmd).await.is_err() || end {
                return Ok(());
            }
        }
    });
    let frames_cap = (FRAMES_BYTES_MAX / source.chunk_bytes as usize).max(2);
    let (out_tx, mut out_rx) = mpsc::channel::<Frame>(frames_cap);
    let src = source.clone();
    let worker = std::thread::Builder::new()
        .name(format!("restore-{}", source.name))
        .spawn(move || src.send_chunks(cmd_rx, &out_tx))
        .map_err(|e| format!("cannot start a reader thread: {e}"))?;
    let mut data = link.open_data().await.map_err(|e| e.to_string())?;
    let mut sent: SessionResult = Ok(());
    while let Some(f) = out_rx.recv().await {
        if let Err(e) = data.send(&f).await {
            sent = Err(e.to_string());
            break;
        }
    }
    drop(out_rx);
    let read = tokio::task::spawn_blocking(move || worker.join())
        .await
        .map_err(|e| format!("internal error: {e}"))?
        .unwrap_or_else(|_| Err("the reader thread panicked".into()));
    let ctl = if ctl_task.is_finished() {
        ctl_task.await.unwrap_or(Ok(()))
    } else {
        ctl_task.abort();
        Ok(())
    };
    ctl?;
    if let Err(e) = sent {
        tracing::debug!("restore: sending chunks: {e}");
        return Ok(());
    }
    let chunks = read?;
    data.send(&Frame::RestoreEnd { chunks })
        .await
        .map_err(|e| e.to_string())?;
    data.finish_and_wait(std::time::Duration::from_secs(30))
        .await;
    Ok(())
}

/// Lock the volume and read what a restore needs. Nothing is created for an
/// unknown volume (the lock file only once the volume is known to exist).
fn open(store: &Store, name: &str, peer: &str) -> std::result::Result<Opened, String> {
    let meta_path = store.dir().join(format!("{name}.meta"));
    let exists = |m: Option<VolumeMeta>| {
        m.ok_or_else(|| format!("volume {name} does not exist on this mirror"))
    };
    exists(read_valid_toml::<VolumeMeta>(&meta_path).map_err(|e| e.to_string())?)?;
    // Registered under its own name: a restore is never mistaken for a stale
    // session of the same node's sync (and never ends one).
    let lock = store.lock_for_read(name, &format!("restore:{peer}"))?;
    let meta = exists(read_valid_toml::<VolumeMeta>(&meta_path).map_err(|e| e.to_string())?)?;
    // Its format and geometry were checked as it was read.
    let vb = meta.volume_bytes;
    let img = store.dir().join(format!("{name}.img"));
    let device = Device::open(
        &img,
        &DevOpen {
            write: false,
            direct: DirectIo::Off,
        },
    )
    .map_err(|e| format!("volume {name}: cannot open its replica: {e}"))?;
    let fits = match device.kind() {
        DeviceKind::BlockDevice => device.size_bytes() >= vb,
        DeviceKind::RegularFile => device.size_bytes() == vb,
    };
    if !fits {
        return Err(format!(
            "volume {name}: replica {} has {} bytes, its metadata says {vb}",
            img.display(),
            device.size_bytes()
        ));
    }
    let ack = meta
        .hello_ack(&meta_path, false, 0)
        .map_err(|e| e.to_string())?;
    Ok(Opened {
        _lock: lock,
        meta,
        ack,
        device,
    })
}

/// Requests from the control stream to the reader thread.
enum Cmd {
    Words { first_word: u64, words: Vec<u64> },
    End { chunks: u64 },
}

/// The contents of one volume as of one point.
struct Source {
    name: String,
    /// Holds the volume while the session reads it.
    _lock: VolumeLock,
    device: Device,
    volume_bytes: u64,
    chunk_bytes: u32,
    chunks: u64,
    zeros: ZeroDigests,
    /// Ranges of the replica that may hold data (the rest reads as zeros).
    data: Vec<(u64, u64)>,
    /// The point's undo logs and the sorted chunks they may hold.
    point: Option<(Points, u64, Vec<u64>)>,
}

/// One step of a walk over chunks.
enum Item<'a> {
    /// Chunks `first..first+count` read as zeros (replica holes).
    Holes {
        first: u64,
        count: u64,
    },
    Data {
        index: u64,
        data: &'a [u8],
    },
}

impl Source {
    fn new(
        store_dir: &Path,
        name: &str,
        opened: Opened,
        point: u64,
    ) -> std::result::Result<Source, String> {
        let Opened {
            _lock,
            meta,
            device,
            ..
        } = opened;
        let vb = meta.volume_bytes;
        let cb = meta.chunk_bytes;
        let point = if point == 0 {
            if meta.state == ReplicaState::Inconsistent {
                return Err(if meta.undo_point != 0 {
                    format!(
                        "volume {name}: the replica is Inconsistent (a sync or resync is half applied); \
                         its last consistent state is recovery point {}: restore with --point {}",
                        meta.undo_point, meta.undo_point
                    )
                } else {
                    format!(
                        "volume {name}: the replica is Inconsistent (a sync or resync is half applied) \
                         and has no consistent state to restore; complete a sync first"
                    )
                });
            }
            None
        } else {
            let points = Points::open(store_dir, name, vb, cb)
                .map_err(|e| format!("volume {name}: recovery points: {e}"))?;
            if points.get(point).is_none() {
                let ids: Vec<String> = points.list().iter().map(|p| p.id.to_string()).collect();
                return Err(if ids.is_empty() {
                    format!(
                        "volume {name} has no recovery point {point}: it has no recovery points"
                    )
                } else {
                    format!(
                        "volume {name} has no recovery point {point}; its points are: {}",
                        ids.join(", ")
                    )
                });
            }
            let changed = points
                .changed_since(point)
                .map_err(|e| format!("volume {name}: recovery point {point}: {e}"))?;
            Some((points, point, changed))
        };
        let data = device
            .data_ranges(0, vb)
            .map_err(|e| format!("volume {name}: reading the replica's layout: {e}"))?;
        Ok(Source {
            name: name.to_string(),
            _lock,
            device,
            volume_bytes: vb,
            chunk_bytes: cb,
            chunks: config::chunk_count(vb, cb),
            zeros: ZeroDigests::new(vb, cb),
            data,
            point,
        })
    }

    fn chunk_len(&self, i: u64) -> u32 {
        config::chunk_len(self.volume_bytes, self.chunk_bytes, i)
    }

    fn in_point(&self, i: u64) -> bool {
        self.point
            .as_ref()
            .is_some_and(|(_, _, c)| c.binary_search(&i).is_ok())
    }

    /// Whether chunk `i` of the replica may hold data (else: a hole).
    fn replica_has_data(&self, i: u64) -> bool {
        let s = i * self.chunk_bytes as u64;
        let e = s + self.chunk_len(i) as u64;
        // First range ending after s.
        let k = self.data.partition_point(|&(o, l)| o + l <= s);
        k < self.data.len() && self.data[k].0 < e
    }

    fn is_hole(&self, i: u64) -> bool {
        !self.in_point(i) && !self.replica_has_data(i)
    }

    /// Visit chunks `first..first+count` in order as of the point: holes in
    /// runs, other chunks with their contents (adjacent replica chunks are
    /// read together, at most [`READ_BYTES_MAX`] at once).
    fn walk(
        &self,
        first: u64,
        count: u64,
        buf: &mut Vec<u8>,
        f: &mut dyn FnMut(Item<'_>) -> std::result::Result<(), String>,
    ) -> std::result::Result<(), String> {
        let cb = self.chunk_bytes as u64;
        let end = first + count;
        let per_read = (READ_BYTES_MAX as u64 / cb).max(1);
        let mut i = first;
        while i < end {
            if self.is_hole(i) {
                let mut j = i + 1;
                while j < end && j - i < ZERO_RUN_CHUNKS_MAX && self.is_hole(j) {
                    j += 1;
                }
                f(Item::Holes {
                    first: i,
                    count: j - i,
                })?;
                i = j;
                continue;
            }
            let mut j = i + 1;
            while j < end && j - i < per_read && !self.is_hole(j) {
                j += 1;
            }
            let start = i * cb;
            let len = ((j * cb).min(self.volume_bytes) - start) as usize;
            let need_replica = (i..j).any(|k| !self.in_point(k));
            if need_replica {
                buf.resize(len, 0);
                self.device
                    .file()
                    .read_exact_at(&mut buf[..len], start)
                    .map_err(|e| {
                        format!(
                            "volume {}: reading the replica at offset {start} ({len} bytes): {e}",
                            self.name
                        )
                    })?;
            }
            for k in i..j {
                let l = self.chunk_len(k) as usize;
                let old = match &self.point {
                    Some((points, id, _)) if self.in_point(k) => {
                        points.chunk_at(*id, k).map_err(|e| {
                            format!("volume {}: recovery point {id}, chunk {k}: {e}", self.name)
                        })?
                    }
                    _ => None,
                };
                match old {
                    Some(v) if v.len() != l => {
                        return Err(format!(
                            "volume {}: the undo log holds {} bytes for chunk {k}, which has {l}",
                            self.name,
                            v.len()
                        ))
                    }
                    Some(v) => f(Item::Data { index: k, data: &v })?,
                    None => {
                        let off = ((k - i) * cb) as usize;
                        f(Item::Data {
                            index: k,
                            data: &buf[off..off + l],
                        })?
                    }
                }
            }
            i = j;
        }
        Ok(())
    }

    /// Every chunk's digest as of the point, in `DigestBatch` frames.
    fn send_digests(&self, tx: &mpsc::Sender<Frame>) -> SessionResult {
        let mut batch: Vec<u128> = Vec::with_capacity(DIGESTS_PER_BATCH as usize);
        let mut first = 0u64;
        let mut buf = Vec::new();
        let flush = |batch: &mut Vec<u128>, first: &mut u64| -> SessionResult {
            if batch.is_empty() {
                return Ok(());
            }
            let digests = std::mem::replace(batch, Vec::with_capacity(DIGESTS_PER_BATCH as usize));
            let n = digests.len() as u64;
            tx.blocking_send(Frame::DigestBatch {
                first: *first,
                digests,
            })
            .map_err(|_| "restore: the client went away".to_string())?;
            *first += n;
            Ok(())
        };
        let push = |d: u128, batch: &mut Vec<u128>, first: &mut u64| -> SessionResult {
            batch.push(d);
            if batch.len() == DIGESTS_PER_BATCH as usize {
                flush(batch, first)?;
            }
            Ok(())
        };
        self.walk(0, self.chunks, &mut buf, &mut |item| match item {
            Item::Holes { first: h, count } => {
                for i in h..h + count {
                    push(self.zeros.of(i), &mut batch, &mut first)?;
                }
                Ok(())
            }
            Item::Data { data, .. } => push(protocol::digest(data), &mut batch, &mut first),
        })?;
        flush(&mut batch, &mut first)
    }

    /// Serve `ReadChunks` requests until `ReadEnd`; returns the chunks sent.
    fn send_chunks(
        &self,
        mut cmds: mpsc::Receiver<Cmd>,
        out: &mpsc::Sender<Frame>,
    ) -> std::result::Result<u64, String> {
        let words_total = self.chunks.div_ceil(64);
        let mut next_word = 0u64;
        let mut requested = 0u64;
        let mut sent = 0u64;
        let mut buf = Vec::new();
        let gone = || "restore: the client went away".to_string();
        loop {
            let Some(cmd) = cmds.blocking_recv() else {
                return Err("restore: the request ended without ReadEnd".into());
            };
            let (first_word, words) = match cmd {
                Cmd::End { chunks } if chunks == requested => return Ok(sent),
                Cmd::End { chunks } => {
                    return Err(format!(
                        "protocol error: ReadEnd says {chunks} chunks, {requested} were asked for"
                    ))
                }
                Cmd::Words { first_word, words } => (first_word, words),
            };
            let n = words.len() as u64;
            if n == 0 || n > CHANGED_WORDS_PER_BATCH as u64 {
                return Err(format!("protocol error: ReadChunks with {n} words"));
            }
            if first_word < next_word || first_word + n > words_total {
                return Err(format!(
                    "protocol error: ReadChunks for words {first_word}..{} (expected ascending words from {next_word}, the volume has {words_total})",
                    first_word + n
                ));
            }
            let tail = self.chunks % 64;
            if first_word + n == words_total && tail != 0 && words[n as usize - 1] >> tail != 0 {
                return Err(format!(
                    "protocol error: ReadChunks asks for chunks beyond the volume ({} chunks)",
                    self.chunks
                ));
            }
            next_word = first_word + n;
            // Runs of adjacent requested chunks.
            let mut run: Option<(u64, u64)> = None;
            let mut runs: Vec<(u64, u64)> = Vec::new();
            for (k, &w) in words.iter().enumerate() {
                let mut b = w;
                while b != 0 {
                    let i = (first_word + k as u64) * 64 + b.trailing_zeros() as u64;
                    b &= b - 1;
                    requested += 1;
                    match &mut run {
                        Some((s, c)) if *s + *c == i => *c += 1,
                        _ => {
                            if let Some(r) = run.take() {
                                runs.push(r);
                            }
                            run = Some((i, 1));
                        }
                    }
                }
            }
            runs.extend(run);
            for (first, count) in runs {
                self.walk(first, count, &mut buf, &mut |item| {
                    let f = match item {
                        Item::Holes { first, count } => {
                            sent += count;
                            Frame::ZeroRun { first, count }
                        }
                        Item::Data { index, data } => {
                            sent += 1;
                            let d = protocol::digest(data);
                            Frame::Chunk(protocol::seal_chunk(
                                index,
                                data.to_vec(),
                                d,
                                self.zeros.of(index),
                                true,
                            ))
                        }
                    };
                    out.blocking_send(f).map_err(|_| gone())
                })?;
            }
        }
    }
}
