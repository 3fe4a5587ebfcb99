//! Live replication: `blkmirror replicate` exporting an image over NBD to
//! real clients (qemu-io, nbdcopy, fio, a test client that records
//! acknowledgements), with a mirror in another process on loopback.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::nbd::NbdClient;
use common::*;
use rand::{Rng, SeedableRng};

/// A running `blkmirror replicate` of the pair's primary.
type Replica = Replicating;

impl Replica {
    fn start(pair: &Pair, source: &Path, volume: &str, to: &str, extra: &[&str]) -> Replica {
        let sock = pair.path(&format!("{volume}.nbd.sock"));
        let log = pair.path(&format!("{volume}-replicate-{}.log", nanos_now()));
        let mut args = pair.server_tuning_args();
        args.extend(extra.iter().map(|a| a.to_string()));
        Replicating::spawn(
            source,
            &pair.primary,
            to,
            &pair.mirror.fp,
            volume,
            &pair.state,
            sock,
            log,
            &args,
        )
    }

    /// Wait until in sync, stop cleanly, compare the source with the replica.
    fn finish(self, src: &Path, replica: &Path, timeout: Duration) {
        self.wait_in_sync(timeout);
        self.stop();
        assert_identical(src, replica);
    }
}

fn tool(name: &str) -> &str {
    assert!(
        Command::new("sh")
            .args(["-c", &format!("command -v {name}")])
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false),
        "{name} is not installed (apt-get install qemu-utils libnbd-bin fio)"
    );
    name
}

