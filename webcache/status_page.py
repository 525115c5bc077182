"""The live status page at ``/_mcs/``: one self-contained HTML document (no build step, no
external asset) whose script polls ``/_mcs/status`` every second and redraws the domain: the
members (pid, node, incarnation, state, heartbeat age, hits, misses, hit ratio, requests per
second, arena fill), the cache's fill, the totals, and the last recoveries on a time line.

Everything that comes from the server is put in the page as text (``textContent``, attribute
values through ``setAttribute``): no server string is ever parsed as HTML. Rows are compact so
that 16 members fit on one screen.
"""

from __future__ import annotations

__all__ = ["PAGE"]

PAGE = b"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>mcs web cache</title>
<style>
body { font: 13px/1.35 system-ui, sans-serif; margin: 1em 1.5em; color: #222; background: #fafafa; }
h1 { font-size: 17px; margin: 0 0 .3em; }
h2 { font-size: 14px; margin: 1.2em 0 .3em; }
#summary span { margin-right: 1.5em; white-space: nowrap; }
table { border-collapse: collapse; width: 100%; background: #fff; }
th, td { padding: 2px 8px; border-bottom: 1px solid #e4e4e4; text-align: right; white-space: nowrap; }
th { background: #eee; font-weight: 600; position: sticky; top: 0; }
td.l, th.l { text-align: left; }
tr.master td:first-child { font-weight: 700; }
tr.bad td { background: #fde8e8; }
tr.recovering td { background: #fff6d8; }
.bar { display: inline-block; width: 80px; height: 8px; background: #e4e4e4; vertical-align: middle; }
.bar i { display: block; height: 8px; background: #4a8; }
#timeline { position: relative; height: 26px; background: #fff; border: 1px solid #ddd; margin: .3em 0; }
#timeline b { position: absolute; top: 3px; width: 6px; height: 18px; margin-left: -3px; background: #c63; }
#error { color: #b00; }
.muted { color: #888; }
</style>
</head>
<body data-polls="0">
<h1>mcs web cache <span id="domain" class="muted"></span></h1>
<div id="summary"></div>
<div id="error"></div>
<h2>Members</h2>
<table>
<thead><tr>
<th class="l">slot</th><th class="l">node</th><th>pid</th><th>incarnation</th><th class="l">state</th>
<th>heartbeat age</th><th>hits</th><th>misses</th><th>hit ratio</th><th>req/s</th>
<th>entries</th><th class="l">arena fill</th><th>last recovery</th>
</tr></thead>
<tbody id="members"></tbody>
</table>
<h2>Recoveries <span class="muted">(last 10 minutes; newest first below)</span></h2>
<div id="timeline"></div>
<table>
<thead><tr><th>epoch</th><th>generation</th><th class="l">when</th><th>duration</th><th>members</th>
<th class="l">phases of the last one (slowest member)</th></tr></thead>
<tbody id="recoveries"></tbody>
</table>
<p class="muted">Polls <a href="status">/_mcs/status</a> every second; the same data in
Prometheus format at <a href="../metrics">/metrics</a>. Counters of other nodes lag by up to
a quarter of a second.</p>
<script>
"use strict";
var previous = {};  // "slot/incarnation" -> [time (s), requests]
var polls = 0;

function el(tag, text, cls) {
  var e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}
function row(cells) {
  var tr = document.createElement("tr");
  cells.forEach(function (c) { tr.appendChild(c); });
  return tr;
}
function fmtBytes(n) {
  var units = ["B", "KiB", "MiB", "GiB", "TiB"], i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : String(n)) + " " + units[i];
}
function bar(fraction) {
  var outer = el("span", null, "bar"), inner = document.createElement("i");
  inner.style.width = Math.max(0, Math.min(100, fraction * 100)).toFixed(1) + "%";
  outer.appendChild(inner);
  return outer;
}
function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); }

function render(doc) {
  var dom = doc.domain, now = doc.now;
  document.getElementById("domain").textContent = dom.name;
  var summary = document.getElementById("summary");
  clear(summary);
  var master = doc.master ? ("slot " + doc.master.slot + " (" + doc.master.node + ", pid " + doc.master.pid + ")") : "none";
  var t = dom.totals, looked = t.hits + t.misses;
  [["generation", dom.generation], ["master", master], ["members", doc.members.length],
   ["cache", dom.cache.entries + " entries, " + fmtBytes(dom.cache.bytes) + " of " + fmtBytes(dom.cache.capacity_bytes)],
   ["hits", t.hits], ["misses", t.misses],
   ["hit ratio", looked ? (100 * t.hits / looked).toFixed(1) + "%" : "-"],
   ["answered by", doc.node + " (pid " + doc.pid + ")"]
  ].forEach(function (p) {
    var s = el("span"); s.appendChild(el("b", p[0] + ": ")); s.appendChild(document.createTextNode(String(p[1])));
    summary.appendChild(s);
  });
  var fill = el("span"); fill.appendChild(bar(dom.cache.capacity_bytes ? dom.cache.bytes / dom.cache.capacity_bytes : 0));
  summary.appendChild(fill);

  var body = document.getElementById("members");
  clear(body);
  var seen = {};
  doc.members.forEach(function (m) {
    var key = m.slot + "/" + m.incarnation, c = m.counters, g = m.gauges, rate = "-";
    var before = previous[key];
    if (before && now > before[0]) rate = ((c.requests - before[1]) / (now - before[0])).toFixed(1);
    seen[key] = [now, c.requests];
    var tr = row([
      el("td", m.slot + (m.master ? " (master)" : ""), "l"), el("td", m.node, "l"), el("td", m.pid),
      el("td", m.incarnation), el("td", m.state + (m.recovering ? ", recovering" : ""), "l"),
      el("td", m.heartbeat_age_ms.toFixed(0) + " ms"), el("td", c.hits), el("td", c.misses),
      el("td", m.hit_ratio === null ? "-" : (100 * m.hit_ratio).toFixed(1) + "%"), el("td", rate),
      el("td", g.entries), el("td", null, "l"), el("td", m.last_recovery_ms.toFixed(1) + " ms")
    ]);
    var fillCell = tr.children[11];
    fillCell.appendChild(bar(g.arena_bytes ? g.bytes / g.arena_bytes : 0));
    fillCell.appendChild(document.createTextNode(" " + fmtBytes(g.bytes)));
    tr.setAttribute("data-pid", String(m.pid));
    tr.setAttribute("data-slot", String(m.slot));
    if (m.master) tr.classList.add("master");
    if (m.state !== "member") tr.classList.add("bad");
    else if (m.recovering) tr.classList.add("recovering");
    body.appendChild(tr);
  });
  previous = seen;

  var line = document.getElementById("timeline");
  clear(line);
  var span = 600;
  dom.recoveries.forEach(function (r) {
    var age = now - r.at;
    if (age < 0 || age > span) return;
    var mark = document.createElement("b");
    mark.style.left = (100 * (1 - age / span)).toFixed(2) + "%";
    mark.title = "epoch " + r.epoch + ", " + r.duration_ms.toFixed(1) + " ms, " + Math.round(age) + " s ago";
    line.appendChild(mark);
  });
  var recs = document.getElementById("recoveries");
  clear(recs);
  dom.recoveries.forEach(function (r, i) {
    var phases = "";
    if (i === 0 && dom.last_recovery && dom.last_recovery.epoch === r.epoch) {
      phases = Object.keys(dom.last_recovery.phases_ms).map(function (p) {
        return p + " " + dom.last_recovery.phases_ms[p].toFixed(1);
      }).join(", ") + " ms";
    }
    recs.appendChild(row([el("td", r.epoch), el("td", r.generation),
      el("td", new Date(r.at * 1000).toLocaleTimeString() + " (" + Math.round(now - r.at) + " s ago)", "l"),
      el("td", r.duration_ms.toFixed(1) + " ms"), el("td", r.members), el("td", phases, "l")]));
  });
}

function poll() {
  fetch("/_mcs/status", {cache: "no-store"}).then(function (r) {
    if (!r.ok) throw new Error("HTTP " + r.status);
    return r.json();
  }).then(function (doc) {
    render(doc);
    document.getElementById("error").textContent = "";
    polls++;
    document.body.setAttribute("data-polls", String(polls));
  }).catch(function (e) {
    document.getElementById("error").textContent = "status unavailable: " + e;
  }).then(function () { setTimeout(poll, 1000); });
}
poll();
</script>
</body>
</html>
"""
