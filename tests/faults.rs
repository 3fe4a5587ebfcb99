//! Fault injection: processes killed mid-sync, a network cut, a full disk on
//! the mirror, and malformed frames sent straight to the mirror.

mod common;

use std::time::{Duration, Instant};

use blkmirror::protocol::{self, ChunkFrame, Encoding, Frame, Hello};
use blkmirror::transport::stream::{Link, LinkError};
use blkmirror::transport::{self, Fingerprint, Identity, Tuning};
use common::*;

const CHUNK: u64 = 64 * 1024;

/// QUIC idle timeout used by the fault tests (through `--tuning`), so that a
/// peer that vanished silently is noticed in seconds rather than after the
/// default `Tuning::default().idle_timeout_ms` (30 s).
const IDLE_MS: u64 = 5_000;

fn idle_timeout() -> Duration {
    Duration::from_millis(IDLE_MS)
}

#[test]
fn default_idle_timeout_is_bounded() {
    // The fault tests shorten it; the default must still give up on a dead
    // peer in well under a minute, and keep-alives must fit inside it.
    let t = Tuning::default();
    assert!(
        t.idle_timeout_ms > 0 && t.idle_timeout_ms <= 60_000,
        "{t:?}"
    );
    assert!(
        t.keep_alive_ms > 0 && t.keep_alive_ms < t.idle_timeout_ms,
        "{t:?}"
    );
}

/// Start `sync` in the background and wait until the mirror has marked the
/// replica Inconsistent (i.e. it is writing), then a little longer.
fn start_sync_and_wait_for_writes(
    p: &Pair,
    src: &std::path::Path,
    to: &str,
) -> (ChildGuard, std::path::PathBuf) {
    let args = p.args_to(src, to, "v", &[]);
    let (mut guard, err) = spawn_sync_args(&args, &p.path("bg"));
    let writing = wait_until(Duration::from_secs(30), || {
        meta_state(p.store(), "v") == "Inconsistent"
    });
    assert!(
        writing,
        "the mirror never marked the replica Inconsistent; sync stderr:\n{}\nserver log:\n{}",
        std::fs::read_to_string(&err).unwrap_or_default(),
        p.server.log_text()
    );
    std::thread::sleep(Duration::from_millis(150));
    assert!(
        guard.running(),
        "the sync finished before the fault could be injected (make the image larger); stderr:\n{}",
        std::fs::read_to_string(&err).unwrap_or_default()
    );
    (guard, err)
}

/// A pair whose first sync of a 256 MiB random image (seeded) is running
/// in the background and writing on the mirror.
fn first_sync_under_way(seed: u64) -> (Pair, std::path::PathBuf, ChildGuard, std::path::PathBuf) {
    let p = Pair::with_idle_timeout(IDLE_MS);
    let src = p.path("disk.img");
    random_image(&src, 256 * MIB, seed);
    let (sync, err) = start_sync_and_wait_for_writes(&p, &src, &p.server.to());
    (p, src, sync, err)
}

/// After an interrupted first sync: the replica does not claim to be up to
/// date; the mirror, restarted on the same store, gets it completed.
fn completed_after_restart(p: &mut Pair, src: &std::path::Path) {
    assert_eq!(meta_state(p.store(), "v"), "Inconsistent");
    p.restart_server("127.0.0.1:0");
    let j = p.sync(src, "v", &[]).ok().clone();
    assert_eq!(j["mode"], "full", "{j}");
    assert_identical(src, &p.img("v"));
    assert_eq!(p.state_of("v"), "UpToDate");
}

/// Run a sync, retrying while the mirror still holds the volume for a
/// session whose peer vanished (it lets go after the idle timeout).
fn sync_when_not_busy(p: &Pair, args: &[String]) -> SyncOut {
    let deadline = Instant::now() + idle_timeout() + Duration::from_secs(15);
    loop {
        let r = run_sync_args(args, SYNC_TIMEOUT);
        if r.code != 0 && r.stderr.contains("busy") && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(500));
            continue;
        }
        if r.code != 0 {
            eprintln!("server log:\n{}", p.server.log_text());
        }
        return r;
    }
}