/// Run any program (`args[0]`) and collect its output.
fn run_prog(args: &[&str]) -> CmdOut {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", args[0]));
    CmdOut {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn run_ok(args: &[&str]) -> String {
    let out = run_prog(args);
    assert_eq!(
        out.code, 0,
        "{args:?} failed:\nstdout: {}\nstderr: {}",
        out.stdout, out.stderr
    );
    out.stdout
}

/// fio's nbd engine against `uri` with `args`; fio must succeed. Its JSON report.
fn fio_nbd(uri: &str, args: &[&str]) -> serde_json::Value {
    let uri = format!("--uri={uri}");
    let mut all = vec![
        tool("fio"),
        "--ioengine=nbd",
        uri.as_str(),
        "--output-format=json",
    ];
    all.extend_from_slice(args);
    let out = run_prog(&all);
    assert_eq!(out.code, 0, "fio failed:\n{}\n{}", out.stdout, out.stderr);
    serde_json::from_str(&out.stdout[out.stdout.find('{').unwrap_or(0)..]).expect("fio json")
}

/// The mirror's `status --store --json`.
fn mirror_status(pair: &Pair) -> serde_json::Value {
    let ms = run_ok(&[
        BIN,
        "status",
        "--store",
        pair.store().to_str().expect("utf-8"),
        "--json",
    ]);
    serde_json::from_str(&ms).expect("json")
}

#[test]
fn qemu_io_writes_replicate_in_sync_mode() {
    let pair = Pair::new();
    let src = pair.path("src.img");
    random_image(&src, 32 * MIB, 1);
    let r = Replica::start(&pair, &src, "vol", &pair.server.to(), &["--mode", "sync"]);
    let uri = r.uri();
    let qio = tool("qemu-io");
    run_ok(&[
        qio,
        "-f",
        "raw",
        &uri,
        "-c",
        "write -P 0xab 0 1M",
        "-c",
        "write -P 0xcd 5000000 70000",
        "-c",
        "aio_write -P 0x11 8M 64k",
        "-c",
        "aio_write -P 0x12 9M 64k",
        "-c",
        "aio_flush",
        "-c",
        "write -z 12M 3M",
        "-c",
        "discard 20M 1M",
        "-c",
        "write -P 0x77 -f 31M 1M",
        "-c",
        "flush",
        "-c",
        "read -P 0xab 0 1M",
        "-c",
        "read -P 0 12M 3M",
    ]);
    let st = r.wait_in_sync(Duration::from_secs(30));
    assert_eq!(st["mode"], "sync");
    assert_eq!(num(&st, "writes"), 5, "{st}");
    // The mirror's own status.
    let ms = mirror_status(&pair);
    assert_eq!(ms[0]["replica_state"], "UpToDate", "{ms}");
    assert_eq!(ms[0]["connected"], true, "{ms}");
    r.stop();
    assert_identical(&src, &pair.img("vol"));
    assert_eq!(pair.state_of("vol"), "UpToDate");
    // A clean stop in sync leaves no marked chunk on disk.
    let out = run_cmd(&["status", "--state", pair.state.to_str().unwrap(), "--json"]);
    let st: serde_json::Value = serde_json::from_str(&out.stdout).expect("status json");
    assert_eq!(st[0]["running"], false, "{st}");
    assert_eq!(st[0]["peers"][0]["dirty_chunks_on_disk"], 0, "{st}");
}

#[test]
fn nbdcopy_into_async_export_replicates_byte_for_byte() {
    let pair = Pair::new();
    let src = pair.path("src.img");
    random_image(&src, 48 * MIB, 2);
    let data = pair.path("data.img");
    mixed_image(&data, 48, 3);
    let r = Replica::start(&pair, &src, "vol", &pair.server.to(), &["--mode", "async"]);
    run_ok(&[tool("nbdcopy"), data.to_str().expect("utf-8"), &r.uri()]);
    // Read it back through the export too.
    let back = pair.path("back.img");
    run_ok(&[tool("nbdcopy"), &r.uri(), back.to_str().expect("utf-8")]);
    assert_identical(&data, &back);
    r.wait_in_sync(Duration::from_secs(60));
    r.stop();
    assert_identical(&data, &src);
    assert_identical(&src, &pair.img("vol"));
}

/// fio with `verify=crc32c` at `iodepth` against an export started with
/// `extra`; `check` then looks at the still running replica, which must end
/// identical to the source.
fn fio_verify(extra: &[&str], iodepth: u32, check: impl FnOnce(&Replica)) {
    let pair = Pair::new();
    let src = pair.path("src.img");
    random_image(&src, 64 * MIB, 4);
    let r = Replica::start(&pair, &src, "vol", &pair.server.to(), extra);
    let depth = format!("--iodepth={iodepth}");
    let j = fio_nbd(
        &r.uri(),
        &[
            "--name=verify",
            "--rw=randwrite",
            "--bs=4k",
            &depth,
            "--size=32M",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
        ],
    );
    assert_eq!(j["jobs"][0]["error"], 0, "{j}");
    assert!(j["jobs"][0]["write"]["io_bytes"].as_u64().unwrap_or(0) >= 32 << 20);
    check(&r);
    r.finish(&src, &pair.img("vol"), Duration::from_secs(60));
}

#[test]
fn fio_verify_passes_against_the_export() {
    fio_verify(&["--mode", "sync"], 16, |_| {});
}

/// CPU time (user + system) of a process so far, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc stat");
    // Fields after the command name (which is in parentheses).
    let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 here.
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// With busy polling the export stays correct at QD1 and QD16, and the
/// poller stops once writes stop (a bounded window, not a spinning thread).
#[test]
fn busy_polling_export_verifies_and_goes_idle() {
    for (mode, depth) in [("sync", 1), ("async", 16)] {
        fio_verify(&["--mode", mode, "--busy-poll-us", "2000"], depth, |r| {
            std::thread::sleep(Duration::from_millis(300));
            let pid = r.guard.id();
            let before = cpu_ticks(pid);
            std::thread::sleep(Duration::from_secs(2));
            let used = cpu_ticks(pid) - before;
            // Idle: a few ticks (status writes, timers), far from the 200
            // ticks of a thread spinning for 2 s.
            assert!(used < 40, "{mode}: {used} ticks of CPU in 2 s of no writes");
        });
    }
}

/// Sync mode applies small writes on the mirror's network task when its apply
/// thread is idle, and large ones on the thread: a mix of sizes at queue
/// depth 16 over a small, overlapping region, with flushes, must end
/// byte-identical, and both paths must have been taken.
#[test]
fn sync_mode_mixed_sizes_take_both_apply_paths_in_order() {
    let pair = Pair::new();
    let src = pair.path("src.img");
    random_image(&src, 16 * MIB, 9);
    let r = Replica::start(&pair, &src, "vol", &pair.server.to(), &["--mode", "sync"]);
    fio_nbd(
        &r.uri(),
        &[
            "--name=mix",
            "--rw=randwrite",
            "--bssplit=4k/40:16k/20:192k/20:1m/20",
            "--iodepth=16",
            "--size=6M",
            "--io_size=96M",
            "--fsync=7",
            "--randseed=11",
        ],
    );
    r.wait_in_sync(Duration::from_secs(60));
    r.stop();
    assert_identical(&src, &pair.img("vol"));
    let ms = mirror_status(&pair);
    let applied = ms[0]["frames_applied"].as_u64().unwrap_or(0);
    let inline = ms[0]["frames_inline"].as_u64().unwrap_or(0);
    assert!(applied > 300, "{ms}");
    assert!(
        inline > 0 && inline < applied,
        "inline {inline} of {applied}: {ms}"
    );
    // Lone small writes are written O_DIRECT|O_DSYNC, interleaved with the
    // buffered ones over the same region (where the filesystem allows it).
    let direct = ms[0]["writes_direct_sync"].as_u64().unwrap_or(0);
    // Large writes (192 KiB, 1 MiB) are written O_DIRECT, several in flight,
    // between the others over the same bytes.
    let large = ms[0]["writes_direct"].as_u64().unwrap_or(0);
    if direct_io_works(&pair.path("probe")) {
        assert!(
            direct > 0 && direct < inline,
            "direct {direct} of {inline}: {ms}"
        );
        assert!(
            large > 50 && large + inline < applied,
            "large {large} of {applied}: {ms}"
        );
    }
}

/// The same mix in asynchronous mode (no flushes from the client, so the
/// mirror's own commits are the only barriers): large writes in flight on
/// the mirror must never be overtaken by later writes to the same bytes.
#[test]
fn async_mode_mixed_sizes_apply_in_order() {
    let pair = Pair::new();
    let src = pair.path("src.img");
    random_image(&src, 16 * MIB, 10);
    let r = Replica::start(&pair, &src, "vol", &pair.server.to(), &["--mode", "async"]);
    fio_nbd(
        &r.uri(),
        &[
            "--name=mix",
            "--rw=randwrite",
            "--bssplit=4k/40:16k/20:192k/20:1m/20",
            "--iodepth=16",
            "--size=2M",
            "--io_size=128M",
            "--randseed=12",
        ],
    );
    r.wait_in_sync(Duration::from_secs(60));
    r.stop();
    assert_identical(&src, &pair.img("vol"));
    let ms = mirror_status(&pair);
    let applied = ms[0]["frames_applied"].as_u64().unwrap_or(0);
    let large = ms[0]["writes_direct"].as_u64().unwrap_or(0);
    assert!(applied > 300, "{ms}");
    if direct_io_works(&pair.path("probe")) {
        assert!(
            large > 50 && large < applied,
            "large {large} of {applied}: {ms}"
        );
    }
}

/// Whether the test directory's filesystem accepts `O_DIRECT` (tmpfs does not).
fn direct_io_works(probe: &std::path::Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    let ok = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .custom_flags(libc::O_DIRECT)
        .open(probe)
        .is_ok();
    let _ = std::fs::remove_file(probe);
    ok
}

/// Sync mode: every write that got a reply is on the mirror after kill -9 of the primary.
#[test]
fn sync_mode_acknowledged_writes_survive_kill9_of_the_primary() {
    let pair = Pair::new();
    let src = pair.path("src.img");
    random_image(&src, 16 * MIB, 5);
    let r = Replica::start(&pair, &src, "vol", &pair.server.to(), &["--mode", "sync"]);
    let mut c = NbdClient::connect(&r.sock, "disk").expect("nbd connect");
    let mut rng = rand::rngs::StdRng::seed_from_u64(6);
    // Writes go to the first 2 MiB (32 chunks, within one 64-chunk bitmap word).
    let blocks = (2 * MIB / 4096) as usize;
    let mut acked: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut order: Vec<usize> = (0..blocks).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.gen_range(0..=i));
    }
    for &b in order.iter().take(400) {
        let mut data = vec![0u8; 4096];
        rng.fill(&mut data[..]);
        let off = b as u64 * 4096;
        assert_eq!(c.write(off, &data, false).expect("write"), 0);
        acked.push((off, data));
    }
    let mut r = r;
    r.guard.kill9();
    // The mirror keeps running; give it a moment to see the link go.
    std::thread::sleep(Duration::from_millis(300));
    let img = pair.img("vol");
    for (off, data) in &acked {
        assert_eq!(
            &read_at(&img, *off, 4096),
            data,
            "acknowledged write at {off} missing on the mirror"
        );
    }
    // A restart resyncs only what was dirty (bitmap mode): no full sync.
    let r = Replica::start(&pair, &src, "vol", &pair.server.to(), &["--mode", "sync"]);
    let st = r.wait_in_sync(Duration::from_secs(60));
    assert!(
        num(&st, "resync_total") <= 64,
        "restart after a crash resynced {} chunks: {st}",
        num(&st, "resync_total")
    );
    assert!(
        r.log_text().contains("bitmap is trusted"),
        "{}",
        r.log_text()
    );
    r.stop();
    assert_identical(&src, &img);
}

