//! The sync pipeline:
//!
//! ```text
//! reader thread (io_uring, merged reads, xxh3, decide) ─┬─ zero markers ──────────────┐
//!                                                       └─ jobs ─► lz4 workers ─► frames ─► sender (QUIC data stream)
//! control stream ◄── barrier acks ── checkpoint (map + bitmap, crash-safe order)
//! ```
//!
//! Every chunk whose bit is set for this peer, or whose digest differs from
//! the digest map, is sent. Barriers every `barrier_bytes` make what was sent
//! durable on the mirror; only then are the map and bitmap updated, so an
//! interrupted sync resumes where it stopped.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{mpsc as smpsc, Arc, Mutex};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::sync::mpsc;

use crate::block::{Device, DirectIo, Engine, EngineConfig, EnginePreference, OpenOptions};
use crate::config::{self, SyncLimits, FRAME_PAYLOAD_BYTES_MAX};
use crate::error::{Error, Result};
use crate::protocol::{
    self, ChunkFrame, Encoding, Frame, Hello, HELLO_FLAG_REINIT, HELLO_FLAG_RESIZE,
};
use crate::track::files::id_hex;
use crate::track::ZeroDigests;
use crate::transport::stream::{FrameReceiver, Link, LinkError, CLOSE_OK};
use crate::transport::{self, Fingerprint, Identity, Tuning};

use super::barriers::Barriers;
use super::state::{PeerRecord, PrimaryState};

pub struct SyncOptions {
    pub source: PathBuf,
    pub identity: Identity,
    pub to: String,
    pub peer: Fingerprint,
    pub volume: String,
    pub full: bool,
    pub checksum: bool,
    pub chunk_bytes: Option<u64>,
    pub state_dir: PathBuf,
    pub resize: bool,
    pub limits: SyncLimits,
    pub engine: EnginePreference,
    pub tuning: Tuning,
    pub progress: bool,
    /// lz4 where it shrinks a chunk (off: raw, for links faster than lz4).
    pub compress: bool,
    /// Compress every chunk; otherwise (adaptive) only while the link
    /// carries less than [`COMPRESS_BELOW_BYTES_PER_SEC`].
    pub compress_always: bool,
    /// Only report what the connect would decide (`--dry-run`).
    pub dry_run: bool,
    /// What to do when both sides wrote since they parted.
    pub split_brain: crate::protocol::genid::SplitBrainPolicy,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct SyncReport {
    pub volume: String,
    pub mode: &'static str,
    pub chunks_total: u64,
    pub chunks_sent: u64,
    pub chunks_zero: u64,
    pub bytes_read: u64,
    pub bytes_on_wire: u64,
    pub seconds: f64,
    pub chunk_bytes: u32,
    pub volume_bytes: u64,
    pub engine: String,
    pub replica_state: String,
    /// What the connect decided (generation ids, changed chunks).
    pub decision: String,
}

pub(crate) fn link_err(e: LinkError) -> Error {
    match e {
        LinkError::Protocol(p) => Error::Protocol(p),
        LinkError::Closed(m) => Error::ConnectionLost(m),
        LinkError::Truncated => {
            Error::ConnectionLost("stream ended in the middle of a frame".into())
        }
    }
}

/// Resolve `HOST:PORT`.
pub async fn resolve(to: &str) -> Result<SocketAddr> {
    if let Ok(a) = to.parse::<SocketAddr>() {
        return Ok(a);
    }
    let mut it = tokio::net::lookup_host(to).await.map_err(|e| {
        Error::Config(format!(
            "cannot resolve mirror address {to:?}: {e} (expected HOST:PORT)"
        ))
    })?;
    it.next()
        .ok_or_else(|| Error::Config(format!("mirror address {to:?} resolves to nothing")))
}

/// Control frames, read by a dedicated task (reads are not cancel-safe).
pub(crate) fn spawn_control_reader(
    mut rx: FrameReceiver,
) -> mpsc::Receiver<std::result::Result<Frame, LinkError>> {
    let (tx, out) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let r = rx.recv().await;
            let stop = !matches!(r, Ok(Some(_)));
            let item = match r {
                Ok(Some(f)) => Ok(f),
                Ok(None) => Err(LinkError::Closed("mirror closed the control stream".into())),
                Err(e) => Err(e),
            };
            if tx.send(item).await.is_err() || stop {
                return;
            }
        }
    });
    out
}

