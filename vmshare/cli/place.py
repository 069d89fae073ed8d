"""`vmshare place`: rank hosts for a VM by the sharing it would gain there (from
content sketches) and their memory headroom (from Prometheus); `--rebalance`:
the moves across the fleet that would gain most (an edge module)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmshare.cli.context import Context, emit_json, out
from vmshare.errors import SketchError, UsageError

if TYPE_CHECKING:
    from vmshare.engine.sampled import Estimate


def _mib(pages_or_bytes: float, pages: bool = True) -> str:
    from vmshare.model import PAGE_SIZE
    b = pages_or_bytes * PAGE_SIZE if pages else pages_or_bytes
    return f"{b / 2**20:,.1f} MiB"


def _est(e: Estimate) -> dict[str, int]:
    from vmshare.model import PAGE_SIZE
    return {"bytes": round(e.value * PAGE_SIZE), "low_bytes": round(e.low * PAGE_SIZE),
            "high_bytes": round(e.high * PAGE_SIZE), "pages": round(e.value)}


def _vm_sketch(ctx: Context, key: Any, rate: float) -> tuple[Any, int]:
    """The VM to place: a sketch file (one VM, or the one --vm names), else a
    running domain sketched now at the host sketches' rate."""
    from vmshare.records.sketchfile import rate_threshold, read_sketch
    a = ctx.args
    if Path(a.vm).is_file():
        sk = read_sketch(Path(a.vm), key_id=key.key_id)
        if sk.threshold != rate_threshold(rate):
            raise SketchError(f"{a.vm}: sampled at rate {sk.nominal_rate:.6g}, the host "
                              f"sketches at {rate:.6g}: remake it at one --rate")
        if len(sk.vms) != 1:
            raise UsageError(f"{a.vm} holds {len(sk.vms)} VMs; give a one-VM sketch")
        return sk.vms[0], sk.effective
    from vmshare.config import load_config
    from vmshare.prediction import predict as pr
    from vmshare.prediction.sketch import sketch_targets
    from vmshare.prediction.targets import trust_groups
    target = pr.domain_target(ctx.hv, ctx.observer(), a.vm, ctx.procfs)
    groups, _ = trust_groups(ctx.hv, [target], load_config(a.config))
    sk = sketch_targets([target], key, host="", rate=rate, groups=groups, procfs=ctx.procfs)
    if not sk.vms:
        raise UsageError(f"{a.vm}: no memory to sketch")
    return sk.vms[0], sk.effective


def _fetcher(a: Any, settings: Any) -> Any:
    """A SketchFetcher when a --sketches is a URL (its token read now)."""
    from vmshare.fleet.sketch_fetch import SketchFetcher, is_url
    from vmshare.records.sketchfile import load_token
    token_file = a.sketch_token_file or settings.token_file
    if not any(is_url(s) for s in a.sketches or ()):
        return None
    return SketchFetcher(load_token(Path(token_file)), timeout=a.sketch_timeout,
                         cafile=Path(a.sketch_ca_file) if a.sketch_ca_file else None)


def cmd_place(ctx: Context) -> int:
    from vmshare.config import load_config
    from vmshare.engine import EngineConfig
    from vmshare.fleet import placement
    from vmshare.promapi.client import PromClient
    from vmshare.records.sketchfile import load_key
    a = ctx.args
    settings = load_config(a.config).sketch
    key = load_key(Path(a.key_file) if a.key_file else settings.key_file)
    hosts = placement.load_sketches(a.sketches or [settings.dir], key.key_id,
                                    _fetcher(a, settings))
    client = PromClient(a.prometheus, timeout=a.timeout)
    room = placement.headroom(client)
    placement.check_prometheus_has_hosts(room, a.prometheus)
    config = EngineConfig(max_page_sharing=a.max_page_sharing, use_zero_pages=a.use_zero_pages)
    sketches = [s for _, s in hosts]
    if a.rebalance:
        if a.vm:
            raise UsageError("--rebalance looks at every VM: give no VM")
        from vmshare.fleet.rebalance import rebalance
        moves = rebalance(sketches, room, config, a.top)
        _print_moves(a, moves, len(sketches))
        return 0
    if not a.vm:
        raise UsageError("give a VM (a running domain or a sketch file) or --rebalance")
    vm, thr = _vm_sketch(ctx, key, sketches[0].nominal_rate)
    placement.check_fresh(vm, hosts)
    ranked = placement.rank(vm, thr, sketches, room, config)
    _print_rank(a, vm, ranked)
    return 0