#[test]
fn sync_killed_mid_transfer_resumes() {
    let mut p = Pair::with_idle_timeout(IDLE_MS);
    let src = p.path("disk.img");
    random_image(&src, 256 * MIB, 40);
    let (mut sync, _err) = start_sync_and_wait_for_writes(&p, &src, &p.server.to());
    sync.kill9();
    // Interrupted: the replica must not claim to be up to date.
    assert_eq!(meta_state(p.store(), "v"), "Inconsistent");
    assert!(blkmirror::demo::first_difference(&src, &p.img("v"))
        .unwrap()
        .is_some());

    let r = sync_when_not_busy(&p, &p.args(&src, "v", &[]));
    let j = r.ok();
    assert_eq!(j["mode"], "full", "the interrupted first sync resumes: {j}");
    assert_identical(&src, &p.img("v"));
    assert_eq!(p.state_of("v"), "UpToDate");
    p.server.assert_alive();
}

/// Chunks made durable at a barrier (every 256 MiB of frames by default)
/// are recorded by the primary and not sent again after an interruption.
#[test]
fn interrupted_sync_keeps_what_a_barrier_made_durable() {
    use std::os::unix::fs::MetadataExt;
    let mut p = Pair::with_idle_timeout(IDLE_MS);
    let src = p.path("disk.img");
    let size = 512 * MIB;
    random_image(&src, size, 45);
    let bitmap = p.state.join("v").join("bitmap");
    let (mut sync, err) = start_sync_and_wait_for_writes(&p, &src, &p.server.to());
    // The bitmap file is replaced (new inode) at every checkpoint.
    let ino = std::fs::metadata(&bitmap).expect("bitmap").ino();
    let checkpointed = wait_until(Duration::from_secs(60), || {
        std::fs::metadata(&bitmap).is_ok_and(|m| m.ino() != ino) || !sync.running()
    });
    assert!(checkpointed);
    assert!(
        sync.running(),
        "the sync ended before it could be interrupted after a barrier: {}",
        std::fs::read_to_string(&err).unwrap_or_default()
    );
    sync.kill9();
    assert_eq!(meta_state(p.store(), "v"), "Inconsistent");

    let r = sync_when_not_busy(&p, &p.args(&src, "v", &[]));
    let j = r.ok();
    assert_eq!(j["mode"], "full", "{j}");
    eprintln!("resumed after a barrier: {j}");
    let total = num(j, "chunks_total");
    assert_eq!(total, size / CHUNK);
    // At least the first 256 MiB barrier's worth of chunks is not resent.
    let barrier_chunks = (256 * MIB) / (CHUNK + 64);
    assert!(
        num(j, "chunks_sent") + num(j, "chunks_zero") <= total - barrier_chunks,
        "durable chunks were sent again: {j}"
    );
    assert!(num(j, "chunks_sent") > 0, "{j}");
    assert_identical(&src, &p.img("v"));
    assert_eq!(p.state_of("v"), "UpToDate");
    p.server.assert_alive();
}

/// Regression: the sync once hung forever when the link failed while chunks
/// were still being read (the reader blocked on the job channel because
/// `sync_on_link` kept the workers' receiver alive).
#[test]
fn mirror_killed_mid_sync() {
    let (mut p, src, mut sync, err) = first_sync_under_way(41);
    let killed_at = Instant::now();
    p.server.guard.kill9();
    let limit = idle_timeout() + Duration::from_secs(15);
    let r = finish_background_sync(&mut sync, &err, limit);
    let took = killed_at.elapsed();
    r.assert_fails(&[]);
    assert!(took < limit, "sync noticed the dead mirror after {took:?}");
    eprintln!("sync noticed the killed mirror after {took:?}");
    completed_after_restart(&mut p, &src);
}

