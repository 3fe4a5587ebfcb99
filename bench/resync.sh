#!/usr/bin/env bash
# Live resync benchmark: how fast `blkmirror replicate` brings a mirror that
# was away back in sync, against what this disk allows for the same I/O.
#
#   bench/resync.sh [--size-gib N] [--write-mib M] [--rounds R] [--resync-rate R]
#                   [--app-writes SECS] [--keep] [--no-build]
#
# Each round: the mirror (`blkmirror serve`, loopback QUIC, store on this
# disk) is stopped with SIGTERM; fio's nbd engine writes M MiB (default 512)
# of random 64 KiB blocks to the export of an asynchronous `replicate
# --on-disconnect continue` (each write marks its chunk); the page cache is
# dropped; the mirror is started again. The primary reconnects and resyncs
# the marked chunks while the mirror keeps their old contents in the undo
# log (README, "Undo log and recovery points"). Measured: the time from the
# mirror's undo point (the resync's start) to "replica is in sync" in its
# log, and the CPU time and disk bytes of both processes meanwhile.
#
# The floor: one fio run of four jobs at once that does the I/O such a
# resync needs at least, for the same chunks in the same order (fio replays
# an I/O log built from the chunks that differ): read them from the source
# (O_DIRECT), read their old contents from a replica-sized file (O_DIRECT),
# append them to a log file, and write them to that file (buffered, fsync
# at the end). The ratio is floor / blkmirror (1.0: at the disk's speed).
# After the last round the replica is compared with the source by `cmp`.
#
# --resync-rate R passes `--resync-rate R` to `replicate` (e.g. 40M).
# --app-writes SECS also runs fio's nbd engine against the export from the
# mirror's return on, for SECS seconds: 4 KiB random writes at QD1, as an
# application writing during the resync; its IOPS and latency are reported.

# Writes bench/results/resync.{json,md} and prints the table.
#
# Environment:
#   BENCH_DIR       work directory (default /var/tmp/blkmirror-resync-bench)
#   BLKMIRROR_BIN   binary to measure (default REPO/target/release/blkmirror)
set -euo pipefail

SIZE_GIB=1
WRITE_MIB=512
ROUNDS=3
KEEP=0
BUILD=1
RATE=0
APP_SECS=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --size-gib) SIZE_GIB="$2"; shift 2 ;;
        --write-mib) WRITE_MIB="$2"; shift 2 ;;
        --rounds) ROUNDS="$2"; shift 2 ;;
        --resync-rate) RATE="$2"; shift 2 ;;
        --app-writes) APP_SECS="$2"; shift 2 ;;
        --keep) KEEP=1; shift ;;
        --no-build) BUILD=0; shift ;;
        -h|--help) sed -n '2,34p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $1 (try --help)" >&2; exit 2 ;;
    esac
done
[[ "$SIZE_GIB" =~ ^[1-9][0-9]*$ ]] || { echo "--size-gib wants a positive integer" >&2; exit 2; }
[[ "$WRITE_MIB" =~ ^[1-9][0-9]*$ ]] || { echo "--write-mib wants a positive integer" >&2; exit 2; }
[[ "$ROUNDS" =~ ^[1-9][0-9]?$ ]] || { echo "--rounds wants an integer 1..99" >&2; exit 2; }
[[ "$APP_SECS" =~ ^[0-9]+$ ]] && (( APP_SECS <= 600 )) || { echo "--app-writes wants seconds, 0..600" >&2; exit 2; }
[[ "$RATE" =~ ^(0|[1-9][0-9]*[KMG])$ ]] || { echo "--resync-rate wants 0 or a number with K, M or G" >&2; exit 2; }
(( WRITE_MIB <= SIZE_GIB * 1024 )) || { echo "--write-mib is larger than the image" >&2; exit 2; }

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RESULTS="$REPO/bench/results"
WORK="${BENCH_DIR:-/var/tmp/blkmirror-resync-bench}"
BIN="${BLKMIRROR_BIN:-$REPO/target/release/blkmirror}"
PY=python3
CHUNK=65536

log() { printf '\n== %s\n' "$*" >&2; }
die() { echo "bench: $*" >&2; exit 1; }