/// Async mode: after kill -9 of the primary the replica equals the primary's
/// device after some prefix of the acknowledged write log.
#[test]
fn async_mode_replica_is_a_prefix_after_kill9() {
    let pair = Pair::new();
    let src = pair.path("src.img");
    random_image(&src, 4 * MIB, 7);
    let r = Replica::start(&pair, &src, "vol", &pair.server.to(), &["--mode", "async"]);
    let mut c = NbdClient::connect(&r.sock, "disk").expect("nbd connect");
    let region = 256 * 1024usize;
    let base = read_at(&src, 0, region);
    let mut rng = rand::rngs::StdRng::seed_from_u64(8);
    let mut log: Vec<(usize, Vec<u8>)> = Vec::new();
    for i in 0..1500 {
        let off = rng.gen_range(0..region / 512 - 16) * 512;
        let len = rng.gen_range(1..=16) * 512;
        let data = vec![(i % 251) as u8 + 1; len];
        assert_eq!(c.write(off as u64, &data, false).expect("write"), 0);
        log.push((off, data));
        if i % 100 == 99 {
            assert_eq!(c.flush().expect("flush"), 0);
        }
    }
    let mut r = r;
    r.guard.kill9();
    std::thread::sleep(Duration::from_millis(500));
    let got = read_at(&pair.img("vol"), 0, region);
    let mut state = base;
    let mut prefixes = Vec::new();
    if state == got {
        prefixes.push(0);
    }
    for (k, (off, data)) in log.iter().enumerate() {
        state[*off..*off + data.len()].copy_from_slice(data);
        if state == got {
            prefixes.push(k + 1);
        }
    }
    assert!(
        !prefixes.is_empty(),
        "the replica is not the primary's state after any prefix of the write log"
    );
    eprintln!(
        "replica equals the state after {:?} of {} writes",
        prefixes,
        log.len()
    );
}

/// The first sync of a live session leaves no replica pages cached on the
/// mirror (small live writes into what a sync left cached cost the mirror
/// more CPU; README, "The replica's page cache after a sync"), and live
/// writes after it still replicate byte for byte.
#[test]
fn live_initial_sync_leaves_the_replica_out_of_the_page_cache() {
    let pair = Pair::new();
    let src = pair.path("src.img");
    random_image(&src, 16 * MIB, 11);
    let r = Replica::start(&pair, &src, "vol", &pair.server.to(), &["--mode", "async"]);
    r.wait_in_sync(Duration::from_secs(30));
    let img = pair.img("vol");
    let Some(resident) = resident_or_skip(
        "live_initial_sync_leaves_the_replica_out_of_the_page_cache",
        &img,
    ) else {
        return;
    };
    assert!(
        resident < MIB,
        "{resident} bytes of the 16 MiB replica are still cached after the initial sync"
    );
    let mut c = r.client();
    for i in 0..64u64 {
        let data = vec![(i % 251) as u8 + 1; 4096];
        assert_eq!(c.write(i * 257 * 1024, &data, false).expect("write"), 0);
    }
    assert_eq!(c.flush().expect("flush"), 0);
    drop(c);
    r.finish(&src, &img, Duration::from_secs(30));
}

/// Disconnect and reconnect with writes in between: bit-identical at the
/// end, and only the chunks dirtied while apart are resynced.
#[test]
fn disconnect_and_reconnect_resyncs_only_dirty_chunks() {
    let pair = Pair::with_idle_timeout(1500);
    let src = pair.path("src.img");
    random_image(&src, 32 * MIB, 9);
    let relay = UdpRelay::start(pair.server.addr);
    let r = Replica::start(
        &pair,
        &src,
        "vol",
        &relay.addr.to_string(),
        &["--mode", "async", "--chunk-size", "65536"],
    );
    let mut c = NbdClient::connect(&r.sock, "disk").expect("nbd connect");
    assert_eq!(c.write(0, &vec![1u8; 8192], false).unwrap(), 0);
    r.wait_in_sync(Duration::from_secs(30));
    relay.cut(true);
    // Wait until the primary notices.
    let ok = wait_until(Duration::from_secs(20), || r.status()["connected"] == false);
    assert!(ok, "primary did not notice the cut: {}", r.status());
    // Writes while apart: 10 distinct chunks (some written twice, some partially).
    let chunks = [3u64, 7, 8, 20, 100, 101, 200, 300, 400, 511];
    for (i, ch) in chunks.iter().enumerate() {
        let data = vec![i as u8 + 10; 4096];
        assert_eq!(
            c.write(ch * 65536 + 512 * i as u64, &data, false).unwrap(),
            0
        );
    }
    assert_eq!(c.write(7 * 65536, &vec![0xee; 65536], false).unwrap(), 0);
    assert_eq!(c.zero(100 * 65536 + 4096, 8192).unwrap(), 0);
    let mut st = serde_json::Value::Null;
    let ok = wait_until(Duration::from_secs(10), || {
        st = r.status();
        num(&st, "dirty_chunks") == chunks.len() as u64
    });
    assert!(ok, "{st}");
    relay.cut(false);
    let st = r.wait_in_sync(Duration::from_secs(60));
    assert_eq!(num(&st, "resync_total"), chunks.len() as u64, "{st}");
    assert_eq!(num(&st, "resync_done"), chunks.len() as u64, "{st}");
    c.disconnect();
    r.stop();
    assert_identical(&src, &pair.img("vol"));
}

