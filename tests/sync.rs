//! Integration tests with real processes: a `blkmirror serve` child and
//! `blkmirror sync` children on image files, over loopback QUIC.

mod common;

use std::time::{Duration, Instant};

use common::*;

const CHUNK: u64 = 64 * 1024;

// -------------------------------------------------------------------------------------------
// Identities
// -------------------------------------------------------------------------------------------

#[test]
fn init_and_fingerprint() {
    let tmp = tempdir();
    let a = tmp.path().join("a");
    let out = run_cmd(&["init", a.to_str().unwrap()]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.stdout.lines().count(), 1, "one line: {:?}", out.stdout);
    let fp = out.stdout.trim();
    assert!(is_fingerprint(fp), "{fp:?}");
    assert!(a.join("cert.pem").is_file() && a.join("key.pem").is_file());

    // `fingerprint` prints the same value, every time.
    for _ in 0..2 {
        let f = run_cmd(&["fingerprint", a.to_str().unwrap()]);
        assert_eq!(f.code, 0, "{}", f.stderr);
        assert_eq!(f.stdout, out.stdout);
    }

    // Another identity has another fingerprint.
    let b = Node::new(tmp.path().join("b"));
    assert_ne!(b.fp, fp);

    // init refuses a directory that already holds keys, and leaves them alone.
    let cert_before = std::fs::read(a.join("cert.pem")).unwrap();
    let key_before = std::fs::read(a.join("key.pem")).unwrap();
    let again = run_cmd(&["init", a.to_str().unwrap()]);
    again.assert_fails(1, &["exist"]);
    assert!(again.stdout.is_empty(), "{:?}", again.stdout);
    assert_eq!(std::fs::read(a.join("cert.pem")).unwrap(), cert_before);
    assert_eq!(std::fs::read(a.join("key.pem")).unwrap(), key_before);
    let f = run_cmd(&["fingerprint", a.to_str().unwrap()]);
    assert_eq!(f.stdout.trim(), fp);

    // fingerprint of a directory without an identity fails cleanly.
    let missing = tmp.path().join("nothing-here");
    run_cmd(&["fingerprint", missing.to_str().unwrap()]).assert_fails(1, &["nothing-here"]);
}

// -------------------------------------------------------------------------------------------
// Full, differential and checksum syncs
// -------------------------------------------------------------------------------------------

#[test]
fn full_sync_of_mixed_image() {
    let p = Pair::new();
    let src = p.path("disk.img");
    mixed_image(&src, 48, 1);
    let r = p.sync(&src, "vol1", &[]);
    let j = r.ok();
    assert_eq!(j["volume"], "vol1");
    assert_eq!(j["mode"], "full");
    assert_eq!(num(j, "chunk_bytes"), CHUNK);
    assert_eq!(num(j, "volume_bytes"), 48 * MIB);
    let total = num(j, "chunks_total");
    assert_eq!(total, 48 * MIB / CHUNK);
    let sent = num(j, "chunks_sent");
    let zero = num(j, "chunks_zero");
    assert!(zero > 0, "a mixed image has holes: {j}");
    assert!(sent > 0, "{j}");
    // A first sync accounts for every chunk: data or zero marker.
    assert_eq!(sent + zero, total, "{j}");
    assert!(num(j, "bytes_read") <= 48 * MIB, "{j}");
    assert!(num(j, "bytes_on_wire") > 0, "{j}");
    assert!(j["seconds"].as_f64().unwrap() > 0.0, "{j}");
    assert!(!j["engine"].as_str().unwrap().is_empty(), "{j}");

    let img = p.img("vol1");
    assert_identical(&src, &img);
    assert_eq!(file_len(&img), 48 * MIB);
    // Zero chunks were elided: the replica is sparse.
    assert!(
        allocated_bytes(&img) < 48 * MIB - zero * CHUNK / 2,
        "replica allocates {} bytes for {zero} zero chunks",
        allocated_bytes(&img)
    );

    let meta = p.meta("vol1");
    assert_eq!(meta["state"].as_str(), Some("UpToDate"));
    assert_eq!(meta["volume_bytes"].as_integer(), Some((48 * MIB) as i64));
    assert_eq!(meta["chunk_bytes"].as_integer(), Some(CHUNK as i64));
    assert_ne!(generation(&meta), 0);
    assert_eq!(meta["last_primary"].as_str(), Some(p.primary.fp.as_str()));
    // The replica records the primary's source lineage.
    let st = read_primary_state(&p.state, "vol1");
    assert_eq!(meta["source_id"].as_str(), st["source_id"].as_str());
    assert!(p.store().join("vol1.digests").is_file());
}

/// The sync writes the replica through the mirror's page cache; once it is
/// durable and UpToDate the mirror drops those pages, so later small live
/// writes do not pay for what a sync left cached (README, "The replica's
/// page cache after a sync").
#[test]
fn full_sync_leaves_the_replica_out_of_the_page_cache() {
    let p = Pair::new();
    let src = p.path("disk.img");
    random_image(&src, 32 * MIB, 7);
    p.sync(&src, "vol1", &[]).ok();
    let img = p.img("vol1");
    // Counted before anything reads the replica (the comparison below does).
    let Some(resident) =
        resident_or_skip("full_sync_leaves_the_replica_out_of_the_page_cache", &img)
    else {
        return;
    };
    assert!(
        resident < MIB,
        "{resident} bytes of the 32 MiB replica are still cached after the sync"
    );
    assert_identical(&src, &img);
    // A later sync (here a scan: the write bypassed the primary's
    // tracking) drops what it wrote too.
    write_at(&src, 5 * MIB, &[0x5a; 200_000]);
    let j = p.sync(&src, "vol1", &[]).ok().clone();
    assert_eq!(j["mode"], "scan", "{j}");
    assert_eq!(num(&j, "chunks_sent"), 4, "{j}");
    let resident = resident_bytes(&img).unwrap_or(0);
    assert!(
        resident < 256 * 1024,
        "{resident} bytes of the replica are cached after the scan sync"
    );
    assert_identical(&src, &img);
}