SERVE_PID=
REP_PID=
cleanup() {
    set +e
    [[ -n "$REP_PID" ]] && kill -INT "$REP_PID" 2>/dev/null && wait "$REP_PID" 2>/dev/null
    [[ -n "$SERVE_PID" ]] && kill "$SERVE_PID" 2>/dev/null && wait "$SERVE_PID" 2>/dev/null
    if [[ $KEEP -eq 0 && -f "$WORK/.blkmirror-bench" ]]; then rm -rf "$WORK"; fi
}
trap cleanup EXIT

for t in fio "$PY"; do
    command -v "$t" >/dev/null || die "$t is missing (apt-get install -y fio python3)"
done
fio --enghelp=nbd >/dev/null 2>&1 || die "this fio has no nbd engine"
[[ $(id -u) -eq 0 ]] || die "run as root (it drops the page cache between steps)"

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
RECORDS="$WORK/records.jsonl"
: > "$RECORDS"

drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
io_bytes() { awk '/^read_bytes/ {r=$2} /^write_bytes/ {w=$2} END {print r, w}' "/proc/$1/io"; }
status_json() { "$BIN" status --state state --json 2>/dev/null || echo '{}'; }
# status_field NAME: one field of the primary's status.
status_field() {
    status_json | $PY -c 'import json,sys
d=json.load(sys.stdin); d=d[0] if isinstance(d,list) else d
print(d.get(sys.argv[1], ""))' "$1"
}

PORT_FILE="$WORK/serve.out"
start_serve() { # LOG
    "$BIN" serve --identity m --listen "${MIRROR:-127.0.0.1:0}" --store store --allow "$PFP" > "$PORT_FILE" 2> "$1" &
    SERVE_PID=$!
    for _ in $(seq 100); do [[ -s "$PORT_FILE" ]] && break; sleep 0.1; done
    [[ -s "$PORT_FILE" ]] || die "serve did not start: $(cat "$1")"
    MIRROR=$(sed -n 's/^listening //p' "$PORT_FILE")
}
stop_serve() {
    kill "$SERVE_PID"
    wait "$SERVE_PID" 2>/dev/null || true
    SERVE_PID=
}
wait_live() { # SECONDS
    local end=$((SECONDS + $1))
    while (( SECONDS < end )); do
        [[ "$(status_field phase)" == live ]] && return 0
        sleep 0.2
    done
    die "the primary did not get back to live within $1 s: $(tail -3 rep.log)"
}

log "image: ${SIZE_GIB} GiB of random data"
head -c $((SIZE_GIB << 30)) /dev/urandom > src.img
"$BIN" init p >/dev/null
MFP=$("$BIN" init m)
PFP=$("$BIN" fingerprint p)
start_serve serve-0.log
"$BIN" replicate src.img --identity p --to "$MIRROR" --peer "$MFP" --volume v --state state \
    --mode async --on-disconnect continue --resync-rate "$RATE" --nbd "unix:$WORK/nbd.sock" > rep.out 2> rep.log &
REP_PID=$!
log "initial full sync to the mirror"
for _ in $(seq 600); do [[ -S nbd.sock ]] && break; sleep 0.1; done
[[ -S nbd.sock ]] || die "replicate did not start: $(tail -5 rep.log)"
wait_live 300
# A copy for the floor's replica-side I/O (its own place on the disk, like
# the replica, which the full sync wrote afresh).
cp src.img floor-replica.img

for round in $(seq 1 "$ROUNDS"); do
    log "round $round: mirror stopped, ${WRITE_MIB} MiB of random 64 KiB writes"
    stop_serve
    fio --name=w --ioengine=nbd --uri="nbd+unix:///blkmirror?socket=$WORK/nbd.sock" --rw=randwrite \
        --bs=64k --size=$((SIZE_GIB << 30)) --io_size=$((WRITE_MIB << 20)) --iodepth=16 \
        --randseed=$((round * 7919)) --output=fio-w-$round.txt || die "fio writes failed"
    sleep 0.5
    DIRTY=$(status_field dirty_chunks)
    # The chunks that differ, in order: the floor replays them.
    $PY - src.img store/v.img "$CHUNK" "$WORK" > floor-$round.json <<'EOF'
import json, sys
src, rep, chunk, work = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
diff = []
with open(src, 'rb') as a, open(rep, 'rb') as b:
    i = 0
    while True:
        x, y = a.read(chunk), b.read(chunk)
        if not x:
            break
        if x != y:
            diff.append(i)
        i += 1
