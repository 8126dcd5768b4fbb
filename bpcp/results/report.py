"""`bpcp report`: one self-contained report.html for a run folder (the picture of how a run went).

Reads only the run folder (docs/run-folder.md): joblog.tsv (GNU parallel's, appended to by every
resume and retry), published/<job>/bpcp-job.json, failed/<job>/reason.txt, plan.json, and
profile.json when `bpcp profile` wrote one. Writes <run>/report.html: a Gantt chart of jobs per
slot per host, the distribution of job times, image sets completed over time, failures with their
reasons, and how well the cores were used. The charts are one PNG (matplotlib, Agg) embedded as a
base64 data URI: the file has no external assets and opens anywhere. Each Gantt bar is labelled
with its job's groups when the label fits in it, and has a hover title (job id, groups, image
sets, time, host) from a transparent box laid over the PNG in percent of its size.

`bpcp run` and `bpcp merge` write the report at their end through `finish_report`, which turns any
failure to draw it into one line: the report describes a run and never fails it.

Slots are not in the joblog: they are assigned per host from the jobs' start/end overlap (each
job goes to the lowest slot free at its start), which reproduces GNU parallel's job slots.
"""
from __future__ import annotations

import argparse
import base64
import html
import io
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bpcp import planfile
from bpcp.errors import BpcpError
from bpcp.planfile import Plan
from bpcp.results.joblog import Attempt, read_joblog
from bpcp.runfolder import RunFolder, write_atomic

REPORT_FILE = "report.html"
LOCAL_HOST = ":"           # GNU parallel's name for the controller itself


@dataclass
class RunReport:
    run_dir: Path
    plan: Plan
    attempts: list[Attempt]
    published: dict[str, dict[str, Any]]
    failed: dict[str, str]
    work_seconds: float | None
    work_source: str
    cores: int | None
    cores_source: str
    notes: list[str] = field(default_factory=list)

    # ---- derived figures
    @property
    def hosts(self) -> list[str]:
        return sorted({a.host for a in self.attempts})

    def slots(self) -> dict[str, int]:
        return {h: 1 + max(a.slot for a in self.attempts if a.host == h) for h in self.hosts}

    @property
    def span(self) -> tuple[float, float]:
        if not self.attempts:
            return 0.0, 0.0
        return min(a.start for a in self.attempts), max(a.end for a in self.attempts)

    def active_wall(self) -> float:
        """Seconds during which at least one job ran (gaps between resumed runs left out)."""
        total, cur_start, cur_end = 0.0, None, None
        for a in sorted(self.attempts, key=lambda a: a.start):
            if cur_end is None or a.start > cur_end:
                if cur_end is not None:
                    total += cur_end - cur_start
                cur_start, cur_end = a.start, a.end
            else:
                cur_end = max(cur_end, a.end)
        if cur_end is not None:
            total += cur_end - cur_start
        return total

    def busy_seconds(self) -> float:
        return sum(a.runtime for a in self.attempts)

    def summary(self) -> dict[str, Any]:
        jobs = self.plan.jobs
        wall = self.active_wall()
        slots = sum(self.slots().values()) if self.attempts else 0
        busy = self.busy_seconds()
        ok = [a for a in self.attempts if a.ok]
        times = [a.runtime for a in ok]
        out = {
            "jobs_planned": len(jobs),
            "jobs_published": sum(1 for j in jobs if j.id in self.published),
            "jobs_failed": sum(1 for j in jobs if j.id in self.failed and j.id not in self.published),
            "image_sets_planned": self.plan.image_sets,
            "image_sets_published": sum(int(p.get("image_sets", 0)) for p in self.published.values()),
            "attempts": len(self.attempts),
            "failed_attempts": len(self.attempts) - len(ok),
            "hosts": self.slots(),
            "slots": slots,
            "wall_seconds": wall,
            "span_seconds": self.span[1] - self.span[0],
            "busy_seconds": busy,
            "busy_fraction": busy / (slots * wall) if slots and wall > 0 else None,
            "job_seconds": {
                "min": min(times), "median": statistics.median(times), "max": max(times),
                "mean": statistics.fmean(times),
            } if times else None,
            "work_seconds": self.work_seconds,
            "work_source": self.work_source,
            "cores": self.cores,
            "cores_source": self.cores_source,
            "efficiency": (self.work_seconds / (self.cores * wall)
                           if self.work_seconds and self.cores and wall > 0 else None),
        }
        return out


