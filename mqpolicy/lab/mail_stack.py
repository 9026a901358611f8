"""The lab's whole mail system: a private Postfix, an SMTP sink behind it and ``mqpolicy
serve`` beside it, configured by ``mqpolicy postfix-config``; the mail sent through it, and
where it went."""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from mqpolicy.feedback.delivery_log import DeliveryEvent, parse_delivery_lines
from mqpolicy.feedback.log_follower import LogFollower
from mqpolicy.lab.policy_server_process import PolicyServerProcess
from mqpolicy.lab.postfix_instance import PostfixInstance, backdate
from mqpolicy.lab.readiness import READY_TIMEOUT_S, free_port, poll
from mqpolicy.lab.smtp_client import Submission, make_message, submit
from mqpolicy.lab.smtp_sink import SinkMessage, ThreadedSmtpSink
from mqpolicy.policy.endpoints import Endpoint
from mqpolicy.policy.loader import load_policy
from mqpolicy.postfix.config_generator import PostfixConfigOptions, generate
from mqpolicy.scheduler.mta_queue import QueueEntry
from mqpolicy.store.urls import check_store_url


def policy_with_listen(text: str, listen: str, listen_mode: str | None = None) -> str:
    """The policy text with its ``listen`` set to ``listen`` (the stack's fresh port or
    socket), and ``listen_mode`` when given."""
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ValueError("a policy file is a mapping")
    if "listen" not in data and (listen_mode is None or "listen_mode" not in data):
        mode = f'listen_mode: "{listen_mode}"\n' if listen_mode is not None else ""
        return f"listen: [\"{listen}\"]\n{mode}{text}"
    data["listen"] = [listen]
    if listen_mode is not None:
        data["listen_mode"] = listen_mode
    return yaml.safe_dump(data, sort_keys=False)


