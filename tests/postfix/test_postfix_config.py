"""The Postfix config generator and ``--check`` comparison: pure, no Postfix needed."""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mqpolicy.cli import main
from mqpolicy.commands.postfix_config import report
from mqpolicy.policy.destinations import match_destination
from mqpolicy.policy.loader import ConfigError, load_policy
from mqpolicy.policy.model import Policy, PostfixDelivery
from mqpolicy.postfix.config_check import Finding, Status, compare
from mqpolicy.postfix.config_generator import PostfixConfigOptions, generate
from mqpolicy.postfix.installed_config import (
    InstalledService,
    PostfixState,
    list_tokens,
    parse_postconf_m,
    parse_postconf_n,
    parse_postconf_p,
)
from mqpolicy.postfix.programs import POSTCONF
from mqpolicy.postfix.settings import (
    SECTION_HEADER_CHECKS,
    SECTION_MAIN,
    SECTION_MASTER,
    SECTION_TRANSPORT,
    PostfixConfig,
    split_sections,
)
from mqpolicy.store.urls import check_store_url

LANES = """\
listen: ["127.0.0.1:10040"]
default_lane: normal
lanes:
  - name: transactional
    transport: mq-transactional
    concurrency: 20
    rate_delay: 0s
  - name: normal
    transport: smtp
  - name: bulk
    transport: mq-bulk
    concurrency: 4
    initial_concurrency: 2
    rate_delay: 1s
    recipient_limit: 10
"""


WritePolicy = Callable[[str], Policy]


@pytest.fixture
def write_policy(tmp_path: Path) -> WritePolicy:
    def write(text: str) -> Policy:
        path = tmp_path / "policy.yaml"
        path.write_text(text)
        return load_policy(path, check_store_url)

    return write


def settings_of(text: str) -> dict[str, str]:
    """Active (uncommented) ``name = value`` settings of a main.cf block."""
    return parse_postconf_n("\n".join(
        line for line in text.splitlines() if not line.startswith("#")))


@dataclass
class Installed:
    """A Postfix config as postconf would report it, editable before :meth:`state`."""

    main: dict[str, str]
    services: dict[str, InstalledService]
    overrides: dict[str, dict[str, str]]
    files: dict[str, str | None] = field(default_factory=dict)

    def state(self) -> PostfixState:
        relayhost = self.main.get("relayhost", "")
        expanded = {k: v.replace("$relayhost", relayhost) for k, v in self.main.items()}
        return PostfixState(self.main, expanded, self.services, self.overrides, self.files)


def installed(config: PostfixConfig, **params: str) -> Installed:
    """What postconf would report after pasting ``config`` into an empty Postfix."""
    main = {"relayhost": "[127.0.0.1]:2525", **settings_of(config.main_cf()), **params}
    services = parse_postconf_m(config.master_cf())
    overrides = {
        f"{s.name}/{s.kind}": dict(a.split("=", 1) for a in s.args if "=" in a)
        for s in services.values()
    }
    files: dict[str, str | None] = {config.header_checks_path: config.header_checks()}
    return Installed(main, services, overrides, files)


# ---------------------------------------------------------------- main.cf


def test_the_policy_server_is_asked_at_rcpt_and_at_end_of_message(write_policy: WritePolicy) -> None:
    config = generate(write_policy(LANES))
    main = settings_of(config.main_cf())
    assert main["smtpd_recipient_restrictions"] == "check_policy_service inet:127.0.0.1:10040"
    assert main["smtpd_end_of_data_restrictions"] == "check_policy_service inet:127.0.0.1:10040"
    assert main["smtpd_policy_service_default_action"] == \
        "451 4.3.5 Policy service unavailable, try again later"
    assert main["smtpd_policy_service_request_limit"] == "0"
    assert main["smtpd_policy_service_timeout"] == "10s"
    assert main["smtpd_policy_service_max_idle"] == "270s"  # below idle_timeout 300s
    assert main["default_filter_nexthop"] == "$relayhost"


@pytest.mark.parametrize(
    ("listen", "address"),
    [
        ('["0.0.0.0:10040"]', "inet:127.0.0.1:10040"),
        ('["[::]:10040"]', "inet:[::1]:10040"),
        ('["[::1]:9999"]', "inet:[::1]:9999"),
        ('["unix:/run/mqpolicy/policy.sock"]', "unix:/run/mqpolicy/policy.sock"),
        ('["unix:/run/mq.sock", "127.0.0.2:10040"]', "inet:127.0.0.2:10040"),
    ],
)
def test_the_policy_address_comes_from_listen(
    write_policy: WritePolicy, listen: str, address: str
) -> None:
    config = generate(write_policy(f"listen: {listen}\n"))
    assert config.policy_address == address
    assert f"check_policy_service {address}" in config.main_cf()


def test_a_unix_socket_policy_server_gets_a_chroot_note(write_policy: WritePolicy) -> None:
    config = generate(write_policy('listen: ["unix:/run/mq.sock"]\n'))
    assert any("chroot" in note for note in config.notes)
    assert "# NOTE: a unix-socket policy server" in config.render()


