"""Turn a pytest-benchmark JSON file into ``docs/benchmarks.md`` with PNG plots, and keep the
raw JSON it was computed from next to it (``docs/benchmarks.json``).

    .venv/bin/python bench/report.py [RUN.json ...] [--out docs/benchmarks.md] [--img docs/img]
                                     [--no-plots]

Run the benchmarks and publish, in one command (what the report itself says to run)::

    ./dev bench && .venv/bin/pip install matplotlib && .venv/bin/python bench/report.py

Default input: ``.benchmarks/latest.json`` (what ``./dev bench`` writes). Several files may be
given: each *group* of benchmarks is taken whole from the last file that has it, so every ratio
is computed between rows of the same run. The kept JSON is an input like any other: re-render
the page from it with ``bench/report.py docs/benchmarks.json``. Plots need matplotlib
(``.venv/bin/pip install matplotlib``; it is not a dependency of mcs); ``--no-plots`` does
without.

Every sentence that states a result is computed from the run's numbers (the comparison word,
"faster" or "slower", "met" or "missed", is chosen by them), and every workload description
from what each benchmark recorded in ``extra_info``.

Every figure is shown next to its ratio against the group's baseline row of the same run:

* a row whose ``extra_info`` has ``"baseline": true`` (when a group has several, the one sharing
  the most parameters with the row: each series its own baseline);
* otherwise the known baseline of a known group (``threading.Lock`` for ``lock-unlock``,
  ``bytes(bytearray)`` of the same size for ``copy``, ``threading.Lock-with`` for
  ``consistent-block``);
* otherwise a row with ``baseline`` in its name, else the group's first row (said so).

``webcache-scaling`` and ``cache-comparison`` (bench/test_scaling.py) get their own tables,
plots and text; every other group, known or not, gets a generic table of its headline numbers
(read from ``extra_info`` at run time), a plot and every scalar ``extra_info`` in a folded list.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import sys
from pathlib import Path
from typing import Any, Iterable

REPO = Path(__file__).resolve().parent.parent

KNOWN_BASELINES = {  # group -> the parameter value of its baseline row
    "lock-unlock": "threading.Lock",
    "consistent-block": "threading.Lock-with",
    "copy": "bytes(bytearray)",
}
HEADLINE_PATTERNS = [  # extra_info keys shown in generic tables, in this order of preference
    r"^(ns_per_pair|ns_per_block|gb_per_s|req_per_s|ops_per_s)$",
    r"(^|_)(p50|median)(_|$)",
    r"(^|_)p99(_|$)",
    r"hit_ratio",
    r"(^|_)max(_|$)",
    r"(_ms|_us|_ns|_per_s)$",
]
MAX_HEADLINES = 5


class ReportError(Exception):
    """A problem with the input or the environment, printed without a traceback."""


def need_matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise ReportError(
            "bench/report.py needs matplotlib to draw the plots, and it is not installed.\n"
            "  install it into the venv (it is not a dependency of mcs):\n"
            "    .venv/bin/pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


# -- input -------------------------------------------------------------------------------------


def load_runs(paths: list[Path]) -> tuple[dict[str, list[dict]], dict[str, Path], list[dict]]:
    """(group -> rows, group -> source file, the loaded documents in order)."""
    groups: dict[str, list[dict]] = {}
    source: dict[str, Path] = {}
    docs = []
    for path in paths:
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            raise ReportError(f"{path}: no such file (run './dev bench' first, or give a JSON "
                              "file written by --benchmark-json)") from None
        except json.JSONDecodeError as exc:
            raise ReportError(f"{path}: not JSON ({exc})") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("benchmarks"), list):
            raise ReportError(f"{path}: not a pytest-benchmark JSON file (no 'benchmarks' list)")
        docs.append({"path": path, "doc": doc})
        mine: dict[str, list[dict]] = {}
        for b in doc["benchmarks"]:
            mine.setdefault(b.get("group") or "(no group)", []).append(b)
        # a kept report (docs/benchmarks.json) says which run each of its groups came from
        recorded = doc.get("mcs_report_sources") or {}
        for g, rows in mine.items():
            groups[g] = rows
            where = recorded.get(g)
            source[g] = REPO / where if isinstance(where, str) else path
    if not groups:
        raise ReportError("no benchmarks in the input")
    return groups, source, docs


def median_s(b: dict) -> float | None:
    stats = b.get("stats") or {}
    return stats.get("median")


def xi(b: dict) -> dict[str, Any]:
    return b.get("extra_info") or {}


def param_label(b: dict) -> str:
    if b.get("param"):
        return str(b["param"])
    name = b.get("name", "?")
    m = re.search(r"\[(.*)\]$", name)
    return m.group(1) if m else name


def params(b: dict) -> dict[str, Any]:
    return b.get("params") or {}


# -- baselines and ratios ------------------------------------------------------------------------


def _closest(row: dict, candidates: list[dict]) -> dict:
    mine = params(row)

    def shared(c: dict) -> int:
        return sum(1 for k, v in params(c).items() if mine.get(k) == v)

    return max(candidates, key=shared)  # max keeps the first of equals


def baselines(group: str, rows: list[dict]) -> tuple[dict[str, dict], str]:
    """row name -> its baseline row, and a sentence saying how it was chosen."""
    flagged = [b for b in rows if xi(b).get("baseline") is True]
    if flagged:
        return ({b["name"]: _closest(b, flagged) for b in rows},
                "baseline: the row(s) flagged `baseline` in extra_info" +
                (" (each series against its own)" if len(flagged) > 1 else "") +
                f": {', '.join(param_label(b) for b in flagged)}")
    known = KNOWN_BASELINES.get(group)
    if known is not None:
        cands = [b for b in rows if known in params(b).values() or param_label(b) == known]
        if cands:
            return ({b["name"]: _closest(b, cands) for b in rows},
                    f"baseline: `{known}`" + (" (same other parameters)" if len(cands) > 1 else ""))
    named = [b for b in rows if "baseline" in b["name"].lower()]
    if named:
        return ({b["name"]: _closest(b, named) for b in rows},
                f"baseline: `{param_label(named[0])}` (named so)")
    if len(rows) == 1:
        return {rows[0]["name"]: rows[0]}, "a single row: no baseline in this group"
    return ({b["name"]: rows[0] for b in rows},
            f"baseline: the first row, `{param_label(rows[0])}` (the group names none)")


def ratio(value: Any, base: Any) -> float | None:
    if not _num(value) or not _num(base) or base == 0:
        return None
    return value / base


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        a = abs(v)
        if a == 0:
            return "0"
        if a >= 1000:
            return f"{v:,.0f}"
        if a >= 100:
            return f"{v:.1f}"
        if a >= 1:
            return f"{v:.2f}"
        if a >= 0.01:
            return f"{v:.3f}"
        return f"{v:.3g}"
    if v is None:
        return "—"
    return str(v)


def fmt_ratio(r: float | None) -> str:
    """×r to two decimals; three where two would round across 1.0 (×0.996 is not ×1.00: a
    target of ×1.0 is judged on the exact value)."""
    if r is None:
        return "—"
    if r >= 100:
        return f"×{r:,.0f}"
    return f"×{r:.3f}" if (r < 1.0) != (round(r, 2) < 1.0) else f"×{r:.2f}"


def fmt_bytes(n: float) -> str:
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n:.0f} B"


def md_table(header: list[str], rows: Iterable[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |")
    return "\n".join(lines)


# -- the machine ---------------------------------------------------------------------------------


def host_description() -> dict[str, str]:
    model, processors = "unknown", 0
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model == "unknown":
                    model = line.split(":", 1)[1].strip()
                if line.startswith("processor"):
                    processors += 1
    except OSError:
        pass
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem = fmt_bytes(int(line.split()[1]) * 1024)
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 0
    return {"CPU model (/proc/cpuinfo)": model,
            "logical CPUs": f"{processors or os.cpu_count()} ({usable} usable by this process)",
            "memory": mem or "unknown",
            "kernel": f"{platform.system()} {platform.release()} ({platform.machine()})",
            "Python": f"{platform.python_implementation()} {platform.python_version()}"}


def run_label(doc: dict) -> str:
    """When and at which commit a run was measured: ``2026-12-03 09:46 UTC, commit 12aa4de3ded8``."""
    when = str(doc.get("datetime", "?"))
    try:
        when = dt.datetime.fromisoformat(when).astimezone(dt.timezone.utc).strftime(
            "%Y-%m-%d %H:%M UTC")
    except ValueError:
        pass
    ci = doc.get("commit_info") or {}
    commit = str(ci.get("id", "?"))[:12] + (" (dirty tree)" if ci.get("dirty") else "")
    return f"{when}, commit {commit}"


def run_labels(docs: list[dict], source: dict[str, Path]) -> dict[Path, str]:
    """Each source run's :func:`run_label`: from the run itself, or for a kept report (which
    merged several runs) from what it recorded (``mcs_report_runs``)."""
    labels: dict[Path, str] = {}
    for d in docs:
        recorded = d["doc"].get("mcs_report_runs") or {}
        for where, label in recorded.items():
            labels[REPO / where] = str(label)
        labels.setdefault(d["path"], run_label(d["doc"]))
    return {p: labels.get(p, "?") for p in dict.fromkeys(source.values())}


def run_description(doc: dict) -> dict[str, str]:
    mi = doc.get("machine_info") or {}
    cpu = mi.get("cpu") or {}
    ci = doc.get("commit_info") or {}
    out = {
        "date": str(doc.get("datetime", "?")),
        "CPU": f"{cpu.get('brand_raw', '?')}, {cpu.get('count', '?')} logical CPUs, "
               f"{cpu.get('hz_actual_friendly', '?')}",
        "kernel": f"{mi.get('system', '?')} {mi.get('release', '?')} ({mi.get('machine', '?')})",
        "Python": f"{mi.get('python_implementation', '?')} {mi.get('python_version', '?')}",
        "pytest-benchmark": str(doc.get("version", "?")),
    }
    if ci:
        dirty = " (dirty tree)" if ci.get("dirty") else ""
        out["commit"] = f"{str(ci.get('id', '?'))[:12]}{dirty} on {ci.get('branch', '?')}"
    return out


# -- plots ---------------------------------------------------------------------------------------


def _bar_labels(ax, bars, texts: list[str], horizontal: bool = False) -> None:
    for bar, text in zip(bars, texts):
        if horizontal:
            ax.annotate(text, (bar.get_width(), bar.get_y() + bar.get_height() / 2),
                        xytext=(3, 0), textcoords="offset points", va="center", fontsize=8)
        else:
            ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        xytext=(0, 2), textcoords="offset points", ha="center", fontsize=8)


def plot_scaling(plt, rows: list[dict], path: Path) -> None:
    impls = list(dict.fromkeys(xi(b).get("impl", "mcs-shared") for b in rows))
    nodes = sorted({xi(b)["nodes"] for b in rows})
    by = {(xi(b).get("impl", "mcs-shared"), xi(b)["nodes"]): xi(b) for b in rows}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.8 / max(1, len(impls))
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"]
    color = {impl: palette[i % len(palette)] for i, impl in enumerate(impls)}
    for i, impl in enumerate(impls):
        xs = [j + (i - (len(impls) - 1) / 2) * width for j in range(len(nodes))]
        vals = [by.get((impl, n), {}).get("req_per_s", 0) for n in nodes]
        bars = ax1.bar(xs, vals, width, label=impl, color=color[impl])
        _bar_labels(ax1, bars, [fmt_ratio(by.get((impl, n), {}).get("scaling_factor"))
                                for n in nodes])
    ax1.set_xticks(range(len(nodes)),
                   [f"{n} node{'s' if n > 1 else ''}" + ("\n(> cores)" if any(
                       by.get((i, n), {}).get("oversubscribed") for i in impls) else "")
                    for n in nodes])
    size = xi(rows[0]).get("file_bytes")
    ax1.set_ylabel("requests/s" + (f" ({fmt_bytes(size)} hits)" if _num(size) else " (hits)"))
    ax1.set_title("Hit throughput (label: × its 1-node run)")
    ax1.legend(fontsize=8)
    ax2.plot(nodes, nodes, "k--", label="ideal N×", linewidth=1)
    for impl in impls:
        pts = [(n, by[(impl, n)]) for n in nodes if (impl, n) in by]
        ax2.plot([n for n, _ in pts], [e.get("scaling_factor", 0) for _, e in pts], "o-",
                 color=color[impl], label=f"{impl}: req/s")
        ax2.plot([n for n, _ in pts], [e.get("cpu_scaling_factor", 0) for _, e in pts], "s:",
                 color=color[impl], label=f"{impl}: N × req per node-CPU-s")
    cores = xi(rows[0]).get("cores")
    if cores:
        ax2.axvline(cores, color="grey", linewidth=0.8)
        ax2.annotate(f"{cores} cores", (cores, 0.2), xytext=(3, 0), textcoords="offset points",
                     fontsize=8, color="grey")
    ax2.set_xlabel("nodes")
    ax2.set_ylabel("scaling factor vs 1 node")
    ax2.set_title("Scaling factor (same run)")
    ax2.set_xticks(nodes)
    ax2.set_ylim(bottom=0)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_comparison(plt, rows: list[dict], base: dict, path: Path) -> None:
    labels = [xi(b)["variant"] for b in rows]
    b0 = xi(base)
    metrics = [("hit_ratio", "hit ratio", 1.0),
               ("disk_bytes_per_request", "bytes read from disk per request", 1.0),
               ("req_per_s", "requests/s", 1.0)]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    colors = ["#999999" if xi(b).get("baseline") else "#1f77b4" if xi(b)["variant"].startswith(
        "mcs") else "#ff7f0e" for b in rows]
    for ax, (key, title, _) in zip(axes, metrics):
        vals = [xi(b).get(key, 0) or 0 for b in rows]
        bars = ax.bar(range(len(rows)), vals, color=colors)
        _bar_labels(ax, bars, [f"{fmt(v)}\n{fmt_ratio(ratio(v, b0.get(key)))}" for v in vals])
        ax.set_xticks(range(len(rows)), labels, fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.margins(y=0.25)
        if key == "hit_ratio":
            ax.set_ylim(0, 1.2)
    fig.suptitle(f"Zipf s={b0.get('zipf_s')} over {b0.get('files')} files "
                 f"({fmt_bytes(b0.get('file_set_bytes', 0))}), {b0.get('nodes')} nodes × "
                 f"{fmt_bytes(b0.get('cache_bytes_per_node', 0))}: ratios vs "
                 f"{b0.get('variant')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_generic(plt, group: str, rows: list[dict], key: str | None, base_of: dict[str, dict],
                 path: Path) -> None:
    labels, vals, texts, colors = [], [], [], []
    for b in rows:
        v = xi(b).get(key) if key else median_s(b)
        if not _num(v):
            continue
        base = base_of[b["name"]]
        bv = xi(base).get(key) if key else median_s(base)
        labels.append(param_label(b)[:48])
        vals.append(v)
        texts.append(f"{fmt(v)} {fmt_ratio(ratio(v, bv))}")
        colors.append("#999999" if any(base is b for base in base_of.values()) else "#1f77b4")
    if not vals:
        return
    fig, ax = plt.subplots(figsize=(9, 0.9 + 0.32 * len(vals)))
    bars = ax.barh(range(len(vals)), vals, color=colors)
    _bar_labels(ax, bars, texts, horizontal=True)
    ax.set_yticks(range(len(vals)), labels, fontsize=8)
    ax.invert_yaxis()
    positive = [v for v in vals if v > 0]
    if positive and max(positive) / min(positive) > 200:
        ax.set_xscale("log")
    ax.set_xlabel(key or "median time per round (s)")
    ax.set_title(f"{group} (label: value, × its baseline; grey: baseline)", fontsize=10)
    ax.margins(x=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- result sentences ----------------------------------------------------------------------------
# Every sentence that states a result is built from the run's numbers: the comparison word
# ("faster", "slower", "met", "missed", ...) is chosen by the data, never written in advance.

SAME_WITHIN = 0.03  # a relative difference under 3 % is reported as "about the same"
SCALING_TARGET = 0.9  # the scaling target: N nodes serve at least 0.9 x N the req/s of one


def compared(value: Any, base: Any, more: str, less: str, same: str) -> str:
    """``more`` when ``value`` exceeds ``base`` by more than :data:`SAME_WITHIN` (relative),
    ``less`` when it falls short by as much, ``same`` in between; "not comparable" when either
    number is missing."""
    if not _num(value) or not _num(base):
        return "not comparable"
    if base == 0:
        return same if value == 0 else more if value > 0 else less
    r = value / base
    return more if r > 1 + SAME_WITHIN else less if r < 1 - SAME_WITHIN else same


def met(value: Any, target: float, *, at_least: bool = True) -> str:
    """"met" or "missed": ``value`` against its ``target`` (a floor, or a ceiling when
    ``at_least`` is false); "not measured" when the value is missing."""
    if not _num(value):
        return "not measured"
    return "met" if (value >= target if at_least else value <= target) else "missed"


def met_flag(flag: Any) -> str:
    """The word for a target verdict the benchmark recorded itself (a boolean)."""
    return "met" if flag is True else "**missed**" if flag is False else "not measured"


def _and(items: Iterable[Any]) -> str:
    words = [str(i) for i in items]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def machine_sentence(docs: list[dict], groups: dict[str, list[dict]]) -> str:
    """How many CPUs the run had, and whether its benchmarks shared them with a load generator
    (as each recorded)."""
    cpu = ((docs[-1].get("machine_info") or {}).get("cpu") or {}).get("count", "?")
    shared = any(xi(b).get("load_generator_shares_cores") for rows in groups.values()
                 for b in rows)
    if shared:
        return (f"The run had {cpu} logical CPUs, and its multi-process benchmarks shared them "
                "with their load generator (each records it, and says so next to its numbers).")
    return f"The run had {cpu} logical CPUs."


def summary_line(doc: dict) -> str | None:
    """The headline ratios the run recorded, each with its target's verdict when recorded."""
    summary = doc.get("mcs_summary") or {}
    ratios, targets = summary.get("ratios") or {}, summary.get("targets") or {}
    if not ratios:
        return None
    parts = []
    for k, v in ratios.items():
        t = targets.get(k) or {}
        if "at_most" in t:
            parts.append(f"{k} = {fmt(v)} (target ≤ {t['at_most']:g}: "
                         f"{met(v, t['at_most'], at_least=False)})")
        elif "at_least" in t:
            parts.append(f"{k} = {fmt(v)} (target ≥ {t['at_least']:g}: "
                         f"{met(v, t['at_least'])})")
        else:
            parts.append(f"{k} = {fmt(v)}")
    return "Headline ratios recorded by the run: " + "; ".join(parts)


