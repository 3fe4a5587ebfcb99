//! System tests as root with loop devices and ext4. Each test prints a
//! SKIPPED line and returns when not root or when the tools are missing.

mod common;

use std::path::Path;

use common::*;

const CHUNK: u64 = 64 * 1024;

/// Root and a working `losetup`, or the reason why not.
fn loop_ready(test: &str) -> bool {
    if !is_root() {
        skip(test, "needs root");
        return false;
    }
    if sh("losetup", &["--version"]).is_err() {
        skip(test, "losetup is missing");
        return false;
    }
    true
}

fn attach_or_skip(test: &str, file: &Path) -> Option<LoopDev> {
    match LoopDev::attach(file) {
        Ok(d) => Some(d),
        Err(e) => {
            skip(test, &format!("cannot attach a loop device: {e}"));
            None
        }
    }
}

#[test]
fn loop_device_as_source() {
    const T: &str = "loop_device_as_source";
    if !loop_ready(T) {
        return;
    }
    let p = Pair::new();
    let backing = p.path("backing.img");
    mixed_image(&backing, 64, 50);
    let Some(dev) = attach_or_skip(T, &backing) else {
        return;
    };
    let j = p.sync(&dev.dev, "loopsrc", &[]).ok().clone();
    assert_eq!(j["mode"], "full");
    assert_eq!(num(&j, "volume_bytes"), 64 * MIB);
    assert_eq!(num(&j, "chunks_total"), 64 * MIB / CHUNK);
    assert!(
        num(&j, "chunks_zero") > 0,
        "zero chunks of a device are found by content: {j}"
    );
    assert_identical(&dev.dev, &p.img("loopsrc"));
    assert_identical(&backing, &p.img("loopsrc"));
    assert_eq!(p.state_of("loopsrc"), "UpToDate");

    // Write through the device; the next sync sends exactly those chunks.
    for c in [1u64, 300, 1023] {
        write_at(&dev.dev, c * CHUNK + 512, &[0x5Au8; 4096]);
    }
    let j = p.sync(&dev.dev, "loopsrc", &[]).ok().clone();
    assert_eq!(j["mode"], "scan");
    assert_eq!(num(&j, "chunks_sent"), 3, "{j}");
    assert_identical(&dev.dev, &p.img("loopsrc"));
}

#[test]
fn loop_device_as_target() {
    const T: &str = "loop_device_as_target";
    if !loop_ready(T) {
        return;
    }
    let tmp = tempdir();
    let primary = Node::new(tmp.path().join("p"));
    let mirror = Node::new(tmp.path().join("m"));
    let store = tmp.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    // The target device holds garbage and is larger than the volume.
    let target_file = tmp.path().join("target-backing.img");
    random_image(&target_file, 72 * MIB, 51);
    let Some(target) = attach_or_skip(T, &target_file) else {
        return;
    };
    std::os::unix::fs::symlink(&target.dev, store.join("dev.img")).unwrap();
    let server = Server::start(&mirror, &store, &[&primary.fp], "127.0.0.1:0", &[]);
    let src = tmp.path().join("disk.img");
    mixed_image(&src, 64, 52);
    let state = tmp.path().join("state");
    let args = sync_args(&src, &primary, &server.to(), &mirror.fp, "dev", &state, &[]);

    let j = run_sync_args(&args, SYNC_TIMEOUT).ok().clone();
    assert_eq!(j["mode"], "full", "{j}");
    // Holes of the source must overwrite the garbage on the device.
    assert_prefix_identical(&src, &target.dev, 64 * MIB);
    assert!(
        std::fs::symlink_metadata(store.join("dev.img"))
            .unwrap()
            .file_type()
            .is_symlink(),
        "the symlink to the device was replaced"
    );
    let meta = read_meta(&store, "dev");
    assert_eq!(meta["state"].as_str(), Some("UpToDate"));
    assert_eq!(meta["volume_bytes"].as_integer(), Some((64 * MIB) as i64));
    // Bytes beyond the volume are left alone.
    let tail = read_at(&target.dev, 64 * MIB, 4096);
    assert_eq!(tail, read_at(&target_file, 64 * MIB, 4096));

    let changed = blkmirror::demo::change_chunks(&src, CHUNK, 0.01, 53).unwrap();
    let j = run_sync_args(&args, SYNC_TIMEOUT).ok().clone();
    assert_eq!(j["mode"], "scan");
    assert_eq!(num(&j, "chunks_sent"), changed, "{j}");
    assert_prefix_identical(&src, &target.dev, 64 * MIB);
}

