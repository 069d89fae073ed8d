"""`vmshare predict --estimate`'s figures, as text or JSON (an edge module)."""

from __future__ import annotations

from typing import Any

from vmshare.cli.context import Context, emit_json, out
from vmshare.model import PAGE_SIZE


def rate_text(rate: float) -> str:
    return f"1/{1 / rate:.4g}" if rate < 1 else "1"


# ---------------------------------------------------------------- predict --estimate
def _est_json(e: Any) -> dict[str, float]:
    return {"pages": round(e.value, 1), "low": round(e.low, 1), "high": round(e.high, 1),
            "stderr": round(e.stderr, 1), "exact_part": round(e.exact, 1),
            "bytes": round(e.value * PAGE_SIZE)}


def estimate_json(est: Any, notes: list[str]) -> dict[str, Any]:
    total = est.total()
    return {"rate": est.rate, "interval": 0.95, "sketch_bytes": est.sketch_bytes,
            "config": {"max_page_sharing": est.config.max_page_sharing,
                       "use_zero_pages": int(est.config.use_zero_pages)},
            "groups": [{"group": g.group, "pages_sharing": _est_json(g.pages_sharing),
                        "sources": [{"name": v.name, "pages": v.pages,
                                     "zero_content_pages": v.zero_pages,
                                     "saved": _est_json(v.saved)} for v in g.vms]}
                       for g in est.groups],
            "totals": {"pages_sharing": _est_json(total)}, "page_size": PAGE_SIZE,
            "notes": notes}


def _interval(e: Any) -> str:
    from vmshare.present.text import mib
    return f"{mib(e.value * PAGE_SIZE)} [{mib(e.low * PAGE_SIZE)} .. {mib(e.high * PAGE_SIZE)}]"


def estimate_text(est: Any, notes: list[str]) -> str:
    from vmshare.present.text import table
    cfg = est.config
    lines = [f"Estimate from a content sample at rate {rate_text(est.rate)} "
             f"(max_page_sharing={cfg.max_page_sharing}, "
             f"use_zero_pages={int(cfg.use_zero_pages)}); 95% intervals"]
    for g in est.groups:
        lines.append("")
        if g.group is not None:
            lines.append(f"Trust group {g.group!r}:")
        rows = [[v.name, f"{v.pages:,}", f"{v.zero_pages:,}", _interval(v.saved)]
                for v in g.vms]
        lines.append(table(["SOURCE", "PAGES", "ZERO CONTENT", "SAVED (95% INTERVAL)"], rows,
                           right=(1, 2)))
        ps = g.pages_sharing
        lines.append(f"pages_sharing ~ {ps.value:,.0f} [{ps.low:,.0f} .. {ps.high:,.0f}]")
    t = est.total()
    lines.append("")
    lines.append(f"Total: pages_sharing ~ {t.value:,.0f} [{t.low:,.0f} .. {t.high:,.0f}] would "
                 f"save {_interval(t)}; sample: {est.sketch_bytes:,} bytes")
    lines.extend(f"note: {n}" for n in notes)
    return "\n".join(lines)


def print_estimate(ctx: Context, targets: list[Any], groups: dict[str, str] | None,
                   notes: list[str], config: Any) -> int:
    from vmshare.prediction.estimate import estimate
    from vmshare.present.progress import ProgressBar
    a = ctx.args
    rate = a.rate
    if rate is None:          # the fleet's rate, as `vmshare sketch` and the daemon use
        from vmshare.config import load_config
        rate = load_config(a.config).sketch.rate
    with ProgressBar(enabled=not a.json) as bar:
        est = estimate(targets, config, groups=groups, rate=rate, progress=bar.update)
    if a.json:
        emit_json(estimate_json(est, notes))
    else:
        out(estimate_text(est, notes))
    return 0