#[test]
fn replicate_refuses_bad_arguments() {
    let pair = Pair::new();
    let src = pair.path("src.img");
    random_image(&src, MIB, 1);
    let base = |extra: &[&str]| {
        let mut v: Vec<String> = vec![
            "replicate".into(),
            src.to_str().unwrap().into(),
            "--identity".into(),
            pair.primary.dir_str().into(),
            "--to".into(),
            pair.server.to(),
            "--peer".into(),
            pair.mirror.fp.clone(),
            "--volume".into(),
            "v".into(),
            "--state".into(),
            pair.state.to_str().unwrap().into(),
        ];
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let run = |extra: &[&str]| {
        let v = base(extra);
        let a: Vec<&str> = v.iter().map(|s| s.as_str()).collect();
        run_cmd(&a)
    };
    run(&["--mode", "sync", "--nbd", "udp:1.2.3.4:5"]).assert_fails(2, &["nbd"]);
    run(&["--mode", "fast", "--nbd", "unix:/tmp/x"]).assert_fails(2, &["mode"]);
    run(&[
        "--mode",
        "async",
        "--nbd",
        "unix:/tmp/x.sock",
        "--queue-bytes",
        "10",
    ])
    .assert_fails(1, &["--queue-bytes"]);
    run(&[
        "--mode",
        "sync",
        "--nbd",
        "unix:/tmp/x.sock",
        "--busy-poll-us",
        "20000",
    ])
    .assert_fails(1, &["--busy-poll-us"]);
    for (rate, why) in [("5", "not a rate"), ("2T", "not a rate"), ("1K", "outside")] {
        run(&[
            "--mode",
            "async",
            "--nbd",
            "unix:/tmp/x.sock",
            "--resync-rate",
            rate,
        ])
        .assert_fails(2, &["--resync-rate", why]);
    }
    // A socket path in a directory that does not exist.
    run(&["--mode", "async", "--nbd", "unix:/nonexistent/dir/x.sock"]).assert_fails(1, &["NBD"]);
}

/// System test (root): ext4 on the export through nbdfuse and a loop
/// device; the replica passes e2fsck and holds the same files.
#[test]
fn ext4_through_nbdfuse_and_loop_device_replicates() {
    const T: &str = "ext4_through_nbdfuse_and_loop_device_replicates";
    if !is_root() {
        skip(T, "needs root");
        return;
    }
    for t in [
        "nbdfuse",
        "losetup",
        "mkfs.ext4",
        "e2fsck",
        "mount",
        "fusermount3",
    ] {
        tool(t);
    }
    let pair = Pair::new();
    let src = pair.path("src.img");
    std::fs::File::create(&src)
        .and_then(|f| f.set_len(128 * MIB))
        .expect("source image");
    let r = Replica::start(&pair, &src, "fs", &pair.server.to(), &["--mode", "sync"]);
    let fuse_dir = pair.path("fuse");
    std::fs::create_dir_all(&fuse_dir).unwrap();
    let fuse_file = fuse_dir.join("disk");
    let fuse = Command::new("nbdfuse")
        .arg(&fuse_file)
        .arg(r.uri())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("nbdfuse");
    let mut fuse = ChildGuard::new(fuse, "nbdfuse");
    let ok = wait_until(Duration::from_secs(20), || {
        std::fs::metadata(&fuse_file)
            .map(|m| m.len() == 128 * MIB)
            .unwrap_or(false)
    });
    assert!(ok, "nbdfuse did not expose {}", fuse_file.display());
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    {
        let dev = LoopDev::attach(&fuse_file).expect("losetup over the nbdfuse file");
        sh("mkfs.ext4", &["-q", "-F", dev.path_str()]).expect("mkfs.ext4");
        let mnt = Mount::new(&[dev.path_str()], &pair.path("mnt")).expect("mount");
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for i in 0..24 {
            let len = rng.gen_range(1..3 * MIB as usize);
            let mut data = vec![0u8; len];
            rng.fill(&mut data[..]);
            std::fs::write(mnt.dir.join(format!("f{i}")), &data).unwrap();
            files.push((format!("f{i}"), data));
        }
        // Delete some, overwrite one in place.
        for i in [3, 7, 11] {
            std::fs::remove_file(mnt.dir.join(format!("f{i}"))).unwrap();
        }
        files.retain(|(n, _)| !["f3", "f7", "f11"].contains(&n.as_str()));
        let new = vec![0x5au8; 700_000];
        std::fs::write(mnt.dir.join("f0"), &new).unwrap();
        files[0].1 = new;
        sh("sync", &[]).unwrap();
        drop(mnt);
        drop(dev);
    }
    sh("fusermount3", &["-u", fuse_dir.to_str().unwrap()]).expect("fusermount3 -u");
    fuse.wait_timeout(Duration::from_secs(20));
    let st = r.wait_in_sync(Duration::from_secs(30));
    assert!(num(&st, "writes") > 50, "{st}");
    r.stop();
    let replica = pair.img("fs");
    assert_identical(&src, &replica);
    sh("e2fsck", &["-fn", replica.to_str().unwrap()]).expect("e2fsck -fn of the replica");
    let mnt = Mount::new(
        &["-o", "ro,loop", replica.to_str().unwrap()],
        &pair.path("mnt2"),
    )
    .expect("mounting the replica");
    for (name, data) in &files {
        let got = std::fs::read(mnt.dir.join(name)).unwrap();
        assert!(got == *data, "{name} differs on the replica");
    }
    for gone in ["f3", "f7", "f11"] {
        assert!(!mnt.dir.join(gone).exists());
    }
}

/// The primary's status once it has noticed (within 5 s) that the mirror
/// went away.
fn disconnected(r: &Replica) -> serde_json::Value {
    let mut st = serde_json::Value::Null;
    let noticed = wait_until(Duration::from_secs(5), || {
        st = r.status();
        st["connected"] == false
    });
    assert!(
        noticed,
        "the primary still thinks the mirror connected: {st}"
    );
    st
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: sending a signal to a child process of this test.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

/// Async mode with a small queue: while the mirror is stopped the queue
/// fills, writes are only marked (pull-ahead), and once the mirror runs
/// again the marked chunks are resynced; the replica ends identical.
#[test]
fn async_pull_ahead_when_the_queue_is_full() {
    let mut pair = Pair::new();
    let src = pair.path("src.img");
    random_image(&src, 32 * MIB, 12);
    let r = Replica::start(
        &pair,
        &src,
        "vol",
        &pair.server.to(),
        &["--mode", "async", "--queue-bytes", "1048576"],
    );
    let mut c = NbdClient::connect(&r.sock, "disk").expect("nbd connect");
    r.wait_in_sync(Duration::from_secs(30));
    let mirror_pid = pair.server.guard.id();
    signal(mirror_pid, libc::SIGSTOP);
    let mut rng = rand::rngs::StdRng::seed_from_u64(13);
    let t0 = std::time::Instant::now();
    for i in 0..24u64 {
        let mut data = vec![0u8; 256 * 1024];
        rng.fill(&mut data[..]);
        assert_eq!(c.write(i * 1024 * 1024, &data, false).unwrap(), 0);
    }
    // Async writes are not held back by a stopped mirror.
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "writes took {:?}",
        t0.elapsed()
    );
    let mut st = serde_json::Value::Null;
    let ok = wait_until(Duration::from_secs(5), || {
        st = r.status();
        num(&st, "skipped_writes") > 0
    });
    signal(mirror_pid, libc::SIGCONT);
    assert!(ok, "no pull-ahead with a stopped mirror: {st}");
    assert_eq!(st["in_sync"], false, "{st}");
    let st = r.wait_in_sync(Duration::from_secs(60));
    assert!(num(&st, "resync_done") > 0, "{st}");
    pair.server.assert_alive();
    c.disconnect();
    r.stop();
    assert_identical(&src, &pair.img("vol"));
}

/// Sync mode, mirror unreachable: `suspend` holds writes and fails them
/// with EIO after the timeout; `continue` keeps serving. Both end in sync.
#[test]
fn sync_mode_disconnect_policies() {
    for policy in ["suspend", "continue"] {
        let pair = Pair::with_idle_timeout(1500);
        let src = pair.path("src.img");
        random_image(&src, 8 * MIB, 14);
        let relay = UdpRelay::start(pair.server.addr);
        let r = Replica::start(
            &pair,
            &src,
            "vol",
            &relay.addr.to_string(),
            &[
                "--mode",
                "sync",
                "--on-disconnect",
                policy,
                "--suspend-timeout",
                "2",
            ],
        );
        let mut c = NbdClient::connect(&r.sock, "disk").expect("nbd connect");
        assert_eq!(c.write(0, &vec![1u8; 4096], false).unwrap(), 0);
        r.wait_in_sync(Duration::from_secs(30));
        relay.cut(true);
        let ok = wait_until(Duration::from_secs(20), || r.status()["connected"] == false);
        assert!(ok, "{policy}: primary did not notice the cut");
        let t0 = std::time::Instant::now();
        let e = c.write(65536, &vec![2u8; 4096], false).unwrap();
        let held = t0.elapsed();
        if policy == "suspend" {
            assert_eq!(e, 5, "suspend: a write without the mirror fails with EIO");
            assert!(held >= Duration::from_millis(200), "held only {held:?}");
            assert_eq!(c.flush().unwrap(), 5, "suspend: flush fails with EIO too");
        } else {
            assert_eq!(e, 0, "continue: the write succeeds locally");
            assert!(held < Duration::from_secs(1), "continue: held {held:?}");
        }
        relay.cut(false);
        r.wait_in_sync(Duration::from_secs(60));
        // Writes work again, acknowledged by the mirror.
        assert_eq!(c.write(2 * 65536, &vec![3u8; 4096], false).unwrap(), 0);
        assert_eq!(c.flush().unwrap(), 0);
        c.disconnect();
        r.stop();
        assert_identical(&src, &pair.img("vol"));
    }
}

/// Sync mode, a resync after a reconnect, slowed by `--resync-rate 1M`
/// (96 dirty chunks of 64 KiB: about 6 s). A write made meanwhile follows
/// the disconnect policy: `continue` answers it at once (the replica is
/// still resyncing when the answer comes), `suspend` holds it for the
/// suspend timeout, then fails it with EIO rather than wait out the whole
/// resync. The resync takes no less than the rate allows, and the replica
/// ends identical.
#[test]
fn sync_mode_writes_during_a_rate_limited_resync_follow_the_policy() {
    for policy in ["continue", "suspend"] {
        let pair = Pair::with_idle_timeout(1500);
        let src = pair.path("src.img");
        random_image(&src, 16 * MIB, 17);
        let relay = UdpRelay::start(pair.server.addr);
        let r = Replica::start(
            &pair,
            &src,
            "vol",
            &relay.addr.to_string(),
            &[
                "--mode",
                "sync",
                "--on-disconnect",
                policy,
                "--suspend-timeout",
                "2",
                "--resync-rate",
                "1M",
                "--chunk-size",
                "65536",
            ],
        );
        let mut c = NbdClient::connect(&r.sock, "disk").expect("nbd connect");
        assert_eq!(c.write(0, &vec![1u8; 4096], false).unwrap(), 0);
        r.wait_in_sync(Duration::from_secs(30));
        relay.cut(true);
        let ok = wait_until(Duration::from_secs(20), || r.status()["connected"] == false);
        assert!(ok, "{policy}: primary did not notice the cut");
        // 96 chunks written while apart: kept locally either way (suspend
        // fails the write once its timeout is over, continue answers it).
        let mut data = vec![0u8; 6 * MIB as usize];
        rand::rngs::StdRng::seed_from_u64(18).fill(&mut data[..]);
        let e = c.write(MIB, &data, false).unwrap();
        assert_eq!(e, if policy == "suspend" { 5 } else { 0 }, "{policy}");
        let mut st = serde_json::Value::Null;
        let ok = wait_until(Duration::from_secs(10), || {
            st = r.status();
            num(&st, "dirty_chunks") == 96
        });
        assert!(ok, "{policy}: {st}");
        let up = std::time::Instant::now();
        let up_unix = common::nanos_now() as f64 / 1e9;
        relay.cut(false);
        let ok = wait_until(Duration::from_secs(20), || {
            st = r.status();
            st["updated_unix"].as_f64().is_some_and(|t| t >= up_unix)
                && st["connected"] == true
                && st["phase"] == "resync"
        });
        assert!(ok, "{policy}: no resync seen: {st}");
        assert_eq!(num(&st, "resync_rate"), 1 << 20, "{st}");
        // A write to a chunk that is not dirty, during the resync.
        let t0 = std::time::Instant::now();
        let e = c.write(0, &vec![2u8; 4096], false).unwrap();
        let held = t0.elapsed();
        let answered_unix = common::nanos_now() as f64 / 1e9;
        if policy == "continue" {
            assert_eq!(e, 0, "continue: answered");
            assert!(
                held < Duration::from_millis(1500),
                "continue: held {held:?}"
            );
        } else {
            assert_eq!(e, 5, "suspend: EIO after the suspend timeout");
            assert!(
                held >= Duration::from_millis(1900),
                "suspend: held only {held:?}"
            );
        }
        // The replica was still resyncing when the answer came.
        let ok = wait_until(Duration::from_secs(5), || {
            st = r.status();
            st["updated_unix"]
                .as_f64()
                .is_some_and(|t| t >= answered_unix)
        });
        assert!(ok, "{policy}: no fresh status");
        assert_eq!(st["in_sync"], false, "{policy}: {st}");
        assert!(num(&st, "resync_done") < 96, "{policy}: {st}");
        let st = r.wait_in_sync(Duration::from_secs(60));
        let took = up.elapsed();
        assert_eq!(num(&st, "resync_total"), 96, "{st}");
        // 96 chunks of 64 KiB at 1 MiB/s: 6 s (the first 10 ms early).
        assert!(
            took >= Duration::from_secs(5),
            "{policy}: resync took {took:?}"
        );
        // In sync again: a write is acknowledged by the mirror.
        assert_eq!(c.write(65536, &vec![3u8; 4096], false).unwrap(), 0);
        c.disconnect();
        r.stop();
        assert_identical(&src, &pair.img("vol"));
    }
}

/// A sync-mode `replicate` of a new 8 MiB random image (seeded) to the
/// pair's mirror, with a client that wrote 64 KiB of `fill` at offset 0,
/// in sync.
fn sync_replica_in_sync(pair: &Pair, seed: u64, fill: u8) -> (PathBuf, Replica, NbdClient) {
    let src = pair.path("src.img");
    random_image(&src, 8 * MIB, seed);
    let to = pair.server.addr.to_string();
    let r = Replica::start(pair, &src, "vol", &to, &["--mode", "sync"]);
    let mut c = NbdClient::connect(&r.sock, "disk").expect("nbd connect");
    assert_eq!(c.write(0, &vec![fill; 65536], false).unwrap(), 0);
    r.wait_in_sync(Duration::from_secs(30));
    (src, r, c)
}

/// Sync mode: the mirror is killed (kill -9) and restarted on the same
/// address; a write issued meanwhile is held, then acknowledged once the
/// mirror is back and in sync; the replica ends identical.
#[test]
fn sync_mode_mirror_killed_and_restarted() {
    let mut pair = Pair::with_idle_timeout(1500);
    let (src, r, mut c) = sync_replica_in_sync(&pair, 15, 7);
    let addr = pair.server.addr;
    pair.server.guard.kill9();
    let writer = std::thread::spawn(move || {
        let t0 = std::time::Instant::now();
        let e = c.write(3 * 65536, &vec![8u8; 65536], false).unwrap();
        (e, t0.elapsed(), c)
    });
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        !writer.is_finished(),
        "a sync-mode write was acknowledged without the mirror"
    );
    pair.restart_server(&addr.to_string());
    let (e, held, c) = writer.join().unwrap();
    assert_eq!(e, 0, "the held write succeeds once the mirror is back");
    assert!(held >= Duration::from_secs(3), "held {held:?}");
    c.disconnect();
    r.finish(&src, &pair.img("vol"), Duration::from_secs(30));
    assert_eq!(pair.state_of("vol"), "UpToDate");
}