def iolog(path, file, op):
    with open(path, 'w') as f:
        f.write(f"fio version 2 iolog\n{file} add\n{file} open\n")
        for c in diff:
            f.write(f"{file} {op} {c * chunk} {chunk}\n")
        f.write(f"{file} close\n")
iolog(f"{work}/src-read.iolog", f"{work}/src.img", "read")
iolog(f"{work}/old-read.iolog", f"{work}/floor-replica.img", "read")
iolog(f"{work}/rep-write.iolog", f"{work}/floor-replica.img", "write")
print(json.dumps({"differing_chunks": len(diff)}))
EOF
    DIFFERING=$($PY -c 'import json,sys; print(json.load(open(sys.argv[1]))["differing_chunks"])' floor-$round.json)
    drop_caches

    log "round $round: mirror back; resync of $DIRTY marked chunks ($DIFFERING differ)"
    start_serve serve-$round.log
    C0S=$(cpu_ticks "$SERVE_PID"); C0P=$(cpu_ticks "$REP_PID")
    read -r R0S W0S < <(io_bytes "$SERVE_PID"); read -r R0P W0P < <(io_bytes "$REP_PID")
    APP_PID=
    rm -f app-$round.json
    if (( APP_SECS > 0 )); then
        fio --name=app --ioengine=nbd --uri="nbd+unix:///blkmirror?socket=$WORK/nbd.sock" \
            --rw=randwrite --bs=4k --size=$((SIZE_GIB << 30)) --iodepth=1 --time_based \
            --runtime="$APP_SECS" --randseed=$((round * 104729)) \
            --output-format=json --output=app-$round.json &
        APP_PID=$!
    fi
    wait_live 300
    C1S=$(cpu_ticks "$SERVE_PID"); C1P=$(cpu_ticks "$REP_PID")
    read -r R1S W1S < <(io_bytes "$SERVE_PID"); read -r R1P W1P < <(io_bytes "$REP_PID")
    # Chunks the resync sent: more than were marked when writes during it
    # mark chunks again (an application writing, a pull-ahead).
    SENT=$(status_field resync_done)
    if [[ -n "$APP_PID" ]]; then
        wait "$APP_PID" || die "the application's fio writes failed"
        wait_live 300
    fi

    log "round $round: the floor (fio: the same chunks read, logged and written)"
    drop_caches
    rm -f floor-undo.log
    fio --output-format=json --output=floor-fio-$round.json \
        --name=src-read --read_iolog=src-read.iolog --ioengine=io_uring --direct=1 --iodepth=8 \
        --name=old-read --read_iolog=old-read.iolog --ioengine=io_uring --direct=1 --iodepth=8 \
        --name=undo-append --filename=floor-undo.log --rw=write --bs=64k --size=$((DIFFERING * CHUNK)) \
            --ioengine=psync --end_fsync=1 \
        --name=replica-write --read_iolog=rep-write.iolog --ioengine=psync --end_fsync=1 \
        || die "the floor's fio run failed"
    $PY - "$round" "$DIRTY" "$DIFFERING" serve-$round.log floor-fio-$round.json \
        "$((C1S - C0S))" "$((C1P - C0P))" "$((R1S - R0S))" "$((W1S - W0S))" "$((R1P - R0P))" "$((W1P - W0P))" \
        "$RATE" app-$round.json "$APP_SECS" "$SENT" >> "$RECORDS" <<'EOF'
import datetime, json, os, sys
rnd, dirty, differing, slog, ffio = sys.argv[1:6]
cs, cp, rs, ws, rp, wp = (int(x) for x in sys.argv[6:12])
rate, app, app_secs, sent = sys.argv[12], sys.argv[13], int(sys.argv[14]), int(sys.argv[15] or 0)
def at(needle):
    for line in open(slog):
        if needle in line:
            return datetime.datetime.fromisoformat(line.split()[0].replace('Z', '+00:00'))
    sys.exit(f"bench: '{needle}' is not in {slog}")
secs = (at('replica is in sync') - at('kept the last consistent state')).total_seconds()
t = open(ffio).read()
j, _ = json.JSONDecoder().raw_decode(t[t.find('{'):])
floor = max(job["job_runtime"] for job in j["jobs"]) / 1000
extra = {}
if os.path.exists(app):
    t = open(app).read()
    a, _ = json.JSONDecoder().raw_decode(t[t.find('{'):])
    w = a["jobs"][0]["write"]
    pct = w["clat_ns"]["percentile"]
    extra = {"app_secs": app_secs, "app_iops": w["iops"], "app_p50_us": pct["50.000000"] / 1000, "app_p99_us": pct["99.000000"] / 1000}