#[test]
fn differential_sync_sends_only_changed_chunks() {
    let p = Pair::new();
    let src = p.path("disk.img");
    mixed_image(&src, 32, 2);
    p.sync(&src, "v", &[]).ok();
    let gen1 = generation(&p.meta("v"));

    let changed = blkmirror::demo::change_chunks(&src, CHUNK, 0.03, 99).unwrap();
    assert!(changed >= 10);
    let r = p.sync(&src, "v", &[]);
    let j = r.ok();
    assert_eq!(j["mode"], "scan", "{j}");
    assert_eq!(num(j, "chunks_sent"), changed, "{j}");
    assert_eq!(num(j, "chunks_zero"), 0, "{j}");
    assert!(num(j, "bytes_read") <= 32 * MIB, "{j}");
    assert_identical(&src, &p.img("v"));
    assert_eq!(p.state_of("v"), "UpToDate");
    assert_ne!(
        generation(&p.meta("v")),
        gen1,
        "a sync sets a new generation"
    );

    // Nothing changed: nothing sent.
    let j = p.sync(&src, "v", &[]).ok().clone();
    assert_eq!(j["mode"], "scan", "{j}");
    assert_eq!(num(&j, "chunks_sent"), 0, "{j}");
    assert_eq!(num(&j, "chunks_zero"), 0, "{j}");
    assert!(num(&j, "bytes_on_wire") < MIB, "{j}");
    assert_identical(&src, &p.img("v"));
}

#[test]
fn differential_sync_replicates_zeroed_chunks() {
    let p = Pair::new();
    let src = p.path("disk.img");
    random_image(&src, 16 * MIB, 3);
    p.sync(&src, "v", &[]).ok();
    // Chunk 5 becomes zeros (written, not a hole), chunk 9 changes.
    write_at(&src, 5 * CHUNK, &vec![0u8; CHUNK as usize]);
    write_at(&src, 9 * CHUNK + 100, b"changed");
    let j = p.sync(&src, "v", &[]).ok().clone();
    assert_eq!(j["mode"], "scan");
    assert_eq!(num(&j, "chunks_sent"), 1, "{j}");
    assert_eq!(num(&j, "chunks_zero"), 1, "{j}");
    assert_identical(&src, &p.img("v"));
}

#[test]
fn checksum_sync_after_losing_primary_state() {
    let p = Pair::new();
    let src = p.path("disk.img");
    mixed_image(&src, 32, 4);
    p.sync(&src, "v", &[]).ok();
    std::fs::remove_dir_all(&p.state).unwrap();
    let changed = blkmirror::demo::change_chunks(&src, CHUNK, 0.01, 5).unwrap();
    assert!(changed >= 3);
    let j = p.sync(&src, "v", &["--checksum"]).ok().clone();
    assert_eq!(j["mode"], "checksum", "{j}");
    assert_eq!(num(&j, "chunks_sent"), changed, "{j}");
    assert_eq!(num(&j, "chunks_zero"), 0, "{j}");
    assert_identical(&src, &p.img("v"));
    assert_eq!(p.state_of("v"), "UpToDate");

    // The rebuilt state is trusted afterwards: a plain sync is a scan with nothing to send.
    let j = p.sync(&src, "v", &[]).ok().clone();
    assert_eq!(j["mode"], "scan", "{j}");
    assert_eq!(num(&j, "chunks_sent"), 0, "{j}");
}

#[test]
fn checksum_sync_adopts_a_preseeded_replica() {
    let tmp = tempdir();
    let primary = Node::new(tmp.path().join("p"));
    let mirror = Node::new(tmp.path().join("m"));
    let store = tmp.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    let src = tmp.path().join("disk.img");
    mixed_image(&src, 24, 6);
    // Seeded by other means: an exact copy, and a copy with 3 damaged chunks.
    std::fs::copy(&src, store.join("same.img")).unwrap();
    std::fs::copy(&src, store.join("damaged.img")).unwrap();
    let damaged = [0u64, 77, 383];
    for c in damaged {
        write_at(&store.join("damaged.img"), c * CHUNK + 10, b"garbage!");
    }
    let server = Server::start(&mirror, &store, &[&primary.fp], "127.0.0.1:0", &[]);
    let state = tmp.path().join("state");
    let sync = |vol: &str| {
        run_sync_args(
            &sync_args(
                &src,
                &primary,
                &server.to(),
                &mirror.fp,
                vol,
                &state,
                &["--checksum"],
            ),
            SYNC_TIMEOUT,
        )
    };
    let j = sync("same").ok().clone();
    assert_eq!(j["mode"], "checksum");
    assert_eq!(num(&j, "chunks_sent"), 0, "{j}");
    assert_eq!(num(&j, "chunks_zero"), 0, "{j}");
    assert_identical(&src, &store.join("same.img"));
    assert_eq!(meta_state(&store, "same"), "UpToDate");

    // Damaged chunks that are zeros in the source are repaired with zero markers.
    let zero_in_source = damaged
        .iter()
        .filter(|&&c| {
            read_at(&src, c * CHUNK, CHUNK as usize)
                .iter()
                .all(|&b| b == 0)
        })
        .count() as u64;
    let j = sync("damaged").ok().clone();
    assert_eq!(num(&j, "chunks_sent"), 3 - zero_in_source, "{j}");
    assert_eq!(num(&j, "chunks_zero"), zero_in_source, "{j}");
    assert_identical(&src, &store.join("damaged.img"));
    assert_eq!(meta_state(&store, "damaged"), "UpToDate");
}