/// SIGTERM to `serve` (what `systemctl stop` and `kill` send) closes every
/// session with a reason, so a sync-mode primary learns at once that the
/// mirror went away, instead of holding writes until its idle timeout
/// (15 s here). Restarted on the same address, the mirror gets the primary
/// back, a write is acknowledged again and the replica ends identical.
#[test]
fn serve_sigterm_closes_sessions_at_once() {
    let mut pair = Pair::new();
    let (src, r, mut c) = sync_replica_in_sync(&pair, 16, 5);
    let addr = pair.server.addr;
    pair.server.terminate(Duration::from_secs(10));
    let last = disconnected(&r);
    assert!(
        last["link_error"]
            .as_str()
            .is_some_and(|e| e.contains("mirror shutting down")),
        "the primary was not told why: {last}"
    );
    pair.restart_server(&addr.to_string());
    r.wait_in_sync(Duration::from_secs(30));
    assert_eq!(c.write(65536, &vec![6u8; 65536], false).unwrap(), 0);
    assert_eq!(c.flush().unwrap(), 0);
    c.disconnect();
    r.finish(&src, &pair.img("vol"), Duration::from_secs(30));
}

/// SIGTERM to `serve` in an asynchronous session whose writes were applied
/// but not yet committed (a minute between commits): before it exits, the
/// mirror makes them durable and acknowledges them, so the primary's chunks
/// are clean at once and, when the mirror is back, nothing is resent. (Before
/// 2026-12-07 they stayed dirty and were resent as a resync.)
#[test]
fn serve_sigterm_acknowledges_what_it_applied() {
    let mut pair = Pair::with_server_args(&["--async-commit-ms", "60000"]);
    let src = pair.path("src.img");
    random_image(&src, 16 * MIB, 9);
    let r = Replica::start(&pair, &src, "vol", &pair.server.to(), &["--mode", "async"]);
    r.wait_in_sync(Duration::from_secs(60));
    let mut c = r.client();
    for i in 0..8u64 {
        c.write(i * MIB + 4096, &vec![i as u8 + 0x40; 64 << 10], false)
            .expect("NBD write");
    }
    let mut st = serde_json::Value::Null;
    let applied = wait_until(Duration::from_secs(10), || {
        st = r.status();
        num(&st, "queued_bytes") == 0 && num(&st, "last_seq") > num(&st, "durable_seq")
    });
    assert!(applied, "writes not applied, or durable at once: {st}");
    // 64 KiB at +4 KiB spans two chunks each.
    assert_eq!(num(&st, "dirty_chunks"), 16, "{st}");
    let addr = pair.server.addr;
    pair.server.terminate(Duration::from_secs(20));
    let st = disconnected(&r);
    assert_eq!(num(&st, "durable_seq"), num(&st, "last_seq"), "{st}");
    assert_eq!(num(&st, "dirty_chunks"), 0, "{st}");
    assert!(
        st["link_error"]
            .as_str()
            .is_some_and(|e| e.contains("mirror shutting down") && !e.contains("refused")),
        "the primary was not told why (a stop is no refusal): {st}"
    );
    // What the status file of the stopped mirror says: durable up to there.
    let ms = mirror_status(&pair);
    assert_eq!(num(&ms[0], "durable_seq"), num(&st, "last_seq"), "{ms}");
    pair.restart_server(&addr.to_string());
    r.wait_in_sync(Duration::from_secs(30));
    let st = r.status();
    assert_eq!(
        num(&st, "resync_total"),
        0,
        "chunks resent after a clean stop: {st}"
    );
    c.disconnect();
    r.finish(&src, &pair.img("vol"), Duration::from_secs(60));
}