/// SIGTERM to `serve` in the middle of a sync: the mirror applies what it
/// had taken and ends the session with its reason, so the sync fails at
/// once with an error naming it (not after the idle timeout, not as a
/// refusal), the server exits cleanly, the replica does not claim to be up
/// to date, and a sync against the restarted mirror completes it.
#[test]
fn mirror_stopped_mid_sync_names_the_reason() {
    let (mut p, src, mut sync, err) = first_sync_under_way(44);
    let stopped_at = Instant::now();
    p.server.terminate(Duration::from_secs(40));
    let r = finish_background_sync(&mut sync, &err, Duration::from_secs(20));
    let took = stopped_at.elapsed();
    r.assert_fails(&["mirror shutting down"]);
    assert!(
        !r.as_cmd().stderr.contains("refused"),
        "a stop is no refusal: {}",
        r.as_cmd().stderr
    );
    assert!(
        took < idle_timeout(),
        "the sync learnt of the stop only after {took:?}"
    );
    completed_after_restart(&mut p, &src);
}

/// Regression: same hang as `mirror_killed_mid_sync`.
#[test]
fn network_cut_mid_sync() {
    let p = Pair::with_idle_timeout(IDLE_MS);
    let relay = UdpRelay::start(p.server.addr);
    let src = p.path("disk.img");
    random_image(&src, 256 * MIB, 42);
    let (mut sync, err) = start_sync_and_wait_for_writes(&p, &src, &relay.addr.to_string());
    relay.cut(true);
    let cut_at = Instant::now();
    let limit = idle_timeout() + Duration::from_secs(15);
    let r = finish_background_sync(&mut sync, &err, limit);
    let took = cut_at.elapsed();
    r.assert_fails(&[]);
    eprintln!("sync gave up {took:?} after the cut; stderr: {}", r.stderr);
    assert!(took < limit, "{took:?}");
    assert!(
        took + Duration::from_secs(3) >= idle_timeout(),
        "failed after {took:?}, before the idle timeout: {}",
        r.stderr
    );
    assert_eq!(meta_state(p.store(), "v"), "Inconsistent");

    relay.cut(false);
    let before = relay.counts();
    let via_relay = p.args_to(&src, &relay.addr.to_string(), "v", &[]);
    let r = sync_when_not_busy(&p, &via_relay);
    r.ok();
    assert!(
        relay.counts().0 > before.0,
        "the rerun did not go through the relay"
    );
    assert_identical(&src, &p.img("v"));
    assert_eq!(p.state_of("v"), "UpToDate");
}

/// Regression: the sync once hung here too, and then reported "sending
/// stopped by peer: error 0" instead of the mirror's reason, because the
/// mirror tore its data stream down before sending its Error frame.
#[test]
fn mirror_disk_full() {
    let tmp = tempdir();
    let store = tmp.path().join("store");
    let Some(mount) = Mount::tmpfs_or_skip("mirror_disk_full", "64m", &store) else {
        return;
    };
    let primary = Node::new(tmp.path().join("p"));
    let mirror = Node::new(tmp.path().join("m"));
    let mut server = Server::start(&mirror, &store, &[&primary.fp], "127.0.0.1:0", &[]);
    let src = tmp.path().join("disk.img");
    random_image(&src, 128 * MIB, 43);
    let r = run_sync_args(
        &sync_args(
            &src,
            &primary,
            &server.to(),
            &mirror.fp,
            "v",
            &tmp.path().join("state"),
            &[],
        ),
        SYNC_TIMEOUT,
    );
    r.assert_fails(&["space"]);
    assert_ne!(meta_state(&store, "v"), "UpToDate");
    assert_eq!(meta_state(&store, "v"), "Inconsistent");
    server.assert_alive();
    drop(server);
    drop(mount);
}

// -------------------------------------------------------------------------------------------
// Malformed frames
// -------------------------------------------------------------------------------------------

/// What the mirror said when it ended a session: an `Error` frame on the
/// control stream if it arrived, and the connection's close reason.
async fn mirror_verdict(link: &Link, ctl: Option<&mut transport::stream::FrameReceiver>) -> String {
    let mut text = String::new();
    if let Some(rx) = ctl {
        match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
            Ok(Ok(Some(Frame::Error { message }))) => text.push_str(&message),
            Ok(Ok(Some(other))) => text.push_str(&format!("<unexpected {}>", other.name())),
            Ok(Ok(None)) => text.push_str("<control stream finished>"),
            Ok(Err(e)) => text.push_str(&e.to_string()),
            Err(_) => panic!("the mirror neither answered nor closed within 10 s"),
        }
    }
    let closed = tokio::time::timeout(Duration::from_secs(10), link.closed())
        .await
        .expect("the mirror did not close the connection within 10 s");
    match &closed {
        LinkError::Closed(reason) => {
            text.push_str(" | ");
            text.push_str(reason);
        }
        other => panic!("unexpected close: {other}"),
    }
    text
}

