"""Policy file validation: every error names its file and line; good files load frozen."""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import pytest

from mqpolicy.policy.loader import ConfigError, load_policy, parse_policy
from mqpolicy.policy.model import ActionKind, Count, RcptLimits, StoreErrorMode
from mqpolicy.policy.request import Request
from mqpolicy.store.urls import check_store_url

LANES = """\
lanes:
  - name: fast
    transport: mq-fast
  - name: normal
  - name: bulk
    transport: mq-bulk
    rate_delay: 2s
default_lane: normal
"""


def errors_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_policy(textwrap.dedent(text), "p.yaml", check_store_url)
    return [str(issue) for issue in info.value.issues]


def test_example_policy_loads() -> None:
    policy = load_policy(Path(__file__).resolve().parents[2] / "conf" / "mqpolicy.yaml", check_store_url)
    assert [lane.name for lane in policy.lanes] == ["transactional", "normal", "bulk"]
    assert policy.default_lane == "normal"
    assert {limit.name for limit in policy.limits} >= {"per-user", "per-sender"}
    per_sender = next(limit for limit in policy.limits if limit.name == "per-sender")
    assert per_sender.action is ActionKind.DEMOTE and per_sender.demote_to == "bulk"
    assert per_sender.burst == per_sender.rate.count == 100
    # what a newsletter needs on day one: a milter beside the policy server, a rule on
    # the headers, and a scheduler for what is held
    assert policy.milter is not None
    assert policy.milter.rcpt_limits is RcptLimits.POLICY_SERVER
    headers = [rule for rule in policy.classify if rule.needs_headers]
    assert [rule.lane for rule in headers] == ["bulk"]
    assert headers[0].when(Request(headers=(("List-Id", "<news.example.com>"),)))
    assert policy.scheduler is not None


def test_an_empty_mapping_gives_defaults() -> None:
    policy = parse_policy("{}", "defaults.yaml")
    assert policy.store.url == "memory://"
    assert policy.store.timeout_ms == 50
    assert policy.store.on_store_error is StoreErrorMode.ACCEPT
    assert [lane.name for lane in policy.lanes] == ["normal"]
    assert str(policy.listen[0]) == "127.0.0.1:10040"


def test_policy_is_frozen() -> None:
    policy = parse_policy(LANES)
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.default_lane = "bulk"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("stor: {}\n", "p.yaml:1: stor: unknown key (did you mean 'store'?)"),
        ("listen: [127.0.0.1:70000]\n", "p.yaml:1: listen[0]: port out of range"),
        ("listen:\n  - unix:relative.sock\n", "p.yaml:2: listen[0]: unix socket path must be"),
        ("store:\n  url: mysql://x\n", "p.yaml:2: store.url: store 'mysql://x': unknown store"),
        ("store:\n  timeout_ms: -5\n", "p.yaml:2: store.timeout_ms: expected a positive"),
        ("store:\n  on_store_error: panic\n", "p.yaml:2: store.on_store_error: expected accept"),
        ("server:\n  idle_timeout: soon\n", "p.yaml:2: server.idle_timeout: not a duration"),
        ("server:\n  idle_timeout: 0s\n", "p.yaml:2: server.idle_timeout: expected a positive"),
        ("log:\n  format: xml\n", "p.yaml:2: log.format: expected kv or json"),
        ("lanes:\n  - name: a\n    concurency: 2\n", "p.yaml:3: lanes[0].concurency: unknown key"),
        ("lanes:\n  - name: a\n  - name: a\n", "p.yaml:3: lanes[1].name: duplicate lane 'a'"),
        ("lanes:\n  - name: a\n    transport: 'b c'\n", "p.yaml:3: lanes[0].transport: bad"),
        ("lanes: []\n", "p.yaml:1: lanes: at least one lane"),
        ("key: [unclosed\n", "p.yaml:2: YAML syntax"),
        ("a: 1\na: 2\n", "p.yaml:2: YAML syntax: duplicate key 'a'"),
    ],
)
def test_top_level_errors(body: str, expected: str) -> None:
    messages = errors_of(body)
    assert any(m.startswith(expected) for m in messages), messages


