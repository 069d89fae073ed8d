"""`vmshare predict` / `vmshare scan` at the edge: output, JSON, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.dump_corpus import ElfSpec, Seg, build_elf, noise_page, page
from vmshare.cli.main import main

REPO = Path(__file__).resolve().parent.parent


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    c = capsys.readouterr()
    return code, c.out, c.err


@pytest.fixture
def dumps(tmp_path: Path) -> tuple[str, str]:
    a, b = tmp_path / "a.elf", tmp_path / "b.elf"
    a.write_bytes(build_elf(ElfSpec([Seg(0, page(1) * 3 + noise_page(1) + bytes(4096))])))
    b.write_bytes(build_elf(ElfSpec([Seg(0, page(1) + noise_page(2))])))
    return str(a), str(b)


def test_predict_text(capsys: pytest.CaptureFixture[str], dumps: tuple[str, str]) -> None:
    a, b = dumps
    code, out, err = run(capsys, "predict", "--dump", a, "--dump", b)
    assert code == 0 and err == ""                  # no progress bar off a terminal
    # Two scans: the unstable tree needs a checksum seen twice; the second scan
    # is a fixed point (KsmEngine.settled), so no confirmation scan is run.
    assert "converged after 2 scans" in out
    assert "pages_sharing=3" in out and "pages_shared=1" in out
    assert "SHARES WITH" in out and "all-zero pages seen: 1" in out


def test_predict_json(capsys: pytest.CaptureFixture[str], dumps: tuple[str, str]) -> None:
    a, b = dumps
    code, out, _ = run(capsys, "predict", "--json", "--max-page-sharing", "2",
                       "--use-zero-pages", "--dump", a, "--dump", b)
    assert code == 0
    doc = json.loads(out)
    assert doc["config"] == {"max_page_sharing": 2, "use_zero_pages": 1, "trust_groups": False}
    (g,) = doc["groups"]
    assert g["counters"]["pages_sharing"] == 2 and g["counters"]["stable_node_dups"] == 2
    assert g["counters"]["ksm_zero_pages"] == 1
    assert doc["totals"]["saved_bytes"] == 2 * 4096
    src = {s["name"]: s for s in g["sources"]}
    assert src[a]["zero_pages"] == 1 and src[b]["shares_with"][a] == 4096


def test_predict_trust_groups_from_config(capsys: pytest.CaptureFixture[str],
                                          dumps: tuple[str, str], tmp_path: Path) -> None:
    a, b = dumps
    cfg = tmp_path / "vmshare.toml"
    cfg.write_text(f'[vm."{a}"]\ngroup = "red"\n')
    code, out, _ = run(capsys, "predict", "--json", "--trust-groups", "--config", str(cfg),
                       "--dump", a, "--dump", b)
    assert code == 0
    doc = json.loads(out)
    assert [g["group"] for g in doc["groups"]] == ["default", "red"]
    assert doc["totals"]["pages_sharing"] == 2       # page(1) no longer shared with b
    assert any("no domain policy" in n for n in doc["notes"])


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vmshare", *args], capture_output=True,
                          text=True, timeout=60, cwd=REPO)


def one_line(proc: subprocess.CompletedProcess[str], *words: str) -> None:
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vmshare: error: "), proc.stderr
    assert all(w in lines[0] for w in words), lines[0]


def test_user_mistakes_are_one_line(tmp_path: Path) -> None:
    one_line(cli("predict"), "nothing to predict")
    one_line(cli("predict", "--dump", str(tmp_path / "nope")), "cannot open dump")
    junk = tmp_path / "junk"
    junk.write_bytes(b"\0" * 100)
    one_line(cli("predict", "--dump", str(junk)), "neither an ELF core nor a kdump")
    low = cli("predict", "--raw", str(junk), "--max-page-sharing", "1")   # argparse's range
    assert low.returncode == 2 and "--max-page-sharing: must be an integer from 2" in low.stderr
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    one_line(cli("predict", "--pid", str(dead.pid)), "no running process")
    bad = cli("predict", "--pid", "-3")                 # argparse: usage + one error line
    assert bad.returncode == 2 and "must be an integer from 1" in bad.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop privileges")
def test_eperm_is_one_line() -> None:
    def drop() -> None:
        os.setgid(65534)
        os.setuid(65534)

    proc = subprocess.run([sys.executable, "-m", "vmshare", "predict", "--pid", "1"],
                          capture_output=True, text=True, timeout=60, cwd=REPO,
                          preexec_fn=drop)
    one_line(proc, "permission denied")
