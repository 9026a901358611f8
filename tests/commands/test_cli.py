"""The mqpolicy command as operators run it: check, explain, serve (reload, drain), counters."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mqpolicy.lab.readiness import READY_TIMEOUT_S, poll
from tests.support.async_poll import poll_async
from tests.support.lanes import RESETS_LANES
from tests.support.mqpolicy_command import mq
from tests.support.redis_fixture import RedisServer
from tests.support.serve_process import ServeProcess, free_port

ROOT = Path(__file__).resolve().parents[2]


def policy_text(port: int, rate: str = "2/1h", store: str = "memory://") -> str:
    return f"""\
listen: [127.0.0.1:{port}]
store: {{url: "{store}"}}
{RESETS_LANES}limits:
  - {{name: per-sender, rate: {rate}, key: sender, count: messages,
      message: "slow down {{key}}, retry in {{retry_after}}s"}}
  - {{name: per-domain, rate: 100/1m, key: recipient_domain, count: recipients}}
"""


def eom(i: int, sender: str = "a@example.com") -> dict[str, str]:
    return {"request": "smtpd_access_policy", "protocol_state": "END-OF-MESSAGE",
            "sender": sender, "queue_id": f"Q{i}", "recipient_count": "1",
            "client_address": "192.0.2.9"}


def test_check_ok_and_errors(tmp_path: Path) -> None:
    ok = mq("check", "-c", str(ROOT / "conf" / "mqpolicy.yaml"))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "OK: 3 lanes" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("stor: {}\nlimits:\n  - {name: x, rate: 5/fortnight, key: sender}\n")
    result = mq("check", "-c", str(bad))
    assert result.returncode == 1
    assert f"{bad}:1: stor: unknown key" in result.stdout
    assert f"{bad}:3: limits[x].rate: bad period" in result.stdout
    assert "2 error(s)" in result.stdout


def test_serve_refuses_a_broken_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("lanes: [\n")
    result = mq("serve", "-c", str(bad))
    assert result.returncode == 1
    assert "invalid policy file, nothing started" in result.stderr
    assert "YAML syntax" in result.stderr


def test_explain_shows_lane_limits_and_postfix_action(tmp_path: Path) -> None:
    config = tmp_path / "p.yaml"
    config.write_text(policy_text(free_port()))
    request = "protocol_state=RCPT\nsender=noreply@app.example\nrecipient=u@d.example\n"
    result = mq("explain", "-c", str(config), stdin=request)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "lane:    transactional (rule resets)" in out
    assert "postfix: action=FILTER mq-transactional:" in out
    assert "per-sender" in out
    assert "counted=checked" in out
    assert "per-domain" in out
    assert "counted=1 recipients" in out
    data = json.loads(mq("explain", "-c", str(config), "--json", stdin=request).stdout)
    assert data["lane"] == "transactional"
    assert {limit["name"] for limit in data["limits"]} == {"per-sender", "per-domain"}


def test_explain_says_why_a_destination_budget_does_not_apply(tmp_path: Path) -> None:
    config = tmp_path / "p.yaml"
    config.write_text(policy_text(free_port()) + """\
destinations:
  - name: slowmail
    domains: [slow.example]
    rate: 10/1m
