//! Tests of the I/O service, run over both engines (and O_DIRECT on/off where it
//! matters). Every test compares bytes, not just success.

use std::future::Future;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::block::{DirectIo, IoTarget, OpenOptions, UringEngine};

const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;

fn engines() -> [EnginePreference; 2] {
    [EnginePreference::Uring, EnginePreference::Plain]
}

/// Where a test's service runs its engine: a thread of its own with either
/// engine, or io_uring driven by a task on the test's runtime.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Placement {
    Thread(EnginePreference),
    Runtime,
}

fn placements() -> [Placement; 3] {
    [
        Placement::Thread(EnginePreference::Uring),
        Placement::Thread(EnginePreference::Plain),
        Placement::Runtime,
    ]
}

/// Start a service as `placement` says (the runtime driver is spawned on the
/// current runtime; its handle is returned).
fn start_at(
    dev: Device,
    cfg: &EngineConfig,
    placement: Placement,
) -> (IoService, Option<tokio::task::JoinHandle<Result<()>>>) {
    match placement {
        Placement::Thread(pref) => (IoService::start(dev, cfg, pref).unwrap(), None),
        Placement::Runtime => {
            let (svc, driver) =
                IoService::start_on_runtime(dev, cfg, EnginePreference::Uring).unwrap();
            let driver = driver.expect("an io_uring engine has a driver");
            (svc, Some(tokio::spawn(driver)))
        }
    }
}

fn start(dev: Device, cfg: &EngineConfig, placement: Placement) -> IoService {
    start_at(dev, cfg, placement).0
}

fn cfg(queue_depth: u32, buffer_bytes: usize, buffer_count: usize) -> EngineConfig {
    EngineConfig {
        queue_depth,
        buffer_bytes,
        buffer_count,
    }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn image(dir: &tempfile::TempDir, name: &str, size: u64, direct: DirectIo) -> (Device, PathBuf) {
    let path = dir.path().join(name);
    let dev = Device::create_file(&path, size, direct).unwrap();
    (dev, path)
}

/// Poll a future once (so that its request is queued), without a runtime.
fn poll_once<F: Future>(f: std::pin::Pin<&mut F>) -> Poll<F::Output> {
    let mut cx = Context::from_waker(Waker::noop());
    f.poll(&mut cx)
}

/// Read the whole device through the service in `step`-byte pieces.
async fn read_all(svc: &IoService, step: usize) -> Vec<u8> {
    let size = svc.size_bytes();
    let mut out = Vec::with_capacity(size as usize);
    let mut off = 0u64;
    while off < size {
        let n = (size - off).min(step as u64) as usize;
        out.extend_from_slice(&svc.read(off, n).await.unwrap());
        off += n as u64;
    }
    out
}

/// Read a file with a fresh O_DIRECT descriptor and engine, aligned whole buffers.
fn read_direct(path: &Path, len: usize) -> Vec<u8> {
    let opts = OpenOptions {
        write: false,
        direct: DirectIo::Require,
    };
    let dev = Device::open(path, &opts).unwrap();
    let mut e = Engine::new(&dev, &cfg(1, MIB, 1), EnginePreference::Uring).unwrap();
    let b = e.acquire().unwrap();
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let n = (len - out.len()).min(MIB);
        e.submit_read(b, out.len() as u64, n, 0).unwrap();
        let c = e.wait(1).unwrap().remove(0);
        assert_eq!(c.result.unwrap(), n);
        out.extend_from_slice(&e.buf(b)[..n]);
    }
    out
}

fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

#[track_caller]
fn assert_same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = first_diff(got, want) {
        panic!(
            "{what}: first difference at byte {i}: got {} want {}",
            got[i], want[i]
        );
    }
}

fn errno_of(r: &Result<impl std::fmt::Debug>) -> i32 {
    match r {
        Err(e) => error_errno(e),
        Ok(v) => panic!("expected an error, got {v:?}"),
    }
}

#[test]
fn handles_are_send_sync_clone() {
    fn check<T: Send + Sync + Clone + 'static>() {}
    check::<IoService>();
}

