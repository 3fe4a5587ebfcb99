//! `blkmirror demo`: a complete primary + mirror run on loopback with
//! temporary files.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use rand::{Rng, RngCore, SeedableRng};

use crate::block::EnginePreference;
use crate::config::SyncLimits;
use crate::error::{Error, IoContext, Result};
use crate::frontend::nbd::client::Client;
use crate::frontend::nbd::Listen;
use crate::mirror::{ServeConfig, Server};
use crate::primary::{run_sync, SyncOptions, SyncReport};
use crate::replication::live::{run_replicate, ReplicateOptions};
use crate::replication::primary::{Mode, OnDisconnect};
use crate::transport::{Identity, Tuning};

/// One line describing a sync's outcome.
pub fn describe(r: &SyncReport) -> String {
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    format!(
        "volume {} ({} sync): {} chunks, {} sent, {} zero, {} unchanged; read {:.1} MiB, {:.1} MiB on the wire, {:.2} s ({:.0} MiB/s), replica {}",
        r.volume,
        r.mode,
        r.chunks_total,
        r.chunks_sent,
        r.chunks_zero,
        r.chunks_total - r.chunks_sent - r.chunks_zero,
        mib(r.bytes_read),
        mib(r.bytes_on_wire),
        r.seconds,
        mib(r.volume_bytes) / r.seconds.max(1e-9),
        r.replica_state
    )
}

/// Write a test image of `mib` MiB: per MiB segment, about 40% random data,
/// 25% text, 35% zeros (left as holes).
pub fn make_mixed_image(path: &Path, mib: u64, seed: u64) -> Result<()> {
    let mut f = File::create(path).ctx(|| format!("creating {}", path.display()))?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let words = [
        "block ", "mirror ", "replica ", "chunk ", "bitmap ", "quic ", "durable ", "sector ",
        "the ", "of ", "and ", "write ", "read ", "\n",
    ];
    let mut seg = vec![0u8; 1 << 20];
    for m in 0..mib {
        let roll = rng.gen_range(0..100);
        if roll < 40 {
            rng.fill_bytes(&mut seg);
        } else if roll < 65 {
            let mut pos = 0;
            while pos < seg.len() {
                let w = words[rng.gen_range(0..words.len())].as_bytes();
                let n = w.len().min(seg.len() - pos);
                seg[pos..pos + n].copy_from_slice(&w[..n]);
                pos += n;
            }
        } else {
            continue;
        }
        f.seek(SeekFrom::Start(m << 20))
            .ctx(|| format!("seeking in {}", path.display()))?;
        f.write_all(&seg)
            .ctx(|| format!("writing {}", path.display()))?;
    }
    f.set_len(mib << 20)
        .ctx(|| format!("sizing {}", path.display()))?;
    f.sync_all().ctx(|| format!("fsync {}", path.display()))
}

/// Overwrite `fraction` of the chunks of `path` with random data.
pub fn change_chunks(path: &Path, chunk_bytes: u64, fraction: f64, seed: u64) -> Result<u64> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .ctx(|| format!("opening {}", path.display()))?;
    let size = f
        .metadata()
        .ctx(|| format!("stat {}", path.display()))?
        .len();
    let chunks = size / chunk_bytes;
    let n = ((chunks as f64 * fraction).ceil() as u64).max(1);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut picked = std::collections::BTreeSet::new();
    while (picked.len() as u64) < n.min(chunks) {
        picked.insert(rng.gen_range(0..chunks));
    }
    let mut buf = vec![0u8; chunk_bytes as usize];
    for &c in &picked {
        rng.fill_bytes(&mut buf);
        f.seek(SeekFrom::Start(c * chunk_bytes))
            .ctx(|| format!("seeking in {}", path.display()))?;
        f.write_all(&buf)
            .ctx(|| format!("writing {}", path.display()))?;
    }
    f.sync_all().ctx(|| format!("fsync {}", path.display()))?;
    Ok(picked.len() as u64)
}

/// Compare two files byte for byte; returns the first differing offset.
pub fn first_difference(a: &Path, b: &Path) -> Result<Option<u64>> {
    let mut fa = File::open(a).ctx(|| format!("opening {}", a.display()))?;
    let mut fb = File::open(b).ctx(|| format!("opening {}", b.display()))?;
    let mut ba = vec![0u8; 1 << 20];
    let mut bb = vec![0u8; 1 << 20];
    let mut off = 0u64;
    loop {
        let na = read_full(&mut fa, &mut ba).ctx(|| format!("reading {}", a.display()))?;
        let nb = read_full(&mut fb, &mut bb).ctx(|| format!("reading {}", b.display()))?;
        if na != nb || ba[..na] != bb[..nb] {
            let k = ba[..na.min(nb)]
                .iter()
                .zip(&bb[..na.min(nb)])
                .position(|(x, y)| x != y)
                .unwrap_or(na.min(nb));
            return Ok(Some(off + k as u64));
        }
        if na == 0 {
            return Ok(None);
        }
        off += na as u64;
    }
}