pub(crate) async fn next_control(
    rx: &mut mpsc::Receiver<std::result::Result<Frame, LinkError>>,
) -> Result<Frame> {
    match rx.recv().await {
        // A mirror that stops ends its sessions with this message after its
        // last acknowledgement: the link is lost, nothing was refused.
        Some(Ok(Frame::Error { message })) if message == crate::mirror::SHUTTING_DOWN => {
            Err(Error::ConnectionLost(message))
        }
        Some(Ok(Frame::Error { message })) => Err(Error::Refused(message)),
        Some(Ok(f)) => Ok(f),
        Some(Err(e)) => Err(link_err(e)),
        None => Err(Error::ConnectionLost("control stream ended".into())),
    }
}

/// The digests of chunks `0..chunks` from the mirror's `DigestBatch`
/// frames, in order, each batch checked against what is still expected.
pub(crate) async fn collect_digests(
    ctl: &mut mpsc::Receiver<std::result::Result<Frame, LinkError>>,
    chunks: u64,
) -> Result<Vec<u128>> {
    let mut digests: Vec<u128> = Vec::with_capacity(chunks as usize);
    while (digests.len() as u64) < chunks {
        match next_control(ctl).await? {
            Frame::DigestBatch { first, digests: d } => {
                if first != digests.len() as u64 || d.is_empty() || first + d.len() as u64 > chunks
                {
                    return Err(Error::Protocol(protocol::ProtocolError::Malformed {
                        kind: "DigestBatch",
                        reason: format!(
                            "batch at chunk {first} with {} digests, expected chunk {} of {chunks}",
                            d.len(),
                            digests.len()
                        ),
                    }));
                }
                digests.extend_from_slice(&d);
            }
            other => return Err(Error::unexpected(&other, "collecting digests")),
        }
    }
    Ok(digests)
}

/// What the reader and the workers hand to the sender.
enum Out {
    Chunk(ChunkFrame),
    ZeroRun { first: u64, count: u64 },
}

/// Adaptive compression: lz4 is used while the link accepts less than this
/// (about 2 Gbit/s). Faster links (loopback, 10 GbE) get raw chunks: on them
/// lz4 costs more CPU time than it saves wire time.
pub const COMPRESS_BELOW_BYTES_PER_SEC: u64 = 256 << 20;

/// Chunks recorded per barrier at most (bounds the pending list).
const BARRIER_CHUNKS_MAX: usize = 1 << 20;

/// The mirror's own explanation after a failure, if it sends one soon.
async fn mirror_reason(
    ctl: &mut mpsc::Receiver<std::result::Result<Frame, LinkError>>,
) -> Option<Error> {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(3);
    loop {
        match tokio::time::timeout_at(deadline, next_control(ctl)).await {
            Err(_) => return None,
            Ok(Ok(_)) => continue,
            Ok(Err(e @ Error::Refused(_))) => return Some(e),
            Ok(Err(Error::ConnectionLost(m)))
                if !m.contains("stopped by peer") && !m.contains("control stream ended") =>
            {
                return Some(Error::ConnectionLost(m))
            }
            Ok(Err(_)) => return None,
        }
    }
}

struct Job {
    index: u64,
    digest: u128,
    data: Vec<u8>,
}

