"""The Prometheus API client and `vmshare fleet` on a scripted Prometheus: replies
checked, hosts judged, bad input answered in one line."""

from __future__ import annotations

import json
import socket
import threading

import pytest

from tests.fakes.prometheus import FakeTransport, ScriptedPrometheus, matrix, serve, vector
from vmshare.cli.main import main
from vmshare.errors import PrometheusError, UsageError
from vmshare.fleet.history import fleet_history
from vmshare.fleet.status import Prices, fleet_status, selector
from vmshare.promapi.client import PromClient, UrllibTransport


def client(rules: dict[str, bytes], default: bytes | None = None) -> tuple[PromClient,
                                                                           ScriptedPrometheus]:
    prom = ScriptedPrometheus(rules, default)
    return PromClient("http://prom:9090", transport=FakeTransport(prom.answer)), prom


# ---------------------------------------------------------------- the client
@pytest.mark.parametrize(("body", "ctype", "message"), [
    (b"<html>Grafana</html>", "text/html", "not a Prometheus API reply .*text/html"),
    (b'{"status": "weird"}', "application/json", "not a Prometheus API reply"),
    (b'{"status": "success", "data": {}}', "application/json", "without data.result"),
    (b'{"status": "error", "errorType": "bad_data", "error": "parse error at char 3"}',
     "application/json", r"query refused \(bad_data\): parse error"),
    (b'{"status": "success", "data": {"resultType": "vector", "result": [{"metric": 1}]}}',
     "application/json", "malformed series"),
    (b'{"status": "success", "data": {"resultType": "vector", "result": '
     b'[{"metric": {}, "value": ["x", "1"]}]}}', "application/json", "malformed sample"),
    (b'{"status": "success", "data": {"resultType": "matrix", "result": []}}',
     "application/json", "gave a matrix, not a vector"),
    (b"[" * 100000, "application/json", "not a Prometheus API reply"),
    (b'{"status": "success", "data": {"resultType": "vector", "result": NaN}}',
     "application/json", "not a Prometheus API reply"),
])
def test_replies_that_are_not_prometheus_are_refused(body: bytes, ctype: str,
                                                     message: str) -> None:
    c = PromClient("http://p:9090", transport=FakeTransport(lambda p, q: (200, ctype, body)))
    with pytest.raises(PrometheusError, match=message):
        c.query("up")


def test_non_finite_values_are_dropped_and_counted() -> None:
    c, _ = client({"up": vector(({"instance": "a"}, 1), ({"instance": "b"}, "NaN"),
                                ({"instance": "c"}, "+Inf"))})
    samples = c.query("up")
    assert [s.labels["instance"] for s in samples] == ["a"]
    assert c.dropped == 2


def test_range_query_parses_points_and_checks_its_range() -> None:
    c, prom = client({"x": matrix(({"instance": "a"}, [(10.0, 1.0), (20.0, 2.5)]))})
    series = c.query_range("x", 0, 100, 10)
    assert series[0].points == ((10.0, 1.0), (20.0, 2.5))
    assert prom.asked[-1]["step"] == "10" and prom.asked[-1]["path"] == "/api/v1/query_range"
    with pytest.raises(UsageError):
        c.query_range("x", 100, 0, 10)
    with pytest.raises(UsageError):
        c.query_range("x", 0, 10**9, 1)


@pytest.mark.parametrize("url", ["", "prom:9090", "ftp://prom", "http://", "file:///etc"])
def test_bad_urls_are_usage_errors(url: str) -> None:
    with pytest.raises(UsageError, match="not a Prometheus URL"):
        PromClient(url)


@pytest.mark.parametrize("timeout", [0, -1, float("nan"), float("inf"), 1e308])
def test_bad_timeouts_are_usage_errors(timeout: float) -> None:
    with pytest.raises(UsageError, match="timeout"):
        PromClient("http://p:9090", timeout=timeout)


def test_a_server_that_never_answers_times_out() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    accepted: list[socket.socket] = []
    t = threading.Thread(target=lambda: accepted.append(listener.accept()[0]), daemon=True)
    t.start()
    try:
        c = PromClient(f"http://127.0.0.1:{listener.getsockname()[1]}", timeout=0.5,
                       transport=UrllibTransport())
        with pytest.raises(PrometheusError, match=r"no answer within 0.5 s"):
            c.query("up")
    finally:
        for s in accepted:
            s.close()
        listener.close()