#[test]
fn adopted_replica_gets_a_full_sync() {
    // An adopted image is never trusted by a plain sync: its first sync is full.
    let tmp = tempdir();
    let primary = Node::new(tmp.path().join("p"));
    let mirror = Node::new(tmp.path().join("m"));
    let store = tmp.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    let src = tmp.path().join("disk.img");
    random_image(&src, 8 * MIB, 7);
    // A stale copy: different contents, same size.
    random_image(&store.join("v.img"), 8 * MIB, 8);
    let server = Server::start(&mirror, &store, &[&primary.fp], "127.0.0.1:0", &[]);
    let state = tmp.path().join("state");
    let r = run_sync_args(
        &sync_args(&src, &primary, &server.to(), &mirror.fp, "v", &state, &[]),
        SYNC_TIMEOUT,
    );
    let j = r.ok();
    assert_eq!(j["mode"], "full", "{j}");
    assert_eq!(num(j, "chunks_sent"), 128, "{j}");
    assert_identical(&src, &store.join("v.img"));
}

#[test]
fn full_flag_resends_everything() {
    let p = Pair::new();
    let src = p.path("disk.img");
    mixed_image(&src, 16, 9);
    p.sync(&src, "v", &[]).ok();
    let j = p.sync(&src, "v", &["--full"]).ok().clone();
    assert_eq!(j["mode"], "full");
    assert_eq!(
        num(&j, "chunks_sent") + num(&j, "chunks_zero"),
        num(&j, "chunks_total"),
        "{j}"
    );
    assert!(num(&j, "chunks_sent") > 0);
    assert_identical(&src, &p.img("v"));
    // The two modes exclude each other (a usage error).
    let r = p.sync(&src, "v", &["--full", "--checksum"]);
    r.as_cmd().assert_fails(2, &["--checksum"]);
}

#[test]
fn lost_mirror_store_triggers_a_full_sync() {
    let p = Pair::new();
    let src = p.path("disk.img");
    mixed_image(&src, 16, 10);
    p.sync(&src, "v", &[]).ok();
    for ext in ["img", "meta", "digests"] {
        std::fs::remove_file(p.store().join(format!("v.{ext}"))).unwrap();
    }
    let j = p.sync(&src, "v", &[]).ok().clone();
    assert_eq!(j["mode"], "full", "a new replica must get everything: {j}");
    assert_eq!(
        num(&j, "chunks_sent") + num(&j, "chunks_zero"),
        num(&j, "chunks_total")
    );
    assert_identical(&src, &p.img("v"));
}

#[test]
fn tampered_replica_is_repaired_by_checksum() {
    let p = Pair::new();
    let src = p.path("disk.img");
    random_image(&src, 8 * MIB, 11);
    p.sync(&src, "v", &[]).ok();
    write_at(&p.img("v"), 3 * CHUNK, b"bitrot");
    let j = p.sync(&src, "v", &["--checksum"]).ok().clone();
    assert_eq!(num(&j, "chunks_sent"), 1, "{j}");
    assert_identical(&src, &p.img("v"));
}

// -------------------------------------------------------------------------------------------
// Geometry
// -------------------------------------------------------------------------------------------

#[test]
fn smallest_and_largest_chunk_sizes() {
    let p = Pair::new();
    let src = p.path("disk.img");
    mixed_image(&src, 16, 12);
    for (vol, cb) in [("small", 4096u64), ("large", 1 << 20)] {
        let j = p
            .sync(&src, vol, &["--chunk-size", &cb.to_string()])
            .ok()
            .clone();
        assert_eq!(num(&j, "chunk_bytes"), cb);
        assert_eq!(num(&j, "chunks_total"), 16 * MIB / cb);
        assert_eq!(
            num(&j, "chunks_sent") + num(&j, "chunks_zero"),
            16 * MIB / cb
        );
        assert_identical(&src, &p.img(vol));
        let meta = p.meta(vol);
        assert_eq!(meta["chunk_bytes"].as_integer(), Some(cb as i64));
        assert_eq!(meta["state"].as_str(), Some("UpToDate"));
    }
    // A change of a single 4 KiB block costs one small chunk.
    write_at(&src, 5 * MIB + 4096 * 3, b"x");
    let j = p
        .sync(&src, "small", &["--chunk-size", "4096"])
        .ok()
        .clone();
    assert_eq!(num(&j, "chunks_sent"), 1, "{j}");
    assert_identical(&src, &p.img("small"));
}

#[test]
fn invalid_chunk_sizes_are_refused() {
    let p = Pair::new();
    let src = p.path("disk.img");
    random_image(&src, 4 * MIB, 13);
    for cb in ["3000", "65537", "2097152", "2048", "0"] {
        let r = p.sync(&src, "v", &["--chunk-size", cb]);
        r.assert_fails(&[&format!("chunk size {cb}")]);
    }
    assert!(
        !p.img("v").exists() && !p.store().join("v.meta").exists(),
        "a refused sync created a replica: {:?}",
        dir_names(p.store())
    );
}

