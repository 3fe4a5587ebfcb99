#!/usr/bin/env bash
# Live replication benchmark: fio's nbd engine against `blkmirror replicate`
# (sync and async mode, each also with --busy-poll-us; mirror on this machine
# over loopback QUIC) and against
# qemu-nbd (no replication, same image, cache=none, aio=io_uring), in one run.
#
#   bench/live.sh [--size-gib N] [--runtime S] [--rounds R] [--keep] [--no-build]
#
# Workloads: 4 KiB random writes at QD1 and QD32, 1 MiB sequential writes at QD8.
# Every system runs every workload once per round (default 3 rounds of 10 s,
# long enough for two of the async mirror's commits at its 5 s default;
# systems one after another within a round); the table shows the median
# round and the range, since single runs on a shared machine move by 1.5x.
# Writes bench/results/live.{json,md,png} and prints the table with ratios.
#
# Environment:
#   BENCH_DIR       work directory (default /var/tmp/blkmirror-live-bench)
#   BLKMIRROR_BIN   binary to measure (default REPO/target/release/blkmirror)
#   BUSY_POLL_US    --busy-poll-us of the "-poll" systems (default 300)
set -euo pipefail

SIZE_GIB=1
RUNTIME=10
ROUNDS=3
KEEP=0
BUILD=1
while [[ $# -gt 0 ]]; do
    case "$1" in
        --size-gib) SIZE_GIB="$2"; shift 2 ;;
        --runtime) RUNTIME="$2"; shift 2 ;;
        --rounds) ROUNDS="$2"; shift 2 ;;
        --keep) KEEP=1; shift ;;
        --no-build) BUILD=0; shift ;;
        -h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $1 (try --help)" >&2; exit 2 ;;
    esac
done
[[ "$SIZE_GIB" =~ ^[1-9][0-9]*$ ]] || { echo "--size-gib wants a positive integer" >&2; exit 2; }
[[ "$RUNTIME" =~ ^[1-9][0-9]*$ ]] || { echo "--runtime wants a positive integer" >&2; exit 2; }
IMAGE_BYTES=$((SIZE_GIB << 30))
[[ "$ROUNDS" =~ ^[1-9][0-9]?$ ]] || { echo "--rounds wants an integer 1..99" >&2; exit 2; }

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RESULTS="$REPO/bench/results"
WORK="${BENCH_DIR:-/var/tmp/blkmirror-live-bench}"
BIN="${BLKMIRROR_BIN:-$REPO/target/release/blkmirror}"
PY=python3
# The plot wants matplotlib; a pyenv python3 may lack what the system one has.
if ! python3 -c "import matplotlib" 2>/dev/null && /usr/bin/python3 -c "import matplotlib" 2>/dev/null; then PY=/usr/bin/python3; fi
BUSY_POLL_US="${BUSY_POLL_US:-300}"
[[ "$BUSY_POLL_US" =~ ^[1-9][0-9]*$ ]] || { echo "BUSY_POLL_US wants a positive integer" >&2; exit 2; }

log() { printf '\n== %s\n' "$*" >&2; }
die() { echo "bench: $*" >&2; exit 1; }

PIDS=()
cleanup() {
    set +e
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null; done
    if [[ $KEEP -eq 0 && -f "$WORK/.blkmirror-bench" ]]; then rm -rf "$WORK"; fi
}
trap cleanup EXIT

for t in fio qemu-nbd "$PY"; do
    command -v "$t" >/dev/null || die "$t is missing (apt-get install -y fio qemu-utils python3)"
done
fio --enghelp=nbd >/dev/null 2>&1 || die "this fio has no nbd engine"

if [[ $BUILD -eq 1 ]]; then
    log "building"
    (cd "$REPO" && cargo build --release --quiet)
fi
[[ -x "$BIN" ]] || die "no binary at $BIN"