SERIES = {  # webcache-scaling series -> what it is
    "mcs-shared": "the nodes as shipped: hits from the native hit loop, or from the asyncio "
                  "fast path in runs older than the loop",
    "mcs-shared-aiohttp": "the same nodes with `--no-fast-path`: every request through aiohttp, "
                          "like the baseline",
    "shared-nothing-lru": "the baseline: an aiohttp node with a private dict, no shared memory, "
                          "no locks — what the HTTP stack alone costs",
}


def _impl(b: dict) -> str:
    return xi(b).get("impl", "mcs-shared")


def scaling_intro(rows: list[dict]) -> str:
    """The workload of webcache-scaling, from what the run recorded."""
    e0 = xi(rows[0])
    cores = e0.get("cores", "?")
    impls = list(dict.fromkeys(_impl(b) for b in rows))
    nodes = sorted({xi(b)["nodes"] for b in rows})
    files, size = e0.get("files"), e0.get("file_bytes")
    what = f"{files} files of {fmt_bytes(size)}" if _num(files) and _num(size) else "its files"
    ratios = [xi(b)["hit_ratio"] for b in rows
              if _impl(b).startswith("mcs-shared") and _num(xi(b).get("hit_ratio"))]
    hits = ("every request of the mcs series a hit" if ratios and min(ratios) >= 1 else
            f"mcs hit ratio at least {fmt(min(ratios))}" if ratios else "hit ratio not recorded")
    text = (f"Throughput of cache **hits** ({what}, {hits}) with {_and(nodes)} node processes "
            "on one port: " + "; ".join(f"**{i}** ({SERIES[i]})" if i in SERIES else f"**{i}**"
                                        for i in impls) + ". ")
    gen = f"the load generator (`{e0.get('loadgen')}`, `{e0.get('generator', '')}`)"
    if e0.get("load_generator_shares_cores"):
        text += (f"**The run had {cores} logical CPUs and {gen} ran on them too**, so N nodes "
                 "never get N cores: the wall-clock scaling factor is bounded by the CPU left "
                 "to the nodes (column *node cores used*). ")
    else:
        text += f"The run had {cores} logical CPUs, {gen} on cores of its own. "
    text += ("*CPU scaling* divides that out: N × (requests per node-CPU-second) relative to 1 "
             "node; it stays near N when the cache itself adds no contention.")
    if any(xi(b).get("oversubscribed") for b in rows):
        text += " Rows with more nodes than cores are oversubscribed on purpose."
    return text