#[test]
fn chunk_size_change_needs_full() {
    let p = Pair::new();
    let src = p.path("disk.img");
    random_image(&src, 4 * MIB, 14);
    p.sync(&src, "v", &[]).ok();
    p.sync(&src, "v", &["--chunk-size", "8192"])
        .assert_fails(&["--full"]);
    assert_eq!(p.state_of("v"), "UpToDate");
    let j = p
        .sync(&src, "v", &["--chunk-size", "8192", "--full"])
        .ok()
        .clone();
    assert_eq!(num(&j, "chunk_bytes"), 8192);
    assert_identical(&src, &p.img("v"));
    assert_eq!(p.meta("v")["chunk_bytes"].as_integer(), Some(8192));
}

#[test]
fn too_many_chunks_are_refused_before_connecting() {
    // 8 TiB (sparse) in 4 KiB chunks: 2^31 chunks would need a 32 GiB digest map.
    let p = Pair::new();
    let src = p.path("huge.img");
    std::fs::File::create(&src)
        .unwrap()
        .set_len(8 << 40)
        .unwrap();
    let r = p.sync(&src, "huge", &["--chunk-size", "4096"]);
    r.assert_fails(&["--chunk-size"]);
    assert!(r.elapsed < Duration::from_secs(10), "{:?}", r.elapsed);
    assert!(
        dir_names(p.store()).is_empty(),
        "{:?}",
        dir_names(p.store())
    );
}

#[test]
fn short_last_chunk() {
    let p = Pair::new();
    let src = p.path("odd.img");
    let size = MIB + 4096;
    random_image(&src, size, 15);
    let j = p.sync(&src, "odd", &[]).ok().clone();
    assert_eq!(num(&j, "volume_bytes"), size);
    assert_eq!(num(&j, "chunks_total"), 17);
    assert_eq!(num(&j, "chunks_sent"), 17);
    assert_identical(&src, &p.img("odd"));
    assert_eq!(file_len(&p.img("odd")), size);

    // Change only the short last chunk.
    write_at(&src, MIB + 1000, b"tail change");
    let j = p.sync(&src, "odd", &[]).ok().clone();
    assert_eq!(j["mode"], "scan");
    assert_eq!(num(&j, "chunks_sent"), 1, "{j}");
    assert_identical(&src, &p.img("odd"));

    // And a zeroed short chunk travels as a zero marker.
    write_at(&src, MIB, &[0u8; 4096]);
    let j = p.sync(&src, "odd", &[]).ok().clone();
    assert_eq!(num(&j, "chunks_zero"), 1, "{j}");
    assert_eq!(num(&j, "chunks_sent"), 0, "{j}");
    assert_identical(&src, &p.img("odd"));
}

#[test]
fn volume_size_change_needs_resize() {
    let p = Pair::new();
    let src = p.path("disk.img");
    random_image(&src, 32 * MIB, 16);
    p.sync(&src, "v", &[]).ok();
    let big = p.path("big.img");
    random_image(&big, 48 * MIB, 17);

    // The primary's own state notices first.
    p.sync(&big, "v", &[]).assert_fails(&["--resize"]);
    // With a fresh primary state, the mirror refuses.
    let fresh_state = p.path("state2");
    let args = sync_args(
        &big,
        &p.primary,
        &p.server.to(),
        &p.mirror.fp,
        "v",
        &fresh_state,
        &[],
    );
    run_sync_args(&args, SYNC_TIMEOUT).assert_fails(&["--resize"]);
    // Neither refusal touched the replica.
    assert_eq!(p.state_of("v"), "UpToDate");
    assert_eq!(p.meta("v")["volume_bytes"].as_integer(), Some(32 << 20));
    assert_identical(&src, &p.img("v"));

    // Grow.
    let j = p.sync(&big, "v", &["--resize"]).ok().clone();
    assert_eq!(num(&j, "volume_bytes"), 48 * MIB);
    assert_eq!(file_len(&p.img("v")), 48 * MIB);
    assert_identical(&big, &p.img("v"));
    assert_eq!(p.meta("v")["volume_bytes"].as_integer(), Some(48 << 20));
    assert_eq!(p.state_of("v"), "UpToDate");

    // Shrink.
    let small = p.path("small.img");
    random_image(&small, 16 * MIB, 18);
    p.sync(&small, "v", &[]).assert_fails(&["--resize"]);
    p.sync(&small, "v", &["--resize"]).ok();
    assert_eq!(file_len(&p.img("v")), 16 * MIB);
    assert_identical(&small, &p.img("v"));
}

// -------------------------------------------------------------------------------------------
// Refusals
// -------------------------------------------------------------------------------------------

#[test]
fn unreachable_mirror_fails_quickly() {
    let tmp = tempdir();
    let primary = Node::new(tmp.path().join("p"));
    let other = Node::new(tmp.path().join("m"));
    let src = tmp.path().join("disk.img");
    random_image(&src, MIB, 19);
    let dead = dead_udp_addr();
    let t = Instant::now();
    let r = run_sync_args(
        &sync_args(
            &src,
            &primary,
            &dead.to_string(),
            &other.fp,
            "v",
            &tmp.path().join("state"),
            &[],
        ),
        Duration::from_secs(30),
    );
    r.assert_fails(&[&dead.to_string()]);
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t.elapsed()
    );
}