/// Many tokio tasks, each owning a region whose boundaries are not block
/// aligned (neighbours share blocks, exercising the read-modify-write lock), do
/// random reads, writes, zeroes and flushes and check reads against their model;
/// at the end the whole device is compared through the service, through a fresh
/// O_DIRECT descriptor and through the page cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_concurrent_io_matches_model() {
    let dir = tempfile::tempdir().unwrap();
    let seed: u64 = std::env::var("BLKMIRROR_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().gen());
    eprintln!("seed {seed} (BLKMIRROR_SEED to replay)");
    for direct in [DirectIo::Auto, DirectIo::Off] {
        for pref in placements() {
            let size = 8 * MIB as u64;
            let (dev, path) = image(&dir, &format!("r-{direct:?}-{pref:?}"), size, direct);
            let svc = start(dev, &cfg(8, 64 * KIB, 8), pref);
            let what = format!("{} {direct:?}", svc.engine_name());
            let tasks = 12u64;
            let region = size / tasks;
            let mut handles = Vec::new();
            for t in 0..tasks {
                let svc = svc.clone();
                let start = if t == 0 { 0 } else { t * region + 333 };
                let end = if t == tasks - 1 {
                    size
                } else {
                    (t + 1) * region + 333
                };
                let mut rng = StdRng::seed_from_u64(seed ^ (t * 7919));
                handles.push(tokio::spawn(async move {
                    let mut model = vec![0u8; (end - start) as usize];
                    let len_max = (end - start) as usize;
                    for i in 0..40u64 {
                        let aligned = rng.gen_bool(0.4);
                        let mut len = rng.gen_range(1..=(200 * KIB).min(len_max));
                        let mut off = start + rng.gen_range(0..=(end - start) - len as u64);
                        if aligned {
                            off = (off / 4096 * 4096).max(start.div_ceil(4096) * 4096);
                            len = len.div_ceil(4096) * 4096;
                            if off + len as u64 > end {
                                continue;
                            }
                        }
                        let rel = (off - start) as usize;
                        match rng.gen_range(0..10) {
                            0..=4 => {
                                let data = pattern(seed ^ (t << 32) ^ i, len);
                                let fua = rng.gen_bool(0.2);
                                svc.write(off, Bytes::from(data.clone()), fua)
                                    .await
                                    .unwrap();
                                model[rel..rel + len].copy_from_slice(&data);
                            }
                            5..=7 => {
                                let got = svc.read(off, len).await.unwrap();
                                assert_same(
                                    &got,
                                    &model[rel..rel + len],
                                    &format!("task {t} op {i} read {off}+{len}"),
                                );
                            }
                            8 => {
                                svc.zero(off, len as u64, rng.gen_bool(0.3)).await.unwrap();
                                model[rel..rel + len].fill(0);
                            }
                            _ => svc.flush().await.unwrap(),
                        }
                    }
                    (start, model)
                }));
            }
            let mut want = vec![0u8; size as usize];
            for h in handles {
                let (start, model) = h.await.unwrap();
                want[start as usize..start as usize + model.len()].copy_from_slice(&model);
            }
            svc.flush().await.unwrap();
            assert_same(&read_all(&svc, 3 * MIB + 5).await, &want, &what);
            let unaligned = svc.read(12345, 1_000_001).await.unwrap();
            assert_same(&unaligned, &want[12345..12345 + 1_000_001], &what);
            let s2 = svc.clone();
            tokio::task::spawn_blocking(move || s2.shutdown().unwrap())
                .await
                .unwrap();
            assert_same(&std::fs::read(&path).unwrap(), &want, &what);
            assert_same(&read_direct(&path, size as usize), &want, &what);
        }
    }
}

/// Unaligned writes go through read-modify-write of the covering blocks; an
/// aligned O_DIRECT read (the service's own, and a fresh descriptor's) sees them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unaligned_writes_visible_to_direct_reads() {
    let dir = tempfile::tempdir().unwrap();
    for pref in placements() {
        let size = 4 * MIB as u64;
        let (dev, path) = image(&dir, &format!("u-{pref:?}"), size, DirectIo::Require);
        assert!(dev.is_direct());
        let lbs = dev.logical_block_bytes();
        let svc = start(dev, &cfg(4, 16 * KIB, 4), pref);
        assert_eq!(svc.logical_block_bytes(), lbs);
        let mut want = pattern(1, size as usize);
        svc.write(0, Bytes::from(want.clone()), false)
            .await
            .unwrap();
        let cases: &[(u64, usize)] = &[
            (1, 1),
            (511, 2),
            (4095, 4098),
            (100_000, 3),
            (16 * KIB as u64 - 7, 16 * KIB + 14), // spans 3 buffers' worth
            (size - 5, 5),
            (MIB as u64 + 513, 200 * KIB + 1),
        ];
        for (i, &(off, len)) in cases.iter().enumerate() {
            let data = pattern(100 + i as u64, len);
            svc.write(off, Bytes::from(data.clone()), i % 2 == 0)
                .await
                .unwrap();
            want[off as usize..off as usize + len].copy_from_slice(&data);
            // Unaligned read of exactly those bytes, and an aligned read around them.
            assert_same(&svc.read(off, len).await.unwrap(), &data, "unaligned read");
            let a = off / 4096 * 4096;
            let b = (off + len as u64).div_ceil(4096) * 4096;
            let got = svc.read(a, (b - a) as usize).await.unwrap();
            assert_same(&got, &want[a as usize..b as usize], "aligned read");
        }
        // A fresh O_DIRECT descriptor (while the service is still running).
        assert_same(&read_direct(&path, size as usize), &want, "fresh O_DIRECT");
        svc.shutdown().unwrap();
        assert_same(&std::fs::read(&path).unwrap(), &want, "page cache");
    }
}

