//! `blkmirror demo`: a complete primary + mirror run on loopback with
//! temporary files.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use rand::{Rng, RngCore, SeedableRng};

use crate::block::EnginePreference;
use crate::config::SyncLimits;
use crate::error::{Error, IoContext, Result};
use crate::mirror::{ServeConfig, Server};
use crate::primary::{run_sync, SyncOptions, SyncReport};
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
        server_task.abort();
        let replica = store.join("demo.img");
        match first_difference(&image, &replica)? {
            None => {
                println!(
                    "3. replica {} is byte-identical to the source",
                    replica.display()
                );
                Ok(())
            }
            Some(off) => Err(Error::Other(format!(
                "replica differs from the source at byte {off}"
            ))),
        }
    });
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    result?;
    println!("demo complete; temporary files removed");
    Ok(())
}