struct Client {
    endpoint: transport::ClientEndpoint,
    addr: std::net::SocketAddr,
    pin: Fingerprint,
}

impl Client {
    async fn new(identity: &Identity, addr: std::net::SocketAddr, pin: &str) -> Client {
        let endpoint = transport::client_endpoint(
            identity,
            transport::unspecified_for(addr),
            &Tuning::default(),
        )
        .expect("client endpoint");
        Client {
            endpoint,
            addr,
            pin: pin.parse().expect("fingerprint"),
        }
    }

    async fn link(&self) -> Link {
        let conn = transport::connect(&self.endpoint, self.addr, &self.pin, &Tuning::default())
            .await
            .expect("connecting to the mirror");
        Link::new(conn, blkmirror::config::FRAME_PAYLOAD_BYTES_MAX)
    }

    /// Raw bytes on a fresh bidirectional (control) stream; returns the mirror's verdict.
    async fn raw(&self, bytes: &[u8]) -> String {
        let conn = transport::connect(&self.endpoint, self.addr, &self.pin, &Tuning::default())
            .await
            .expect("connecting to the mirror");
        let link = Link::new(conn.clone(), blkmirror::config::FRAME_PAYLOAD_BYTES_MAX);
        let (mut send, _recv) = conn.open_bi().await.expect("open_bi");
        // The mirror may close before everything is written; that is its verdict.
        let _ = send.write_all(bytes).await;
        mirror_verdict(&link, None).await
    }

    /// Hello for `volume` (1 MiB, 64 KiB chunks), expect the ack, then send
    /// `frames` on a data stream; returns the mirror's verdict.
    async fn session(&self, volume: &str, frames: &[Frame]) -> String {
        self.session_with_flags(volume, 0, frames).await
    }

    /// Like [`Client::session`] but a live (`replicate`) session.
    async fn live_session(&self, volume: &str, frames: &[Frame]) -> String {
        self.session_with_flags(volume, protocol::HELLO_FLAG_LIVE, frames)
            .await
    }

    async fn session_with_flags(&self, volume: &str, flags: u8, frames: &[Frame]) -> String {
        let link = self.link().await;
        let (mut tx, mut rx) = link.open_control().await.expect("control stream");
        let mut h = hello(volume);
        h.flags = flags;
        tx.send(&Frame::Hello(h)).await.expect("hello");
        match rx.recv().await {
            Ok(Some(Frame::HelloAck(a))) => {
                assert_eq!(a.volume_bytes, MIB);
                assert_eq!(a.chunk_bytes, CHUNK as u32);
            }
            other => panic!("expected HelloAck, got {other:?}"),
        }
        let mut data = link.open_data().await.expect("data stream");
        for f in frames {
            // The mirror may already have closed: later sends can fail.
            if data.send(f).await.is_err() {
                break;
            }
        }
        mirror_verdict(&link, Some(&mut rx)).await
    }

    /// A hello the mirror refuses; returns its verdict.
    async fn refused_hello(&self, h: Hello) -> String {
        let link = self.link().await;
        let (mut tx, mut rx) = link.open_control().await.expect("control stream");
        tx.send(&Frame::Hello(h)).await.expect("hello");
        mirror_verdict(&link, Some(&mut rx)).await
    }
}

fn hello(volume: &str) -> Hello {
    Hello {
        volume: volume.into(),
        volume_bytes: MIB,
        chunk_bytes: CHUNK as u32,
        flags: 0,
        source_id: 0x1234_5678,
    }
}

fn chunk(index: u64, encoding: Encoding, raw_len: u32, payload: Vec<u8>, digest: u128) -> Frame {
    Frame::Chunk(ChunkFrame {
        index,
        encoding,
        raw_len,
        digest,
        payload: payload.into(),
    })
}

fn assert_mentions(verdict: &str, needle: &str) {
    assert!(
        verdict.to_lowercase().contains(&needle.to_lowercase()),
        "the mirror's verdict does not mention {needle:?}: {verdict}"
    );
}