# Only ever delete a work directory this script made (it holds a marker).
if [[ -e "$WORK" ]]; then
    [[ -f "$WORK/.blkmirror-bench" ]] || die "$WORK exists and was not made by this script; remove it or set BENCH_DIR"
    rm -rf "$WORK"
fi
mkdir -p "$WORK" "$RESULTS"
touch "$WORK/.blkmirror-bench"
cd "$WORK"
# The disk-pair probe (bench/disk_pair.c), if a C compiler is here.
if command -v cc >/dev/null; then
    cc -O2 -pthread -o "$WORK/disk_pair" "$REPO/bench/disk_pair.c" || die "cannot build bench/disk_pair.c"
fi
RECORDS="$WORK/records.jsonl"
: > "$RECORDS"

log "image: ${SIZE_GIB} GiB of random data"
head -c "$IMAGE_BYTES" /dev/urandom > src.img
# qemu-nbd serves this same file (not a copy): how fast this disk writes a
# file depends on where the file lies on it (measured: the same fio job on
# two 1 GiB files of this filesystem ran at 122k and 40k IOPS), so a copy
# could be measured on a different disk. Its writes bypass blkmirror's
# bitmap, so the next replicate reads the whole image (--scan) and resyncs.
# drop_image_cache: the image starts no round with pages in the page cache.
# Written just now, it is cached, and how much of it stays cached depends on
# the kernel's reclaim (this machine runs DAMON pageout). An O_DIRECT write to
# a cached range must write back and invalidate it, which io_uring cannot do
# without blocking, so it hands the write to a worker thread: a cost that
# either server pays or not by chance. Drop it before every round.
drop_image_cache() {
    sync
    local f
    dd if=src.img iflag=nocache count=0 status=none || die "cannot drop the page cache of src.img"
}

"$BIN" init p >/dev/null
MFP=$("$BIN" init m)
PFP=$("$BIN" fingerprint p)
"$BIN" serve --identity m --listen 127.0.0.1:0 --store store --allow "$PFP" > serve.out 2> serve.log &
SERVE_PID=$!
PIDS+=($SERVE_PID)
for _ in $(seq 50); do [[ -s serve.out ]] && break; sleep 0.1; done
MIRROR=$(sed -n 's/^listening //p' serve.out)
[[ -n "$MIRROR" ]] || die "serve did not start: $(cat serve.log)"

# The workloads: "NAME RW BS QD".
WORKLOADS=("randwrite-4k-qd1 randwrite 4k 1" "randwrite-4k-qd32 randwrite 4k 32" "write-1m-qd8 write 1M 8")
ROUND=1
# Set once qemu-nbd has written src.img behind blkmirror's back.
SCAN_NEXT=0
# record SYSTEM WORKLOAD FIO_JSON [SKIPPED]: one JSON line in $RECORDS for
# this round (SKIPPED: the writes not queued for the mirror, if counted).
record() {
    $PY - "$1" "$2" "$3" "$ROUND" "${4:-}" >> "$RECORDS" <<'EOF'
import json, sys
system, workload, path, rnd, skipped = sys.argv[1:6]
text = open(path).read()
j, _ = json.JSONDecoder().raw_decode(text[text.find('{'):])
# Several jobs (disk-two): the figures of one writer, averaged over the jobs
# (the "commit" job of disk-two-commit, one durable write every 5 s, is no writer).
jobs = [job for job in j["jobs"] if job["jobname"] != "commit"]
n = len(jobs)
ws = [job["write"] for job in jobs]
pct = lambda w, k: w["clat_ns"].get("percentile", {}).get(k, 0) / 1000
print(json.dumps({"system": system, "workload": workload, "round": int(rnd),
                  "iops": sum(w["iops"] for w in ws) / n,
                  "mib_s": sum(w["bw_bytes"] for w in ws) / n / 2**20,
                  "mean_us": sum(w["clat_ns"]["mean"] for w in ws) / n / 1000,
                  "p50_us": sum(pct(w, "50.000000") for w in ws) / n,
                  "p90_us": sum(pct(w, "90.000000") for w in ws) / n,
                  "p99_us": max(pct(w, "99.000000") for w in ws),
                  "writers": n, "error": max(job["error"] for job in jobs),
                  **({"skipped_writes": int(skipped)} if skipped else {})}))
EOF
    tail -n1 "$RECORDS" >&2
}