pub async fn run_sync(opts: SyncOptions) -> Result<SyncReport> {
    let started = Instant::now();
    opts.limits.validate()?;
    config::validate_volume_name(&opts.volume).map_err(Error::Config)?;
    if opts.full && opts.checksum {
        return Err(Error::Config(
            "--full and --checksum exclude each other".into(),
        ));
    }
    let source = Device::open(
        &opts.source,
        &OpenOptions {
            write: false,
            direct: DirectIo::Auto,
        },
    )?;
    let volume_bytes = source.size_bytes();
    if volume_bytes == 0 {
        return Err(Error::Config(format!(
            "source {} is empty",
            opts.source.display()
        )));
    }
    if volume_bytes % 512 != 0 {
        return Err(Error::Config(format!(
            "source {} has {volume_bytes} bytes, not a multiple of 512",
            opts.source.display()
        )));
    }
    let lbs = source.logical_block_bytes();
    let chunk_req = match opts.chunk_bytes {
        Some(c) => Some(config::validate_chunk_bytes(c, lbs)?),
        None => None,
    };
    let st = PrimaryState::open(
        &opts.state_dir,
        &opts.volume,
        &opts.source,
        volume_bytes,
        chunk_req,
        opts.full,
        opts.resize,
    )?;
    let chunk_bytes = config::validate_chunk_bytes(st.vol.chunk_bytes as u64, lbs)?;
    let chunks = st.map.len();
    let source_id = st.source_id();

    // Connect and introduce the volume.
    let addr = resolve(&opts.to).await?;
    let bind: SocketAddr = if addr.is_ipv6() {
        "[::]:0"
            .parse()
            .map_err(|_| Error::Other("bad bind address".into()))?
    } else {
        "0.0.0.0:0"
            .parse()
            .map_err(|_| Error::Other("bad bind address".into()))?
    };
    let endpoint = transport::client_endpoint(&opts.identity, bind, &opts.tuning)?;
    let conn = transport::connect(&endpoint, addr, &opts.peer, &opts.tuning).await?;
    let link = Link::new(conn, FRAME_PAYLOAD_BYTES_MAX);
    let result = sync_on_link(
        &opts,
        &link,
        source,
        st,
        chunk_bytes,
        chunks,
        source_id,
        started,
    )
    .await;
    match &result {
        Ok(_) => link.close(CLOSE_OK, "done"),
        Err(e) => link.close(crate::transport::stream::CLOSE_ERROR, &e.to_string()),
    }
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), endpoint.wait_idle()).await;
    result
}