fn read_full(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        let k = f.read(&mut buf[n..])?;
        if k == 0 {
            break;
        }
        n += k;
    }
    Ok(n)
}

pub fn run(size_mib: u64) -> Result<()> {
    if size_mib == 0 || size_mib > 1 << 20 {
        return Err(Error::Config(format!(
            "demo size {size_mib} MiB is outside 1..=1048576"
        )));
    }
    let tmp = tempfile::Builder::new()
        .prefix("blkmirror-demo-")
        .tempdir()
        .ctx(|| "creating a temporary directory".to_string())?;
    let dir = tmp.path();
    println!("blkmirror demo in {}", dir.display());
    let primary_id = Identity::generate(&dir.join("primary-id"))?;
    let mirror_id = Identity::generate(&dir.join("mirror-id"))?;
    println!("  primary identity {}", primary_id.fingerprint());
    println!("  mirror identity  {}", mirror_id.fingerprint());
    let image = dir.join("disk.img");
    make_mixed_image(&image, size_mib, 7)?;
    println!(
        "  made {} ({size_mib} MiB: ~40% random, ~25% text, ~35% zeros)",
        image.display()
    );
    let store = dir.join("store");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::io("starting the async runtime", e))?;
    let result: Result<()> = rt.block_on(async {
        let server = Server::bind(ServeConfig {
            identity: mirror_id.clone(),
            listen: "127.0.0.1:0"
                .parse()
                .map_err(|_| Error::Other("bad address".into()))?,
            store: store.clone(),
            allow: vec![primary_id.fingerprint()],
            queue_depth: 32,
            engine: EnginePreference::Auto,
            tuning: Tuning::default(),
            points_after_sync: false,
            point_every: None,
            keep: (8, 24, 7),
            async_commit: crate::mirror::ASYNC_COMMIT_DEFAULT,
        })?;
        let addr = server.local_addr()?;
        println!(
            "  mirror listening on {addr} (QUIC, mutual TLS), store {}",
            store.display()
        );
        let server_task = tokio::spawn(server.run());
        let opts = |full: bool| SyncOptions {
            source: image.clone(),
            identity: primary_id.clone(),
            to: addr.to_string(),
            peer: mirror_id.fingerprint(),
            volume: "demo".into(),
            full,
            checksum: false,
            chunk_bytes: None,
            state_dir: dir.join("state"),
            resize: false,
            limits: SyncLimits::default(),
            engine: EnginePreference::Auto,
            tuning: Tuning::default(),
            progress: false,
            compress: true,
            compress_always: false,
            dry_run: false,
            split_brain: crate::protocol::genid::SplitBrainPolicy::Disconnect,
        };
        let r1 = run_sync(opts(false)).await?;
        println!("1. {}", describe(&r1));
        let changed = change_chunks(&image, 65536, 0.01, 11)?;
        println!("   changed {changed} chunks of 64 KiB (1%) in the image");
        let r2 = run_sync(opts(false)).await?;
        println!("2. {}", describe(&r2));
        let replica = store.join("demo.img");
        if let Some(off) = first_difference(&image, &replica)? {
            return Err(Error::Other(format!(
                "replica differs from the source at byte {off}"
            )));
        }
        println!(
            "3. replica {} is byte-identical to the source",
            replica.display()
        );
        for (step, mode) in [(4, Mode::Sync), (5, Mode::Async)] {
            let live = ReplicateOptions {
                sync: opts(false),
                identity: primary_id.clone(),
                mode,
                on_disconnect: match mode {
                    Mode::Sync => OnDisconnect::Suspend,
                    Mode::Async => OnDisconnect::Continue,
                },
                suspend_timeout: Duration::from_secs(30),
                queue_bytes: 64 << 20,
                resync_rate: 0,
                linger: Duration::from_millis(5),
                nbd: Listen::Unix(dir.join("nbd.sock")),
                export: "demo".into(),
                scan: false,
                lazy_interval: Duration::from_secs(5),
                io_thread: false,
                announce: false,
                busy_poll: Duration::ZERO,
            };
            live_round(step, live, &replica, 100 + u64::from(step)).await?;
        }
        server_task.abort();
        Ok(())
    });
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    result?;
    println!("demo complete; temporary files removed");
    Ok(())
}

/// What the demo's NBD client did in one live round.
struct Workload {
    small_writes: usize,
    latencies_us: Vec<u64>,
    large_bytes: u64,
    zero_bytes: u64,
}