""")

    def why_not(request: str) -> str:
        data = json.loads(mq("explain", "-c", str(config), "--json", stdin=request).stdout)
        return {entry["name"]: entry["why"]
                for entry in data["not_applied"]}["destination:slowmail"]

    assert why_not("protocol_state=RCPT\nsender=a@app.example\nrecipient=u@d.example\n"
                   ) == "destination slowmail only"
    # a recipient of the group in a lane the budget leaves out: the lanes say why
    config.write_text(config.read_text().replace("rate: 10/1m\n", "rate: 10/1m\n"
                                                 "    lanes: [normal]\n"))
    assert why_not("protocol_state=RCPT\nsender=a@app.example\nrecipient=u@slow.example\n"
                   ) == "lanes normal only"
    # at the end of the message it is spent per recipient at RCPT, wherever they go
    assert why_not("protocol_state=END-OF-MESSAGE\nsender=a@app.example\n"
                   "recipient=u@d.example\nrecipient_count=1\n"
                   ) == "recipient-keyed: spent per recipient at RCPT"


def test_explain_rejects_malformed_request(tmp_path: Path) -> None:
    config = tmp_path / "p.yaml"
    config.write_text(policy_text(free_port()))
    result = mq("explain", "-c", str(config), stdin="this is not a policy request\n")
    assert result.returncode == 2
    assert "malformed request" in result.stderr


@pytest.fixture
def served(tmp_path: Path) -> Iterator[ServeProcess]:
    port = free_port()
    config = tmp_path / "p.yaml"
    config.write_text(policy_text(port))
    proc = ServeProcess(config, port, tmp_path / "serve.log")
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.mark.e2e
def test_serve_decides_and_logs(served: ServeProcess) -> None:
    assert served.ask(eom(1)) == "DUNNO"
    assert served.ask(eom(2)) == "DUNNO"
    assert served.ask(eom(3)) == "450 4.7.1 slow down a@example.com, retry in 1800s"
    served.wait_logged("action=defer")
    line = next(ln for ln in served.log_text().splitlines() if "action=defer" in ln)
    assert "qid=Q3" in line
    assert "by=per-sender" in line
    assert "limits=per-sender:defer:a@example.com" in line


@pytest.mark.e2e
def test_sighup_reload_applies_good_file_and_keeps_old_on_bad(served: ServeProcess) -> None:
    assert served.ask(eom(1, "b@example.com")) == "DUNNO"
    assert served.ask(eom(2, "b@example.com")) == "DUNNO"
    assert served.ask(eom(3, "b@example.com")).startswith("450 4.7.1")
    # a broken file: the running policy stays
    good = served.config.read_text()
    served.config.write_text(good + "limits: oops\n")
    served.signal(signal.SIGHUP)
    served.wait_logged("reload refused")
    assert served.ask(eom(4, "b@example.com")).startswith("450 4.7.1")
    # a good file with a new limit takes effect without a restart
    served.config.write_text(good.replace("rate: 2/1h", "rate: 1000/1h"))
    served.signal(signal.SIGHUP)
    served.wait_logged("policy reloaded")
    assert served.ask(eom(5, "b@example.com")) == "DUNNO"


@pytest.mark.e2e
def test_sighup_of_an_unchanged_file_warns_of_nothing(tmp_path: Path) -> None:
    """A scheduler section with a schedule.allow condition: reloading the same file is not a
    changed setting (no "needs a restart" warning)."""
    port = free_port()
    config = tmp_path / "p.yaml"
    # the scheduler runs inside serve (memory store) against a Postfix config directory
    # that does not exist: it fails its passes, which this test does not look at
    config.write_text(policy_text(port) + f"""\
scheduler:
  postfix_config_dir: {tmp_path / "no-postfix"}
  interval: 1h
  schedule: {{allow: {{sasl_username: [app]}}, max_delay: 1d}}
