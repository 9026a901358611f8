"""Policy files that must never empty the policy nor stall the loader: an empty, blank or
comments-only file, YAML alias bombs and aliases inside their own anchor, files past the
size bound, values YAML cannot hold, and a file rewritten while it is read."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mqpolicy.policy.loader import (
    MAX_POLICY_BYTES,
    READ_ATTEMPTS,
    ConfigError,
    load_policy,
    parse_policy,
)
from mqpolicy.store.urls import check_store_url

ONE_LIMIT = """\
limits:
  - {name: per-sender, rate: 1/1h, key: sender}
"""


def refusal(path: Path) -> str:
    with pytest.raises(ConfigError) as refused:
        load_policy(path, check_store_url)
    return str(refused.value)


@pytest.mark.parametrize("text", [
    pytest.param("", id="empty"),
    pytest.param("\n\n   \n\t\n", id="blank"),
    pytest.param("# limits:\n#   - {name: x, rate: 1/1h, key: sender}\n\n", id="comments"),
    pytest.param("---\n", id="document-marker"),
    pytest.param("---\n...\n", id="empty-document"),
    pytest.param("~\n", id="null"),
])
def test_a_policy_file_without_yaml_is_refused_with_its_name(tmp_path: Path, text: str) -> None:
    path = tmp_path / "mqpolicy.yaml"
    path.write_text(text)
    message = refusal(path)
    assert message.startswith(f"{path}: the policy is empty")
    with pytest.raises(ConfigError, match="the policy is empty"):
        parse_policy(text, "p.yaml")


def test_an_explicit_empty_mapping_is_every_default() -> None:
    policy = parse_policy("{}\n", "p.yaml")
    assert [lane.name for lane in policy.lanes] == ["normal"]
    assert policy.limits == ()


def billion_laughs(levels: int = 9) -> str:
    text = 'l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n'
    for n in range(1, levels + 1):
        text += f"l{n}: &l{n} [" + ", ".join([f"*l{n - 1}"] * 9) + "]\n"
    return text + f"limits: *l{levels}\n"


def test_an_alias_bomb_is_refused_before_anything_is_built(tmp_path: Path) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(billion_laughs())  # 9**10 values once expanded, about 3.5 billion
    message = refusal(path)
    assert f"{path}:" in message
    assert "aliases repeat more than 100000 values" in message


def test_an_alias_inside_its_own_anchor_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"p\.yaml:1: YAML: an alias inside its own anchor"):
        parse_policy("limits: &x [*x]\n", "p.yaml")


def test_aliases_that_share_a_condition_are_fine() -> None:
    policy = parse_policy("""\
limits:
  - name: a
    rate: 10/1h
    key: sender
    when: &customers {sender: ["@a.example", "@b.example"]}
  - name: b
    rate: 10/1h
    key: recipient
    when: *customers
""")
    assert [limit.name for limit in policy.limits] == ["a", "b"]


@pytest.mark.parametrize(("copies", "refused"), [(99, False), (100, True)])
def test_aliases_may_repeat_up_to_100000_values(copies: int, refused: bool) -> None:
    # a list of 1,000 strings is 1,001 values; 99 more copies repeat 99,099, 100 repeat
    # 100,100. Under the bound the file is read (and is no policy, which the reader says)
    text = ("classify: &many [" + ", ".join(["x"] * 1000) + "]\n"
            "limits: [" + ", ".join(["*many"] * copies) + "]\n")
    with pytest.raises(ConfigError) as error:
        parse_policy(text, "p.yaml")
    assert ("aliases repeat more than 100000 values" in str(error.value)) is refused
    if not refused:
        assert "classify" in str(error.value)


def test_a_file_past_the_size_bound_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_text("{}\n" + "#" * (MAX_POLICY_BYTES - 2))  # one byte too many
    assert os.path.getsize(path) == MAX_POLICY_BYTES + 1
    message = refusal(path)
    assert message == (f"{path}: the file is too large ({MAX_POLICY_BYTES + 1} bytes; a "
                       f"policy file may have at most {MAX_POLICY_BYTES} bytes, 1 MiB)")


def test_a_file_of_exactly_the_size_bound_is_read(tmp_path: Path) -> None:
    path = tmp_path / "full.yaml"
    path.write_text(ONE_LIMIT + "#" * (MAX_POLICY_BYTES - len(ONE_LIMIT)))
    assert os.path.getsize(path) == MAX_POLICY_BYTES
    assert [x.name for x in load_policy(path, check_store_url).limits] == ["per-sender"]


@pytest.mark.parametrize(("text", "expected"), [
    pytest.param("[" * 5000 + "]" * 5000, "YAML: nested too deeply", id="deep"),
    pytest.param("store: {timeout_ms: " + "1" * 5000 + "}\n", "YAML: Exceeds the limit",
                 id="huge-integer"),
])
def test_values_yaml_cannot_hold_are_config_errors(text: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=f"^p\\.yaml: {expected}"):
        parse_policy(text, "p.yaml")


def test_a_file_rewritten_while_it_is_read_is_read_again_whole(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The file is rewritten in place (another size) between the read and the check after
    it: what was read is not used; the next read sees the new version whole."""
    path = tmp_path / "p.yaml"
    path.write_text(ONE_LIMIT)
    new = ONE_LIMIT.replace("per-sender", "per-sender-v2")
    real_fstat = os.fstat
    calls = 0

    def fstat(fd: int) -> os.stat_result:
        nonlocal calls
        calls += 1
        if calls == 2:  # after the first read: an editor writes the file in place
            with path.open("r+") as file:
                file.truncate()
                file.write(new)
        return real_fstat(fd)

    monkeypatch.setattr(os, "fstat", fstat)
    policy = load_policy(path, check_store_url)
    assert [limit.name for limit in policy.limits] == ["per-sender-v2"]
    assert calls == 4  # two reads, each between two looks at the file


def test_a_file_that_keeps_changing_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(ONE_LIMIT)
    real_fstat = os.fstat
    calls = 0

    def fstat(fd: int) -> os.stat_result:
        nonlocal calls
        calls += 1
        if calls % 2 == 0:  # after every read: one more line
            with path.open("a") as file:
                file.write("# still writing\n")
        return real_fstat(fd)

    monkeypatch.setattr(os, "fstat", fstat)
    message = refusal(path)
    assert message == (f"{path}: the file changed while it was read ({READ_ATTEMPTS} times): "
                       "write the new version beside it and mv it into place")


def test_a_file_moved_into_place_while_it_is_open_is_read_as_the_version_opened(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``mv new p.yaml`` while the old one is read: the descriptor keeps the old file, whole
    and unchanged, so it is used; the next load reads the new one."""
    path = tmp_path / "p.yaml"
    path.write_text(ONE_LIMIT)
    staged = tmp_path / "p.yaml.new"
    staged.write_text(ONE_LIMIT.replace("per-sender", "moved-in"))
    real_fstat = os.fstat
    calls = 0

    def fstat(fd: int) -> os.stat_result:
        nonlocal calls
        calls += 1
        if calls == 1:
            staged.replace(path)
        return real_fstat(fd)

    monkeypatch.setattr(os, "fstat", fstat)
    assert [x.name for x in load_policy(path, check_store_url).limits] == ["per-sender"]
    assert calls == 2
    assert [x.name for x in load_policy(path, check_store_url).limits] == ["moved-in"]
