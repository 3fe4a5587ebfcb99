#!/usr/bin/env bash
# Alternating A/B runs of the live export: fio's nbd engine against variants
# of `blkmirror replicate` (and qemu-nbd), one variant after the other in
# every round, so that a machine whose speed drifts treats them alike. The
# "alternating runs" tables of the README come from runs like these.
#
#   bench/ab.sh [--rounds N] [--secs S] [--workload "RW BS QD"] [--size-gib N]
#               [--fresh] [--keep] [--fixed-order] VARIANT...
#
# VARIANT is `qemu` (qemu-nbd --cache=none --aio=io_uring on the same image)
# or MODE[@BINARY][+ARG,ARG...][%SARG,SARG...]: MODE is sync, async or
# nomirror (async with the mirror unreachable: the front-end alone), BINARY a
# blkmirror binary (default REPO/target/release/blkmirror; the mirror runs
# the same binary), ARGs more `replicate` arguments, SARGs more `serve`
# arguments. Examples:
#
#   bench/ab.sh sync sync+--busy-poll-us,300 qemu
#   bench/ab.sh --fresh --workload "randwrite 4k 32" async@/tmp/old/blkmirror async qemu
#   bench/ab.sh --secs 20 --workload "write 1m 8" async async%--async-commit-ms,1000 qemu
#
# Round r runs the variants in the order given, rotated by r-1 (round 2 starts
# with the second), since a variant's place in a round moves its figure (on
# 2026-12-07 the one run right after qemu-nbd came out lowest in both orders
# of a pair); --fixed-order keeps the given order in every round.
# --fresh gives every replicated run a new replica and primary state, so each
# starts with a full sync by its own binary (what a change to the sync path
# needs); without it the replica carries over from run to run. Every run
# prints IOPS, MiB/s, latency (mean, p50, p90, p99 µs), the CPU time (ms)
# and context switches of the primary and the mirror over the fio run, and
# the writes the primary did not queue for the mirror (pull-ahead; such a
# run measured the front-end, and is marked). The summary gives each
# variant's median IOPS, its range, and its ratio to qemu-nbd's median.
#
# Environment: BENCH_DIR (work directory, default /var/tmp/blkmirror-ab;
# removed at the end unless --keep, and only if this script made it).
set -euo pipefail

ROUNDS=3
SECS=4
WORKLOAD="randwrite 4k 1"
SIZE_GIB=1
FRESH=0
KEEP=0
FIXED_ORDER=0
VARIANTS=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --rounds) ROUNDS="$2"; shift 2 ;;
        --secs) SECS="$2"; shift 2 ;;
        --workload) WORKLOAD="$2"; shift 2 ;;
        --size-gib) SIZE_GIB="$2"; shift 2 ;;
        --fresh) FRESH=1; shift ;;
        --keep) KEEP=1; shift ;;
        --fixed-order) FIXED_ORDER=1; shift ;;
        -h|--help) sed -n '2,35p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "unknown option: $1 (try --help)" >&2; exit 2 ;;
        *) VARIANTS+=("$1"); shift ;;
    esac