@pytest.mark.parametrize(
    ("listen", "queue_directory", "address"),
    [
        ('["unix:/var/spool/postfix/mqpolicy/policy.sock"]', "/var/spool/postfix",
         "unix:mqpolicy/policy.sock"),
        # preferred over TCP: no TCP on the way, and a chrooted smtpd reaches it
        ('["127.0.0.1:10040", "unix:/srv/pfq/mq/policy.sock"]', "/srv/pfq/",
         "unix:mq/policy.sock"),
        ('["unix:/srv/pfq/../etc/policy.sock"]', "/srv/pfq", "unix:/srv/pfq/../etc/policy.sock"),
        ('["unix:/srv/pfq"]', "/srv/pfq", "unix:/srv/pfq"),
        ('["unix:/srv/pfqx/policy.sock"]', "/srv/pfq", "unix:/srv/pfqx/policy.sock"),
    ],
)
def test_a_unix_socket_inside_the_queue_directory_is_named_relative_to_it(
    write_policy: WritePolicy, listen: str, queue_directory: str, address: str
) -> None:
    config = generate(write_policy(f"listen: {listen}\n"),
                      PostfixConfigOptions(queue_directory=queue_directory))
    assert config.policy_address == address
    assert f"check_policy_service {address}" in config.main_cf()
    chroot_noted = any("chroot" in note for note in config.notes)
    assert chroot_noted == address.startswith("unix:/")


def test_a_milter_socket_inside_the_queue_directory_is_named_relative_to_it(
    write_policy: WritePolicy,
) -> None:
    main_cf = generate(write_policy(LANES), PostfixConfigOptions(
        milter="unix:/var/spool/postfix/mqpolicy/milter.sock")).main_cf()
    assert settings_of(main_cf)["smtpd_milters"] == "unix:mqpolicy/milter.sock"
    assert settings_of(main_cf)["non_smtpd_milters"] == "unix:mqpolicy/milter.sock"


def test_options_override_endpoint_and_default_action(write_policy: WritePolicy) -> None:
    config = generate(write_policy(LANES), PostfixConfigOptions(
        policy_endpoint="10.0.0.5:10040", default_action="DUNNO"))
    main = settings_of(config.main_cf())
    assert main["smtpd_recipient_restrictions"] == "check_policy_service inet:10.0.0.5:10040"
    assert main["smtpd_policy_service_default_action"] == "DUNNO"


def test_lane_transports_get_their_queue_manager_settings_in_main_cf(write_policy: WritePolicy) -> None:
    main = settings_of(generate(write_policy(LANES)).main_cf())
    assert main["mq-transactional_destination_concurrency_limit"] == "20"
    assert main["mq-transactional_destination_rate_delay"] == "0s"
    assert main["mq-bulk_destination_concurrency_limit"] == "4"
    assert main["mq-bulk_initial_destination_concurrency"] == "2"
    assert main["mq-bulk_destination_rate_delay"] == "1s"
    assert main["mq-bulk_destination_recipient_limit"] == "10"
    assert not [name for name in main if name.startswith("smtp_")]


def test_lane_notes_explain_what_postfix_will_do(write_policy: WritePolicy) -> None:
    text = generate(write_policy(LANES + """\
  - name: trickle
    transport: mq-trickle
    rate_delay: 500ms
  - name: odd
    transport: mq-odd
    concurrency: 2
    initial_concurrency: 5
""")).main_cf()
    assert "# with a rate delay Postfix delivers to one destination one at a time: " \
           "concurrency 4 has no effect" in text
    assert "# rate_delay 500ms: Postfix waits at least 1s between deliveries" in text
    assert "mq-trickle_destination_rate_delay = 500ms" in text
    assert "initial_concurrency 5 is above the concurrency limit 2" in text


def test_settings_on_the_default_smtp_lane_apply_to_postfix_smtp(write_policy: WritePolicy) -> None:
    text = generate(write_policy(
        "lanes:\n  - name: normal\n    transport: smtp\n    concurrency: 7\n")).main_cf()
    assert "smtp_destination_concurrency_limit = 7" in text
    assert "apply to all mail that has no lane transport" in text


def test_milter_lines_are_commented_out_without_a_milter_address(write_policy: WritePolicy) -> None:
    policy = write_policy(LANES)
    off = generate(policy).main_cf()
    assert "#smtpd_milters = inet:127.0.0.1:10041" in off
    assert "#milter_default_action = tempfail" in off
    assert "smtpd_milters" not in settings_of(off)
    assert settings_of(off)["milter_header_checks"] == \
        "regexp:/etc/postfix/mqpolicy_header_checks"

    on = settings_of(generate(policy, PostfixConfigOptions(
        milter="unix:/run/mqpolicy/milter.sock", config_directory="/srv/pf")).main_cf())
    assert on["smtpd_milters"] == "unix:/run/mqpolicy/milter.sock"
    assert on["non_smtpd_milters"] == "unix:/run/mqpolicy/milter.sock"
    assert on["milter_default_action"] == "tempfail"
    assert on["milter_header_checks"] == "regexp:/srv/pf/mqpolicy_header_checks"


# ---------------------------------------------------------------- master.cf and the map


def test_one_smtp_service_per_lane_transport_with_its_syslog_name(write_policy: WritePolicy) -> None:
    master = generate(write_policy(LANES + """\
  - name: bulk-too
    transport: mq-bulk
""")).master_cf()
    services = parse_postconf_m(master)
    assert sorted(services) == ["mq-bulk/unix", "mq-transactional/unix"]
    assert services["mq-bulk/unix"].command == "smtp"
    assert services["mq-bulk/unix"].args == ("-o", "syslog_name=postfix/mq-bulk")


