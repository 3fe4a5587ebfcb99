#!/usr/bin/env python3
"""Deterministic test images for bench/run.sh.

  mkimage.py mixed  PATH SIZE_BYTES [--seed N]
      ~40% random, ~25% text, ~35% zeros, in regions of 64 KiB .. 4 MiB (4 KiB
      aligned, so region edges do not always fall on 64 KiB chunk edges). Zero
      regions alternate between real holes (never written) and written zeros, so
      both the SEEK_DATA/SEEK_HOLE path and the "read zeros, detect them" path are
      exercised. Prints a JSON summary.

  mkimage.py sparse PATH SIZE_BYTES --data-bytes N --within BYTES [--seed N]
      A sparse image: N bytes of random data as 64 KiB chunks at chunk indices
      drawn (with the seed) from the first BYTES of the image; the rest are holes.
      Two images made with the same seed, data-bytes and within (but different
      sizes) hold the same data at the same offsets.

  mkimage.py mutate PATH --percent P [--within BYTES] [--chunk BYTES] [--seed N]
      Overwrite P% of the chunks (of the first BYTES, default the whole file)
      with fresh random data, at chunk indices drawn with the seed. fsyncs.
      Prints a JSON object with the number of changed chunks and bytes.

Everything is derived from the seed: two runs produce byte-identical files.
"""
import argparse
import json
import os
import random
import sys

MiB = 1 << 20
KiB = 1 << 10
BLOCK = 1 * MiB  # write granularity


def rand_bytes(rng: random.Random, n: int) -> bytes:
    # randbytes() of a very large n overflows; go in 1 MiB pieces.
    if n <= BLOCK:
        return rng.randbytes(n)
    return b"".join(rng.randbytes(min(BLOCK, n - o)) for o in range(0, n, BLOCK))


WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his "
    "from at which but have an they you were her she there been one all we their "
    "has would when if so no will more its about into than them can only other new "
    "some could these two may first then do any like my now over such our man me "
    "even most made after also did many before must through back years where much "
    "your way well down should because each just those people how too little state "
    "block device mirror chunk bitmap digest replica primary volume sync kernel "
    "page cache journal inode extent superblock sector write read flush barrier"
).split()


def make_corpus(rng: random.Random, n: int) -> bytes:
    """n bytes of English-looking text (lines of random words)."""
    out = []
    size = 0
    while size < n:
        line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 16)))
        line = line.capitalize() + ".\n"
        out.append(line)
        size += len(line)
    return "".join(out).encode()[:n]


def cmd_mixed(a):
    rng = random.Random(a.seed)
    size = a.size
    # Text comes from a 16 MiB corpus read at random offsets: compressible like
    # text (lz4 ~2x), but not repeating exactly at chunk alignment.
    corpus = make_corpus(random.Random(a.seed + 1), 16 * MiB)
    weights = [("random", 0.40), ("text", 0.25), ("zero", 0.35)]
    totals = {"random": 0, "text": 0, "zero_hole": 0, "zero_written": 0}
    zero_toggle = 0
    fd = os.open(a.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)  # all holes to start with
        off = 0
        while off < size:
            # Region length 64 KiB .. 4 MiB, 4 KiB aligned, log-uniform-ish.
            ln = 4 * KiB * rng.randint(16, 1024)
            ln = min(ln, size - off)
            # Steer towards the target mix: pick the kind furthest below its share.
            done = max(off, 1)
            deficit = []
            for kind, w in weights:
                have = totals[kind] if kind != "zero" else totals["zero_hole"] + totals["zero_written"]
                deficit.append((w - have / done + rng.random() * 0.05, kind))
            kind = max(deficit)[1]
            if kind == "random":
                pos = off
                rem = ln
                while rem:
                    n = min(BLOCK, rem)
                    os.pwrite(fd, rng.randbytes(n), pos)
                    pos += n
                    rem -= n
                totals["random"] += ln
            elif kind == "text":
                pos = off
                rem = ln
                while rem:
                    n = min(BLOCK, rem)
                    start = rng.randrange(0, len(corpus) - n)
                    os.pwrite(fd, corpus[start:start + n], pos)
                    pos += n
                    rem -= n
                totals["text"] += ln
            else:
                if zero_toggle % 2 == 0:
                    totals["zero_hole"] += ln  # leave the hole
                else:
                    pos = off
                    rem = ln
                    z = bytes(BLOCK)
                    while rem:
                        n = min(BLOCK, rem)
                        os.pwrite(fd, z[:n], pos)
                        pos += n
                        rem -= n
                    totals["zero_written"] += ln
                zero_toggle += 1
            off += ln
        os.fsync(fd)
    finally:
        os.close(fd)
    st = os.stat(a.path)
    summary = {
        "path": a.path,
        "size_bytes": size,
        "seed": a.seed,
        "random_bytes": totals["random"],
        "text_bytes": totals["text"],
        "zero_hole_bytes": totals["zero_hole"],
        "zero_written_bytes": totals["zero_written"],
        "allocated_bytes": st.st_blocks * 512,
    }
    for k in ("random", "text"):
        summary[k + "_pct"] = round(100 * totals[k] / size, 1)
    summary["zero_pct"] = round(100 * (totals["zero_hole"] + totals["zero_written"]) / size, 1)
    print(json.dumps(summary))