""")
    proc = ServeProcess(config, port, tmp_path / "serve.log")
    proc.start()
    try:
        proc.wait_logged("msg=ready")  # SIGHUP is handled from then on
        proc.signal(signal.SIGHUP)
        proc.wait_logged("policy reloaded")
        assert "needs a restart" not in proc.log_text()
        # a setting that does need one is still named
        config.write_text(config.read_text().replace("no-postfix", "other-postfix")
                          .replace('url: "memory://"', 'url: "memory://", timeout_ms: 80'))
        proc.signal(signal.SIGHUP)
        proc.wait_logged("policy reloaded", count=2)
        warned = [line for line in proc.log_text().splitlines() if "needs a restart" in line]
        assert [line.split("setting=")[1].split()[0] for line in warned] == ["store",
                                                                            "scheduler"]
    finally:
        proc.stop()


@pytest.mark.e2e
def test_make_run_serves_the_example_where_postfix_has_no_mqpolicy_directory(
    tmp_path: Path,
) -> None:
    """``make run`` serves conf/mqpolicy.yaml from a checkout, where the unix socket
    directory of a production setup (/var/spool/postfix/mqpolicy) need not exist: the
    example listens on loopback TCP, the policy server and the milter alike. Here on free
    ports, and its scheduler pointed away from this machine's Postfix."""
    example = (ROOT / "conf" / "mqpolicy.yaml").read_text()
    port, milter_port = free_port(), free_port()
    changes = {"127.0.0.1:10040": f"127.0.0.1:{port}",
               "inet:10041@127.0.0.1": f"inet:{milter_port}@127.0.0.1",
               "listen: 127.0.0.1:9309": f"listen: 127.0.0.1:{free_port()}",
               "postfix_config_dir: /etc/postfix":
                   f"postfix_config_dir: {tmp_path / 'no-postfix'}"}
    for old, new in changes.items():
        assert example.count(old) == 1, old
        example = example.replace(old, new)
    config = tmp_path / "mqpolicy.yaml"
    config.write_text(example)
    proc = ServeProcess(config, port, tmp_path / "serve.log")
    proc.start(("127.0.0.1", milter_port))
    try:
        assert proc.ask(eom(1)) == "DUNNO"
        proc.wait_logged("msg=ready")
        assert f"milter=inet:{milter_port}@127.0.0.1" in proc.log_text()
    finally:
        proc.stop(timeout=30)


@pytest.mark.e2e
def test_sigterm_drains_and_exits_zero(served: ServeProcess) -> None:
    assert served.ask(eom(1)) == "DUNNO"
    assert served.stop() == 0
    assert "msg=stopped" in served.log_text()


# ``mqpolicy serve`` that sends itself a signal the moment its policy port listens: the
# first moment a client that waits for the port (a test, a monitor) could send one.
SIGNAL_ON_LISTENING = """\
import os, signal, sys
from mqpolicy.delegation import server as policy_server
from mqpolicy.cli import main

listen = policy_server.PolicyServer.start


async def start(self):
    await listen(self)
    os.kill(os.getpid(), getattr(signal, sys.argv[1]))


policy_server.PolicyServer.start = start
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.e2e
@pytest.mark.parametrize(("sig", "logged"), [("SIGHUP", "policy reloaded"),
                                              ("SIGTERM", "msg=stopped")])
def test_serve_handles_its_signals_from_the_moment_it_listens(
        tmp_path: Path, sig: str, logged: str) -> None:
    """Ready means accepting: a SIGHUP then reloads and a SIGTERM drains, neither ends the
    process as the signal's default action would."""
    port = free_port()
    config = tmp_path / "p.yaml"
    config.write_text(policy_text(port))
    log = tmp_path / "serve.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", SIGNAL_ON_LISTENING, sig, "serve", "-c", str(config)],
            stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    try:
        poll(lambda: proc.poll() is not None or logged in log.read_text(), READY_TIMEOUT_S,
             f"{logged!r} logged")
        if sig == "SIGHUP":
            assert proc.poll() is None, log.read_text()
            proc.terminate()
        assert proc.wait(READY_TIMEOUT_S) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_counters_show_and_reset_on_redis(tmp_path: Path, redis_clean: RedisServer) -> None:
    config = tmp_path / "p.yaml"
    config.write_text(policy_text(free_port(), store=redis_clean.tcp_url))
    def request(i: int) -> str:
        return "\n".join(f"{k}={v}" for k, v in eom(i).items()) + "\n"

    for i in range(2):
        assert mq("explain", "-c", str(config), "--consume", stdin=request(i)).returncode == 0
    shown = mq("counters", "-c", str(config), "show", "per-sender")
    assert shown.returncode == 0, shown.stderr
    row = next(ln for ln in shown.stdout.splitlines() if "a@example.com" in ln)
    assert row.split()[2] == "0"  # remaining of a burst of 2
    third = mq("explain", "-c", str(config), "--consume", stdin=request(3))
    assert "-> defer" in third.stdout
    reset = mq("counters", "-c", str(config), "reset", "per-sender", "a@example.com")
    assert "reset 1 budget(s)" in reset.stdout
    fourth = mq("explain", "-c", str(config), "--consume", stdin=request(4))
    assert "-> ok" in fourth.stdout