# skipped_writes: the replicating primary's count of writes it did not queue
# for the mirror (pull-ahead: the queue was full or the link down), from
# `blkmirror status` (written every 0.5 s); empty without a primary.
skipped_writes() {
    "$BIN" status --state state --volume v --json 2>/dev/null \
        | $PY -c 'import json,sys; j=json.load(sys.stdin); print(j[0]["skipped_writes"])' 2>/dev/null || true
}

# run_fio SYSTEM SOCKET [replicating]: the three workloads, one JSON record
# each. With "replicating", each record also counts the writes the primary
# did not queue for the mirror during the workload: an async run that fell
# behind (pull-ahead) measured the front-end alone, not replication, and the
# report does not let it pass.
run_fio() {
    local system=$1 sock=$2 replicating=${3:-}
    local name rw bs qd before after skipped
    for spec in "${WORKLOADS[@]}"; do
        read -r name rw bs qd <<< "$spec"
        skipped=
        if [[ -n "$replicating" ]]; then
            sleep 0.6
            before=$(skipped_writes)
        fi
        fio --name=bench --ioengine=nbd --uri="nbd+unix:///?socket=$sock" \
            --rw="$rw" --bs="$bs" --iodepth="$qd" --size="$IMAGE_BYTES" \
            --runtime="$RUNTIME" --time_based --output-format=json > "fio-$system-$name.json" 2> "fio-$system-$name.err" \
            || die "fio $system $name failed: $(cat "fio-$system-$name.err")"
        if [[ -n "$replicating" ]]; then
            sleep 0.6
            after=$(skipped_writes)
            [[ -n "$before" && -n "$after" ]] || die "no status from the primary ($system)"
            skipped=$((after - before))
        fi
        record "$system" "$name" "fio-$system-$name.json" $skipped
    done
}

# run_disk: the disk's own 4 KiB QD1 write latency, with nothing in between:
# O_DIRECT (what qemu-nbd's reply waits for) and O_DIRECT|O_DSYNC (a write
# plus the cache flush of this write-back-cache disk: what a durable write on
# the mirror costs at least). They bound sync mode at QD1 (see the report).
run_disk() {
    local name sync_arg
    [[ -f "$WORK/disk.probe" ]] || dd if=/dev/urandom of="$WORK/disk.probe" bs=1M count=$((IMAGE_BYTES >> 20)) \
        oflag=direct status=none || die "cannot write $WORK/disk.probe"
    for spec in "disk-direct 0" "disk-dsync dsync"; do
        read -r name sync_arg <<< "$spec"
        fio --name=disk --filename="$WORK/disk.probe" --size="$IMAGE_BYTES" --ioengine=psync --direct=1 \
            --sync="$sync_arg" --rw=randwrite --bs=4k --runtime="$RUNTIME" --time_based \
            --output-format=json > "fio-$name.json" 2> "fio-$name.err" \
            || die "fio $name failed: $(cat "fio-$name.err")"
        record "$name" randwrite-4k-qd1 "fio-$name.json"
    done
    # Both writes at once, as a sync write at QD1 needs them on one disk.
    [[ -f "$WORK/disk.probe2" ]] || dd if=/dev/urandom of="$WORK/disk.probe2" bs=1M count=$((IMAGE_BYTES >> 20)) \
        oflag=direct status=none || die "cannot write $WORK/disk.probe2"
    if [[ -x "$WORK/disk_pair" ]]; then
        local out
        out=$("$WORK/disk_pair" "$WORK/disk.probe" "$WORK/disk.probe2" "$RUNTIME") || die "disk_pair failed"
        echo "$out" >&2
        $PY - "$ROUND" "$out" >> "$RECORDS" <<'EOF'
import json, sys
rnd, out = int(sys.argv[1]), sys.argv[2]
for line in out.splitlines():
    f = line.split()
    if f and f[0] == "pair":
        print(json.dumps({"system": "disk-pair", "workload": "randwrite-4k-qd1", "round": rnd,
                          "iops": 0, "mib_s": 0, "p50_us": float(f[2]), "p99_us": float(f[4]), "error": 0}))
EOF
    fi
    # Each workload on the disk alone, one writer and then two at once (fio,
    # io_uring, O_DIRECT, a file each, as large as the image: a smaller one
    # gives the disk's cache and layout an easier job and overstates the
    # ceiling): in async mode the mirror writes every byte the primary writes
    # to this same disk, so what one of two writers gets is what the disk
    # leaves the primary (the report's async ceiling).
    for spec in "${WORKLOADS[@]}"; do
        disk_fio disk-one "$spec" "$WORK/disk.probe"
        disk_fio disk-two "$spec" "$WORK/disk.probe" "$WORK/disk.probe2"
        disk_fio disk-two-commit "$spec" "$WORK/disk.probe" "$WORK/disk.probe2" +commit
    done
}