def scaling_findings(rows: list[dict]) -> list[str]:
    """What the webcache-scaling run found, each verdict computed from its numbers."""
    cores = xi(rows[0]).get("cores", "?")
    series = {i: {xi(b)["nodes"]: xi(b) for b in rows if _impl(b) == i}
              for i in dict.fromkeys(_impl(b) for b in rows)}
    mcs, sn = series.get("mcs-shared", {}), series.get("shared-nothing-lru", {})
    out: list[str] = []
    if 1 in mcs and 2 in mcs:
        two = mcs[2]
        f, cpu = two.get("scaling_factor"), two.get("cpu_scaling_factor")
        target = SCALING_TARGET * 2
        wall, per_cpu = met(f, target), met(cpu, target)
        text = (f"From 1 to 2 mcs nodes: **{fmt_ratio(f)}** req/s, the ≥ {SCALING_TARGET:g} × N "
                f"= {target:g}× target **{wall}** (the MCS paper measured 2.0× with a CPU per "
                f"node); the 2 nodes got {fmt(two.get('node_cores_used'))} of {cores} cores, "
                f"the generator {fmt(two.get('generator_cores_used'))}. Per node-CPU-second the "
                f"2 nodes did {fmt_ratio(cpu)} the work of 1 node: target **{per_cpu}**")
        if per_cpu == "met":
            text += ", the shared cache adds no measurable contention"
            if wall == "missed":
                text += (", and what limits the wall-clock factor here is the cores left to "
                         "the nodes")
        if 1 in sn and 2 in sn:
            text += (f". The shared-nothing series, in the same run on the same cores: "
                     f"{fmt_ratio(sn[2].get('scaling_factor'))} req/s, "
                     f"{fmt_ratio(sn[2].get('cpu_scaling_factor'))} per node-CPU-second")
        out += [text + ".", ""]
    if 1 in mcs and 1 in sn:
        base = sn[1].get("req_per_node_cpu_s")
        cost = ratio(base, mcs[1].get("req_per_node_cpu_s"))
        word = compared(base, mcs[1].get("req_per_node_cpu_s"), "more", "less", "about as much")
        text = (f"At 1 node a hit served by mcs-shared costs {fmt_ratio(cost)} the CPU of one "
                f"served from a private dict: {word}")
        if word == "less":
            text += (" (its fast path saves the aiohttp request object the baseline pays for, "
                     "more than the bucket lock, pin, revalidation and checksum cost)")
        elif word == "more":
            text += " (the bucket lock, pin, revalidation and checksum of the entry)"
        aio = series.get("mcs-shared-aiohttp", {}).get(1)
        if aio is not None:
            cost = ratio(base, aio.get("req_per_node_cpu_s"))
            text += (f"; through aiohttp like the baseline (mcs-shared-aiohttp) it costs "
                     f"{fmt_ratio(cost)}: " + compared(base, aio.get("req_per_node_cpu_s"),
                                                       "more", "less", "about as much"))
        out += [text + ".", ""]
    measured = [e for s in series.values() for e in s.values()]
    mcs_rows = [e for i, s in series.items() if i.startswith("mcs-shared") for e in s.values()]
    warn = [w for e in mcs_rows for w in e.get("supervisor_warnings", [])]
    rec = sum(e.get("recoveries", 0) or 0 for e in mcs_rows)
    out += [f"During the measured runs: {rec} recoveries, {len(warn)} node warnings "
            "(suspicions, restarts)" + (f": `{warn[0]}`" if warn else "") + ", "
            f"{sum(e.get('failed_requests', 0) or 0 for e in measured)} failed requests.", ""]
    return out


VARIANTS = {  # cache-comparison variants -> what they are
    "mcs-shared": "one cache in shared memory, each file stored once in the domain",
    "shared-nothing-lru": "a private in-process LRU per node",
    "redis": "nodes GET from one Redis server and SET it on a miss, `allkeys-lru`",
}


def comparison_intro(rows: list[dict], base: dict) -> str:
    """The workload of cache-comparison, from what the run recorded."""
    b0 = xi(base)
    per_node, total = b0.get("cache_bytes_per_node", 0), b0.get("cache_bytes_total", 0)
    fileset = b0.get("file_set_bytes", 0)

    def variant(b: dict) -> str:
        name = xi(b)["variant"]
        text = VARIANTS.get(name, "")
        if b is base:
            text += "; the baseline" if text else "the baseline"
        if _num(xi(b).get("redis_maxmemory")):
            text += (f"; `maxmemory` {fmt_bytes(xi(b)['redis_maxmemory'])}"
                     + (" = the total" if xi(b)["redis_maxmemory"] == total else ""))
        return f"**{name}**" + (f" ({text})" if text else "")

    sizes = (f"{fmt_bytes(b0['file_bytes_min'])}–{fmt_bytes(b0['file_bytes_max'])}"
             if _num(b0.get("file_bytes_min")) and _num(b0.get("file_bytes_max")) else
             f"{fmt_bytes(fileset / b0['files'])} on average" if _num(b0.get("files")) else "")
    fit_one = compared(fileset, per_node, "larger than", "smaller than", "about the size of")
    fit_all = compared(fileset, total, "larger than", "smaller than", "about the size of")
    warm = (f"a {fmt(b0['warmup_s'])} s warm-up first" if _num(b0.get("warmup_s"))
            else "a warm-up first")
    return (f"The same {b0.get('nodes')} nodes with the same memory each "
            f"({fmt_bytes(per_node)} per node, {fmt_bytes(total)} in all), {len(rows)} caches: "
            + "; ".join(variant(b) for b in rows) + ". Workload: a seeded Zipf distribution "
            f"(s = {b0.get('zipf_s')}, seed {b0.get('seed')}) over {b0.get('files')} files"
            + (f" of {sizes}" if sizes else "") + f" ({fmt_bytes(fileset)}: {fit_one} one node's "
            f"cache, {fit_all} all of them together), {warm}, then the measured run "
            f"(`{b0.get('generator', '')}`). A cache holding the hottest files that fit one node "
            f"would hit {fmt(b0.get('ideal_hit_ratio_one_node'))} of the requests; one holding "
            f"what fits all nodes {fmt(b0.get('ideal_hit_ratio_all_nodes'))}. Ratios are against "
            f"**{b0.get('variant')}**, same run.")


def comparison_findings(rows: list[dict], base: dict) -> list[str]:
    """What the cache-comparison run found, each comparison word chosen from its numbers."""
    b0 = xi(base)
    by = {xi(b)["variant"]: xi(b) for b in rows}
    m, s = by.get("mcs-shared"), by.get("shared-nothing-lru")
    out: list[str] = []
    if m and s:
        distinct = compared(m.get("cached_distinct_files"), s.get("cached_distinct_files"),
                            "more than", "fewer than", "about as many as")
        head = ("No duplication → a larger effective cache" if distinct == "more than" else
                "No duplication, and yet no larger effective cache in this run")
        hit = compared(m.get("hit_ratio"), s.get("hit_ratio"), "higher", "lower", "about the same")
        disk = compared(m.get("disk_bytes"), s.get("disk_bytes"), "more", "less", "about as much")
        out += [f"**{head}.** The private LRUs hold {fmt(s.get('cached_entries'))} entries but "
                f"only {fmt(s.get('cached_distinct_files'))} distinct files (each hot file once "
                f"per node: {fmt_ratio(s.get('duplication_factor'))}); the shared cache holds "
                f"{fmt(m.get('cached_distinct_files'))} distinct files in the same memory "
                f"({distinct} the private LRUs' {fmt(s.get('cached_distinct_files'))}). Hit "
                f"ratio {fmt(m.get('hit_ratio'))} against {fmt(s.get('hit_ratio'))}: {hit}. {fmt_bytes(m.get('disk_bytes', 0))} read "
                f"from disk against {fmt_bytes(s.get('disk_bytes', 0))}: {disk} "
                f"({fmt(m.get('disk_reads_per_1000_requests'))} against "
                f"{fmt(s.get('disk_reads_per_1000_requests'))} file reads per 1000 requests).", ""]
        speed = compared(m.get("req_per_s"), s.get("req_per_s"), "faster", "slower",
                         "about as fast")
        times = fmt_ratio(ratio(m.get("req_per_s"), s.get("req_per_s")))
        text = (f"Requests/s: mcs-shared {fmt(m.get('req_per_s'))} against "
                f"{fmt(s.get('req_per_s'))}, {times} the baseline: **{speed}**")
        if speed == "faster":
            why = ["it hit more often"] if hit == "higher" else []
            if m.get("fast_path"):
                why.append("its nodes answer hits on the fast path (the native hit loop as "
                           "shipped now), without the aiohttp request object the baseline "
                           "builds for every request")
            if why:
                text += " (" + ", and ".join(why) + ")"
        elif speed == "slower":
            text += (". The files are in the page cache, so a baseline miss costs only a "
                     "`read()` and a copy here; an mcs hit costs a bucket lock, a pin and a "
                     "checksum of the entry (no corrupt byte is ever served)")
            if hit == "higher":
                text += (": the hit-ratio gain pays off when a miss is expensive (a real disk, "
                         "a slow backend)")
        out += [text + ".", ""]
    if "redis" in by:
        e = by["redis"]
        speed = compared(e.get("req_per_s"), b0.get("req_per_s"), "faster", "slower",
                         "about as fast")
        than = "as" if speed == "about as fast" else "than"
        text = (f"Redis, one shared cache too, hit {fmt(e.get('hit_ratio'))} (it stored "
                f"{fmt(e.get('cached_entries'))} files: `maxmemory` also counts Redis's own memory "
                f"and allocator rounding, used_memory {fmt_bytes(e.get('redis_used_memory', 0))}) "
                f"at {fmt(e.get('req_per_s'))} req/s "
                f"({fmt_ratio(ratio(e.get('req_per_s'), b0.get('req_per_s')))}): **{speed}** "
                f"{than} the baseline")
        if speed == "slower":
            text += ("; every hit crosses a socket and is copied twice, and Redis takes CPU "
                     "from the same cores")
        out += [text + ".", ""]
    method = {xi(b)["variant"]: xi(b).get("disk_bytes_method") for b in rows}
    checked = b0.get("disk_bytes_rchar_validated")
    agree = ("agree within the recorded error bound" if checked is True else
             "do **not** agree within the recorded error bound" if checked is False else
             "were not compared")
    errors = (m or {}).get("logged_request_errors", 0) or 0
    out += [
        "Bytes read from disk: counted by the baseline servers; for mcs-shared derived from the "
        "nodes' `/proc/PID/io` `rchar` (mcs-webcache counts file reads, not bytes; methods: "
        + ", ".join(f"{k}: {v}" for k, v in method.items()) + "). The derivation is checked in "
        "the same run on the shared-nothing row: "
        f"{fmt_bytes(b0.get('disk_bytes_rchar', 0))} derived and "
        f"{fmt_bytes(b0.get('disk_bytes', 0))} counted {agree} "
        f"({fmt_bytes(b0.get('disk_bytes_rchar_error_bound', 0) or 0)}). `rchar` is an upper "
        "bound: it also counts any other file a node reads, e.g. the Python sources `linecache` "
        "reads to format a logged traceback (mcs-shared nodes logged "
        f"{fmt(errors)} 'Error handling request' tracebacks in the measured run), so read it "
        "together with the exact count of file reads. \"Disk\" means a `read()` of the file; "
        "the files were in the page cache.", ""]
    return out