print(json.dumps({"round": int(rnd), "marked_chunks": int(dirty), "differing_chunks": int(differing),
                  "resync_rate": rate, "sent_chunks": sent, **extra,
                  "seconds": secs, "floor_seconds": floor,
                  "mirror_cpu_s": cs / 100, "primary_cpu_s": cp / 100,
                  "mirror_read_bytes": rs, "mirror_write_bytes": ws,
                  "primary_read_bytes": rp, "primary_write_bytes": wp}))
EOF
    tail -1 "$RECORDS" >&2
done

log "stopping; comparing the replica with the source"
kill -INT "$REP_PID"; wait "$REP_PID" 2>/dev/null || true; REP_PID=
stop_serve
if cmp -s src.img store/v.img; then IDENTICAL=true; else IDENTICAL=false; fi

$PY - "$RECORDS" "$RESULTS/resync" "$IDENTICAL" "$SIZE_GIB" "$WRITE_MIB" "$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)" "$BIN" <<'EOF'
import json, statistics, sys, datetime
recs = [json.loads(l) for l in open(sys.argv[1])]
out, identical, size_gib, write_mib, commit, binary = sys.argv[2], sys.argv[3] == "true", sys.argv[4], sys.argv[5], sys.argv[6], sys.argv[7]
MB = 1e6
rows = []
for r in recs:
    mib = r["marked_chunks"] * 65536 / 2**20
    app = ""
    if "app_iops" in r:
        app = " {:.0f} IOPS, p50 {:.0f} µs, p99 {:.0f} µs |".format(r["app_iops"], r["app_p50_us"], r["app_p99_us"])
    rows.append("| {round} | {marked_chunks} ({differing_chunks} differ) | {sent} | {s:.2f} s | {rate:.0f} MB/s | {f:.2f} s | {ratio:.2f} | {mc:.2f} s | {mr:.0f} / {mw:.0f} MB | {pc:.2f} s | {pr:.0f} MB |".format(
        s=r["seconds"], rate=r["marked_chunks"] * 65536 / MB / r["seconds"], f=r["floor_seconds"],
        ratio=r["floor_seconds"] / r["seconds"], mc=r["mirror_cpu_s"], mr=r["mirror_read_bytes"] / MB,
        mw=r["mirror_write_bytes"] / MB, pc=r["primary_cpu_s"], pr=r["primary_read_bytes"] / MB, sent=r.get("sent_chunks", "?"), **r) + app)
apps = any("app_iops" in r for r in recs)
rate = recs[0].get("resync_rate", "0") if recs else "0"
med = statistics.median(r["seconds"] for r in recs)
medf = statistics.median(r["floor_seconds"] for r in recs)
md = [f"# Live resync ({datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, checkout {commit}, binary {binary})", "",
      f"{size_gib} GiB image of random data; per round {write_mib} MiB of random 64 KiB writes while the mirror was stopped.",
      f"`replicate --resync-rate {rate}`" + (f"; fio writing 4 KiB random blocks at QD1 to the export for {recs[0].get('app_secs', '?')} s from the mirror's return." if apps else "."),
      "Ratio: the floor's time over blkmirror's (1.0 = at the disk's speed for the same I/O).", "",
      "| round | chunks marked | chunks sent | blkmirror | rate | floor (fio) | ratio | mirror CPU | mirror read / written | primary CPU | primary read |" + (" application writes |" if apps else ""),
      "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |" + (" ---: |" if apps else "")] + rows + ["",
      f"Median: blkmirror {med:.2f} s, floor {medf:.2f} s, ratio {medf / med:.2f}. Replica identical to the source after the last round: {'yes' if identical else 'NO'}."]
open(out + ".md", "w").write("\n".join(md) + "\n")
json.dump({"commit": commit, "binary": binary, "size_gib": int(size_gib), "write_mib": int(write_mib), "identical": identical, "rounds": recs},
          open(out + ".json", "w"), indent=1)
print("\n".join(md))
if not identical:
    sys.exit("bench: the replica differs from the source")
EOF