@pytest.mark.e2e
def test_two_processes_share_one_port_and_one_budget(tmp_path: Path,
                                                     redis_clean: RedisServer) -> None:
    port = free_port()
    text = policy_text(port, rate="30/1h", store=redis_clean.unix_url)
    text = text.replace("store:", "server: {reuse_port: true}\nstore:")
    procs = []
    for i in range(2):
        config = tmp_path / f"p{i}.yaml"
        config.write_text(text)
        procs.append(ServeProcess(config, port, tmp_path / f"serve{i}.log"))
    try:
        for proc in procs:
            proc.start()
            proc.wait_logged("msg=ready")  # a connect alone may reach the other process
        replies = [procs[0].ask(eom(i)) for i in range(80)]
        assert replies.count("DUNNO") == 30
        assert sum(r.startswith("450 4.7.1") for r in replies) == 50
        for proc in procs:  # the kernel spread the connections over both processes
            proc.wait_logged("qid=Q")
    finally:
        for proc in procs:
            proc.stop()


def test_reuse_port_needs_a_shared_store(tmp_path: Path) -> None:
    config = tmp_path / "p.yaml"
    config.write_text("server: {reuse_port: true}\n")
    result = mq("check", "-c", str(config))
    assert result.returncode == 1
    assert "server.reuse_port: several processes need a shared store" in result.stdout


@pytest.mark.e2e
def test_metrics_listen_override(tmp_path: Path) -> None:
    import urllib.request

    port, metrics_port = free_port(), free_port()
    config = tmp_path / "p.yaml"
    config.write_text(policy_text(port))
    proc = ServeProcess(config, port, tmp_path / "serve.log",
                        extra_args=["--metrics-listen", f"127.0.0.1:{metrics_port}"])
    proc.start()
    try:
        assert proc.ask(eom(1)) == "DUNNO"
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
        assert 'mqpolicy_decisions_total{action="accept",lane="normal"} 1' in text
    finally:
        proc.stop()


def test_reloads_run_one_at_a_time_in_the_order_of_the_signals() -> None:
    """Two SIGHUPs in a row: the second reload starts when the first has ended (one that
    read the file earlier never lands after one that read it later)."""
    import asyncio
    import os
    import signal

    from mqpolicy.commands.reload import reload_on_hangup

    events: list[str] = []

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        count = 0
        finish = asyncio.Event()  # each reload runs until the test lets it end

        async def reload() -> None:
            nonlocal count
            count += 1
            mine = count
            events.append(f"start {mine}")
            await finish.wait()  # reading the file, say
            events.append(f"end {mine}")

        reload_on_hangup(loop, reload)
        try:
            os.kill(os.getpid(), signal.SIGHUP)
            await poll_async(lambda: events == ["start 1"], "the first reload under way")
            tasks = len(asyncio.all_tasks())
            os.kill(os.getpid(), signal.SIGHUP)
            # the second SIGHUP handled (its reload task exists) while the first runs
            await poll_async(lambda: len(asyncio.all_tasks()) > tasks, "the second SIGHUP handled")
            for _ in range(10):
                await asyncio.sleep(0)  # turns of the loop in which it could wrongly start
            assert events == ["start 1"]
            finish.set()
            await poll_async(lambda: len(events) == 4, "both reloads done")
        finally:
            loop.remove_signal_handler(signal.SIGHUP)

    asyncio.run(scenario())
    assert events == ["start 1", "end 1", "start 2", "end 2"]