# disk_fio SYSTEM "NAME RW BS QD" FILE...: the workload straight on the disk
# (fio, io_uring, O_DIRECT), one writer per FILE at once; one record. A FILE
# of "+commit" adds no writer but a job that makes one 4 KiB write durable
# (fdatasync) every 5 s on a small file of its own, as the async mirror
# commits every 5 s (serve --async-commit-ms): on this disk every cache
# flush also makes the host write back what the other writers left in its
# cache (README).
disk_fio() {
    local system=$1 name rw bs qd
    read -r name rw bs qd <<< "$2"
    shift 2
    local jobs=() f
    for f in "$@"; do
        if [[ "$f" == +commit ]]; then
            jobs+=(--name=commit --filename="$WORK/disk.commit" --size=1M --rw=randwrite --bs=4k
                --iodepth=1 --fdatasync=1 --thinktime=5s --thinktime_blocks=1)
        else
            jobs+=(--name="$(basename "$f")" --filename="$f")
        fi
    done
    fio --ioengine=io_uring --direct=1 --rw="$rw" --bs="$bs" --iodepth="$qd" --size="$IMAGE_BYTES" \
        --runtime="$RUNTIME" --time_based --output-format=json "${jobs[@]}" \
        > "fio-$system-$name.json" 2> "fio-$system-$name.err" \
        || die "fio $system $name failed: $(cat "fio-$system-$name.err")"
    record "$system" "$name" "fio-$system-$name.json"
}

# run_blkmirror SYSTEM MODE TO [ARGS...]: replicate in MODE to the mirror at
# TO, with further replicate ARGS.
run_blkmirror() {
    local system=$1 mode=$2 to=$3
    shift 3
    local sock="$WORK/$system.sock"
    if [[ $SCAN_NEXT -eq 1 ]]; then
        set -- "$@" --scan
        SCAN_NEXT=0
    fi
    "$BIN" replicate src.img --identity p --to "$to" --peer "$MFP" --volume v --state state \
        --mode "$mode" --on-disconnect continue --nbd "unix:$sock" "$@" > "rep-$system.out" 2> "rep-$system.log" &
    local pid=$!
    PIDS+=($pid)
    for _ in $(seq 600); do grep -q '^nbd ' "rep-$system.out" 2>/dev/null && break; sleep 0.1; done
    grep -q '^nbd ' "rep-$system.out" || die "replicate ($system) did not start: $(tail -5 "rep-$system.log")"
    if [[ "$to" == "$MIRROR" ]]; then
        # Measure live replication, not the resync of what an earlier run
        # (the unreachable-mirror one) wrote.
        for _ in $(seq 1200); do
            "$BIN" status --state state --volume v --json 2>/dev/null | grep -q '"in_sync": *true' && break
            sleep 0.1
        done
    fi
    run_fio "$system" "$sock" $( [[ "$to" == "$MIRROR" ]] && echo replicating )
    kill -TERM "$pid"
    wait "$pid" || die "replicate ($system) exited with an error: $(tail -5 "rep-$system.log")"
}