def hits_intro(rows: list[dict]) -> str:
    """Which servers webcache-hits measured (a server that did not run is said so)."""
    known = {"mcs": None, "mcs-memfd": "`mcs` as shipped, its sealed copies in sealed memfds "
             "instead of `--sealed-dir`'s page cache",
             "mcs-copied": "`mcs` without sealed copies (`--sealed-copies 0`: "
             "every body copied and summed per response)",
             "mcs-asyncio": "`mcs` with its native hit loop off (the asyncio "
             "fast path serves the hits)", "mcs-aiohttp": "`mcs` with its fast path off",
             "memory": "an aiohttp handler returning the file from a `bytes` in memory",
             "file": "aiohttp `web.FileResponse`",
             "nginx-tuned": "nginx with `open_file_cache` (no open/stat per request)"}
    e0 = xi(rows[0])
    ran, missing = [], []
    for name, sizes in e0["rps"].items():
        if name == "mcs":
            continue
        desc = known.get(name) or name
        label = f"`{name}`" if desc == name else f"{desc} (`{name}`)"
        (ran if any(_num(v) for v in sizes.values()) else missing).append(label)
    text = ("Requests/s of cache **hits** (every measured request checked to be a hit from "
            "shared memory by the nodes' counters) against, in the same run on the same files: "
            + _and(ran) + ". Ratios are mcs ÷ that server.")
    if "mcs-memfd" in e0["rps"]:
        where = ", ".join(f"{label} {e0[key]}" for key, label in
                          (("sealed_dir_filesystem", "on"), ("kernel", "Linux")) if e0.get(key))
        text += (" `mcs` is `mcs-webcache serve` with `--sealed-dir` on the run's work directory"
                 + (f" ({where})" if where else "") + " (sealed copies as unnamed read-only "
                 "files in its page cache: mcs's own best configuration for large hits, as "
                 "`nginx-tuned` is nginx's).")
    if missing:
        text += " Not run: " + _and(missing) + (f" ({e0['nginx']})" if "nginx" in str(missing)
                                                and e0.get("nginx") else "") + "."
    return text


# -- sections ------------------------------------------------------------------------------------


def img_link(img_dir: Path, out: Path, name: str) -> str:
    rel = os.path.relpath(img_dir / name, out.parent)
    return f"![{name}]({rel})"


def _figure(plt, draw, img_dir: Path, out: Path, name: str) -> list[str]:
    """Draw a plot (when plots are on) and link it: ``draw(plt, path)``."""
    if plt is None:
        return []
    draw(plt, img_dir / name)
    return [img_link(img_dir, out, name), ""]


def section_scaling(plt, rows: list[dict], img_dir: Path, out: Path) -> list[str]:
    sn = {xi(b)["nodes"]: xi(b) for b in rows if _impl(b) == "shared-nothing-lru"}
    return [
        scaling_intro(rows),
        "",
        md_table(
            ["series", "nodes", "req/s", "× 1 node (scaling)", "efficiency (÷N)",
             "CPU scaling", "node cores used", "generator cores used", "p99 µs",
             "mcs ÷ shared-nothing"],
            [[_impl(b),
              f"{xi(b)['nodes']}" + (" (> cores)" if xi(b).get("oversubscribed") else ""),
              fmt(xi(b).get("req_per_s")), fmt_ratio(xi(b).get("scaling_factor")),
              fmt(xi(b).get("scaling_efficiency")), fmt_ratio(xi(b).get("cpu_scaling_factor")),
              fmt(xi(b).get("node_cores_used")), fmt(xi(b).get("generator_cores_used")),
              fmt(xi(b).get("latency_us_p99")),
              fmt_ratio(ratio(xi(b).get("req_per_s"),
                              sn.get(xi(b)["nodes"], {}).get("req_per_s")))
              if _impl(b).startswith("mcs-shared") else "—"]
             for b in rows]),
        "",
        *_figure(plt, lambda p, path: plot_scaling(p, rows, path), img_dir, out,
                 "webcache-scaling.png"),
        *scaling_findings(rows),
    ]


def section_comparison(plt, rows: list[dict], img_dir: Path, out: Path) -> list[str]:
    base = next((b for b in rows if xi(b).get("baseline")), rows[0])
    order = [base] + [b for b in rows if b is not base]
    b0 = xi(base)

    def r(e: dict, key: str) -> str:
        return f"{fmt(e.get(key))} ({fmt_ratio(ratio(e.get(key), b0.get(key)))})"

    return [
        comparison_intro(order, base),
        "",
        md_table(
            ["cache", "hit ratio", "disk reads / 1000 req", "bytes read from disk",
             "disk bytes / req", "req/s", "entries cached (distinct files)",
             "duplication", "p99 µs"],
            [[e["variant"], r(e, "hit_ratio"), r(e, "disk_reads_per_1000_requests"),
              f"{fmt_bytes(e.get('disk_bytes', 0))} "
              f"({fmt_ratio(ratio(e.get('disk_bytes'), b0.get('disk_bytes')))})",
              r(e, "disk_bytes_per_request"), r(e, "req_per_s"),
              f"{fmt(e.get('cached_entries'))} ({fmt(e.get('cached_distinct_files'))})",
              fmt_ratio(e.get("duplication_factor")), fmt(e.get("latency_us_p99"))]
             for e in (xi(b) for b in order)]),
        "",
        *_figure(plt, lambda p, path: plot_comparison(p, order, base, path), img_dir, out,
                 "cache-comparison.png"),
        *comparison_findings(order, base),
    ]


def headline_keys(rows: list[dict]) -> list[str]:
    keys: list[str] = []
    scalars = {}
    for b in rows:
        for k, v in xi(b).items():
            if _num(v):
                scalars.setdefault(k, []).append(v)
    varying = [k for k, vs in scalars.items() if len(rows) == 1 or len(set(vs)) > 1]
    for pat in HEADLINE_PATTERNS:
        for k in varying:
            if k not in keys and re.search(pat, k) and not k.startswith("target"):
                keys.append(k)
    return keys[:MAX_HEADLINES]


def section_generic(plt, group: str, rows: list[dict], base_of: dict[str, dict], how: str,
                    img_dir: Path, out: Path) -> list[str]:
    keys = headline_keys(rows)
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", group).strip("-") or "group"
    name = f"{slug}.png"
    if plt is not None:
        plot_generic(plt, group, rows, keys[0] if keys else None, base_of, img_dir / name)
    header = ["row", "median time / round", "×"] + keys
    table = []
    for b in rows:
        base = base_of[b["name"]]
        cells = [param_label(b), fmt_time(median_s(b)), fmt_ratio(ratio(median_s(b),
                                                                          median_s(base)))]
        for k in keys:
            v = xi(b).get(k)
            cells.append(f"{fmt(v)} ({fmt_ratio(ratio(v, xi(base).get(k)))})" if _num(v)
                         else fmt(v))
        table.append(cells)
    lines = [f"{how}. Columns: the median time of one benchmark round and the headline "
             "numbers the benchmark recorded in `extra_info`, each with its ratio to the "
             "baseline row.", "", md_table(header, table), ""]
    if plt is not None and (img_dir / name).exists():
        lines += [img_link(img_dir, out, name), ""]
    details = []
    for b in rows:
        items = [f"`{k}` = {fmt(v)}" for k, v in xi(b).items()
                 if _num(v) or isinstance(v, (str, bool))]
        nested = [k for k, v in xi(b).items() if isinstance(v, (dict, list))]
        if nested:
            items.append("(structured: " + ", ".join(f"`{k}`" for k in nested) + ")")
        if items:
            details.append(f"- **{param_label(b)}**: " + "; ".join(items))
    if details:
        lines += ["<details><summary>every recorded number</summary>", "", *details, "",
                  "</details>", ""]
    return lines


def fmt_pct(v: float | None) -> str:
    return "—" if v is None else f"{v * 100:.0f}%"


def wrk_bound(e: dict) -> str:
    """Which servers left wrk's thread at least 95% busy (wrk, not the server, the bound)."""
    busy = e.get("load_generator_busy") or {}
    bound = [f"{name} at {s}" for name, row in busy.items() for s, v in row.items()
             if v is not None and v >= 0.95]
    if not bound:
        return " No server kept it 95% busy or more."
    return (" It was 95% busy or more with " + _and(bound) + ": there the load generator, "
            "not the server, bounds the rate, and the server may have had more to give.")


