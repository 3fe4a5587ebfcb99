//! The fuzz targets on every `cargo test`: each seed is accepted, then
//! seeded random mutations of the seeds run through each target (a panic
//! fails the test and leaves the input in `target/fuzz-failures/`, where
//! `cargo fuzz run TARGET FILE` or [`replay`] runs it again).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;

/// Mutated inputs per target; `BLKMIRROR_FUZZ_ITERS` overrides.
fn iterations(default: u32) -> u32 {
    std::env::var("BLKMIRROR_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

const INTERESTING_NUMBERS: &[&str] = &[
    "0",
    "1",
    "3",
    "4096",
    "65536",
    "4294967295",
    "4294967296",
    "1125899906842624",
    "18446744073709551615",
    "18446744073709551616",
    "-1",
];

/// One random change to `data`.
fn mutate_once(rng: &mut StdRng, data: &mut Vec<u8>, seeds: &[Vec<u8>]) {
    let len = data.len();
    match rng.gen_range(0..10) {
        0 if len > 0 => {
            let i = rng.gen_range(0..len);
            data[i] ^= 1 << rng.gen_range(0..8);
        }
        1 if len > 0 => {
            let i = rng.gen_range(0..len);
            data[i] = [0u8, 1, 0x7f, 0x80, 0xff][rng.gen_range(0..5)];
        }
        2 if len > 0 => {
            // An interesting integer, little- or big-endian, 2, 4 or 8 bytes.
            let v = INTERESTING_U64[rng.gen_range(0..INTERESTING_U64.len())];
            let width = [2usize, 4, 8][rng.gen_range(0..3)];
            let at = rng.gen_range(0..len);
            let bytes = if rng.gen() {
                v.to_le_bytes()
            } else {
                v.to_be_bytes()
            };
            let bytes = if rng.gen::<bool>() {
                &bytes[..width]
            } else {
                &bytes[8 - width..]
            };
            for (k, b) in bytes.iter().enumerate() {
                if let Some(d) = data.get_mut(at + k) {
                    *d = *b;
                }
            }
        }
        3 if len > 0 => {
            let a = rng.gen_range(0..len);
            let b = rng.gen_range(a..=len.min(a + 64));
            data.drain(a..b);
        }
        4 => {
            let at = rng.gen_range(0..=len);
            let n = rng.gen_range(1..=16);
            let bytes: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
            data.splice(at..at, bytes);
        }
        5 if len > 0 => {
            data.truncate(rng.gen_range(0..len));
        }
        6 if len > 0 => {
            let a = rng.gen_range(0..len);
            let b = rng.gen_range(a..=len.min(a + 256));
            let copy = data[a..b].to_vec();
            let at = rng.gen_range(0..=len);
            data.splice(at..at, copy);
        }
        7 if !seeds.is_empty() => {
            // Splice: the head of this input, the tail of a seed.
            let other = &seeds[rng.gen_range(0..seeds.len())];
            let cut = rng.gen_range(0..=len);
            let from = rng.gen_range(0..=other.len());
            data.truncate(cut);
            data.extend_from_slice(&other[from..]);
        }
        _ => {
            // Text formats: a number replaced by an interesting one.
            let runs: Vec<(usize, usize)> = digit_runs(data);
            if let Some(&(a, b)) = runs.get(rng.gen_range(0..runs.len().max(1))) {
                let n = INTERESTING_NUMBERS[rng.gen_range(0..INTERESTING_NUMBERS.len())];
                data.splice(a..b, n.bytes());
            } else if len > 0 {
                let i = rng.gen_range(0..len);
                data[i] = rng.gen();
            }
        }
    }
}

fn digit_runs(data: &[u8]) -> Vec<(usize, usize)> {
    let mut runs = Vec::new();
    let mut start = None;
    for (i, b) in data.iter().enumerate() {
        match (b.is_ascii_digit(), start) {
            (true, None) => start = Some(i),
            (false, Some(s)) => {
                runs.push((s, i));
                start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = start {
        runs.push((s, data.len()));
    }
    runs
}

/// Run `name` on `data`; a panic saves the input and fails with its path.
fn run_saving(name: &str, data: &[u8]) -> bool {
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(name, data)));
    match outcome {
        Ok(accepted) => accepted.expect("known target"),
        Err(panic) => {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/fuzz-failures");
            let _ = std::fs::create_dir_all(&dir);
            let file = dir.join(format!("{name}-{:016x}", xxhash_rust::xxh3::xxh3_64(data)));
            let _ = std::fs::write(&file, data);
            let what = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!(
                "fuzz target {name} failed ({what}); input saved in {}",
                file.display()
            );
        }
    }
}

/// Mutate the seeds of `name` `n` times; returns how many inputs the target
/// accepted.
fn fuzz(name: &str, n: u32, seed: u64) -> u32 {
    let seeds = seeds(name);
    assert!(!seeds.is_empty(), "{name} has seeds");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut accepted = 0;
    for _ in 0..n {
        let mut data = seeds[rng.gen_range(0..seeds.len())].clone();
        // Half the inputs carry one change (most reach deeper), half 2-4.
        let changes = if rng.gen_bool(0.5) {
            1
        } else {
            rng.gen_range(2..=4)
        };
        for _ in 0..changes {
            mutate_once(&mut rng, &mut data, &seeds);
        }
        if run_saving(name, &data) {
            accepted += 1;
        }
    }
    accepted
}

/// Run a saved input again (`BLKMIRROR_FUZZ_REPLAY=target:path`).
#[test]
fn replay() {
    let Ok(spec) = std::env::var("BLKMIRROR_FUZZ_REPLAY") else {
        return;
    };
    let (name, path) = spec.split_once(':').expect("target:path");
    let data = std::fs::read(path).expect("replay input");
    println!("{name} accepted: {}", run_saving(name, &data));
}

/// Write the seeds as cargo-fuzz corpora (`BLKMIRROR_FUZZ_CORPUS=DIR`:
/// `DIR/TARGET/seed-K`); `fuzz/run.sh` does this before fuzzing.
#[test]
fn write_corpus() {
    let Ok(dir) = std::env::var("BLKMIRROR_FUZZ_CORPUS") else {
        return;
    };
    for (name, _) in TARGETS {
        let d = Path::new(&dir).join(name);
        std::fs::create_dir_all(&d).expect("corpus directory");
        for (k, s) in seeds(name).iter().enumerate() {
            std::fs::write(d.join(format!("seed-{k}")), s).expect("corpus file");
        }
    }
}

#[test]
fn every_seed_is_accepted() {
    for (name, _) in TARGETS {
        let seeds = seeds(name);
        assert!(!seeds.is_empty(), "{name} has no seeds");
        for (k, s) in seeds.iter().enumerate() {
            assert!(run_saving(name, s), "{name}: seed {k} was not accepted");
        }
    }
}

#[test]
fn split_and_join_are_inverse() {
    let parts: [&[u8]; 3] = [b"abc", b"", b"tail"];
    let joined = join(&parts);
    assert_eq!(split(&joined, 3), parts.to_vec());
    // Short input: the lengths are cut where the data ends.
    assert_eq!(split(&[5, 0, 1], 3), vec![&[1u8][..], &[][..], &[][..]]);
}

macro_rules! fuzz_test {
    ($test:ident, $name:literal, $n:expr, $seed:expr) => {
        #[test]
        fn $test() {
            let n = iterations($n);
            let accepted = fuzz($name, n, $seed);
            eprintln!("{}: {accepted} of {n} mutated inputs accepted", $name);
            // The mutations must not all be rejected at the first check, or
            // the run tested nothing but that check.
            assert!(
                n < 50 || accepted > 0,
                "{}: none of {n} mutated inputs got past the first checks",
                $name
            );
        }
    };
}

fuzz_test!(fuzz_frame, "frame", 10_000, 1);
fuzz_test!(fuzz_nbd, "nbd", 4000, 2);
fuzz_test!(fuzz_bitmap, "bitmap", 5000, 3);
fuzz_test!(fuzz_digest_map, "digest_map", 3000, 4);
fuzz_test!(fuzz_points, "points", 2000, 5);
fuzz_test!(fuzz_volume_meta, "volume_meta", 2000, 6);
fuzz_test!(fuzz_primary_state, "primary_state", 2000, 7);
