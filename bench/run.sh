#!/usr/bin/env bash
# blkmirror side-by-side benchmark. See bench/README.md.
#
#   bench/run.sh [--size-gib N] [--keep] [--no-build] [--no-sparse]
#
# Environment:
#   BENCH_DIR       work directory (default /var/tmp/blkmirror-bench); removed at the
#                   end unless --keep. Must be on a filesystem with O_DIRECT and holes.
#   BLKMIRROR_BIN   blkmirror binary to measure (default REPO/target/release/blkmirror)
#   RSYNC_PORT      rsync daemon port (default 18730; another free one if taken)
#   BENCH_SEED      seed for the mixed image (default 20241124)
#   SPARSE_REPS     rounds of the sparse differential (default 3; median reported)
#   BENCH_ROUNDS    rounds of the floor, the blkmirror and qemu-img full syncs and
#                   the two differentials (default 3; the median run is reported,
#                   every run's seconds are in latest.json)
set -euo pipefail

SIZE_GIB=2
KEEP=0
BUILD=1
SPARSE=1
while [[ $# -gt 0 ]]; do
    case "$1" in
        --size-gib) SIZE_GIB="$2"; shift 2 ;;
        --size-gib=*) SIZE_GIB="${1#*=}"; shift ;;
        --keep) KEEP=1; shift ;;
        --no-build) BUILD=0; shift ;;
        --no-sparse) SPARSE=0; shift ;;
        -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $1 (try --help)" >&2; exit 2 ;;
    esac
done
[[ "$SIZE_GIB" =~ ^[1-9][0-9]*$ ]] || { echo "--size-gib wants a positive integer" >&2; exit 2; }
[[ $(id -u) -eq 0 ]] || { echo "run as root (drop_caches, qemu-nbd, rsync daemon uid=root)" >&2; exit 2; }

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH="$REPO/bench"
RESULTS="$BENCH/results"
WORK="${BENCH_DIR:-/var/tmp/blkmirror-bench}"
BIN="${BLKMIRROR_BIN:-$REPO/target/release/blkmirror}"
SEED="${BENCH_SEED:-20241124}"
ROUNDS="${BENCH_ROUNDS:-3}"
[[ "$ROUNDS" =~ ^[1-9][0-9]?$ ]] || { echo "BENCH_ROUNDS wants an integer 1..99" >&2; exit 2; }
GiB=$((1 << 30))
SIZE=$((SIZE_GIB * GiB))
CHUNK=65536
PY=python3

log() { printf '\n== %s\n' "$*" >&2; }
note() { printf '   %s\n' "$*" >&2; }
die() { echo "bench: $*" >&2; exit 1; }

