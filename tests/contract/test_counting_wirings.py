"""The counting contract (issue 16) through a real Postfix, one test per cell and wiring:
P (the policy server only), M (the milter only), B (both hooks and the milter, what
``mqpolicy postfix-config --milter`` prints), B2 (B as two processes on Redis) x {a
refused recipient, header limit, lane-scoped limit, hold, demotion, a refused message's
give-back, a message that can never fit (refused, or held), the decision log}.

Each wiring is one private Postfix with ``mqpolicy serve`` running every cell's limits
(tests/support/postfix_wirings.py, tests/support/wiring_cells.py); each test uses a HELO
name and a recipient domain of its own. Each limit must count exactly once, in the lane the
message leaves in (the transport of Postfix's delivery log, the milter's ``X-MQ-Lane``),
and refused or held mail must cost nothing: the budgets are read from serve's admin
socket.
"""

from __future__ import annotations

import pytest

from tests.support import wiring_cells as cells
from tests.support.postfix_wirings import (
    POLICY_HOOKS,
    PostfixWiring,
    active_settings,
    postfix_wiring,  # noqa: F401  (the session fixture, one per wiring)
)

pytestmark = pytest.mark.e2e


def test_each_wiring_is_what_postfix_config_prints(
    postfix_wiring: PostfixWiring,  # noqa: F811
) -> None:
    """P: both policy hooks, no milter; M: the milter, no policy hook; B and B2: both."""
    wiring = postfix_wiring
    settings = active_settings(wiring.main_cf)
    hooks = {name: settings.get(name, "") for name in POLICY_HOOKS}
    policy_hooked = all(v.startswith("check_policy_service ") for v in hooks.values())
    assert policy_hooked == (wiring.name in ("P", "B", "B2")), hooks
    if wiring.name == "M":
        assert not any(hooks.values()), hooks
    milters = {name: settings.get(name, "") for name in ("smtpd_milters", "non_smtpd_milters")}
    if wiring.name == "P":
        assert milters == {"smtpd_milters": "", "non_smtpd_milters": ""}, milters
    else:
        assert milters == {"smtpd_milters": "unix:mqpolicy/milter.sock",
                           "non_smtpd_milters": "unix:mqpolicy/milter.sock"}, milters


def test_a_refused_recipient_is_deferred_alone_and_not_counted(
    postfix_wiring: PostfixWiring,  # noqa: F811
) -> None:
    cells.refused_recipient(postfix_wiring)


def test_a_header_limit_passes_one_of_three(
    postfix_wiring: PostfixWiring,  # noqa: F811
) -> None:
    cells.header_limit(postfix_wiring)


def test_check_warns_about_header_conditions_only_without_a_milter(
    postfix_wiring: PostfixWiring,  # noqa: F811
) -> None:
    """Without a ``milter:`` section header conditions never match: ``mqpolicy check``
    says so for each rule and limit that has one (a line with "warn" and its name)."""
    wiring = postfix_wiring
    checked = wiring.check()
    assert checked.returncode == 0, checked.stdout + checked.stderr
    output = (checked.stdout + checked.stderr).splitlines()
    warned = {name for name in cells.HEADER_CONDITIONED
              if any("warn" in line.lower() and name in line for line in output)}
    if wiring.sees_headers:
        assert warned == set(), output
    else:
        assert warned == set(cells.HEADER_CONDITIONED), output


@pytest.mark.parametrize("bulk_by", cells.BULK_BY)
def test_a_lane_scoped_limit_is_not_charged_by_mail_leaving_in_another_lane(
    postfix_wiring: PostfixWiring, bulk_by: str,  # noqa: F811
) -> None:
    cells.lane_scoped_limit(postfix_wiring, bulk_by)


@pytest.mark.parametrize("bulk_by", cells.BULK_BY)
def test_a_bulk_hold_limit_holds_the_second_bulk_message(
    postfix_wiring: PostfixWiring, bulk_by: str,  # noqa: F811
) -> None:
    cells.hold(postfix_wiring, bulk_by)


def test_demoted_mail_meets_the_limits_of_its_new_lane(
    postfix_wiring: PostfixWiring,  # noqa: F811
) -> None:
    cells.demotion(postfix_wiring)


def test_a_message_refused_at_the_end_of_data_gives_its_recipient_budget_back(
    postfix_wiring: PostfixWiring,  # noqa: F811
) -> None:
    cells.give_back(postfix_wiring)


def test_a_message_that_can_never_fit_is_refused_for_good(
    postfix_wiring: PostfixWiring,  # noqa: F811
) -> None:
    cells.never_fits(postfix_wiring)


def test_a_message_that_can_never_fit_waits_in_the_hold_queue_when_so_configured(
    postfix_wiring: PostfixWiring,  # noqa: F811
) -> None:
    cells.never_fits_held(postfix_wiring)


def test_the_decision_log_says_what_was_done(
    postfix_wiring: PostfixWiring,  # noqa: F811
) -> None:
    cells.decision_log(postfix_wiring)