#[test]
fn wrong_pinned_fingerprint_is_refused() {
    let p = Pair::new();
    let impostor = Node::new(p.path("other-id"));
    let src = p.path("disk.img");
    random_image(&src, MIB, 20);
    let args = sync_args(
        &src,
        &p.primary,
        &p.server.to(),
        &impostor.fp,
        "v",
        &p.state,
        &[],
    );
    let r = run_sync_args(&args, SYNC_TIMEOUT);
    // Names what was pinned and what was presented.
    r.assert_fails(&["pinned", &impostor.fp, &p.mirror.fp]);
    assert!(r.elapsed < Duration::from_secs(10));
    assert!(dir_names(p.store()).iter().all(|n| !n.starts_with("v.")));
}

#[test]
fn client_not_in_allow_list_is_refused() {
    let p = Pair::new();
    let stranger = Node::new(p.path("stranger-id"));
    let src = p.path("disk.img");
    random_image(&src, MIB, 21);
    let args = sync_args(
        &src,
        &stranger,
        &p.server.to(),
        &p.mirror.fp,
        "v",
        &p.state,
        &[],
    );
    let r = run_sync_args(&args, SYNC_TIMEOUT);
    r.assert_fails(&["allowed", &stranger.fp]);
    assert!(r.elapsed < Duration::from_secs(10));
    assert!(dir_names(p.store()).iter().all(|n| !n.starts_with("v.")));
    // The server is still fine for the allowed primary.
    p.sync(&src, "v", &[]).ok();
    assert_identical(&src, &p.img("v"));
}

#[test]
fn malformed_fingerprints_are_usage_errors() {
    let tmp = tempdir();
    let id = Node::new(tmp.path().join("id"));
    let src = tmp.path().join("disk.img");
    random_image(&src, MIB, 22);
    let state = tmp.path().join("state");
    let short = format!("sha256:{}", "a".repeat(63));
    let nonhex = format!("sha256:{}", "g".repeat(64));
    let noprefix = "b".repeat(64);
    for bad in [
        short.as_str(),
        nonhex.as_str(),
        noprefix.as_str(),
        "",
        "md5:00",
    ] {
        let r = run_sync_args(
            &sync_args(&src, &id, "127.0.0.1:9", bad, "v", &state, &[]),
            SYNC_TIMEOUT,
        );
        assert_eq!(r.code, 2, "--peer {bad:?}: {}", r.stderr);
        assert!(r.stderr.contains("fingerprint"), "{}", r.stderr);
        assert!(!r.stderr.contains("panicked"));
    }
    let store = tmp.path().join("store");
    let out = run_cmd(&[
        "serve",
        "--identity",
        id.dir_str(),
        "--listen",
        "127.0.0.1:0",
        "--store",
        store.to_str().unwrap(),
        "--allow",
        "sha256:1234",
    ]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("fingerprint"), "{}", out.stderr);
    // serve without any --allow is a usage error too.
    let out = run_cmd(&[
        "serve",
        "--identity",
        id.dir_str(),
        "--listen",
        "127.0.0.1:0",
        "--store",
        store.to_str().unwrap(),
    ]);
    assert_eq!(out.code, 2, "{}", out.stderr);
}

#[test]
fn bad_sources_are_refused() {
    let p = Pair::new();
    let missing = p.path("no-such.img");
    p.sync(&missing, "v", &[]).assert_fails(&["no-such.img"]);
    let dir = p.path("a-directory");
    std::fs::create_dir(&dir).unwrap();
    p.sync(&dir, "v", &[]).assert_fails(&["a-directory"]);
    let empty = p.path("empty.img");
    std::fs::File::create(&empty).unwrap();
    p.sync(&empty, "v", &[]).assert_fails(&["empty"]);
    let odd = p.path("odd.img");
    std::fs::write(&odd, vec![1u8; 1000]).unwrap();
    p.sync(&odd, "v", &[]).assert_fails(&["512"]);
    if !is_root() {
        use std::os::unix::fs::PermissionsExt;
        let locked = p.path("locked.img");
        random_image(&locked, MIB, 23);
        std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o000)).unwrap();
        p.sync(&locked, "v", &[]).assert_fails(&["locked.img"]);
    }
    assert!(
        dir_names(p.store()).is_empty(),
        "{:?}",
        dir_names(p.store())
    );
}

#[test]
fn invalid_volume_names_are_refused() {
    let p = Pair::new();
    let src = p.path("disk.img");
    random_image(&src, MIB, 24);
    let long = "x".repeat(65);
    for name in ["../x", ".hidden", long.as_str(), "a/b", "", "sp ace", "é"] {
        let r = p.sync(&src, name, &[]);
        r.assert_fails(&["volume name"]);
    }
    assert!(dir_names(p.store()).is_empty());
    assert!(!p.path("x.img").exists() && !p.path("x.meta").exists());
    // 64 characters is fine.
    let ok = "y".repeat(64);
    p.sync(&src, &ok, &[]).ok();
    assert_identical(&src, &p.img(&ok));
}

#[test]
fn busy_volumes_are_refused() {
    let p = Pair::new();
    let src = p.path("disk.img");
    random_image(&src, MIB, 25);
    // Another process holds the primary's state lock.
    {
        let _held = hold_flock(&p.state.join("v").join("lock"));
        p.sync(&src, "v", &[]).assert_fails(&["busy"]);
    }
    // Another process holds the mirror's volume lock.
    {
        let _held = hold_flock(&p.store().join("v.lock"));
        p.sync(&src, "v", &[]).assert_fails(&["busy"]);
        assert_ne!(p.state_of("v"), "UpToDate");
    }
    p.sync(&src, "v", &[]).ok();
    assert_identical(&src, &p.img("v"));
}