#[test]
fn malformed_frames_are_rejected_without_writes() {
    let tmp = tempdir();
    let id = Identity::generate(&tmp.path().join("raw-client")).expect("identity");
    let primary = Node {
        dir: tmp.path().join("raw-client"),
        fp: id.fingerprint().to_string(),
    };
    let mirror = Node::new(tmp.path().join("m"));
    let store = tmp.path().join("store");
    let mut server = Server::start(&mirror, &store, &[&primary.fp], "127.0.0.1:0", &[]);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let bad = vec![0xABu8; CHUNK as usize];
    let good = vec![0x11u8; CHUNK as usize];
    rt.block_on(async {
        let c = Client::new(&id, server.addr, &mirror.fp).await;

        // (a) a header with an unknown type.
        let v = c
            .raw(&[protocol::PROTOCOL_VERSION, 0xEE, 0, 0, 0, 0, 0, 0])
            .await;
        assert_mentions(&v, "unknown frame type 238");
        // (a') another protocol version.
        let v = c.raw(&[9, 1, 0, 0, 0, 0, 0, 0]).await;
        assert_mentions(&v, "version 9");
        // (b) a header announcing a payload beyond the limit.
        let mut h = vec![protocol::PROTOCOL_VERSION, 1, 0, 0];
        h.extend_from_slice(&u32::MAX.to_le_bytes());
        let v = c.raw(&h).await;
        assert_mentions(&v, "exceeds the limit");
        // (b') a frame that is not a Hello first.
        let v = c
            .raw(&protocol::encode_to_vec(&Frame::Barrier { seq: 1 }))
            .await;
        assert_mentions(&v, "expected hello");

        // (c) a chunk beyond the volume (1 MiB = 16 chunks).
        let v = c
            .session(
                "beyond",
                &[chunk(
                    16,
                    Encoding::Raw,
                    CHUNK as u32,
                    bad.clone(),
                    protocol::digest(&bad),
                )],
            )
            .await;
        assert_mentions(&v, "beyond the volume");
        // ... and far beyond (offset overflow).
        let v = c
            .session(
                "beyond2",
                &[chunk(
                    u64::MAX / 2,
                    Encoding::Raw,
                    CHUNK as u32,
                    bad.clone(),
                    protocol::digest(&bad),
                )],
            )
            .await;
        assert_mentions(&v, "beyond the volume");

        // (d) a good chunk, then a chunk whose digest does not match its data.
        let v = c
            .session(
                "digest",
                &[
                    chunk(
                        2,
                        Encoding::Raw,
                        CHUNK as u32,
                        good.clone(),
                        protocol::digest(&good),
                    ),
                    chunk(
                        3,
                        Encoding::Raw,
                        CHUNK as u32,
                        bad.clone(),
                        protocol::digest(&bad) ^ 1,
                    ),
                ],
            )
            .await;
        assert_mentions(&v, "digest mismatch");

        // (e) a chunk whose length does not fit the geometry.
        let v = c
            .session(
                "length",
                &[chunk(
                    1,
                    Encoding::Raw,
                    100,
                    bad[..100].to_vec(),
                    protocol::digest(&bad[..100]),
                )],
            )
            .await;
        assert_mentions(&v, "does not match the volume geometry");

        // (f) lz4 garbage.
        let v = c
            .session(
                "lz4",
                &[chunk(
                    4,
                    Encoding::Lz4,
                    CHUNK as u32,
                    vec![0xFF; 100],
                    protocol::digest(&bad),
                )],
            )
            .await;
        assert_mentions(&v, "decompression failed");

        // (g) a zero marker whose digest is not the zero digest.
        let v = c
            .session(
                "zero",
                &[chunk(
                    5,
                    Encoding::Zero,
                    CHUNK as u32,
                    Vec::new(),
                    protocol::digest(&bad),
                )],
            )
            .await;
        assert_mentions(&v, "digest mismatch");

        // (g') zero runs beyond the volume, and an empty one.
        let v = c
            .session(
                "zerorun",
                &[Frame::ZeroRun {
                    first: 10,
                    count: 7,
                }],
            )
            .await;
        assert_mentions(&v, "beyond the volume");
        let v = c
            .session(
                "zerorun2",
                &[Frame::ZeroRun {
                    first: u64::MAX,
                    count: 2,
                }],
            )
            .await;
        assert_mentions(&v, "beyond the volume");
        let v = c
            .session("zerorun3", &[Frame::ZeroRun { first: 0, count: 0 }])
            .await;
        assert_mentions(&v, "zero run of 0 chunks");

        // (h) hellos the mirror must refuse on its own.
        let mut h = hello("../escape");
        let v = c.refused_hello(h.clone()).await;
        assert_mentions(&v, "volume name");
        h.volume = "ok-name".into();
        h.chunk_bytes = 3000;
        let v = c.refused_hello(h.clone()).await;
        assert_mentions(&v, "chunk size 3000");
        h.chunk_bytes = CHUNK as u32;
        h.volume_bytes = 1000;
        let v = c.refused_hello(h).await;
        assert_mentions(&v, "512");
    });
    drop(rt);

    // The server survived all of it.
    server.assert_alive();
    // Nothing escaped the store.
    assert!(!tmp.path().join("escape.img").exists());
    assert!(!tmp.path().join("escape.meta").exists());
    assert!(!store.join("ok-name.img").exists());
    // No bad data reached a replica, and none claims to be up to date.
    let touched = [
        "beyond", "beyond2", "digest", "length", "lz4", "zero", "zerorun", "zerorun2", "zerorun3",
    ];
    for vol in touched {
        let img = store.join(format!("{vol}.img"));
        assert_eq!(file_len(&img), MIB, "{vol}: replica size changed");
        assert_ne!(meta_state(&store, vol), "UpToDate", "{vol}");
        let contents = std::fs::read(&img).unwrap();
        assert!(
            !contents.windows(16).any(|w| w == [0xABu8; 16]),
            "{vol}: the bad chunk's data reached the replica"
        );
    }
    // The good chunk before the bad one was applied: that replica is Inconsistent.
    assert_eq!(meta_state(&store, "digest"), "Inconsistent");
    assert_eq!(
        read_at(&store.join("digest.img"), 2 * CHUNK, 16),
        vec![0x11u8; 16]
    );
    assert_eq!(
        read_at(&store.join("digest.img"), 3 * CHUNK, 16),
        vec![0u8; 16]
    );
    // Volumes that only saw rejected frames were never written.
    for vol in touched.iter().filter(|v| **v != "digest") {
        assert_eq!(meta_state(&store, vol), "New", "{vol}");
    }

    // A normal sync to the same server still works, also onto a volume a bad session touched.
    let src = tmp.path().join("disk.img");
    random_image(&src, MIB, 44);
    let state = tmp.path().join("state");
    for vol in ["digest", "fresh"] {
        let r = run_sync_args(
            &sync_args(&src, &primary, &server.to(), &mirror.fp, vol, &state, &[]),
            SYNC_TIMEOUT,
        );
        r.ok();
        assert_identical(&src, &store.join(format!("{vol}.img")));
        assert_eq!(meta_state(&store, vol), "UpToDate");
    }
    server.assert_alive();
}

