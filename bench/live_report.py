#!/usr/bin/env python3
"""Table, ratios and target checks for bench/live.sh; writes OUT.json, OUT.md, OUT.png."""
import argparse
import json

WORKLOADS = ["randwrite-4k-qd1", "randwrite-4k-qd32", "write-1m-qd8"]
SYSTEMS = [
    "blkmirror-sync",
    "blkmirror-sync-poll",
    "blkmirror-async",
    "blkmirror-async-poll",
    "blkmirror-nomirror",
    "qemu-nbd",
]
# Targets from issue 3: async >= 85% of qemu-nbd everywhere; sync >= 50% at
# QD1 and 1 MiB. Checked with and without --busy-poll-us ("-poll").
TARGETS = {}
for _suffix in ("", "-poll"):
    for _w in WORKLOADS:
        TARGETS[("blkmirror-async" + _suffix, _w)] = 0.85
    TARGETS[("blkmirror-sync" + _suffix, "randwrite-4k-qd1")] = 0.50
    TARGETS[("blkmirror-sync" + _suffix, "write-1m-qd8")] = 0.50
COLORS = {
    "blkmirror-sync": "#c0392b",
    "blkmirror-sync-poll": "#e6a19a",
    "blkmirror-async": "#2980b9",
    "blkmirror-async-poll": "#8fc1e3",
    "blkmirror-nomirror": "#7f8c8d",
    "qemu-nbd": "#27ae60",
}


def async_ceiling(qd, one, two, qemu):
    """(bandwidth, latency, ceiling) for async mode from the disk's IOPS with
    one writer and for each of two, against qemu-nbd's IOPS (see below)."""
    added = max(0.0, qd / two - qd / one)
    lat_c = (qd / qemu) / (qd / qemu + added)
    bw_c = two / qemu
    return bw_c, lat_c, min(1.0, bw_c, lat_c)