/// Overwrite whole chunks `idx` with fresh random bytes.
fn scribble_chunks(path: &std::path::Path, idx: &[u64], seed: u8) {
    for &c in idx {
        let data: Vec<u8> = (0..CHUNK)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed ^ (c as u8))
            .collect();
        write_at(path, c * CHUNK, &data);
    }
}

#[test]
fn two_mirrors_each_get_every_change() {
    // One primary state, two mirrors: the per-peer bitmap must remember what
    // each mirror has missed.
    let p = Pair::new();
    let m2 = Node::new(p.path("mirror2-id"));
    let store2 = p.path("store2");
    let server2 = Server::start(&m2, &store2, &[&p.primary.fp], "127.0.0.1:0", &[]);
    let to_b = |src: &std::path::Path| {
        run_sync_args(
            &sync_args(src, &p.primary, &server2.to(), &m2.fp, "v", &p.state, &[]),
            SYNC_TIMEOUT,
        )
    };
    let src = p.path("disk.img");
    random_image(&src, 4 * MIB, 32);

    p.sync(&src, "v", &[]).ok(); // A: full
    scribble_chunks(&src, &[3, 10, 20], 1);
    let j = to_b(&src).ok().clone(); // B: first contact, full
    assert_eq!(j["mode"], "full");
    assert_eq!(num(&j, "chunks_sent"), 64);
    scribble_chunks(&src, &[10, 30, 40, 41], 2);
    // A missed both rounds: {3, 10, 20} and {10, 30, 40, 41}.
    let j = p.sync(&src, "v", &[]).ok().clone();
    assert_eq!(j["mode"], "scan");
    assert_eq!(num(&j, "chunks_sent"), 6, "{j}");
    assert_identical(&src, &p.img("v"));
    // B missed only the second round.
    let j = to_b(&src).ok().clone();
    assert_eq!(j["mode"], "scan");
    assert_eq!(num(&j, "chunks_sent"), 4, "{j}");
    assert_identical(&src, &store2.join("v.img"));
    // Both up to date: nothing more for either.
    assert_eq!(num(p.sync(&src, "v", &[]).ok(), "chunks_sent"), 0);
    assert_eq!(num(to_b(&src).ok(), "chunks_sent"), 0);
}

#[test]
fn damaged_metadata_is_reported_and_repairable() {
    let mut p = Pair::new();
    let src = p.path("disk.img");
    mixed_image(&src, 8, 31);
    p.sync(&src, "v", &[]).ok();

    // The mirror's digest map is damaged: a plain sync cannot prove the
    // replica, says so, and leaves it Inconsistent; --checksum repairs.
    let digests = p.store().join("v.digests");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&digests)
        .unwrap()
        .set_len(100)
        .unwrap();
    p.sync(&src, "v", &[]).assert_fails(&["--checksum"]);
    assert_eq!(p.state_of("v"), "Inconsistent");
    let j = p.sync(&src, "v", &["--checksum"]).ok().clone();
    assert_eq!(num(&j, "chunks_sent"), 0, "{j}");
    assert_eq!(p.state_of("v"), "UpToDate");
    assert_identical(&src, &p.img("v"));

    // The primary's digest map is damaged: the message says what to do,
    // and doing it works.
    let pd = p.state.join("v").join("digests");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&pd)
        .unwrap()
        .set_len(100)
        .unwrap();
    p.sync(&src, "v", &[])
        .assert_fails(&["--checksum", p.state.join("v").to_str().unwrap()]);
    std::fs::remove_dir_all(p.state.join("v")).unwrap();
    p.sync(&src, "v", &["--checksum"]).ok();
    assert_identical(&src, &p.img("v"));

    // The mirror's meta is not TOML: refused with the file named; the
    // server keeps running.
    std::fs::write(p.store().join("v.meta"), "garbage = [\n").unwrap();
    p.sync(&src, "v", &[]).assert_fails(&["v.meta"]);
    p.server.assert_alive();
    p.sync(&src, "other", &[]).ok();
    assert_identical(&src, &p.img("other"));
}