#[allow(clippy::too_many_arguments)]
async fn sync_on_link(
    opts: &SyncOptions,
    link: &Link,
    source: Device,
    mut st: PrimaryState,
    chunk_bytes: u32,
    chunks: u64,
    source_id: u128,
    started: Instant,
) -> Result<SyncReport> {
    let volume_bytes = source.size_bytes();
    let (mut ctl_tx, ctl_rx) = link.open_control().await.map_err(link_err)?;
    let mut ctl = spawn_control_reader(ctl_rx);
    let mut flags = 0;
    if opts.resize {
        flags |= HELLO_FLAG_RESIZE;
    }
    if opts.full {
        flags |= HELLO_FLAG_REINIT;
    }
    if opts.dry_run {
        flags |= crate::protocol::HELLO_FLAG_PROBE;
    }
    ctl_tx
        .send(&Frame::Hello(Hello {
            volume: opts.volume.clone(),
            volume_bytes,
            chunk_bytes,
            flags,
            source_id,
        }))
        .await
        .map_err(link_err)?;
    let ack = match tokio::time::timeout(std::time::Duration::from_secs(60), next_control(&mut ctl))
        .await
    {
        Err(_) => {
            return Err(Error::ConnectionLost(
                "mirror did not answer the hello within 60 s".into(),
            ))
        }
        Ok(r) => match r.map_err(|e| match e {
            // The mirror closes the connection with its reason when it
            // refuses a volume; that is a refusal, not a lost link.
            Error::ConnectionLost(m) => Error::Refused(m),
            other => other,
        })? {
            Frame::HelloAck(a) => a,
            other => return Err(Error::unexpected(&other, "waiting for HelloAck")),
        },
    };
    if ack.volume_bytes != volume_bytes || ack.chunk_bytes != chunk_bytes {
        return Err(Error::Refused(format!(
            "mirror answered with geometry {} bytes / {}-byte chunks, expected {volume_bytes} / {chunk_bytes}",
            ack.volume_bytes, ack.chunk_bytes
        )));
    }

    // Decide what to send: generation ids and both sides' changed chunks.
    let fp = opts.peer.to_string();
    let slot = st.bitmap.peer_slot(&opts.peer.0)?;
    let target_words = super::connect::read_changed(&mut ctl, &ack, chunks).await?;
    let planned = super::connect::plan(
        &st,
        slot,
        &fp,
        &opts.volume,
        &ack,
        target_words,
        !st.peer(&fp).is_some_and(|r| r.tracked && r.synced),
        opts.split_brain,
    );
    if opts.dry_run {
        let line = match &planned {
            Ok(p) => p.describe(&opts.volume),
            Err(e) => format!("volume {}: refused: {e}", opts.volume),
        };
        let union = planned.as_ref().map_or(0, |p| p.union);
        return Ok(SyncReport {
            volume: opts.volume.clone(),
            mode: "dry-run",
            chunks_total: chunks,
            chunks_sent: union,
            chunks_zero: 0,
            bytes_read: 0,
            bytes_on_wire: 0,
            seconds: started.elapsed().as_secs_f64(),
            chunk_bytes,
            volume_bytes,
            engine: String::new(),
            replica_state: ack.state.to_string(),
            decision: line,
        });
    }
    let plan = planned?;
    let decision_line = plan.describe(&opts.volume);
    tracing::info!("{decision_line}");
    if plan.takeover {
        super::connect::take_over(&mut ctl_tx, &mut ctl).await?;
    }
    let rec = st.peer(&fp).cloned();
    let replica_id = id_hex(ack.replica_id);
    // The mirror holds a state of this lineage (a split brain won here
    // counts: its own changes are in `target_words`).
    let lineage_known = plan.takeover
        || matches!(
            plan.decision,
            crate::protocol::genid::Decision::Resync { .. }
                | crate::protocol::genid::Decision::InSync
        );
    // The target's own changes are resent whatever the digests say.
    for (w, &bits) in plan.target_words.iter().enumerate() {
        let mut b = bits;
        while b != 0 {
            let i = w as u64 * 64 + b.trailing_zeros() as u64;
            b &= b - 1;
            if i < chunks {
                st.bitmap.set(slot, i);
            }
        }
    }
    // The same replica as the last, unfinished, sync: its bits say what is
    // left (resume).
    let same_replica = rec.as_ref().is_some_and(|r| {
        r.replica_id == replica_id
            && !ack.created
            && (ack.source_id == 0 || ack.source_id == source_id)
    });
    let synced = rec.as_ref().is_some_and(|r| r.synced);
    let mode: &'static str = if opts.checksum {
        "checksum"
    } else if opts.full || !(lineage_known || same_replica && !synced) {
        st.bitmap.set_all(slot);
        "full"
    } else if !synced {
        "full"
    } else {
        "scan"
    };
    st.save_bitmap()?;
    st.set_peer(PeerRecord {
        fingerprint: fp.clone(),
        replica_id,
        synced: mode == "scan",
        generation: rec.as_ref().map_or(0, |r| r.generation),
        last_sync_unix: rec.as_ref().map_or(0, |r| r.last_sync_unix),
        tracked: false,
    })?;
    tracing::info!(volume = %opts.volume, mode, dirty = st.bitmap.count(slot), "sync starting");

    if opts.checksum {
        ctl_tx
            .send(&Frame::DigestRequest {
                first: 0,
                count: chunks,
            })
            .await
            .map_err(link_err)?;
        let digests = collect_digests(&mut ctl, chunks).await?;
        tokio::task::block_in_place(|| st.adopt_peer_digests(slot, &digests))?;
    }

    let zeros = ZeroDigests::new(volume_bytes, chunk_bytes);
    let st = Arc::new(Mutex::new(st));
    let progress = if opts.progress {
        let pb = ProgressBar::with_draw_target(Some(volume_bytes), ProgressDrawTarget::stderr());
        if let Ok(style) = ProgressStyle::with_template(
            "{spinner} {msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        ) {
            pb.set_style(style.progress_chars("=> "));
        }
        pb.set_message(format!("{} ({mode})", opts.volume));
        pb
    } else {
        ProgressBar::hidden()
    };

    // Pipeline.
    let limits = opts.limits.clone();
    let (frame_tx, mut frame_rx) = mpsc::channel::<Out>(limits.chunks_in_flight_max);
    let (job_tx, job_rx) = smpsc::sync_channel::<Job>(limits.chunks_in_flight_max);
    let job_rx = Arc::new(Mutex::new(job_rx));
    // Bytes per second the data stream accepted, measured by the sender
    // (unknown until the first window: start raw; the QUIC window fills
    // quickly even on a slow link, then the rate drops and lz4 starts).
    let link_rate = Arc::new(std::sync::atomic::AtomicU64::new(u64::MAX));
    let mut workers = Vec::new();
    for k in 0..limits.compress_threads {
        let rx = job_rx.clone();
        let tx = frame_tx.clone();
        let compress = opts.compress;
        let always = opts.compress_always;
        let rate = link_rate.clone();
        workers.push(
            std::thread::Builder::new()
                .name(format!("lz4-{k}"))
                .spawn(move || loop {
                    let job = match rx.lock() {
                        Ok(g) => g.recv(),
                        Err(_) => return,
                    };
                    let Ok(job) = job else { return };
                    let z = zeros.of(job.index);
                    let slow = rate.load(std::sync::atomic::Ordering::Relaxed)
                        < COMPRESS_BELOW_BYTES_PER_SEC;
                    let c = compress && (always || slow);
                    let f = protocol::seal_chunk(job.index, job.data, job.digest, z, c);
                    if tx.blocking_send(Out::Chunk(f)).is_err() {
                        return;
                    }
                })
                .map_err(|e| Error::Other(format!("cannot start worker thread: {e}")))?,
        );
    }
    // Only the workers hold the job receiver: when they stop (the sender
    // failed), the reader's next send fails instead of blocking forever.
    drop(job_rx);
    let reader = {
        let st = st.clone();
        let tx = frame_tx;
        let pb = progress.clone();
        let engine_pref = opts.engine;
        let limits = limits.clone();
        std::thread::Builder::new()
            .name("reader".into())
            .spawn(move || {
                reader_main(
                    source,
                    engine_pref,
                    &limits,
                    st,
                    slot,
                    zeros,
                    tx,
                    job_tx,
                    pb,
                )
            })
            .map_err(|e| Error::Other(format!("cannot start reader thread: {e}")))?
    };

    let mut data = link.open_data().await.map_err(link_err)?;
    let mut barriers = Barriers::new(
        limits.barrier_bytes,
        BARRIER_CHUNKS_MAX,
        limits.barriers_in_flight_max,
    );
    let mut chunks_sent = 0u64;
    let mut chunks_zero = 0u64;
    let mut frame_bytes = 0u64;

    let handle_ack = |f: Frame, barriers: &mut Barriers| -> Result<()> {
        match f {
            Frame::BarrierAck { seq } => {
                let list = barriers.handle_ack(seq)?;
                let st = st.clone();
                tokio::task::block_in_place(move || {
                    st.lock()
                        .map_err(|_| Error::Other("state lock poisoned".into()))?
                        .checkpoint(slot, &list)
                })
            }
            other => Err(Error::unexpected(&other, "syncing")),
        }
    };

    // Link rate: bytes over the time spent waiting in `send` (a send that
    // returns at once means the link keeps up), per 16 MiB window.
    let mut window = (std::time::Duration::ZERO, 0u64);
    let send_result: Result<()> = async {
        loop {
            if window.1 >= 16 << 20 {
                let r = (window.1 as f64 / window.0.as_secs_f64().max(1e-6)) as u64;
                link_rate.store(r, std::sync::atomic::Ordering::Relaxed);
                window = (std::time::Duration::ZERO, 0);
            }
            if barriers.must_wait() {
                let f = next_control(&mut ctl).await?;
                handle_ack(f, &mut barriers)?;
                continue;
            }
            tokio::select! {
                biased;
                f = next_control(&mut ctl) => handle_ack(f?, &mut barriers)?,
                m = frame_rx.recv() => {
                    match m {
                        Some(Out::Chunk(c)) => {
                            let (index, digest) = (c.index, c.digest);
                            if c.encoding == Encoding::Zero { chunks_zero += 1 } else { chunks_sent += 1 }
                            let t = Instant::now();
                            let n = data.send(&Frame::Chunk(c)).await.map_err(link_err)?;
                            window.0 += t.elapsed();
                            frame_bytes += n;
                            window.1 += n;
                            barriers.handle_sent([(index, digest)], n);
                        }
                        Some(Out::ZeroRun { first, count }) => {
                            let n = data.send(&Frame::ZeroRun { first, count }).await.map_err(link_err)?;
                            frame_bytes += n;
                            chunks_zero += count;
                            barriers.handle_sent((first..first + count).map(|i| (i, zeros.of(i))), n);
                        }
                        None => break,
                    }
                    if let Some(seq) = barriers.poll_barrier(false) {
                        data.send(&Frame::Barrier { seq }).await.map_err(link_err)?;
                    }
                }
            }
        }
        Ok(())
    }
    .await;

    // The reader's verdict decides whether the sync may complete.
    drop(frame_rx);
    let reader_result = tokio::task::spawn_blocking(move || {
        let r = reader.join();
        for w in workers {
            let _ = w.join();
        }
        r
    })
    .await
    .map_err(|e| Error::Other(format!("reader join: {e}")))?
    .unwrap_or_else(|_| Err(Error::Other("reader thread panicked".into())));
    progress.finish_and_clear();
    match send_result {
        Ok(()) => {}
        // A failed stream write usually means the mirror gave up: its reason
        // arrives on the control stream or with the connection close. An
        // error that already is the mirror's word is kept as it is.
        Err(e @ Error::ConnectionLost(_)) => {
            return Err(mirror_reason(&mut ctl).await.unwrap_or(e))
        }
        Err(e) => return Err(e),
    }
    let stats = reader_result?;

    // Final barrier: everything durable, then completion.
    if let Some(seq) = barriers.poll_barrier(true) {
        data.send(&Frame::Barrier { seq }).await.map_err(link_err)?;
    }
    data.finish();
    while barriers.outstanding() > 0 {
        let f = next_control(&mut ctl).await?;
        handle_ack(f, &mut barriers)?;
    }
    // The replica is about to hold this source's state as of this sync: a
    // new generation id, recorded here first (the old one stays in the
    // history, so a crash before the mirror records it still resolves).
    let generation: u64 = super::state::new_gen();
    {
        let mut g = st
            .lock()
            .map_err(|_| Error::Other("state lock poisoned".into()))?;
        let mut ids = g.vol.gen();
        ids.synced(generation);
        g.vol.set_gen(ids);
        tokio::task::block_in_place(|| g.save_volume())?;
    }
    let (root, dirty_left) = {
        let g = st
            .lock()
            .map_err(|_| Error::Other("state lock poisoned".into()))?;
        (g.map.root(), g.bitmap.count(slot))
    };
    if dirty_left != 0 {
        return Err(Error::Other(format!(
            "internal error: {dirty_left} chunks still dirty after the sync; not completing"
        )));
    }
    ctl_tx
        .send(&Frame::SyncDone {
            chunks,
            root,
            generation,
        })
        .await
        .map_err(link_err)?;
    let state = match next_control(&mut ctl).await? {
        Frame::SyncComplete { state } => state,
        other => return Err(Error::unexpected(&other, "waiting for SyncComplete")),
    };
    {
        let mut g = st
            .lock()
            .map_err(|_| Error::Other("state lock poisoned".into()))?;
        let rec = PeerRecord {
            fingerprint: fp,
            replica_id: id_hex(ack.replica_id),
            synced: true,
            generation,
            last_sync_unix: super::super::mirror::store::now_unix(),
            tracked: false,
        };
        tokio::task::block_in_place(|| g.set_peer(rec))?;
    }
    ctl_tx.finish();
    let seconds = started.elapsed().as_secs_f64();
    let wire = link.udp_bytes_sent().max(frame_bytes);
    metrics::counter!("blkmirror_sync_bytes_on_wire_total").increment(wire);
    metrics::counter!("blkmirror_sync_chunks_sent_total").increment(chunks_sent);
    metrics::counter!("blkmirror_sync_chunks_zero_total").increment(chunks_zero);
    metrics::counter!("blkmirror_sync_chunks_skipped_total")
        .increment(chunks - chunks_sent - chunks_zero);
    metrics::gauge!("blkmirror_sync_duration_seconds").set(seconds);
    metrics::gauge!("blkmirror_replica_state", "volume" => opts.volume.clone()).set(1.0);
    Ok(SyncReport {
        volume: opts.volume.clone(),
        mode,
        chunks_total: chunks,
        chunks_sent,
        chunks_zero,
        bytes_read: stats.bytes_read,
        bytes_on_wire: wire,
        seconds,
        chunk_bytes,
        volume_bytes,
        engine: stats.engine,
        replica_state: state.to_string(),
        decision: decision_line,
    })
}