def lower_median(xs):
    """The median of xs (the lower one of two middles), or None if empty."""
    xs = sorted(xs)
    return xs[(len(xs) - 1) // 2] if xs else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("records")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    recs = [json.loads(line) for line in open(a.records) if line.strip()]
    runs = {}
    for r in recs:
        if "iops" in r:
            runs.setdefault((r["system"], r["workload"]), []).append(r)
    rounds = max((r.get("round", 1) for r in recs if "iops" in r), default=1)

    def median_run(rs):
        """The run with the median IOPS (the lower one of two middles)."""
        rs = sorted(rs, key=lambda r: r["iops"])
        return rs[(len(rs) - 1) // 2]

    by = {k: median_run(v) for k, v in runs.items()}

    def opt(r, key):
        """A figure older records lack (mean and p90 since 2026-12-06)."""
        return f"{r[key]:.0f}" if key in r else "-"

    checks = [r for r in recs if r.get("system") == "check"]
    lines = [
        f"Median of {rounds} round(s) per system and workload; ranges over the rounds. "
        "Ratio: median IOPS over qemu-nbd's median; per-round ratios pair the runs of one round.",
        "",
        "| workload | system | IOPS (median) | IOPS range | MiB/s | mean µs | p50 µs | p90 µs | p99 µs | vs qemu-nbd | per round |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    verdicts = []
    for w in WORKLOADS:
        base = by.get(("qemu-nbd", w))
        base_by_round = {r.get("round", 1): r["iops"] for r in runs.get(("qemu-nbd", w), [])}
        for s in SYSTEMS:
            r = by.get((s, w))
            if r is None:
                continue
            rs = runs[(s, w)]
            lo, hi = min(x["iops"] for x in rs), max(x["iops"] for x in rs)
            ratio = r["iops"] / base["iops"] if base and base["iops"] else None
            per_round = [
                x["iops"] / base_by_round[x.get("round", 1)]
                for x in sorted(rs, key=lambda x: x.get("round", 1))
                if base_by_round.get(x.get("round", 1))
            ]
            lines.append(
                f"| {w} | {s} | {r['iops']:.0f} | {lo:.0f}–{hi:.0f} | {r['mib_s']:.1f} | {opt(r, 'mean_us')} | {r['p50_us']:.0f} | "
                f"{opt(r, 'p90_us')} | {r['p99_us']:.0f} | "
                + (f"{ratio:.2f}" if ratio is not None else "-")
                + " | "
                + " ".join(f"{q:.2f}" for q in per_round)
                + " |"
            )
            # Rounds in which the primary did not queue every write for the
            # mirror (pull-ahead): they measured the front-end, not replication.
            behind = [x for x in rs if x.get("skipped_writes", 0) > 0]
            t = TARGETS.get((s, w))
            if t is not None and ratio is not None:
                ok = ratio >= t and not behind
                verdicts.append(
                    f"{'PASS' if ok else 'FAIL'} {s} {w}: {ratio:.2f} of qemu-nbd, median of {len(rs)} "
                    f"(rounds: {' '.join(f'{q:.2f}' for q in per_round)}; target >= {t:.2f})"
                    + (
                        f"; the mirror fell behind (pull-ahead) in {len(behind)} round(s), "
                        f"{sum(x['skipped_writes'] for x in behind)} writes not queued"
                        if behind
                        else ""
                    )
                )
            elif behind:
                verdicts.append(
                    f"WARN {s} {w}: the mirror fell behind (pull-ahead) in {len(behind)} round(s)"
                )
    # The disk alone bounds sync mode at QD1: a sync write waits for the NBD
    # round trip (as qemu-nbd's does) and for the mirror's durable write, which
    # is at least an O_DIRECT|O_DSYNC write (write + cache flush) where
    # qemu-nbd's waits for a plain O_DIRECT one. Per round:
    #   ceiling = qemu p50 / (qemu p50 - direct p50 + dsync p50)
    # (an estimate: it leaves out QUIC and assumes blkmirror's NBD path costs
    # what qemu-nbd's does).
    disk_lines = []
    q1 = {r.get("round", 1): r for r in runs.get(("qemu-nbd", "randwrite-4k-qd1"), [])}
    dd = {r.get("round", 1): r for r in runs.get(("disk-direct", "randwrite-4k-qd1"), [])}
    ds = {r.get("round", 1): r for r in runs.get(("disk-dsync", "randwrite-4k-qd1"), [])}
    # The pair (bench/disk_pair.c): the primary's O_DIRECT write and the
    # mirror's O_DIRECT|O_DSYNC write at the same time, in lockstep, as a
    # sync write at QD1 needs them on one disk; the flush then also carries
    # the primary's write. Ceiling = qemu p50 / (qemu p50 - direct p50 + pair p50).
    dp = {r.get("round", 1): r for r in runs.get(("disk-pair", "randwrite-4k-qd1"), [])}
    ceilings = []
    for rnd in sorted(set(q1) & set(dd) & set(ds)):
        q, d, y = q1[rnd]["p50_us"], dd[rnd]["p50_us"], ds[rnd]["p50_us"]
        pr = dp.get(rnd, {}).get("p50_us")
        if q > 0 and q - d + y > 0:
            pair_c = q / (q - d + pr) if pr and q - d + pr > 0 else None
            ceilings.append((rnd, q, d, y, q / (q - d + y), pr, pair_c))
    if ceilings:
        disk_lines += [
            "",
            "The disk alone (4 KiB random writes at QD1, in the same rounds) and the ceiling it puts on sync mode "
            "at QD1: qemu-nbd p50 / (qemu-nbd p50 - O_DIRECT p50 + X), with X the mirror's durable write alone "
            "(O_DIRECT|O_DSYNC, fio) or together with the primary's local write on the same disk (pair, "
            "bench/disk_pair.c):",
            "",
            "| round | qemu-nbd p50 µs | O_DIRECT p50 µs | O_DIRECT\\|O_DSYNC p50 µs | pair p50 µs | ceiling (dsync) | ceiling (pair) |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for rnd, q, d, y, c, pr, pc in ceilings:
            pr_s = f"{pr:.0f}" if pr else "n/a"
            pc_s = f"{pc:.2f}" if pc else "n/a"
            disk_lines.append(f"| {rnd} | {q:.0f} | {d:.0f} | {y:.0f} | {pr_s} | {c:.2f} | {pc_s} |")
        med = lower_median(c for *_, c, _, _ in ceilings)
        verdicts.append(
            f"INFO sync QD1 ceiling from the disk's flush latency: {med:.2f} of qemu-nbd (median of {len(ceilings)} rounds)"
        )
        pcs = [pc for *_, pc in ceilings if pc]
        if pcs:
            verdicts.append(
                f"INFO sync QD1 ceiling with the local write on the same disk (pair): {lower_median(pcs):.2f} "
                f"of qemu-nbd (median of {len(pcs)} rounds)"
            )
    lines += disk_lines
    # The disk with one writer and with two at once, per workload (fio,
    # io_uring, O_DIRECT). In async mode the mirror writes what the primary
    # writes to the same disk. Two estimates of what that leaves async mode,
    # as a fraction of qemu-nbd in the same round:
    #   bandwidth: each of two writers' IOPS / qemu-nbd's IOPS (at 1 or more the
    #     disk has room for both; qemu-nbd itself is then not disk-bound);
    #   latency: by Little's law a request's time is QD / IOPS; the second
    #     writer adds (QD / two - QD / one) to each of the disk's requests, and
    #     if that adds to qemu-nbd's time per request in full:
    #     qemu / (qemu + added).
    # The mirror in async mode writes at the primary's rate, not flat out as
    # fio's second writer does, so both are upper bounds on the disk's
    # interference rather than exact figures; the ceiling is the lower of the
    # two (and at most 1).
    # The async mirror also commits every 5 s (fdatasync: a cache flush),
    # which on this disk makes the host write back what every writer left in
    # its cache; qemu-nbd is never asked to flush in these runs. So the same
    # estimate again with the two writers joined by a job that makes one
    # 4 KiB write durable every 5 s (disk-two-commit), where measured.
    # fio's writers run flat out, so each flush finds more to write back than
    # the mirror's does: this estimate is the pessimistic side and the
    # ceiling above the optimistic one.
    share_lines = []
    medians = {}
    commit_medians = {}
    qd_of = {"randwrite-4k-qd1": 1, "randwrite-4k-qd32": 32, "write-1m-qd8": 8}
    for w in WORKLOADS:
        one = {r.get("round", 1): r for r in runs.get(("disk-one", w), [])}
        two = {r.get("round", 1): r for r in runs.get(("disk-two", w), [])}
        twoc = {r.get("round", 1): r for r in runs.get(("disk-two-commit", w), [])}
        qq = {r.get("round", 1): r for r in runs.get(("qemu-nbd", w), [])}
        rows = []
        for rnd in sorted(set(one) & set(two) & set(qq)):
            o, t, q = one[rnd]["iops"], two[rnd]["iops"], qq[rnd]["iops"]
            if o > 0 and t > 0 and q > 0:
                tc = twoc[rnd]["iops"] if rnd in twoc else 0
                cc = async_ceiling(qd_of[w], o, tc, q)[2] if tc > 0 else None
                rows.append((rnd, q, o, t, t / o, *async_ceiling(qd_of[w], o, t, q), tc, cc))
        if rows:
            share_lines += [
                f"| {w} | {r[0]} | {r[1]:.0f} | {r[2]:.0f} | {r[3]:.0f} | {r[4]:.2f} | {r[5]:.2f} | {r[6]:.2f} | {r[7]:.2f} | "
                + (f"{r[8]:.0f} | {r[9]:.2f} |" if r[9] is not None else "n/a | n/a |")
                for r in rows
            ]
            medians[w] = lower_median(r[7] for r in rows)
            cm = lower_median(r[9] for r in rows if r[9] is not None)
            if cm is not None:
                commit_medians[w] = cm
    if share_lines:
        lines += [
            "",
            "The disk with one writer and with two at once (fio, io_uring, O_DIRECT, a file each as large as the image, same "
            "workload, same rounds). Async mode's mirror writes every byte the primary writes to this disk. "
            "Bandwidth: each of two writers' IOPS over qemu-nbd's. Latency: qemu-nbd's time per request "
            "(QD / IOPS) over itself plus what the second writer adds to each of the disk's requests "
            "(QD / two - QD / one). The async ceiling is the lower of the two, at most 1. The last two columns: "
            "the two writers again, joined by one durable 4 KiB write (fdatasync) every 5 s, as the async mirror "
            "commits every 5 s (`serve --async-commit-ms`), and the estimate from that (qemu-nbd is never asked to flush in these runs; fio's "
            "writers run flat out and leave each flush more to write back than the mirror does, so this is the "
            "pessimistic estimate and the ceiling the optimistic one):",
            "",
            "| workload | round | qemu-nbd IOPS | disk, one writer | disk, each of two | two / one | bandwidth | latency "
            "| async ceiling | each of two, commit every 5 s | estimate with commit |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ] + share_lines
        for w, m in medians.items():
            verdicts.append(f"INFO async {w} ceiling from the shared disk: {m:.2f} of qemu-nbd (median over rounds)")
        for w, m in commit_medians.items():
            verdicts.append(
                f"INFO async {w} pessimistic estimate from the shared disk with a commit every 5 s: "
                f"{m:.2f} of qemu-nbd (median over rounds)"
            )
    # The same on the benchmark's own files (image and replica), measured
    # once after the runs: the probes above use files of their own, and
    # where a file lies on this disk changes its speed (README).
    file_lines = []
    for w in WORKLOADS:
        img = by.get(("files-image", w))
        rep = by.get(("files-replica", w))
        two = by.get(("files-two", w))
        qb = by.get(("qemu-nbd", w))
        if not (img and rep and two and qb and qb["iops"] > 0 and img["iops"] > 0 and two["iops"] > 0):
            continue
        bw_c, lat_c, ceiling = async_ceiling(qd_of[w], img["iops"], two["iops"], qb["iops"])
        file_lines.append(
            f"| {w} | {qb['iops']:.0f} | {img['iops']:.0f} | {rep['iops']:.0f} | {two['iops']:.0f} | "
            f"{bw_c:.2f} | {lat_c:.2f} | {ceiling:.2f} |"
        )
        verdicts.append(
            f"INFO async {w} ceiling on the benchmark's own image and replica: {ceiling:.2f} of qemu-nbd"
        )
    if file_lines:
        lines += [
            "",
            "The disk on the benchmark's own files after the runs (fio, io_uring, O_DIRECT): the image alone, the "
            "mirror's replica alone, and both at once (IOPS of each); ceiling as above, against qemu-nbd's median:",
            "",
            "| workload | qemu-nbd IOPS | image alone | replica alone | each of both | bandwidth | latency | async ceiling |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ] + file_lines
    for c in checks:
        verdicts.append(f"{'PASS' if c.get('ok') else 'FAIL'} {c['workload']}")
    md = "\n".join(lines) + "\n\n" + "\n".join(f"- {v}" for v in verdicts) + "\n"
    print(md)
    with open(a.out + ".md", "w") as f:
        f.write(md)
    with open(a.out + ".json", "w") as f:
        json.dump({"records": recs, "verdicts": verdicts}, f, indent=1)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(WORKLOADS), figsize=(15, 4.5))
        for ax, w in zip(axes, WORKLOADS):
            names = [s for s in SYSTEMS if (s, w) in by]
            vals = [by[(s, w)]["iops"] for s in names]
            lo = [v - min(x["iops"] for x in runs[(s, w)]) for s, v in zip(names, vals)]
            hi = [max(x["iops"] for x in runs[(s, w)]) - v for s, v in zip(names, vals)]
            ax.bar(range(len(names)), vals, yerr=[lo, hi], capsize=4,
                   color=[COLORS[n] for n in names])
            ax.set_xticks(range(len(names)))
            ax.set_xticklabels([n.replace("blkmirror-", "bm-") for n in names], rotation=20, fontsize=8)
            qb = by.get(("qemu-nbd", w))
            pair_med = lower_median(pc for *_, pc in ceilings if pc)
            labelled = set()
            for i, n in enumerate(names):
                if not qb:
                    break
                marks = []
                if n.startswith("blkmirror-async") and w in medians:
                    marks.append((medians[w], "dashed", "async ceiling (shared disk)"))
                if n.startswith("blkmirror-async") and w in commit_medians:
                    marks.append((commit_medians[w], "dashdot", "async estimate, commit every 5 s (pessimistic)"))
                if n.startswith("blkmirror-sync") and w == "randwrite-4k-qd1" and pair_med is not None:
                    marks.append((pair_med, "dotted", "sync ceiling (disk pair)"))
                for y, style, label in marks:
                    ax.hlines(y * qb["iops"], i - 0.45, i + 0.45, colors="k", linestyles=style,
                              label=None if label in labelled else label)
                    labelled.add(label)
            if labelled:
                ax.legend(fontsize=7, loc="upper left")
            ax.set_title(w)
            ax.set_ylabel("IOPS")
        fig.suptitle(f"fio nbd engine: blkmirror replicate vs qemu-nbd (same machine, same disk; median and range of {rounds} rounds)")
        fig.tight_layout()
        fig.savefig(a.out + ".png", dpi=90)
    except ImportError:
        print("(matplotlib missing: no plot)")


if __name__ == "__main__":
    main()
