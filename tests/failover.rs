//! Failover and failback: generation ids, promote, demote, the union
//! resync, split brain, undo points and recovery points, with real
//! processes over loopback QUIC on image files.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const CHUNK: u64 = 64 * 1024;

/// A running `blkmirror replicate` of any node to any peer.
type Live = Replicating;

impl Live {
    #[allow(clippy::too_many_arguments)]
    fn start(
        dir: &Path,
        me: &Node,
        peer: &Node,
        to: &str,
        source: &Path,
        state: &Path,
        volume: &str,
        extra: &[&str],
    ) -> Live {
        let sock = dir.join(format!("{volume}-{}.nbd.sock", nanos_now()));
        let log = dir.join(format!("{volume}-replicate-{}.log", nanos_now()));
        let extra: Vec<String> = extra.iter().map(|a| a.to_string()).collect();
        Replicating::spawn(source, me, to, &peer.fp, volume, state, sock, log, &extra)
    }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    use rand::{Rng, SeedableRng};
    let mut r = rand::rngs::StdRng::seed_from_u64(seed);
    (0..len).map(|_| r.gen()).collect()
}

/// Chunks covered by the 64-chunk bitmap words of `chunks` (the write
/// intent persists whole words).
fn word_chunks(chunks: &[u64], total: u64) -> std::collections::BTreeSet<u64> {
    let mut out = std::collections::BTreeSet::new();
    for &c in chunks {
        let w = c / 64;
        for k in w * 64..((w + 1) * 64).min(total) {
            out.insert(k);
        }
    }
    out
}

/// `blkmirror promote` of `volume` in `store`, writing the new primary's
/// state into `state`.
fn promote_cmd(store: &Path, volume: &str, state: &Path, extra: &[&str]) -> CmdOut {
    let mut args = vec![
        "promote",
        "--store",
        store.to_str().expect("utf-8 path"),
        "--volume",
        volume,
        "--state",
        state.to_str().expect("utf-8 path"),
    ];
    args.extend_from_slice(extra);
    run_cmd(&args)
}

fn store_meta_str(store: &Path, volume: &str, key: &str) -> String {
    read_meta(store, volume)
        .get(key)
        .and_then(|v| v.as_str())
        .unwrap_or_default()
        .to_string()
}

