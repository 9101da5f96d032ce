"""A private PostgreSQL cluster for the demo, the tests and the benchmarks.

PostgreSQL refuses to run as root. When this process is root, the cluster is created and run as an
unprivileged OS user (``REACTOR_PG_USER``, else ``postgres``, else ``nobody``); for anyone else it
runs as the current user. It listens on 127.0.0.1 only, with trust authentication, on a free port.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

from reactor.core.environment import Environment, inherited
from reactor.core.errors import EmbeddedPostgresError

__all__ = ["EmbeddedPostgres", "default_data_dir", "find_pg_bin"]

#: Settings for a throwaway cluster: fast, not crash-safe.
FAST_SETTINGS: Mapping[str, str] = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "300",
    "shared_buffers": "128MB",
}


def find_pg_bin(env: Environment | None = None) -> Path:
    """Directory holding ``pg_ctl``, ``initdb`` and ``postgres`` (``$REACTOR_PG_BIN`` first)."""
    explicit = (env or Environment.read()).pg_bin
    if explicit:
        return Path(explicit)
    found = shutil.which("pg_ctl")
    if found:
        return Path(os.path.realpath(found)).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), reverse=True)
    if candidates:
        return Path(candidates[0]).parent
    raise EmbeddedPostgresError(
        "PostgreSQL server binaries not found: install them (Debian: postgresql) "
        "or set REACTOR_PG_BIN to the directory that holds pg_ctl"
    )


def default_data_dir(env: Environment | None = None) -> Path:
    """Where ``reactor demo`` and ``reactor run`` without ``--dsn`` keep their cluster."""
    env = env or Environment.read()
    explicit = env.embedded_dir
    if explicit:
        return Path(explicit)
    if os.geteuid() == 0:
        # the unprivileged server user cannot enter /root
        return Path("/var/tmp/reactor-embedded")
    base = env.xdg_data_home or str(Path.home() / ".local" / "share")
    return Path(base) / "reactor" / "embedded"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _server_user(env: Environment) -> pwd.struct_passwd | None:
    """The OS user to run the server as, or None to run as ourselves."""
    if os.geteuid() != 0:
        return None
    names = [env.pg_user or "", "postgres", "nobody"]
    for name in filter(None, names):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise EmbeddedPostgresError(
        "running as root, and no unprivileged user to run PostgreSQL as: "
        "create one (useradd postgres) or set REACTOR_PG_USER"
    )


class EmbeddedPostgres:
    """One private cluster in ``base_dir``: ``start()``, ``stop()``, ``restart()``, ``dsn``."""

    def __init__(
        self,
        base_dir: Path | None = None,
        *,
        port: int | None = None,
        settings: Mapping[str, str] | None = None,
        env: Environment | None = None,
    ) -> None:
        self._owns_dir = base_dir is None
        self.base_dir = base_dir or Path(tempfile.mkdtemp(prefix="reactor-pg-"))
        self.data_dir = self.base_dir / "data"
        self.log_file = self.base_dir / "postgres.log"
        self.port = port
        self.settings = dict(FAST_SETTINGS if settings is None else settings)
        self.user = "postgres"
        self.host = "127.0.0.1"
        self.password: str | None = None
        self.options = ""
        self.maintenance_dbname = "postgres"
        self.template_dbname: str | None = None
        env = env or Environment.read()
        self._bin = find_pg_bin(env)
        self._os_user = _server_user(env)

    # -- what pytest-postgresql's noproc fixture reads -------------------------------------------

    @property
    def dbname(self) -> str:
        return "postgres"

    def dsn_for(self, dbname: str) -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{dbname}"

    @property
    def dsn(self) -> str:
        return self.dsn_for("postgres")

    # -- lifecycle -------------------------------------------------------------------------------

    def _run(self, args: list[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
        kwargs: dict[str, object] = {}
        if self._os_user is not None:
            kwargs = {
                "user": self._os_user.pw_uid,
                "group": self._os_user.pw_gid,
                "extra_groups": [],
            }
        env = inherited(without_prefix="PG")
        env["LC_ALL"] = "C.UTF-8" if "C.UTF-8" in _locales() else "C"
        proc: subprocess.CompletedProcess[str] = subprocess.run(  # type: ignore[call-overload]
            args,
            cwd=self.base_dir,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            **kwargs,
        )
        if check and proc.returncode != 0:
            log = ""
            with contextlib.suppress(OSError):
                log = self.log_file.read_text()[-2000:]
            raise EmbeddedPostgresError(
                f"{Path(args[0]).name} failed ({proc.returncode}): "
                f"{proc.stderr.strip() or proc.stdout.strip()}\n{log}"
            )
        return proc

    def _prepare_dir(self) -> None:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        if self._os_user is not None:
            for parent in self.base_dir.resolve().parents:
                if not parent.stat().st_mode & 0o001:
                    raise EmbeddedPostgresError(
                        f"{parent} is closed to other users, so PostgreSQL (running as "
                        f"{self._os_user.pw_name}) cannot reach {self.base_dir}: open it to others "
                        f"(chmod o+x {parent}) or choose a directory such as /var/tmp/reactor"
                    )
            os.chown(self.base_dir, self._os_user.pw_uid, self._os_user.pw_gid)
        self.base_dir.chmod(0o700)

    def initialised(self) -> bool:
        return (self.data_dir / "PG_VERSION").exists()

    def running(self) -> bool:
        if not self.initialised():
            return False
        proc = self._run([str(self._bin / "pg_ctl"), "-D", str(self.data_dir), "status"], check=False)
        return proc.returncode == 0

    def _port_file(self) -> Path:
        return self.base_dir / "port"

    def start(self) -> str:
        """Create the cluster if needed, start it (or find it running), return its DSN."""
        self._prepare_dir()
        if not self.initialised():
            self._run([
                str(self._bin / "initdb"), "-D", str(self.data_dir), "-U", self.user,
                "--auth=trust", "-E", "UTF8", "--no-locale", "--no-sync",
            ])
        if self.running():
            with contextlib.suppress(OSError, ValueError):
                self.port = int(self._port_file().read_text())
                return self.dsn
        if self.port is None:
            self.port = _free_port()
        opts = [f"-p {self.port}", "-c listen_addresses=127.0.0.1",
                f"-c unix_socket_directories={self.base_dir}"]
        opts += [f"-c {k}={v}" for k, v in self.settings.items()]
        self._run([
            str(self._bin / "pg_ctl"), "-D", str(self.data_dir), "-l", str(self.log_file),
            "-o", " ".join(opts), "-w", "-t", "60", "start",
        ])
        self._port_file().write_text(str(self.port))
        self._wait_ready()
        return self.dsn

    def _wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection((self.host, self.port or 0), timeout=1):
                    return
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise EmbeddedPostgresError(f"PostgreSQL did not accept connections: {exc}") from exc
                time.sleep(0.05)

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (mode: smart, fast or immediate)."""
        if self.running():
            self._run([str(self._bin / "pg_ctl"), "-D", str(self.data_dir), "-m", mode, "-w", "stop"])

    def restart(self, mode: str = "fast") -> None:
        """Stop and start again on the same port."""
        self.stop(mode)
        self.start()

    def destroy(self) -> None:
        """Stop the server and remove its files."""
        with contextlib.suppress(EmbeddedPostgresError):
            self.stop("immediate")
        shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedPostgres:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._owns_dir:
            self.destroy()
        else:
            self.stop()


def _locales() -> str:
    try:
        return subprocess.run(["locale", "-a"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