#[test]
fn serve_startup_errors() {
    let p = Pair::new();
    let port_taken = p.server.to();
    let store = p.path("store-b");
    let serve = |listen: &str, store: &std::path::Path, identity: &str, extra: &[&str]| {
        let mut args = vec![
            "serve",
            "--identity",
            identity,
            "--listen",
            listen,
            "--store",
            store.to_str().unwrap(),
            "--allow",
            &p.primary.fp,
        ];
        args.extend_from_slice(extra);
        run_cmd(&args)
    };
    let base =
        |listen: &str, store: &std::path::Path, identity: &str| serve(listen, store, identity, &[]);
    // The UDP port is in use.
    base(&port_taken, &store, p.mirror.dir_str()).assert_fails(1, &[&port_taken]);
    // The store is a file.
    let file = p.path("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    base("127.0.0.1:0", &file, p.mirror.dir_str()).assert_fails(1, &["not-a-dir"]);
    // No identity.
    let missing = p.path("no-identity");
    base("127.0.0.1:0", &store, missing.to_str().unwrap()).assert_fails(1, &["no-identity"]);
    // A queue depth or commit interval out of range, or not a number.
    let serve_with = |extra: &[&str]| serve("127.0.0.1:0", &store, p.mirror.dir_str(), extra);
    serve_with(&["--queue-depth", "0"]).assert_fails(1, &["queue depth"]);
    for bad in ["0", "99", "60001"] {
        serve_with(&["--async-commit-ms", bad])
            .assert_fails(1, &["--async-commit-ms", bad, "100..=60000"]);
    }
    let out = serve_with(&["--async-commit-ms", "soon"]);
    out.assert_fails(2, &["--async-commit-ms", "soon"]);
}

#[test]
fn demo_replicates_end_to_end() {
    let out = run_cmd(&["demo", "--size-mib", "16"]);
    assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
    // After the full and differential syncs, and after each live round.
    assert_eq!(
        out.stdout.matches("byte-identical").count(),
        3,
        "{}",
        out.stdout
    );
    for mode in ["sync", "async"] {
        assert!(
            out.stdout
                .contains(&format!("live, {mode} mode: replicate served")),
            "{}",
            out.stdout
        );
    }
    // The primary's final status says it stopped (the demo's process lives
    // on), with nothing left dirty; the mirror has everything durable.
    let lines_with =
        |tag: &str| -> Vec<&str> { out.stdout.lines().filter(|l| l.contains(tag)).collect() };
    let primary = lines_with("(primary)");
    assert_eq!(primary.len(), 2, "{}", out.stdout);
    for l in primary {
        assert!(
            l.contains("not running") && l.contains("phase stopped"),
            "{l}"
        );
        assert!(l.contains("dirty chunks 0, queued 0 bytes"), "{l}");
    }
    let mirror = lines_with("(mirror)");
    assert_eq!(mirror.len(), 2, "{}", out.stdout);
    for l in mirror {
        assert!(l.contains("replica UpToDate"), "{l}");
        let seq = |key: &str| {
            l.split(key).nth(1).and_then(|r| {
                r.split(|c: char| !c.is_ascii_digit())
                    .next()
                    .map(String::from)
            })
        };
        assert_eq!(seq("applied seq "), seq("durable seq "), "{l}");
    }
    let out = run_cmd(&["demo", "--size-mib", "0"]);
    out.assert_fails(1, &["demo size"]);
}

// -------------------------------------------------------------------------------------------
// Metadata, metrics, addresses
// -------------------------------------------------------------------------------------------

/// Regression: the generation is a random u64 and TOML integers are i64;
/// both the mirror's meta and the primary's volume.toml must store any value
/// (once half of all syncs failed at the very end). Ten syncs in a row.
#[test]
fn generation_survives_metadata_round_trip() {
    let p = Pair::new();
    let src = p.path("disk.img");
    random_image(&src, MIB, 26);
    for i in 0..10 {
        let r = p.sync(&src, "v", &[]);
        assert_eq!(r.code, 0, "sync {i} failed (generation bug?): {}", r.stderr);
        assert_eq!(p.state_of("v"), "UpToDate");
        assert_ne!(generation(&p.meta("v")), 0);
        // The primary recorded the completed sync too.
        let st = read_primary_state(&p.state, "v");
        let peers = st["peers"].as_array().expect("peers");
        assert_eq!(peers.len(), 1);
        assert_eq!(peers[0]["synced"].as_bool(), Some(true));
    }
}

#[test]
fn serve_metrics_endpoint() {
    let maddr = free_tcp_addr();
    let p = Pair::with_server_args(&["--metrics", &maddr.to_string()]);
    let src = p.path("disk.img");
    random_image(&src, 4 * MIB, 27);
    p.sync(&src, "v", &[]).ok();
    let mut body = String::new();
    let ok = wait_until(Duration::from_secs(5), || {
        match http_get(maddr, "/metrics") {
            Ok((status, b)) if status.contains("200") => {
                body = b;
                prom_value(&body, "blkmirror_mirror_chunks_written_total").is_some()
            }
            _ => false,
        }
    });
    assert!(ok, "no chunks_written metric; body:\n{body}");
    let written = prom_value(&body, "blkmirror_mirror_chunks_written_total").unwrap();
    assert_eq!(written, 64.0, "4 MiB of random data = 64 chunks:\n{body}");
    let bytes = prom_value(&body, "blkmirror_mirror_bytes_written_total").unwrap();
    assert_eq!(bytes, (4 * MIB) as f64);
    assert!(
        body.lines()
            .any(|l| l.starts_with("blkmirror_replica_state{volume=\"v\"} 1")),
        "{body}"
    );
}

#[test]
fn ipv6_loopback() {
    if std::net::UdpSocket::bind("[::1]:0").is_err() {
        skip("ipv6_loopback", "no ::1 on this host");
        return;
    }
    let tmp = tempdir();
    let primary = Node::new(tmp.path().join("p"));
    let mirror = Node::new(tmp.path().join("m"));
    let store = tmp.path().join("store");
    let server = Server::start(&mirror, &store, &[&primary.fp], "[::1]:0", &[]);
    assert!(server.addr.is_ipv6());
    let src = tmp.path().join("disk.img");
    mixed_image(&src, 8, 28);
    let r = run_sync_args(
        &sync_args(
            &src,
            &primary,
            &server.to(),
            &mirror.fp,
            "v6",
            &tmp.path().join("state"),
            &[],
        ),
        SYNC_TIMEOUT,
    );
    r.ok();
    assert_identical(&src, &store.join("v6.img"));
}

#[test]
fn several_volumes_on_one_mirror_and_two_primaries() {
    let tmp = tempdir();
    let p1 = Node::new(tmp.path().join("p1"));
    let p2 = Node::new(tmp.path().join("p2"));
    let mirror = Node::new(tmp.path().join("m"));
    let store = tmp.path().join("store");
    let server = Server::start(&mirror, &store, &[&p1.fp, &p2.fp], "127.0.0.1:0", &[]);
    let a = tmp.path().join("a.img");
    let b = tmp.path().join("b.img");
    mixed_image(&a, 16, 29);
    mixed_image(&b, 8, 30);
    let args_a = sync_args(
        &a,
        &p1,
        &server.to(),
        &mirror.fp,
        "a",
        &tmp.path().join("s1"),
        &[],
    );
    let args_b = sync_args(
        &b,
        &p2,
        &server.to(),
        &mirror.fp,
        "b",
        &tmp.path().join("s2"),
        &[],
    );
    // Concurrently.
    let ta = std::thread::spawn(move || run_sync_args(&args_a, SYNC_TIMEOUT));
    let rb = run_sync_args(&args_b, SYNC_TIMEOUT);
    let ra = ta.join().unwrap();
    ra.ok();
    rb.ok();
    assert_identical(&a, &store.join("a.img"));
    assert_identical(&b, &store.join("b.img"));
    assert_eq!(
        read_meta(&store, "a")["last_primary"].as_str(),
        Some(p1.fp.as_str())
    );
    assert_eq!(
        read_meta(&store, "b")["last_primary"].as_str(),
        Some(p2.fp.as_str())
    );
}

/// The same full + differential + checksum sequence with each I/O engine on
/// both sides: the plain pread/pwrite fallback must give the same bytes.
#[test]
fn every_engine_end_to_end() {
    for engine in ["plain", "uring"] {
        let p = Pair::with_server_args(&["--engine", engine]);
        let src = p.path("disk.img");
        mixed_image(&src, 24, 5);
        let j = p.sync(&src, "v", &["--engine", engine]).ok().clone();
        assert_eq!(j["mode"], "full", "{engine}: {j}");
        let expected = if engine == "plain" {
            "plain"
        } else {
            "io_uring"
        };
        assert_eq!(j["engine"], expected, "{j}");
        assert_identical(&src, &p.img("v"));
        let changed = blkmirror::demo::change_chunks(&src, CHUNK, 0.02, 7).unwrap();
        let j = p.sync(&src, "v", &["--engine", engine]).ok().clone();
        assert_eq!(j["mode"], "scan", "{engine}: {j}");
        assert_eq!(num(&j, "chunks_sent"), changed, "{engine}: {j}");
        assert_identical(&src, &p.img("v"));
        // The mirror computes digests of its replica through the same engine.
        let j = p
            .sync(&src, "v", &["--engine", engine, "--checksum"])
            .ok()
            .clone();
        assert_eq!(j["mode"], "checksum", "{engine}: {j}");
        assert_eq!(num(&j, "chunks_sent"), 0, "{engine}: {j}");
        assert_eq!(p.state_of("v"), "UpToDate");
    }
}

/// `blkmirror volumes` shows each replica's state as the metadata says.
#[test]
fn volumes_lists_replica_states() {
    let p = Pair::new();
    let a = p.path("a.img");
    let b = p.path("b.img");
    random_image(&a, 4 * MIB, 1);
    random_image(&b, 8 * MIB, 2);
    p.sync(&a, "alpha", &[]).ok();
    p.sync(&b, "beta", &[]).ok();
    let store = p.store().to_str().unwrap().to_string();
    let out = run_cmd(&["volumes", "--store", &store, "--json"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let v: serde_json::Value = serde_json::from_str(out.stdout.trim()).unwrap();
    let rows = v.as_array().unwrap();
    assert_eq!(rows.len(), 2, "{v}");
    assert_eq!(rows[0]["volume"], "alpha");
    assert_eq!(rows[0]["state"], "UpToDate");
    assert_eq!(rows[0]["volume_bytes"], 4 * MIB);
    assert_eq!(rows[1]["volume"], "beta");
    assert_eq!(rows[1]["volume_bytes"], 8 * MIB);
    let text = run_cmd(&["volumes", "--store", &store]);
    assert!(
        text.stdout.contains("alpha") && text.stdout.contains("UpToDate"),
        "{}",
        text.stdout
    );
    let missing = run_cmd(&["volumes", "--store", "/nonexistent/store"]);
    missing.assert_fails(1, &["/nonexistent/store"]);
}

/// Compression choices: `--compress-always` sends compressible data as lz4
/// (fewer bytes on the wire than the data), `--no-compress` sends it raw;
/// both replicas are identical.
#[test]
fn compression_modes() {
    let p = Pair::new();
    let src = p.path("text.img");
    let line = b"blkmirror replicates block devices over QUIC with mutual TLS. ";
    let data: Vec<u8> = line
        .iter()
        .cycle()
        .take(16 * MIB as usize)
        .copied()
        .collect();
    std::fs::write(&src, &data).unwrap();
    let j = p.sync(&src, "always", &["--compress-always"]).ok().clone();
    assert!(
        num(&j, "bytes_on_wire") < 4 * MIB,
        "lz4 should shrink 16 MiB of text: {j}"
    );
    assert_identical(&src, &p.img("always"));
    let j = p.sync(&src, "raw", &["--no-compress"]).ok().clone();
    assert!(num(&j, "bytes_on_wire") > 16 * MIB, "raw: {j}");
    assert_identical(&src, &p.img("raw"));
    let r = p.sync(&src, "both", &["--no-compress", "--compress-always"]);
    assert_eq!(
        r.code, 2,
        "conflicting flags are a usage error: {}",
        r.stderr
    );
}
