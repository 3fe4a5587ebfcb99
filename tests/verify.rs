//! `blkmirror verify`: a chunk corrupted on purpose on the mirror is found
//! (which chunk, where) and `--repair` fixes it, online while replication
//! runs and offline.

mod common;

use std::path::Path;
use std::time::Duration;

use common::nbd::NbdClient;
use common::*;

const CHUNK: u64 = 64 * 1024;

fn verify(pair: &Pair, src: &Path, repair: bool) -> (i32, serde_json::Value, String) {
    let mut args: Vec<String> = vec!["verify".into(), src.to_str().unwrap().into()];
    args.extend(
        [
            "--identity",
            pair.primary.dir_str(),
            "--to",
            &pair.server.to(),
            "--peer",
            &pair.mirror.fp,
            "--volume",
            "v",
            "--state",
            pair.state.to_str().unwrap(),
            "--json",
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    if repair {
        args.push("--repair".into());
    }
    let refs: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let out = run_cmd(&refs);
    let j = serde_json::from_str(out.stdout.trim()).unwrap_or(serde_json::Value::Null);
    (out.code, j, out.stderr)
}

fn corrupt(img: &Path, chunk: u64) {
    let mut data = read_at(img, chunk * CHUNK + 8192, 512);
    for b in &mut data {
        *b ^= 0x5a;
    }
    write_at(img, chunk * CHUNK + 8192, &data);
}

#[test]
fn offline_verify_finds_a_corrupted_chunk_and_repair_fixes_it() {
    let pair = Pair::new();
    let src = pair.path("src.img");
    mixed_image(&src, 16, 5);
    pair.sync(&src, "v", &[]).ok();
    let (code, j, err) = verify(&pair, &src, false);
    assert_eq!(code, 0, "{err}");
    assert_eq!(num(&j, "chunks_differ"), 0, "{j}");
    assert_eq!(j["online"], false);
    corrupt(&pair.img("v"), 37);
    let (code, j, err) = verify(&pair, &src, false);
    assert_eq!(code, 3, "differences exit with 3: {err}");
    assert_eq!(num(&j, "chunks_differ"), 1, "{j}");
    assert_eq!(j["differ"][0][0], 37, "{j}");
    assert_eq!(j["differ"][0][1], 37 * CHUNK, "{j}");
    let (code, j, err) = verify(&pair, &src, true);
    assert_eq!(code, 0, "{err}");
    assert_eq!(j["repaired"], true, "{j}");
    assert_identical(&src, &pair.img("v"));
    let (code, j, _) = verify(&pair, &src, false);
    assert_eq!((code, num(&j, "chunks_differ")), (0, 0), "{j}");
}

#[test]
fn online_verify_while_replicating_finds_and_repairs_a_corrupted_chunk() {
    let pair = Pair::new();
    let src = pair.path("src.img");
    random_image(&src, 16 * MIB, 9);
    let sock = pair.path("v.nbd.sock");
    let log = pair.path("replicate.log");
    let mut guard = start_replicate(
        &src,
        &pair.primary,
        &pair.server.to(),
        &pair.mirror.fp,
        "v",
        &pair.state,
        &sock,
        &log,
        &["--mode".to_string(), "sync".to_string()],
    );
    let mut c = NbdClient::connect(&sock, "disk").unwrap();
    assert_eq!(c.write(5 * CHUNK, &vec![7u8; 65536], false).unwrap(), 0);
    // Writes keep flowing during the verify.
    let writer = std::thread::spawn(move || {
        for k in 0..200u64 {
            assert_eq!(
                c.write((k % 50) * CHUNK * 2, &vec![k as u8; 4096], false)
                    .unwrap(),
                0
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        c
    });
    let in_sync = || {
        let out = run_cmd(&[
            "status",
            "--state",
            pair.state.to_str().unwrap(),
            "--volume",
            "v",
            "--json",
        ]);
        let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap_or_default();
        v[0]["in_sync"] == true
    };
    assert!(wait_until(Duration::from_secs(60), in_sync));
    corrupt(&pair.img("v"), 201);
    let (code, j, err) = verify(&pair, &src, false);
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(code, 3, "{err}\n{}", log_text());
    assert_eq!(j["online"], true, "{j}");
    assert_eq!(num(&j, "chunks_differ"), 1, "{j}");
    assert_eq!(j["differ"][0][0], 201, "{j}");
    let (code, j, err) = verify(&pair, &src, true);
    assert_eq!(code, 0, "{err}\n{}", log_text());
    assert_eq!(j["repaired"], true, "{j}");
    let c = writer.join().unwrap();
    c.disconnect();
    let (code, j, err) = verify(&pair, &src, false);
    assert_eq!((code, num(&j, "chunks_differ")), (0, 0), "{j} {err}");
    // SAFETY: signalling our own child.
    unsafe {
        libc::kill(guard.id() as i32, libc::SIGTERM);
    }
    assert!(guard.wait_timeout(Duration::from_secs(60)).success());
    assert_identical(&src, &pair.img("v"));
}
