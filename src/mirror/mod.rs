//! Mirror node: accepts authenticated connections and applies syncs to the
//! replicas in its store.

pub mod apply;
pub mod direct;
pub mod reader;
pub mod roles;
pub mod store;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::block::EnginePreference;
use crate::config::FRAME_PAYLOAD_BYTES_MAX;
use crate::error::{Error, Result};
use crate::protocol::{
    Frame, CHANGED_WORDS_PER_BATCH, HELLO_FLAG_LIVE, HELLO_FLAG_PROBE, HELLO_FLAG_SYNC_MODE,
};
use crate::transport::stream::{FrameReceiver, FrameSender, Link, LinkError, CLOSE_ERROR};
use crate::transport::{self, Fingerprint, Identity, Tuning};

pub use store::Store;

pub struct ServeConfig {
    pub identity: Identity,
    pub listen: SocketAddr,
    pub store: PathBuf,
    pub allow: Vec<Fingerprint>,
    pub queue_depth: u32,
    pub engine: EnginePreference,
    pub tuning: Tuning,
    /// Take a recovery point after each completed sync or resync.
    pub points_after_sync: bool,
    /// Take an automatic point of every consistent replica this often.
    pub point_every: Option<std::time::Duration>,
    /// Retention of automatic points (last, hourly, daily).
    pub keep: (u32, u32, u32),
    /// Asynchronous sessions: the longest time between two commits of the
    /// replica (fdatasync, then `Ack`) while writes arrive; flushes and FUA
    /// writes of the application commit at once.
    pub async_commit: std::time::Duration,
}

/// Default of [`ServeConfig::async_commit`]: five seconds, the commit
/// interval of ext4's journal and of ZFS's transaction groups (README, "The
/// commit interval").
pub const ASYNC_COMMIT_DEFAULT: std::time::Duration = std::time::Duration::from_secs(5);
/// Bounds of `serve --async-commit-ms`.
pub const ASYNC_COMMIT_MS_MIN: u64 = 100;
pub const ASYNC_COMMIT_MS_MAX: u64 = 60_000;

/// A running mirror server.
pub struct Server {
    endpoint: quinn::Endpoint,
    store: Arc<Store>,
    cfg: Arc<ServeConfig>,
    /// Set once by [`Server::run_until`]: writer sessions stop reading new
    /// frames, make what they applied durable, acknowledge it and end.
    stopping: Arc<tokio::sync::watch::Sender<bool>>,
    /// A clone goes with every connection; [`Server::run_until`] waits until
    /// all are dropped (every session has ended).
    sessions: mpsc::Sender<()>,
    sessions_ended: Option<mpsc::Receiver<()>>,
}

/// How long a shutdown waits for the writer sessions to end (their last
/// commit and acknowledgement) before it closes the connections anyway.
pub const SHUTDOWN_DRAIN: std::time::Duration = std::time::Duration::from_secs(30);

/// The message a session ends with when the mirror shuts down.
pub const SHUTTING_DOWN: &str = "mirror shutting down";