def pick_chunks(seed: int, nchunks: int, k: int):
    rng = random.Random(seed)
    return sorted(rng.sample(range(nchunks), k)), rng


def cmd_sparse(a):
    chunk = a.chunk
    if a.within > a.size:
        sys.exit("--within larger than the image")
    k = a.data_bytes // chunk
    idx, rng = pick_chunks(a.seed, a.within // chunk, k)
    fd = os.open(a.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, a.size)
        for i in idx:
            os.pwrite(fd, rng.randbytes(chunk), i * chunk)
        os.fsync(fd)
    finally:
        os.close(fd)
    st = os.stat(a.path)
    print(json.dumps({"path": a.path, "size_bytes": a.size, "data_chunks": k,
                      "data_bytes": k * chunk, "allocated_bytes": st.st_blocks * 512}))


def cmd_mutate(a):
    chunk = a.chunk
    size = os.stat(a.path).st_size
    within = a.within or size
    nchunks = within // chunk
    k = max(1, round(nchunks * a.percent / 100.0))
    idx, rng = pick_chunks(a.seed, nchunks, k)
    fd = os.open(a.path, os.O_WRONLY)
    try:
        for i in idx:
            os.pwrite(fd, rng.randbytes(chunk), i * chunk)
        os.fsync(fd)
    finally:
        os.close(fd)
    print(json.dumps({"path": a.path, "chunks_total": size // chunk, "changed_chunks": k,
                      "changed_bytes": k * chunk, "chunk_bytes": chunk, "seed": a.seed,
                      "first_indices": idx[:5]}))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("mixed")
    m.add_argument("path")
    m.add_argument("size", type=int)
    m.add_argument("--seed", type=int, default=20241124)
    m.set_defaults(fn=cmd_mixed)
    s = sub.add_parser("sparse")
    s.add_argument("path")
    s.add_argument("size", type=int)
    s.add_argument("--data-bytes", type=int, required=True)
    s.add_argument("--within", type=int, required=True)
    s.add_argument("--chunk", type=int, default=64 * KiB)
    s.add_argument("--seed", type=int, default=7)
    s.set_defaults(fn=cmd_sparse)
    u = sub.add_parser("mutate")
    u.add_argument("path")
    u.add_argument("--percent", type=float, required=True)
    u.add_argument("--within", type=int, default=0)
    u.add_argument("--chunk", type=int, default=64 * KiB)
    u.add_argument("--seed", type=int, default=99)
    u.set_defaults(fn=cmd_mutate)
    a = p.parse_args()
    a.fn(a)


if __name__ == "__main__":
    main()
