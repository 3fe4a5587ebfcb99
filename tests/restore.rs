//! `blkmirror restore` with real processes: a `blkmirror serve` child, syncs
//! into it, then restores of the replica and of recovery points onto image
//! files, compared byte for byte.

mod common;

use std::path::{Path, PathBuf};

use common::*;

const CHUNK: u64 = 64 * 1024;

/// Run `restore` against the pair's mirror as the pair's primary identity.
fn restore(p: &Pair, volume: &str, target: &Path, extra: &[&str]) -> SyncOut {
    restore_as(p, &p.primary, &p.mirror.fp, volume, target, extra)
}

fn restore_as(
    p: &Pair,
    identity: &Node,
    peer: &str,
    volume: &str,
    target: &Path,
    extra: &[&str],
) -> SyncOut {
    let mut args: Vec<String> = vec![
        "restore".into(),
        target.to_str().expect("utf-8 path").into(),
        "--identity".into(),
        identity.dir_str().into(),
        "--from".into(),
        p.server.to(),
        "--peer".into(),
        peer.into(),
        "--volume".into(),
        volume.into(),
        "--json".into(),
        "--no-progress".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    run_sync_args(&args, SYNC_TIMEOUT)
}

/// The JSON report of a successful restore.
fn ok(r: &SyncOut) -> serde_json::Value {
    assert_eq!(
        r.code, 0,
        "restore failed\nstdout: {}\nstderr: {}",
        r.stdout, r.stderr
    );
    r.json
        .clone()
        .unwrap_or_else(|| panic!("no JSON on stdout: {:?}", r.stdout))
}

/// Ids of the volume's recovery points of kind `kind`, oldest first (from
/// `NAME.points/index.toml`).
fn point_ids(store: &Path, volume: &str, kind: &str) -> Vec<u64> {
    let p = store.join(format!("{volume}.points")).join("index.toml");
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let v: toml::Value = toml::from_str(&text).expect("index.toml is TOML");
    v.get("points")
        .and_then(|p| p.as_array())
        .map(|a| {
            a.iter()
                .filter(|p| p["kind"].as_str() == Some(kind))
                .map(|p| match &p["id"] {
                    toml::Value::String(s) => u64::from_str_radix(s, 16).expect("hex id"),
                    toml::Value::Integer(i) => *i as u64,
                    other => panic!("point id {other:?}"),
                })
                .collect()
        })
        .unwrap_or_default()
}

fn is_zero_chunk(path: &Path, index: u64) -> bool {
    read_at(path, index * CHUNK, CHUNK as usize)
        .iter()
        .all(|&b| b == 0)
}

fn copy(p: &Pair, from: &Path, name: &str) -> PathBuf {
    let to = p.path(name);
    std::fs::copy(from, &to).expect("copying an image");
    to
}

#[test]
fn full_restore_into_a_new_file_equals_the_replica() {
    let p = Pair::new();
    let src = p.path("disk.img");
    mixed_image(&src, 24, 11);
    p.sync(&src, "vol", &[]).ok();

    let target = p.path("restored.img");
    assert!(!target.exists());
    let j = ok(&restore(&p, "vol", &target, &[]));
    assert_eq!(j["volume"], "vol", "{j}");
    assert_eq!(num(&j, "point"), 0, "{j}");
    assert_eq!(j["mode"], "full", "{j}");
    let total = num(&j, "chunks_total");
    assert_eq!(total, 24 * MIB / CHUNK, "{j}");
    let sent = num(&j, "chunks_sent");
    let zero = num(&j, "chunks_zero");
    assert_eq!(sent + zero, total, "{j}");
    assert!(zero > 0, "a mixed image has zero chunks: {j}");
    assert!(sent > 0, "{j}");
    assert!(num(&j, "bytes_on_wire") > 0, "{j}");
    assert!(j["seconds"].as_f64().unwrap() > 0.0, "{j}");

    assert_eq!(file_len(&target), 24 * MIB);
    assert_identical(&src, &target);
    assert_identical(&p.img("vol"), &target);
    // Zero chunks were not written: the new file is sparse.
    assert!(
        allocated_bytes(&target) < 24 * MIB - zero * CHUNK / 2,
        "restored file allocates {} bytes for {zero} zero chunks",
        allocated_bytes(&target)
    );
    // Without --json: a summary on stderr, nothing on stdout.
    let again = p.path("restored-2.img");
    let mut args = vec![
        "restore",
        again.to_str().unwrap(),
        "--identity",
        p.primary.dir_str(),
        "--from",
    ];
    let to = p.server.to();
    args.push(&to);
    args.extend(["--peer", &p.mirror.fp, "--volume", "vol", "--no-progress"]);
    let out = run_cmd(&args);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.is_empty(), "{:?}", out.stdout);
    assert!(out.stderr.contains("restored"), "{}", out.stderr);
    assert_identical(&src, &again);
}