qemu_round() {
    qemu-nbd -t -e 16 -f raw --cache=none --aio=io_uring -k "$WORK/qemu.sock" src.img 2> qemu.log &
    local qpid=$!
    PIDS+=($qpid)
    for _ in $(seq 50); do [[ -S "$WORK/qemu.sock" ]] && break; sleep 0.1; done
    run_fio qemu-nbd "$WORK/qemu.sock"
    kill "$qpid"; wait "$qpid" 2>/dev/null || true
    SCAN_NEXT=1
    rm -f "$WORK/qemu.sock"
}

for ROUND in $(seq "$ROUNDS"); do
    drop_image_cache
    log "round $ROUND of $ROUNDS: blkmirror replicate --mode sync$( [[ $ROUND -eq 1 ]] && echo ' (first start: full sync of the image)')"
    run_blkmirror blkmirror-sync sync "$MIRROR"
    log "round $ROUND: blkmirror replicate --mode sync --busy-poll-us $BUSY_POLL_US"
    run_blkmirror blkmirror-sync-poll sync "$MIRROR" --busy-poll-us "$BUSY_POLL_US"
    log "round $ROUND: blkmirror replicate --mode async"
    run_blkmirror blkmirror-async async "$MIRROR"
    log "round $ROUND: blkmirror replicate --mode async --busy-poll-us $BUSY_POLL_US"
    run_blkmirror blkmirror-async-poll async "$MIRROR" --busy-poll-us "$BUSY_POLL_US"
    log "round $ROUND: blkmirror replicate, mirror unreachable (the NBD + io_uring front-end alone)"
    run_blkmirror blkmirror-nomirror async 127.0.0.1:9
    log "round $ROUND: qemu-nbd --cache=none --aio=io_uring (no replication)"
    qemu_round
    log "round $ROUND: the disk alone (fio: 4 KiB O_DIRECT and O_DIRECT|O_DSYNC writes at QD1; each workload with one writer and with two)"
    run_disk
done
rm -f "$WORK/disk.probe" "$WORK/disk.probe2"

log "byte check: replica == source after the replicated runs"
"$BIN" replicate src.img --identity p --to "$MIRROR" --peer "$MFP" --volume v --state state \
    --mode sync --scan --nbd "unix:$WORK/final.sock" > rep-final.out 2> rep-final.log &
FPID=$!
PIDS+=($FPID)
for _ in $(seq 600); do
    "$BIN" status --state state --volume v --json 2>/dev/null | grep -q '"in_sync": *true' && break
    sleep 0.2
done
kill -TERM "$FPID"; wait "$FPID" || die "final replicate failed"
cmp src.img store/v.img || die "replica differs from the source"
echo '{"system":"check","workload":"replica-identical","ok":true}' >> "$RECORDS"

# The disk on the benchmark's own files, now that they are no longer needed:
# how fast this disk writes a file depends on where the file lies (see the
# README), and the probes above use files of their own. Each workload on the
# image alone, on the mirror's replica alone, and on both at once (what the
# primary and an async mirror ask of the disk).
log "the disk on the image and the replica themselves"
kill "$SERVE_PID"; wait "$SERVE_PID" 2>/dev/null || true
sync
for f in src.img store/v.img; do dd if="$f" iflag=nocache count=0 status=none || die "cannot drop the page cache of $f"; done
ROUND=1
for spec in "${WORKLOADS[@]}"; do
    disk_fio files-image "$spec" "$WORK/src.img"
    disk_fio files-replica "$spec" "$WORK/store/v.img"
    disk_fio files-two "$spec" "$WORK/src.img" "$WORK/store/v.img"
done

$PY "$REPO/bench/live_report.py" "$RECORDS" --out "$RESULTS/live"