def test_a_closed_port_cannot_connect() -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(PrometheusError, match="cannot connect"):
        PromClient(f"http://127.0.0.1:{port}", timeout=2).query("up")


# ---------------------------------------------------------------- fleet status
def fleet_rules() -> dict[str, bytes]:
    a, b, c = ({"instance": "a:9731", "job": "vmshare"}, {"instance": "b:9731", "job": "vmshare"},
               {"instance": "c:9731", "job": "vmshare"})
    return {
        "up{": vector((a, 1), (b, 1), (c, 0)),
        "time() - timestamp": vector((a, 3), (b, 900)),
        "vmshare_ksm_available": vector((a, 1), (b, 1)),
        "vmshare_ksm_knob_run": vector((a, 1), (b, 0)),
        "vmshare_ksm_saved_bytes": vector((a, 262144 * 4096), (b, 0)),
        "rate(vmshare_ksmd_cpu_seconds_total": vector((a, 0.05), (b, 0.5)),
        "vmshare_vm_mergeable": vector(({**b, "domain": "db-2"}, 0)),
        "count by (instance) (vmshare_vm_saved_bytes": vector((a, 2), (b, 1)),
        "sum by (instance) (vmshare_vm_saved_bytes": vector((a, 1e9), (b, 0)),
        "topk(1,": vector(({**a, "domain": "web-1", "trust_group": "red"}, 6e8)),
        "topk(": vector(({**a, "domain": "web-2", "trust_group": "red"}, 4e8),
                        ({**a, "domain": "web-1", "trust_group": "red"}, 6e8),
                        ({**b, "domain": "db-2", "trust_group": "blue"}, 0)),
    }


def test_fleet_status_judges_each_host() -> None:
    c, prom = client(fleet_rules())
    st = fleet_status(c, stale_after=300, top=2, prices=Prices(0.00001, 0.005))
    hosts = {h.instance: h for h in st.hosts}
    assert [h.instance for h in st.hosts] == ["a:9731", "b:9731", "c:9731"]
    a, b, cc = hosts["a:9731"], hosts["b:9731"], hosts["c:9731"]
    assert a.saved_bytes == 262144 * 4096 and a.ksm == "running" and a.flags == []
    assert a.vm_count == 2
    assert b.ksm == "off"
    assert "KSM off" in b.flags and any(f.startswith("stale (900 s") for f in b.flags)
    assert any("ksmd costs more than it saves" in f for f in b.flags)
    assert any("differs from policy: db-2" in f for f in b.flags)
    assert cc.flags == ["exporter down"] and cc.ksm == "unknown"
    assert [v.domain for v in st.top] == ["web-1", "web-2"]
    assert st.total_saved_bytes == 262144 * 4096
    assert all('job="vmshare"' in q["query"] for q in prom.asked)
    # the server aggregates: no query asks for every VM's series
    vm_queries = [q["query"] for q in prom.asked if "vmshare_vm_saved_bytes" in q["query"]]
    assert vm_queries and all(q.startswith(("count by", "topk(2,")) for q in vm_queries)


def test_at_evaluates_every_query_then() -> None:
    c, prom = client(fleet_rules())
    fleet_status(c, at=1_800_000_000.5)
    assert prom.asked and all(q.get("time") == "1800000000.500" for q in prom.asked)
    fleet_status(c)
    assert "time" not in prom.asked[-1]


def test_age_counts_the_exporters_own_snapshot_age() -> None:
    c, prom = client(fleet_rules())
    fleet_status(c)
    age = [q["query"] for q in prom.asked if "timestamp(" in q["query"]]
    assert age == ['time() - timestamp(vmshare_snapshot_age_seconds{job="vmshare"}) '
                   '+ vmshare_snapshot_age_seconds{job="vmshare"}']


def test_a_trust_group_scopes_the_vm_figures() -> None:
    c, prom = client(fleet_rules())
    st = fleet_status(c, trust_group="red")
    assert any('trust_group="red"' in q["query"] for q in prom.asked
               if "vmshare_vm_saved_bytes" in q["query"])
    # per group, a host's saving is its VMs' shares (the fake ignores the matcher)
    assert {h.instance: h.saved_bytes for h in st.hosts}["a:9731"] == 1e9