def section_hits(rows: list[dict]) -> list[str]:
    """Cache hits against the plain servers: one table per process count, ratios of mcs to each
    server of the same run, and the targets' verdicts the benchmark recorded."""
    out = [hits_intro(rows), ""]
    for b in sorted(rows, key=lambda b: xi(b).get("processes", 0)):
        e = xi(b)
        sizes = list(next(iter(e["rps"].values())).keys())
        out += [f"**{e.get('processes')} process(es) per server**, pinning: {e.get('pinning')}, "
                f"load: {e.get('load_generator')}, {e.get('duration_s')} s per run, "
                f"{e.get('connections')} connections, event loop {e.get('event_loop')}"
                + (f"; every number is the median of {e['rounds']} rounds, each starting every "
                   "server afresh, in alternating order (a machine that speeds up or slows down "
                   "during the run favours no server)" if e.get("rounds", 1) > 1 else "")
                + ("; a ratio is the median of the rounds' ratios, each of mcs and the other "
                   "server in the same round (mcs and the nginx configurations run next to each "
                   "other in every round)" if e.get("ratios_by_round") else "")
                + ".", ""]
        # p99 latency and CPU per request, in runs that recorded them
        p99, cpu = e.get("p99_ms") or {}, e.get("cpu_us_per_request") or {}
        busy = e.get("load_generator_busy") or {}
        header = ["server"] + [f"{s} req/s" for s in sizes] + [f"mcs ÷ it, {s}" for s in sizes]
        header += [f"p99 ms, {s}" for s in sizes if p99]
        header += [f"CPU µs/request, {s}" for s in sizes if cpu]
        header += [f"wrk busy, {s}" for s in sizes if busy]
        table = []
        for name, row in e["rps"].items():
            ratios = e["ratios"].get(f"mcs/{name}", {})
            table.append([name] + [fmt(row.get(s)) for s in sizes]
                         + ["—" if name == "mcs" else fmt_ratio(ratios.get(s)) for s in sizes]
                         + [fmt((p99.get(name) or {}).get(s)) for s in sizes if p99]
                         + [fmt((cpu.get(name) or {}).get(s)) for s in sizes if cpu]
                         + [fmt_pct((busy.get(name) or {}).get(s)) for s in sizes if busy])
        out += [md_table(header, table), ""]
        if cpu:
            out += ["CPU µs/request: user + system time of the server's processes (every "
                    "thread) over the measured run ÷ the requests it answered; the load "
                    "generator's own CPU is not in it.", ""]
        if busy:
            threads = e.get("load_threads", 1)
            out += ["wrk busy: the load generator's CPU time over the run's length (its "
                    f"rusage), as a share of the {threads} core(s) its {threads} thread(s) can "
                    "use." + wrk_bound(e),
                    ""]
        paced_p99, paced_rps = e.get("paced_p99_ms") or {}, e.get("paced_rps") or {}
        paced = [name for name, row in paced_p99.items() if any(v is not None
                                                              for v in row.values())]
        if paced:
            out += [f"Latency at the same moderate load: each of the {e.get('connections')} "
                    f"connections waits {e.get('pace_ms')} ms before each request (wrk's "
                    "`delay()`), below every server's saturation. wrk's timers tick in whole "
                    "milliseconds, so the paced requests leave in bursts (up to one per "
                    "connection each millisecond): this p99 is how fast a burst is answered, "
                    "by the server and by wrk's one thread that writes and reads it in turn; "
                    "at full load it also holds the time requests wait for that thread, the "
                    "more so the busier it is (above).", "",
                    md_table(["server"] + [f"req/s, {s}" for s in sizes]
                             + [f"p99 ms, {s}" for s in sizes],
                             [[name] + [fmt(paced_rps.get(name, {}).get(s)) for s in sizes]
                              + [fmt(paced_p99[name].get(s)) for s in sizes]
                              for name in paced]), ""]
        targets = e.get("targets_met") or {}
        if targets:
            out += ["Targets: " + "; ".join(
                f"{s}: " + ", ".join(f"{k} {met_flag(v)}" for k, v in t.items())
                for s, t in targets.items()), ""]
    return out


def fmt_time(s: float | None) -> str:
    if s is None:
        return "—"
    for unit, mul in (("s", 1), ("ms", 1e3), ("µs", 1e6), ("ns", 1e9)):
        if s * mul >= 1:
            return f"{s * mul:.3g} {unit}"
    return f"{s * 1e9:.3g} ns"


# -- shared state (bench/test_state.py) ----------------------------------------------------------

STATE_PREFIX = "state-"
STATE_ORDER = ["state-get", "state-put", "state-put-2proc", "state-transaction", "state-incr",
               "state-recovery"]
STATE_TITLES = {
    "state-get": "get (one process)",
    "state-put": "put (one process)",
    "state-put-2proc": "put, two writer processes (aggregate)",
    "state-transaction": "two-key transaction (one process; ops = transactions)",
    "state-incr": "incr (one process)",
}
STATE_MCS_ROWS = ("sharedict", "sharedict-transaction")
STATE_ROWS = {  # row -> what it is
    "sharedict": "`mcs.SharedDict`",
    "sharedict-transaction": "`mcs.SharedDict`, `with d.transaction() as tx:`",
    "sharedict-put": "`mcs.SharedDict`, one plain put (the reference of the transaction target)",
    "lmdb": "py-lmdb, one write transaction per operation",
    "lmdb-txn-per-op": "py-lmdb, one read transaction per get",
    "lmdb-long-read-txn": "py-lmdb, one long-lived read transaction per round",
    "redis": "Redis through redis-py, unix socket",
    "diskcache": "diskcache",
    "manager": "`multiprocessing.Manager().dict()`",
}


STATE_ROWS_IN = {  # (group, row) -> what it is, where it differs from STATE_ROWS
    ("state-transaction", "lmdb"): "py-lmdb, both puts in one write transaction",
    ("state-transaction", "redis"): "Redis, MULTI/EXEC pipeline (one round trip)",
    ("state-transaction", "diskcache"): "diskcache, `transact()`",
    ("state-transaction", "manager"): "`Manager().dict()`, both writes under a manager Lock",
    ("state-incr", "lmdb"): "py-lmdb, read-modify-write in one write transaction",
    ("state-incr", "redis"): "Redis `INCR` through redis-py",
    ("state-incr", "diskcache"): "diskcache `incr`",
    ("state-incr", "manager"): "`Manager().dict()`, read-modify-write under a manager Lock",
    ("state-put-2proc", "lmdb"): "py-lmdb, one write transaction per put, in each process",
    ("state-put-2proc", "sharedict"): "`mcs.SharedDict`, one handle in each process",
}


def is_state(group: str) -> bool:
    return group.startswith(STATE_PREFIX)


def _row_name(b: dict) -> str:
    return str(xi(b).get("row") or param_label(b))


def state_mcs_row(rows: list[dict]) -> dict | None:
    """The SharedDict row of a throughput group (None when it did not run)."""
    return next((b for b in rows if _row_name(b) in STATE_MCS_ROWS), None)


def state_targets(rows: list[dict]) -> list[str]:
    """The targets a group's rows recorded, each verdict recomputed here from the recorded
    ratio and threshold (not from the benchmark's own flag)."""
    out = []
    for b in rows:
        for name, t in (xi(b).get("targets") or {}).items():
            r = t.get("ratio")
            if "at_least" in t:
                verdict = met(r, t["at_least"])
            else:
                verdict = met(r, t.get("at_most", 0.0), at_least=False)
            word = f"**{verdict}**" if verdict == "missed" else verdict
            out.append(f"{name}: {fmt_ratio(r)} ({t.get('what', 'ratio')}) — {word}")
    return out


def state_intro(groups: dict[str, list[dict]]) -> str:
    rows = [b for g in groups.values() for b in g]
    e0 = next((xi(b) for b in rows if _num(xi(b).get("key_bytes"))), {})
    stores = list(dict.fromkeys(str(xi(b)["store"]) for b in rows if xi(b).get("store")))
    text = ("`mcs.SharedDict` against the stores one reaches for to share a dict between processes "
            "on one host, measured side by side in the same run")
    if e0:
        text += (f", every store holding the same {fmt(e0.get('keys'))} keys of "
                 f"{fmt(e0.get('key_bytes'))} bytes with {fmt(e0.get('value_bytes'))}-byte values")
    text += ". Ratios are SharedDict's ops/s ÷ the row's (above 1: SharedDict is faster)."
    if stores:
        text += " Stores: " + "; ".join(stores) + "."
    return text


def section_state_group(group: str, rows: list[dict]) -> list[str]:
    m = state_mcs_row(rows)
    mo = xi(m).get("ops_per_s") if m is not None else None
    out = [f"### {STATE_TITLES.get(group, group)}", ""]
    table = []
    for b in rows:
        e, name = xi(b), _row_name(b)
        r = None if b is m else ratio(mo, e.get("ops_per_s"))
        what = STATE_ROWS_IN.get((group, name), STATE_ROWS.get(name, ""))
        table.append([name, what, fmt(e.get("ops_per_s")),
                      fmt(e.get("us_per_op")), "—" if b is m else fmt_ratio(r)])
    out += [md_table(["row", "what", "ops/s", "µs/op", "SharedDict ÷ it"], table), ""]
    if m is None:
        out += ["SharedDict did not run in this group: no ratio.", ""]
        return out
    words = []
    for b in rows:
        if b is m or _row_name(b) == "sharedict-put":
            continue
        e = xi(b)
        word = compared(mo, e.get("ops_per_s"), "faster", "slower", "about as fast")
        words.append(f"{fmt_ratio(ratio(mo, e.get('ops_per_s')))} {_row_name(b)}: **{word}**")
    if words:
        out += ["SharedDict " + fmt(mo) + " ops/s: " + "; ".join(words) + ".", ""]
    if _num(xi(m).get("scaling_vs_one_process")):
        out += [f"Two writer processes did {fmt_ratio(xi(m)['scaling_vs_one_process'])} the "
                "puts/s of one SharedDict process in the same run"
                + "".join(f"; LMDB {fmt_ratio(xi(b)['scaling_vs_one_process'])}" for b in rows
                          if _row_name(b) == "lmdb" and _num(xi(b).get("scaling_vs_one_process")))
                + ".", ""]
    targets = state_targets(rows)
    if targets:
        out += ["Targets: " + "; ".join(targets) + ".", ""]
    return out


def growth_sentence(big: dict, small: dict, time_key: str, size_key: str, unit: str) -> str:
    """How a recovery's ``time_key`` grew from the smallest size to the biggest, in words."""
    growth = ratio(big.get(time_key), small.get(time_key))
    word = compared(big.get(time_key), small.get(time_key), "longer", "shorter", "about as long")
    return (f"With {fmt(big.get(size_key))} {unit} a recovery took {fmt_ratio(growth)} the time "
            f"it took with {fmt(small.get(size_key))}: **{word}**.")


def section_state_recovery(rows: list[dict]) -> list[str]:
    rows = sorted(rows, key=lambda b: xi(b).get("dict_keys", 0))
    base = next((b for b in rows if xi(b).get("baseline")), rows[0])
    b0 = xi(base)
    out = ["### recovery: kill -9 of a non-master member → stable", "",
           f"The master holds the dict; a member process joins, sets ephemeral keys, writes and "
           f"runs transactions on random keys and is killed with SIGKILL in the middle of them "
           f"({fmt(b0.get('kills'))} kills per size after a warm-up kill). *kill → stable*: from "
           "the kill until the master is in a newer epoch and has answered a put and a get; "
           "*last_duration_ms*: the component's own `stats.last_duration_ms`. Medians; ratios "
           f"against {fmt(b0.get('dict_keys'))} keys.", ""]
    table = []
    for b in rows:
        e = xi(b)
        table.append([fmt(e.get("dict_keys")), fmt(e.get("kill_to_stable_ms")),
                      fmt_ratio(ratio(e.get("kill_to_stable_ms"), b0.get("kill_to_stable_ms"))),
                      fmt(e.get("last_duration_ms")),
                      fmt_ratio(ratio(e.get("last_duration_ms"), b0.get("last_duration_ms"))),
                      fmt(e.get("kill_to_stable_ms_max"))])
    out += [md_table(["keys", "kill → stable ms", "× smallest", "last_duration_ms",
                      "× smallest", "kill → stable max ms"], table), ""]
    big = xi(rows[-1])
    if rows[-1] is not base:
        out += [growth_sentence(big, b0, "kill_to_stable_ms", "dict_keys", "keys"), ""]
    targets = state_targets(rows)
    if targets:
        out += ["Targets: " + "; ".join(targets) + ".", ""]
    return out


