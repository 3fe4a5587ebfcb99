//! Tests: every engine-level test runs over both engines (see [`engines`]).

use std::path::{Path, PathBuf};
use std::time::Instant;

use super::*;

const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;

/// Every engine is tested: io_uring must work on the test machines.
fn engines() -> Vec<EnginePreference> {
    vec![EnginePreference::Uring, EnginePreference::Plain]
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

/// Submit a write and wait for it; returns its result.
fn write_sync(e: &mut Engine, buf: BufId, offset: u64, data: &[u8]) -> Result<usize> {
    e.buf_mut(buf)[..data.len()].copy_from_slice(data);
    e.submit_write(buf, offset, data.len(), 7)?;
    let mut c = e.wait(1)?;
    assert_eq!(c.len(), 1);
    let c = c.remove(0);
    assert_eq!(c.user_data, 7);
    assert_eq!(c.buf, Some(buf));
    c.result
}

fn read_sync(e: &mut Engine, buf: BufId, offset: u64, len: usize) -> Result<Vec<u8>> {
    e.submit_read(buf, offset, len, 9)?;
    let mut c = e.wait(1)?;
    assert_eq!(c.len(), 1);
    let c = c.remove(0);
    assert_eq!(c.user_data, 9);
    assert_eq!(c.buf, Some(buf));
    let n = c.result?;
    assert_eq!(n, len);
    Ok(e.buf(buf)[..len].to_vec())
}

fn tmpfile(dir: &tempfile::TempDir, name: &str) -> PathBuf {
    dir.path().join(name)
}

/// The device opened with `O_DIRECT`, or `None` (and a note) where the
/// filesystem refuses it (tmpfs): the test then has nothing to check.
fn direct_or_skip(opened: Result<Device>, path: &Path) -> Option<Device> {
    match opened {
        Ok(d) => Some(d),
        Err(BlockError::DirectUnsupported { .. }) => {
            eprintln!("skipping: filesystem of {} has no O_DIRECT", path.display());
            None
        }
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn engine_names_and_auto() {
    let dir = tempfile::tempdir().unwrap();
    let dev = Device::create_file(&tmpfile(&dir, "a"), MIB as u64, DirectIo::Off).unwrap();
    let c = cfg(4, 4096, 2);
    let u = Engine::new(&dev, &c, EnginePreference::Uring).unwrap();
    assert_eq!(u.name(), "io_uring");
    let p = Engine::new(&dev, &c, EnginePreference::Plain).unwrap();
    assert_eq!(p.name(), "plain");
    let a = Engine::new(&dev, &c, EnginePreference::Auto).unwrap();
    assert_eq!(a.name(), "io_uring");
    assert_eq!(a.queue_depth(), 4);
    assert_eq!(a.buffer_bytes(), 4096);
    assert_eq!(a.in_flight(), 0);
}

#[test]
fn bad_config_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let dev = Device::create_file(&tmpfile(&dir, "a"), MIB as u64, DirectIo::Off).unwrap();
    for c in [
        cfg(0, 4096, 1),
        cfg(4, 1000, 1),
        cfg(4, 0, 1),
        cfg(4, 4096, 0),
    ] {
        for pref in engines() {
            let r = Engine::new(&dev, &c, pref);
            assert!(matches!(r, Err(BlockError::InvalidConfig { .. })), "{c:?}");
        }
    }
}

#[test]
fn write_read_roundtrip_various_offsets() {
    let dir = tempfile::tempdir().unwrap();
    for direct in [DirectIo::Auto, DirectIo::Off] {
        for pref in engines() {
            let path = tmpfile(&dir, &format!("rt-{direct:?}-{pref:?}"));
            let dev = Device::create_file(&path, 8 * MIB as u64, direct).unwrap();
            let mut e = Engine::new(&dev, &cfg(8, 64 * KIB, 4), pref).unwrap();
            let b = e.acquire().unwrap();
            let cases: &[(u64, usize)] = if dev.is_direct() {
                &[
                    (0, 4096),
                    (4096, 512),
                    (MIB as u64 + 512, 64 * KIB),
                    (8 * MIB as u64 - 64 * KIB as u64, 64 * KIB),
                ]
            } else {
                &[
                    (0, 1),
                    (4095, 3),
                    (MIB as u64 + 17, 64 * KIB),
                    (8 * MIB as u64 - 100, 100),
                ]
            };
            for (i, &(off, len)) in cases.iter().enumerate() {
                let data = pattern(i as u64 + 1, len);
                assert_eq!(write_sync(&mut e, b, off, &data).unwrap(), len);
                let back = read_sync(&mut e, b, off, len).unwrap();
                assert_eq!(back, data, "{pref:?} {direct:?} offset {off} len {len}");
            }
            // Earlier writes are still intact after later ones.
            let (off, len) = cases[0];
            assert_eq!(read_sync(&mut e, b, off, len).unwrap(), pattern(1, len));
            e.release(b);
        }
    }
}

#[test]
fn multiple_ops_in_flight_and_queue_full() {
    let dir = tempfile::tempdir().unwrap();
    for pref in engines() {
        let path = tmpfile(&dir, &format!("mf-{pref:?}"));
        let dev = Device::create_file(&path, 4 * MIB as u64, DirectIo::Auto).unwrap();
        let qd = 8u32;
        let bs = 32 * KIB;
        let mut e = Engine::new(&dev, &cfg(qd, bs, qd as usize + 1), pref).unwrap();
        let bufs: Vec<BufId> = (0..qd).map(|_| e.acquire().unwrap()).collect();
        for (i, &b) in bufs.iter().enumerate() {
            let data = pattern(100 + i as u64, bs);
            e.buf_mut(b).copy_from_slice(&data);
            e.submit_write(b, (i * bs) as u64, bs, i as u64).unwrap();
        }
        assert_eq!(e.in_flight(), qd as usize);
        // In-flight buffers are not accessible.
        assert!(e.buf(bufs[0]).is_empty());
        assert!(e.try_buf(bufs[0]).is_none());
        let extra = e.acquire().unwrap();
        assert!(matches!(
            e.submit_read(extra, 0, bs, 99),
            Err(BlockError::QueueFull { depth: 8 })
        ));
        assert!(matches!(
            e.submit_fsync(99),
            Err(BlockError::QueueFull { .. })
        ));
        let mut seen = vec![false; qd as usize];
        while e.in_flight() > 0 {
            for c in e.wait(e.in_flight()).unwrap() {
                assert_eq!(c.result.unwrap(), bs);
                assert_eq!(c.buf, Some(bufs[c.user_data as usize]));
                seen[c.user_data as usize] = true;
            }
        }
        assert!(seen.iter().all(|s| *s));
        // Now read everything back concurrently (buffers in reverse order).
        for (i, &b) in bufs.iter().rev().enumerate() {
            e.submit_read(b, (i * bs) as u64, bs, i as u64).unwrap();
        }
        let mut got = 0;
        while got < qd as usize {
            for c in e.wait(1).unwrap() {
                let i = c.user_data as usize;
                assert_eq!(c.result.unwrap(), bs);
                let b = c.buf.unwrap();
                assert_eq!(
                    e.buf(b),
                    &pattern(100 + i as u64, bs)[..],
                    "{pref:?} op {i}"
                );
                got += 1;
            }
        }
        assert_eq!(e.in_flight(), 0);
        assert!(e.wait(5).unwrap().is_empty());
    }
}

#[test]
fn read_past_eof_is_error() {
    let dir = tempfile::tempdir().unwrap();
    for direct in [DirectIo::Auto, DirectIo::Off] {
        for pref in engines() {
            let path = tmpfile(&dir, &format!("eof-{direct:?}-{pref:?}"));
            let dev = Device::create_file(&path, MIB as u64, direct).unwrap();
            let mut e = Engine::new(&dev, &cfg(4, 8192, 2), pref).unwrap();
            let b = e.acquire().unwrap();
            // Straddling EOF: short read (4096) then EOF for the remainder.
            match read_sync(&mut e, b, MIB as u64 - 4096, 8192) {
                Err(BlockError::UnexpectedEof { offset, remaining }) => {
                    assert_eq!(offset, MIB as u64);
                    assert_eq!(remaining, 4096);
                }
                other => panic!("{pref:?}: expected UnexpectedEof, got {other:?}"),
            }
            // Entirely past EOF.
            match read_sync(&mut e, b, 2 * MIB as u64, 4096) {
                Err(BlockError::UnexpectedEof { offset, remaining }) => {
                    assert_eq!((offset, remaining), (2 * MIB as u64, 4096));
                }
                other => panic!("{pref:?}: expected UnexpectedEof, got {other:?}"),
            }
            // The buffer is back in the caller's hands after an error.
            assert_eq!(e.buf(b).len(), 8192);
            assert_eq!(e.in_flight(), 0);
        }
    }
}

#[test]
fn unaligned_direct_io_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let path = tmpfile(&dir, "ua");
    drop(Device::create_file(&path, MIB as u64, DirectIo::Off).unwrap());
    let opts = OpenOptions {
        write: true,
        direct: DirectIo::Require,
    };
    let Some(dev) = direct_or_skip(Device::open(&path, &opts), &path) else {
        return;
    };
    assert!(dev.is_direct());
    for pref in engines() {
        let mut e = Engine::new(&dev, &cfg(4, 8192, 2), pref).unwrap();
        let b = e.acquire().unwrap();
        for (off, len) in [(100u64, 4096usize), (0, 100), (512 + 1, 512)] {
            let r = e.submit_read(b, off, len, 1);
            assert!(
                matches!(r, Err(BlockError::Unaligned { .. })),
                "{pref:?} {r:?}"
            );
            let w = e.submit_write(b, off, len, 1);
            assert!(
                matches!(w, Err(BlockError::Unaligned { .. })),
                "{pref:?} {w:?}"
            );
        }
        // Other bad requests.
        assert!(matches!(
            e.submit_read(b, 0, 0, 1),
            Err(BlockError::InvalidRequest { .. })
        ));
        assert!(matches!(
            e.submit_read(b, 0, 16384, 1),
            Err(BlockError::InvalidRequest { .. })
        ));
        assert!(matches!(
            e.submit_read(b, u64::MAX - 511, 512, 1),
            Err(BlockError::InvalidRequest { .. })
        ));
        assert_eq!(e.in_flight(), 0);
        // Aligned is fine.
        assert_eq!(read_sync(&mut e, b, 512, 512).unwrap(), vec![0u8; 512]);
    }
    // Unaligned zero_range with O_DIRECT on a file still works (hole punching).
    dev.zero_range(100, 10).unwrap();
}

#[test]
fn fsync_completes() {
    let dir = tempfile::tempdir().unwrap();
    for pref in engines() {
        let path = tmpfile(&dir, &format!("fs-{pref:?}"));
        let dev = Device::create_file(&path, MIB as u64, DirectIo::Auto).unwrap();
        let mut e = Engine::new(&dev, &cfg(4, 4096, 2), pref).unwrap();
        let b = e.acquire().unwrap();
        write_sync(&mut e, b, 0, &pattern(5, 4096)).unwrap();
        e.submit_fsync(42).unwrap();
        assert_eq!(e.in_flight(), 1);
        let c = e.wait(1).unwrap();
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].user_data, 42);
        assert_eq!(c[0].buf, None);
        assert_eq!(*c[0].result.as_ref().unwrap(), 0);
        dev.sync_all().unwrap();
        drop(e);
        assert_eq!(std::fs::read(&path).unwrap()[..4096], pattern(5, 4096)[..]);
    }
}

