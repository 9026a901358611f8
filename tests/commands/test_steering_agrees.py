"""``explain``, ``counters``, ``destinations``, the metrics and ``top`` agree with the running
server: one destination backed off by the server's own feedback (a 421 line in the mail log
it follows), another paused by command. On the memory:// store (the commands ask the server)
and on Redis (the commands read the store).

Expected numbers come from the README and docs/destinations.md: at factor 0.5 a destination
gets half its rate and half its burst; paused mail is held, and spends nothing."""

from __future__ import annotations

import contextlib
import json
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from mqpolicy.lab.readiness import poll
from tests.support.mqpolicy_command import mq
from tests.support.redis_fixture import RedisServer
from tests.support.serve_process import ServeProcess, free_port

pytestmark = pytest.mark.e2e

YAHOO_421 = (
    "Nov 27 20:52:09 mta postfix/smtp[369]: C084820C4AB: to=<x@yahoo.test>, "
    "relay=mta5.am0.yahoodns.test[192.0.2.26]:25, delay=0.3, delays=0.01/0/0.2/0.1, "
    "dsn=4.7.0, status=deferred (host mta5.am0.yahoodns.test[192.0.2.26] said: 421 4.7.0 "
    "[TSS04] Messages from 192.0.2.1 temporarily deferred due to user complaints "
    "(in reply to MAIL FROM command))\n"
)


class Served:
    def __init__(self, process: ServeProcess, metrics_port: int) -> None:
        self.process = process
        self.metrics_port = metrics_port

    def mq(self, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        command, *rest = args
        done = mq(command, "-c", str(self.process.config), *rest, stdin=stdin)
        assert done.returncode == 0, done.stderr
        return done

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as answer:
            text: str = answer.read().decode()
        return text

    def rcpt(self, recipient: str, instance: str) -> str:
        return self.process.ask({"request": "smtpd_access_policy", "protocol_state": "RCPT",
                                 "sender": "a@shop.example", "recipient": recipient,
                                 "instance": instance, "client_address": "192.0.2.9"})


@contextlib.contextmanager
def serving(tmp_path: Path, sock_dir: Path, store: str) -> Iterator[Served]:
    port, metrics_port = free_port(), free_port()
    maillog = tmp_path / "maillog"
    maillog.write_text("")
    config = tmp_path / "p.yaml"
    config.write_text(f"""\
listen: [127.0.0.1:{port}]
store: {{url: "{store}", key_prefix: "agree:"}}
log: {{format: kv, level: info}}
admin: {{listen: "unix:{sock_dir / 'agree.sock'}"}}
metrics: {{listen: 127.0.0.1:{metrics_port}}}
lanes: [{{name: normal}}, {{name: bulk}}]
default_lane: normal
destinations:
  - {{name: yahoo, domains: [yahoo.test], rate: 4/1h, burst: 4, action: defer}}
  - {{name: google, domains: [gmail.test], rate: 100/1m}}
feedback:
  log: {maillog}
  poll_interval: 100ms
  backoff: {{decrease: 0.5, cooldown: 0s}}
""")
    process = ServeProcess(config, port, tmp_path / "serve.log")
    process.start(str(sock_dir / "agree.sock"))
    try:
        served = Served(process, metrics_port)
        process.wait_logged("following the delivery log")
        with maillog.open("a") as log:
            log.write(YAHOO_421)
        process.wait_logged("destination backed off")
        served.mq("pause", "destination", "google", "--reason", "4.7.28")
        poll(lambda: 'mqpolicy_destination_paused{destination="google"} 1' in served.metrics(),
             30, "the pause in force")
        yield served
    finally:
        process.stop()


@pytest.fixture(params=["memory", "redis"])
def served(request: pytest.FixtureRequest, tmp_path: Path,
           sock_dir: Path) -> Iterator[Served]:
    if request.param == "memory":
        store = "memory://"
    else:
        server: RedisServer = request.getfixturevalue("redis_clean")
        store = server.tcp_url
    with serving(tmp_path, sock_dir, store) as served:
        yield served


def explain(served: Served, recipient: str) -> dict[str, object]:
    text = ("protocol_state=RCPT\nsender=a@shop.example\nclient_address=192.0.2.9\n"
            f"recipient={recipient}\n")
    result: dict[str, object] = json.loads(served.mq("explain", "--json", stdin=text).stdout)
    return result


def test_every_view_says_what_the_server_does(served: Served) -> None:
    # explain (spending nothing): the budget left is the halved burst, 2 of 4
    seen = explain(served, "u@yahoo.test")
    assert seen["action"] == "accept"
    (yahoo,) = seen["limits"]  # type: ignore[misc]
    assert (yahoo["name"], yahoo["remaining"]) == ("destination:yahoo", 2)
    # the server: 2 of 4 recipients, then the destination defers
    answers = [served.rcpt(f"u{i}@yahoo.test", f"in{i}") for i in range(4)]
    assert answers[:2] == ["DUNNO", "DUNNO"]
    assert [a[:3] for a in answers[2:]] == ["450", "450"]
    # counters: the halved burst, spent
    rows = served.mq("counters", "show", "destination:yahoo").stdout.splitlines()[1:]
    assert [r.split()[1:4] for r in rows] == [["yahoo", "0", "2"]]
    # explain of the paused destination: held, by the pause, its budget untouched
    seen = explain(served, "u@gmail.test")
    assert (seen["action"], seen["decided_by"]) == ("hold", "paused: destination google "
                                                             "(4.7.28)")
    assert served.rcpt("v@gmail.test", "in9") == "DUNNO"  # a hold at RCPT: accepted
    # destinations
    listed = json.loads(served.mq("destinations", "--json").stdout)["destinations"]
    by_name = {d["name"]: d for d in listed}
    assert (by_name["yahoo"]["factor"], by_name["yahoo"]["effective_burst"],
            by_name["yahoo"]["paused"]) == (0.5, 2, False)
    assert "[TSS04]" in by_name["yahoo"]["evidence"]
    assert (by_name["google"]["factor"], by_name["google"]["paused"],
            by_name["google"]["pause_reason"]) == (1.0, True, "4.7.28")
    # metrics
    metrics = served.metrics()
    for line in ['mqpolicy_destination_backoff_factor{destination="yahoo"} 0.5',
                 'mqpolicy_destination_backoff_factor{destination="google"} 1',
                 'mqpolicy_destination_paused{destination="google"} 1',
                 'mqpolicy_destination_paused{destination="yahoo"} 0',
                 'mqpolicy_lane_paused{lane="bulk"} 0',
                 "mqpolicy_destinations_in_backoff 1"]:
        assert line in metrics
    # top
    screen = served.mq("top", "--once").stdout
    assert "DESTINATIONS IN BACKOFF 1" in screen
    assert "PAUSED destinations: google" in screen
    served.mq("pause", "lane", "bulk")
    poll(lambda: "PAUSED destinations: google | lanes: bulk" in served.mq("top", "--once").stdout,
         30, "top to show the paused lane")