/// Connects to the export (retrying while `replicate` catches up), then
/// writes through it: random 4 KiB writes one at a time (the last one read
/// back), 1 MiB writes, a range of zeros and a flush.
fn write_through_nbd(sock: &Path, seed: u64) -> Result<Workload> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut c = loop {
        match Client::connect(sock, "demo") {
            Ok(c) => break c,
            Err(e) if Instant::now() >= deadline => {
                return Err(Error::io(format!("connecting to {}", sock.display()), e))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    let nbd = |what: &str, r: std::io::Result<u32>| -> Result<()> {
        match r {
            Ok(0) => Ok(()),
            Ok(errno) => Err(Error::Other(format!("{what}: NBD error {errno}"))),
            Err(e) => Err(Error::io(what.to_string(), e)),
        }
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let blocks = c.size / 4096;
    let small_writes = blocks.min(2000) as usize;
    let mut latencies_us = Vec::with_capacity(small_writes);
    let mut block = vec![0u8; 4096];
    let mut last_off = 0u64;
    for _ in 0..small_writes {
        last_off = rng.gen_range(0..blocks) * 4096;
        rng.fill_bytes(&mut block);
        let t = Instant::now();
        nbd("a 4 KiB write", c.write(last_off, &block, false))?;
        latencies_us.push(t.elapsed().as_micros() as u64);
    }
    // `block` still holds the last write's data.
    let back = c
        .read(last_off, 4096)
        .map_err(|e| Error::io("reading back through NBD", e))?;
    if small_writes > 0 && back != block {
        return Err(Error::Other(format!(
            "reading offset {last_off} through NBD did not return what was written there"
        )));
    }
    let mib = c.size >> 20;
    let large = mib.min(16);
    let mut big = vec![0u8; 1 << 20];
    let first = if mib > large {
        rng.gen_range(0..mib - large)
    } else {
        0
    };
    for m in first..first + large {
        rng.fill_bytes(&mut big);
        nbd("a 1 MiB write", c.write(m << 20, &big, false))?;
    }
    let zero_bytes = if mib > 0 {
        let m = rng.gen_range(0..mib);
        nbd("a 1 MiB write of zeros", c.zero(m << 20, 1 << 20))?;
        1 << 20
    } else {
        0
    };
    nbd("a flush", c.flush())?;
    c.disconnect();
    latencies_us.sort_unstable();
    Ok(Workload {
        small_writes,
        latencies_us,
        large_bytes: large << 20,
        zero_bytes,
    })
}

/// One live round: `replicate` serves the image over NBD, a client writes
/// through it, `replicate` stops, and the replica must equal the source.
async fn live_round(step: u32, opts: ReplicateOptions, replica: &Path, seed: u64) -> Result<()> {
    let Listen::Unix(sock) = opts.nbd.clone() else {
        return Err(Error::Other("the demo serves NBD on a unix socket".into()));
    };
    let (image, state_dir, mode) = (
        opts.sync.source.clone(),
        opts.sync.state_dir.clone(),
        opts.mode,
    );
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut task = tokio::spawn(run_replicate(
        opts,
        async move {
            let _ = stop_rx.await;
        },
        std::future::pending(),
    ));
    let sock2 = sock.clone();
    let mut client = tokio::task::spawn_blocking(move || write_through_nbd(&sock2, seed));
    let work = tokio::select! {
        r = &mut client => r.map_err(|e| Error::Other(format!("NBD client failed: {e}")))?,
        r = &mut task => {
            client.abort();
            return Err(match r {
                Ok(Err(e)) => e,
                Ok(Ok(())) => Error::Other("replicate ended before the client finished".into()),
                Err(e) => Error::Other(format!("replicate failed: {e}")),
            });
        }
    };
    let _ = stop_tx.send(());
    let ended = task
        .await
        .map_err(|e| Error::Other(format!("replicate failed: {e}")))?;
    let work = work?;
    ended?;
    let pct = |p: usize| {
        let l = &work.latencies_us;
        if l.is_empty() {
            0
        } else {
            l[(l.len() * p / 100).min(l.len() - 1)]
        }
    };
    let (name, promise) = match mode {
        Mode::Sync => ("sync", "each answered once durable on both sides"),
        Mode::Async => (
            "async",
            "each answered after the local write, then sent in order",
        ),
    };
    println!(
        "{step}. live, {name} mode: replicate served the image over NBD ({}); a client wrote {} random 4 KiB blocks one at a time (p50 {} µs, p99 {} µs; {promise}), {} MiB in 1 MiB writes, {} MiB of zeros (sent as a range), then a flush",
        sock.display(),
        work.small_writes,
        pct(50),
        pct(99),
        work.large_bytes >> 20,
        work.zero_bytes >> 20,
    );
    let store = replica.parent().unwrap_or(Path::new("."));
    for (dir, primary) in [(state_dir.as_path(), true), (store, false)] {
        for row in crate::replication::status::collect(dir, primary, Some("demo"))? {
            println!("   status: {}", crate::replication::status::describe(&row));
        }
    }
    if let Some(off) = first_difference(&image, replica)? {
        return Err(Error::Other(format!(
            "after the {name}-mode round the replica differs from the source at byte {off}"
        )));
    }
    println!("   replica is byte-identical to the source");
    Ok(())
}
