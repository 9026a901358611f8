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


# ---------------------------------------------------------------- libmilter sockets


class MilterEndpointError(EndpointSyntaxError):
    """A ``milter.listen`` value that cannot be parsed."""


@dataclass(frozen=True, slots=True)
class MilterEndpoint:
    """``unix:/path``, ``inet:PORT@HOST``, ``inet6:PORT@HOST`` or ``fd:N``."""

    kind: str  # "unix", "inet", "inet6", "fd"
    path: str = ""
    host: str = ""
    port: int = 0
    fd: int = -1

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        if self.kind == "fd":
            return f"fd:{self.fd}"
        return f"{self.kind}:{self.port}@{self.host}"


def parse_milter_endpoint(text: str) -> MilterEndpoint:
    """Parse libmilter's socket syntax (``local:`` is ``unix:``; a host is required)."""
    kind, sep, rest = text.strip().partition(":")
    kind = kind.lower()
    if not sep:
        raise MilterEndpointError(
            f"bad milter socket {text!r} (use unix:/path, inet:PORT@HOST or fd:N)"
        )
    if kind in ("unix", "local"):
        if not rest.startswith("/"):
            raise MilterEndpointError(f"unix socket path must be absolute: {text!r}")
        if len(rest.encode()) > 107:
            raise MilterEndpointError(f"unix socket path too long: {text!r}")
        return MilterEndpoint("unix", path=rest)
    if kind == "fd":
        if not rest.isdigit() or int(rest) < 3:
            raise MilterEndpointError(f"fd: needs an inherited descriptor >= 3, got {text!r}")
        return MilterEndpoint("fd", fd=int(rest))
    if kind in ("inet", "inet6"):
        port_text, at, host = rest.partition("@")
        host = host.strip("[]")
        if not at or not host:
            raise MilterEndpointError(f"bad milter socket {text!r} (use inet:PORT@HOST)")
        if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
            raise MilterEndpointError(f"bad port in milter socket {text!r}")
        return MilterEndpoint(kind, host=host, port=int(port_text))
    raise MilterEndpointError(
        f"unknown milter socket type {kind!r} in {text!r} (use unix:, inet:, inet6: or fd:)"
    )