# --------------------------------------------------------------------------------
# Cleanup: every daemon we start is listed here (or in a pid file below).
PIDS=()
cleanup() {
    local rc=$?
    set +e
    for p in "${PIDS[@]}"; do
        if kill -0 "$p" 2>/dev/null; then kill "$p" 2>/dev/null; fi
    done
    for f in "$WORK/qemu-nbd.pid" "$WORK/rsyncd.pid"; do
        if [[ -s "$f" ]]; then
            local p; p=$(cat "$f")
            kill -0 "$p" 2>/dev/null && kill "$p" 2>/dev/null
        fi
    done
    wait 2>/dev/null
    if [[ $KEEP -eq 0 && -f "$WORK/.blkmirror-bench" ]]; then
        rm -rf "$WORK"
    elif [[ $KEEP -eq 1 ]]; then
        echo "bench: work directory kept: $WORK" >&2
    fi
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --------------------------------------------------------------------------------
log "prerequisites"
need_pkgs=()
command -v fio >/dev/null || need_pkgs+=(fio)
command -v rsync >/dev/null || need_pkgs+=(rsync)
command -v nbdcopy >/dev/null || need_pkgs+=(libnbd-bin)
{ command -v qemu-img && command -v qemu-nbd; } >/dev/null || need_pkgs+=(qemu-utils)
[[ -x /usr/bin/time ]] || need_pkgs+=(time)
command -v cmp >/dev/null || need_pkgs+=(diffutils)
if [[ ${#need_pkgs[@]} -gt 0 ]]; then
    note "installing: ${need_pkgs[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y "${need_pkgs[@]}" >/dev/null \
        || { apt-get update >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y "${need_pkgs[@]}" >/dev/null; } \
        || die "cannot install ${need_pkgs[*]}"
fi
if ! $PY -c 'import matplotlib' 2>/dev/null; then
    note "matplotlib missing: trying pip install matplotlib"
    $PY -m pip install --quiet matplotlib >/dev/null 2>&1 || note "pip install matplotlib failed: the plot will be skipped"
fi

if [[ $BUILD -eq 1 ]]; then
    log "cargo build --release"
    (cd "$REPO" && cargo build --release 2>&1 | tail -3) >&2
fi
[[ -x "$BIN" ]] || die "no blkmirror binary at $BIN"

# --------------------------------------------------------------------------------
log "work directory $WORK"
if [[ -e "$WORK" ]]; then
    [[ -f "$WORK/.blkmirror-bench" ]] || die "$WORK exists and was not made by this script; remove it or set BENCH_DIR"
    rm -rf "$WORK"
fi
mkdir -p "$WORK" "$RESULTS"
touch "$WORK/.blkmirror-bench"
need_kib=$(( (SIZE * 5 + 2 * GiB) / 1024 ))
avail_kib=$(df -Pk "$WORK" | awk 'NR==2{print $4}')
[[ $avail_kib -gt $need_kib ]] || die "need ~$((need_kib / 1048576)) GiB free in $WORK, have $((avail_kib / 1048576)) GiB"
REC="$WORK/records.jsonl"
: > "$REC"
LOGS="$WORK/logs"
mkdir -p "$LOGS"

# record key=value ... -> one JSON line. Values that look like numbers/bools/null
# become numbers/bools/null; a value starting with '{' or '[' is parsed as JSON.
record() {
    $PY - "$REC" "$@" <<'EOF'
import json, sys
out = {}
for kv in sys.argv[2:]:
    k, _, v = kv.partition("=")
    if v in ("true", "false", "null"):
        out[k] = json.loads(v)
    elif v[:1] in "{[" and v:
        out[k] = json.loads(v)
    else:
        try:
            out[k] = int(v)
        except ValueError:
            try:
                out[k] = float(v)
            except ValueError:
                out[k] = v
with open(sys.argv[1], "a") as f:
    f.write(json.dumps(out) + "\n")
EOF
}

drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.3f", b-a}'; }
free_port() { $PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
alloc_bytes() { stat -c '%b %B' "$1" | awk '{printf "%d", $1*$2}'; }
# cpu_s PID : user+system CPU seconds of a live process
cpu_s() { awk -v hz="$(getconf CLK_TCK)" '{printf "%.2f", ($14+$15)/hz}' "/proc/$1/stat" 2>/dev/null || echo null; }
vmhwm_kib() { awk '/^VmHWM:/{print $2}' "/proc/$1/status" 2>/dev/null || echo null; }

# run_timed NAME cmd... : wall time, peak RSS (KiB) via /usr/bin/time -f %M, rc;
# stdout/stderr in $LOGS/NAME.{out,err}. Then times a sync(1) (FLUSH_S): what the
# tool left dirty in the page cache and still has to reach the disk.
run_timed() {
    local name=$1; shift
    local t0 t1
    t0=$(now)
    set +e
    T_LOAD=$(cut -d' ' -f1 /proc/loadavg)
    /usr/bin/time -o "$LOGS/$name.time" -f '%M %U %S' "$@" > "$LOGS/$name.out" 2> "$LOGS/$name.err"
    T_RC=$?
    set -e
    t1=$(now)
    T_S=$(elapsed "$t0" "$t1")
    read -r T_RSS T_USR T_SYS < <(tail -n 1 "$LOGS/$name.time") || true
    [[ "$T_RSS" =~ ^[0-9]+$ ]] || T_RSS=null
    T_CPU=$(awk -v u="${T_USR:-0}" -v s="${T_SYS:-0}" 'BEGIN{printf "%.2f", u+s}')
    t0=$(now); sync; t1=$(now)
    FLUSH_S=$(elapsed "$t0" "$t1")
    note "$name: ${T_S}s rc=$T_RC peak_rss=${T_RSS}KiB cpu=${T_CPU}s load1=${T_LOAD} (then sync ${FLUSH_S}s)"
    if [[ $T_RC -ne 0 ]]; then
        note "$name FAILED; last lines of stderr:"
        tail -n 5 "$LOGS/$name.err" | sed 's/^/      /' >&2
    fi
}

# verify A B : cmp, prints true/false
# rsync_wire NAME : bytes sent + received from rsync --stats
rsync_wire() {
    awk -F': ' '/^Total bytes (sent|received):/{gsub(",","",$2); n+=$2} END{print n+0}' "$LOGS/$1.out"
}

verify() {
    if cmp -s "$1" "$2"; then echo true; else note "MISMATCH: $1 vs $2"; echo false; fi
}

# --------------------------------------------------------------------------------
log "environment"
ENV_JSON="$WORK/env.json"
$PY - "$ENV_JSON" "$REPO" "$BIN" "$WORK" "$SIZE" <<'EOF'
import json, os, platform, subprocess, sys
path, repo, binp, work, size = sys.argv[1:]
def sh(*cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception as e:
        return f"? ({e})"
cpu = "?"
try:
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip(); break
except OSError:
    pass
mem = sh("awk", "/MemTotal/{print $2}", "/proc/meminfo")
env = {
    "date": sh("date", "-u", "+%Y-%m-%dT%H:%M:%SZ"),
    "host_kernel": platform.release(),
    "cpu": cpu,
    "cpus": os.cpu_count(),
    "mem_gib": round(int(mem or 0) / 1048576, 1),
    "work_dir": work,
    "work_fs": sh("findmnt", "-no", "FSTYPE,SOURCE", "-T", work),
    "size_bytes": int(size),
    "blkmirror_bin": binp,
    "blkmirror_version": sh(binp, "--version"),
    "blkmirror_git": sh("git", "-C", repo, "describe", "--always", "--dirty")
        if os.path.realpath(binp).startswith(os.path.realpath(repo) + "/") else f"binary {binp}",
    "fio": sh("fio", "--version"),
    "qemu_img": sh("qemu-img", "--version").splitlines()[0] if sh("qemu-img", "--version") else "?",
    "nbdcopy": sh("nbdcopy", "--version").splitlines()[0] if sh("nbdcopy", "--version") else "?",
    "rsync": sh("rsync", "--version").splitlines()[0] if sh("rsync", "--version") else "?",
}
json.dump(env, open(path, "w"), indent=1)
for k, v in env.items():
    print(f"   {k}: {v}", file=sys.stderr)
EOF

# --------------------------------------------------------------------------------
log "source image: ${SIZE_GIB} GiB mixed (seed $SEED)"
IMG="$WORK/source.img"
$PY "$BENCH/mkimage.py" mixed "$IMG" "$SIZE" --seed "$SEED" > "$WORK/image.json"
note "$(cat "$WORK/image.json")"
cp "$WORK/image.json" "$WORK/image_mixed.json"

# --------------------------------------------------------------------------------
# The floor, blkmirror's full sync and qemu-img's are run ROUNDS times,
# interleaved (floor, blkmirror, qemu-img, floor, ...), so that a slow
# spell of this shared machine hits all of them; the median run is reported.
floor_run() {
    local rep=$1
    log "floor: fio io_uring O_DIRECT sequential read of the source (round $rep)"
    drop_caches
    run_timed "floor-$rep" fio --name=floor --filename="$IMG" --readonly --rw=read --bs=1M --iodepth=32 \
        --ioengine=io_uring --direct=1 --size="$SIZE" --output-format=json
    FLOOR_S=$($PY -c 'import json,sys; d=json.load(open(sys.argv[1])); r=d["jobs"][0]["read"]; print(round(r["runtime"]/1000,3))' "$LOGS/floor-$rep.out" 2>/dev/null || echo "$T_S")
    record workload=floor tool="fio io_uring read once" seconds="$FLOOR_S" wall_seconds="$T_S" rep="$rep" \
        source_bytes="$SIZE" rss_kib="$T_RSS" cpu_s="$T_CPU" load1="$T_LOAD" rc="$T_RC" verified=null \
        cmd="fio --name=floor --filename=IMG --readonly --rw=read --bs=1M --iodepth=32 --ioengine=io_uring --direct=1 --size=$SIZE"
}

# --------------------------------------------------------------------------------
log "blkmirror identities"
"$BIN" init "$WORK/id-primary" > "$LOGS/init-primary.out"
"$BIN" init "$WORK/id-mirror" > "$LOGS/init-mirror.out"
FP_P=$("$BIN" fingerprint "$WORK/id-primary")
FP_M=$("$BIN" fingerprint "$WORK/id-mirror")
note "primary $FP_P"
note "mirror  $FP_M"

SERVE_PID=""
SERVE_PORT=""
# serve_start STORE NAME
serve_start() {
    local store=$1 name=$2
    mkdir -p "$store"
    "$BIN" serve --identity "$WORK/id-mirror" --listen 127.0.0.1:0 --store "$store" \
        --allow "$FP_P" > "$LOGS/$name.serve.out" 2> "$LOGS/$name.serve.err" &
    SERVE_PID=$!
    PIDS+=("$SERVE_PID")
    local i
    for i in $(seq 1 200); do
        SERVE_PORT=$(grep -o 'listening 127\.0\.0\.1:[0-9]*' "$LOGS/$name.serve.out" 2>/dev/null | head -n1 | cut -d: -f2 || true)
        [[ -n "$SERVE_PORT" ]] && return 0
        kill -0 "$SERVE_PID" 2>/dev/null || break
        sleep 0.05
    done
    cat "$LOGS/$name.serve.err" >&2
    die "blkmirror serve did not start"
}
# serve_stop -> SERVE_HWM (KiB)
serve_stop() {
    SERVE_HWM=$(vmhwm_kib "$SERVE_PID")
    SERVE_CPU=$(cpu_s "$SERVE_PID")
    SERVE_EXIT=running
    if kill -0 "$SERVE_PID" 2>/dev/null; then
        kill "$SERVE_PID" 2>/dev/null || true
        wait "$SERVE_PID" 2>/dev/null || true
    else
        set +e; wait "$SERVE_PID" 2>/dev/null; SERVE_EXIT=$?; set -e
        note "blkmirror serve had already exited (status $SERVE_EXIT$( [[ $SERVE_EXIT -gt 128 ]] && echo ", signal $((SERVE_EXIT - 128))")) before the end of the run"
    fi
    SERVE_PID=""
}

# bm_sync NAME SOURCE VOLUME STORE STATE : one sync against a freshly started
# server, page cache dropped. Sets T_*, SERVE_HWM, BM_JSON.
bm_sync() {
    local name=$1 src=$2 vol=$3 store=$4 state=$5
    shift 5
    serve_start "$store" "$name"
    drop_caches
    run_timed "$name" "$BIN" sync "$src" --identity "$WORK/id-primary" --to "127.0.0.1:$SERVE_PORT" \
        --peer "$FP_M" --volume "$vol" --state "$state" --json --no-progress "$@"
    serve_stop
    BM_JSON=$(grep -m1 '^{' "$LOGS/$name.out" || echo '{}')
    note "$name: $BM_JSON; serve VmHWM ${SERVE_HWM} KiB"
}
BM_CMD="blkmirror sync IMG --identity P --to 127.0.0.1:PORT --peer FP_MIRROR --volume V --state STATE --json --no-progress (serve --listen 127.0.0.1:0 restarted per run)"

# --------------------------------------------------------------------------------
BM_STORE="$WORK/bm-store"
BM_STATE="$WORK/bm-state"
bm_full_run() {
    local rep=$1
    log "full sync: blkmirror (round $rep)"
    rm -rf "$BM_STORE" "$BM_STATE"
    bm_sync "full-blkmirror-$rep" "$IMG" bench "$BM_STORE" "$BM_STATE"
    OK=$( [[ $T_RC -eq 0 ]] && verify "$IMG" "$BM_STORE/bench.img" || echo false )
    record workload=full tool="blkmirror (QUIC+TLS)" seconds="$T_S" source_bytes="$SIZE" rss_kib="$T_RSS" cpu_s="$T_CPU" load1="$T_LOAD" \
        server_rss_kib="$SERVE_HWM" server_cpu_s="$SERVE_CPU" serve_exit="$SERVE_EXIT" flush_seconds="$FLUSH_S" rc="$T_RC" verified="$OK" blkmirror="$BM_JSON" \
        target_alloc_bytes="$(alloc_bytes "$BM_STORE/bench.img" 2>/dev/null || echo null)" cmd="$BM_CMD" rep="$rep"
}

# The same full sync without lz4 (what a fast LAN would use). Named so that
# it is not taken as the blkmirror baseline of the ratios.
log "full sync: blkmirror --no-compress"
bm_sync full-blkmirror-raw "$IMG" bench "$WORK/bm-store-raw" "$WORK/bm-state-raw" --no-compress
OK=$( [[ $T_RC -eq 0 ]] && verify "$IMG" "$WORK/bm-store-raw/bench.img" || echo false )
record workload=full tool="lz4 off: blkmirror --no-compress" seconds="$T_S" source_bytes="$SIZE" rss_kib="$T_RSS" cpu_s="$T_CPU" load1="$T_LOAD" \
    server_rss_kib="$SERVE_HWM" server_cpu_s="$SERVE_CPU" serve_exit="$SERVE_EXIT" flush_seconds="$FLUSH_S" rc="$T_RC" verified="$OK" blkmirror="$BM_JSON" \
    cmd="$BM_CMD --no-compress"
rm -rf "$WORK/bm-store-raw" "$WORK/bm-state-raw"

# --------------------------------------------------------------------------------
# qemu-nbd export of a fresh raw target on 127.0.0.1 TCP.
NBD_TARGET="$WORK/nbd-target.img"
NBD_OPTS_USED=""
NBD_PID=""
nbd_start() {
    rm -f "$NBD_TARGET" "$WORK/qemu-nbd.pid"
    truncate -s "$SIZE" "$NBD_TARGET"
    NBD_PORT=$(free_port)
    local opts
    for opts in "--cache=none --aio=io_uring" "--cache=none --aio=native" ""; do
        # shellcheck disable=SC2086
        if qemu-nbd --fork --persistent --pid-file="$WORK/qemu-nbd.pid" -f raw -b 127.0.0.1 -p "$NBD_PORT" \
                $opts "$NBD_TARGET" 2> "$LOGS/qemu-nbd.err"; then
            NBD_OPTS_USED="-f raw -b 127.0.0.1 -p PORT --persistent --fork ${opts:-(default cache/aio)}"
            NBD_PID=$(cat "$WORK/qemu-nbd.pid")
            return 0
        fi
        note "qemu-nbd with '$opts' failed: $(head -n1 "$LOGS/qemu-nbd.err")"
    done
    die "qemu-nbd does not start"
}
nbd_stop() {
    NBD_HWM=$(vmhwm_kib "$NBD_PID")
    NBD_CPU=$(cpu_s "$NBD_PID")
    kill "$NBD_PID" 2>/dev/null || true
    local i
    for i in $(seq 1 100); do kill -0 "$NBD_PID" 2>/dev/null || break; sleep 0.05; done
    rm -f "$WORK/qemu-nbd.pid"
}

qemu_img_run() {
    local rep=$1
    log "full sync: qemu-img convert -> qemu-nbd (round $rep)"
    nbd_start
    note "qemu-nbd $NBD_OPTS_USED"
    drop_caches
    run_timed "full-qemu-img-$rep" qemu-img convert -n -f raw -O raw "$IMG" "nbd://127.0.0.1:$NBD_PORT"
    nbd_stop
    OK=$( [[ $T_RC -eq 0 ]] && verify "$IMG" "$NBD_TARGET" || echo false )
    record workload=full tool="qemu-img convert -> qemu-nbd" seconds="$T_S" source_bytes="$SIZE" rss_kib="$T_RSS" cpu_s="$T_CPU" load1="$T_LOAD" \
        server_rss_kib="$NBD_HWM" server_cpu_s="$NBD_CPU" flush_seconds="$FLUSH_S" rc="$T_RC" verified="$OK" \
        target_alloc_bytes="$(alloc_bytes "$NBD_TARGET")" rep="$rep" \
        cmd="qemu-img convert -n -f raw -O raw IMG nbd://127.0.0.1:PORT; server: qemu-nbd $NBD_OPTS_USED"
}

for rep in $(seq 1 "$ROUNDS"); do
    floor_run "$rep"
    bm_full_run "$rep"
    qemu_img_run "$rep"
done

log "full sync: nbdcopy -> qemu-nbd"
nbd_start
drop_caches
run_timed full-nbdcopy nbdcopy "$IMG" "nbd://127.0.0.1:$NBD_PORT"
nbd_stop
OK=$( [[ $T_RC -eq 0 ]] && verify "$IMG" "$NBD_TARGET" || echo false )
record workload=full tool="nbdcopy -> qemu-nbd" seconds="$T_S" source_bytes="$SIZE" rss_kib="$T_RSS" cpu_s="$T_CPU" load1="$T_LOAD" \
    server_rss_kib="$NBD_HWM" server_cpu_s="$NBD_CPU" flush_seconds="$FLUSH_S" rc="$T_RC" verified="$OK" \
    target_alloc_bytes="$(alloc_bytes "$NBD_TARGET")" \
    cmd="nbdcopy IMG nbd://127.0.0.1:PORT; server: qemu-nbd $NBD_OPTS_USED"
rm -f "$NBD_TARGET"

# --------------------------------------------------------------------------------
log "full sync: rsync daemon"
RSYNC_PORT="${RSYNC_PORT:-18730}"
if (exec 3<>"/dev/tcp/127.0.0.1/$RSYNC_PORT") 2>/dev/null; then
    note "port $RSYNC_PORT is taken; using another"
    RSYNC_PORT=$(free_port)
fi
RSYNC_MOD="$WORK/rsync-mod"
mkdir -p "$RSYNC_MOD"
cat > "$WORK/rsyncd.conf" <<EOF
pid file = $WORK/rsyncd.pid
log file = $LOGS/rsyncd.log
port = $RSYNC_PORT
address = 127.0.0.1
use chroot = no
uid = root
gid = root
[mod]
    path = $RSYNC_MOD
    read only = false
EOF
rsync --daemon --config="$WORK/rsyncd.conf"
for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$RSYNC_PORT") 2>/dev/null && break
    sleep 0.05
done
[[ -s "$WORK/rsyncd.pid" ]] || die "rsync daemon did not start (see $LOGS/rsyncd.log)"
RSYNC_URL="rsync://127.0.0.1:$RSYNC_PORT/mod/"
drop_caches
run_timed full-rsync rsync --inplace --stats "$IMG" "$RSYNC_URL"
OK=$( [[ $T_RC -eq 0 ]] && verify "$IMG" "$RSYNC_MOD/source.img" || echo false )
record workload=full tool="rsync daemon" seconds="$T_S" source_bytes="$SIZE" rss_kib="$T_RSS" cpu_s="$T_CPU" load1="$T_LOAD" \
    server_rss_kib=null flush_seconds="$FLUSH_S" rc="$T_RC" verified="$OK" wire_bytes="$(rsync_wire full-rsync)" \
    target_alloc_bytes="$(alloc_bytes "$RSYNC_MOD/source.img" 2>/dev/null || echo null)" \
    cmd="rsync --inplace --stats IMG rsync://127.0.0.1:$RSYNC_PORT/mod/ (rsyncd: use chroot=no, uid=root, read only=false)"

# --------------------------------------------------------------------------------
# Each round changes another 1% of the chunks; blkmirror and rsync then
# both bring their copy (identical before the change) up to date.
for rep in $(seq 1 "$ROUNDS"); do
    log "change 1% of the 64 KiB chunks of the source (round $rep)"
    $PY "$BENCH/mkimage.py" mutate "$IMG" --percent 1 --chunk "$CHUNK" --seed $((98 + rep)) > "$WORK/mutate.json"
    note "$(cat "$WORK/mutate.json")"
    CHANGED=$($PY -c 'import json,sys; print(json.load(open(sys.argv[1]))["changed_chunks"])' "$WORK/mutate.json")
    CHANGED_BYTES=$((CHANGED * CHUNK))

    log "differential: blkmirror (round $rep)"
    bm_sync "diff-blkmirror-$rep" "$IMG" bench "$BM_STORE" "$BM_STATE"
    OK=$( [[ $T_RC -eq 0 ]] && verify "$IMG" "$BM_STORE/bench.img" || echo false )
    record workload="diff 1%" tool="blkmirror scan" seconds="$T_S" source_bytes="$SIZE" rss_kib="$T_RSS" cpu_s="$T_CPU" load1="$T_LOAD" \
        server_rss_kib="$SERVE_HWM" server_cpu_s="$SERVE_CPU" serve_exit="$SERVE_EXIT" flush_seconds="$FLUSH_S" rc="$T_RC" verified="$OK" blkmirror="$BM_JSON" \
        changed_chunks="$CHANGED" changed_bytes="$CHANGED_BYTES" cmd="$BM_CMD" rep="$rep"

    log "differential: rsync -I --inplace --no-whole-file (round $rep)"
    drop_caches
    run_timed "diff-rsync-$rep" rsync -I --inplace --no-whole-file --stats "$IMG" "$RSYNC_URL"
    OK=$( [[ $T_RC -eq 0 ]] && verify "$IMG" "$RSYNC_MOD/source.img" || echo false )
    record workload="diff 1%" tool="rsync -I --inplace --no-whole-file" seconds="$T_S" source_bytes="$SIZE" \
        rss_kib="$T_RSS" cpu_s="$T_CPU" load1="$T_LOAD" server_rss_kib=null flush_seconds="$FLUSH_S" rc="$T_RC" verified="$OK" \
        wire_bytes="$(rsync_wire "diff-rsync-$rep")" changed_chunks="$CHANGED" changed_bytes="$CHANGED_BYTES" rep="$rep" \
        cmd="rsync -I --inplace --no-whole-file --stats IMG rsync://127.0.0.1:$RSYNC_PORT/mod/"
done
kill "$(cat "$WORK/rsyncd.pid")" 2>/dev/null || true
rm -rf "$RSYNC_MOD"

# --------------------------------------------------------------------------------
if [[ $SPARSE -eq 1 ]]; then
    log "sparse scaling: 1 GiB and 16 GiB images, same 10 MiB of data in the first GiB"
    SP_STORE="$WORK/bm-store-sparse"
    SP_STATE="$WORK/bm-state-sparse"
    for g in 1 16; do
        $PY "$BENCH/mkimage.py" sparse "$WORK/sparse$g.img" $((g * GiB)) --data-bytes $((10 << 20)) \
            --within "$GiB" --chunk "$CHUNK" --seed 7 > "$WORK/sparse$g.json"
        note "$(cat "$WORK/sparse$g.json")"
    done
    for g in 1 16; do
        bm_sync "sparse-full-${g}g" "$WORK/sparse$g.img" "sparse$g" "$SP_STORE" "$SP_STATE"
        OK=$( [[ $T_RC -eq 0 ]] && verify "$WORK/sparse$g.img" "$SP_STORE/sparse$g.img" || echo false )
        record workload="sparse full" tool="blkmirror ${g} GiB sparse" seconds="$T_S" source_bytes=$((g * GiB)) \
            rss_kib="$T_RSS" cpu_s="$T_CPU" load1="$T_LOAD" server_rss_kib="$SERVE_HWM" server_cpu_s="$SERVE_CPU" serve_exit="$SERVE_EXIT" flush_seconds="$FLUSH_S" rc="$T_RC" verified="$OK" \
            blkmirror="$BM_JSON" size_gib="$g" \
            target_alloc_bytes="$(alloc_bytes "$SP_STORE/sparse$g.img" 2>/dev/null || echo null)" cmd="$BM_CMD"
    done
    # Sub-second runs are noisy: SPARSE_REPS rounds, each changing another 1% of
    # the first GiB's chunks (same seed in both images) and syncing both images,
    # alternating which goes first. The report uses the median per size.
    SPARSE_REPS=${SPARSE_REPS:-3}
    for rep in $(seq 1 "$SPARSE_REPS"); do
        for g in 1 16; do
            $PY "$BENCH/mkimage.py" mutate "$WORK/sparse$g.img" --percent 1 --within "$GiB" --chunk "$CHUNK" \
                --seed $((97 + rep)) > "$WORK/sparse-mutate$g-$rep.json"
        done
        SP_CHANGED=$($PY -c 'import json,sys; print(json.load(open(sys.argv[1]))["changed_chunks"])' "$WORK/sparse-mutate1-$rep.json")
        note "round $rep: changed $SP_CHANGED chunks in each sparse image"
        order="1 16"; [[ $((rep % 2)) -eq 0 ]] && order="16 1"
        for g in $order; do
            bm_sync "sparse-diff-${g}g-$rep" "$WORK/sparse$g.img" "sparse$g" "$SP_STORE" "$SP_STATE"
            OK=$( [[ $T_RC -eq 0 ]] && verify "$WORK/sparse$g.img" "$SP_STORE/sparse$g.img" || echo false )
            record workload="sparse diff" tool="blkmirror ${g} GiB sparse" seconds="$T_S" source_bytes=$((g * GiB)) \
                rss_kib="$T_RSS" cpu_s="$T_CPU" load1="$T_LOAD" server_rss_kib="$SERVE_HWM" server_cpu_s="$SERVE_CPU" \
                serve_exit="$SERVE_EXIT" flush_seconds="$FLUSH_S" rc="$T_RC" verified="$OK" rep="$rep" \
                blkmirror="$BM_JSON" size_gib="$g" changed_chunks="$SP_CHANGED" changed_bytes=$((SP_CHANGED * CHUNK)) \
                target_alloc_bytes="$(alloc_bytes "$SP_STORE/sparse$g.img" 2>/dev/null || echo null)" cmd="$BM_CMD"
        done
    done
fi

# --------------------------------------------------------------------------------
log "report"
rm -rf "$RESULTS/latest-logs"
mkdir -p "$RESULTS/latest-logs"
cp "$LOGS"/* "$RESULTS/latest-logs/" 2>/dev/null || true
cp "$WORK"/*.json "$RESULTS/latest-logs/" 2>/dev/null || true
set +e
$PY "$BENCH/report.py" --records "$REC" --env "$ENV_JSON" --image "$WORK/image_mixed.json" \
    --mutate "$WORK/mutate.json" --out "$RESULTS/latest"
REPORT_RC=$?
set -e
exit $REPORT_RC