/// SIGTERM to `serve` while four sync-mode writers keep 4 KiB writes in
/// flight: the mirror's last acknowledgement may answer writes that were in
/// flight, and every write answered as done must be in the stopped mirror's
/// replica (RPO 0 across a planned stop). The rest are held, then fail
/// after the suspend timeout. Back on the same address, the mirror resyncs
/// and the replica ends identical. (In sync mode a write is mostly
/// committed before the session looks at the stop, so the last `Ack` is
/// rarely needed here: an `Ack` three frames too far in that branch went
/// unnoticed in two runs. What this guards is the promise, whatever path
/// the stop takes.)
#[test]
fn serve_sigterm_under_sync_load_answers_only_what_the_replica_has() {
    const WRITERS: u64 = 4;
    const BLOCK: usize = 4096;
    // Each writer's own 2 MiB region, written block after block.
    const REGION: u64 = 2 * MIB;
    let mut pair = Pair::new();
    let src = pair.path("src.img");
    random_image(&src, 16 * MIB, 21);
    let r = Replica::start(
        &pair,
        &src,
        "vol",
        &pair.server.to(),
        &["--mode", "sync", "--suspend-timeout", "2"],
    );
    r.wait_in_sync(Duration::from_secs(60));
    let block = |w: u64, i: u64| {
        let mut b = vec![0u8; BLOCK];
        for (k, x) in b.iter_mut().enumerate() {
            *x = (w * 37 + i * 11 + k as u64 / 512) as u8 | 1;
        }
        b
    };
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let mut c = r.client();
            let stop = stop.clone();
            std::thread::spawn(move || {
                // Blocks answered as written (error 0), in order.
                let mut done = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed)
                    && done < REGION / BLOCK as u64
                {
                    let off = w * REGION + done * BLOCK as u64;
                    match c.write(off, &block(w, done), false) {
                        Ok(0) => done += 1,
                        Ok(_) | Err(_) => break,
                    }
                }
                c.disconnect();
                done
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(700));
    let addr = pair.server.addr;
    pair.server.terminate(Duration::from_secs(20));
    // The writers now wait for the mirror; after 2 s their writes fail.
    std::thread::sleep(Duration::from_secs(4));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let done: Vec<u64> = writers.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(
        done.iter().all(|&d| d > 0),
        "a writer made no write: {done:?}"
    );
    let replica = std::fs::read(pair.img("vol")).expect("read the replica");
    for (w, &d) in done.iter().enumerate() {
        for i in 0..d {
            let off = (w as u64 * REGION + i * BLOCK as u64) as usize;
            assert!(
                replica[off..off + BLOCK] == block(w as u64, i)[..],
                "writer {w}: block {i} of {d} was answered as written but is not on the mirror"
            );
        }
    }
    pair.restart_server(&addr.to_string());
    r.finish(&src, &pair.img("vol"), Duration::from_secs(60));
}