@pytest.mark.parametrize(
    ("limit", "line", "expected"),
    [
        ("rate: 10/x\n    key: sender", 11, "limits[l].rate: bad period in rate '10/x'"),
        ("rate: ten/1h\n    key: sender", 11, "limits[l].rate: bad count"),
        ("rate: 0/1h\n    key: sender", 11, "limits[l].rate: rate count must be positive"),
        ("rate: 10/1h\n    key: sendr", 12, "limits[l].key: unknown key 'sendr'"),
        ("rate: 10/1h\n    key: sender/24", 12, "limits[l].key: only client_network takes"),
        ("rate: 10/1h\n    key: client_network/33", 12, "limits[l].key: bad prefix length"),
        ("rate: 10/1h\n    key: sender\n    count: msgs", 13, "limits[l].count: expected"),
        ("rate: 10/1h\n    key: sender\n    action: drop", 13, "limits[l].action: expected"),
        ("rate: 10/1h\n    key: sender\n    action: {demote: nowhere}", 13,
         "limits[l].action.demote: unknown lane 'nowhere'"),
        ("rate: 10/1h\n    key: sender\n    lanes: [fast, slow]", 13,
         "limits[l].lanes: unknown lane 'slow'"),
        ("rate: 10/1h\n    key: sender\n    message: 'wait {retry}'", 13,
         "limits[l].message: unknown placeholder(s) {retry}"),
        ("rate: 10/1h\n    key: sender\n    burst: 0", 13, "limits[l].burst: burst must be"),
        ("rate: 10/1h\n    key: sender\n    monitor: maybe", 13, "limits[l].monitor: expected"),
        ("rate: 10/1h\n    key: sender\n    colour: red", 13, "limits[l].colour: unknown key"),
        ("rate: 10/1h\n    key: sender\n    when:\n      client_address: 10.0.0.0/33", 14,
         "limits[l].when.client_address: bad address or CIDR '10.0.0.0/33'"),
        ("rate: 10/1h\n    key: sender\n    when:\n      sender: '/[x/'", 14,
         "limits[l].when.sender: bad regex"),
        ("rate: 10/1h\n    key: sender\n    except:\n      helo: x", 14,
         "limits[l].except.helo: unknown condition 'helo'"),
        ("rate: 10/1h\n    key: sender\n    when:\n      size: {min: 10XB}", 14,
         "limits[l].when.size.min: not a non-negative number"),
        ("key: sender", 10, "limits[l]: a limit needs a rate"),
    ],
)
def test_limit_errors_carry_line(limit: str, line: int, expected: str) -> None:
    text = LANES + "limits:\n  - name: l\n    " + limit + "\n"
    messages = errors_of(text)
    assert f"p.yaml:{line}: {expected}" in "\n".join(messages), messages


def test_classify_errors_carry_line() -> None:
    text = LANES + textwrap.dedent("""\
        classify:
          - when: {sender: "@x.com"}
            lane: nope
          - lane: fast
          - when:
              recipient_count: {min: 5, max: 2}
            lane: fast
        """)
    messages = errors_of(text)
    assert "p.yaml:11: classify[0].lane: unknown lane 'nope' (lanes: bulk, fast, normal)" in messages
    assert "p.yaml:12: classify[1]: a classify rule needs a when" in messages
    assert any(m.startswith("p.yaml:14: classify[2].when.recipient_count: min 5 is above max")
               for m in messages), messages


def test_every_error_is_listed_not_just_the_first() -> None:
    text = "stor: {}\nlog: {format: xml}\nlanes:\n  - name: a\n    colour: red\n"
    assert len(errors_of(text)) == 3


def test_unreadable_and_non_utf8_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_policy(tmp_path / "missing.yaml", check_store_url)
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"lanes:\n  - name: caf\xe9\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_policy(bad, check_store_url)


def test_unsafe_yaml_tags_are_refused() -> None:
    messages = errors_of("x: !!python/object/apply:os.system ['true']\n")
    assert messages and "YAML" in messages[0]


def test_limit_defaults_and_forms() -> None:
    policy = parse_policy(LANES + textwrap.dedent("""\
        store: {on_store_error: defer}
        limits:
          - name: net
            rate: 50MB/1h
            key: [client_network/16, sender_domain]
            count: bytes
            action: "demote: bulk"
        """))
    (limit,) = policy.limits
    assert limit.count is Count.BYTES
    assert limit.rate.count == 50_000_000 and limit.burst == 50_000_000
    assert limit.key_text == "client_network/16/64+sender_domain"
    assert limit.action is ActionKind.DEMOTE and limit.demote_to == "bulk"
    assert not limit.blocking
    assert limit.on_store_error is StoreErrorMode.DEFER


def test_listen_mode_and_unix_endpoint() -> None:
    policy = parse_policy('listen: ["unix:/run/x.sock", "[::1]:10041"]\nlisten_mode: "0600"\n')
    assert policy.listen[0].path == "/run/x.sock" and policy.listen[0].mode == 0o600
    assert policy.listen[1].host == "::1" and policy.listen[1].port == 10041
    unset = parse_policy('listen: ["unix:/run/x.sock"]\n')
    assert unset.listen[0].mode == 0o660
    closed = parse_policy('listen: ["unix:/run/x.sock"]\nlisten_mode: "0000"\n')
    assert closed.listen[0].mode == 0  # a mode like any other, not "unset"