def section_recovery_size(rows: list[dict]) -> list[str]:
    """webcache-recovery-size (bench/test_webcache.py): kill -9 -> stable against the number of
    cached entries, and the misses on the dead node's entries after its restart."""
    rows = sorted(rows, key=lambda b: xi(b).get("entries", 0))
    b0 = xi(rows[0])
    out = [f"The master holds N synthetic entries; a member process joins with its own "
           f"{fmt(VICTIM_ENTRIES)}, and is killed with SIGKILL ({fmt(b0.get('kills'))} kills per "
           "size after a warm-up kill). *kill → stable*: from the kill until the master is in a "
           "newer epoch and has served one of the dead member's entries; *last_duration_ms*: "
           "the component's own `stats.last_duration_ms`. Then a replacement joins (it takes "
           "the dead member's slot and adopts its arena) and the master looks up every entry the "
           "dead member had cached for 10 s: each miss would have been a disk read. Medians; "
           f"ratios against {fmt(b0.get('entries'))} entries.", ""]
    table = []
    for b in rows:
        e = xi(b)
        table.append([fmt(e.get("entries")), fmt(e.get("kill_to_stable_ms")),
                      fmt_ratio(ratio(e.get("kill_to_stable_ms"), b0.get("kill_to_stable_ms"))),
                      fmt(e.get("last_duration_ms")),
                      fmt_ratio(ratio(e.get("last_duration_ms"), b0.get("last_duration_ms"))),
                      f"{fmt(e.get('restart_misses'))} of {fmt(e.get('restart_lookups'))}",
                      fmt(e.get("entries_adopted")), fmt(e.get("takeover_scan_ms"))])
    out += [md_table(["cached entries", "kill → stable ms", "× smallest", "last_duration_ms",
                      "× smallest", "misses after restart", "entries taken over",
                      "takeover ready ms"], table), ""]
    big = xi(rows[-1])
    if rows[-1] is not rows[0]:
        growth = ratio(big.get("last_duration_ms"), b0.get("last_duration_ms"))
        out += [growth_sentence(big, b0, "last_duration_ms", "entries", "entries"), ""]
        def verdict(value: Any, ceiling: float) -> str:
            word = met(value, ceiling, at_least=False)
            return f"**{word}**" if word == "missed" else word

        verdicts = [
            f"recovery with {fmt(big.get('entries'))} entries ≤ ×{RECOVERY_SIZE_RATIO} the "
            f"smallest: {fmt_ratio(growth)} — {verdict(growth, RECOVERY_SIZE_RATIO)}",
            f"≤ {fmt(RECOVERY_1M_MS)} ms with {fmt(big.get('entries'))}: "
            f"{fmt(big.get('last_duration_ms'))} ms — "
            f"{verdict(big.get('last_duration_ms'), RECOVERY_1M_MS)}",
            f"misses on the dead node's entries after its restart = 0: "
            f"{fmt(big.get('restart_misses'))} — {verdict(big.get('restart_misses'), 0)}"]
        out += ["Targets: " + "; ".join(verdicts) + ".", ""]
    return out


STALL_ROWS = {  # stall-behind-holder row -> (what it is, the row it is compared with)
    "hung-watch-off": ("hung holder, hold watch off (before: the holder's whole sleep)", None),
    "hung-hold_limit-5s-default": ("hung holder, `hold_limit` 5 s (the default)", "hung-watch-off"),
    "hung-hold_limit-1s": ("hung holder, `hold_limit` 1 s", "hung-watch-off"),
    "frozen-watch-off": ("frozen holder (SIGSTOP), hold watch off (before: `evict_after`)", None),
    "frozen-watch-on-default": ("frozen holder (SIGSTOP), stopped holder fenced (the default)",
                                "frozen-watch-off"),
}


def _stall_row(b: dict) -> str:
    return b["name"].split("[", 1)[-1].rstrip("]")


def section_stall(rows: list[dict]) -> list[str]:
    """stall-behind-holder (bench/test_supervision.py): how long a member waits behind a hung or
    frozen holder of the mutex it needs, with the hold watch off (before) and on."""
    by = {_stall_row(b): xi(b) for b in rows}
    first = xi(rows[0])
    out = [f"One member (this process) needs a global mutex that another member process holds: "
           f"*hung* (alive, heartbeat beating, asleep for {fmt(first.get('holder_sleep_s'))} s "
           "with the mutex) or *frozen* (SIGSTOP while it holds it). *Stall*: "
           f"{first.get('stall_definition', 'from the hold until the waiter holds it')}. Rows "
           "with the hold watch off show what a waiter saw before it existed. Medians of "
           f"{fmt(first.get('rounds'))} rounds.", ""]
    table = []
    for name, (what, against) in STALL_ROWS.items():
        e = by.get(name)
        if e is None:
            continue
        base = by.get(against) if against else None
        table.append([what, fmt(e.get("stall_s_median")),
                      fmt_ratio(ratio(e.get("stall_s_median"), base.get("stall_s_median")))
                      if base else "", ", ".join(f"{k} {v}" for k, v in
                                                 (e.get("evictions") or {}).items() if v) or "none"])
    out += [md_table(["holder", "stall s", "× before", "evictions"], table), ""]
    sentences = []
    for name, (what, against) in STALL_ROWS.items():
        e, base = by.get(name), by.get(against) if against else None
        if e is None or base is None:
            continue
        sentences.append(f"{what.split(',')[0]} with {what.split(', ', 1)[1]}: "
                         f"{fmt(e.get('stall_s_median'))} s instead of "
                         f"{fmt(base.get('stall_s_median'))} s "
                         f"({compared(e.get('stall_s_median'), base.get('stall_s_median'), 'longer', '**shorter**', 'about the same')})")
    if sentences:
        text = "; ".join(sentences) + "."
        out += [text[0].upper() + text[1:], ""]
    return out


def section_restart(rows: list[dict]) -> list[str]:
    """supervise-restart (bench/test_supervision.py): kill -> restarted member ready."""
    e = xi(rows[0])
    return [f"`mcs supervise -n 2` runs a component program; one member is killed with SIGKILL "
            f"{fmt(e.get('rounds'))} times (each after running longer than the back-off's max, "
            f"so each restart waits the minimum back-off, {fmt(e.get('backoff_min_s'))} s). "
            f"*Restart*: {e.get('restart_definition', '')}.", "",
            md_table(["p50 ms", "min ms", "max ms"],
                     [[fmt(e.get("restart_ms_p50")), fmt(e.get("restart_ms_min")),
                       fmt(e.get("restart_ms_max"))]]), "",
            f"A killed member serves again {fmt(e.get('restart_ms_p50'))} ms after the kill "
            f"(p50), of which {fmt((e.get('backoff_min_s') or 0) * 1e3)} ms is the back-off.", ""]


ROW_SECTIONS = {  # group -> (the extra_info key its every row has, the section it renders)
    "webcache-hits": ("rps", section_hits),
    "webcache-recovery-size": ("entries", section_recovery_size),
    "stall-behind-holder": ("stall_s_median", section_stall),
    "supervise-restart": ("restart_ms_p50", section_restart),
}


def section_state(groups: dict[str, list[dict]]) -> list[str]:
    """The "Shared state" section: one table per group of bench/test_state.py (ops/s and
    SharedDict ÷ each peer), the comparison words and the targets' verdicts computed here."""
    out = [state_intro(groups), ""]
    for g in [g for g in STATE_ORDER if g in groups] + sorted(
            g for g in groups if g not in STATE_ORDER):
        try:
            if g == "state-recovery":
                out += section_state_recovery(groups[g])
            else:
                out += section_state_group(g, groups[g])
        except (KeyError, TypeError, ValueError) as exc:  # an older/newer layout
            out += [f"### {g}", "", f"(rendering failed: {exc!r})", ""]
    return out


# -- several hosts and the cache size (bench/test_hosts.py) ---------------------------------------

HOSTS_HIT_GOAL = 0.95  # issue 14: the hit ratio of 3 hosts under consistent hashing, at least
HOSTS_MARGIN = 0.05  # ... and "clearly above round-robin": by at least this much
BALANCE = {"consistent": "consistent hashing", "roundrobin": "round-robin"}


def _by_balance(rows: list[dict]) -> dict[str, dict[int, dict]]:
    out: dict[str, dict[int, dict]] = {}
    for b in rows:
        e = xi(b)
        out.setdefault(e["balance"], {})[e["hosts"]] = e
    return out


def zipf_workload(e: dict) -> str:
    """The Zipf workload of bench/test_hosts.py, as a row recorded it."""
    return (f"{fmt(e.get('files'))} files of {fmt_bytes(e['file_bytes_min'])}–"
            f"{fmt_bytes(e['file_bytes_max'])} ({fmt_bytes(e['working_set_bytes'])} as the cache "
            f"stores them, entry headers included: the working set), requested with a seeded Zipf "
            f"distribution (s = {e.get('zipf_s')}) by {e.get('loadgen')} over "
            f"{fmt(e.get('connections'))} connections: every file once (the coldest first), a "
            f"{fmt(e.get('warmup_s'))} s warm-up, then {fmt(e.get('run_s'))} s measured. Hit "
            "ratio: hits / (hits + misses) of the hosts' own counters (`/_mcs/status`) during the "
            "measured run.")


def load_average(rows: list[dict]) -> str:
    """The machine's load around the measured runs, as the rows recorded it."""
    values = [v for b in rows for v in xi(b).get("load_average_1m") or [] if _num(v)]
    if not values:
        return ""
    return (f" The machine's 1-minute load average around the measured runs was "
            f"{fmt(min(values))}–{fmt(max(values))}, on {xi(rows[0]).get('cores', '?')} cores: "
            "req/s here also moves with whatever else the machine runs.")