fn points_list(store: &Path, volume: &str) -> Vec<serde_json::Value> {
    let out = run_cmd(&[
        "points",
        "list",
        "--store",
        store.to_str().expect("utf-8"),
        "--volume",
        volume,
        "--json",
    ]);
    assert_eq!(out.code, 0, "points list failed: {}", out.stderr);
    serde_json::from_str::<serde_json::Value>(&out.stdout)
        .expect("points JSON")
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// The primary dies; the mirror is promoted (refused while the old primary's
/// session is still up, then with --force), written as the new primary while
/// the old one is away; the old primary is demoted and served; the new
/// primary resyncs exactly the union of both sides' changed chunks, keeps
/// the old primary's unreplicated state as a recovery point there, and both
/// end bit-identical.
#[test]
fn failover_promote_then_failback_resyncs_the_union() {
    let tmp = tempdir();
    let a = Node::new(tmp.path().join("a-id"));
    let b = Node::new(tmp.path().join("b-id"));
    let store_b = tmp.path().join("store-b");
    let state_a = tmp.path().join("state-a");
    let state_b = tmp.path().join("state-b");
    let store_a = tmp.path().join("store-a");
    let src = tmp.path().join("a.img");
    let vol_bytes = 32 * MIB;
    let total = vol_bytes / CHUNK;
    random_image(&src, vol_bytes, 7);
    let mut serve_b = Server::start(&b, &store_b, &[&a.fp], "127.0.0.1:0", &[]);

    // 1. A replicates to B in sync mode.
    let live_a = Live::start(
        tmp.path(),
        &a,
        &b,
        &serve_b.to(),
        &src,
        &state_a,
        "v",
        &["--mode", "sync", "--lazy-flush-secs", "1"],
    );
    let mut c = live_a.client();
    for k in 0..20u64 {
        let e = c
            .write(k * 3 * CHUNK + 4096, &pattern(k, 8192), false)
            .unwrap();
        assert_eq!(e, 0, "NBD write error");
    }
    c.flush().unwrap();
    live_a.wait_in_sync(Duration::from_secs(60));
    // Let the lazy flush clear every bit on disk, then a last burst that is
    // acknowledged (so on the mirror) while its bits are still set here.
    std::thread::sleep(Duration::from_millis(2500));
    let y: Vec<u64> = vec![200, 201, 330];
    for &ch in &y {
        let e = c
            .write(ch * CHUNK, &pattern(1000 + ch, CHUNK as usize), false)
            .unwrap();
        assert_eq!(e, 0, "NBD write error");
    }
    let mut live_a = live_a;
    live_a.guard.kill9();
    // Every acknowledged write is on the mirror.
    assert_identical(&src, &serve_b.img("v"));
    let a_before_failback = tmp.path().join("a-before.img");
    std::fs::copy(&src, &a_before_failback).unwrap();

    // 2. Promote B: refused while A's session is up, then forced.
    let promote = |force: bool| {
        let extra: &[&str] = if force {
            &["--json", "--force"]
        } else {
            &["--json"]
        };
        promote_cmd(&store_b, "v", &state_b, extra)
    };
    let out = promote(false);
    if out.code == 0 {
        // The session already timed out: fine, but then it was not connected.
        eprintln!("promote succeeded without --force: {}", out.stdout);
    } else {
        out.assert_fails(1, &["refusing to promote", "--force"]);
        let out = promote(true);
        assert_eq!(out.code, 0, "promote --force: {}", out.stderr);
    }
    assert_eq!(store_meta_str(&store_b, "v", "role"), "Primary");
    // The old primary can no longer replicate into the promoted volume.
    let img_b = serve_b.img("v");
    let dry = run_cmd(&[
        "sync",
        src.to_str().unwrap(),
        "--identity",
        a.dir_str(),
        "--to",
        &serve_b.to(),
        "--peer",
        &b.fp,
        "--volume",
        "v",
        "--state",
        state_a.to_str().unwrap(),
        "--dry-run",
    ]);
    assert_eq!(dry.code, 0, "dry run: {}", dry.stderr);
    // A's bitmap still marks its last writes (it cannot know they reached
    // B): both sides may have written since they parted.
    assert!(
        dry.stdout.contains("refused") && dry.stdout.contains("split brain"),
        "the old primary meeting the promoted mirror is a split brain: {}",
        dry.stdout
    );
    serve_b.guard.kill9();

    // 3. B is the primary now; A is away. New writes on B.
    let a_addr = dead_udp_addr().to_string();
    let live_b = Live::start(
        tmp.path(),
        &b,
        &a,
        &a_addr,
        &img_b,
        &state_b,
        "v",
        &["--mode", "sync", "--on-disconnect", "continue"],
    );
    let x: Vec<u64> = vec![5, 6, 7, 201, 400, 511];
    let mut cb = live_b.client();
    for &ch in &x {
        let e = cb
            .write(ch * CHUNK + 4096, &pattern(2000 + ch, 40960), false)
            .unwrap();
        assert_eq!(e, 0, "NBD write error; log:\n{}", live_b.log_text());
    }
    cb.flush().unwrap();
    drop(cb);
    let mut st = serde_json::Value::Null;
    let ok = wait_until(Duration::from_secs(10), || {
        st = live_b.status();
        num(&st, "writes") == x.len() as u64
    });
    assert!(ok, "{st}\n{}", live_b.log_text());
    assert_eq!(num(&st, "dirty_chunks"), x.len() as u64, "{st}");
    live_b.stop();

    // 4. A comes back as a secondary of B.
    let demote = run_cmd(&[
        "demote",
        "--state",
        state_a.to_str().unwrap(),
        "--volume",
        "v",
        "--store",
        store_a.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(demote.code, 0, "demote: {}", demote.stderr);
    let a_changed = word_chunks(&y, total);
    let d: serde_json::Value = serde_json::from_str(&demote.stdout).unwrap();
    assert_eq!(num(&d, "changed_chunks"), a_changed.len() as u64, "{d}");
    // The demoted state can no longer be used as a primary.
    let again = run_cmd(&[
        "sync",
        src.to_str().unwrap(),
        "--identity",
        a.dir_str(),
        "--to",
        &a_addr,
        "--peer",
        &b.fp,
        "--volume",
        "v",
        "--state",
        state_a.to_str().unwrap(),
    ]);
    again.assert_fails(1, &["demoted"]);
    let serve_a = Server::start(&a, &store_a, &[&b.fp], &a_addr, &[]);
    let mut union: std::collections::BTreeSet<u64> = a_changed.clone();
    union.extend(x.iter().copied());
    let dry = run_cmd(&[
        "replicate",
        img_b.to_str().unwrap(),
        "--identity",
        b.dir_str(),
        "--to",
        &serve_a.to(),
        "--peer",
        &a.fp,
        "--volume",
        "v",
        "--state",
        state_b.to_str().unwrap(),
        "--nbd",
        "unix:/nonexistent",
        "--mode",
        "sync",
        "--dry-run",
    ]);
    assert_eq!(dry.code, 0, "dry run: {}", dry.stderr);
    assert!(
        dry.stdout
            .contains(&format!("resync {} chunks", union.len()))
            && dry
                .stdout
                .contains(&format!("target changed {}", a_changed.len())),
        "expected a resync of {} chunks: {}",
        union.len(),
        dry.stdout
    );
    let live_b = Live::start(
        tmp.path(),
        &b,
        &a,
        &serve_a.to(),
        &img_b,
        &state_b,
        "v",
        &["--mode", "sync", "--on-disconnect", "continue"],
    );
    let st = live_b.wait_in_sync(Duration::from_secs(60));
    assert_eq!(
        num(&st, "resync_total"),
        union.len() as u64,
        "the resync covers exactly the union: {st}"
    );
    live_b.stop();
    assert_identical(&img_b, &src);
    // A's own unreplicated state was kept as a recovery point before it was overwritten.
    let pts = points_list(&store_a, "v");
    assert_eq!(pts.len(), 1, "{pts:?}");
    assert_eq!(pts[0]["kind"], "Failback", "{pts:?}");
    assert_eq!(num(&pts[0], "chunks"), union.len() as u64, "{pts:?}");
    let _ = a_before_failback;
}

/// Both sides write while apart: the primary (continue mode) and the
/// promoted mirror. The default policy refuses the pairing (both keep their
/// data; the primary keeps serving); `--after-split-brain discard-younger`
/// makes the later primary (the promoted mirror) lose: it keeps its diverged
/// state as a recovery point, restorable byte for byte, and ends identical
/// to the winner.
#[test]
fn split_brain_is_detected_and_the_policy_applied() {
    let tmp = tempdir();
    let a = Node::new(tmp.path().join("a-id"));
    let b = Node::new(tmp.path().join("b-id"));
    let store_b = tmp.path().join("store-b");
    let state_a = tmp.path().join("state-a");
    let state_b = tmp.path().join("state-b");
    let src = tmp.path().join("a.img");
    random_image(&src, 16 * MIB, 3);
    let mut serve_b = Server::start(&b, &store_b, &[&a.fp], "127.0.0.1:0", &[]);
    let b_addr = serve_b.to();
    let img_b = serve_b.img("v");
    let live_args = ["--mode", "async", "--on-disconnect", "continue"];
    let live_a = Live::start(tmp.path(), &a, &b, &b_addr, &src, &state_a, "v", &live_args);
    let mut c = live_a.client();
    assert_eq!(c.write(0, &pattern(1, 65536), false).unwrap(), 0);
    live_a.wait_in_sync(Duration::from_secs(60));

    // Apart: the mirror dies, the primary writes on.
    serve_b.guard.kill9();
    for k in 0..4u64 {
        assert_eq!(
            c.write((10 + k) * CHUNK, &pattern(10 + k, 65536), false)
                .unwrap(),
            0
        );
    }
    drop(c);
    live_a.stop();
    // Meanwhile the mirror is promoted and written.
    let out = promote_cmd(&store_b, "v", &state_b, &[]);
    assert_eq!(out.code, 0, "promote: {}", out.stderr);
    let live_b = Live::start(
        tmp.path(),
        &b,
        &a,
        &dead_udp_addr().to_string(),
        &img_b,
        &state_b,
        "v",
        &live_args,
    );
    let mut cb = live_b.client();
    for k in 0..3u64 {
        assert_eq!(
            cb.write((100 + k) * CHUNK, &pattern(100 + k, 65536), false)
                .unwrap(),
            0
        );
    }
    assert_eq!(cb.write(11 * CHUNK, &pattern(999, 4096), false).unwrap(), 0);
    drop(cb);
    live_b.stop();
    let b_diverged = tmp.path().join("b-diverged.img");
    std::fs::copy(&img_b, &b_diverged).unwrap();
    let a_state = tmp.path().join("a-state.img");
    std::fs::copy(&src, &a_state).unwrap();
    let serve_b = Server::start(&b, &store_b, &[&a.fp], &b_addr, &[]);

    // Default policy: detected, refused, nothing overwritten; A keeps serving.
    let dry = run_cmd(&[
        "replicate",
        src.to_str().unwrap(),
        "--identity",
        a.dir_str(),
        "--to",
        &b_addr,
        "--peer",
        &b.fp,
        "--volume",
        "v",
        "--state",
        state_a.to_str().unwrap(),
        "--nbd",
        "unix:/nonexistent",
        "--mode",
        "async",
        "--dry-run",
    ]);
    assert_eq!(dry.code, 0, "dry run: {}", dry.stderr);
    assert!(
        dry.stdout.contains("split brain")
            && dry
                .stdout
                .contains("this node changed 4 chunks, the mirror 4"),
        "{}",
        dry.stdout
    );
    let live_a = Live::start(tmp.path(), &a, &b, &b_addr, &src, &state_a, "v", &live_args);
    let mut st = serde_json::Value::Null;
    let refused = wait_until(Duration::from_secs(30), || {
        st = live_a.status();
        st["link_error"]
            .as_str()
            .is_some_and(|e| e.contains("split brain"))
    });
    assert!(refused, "{st}\n{}", live_a.log_text());
    assert_eq!(st["connected"], false, "{st}");
    let mut c = live_a.client();
    assert_eq!(
        c.read(10 * CHUNK, 4096).unwrap(),
        pattern(10, 65536)[..4096]
    );
    drop(c);
    live_a.stop();
    assert_identical(&img_b, &b_diverged);
    assert_eq!(store_meta_str(&store_b, "v", "role"), "Primary");

    // discard-younger: B was promoted after A became primary, so B loses.
    let mut args = live_args.to_vec();
    args.extend(["--after-split-brain", "discard-younger"]);
    let live_a = Live::start(tmp.path(), &a, &b, &b_addr, &src, &state_a, "v", &args);
    live_a.wait_in_sync(Duration::from_secs(60));
    live_a.stop();
    assert_identical(&src, &img_b);
    assert_identical(&src, &a_state);
    assert_eq!(store_meta_str(&store_b, "v", "role"), "Secondary");
    let pts = points_list(&store_b, "v");
    assert_eq!(pts.len(), 1, "{pts:?}");
    assert_eq!(pts[0]["kind"], "SplitBrain", "{pts:?}");
    // The loser's data is restorable byte for byte.
    let id = num(&pts[0], "id").to_string();
    let restored = tmp.path().join("restored.img");
    let out = run_cmd(&[
        "restore",
        "--identity",
        a.dir_str(),
        "--from",
        &b_addr,
        "--peer",
        &b.fp,
        "--volume",
        "v",
        "--point",
        &id,
        restored.to_str().unwrap(),
    ]);
    assert_eq!(out.code, 0, "restore: {}\n{}", out.stdout, out.stderr);
    assert_identical(&restored, &b_diverged);
    drop(serve_b);
}

/// kill -9 in the middle of a differential sync (the mirror or the
/// primary, 20 runs at random points): promoting the mirror always yields
/// the state before the sync (rolled back with the undo log) or after it,
/// never a mixture.
#[test]
fn promote_after_a_crash_mid_resync_is_never_a_mixture() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(20261124);
    let mut rolled_back = 0;
    let mut finished = 0;
    for run in 0..20u64 {
        let mut pair = Pair::new();
        let src = pair.path("src.img");
        random_image(&src, 24 * MIB, run);
        pair.sync(&src, "v", &[]).ok();
        let s0 = pair.path("s0.img");
        std::fs::copy(&src, &s0).unwrap();
        // Change about half the chunks.
        let chunks = 24 * MIB / CHUNK;
        for ch in 0..chunks {
            if rng.gen_bool(0.5) {
                write_at(&src, ch * CHUNK + 512, &pattern(run * 1000 + ch, 4096));
            }
        }
        let s1 = pair.path("s1.img");
        std::fs::copy(&src, &s1).unwrap();
        let (mut sync, _) = pair.spawn_sync(&src, "v", &[]);
        let store = pair.store().to_path_buf();
        wait_until(Duration::from_secs(20), || {
            meta_state(&store, "v") == "Inconsistent" || !sync.running()
        });
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..60)));
        if run % 2 == 0 {
            pair.server.guard.kill9();
            sync.kill9();
        } else {
            sync.kill9();
            pair.server.guard.kill9();
        }
        let state_b = pair.path("state-b");
        let out = promote_cmd(&store, "v", &state_b, &[]);
        assert_eq!(out.code, 0, "run {run}: promote: {}", out.stderr);
        let img = pair.img("v");
        let got = std::fs::read(&img).unwrap();
        if got == std::fs::read(&s0).unwrap() {
            assert!(
                out.stderr.contains("rolled back") || meta_state(&store, "v") == "UpToDate",
                "run {run}: {}",
                out.stderr
            );
            if out.stderr.contains("rolled back") {
                rolled_back += 1;
            }
        } else if got == std::fs::read(&s1).unwrap() {
            finished += 1;
        } else {
            panic!(
                "run {run}: the promoted replica is neither the state before nor after the sync; promote said: {}",
                out.stderr
            );
        }
        assert_eq!(store_meta_str(&store, "v", "role"), "Primary");
    }
    eprintln!("rolled back {rolled_back}, finished {finished} of 20");
    assert!(
        rolled_back >= 5,
        "only {rolled_back} of 20 runs were killed mid-resync"
    );
}