def _print_rank(a: Any, vm: Any, ranked: list[Any]) -> None:
    from vmshare.model import PAGE_SIZE
    if a.json:
        emit_json({"vm": vm.name, "trust_group": vm.group, "need_bytes": vm.pages * PAGE_SIZE,
                   "interval": 0.95,
                   "hosts": [{"rank": i + 1, "host": c.host, "fits": c.fits,
                              "current": c.current, "extra_saving": _est(c.extra),
                              "headroom_bytes": c.headroom_bytes, "peers": c.peers}
                             for i, c in enumerate(ranked)]})
        return
    from vmshare.present.text import table
    out(f"{vm.name} (trust group {vm.group or '-'}, {_mib(vm.pages)} resident): hosts "
        "by the extra saving it would have there (95% interval)")
    rows = [[str(i + 1), c.host + (" (now)" if c.current else ""),
             f"{_mib(c.extra.value)} [{_mib(c.extra.low)} .. {_mib(c.extra.high)}]",
             "-" if c.headroom_bytes is None else _mib(c.headroom_bytes, pages=False),
             str(c.peers), "yes" if c.fits else "NO"] for i, c in enumerate(ranked)]
    out(table(["RANK", "HOST", "EXTRA SAVING", "HEADROOM", "PEERS", "FITS"], rows,
              right=(0, 3, 4)))


def _print_moves(a: Any, moves: list[Any], nhosts: int) -> None:
    if a.json:
        emit_json({"hosts": nhosts, "interval": 0.95,
                   "moves": [{"vm": m.vm, "from": m.source, "to": m.target,
                              "gain": _est(m.gain), "need_bytes": m.need_bytes,
                              "target_headroom_bytes": m.target_headroom_bytes}
                             for m in moves]})
        return
    if not moves:
        out(f"no move across {nhosts} hosts gains memory for sure (95% interval)")
        return
    from vmshare.present.text import table
    rows = [[m.vm, m.source, m.target,
             f"{_mib(m.gain.value)} [{_mib(m.gain.low)} .. {_mib(m.gain.high)}]",
             _mib(m.need_bytes, pages=False), _mib(m.target_headroom_bytes, pages=False)]
            for m in moves]
    out(table(["VM", "FROM", "TO", "GAIN (95% INTERVAL)", "NEEDS", "HEADROOM THERE"], rows,
              right=(4, 5)))


def register(sub: Any) -> None:
    from vmshare.cli import argtypes
    from vmshare.cli.shown import PROM_TIMEOUT as DEFAULT_TIMEOUT
    s = sub.add_parser("place", help="rank hosts for a VM by the sharing it would gain there "
                       "and their memory headroom (content sketches, Prometheus)")
    s.add_argument("vm", nargs="?", metavar="DOMAIN|SKETCH",
                   help="a running domain (sketched now) or a one-VM sketch file")
    s.add_argument("--prometheus", required=True, metavar="URL",
                   help="Prometheus-compatible API base URL, for each host's MemAvailable")
    s.add_argument("--sketches", action="append", metavar="DIR|FILE|URL",
                   help="host sketches (*.sketch in a directory, or a daemon's "
                        "http[s]://HOST:PORT/sketch); repeatable (default: the [sketch] dir)")
    s.add_argument("--sketch-token-file", metavar="FILE",
                   help="the sketch endpoints' bearer token, 0600 (default: [sketch] "
                        "token_file)")
    s.add_argument("--sketch-ca-file", metavar="FILE",
                   help="CA certificates to trust for https sketch URLs (besides the "
                        "system's)")
    s.add_argument("--sketch-timeout", type=argtypes.seconds(), default=30.0,
                   metavar="SECONDS", help="per sketch URL, the whole transfer "
                   "(default %(default)s)")
    s.add_argument("--rebalance", action="store_true",
                   help="propose the few migrations across the fleet that gain most")
    s.add_argument("--top", type=argtypes.bounded_int(1, 1000), default=5, metavar="N",
                   help="with --rebalance: at most N moves (default %(default)s)")
    s.add_argument("--key-file", metavar="FILE",
                   help="the fleet's sketch key (default: [sketch] key_file)")
    s.add_argument("--config", metavar="FILE", help="host config: [sketch], trust groups")
    s.add_argument("--timeout", type=argtypes.seconds(), default=DEFAULT_TIMEOUT,
                   metavar="SECONDS", help="per Prometheus request (default %(default)s)")
    s.add_argument("--max-page-sharing", type=argtypes.bounded_int(2, 2**31 - 1),
                   default=256, metavar="N", help="the kernel knob to assume (default 256)")
    s.add_argument("--use-zero-pages", action="store_true",
                   help="assume use_zero_pages=1 (zero pages share nothing here)")
    s.add_argument("--json", action="store_true", help="one JSON document")
    s.set_defaults(func=cmd_place)
