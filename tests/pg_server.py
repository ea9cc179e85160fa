"""A throw-away PostgreSQL server for tests: the distribution's binaries, a fresh data directory, 127.0.0.1
on a free port, password authentication; stopped by its postmaster's PID at the end.

initdb and postgres refuse to run as root: as root they run as the ``postgres`` system user (which the
distribution's package creates), and the data directory is made over to that user.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_SERVER_USER = "postgres"


def find_bindir() -> Path | None:
    """The newest ``/usr/lib/postgresql/<version>/bin`` with initdb (Debian, Ubuntu), or initdb's folder on
    PATH (pg_config --bindir first: PATH may hold links to one version's binaries)."""

    def version(path: str) -> tuple[int, ...]:
        return tuple(int(x) for x in re.findall(r"\d+", Path(path).parent.parent.name)) or (0,)

    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=version, reverse=True)
    if candidates:
        return Path(candidates[0]).parent
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=10)
            bindir = Path(out.stdout.strip())
            if (bindir / "initdb").is_file() and (bindir / "postgres").is_file():
                return bindir
    initdb = shutil.which("initdb")
    if initdb is not None and shutil.which("postgres", path=str(Path(initdb).parent)):
        return Path(initdb).resolve().parent
    return None


def unavailable_reason() -> str | None:
    """Why no server can be started here, or None."""
    if find_bindir() is None:
        return "PostgreSQL is not installed (apt-get install postgresql; .ci/run installs it)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(_SERVER_USER)
        except KeyError:
            return f"running as root and there is no {_SERVER_USER!r} user to run the server as"
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        return "psycopg2 is not installed (pip install -e '.[postgres]')"
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PgServer:
    bindir: Path
    datadir: Path
    port: int
    user: str
    password: str
    pid: int

    def url(self, database: str, driver: str = "postgresql+psycopg2") -> str:
        return f"{driver}://{self.user}:{self.password}@127.0.0.1:{self.port}/{database}"

    def connect(self, database: str = "postgres") -> Any:
        import psycopg2

        return psycopg2.connect(
            host="127.0.0.1", port=self.port, user=self.user, password=self.password, dbname=database
        )

    def create_database(self, name: str) -> str:
        """A fresh database; returns its SQLAlchemy URL."""
        con = self.connect()
        try:
            con.autocommit = True
            with con.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            con.close()
        return self.url(name)

    def query(self, database: str, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        con = self.connect(database)
        try:
            with con.cursor() as cur:
                cur.execute(sql, params)
                return list(cur.fetchall())
        finally:
            con.close()

    def stop(self) -> None:
        """Immediate shutdown (SIGQUIT to the postmaster: no checkpoint, the data is thrown away), then
        SIGKILL if it lingers; removes the data directory."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGQUIT)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and _alive(self.pid):
            time.sleep(0.05)
        if _alive(self.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        shutil.rmtree(self.datadir, ignore_errors=True)


def _alive(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError):  # our child: reap it once it exits
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _run_as(user: pwd.struct_passwd | None) -> dict[str, Any]:
    if user is None:
        return {}
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


def start(*, attempts: int = 3) -> PgServer:
    """Initialise a data directory under the system temp dir and start a server on 127.0.0.1."""
    bindir = find_bindir()
    if bindir is None:
        raise RuntimeError("PostgreSQL is not installed")
    owner = pwd.getpwnam(_SERVER_USER) if os.geteuid() == 0 else None
    # not under pytest's tmp_path: as root its folders are 0700, which the postgres user cannot enter
    datadir = Path(tempfile.mkdtemp(prefix="evomerge-pg-"))
    password = secrets.token_hex(16)
    env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
    try:
        pwfile = datadir / "pw"
        pwfile.write_text(password + "\n")
        data = datadir / "data"
        if owner is not None:
            os.chown(datadir, owner.pw_uid, owner.pw_gid)
            os.chown(pwfile, owner.pw_uid, owner.pw_gid)
        subprocess.run(
            [
                str(bindir / "initdb"),
                "-D",
                str(data),
                "-U",
                "evomerge",
                "--pwfile",
                str(pwfile),
                "--auth=scram-sha-256",
                "--encoding=UTF8",
                "--no-sync",
            ],
            check=True,
            capture_output=True,
            env=env,
            cwd=datadir,
            **_run_as(owner),
        )
        pwfile.unlink()
        last = ""
        for _ in range(attempts):  # the free port may be taken between finding it and binding it
            port = free_port()
            log = datadir / "server.log"
            with log.open("ab") as stderr:
                proc = subprocess.Popen(
                    [
                        str(bindir / "postgres"),
                        "-D",
                        str(data),
                        "-p",
                        str(port),
                        "-c",
                        "listen_addresses=127.0.0.1",
                        "-c",
                        f"unix_socket_directories={datadir}",
                        "-c",
                        "fsync=off",
                        "-c",
                        "synchronous_commit=off",
                        "-c",
                        "full_page_writes=off",
                        "-c",
                        "max_connections=200",
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=stderr,
                    env=env,
                    cwd=datadir,
                    start_new_session=True,  # a Ctrl-C of pytest does not reach it; stop() ends it
                    **_run_as(owner),
                )
            server = PgServer(bindir, datadir, port, "evomerge", password, proc.pid)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    server.connect().close()
                    return server
                except Exception:  # still starting up
                    time.sleep(0.1)
            if proc.poll() is None:
                server.stop()
                raise RuntimeError("PostgreSQL did not accept connections within 30 s")
            last = log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"PostgreSQL did not start: {last}")
    except BaseException:
        shutil.rmtree(datadir, ignore_errors=True)
        raise


@contextlib.contextmanager
def running() -> Iterator[PgServer]:
    server = start()
    try:
        yield server
    finally:
        server.stop()