/// Concurrent writes to different bytes of the same blocks never lose an update.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_block_unaligned_writes_do_not_lose_updates() {
    let dir = tempfile::tempdir().unwrap();
    for pref in placements() {
        let (dev, path) = image(&dir, &format!("s-{pref:?}"), MIB as u64, DirectIo::Require);
        let svc = start(dev, &cfg(16, 4096, 16), pref);
        let mut want = vec![0u8; 2048];
        for round in 0..5u8 {
            let mut handles = Vec::new();
            for k in 0..128u64 {
                // 16-byte pieces interleaved over the first 2 KiB (4 blocks of 512).
                let off = k * 16;
                let data = vec![round.wrapping_mul(31).wrapping_add(k as u8) | 1; 16];
                want[off as usize..off as usize + 16].copy_from_slice(&data);
                let svc = svc.clone();
                handles.push(tokio::spawn(async move {
                    svc.write(off, Bytes::from(data), false).await.unwrap()
                }));
            }
            for h in handles {
                h.await.unwrap();
            }
            assert_same(&svc.read(0, 2048).await.unwrap(), &want, "round");
        }
        let s2 = svc.clone();
        tokio::task::spawn_blocking(move || s2.shutdown().unwrap())
            .await
            .unwrap();
        assert_same(&std::fs::read(&path).unwrap()[..2048], &want, "file");
    }
}

/// Requests larger than a buffer (up to the maximum) at unaligned offsets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_requests_are_split() {
    let dir = tempfile::tempdir().unwrap();
    for pref in placements() {
        let size = 40 * MIB as u64;
        let (dev, _path) = image(&dir, &format!("l-{pref:?}"), size, DirectIo::Auto);
        let svc = start(dev, &cfg(8, MIB, 8), pref);
        let data = pattern(9, MAX_IO_BYTES);
        svc.write(1000, Bytes::from(data.clone()), true)
            .await
            .unwrap();
        assert_same(
            &svc.read(1000, MAX_IO_BYTES).await.unwrap(),
            &data,
            "32 MiB",
        );
        assert_same(&svc.read(0, 1000).await.unwrap(), &[0u8; 1000], "before");
        let too_big = svc.read(0, MAX_IO_BYTES + 1).await;
        assert_eq!(errno_of(&too_big), libc::EINVAL);
        let too_big = svc
            .write(0, Bytes::from(vec![0u8; MAX_IO_BYTES + 1]), false)
            .await;
        assert_eq!(errno_of(&too_big), libc::EINVAL);
        drop(svc);
    }
}

/// FUA writes and zeroes, flushes: the data is there after a reopen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fua_and_flush() {
    let dir = tempfile::tempdir().unwrap();
    for direct in [DirectIo::Auto, DirectIo::Off] {
        for pref in placements() {
            let size = 2 * MIB as u64;
            let (dev, path) = image(&dir, &format!("f-{direct:?}-{pref:?}"), size, direct);
            let svc = start(dev, &cfg(4, 64 * KIB, 4), pref);
            let a = pattern(5, 300 * KIB);
            svc.write(4096, Bytes::from(a.clone()), true).await.unwrap();
            let b = pattern(6, 777);
            svc.write(500_001, Bytes::from(b.clone()), true)
                .await
                .unwrap();
            svc.zero(8192, 10_000, true).await.unwrap();
            svc.flush().await.unwrap();
            svc.flush().await.unwrap();
            let mut want = vec![0u8; size as usize];
            want[4096..4096 + a.len()].copy_from_slice(&a);
            want[500_001..500_001 + b.len()].copy_from_slice(&b);
            want[8192..18_192].fill(0);
            assert_same(&read_all(&svc, MIB).await, &want, "service");
            tokio::task::spawn_blocking(move || svc.shutdown().unwrap())
                .await
                .unwrap();
            assert_same(&std::fs::read(&path).unwrap(), &want, "reopen");
        }
    }
}

fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// Zero on a file punches a hole (aligned middle) and zeroes exact bytes at the
/// unaligned edges; the fallback writes zeros, either configured from the start
/// or after the kernel refused the fallocate mode (EOPNOTSUPP: here PUNCH_HOLE
/// without KEEP_SIZE, which Linux always refuses).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_file_punches_hole_or_writes_zeros() {
    let dir = tempfile::tempdir().unwrap();
    for zero_mode in ["punch", "writes", "refused"] {
        let force_write_zeros = zero_mode != "punch";
        for direct in [DirectIo::Auto, DirectIo::Off] {
            for pref in placements() {
                let size = 4 * MIB as u64;
                let name = format!("z-{zero_mode}-{direct:?}-{pref:?}");
                let (dev, path) = image(&dir, &name, size, direct);
                let svc = if let (true, Placement::Thread(pref)) = (force_write_zeros, pref) {
                    let target = Target {
                        path: path.clone(),
                        size_bytes: size,
                        align: if dev.is_direct() {
                            dev.logical_block_bytes()
                        } else {
                            1
                        },
                        zero_mode: (zero_mode == "refused").then_some(libc::FALLOC_FL_PUNCH_HOLE),
                        writable: true,
                    };
                    let c = cfg(4, 64 * KIB, 4);
                    let make = move |d: &Option<Device>| Engine::new(d.as_ref().unwrap(), &c, pref);
                    IoService::spawn(make, target, Some(dev)).unwrap()
                } else if force_write_zeros {
                    // The runtime driver runs the same worker; the forced
                    // fallbacks are covered by the thread placements.
                    continue;
                } else {
                    start(dev, &cfg(4, 64 * KIB, 4), pref)
                };
                let mut want = pattern(11, size as usize);
                svc.write(
                    0,
                    Bytes::from(want[..MAX_IO_BYTES.min(size as usize)].to_vec()),
                    true,
                )
                .await
                .unwrap();
                let full = allocated_bytes(&path);
                assert!(full >= size, "{name}: {full} bytes allocated");
                // Aligned: 1 MiB .. 3 MiB; unaligned: 100 bytes in the middle of a block,
                // and a range with both edges unaligned.
                for &(off, len) in &[
                    (MIB as u64, 2 * MIB as u64),
                    (700, 100),
                    (3 * MIB as u64 + 77, 300_000),
                ] {
                    svc.zero(off, len, false).await.unwrap();
                    want[off as usize..(off + len) as usize].fill(0);
                    let (a, b) = (off.saturating_sub(1000), off + len + 1000);
                    assert_same(
                        &svc.read(a, (b - a) as usize).await.unwrap(),
                        &want[a as usize..b as usize],
                        &name,
                    );
                }
                assert_same(&read_all(&svc, MIB).await, &want, &name);
                // The fd is the engine's: sanity-check that the hole is visible.
                let after = allocated_bytes(&path);
                if force_write_zeros {
                    assert!(after >= size, "{name}: written zeros stay allocated");
                } else {
                    assert!(
                        after <= full - 2 * MIB as u64,
                        "{name}: hole punched ({full} -> {after} bytes allocated)"
                    );
                    let dev2 = Device::open(&path, &OpenOptions::default()).unwrap();
                    let ranges = dev2.data_ranges(MIB as u64, 3 * MIB as u64).unwrap();
                    assert!(ranges.is_empty(), "{name}: data in the hole: {ranges:?}");
                }
                drop(svc);
                assert_same(&std::fs::read(&path).unwrap(), &want, &name);
                assert_eq!(std::fs::metadata(&path).unwrap().len(), size, "KEEP_SIZE");
            }
        }
    }
}

/// Out-of-range requests fail with a clear EINVAL error naming the path; nothing
/// panics, and the service keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_range_requests_error() {
    let dir = tempfile::tempdir().unwrap();
    for pref in placements() {
        // Not a multiple of the block size: with O_DIRECT the tail is not served.
        let raw = MIB as u64 + 100;
        let (dev, _path) = image(&dir, &format!("e-{pref:?}"), raw, DirectIo::Auto);
        let direct = dev.is_direct();
        let svc = start(dev, &cfg(2, 4096, 2), pref);
        let size = svc.size_bytes();
        if direct {
            assert_eq!(size % u64::from(svc.logical_block_bytes()), 0);
            assert!(size < raw);
        } else {
            assert_eq!(size, raw);
            assert_eq!(svc.logical_block_bytes(), 1);
        }
        let r = svc.read(size - 4096, 8192).await;
        assert_eq!(errno_of(&r), libc::EINVAL);
        let msg = r.unwrap_err().to_string();
        assert!(msg.contains("past the end"), "{msg}");
        assert!(
            msg.contains(&format!("e-{pref:?}")),
            "names the path: {msg}"
        );
        assert_eq!(errno_of(&svc.read(size, 1).await), libc::EINVAL);
        assert_eq!(errno_of(&svc.read(u64::MAX, 2).await), libc::EINVAL);
        let w = svc.write(size - 1, Bytes::from_static(b"ab"), false).await;
        assert_eq!(errno_of(&w), libc::EINVAL);
        assert_eq!(errno_of(&svc.zero(size, 1, false).await), libc::EINVAL);
        assert_eq!(
            errno_of(&svc.zero(u64::MAX - 1, 5, false).await),
            libc::EINVAL
        );
        assert!(svc.read(size, 0).await.unwrap().is_empty());
        svc.write(size - 3, Bytes::from_static(b"xyz"), false)
            .await
            .unwrap();
        assert_eq!(svc.read(size - 3, 3).await.unwrap(), b"xyz");
        tokio::task::spawn_blocking(move || svc.shutdown().unwrap())
            .await
            .unwrap();
    }
}