fn restore_to(node: &Node, from: &str, peer: &Node, point: Option<u64>, target: &Path) {
    let mut args = vec![
        "restore".to_string(),
        "--identity".into(),
        node.dir_str().into(),
        "--from".into(),
        from.into(),
        "--peer".into(),
        peer.fp.clone(),
        "--volume".into(),
        "v".into(),
    ];
    if let Some(p) = point {
        args.extend(["--point".into(), p.to_string()]);
    }
    args.push(target.to_str().unwrap().into());
    let refs: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let out = run_cmd(&refs);
    assert_eq!(
        out.code, 0,
        "restore {point:?}: {}\n{}",
        out.stdout, out.stderr
    );
}

/// Points taken while live replication runs (through the running session)
/// are crash-consistent states of the primary: restoring each equals the
/// primary's device when it was taken, byte for byte; pruning one frees its
/// space and keeps the others exact.
#[test]
fn points_during_live_replication_restore_exactly_and_prune_frees_space() {
    let tmp = tempdir();
    let a = Node::new(tmp.path().join("a-id"));
    let b = Node::new(tmp.path().join("b-id"));
    let store_b = tmp.path().join("store-b");
    let state_a = tmp.path().join("state-a");
    let src = tmp.path().join("a.img");
    random_image(&src, 16 * MIB, 11);
    let serve_b = Server::start(&b, &store_b, &[&a.fp], "127.0.0.1:0", &[]);
    let live = Live::start(
        tmp.path(),
        &a,
        &b,
        &serve_b.to(),
        &src,
        &state_a,
        "v",
        &["--mode", "sync"],
    );
    let mut c = live.client();
    let store = store_b.to_str().unwrap().to_string();
    let mut snaps = Vec::new();
    let mut ids = Vec::new();
    for phase in 0..3u64 {
        for k in 0..(10 + phase * 5) {
            let ch = (phase * 7 + k * 3) % 256;
            assert_eq!(
                c.write(ch * CHUNK, &pattern(phase * 100 + k, 32768), false)
                    .unwrap(),
                0
            );
        }
        c.flush().unwrap();
        // Sync mode: every acknowledged write is on the mirror; the point is
        // taken by the session between two applied writes.
        let out = run_cmd(&[
            "points",
            "create",
            "--store",
            &store,
            "--volume",
            "v",
            "--name",
            &format!("phase-{phase}"),
        ]);
        assert_eq!(out.code, 0, "points create: {}", out.stderr);
        ids.push(out.stdout.trim().parse::<u64>().unwrap());
        let snap = tmp.path().join(format!("phase-{phase}.img"));
        std::fs::copy(&src, &snap).unwrap();
        snaps.push(snap);
    }
    // More writes after the last point.
    for k in 0..8u64 {
        assert_eq!(
            c.write(k * 5 * CHUNK, &pattern(9000 + k, 65536), false)
                .unwrap(),
            0
        );
    }
    c.flush().unwrap();
    drop(c);
    live.wait_in_sync(Duration::from_secs(60));
    live.stop();
    let pts = points_list(&store_b, "v");
    assert_eq!(pts.len(), 3, "{pts:?}");
    for (k, id) in ids.iter().enumerate() {
        let out = tmp.path().join(format!("restored-{k}.img"));
        restore_to(&a, &serve_b.to(), &b, Some(*id), &out);
        assert_identical(&out, &snaps[k]);
    }
    let cur = tmp.path().join("restored-current.img");
    restore_to(&a, &serve_b.to(), &b, None, &cur);
    assert_identical(&cur, &src);
    // Remove the middle point: its records move into the older one (which
    // stays exact), nothing is lost.
    let total = |pts: &[serde_json::Value]| pts.iter().map(|p| num(p, "bytes")).sum::<u64>();
    let prune = |args: &[&str]| {
        let mut v = vec!["points", "prune", "--store", &store, "--volume", "v"];
        v.extend_from_slice(args);
        let out = run_cmd(&v);
        assert_eq!(out.code, 0, "prune: {}", out.stderr);
    };
    let before = total(&pts);
    prune(&["--id", &ids[1].to_string()]);
    let pts = points_list(&store_b, "v");
    assert_eq!(pts.len(), 2, "{pts:?}");
    assert!(total(&pts) <= before, "{before} -> {}", total(&pts));
    for k in [0usize, 2] {
        let out = tmp.path().join(format!("again-{k}.img"));
        restore_to(&a, &serve_b.to(), &b, Some(ids[k]), &out);
        assert_identical(&out, &snaps[k]);
    }
    // Remove the oldest: its log goes, the space is freed.
    let before = total(&pts);
    prune(&["--id", &ids[0].to_string()]);
    let pts = points_list(&store_b, "v");
    assert_eq!(pts.len(), 1, "{pts:?}");
    assert!(
        total(&pts) < before,
        "prune freed nothing: {before} -> {}",
        total(&pts)
    );
    let out = tmp.path().join("again-last.img");
    restore_to(&a, &serve_b.to(), &b, Some(ids[2]), &out);
    assert_identical(&out, &snaps[2]);
}

