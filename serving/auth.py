"""API tokens for the BentoML service, which ``serving.guards.TokenAuthMiddleware`` wants as ``Authorization:
Bearer <token>`` on every path but the health endpoints (docs/SERVING.md, "Security").

    SVERTKA_API_TOKEN=$(openssl rand -hex 32) bentoml serve
    SVERTKA_API_TOKEN_FILE=/run/secrets/svertka_tokens bentoml serve     # one token a line, read when it changes
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import sys
from collections.abc import Mapping
from pathlib import Path

import click

TOKEN_ENV = "SVERTKA_API_TOKEN"
TOKEN_FILE_ENV = "SVERTKA_API_TOKEN_FILE"


class TokenError(ValueError):
    """Token settings that cannot be used (a missing or unreadable file, a file with no token, ...)."""


def parse_tokens(text: str, source: str) -> list[bytes]:
    """One token a line; blank lines and ``#`` comments are skipped. Messages give line numbers, never tokens."""
    tokens = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if len(line.split()) != 1:
            raise TokenError(f"{source}: line {number} holds more than one word (a token has no spaces)")
        tokens.append(line.encode())
    return tokens


class Tokens:
    """The accepted tokens: ``SVERTKA_API_TOKEN`` plus the lines of ``SVERTKA_API_TOKEN_FILE``, kept current."""

    def __init__(self, token: str | None = None, file: str | Path | None = None) -> None:
        self.fixed = parse_tokens(token, TOKEN_ENV) if token else []
        self.file = Path(file).expanduser().absolute() if file else None
        self.from_file: list[bytes] = []
        self.stamp: tuple[int, ...] | None = None  # the file's (mtime, size, inode, ctime) when last read
        if self.file is not None:  # at start a bad file stops the server with a clear line
            self._reload()
        elif not self.fixed:
            raise TokenError(f"{TOKEN_ENV} is blank")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Tokens | None:
        """The tokens the environment sets up, or None when auth is off; ``TokenError`` if unusable."""
        token, file = environ.get(TOKEN_ENV, ""), environ.get(TOKEN_FILE_ENV, "").strip()
        return cls(token or None, file or None) if token or file else None

    def _reload(self) -> None:
        """Read the file again if its stamp changed; ``TokenError`` if it cannot be read or holds no token, its
        tokens then dropped (fail closed) until it changes and is usable again."""
        where = f"{TOKEN_FILE_ENV}={self.file}"
        try:
            st = self.file.stat()
        except OSError as e:
            self.stamp, self.from_file = None, []
            raise TokenError(f"{where}: {e.strerror or e}") from None
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino, st.st_ctime_ns)
        if stamp == self.stamp:
            return
        self.stamp, self.from_file = stamp, []
        try:
            self.from_file = parse_tokens(self.file.read_text(), where)
        except OSError as e:
            raise TokenError(f"{where}: cannot read it ({e.strerror or e})") from None
        except UnicodeDecodeError:
            raise TokenError(f"{where}: not UTF-8 text") from None
        if not self.from_file:
            raise TokenError(f"{where} holds no token (one token a line; blank lines and # comments are skipped)")

    def current(self) -> list[bytes]:
        """Every accepted token, the file's as of its last change; a file gone bad is warned about once."""
        if self.file is not None:
            seen = self.stamp
            try:
                self._reload()
            except TokenError as e:
                if self.stamp != seen:
                    print(f"warning: {e}; no token from that file is accepted until it is fixed", file=sys.stderr)
        return self.fixed + self.from_file

    def accepts(self, candidate: bytes) -> bool:
        """Constant-time check against every token (no early exit, so timing says nothing about which)."""
        ok = False
        for token in self.current():
            ok |= hmac.compare_digest(candidate, token)
        return ok and bool(candidate)


def should_warn(tokens: Tokens | None, host: str | None) -> bool:
    """Whether no token is set and ``host`` (None: not serving) is beyond loopback (127.0.0.0/8, ::1, localhost)."""
    if tokens is not None or host is None or host.strip().lower() == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return True


def serve_host() -> str | None:
    """The host ``bentoml serve`` is about to bind, when this process is that command (its click context has a
    ``host`` option, ``--host`` or ``BENTOML_HOST``; workers run another command), else None."""
    ctx = click.get_current_context(silent=True)
    if ctx is None or "host" not in ctx.params:
        return None
    host = ctx.params["host"]
    if not host:
        # BentoML 1.4.40 has no public read of its configuration: bentoml.save_config fails (bentoml/BentoML#5726).
        from bentoml._internal.configuration.containers import BentoMLContainer

        host = BentoMLContainer.http.host.get()
    return str(host)


def startup(environ: Mapping[str, str] = os.environ) -> Tokens | None:
    """The tokens for ``TokenAuthMiddleware``; one ``error:`` line and exit if unusable; the open-server warning."""
    try:
        tokens = Tokens.from_env(environ)
    except TokenError as e:
        sys.exit(f"error: {e}")
    host = serve_host()
    if should_warn(tokens, host):
        print(
            f"warning: no API token is set and the server listens on {host} (beyond this machine): anyone who "
            f"can reach the port can use every API. Set {TOKEN_ENV} or {TOKEN_FILE_ENV} (docs/SERVING.md), or "
            "serve with --host 127.0.0.1",
            file=sys.stderr,
            flush=True,
        )
    return tokens