#[test]
fn buffer_acquire_release_exhaustion() {
    let dir = tempfile::tempdir().unwrap();
    let dev = Device::create_file(&tmpfile(&dir, "b"), MIB as u64, DirectIo::Auto).unwrap();
    for pref in engines() {
        let mut e = Engine::new(&dev, &cfg(4, 8192, 3), pref).unwrap();
        let a: Vec<BufId> = (0..3).map(|_| e.acquire().unwrap()).collect();
        let mut uniq = a.clone();
        uniq.sort_by_key(|b| b.0);
        uniq.dedup();
        assert_eq!(uniq.len(), 3);
        assert!(e.acquire().is_none());
        for &b in &a {
            let s = e.buf(b);
            assert_eq!(s.len(), 8192);
            assert_eq!(s.as_ptr() as usize % BUFFER_ALIGN, 0);
        }
        e.release(a[1]);
        assert!(e.buf(a[1]).is_empty(), "released buffer is not accessible");
        assert!(matches!(
            e.submit_read(a[1], 0, 4096, 0),
            Err(BlockError::BadBuffer { .. })
        ));
        // Double release, unknown id: ignored, no panic.
        e.release(a[1]);
        e.release(BufId(1000));
        assert!(e.buf(BufId(1000)).is_empty());
        assert!(e.buf_mut(BufId(1000)).is_empty());
        assert!(matches!(
            e.submit_write(BufId(1000), 0, 4096, 0),
            Err(BlockError::BadBuffer { .. })
        ));
        let again = e.acquire().unwrap();
        assert_eq!(again, a[1]);
        assert!(e.acquire().is_none());
        // A buffer in flight cannot be submitted again or released.
        e.submit_read(a[0], 0, 4096, 0).unwrap();
        assert!(matches!(
            e.submit_read(a[0], 0, 4096, 0),
            Err(BlockError::BadBuffer { .. })
        ));
        e.release(a[0]);
        let c = e.wait(1).unwrap();
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].buf, Some(a[0]));
        e.release(a[0]);
        assert_eq!(e.acquire(), Some(a[0]));
    }
}