/// Requests queued before `shutdown` all complete (with the right bytes on disk);
/// later requests fail with ESHUTDOWN.
#[test]
fn shutdown_finishes_requests_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    for pref in engines() {
        let size = 64 * MIB as u64;
        let (dev, path) = image(&dir, &format!("sd-{pref:?}"), size, DirectIo::Auto);
        let svc = IoService::start(dev, &cfg(4, 256 * KIB, 4), pref).unwrap();
        let late = svc.clone();
        let n = 48usize;
        let len = MIB + 3; // unaligned: read-modify-write at the tail
        let datas: Vec<Bytes> = (0..n)
            .map(|i| Bytes::from(pattern(i as u64 + 1, len)))
            .collect();
        let mut writes: Vec<_> = (0..n)
            .map(|i| Box::pin(svc.write((i * (len + 1)) as u64, datas[i].clone(), false)))
            .collect();
        // Poll each once: the request is queued and in flight (or waiting) now.
        for w in &mut writes {
            assert!(poll_once(w.as_mut()).is_pending());
        }
        let mut flush = Box::pin(svc.flush());
        assert!(poll_once(flush.as_mut()).is_pending());
        let stopper = svc.clone();
        let t = Instant::now();
        stopper.shutdown().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            for w in writes {
                w.await.unwrap();
            }
            flush.await.unwrap();
            let r = late.read(0, 10).await;
            assert_eq!(errno_of(&r), libc::ESHUTDOWN, "{r:?}");
            let r = late.write(0, Bytes::from_static(b"x"), false).await;
            assert_eq!(errno_of(&r), libc::ESHUTDOWN);
            assert_eq!(errno_of(&late.flush().await), libc::ESHUTDOWN);
        });
        eprintln!("{pref:?}: shutdown drained {n} MiB in {:?}", t.elapsed());
        drop(svc);
        let file = std::fs::read(&path).unwrap();
        for (i, d) in datas.iter().enumerate() {
            let off = i * (len + 1);
            assert_same(&file[off..off + len], d, &format!("write {i}"));
            assert_eq!(file[off + len], 0);
        }
    }
}

fn fds_open_on(path: &Path) -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|p| p == path)
        .count()
}

/// Dropping the last handle stops the thread after its work and closes the device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_of_last_handle_stops_the_thread() {
    let dir = tempfile::tempdir().unwrap();
    for pref in placements() {
        let (dev, path) = image(
            &dir,
            &format!("dr-{pref:?}"),
            4 * MIB as u64,
            DirectIo::Auto,
        );
        let path = path.canonicalize().unwrap();
        let (svc, driver) = start_at(dev, &cfg(4, 64 * KIB, 4), pref);
        assert!(fds_open_on(&path) >= 2, "device and engine descriptors");
        let mut handles = Vec::new();
        for i in 0..16u64 {
            let svc = svc.clone();
            handles.push(tokio::spawn(async move {
                let d = Bytes::from(pattern(i, 100_000));
                svc.write(i * 200_000 + 7, d.clone(), false).await.unwrap();
                assert_eq!(svc.read(i * 200_000 + 7, 100_000).await.unwrap(), d);
            }));
        }
        drop(svc);
        for h in handles {
            h.await.unwrap();
        }
        if let Some(driver) = driver {
            // The runtime driver ends once the last handle is gone.
            tokio::time::timeout(Duration::from_secs(10), driver)
                .await
                .expect("driver ends after the last handle")
                .unwrap()
                .unwrap();
        }
        // The last handle was dropped by a task: the thread has been joined.
        assert_eq!(fds_open_on(&path), 0, "descriptors closed");
        let file = std::fs::read(&path).unwrap();
        for i in 0..16u64 {
            let off = (i * 200_000 + 7) as usize;
            assert_same(
                &file[off..off + 100_000],
                &pattern(i, 100_000),
                "after drop",
            );
        }
    }
}

