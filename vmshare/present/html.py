"""A self-contained HTML report: host summary, per-VM savings, the sharing
matrix as a heat map, and savings history. Pure: data in, one string out.

No JavaScript, no external assets (operators open it from a jump host or
attach it to a ticket); charts are inline SVG. Every number is one that
`vmshare status` prints, with the same meaning; VM names are escaped.
"""

from __future__ import annotations

import html
import time
from collections.abc import Sequence
from typing import Any

from vmshare.model import PAGE_SIZE, VM_FIGURE_MEANINGS
from vmshare.observe.host import HostView
from vmshare.present.text import merge_state, mib
from vmshare.records.history import host_saved_bytes

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem;
color:#1d2733;background:#fafbfc}
h1{font-size:1.5rem;margin:0 0 .25rem}h2{font-size:1.1rem;margin:2rem 0 .5rem}
.sub{color:#5b6b7b;margin-bottom:1.5rem}
.cards{display:flex;gap:1rem;flex-wrap:wrap}
.card{background:#fff;border:1px solid #dde3ea;border-radius:8px;padding:.8rem 1.1rem;
min-width:10rem}
.card b{display:block;font-size:1.4rem}.card span{color:#5b6b7b;font-size:.85rem}
table{border-collapse:collapse;background:#fff;border:1px solid #dde3ea}
th,td{padding:.35rem .7rem;border-bottom:1px solid #eef1f4;text-align:right;
white-space:nowrap}td:first-child{white-space:normal;max-width:26rem}
th{background:#f3f5f8;font-weight:600}td:first-child,th:first-child{text-align:left}
.warn{color:#9a5b00}.muted{color:#8795a1}
svg text{font:12px system-ui,sans-serif;fill:#1d2733}
"""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _bar_chart(rows: Sequence[tuple[str, float, float]]) -> str:
    """Horizontal bars: (label, saved bytes, RAM bytes) per VM."""
    if not rows:
        return '<p class="muted">No running VMs.</p>'
    width, label_w, bar_h, gap = 720, 180, 22, 8
    top = max(max(r[2] for r in rows), 1.0)
    height = len(rows) * (bar_h + gap) + gap
    parts = [f'<svg width="{width}" height="{height}" role="img" '
             'aria-label="saved memory per VM">']
    for i, (label, saved, ram) in enumerate(rows):
        y = gap + i * (bar_h + gap)
        ram_w = (width - label_w - 190) * ram / top
        saved_w = (width - label_w - 190) * saved / top
        parts.append(f'<text x="0" y="{y + 15}">{_e(label[:24])}</text>')
        parts.append(f'<rect x="{label_w}" y="{y}" width="{ram_w:.1f}" height="{bar_h}" '
                     'fill="#e3e9f0"><title>RAM</title></rect>')
        parts.append(f'<rect x="{label_w}" y="{y}" width="{saved_w:.1f}" height="{bar_h}" '
                     f'fill="#2f7d6d"><title>{_e(mib(saved))} saved</title></rect>')
        parts.append(f'<text x="{label_w + ram_w + 6:.1f}" y="{y + 15}">{_e(mib(saved))} of '
                     f'{_e(mib(ram))}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _heat_map(names: Sequence[str], shares: dict[str, dict[str, int]]) -> str:
    if len(names) < 2:
        return '<p class="muted">Fewer than two running VMs: nothing to share.</p>'
    cell, label_w, head_h = 78, 170, 120
    width, height = label_w + cell * len(names) + 60, head_h + cell * len(names)
    top = max([v for row in shares.values() for v in row.values()] or [1])
    parts = [f'<svg width="{width}" height="{height}" role="img" aria-label="sharing matrix">']
    for j, name in enumerate(names):
        x = label_w + j * cell + cell / 2
        parts.append(f'<text x="{x:.0f}" y="{head_h - 8}" '
                     f'transform="rotate(-40 {x:.0f} {head_h - 8})">{_e(name[:22])}</text>')
    for i, a in enumerate(names):
        y = head_h + i * cell
        parts.append(f'<text x="0" y="{y + cell / 2 + 4:.0f}">{_e(a[:22])}</text>')
        for j, b in enumerate(names):
            x = label_w + j * cell
            pages = shares.get(a, {}).get(b, 0)
            level = pages / top if top else 0.0
            if a == b:
                fill, text, ink = "#f3f5f8", "–", "#8795a1"
            else:
                fill = f"rgba(47,125,109,{0.08 + 0.92 * level:.2f})"
                text = mib(pages * PAGE_SIZE)
                ink = "#ffffff" if level > 0.45 else "#1d2733"
            parts.append(f'<rect x="{x}" y="{y}" width="{cell - 2}" height="{cell - 2}" '
                         f'fill="{fill}"><title>{_e(a)} → {_e(b)}: {_e(text)}</title></rect>')
            parts.append(f'<text x="{x + cell / 2 - 1:.0f}" y="{y + cell / 2 + 4:.0f}" '
                         f'text-anchor="middle" font-size="11" style="fill:{ink}">'
                         f"{_e(text)}</text>")
    parts.append("</svg>")
    return "".join(parts)


def _line_chart(samples: Sequence[dict[str, Any]]) -> str:
    if len(samples) < 2:
        return '<p class="muted">No history yet (the daemon records it).</p>'
    width, height, pad = 720, 220, 40
    t0, t1 = samples[0]["time"], samples[-1]["time"]
    values = [host_saved_bytes(s) for s in samples]
    top = max(max(values), 1)
    pts = " ".join(
        f"{pad + (width - 2 * pad) * (s['time'] - t0) / max(t1 - t0, 1):.1f},"
        f"{height - pad - (height - 2 * pad) * v / top:.1f}"
        for s, v in zip(samples, values, strict=True))
    start = time.strftime("%Y-%m-%d %H:%M", time.localtime(t0))
    end = time.strftime("%Y-%m-%d %H:%M", time.localtime(t1))
    return (f'<svg width="{width}" height="{height}" role="img" aria-label="host saving">'
            f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" '
            'stroke="#c9d2dc"/>'
            f'<polyline points="{pts}" fill="none" stroke="#2f7d6d" stroke-width="2"/>'
            f'<text x="{pad}" y="{height - 12}">{_e(start)}</text>'
            f'<text x="{width - pad}" y="{height - 12}" text-anchor="end">{_e(end)}</text>'
            f'<text x="{pad}" y="{pad - 12}">{_e(mib(top))} saved (max); now '
            f'{_e(mib(values[-1]))}</text></svg>')


def render(host: HostView, samples: Sequence[dict[str, Any]] = (), *,
           hostname: str = "", now: float | None = None) -> str:
    """The whole report as one HTML document."""
    now = time.time() if now is None else now
    c = host.counters
    running = [v for v in host.vms if v.facts.pid is not None]
    names = [v.name for v in running]
    sharing = c.get("pages_sharing", 0) * PAGE_SIZE
    cards = [
        (mib(sharing), "saved on this host (pages_sharing)"),
        (mib(host.vm_saved_pages * PAGE_SIZE), "of it by the VMs below"),
        (f"{c.get('pages_shared', 0):,}", "KSM pages in use (pages_shared)"),
        (str(len(running)), "running VMs"),
    ]
    rows = []
    for vm in running:
        warn = "".join(f'<div class="warn">{_e(w)}</div>' for w in vm.warnings)
        # As `vmshare status` shows it: an ineligible backend is n/a whatever its merge.
        state = "not eligible: " + vm.facts.ineligible_reason \
            if vm.facts.ineligible_reason else merge_state(vm)
        rows.append(f"<tr><td>{_e(vm.name)}{warn}</td><td>{_e(mib(vm.ram_bytes))}</td>"
                    f"<td>{vm.ksm_pages:,}</td><td>{_e(mib(vm.saved_bytes))}</td>"
                    f"<td>{vm.ksm_stat.ksm_zero_pages:,}</td>"
                    f"<td>{vm.ksm_stat.ksm_rmap_items:,}</td><td>{_e(state)}</td></tr>")
    legend = "".join(f"<li><b>{_e(k)}</b>: {_e(v)}</li>" for k, v in VM_FIGURE_MEANINGS.items())
    title = f"vmshare report{' — ' + hostname if hostname else ''}"
    return "\n".join([
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f'<div class="sub">{_e(time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(now)))}'
        f" · kernel KSM {'running' if host.knobs.get('run') == 1 else 'not running'}"
        f" · full_scans {c.get('full_scans', 0):,}</div>",
        '<div class="cards">' + "".join(f'<div class="card"><b>{_e(v)}</b><span>{_e(t)}'
                                        "</span></div>" for v, t in cards) + "</div>",
        "<h2>Saved memory per VM (fair share of each KSM page)</h2>",
        _bar_chart([(v.name, float(v.saved_bytes), float(v.ram_bytes)) for v in running]),
        "<h2>VMs</h2><table><tr><th>VM</th><th>RAM</th><th>KSM pages</th><th>Saved</th>"
        "<th>Zero pages</th><th>rmap items</th><th>Merge</th></tr>" + "".join(rows)
        + "</table>",
        "<h2>Who shares with whom</h2><p class=\"muted\">Guest RAM of each row's VM "
        "mapped to a KSM page the column's VM maps too.</p>",
        _heat_map(names, {v.name: v.shares_with_pages for v in running}),
        "<h2>Host saving over time</h2>", _line_chart(samples),
        f"<h2>What the numbers mean</h2><ul>{legend}</ul>",
        "</body></html>",
    ])