/// `serve --point-every` takes automatic points of consistent replicas and
/// applies the retention policy to them (manual points are kept).
#[test]
fn scheduled_points_follow_the_retention_policy() {
    let pair = Pair::with_server_args(&[
        "--point-every",
        "1",
        "--keep-last",
        "1",
        "--keep-hourly",
        "1",
        "--keep-daily",
        "0",
    ]);
    let src = pair.path("src.img");
    random_image(&src, 4 * MIB, 2);
    pair.sync(&src, "v", &[]).ok();
    let out = run_cmd(&[
        "points",
        "create",
        "--store",
        pair.store().to_str().unwrap(),
        "--volume",
        "v",
        "--name",
        "mine",
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let mut pts = Vec::new();
    let ok = wait_until(Duration::from_secs(20), || {
        pts = points_list(pair.store(), "v");
        pts.iter().filter(|p| p["kind"] == "Auto").count() == 1
            && pts.iter().any(|p| p["kind"] == "Auto" && num(p, "id") >= 4)
    });
    assert!(ok, "{pts:?}");
    assert!(pts.iter().any(|p| p["name"] == "mine"), "{pts:?}");
}

/// Start nbdfuse on `uri` and wait for its file to appear with `bytes`.
fn nbdfuse(dir: &Path, uri: &str, bytes: u64) -> (ChildGuard, PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    let file = dir.join("disk");
    let child = Command::new("nbdfuse")
        .arg(&file)
        .arg(uri)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nbdfuse");
    let guard = ChildGuard::new(child, "nbdfuse");
    let ok = wait_until(Duration::from_secs(20), || {
        std::fs::metadata(&file)
            .map(|m| m.len() == bytes)
            .unwrap_or(false)
    });
    assert!(ok, "nbdfuse did not expose {}", file.display());
    (guard, file)
}

fn unfuse(dir: &Path, mut guard: ChildGuard) {
    sh("fusermount3", &["-u", dir.to_str().unwrap()]).expect("fusermount3 -u");
    guard.wait_timeout(Duration::from_secs(20));
}

fn digest_of(data: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(data)
}

/// System test (root): ext4 on the primary's export (nbdfuse + losetup),
/// files written with recorded digests, the primary killed with -9; the
/// promoted mirror's replica passes `e2fsck -fn`, mounts, and holds every
/// file. New files are written on the new primary; the old primary returns
/// as its secondary and receives exactly the union of both sides' changed
/// chunks; both end bit-identical.
#[test]
fn ext4_failover_and_failback_as_root() {
    const T: &str = "ext4_failover_and_failback_as_root";
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
        if sh("sh", &["-c", &format!("command -v {t}")]).is_err() {
            panic!("{t} is not installed");
        }
    }
    use rand::{Rng, SeedableRng};
    let tmp = tempdir();
    let a = Node::new(tmp.path().join("a-id"));
    let b = Node::new(tmp.path().join("b-id"));
    let store_b = tmp.path().join("store-b");
    let store_a = tmp.path().join("store-a");
    let state_a = tmp.path().join("state-a");
    let state_b = tmp.path().join("state-b");
    let src = tmp.path().join("a.img");
    let bytes = 128 * MIB;
    std::fs::File::create(&src)
        .and_then(|f| f.set_len(bytes))
        .unwrap();
    let mut serve_b = Server::start(&b, &store_b, &[&a.fp], "127.0.0.1:0", &[]);
    let live_a = Live::start(
        tmp.path(),
        &a,
        &b,
        &serve_b.to(),
        &src,
        &state_a,
        "fs",
        &["--mode", "sync"],
    );
    let mut files: Vec<(String, u64)> = Vec::new();
    let mut rng = rand::rngs::StdRng::seed_from_u64(44);
    {
        let fdir = tmp.path().join("fuse-a");
        let (fuse, file) = nbdfuse(&fdir, &live_a.uri(), bytes);
        {
            let dev = LoopDev::attach(&file).expect("losetup");
            sh("mkfs.ext4", &["-q", "-F", dev.path_str()]).expect("mkfs.ext4");
            let mnt = Mount::new(&[dev.path_str()], &tmp.path().join("mnt-a")).expect("mount");
            for i in 0..16 {
                let mut data = vec![0u8; rng.gen_range(1..2 * MIB as usize)];
                rng.fill(&mut data[..]);
                std::fs::write(mnt.dir.join(format!("a{i}")), &data).unwrap();
                files.push((format!("a{i}"), digest_of(&data)));
            }
            sh("sync", &[]).unwrap();
        }
        unfuse(&fdir, fuse);
    }
    // Everything above was acknowledged in sync mode. The primary dies.
    let mut live_a = live_a;
    live_a.guard.kill9();
    let out = promote_cmd(&store_b, "fs", &state_b, &["--force"]);
    assert_eq!(out.code, 0, "promote: {}", out.stderr);
    serve_b.guard.kill9();
    let img_b = store_b.join("fs.img");
    sh("e2fsck", &["-fn", img_b.to_str().unwrap()]).expect("e2fsck -fn of the promoted replica");
    {
        let mnt = Mount::new(
            &["-o", "ro,loop", img_b.to_str().unwrap()],
            &tmp.path().join("mnt-b0"),
        )
        .expect("mounting the promoted replica");
        for (name, d) in &files {
            let got = std::fs::read(mnt.dir.join(name)).unwrap();
            assert_eq!(
                digest_of(&got),
                *d,
                "{name} differs on the promoted replica"
            );
        }
    }
    // New writes on the new primary while the old one is away.
    let a_addr = dead_udp_addr().to_string();
    let live_b = Live::start(
        tmp.path(),
        &b,
        &a,
        &a_addr,
        &img_b,
        &state_b,
        "fs",
        &["--mode", "sync", "--on-disconnect", "continue"],
    );
    {
        let fdir = tmp.path().join("fuse-b");
        let (fuse, file) = nbdfuse(&fdir, &live_b.uri(), bytes);
        {
            let dev = LoopDev::attach(&file).expect("losetup");
            let mnt = Mount::new(&[dev.path_str()], &tmp.path().join("mnt-b")).expect("mount");
            for i in 0..6 {
                let mut data = vec![0u8; rng.gen_range(1..MIB as usize)];
                rng.fill(&mut data[..]);
                std::fs::write(mnt.dir.join(format!("b{i}")), &data).unwrap();
                files.push((format!("b{i}"), digest_of(&data)));
            }
            std::fs::remove_file(mnt.dir.join("a3")).unwrap();
            files.retain(|(n, _)| n != "a3");
            sh("sync", &[]).unwrap();
        }
        unfuse(&fdir, fuse);
    }
    live_b.stop();
    // The old primary comes back as a secondary.
    let out = run_cmd(&[
        "demote",
        "--state",
        state_a.to_str().unwrap(),
        "--volume",
        "fs",
        "--store",
        store_a.to_str().unwrap(),
    ]);
    assert_eq!(out.code, 0, "demote: {}", out.stderr);
    let serve_a = Server::start(&a, &store_a, &[&b.fp], &a_addr, &[]);
    let dry = run_cmd(&[
        "replicate",
        img_b.to_str().unwrap(),
        "--identity",
        b.dir_str(),
        "--to",
        &serve_a.to(),
        "--peer",
        &a.fp,
        "--volume",
        "fs",
        "--state",
        state_b.to_str().unwrap(),
        "--nbd",
        "unix:/nonexistent",
        "--mode",
        "sync",
        "--dry-run",
    ]);
    assert_eq!(dry.code, 0, "{}", dry.stderr);
    let field = |key: &str| -> u64 {
        let s = dry
            .stdout
            .split(key)
            .nth(1)
            .unwrap_or_else(|| panic!("{}", dry.stdout));
        s.trim_start()
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let (s_changed, t_changed, union) = (
        field("source changed"),
        field("target changed"),
        field(", resync "),
    );
    assert!(s_changed > 0, "{}", dry.stdout);
    assert!(
        union >= s_changed.max(t_changed) && union <= s_changed + t_changed,
        "{}",
        dry.stdout
    );
    let live_b = Live::start(
        tmp.path(),
        &b,
        &a,
        &serve_a.to(),
        &img_b,
        &state_b,
        "fs",
        &["--mode", "sync"],
    );
    let st = live_b.wait_in_sync(Duration::from_secs(120));
    assert_eq!(num(&st, "resync_total"), union, "{st}\n{}", dry.stdout);
    live_b.stop();
    assert_identical(&img_b, &src);
    sh("e2fsck", &["-fn", src.to_str().unwrap()]).expect("e2fsck -fn of the old primary");
    let mnt = Mount::new(
        &["-o", "ro,loop", src.to_str().unwrap()],
        &tmp.path().join("mnt-a2"),
    )
    .expect("mounting the old primary");
    for (name, d) in &files {
        let got = std::fs::read(mnt.dir.join(name)).unwrap();
        assert_eq!(digest_of(&got), *d, "{name} differs on the old primary");
    }
    assert!(!mnt.dir.join("a3").exists());
}

/// The one-shot `sync` path: a plain sync into a promoted mirror that was
/// written meanwhile is a split brain (a sync's source is never known to be
/// unchanged): refused by default; with `discard-younger` the mirror keeps
/// its state as a recovery point and receives only what differs.
#[test]
fn sync_into_a_promoted_mirror_is_a_split_brain() {
    let pair = Pair::new();
    let src = pair.path("src.img");
    random_image(&src, 8 * MIB, 21);
    pair.sync(&src, "v", &[]).ok();
    let state_b = pair.path("state-b");
    let out = promote_cmd(pair.store(), "v", &state_b, &[]);
    assert_eq!(out.code, 0, "promote: {}", out.stderr);
    // The new primary writes (tracked, through replicate).
    let img_b = pair.img("v");
    let live_b = Live::start(
        pair.tmp.path(),
        &pair.mirror,
        &pair.primary,
        &dead_udp_addr().to_string(),
        &img_b,
        &state_b,
        "v",
        &["--mode", "async"],
    );
    let mut c = live_b.client();
    assert_eq!(c.write(3 * CHUNK, &pattern(3, 65536), false).unwrap(), 0);
    assert_eq!(c.write(90 * CHUNK, &pattern(90, 4096), false).unwrap(), 0);
    drop(c);
    live_b.stop();
    let b_diverged = pair.path("b-diverged.img");
    std::fs::copy(&img_b, &b_diverged).unwrap();
    write_at(&src, 50 * CHUNK, &pattern(50, 65536));

    pair.sync(&src, "v", &[])
        .assert_fails(&["split brain", "--after-split-brain"]);
    assert_identical(&img_b, &b_diverged);
    let j = pair
        .sync(&src, "v", &["--after-split-brain", "discard-younger"])
        .ok()
        .clone();
    assert_eq!(j["mode"], "scan", "{j}");
    // Chunk 50 changed here; chunks 3 and 90 changed there.
    assert_eq!(num(&j, "chunks_sent"), 3, "{j}");
    assert_identical(&src, &img_b);
    let pts = points_list(pair.store(), "v");
    assert_eq!(pts.len(), 1, "{pts:?}");
    assert_eq!(pts[0]["kind"], "SplitBrain", "{pts:?}");
    let restored = pair.path("restored.img");
    restore_to(
        &pair.primary,
        &pair.server.to(),
        &pair.mirror,
        Some(num(&pts[0], "id")),
        &restored,
    );
    assert_identical(&restored, &b_diverged);
}

/// An asynchronous `replicate --on-disconnect continue` of a 32 MiB image
/// whose mirror was killed (-9) once in sync, the replica at that moment
/// copied to `before`, `writes` whole chunks written meanwhile, and the
/// mirror started again: its live resync is under way (or about to be).
struct MidResync {
    tmp: tempfile::TempDir,
    store_b: PathBuf,
    src: PathBuf,
    img: PathBuf,
    before: PathBuf,
    live: Live,
    serve_b: Server,
    client: nbd::NbdClient,
    /// The replica turned Inconsistent within 20 s.
    resync_began: bool,
}

impl MidResync {
    fn start(run: u64, image_seed: u64, writes: u64, extra: &[&str]) -> MidResync {
        let tmp = tempdir();
        let a = Node::new(tmp.path().join("a-id"));
        let b = Node::new(tmp.path().join("b-id"));
        let store_b = tmp.path().join("store-b");
        let src = tmp.path().join("a.img");
        random_image(&src, 32 * MIB, image_seed);
        // A short idle timeout: the primary notices the dead mirror quickly.
        let tuning = write_tuning(&tmp.path().join("tuning.toml"), 1000);
        let tuning = tuning.to_str().unwrap().to_string();
        let targs = ["--tuning", tuning.as_str()];
        let mut serve_b = Server::start(&b, &store_b, &[&a.fp], "127.0.0.1:0", &targs);
        let addr = serve_b.to();
        let mut args = vec!["--mode", "async", "--on-disconnect", "continue"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&targs);
        let live = Live::start(
            tmp.path(),
            &a,
            &b,
            &addr,
            &src,
            &tmp.path().join("state-a"),
            "v",
            &args,
        );
        let mut c = live.client();
        assert_eq!(c.write(0, &pattern(run, 65536), false).unwrap(), 0);
        live.wait_in_sync(Duration::from_secs(60));
        serve_b.guard.kill9();
        let img = store_b.join("v.img");
        let before = tmp.path().join("before.img");
        std::fs::copy(&img, &before).unwrap();
        for k in 0..writes {
            let ch = (k * 7 + run) % 512;
            assert_eq!(
                c.write(ch * CHUNK, &pattern(run * 1000 + k, 65536), false)
                    .unwrap(),
                0
            );
        }
        c.flush().unwrap();
        let serve_b = Server::start(&b, &store_b, &[&a.fp], &addr, &targs);
        let resync_began = wait_until(Duration::from_secs(20), || {
            meta_state(&store_b, "v") == "Inconsistent"
        });
        MidResync {
            tmp,
            store_b,
            src,
            img,
            before,
            live,
            serve_b,
            client: c,
            resync_began,
        }
    }
}

/// kill -9 of the mirror in the middle of a live resync (after a
/// disconnect), several times at random points: promoting it yields the
/// state it held before the resync (rolled back) or the primary's final
/// state, never a mixture.
#[test]
fn promote_after_a_crash_mid_live_resync_is_never_a_mixture() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(77);
    let mut rolled_back = 0;
    let mut undone_chunks = 0u64;
    for run in 0..6u64 {
        let MidResync {
            tmp,
            store_b,
            src,
            img,
            before,
            mut live,
            mut serve_b,
            ..
        } = MidResync::start(run, 100 + run, 400, &[]);
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..40)));
        serve_b.guard.kill9();
        live.guard.kill9();
        let out = promote_cmd(&store_b, "v", &tmp.path().join("state-b"), &[]);
        assert_eq!(out.code, 0, "run {run}: promote: {}", out.stderr);
        let got = std::fs::read(&img).unwrap();
        if got == std::fs::read(&before).unwrap() {
            rolled_back += 1;
            // "rolled back N chunks"
            if let Some(n) = out
                .stderr
                .split("rolled back ")
                .nth(1)
                .and_then(|t| t.split(' ').next())
                .and_then(|n| n.parse::<u64>().ok())
            {
                undone_chunks += n;
            }
        } else {
            assert!(
                got == std::fs::read(&src).unwrap(),
                "run {run}: the promoted replica is neither the state before the resync nor after it; promote said: {}",
                out.stderr
            );
        }
    }
    eprintln!("rolled back {rolled_back} of 6 ({undone_chunks} chunks undone)");
    assert!(
        rolled_back >= 2,
        "only {rolled_back} of 6 runs were killed mid-resync"
    );
    assert!(
        undone_chunks > 0,
        "no run was killed after the resync overwrote a chunk"
    );
}