impl Server {
    pub fn bind(cfg: ServeConfig) -> Result<Server> {
        if cfg.allow.is_empty() {
            return Err(Error::Config(
                "no peer allowed: give at least one --allow sha256:<fingerprint>".into(),
            ));
        }
        let store = Arc::new(Store::open(&cfg.store)?);
        let endpoint =
            transport::server_endpoint(&cfg.identity, cfg.listen, &cfg.allow, &cfg.tuning)?;
        let (sessions, sessions_ended) = mpsc::channel(1);
        Ok(Server {
            endpoint,
            store,
            cfg: Arc::new(cfg),
            stopping: Arc::new(tokio::sync::watch::channel(false).0),
            sessions,
            sessions_ended: Some(sessions_ended),
        })
    }

    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.endpoint
            .local_addr()
            .map_err(|e| Error::io("reading the listening address", e))
    }

    /// Accept connections until the endpoint is closed.
    pub async fn run(self) -> Result<()> {
        if let Some(every) = self.cfg.point_every {
            let store = self.cfg.store.clone();
            let keep = self.cfg.keep;
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.tick().await;
                loop {
                    tick.tick().await;
                    let s = store.clone();
                    let _ = tokio::task::spawn_blocking(move || scheduled_points(&s, keep)).await;
                }
            });
        }
        while let Some(incoming) = self.endpoint.accept().await {
            let store = self.store.clone();
            let cfg = self.cfg.clone();
            let stop = Stop {
                rx: self.stopping.subscribe(),
                token: Some(self.sessions.clone()),
            };
            tokio::spawn(async move {
                let remote = incoming.remote_address();
                let conn = match transport::accept(incoming).await {
                    Ok((c, fp)) => {
                        tracing::info!(%remote, peer = %fp, "connection");
                        c
                    }
                    Err(e) => {
                        tracing::warn!(%remote, "refused connection: {e}");
                        return;
                    }
                };
                let link = Link::new(conn, FRAME_PAYLOAD_BYTES_MAX);
                if let Err(e) = session(&link, store, cfg, stop).await {
                    tracing::warn!(%remote, "session ended with an error: {e}");
                    link.close(CLOSE_ERROR, &e);
                }
            });
        }
        Ok(())
    }

    /// [`Server::run`] until `shutdown` resolves (SIGTERM or SIGINT for
    /// `serve`). Then no new connection is accepted, and every writer
    /// session stops reading new frames at a frame boundary, applies what it
    /// already took, makes it durable (fdatasync), acknowledges it to the
    /// primary and ends with "mirror shutting down" once the primary's
    /// transport has the acknowledgement. So after a planned restart a
    /// primary resends only what was still on the wire, not what was applied
    /// since the last commit (asynchronous mode commits every few seconds),
    /// and a sync-mode primary answers the writes the mirror made durable.
    /// Sessions get [`SHUTDOWN_DRAIN`] for this; then every connection is
    /// closed with "mirror shutting down" (2 s for the closes to go out), so
    /// that primaries learn at once that the mirror went away (and suspend
    /// or mark chunks, and retry, by their policy) instead of holding writes
    /// until their idle timeout. What a session did not finish is left as
    /// after a crash of the mirror: crash-consistent, and not acknowledged.
    /// If `force` resolves during that wait (a second signal), the sessions
    /// are closed at once and the stop is an error that says so.
    pub async fn run_until(
        mut self,
        shutdown: impl std::future::Future<Output = ()>,
        force: impl std::future::Future<Output = ()>,
    ) -> Result<()> {
        let endpoint = self.endpoint.clone();
        let stopping = self.stopping.clone();
        let mut ended = self.sessions_ended.take().expect("taken once, here");
        let mut run = Box::pin(self.run());
        tokio::select! {
            r = &mut run => r,
            _ = shutdown => {
                // Dropped with the server's own token: what is left are the
                // sessions' tokens.
                drop(run);
                stopping.send_replace(true);
                tracing::info!("mirror shutting down: ending every session");
                let t0 = std::time::Instant::now();
                let mut forced = false;
                tokio::select! {
                    r = tokio::time::timeout(SHUTDOWN_DRAIN, ended.recv()) => {
                        if r.is_err() {
                            tracing::warn!(
                                "sessions still running after {} s; closing them",
                                SHUTDOWN_DRAIN.as_secs()
                            );
                        } else {
                            tracing::info!(ms = t0.elapsed().as_millis() as u64, "every session ended");
                        }
                    }
                    _ = force => forced = true,
                }
                endpoint.close(0u32.into(), SHUTTING_DOWN.as_bytes());
                let _ = tokio::time::timeout(std::time::Duration::from_secs(2), endpoint.wait_idle())
                    .await;
                if forced {
                    return Err(Error::Other(format!(
                        "stopped at a second signal {} ms into the stop, before every session \
                         had ended: what they had not acknowledged is left as after a crash of \
                         the mirror, and their primaries resend it",
                        t0.elapsed().as_millis()
                    )));
                }
                Ok(())
            }
        }
    }
}

