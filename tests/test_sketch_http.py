"""The sketch endpoint (vmshare.daemon.sketch_http) on a real local server and
`place --sketches URL` against it: the token rules, the bounds, every failure
one line naming the URL, and a mix of URLs and directories."""

from __future__ import annotations

import http.client
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from tests.fakes.prometheus import serve
from tests.test_place import SECRET, host_sketch, one_line_error, prom_answer, write_fleet
from vmshare.cli.main import main
from vmshare.config import Config, SketchSettings
from vmshare.daemon.service import run_daemon
from vmshare.daemon.sketch_http import SketchServer, endpoint_token, serve_sketch
from vmshare.errors import PolicyError, SketchError
from vmshare.fleet.sketch_fetch import SketchFetcher
from vmshare.records.sketchfile import SketchKey, encode, write_sketch

TOKEN = b"t0ken-for-tests-only-0123456789"


def private(path: Path, data: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(data)
    os.chmod(path, mode)
    return path


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., SketchServer]]:
    servers: list[SketchServer] = []

    def run(path: Path, **bounds: float) -> SketchServer:
        token_file = private(tmp_path / f"endpoint-token-{len(servers)}", TOKEN + b"\n")
        server = serve_sketch("127.0.0.1:0", path, token_file, **bounds)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()
        servers.append(server)
        return server

    yield run
    for server in servers:
        server.shutdown()
        server.server_close()