#[test]
fn data_ranges_of_sparse_file() {
    let dir = tempfile::tempdir().unwrap();
    for pref in engines() {
        let path = tmpfile(&dir, &format!("sp-{pref:?}"));
        let size = 16 * MIB as u64;
        let dev = Device::create_file(&path, size, DirectIo::Auto).unwrap();
        let mut e = Engine::new(&dev, &cfg(4, 4096, 1), pref).unwrap();
        let b = e.acquire().unwrap();
        write_sync(&mut e, b, MIB as u64, &pattern(1, 4096)).unwrap();
        write_sync(&mut e, b, 10 * MIB as u64, &pattern(2, 4096)).unwrap();
        dev.sync_all().unwrap();
        let ranges = dev.data_ranges(0, size).unwrap();
        if ranges == vec![(0, size)] {
            eprintln!("skipping: filesystem does not report holes");
            return;
        }
        let covers = |off: u64| ranges.iter().any(|&(s, l)| s <= off && off < s + l);
        assert!(
            covers(MIB as u64) && covers(MIB as u64 + 4095),
            "{ranges:?}"
        );
        assert!(
            covers(10 * MIB as u64) && covers(10 * MIB as u64 + 4095),
            "{ranges:?}"
        );
        assert!(
            !covers(0) && !covers(5 * MIB as u64) && !covers(size - 1),
            "{ranges:?}"
        );
        let total: u64 = ranges.iter().map(|r| r.1).sum();
        assert!(total <= 2 * MIB as u64, "{ranges:?}");
        for w in ranges.windows(2) {
            assert!(w[0].0 + w[0].1 <= w[1].0, "sorted, disjoint: {ranges:?}");
        }
        // Sub-range clipping.
        let r = dev
            .data_ranges(MIB as u64 + 1024, 10 * MIB as u64 + 100)
            .unwrap();
        assert_eq!(r.first().map(|x| x.0), Some(MIB as u64 + 1024));
        let last = r.last().copied().unwrap();
        assert_eq!(last.0 + last.1, 10 * MIB as u64 + 100);
        // Empty / past-the-end requests.
        assert!(dev.data_ranges(5, 5).unwrap().is_empty());
        assert!(dev.data_ranges(10, 5).unwrap().is_empty());
        assert!(dev.data_ranges(size, size + 100).unwrap().is_empty());
        assert!(dev
            .data_ranges(2 * MIB as u64, 3 * MIB as u64)
            .unwrap()
            .is_empty());
    }
}

