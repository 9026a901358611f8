"""Listen/connect endpoints: ``127.0.0.1:10040``, ``[::1]:10040``, ``unix:/path``. Pure."""

from __future__ import annotations

from dataclasses import dataclass


class EndpointSyntaxError(ValueError):
    """An endpoint string that cannot be parsed."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A TCP ``host``/``port`` pair or a unix socket ``path`` (with its file ``mode``)."""

    host: str = ""
    port: int = 0
    path: str = ""
    mode: int = 0o660

    @property
    def is_unix(self) -> bool:
        return bool(self.path)

    def __str__(self) -> str:
        if self.path:
            return f"unix:{self.path}"
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    def postfix_form(self) -> str:
        """How Postfix names it in ``check_policy_service``: ``inet:h:p`` or ``unix:/p``."""
        if self.path:
            return f"unix:{self.path}"
        return f"inet:{self.host}:{self.port}"


def parse_endpoint(text: str, *, mode: int = 0o660) -> Endpoint:
    text = text.strip()
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if not path.startswith("/"):
            raise EndpointSyntaxError(f"unix socket path must be absolute: {text!r}")
        return Endpoint(path=path, mode=mode)
    if text.startswith("inet:"):
        text = text[len("inet:") :]
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise EndpointSyntaxError(f"bad endpoint {text!r} (use [::1]:10040)")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise EndpointSyntaxError(f"bad endpoint {text!r} (use HOST:PORT or unix:/path)")
    try:
        port = int(port_text)
    except ValueError:
        raise EndpointSyntaxError(f"bad port in endpoint {text!r}") from None
    if not 0 <= port <= 65535:
        raise EndpointSyntaxError(f"port out of range in endpoint {text!r}")
    return Endpoint(host=host, port=port)