/// A connection's view of the server's shutdown: the flag, and the token
/// whose drop tells [`Server::run_until`] that the connection is done with.
struct Stop {
    rx: tokio::sync::watch::Receiver<bool>,
    token: Option<mpsc::Sender<()>>,
}

impl Stop {
    /// Resolves once the server shuts down (never, if it cannot).
    async fn requested(rx: &mut tokio::sync::watch::Receiver<bool>) {
        if rx.wait_for(|s| *s).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// This connection has nothing to finish: shutdown need not wait for it.
    fn release(&mut self) {
        self.token = None;
    }
}

/// One primary's session on one volume. Returns the message to close with on error.
async fn session(
    link: &Link,
    store: Arc<Store>,
    cfg: Arc<ServeConfig>,
    mut stop: Stop,
) -> std::result::Result<(), String> {
    let peer = link
        .peer_fingerprint()
        .map(|f| f.to_string())
        .unwrap_or_else(|| "unknown".into());
    // Until the hello, a shutdown has nothing to finish: the connection is
    // closed with the others.
    let mut stop_rx = stop.rx.clone();
    let opening = async {
        let (ctl_tx, mut ctl_rx) = link.accept_control().await.map_err(|e| e.to_string())?;
        let hello = ctl_rx.recv().await.map_err(|e| e.to_string())?;
        Ok::<_, String>((ctl_tx, ctl_rx, hello))
    };
    let (mut ctl_tx, mut ctl_rx, hello) = tokio::select! {
        r = opening => r?,
        _ = Stop::requested(&mut stop_rx) => return Ok(()),
    };
    let hello = match hello {
        Some(Frame::Hello(h)) => h,
        Some(other) => return Err(format!("expected Hello, got {}", other.name())),
        None => return Ok(()),
    };
    let live = hello.flags & HELLO_FLAG_LIVE != 0;
    if hello.flags & (HELLO_FLAG_PROBE | crate::protocol::HELLO_FLAG_READ) != 0 {
        // Nothing to make durable: closed with the others at shutdown.
        stop.release();
    }
    if hello.flags & HELLO_FLAG_PROBE != 0 {
        // --dry-run: answer from the metadata, touch nothing.
        let st = store.clone();
        let (h2, p2) = (hello.clone(), peer.clone());
        let r = tokio::task::spawn_blocking(move || st.probe(&h2, &p2))
            .await
            .map_err(|e| format!("internal error: {e}"))?;
        let (ack, words) = match r {
            Ok(x) => x,
            Err(msg) => return refuse(&mut ctl_tx, msg).await,
        };
        ctl_tx
            .send(&Frame::HelloAck(ack))
            .await
            .map_err(|e| e.to_string())?;
        send_changed(&mut ctl_tx, &words).await?;
        ctl_tx
            .finish_and_wait(std::time::Duration::from_secs(2))
            .await;
        return Ok(());
    }
    if hello.flags & crate::protocol::HELLO_FLAG_READ != 0 {
        // restore: read a replica or a recovery point; nothing is written.
        return reader::serve_read(link, store, hello, peer, ctl_tx, ctl_rx).await;
    }
    tracing::info!(%peer, volume = %hello.volume, bytes = hello.volume_bytes, live, "session");
    // A session of the same primary on this volume that is still open is
    // left over from a crash or a cut: end it and wait (bounded) for it to
    // let go, instead of refusing the reconnecting primary as busy.
    if store.end_stale_session(&hello.volume, &peer) {
        tracing::info!(volume = %hello.volume, %peer, "ending a stale session of the same primary");
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while store.is_held(&hello.volume) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
    let st = store.clone();
    let h2 = hello.clone();
    let p2 = peer.clone();
    let old_link = link.clone();
    let closer: Box<dyn Fn() + Send + Sync> = Box::new(move || {
        old_link.close(
            CLOSE_ERROR,
            "replaced by a newer session of the same primary",
        )
    });
    let replica = tokio::task::spawn_blocking(move || st.open_volume(&h2, &p2, Some(closer)))
        .await
        .map_err(|e| format!("internal error: {e}"))?;
    let replica = match replica {
        Ok(r) => r,
        Err(msg) => return refuse(&mut ctl_tx, msg).await,
    };
    let words = replica
        .changed_words(store.dir(), &peer)
        .map_err(|e| e.to_string())?;
    let changed: u64 = words.iter().map(|w| w.count_ones() as u64).sum();
    ctl_tx
        .send(&Frame::HelloAck(
            replica.ack(changed).map_err(|e| e.to_string())?,
        ))
        .await
        .map_err(|e| e.to_string())?;
    send_changed(&mut ctl_tx, &words).await?;

    let (cmd_tx, cmd_rx) = mpsc::channel::<apply::Cmd>(64);
    let (reply_tx, mut reply_rx) = mpsc::channel::<Frame>(64);
    let relaying = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let acfg = apply::ApplyConfig {
        queue_depth: cfg.queue_depth,
        engine: cfg.engine,
        source_id: hello.source_id,
        peer,
        live: live.then_some(hello.flags & HELLO_FLAG_SYNC_MODE != 0),
        target_changed: changed,
        points_after_sync: cfg.points_after_sync,
        keep: cfg.keep,
        status_path: live.then(|| store.status_path(&hello.volume)),
        handle: Some(tokio::runtime::Handle::current()),
        relaying: relaying.clone(),
        async_commit: cfg.async_commit,
    };
    // The apply thread's result, delivered to the async side (a panic drops
    // the sender, which the receiver sees as an error).
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    // A synchronous live session applies small writes on the data task.
    let inline_mode = acfg.live == Some(true);
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let ready_tx = inline_mode.then_some(ready_tx);
    std::thread::Builder::new()
        .name(format!("apply-{}", hello.volume))
        .spawn(move || {
            let _ = done_tx.send(apply::run(replica, acfg, cmd_rx, reply_tx, ready_tx));
        })
        .map_err(|e| format!("cannot start apply thread: {e}"))?;

    // Operator requests (fence, recovery points) are looked for a few
    // times a second, also when no data arrives.
    // (A weak sender: the apply thread still ends when the streams do.)
    let tick_cmd = cmd_tx.downgrade();
    let ticker = tokio::spawn(async move {
        loop {
            tokio::time::sleep(apply::CONTROL_POLL).await;
            let Some(tx) = tick_cmd.upgrade() else { return };
            if let Err(mpsc::error::TrySendError::Closed(_)) = tx.try_send(apply::Cmd::Tick) {
                return;
            }
        }
    });
    // The control stream's sender: the session relays the apply thread's
    // replies; a data task sends its inline commits' replies itself.
    let ctl = Arc::new(tokio::sync::Mutex::new(ctl_tx));
    let data_ctl = ctl.clone();
    // Data streams: every frame goes to the apply thread in order.
    let data_link = link.clone();
    let data_cmd = cmd_tx.clone();
    // At shutdown the data task stops between two frames (a frame read
    // ahead is still applied): whatever it took is applied, made durable
    // and acknowledged by the apply thread's end.
    let mut data_stop = stop.rx.clone();
    let data_task = tokio::spawn(async move {
        // Without the shared applier (the thread failed to open) frames go
        // to the thread, whose error ends the session.
        let inline = match inline_mode {
            true => ready_rx.await.ok(),
            false => None,
        };
        loop {
            let accepted = tokio::select! {
                biased;
                _ = Stop::requested(&mut data_stop) => return Ok::<(), String>(()),
                r = data_link.accept_data() => r,
            };
            let mut rx = match accepted {
                Ok(rx) => rx,
                Err(_) => return Ok(()),
            };
            let tx = data_cmd.clone();
            // A frame read ahead by the inline path (to decide whether to commit).
            let mut ahead = None;
            loop {
                let next = match ahead.take() {
                    Some(r) => r,
                    // (`recv` is cancel-safe: a frame half read is dropped
                    // with the stream.)
                    None => tokio::select! {
                        biased;
                        _ = Stop::requested(&mut data_stop) => return Ok(()),
                        r = rx.recv() => r,
                    },
                };
                match next {
                    Ok(Some(
                        f @ (Frame::Chunk(_) | Frame::ZeroRun { .. } | Frame::Barrier { .. }),
                    )) if live => {
                        return Err(format!(
                            "protocol error: {} frame in a live session",
                            f.name()
                        ))
                    }
                    Ok(Some(Frame::Chunk(c))) => {
                        if tx.send(apply::Cmd::Chunk(c)).await.is_err() {
                            return Ok(());
                        }
                    }
                    Ok(Some(Frame::ZeroRun { first, count })) => {
                        if tx.send(apply::Cmd::ZeroRun { first, count }).await.is_err() {
                            return Ok(());
                        }
                    }
                    Ok(Some(Frame::Barrier { seq })) => {
                        if tx.send(apply::Cmd::Barrier(seq)).await.is_err() {
                            return Ok(());
                        }
                    }
                    Ok(Some(f)) if live && f.live_seq().is_some() => {
                        let f = match &inline {
                            Some(sh) => {
                                match apply_inline(sh, f, &mut rx, &mut ahead, &data_ctl).await? {
                                    Some(f) => f,
                                    None => continue,
                                }
                            }
                            None => f,
                        };
                        if let Some(sh) = &inline {
                            sh.queued();
                        }
                        if tx.send(apply::Cmd::Live(f)).await.is_err() {
                            return Ok(());
                        }
                    }
                    Ok(Some(other)) => {
                        return Err(format!(
                            "protocol error: unexpected {} frame on a data stream",
                            other.name()
                        ))
                    }
                    Ok(None) => break,
                    // The connection went away: not a protocol error; what
                    // was not made durable is simply resent next time.
                    Err(LinkError::Closed(m)) => {
                        tracing::debug!("data stream closed: {m}");
                        return Ok(());
                    }
                    Err(e) => return Err(format!("data stream: {e}")),
                }
            }
        }
    });
    // Control stream: digest requests and completion.
    let ctl_cmd = cmd_tx;
    let mut ctl_stop = stop.rx.clone();
    let ctl_task = tokio::spawn(async move {
        loop {
            let next = tokio::select! {
                biased;
                _ = Stop::requested(&mut ctl_stop) => return Ok(()),
                r = ctl_rx.recv() => r,
            };
            match next {
                Ok(Some(Frame::DigestRequest { first, count })) => {
                    if ctl_cmd
                        .send(apply::Cmd::Digests { first, count })
                        .await
                        .is_err()
                    {
                        return Ok(());
                    }
                }
                Ok(Some(Frame::SyncDone {
                    chunks,
                    root,
                    generation,
                })) => {
                    if ctl_cmd
                        .send(apply::Cmd::Done {
                            chunks,
                            root,
                            generation,
                        })
                        .await
                        .is_err()
                    {
                        return Ok(());
                    }
                }
                Ok(Some(Frame::Takeover)) => {
                    if ctl_cmd.send(apply::Cmd::Takeover).await.is_err() {
                        return Ok(());
                    }
                }
                Ok(Some(Frame::Error { message })) => {
                    return Err(format!("primary reported: {message}"));
                }
                Ok(Some(other)) => {
                    return Err(format!(
                        "protocol error: unexpected {} frame on the control stream",
                        other.name()
                    ))
                }
                Ok(None) => return Ok(()),
                Err(LinkError::Closed(m)) => {
                    tracing::debug!("control stream closed: {m}");
                    return Ok(());
                }
                Err(e) => return Err(format!("control stream: {e}")),
            }
        }
    });
    // Replies from the apply thread go out on the control stream until the
    // thread ends (its command channel closed or it failed).
    let mut data_task = Some(data_task);
    let mut ctl_task = Some(ctl_task);
    let mut failure: Option<String> = None;
    loop {
        tokio::select! {
            f = reply_rx.recv() => match f {
                Some(f) => {
                    let sent = ctl.lock().await.send(&f).await;
                    relaying.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
                    if let Err(e) = sent {
                        failure.get_or_insert(e.to_string());
                        link.close(CLOSE_ERROR, &e.to_string());
                    }
                }
                None => break,
            },
            r = async { data_task.as_mut().expect("guarded").await }, if data_task.is_some() => {
                data_task = None;
                if let Ok(Err(e)) = r {
                    link.close(CLOSE_ERROR, &e);
                    failure.get_or_insert(e);
                }
            },
            r = async { ctl_task.as_mut().expect("guarded").await }, if ctl_task.is_some() => {
                ctl_task = None;
                if let Ok(Err(e)) = r {
                    link.close(CLOSE_ERROR, &e);
                    failure.get_or_insert(e);
                }
                // Without a control stream nothing more can complete: stop
                // reading data so that the apply thread ends (at shutdown
                // the data task stops by itself, after its last reply).
                if !*stop.rx.borrow() {
                    if let Some(t) = data_task.take() {
                        t.abort();
                    }
                }
            },
        }
    }
    ticker.abort();
    if let Some(t) = data_task.take() {
        t.abort();
    }
    let mut ctl_tx = ctl.lock_owned().await;
    let applied = done_rx
        .await
        .unwrap_or_else(|_| Err("apply thread ended without a result (it panicked)".into()));
    let result = match (failure, applied) {
        // Tell the primary why before its streams are torn down.
        (Some(e), _) | (None, Err(e)) => refuse(&mut ctl_tx, e).await,
        // The last acknowledgement is out: say why the session ends and
        // wait (bounded) until the primary's transport has both.
        (None, Ok(())) if *stop.rx.borrow() => {
            let _ = refuse::<()>(&mut ctl_tx, SHUTTING_DOWN.to_string()).await;
            Ok(())
        }
        (None, Ok(())) => {
            ctl_tx.finish();
            Ok(())
        }
    };
    if let Some(t) = ctl_task.take() {
        t.abort();
    }
    result
}

/// Tell the primary why the session ends (an `Error` frame it reads before
/// the streams go), then fail with the same message.
pub(crate) async fn refuse<T>(
    ctl_tx: &mut crate::transport::stream::FrameSender,
    msg: String,
) -> std::result::Result<T, String> {
    let _ = ctl_tx
        .send(&Frame::Error {
            message: msg.clone(),
        })
        .await;
    ctl_tx
        .finish_and_wait(std::time::Duration::from_secs(1))
        .await;
    Err(msg)
}

/// Send the changed-chunk bitmap words after a hello answer.
async fn send_changed(
    ctl_tx: &mut crate::transport::stream::FrameSender,
    words: &[u64],
) -> std::result::Result<(), String> {
    for (k, batch) in words.chunks(CHANGED_WORDS_PER_BATCH as usize).enumerate() {
        ctl_tx
            .send(&Frame::ChangedBatch {
                first_word: (k * CHANGED_WORDS_PER_BATCH as usize) as u64,
                words: batch.to_vec(),
            })
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// One round of scheduled recovery points: every consistent secondary
/// replica gets an automatic point, then the retention policy is applied.
fn scheduled_points(store: &std::path::Path, keep: (u32, u32, u32)) {
    let vols = match Store::open(store).and_then(|s| s.list()) {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!("scheduled points: cannot list {}: {e}", store.display());
            return;
        }
    };
    for (name, meta) in vols {
        if meta.role != store::Role::Secondary
            || meta.state != crate::protocol::ReplicaState::UpToDate
        {
            continue;
        }
        let label = format!("auto-{}", store::now_unix());
        match roles::create_point(store, &name, Some(&label), true, Some(keep)) {
            Ok(id) => tracing::info!(volume = %name, point = id, "scheduled recovery point"),
            Err(e) => tracing::warn!(volume = %name, "scheduled recovery point not taken: {e}"),
        }
    }
}

/// Apply live frame `f` on this task if the applier allows it (see
/// `apply::Shared::inline`): then read ahead one frame, commit unless it is
/// another live frame, and send the replies. `Some(f)`: queue it to the
/// thread instead.
async fn apply_inline(
    sh: &apply::Shared,
    f: Frame,
    rx: &mut FrameReceiver,
    ahead: &mut Option<std::result::Result<Option<Frame>, LinkError>>,
    ctl: &tokio::sync::Mutex<FrameSender>,
) -> std::result::Result<Option<Frame>, String> {
    let (replies, reply, relaying) = {
        let Some(mut a) = sh.inline(&f) else {
            return Ok(Some(f));
        };
        let more = if a.one_at_a_time() {
            // Queue depth 1 at the primary: look ahead first; a lone write
            // is written durable in one call.
            *ahead = rx.try_recv();
            let more = matches!(ahead, Some(Ok(Some(n))) if n.live_seq().is_some());
            a.apply(f, !more)?;
            more
        } else {
            // Writes in a burst: apply, then collect what arrived meanwhile
            // into the same commit.
            a.apply(f, false)?;
            *ahead = rx.try_recv();
            matches!(ahead, Some(Ok(Some(n))) if n.live_seq().is_some())
        };
        a.commit_unless(more)?;
        a.finish()
    };
    if replies.is_empty() {
        return Ok(None);
    }
    let mut c = ctl.lock().await;
    if relaying.load(std::sync::atomic::Ordering::Acquire) == 0 {
        // Nothing of the thread's is waiting to be sent: ours go out now,
        // from this worker (no wake-up of the session task).
        for r in replies {
            c.send(&r)
                .await
                .map_err(|e| format!("control stream: {e}"))?;
        }
    } else {
        // Behind the thread's replies, in order.
        drop(c);
        let reply = reply.ok_or("connection closed")?;
        for r in replies {
            relaying.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
            reply.send(r).await.map_err(|_| "connection closed")?;
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn server(dir: &std::path::Path) -> Server {
        let identity = Identity::generate(&dir.join("mirror-id")).expect("identity");
        let primary = Identity::generate(&dir.join("primary-id")).expect("identity");
        Server::bind(ServeConfig {
            identity,
            listen: "127.0.0.1:0".parse().expect("address"),
            store: dir.join("store"),
            allow: vec![primary.fingerprint()],
            queue_depth: 8,
            engine: EnginePreference::Auto,
            tuning: Tuning::default(),
            points_after_sync: false,
            point_every: None,
            keep: (8, 24, 7),
            async_commit: ASYNC_COMMIT_DEFAULT,
        })
        .expect("bind")
    }

    /// The stop waits for a session that has not ended (its token is held
    /// here for 600 ms), and then ends cleanly.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stop_waits_for_the_sessions_to_end() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = server(dir.path());
        let session = s.sessions.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(600)).await;
            drop(session);
        });
        let t0 = Instant::now();
        let r = s.run_until(async {}, std::future::pending()).await;
        assert!(r.is_ok(), "{r:?}");
        assert!(
            t0.elapsed() >= Duration::from_millis(600),
            "{:?}",
            t0.elapsed()
        );
    }

    /// A second signal during that wait ends the stop at once, as an error
    /// that says so, though the session never ends.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_second_signal_ends_the_wait_for_sessions() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = server(dir.path());
        let _session = s.sessions.clone();
        let t0 = Instant::now();
        let r = s
            .run_until(async {}, tokio::time::sleep(Duration::from_millis(300)))
            .await;
        let took = t0.elapsed();
        let e = r.expect_err("a forced stop is an error").to_string();
        assert!(e.contains("stopped at a second signal"), "{e}");
        assert!(took < SHUTDOWN_DRAIN / 4, "took {took:?}");
    }
}
