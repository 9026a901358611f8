"""Where Postfix's programs are: ``/usr/sbin/<name>``, or the path the environment variable
``MQPOLICY_<NAME>`` gives (``MQPOLICY_POSTCONF``, ``MQPOLICY_POSTQUEUE``...).

Every part that runs one (the scheduler and ``mqpolicy queue``, ``postfix-config``,
``mqpolicy demo`` and the tests' private Postfix) takes its path from here, read when it is
about to run it: a unit's ``Environment=`` and a test's environment name another program the
same way for all of them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

SBIN = "/usr/sbin"


@dataclass(frozen=True, slots=True)
class PostfixProgram:
    """One of Postfix's programs, by name (``postconf``)."""

    name: str

    @property
    def variable(self) -> str:
        """The environment variable that overrides its path: ``MQPOLICY_POSTCONF``."""
        return f"MQPOLICY_{self.name.upper()}"

    @property
    def path(self) -> str:
        """The path to run: the override when set, else ``/usr/sbin/<name>``."""
        return os.environ.get(self.variable, f"{SBIN}/{self.name}")


POSTFIX = PostfixProgram("postfix")
POSTCONF = PostfixProgram("postconf")
POSTQUEUE = PostfixProgram("postqueue")
POSTSUPER = PostfixProgram("postsuper")