def get(server: SketchServer, path: str = "/sketch",
        auth: str | None = None) -> tuple[int, dict[str, str], bytes]:
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(str(host), int(port), timeout=5)
    try:
        conn.request("GET", path, headers={"Authorization": auth} if auth else {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def sketch_file(tmp_path: Path, name: str = "h9") -> Path:
    sk, _ = host_sketch(name, {f"{name}-a": ("A", 41, "g")})
    path = tmp_path / "sketches" / f"{name}.sketch"
    write_sketch(path, sk)
    return path


def test_the_token_is_required_and_checked_first(
        tmp_path: Path, start: Callable[..., SketchServer],
        caplog: pytest.LogCaptureFixture) -> None:
    path = sketch_file(tmp_path)
    server = start(path)
    right = "Bearer " + TOKEN.decode()
    with caplog.at_level(logging.DEBUG, "vmshare"):
        status, headers, body = get(server, auth=right)
        assert (status, body) == (200, path.read_bytes())
        assert headers["Content-Type"] == "application/octet-stream"
        for auth in (None, "Bearer wrong", "Bearer " + TOKEN.decode()[:-1],
                     "Basic " + TOKEN.decode(), TOKEN.decode(), "Bearer  " + "é" * 5):
            status, headers, body = get(server, auth=auth)
            assert status == 401 and path.read_bytes()[:8] not in body, auth
            assert headers["WWW-Authenticate"].startswith("Bearer")
        assert get(server, "/metrics")[0] == 401          # no path is told apart unasked
        assert get(server, "/metrics", right)[0] == 404
        assert get(server, "/sketch?x=1", right)[0] == 200
        path.unlink()
        assert get(server, auth=right)[0] == 503            # no sketch written yet
    text = caplog.text
    assert TOKEN.decode() not in text and TOKEN.decode()[:-1] not in text
    refusals = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 1         # at most one line a minute, with the count


def test_a_rotated_token_applies_from_the_next_request(
        tmp_path: Path, start: Callable[..., SketchServer],
        caplog: pytest.LogCaptureFixture) -> None:
    path = sketch_file(tmp_path)
    server = start(path)
    token_file = server.tokens.path
    newer = b"n3w-t0ken-for-tests-only-98765"
    old, new = "Bearer " + TOKEN.decode(), "Bearer " + newer.decode()
    assert get(server, auth=old)[0] == 200 and get(server, auth=new)[0] == 401
    with caplog.at_level(logging.INFO, "vmshare"):
        # rotated as an operator would: a new private file renamed over the old
        os.rename(private(tmp_path / "token.new", newer + b"\n"), token_file)
        assert get(server, auth=new)[0] == 200
        assert get(server, auth=old)[0] == 401
        assert "changed; its token applies from now" in caplog.text
        # rewritten in place with a bad token: every request refused until mended
        token_file.write_bytes(b"short")
        assert get(server, auth=new)[0] == 401 and get(server, auth=old)[0] == 401
        assert "at least 16" in caplog.text and "refuses every request" in caplog.text
        private(token_file, TOKEN, 0o644)                # mended, but others may read it
        assert get(server, auth=old)[0] == 401
        os.chmod(token_file, 0o600)
        assert get(server, auth=old)[0] == 200
        token_file.unlink()                              # gone: refused, not the last token
        assert get(server, auth=old)[0] == 401
        assert "cannot open the sketch token" in caplog.text
    assert TOKEN.decode() not in caplog.text and newer.decode() not in caplog.text


def test_connections_are_bounded(tmp_path: Path, start: Callable[..., SketchServer]) -> None:
    server = start(sketch_file(tmp_path), max_clients=2, request_deadline=2.0)
    host, port = server.server_address[:2]
    idle = [socket.create_connection((str(host), int(port)), timeout=5) for _ in range(2)]
    try:
        wait_until(lambda: len(server._pending) == 2)   # both accepted: the cap is reached
        assert get(server, auth="Bearer " + TOKEN.decode())[0] == 503   # the cap
        for s in idle:                     # silent clients are cut off at the deadline
            assert s.recv(1) == b""
        # their slots come back once their threads end
        wait_until(lambda: get(server, auth="Bearer " + TOKEN.decode())[0] == 200)
    finally:
        for s in idle:
            s.close()


def wait_until(ok: Callable[[], bool], timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not ok():
        assert time.monotonic() < end, "condition not reached in time"
        time.sleep(0.02)


def config(tmp_path: Path, **kw: object) -> Config:
    sk = replace(SketchSettings(dir=tmp_path / "sketches"), **kw)   # type: ignore[arg-type]
    return Config(path=tmp_path / "vmshare.toml", sketch=sk)


def test_endpoint_settings_are_checked_before_the_daemon_starts(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert endpoint_token(config(tmp_path)) is None                     # off by default
    good = private(tmp_path / "token", TOKEN + b"\n")
    assert endpoint_token(config(tmp_path, listen="127.0.0.1:0", token_file=good)) == TOKEN
    cases: list[tuple[dict[str, object], str]] = [
        ({"token_file": tmp_path / "none"}, "cannot open the sketch token"),
        ({"token_file": private(tmp_path / "open", TOKEN, 0o644)}, "readable or owned by others"),
        ({"token_file": private(tmp_path / "short", b"abc")}, "at least 16"),
        ({"token_file": tmp_path}, "must be a regular file"),
        ({"token_file": good, "listen": "nowhere"}, "[sketch] listen: --listen wants")]
    for kw, what in cases:
        cfg = config(tmp_path, **{"listen": "127.0.0.1:0", **kw})
        with pytest.raises(PolicyError) as err:
            endpoint_token(cfg)
        assert what in str(err.value) and "\n" not in str(err.value)
        assert TOKEN.decode() not in str(err.value)
    # the daemon itself: one error line and exit status 1, before any libvirt
    capsys.readouterr()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        code = run_daemon(config(tmp_path, listen="127.0.0.1:0",
                                 token_file=tmp_path / "open"), uri="test:///nowhere")
    finally:                       # run_daemon set up its own logging: put pytest's back
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in saved[0]:
            root.addHandler(h)
        root.setLevel(saved[1])
    logged = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(logged) == 1, logged
    assert logged[0].endswith(f"ERROR vmshare.daemon: {tmp_path / 'vmshare.toml'}: [sketch] "
                           f"token_file: {tmp_path / 'open'}: the sketch token is readable "
                           "or owned by others (mode 0644, uid 0); chmod 600 it")


# ------------------------------------------------------------------ the client side
def fetcher(**kw: object) -> SketchFetcher:
    return SketchFetcher(TOKEN, **kw)   # type: ignore[arg-type]


def test_fetch_decodes_as_a_file_and_every_failure_names_the_url(
        tmp_path: Path, start: Callable[..., SketchServer]) -> None:
    path = sketch_file(tmp_path)
    server = start(path)
    url = server.url
    assert encode(fetcher().fetch(url)) == path.read_bytes()
    # a proxy in the environment is not used: the token goes to the host named only
    with pytest.MonkeyPatch.context() as env:
        env.setenv("http_proxy", "http://127.0.0.1:9")
        env.setenv("no_proxy", "")
        assert encode(fetcher().fetch(url)) == path.read_bytes()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/sketch"
    silent = socket.socket()                 # accepts (the backlog) and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)
    mute = f"http://127.0.0.1:{silent.getsockname()[1]}/sketch"
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir(mode=0o700)
    bad = private(corrupt / "bad.sketch", path.read_bytes()[:-1] + b"\0")
    try:
        cases = [(fetcher(), dead, "cannot connect"),
                 (SketchFetcher(b"not-the-token-at-all"), url, "HTTP 401: refused"),
                 (fetcher(), url.replace("/sketch", "/other"), "HTTP 404: not found"),
                 (fetcher(timeout=0.5), mute, "no answer within 0.5 s"),
                 (fetcher(max_bytes=100), url, "over the 100-byte cap"),
                 (fetcher(), url.replace("http:", "https:"), "TLS failed"),
                 (fetcher(), "ftp://h/sketch", "not a sketch URL")]
        for f, u, what in cases:
            with pytest.raises(SketchError) as err:
                f.fetch(u)
            assert str(err.value).startswith(f"{u}: ") and what in str(err.value), err.value
            assert TOKEN.decode() not in str(err.value)
        bad_server = start(bad)
        with pytest.raises(SketchError, match=f"^{bad_server.url}: checksum mismatch"):
            fetcher().fetch(bad_server.url)
        path.unlink()
        with pytest.raises(SketchError, match="HTTP 503: no sketch there yet"):
            fetcher().fetch(url)
    finally:
        silent.close()
    with pytest.raises(SketchError, match="cannot load CA certificates"):
        fetcher(cafile=tmp_path / "no-ca.pem")


def test_place_reads_urls_and_directories_together(
        tmp_path: Path, start: Callable[..., SketchServer],
        capsys: pytest.CaptureFixture[str]) -> None:
    h1, _ids = host_sketch("h1", {"a1": ("H", 1, "g"), "b1": ("B", 2, "g")})
    h2, _ids = host_sketch("h2", {"a2": ("A", 3, "g"), "a3": ("A", 4, "g")})
    h3, _ids = host_sketch("h3", {"a4": ("A", 5, "other"), "b2": ("B", 6, "g")})
    key, d = write_fleet(tmp_path, {"h1": (h1, {}), "h3": (h3, {})})
    remote = tmp_path / "remote"
    write_sketch(remote / "h2.sketch", h2)
    server = start(remote / "h2.sketch")
    token = private(tmp_path / "token", TOKEN)
    new, _ids = host_sketch("", {"x": ("A", 9, "g")})
    vmfile = tmp_path / "x" / "x.sketch"
    write_sketch(vmfile, new)
    with serve(prom_answer) as prom:
        empty = private(tmp_path / "vmshare.toml",            # a token file not there
                        f'[sketch]\ntoken_file = "{tmp_path}/none"\n'.encode())
        base = ["place", str(vmfile), "--prometheus", prom, "--key-file", str(key),
                "--config", str(empty)]
        assert main([*base, "--sketches", str(d), "--sketches", server.url,
                     "--sketch-token-file", str(token), "--json"]) == 0
        doc = json.loads(capsys.readouterr().out)
        assert [h["host"] for h in doc["hosts"]] == ["h2", "h1", "h3"]   # h2 came by URL
        wrong = private(tmp_path / "wrong", b"x" * 20)
        other_key = SketchKey.from_secret(b"o" * 32)
        write_sketch(remote / "h2.sketch", replace(h2, key_id=other_key.key_id))
        for extra, what in (([], "cannot open the sketch token"),
                            (["--sketch-token-file", str(wrong)], "HTTP 401"),
                            (["--sketch-token-file", str(token)], "made with another key")):
            one_line_error(capsys, [*base, "--sketches", str(d), "--sketches", server.url,
                                    *extra], what)
        assert SECRET not in capsys.readouterr().err.encode()


def test_https_verifies_the_certificate_and_takes_a_ca_file(
        tmp_path: Path, start: Callable[..., SketchServer]) -> None:
    """A TLS proxy's place: the endpoint wrapped in TLS with a self-signed
    certificate; refused as untrusted until --sketch-ca-file names it."""
    import shutil
    import ssl
    import subprocess
    if shutil.which("openssl") is None:
        pytest.skip("no openssl command to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    path = sketch_file(tmp_path)
    server = start(path)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    server.socket = tls.wrap_socket(server.socket, server_side=True)
    url = server.url.replace("http:", "https:")
    with pytest.raises(SketchError, match=f"^{url}: TLS certificate not trusted"):
        fetcher().fetch(url)
    assert encode(fetcher(cafile=cert).fetch(url)) == path.read_bytes()