#[test]
fn zero_range_reads_zeros() {
    let dir = tempfile::tempdir().unwrap();
    for direct in [DirectIo::Auto, DirectIo::Off] {
        for pref in engines() {
            let path = tmpfile(&dir, &format!("z-{direct:?}-{pref:?}"));
            let dev = Device::create_file(&path, 2 * MIB as u64, direct).unwrap();
            let mut e = Engine::new(&dev, &cfg(4, 256 * KIB, 1), pref).unwrap();
            let b = e.acquire().unwrap();
            let data = pattern(3, 256 * KIB);
            write_sync(&mut e, b, 0, &data).unwrap();
            dev.zero_range(8192, 64 * KIB as u64).unwrap();
            let back = read_sync(&mut e, b, 0, 256 * KIB).unwrap();
            let z = 8192..8192 + 64 * KIB;
            assert!(back[z.clone()].iter().all(|&x| x == 0));
            assert_eq!(back[..z.start], data[..z.start]);
            assert_eq!(back[z.end..], data[z.end..]);
            assert_eq!(dev.size_bytes(), 2 * MIB as u64, "KEEP_SIZE");
            dev.zero_range(0, 0).unwrap();
        }
    }
}

#[test]
fn regular_file_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let path = tmpfile(&dir, "m");
    let dev = Device::create_file(&path, 3 * MIB as u64 + 512, DirectIo::Off).unwrap();
    assert_eq!(dev.kind(), DeviceKind::RegularFile);
    assert_eq!(dev.size_bytes(), 3 * MIB as u64 + 512);
    assert_eq!(dev.logical_block_bytes(), 512);
    assert!(!dev.is_direct());
    assert_eq!(dev.path(), path.as_path());
    assert!(dev.raw_fd() >= 0);
    dev.set_len(MIB as u64).unwrap();
    assert_eq!(dev.size_bytes(), MIB as u64);
    // Reopen existing file with another size: truncates/extends.
    drop(dev);
    let dev = Device::create_file(&path, 5 * MIB as u64, DirectIo::Auto).unwrap();
    assert_eq!(dev.size_bytes(), 5 * MIB as u64);
    let lbs = dev.logical_block_bytes();
    assert!(lbs >= 512 && lbs.is_power_of_two());
    if !dev.is_direct() {
        assert_eq!(lbs, 512);
    }
    let ro = Device::open(&path, &OpenOptions::default()).unwrap();
    assert_eq!(ro.size_bytes(), 5 * MIB as u64);
    assert!(
        ro.zero_range(0, 4096).is_err(),
        "read-only device cannot be zeroed"
    );
    // Error cases name the path.
    let missing = dir.path().join("missing");
    let err = Device::open(&missing, &OpenOptions::default()).unwrap_err();
    assert!(matches!(err, BlockError::Open { .. }));
    assert!(err.to_string().contains("missing"), "{err}");
    assert!(matches!(
        Device::open(dir.path(), &OpenOptions::default()),
        Err(BlockError::NotBlockOrFile { .. })
    ));
    assert!(matches!(
        Device::open(Path::new("/dev/null"), &OpenOptions::default()),
        Err(BlockError::NotBlockOrFile { .. })
    ));
    assert!(matches!(
        Device::create_file(dir.path(), 1, DirectIo::Off),
        Err(BlockError::NotRegularFile { .. })
    ));
}