done
[[ "$ROUNDS" =~ ^[1-9][0-9]?$ ]] || { echo "--rounds wants an integer 1..99" >&2; exit 2; }
[[ "$SECS" =~ ^[1-9][0-9]*$ ]] || { echo "--secs wants a positive integer" >&2; exit 2; }
[[ "$SIZE_GIB" =~ ^[1-9][0-9]*$ ]] || { echo "--size-gib wants a positive integer" >&2; exit 2; }
read -r RW BS QD <<< "$WORKLOAD"
[[ -n "${QD:-}" && "$QD" =~ ^[1-9][0-9]*$ ]] || { echo "--workload wants \"RW BS QD\", e.g. \"randwrite 4k 1\"" >&2; exit 2; }
[[ ${#VARIANTS[@]} -gt 0 ]] || { echo "name at least one variant (try --help)" >&2; exit 2; }

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEFAULT_BIN="$REPO/target/release/blkmirror"
WORK="${BENCH_DIR:-/var/tmp/blkmirror-ab}"
TICK_MS=$((1000 / $(getconf CLK_TCK)))

die() { echo "ab: $*" >&2; exit 1; }

# Parse every variant before anything runs: MODE, BINARY, ARGS.
declare -A V_MODE V_BIN V_ARGS V_SARGS
for v in "${VARIANTS[@]}"; do
    if [[ "$v" == qemu ]]; then
        command -v qemu-nbd >/dev/null || die "qemu-nbd is not installed (apt-get install qemu-utils)"
        V_MODE[$v]=qemu
        continue
    fi
    rest=$v
    sargs=""
    [[ "$rest" == *%* ]] && { sargs=${rest#*%}; rest=${rest%%\%*}; }
    spec=${rest%%+*}
    args=""
    [[ "$rest" == *+* ]] && args=${rest#*+}
    mode=${spec%%@*}
    bin=$DEFAULT_BIN
    [[ "$spec" == *@* ]] && bin=${spec#*@}
    case "$mode" in sync|async|nomirror) ;; *) die "variant '$v': mode must be sync, async or nomirror" ;; esac
    [[ -x "$bin" ]] || die "variant '$v': no executable blkmirror at $bin (cargo build --release?)"
    V_MODE[$v]=$mode
    V_BIN[$v]=$bin
    V_ARGS[$v]=${args//,/ }
    V_SARGS[$v]=${sargs//,/ }
done
command -v fio >/dev/null || die "fio is not installed (apt-get install fio)"

PIDS=()
SERVE_PID=""
SERVE_BIN=""
SERVE_ARGS=""
cleanup() {
    set +e
    [[ -n "$SERVE_PID" ]] && kill "$SERVE_PID" 2>/dev/null && wait "$SERVE_PID" 2>/dev/null
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
    if [[ $KEEP -eq 0 && -f "$WORK/.blkmirror-bench" ]]; then rm -rf "$WORK"; fi
}
trap cleanup EXIT

# Only ever delete a work directory this script made (it holds a marker).
if [[ -e "$WORK" ]]; then
    [[ -f "$WORK/.blkmirror-bench" ]] || die "$WORK exists and was not made by this script; remove it or set BENCH_DIR"
    rm -rf "$WORK"
fi
mkdir -p "$WORK"
touch "$WORK/.blkmirror-bench"
cd "$WORK"
head -c $((SIZE_GIB << 30)) /dev/urandom > src.img
# Identities: one pair for every binary (the format is the same).
first_bin=""
for v in "${VARIANTS[@]}"; do [[ -n "${V_BIN[$v]:-}" ]] && { first_bin=${V_BIN[$v]}; break; }; done
if [[ -n "$first_bin" ]]; then
    rm -rf m p
    MFP=$("$first_bin" init m) || die "blkmirror init failed"
    "$first_bin" init p > /dev/null || die "blkmirror init failed"
    PFP=$("$first_bin" fingerprint p) || die "blkmirror fingerprint failed"
fi

cpu_ms() { awk -v t="$TICK_MS" '{print ($14 + $15) * t}' "/proc/$1/stat"; }
switches() { cat /proc/"$1"/task/*/status 2>/dev/null | awk '/ctxt_switches/ {s += $2} END {print s + 0}'; }

# start_serve BINARY [ARGS]: the mirror, restarted when the binary or its
# arguments change, or --fresh.
start_serve() {
    local bin=$1 sargs=${2:-}
    if [[ -n "$SERVE_PID" ]]; then
        if [[ "$bin" == "$SERVE_BIN" && "$sargs" == "$SERVE_ARGS" && $FRESH -eq 0 ]] \
            && kill -0 "$SERVE_PID" 2>/dev/null; then return; fi
        kill "$SERVE_PID" 2>/dev/null || true
        wait "$SERVE_PID" 2>/dev/null || true
    fi
    rm -f serve.out
    # shellcheck disable=SC2086
    "$bin" serve --identity m --listen 127.0.0.1:0 --store store --allow "$PFP" $sargs > serve.out 2> serve.log &
    SERVE_PID=$!
    SERVE_BIN=$bin
    SERVE_ARGS=$sargs
    for _ in $(seq 100); do [[ -s serve.out ]] && break; sleep 0.1; done
    MIRROR=$(sed -n 's/^listening //p' serve.out)
    [[ -n "$MIRROR" ]] || die "serve did not start: $(tail -3 serve.log)"
}

# run_fio SOCKET: one fio run; prints "iops mib mean p50 p90 p99".
run_fio() {
    fio --name=ab --ioengine=nbd --uri="nbd+unix:///?socket=$1" --rw="$RW" --bs="$BS" \
        --iodepth="$QD" --size=$((SIZE_GIB << 30)) --runtime="$SECS" --time_based \
        --output-format=json > fio.json 2> fio.err || die "fio failed: $(tail -3 fio.err)"
    python3 - <<'EOF'
import json
t = open("fio.json").read()
j, _ = json.JSONDecoder().raw_decode(t[t.find("{"):])
w = j["jobs"][0]["write"]
p = w["clat_ns"].get("percentile", {})
print("%.0f %.1f %.0f %.0f %.0f %.0f" % (w["iops"], w["bw_bytes"] / 2**20, w["clat_ns"]["mean"] / 1e3,
      p.get("50.000000", 0) / 1e3, p.get("90.000000", 0) / 1e3, p.get("99.000000", 0) / 1e3))
EOF
}

skipped() {
    "$1" status --state state --volume v --json 2>/dev/null \
        | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["skipped_writes"])' 2>/dev/null || echo 0
}

# One row per run (and the header): round variant IOPS MiB/s mean p50 p90 p99
# cpu_p_ms cpu_m_ms ctx_p ctx_m skipped.
ROW='%-5s %-40s %8s %8s %6s %6s %6s %7s %9s %9s %9s %9s %s\n'
RESULTS="$WORK/runs.txt"
: > "$RESULTS"
SCAN_NEXT=0
printf "$ROW" round variant IOPS MiB/s mean p50 p90 p99 \
    cpu_p_ms cpu_m_ms ctx_p ctx_m skipped
for round in $(seq "$ROUNDS"); do
    ORDER=("${VARIANTS[@]}")
    if [[ $FIXED_ORDER == 0 ]]; then
        off=$(( (round - 1) % ${#VARIANTS[@]} ))
        ORDER=("${VARIANTS[@]:off}" "${VARIANTS[@]:0:off}")
    fi
    for v in "${ORDER[@]}"; do
        sync
        dd if=src.img iflag=nocache count=0 status=none
        mode=${V_MODE[$v]}
        if [[ "$mode" == qemu ]]; then
            rm -f q.sock
            qemu-nbd -t -e 16 -f raw --cache=none --aio=io_uring -k "$WORK/q.sock" src.img 2> qemu.log &
            q=$!
            PIDS+=($q)
            for _ in $(seq 100); do [[ -S q.sock ]] && break; sleep 0.1; done
            [[ -S q.sock ]] || die "qemu-nbd did not start: $(tail -3 qemu.log)"
            c0=$(cpu_ms $q); s0=$(switches $q)
            read -r iops mib mean p50 p90 p99 < <(run_fio "$WORK/q.sock")
            c1=$(cpu_ms $q); s1=$(switches $q)
            kill $q; wait $q 2>/dev/null || true
            SCAN_NEXT=1
            printf "$ROW" "$round" "$v" "$iops" "$mib" "$mean" \
                "$p50" "$p90" "$p99" $((c1 - c0)) - $((s1 - s0)) - - | tee -a "$RESULTS"
            continue
        fi
        bin=${V_BIN[$v]}
        if [[ $FRESH -eq 1 ]]; then
            [[ -n "$SERVE_PID" ]] && { kill "$SERVE_PID" 2>/dev/null; wait "$SERVE_PID" 2>/dev/null || true; SERVE_PID=""; }
            rm -rf state store
        fi
        mkdir -p state
        start_serve "$bin" "${V_SARGS[$v]}"
        to=$MIRROR
        rmode=$mode
        if [[ "$mode" == nomirror ]]; then
            to=127.0.0.1:9
            rmode=async
            # replicate's first start needs the mirror (it syncs and starts
            # tracking first): give the primary one run with the mirror.
            if [[ -z "$(ls -A state)" ]]; then
                rm -f r.sock
                "$bin" replicate src.img --identity p --to "$MIRROR" --peer "$MFP" --volume v --state state \
                    --mode async --nbd "unix:$WORK/r.sock" > first.out 2> first.log &
                f=$!
                PIDS+=($f)
                for _ in $(seq 1200); do
                    "$bin" status --state state --volume v --json 2>/dev/null | grep -q '"in_sync": *true' && break
                    sleep 0.1
                done
                kill -TERM $f; wait $f 2>/dev/null || true
                SCAN_NEXT=0
            fi
        fi
        extra=()
        [[ $SCAN_NEXT -eq 1 && "$mode" != nomirror ]] && { extra+=(--scan); SCAN_NEXT=0; }
        rm -f r.sock
        # shellcheck disable=SC2086
        "$bin" replicate src.img --identity p --to "$to" --peer "$MFP" --volume v --state state \
            --mode "$rmode" --on-disconnect continue --nbd "unix:$WORK/r.sock" "${extra[@]}" ${V_ARGS[$v]} \
            > rep.out 2> rep.log &
        r=$!
        PIDS+=($r)
        for _ in $(seq 600); do grep -q '^nbd ' rep.out 2>/dev/null && break; sleep 0.1; done
        grep -q '^nbd ' rep.out || die "replicate ($v) did not start: $(tail -3 rep.log)"
        if [[ "$mode" != nomirror ]]; then
            for _ in $(seq 1200); do
                "$bin" status --state state --volume v --json 2>/dev/null | grep -q '"in_sync": *true' && break
                sleep 0.1
            done
        fi
        k0=$(skipped "$bin")
        c0=$(cpu_ms $r); s0=$(switches $r); m0=$(cpu_ms "$SERVE_PID"); n0=$(switches "$SERVE_PID")
        read -r iops mib mean p50 p90 p99 < <(run_fio "$WORK/r.sock")
        c1=$(cpu_ms $r); s1=$(switches $r); m1=$(cpu_ms "$SERVE_PID"); n1=$(switches "$SERVE_PID")
        sleep 0.5
        k1=$(skipped "$bin")
        kill -TERM $r; wait $r 2>/dev/null || true
        sk=$((k1 - k0))
        [[ "$mode" == nomirror ]] && sk=-
        [[ "$mode" != nomirror && $sk -gt 0 ]] && sk="$sk(pulled-ahead)"
        printf "$ROW" "$round" "$v" "$iops" "$mib" "$mean" "$p50" \
            "$p90" "$p99" $((c1 - c0)) $((m1 - m0)) $((s1 - s0)) $((n1 - n0)) "$sk" | tee -a "$RESULTS"
    done
done

echo
python3 - "$RESULTS" "${VARIANTS[@]}" <<'EOF'
import statistics, sys
path, variants = sys.argv[1], sys.argv[2:]
runs = {}
for line in open(path):
    f = line.split()
    runs.setdefault(f[1], []).append((int(f[0]), float(f[2]), f[12]))
qemu = {r: i for r, i, _ in runs.get("qemu", [])}
qmed = statistics.median(qemu.values()) if qemu else None
print("%-40s %10s %17s %8s  %s" % ("variant", "median", "range", "vs qemu", "per round"))
for v in variants:
    rs = runs.get(v, [])
    if not rs:
        continue
    iops = [i for _, i, _ in rs]
    med = statistics.median(iops)
    ratio = "%.2f" % (med / qmed) if qmed else "-"
    per = " ".join("%.2f" % (i / qemu[r]) for r, i, _ in rs if qemu.get(r)) if qemu else ""
    behind = sum(1 for _, _, s in rs if "pulled" in s)
    note = "  (%d run(s) pulled ahead)" % behind if behind else ""
    print("%-40s %10.0f %8.0f–%-8.0f %8s  %s%s" % (v, med, min(iops), max(iops), ratio, per, note))
EOF