#[test]
fn differential_restore_sends_only_changed_chunks() {
    let p = Pair::new();
    let src = p.path("disk.img");
    mixed_image(&src, 16, 12);
    p.sync(&src, "vol", &[]).ok();
    let target = p.path("restored.img");
    ok(&restore(&p, "vol", &target, &[]));
    assert_identical(&src, &target);

    // Nothing changed: nothing sent.
    let j = ok(&restore(&p, "vol", &target, &[]));
    assert_eq!(j["mode"], "differential", "{j}");
    assert_eq!(num(&j, "chunks_sent"), 0, "{j}");
    assert_eq!(num(&j, "chunks_zero"), 0, "{j}");
    assert_identical(&src, &target);

    // Damage some data chunks and some zero chunks of the target.
    let chunks = 16 * MIB / CHUNK;
    let data: Vec<u64> = (0..chunks)
        .filter(|&i| !is_zero_chunk(&src, i))
        .step_by(17)
        .take(6)
        .collect();
    let zeros: Vec<u64> = (0..chunks)
        .filter(|&i| is_zero_chunk(&src, i))
        .step_by(13)
        .take(2)
        .collect();
    assert_eq!(data.len(), 6);
    assert_eq!(zeros.len(), 2, "a mixed image has zero chunks");
    for (k, &i) in data.iter().chain(&zeros).enumerate() {
        write_at(
            &target,
            i * CHUNK + 77 * k as u64,
            b"not what the mirror holds",
        );
    }
    let j = ok(&restore(&p, "vol", &target, &[]));
    assert_eq!(j["mode"], "differential", "{j}");
    assert_eq!(num(&j, "chunks_total"), chunks, "{j}");
    assert_eq!(num(&j, "chunks_sent"), data.len() as u64, "{j}");
    assert_eq!(num(&j, "chunks_zero"), zeros.len() as u64, "{j}");
    assert_identical(&src, &target);
    assert_identical(&p.img("vol"), &target);

    // A target of another size is resized; what it held still counts.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&target)
        .unwrap()
        .set_len(5 * MIB)
        .unwrap();
    let j = ok(&restore(&p, "vol", &target, &[]));
    assert_eq!(j["mode"], "differential", "{j}");
    let tail_data = (5 * MIB / CHUNK..chunks)
        .filter(|&i| !is_zero_chunk(&src, i))
        .count() as u64;
    assert_eq!(num(&j, "chunks_sent"), tail_data, "{j}");
    assert_eq!(num(&j, "chunks_zero"), 0, "{j}");
    assert_eq!(file_len(&target), 16 * MIB);
    assert_identical(&src, &target);

    let big = p.path("big.img");
    random_image(&big, 20 * MIB, 99);
    let j = ok(&restore(&p, "vol", &big, &[]));
    assert_eq!(j["mode"], "differential", "{j}");
    assert_eq!(file_len(&big), 16 * MIB);
    assert_identical(&src, &big);
}