#[test]
fn drop_with_ops_in_flight_is_safe() {
    let dir = tempfile::tempdir().unwrap();
    for pref in engines() {
        let path = tmpfile(&dir, &format!("d-{pref:?}"));
        let dev = Device::create_file(&path, 8 * MIB as u64, DirectIo::Auto).unwrap();
        for _ in 0..20 {
            let mut e = Engine::new(&dev, &cfg(16, 256 * KIB, 16), pref).unwrap();
            for i in 0..16u64 {
                let b = e.acquire().unwrap();
                if i % 2 == 0 {
                    e.submit_read(b, i * 256 * KIB as u64, 256 * KIB, i)
                        .unwrap();
                } else {
                    e.submit_write(b, i * 256 * KIB as u64, 256 * KIB, i)
                        .unwrap();
                }
            }
            e.flush().unwrap();
            drop(e);
        }
    }
}

/// `losetup --detach` on drop.
struct LoopGuard(String);

impl Drop for LoopGuard {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .args(["--detach", &self.0])
            .status();
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn have_losetup() -> bool {
    std::process::Command::new("losetup")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn loop_block_device() {
    if !is_root() || !have_losetup() {
        eprintln!("skipping: needs root and losetup");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = tmpfile(&dir, "loop.img");
    let size = 64 * MIB as u64;
    drop(Device::create_file(&img, size, DirectIo::Off).unwrap());
    let out = std::process::Command::new("losetup")
        .args(["--find", "--show"])
        .arg(&img)
        .output()
        .unwrap();
    if !out.status.success() {
        eprintln!(
            "skipping: losetup failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return;
    }
    let loopdev = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let _guard = LoopGuard(loopdev.clone());

    let opts = OpenOptions {
        write: true,
        direct: DirectIo::Require,
    };
    let dev = Device::open(Path::new(&loopdev), &opts).unwrap();
    assert_eq!(dev.kind(), DeviceKind::BlockDevice);
    assert_eq!(dev.size_bytes(), size);
    assert_eq!(dev.logical_block_bytes(), 512);
    assert!(dev.is_direct());
    assert_eq!(dev.data_ranges(0, u64::MAX).unwrap(), vec![(0, size)]);
    assert!(dev.set_len(MIB as u64).is_err());
    assert!(matches!(
        dev.zero_range(1, 512),
        Err(BlockError::Unaligned { .. })
    ));

    for (k, pref) in engines().into_iter().enumerate() {
        let mut e = Engine::new(&dev, &cfg(8, MIB, 8), pref).unwrap();
        let bufs: Vec<BufId> = (0..8).map(|_| e.acquire().unwrap()).collect();
        let base = k as u64 * 16 * MIB as u64;
        for (i, &b) in bufs.iter().enumerate() {
            e.buf_mut(b)
                .copy_from_slice(&pattern(k as u64 * 100 + i as u64, MIB));
            e.submit_write(b, base + (i * MIB) as u64, MIB, i as u64)
                .unwrap();
        }
        for c in e.wait(8).unwrap() {
            assert_eq!(c.result.unwrap(), MIB);
        }
        e.submit_fsync(0).unwrap();
        assert_eq!(e.wait(1).unwrap()[0].result.as_ref().unwrap(), &0);
        for (i, &b) in bufs.iter().enumerate() {
            e.submit_read(b, base + (i * MIB) as u64, MIB, i as u64)
                .unwrap();
        }
        let cs = e.wait(8).unwrap();
        assert_eq!(cs.len(), 8);
        for c in cs {
            assert_eq!(c.result.unwrap(), MIB);
            let i = c.user_data as usize;
            assert_eq!(
                e.buf(c.buf.unwrap()),
                &pattern(k as u64 * 100 + i as u64, MIB)[..],
                "{pref:?} block {i}"
            );
        }
        // Unaligned rejected; past-the-end read is EOF.
        assert!(matches!(
            e.submit_read(bufs[0], 100, 512, 0),
            Err(BlockError::Unaligned { .. })
        ));
        match read_sync(&mut e, bufs[0], size - 4096, 8192) {
            Err(BlockError::UnexpectedEof { offset, remaining }) => {
                assert_eq!((offset, remaining), (size, 4096));
            }
            other => panic!("{pref:?}: {other:?}"),
        }
        // BLKZEROOUT then read back zeros.
        dev.zero_range(base, 64 * KIB as u64).unwrap();
        let back = read_sync(&mut e, bufs[0], base, 128 * KIB).unwrap();
        assert!(back[..64 * KIB].iter().all(|&x| x == 0));
        assert_eq!(
            back[64 * KIB..],
            pattern(k as u64 * 100, MIB)[64 * KIB..128 * KIB]
        );
    }
    dev.sync_all().unwrap();
}

/// Micro benchmark: sequential read of a 1 GiB file with each engine, O_DIRECT and
/// buffered (page cache dropped first when running as root).
/// `cargo test --release -- --ignored --nocapture bench_read_throughput`
#[test]
#[ignore]
fn bench_read_throughput() {
    let dir_path = std::env::var_os("BLKMIRROR_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::tempdir_in(dir_path).unwrap();
    let path = tmpfile(&dir, "bench.img");
    let size = 1u64 << 30;
    let bs = MIB;
    {
        // Fill with non-zero data (holes would make reads artificially fast).
        let dev = Device::create_file(&path, size, DirectIo::Auto).unwrap();
        let mut e = Engine::new(&dev, &cfg(32, bs, 32), EnginePreference::Auto).unwrap();
        let bufs: Vec<BufId> = (0..32).map(|_| e.acquire().unwrap()).collect();
        for (i, &b) in bufs.iter().enumerate() {
            e.buf_mut(b).copy_from_slice(&pattern(i as u64, bs));
        }
        let mut off = 0u64;
        let mut free = bufs.clone();
        while off < size || e.in_flight() > 0 {
            while off < size && !free.is_empty() {
                let b = free.pop().unwrap();
                e.submit_write(b, off, bs, 0).unwrap();
                off += bs as u64;
            }
            for c in e.wait(1).unwrap() {
                c.result.unwrap();
                free.push(c.buf.unwrap());
            }
        }
        dev.sync_all().unwrap();
    }
    let root = is_root();
    let qd: u32 = std::env::var("BLKMIRROR_BENCH_QD")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(32);
    for direct in [DirectIo::Require, DirectIo::Off] {
        for pref in engines() {
            if root {
                let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
            }
            let opts = OpenOptions {
                write: false,
                direct,
            };
            let dev = Device::open(&path, &opts).unwrap();
            let mut e = Engine::new(&dev, &cfg(qd, bs, qd as usize), pref).unwrap();
            let mut free: Vec<BufId> = (0..qd).map(|_| e.acquire().unwrap()).collect();
            let t = Instant::now();
            let mut off = 0u64;
            let mut sum = 0u64;
            while off < size || e.in_flight() > 0 {
                while off < size && !free.is_empty() {
                    let b = free.pop().unwrap();
                    e.submit_read(b, off, bs, 0).unwrap();
                    off += bs as u64;
                }
                for c in e.wait(1).unwrap() {
                    c.result.unwrap();
                    let b = c.buf.unwrap();
                    sum = sum.wrapping_add(u64::from(e.buf(b)[0]));
                    free.push(b);
                }
            }
            let secs = t.elapsed().as_secs_f64();
            println!(
                "bench: engine={:<8} direct={:<5} qd={qd:<3} read 1 GiB in {secs:.3}s = {:.0} MiB/s (cold cache: {root}, checksum {sum})",
                e.name(),
                dev.is_direct(),
                1024.0 / secs
            );
        }
    }
}

#[test]
fn engine_and_device_are_send() {
    fn assert_send<T: Send>() {}
    assert_send::<Engine>();
    assert_send::<Device>();
    assert_send::<BlockError>();
}

/// `open_durable_direct`: O_DIRECT and O_DSYNC both in effect, aligned
/// writes land (read back through a buffered descriptor), a missing file is
/// an error naming it.
#[test]
fn durable_direct_open_writes_through() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let path = tmpfile(&dir, "dd");
    drop(Device::create_file(&path, MIB as u64, DirectIo::Off).unwrap());
    let Some(dev) = direct_or_skip(Device::open_durable_direct(&path), &path) else {
        return;
    };
    assert!(dev.is_direct());
    // SAFETY: F_GETFL on a descriptor this test owns; no memory is passed.
    let flags = unsafe { libc::fcntl(dev.raw_fd(), libc::F_GETFL) };
    assert!(flags & libc::O_DIRECT != 0, "flags {flags:#x}");
    assert_eq!(flags & libc::O_DSYNC, libc::O_DSYNC, "flags {flags:#x}");
    let mut raw = vec![0u8; 3 * 4096];
    let start = raw.as_ptr().align_offset(4096);
    let buf = &mut raw[start..start + 8192];
    buf.iter_mut()
        .enumerate()
        .for_each(|(i, b)| *b = (i * 7) as u8);
    dev.file().write_all_at(buf, 64 * 1024).unwrap();
    let buffered = OpenOptions {
        write: false,
        direct: DirectIo::Off,
    };
    let plain = Device::open(&path, &buffered).unwrap();
    let mut back = vec![0u8; 8192];
    plain.file().read_exact_at(&mut back, 64 * 1024).unwrap();
    assert_eq!(&back[..], &buf[..]);
    let missing = Device::open_durable_direct(&tmpfile(&dir, "nope")).unwrap_err();
    assert!(missing.to_string().contains("nope"), "{missing}");
}