def test_no_service_when_every_lane_uses_smtp(write_policy: WritePolicy) -> None:
    config = generate(write_policy("lanes:\n  - name: normal\n"))
    assert parse_postconf_m(config.master_cf()) == {}
    assert "nothing to add" in config.master_cf()
    assert "no rules" in config.header_checks()


def _posix_to_python(pattern: str) -> str:
    return pattern.replace("[[:space:]]", r"\s")


@pytest.mark.parametrize(
    ("header", "transport"),
    [
        ("X-MQ-Lane: bulk", "mq-bulk:"),
        ("X-MQ-Lane:bulk", "mq-bulk:"),
        ("X-MQ-Lane:   bulk  ", "mq-bulk:"),
        ("X-MQ-Lane: transactional", "mq-transactional:"),
        ("X-MQ-Lane: a.b", "mq-ab:"),
        ("X-MQ-Lane: bulky", None),
        ("X-MQ-Lane: axb", None),
        ("X-Other: bulk", None),
        ("X-MQ-Lane: normal", None),
    ],
)
def test_header_rules_map_the_lane_header_to_its_transport(
    write_policy: WritePolicy, header: str, transport: str | None
) -> None:
    config = generate(write_policy(LANES + "  - name: a.b\n    transport: mq-ab\n"))
    matched = None
    rules = [line for line in config.header_checks().splitlines()
             if line and not line.startswith("#")]
    assert rules  # one per lane with its own transport
    for line in rules:
        match = re.fullmatch(r"/(.*)/ FILTER (\S+)", line)
        assert match, line
        # Postfix regexp tables are case-insensitive by default
        if re.search(_posix_to_python(match[1]), header, re.IGNORECASE):
            matched = match[2]
            break
    assert matched == transport


def test_sections_split_back_into_the_blocks(write_policy: WritePolicy) -> None:
    config = generate(write_policy(LANES))
    sections = split_sections(config.render())
    assert sections == {
        SECTION_MAIN: config.main_cf(),
        SECTION_MASTER: config.master_cf(),
        SECTION_HEADER_CHECKS: config.header_checks(),
    }


def test_the_command_prints_all_blocks_or_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(LANES)
    assert main(["postfix-config", "-c", str(path)]) == 0
    full = capsys.readouterr().out
    assert "# ======== main.cf: add to main.cf ========" in full
    assert "# ======== header_checks: write to /etc/postfix/mqpolicy_header_checks" in full
    assert main(["postfix-config", "-c", str(path), "--section", "master.cf"]) == 0
    assert capsys.readouterr().out == split_sections(full)[SECTION_MASTER]
    assert main(["postfix-config", "-c", str(path), "--milter", "nonsense"]) == 2


def lanes_listening_on(listen: str) -> str:
    """LANES with its listen entries replaced by ``listen`` (a YAML list)."""
    return LANES.replace('listen: ["127.0.0.1:10040"]', f"listen: {listen}")


