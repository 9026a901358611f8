"""Policy files that must not empty the policy, through the commands as operators run them:
``mqpolicy check``, ``mqpolicy serve`` at start, and a running ``serve`` sent SIGHUP after
its file was truncated, turned into an alias bomb or grown past the size bound."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from mqpolicy.policy.loader import MAX_POLICY_BYTES
from tests.support.lanes import RESETS_LANES
from tests.support.mqpolicy_command import mq
from tests.support.serve_process import ServeProcess, free_port

BOMB = 'l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n' + "".join(
    f"l{n}: &l{n} [" + ", ".join([f"*l{n - 1}"] * 9) + "]\n" for n in range(1, 10)
) + "limits: *l9\n"


def serve_config(port: int, rate: str = "1/1h") -> str:
    return f"""\
listen: [127.0.0.1:{port}]
{RESETS_LANES}limits:
  - {{name: per-sender, rate: {rate}, key: sender, count: messages}}
"""


def message(sender: str, n: int) -> dict[str, str]:
    return {"request": "smtpd_access_policy", "protocol_state": "END-OF-MESSAGE",
            "sender": sender, "recipient_count": "1", "client_address": "192.0.2.3",
            "queue_id": f"Q{sender.split('@')[0]}{n}"}


@pytest.mark.parametrize("text", ["", " \n\n", "# nothing yet\n"])
def test_check_calls_an_empty_file_an_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "mqpolicy.yaml"
    path.write_text(text)
    result = mq("check", "-c", str(path))
    assert result.returncode == 1
    assert result.stdout.splitlines()[0].startswith(f"{path}: the policy is empty")
    assert result.stdout.splitlines()[-1] == f"1 error(s) in {path}"


def test_check_refuses_an_alias_bomb_and_an_oversized_file(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BOMB)
    result = mq("check", "-c", str(bomb))
    assert result.returncode == 1
    assert result.stdout.startswith(f"{bomb}:")
    assert "YAML: aliases repeat more than 100000 values" in result.stdout
    big = tmp_path / "big.yaml"
    big.write_text("{}\n" + "#" * MAX_POLICY_BYTES)
    result = mq("check", "-c", str(big))
    assert result.returncode == 1
    assert f"{big}: the file is too large" in result.stdout


def test_serve_does_not_start_on_an_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "mqpolicy.yaml"
    path.write_text("\n")
    result = mq("serve", "-c", str(path))
    assert result.returncode == 1
    assert "invalid policy file, nothing started" in result.stderr
    assert f"{path}: the policy is empty" in result.stderr


@pytest.mark.e2e
def test_a_sighup_with_an_empty_hostile_or_oversized_file_keeps_the_limits(
        tmp_path: Path) -> None:
    """The sender's budget of 1 is spent; each broken file is refused at SIGHUP with a log
    line, and the limit still defers; a good file afterwards is applied (the SIGHUPs were
    read, not lost)."""
    port = free_port()
    config = tmp_path / "mqpolicy.yaml"
    config.write_text(serve_config(port))
    proc = ServeProcess(config, port, tmp_path / "serve.log")
    proc.start()
    try:
        assert proc.ask(message("a@example.com", 0)) == "DUNNO"
        assert proc.ask(message("a@example.com", 1)).startswith("450 4.7.1")
        broken = [
            ("", "the policy is empty"),  # an editor's truncated write
            ("  \n# limits: gone\n", "the policy is empty"),
            (BOMB, "aliases repeat more than 100000 values"),
            (serve_config(port, "1000/1h") + "#" * MAX_POLICY_BYTES, "the file is too large"),
        ]
        for n, (text, problem) in enumerate(broken, start=1):
            config.write_text(text)
            proc.signal(signal.SIGHUP)
            proc.wait_logged("reload refused, keeping the running policy", count=n)
            assert proc.log_text().count(problem) >= 1, proc.log_text()
            assert proc.ask(message("a@example.com", 10 + n)).startswith("450 4.7.1")
            assert proc.ask(message(f"fresh{n}@example.com", 0)) == "DUNNO"
        assert "policy reloaded" not in proc.log_text()

        config.write_text(serve_config(port, "1000/1h"))
        proc.signal(signal.SIGHUP)
        proc.wait_logged("policy reloaded")
        assert proc.ask(message("a@example.com", 99)) == "DUNNO"
        assert proc.stop() == 0
    finally:
        proc.stop()