def test_admin_socket() -> None:
    assert parse_policy("{}").admin is None
    admin = parse_policy('admin: {listen: "unix:/run/mqpolicy/admin.sock", mode: "0600"}\n').admin
    assert admin is not None
    assert admin.listen.path == "/run/mqpolicy/admin.sock" and admin.listen.mode == 0o600
    unset = parse_policy("admin: {listen: unix:/run/mqpolicy/admin.sock}\n").admin
    assert unset is not None and unset.listen.mode == 0o660
    closed = parse_policy('admin: {listen: unix:/run/a.sock, mode: "0000"}\n').admin
    assert closed is not None and closed.listen.mode == 0


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("admin:\n  listen: 127.0.0.1:10041\n",
         "p.yaml:2: admin.listen: the admin socket is a unix socket only (unix:/path)"),
        ("admin:\n  listen: unix:admin.sock\n",
         "p.yaml:2: admin.listen: unix socket path must be absolute"),
        ("admin:\n  listen: unix:/" + "d" * 120 + "\n",
         "p.yaml:2: admin.listen: unix socket path too long"),
        ("admin:\n  listen: 7\n", "p.yaml:2: admin.listen: expected a non-empty string"),
        ("admin:\n  mode: '0660'\n", "p.yaml:1: admin.listen: required"),
        ("admin:\n  listen: unix:/run/a.sock\n  mode: rw\n",
         "p.yaml:3: admin.mode: expected a file mode"),
        ("admin:\n  listen: unix:/run/a.sock\n  listen_mode: '0600'\n",
         "p.yaml:3: admin.listen_mode: unknown key (did you mean 'listen'?)"),
        ("admin: unix:/run/a.sock\n", "p.yaml:1: admin: expected a mapping"),
        ("store: {url: 'redis://127.0.0.1/0'}\nserver: {reuse_port: true}\n"
         "admin: {listen: unix:/run/a.sock}\n",
         "p.yaml:3: admin.listen: several processes (server.reuse_port) cannot share"),
    ],
)
def test_admin_socket_errors(body: str, expected: str) -> None:
    messages = errors_of(body)
    assert any(m.startswith(expected) for m in messages), messages


def test_address_list_file(tmp_path: Path) -> None:
    listing = tmp_path / "vip.txt"
    listing.write_text("# the board\nceo@example.com\n@partners.example\n")
    policy = parse_policy(LANES + f"classify:\n  - when: {{sender: {{file: {listing}}}}}\n"
                          "    lane: fast\n")
    rule = policy.classify[0]
    assert rule.when(Request(sender="CEO@Example.com"))
    assert rule.when(Request(sender="x@partners.example"))
    assert not rule.when(Request(sender="x@example.com"))


def test_missing_list_file_is_an_error() -> None:
    messages = errors_of(LANES + "classify:\n  - when: {sender: {file: /nonexistent/list}}\n"
                         "    lane: fast\n")
    assert any("cannot read list file '/nonexistent/list'" in m for m in messages), messages


def test_scheduler_release_agent_is_a_unix_socket() -> None:
    policy = parse_policy("scheduler:\n  release_agent: unix:/run/mqpolicy-agent/agent.sock\n")
    assert policy.scheduler is not None
    assert policy.scheduler.release_agent is not None
    assert policy.scheduler.release_agent.path == "/run/mqpolicy-agent/agent.sock"
    assert parse_policy("scheduler: {}\n").scheduler.release_agent is None  # type: ignore[union-attr]


@pytest.mark.parametrize(("value", "problem"), [
    ("127.0.0.1:10050", "unix socket"),
    ("unix:run/agent.sock", "absolute"),
    ("[]", "non-empty string"),
])
def test_scheduler_release_agent_errors(value: str, problem: str) -> None:
    (issue,) = errors_of(f"scheduler:\n  release_agent: {value}\n")
    assert "scheduler.release_agent" in issue and problem in issue, issue


SCHEDULER_WITH_ALLOW = """\
scheduler:
  interval: 2s
  schedule:
    allow: {sasl_username: [app, reports], sender: "@app.example"}
    max_delay: 1d
"""


def test_scheduler_settings_from_the_same_text_compare_equal() -> None:
    """A reload of an unchanged file must not look like a changed scheduler section (the
    allow condition is compiled to a new function on every load)."""
    first = parse_policy(SCHEDULER_WITH_ALLOW, "p.yaml").scheduler
    again = parse_policy(SCHEDULER_WITH_ALLOW, "p.yaml").scheduler
    assert first is not None and first.schedule.allow is not None
    assert first == again
    # the same condition written in another order and flow style is the same condition
    reordered = parse_policy(
        "scheduler:\n  interval: 2s\n  schedule:\n    max_delay: 1d\n    allow:\n"
        "      sender: '@app.example'\n      sasl_username:\n        - app\n"
        "        - reports\n", "p.yaml").scheduler
    assert reordered == first
    changed = parse_policy(SCHEDULER_WITH_ALLOW.replace("reports", "billing"), "p.yaml")
    assert changed.scheduler != first
    assert parse_policy("scheduler: {interval: 2s, schedule: {max_delay: 1d}}").scheduler != first