def test_the_command_names_sockets_relative_to_the_queue_directory_it_is_given(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(lanes_listening_on('["unix:/srv/q/mq/policy.sock"]'))
    args = ["postfix-config", "-c", str(path), "--section", "main.cf",
            "--milter", "unix:/srv/q/mq/milter.sock"]
    assert main([*args, "--queue-directory", "/srv/q"]) == 0
    inside = capsys.readouterr().out
    assert settings_of(inside)["smtpd_milters"] == "unix:mq/milter.sock"
    assert "check_policy_service unix:mq/policy.sock" in inside
    # no Postfix config in this directory: the default queue directory, absolute names
    assert main([*args, "--config-directory", str(tmp_path)]) == 0
    outside = capsys.readouterr().out
    assert settings_of(outside)["smtpd_milters"] == "unix:/srv/q/mq/milter.sock"
    assert "check_policy_service unix:/srv/q/mq/policy.sock" in outside


@pytest.mark.skipif(not Path(POSTCONF.path).exists(), reason="postconf not installed")
def test_the_command_asks_postconf_for_the_queue_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(lanes_listening_on('["127.0.0.1:10040", "unix:/srv/q/mq/policy.sock"]'))
    postfix_dir = tmp_path / "postfix"
    postfix_dir.mkdir()
    (postfix_dir / "main.cf").write_text("queue_directory = /srv/q\n")
    args = ["postfix-config", "-c", str(path), "--section", "main.cf"]
    assert main([*args, "--config-directory", str(postfix_dir)]) == 0
    out = capsys.readouterr()
    assert "check_policy_service unix:mq/policy.sock" in out.out
    assert "queue_directory unknown" not in out.err
    # postconf cannot say: a warning, the default queue directory, TCP before that socket
    assert main([*args, "--config-directory", str(tmp_path / "none")]) == 0
    out = capsys.readouterr()
    assert "check_policy_service inet:127.0.0.1:10040" in out.out
    assert "queue_directory unknown" in out.err
    assert "pass --queue-directory" in out.err
    # an address that is no unix socket needs no queue directory: postconf is not asked
    assert main([*args, "--config-directory", str(tmp_path / "none"),
                 "--policy-endpoint", "127.0.0.1:10040"]) == 0
    assert "queue_directory unknown" not in capsys.readouterr().err
    assert main([*args, "--queue-directory", "srv/q"]) == 2
    assert "--queue-directory must be absolute" in capsys.readouterr().err


@pytest.mark.skipif(not Path(POSTCONF.path).exists(), reason="postconf not installed")
def test_postfix_config_runs_the_postconf_mqpolicy_postconf_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``MQPOLICY_POSTCONF`` names the postconf that every part runs (docs/milter.md):
    ``postfix-config`` too, to read a Postfix's settings and to ``--check`` it."""
    path = tmp_path / "p.yaml"
    path.write_text(lanes_listening_on('["unix:/srv/q/mq/policy.sock"]'))
    postfix_dir = tmp_path / "postfix"
    postfix_dir.mkdir()
    (postfix_dir / "main.cf").write_text("queue_directory = /srv/q\n")
    (postfix_dir / "master.cf").write_text("smtp inet n - n - - smtpd\n")
    calls = tmp_path / "calls"
    wrapper = tmp_path / "bin" / "postconf"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\necho "$*" >> {calls}\nexec {POSTCONF.path} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("MQPOLICY_POSTCONF", str(wrapper))

    # the queue directory asked of this postconf: the socket named relative to it
    assert main(["postfix-config", "-c", str(path), "--section", "main.cf",
                 "--config-directory", str(postfix_dir)]) == 0
    assert "check_policy_service unix:mq/policy.sock" in capsys.readouterr().out
    assert calls.read_text().splitlines() == [f"-c {postfix_dir} -xh queue_directory"]
    # --check reads the installed settings with it: nothing of this policy there yet
    calls.unlink()
    assert main(["postfix-config", "-c", str(path), "--check", str(postfix_dir)]) == 1
    captured = capsys.readouterr()
    assert "cannot read" not in captured.err
    assert "missing   main.cf: smtpd_recipient_restrictions: add check_policy_service " \
           "unix:mq/policy.sock" in captured.out
    # the queue directory, then the settings, the services and the settings' effective values
    assert [line.split()[2] for line in calls.read_text().splitlines()] == \
           ["-xh", "-n", "-nx", "-M", "-P", "-x"]
    # a postconf that is not there: the command says which one
    missing = tmp_path / "nowhere" / "postconf"
    monkeypatch.setenv("MQPOLICY_POSTCONF", str(missing))
    assert main(["postfix-config", "-c", str(path), "--check", str(postfix_dir)]) == 2
    assert str(missing) in capsys.readouterr().err


def test_check_asks_to_replace_an_absolute_name_of_the_same_socket_never_to_add_one(
    write_policy: WritePolicy,
) -> None:
    config = generate(
        write_policy(lanes_listening_on('["unix:/var/spool/postfix/mq/policy.sock"]')),
        PostfixConfigOptions(milter="unix:/var/spool/postfix/mq/milter.sock"))
    absolute = "unix:/var/spool/postfix/mq/policy.sock"
    pasted = installed(config,
                       smtpd_recipient_restrictions=f"check_policy_service {absolute}",
                       non_smtpd_milters="unix:/var/spool/postfix/mq/milter.sock")
    found = statuses(compare(config, pasted.state()))
    assert found[Status.DIFFERENT] == [
        f"smtpd_recipient_restrictions: replace check_policy_service {absolute} with "
        "check_policy_service unix:mq/policy.sock",
        "non_smtpd_milters: replace unix:/var/spool/postfix/mq/milter.sock with "
        "unix:mq/milter.sock",
    ]
    assert Status.MISSING not in found
    # another socket is no replacement: it is missing
    pasted = installed(config, non_smtpd_milters="unix:/run/other/milter.sock")
    found = statuses(compare(config, pasted.state()))
    assert found[Status.MISSING] == ["non_smtpd_milters: add unix:mq/milter.sock"]


def test_a_milter_socket_outside_the_queue_directory_gets_a_chroot_note(
    write_policy: WritePolicy,
) -> None:
    policy = write_policy(LANES)
    outside = generate(policy, PostfixConfigOptions(milter="unix:/run/mq/milter.sock"))
    assert any("milter outside /var/spool/postfix" in note for note in outside.notes)
    inside = generate(policy, PostfixConfigOptions(
        milter="unix:/var/spool/postfix/mq/milter.sock"))
    assert not any("chroot" in note for note in inside.notes)


# ---------------------------------------------------------------- parsing postconf


def test_parse_postconf_output() -> None:
    n = parse_postconf_n(
        "alias_maps =\nsmtpd_recipient_restrictions = permit_mynetworks,\n"
        "    check_policy_service inet:127.0.0.1:1\nrelayhost = [127.0.0.1]:2525\n")
    assert n == {"alias_maps": "", "relayhost": "[127.0.0.1]:2525",
                 "smtpd_recipient_restrictions":
                     "permit_mynetworks, check_policy_service inet:127.0.0.1:1"}
    m = parse_postconf_m(
        "127.0.0.1:2525 inet n   -       n       -       -       smtpd\n"
        "mq-bulk    unix  -       -       n       -       -       smtp -o "
        "syslog_name=postfix/mq-bulk -o {smtp_helo_name=foo bar}\n"
        "postlog    unix-dgram n  -       n       -       1       postlogd\n")
    assert sorted(m) == ["127.0.0.1:2525/inet", "mq-bulk/unix", "postlog/unix-dgram"]
    assert m["mq-bulk/unix"].command == "smtp"
    p = parse_postconf_p("mq-bulk/unix/smtp_helo_name = foo bar\n"
                         "mq-bulk/unix/syslog_name = postfix/mq-bulk\n")
    assert p == {"mq-bulk/unix": {"smtp_helo_name": "foo bar",
                                  "syslog_name": "postfix/mq-bulk"}}


def test_list_tokens_keep_braced_groups() -> None:
    assert list_tokens("permit_mynetworks, check_policy_service "
                       "{ inet:127.0.0.1:1, timeout=10s },reject") == [
        "permit_mynetworks", "check_policy_service",
        "{ inet:127.0.0.1:1, timeout=10s }", "reject"]


# ---------------------------------------------------------------- comparing


def statuses(findings: list[Finding]) -> dict[Status, list[str]]:
    out: dict[Status, list[str]] = {}
    for f in findings:
        out.setdefault(f.status, []).append(f.what)
    return out


def test_a_postfix_with_the_pasted_blocks_has_everything(write_policy: WritePolicy) -> None:
    config = generate(write_policy(LANES))
    found = statuses(compare(config, installed(config).state()))
    assert set(found) == {Status.OK}
    assert len(found[Status.OK]) >= 15


def test_missing_and_different_settings_are_named(write_policy: WritePolicy) -> None:
    config = generate(write_policy(LANES))
    pasted = installed(config, **{"mq-bulk_destination_concurrency_limit": "8"})
    del pasted.main["smtpd_end_of_data_restrictions"]
    del pasted.services["mq-transactional/unix"]
    found = statuses(compare(config, pasted.state()))
    assert found[Status.MISSING] == [
        "smtpd_end_of_data_restrictions: add check_policy_service inet:127.0.0.1:10040",
        "service mq-transactional (unix, smtp)",
    ]
    assert found[Status.DIFFERENT] == ["mq-bulk_destination_concurrency_limit = 4"]


def test_equivalent_values_are_accepted(write_policy: WritePolicy) -> None:
    config = generate(write_policy(LANES))
    pasted = installed(config, **{
        "mq-bulk_destination_rate_delay": "1",  # seconds are the default unit
        "smtpd_policy_service_timeout": "10000ms",
        "default_filter_nexthop": "[127.0.0.1]:2525",  # the relayhost, spelt out
        "smtpd_recipient_restrictions": "reject_unauth_pipelining, "
                                        "check_policy_service { inet:127.0.0.1:10040, "
                                        "timeout=5s }",
    })
    assert set(statuses(compare(config, pasted.state()))) == {Status.OK}


def test_a_permit_before_the_policy_check_is_a_warning(write_policy: WritePolicy) -> None:
    config = generate(write_policy(LANES))
    value = "permit_sasl_authenticated, permit_mynetworks, check_policy_service " \
            "inet:127.0.0.1:10040"
    found = statuses(compare(
        config, installed(config, smtpd_recipient_restrictions=value).state()))
    assert found[Status.WARNING] == [
        "smtpd_recipient_restrictions: permit_sasl_authenticated, permit_mynetworks "
        "before check_policy_service"]
    assert Status.MISSING not in found


def test_header_map_rules_and_syslog_names_are_checked(write_policy: WritePolicy) -> None:
    config = generate(write_policy(LANES))
    pasted = installed(config)
    pasted.files[config.header_checks_path] = "\n".join(
        line for line in config.header_checks().splitlines() if "bulk" not in line)
    pasted.overrides["mq-bulk/unix"] = {}
    found = statuses(compare(config, pasted.state()))
    assert found[Status.MISSING] == [
        "/^X-MQ-Lane:[[:space:]]*bulk[[:space:]]*$/ FILTER mq-bulk:"]
    assert found[Status.WARNING] == ["service mq-bulk: no -o syslog_name"]

    pasted.files[config.header_checks_path] = None
    found = statuses(compare(config, pasted.state()))
    assert found[Status.MISSING] == ["the header-checks map (file not readable)"]


def test_milter_lists_are_checked_only_when_a_milter_is_configured(write_policy: WritePolicy) -> None:
    policy = write_policy(LANES)
    without = generate(policy)
    assert Status.MISSING not in statuses(compare(without, installed(without).state()))
    with_milter = generate(policy, PostfixConfigOptions(milter="inet:127.0.0.1:10041"))
    # the milter lines were not pasted
    found = statuses(compare(with_milter, installed(without).state()))
    assert found[Status.MISSING] == [
        "smtpd_milters: add inet:127.0.0.1:10041",
        "non_smtpd_milters: add inet:127.0.0.1:10041",
        "milter_default_action = tempfail",
    ]


def test_report_exit_code_and_summary() -> None:
    out = io.StringIO()
    assert report([Finding(Status.OK, "main.cf", "a = 1"),
                   Finding(Status.WARNING, "main.cf", "w")], "/etc/postfix", out) == 0
    assert out.getvalue().splitlines()[-1] == \
        "/etc/postfix: has what the policy needs (1 ok, 1 warning)"
    out = io.StringIO()
    assert report([Finding(Status.OK, "main.cf", "a = 1"),
                   Finding(Status.MISSING, "master.cf", "service x")], "/p", out) == 1
    lines = out.getvalue().splitlines()
    assert lines[0] == "missing   master.cf: service x"
    assert lines[-1] == "/p: needs changes (1 ok, 1 missing)"


def test_a_service_overriding_the_restrictions_is_a_warning(write_policy: WritePolicy) -> None:
    config = generate(write_policy(LANES))
    pasted = installed(config, my_restrictions="check_policy_service inet:127.0.0.1:10040")
    pasted.overrides["submission/inet"] = {
        "syslog_name": "postfix/submission",
        "smtpd_recipient_restrictions": "permit_sasl_authenticated, reject",
    }
    pasted.overrides["smtps/inet"] = {"smtpd_recipient_restrictions": "$my_restrictions"}
    found = statuses(compare(config, pasted.state()))
    assert found[Status.WARNING] == [
        "service submission/inet sets -o smtpd_recipient_restrictions="
        "permit_sasl_authenticated, reject without check_policy_service inet:127.0.0.1:10040"]


def test_an_unset_parameter_whose_default_is_right_is_ok(write_policy: WritePolicy) -> None:
    config = generate(write_policy(LANES))
    pasted = installed(config)
    del pasted.main["smtpd_policy_service_request_limit"]
    del pasted.main["smtpd_policy_service_timeout"]
    del pasted.main["default_filter_nexthop"]
    pasted.main["relayhost"] = ""
    state = pasted.state()
    effective = {"smtpd_policy_service_request_limit": "0",
                 "smtpd_policy_service_timeout": "100s", "default_filter_nexthop": ""}
    found = compare(config, PostfixState(state.params, state.expanded, state.services,
                                         state.service_params, state.files, effective))
    by_name = {f.what.split(" ")[0]: f for f in found}
    assert by_name["smtpd_policy_service_request_limit"].status is Status.OK
    assert by_name["smtpd_policy_service_request_limit"].detail == "Postfix's default"
    # no relayhost: nothing to keep lane mail on, the empty default is right
    assert by_name["default_filter_nexthop"].status is Status.OK
    assert by_name["smtpd_policy_service_timeout"].status is Status.MISSING
    assert by_name["smtpd_policy_service_timeout"].detail == "now: 100s"


# ---------------------------------------------------------------- destinations as transports

DESTINATIONS = LANES + """\
destinations:
  - name: partner
    domains: [partner.example, "*.partner.example"]
    rate: 100/1m
    concurrency: 3
    initial_concurrency: 1
    recipient_limit: 20
  - name: home
    domains: [mail.big.example]
    rate: 100/1m
  - name: big
    domains: ["*.big.example", big.example]
    mx: "*.bigmx.example"
    rate: 100/1m
    rate_delay: 2s
  - name: google
    mx: "*.google.com"
    rate: 300/1m
    concurrency: 10
  - name: plain
    domains: [plain.example]
    rate: 10/1m
"""

RELAY = "[127.0.0.1]:2525"


def with_relay(policy: Policy, relayhost: str | None = RELAY, **kwargs: str) -> PostfixConfig:
    return generate(policy, PostfixConfigOptions(relayhost=relayhost, **kwargs))


def map_lines(config: PostfixConfig) -> list[str]:
    return [line for line in config.transport_map().splitlines()
            if line and not line.startswith("#")]


def installed_with_map(config: PostfixConfig, **params: str) -> Installed:
    pasted = installed(config, **params)
    pasted.files[config.transport_map_path] = config.transport_map()
    return pasted


def test_destination_delivery_settings_are_kept_on_the_destination(
    write_policy: WritePolicy,
) -> None:
    by_name = {d.name: d for d in write_policy(DESTINATIONS).destinations}
    partner = by_name["partner"]
    assert partner.delivery == PostfixDelivery(concurrency=3, initial_concurrency=1,
                                               recipient_limit=20)
    assert by_name["big"].delivery.rate_delay_ms == 2000
    assert by_name["partner"].delivery.is_set
    assert not by_name["home"].delivery.is_set


@pytest.mark.parametrize(
    ("entry", "error"),
    [
        ("concurrency: 0", "concurrency"),
        ("initial_concurrency: -1", "initial_concurrency"),
        ("recipient_limit: many", "recipient_limit"),
        ("rate_delay: 1500ms", "Postfix takes whole seconds here"),
        ("rate_delay: soon", "rate_delay"),
        ("connections: 3", "connections"),
    ],
)
def test_destination_delivery_settings_are_validated(
    tmp_path: Path, entry: str, error: str
) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(
        f"destinations:\n  - name: d\n    domains: [d.example]\n    rate: 1/1s\n    {entry}\n")
    with pytest.raises(ConfigError) as exc:
        load_policy(path, check_store_url)
    assert error in str(exc.value)


def test_a_destination_with_delivery_settings_gets_its_own_transport(
    write_policy: WritePolicy,
) -> None:
    config = with_relay(write_policy(DESTINATIONS), config_directory="/srv/pf")
    main_cf = settings_of(config.main_cf())
    assert main_cf["transport_maps"] == "regexp:/srv/pf/mqpolicy_transport"
    assert main_cf["mq-dest-partner_destination_concurrency_limit"] == "3"
    assert main_cf["mq-dest-partner_initial_destination_concurrency"] == "1"
    assert main_cf["mq-dest-partner_destination_recipient_limit"] == "20"
    assert main_cf["mq-dest-big_destination_rate_delay"] == "2s"
    assert not [n for n in main_cf if n.startswith(("mq-dest-home", "mq-dest-google",
                                                    "mq-dest-plain"))]
    services = parse_postconf_m(config.master_cf())
    assert sorted(services) == ["mq-bulk/unix", "mq-dest-big/unix", "mq-dest-partner/unix",
                                "mq-transactional/unix"]
    assert services["mq-dest-partner/unix"].command == "smtp"
    assert services["mq-dest-partner/unix"].args == ("-o", "syslog_name=postfix/mq-dest-partner")
    # in the policy's order, each entry naming the relay host as its next hop
    assert map_lines(config) == [
        r"/@partner\.example$/ mq-dest-partner:[127.0.0.1]:2525",
        r"/@[^@]+\.partner\.example$/ mq-dest-partner:[127.0.0.1]:2525",
        r"if !/@mail\.big\.example$/",
        r"/@[^@]+\.big\.example$/ mq-dest-big:[127.0.0.1]:2525",
        "endif",
        r"/@big\.example$/ mq-dest-big:[127.0.0.1]:2525",
    ]
    text = config.render()
    assert "# ======== transport: write to /srv/pf/mqpolicy_transport ========" in text
    assert "# destinations with their own transport: partner=mq-dest-partner, " \
           "big=mq-dest-big" in text
    assert "Put this map FIRST in your list" in config.main_cf()
    assert split_sections(text)[SECTION_TRANSPORT] == config.transport_map()


def _route(lines: list[str], address: str) -> str | None:
    """A Postfix regexp table lookup (if/endif, first match wins, case-insensitive)."""
    skip = 0
    for line in lines:
        if line == "endif":
            skip = max(0, skip - 1)
            continue
        if skip:
            if line.startswith("if "):
                skip += 1
            continue
        cond = re.fullmatch(r"if (!?)/(.*)/", line)
        if cond:
            matched = re.search(cond[2], address, re.IGNORECASE) is not None
            if matched == (cond[1] == "!"):
                skip = 1
            continue
        rule = re.fullmatch(r"/(.*)/ (\S+)", line)
        assert rule, line
        if re.search(rule[1], address, re.IGNORECASE):
            return rule[2].split(":", 1)[0]
    return None


@pytest.mark.parametrize(
    "domain",
    ["partner.example", "PARTNER.example", "a.partner.example", "a.b.partner.example",
     "xpartner.example", "partner.example.org", "big.example", "mail.big.example",
     "x.mail.big.example", "www.big.example", "plain.example", "gmail.com", "example.com"],
)
def test_the_map_routes_exactly_the_domains_mqpolicy_gives_to_those_destinations(
    write_policy: WritePolicy, domain: str
) -> None:
    policy = write_policy(DESTINATIONS)
    config = with_relay(policy)
    owner = match_destination(domain, (), [d.matcher for d in policy.destinations])
    transports = {d.destination.name: d.transport for d in config.destination_transports}
    assert _route(map_lines(config), f"user@{domain}") == transports.get(owner or "")


def test_the_next_hop_is_the_relay_host_or_empty_and_unknown_is_said(
    write_policy: WritePolicy,
) -> None:
    policy = write_policy(DESTINATIONS)
    listed = with_relay(policy, "[a.example]:587, [b.example]:587")
    assert map_lines(listed)[0].endswith(" mq-dest-partner:[a.example]:587,[b.example]:587")

    direct = with_relay(policy, "")
    assert map_lines(direct)[0] == r"/@partner\.example$/ mq-dest-partner:"
    assert any("no relayhost" in n and "per recipient domain" in n for n in direct.notes)
    assert "the recipient domain's MX" in direct.transport_map()

    unknown = with_relay(policy, None)
    assert map_lines(unknown)[0] == r"/@partner\.example$/ mq-dest-partner:"
    assert any(n.startswith("relay host unknown") and "bypassing any relayhost" in n
               for n in unknown.notes)
    assert "# Relay host unknown" in unknown.transport_map()


def test_notes_for_mx_only_destinations_and_lane_precedence(write_policy: WritePolicy) -> None:
    config = with_relay(write_policy(DESTINATIONS))
    text = config.render()
    assert "# NOTE: destination google is matched by mx patterns only: it gets its budget " \
           "but no Postfix transport (Postfix routes by recipient domain, not by MX)" in text
    assert "# NOTE: mail in a lane with its own transport (mq-bulk, mq-transactional) " \
           "leaves through the lane's transport, not the destination's: FILTER replaces " \
           "the transport_maps result (transport and next hop)" in text
    # big has mx patterns too: only its domains get the transport
    assert "# domains found by its mx patterns get its budget but leave through Postfix's " \
           "default transport" in config.main_cf()


def test_a_pattern_taken_first_by_a_destination_without_transport_is_left_out(
    write_policy: WritePolicy,
) -> None:
    config = with_relay(write_policy(LANES + """\
destinations:
  - name: all-of-example
    domains: ["*.example.com"]
    rate: 100/1m
  - name: mail
    domains: [mail.example.com, example.com]
    rate: 10/1m
    concurrency: 2
"""))
    assert map_lines(config) == [r"/@example\.com$/ mq-dest-mail:[127.0.0.1]:2525"]
    assert "destination mail: mail.example.com is matched first by destination " \
           "all-of-example (*.example.com), which has no transport" in config.notes


def test_no_transport_block_without_destination_delivery_settings(
    write_policy: WritePolicy,
) -> None:
    config = with_relay(write_policy(LANES + """\
destinations:
  - name: plain
    domains: [plain.example]
    rate: 10/1m
"""))
    assert "transport_maps" not in settings_of(config.main_cf())
    assert "mq-dest-" not in config.master_cf()
    assert SECTION_TRANSPORT not in split_sections(config.render())
    assert "nothing to write" in config.transport_map()
    assert compare(config, installed(config).state()) == \
        compare(generate(write_policy(LANES)), installed(config).state())


def test_a_postfix_with_the_transport_block_has_everything(write_policy: WritePolicy) -> None:
    config = with_relay(write_policy(DESTINATIONS))
    found = statuses(compare(config, installed_with_map(config).state()))
    assert set(found) == {Status.OK}
    assert "service mq-dest-partner" in found[Status.OK]
    assert "mq-dest-big_destination_rate_delay = 2s" in found[Status.OK]
    assert r"/@[^@]+\.big\.example$/ mq-dest-big:[127.0.0.1]:2525" in found[Status.OK]


def test_check_names_what_the_destination_transports_lack(write_policy: WritePolicy) -> None:
    config = with_relay(write_policy(DESTINATIONS))
    path = config.transport_map_path

    pasted = installed_with_map(config)
    del pasted.main["transport_maps"]
    del pasted.main["mq-dest-big_destination_rate_delay"]
    del pasted.services["mq-dest-partner/unix"]
    found = statuses(compare(config, pasted.state()))
    assert found[Status.MISSING] == [
        f"transport_maps: add regexp:{path}",
        "mq-dest-big_destination_rate_delay = 2s",
        "service mq-dest-partner (unix, smtp)",
    ]

    # the operator's own map first: a warning; the syslog name names the destination
    pasted = installed_with_map(config, transport_maps=f"hash:/etc/postfix/transport, "
                                                      f"regexp:{path}")
    pasted.overrides["mq-dest-big/unix"] = {}
    findings = compare(config, pasted.state())
    warnings = [f for f in findings if f.status is Status.WARNING]
    assert [f.what for f in warnings] == [
        f"transport_maps: hash:/etc/postfix/transport before regexp:{path}",
        "service mq-dest-big: no -o syslog_name"]
    assert warnings[1].detail == "the log will not show the destination"
    assert not [f for f in findings if f.status in (Status.MISSING, Status.DIFFERENT)]

    # a rule missing, a stale one (an old relay host), the file unreadable
    pasted = installed_with_map(config)
    pasted.files[path] = config.transport_map().replace(
        r"/@big\.example$/ mq-dest-big:[127.0.0.1]:2525",
        r"/@big\.example$/ mq-dest-big:[old.example]:25")
    found = statuses(compare(config, pasted.state()))
    assert found[Status.MISSING] == [r"/@big\.example$/ mq-dest-big:[127.0.0.1]:2525"]
    assert found[Status.DIFFERENT] == [r"remove /@big\.example$/ mq-dest-big:[old.example]:25"]
    pasted.files[path] = None
    assert statuses(compare(config, pasted.state()))[Status.MISSING] == [
        "the transport map (file not readable)"]

    # every line there, but not in the generated order (the first match wins)
    lines = config.transport_map().splitlines()
    pasted.files[path] = "\n".join([*lines[-1:], *lines[:-1]])
    found = statuses(compare(config, pasted.state()))
    assert found[Status.DIFFERENT] == ["the lines are not in the generated order"]


def test_the_command_takes_the_relay_host_or_says_it_is_unknown(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(DESTINATIONS)
    assert main(["postfix-config", "-c", str(path), "--relayhost", "[10.1.2.3]:25",
                 "--config-directory", str(tmp_path), "--section", "transport"]) == 0
    out = capsys.readouterr().out
    assert r"/@partner\.example$/ mq-dest-partner:[10.1.2.3]:25" in out.splitlines()

    # no Postfix configuration to read relayhost from
    assert main(["postfix-config", "-c", str(path),
                 "--config-directory", str(tmp_path / "missing")]) == 0
    captured = capsys.readouterr()
    assert "relay host unknown" in captured.err
    assert "# NOTE: relay host unknown" in captured.out
    assert r"/@partner\.example$/ mq-dest-partner:" in captured.out.splitlines()


@pytest.mark.skipif(not Path(POSTCONF.path).exists(), reason="postconf not installed")
def test_the_transport_section_says_what_postconf_reports_of_the_relay_host(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    relayed = tmp_path / "relayed"
    relayed.mkdir()
    (relayed / "main.cf").write_text("relayhost = [relay.example]:587\n")
    direct = tmp_path / "direct"
    direct.mkdir()
    (direct / "main.cf").write_text("myhostname = mx.example\n")

    def transport_section(policy_text: str, postfix_dir: Path) -> tuple[str, str]:
        path = tmp_path / "p.yaml"
        path.write_text(policy_text)
        assert main(["postfix-config", "-c", str(path), "--section", "transport",
                     "--config-directory", str(postfix_dir)]) == 0
        out = capsys.readouterr()
        return out.out, out.err

    # no destination transports: an empty map; nothing about a relay host it cannot know
    # (mail keeps going where main.cf sends it, relayhost included)
    for postfix_dir in (relayed, direct, tmp_path / "none"):
        text, err = transport_section(LANES, postfix_dir)
        assert "nothing to write" in text
        assert "unknown" not in text + err
        assert "bypassing" not in text
        assert "next hop" not in text.lower()
        assert [line for line in text.splitlines() if not line.startswith("#")] == []
    # destination transports: the relay host main.cf has, or MX delivery when it has none
    text, err = transport_section(DESTINATIONS, relayed)
    assert "# Next hop [relay.example]:587: your relayhost." in text
    assert r"/@partner\.example$/ mq-dest-partner:[relay.example]:587" in text.splitlines()
    assert "unknown" not in text + err
    text, err = transport_section(DESTINATIONS, direct)
    assert "# No relayhost: an empty next hop" in text
    assert r"/@partner\.example$/ mq-dest-partner:" in text.splitlines()
    assert "unknown" not in text + err