@pytest.mark.parametrize("group", ['red"} or vector(1) #', "a\nb", "", "x" * 200])
def test_label_values_cannot_inject_promql(group: str) -> None:
    with pytest.raises(UsageError, match="bad trust group"):
        selector("vmshare", group or '"')


def test_an_empty_prometheus_says_no_exporter_was_found() -> None:
    c, _ = client({})
    st = fleet_status(c)
    assert st.hosts == [] and "no vmshare exporter found" in st.notes[0]


def test_fleet_history_sums_hosts_per_step() -> None:
    c, _ = client({"vmshare_ksm_saved_bytes": matrix(({"instance": "a"}, [(100, 1.0), (200, 3.0)]),
                                          ({"instance": "b"}, [(100, 2.0)]))})
    h = fleet_history(c, 3600, now=1000.0, points=60)
    assert h.step == 60 and h.start == 1000.0 - 3600
    assert h.total == ((100.0, 3.0), (200.0, 3.0))
    assert [x.instance for x in h.hosts] == ["a", "b"]
    with pytest.raises(UsageError):
        fleet_history(c, 0)


# ---------------------------------------------------------------- the CLI
def test_cli_fleet_status_text_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    prom = ScriptedPrometheus(fleet_rules())
    with serve(prom.answer) as url:
        assert main(["fleet", "status", "--prometheus", url, "--top", "1"]) == 0
        text = capsys.readouterr().out
        assert main(["fleet", "status", "--prometheus", url, "--json"]) == 0
        doc = json.loads(capsys.readouterr().out)
    assert "3 hosts, 3 VMs, 1.00 GiB saved" in text
    assert "exporter down" in text and "web-1" in text and "web-2" not in text
    assert doc["hosts"][0]["instance"] == "a:9731"
    assert doc["hosts"][2]["flags"] == ["exporter down"]


def test_cli_fleet_top_and_at(capsys: pytest.CaptureFixture[str]) -> None:
    prom = ScriptedPrometheus(fleet_rules())
    with serve(prom.answer) as url:
        assert main(["fleet", "top", "--prometheus", url, "--top", "3",
                     "--at", "2026-12-06T12:00:00Z"]) == 0
        text = capsys.readouterr().out
        assert main(["fleet", "top", "--prometheus", url, "--top", "1", "--json"]) == 0
        doc = json.loads(capsys.readouterr().out)
        assert main(["fleet", "top", "--prometheus", url, "--at", "yesterday"]) == 2
        err = capsys.readouterr().err
    lines = text.splitlines()
    assert lines[0].startswith("TOP SHARER") and [ln.split()[0] for ln in lines[1:]] == [
        "web-1", "web-2", "db-2"]
    assert prom.asked[0]["query"] == 'topk(3, vmshare_vm_saved_bytes{job="vmshare"})'
    assert prom.asked[0]["time"] == "1796558400.000"
    assert [v["domain"] for v in doc] == ["web-1"]
    assert "--at wants Unix seconds or an ISO 8601 time" in err and err.count("\n") == 1


def test_cli_history(capsys: pytest.CaptureFixture[str]) -> None:
    prom = ScriptedPrometheus({"vmshare_ksm_saved_bytes": matrix(({"instance": "a"}, [(1, 4096.0),
                                                                           (2, 8192.0)]))})
    with serve(prom.answer) as url:
        assert main(["fleet", "history", "--prometheus", url, "--since", "2h"]) == 0
    out = capsys.readouterr().out
    assert "fleet" in out and "a " in out


@pytest.mark.parametrize(("argv", "message"), [
    (["--prometheus", "http://127.0.0.1:1"], "cannot connect"),
    (["--prometheus", "not-a-url"], "not a Prometheus URL"),
    (["--prometheus", "http://p:9090", "--cpu-price", "nan"], "price must be finite"),
    (["--prometheus", "http://p:9090", "--trust-group", "a\"b"], "bad trust group"),
])
def test_cli_bad_input_is_one_line(argv: list[str], message: str,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fleet", "status", *argv]) != 0
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cli_html_answer_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with serve(lambda p, q: (200, "text/html", b"<html>hi</html>")) as url:
        assert main(["fleet", "status", "--prometheus", url]) == 1
    err = capsys.readouterr().err
    assert "not a Prometheus API reply" in err and len(err.strip().splitlines()) == 1