/// A second SIGTERM or SIGINT (the operator's second Ctrl-C) to `replicate`
/// cuts a stop short that waits on the network. Here the mirror is frozen
/// (SIGSTOP) with a sync-mode write in flight: the first signal (SIGTERM)
/// waits for that write (up to the NBD grace period, then for the mirror to
/// confirm the end), the second (SIGINT: both count) ends the process
/// within seconds, without answering the write, with a non-zero exit and a
/// message saying the write's chunk stays marked. The next start resyncs
/// it: the replica ends identical.
#[test]
fn replicate_second_sigterm_stops_without_waiting_for_the_mirror() {
    let pair = Pair::new();
    let (src, mut r, mut c) = sync_replica_in_sync(&pair, 31, 9);
    let mirror_pid = pair.server.guard.id();
    signal(mirror_pid, libc::SIGSTOP);
    let writer = std::thread::spawn(move || c.write(2 * 65536, &vec![0x5a; 65536], false));
    std::thread::sleep(Duration::from_millis(500));
    let pid = r.guard.id();
    signal(pid, libc::SIGTERM);
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        r.guard.running(),
        "one SIGTERM did not wait for the write in flight; log:\n{}",
        r.log_text()
    );
    let t0 = std::time::Instant::now();
    signal(pid, libc::SIGINT);
    let st = r.guard.wait_timeout(Duration::from_secs(20));
    let took = t0.elapsed();
    signal(mirror_pid, libc::SIGCONT);
    let log = r.log_text();
    assert!(took < Duration::from_secs(5), "took {took:?}; log:\n{log}");
    assert!(!st.success(), "a cut-short stop exited with {st}");
    assert!(
        log.contains("stopped at a second signal")
            && log.contains("1 chunk(s) the mirror has not acknowledged stay marked"),
        "log:\n{log}"
    );
    let answered = writer.join().expect("writer thread");
    assert!(
        !matches!(answered, Ok(0)),
        "the write was answered as done without the mirror: {answered:?}"
    );
    let r = Replica::start(&pair, &src, "vol", &pair.server.to(), &["--mode", "sync"]);
    let st = r.wait_in_sync(Duration::from_secs(60));
    assert!(num(&st, "resync_total") >= 1, "nothing resynced: {st}");
    r.stop();
    assert_identical(&src, &pair.img("vol"));
}

/// A second SIGTERM to `serve` ends its drain at once. With the primary
/// frozen (SIGSTOP), a session cannot end by the book (the primary's
/// transport must take the last acknowledgement; the session waits 1 s for
/// it), and the second SIGTERM comes 200 ms into that wait: `serve` closes
/// the session and exits non-zero at once, saying so. (That the drain waits
/// for a session that has not ended, and the cut itself, are tested in
/// `mirror::tests`.) The primary, thawed, finds the mirror gone; on the same
/// address again the mirror gets it back and the replica ends identical.
#[test]
fn serve_second_sigterm_stops_without_waiting_for_sessions() {
    let mut pair = Pair::new();
    let (src, r, mut c) = sync_replica_in_sync(&pair, 32, 10);
    let primary_pid = r.guard.id();
    let addr = pair.server.addr;
    signal(primary_pid, libc::SIGSTOP);
    let server_pid = pair.server.guard.id();
    signal(server_pid, libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(200));
    let waited = pair.server.guard.running();
    let t0 = std::time::Instant::now();
    signal(server_pid, libc::SIGTERM);
    let st = pair.server.guard.wait_timeout(Duration::from_secs(40));
    let took = t0.elapsed();
    signal(primary_pid, libc::SIGCONT);
    let log = pair.server.log_text();
    assert!(
        waited,
        "one SIGTERM did not wait for the session; log:\n{log}"
    );
    assert!(took < Duration::from_secs(4), "took {took:?}; log:\n{log}");
    assert!(!st.success(), "a cut-short stop exited with {st}");
    assert!(log.contains("stopped at a second signal"), "log:\n{log}");
    disconnected(&r);
    pair.restart_server(&addr.to_string());
    r.wait_in_sync(Duration::from_secs(30));
    assert_eq!(c.write(65536, &vec![0x77; 65536], false).unwrap(), 0);
    c.disconnect();
    r.finish(&src, &pair.img("vol"), Duration::from_secs(30));
}