fn live_write(seq: u64, offset: u64, data: &[u8], digest: u128) -> Frame {
    Frame::Write(protocol::LiveWrite {
        seq,
        offset,
        flags: 0,
        encoding: Encoding::Raw,
        raw_len: data.len() as u32,
        digest,
        payload: data.to_vec().into(),
    })
}

/// Malformed live-replication frames end the session with a named error and
/// never reach the replica; the server keeps serving.
#[test]
fn malformed_live_frames_are_rejected_without_writes() {
    let tmp = tempdir();
    let id = Identity::generate(&tmp.path().join("raw-client")).expect("identity");
    let mirror = Node::new(tmp.path().join("m"));
    let store = tmp.path().join("store");
    let fp = id.fingerprint().to_string();
    let mut server = Server::start(&mirror, &store, &[&fp], "127.0.0.1:0", &[]);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let bad = vec![0xABu8; 4096];
    let d = protocol::digest(&bad);
    rt.block_on(async {
        let c = Client::new(&id, server.addr, &mirror.fp).await;
        let v = c
            .live_session("l1", &[live_write(1, MIB - 100, &bad, d)])
            .await;
        assert_mentions(&v, "does not fit the volume");
        let v = c.live_session("l2", &[live_write(1, 0, &bad, d ^ 1)]).await;
        assert_mentions(&v, "digest mismatch");
        let good = vec![0x11u8; 512];
        let v = c
            .live_session(
                "l3",
                &[
                    live_write(5, 0, &good, protocol::digest(&good)),
                    live_write(5, 4096, &bad, d),
                ],
            )
            .await;
        assert_mentions(&v, "not after 5");
        let v = c
            .live_session(
                "l4",
                &[Frame::ZeroRange {
                    seq: 1,
                    offset: u64::MAX - 10,
                    len: 100,
                    flags: 0,
                }],
            )
            .await;
        assert_mentions(&v, "does not fit the volume");
        let v = c
            .live_session(
                "l5",
                &[chunk(
                    0,
                    Encoding::Raw,
                    CHUNK as u32,
                    vec![0xAB; CHUNK as usize],
                    protocol::digest(&vec![0xABu8; CHUNK as usize]),
                )],
            )
            .await;
        assert_mentions(&v, "Chunk frame in a live session");
        let v = c
            .live_session(
                "l6",
                &[Frame::Ack {
                    seq: 1,
                    state: protocol::ReplicaState::UpToDate,
                }],
            )
            .await;
        assert_mentions(&v, "unexpected Ack");
    });
    drop(rt);
    server.assert_alive();
    for vol in ["l1", "l2", "l3", "l4", "l5", "l6"] {
        let contents = std::fs::read(store.join(format!("{vol}.img"))).unwrap();
        assert!(
            !contents.windows(16).any(|w| w == [0xABu8; 16]),
            "{vol}: rejected data reached the replica"
        );
        assert_ne!(meta_state(&store, vol), "UpToDate", "{vol}");
    }
    // The good write before the bad sequence number was applied.
    assert_eq!(read_at(&store.join("l3.img"), 0, 16), vec![0x11u8; 16]);
}

