"""The Redis that ``llmesh up`` runs: durable, password-protected, never left behind.

Everything lives in one data folder (``--data-dir``, ``$LLMESH_DATA_DIR``, else
``$XDG_DATA_HOME/llmesh`` or ``~/.local/share/llmesh``), so keys and usage outlive the
mesh, its temporary run folder and any Redis restart:

* ``redis/``            Redis's working folder: its append-only file (AOF, fsync every
                        second, so a ``kill -9`` loses at most the last second of usage),
                        ``redis.conf`` and ``redis.pid``.
* ``redis.password``    the password (generated once per data folder, mode 0600). It is
                        written into ``redis.conf`` (0600), never on a command line, and
                        reaches the services inside their redis URL.
* ``launcher.lock``     held (flock) by the running ``llmesh up``: a second launcher on the
                        same folder is refused; a SIGKILLed one releases it with its death.

A Redis whose launcher was SIGKILLed dies with it (parent-death signal, see
``llmesh.parent_death``); should one survive anyway (a kernel without the signal, a
manual start), its pidfile lets the next ``llmesh up`` stop it before starting.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import signal
import time
from pathlib import Path

DATA_DIR_ENV = "LLMESH_DATA_DIR"


def default_data_dir() -> Path:
    if os.environ.get(DATA_DIR_ENV):
        return Path(os.environ[DATA_DIR_ENV])
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "llmesh"


def _conf_str(value: str) -> str:
    """A value quoted for redis.conf (paths may hold spaces)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` atomically, readable by the owner only."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _is_redis(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"redis-server" in cmdline


class LocalRedis:
    """The data folder of one ``llmesh up`` and what its Redis needs from it."""

    def __init__(self, data_dir: str | Path) -> None:
        self.data_dir = Path(data_dir).expanduser()
        self.redis_dir = self.data_dir / "redis"
        self.password_file = self.data_dir / "redis.password"
        self.conf_file = self.redis_dir / "redis.conf"
        self.pid_file = self.redis_dir / "redis.pid"
        self.lock_file = self.data_dir / "launcher.lock"
        self._lock_fd: int | None = None

    def password(self) -> str:
        """The folder's Redis password, created (0600) on first use."""
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            text = self.password_file.read_text().strip()
        except FileNotFoundError:
            text = ""
        if not text:
            text = secrets.token_urlsafe(32)
            _write_private(self.password_file, text + "\n")
        elif self.password_file.stat().st_mode & 0o077:
            os.chmod(self.password_file, 0o600)  # a copied-in file: keep the secret private
        return text

    def write_conf(self, password: str) -> None:
        """redis.conf: persistence and the password. Host and port come on the command line."""
        self.redis_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        _write_private(self.conf_file, "\n".join([
            f"dir {_conf_str(str(self.redis_dir))}",
            f"pidfile {_conf_str(str(self.pid_file))}",
            "appendonly yes",
            "appendfsync everysec",
            'save ""',
            "daemonize no",
            'logfile ""',
            f"requirepass {_conf_str(password)}",
            "",
        ]))

    def argv(self, redis_server: str, host: str, port: int) -> list[str]:
        return [redis_server, str(self.conf_file), "--bind", host, "--port", str(port)]

    def acquire(self) -> str | None:
        """Take the folder's launcher lock and stop a Redis left by an earlier launcher.

        Returns a line describing what was cleaned up (None if nothing); RuntimeError
        if another ``llmesh up`` holds the folder.
        """
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RuntimeError(f"another `llmesh up` (pid {holder}) is using the data folder {self.data_dir}; "
                               "stop it, or give this one its own --data-dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd
        return self.clear_stale()

    def clear_stale(self, timeout: float = 10.0) -> str | None:
        """Stop the redis-server named by the pidfile, if it still runs (its launcher died)."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        said = None
        if _is_redis(pid):
            os.kill(pid, signal.SIGTERM)  # SIGTERM: Redis flushes its AOF before exiting
            deadline = time.monotonic() + timeout
            while _is_redis(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _is_redis(pid):
                os.kill(pid, signal.SIGKILL)
            said = f"stopped redis-server (pid {pid}) left running by an earlier llmesh up"
        self.pid_file.unlink(missing_ok=True)
        return said

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None