#[test]
fn recovery_points_restore_each_state() {
    let p = Pair::with_server_args(&["--points-after-sync"]);
    let src = p.path("disk.img");
    mixed_image(&src, 8, 21);
    p.sync(&src, "vol", &[]).ok();
    let a = copy(&p, &src, "a.img");
    blkmirror::demo::change_chunks(&src, CHUNK, 0.1, 22).unwrap();
    // A chunk that held data becomes zeros in B.
    let gone = (0..8 * MIB / CHUNK)
        .find(|&i| !is_zero_chunk(&a, i))
        .unwrap();
    write_at(&src, gone * CHUNK, &vec![0u8; CHUNK as usize]);
    p.sync(&src, "vol", &[]).ok();
    let b = copy(&p, &src, "b.img");
    blkmirror::demo::change_chunks(&src, CHUNK, 0.1, 23).unwrap();
    p.sync(&src, "vol", &[]).ok();
    let c = copy(&p, &src, "c.img");
    assert!(
        blkmirror::demo::first_difference(&a, &b).unwrap().is_some()
            && blkmirror::demo::first_difference(&b, &c).unwrap().is_some()
    );

    let auto = point_ids(p.store(), "vol", "Auto");
    assert_eq!(auto.len(), 3, "one point per sync: {auto:?}");
    let (pa, pb) = (auto[0].to_string(), auto[1].to_string());

    let ra = p.path("ra.img");
    let j = ok(&restore(&p, "vol", &ra, &["--point", &pa]));
    assert_eq!(num(&j, "point"), auto[0], "{j}");
    assert_eq!(j["mode"], "full", "{j}");
    assert_identical(&a, &ra);

    let rb = p.path("rb.img");
    ok(&restore(&p, "vol", &rb, &["--point", &pb]));
    assert_identical(&b, &rb);

    let rc = p.path("rc.img");
    let j = ok(&restore(&p, "vol", &rc, &[]));
    assert_eq!(num(&j, "point"), 0, "{j}");
    assert_identical(&c, &rc);

    // The newest point equals the replica.
    let rn = p.path("rn.img");
    ok(&restore(&p, "vol", &rn, &["--point", &auto[2].to_string()]));
    assert_identical(&c, &rn);

    // Differential between points: A's file becomes B, then C, then A again.
    let j = ok(&restore(&p, "vol", &ra, &["--point", &pb]));
    assert_eq!(j["mode"], "differential", "{j}");
    let ab = (0..8 * MIB / CHUNK)
        .filter(|&i| {
            read_at(&a, i * CHUNK, CHUNK as usize) != read_at(&b, i * CHUNK, CHUNK as usize)
        })
        .count() as u64;
    assert_eq!(num(&j, "chunks_sent") + num(&j, "chunks_zero"), ab, "{j}");
    assert!(
        num(&j, "chunks_zero") >= 1,
        "chunk {gone} became zeros: {j}"
    );
    assert_identical(&b, &ra);
    ok(&restore(&p, "vol", &ra, &[]));
    assert_identical(&c, &ra);
    ok(&restore(&p, "vol", &ra, &["--point", &pa]));
    assert_identical(&a, &ra);
    // Restores read only: the replica is still C.
    assert_identical(&c, &p.img("vol"));
    assert_eq!(p.state_of("vol"), "UpToDate");
}