def hosts_intro(rows: list[dict]) -> str:
    e = xi(rows[0])
    counts = sorted({xi(b)["hosts"] for b in rows})
    return (f"{_and(counts)} cache hosts behind HAProxy (`mcs-webcache front`), each host a "
            f"network namespace of this machine running its own `mcs-webcache serve` "
            f"({fmt(e.get('nodes_per_host'))} node, {fmt_bytes(e['cache_bytes_per_host'])} of "
            f"cache: the working set is {fmt(e.get('working_set_over_host_cache'))}× one host's "
            f"cache), with consistent hashing on the URI against round-robin (the baseline of "
            f"the same number of hosts). " + zipf_workload(e) + " *Ideal*: a cache that holds "
            "the hottest files that fit (consistent hashing: each host the hottest of its own "
            "share, as the front split the files in this run)." + load_average(rows))


def hosts_findings(rows: list[dict]) -> list[str]:
    """The sentences of hosts-balance, every word chosen by the numbers."""
    by = _by_balance(rows)
    con, rr = by.get("consistent", {}), by.get("roundrobin", {})
    out = []
    both = sorted(set(con) & set(rr))
    if both:
        n = both[-1]
        c, r = con[n].get("hit_ratio"), rr[n].get("hit_ratio")
        if _num(c) and _num(r):
            ok = c >= HOSTS_HIT_GOAL and c - r >= HOSTS_MARGIN
            verdict = "met" if ok else "**missed**"
        else:
            verdict = "not measured"
        out.append(f"With {n} hosts, consistent hashing hit **{fmt(c)}** of the requests and "
                   f"round-robin {fmt(r)}: the goal (≥ {HOSTS_HIT_GOAL} under consistent "
                   f"hashing, and above round-robin by at least {HOSTS_MARGIN}) is {verdict}. "
                   "The ideal for the split of this run was "
                   f"{fmt(con[n].get('ideal_hit_ratio_this_split'))}.")
    for key, series, why in (
            ("consistent", con, "each host caches its own share of the URIs"),
            ("roundrobin", rr, "every host sees every URI and caches the same hot set")):
        if len(series) > 1:
            lo, hi = min(series), max(series)
            a, b = series[lo].get("hit_ratio"), series[hi].get("hit_ratio")
            word = compared(b, a, "rose", "fell", "stayed about the same")
            out.append(f"From {lo} to {hi} hosts the hit ratio under {BALANCE[key]} {word} "
                       f"({fmt(a)} → {fmt(b)}; {why}).")
    pair = [e.get("req_per_s") for e in (con.get(1, {}), rr.get(1, {}))]
    if all(_num(v) and v > 0 for v in pair):
        out.append("The two rows with one host are the same configuration measured twice "
                   "(one host has no choice to make): their req/s differ by "
                   f"{fmt_ratio(max(pair) / min(pair))}, a yardstick for the noise of req/s in "
                   "this run.")
    if both:
        n = both[-1]
        c, r = con[n].get("req_per_s"), rr[n].get("req_per_s")
        word = compared(c, r, "more than", "fewer than", "about as many as")
        cores = con[n].get("cores", "?")
        out.append(f"With {n} hosts, consistent hashing served {fmt(c)} req/s, {word} "
                   f"round-robin's {fmt(r)} ({fmt_ratio(ratio(c, r))}). The hosts, HAProxy and "
                   f"the load generator share this machine's {cores} cores, so req/s weighs "
                   "what a request costs here (a hit on the fast path, a miss through aiohttp "
                   "and a read from disk), not what N machines would serve.")
    return out


def plot_hosts(plt, rows: list[dict], path: Path) -> None:
    by = _by_balance(rows)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    colors = {"consistent": "#1f77b4", "roundrobin": "#ff7f0e"}
    counts = sorted({xi(b)["hosts"] for b in rows})
    for key, series in by.items():
        ns = sorted(series)
        ax1.plot(ns, [series[n].get("hit_ratio") or 0 for n in ns], "o-", color=colors.get(key),
                 label=f"{BALANCE.get(key, key)}")
        ax1.plot(ns, [series[n].get("ideal_hit_ratio_this_split") or 0 for n in ns], ":",
                 color=colors.get(key), label=f"{BALANCE.get(key, key)}: ideal")
    ax1.axhline(HOSTS_HIT_GOAL, color="grey", linewidth=0.8)
    ax1.annotate(f"goal {HOSTS_HIT_GOAL}", (counts[0], HOSTS_HIT_GOAL), xytext=(2, -10),
                 textcoords="offset points", fontsize=8, color="grey")
    ax1.set_xticks(counts)
    ax1.set_xlabel("hosts")
    ax1.set_ylabel("aggregate hit ratio")
    ax1.set_ylim(0, 1.05)
    ax1.set_title("Hit ratio (working set = "
                  f"{fmt(xi(rows[0]).get('working_set_over_host_cache'))}× one host's cache)",
                  fontsize=10)
    ax1.legend(fontsize=8, loc="lower right")
    width = 0.8 / max(1, len(by))
    for i, (key, series) in enumerate(by.items()):
        xs = [j + (i - (len(by) - 1) / 2) * width for j in range(len(counts))]
        vals = [series.get(n, {}).get("req_per_s") or 0 for n in counts]
        bars = ax2.bar(xs, vals, width, color=colors.get(key), label=BALANCE.get(key, key))
        _bar_labels(ax2, bars, [fmt(v) for v in vals])
    ax2.set_xticks(range(len(counts)), [f"{n} host{'s' if n > 1 else ''}" for n in counts])
    ax2.set_ylabel("requests/s (all hosts, front and wrk on the same cores)")
    ax2.set_title("Throughput through the front", fontsize=10)
    ax2.margins(y=0.15)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _per_host(e: dict) -> str:
    parts = []
    for name, h in (e.get("per_host") or {}).items():
        share = h.get("share_of_working_set")
        parts.append(f"{name} {fmt(h.get('hit_ratio'))}"
                     + (f" ({share * 100:.0f} %)" if _num(share) else ""))
    return ", ".join(parts)


def section_hosts(plt, rows: list[dict], img_dir: Path, out: Path) -> list[str]:
    """hosts-balance: hit ratio and req/s of 1..N hosts, consistent hashing against round-robin."""
    rows = sorted(rows, key=lambda b: (xi(b)["balance"] != "consistent", xi(b)["hosts"]))
    rr = _by_balance(rows).get("roundrobin", {})
    table = []
    for b in rows:
        e = xi(b)
        base = rr.get(e["hosts"], {})
        table.append([BALANCE.get(e["balance"], e["balance"]), fmt(e["hosts"]),
                      fmt(e.get("hit_ratio")), fmt(e.get("ideal_hit_ratio_this_split")),
                      fmt(e.get("req_per_s")),
                      fmt_ratio(ratio(e.get("req_per_s"), base.get("req_per_s"))),
                      fmt(e.get("fast_path_share")), fmt(e.get("latency_us_p99")),
                      _per_host(e)])
    return [
        hosts_intro(rows), "",
        md_table(["balance", "hosts", "hit ratio", "ideal", "req/s", "× round-robin",
                  "fast path", "p99 µs", "per host: hit ratio (share of the working set)"],
                 table), "",
        *_figure(plt, lambda p, path: plot_hosts(p, rows, path), img_dir, out,
                 "hosts-balance.png"),
        *[s + "\n" for s in hosts_findings(rows)],
    ]


def sweep_findings(rows: list[dict]) -> list[str]:
    lo, hi = xi(rows[0]), xi(rows[-1])
    if rows[0] is rows[-1]:
        return []
    hr = compared(hi.get("hit_ratio"), lo.get("hit_ratio"), "rose", "fell", "stayed about the same")
    rps = compared(hi.get("req_per_s"), lo.get("req_per_s"), "rose", "fell",
                   "stayed about the same")
    best = max(rows, key=lambda b: xi(b).get("req_per_s") or 0)
    out = [f"From {fmt(lo.get('fraction_of_working_set'))}× to "
            f"{fmt(hi.get('fraction_of_working_set'))}× the working set "
            f"({fmt_bytes(lo['cache_bytes'])} to {fmt_bytes(hi['cache_bytes'])} of cache), the "
            f"hit ratio {hr} ({fmt(lo.get('hit_ratio'))} → {fmt(hi.get('hit_ratio'))}) and "
            f"req/s {rps} ({fmt(lo.get('req_per_s'))} → {fmt(hi.get('req_per_s'))}, "
            f"{fmt_ratio(ratio(hi.get('req_per_s'), lo.get('req_per_s')))}); the most req/s "
            f"came with {fmt_bytes(xi(best)['cache_bytes'])} "
            f"({fmt(xi(best).get('fraction_of_working_set'))}× the working set)."]
    return out + fast_path_findings(rows)


def fast_path_findings(rows: list[dict]) -> list[str]:
    """What a miss costs beyond itself: rows without any miss against those with misses."""
    def rps(b: dict) -> float:
        return xi(b).get("req_per_s") or 0

    clean = [b for b in rows if xi(b).get("misses") == 0]
    missed = [b for b in rows if _num(xi(b).get("misses")) and xi(b)["misses"] > 0]
    if not clean or not missed:
        return []
    c, m = xi(max(clean, key=rps)), xi(max(missed, key=rps))
    word = compared(c.get("req_per_s"), m.get("req_per_s"), "more than", "fewer than",
                    "about as many as")
    out = [f"Without any miss ({fmt_bytes(c['cache_bytes'])} of cache) the fast path answered "
           f"{fmt(c.get('fast_path_share'))} of the requests and the host served "
           f"{fmt(c.get('req_per_s'))} req/s, {word} the best row with misses "
           f"({fmt_ratio(ratio(c.get('req_per_s'), m.get('req_per_s')))}): "
           f"{fmt(m.get('req_per_s'))} req/s with {fmt_bytes(m['cache_bytes'])}, a hit ratio of "
           f"{fmt(m.get('hit_ratio'))} and {fmt(m.get('fast_path_share'))} of the requests on "
           "the fast path."]
    share, hit = m.get("fast_path_share"), m.get("hit_ratio")
    if _num(share) and _num(hit) and share < HITS_OFF_FAST_PATH * hit:
        out[-1] += (" Hits too went through aiohttp there: a miss is answered by aiohttp, and "
                    "the keep-alive connection it came on stayed with aiohttp afterwards (as it "
                    "does with --no-native-hits; with the native hit loop it goes back to the "
                    "loop at its next request: docs/webcache.md), so a few misses took most "
                    "requests off the fast path.")
    elif _num(share) and _num(hit):
        out[-1] += (f" Every hit but {fmt(hit - share)} of the requests was on the fast path: a "
                    "connection that brought a miss went back to it at its next request.")
    return out


# A sweep row whose fast-path share is below this fraction of its hit ratio had hits answered by
# aiohttp (connections that stayed there after a miss): the report says so.
HITS_OFF_FAST_PATH = 0.9


