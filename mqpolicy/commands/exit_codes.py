"""The exit codes of the ``mqpolicy`` commands."""

from __future__ import annotations

from typing import Final

EXIT_OK: Final = 0
EXIT_FAILURE: Final = 1  # the command could not do its work
EXIT_USAGE: Final = 2  # the command line or the policy does not allow it