/// Regression: an allowed primary announcing a huge volume (8 TiB in 4 KiB
/// chunks) once made the mirror allocate a 32 GiB digest map from the Hello
/// alone; the failed allocation aborted the whole server. Now it must be a
/// clean refusal, and the server keeps serving.
///
/// The server runs under RLIMIT_AS = 4 GiB so this test cannot hurt the host.
#[test]
fn huge_volume_hello_does_not_kill_the_mirror() {
    let tmp = tempdir();
    let id = Identity::generate(&tmp.path().join("raw-client")).expect("identity");
    let client_fp = id.fingerprint().to_string();
    let mirror = Node::new(tmp.path().join("m"));
    let store = tmp.path().join("store");
    let mut server = Server::start_limited(
        &mirror,
        &store,
        &[&client_fp],
        "127.0.0.1:0",
        &[],
        Some(4 << 30),
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let verdict = rt.block_on(async {
        let c = Client::new(&id, server.addr, &mirror.fp).await;
        let mut h = hello("huge");
        h.volume_bytes = 8 << 40;
        h.chunk_bytes = 4096;
        c.refused_hello(h).await
    });
    drop(rt);
    std::thread::sleep(Duration::from_millis(200));
    if let Some(status) = server.guard.try_wait() {
        panic!(
            "the mirror died ({status}) on a Hello for an 8 TiB volume; mirror said {verdict}; log:\n{}",
            server.log_text()
        );
    }
    assert_mentions(&verdict, "chunk");
    assert_ne!(meta_state(&store, "huge"), "UpToDate");
    // Still serving.
    let src = tmp.path().join("disk.img");
    random_image(&src, MIB, 46);
    let primary = Node {
        dir: tmp.path().join("raw-client"),
        fp: client_fp,
    };
    run_sync_args(
        &sync_args(
            &src,
            &primary,
            &server.to(),
            &mirror.fp,
            "small",
            &tmp.path().join("state"),
            &[],
        ),
        SYNC_TIMEOUT,
    )
    .ok();
    assert_identical(&src, &store.join("small.img"));
    server.assert_alive();
}
