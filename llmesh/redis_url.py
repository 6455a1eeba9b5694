"""Redis URLs with a password in them: built once, never shown.

Services get their Redis password inside their redis URL (``redis://:<password>@host:port/db``),
so anything that logs or reports the URL must use ``redact`` first.
"""

from __future__ import annotations

from urllib.parse import quote, urlsplit, urlunsplit


def with_password(host: str, port: int, password: str, db: int = 0) -> str:
    auth = f":{quote(password, safe='')}@" if password else ""
    return f"redis://{auth}{host}:{port}/{db}"


def redact(url: str) -> str:
    """The URL with its password (if any) replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