/// `serve --async-commit-ms`: in an asynchronous session the mirror makes
/// what it applied durable (and the primary clears its chunks' bits) at that
/// interval while writes arrive, and at once on the application's FLUSH.
#[test]
fn async_commit_interval_and_flush() {
    let writes = |r: &Replica| {
        let mut c = r.client();
        for i in 0..8u64 {
            c.write(i * MIB, &vec![i as u8 + 1; 64 << 10], false)
                .expect("NBD write");
        }
        c
    };
    let seqs = |st: &serde_json::Value| (num(st, "last_seq"), num(st, "durable_seq"));

    // A minute between commits: the writes are applied (the queue drains)
    // but stay not durable and dirty until the application flushes.
    let pair = Pair::with_server_args(&["--async-commit-ms", "60000"]);
    let src = pair.path("src.img");
    random_image(&src, 16 * MIB, 7);
    let r = Replica::start(&pair, &src, "vol", &pair.server.to(), &["--mode", "async"]);
    r.wait_in_sync(Duration::from_secs(60));
    let mut c = writes(&r);
    let mut st = serde_json::Value::Null;
    let applied = wait_until(Duration::from_secs(10), || {
        st = r.status();
        let (last, durable) = seqs(&st);
        num(&st, "queued_bytes") == 0 && last > durable
    });
    assert!(applied, "writes not applied, or durable at once: {st}");
    std::thread::sleep(Duration::from_secs(2));
    let st = r.status();
    let (last, durable) = seqs(&st);
    assert!(durable < last, "committed before the interval: {st}");
    assert!(num(&st, "dirty_chunks") > 0, "{st}");
    // The mirror's own status shows them applied, not durable.
    let mut ms = serde_json::Value::Null;
    let fresh = wait_until(Duration::from_secs(5), || {
        ms = mirror_status(&pair);
        num(&ms[0], "applied_seq") > num(&ms[0], "durable_seq")
    });
    assert!(fresh, "the mirror's status lags behind: {ms}");
    c.flush().expect("NBD flush");
    let mut st = serde_json::Value::Null;
    let durable = wait_until(Duration::from_secs(10), || {
        st = r.status();
        let (last, durable) = seqs(&st);
        durable == last && num(&st, "dirty_chunks") == 0
    });
    assert!(durable, "a FLUSH did not make the mirror durable: {st}");
    let ms = mirror_status(&pair);
    assert_eq!(num(&ms[0], "durable_seq"), seqs(&st).0, "{ms}");
    c.disconnect();
    r.finish(&src, &pair.img("vol"), Duration::from_secs(60));

    // A fifth of a second: durable soon without any flush.
    let pair = Pair::with_server_args(&["--async-commit-ms", "200"]);
    let src = pair.path("src.img");
    random_image(&src, 16 * MIB, 8);
    let r = Replica::start(&pair, &src, "vol", &pair.server.to(), &["--mode", "async"]);
    r.wait_in_sync(Duration::from_secs(60));
    let c = writes(&r);
    let mut st = serde_json::Value::Null;
    let durable = wait_until(Duration::from_secs(5), || {
        st = r.status();
        let (last, durable) = seqs(&st);
        last > 0 && durable == last && num(&st, "dirty_chunks") == 0
    });
    assert!(durable, "not durable within 5 s at a 200 ms interval: {st}");
    c.disconnect();
    r.finish(&src, &pair.img("vol"), Duration::from_secs(60));
}

/// The mirror's file system fills up during live replication in sync mode
/// (its store is a 12 MiB tmpfs; the 32 MiB volume is zeros but for its
/// first MiB, so the replica starts sparse). The application writes 256 KiB
/// blocks one after another: every write answered as done is on the mirror,
/// byte for byte; the first write the mirror cannot store is not answered
/// as done (EIO, after the suspend timeout); the primary's status names the
/// full disk; `serve` lives on. Once the file system has room again, the
/// primary reconnects by itself, resyncs, and the replica ends identical.
#[test]
fn mirror_disk_full_during_live_replication() {
    const BLOCK: usize = 256 * 1024;
    let tmp = tempdir();
    let store = tmp.path().join("store");
    let Some(_mount) =
        Mount::tmpfs_or_skip("mirror_disk_full_during_live_replication", "12m", &store)
    else {
        return;
    };
    let primary = Node::new(tmp.path().join("p"));
    let mirror = Node::new(tmp.path().join("m"));
    let mut server = Server::start(&mirror, &store, &[&primary.fp], "127.0.0.1:0", &[]);
    let src = tmp.path().join("src.img");
    random_image(&src, MIB, 71);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&src)
        .and_then(|f| f.set_len(32 * MIB))
        .expect("growing the image");
    let state = tmp.path().join("state");
    let r = Replicating::spawn(
        &src,
        &primary,
        &server.to(),
        &mirror.fp,
        "vol",
        &state,
        tmp.path().join("vol.sock"),
        tmp.path().join("replicate.log"),
        &[
            "--mode".into(),
            "sync".into(),
            "--suspend-timeout".into(),
            "2".into(),
        ],
    );
    r.wait_in_sync(Duration::from_secs(60));
    let block = |i: u64| {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1000 + i);
        let mut b = vec![0u8; BLOCK];
        rng.fill(&mut b[..]);
        b
    };
    let mut c = r.client();
    let blocks = 31 * MIB / BLOCK as u64;
    let mut answered = 0u64;
    let mut refused = None;
    for i in 0..blocks {
        match c.write(MIB + i * BLOCK as u64, &block(i), false) {
            Ok(0) => answered += 1,
            other => {
                refused = Some(other);
                break;
            }
        }
    }
    assert!(
        matches!(refused, Some(Ok(5))),
        "after {answered} of {blocks} writes: {refused:?} (expected EIO once the mirror is full); log:\n{}",
        r.log_text()
    );
    assert!(answered > 0, "no write made it before the disk was full");
    let replica = std::fs::read(store.join("vol.img")).expect("reading the replica");
    for i in 0..answered {
        let off = (MIB + i * BLOCK as u64) as usize;
        assert!(
            replica[off..off + BLOCK] == block(i)[..],
            "block {i} of {answered} was answered as written but is not on the mirror"
        );
    }
    let st = r.status();
    assert!(
        st["link_error"]
            .as_str()
            .is_some_and(|e| e.to_lowercase().contains("space")),
        "the primary does not say the mirror's disk is full: {st}"
    );
    eprintln!(
        "{answered} writes answered before the mirror's disk was full; the primary says: {}",
        st["link_error"]
    );
    server.assert_alive();
    sh(
        "mount",
        &[
            "-o",
            "remount,size=128m",
            store.to_str().expect("utf-8 path"),
        ],
    )
    .expect("remounting the tmpfs larger");
    r.wait_in_sync(Duration::from_secs(90));
    assert_eq!(c.write(0, &block(999), false).unwrap(), 0);
    c.disconnect();
    r.stop();
    assert_identical(&src, &store.join("vol.img"));
    server.assert_alive();
}