/// With io_uring the thread is woken for a new request while other I/O is in
/// flight, and a flush does not wait for that I/O. The target is a pipe: a read
/// of it stays in flight until the test writes to the pipe, and fdatasync of a
/// pipe fails at once with EINVAL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uring_wakes_for_new_requests_while_io_in_flight() {
    for on_runtime in [false, true] {
        wakes_with_io_in_flight(on_runtime).await;
    }
}

async fn wakes_with_io_in_flight(on_runtime: bool) {
    let (rd, wr) = nix::unistd::pipe().unwrap();
    let target = IoTarget {
        file: std::fs::File::from(rd),
        direct: false,
        align: 1,
    };
    let service_target = Target {
        path: PathBuf::from("pipe"),
        size_bytes: 1 << 20,
        align: 1,
        zero_mode: None,
        writable: true,
    };
    let mut driver = None;
    let svc = if on_runtime {
        let engine = UringEngine::new(target, &cfg(4, 4096, 4)).unwrap();
        let (svc, d) = IoService::spawn_on_runtime(engine, service_target, None).unwrap();
        driver = Some(tokio::spawn(d));
        svc
    } else {
        let make = move |_: &Option<Device>| {
            UringEngine::new_single_thread(target, &cfg(4, 4096, 4)).map(Engine::Uring)
        };
        IoService::spawn(make, service_target, None).unwrap()
    };
    let s1 = svc.clone();
    let read = tokio::spawn(async move { s1.read(0, 5).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!read.is_finished(), "the pipe read is in flight");
    let t = Instant::now();
    let flush = tokio::time::timeout(Duration::from_secs(5), svc.flush())
        .await
        .expect("flush was not submitted while the read was in flight");
    assert_eq!(errno_of(&flush), libc::EINVAL, "fdatasync of a pipe");
    eprintln!("flush answered in {:?} with a read in flight", t.elapsed());
    assert!(!read.is_finished());
    nix::unistd::write(&wr, b"hello").unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(got, b"hello");
    tokio::task::spawn_blocking(move || svc.shutdown().unwrap())
        .await
        .unwrap();
    if let Some(d) = driver {
        tokio::time::timeout(Duration::from_secs(5), d)
            .await
            .expect("the driver ends after shutdown")
            .unwrap()
            .unwrap();
    }
    drop(wr);
}

// ---------------------------------------------------------------------------
// Root-only tests: loop devices and a small ext4 file system.

fn is_root() -> bool {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn run(cmd: &str, args: &[&str]) -> std::result::Result<String, String> {
    let out = std::process::Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// `losetup --detach` on drop.
struct LoopDev(String);

impl LoopDev {
    fn attach(img: &Path) -> Option<LoopDev> {
        match run("losetup", &["--find", "--show", img.to_str()?]) {
            Ok(dev) => Some(LoopDev(dev)),
            Err(e) => {
                eprintln!("skipping: {e}");
                None
            }
        }
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = run("losetup", &["--detach", &self.0]);
    }
}

/// `umount` on drop.
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        if let Err(e) = run("umount", &[self.0.to_str().unwrap_or("")]) {
            eprintln!("{e}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loop_device_service() {
    if !is_root() {
        eprintln!("skipping: needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("loop.img");
    let size = 32 * MIB as u64;
    std::fs::write(&img, pattern(77, size as usize)).unwrap();
    let Some(lo) = LoopDev::attach(&img) else {
        return;
    };
    let opts = OpenOptions {
        write: true,
        direct: DirectIo::Require,
    };
    let mut want = pattern(77, size as usize);
    for pref in placements() {
        let dev = Device::open(Path::new(&lo.0), &opts).unwrap();
        assert_eq!(dev.kind(), DeviceKind::BlockDevice);
        let svc = start(dev, &cfg(8, 128 * KIB, 8), pref);
        assert_eq!(svc.size_bytes(), size);
        assert_eq!(svc.logical_block_bytes(), 512);
        // Concurrent writes and reads, aligned and not, in disjoint stripes.
        let mut handles = Vec::new();
        for t in 0..8u64 {
            let svc = svc.clone();
            handles.push(tokio::spawn(async move {
                let mut rng = StdRng::seed_from_u64(t);
                let base = t * 4 * MIB as u64 + 101;
                let mut done = Vec::new();
                for i in 0..10u64 {
                    let len = rng.gen_range(1..300 * KIB);
                    let off = base + rng.gen_range(0..3 * MIB as u64);
                    let data = pattern(1000 + t * 100 + i, len);
                    svc.write(off, Bytes::from(data.clone()), i % 3 == 0)
                        .await
                        .unwrap();
                    assert_same(&svc.read(off, len).await.unwrap(), &data, "loop rw");
                    done.push((off, data));
                }
                done
            }));
        }
        for h in handles {
            for (off, data) in h.await.unwrap() {
                want[off as usize..off as usize + data.len()].copy_from_slice(&data);
            }
        }
        // Zero: fallocate(ZERO_RANGE) on the block device, unaligned edges by RMW.
        svc.zero(5 * MIB as u64 + 3, 2 * MIB as u64, true)
            .await
            .unwrap();
        want[5 * MIB + 3..7 * MIB + 3].fill(0);
        svc.flush().await.unwrap();
        assert_same(&read_all(&svc, 4 * MIB).await, &want, "loop device");
        let r = svc.read(size - 512, 1024).await;
        assert_eq!(errno_of(&r), libc::EINVAL);
        tokio::task::spawn_blocking(move || svc.shutdown().unwrap())
            .await
            .unwrap();
    }
    assert_same(
        &read_direct(Path::new(&lo.0), size as usize),
        &want,
        "fresh",
    );
    drop(lo);
    assert_same(&std::fs::read(&img).unwrap(), &want, "backing file");
}

/// ENOSPC (file system full) and EIO (file system shut down) reach the caller as
/// distinct errnos, with the device offset in the error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enospc_and_eio_are_distinguishable() {
    if !is_root() {
        eprintln!("skipping: needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let fs_img = dir.path().join("fs.img");
    std::fs::File::create(&fs_img)
        .unwrap()
        .set_len(16 * MIB as u64)
        .unwrap();
    if let Err(e) = run("mkfs.ext4", &["-q", "-F", fs_img.to_str().unwrap()]) {
        eprintln!("skipping: {e}");
        return;
    }
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    if let Err(e) = run(
        "mount",
        &[
            "-o",
            "loop",
            fs_img.to_str().unwrap(),
            mnt.to_str().unwrap(),
        ],
    ) {
        eprintln!("skipping: {e}");
        return;
    }
    let _mount = Mount(mnt.clone());
    for pref in placements() {
        let img = mnt.join(format!("vol-{pref:?}"));
        let dev = Device::create_file(&img, 64 * MIB as u64, DirectIo::Auto).unwrap();
        let svc = start(dev, &cfg(4, MIB, 4), pref);
        let mut off = 0u64;
        let err = loop {
            match svc.write(off, Bytes::from(vec![0xAB; MIB]), false).await {
                Ok(()) => off += MIB as u64,
                Err(e) => break e,
            }
            assert!(
                off < 64 * MIB as u64,
                "a 16 MiB file system never filled up"
            );
        };
        assert_eq!(error_errno(&err), libc::ENOSPC, "{err}");
        assert!(
            matches!(&err, BlockError::Io { source, offset, .. }
                if source.raw_os_error() == Some(libc::ENOSPC) && *offset >= off),
            "{err:?}"
        );
        // What was written before is intact.
        assert_eq!(svc.read(0, 4096).await.unwrap(), vec![0xAB; 4096]);
        drop(svc);
        std::fs::remove_file(&img).unwrap();
    }
    // EIO: shut the file system down (EXT4_IOC_SHUTDOWN, no log flush).
    let img = mnt.join("vol-eio");
    let dev = Device::create_file(&img, 4 * MIB as u64, DirectIo::Auto).unwrap();
    let opts = OpenOptions {
        write: true,
        direct: DirectIo::Auto,
    };
    let dev2 = Device::open(&img, &opts).unwrap();
    let svcs = [
        IoService::start(dev, &cfg(4, MIB, 4), EnginePreference::Uring).unwrap(),
        IoService::start(dev2, &cfg(4, MIB, 4), EnginePreference::Plain).unwrap(),
    ];
    for svc in &svcs {
        svc.write(0, Bytes::from(vec![1u8; 8192]), true)
            .await
            .unwrap();
    }
    nix::ioctl_read!(ext4_shutdown, b'X', 125, u32);
    let mnt_dir = std::fs::File::open(&mnt).unwrap();
    let mut flags: u32 = 2; // EXT4_GOING_FLAGS_NOLOGFLUSH
                            // SAFETY: `mnt_dir` is an open directory of the ext4 file system and `flags`
                            // a valid u32 for the ioctl to read.
    unsafe { ext4_shutdown(mnt_dir.as_raw_fd(), &mut flags) }.unwrap();
    for svc in &svcs {
        let r = svc.write(4096, Bytes::from(vec![2u8; 4096]), true).await;
        assert_eq!(errno_of(&r), libc::EIO, "{} {r:?}", svc.engine_name());
        let r = svc.flush().await;
        assert_eq!(errno_of(&r), libc::EIO, "{} flush {r:?}", svc.engine_name());
    }
    drop(svcs);
}

// ---------------------------------------------------------------------------
// Benchmark: 4 KiB random I/O through the service at QD1 and QD32 (one tokio
// task per unit of queue depth, each waiting for its request before the next).
// `cargo test --release --lib -- --ignored --nocapture bench_service_randwrite`
// Compare with: fio --name=x --filename=F --ioengine=io_uring --direct=1
//   --rw=randwrite --bs=4k --iodepth=N --size=256M --runtime=5 --time_based
// Environment: BLKMIRROR_BENCH_FILE (an existing file of >= 256 MiB, e.g. fio's),
// BLKMIRROR_BENCH_DIR, _SECS, _WORKERS (tokio worker threads, default 1),
// _ENGINES (Uring,Plain), _QDS (1,32), _RW (randwrite|randread), _DIRECT (1|0).

#[test]
#[ignore]
fn bench_service_randwrite() {
    let env = |var: &str| std::env::var(format!("BLKMIRROR_BENCH_{var}")).ok();
    let dir_path = env("DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::tempdir_in(dir_path).unwrap();
    let size = 256 * MIB as u64;
    // An existing file (e.g. fio's, for a fair comparison), or a new one, fully
    // allocated (like fio's layout) so that writes do not allocate blocks.
    let path = match env("FILE") {
        Some(p) => PathBuf::from(p),
        None => {
            let path = dir.path().join("bench.img");
            std::fs::write(&path, pattern(1, size as usize)).unwrap();
            std::fs::File::open(&path).unwrap().sync_all().unwrap();
            path
        }
    };
    assert!(std::fs::metadata(&path).unwrap().len() >= size);
    let secs: f64 = env("SECS").and_then(|v| v.parse().ok()).unwrap_or(5.0);
    let workers: usize = env("WORKERS").and_then(|v| v.parse().ok()).unwrap_or(1);
    let read = env("RW").is_some_and(|v| v == "randread");
    let buffered = env("DIRECT").is_some_and(|v| v == "0");
    let only = |var: &str, v: &str| env(var).is_none_or(|s| s.split(',').any(|x| x == v));
    for pref in engines() {
        for qd in [1usize, 32] {
            if !only("ENGINES", &format!("{pref:?}")) || !only("QDS", &qd.to_string()) {
                continue;
            }
            let opts = OpenOptions {
                write: true,
                direct: if buffered {
                    DirectIo::Off
                } else {
                    DirectIo::Require
                },
            };
            let dev = Device::open(&path, &opts).unwrap();
            let svc = IoService::start(dev, &cfg(32, 64 * KIB, 32), pref).unwrap();
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(workers)
                .enable_all()
                .build()
                .unwrap();
            let data = Bytes::from(pattern(2, 4096));
            let ops = Arc::new(std::sync::atomic::AtomicU64::new(0));
            let deadline = Instant::now() + Duration::from_secs_f64(secs);
            let t = Instant::now();
            rt.block_on(async {
                let mut tasks = Vec::new();
                for w in 0..qd {
                    let svc = svc.clone();
                    let data = data.clone();
                    let ops = Arc::clone(&ops);
                    tasks.push(tokio::spawn(async move {
                        let mut rng = StdRng::seed_from_u64(w as u64);
                        let mut n = 0u64;
                        while Instant::now() < deadline {
                            let off = rng.gen_range(0..size / 4096) * 4096;
                            if read {
                                assert_eq!(svc.read(off, 4096).await.unwrap().len(), 4096);
                            } else {
                                svc.write(off, data.clone(), false).await.unwrap();
                            }
                            n += 1;
                        }
                        ops.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                    }));
                }
                for t in tasks {
                    t.await.unwrap();
                }
            });
            let el = t.elapsed().as_secs_f64();
            let n = ops.load(std::sync::atomic::Ordering::Relaxed) as f64;
            println!(
                "bench: service engine={:<8} qd={qd:<2} 4k {} {}: {:.0} IOPS, {:.1} MiB/s, mean latency {:.1} us",
                svc.engine_name(),
                if read { "randread" } else { "randwrite" },
                if buffered { "buffered" } else { "O_DIRECT" },
                n / el,
                n * 4096.0 / el / MIB as f64,
                el * 1e6 * qd as f64 / n
            );
            drop(rt);
            svc.shutdown().unwrap();
        }
    }
}