def plot_sweep(plt, rows: list[dict], path: Path) -> None:
    xs = [xi(b)["cache_bytes"] / (1 << 20) for b in rows]
    fig, ax1 = plt.subplots(figsize=(7.5, 4))
    ax1.plot(xs, [xi(b).get("req_per_s") or 0 for b in rows], "o-", color="#1f77b4",
             label="requests/s")
    ax1.set_xlabel("cache memory (MiB): " + ", ".join(
        f"{fmt(xi(b).get('fraction_of_working_set'))}×" for b in rows) + " the working set")
    ax1.set_ylabel("requests/s", color="#1f77b4")
    ax1.set_ylim(bottom=0)
    ax2 = ax1.twinx()
    ax2.plot(xs, [xi(b).get("hit_ratio") or 0 for b in rows], "s-", color="#2ca02c",
             label="hit ratio")
    ax2.plot(xs, [xi(b).get("ideal_hit_ratio") or 0 for b in rows], ":", color="#2ca02c",
             label="ideal hit ratio")
    ax2.set_ylabel("hit ratio", color="#2ca02c")
    ax2.set_ylim(0, 1.05)
    lines = ax1.get_legend_handles_labels()
    more = ax2.get_legend_handles_labels()
    ax1.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8, loc="lower right")
    ax1.set_title("One host: throughput and hit ratio against cache memory (cf. MCS Fig. 8)",
                  fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def section_sweep(plt, rows: list[dict], img_dir: Path, out: Path) -> list[str]:
    """cache-size-sweep: one host's hit ratio and req/s against its cache memory."""
    rows = sorted(rows, key=lambda b: xi(b)["cache_bytes"])
    e0 = xi(rows[0])
    table = [[fmt_bytes(xi(b)["cache_bytes"]), fmt(xi(b).get("fraction_of_working_set")),
              fmt(xi(b).get("hit_ratio")), fmt(xi(b).get("ideal_hit_ratio")),
              fmt(xi(b).get("req_per_s")),
              fmt_ratio(ratio(xi(b).get("req_per_s"), e0.get("req_per_s"))),
              fmt(xi(b).get("fast_path_share")), fmt(xi(b).get("latency_us_p99"))]
             for b in rows]
    return [
        f"One host ({fmt(e0.get('nodes'))} node, on loopback, no front), the workload of "
        f"hosts-balance with a cache of {fmt(e0.get('fraction_of_working_set'))}× to "
        f"{fmt(xi(rows[-1]).get('fraction_of_working_set'))}× the working set: " +
        zipf_workload(e0) + load_average(rows), "",
        md_table(["cache", "× working set", "hit ratio", "ideal", "req/s", "× smallest",
                  "fast path", "p99 µs"], table), "",
        *_figure(plt, lambda p, path: plot_sweep(p, rows, path), img_dir, out,
                 "cache-size-sweep.png"),
        *[s + "\n" for s in sweep_findings(rows)],
    ]


# -- main ----------------------------------------------------------------------------------------

ORDER = ["webcache-hits", "webcache-scaling", "cache-comparison", "hosts-balance",
         "cache-size-sweep", "webcache-recovery-size", "stall-behind-holder", "supervise-restart"]
VICTIM_ENTRIES = 1_000  # bench/test_webcache.py: the killed member's own entries
RECOVERY_SIZE_RATIO = 1.5  # targets of webcache-recovery-size (issue 16)
RECOVERY_1M_MS = 20
STATE_SECTION = "Shared state"  # the state-* groups (bench/test_state.py), in one section
# ./dev bench makes .venv; matplotlib draws the plots (not an mcs dependency)
REGENERATE = "./dev bench && .venv/bin/pip install matplotlib && .venv/bin/python bench/report.py"


def raw_path(out: Path) -> Path:
    """Where the raw JSON of the reported run is kept: next to the report, same stem."""
    return out.with_suffix(".json")


def kept_run(docs: list[dict], groups: dict[str, list[dict]],
             source: dict[str, Path]) -> dict:
    """The raw pytest-benchmark document the report was computed from: the input itself when
    there is one; else the last input with exactly the reported rows, where each group came
    from (``mcs_report_sources``) and when and at which commit each of those runs was measured
    (``mcs_report_runs``)."""
    if len(docs) == 1:
        doc = dict(docs[0]["doc"])
    else:
        doc = dict(docs[-1]["doc"])
        doc["benchmarks"] = [b for rows in groups.values() for b in rows]
        doc["mcs_report_sources"] = {g: _shown(p) for g, p in source.items()}
        doc["mcs_report_runs"] = {_shown(p): label
                                  for p, label in run_labels(docs, source).items()}
    doc["benchmarks"] = [_without_samples(b) for b in doc["benchmarks"]]
    return doc


def _without_samples(bench: dict) -> dict:
    """A benchmark's record without its per-round samples (``stats.data``: 16 of 23 MB for a
    full run, used by no figure here); every statistic and ``extra_info`` is kept."""
    stats = bench.get("stats")
    if not isinstance(stats, dict) or "data" not in stats:
        return bench
    return {**bench, "stats": {k: v for k, v in stats.items() if k != "data"}}


def _shown(path: Path) -> str:
    try:
        return os.path.relpath(path, REPO) if path.is_relative_to(REPO) else str(path)
    except ValueError:
        return str(path)


def build(paths: list[Path], out: Path, img_dir: Path, *, plots: bool = True) -> str:
    """Write the report ``out`` (and its plots in ``img_dir`` when ``plots``) and keep the raw
    JSON it was computed from next to it (:func:`raw_path`). Returns the report's text."""
    plt = need_matplotlib() if plots else None
    groups, source, docs = load_runs(paths)
    raw = raw_path(out)
    sources = list(dict.fromkeys(source.values()))  # the runs the reported groups come from
    taken = "" if sources == [raw] else (" (taken from " + ", ".join(
        f"`{_shown(p)}`" for p in sources) + ")")
    last = docs[-1]["doc"]
    lines = [
        "# mcs benchmarks",
        "",
        f"Generated by `bench/report.py` from [`{raw.name}`]({raw.name}), the raw "
        f"pytest-benchmark JSON of the run (every statistic and recorded number; the per-round "
        f"samples left out), kept next to this page{taken}, on "
        f"{dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}. Every figure is "
        "given with its ratio (×) to the baseline of its group, measured in the same run, and "
        "every sentence stating a result is computed from those numbers. Run the benchmarks "
        "and regenerate this page (and the JSON) with:",
        "",
        "```",
        REGENERATE,
        "```",
        "",
        f"or re-render it from the kept data: `.venv/bin/python bench/report.py "
        f"{_shown(raw)}`.",
        "",
        "## The machine",
        "",
        md_table(["", "benchmark run (from the JSON" + (" of the last run)" if len(sources) > 1
                                                         else ")")],
                 [[k, v] for k, v in run_description(last).items()]),
        "",
    ]
    if len(sources) > 1:  # the groups come from several runs: when and at which commit each
        labels = run_labels(docs, source)
        lines += [md_table(["run", "measured", "groups"],
                           [[f"`{_shown(p)}`", labels[p],
                             ", ".join(g for g, q in source.items() if q == p)]
                            for p in sources]), ""]
    lines += [
        md_table(["", "this host (where the report was generated)"],
                 [[k, v] for k, v in host_description().items()]),
        "",
        machine_sentence([d["doc"] for d in docs], groups),
        "",
    ]
    headline = summary_line(last)
    if headline:
        lines += [headline, ""]
    state = {g: groups[g] for g in groups if is_state(g)}
    names = [g for g in ORDER if g in groups] + sorted(g for g in groups
                                                        if g not in ORDER and not is_state(g))
    several = len(sources) > 1  # then say which file each group was taken from
    lines += ["## Groups", ""] + [f"- [{g}](#{_anchor(g)}) ({len(groups[g])} rows"
                                   + (f", `{_shown(source[g])}`" if several else "") + ")"
                                   for g in names]
    if state:
        lines += [f"- [{STATE_SECTION}](#{_anchor(STATE_SECTION)}): " + ", ".join(
            f"{g} ({len(rows)} rows" + (f", `{_shown(source[g])}`" if several else "") + ")"
            for g, rows in state.items())]
    lines += [""]
    if plt is not None:
        img_dir.mkdir(parents=True, exist_ok=True)
    for g in names:
        rows = groups[g]
        base_of, how = baselines(g, rows)
        lines += [f"## {g}", ""]
        try:
            if g == "webcache-scaling" and all("nodes" in xi(b) for b in rows):
                lines += section_scaling(plt, rows, img_dir, out)
                continue
            key, render = ROW_SECTIONS.get(g, ("", None))
            if render is not None and all(key in xi(b) for b in rows):
                lines += render(rows)
                continue
            if g == "cache-comparison" and all("variant" in xi(b) for b in rows):
                lines += section_comparison(plt, rows, img_dir, out)
                continue
            if g == "hosts-balance" and all("balance" in xi(b) for b in rows):
                lines += section_hosts(plt, rows, img_dir, out)
                continue
            if g == "cache-size-sweep" and all("cache_bytes" in xi(b) for b in rows):
                lines += section_sweep(plt, rows, img_dir, out)
                continue
        except (KeyError, TypeError, ValueError) as exc:  # an older/newer layout: go generic
            lines += [f"(custom rendering failed: {exc!r}; generic table below)", ""]
        lines += section_generic(plt, g, rows, base_of, how, img_dir, out)
    if state:
        lines += [f"## {STATE_SECTION}", ""] + section_state(state)
    text = "\n".join(lines).rstrip() + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    raw.write_text(json.dumps(kept_run(docs, groups, source), indent=2) + "\n")
    out.write_text(text)
    return text


def _anchor(title: str) -> str:
    return re.sub(r"[^a-z0-9 _-]", "", title.lower()).replace(" ", "-")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/report.py", description=__doc__.split("\n")[0])
    p.add_argument("json", nargs="*", type=Path,
                   help="pytest-benchmark JSON file(s) (default .benchmarks/latest.json)")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md",
                   help="the report; the raw JSON is kept next to it (same name, .json)")
    p.add_argument("--img", type=Path, default=REPO / "docs" / "img")
    p.add_argument("--no-plots", action="store_true", help="no PNG plots (no matplotlib needed)")
    a = p.parse_args(argv)
    paths = [x.resolve() for x in (a.json or [REPO / ".benchmarks" / "latest.json"])]
    out = a.out.resolve()
    try:
        build(paths, out, a.img.resolve(), plots=not a.no_plots)
    except ReportError as exc:
        print(f"report.py: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {a.out}, {raw_path(a.out)}" + ("" if a.no_plots else f" and plots in {a.img}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
