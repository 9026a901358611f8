"""Two real ``mqpolicy serve`` processes sharing one real redis-server enforce one budget.

2 x 100 clients connect at once (100 to each server) and send one END-OF-MESSAGE request
each, all from the same sender, against a budget of 50 messages: exactly 50 are accepted
in all, whichever server each went through, and Redis holds exactly 50 once keys. The
store deadline is generous (20 s: only a broken store misses it, however loaded the machine)
and ``on_store_error`` is ``defer``, so a slow store could only lower the count, never
raise it.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import pytest

from mqpolicy.delegation.codec import encode_request
from tests.support.redis_fixture import RedisServer
from tests.support.serve_process import ServeProcess, free_port

pytestmark = pytest.mark.e2e

CLIENTS_PER_SERVER = 100
BUDGET = 50

POLICY = """\
listen:
  - 127.0.0.1:{port}
store:
  url: "{url}"
  timeout_ms: 20000
  on_store_error: defer
log: {{format: kv, level: warning}}
lanes:
  - {{name: normal}}
default_lane: normal
limits:
  - name: shared
    rate: {budget}/1h
    burst: {budget}
    key: sender
    count: messages
    action: defer
"""


def request(n: int) -> dict[str, str]:
    return {
        "request": "smtpd_access_policy",
        "protocol_state": "END-OF-MESSAGE",
        "protocol_name": "ESMTP",
        "sender": "campaign@example.com",
        "recipient": f"user{n}@example.net",
        "recipient_count": "1",
        "client_address": "192.0.2.10",
        "queue_id": f"Q{n:05d}",
        "instance": f"i.{n}",
        "size": "1000",
    }


async def one_client_per_request(ports: list[int]) -> list[tuple[int, str]]:
    """Connect every client first (alternating servers), then send all requests at once;
    (port, action) for each."""
    connections = []
    for _ in range(CLIENTS_PER_SERVER):
        for port in ports:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            connections.append((port, reader, writer))

    async def ask(n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> str:
        writer.write(encode_request(request(n)))
        await writer.drain()
        reply = await asyncio.wait_for(reader.readuntil(b"\n\n"), 60)
        return reply.decode()[len("action="):-2]

    try:
        actions = await asyncio.gather(
            *(ask(n, reader, writer) for n, (_, reader, writer) in enumerate(connections))
        )
    finally:
        for _, _, writer in connections:
            writer.close()
    return [(port, action) for (port, _, _), action in zip(connections, actions, strict=True)]


def test_two_servers_share_one_budget(redis_clean: RedisServer, tmp_path: Path) -> None:
    servers = []
    for name in ("a", "b"):
        port = free_port()
        config = tmp_path / f"{name}.yaml"
        config.write_text(POLICY.format(port=port, url=redis_clean.unix_url, budget=BUDGET))
        servers.append(ServeProcess(config, port, tmp_path / f"{name}.log"))
    try:
        for server in servers:
            server.start()
        answers = asyncio.run(one_client_per_request([s.port for s in servers]))
    finally:
        codes = [server.stop() for server in servers]
    assert codes == [0, 0], [server.log_text()[-2000:] for server in servers]

    assert len(answers) == 2 * CLIENTS_PER_SERVER
    assert Counter(port for port, _ in answers) == {s.port: CLIENTS_PER_SERVER for s in servers}
    accepted = [port for port, action in answers if action == "DUNNO"]
    deferred = [action for _, action in answers if action.startswith("450 4.7.1 ")]
    assert len(accepted) == BUDGET, Counter(action.split(" ")[0] for _, action in answers)
    assert len(deferred) == 2 * CLIENTS_PER_SERVER - BUDGET
    with redis_clean.client() as client:
        assert len(client.keys("mqpolicy:seen:*")) == BUDGET
        (bucket,) = client.keys("mqpolicy:rl:shared:*")
        assert bucket.endswith(b":campaign@example.com")
    print(
        f"\nshared budget: {len(accepted)} of {len(answers)} accepted "
        f"({Counter(accepted)[servers[0].port]} via one server, "
        f"{Counter(accepted)[servers[1].port]} via the other)"
    )