class MailStack:
    """A private Postfix, an SMTP sink behind it and ``mqpolicy serve`` beside it.

    Postfix's mqpolicy settings are the output of ``mqpolicy postfix-config`` for the
    current policy file (run as a command), added to the instance's base configuration.
    Every port is fresh. :meth:`close` stops everything, whatever state it is in.
    """

    def __init__(self, root: Path, *, sink_hostname: str = "sink.mqpolicy.test",
                 command: Sequence[str] = (sys.executable, "-m", "mqpolicy"),
                 policy_socket: str = "tcp") -> None:
        """``policy_socket``: ``tcp`` (a fresh loopback port) or ``unix`` (a socket inside
        Postfix's queue directory, which postfix-config names relative to it)."""
        self.root = root
        self.command = tuple(command)
        self.sink = ThreadedSmtpSink(hostname=sink_hostname)
        self.policy_file = root / "policy.yaml"
        self.policy_port = free_port()
        self.instance: PostfixInstance | None = None
        self._postfix_root = root / "postfix"
        if policy_socket == "unix":
            socket_dir = PostfixInstance.queue_dir_of(self._postfix_root) / "mqpolicy"
            endpoint = Endpoint(path=str(socket_dir / "policy.sock"))
        elif policy_socket == "tcp":
            endpoint = Endpoint(host="127.0.0.1", port=self.policy_port)
        else:
            raise ValueError(f"policy_socket is tcp or unix, not {policy_socket!r}")
        self.server = PolicyServerProcess(self.policy_file, endpoint, root / "mqpolicy.log",
                                          self.command)
        self.postfix_config = ""  # the last postfix-config output used
        self._rendered = ""  # the same, rendered in this process (to skip unchanged runs)
        # the mail log from its start, read as the feedback follower reads it
        self._log = LogFollower(PostfixInstance.log_file_of(self._postfix_root),
                                start_at_end=False)
        self._deliveries: list[DeliveryEvent] = []

    @classmethod
    def create(cls, prefix: str = "mqstack-", **kwargs: Any) -> MailStack:
        root = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
        root.chmod(0o755)
        return cls(root, **kwargs)

    @property
    def postfix(self) -> PostfixInstance:
        if self.instance is None:
            raise RuntimeError("the stack is not started")
        return self.instance

    @property
    def smtp_port(self) -> int:
        return self.postfix.smtp_port

    def start(self, policy_text: str) -> None:
        """Start sink, mqpolicy and Postfix with this policy (``listen`` is replaced)."""
        try:
            port = self.sink.start()
            self.instance = PostfixInstance(self._postfix_root,
                                            relayhost=f"[127.0.0.1]:{port}")
            self.instance.root.mkdir(parents=True, exist_ok=True)
            self.instance.root.chmod(0o755)
            endpoint = self.server.endpoint
            if endpoint.path:
                Path(endpoint.path).parent.mkdir(parents=True, exist_ok=True)
            self._write_policy(policy_text)
            self._configure_postfix()
            self.server.start()
            self.instance.start()
        except BaseException:
            self.close()
            raise

    def _write_policy(self, policy_text: str) -> None:
        endpoint = self.server.endpoint
        # a unix socket smtpd (running as Postfix's mail_owner) may connect to
        text = policy_with_listen(policy_text, str(endpoint),
                                  "0666" if endpoint.path else None)
        self.policy_file.write_text(text, encoding="utf-8")

    def _configure_postfix(self) -> bool:
        """Write Postfix's config from the postfix-config command; True when it changed.

        The command takes most of a second to start; it is only run when the generator,
        called here in-process, renders something new for the policy file.
        """
        options = PostfixConfigOptions(config_directory=str(self.postfix.config_dir),
                                       queue_directory=str(self.postfix.queue_dir))
        rendered = generate(load_policy(self.policy_file, check_store_url), options).render()
        if self.postfix_config and rendered == self._rendered:
            return False
        text = self.postfix.configure_from(self.policy_file, self.command)
        self._rendered = rendered
        changed = text != self.postfix_config
        self.postfix_config = text
        return changed

    def apply_policy(self, policy_text: str) -> None:
        """Switch to a new policy: Postfix reloaded if its settings change, mqpolicy
        reloaded with SIGHUP (counters of unchanged limits survive, as in production)."""
        self._write_policy(policy_text)
        backdate([self.policy_file], 0)
        if self._configure_postfix():
            self.postfix.reload()
        if self.server.running:
            self.server.reload()
        else:
            self.server.start()

    # ------------------------------------------------------------ mail

    def send(self, sender: str, recipients: Iterable[str], subject: str = "test",
             body: str = "", headers: Mapping[str, str] | None = None) -> Submission:
        rcpts = list(recipients)
        message = make_message(sender, rcpts, subject, body, headers)
        return submit("127.0.0.1", self.smtp_port, sender, rcpts, message)

    def deliveries(self) -> list[DeliveryEvent]:
        """Every delivery result of the mail log so far."""
        while lines := self._log.poll():
            self._deliveries.extend(parse_delivery_lines(lines))
        return list(self._deliveries)

    def delivery_of(self, message: SinkMessage,
                    timeout_s: float = READY_TIMEOUT_S) -> DeliveryEvent:
        """The log line of the delivery that produced ``message`` at the sink."""
        found: list[DeliveryEvent] = []

        def logged() -> bool:
            found[:] = [d for d in self.deliveries()
                        if d.status == "sent" and d.remote_queue_id == message.sink_id]
            return bool(found)

        poll(logged, timeout_s, f"the delivery log line of sink message {message.sink_id}")
        return found[0]

    def wait_queue(self, predicate: Callable[[list[QueueEntry]], bool],
                   timeout_s: float = READY_TIMEOUT_S) -> list[QueueEntry]:
        seen: list[QueueEntry] = []

        def check() -> bool:
            seen[:] = self.postfix.queue()
            return predicate(seen)

        poll(check, timeout_s, "the Postfix queue", interval_s=0.05)
        return seen

    def reset(self) -> None:
        """Empty the queue and the sink's records, restore normal sink replies."""
        if self.instance is not None and self.instance.running:
            self.instance.delete("ALL")
            self.instance.flush()  # also lifts any "delivery temporarily suspended"
        self.sink.clear()
        self.sink.clear_replies()

    def close(self) -> None:
        """Stop Postfix, mqpolicy and the sink (each even if another fails)."""
        try:
            if self.instance is not None:
                self.instance.stop()
        finally:
            try:
                self.server.stop()
            finally:
                self.sink.stop()

    def remove(self) -> None:
        """:meth:`close`, then forget the mail log and delete the whole directory tree."""
        try:
            self.close()
        finally:
            self._log.close()
            shutil.rmtree(self.root, ignore_errors=True)