#[allow(clippy::too_many_arguments)]
fn reader_main(
    source: Device,
    pref: EnginePreference,
    limits: &SyncLimits,
    st: Arc<Mutex<PrimaryState>>,
    slot: usize,
    zeros: ZeroDigests,
    frames: mpsc::Sender<Out>,
    jobs: smpsc::SyncSender<Job>,
    progress: ProgressBar,
) -> Result<ReaderStatsOut> {
    let vb = source.size_bytes();
    let cb = zeros.chunk_bytes as u64;
    let chunks = config::chunk_count(vb, zeros.chunk_bytes);
    let per_read = (limits.read_bytes_max as u64 / cb).max(1);
    let mut engine = Engine::new(
        &source,
        &EngineConfig {
            queue_depth: limits.queue_depth,
            buffer_bytes: (per_read * cb) as usize,
            buffer_count: limits.queue_depth as usize,
        },
        pref,
    )?;
    let engine_name = engine.name().to_string();
    let ranges = source.data_ranges(0, vb)?;
    let mut out = ReaderStatsOut {
        bytes_read: 0,
        engine: engine_name,
    };
    let mut ri = 0usize;
    let mut has_data = |i: u64| -> bool {
        let s = i * cb;
        let e = (s + cb).min(vb);
        while ri < ranges.len() && ranges[ri].0 + ranges[ri].1 <= s {
            ri += 1;
        }
        ri < ranges.len() && ranges[ri].0 < e
    };
    let send_zero = |i: u64, frames: &mpsc::Sender<Out>| -> Result<()> {
        let len = config::chunk_len(vb, zeros.chunk_bytes, i);
        frames
            .blocking_send(Out::Chunk(ChunkFrame {
                index: i,
                encoding: Encoding::Zero,
                raw_len: len,
                digest: zeros.of(i),
                payload: bytes::Bytes::new(),
            }))
            .map_err(|_| Error::ConnectionLost("sender stopped".into()))
    };
    // Holes that must be sent as zeros, merged into runs.
    let mut run: Option<(u64, u64)> = None;
    let flush_run = |run: &mut Option<(u64, u64)>, frames: &mpsc::Sender<Out>| -> Result<()> {
        if let Some((first, count)) = run.take() {
            frames
                .blocking_send(Out::ZeroRun { first, count })
                .map_err(|_| Error::ConnectionLost("sender stopped".into()))?;
        }
        Ok(())
    };

    let mut next = 0u64;
    // Completions returned by the engine and not yet digested. They are
    // digested one at a time, and the buffer each one frees goes back to the
    // disk (submitted at once) before the next is digested: digesting a whole
    // batch first left the disk idle for as long as that took, and a
    // differential sync read at two thirds of the disk's speed.
    let mut ready: std::collections::VecDeque<crate::block::Completion> =
        std::collections::VecDeque::new();
    loop {
        // Submit reads while there is room; handle holes inline.
        let submitted_before = engine.in_flight();
        while next < chunks && engine.in_flight() < engine.queue_depth() as usize {
            if !has_data(next) {
                let z = zeros.of(next);
                let need = {
                    let g = lock(&st)?;
                    g.bitmap.get(slot, next) || g.map.get(next) != z
                };
                if need {
                    match &mut run {
                        Some((first, count))
                            if *first + *count == next
                                && *count < protocol::ZERO_RUN_CHUNKS_MAX =>
                        {
                            *count += 1
                        }
                        _ => {
                            flush_run(&mut run, &frames)?;
                            run = Some((next, 1));
                        }
                    }
                } else {
                    flush_run(&mut run, &frames)?;
                }
                progress.inc(config::chunk_len(vb, zeros.chunk_bytes, next) as u64);
                next += 1;
                continue;
            }
            let Some(buf) = engine.acquire() else { break };
            let mut n = 1u64;
            while n < per_read && next + n < chunks && has_data(next + n) {
                n += 1;
            }
            let start = next * cb;
            let len = ((next + n) * cb).min(vb) - start;
            if let Err(e) = engine.submit_read(buf, start, len as usize, next) {
                engine.release(buf);
                return Err(e.into());
            }
            next += n;
        }
        if ready.is_empty() {
            if engine.in_flight() == 0 {
                if next >= chunks {
                    break;
                }
                continue;
            }
            flush_run(&mut run, &frames)?;
            ready.extend(engine.wait(1)?);
        } else if engine.in_flight() > submitted_before {
            engine.flush()?;
        }
        if let Some(c) = ready.pop_front() {
            let first = c.user_data;
            let buf = c.buf;
            let len = match c.result {
                Ok(n) => n,
                Err(e) => {
                    if let Some(b) = buf {
                        engine.release(b);
                    }
                    return Err(Error::Other(format!(
                        "reading source {} at offset {}: {e}",
                        source.path().display(),
                        first * cb
                    )));
                }
            };
            let Some(buf) = buf else { continue };
            out.bytes_read += len as u64;
            metrics::counter!("blkmirror_sync_bytes_read_total").increment(len as u64);
            let data = engine.buf(buf);
            let mut decisions: Vec<(u64, u128, usize, usize)> = Vec::new();
            {
                let g = lock(&st)?;
                let mut off = 0usize;
                let mut i = first;
                while off < len {
                    let l = (cb as usize).min(len - off);
                    let d = protocol::digest(&data[off..off + l]);
                    if g.bitmap.get(slot, i) || g.map.get(i) != d {
                        decisions.push((i, d, off, l));
                    }
                    off += l;
                    i += 1;
                }
            }
            for (i, d, off, l) in decisions {
                if d == zeros.of(i) && data[off..off + l].iter().all(|&b| b == 0) {
                    send_zero(i, &frames)?;
                } else {
                    jobs.send(Job {
                        index: i,
                        digest: d,
                        data: data[off..off + l].to_vec(),
                    })
                    .map_err(|_| Error::ConnectionLost("workers stopped".into()))?;
                }
            }
            progress.inc(len as u64);
            engine.release(buf);
        }
    }
    flush_run(&mut run, &frames)?;
    Ok(out)
}

fn lock(st: &Arc<Mutex<PrimaryState>>) -> Result<std::sync::MutexGuard<'_, PrimaryState>> {
    st.lock()
        .map_err(|_| Error::Other("state lock poisoned".into()))
}

struct ReaderStatsOut {
    bytes_read: u64,
    engine: String,
}
