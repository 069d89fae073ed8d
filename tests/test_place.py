"""`vmshare place` on synthetic hosts: ranking against the exact figures, trust
groups, rebalancing, and bad input answered in one line."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest

from tests.fakes.prometheus import serve, vector
from tests.sketch_mixes import generated_target
from vmshare.cli.main import main
from vmshare.engine import EngineConfig
from vmshare.engine.sampled import sharing
from vmshare.errors import SketchError, UsageError
from vmshare.fleet.placement import check_fresh, rank
from vmshare.fleet.rebalance import rebalance
from vmshare.prediction.sketch import sketch_targets
from vmshare.records.sketchfile import Sketch, SketchKey, write_sketch

SECRET = b"p" * 32
KEY = SketchKey.from_secret(SECRET)
RATE = 1 / 4
#: content kinds: each VM of a kind holds its kind's pool once, plus its own pages
#: (kind H holds half of A's pool): the extra saving is one page per content the
#: VM shares with the host's group, however many copies the host has
POOLS = {"A": (1, 3000), "H": (1, 1500), "B": (100_000, 2000)}


def vm_ids(kind: str, own: int, n_own: int = 1500) -> np.ndarray:
    start, size = POOLS[kind]
    return np.concatenate([np.arange(start, start + size),
                           np.arange(10**7 + own * 10**5, 10**7 + own * 10**5 + n_own)])


#: a host's sketch and its VMs' contents (name -> content ids)
HostFixture = tuple[Sketch, dict[str, np.ndarray]]
#: host name -> its sketch and contents
Fleet = dict[str, HostFixture]


def host_sketch(name: str, vms: dict[str, tuple[str, int, str]]) -> HostFixture:
    """A host of VMs name -> (kind, own id, trust group); its sketch and contents."""
    ids = {n: vm_ids(k, o) for n, (k, o, _) in vms.items()}
    targets = [generated_target(n, i) for n, i in ids.items()]
    groups = {n: g for n, (_, _, g) in vms.items()}
    return sketch_targets(targets, KEY, host=name, rate=RATE, groups=groups), ids


def exact_extra(host_ids: list[np.ndarray], vm: np.ndarray) -> int:
    def s(parts: list[np.ndarray]) -> int:
        if not parts:
            return 0
        _, c = np.unique(np.concatenate(parts), return_counts=True)
        return int(sharing(c, 256).sum())
    return s([*host_ids, vm]) - s(host_ids) - s([vm])


@pytest.fixture(scope="module")
def fleet() -> Fleet:
    return {
        "h1": host_sketch("h1", {"a1": ("H", 1, "g"), "b1": ("B", 2, "g")}),
        "h2": host_sketch("h2", {"a2": ("A", 3, "g"), "a3": ("A", 4, "g")}),
        "h3": host_sketch("h3", {"a4": ("A", 5, "other"), "b2": ("B", 6, "g")}),
    }


def test_ranking_matches_the_exact_extra_saving(fleet: Fleet) -> None:
    new, new_ids = host_sketch("", {"x": ("A", 9, "g")})
    vm = new.vms[0]
    room = {"h1": 1e12, "h2": 1e12, "h3": 1e12}
    ranked = rank(vm, new.effective, [s for s, _ in fleet.values()], room, EngineConfig())
    exact = {h: exact_extra([ids[n] for n, v in zip(ids, s.vms, strict=True)
                             if v.group == "g"], new_ids["x"])
             for h, (s, ids) in fleet.items()}
    assert [c.host for c in ranked] == sorted(exact, key=lambda h: -exact[h])
    assert ranked[0].host == "h2"            # VMs of its kind and its group
    assert exact["h3"] == 0 < exact["h1"] < exact["h2"]   # h3's kind A is another group
    for c in ranked:
        assert c.extra.low <= exact[c.host] <= c.extra.high
        assert abs(c.extra.value - exact[c.host]) <= 0.1 * max(exact[c.host], 1) + 1


def test_headroom_decides_where_it_fits(fleet: Fleet) -> None:
    new, _ = host_sketch("", {"x": ("A", 9, "g")})
    need = new.vms[0].pages * 4096
    ranked = rank(new.vms[0], new.effective, [s for s, _ in fleet.values()],
                  {"h1": 2 * need, "h2": need - 1}, EngineConfig())
    assert [(c.host, c.fits) for c in ranked] == [("h1", True), ("h2", False), ("h3", False)]
    with pytest.raises(UsageError, match="more than any host's memory headroom"):
        rank(new.vms[0], new.effective, [s for s, _ in fleet.values()], {"h1": 1.0},
             EngineConfig())


def test_rebalance_moves_a_vm_to_its_kind(fleet: Fleet) -> None:
    hosts = [s for s, _ in fleet.values()]
    moves = rebalance(hosts, {"h1": 1e12, "h2": 1e12, "h3": 1e12}, EngineConfig(), top=2)
    assert moves
    best = moves[0]
    # b1 (kind B) sits with a1 (kind A); b2, of its kind and group, is on h3
    # (or a1 joins a2 and a3 on h2): either gains about a pool
    assert (best.vm, best.target) in {("b1", "h3"), ("a1", "h2")}
    assert best.gain.low > 0
    assert len({m.vm for m in moves}) == len(moves)


def test_a_sketch_older_than_the_vms_restart_is_refused(fleet: Fleet) -> None:
    import dataclasses
    sk = fleet["h1"][0]
    vm = dataclasses.replace(sk.vms[0], started=1_700_000_000)
    old = dataclasses.replace(sk, vms=(dataclasses.replace(sk.vms[0], started=1_600_000_000),))
    check_fresh(vm, [(Path("h1.sketch"), sk)])          # started unknown there: no check
    check_fresh(vm, [(Path("h1.sketch"), dataclasses.replace(
        sk, vms=(dataclasses.replace(sk.vms[0], started=1_700_000_000),)))])
    with pytest.raises(SketchError, match=r"h1\.sketch: stale: .* restarted"):
        check_fresh(vm, [(Path("h1.sketch"), old)])


# ---------------------------------------------------------------- the command
def write_fleet(tmp_path: Path, fleet: Fleet) -> tuple[Path, Path]:
    key = tmp_path / "key"
    key.write_bytes(SECRET)
    os.chmod(key, 0o600)
    d = tmp_path / "sketches"
    for name, (sk, _) in fleet.items():
        write_sketch(d / f"{name}.sketch", sk)
    return key, d


def prom_answer(path: str, params: dict[str, str]) -> tuple[int, str, bytes]:
    if "node_memory_MemAvailable_bytes" in params.get("query", ""):
        return 200, "application/json", vector(*[({"instance": f"{h}:9100"}, 8e9)
                                                 for h in ("h1", "h2", "h3")])
    return 200, "application/json", vector()


def test_place_command_json(tmp_path: Path, fleet: Fleet,
                            capsys: pytest.CaptureFixture[str]) -> None:
    key, d = write_fleet(tmp_path, fleet)
    new, _ = host_sketch("", {"x": ("A", 9, "g")})
    write_sketch(tmp_path / "x" / "x.sketch", new)
    with serve(prom_answer) as url:
        code = main(["place", str(tmp_path / "x" / "x.sketch"), "--prometheus", url,
                     "--sketches", str(d), "--key-file", str(key), "--json"])
        cap = capsys.readouterr()
        assert code == 0, cap.err
        doc = json.loads(cap.out)
        assert [h["host"] for h in doc["hosts"]] == ["h2", "h1", "h3"]
        assert doc["hosts"][0]["headroom_bytes"] == 8e9 and doc["hosts"][0]["fits"]
        assert main(["place", "--rebalance", "--prometheus", url, "--sketches", str(d),
                     "--key-file", str(key)]) == 0
        assert "GAIN" in capsys.readouterr().out


def one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str], what: str) -> None:
    code = main(argv)
    err = capsys.readouterr().err
    assert code != 0 and len(err.strip().splitlines()) == 1, err
    assert what in err and "Traceback" not in err


def test_bad_input_is_one_line(tmp_path: Path, fleet: Fleet,
                               capsys: pytest.CaptureFixture[str]) -> None:
    key, d = write_fleet(tmp_path, fleet)
    new, _ = host_sketch("", {"x": ("A", 9, "g")})
    vmfile = tmp_path / "x" / "x.sketch"
    write_sketch(vmfile, new)
    empty = tmp_path / "empty"
    empty.mkdir(mode=0o700)
    other = tmp_path / "other.key"
    other.write_bytes(b"q" * 32)
    os.chmod(other, 0o600)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    with serve(prom_answer) as url:
        base = ["place", str(vmfile), "--prometheus", url, "--key-file", str(key)]
        one_line_error(capsys, [*base, "--sketches", str(empty)], "no host sketches")
        one_line_error(capsys, ["place", str(vmfile), "--prometheus", url, "--key-file",
                                str(other), "--sketches", str(d)], "another key")
        with serve(lambda p, q: (200, "application/json", vector(
                ({"instance": "h1:9100"}, 1.0)))) as tiny:
            one_line_error(capsys, ["place", str(vmfile), "--prometheus", tiny, "--key-file",
                                    str(key), "--sketches", str(d)], "more than any host")
        with serve(lambda p, q: (200, "application/json", vector())) as none:
            one_line_error(capsys, ["place", str(vmfile), "--prometheus", none, "--key-file",
                                    str(key), "--sketches", str(d)], "no host headroom")
    one_line_error(capsys, ["place", str(vmfile), "--prometheus", dead, "--key-file",
                            str(key), "--sketches", str(d), "--timeout", "2"], dead)
