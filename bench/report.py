#!/usr/bin/env python3
"""Turn bench/run.sh's records into a table, target checks, JSON, Markdown and a PNG.

Exit status: 0 when every run succeeded and every copy was verified equal to its
source; 1 otherwise. Performance targets are reported as PASS/FAIL lines but do
not change the exit status (they depend on the machine).
"""
import argparse
import json
import sys

MiB = 1 << 20


def load(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def find(recs, workload, prefix):
    for r in recs:
        if r["workload"] == workload and r["tool"].startswith(prefix):
            return r
    return None


def ok_run(r):
    return r is not None and r.get("rc") == 0 and r.get("verified") in (True, None)


def fmt(v, nd=2):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def rss_text(r):
    c = r.get("rss_kib")
    s = r.get("server_rss_kib")
    c = f"{c / 1024:.1f}" if isinstance(c, (int, float)) else "-"
    if isinstance(s, (int, float)):
        return f"{c} (server {s / 1024:.1f})"
    return c


def cpu_text(r):
    c, sv = r.get("cpu_s"), r.get("server_cpu_s")
    c = f"{c:.2f}" if isinstance(c, (int, float)) else "-"
    return f"{c} (server {sv:.2f})" if isinstance(sv, (int, float)) else c


def wire_mib(r):
    w = r.get("wire_bytes")
    if w is None:
        w = (r.get("blkmirror") or {}).get("bytes_on_wire")
    return w / MiB if isinstance(w, (int, float)) else None


def aggregate(recs):
    """Collapse repeated records (same workload and tool, a 'rep' field) into one:
    the median run by wall seconds, with rc/verified/RSS taken over all runs and
    the list of all seconds in seconds_all."""
    out, groups = [], {}
    for r in recs:
        if "rep" in r:
            key = (r["workload"], r["tool"])
            if key not in groups:
                groups[key] = []
                out.append(key)
            groups[key].append(r)
        else:
            out.append(r)
    res = []
    for item in out:
        if not isinstance(item, tuple):
            res.append(item)
            continue
        runs = groups[item]
        by_s = sorted(runs, key=lambda r: r["seconds"])
        med = dict(by_s[(len(by_s) - 1) // 2])
        med["seconds_all"] = [r["seconds"] for r in runs]
        med["rc"] = next((r["rc"] for r in runs if r.get("rc") != 0), 0)
        med["verified"] = all(r.get("verified") is not False for r in runs)
        for k in ("rss_kib", "server_rss_kib"):
            vals = [r[k] for r in runs if isinstance(r.get(k), (int, float))]
            med[k] = max(vals) if vals else None
        internal = sorted((r.get("blkmirror") or {}).get("seconds") or 0 for r in runs)
        med["internal_seconds_median"] = internal[(len(internal) - 1) // 2]
        med.pop("rep", None)
        res.append(med)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", required=True)
    ap.add_argument("--env", required=True)
    ap.add_argument("--image", required=True)
    ap.add_argument("--mutate", required=True)
    ap.add_argument("--out", required=True, help="path prefix: writes PREFIX.json/.md/.png")
    a = ap.parse_args()

    raw = load(a.records)
    recs = aggregate(raw)
    env = json.load(open(a.env))
    image = json.load(open(a.image))
    mutate = json.load(open(a.mutate))

    # ---- rows ---------------------------------------------------------------
    bm_by_workload = {}
    for r in recs:
        if r["tool"].startswith("blkmirror") and r["workload"] in ("full", "diff 1%"):
            bm_by_workload[r["workload"]] = r
    rows = []
    for r in recs:
        if r["workload"].startswith("sparse"):
            continue
        secs = r.get("seconds")
        mibs = r["source_bytes"] / MiB / secs if secs else None
        base = bm_by_workload.get(r["workload"])
        ratio = (secs / base["seconds"]) if (base and ok_run(base) and secs and r is not base
                                             and base.get("seconds")) else (1.0 if r is base else None)
        status = "ok"
        if r.get("rc") not in (0, None):
            rc = r["rc"]
            status = f"ERROR rc={rc}" + (f" (signal {rc - 128})" if isinstance(rc, int) and rc > 128 else "")
        elif r.get("verified") is False:
            status = "WRONG COPY"
        elif r.get("verified") is True:
            status = "verified"
        if r.get("serve_exit") not in (None, "running"):
            se = r["serve_exit"]
            sig = f", signal {se - 128}" if isinstance(se, int) and se > 128 else ""
            status += f" (serve exited early, status {se}{sig})"
        rows.append({
            "workload": r["workload"], "tool": r["tool"], "seconds": secs,
            "seconds_all": r.get("seconds_all"), "mib_s": mibs, "ratio_vs_blkmirror": ratio, "rss": rss_text(r),
            "flush": r.get("flush_seconds"), "status": status, "wire_mib": wire_mib(r), "cpu": cpu_text(r),
        })

    sp = {}
    for r in recs:
        if r["workload"] in ("sparse full", "sparse diff"):
            sp[(r["workload"], r["size_gib"])] = r
    sparse_rows = []
    sparse_ratio = sparse_ratio_internal = None
    for wl in ("sparse full", "sparse diff"):
        r1, r16 = sp.get((wl, 1)), sp.get((wl, 16))
        if not (r1 and r16):
            continue
        ratio = r16["seconds"] / r1["seconds"] if ok_run(r1) and ok_run(r16) else None
        st = "verified" if ok_run(r1) and ok_run(r16) else "ERROR/WRONG"
        in1 = r1.get("internal_seconds_median") or (r1.get("blkmirror") or {}).get("seconds")
        in16 = r16.get("internal_seconds_median") or (r16.get("blkmirror") or {}).get("seconds")
        rint = in16 / in1 if (in1 and in16) else None
        if wl == "sparse diff":
            sparse_ratio, sparse_ratio_internal = ratio, rint
        rss = max([x for x in (r1.get("rss_kib"), r16.get("rss_kib")) if isinstance(x, (int, float))] or [0])
        srss = max([x for x in (r1.get("server_rss_kib"), r16.get("server_rss_kib")) if isinstance(x, (int, float))] or [0])
        sparse_rows.append({
            "workload": wl, "tool": "blkmirror 1 GiB / 16 GiB",
            "seconds_text": f"{r1['seconds']:.2f} / {r16['seconds']:.2f}"
                            + (f" (median of {len(r1['seconds_all'])})" if "seconds_all" in r1 else ""),
            "ratio": ratio, "ratio_internal": rint,
            "rss": f"{rss / 1024:.1f} (server {srss / 1024:.1f})", "status": st,
            "wire_text": f"{fmt(wire_mib(r1), 1)} / {fmt(wire_mib(r16), 1)}",
            "cpu": f"{cpu_text(r1)} / {cpu_text(r16)}",
        })

    # ---- targets ------------------------------------------------------------
    targets = []

    def target(name, passed, detail):
        targets.append({"target": name, "result": None if passed is None else ("PASS" if passed else "FAIL"),
                        "detail": detail})

    bm_full = find(recs, "full", "blkmirror")
    qi_full = find(recs, "full", "qemu-img")
    bm_diff = find(recs, "diff 1%", "blkmirror")
    rs_diff = find(recs, "diff 1%", "rsync")
    floor = find(recs, "floor", "fio")

    correct = all(ok_run(r) for r in raw)
    bad = sorted({f"{r['workload']}/{r['tool']}" for r in raw if not ok_run(r)})
    target("every run succeeded and every copy equals its source (cmp)", correct,
           "all verified" if correct else "failed: " + ", ".join(bad))

    if bm_diff and ok_run(bm_diff):
        j = bm_diff.get("blkmirror") or {}
        mode_ok = j.get("mode") == "scan"
        sent_ok = j.get("chunks_sent") == bm_diff.get("changed_chunks")
        target("blkmirror differential: mode 'scan' and chunks_sent == changed chunks",
               mode_ok and sent_ok,
               f"mode={j.get('mode')} chunks_sent={j.get('chunks_sent')} changed={bm_diff.get('changed_chunks')}")
    else:
        target("blkmirror differential: mode 'scan' and chunks_sent == changed chunks", False, "no successful run")

    if ok_run(bm_full) and qi_full and ok_run(qi_full):
        target("full sync no slower than qemu-img convert -> qemu-nbd",
               bm_full["seconds"] <= qi_full["seconds"],
               f"blkmirror {bm_full['seconds']:.2f}s vs qemu-img {qi_full['seconds']:.2f}s")
    else:
        target("full sync no slower than qemu-img convert -> qemu-nbd", False, "missing or failed run")

    bound = None
    if ok_run(bm_full) and ok_run(bm_diff) and floor:
        full_bps = bm_full["source_bytes"] / bm_full["seconds"]
        send_s = bm_diff["changed_bytes"] / full_bps
        bound = 1.3 * (floor["seconds"] + send_s)
        target("differential <= 1.3 x (floor + changed bytes at full-sync throughput)",
               bm_diff["seconds"] <= bound,
               f"{bm_diff['seconds']:.2f}s vs bound 1.3 x ({floor['seconds']:.2f} + {send_s:.3f}) = {bound:.2f}s")
    else:
        target("differential <= 1.3 x (floor + changed bytes at full-sync throughput)", False, "missing or failed run")

    if ok_run(bm_diff) and rs_diff and ok_run(rs_diff):
        sp_x = rs_diff["seconds"] / bm_diff["seconds"]
        target("differential >= 5x faster than rsync", sp_x >= 5,
               f"rsync {rs_diff['seconds']:.2f}s / blkmirror {bm_diff['seconds']:.2f}s = {sp_x:.1f}x")
    else:
        target("differential >= 5x faster than rsync", False, "missing or failed run")

    if sparse_rows:
        target("sparse differential 16 GiB / 1 GiB <= 1.5", sparse_ratio is not None and sparse_ratio <= 1.5,
               f"wall ratio {fmt(sparse_ratio)} (blkmirror's own 'seconds' ratio {fmt(sparse_ratio_internal)})")
    else:
        target("sparse differential 16 GiB / 1 GiB <= 1.5", None, "skipped (--no-sparse)")

    bm_recs = [r for r in raw if r["tool"].startswith("blkmirror")]
    peak_c = max([r.get("rss_kib") or 0 for r in bm_recs] or [0])
    peak_s = max([r.get("server_rss_kib") or 0 for r in bm_recs] or [0])
    target("blkmirror peak RSS <= 128 MiB (sync and serve, every run)",
           bool(bm_recs) and peak_c <= 128 * 1024 and peak_s <= 128 * 1024,
           f"sync max {peak_c / 1024:.1f} MiB, serve max {peak_s / 1024:.1f} MiB")

    # ---- text table ---------------------------------------------------------
    hdr = ["workload", "tool", "seconds", "MiB/s(source)", "ratio_vs_blkmirror", "peak_RSS_MiB", "CPU_s", "wire_MiB", "then_sync_s", "result"]
    table = []
    for r in rows:
        alls = r.get("seconds_all") or []
        secs_text = fmt(r["seconds"]) + (f" ({min(alls):.2f}-{max(alls):.2f}, median of {len(alls)})" if len(alls) > 1 else "")
        table.append([r["workload"], r["tool"], secs_text, fmt(r["mib_s"], 0),
                      fmt(r["ratio_vs_blkmirror"]) if r["ratio_vs_blkmirror"] is not None else "-",
                      r["rss"], r["cpu"], fmt(r["wire_mib"], 1), fmt(r["flush"]), r["status"]])
    for r in sparse_rows:
        table.append([r["workload"], r["tool"], r["seconds_text"], "-",
                      f"16G/1G = {fmt(r['ratio'])}", r["rss"], r["cpu"], r["wire_text"], "-", r["status"]])
    widths = [max(len(str(x[i])) for x in [hdr] + table) for i in range(len(hdr))]

    def line(cells):
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()

    text = [line(hdr)] + [line(c) for c in table]
    tlines = [f"{t['result'] or 'SKIP':4}  {t['target']}: {t['detail']}" for t in targets]

    hdr_info = (f"blkmirror {env.get('blkmirror_git')} | {env.get('cpus')} CPUs {env.get('cpu')} | "
                f"{env.get('mem_gib')} GiB RAM | kernel {env.get('host_kernel')} | work fs {env.get('work_fs')}\n"
                f"source: {image['size_bytes'] / (1 << 30):.0f} GiB mixed image: {image['random_pct']}% random, "
                f"{image['text_pct']}% text, {image['zero_pct']}% zeros "
                f"(holes {image['zero_hole_bytes'] / MiB:.0f} MiB, written zeros {image['zero_written_bytes'] / MiB:.0f} MiB); "
                f"diff: {mutate['changed_chunks']} of {mutate['chunks_total']} 64 KiB chunks changed")
    loads = [r.get("load1") for r in recs if isinstance(r.get("load1"), (int, float))]
    if loads and max(loads) > 1.0:
        hdr_info += (f"\nWARNING: 1-minute load average was up to {max(loads):.2f} when runs started "
                     f"(other work on this {env.get('cpus')}-CPU machine); timings are noisy, compare runs.")
    print()
    print(hdr_info)
    print()
    print("\n".join(text))
    print()
    print("\n".join(tlines))
    print()

    # ---- files --------------------------------------------------------------
    out = {
        "env": env, "image": image, "mutate": mutate, "records": raw, "aggregated": recs,
        "rows": rows, "sparse_rows": sparse_rows, "targets": targets,
        "diff_bound_seconds": bound,
    }
    with open(a.out + ".json", "w") as f:
        json.dump(out, f, indent=1)
    md = ["# blkmirror benchmark — latest run", "", hdr_info.replace("\n", "  \n"), "",
          "| " + " | ".join(hdr) + " |", "|" + "|".join("---" for _ in hdr) + "|"]
    for c in table:
        md.append("| " + " | ".join(str(x).replace("|", "\\|") for x in c) + " |")
    md += ["", "## Targets", ""]
    for t in targets:
        md.append(f"- **{t['result'] or 'SKIP'}** {t['target']}: {t['detail']}")
    md += ["", "## Commands", ""]
    for r in recs:
        md.append(f"- {r['workload']} / {r['tool']}: `{r.get('cmd', '')}`")
    md.append("")
    with open(a.out + ".md", "w") as f:
        f.write("\n".join(md))

    plot(a.out + ".png", recs, env)
    print(f"wrote {a.out}.json {a.out}.md {a.out}.png")
    return 0 if correct else 1


def plot(path, recs, env):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # noqa: BLE001
        print(f"plot skipped: matplotlib unavailable ({e})")
        return
    groups = []
    for wl in ("floor", "full", "diff 1%", "sparse full", "sparse diff"):
        items = [r for r in recs if r["workload"] == wl]
        if items:
            groups.append((wl, items))
    fig, axes = plt.subplots(1, len(groups), figsize=(4 + 3.2 * len(groups), 5.2),
                             gridspec_kw={"width_ratios": [max(len(i), 1.3) for _, i in groups]})
    if len(groups) == 1:
        axes = [axes]
    for ax, (wl, items) in zip(axes, groups):
        labels = [r["tool"].replace(" -> ", "\n-> ").replace(" (QUIC+TLS)", "\n(QUIC+TLS)")
                  .replace(" --", "\n--").replace(" sparse", "\nsparse") for r in items]
        vals = [r["seconds"] if r.get("rc") == 0 else 0 for r in items]
        colors = ["#1f77b4" if r["tool"].startswith("blkmirror") else
                  ("#7f7f7f" if wl == "floor" else "#ff7f0e") for r in items]
        bars = ax.bar(range(len(items)), vals, color=colors)
        for b, r, v in zip(bars, items, vals):
            txt = f"{v:.2f}s" if r.get("rc") == 0 else "ERR"
            if "seconds_all" in r and r.get("rc") == 0:
                txt = f"{v:.2f}s (median)"
            if r.get("verified") is False:
                txt += "\nWRONG"
            ax.annotate(txt, (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom",
                        fontsize=8, xytext=(0, 2), textcoords="offset points")
        ax.set_xticks(range(len(items)))
        ax.set_xticklabels(labels, fontsize=7.5, rotation=0)
        ax.set_title(wl, fontsize=10)
        ax.set_ylim(0, max(vals + [0.01]) * 1.2)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("seconds (lower is better)")
    fig.suptitle(f"blkmirror vs peer tools — {env['size_bytes'] >> 30} GiB source, loopback, "
                 f"{env.get('cpus')} CPUs ({env.get('blkmirror_git')})", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