#[test]
fn restore_refusals() {
    let p = Pair::with_server_args(&["--points-after-sync"]);
    let src = p.path("disk.img");
    random_image(&src, 2 * MIB, 31);
    p.sync(&src, "vol", &[]).ok();
    let auto = point_ids(p.store(), "vol", "Auto");
    assert_eq!(auto.len(), 1);
    let target = p.path("t.img");

    // Unknown volume: refused, nothing created on either side.
    let before = dir_names(p.store());
    let r = restore(&p, "nope", &target, &[]);
    r.assert_fails(&["nope", "does not exist"]);
    assert_eq!(dir_names(p.store()), before);
    assert!(!target.exists(), "a refused restore created the target");

    // Unknown point: the error lists the points there are.
    let r = restore(&p, "vol", &target, &["--point", "99"]);
    r.assert_fails(&["no recovery point 99", &auto[0].to_string()]);
    assert!(!target.exists());

    // Wrong pinned fingerprint of the mirror.
    let other = Node::new(p.path("other-id"));
    let r = restore_as(&p, &p.primary, &other.fp, "vol", &target, &[]);
    r.assert_fails(&["pinned", &other.fp, &p.mirror.fp]);
    assert!(!target.exists());
    // A client the mirror does not allow.
    let r = restore_as(&p, &other, &p.mirror.fp, "vol", &target, &[]);
    r.assert_fails(&["allowed", &other.fp]);
    assert!(!target.exists());

    // Busy: a process holds the volume's lock.
    {
        let _held = hold_flock(&p.store().join("vol.lock"));
        restore(&p, "vol", &target, &[]).assert_fails(&["busy"]);
    }
    assert!(!target.exists());

    // An Inconsistent replica is not restored; its last consistent point is named.
    let meta_path = p.store().join("vol.meta");
    let text = std::fs::read_to_string(&meta_path).unwrap();
    assert!(text.contains("state = \"UpToDate\""), "{text}");
    let mut broken = text.replace("state = \"UpToDate\"", "state = \"Inconsistent\"");
    broken = broken
        .lines()
        .filter(|l| !l.starts_with("undo_point"))
        .collect::<Vec<_>>()
        .join("\n");
    broken.push_str(&format!("\nundo_point = {}\n", auto[0]));
    std::fs::write(&meta_path, &broken).unwrap();
    restore(&p, "vol", &target, &[])
        .assert_fails(&["Inconsistent", &format!("--point {}", auto[0])]);
    assert!(!target.exists());
    // The point itself is fine.
    ok(&restore(
        &p,
        "vol",
        &target,
        &["--point", &auto[0].to_string()],
    ));
    assert_identical(&src, &target);
    std::fs::write(&meta_path, &text).unwrap();

    // A target that is neither a file nor a block device.
    let dir = p.path("a-dir");
    std::fs::create_dir(&dir).unwrap();
    restore(&p, "vol", &dir, &[]).assert_fails(&["a-dir"]);
    // A target in a missing directory.
    let nowhere = p.path("missing-dir/t.img");
    restore(&p, "vol", &nowhere, &[]).assert_fails(&["missing-dir"]);
}

/// Root only: restores onto loop devices. One smaller than the volume is
/// refused before anything is written; a larger one receives the volume in
/// its first bytes (a differential restore: the device is read first).
#[test]
fn restore_onto_block_devices() {
    const T: &str = "restore_onto_block_devices";
    if !is_root() {
        skip(T, "needs root");
        return;
    }
    if sh("losetup", &["--version"]).is_err() {
        skip(T, "losetup is missing");
        return;
    }
    let p = Pair::new();
    let src = p.path("disk.img");
    mixed_image(&src, 8, 41);
    p.sync(&src, "vol", &[]).ok();

    let small_file = p.path("small.img");
    random_image(&small_file, 4 * MIB, 42);
    let big_file = p.path("big.img");
    random_image(&big_file, 12 * MIB, 43);
    let (small, big) = match (LoopDev::attach(&small_file), LoopDev::attach(&big_file)) {
        (Ok(s), Ok(b)) => (s, b),
        (Err(e), _) | (_, Err(e)) => {
            skip(T, &format!("cannot attach a loop device: {e}"));
            return;
        }
    };
    let before = std::fs::read(&small_file).unwrap();
    restore(&p, "vol", &small.dev, &[]).assert_fails(&["too small", small.path_str()]);
    assert_eq!(
        std::fs::read(&small_file).unwrap(),
        before,
        "the small device was written"
    );

    let j = ok(&restore(&p, "vol", &big.dev, &[]));
    assert_eq!(j["mode"], "differential", "{j}");
    assert_eq!(num(&j, "chunks_total"), 8 * MIB / CHUNK, "{j}");
    assert_prefix_identical(&src, &big.dev, 8 * MIB);
    // Again: nothing to send.
    let j = ok(&restore(&p, "vol", &big.dev, &[]));
    assert_eq!(num(&j, "chunks_sent") + num(&j, "chunks_zero"), 0, "{j}");
    drop(big);
    drop(small);
    assert_prefix_identical(&src, &big_file, 8 * MIB);
    assert_eq!(file_len(&big_file), 12 * MIB);
}