# ----------------------------------------------------------------------------- reading
def assign_slots(attempts: list[Attempt]) -> None:
    """Per host, put each attempt on the lowest slot that is free when it starts."""
    by_host: dict[str, list[Attempt]] = {}
    for a in attempts:
        by_host.setdefault(a.host, []).append(a)
    for items in by_host.values():
        free_at: list[float] = []
        for a in sorted(items, key=lambda a: (a.start, a.seq)):
            for slot, end in enumerate(free_at):
                if end <= a.start + 1e-6:
                    a.slot, free_at[slot] = slot, a.end
                    break
            else:
                a.slot = len(free_at)
                free_at.append(a.end)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def load(run_dir: Path, work_seconds: float | None = None, cores: int | None = None) -> RunReport:
    run_dir = Path(run_dir)
    plan = planfile.read(RunFolder(run_dir))
    attempts, notes = read_joblog(run_dir / "joblog.tsv")
    assign_slots(attempts)
    published = {}
    for p in sorted((run_dir / "published").glob("*/bpcp-job.json")):
        doc = _read_json(p)
        if doc is None:
            notes.append(f"{p.relative_to(run_dir)}: unreadable")
        else:
            published[p.parent.name] = doc
    failed = {}
    for p in sorted((run_dir / "failed").glob("*/reason.txt")):
        failed[p.parent.name] = p.read_text(errors="replace").strip() or "(empty reason.txt)"

    source = "given" if work_seconds else ""
    if not work_seconds:
        profile = _read_json(run_dir / "profile.json")
        derived = (profile or {}).get("derived") or {}
        if "startup_seconds" in derived and "seconds_per_image_set" in derived:
            n = plan.image_sets
            work_seconds = derived["startup_seconds"] + derived["seconds_per_image_set"] * n
            source = (f"profile.json: {derived['startup_seconds']:.2f} s start-up + "
                      f"{derived['seconds_per_image_set']:.3f} s x {n} image sets")
    cores_source = "given" if cores else ""
    if not cores:
        hosts = {a.host for a in attempts}
        if hosts <= {LOCAL_HOST}:
            cores, cores_source = os.cpu_count(), "this host's cores (every job ran here)"
    return RunReport(run_dir, plan, attempts, published, failed, work_seconds, source, cores, cores_source, notes)


# ----------------------------------------------------------------------------- charts
def _host_label(host: str, published: dict[str, dict]) -> str:
    if host != LOCAL_HOST:
        return host
    names = {p.get("host") for p in published.values() if p.get("host")}
    return f"local ({', '.join(sorted(names))})" if len(names) == 1 else "local"


@dataclass(frozen=True)
class Bar:
    """One Gantt bar where it lies in the PNG, in percent of the image, and its hover title."""
    left: float
    top: float
    width: float
    height: float
    title: str
    label: str            # the text drawn in the bar ("" when none fits)


def group_labels(plan: Plan) -> dict[str, list[str]]:
    """Per job, label candidates from longest to shortest: the group values that differ between
    jobs (all of them when none does), with "+N" for a bundle's further groups."""
    groups = [g for job in plan.jobs for g in job.groups]
    keys = [k for k in (groups[0] if groups else {}) if len({g.get(k) for g in groups}) > 1] or \
        list(groups[0] if groups else {})
    out = {}
    for job in plan.jobs:
        if not job.groups:
            continue
        each = [" ".join(str(g.get(k, "")) for k in keys) for g in job.groups]
        more = f" +{len(each) - 1}" if len(each) > 1 else ""
        last = str(job.groups[0].get(keys[-1], "")) if keys else ""
        every = ", ".join(each) if 1 < len(each) <= 8 else ""
        out[job.id] = list(dict.fromkeys(x for x in (every, each[0] + more, last + more.strip()) if x.strip()))
    return out


