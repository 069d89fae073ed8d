"""`vmshare sketch`: content sketches of domains, dumps, processes; merged host
sketches; a sketch file shown (an edge module)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from vmshare.cli import argtypes
from vmshare.cli.context import Context, emit_json, out
from vmshare.errors import UsageError


def _sketch_settings(a: Any) -> Any:
    from vmshare.config import load_config
    return load_config(a.config).sketch


# ---------------------------------------------------------------- sketch
def sketch_summary(path: Path | None, sk: Any) -> str:
    from vmshare.cli.estimate import rate_text
    from vmshare.records.sketchfile import HASH_ALGORITHM, HASH_NAMES
    entries = sum(v.values.size + v.heavy_values.size for v in sk.vms)
    where = f"{path}: " if path else ""
    lines = [f"{where}host {sk.host!r}, {len(sk.vms)} VM(s), key id {sk.key_id.hex()}, "
             f"{HASH_NAMES[HASH_ALGORITHM]}, rate {rate_text(sk.nominal_rate)}"
             + (f" (cut to {rate_text(sk.rate)} by the size cap)" if sk.effective <
                sk.threshold else "")
             + f", {entries:,} entries, made "
             + time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sk.created))]
    for v in sk.vms:
        lines.append(f"  {v.name}: group {v.group or '-'}, {v.pages:,} pages, "
                     f"{v.zero_pages:,} zero, {v.values.size:,} sampled, "
                     f"{v.heavy_values.size:,} heavy")
    return "\n".join(lines)


def cmd_sketch(ctx: Context) -> int:
    from vmshare.records import sketchfile as sf
    a = ctx.args
    settings = _sketch_settings(a)
    key = sf.load_key(a.key_file or settings.key_file)
    if a.show:
        sk = sf.read_sketch(Path(a.show), key_id=key.key_id)
        _print(a, Path(a.show), sk, wrote=False)
        return 0
    import socket
    host = a.host or socket.gethostname()
    if a.merge:
        if a.domains or a.dump or a.raw or a.pid:
            raise UsageError("--merge takes sketch files only, not domains, dumps or pids")
        sk = sf.merge(host, [sf.read_sketch(Path(f), key_id=key.key_id) for f in a.merge])
    else:
        sk = _sketch_now(ctx, key, host)
    path = Path(a.out) if a.out else Path(settings.dir) / f"{host}.sketch"
    sf.write_sketch(path, sk)
    _print(a, path, sk, wrote=True)
    return 0


def _sketch_now(ctx: Context, key: Any, host: str) -> Any:
    from vmshare.cli.predict import _progress, targets_of
    from vmshare.prediction.sketch import sketch_targets
    a = ctx.args
    a.trust_groups = True                  # a sketch always records trust groups
    targets, groups, _ = targets_of(ctx)
    with _progress(a) as bar:
        return sketch_targets(targets, key, host=host, rate=a.rate or _sketch_settings(a).rate,
                              max_entries=a.max_entries, groups=groups, procfs=ctx.procfs,
                              progress=bar.update)


def _print(a: Any, path: Path, sk: Any, *, wrote: bool) -> None:
    if a.json:
        emit_json({"path": str(path), "written": wrote, "host": sk.host,
                   "key_id": sk.key_id.hex(), "rate": sk.nominal_rate,
                   "effective_rate": sk.rate, "created": sk.created,
                   "bytes": path.stat().st_size,
                   "vms": [{"name": v.name, "trust_group": v.group, "started": v.started,
                            "pages": v.pages, "zero_pages": v.zero_pages,
                            "sampled": int(v.values.size), "heavy": int(v.heavy_values.size)}
                           for v in sk.vms]})
    else:
        out(("wrote " if wrote else "") + sketch_summary(path, sk))


def register(sub: Any) -> None:
    from vmshare.cli.predict import target_options
    from vmshare.cli.shown import SKETCH_MAX_ENTRIES as DEFAULT_MAX_ENTRIES
    s = sub.add_parser("sketch", help="a content sketch of domains, dumps or processes for "
                       "`vmshare place` (a keyed sample of page contents)")
    target_options(s)
    s.add_argument("--out", metavar="FILE",
                   help="where to write (default: HOST.sketch in the [sketch] dir)")
    s.add_argument("--host", metavar="NAME",
                   help="the host the sketch describes (default: this host's name)")
    s.add_argument("--merge", nargs="+", metavar="SKETCH",
                   help="merge these sketch files into one host sketch instead")
    s.add_argument("--show", metavar="SKETCH", help="check and describe a sketch file")
    s.add_argument("--rate", type=argtypes.rate, default=None, metavar="R",
                   help="sampling rate, e.g. 1/16 (default: [sketch] rate, 1/16; every "
                        "sketch compared must use the same)")
    s.add_argument("--max-entries", type=argtypes.bounded_int(1, 1 << 28),
                   default=DEFAULT_MAX_ENTRIES, metavar="N",
                   help="at most N samples per VM; above it the rate drops "
                        f"(default {DEFAULT_MAX_ENTRIES:,})")
    s.add_argument("--key-file", metavar="FILE",
                   help="the fleet's sketch key (default: [sketch] key_file)")
    s.add_argument("--config", metavar="FILE", help="host config for trust groups and "
                   "[sketch] (default $VMSHARE_CONFIG or /etc/vmshare/vmshare.toml)")
    s.add_argument("--json", action="store_true", help="JSON output, no progress bar")
    s.set_defaults(func=cmd_sketch)