/// The same with an application writing during the resync: small writes
/// and zero ranges that arrive while the mirror resyncs (slowed by
/// `--resync-rate`) are held with the resync chunks so that their undo
/// records share an fsync (the mirror's status counts them). kill -9 of
/// both sides mid-resync, then promote: the replica is exactly the state
/// before the resync, so every held write's old contents were saved
/// before it was applied.
#[test]
fn promote_after_a_crash_mid_resync_with_writes_rolls_back_the_writes_too() {
    use rand::{Rng, SeedableRng};
    for run in 0..2u64 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(500 + run);
        // 300 chunks of 64 KiB at 2 MiB/s: about 9 s.
        let MidResync {
            tmp,
            store_b,
            img,
            before,
            mut live,
            mut serve_b,
            client: mut c,
            resync_began,
            ..
        } = MidResync::start(run, 200 + run, 300, &["--resync-rate", "2M"]);
        assert!(resync_began, "run {run}: no resync began");
        // The application writes meanwhile: 4 KiB writes and 8 KiB zero
        // ranges anywhere, in chunks the resync has sent or not.
        for k in 0..150u64 {
            let off = rng.gen_range(0..(32 * MIB / 4096)) * 4096;
            if k % 5 == 4 && off + 8192 <= 32 * MIB {
                assert_eq!(c.zero(off, 8192).unwrap(), 0);
            } else {
                assert_eq!(
                    c.write(off, &pattern(run * 7000 + k, 4096), false).unwrap(),
                    0
                );
            }
        }
        let mut st = serde_json::Value::Null;
        let held = wait_until(Duration::from_secs(5), || {
            let out = run_cmd(&[
                "status",
                "--store",
                store_b.to_str().unwrap(),
                "--volume",
                "v",
                "--json",
            ]);
            st = serde_json::from_str::<serde_json::Value>(&out.stdout)
                .map(|v| v[0].clone())
                .unwrap_or_default();
            st["writes_held"].as_u64().unwrap_or(0) > 0
        });
        assert!(held, "run {run}: the mirror held no write: {st}");
        assert_eq!(
            meta_state(&store_b, "v"),
            "Inconsistent",
            "run {run}: resync over too soon"
        );
        serve_b.guard.kill9();
        live.guard.kill9();
        let out = promote_cmd(&store_b, "v", &tmp.path().join("state-b"), &[]);
        assert_eq!(out.code, 0, "run {run}: promote: {}", out.stderr);
        assert!(
            std::fs::read(&img).unwrap() == std::fs::read(&before).unwrap(),
            "run {run}: the promoted replica is not the state before the resync; promote said: {}",
            out.stderr
        );
    }
}