#[test]
fn ext4_on_loop_device_survives_replication() {
    const T: &str = "ext4_on_loop_device_survives_replication";
    if !loop_ready(T) {
        return;
    }
    if sh("mkfs.ext4", &["-V"]).is_err() || sh("e2fsck", &["-V"]).is_err() {
        skip(T, "e2fsprogs are missing");
        return;
    }
    let p = Pair::new();
    let backing = p.path("fs.img");
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(64 * MIB)
        .unwrap();
    let Some(dev) = attach_or_skip(T, &backing) else {
        return;
    };
    sh("mkfs.ext4", &["-q", "-F", dev.path_str()]).expect("mkfs.ext4");
    let mnt = p.path("mnt");
    let payload: Vec<u8> = (0..3 * MIB as usize).map(|i| (i * 7 % 251) as u8).collect();
    match Mount::new(&[dev.path_str()], &mnt) {
        Ok(m) => {
            std::fs::write(mnt.join("hello.txt"), b"hello from blkmirror\n").unwrap();
            std::fs::create_dir(mnt.join("dir")).unwrap();
            std::fs::write(mnt.join("dir/payload.bin"), &payload).unwrap();
            drop(m); // unmount
        }
        Err(e) => {
            // Without mount, build the same tree with mkfs.ext4 -d.
            eprintln!("{T}: mount failed ({e}); populating with mkfs.ext4 -d");
            let tree = p.path("tree");
            std::fs::create_dir_all(tree.join("dir")).unwrap();
            std::fs::write(tree.join("hello.txt"), b"hello from blkmirror\n").unwrap();
            std::fs::write(tree.join("dir/payload.bin"), &payload).unwrap();
            sh(
                "mkfs.ext4",
                &["-q", "-F", "-d", tree.to_str().unwrap(), dev.path_str()],
            )
            .expect("mkfs.ext4 -d");
        }
    }
    let j = p.sync(&dev.dev, "fs", &[]).ok().clone();
    assert_eq!(num(&j, "volume_bytes"), 64 * MIB);
    let replica = p.img("fs");
    assert_identical(&dev.dev, &replica);
    sh("e2fsck", &["-fn", replica.to_str().unwrap()]).expect("e2fsck of the replica");
    if sh("debugfs", &["-V"]).is_ok() {
        let out = sh(
            "debugfs",
            &["-R", "cat /hello.txt", replica.to_str().unwrap()],
        )
        .expect("debugfs");
        assert!(out.contains("hello from blkmirror"), "{out}");
        let dump = p.path("payload.out");
        sh(
            "debugfs",
            &[
                "-R",
                &format!("dump /dir/payload.bin {}", dump.display()),
                replica.to_str().unwrap(),
            ],
        )
        .expect("debugfs dump");
        assert_eq!(std::fs::read(&dump).unwrap(), payload);
    }
}

#[test]
fn too_small_device_target_is_refused() {
    const T: &str = "too_small_device_target_is_refused";
    if !loop_ready(T) {
        return;
    }
    let tmp = tempdir();
    let primary = Node::new(tmp.path().join("p"));
    let mirror = Node::new(tmp.path().join("m"));
    let store = tmp.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    let target_file = tmp.path().join("small-backing.img");
    random_image(&target_file, 8 * MIB, 54);
    let Some(target) = attach_or_skip(T, &target_file) else {
        return;
    };
    std::os::unix::fs::symlink(&target.dev, store.join("small.img")).unwrap();
    let server = Server::start(&mirror, &store, &[&primary.fp], "127.0.0.1:0", &[]);
    let src = tmp.path().join("disk.img");
    random_image(&src, 16 * MIB, 55);
    let r = run_sync_args(
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
    );
    r.assert_fails(&["too small"]);
    assert_ne!(meta_state(&store, "small"), "UpToDate");
    // The device was not written.
    assert_identical(&target_file, &target.dev);
}