def bar_title(a: Attempt, rep: RunReport) -> str:
    lines = [a.job]
    try:
        groups = rep.plan.job(a.job).groups
    except BpcpError:
        groups = ()
    if groups:
        shown = ", ".join("/".join(str(v) for v in g.values()) for g in groups[:8])
        lines.append(f"groups: {shown}{f' and {len(groups) - 8} more' if len(groups) > 8 else ''}")
    outcome = "succeeded" if a.ok else f"failed (exit {a.exitval}, signal {a.signal})"
    lines.append(f"{a.image_sets} image sets, {_fmt_s(a.runtime)}, {_host_label(a.host, rep.published)} "
                 f"slot {a.slot + 1}, {outcome}")
    return "\n".join(lines)


def charts_png(rep: RunReport) -> bytes:
    """The three charts as one PNG."""
    return draw_charts(rep)[0]


def draw_charts(rep: RunReport) -> tuple[bytes, list[Bar]]:
    """The three charts as one PNG, and where each Gantt bar lies in it."""
    try:
        import matplotlib
    except ImportError:
        raise BpcpError("bpcp report draws its charts with matplotlib, which is not installed here; "
                        "pip install matplotlib (the version in requirements/lock.txt)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = rep.span[0]
    hosts = rep.hosts
    slots = rep.slots() if rep.attempts else {}
    rows = sum(slots.values()) or 1
    fig = plt.figure(figsize=(12, 4.5 + 0.28 * min(rows, 60)), dpi=100)
    grid = fig.add_gridspec(2, 2, height_ratios=[max(1.5, 0.28 * min(rows, 60)), 2.6], hspace=0.35, wspace=0.22)
    ax = fig.add_subplot(grid[0, :])
    labels, base = [], 0
    offsets = {}
    for h in hosts:
        offsets[h] = base
        for s in range(slots[h]):
            labels.append(f"{_host_label(h, rep.published)} slot {s + 1}")
        base += slots[h]
    for a in rep.attempts:
        y = offsets[a.host] + a.slot
        ax.broken_barh([(a.start - t0, max(a.runtime, 0.01))], (y - 0.4, 0.8),
                       facecolors="#4C9F70" if a.ok else "#D1495B", edgecolors="white", linewidth=0.5)
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels if len(labels) <= 60 else [""] * len(labels), fontsize=8)
    ax.set_ylim(-0.6, max(len(labels), 1) - 0.4)
    ax.invert_yaxis()
    ax.set_xlabel("seconds since the first job started")
    ax.set_title("Jobs per slot (green: succeeded, red: failed attempt; label: the job's groups, "
                 "when it fits; hover a bar for its job)")
    ax.grid(axis="x", alpha=0.3)

    ax2 = fig.add_subplot(grid[1, 0])
    ok = [a.runtime for a in rep.attempts if a.ok]
    bad = [a.runtime for a in rep.attempts if not a.ok]
    if ok or bad:
        ax2.hist([ok, bad], bins=min(30, max(5, len(rep.attempts) // 2)), stacked=True,
                 color=["#4C9F70", "#D1495B"], label=["succeeded", "failed"])
        ax2.legend(fontsize=8)
    ax2.set_xlabel("job time, s")
    ax2.set_ylabel("jobs")
    ax2.set_title("Distribution of job times")

    ax3 = fig.add_subplot(grid[1, 1])
    done = sorted((a.end - t0, a.image_sets) for a in rep.attempts if a.ok)
    xs, ys, total = [0.0], [0], 0
    for t, n in done:
        xs.append(t)
        ys.append(total)
        total += n
        xs.append(t)
        ys.append(total)
    ax3.plot(xs, ys, color="#2E86AB")
    ax3.set_xlabel("seconds since the first job started")
    ax3.set_ylabel("image sets completed")
    ax3.set_title("Throughput")
    ax3.grid(alpha=0.3)

    # Labels that fit their bar, then the bars' boxes in the cropped image savefig will write.
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    names = group_labels(rep.plan)
    boxes = []
    for a in rep.attempts:
        y = offsets[a.host] + a.slot
        (x0, y0), (x1, y1) = ax.transData.transform([(a.start - t0, y - 0.4),
                                                     (a.start - t0 + max(a.runtime, 0.01), y + 0.4)])
        drawn = ""
        room = abs(x1 - x0) - 4
        slug = a.job.rsplit("-", 1)[0]                  # a job of an older plan: its id's groups
        candidates = names.get(a.job) or list(dict.fromkeys([slug, slug.rsplit("_", 1)[-1]]))
        for text in (candidates if room > 8 and abs(y1 - y0) > 8 else []):
            label = ax.text(a.start - t0 + a.runtime / 2, y, text, ha="center", va="center", fontsize=8,
                            color="white", clip_on=True)
            if label.get_window_extent(renderer).width <= room:
                drawn = text
                break
            label.remove()
        boxes.append((a, drawn, min(x0, x1), max(y0, y1), abs(x1 - x0), abs(y1 - y0)))
    dpi = fig.dpi
    crop = fig.get_tightbbox(renderer).padded(0.1)
    width, height = crop.width * dpi, crop.height * dpi
    bars = [Bar(left=100 * (x - crop.x0 * dpi) / width, top=100 * (crop.y1 * dpi - top) / height,
                width=100 * w / width, height=100 * h / height, title=bar_title(a, rep), label=drawn)
            for a, drawn, x, top, w, h in boxes]
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches=crop)
    plt.close(fig)
    return buf.getvalue(), bars


# ----------------------------------------------------------------------------- HTML
CSS = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; max-width: 1300px; }
h1 { font-size: 22px; } h2 { font-size: 17px; margin-top: 28px; }
table { border-collapse: collapse; font-size: 13px; }
td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: left; }
th { background: #f2f2f2; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
tr.failed td { background: #fde8ea; } .muted { color: #666; } img { max-width: 100%; display: block; }
.charts { position: relative; display: inline-block; max-width: 100%; }
.charts .bar { position: absolute; } .charts .bar:hover { outline: 2px solid #222; }
"""


def _fmt_s(x: float | None) -> str:
    if x is None:
        return "-"
    if x >= 3600:
        return f"{x / 3600:.2f} h"
    if x >= 120:
        return f"{x / 60:.1f} min"
    return f"{x:.1f} s"


def render_html(rep: RunReport, png: bytes, bars: list[Bar] | tuple[Bar, ...] = ()) -> str:
    s = rep.summary()
    e = html.escape
    t0 = rep.span[0]
    out = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>bpcp report: {e(rep.run_dir.name)}</title><style>{CSS}</style></head><body>",
        f"<h1>bpcp run report: {e(str(rep.run_dir))}</h1>",
        f"<p class='muted'>written {e(time.strftime('%Y-%m-%d %H:%M:%S'))} from joblog.tsv, published/, failed/ and "
        f"plan.json; CellProfiler {e(rep.plan.cellprofiler.version)}</p>",
        "<h2>Summary</h2><table>",
    ]

    def row(label: str, value: str) -> None:
        out.append(f"<tr><th>{e(label)}</th><td>{value}</td></tr>")

    row("jobs", f"{s['jobs_published']} of {s['jobs_planned']} published, {s['jobs_failed']} failed")
    row("image sets", f"{s['image_sets_published']} of {s['image_sets_planned']} published")
    row("attempts", f"{s['attempts']} in the joblog ({s['failed_attempts']} failed)")
    row("hosts and slots", e(", ".join(f"{_host_label(h, rep.published)}: {n}" for h, n in s["hosts"].items()) or "-"))
    row("wall time", f"{_fmt_s(s['wall_seconds'])} with jobs running"
        + (f" (first start to last end {_fmt_s(s['span_seconds'])})" if s["span_seconds"] - s["wall_seconds"] > 1 else ""))
    if s["job_seconds"]:
        j = s["job_seconds"]
        row("job time", f"min {_fmt_s(j['min'])}, median {_fmt_s(j['median'])}, max {_fmt_s(j['max'])}")
    bf = s["busy_fraction"]
    row("busy fraction", (f"{bf:.3f} = sum of job time {_fmt_s(s['busy_seconds'])} / ({s['slots']} slots x "
                          f"{_fmt_s(s['wall_seconds'])})") if bf is not None else "-")
    if s["efficiency"] is not None:
        row("efficiency", f"<b>{s['efficiency']:.3f}</b> = W {_fmt_s(s['work_seconds'])} / ({s['cores']} cores x "
            f"{_fmt_s(s['wall_seconds'])}); W from {e(s['work_source'])}; cores: {e(s['cores_source'])}")
    elif s["work_seconds"] and not s["cores"]:
        row("efficiency", f"not known: {e('the number of cores of the remote hosts is not known: pass --cores')}")
    else:
        shows = (f"this run shows the busy fraction above: {bf:.3f} of the slots' time had a job running"
                 if bf is not None else "no job has run yet")
        row("efficiency", f"not known without a profile.json (the time of one process over all image sets); "
            f"{e(shows)}")
    out.append("</table>")

    out.append("<h2>Charts</h2>")
    out.append("<div class='charts'>")
    out.append(f"<img id='charts' alt='Gantt chart of jobs per slot, job times and throughput' "
               f"src='data:image/png;base64,{base64.b64encode(png).decode()}'>")
    for b in bars:
        out.append(f"<div class='bar' style='left:{b.left:.3f}%;top:{b.top:.3f}%;width:{b.width:.3f}%;"
                   f"height:{b.height:.3f}%' title='{e(b.title)}' data-label='{e(b.label)}'></div>")
    out.append("</div>")

    out.append("<h2>Failures</h2>")
    open_failures = {j: r for j, r in rep.failed.items() if j not in rep.published}
    if open_failures:
        out.append("<table><tr><th>job</th><th>reason (failed/&lt;job&gt;/reason.txt)</th></tr>")
        for job, reason in open_failures.items():
            out.append(f"<tr class='failed'><td>{e(job)}</td><td>{e(reason)}</td></tr>")
        out.append("</table>")
    else:
        out.append("<p>No job is failed.</p>")
    retried = sorted({a.job for a in rep.attempts if not a.ok} - set(open_failures))
    if retried:
        out.append(f"<p>Failed attempts that later succeeded: {e(', '.join(retried))}</p>")

    out.append("<h2>Jobs</h2><table><tr><th>#</th><th>job</th><th>host</th><th>slot</th><th>start, s</th>"
               "<th>time, s</th><th>image sets</th><th>s per image set</th><th>exit</th><th>signal</th></tr>")
    for a in sorted(rep.attempts, key=lambda a: (a.start, a.seq)):
        per = f"{a.runtime / a.image_sets:.2f}" if a.image_sets else "-"
        out.append(f"<tr class='{'ok' if a.ok else 'failed'} job'><td class='n'>{a.seq}</td><td>{e(a.job)}</td>"
                   f"<td>{e(_host_label(a.host, rep.published))}</td><td class='n'>{a.slot + 1}</td>"
                   f"<td class='n'>{a.start - t0:.1f}</td><td class='n'>{a.runtime:.1f}</td>"
                   f"<td class='n'>{a.image_sets}</td><td class='n'>{per}</td><td class='n'>{a.exitval}</td>"
                   f"<td class='n'>{a.signal}</td></tr>")
    out.append("</table>")
    never = [j.id for j in rep.plan.jobs if j.id not in {a.job for a in rep.attempts}
             and j.id not in rep.published]
    if never:
        out.append(f"<p>Planned jobs that have not run: {e(', '.join(never[:50]))}"
                   f"{f' and {len(never) - 50} more' if len(never) > 50 else ''}</p>")
    if rep.notes:
        out.append("<h2>Notes</h2><ul>" + "".join(f"<li>{e(n)}</li>" for n in rep.notes) + "</ul>")
    out.append("</body></html>\n")
    return "\n".join(out)


def write_report(run_dir: Path, work_seconds: float | None = None, cores: int | None = None,
                 link: bool = True) -> tuple[Path, dict[str, Any]]:
    """Write <run>/report.html; returns its path and the summary. With link, an existing
    report.json (the completeness report) gets a "report_html" key naming it."""
    run_dir = Path(run_dir).resolve()
    rep = load(run_dir, work_seconds, cores)
    png, bars = draw_charts(rep)
    text = render_html(rep, png, bars)
    path = run_dir / REPORT_FILE
    write_atomic(path, text)
    completeness = run_dir / "report.json"
    doc = _read_json(completeness) if link and completeness.exists() else None
    if isinstance(doc, dict):
        doc["report_html"] = REPORT_FILE
        write_atomic(completeness, json.dumps(doc, indent=2) + "\n")
    return path, rep.summary()


def summary_line(path: Path, s: dict[str, Any]) -> str:
    eff = f", efficiency {s['efficiency']:.3f}" if s["efficiency"] is not None else ""
    bf = (f"busy fraction {s['busy_fraction']:.3f} of the slots" if s["busy_fraction"] is not None
          else "no jobs in the joblog")
    return (f"bpcp: wrote {path}: {s['jobs_published']}/{s['jobs_planned']} jobs published, "
            f"{s['jobs_failed']} failed, wall {_fmt_s(s['wall_seconds'])}, {bf}{eff}")


def command(run_dir: Path, work_seconds: float | None = None, cores: int | None = None) -> int:
    path, s = write_report(run_dir, work_seconds, cores)
    print(summary_line(path, s))
    return 0


def finish_report(run_dir: Path) -> Path | None:
    """report.html at the end of `bpcp run` and `bpcp merge`: its path, or None after one line on
    stderr saying why it could not be drawn. Any error is caught: the report describes the run,
    so drawing it must never change how the run ends."""
    try:
        path, _ = write_report(run_dir)
        return path
    except Exception as exc:  # matplotlib, a torn file, a full disk: one line, never a traceback
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"bpcp: report.html not written ({first}); the run's results are not affected; "
              f"`bpcp report --output {run_dir}` tries again", file=sys.stderr)
        return None


def results_line(run_dir: Path, html_written: Path | None) -> str:
    """The last line of `bpcp run` and `bpcp merge`: where the results are ("" when nothing is)."""
    run_dir = Path(run_dir)
    parts = [(run_dir / "merged", "tables", (run_dir / "merged").is_dir()),
             (run_dir / "report.json", "completeness", (run_dir / "report.json").is_file()),
             (run_dir / REPORT_FILE, "how the run went: open it in a browser", html_written is not None)]
    shown = [f"{path}{'/' if path.suffix == '' else ''} ({what})" for path, what, there in parts if there]
    return f"bpcp: results: {', '.join(shown)}" if shown else ""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", "-o", type=Path, default=Path("bpcp-run"), help="the run folder (default ./bpcp-run)")
    p.add_argument("--work-seconds", type=float, default=None, metavar="W",
                   help="seconds one single-threaded CellProfiler process takes over all image sets "
                        "(from a benchmark); default: from profile.json when there is one")
    p.add_argument("--total-cores", dest="total_cores", type=int, default=None,
                   help="cores over all hosts, for the efficiency (default: this host's, when every job ran here)")


def cli_command(args: argparse.Namespace) -> int:
    return command(args.output.resolve(), args.work_seconds, args.total_cores)
