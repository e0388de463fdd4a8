"""A durable content-addressed cache for model calls: student losses, teacher replies.

Values are written as each chunk of work finishes, so a run killed half-way keeps what it computed,
and a rerun asks the model only for what is missing. SQLite (a file) serves one machine; PostgreSQL
(a ``postgresql://`` location) serves every worker of a cluster at once, with the same keys.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit


def content_key(*parts: Any) -> str:
    """A stable key for any JSON-serializable parts (model id, messages, parameters, token ids)."""
    payload = json.dumps(parts, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class CallCache(Protocol):
    """What the model sessions need of a cache, whichever database holds it."""

    def get_many(self, keys: Iterable[str]) -> dict[str, Any]: ...
    def get(self, key: str) -> Any | None: ...
    def put_many(self, items: Mapping[str, Any]) -> None: ...
    def __len__(self) -> int: ...
    def close(self) -> None: ...


def open_cache(location: str | Path, namespace: str) -> CallCache:
    """The cache at ``location``: a ``postgresql://`` URL (shared by machines) or a SQLite file."""
    if str(location).startswith(POSTGRES_SCHEMES):
        return PostgresCache(str(location), namespace)
    return SqliteCache(location, namespace)


def checked_cache_url(url: str) -> str:
    """A shared cache's URL, refused when it carries a password: resource settings travel in run
    config and errors into the event log, so the password comes from ``PGPASSWORD`` or ``~/.pgpass``
    (libpq reads both). No error here quotes the URL."""
    if not url:
        return url
    parts = urlsplit(url)
    if not url.startswith(POSTGRES_SCHEMES):
        raise ValueError("SRT_CACHE_URL must be a postgresql://user@host:port/database URL (or postgresql+psycopg2://)")
    if parts.password or "password=" in parts.query.lower():
        raise ValueError(
            "SRT_CACHE_URL carries a password: leave it out of the URL and set PGPASSWORD or a ~/.pgpass "
            "entry instead; libpq reads both"
        )
    return url


def _checked_namespace(namespace: str) -> str:
    if not namespace.isidentifier():  # it becomes a table name
        raise ValueError(f"namespace must be an identifier, got {namespace!r}")
    return namespace


UNREADABLE = ("SQLITE_NOTADB", "SQLITE_CORRUPT")  # not a database at all, or a damaged one


class CacheFileError(sqlite3.DatabaseError):
    """The cache file is not a (sound) SQLite database; the message names it and what to do."""


class SqliteCache:
    """Key → JSON value, one table per namespace; safe to share between threads of one process and
    between processes (SQLite's own locking, WAL journal)."""

    def __init__(self, path: str | Path, namespace: str):
        self.table = _checked_namespace(namespace)
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(self.path, timeout=60, check_same_thread=False)
        try:
            with self._lock, self._readable(), self._conn:
                self._conn.execute("PRAGMA journal_mode=WAL")
                # under WAL, NORMAL commits without an fsync each time: a killed process loses nothing
                # committed (only a power cut can take the last commits), and a reply is stored per call
                self._conn.execute("PRAGMA synchronous=NORMAL")
                self._conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {self.table} (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
                )
        except BaseException:
            self._conn.close()
            raise

    @contextmanager
    def _readable(self) -> Iterator[None]:
        """SQLite's "file is not a database" names no file: say which, and what to do. The file is the
        user's (hours of model calls may be in it), so deleting it is their decision, not ours."""
        try:
            yield
        except sqlite3.DatabaseError as exc:
            if getattr(exc, "sqlite_errorname", None) not in UNREADABLE:
                raise
            raise CacheFileError(
                f"the call cache {self.path} is not a readable SQLite database ({exc}): it was overwritten, "
                "truncated or damaged. Move or delete it (with its -wal and -shm files) to start an empty cache; "
                "the calls it held are made again"
            ) from exc

    def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        keys = list(dict.fromkeys(keys))
        found: dict[str, Any] = {}
        with self._lock, self._readable():
            for i in range(0, len(keys), 500):
                chunk = keys[i : i + 500]
                marks = ",".join("?" * len(chunk))
                rows = self._conn.execute(f"SELECT key, value FROM {self.table} WHERE key IN ({marks})", chunk)
                found.update((key, json.loads(value)) for key, value in rows)
        return found

    def get(self, key: str) -> Any | None:
        return self.get_many([key]).get(key)

    def put_many(self, items: Mapping[str, Any]) -> None:
        rows = [(key, json.dumps(value, ensure_ascii=False)) for key, value in items.items()]
        with self._lock, self._readable(), self._conn:
            self._conn.executemany(f"INSERT OR REPLACE INTO {self.table} (key, value) VALUES (?, ?)", rows)

    def __len__(self) -> int:
        with self._lock, self._readable():
            return self._conn.execute(f"SELECT COUNT(*) FROM {self.table}").fetchone()[0]

    def close(self) -> None:
        self._conn.close()


# SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3, which dagster-postgres cannot use, so the
# instance's URL names psycopg2; the cache accepts the same URL and hands libpq the plain form.
POSTGRES_SCHEMES = ("postgresql://", "postgres://", "postgresql+psycopg2://")
SCHEMA = "srt_cache"  # beside Dagster's own tables when the cache shares the instance's database


class PostgresCache:
    """Key → JSON value in PostgreSQL, one table per namespace in schema ``srt_cache``: the cache
    every worker of a cluster reads and writes at once. A key two workers write keeps one of the two
    (equal) values; each write is one statement, so nothing is half-stored and no file lock waits."""

    def __init__(self, url: str, namespace: str):
        try:
            import psycopg2
        except ImportError as exc:
            raise RuntimeError("a postgresql:// call cache needs psycopg2: pip install 'srt-assets[cluster]'") from exc

        self.table = f"{SCHEMA}.{_checked_namespace(namespace)}"
        self._lock = threading.Lock()
        self._conn = psycopg2.connect(url.replace("postgresql+psycopg2://", "postgresql://", 1), connect_timeout=30)
        self._conn.autocommit = True
        try:
            with self._conn.cursor() as cursor:
                # two workers creating the same table at once collide in the catalog: one at a time
                cursor.execute("SELECT pg_advisory_lock(hashtext(%s))", (self.table,))
                try:
                    cursor.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
                    cursor.execute(
                        f"CREATE TABLE IF NOT EXISTS {self.table} (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
                    )
                finally:
                    cursor.execute("SELECT pg_advisory_unlock(hashtext(%s))", (self.table,))
        except BaseException:
            self._conn.close()
            raise

    def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        keys = list(dict.fromkeys(keys))
        found: dict[str, Any] = {}
        with self._lock, self._conn.cursor() as cursor:
            for i in range(0, len(keys), 1000):
                cursor.execute(f"SELECT key, value FROM {self.table} WHERE key = ANY(%s)", (keys[i : i + 1000],))
                found.update((key, json.loads(value)) for key, value in cursor)
        return found

    def get(self, key: str) -> Any | None:
        return self.get_many([key]).get(key)

    def put_many(self, items: Mapping[str, Any]) -> None:
        from psycopg2.extras import execute_values

        rows = [(key, json.dumps(value, ensure_ascii=False)) for key, value in items.items()]
        with self._lock, self._conn.cursor() as cursor:
            for i in range(0, len(rows), 1000):  # one statement per chunk: stored whole or not at all
                execute_values(
                    cursor,
                    f"INSERT INTO {self.table} (key, value) VALUES %s "
                    "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                    rows[i : i + 1000],
                    page_size=1000,
                )

    def __len__(self) -> int:
        with self._lock, self._conn.cursor() as cursor:
            cursor.execute(f"SELECT COUNT(*) FROM {self.table}")
            return cursor.fetchone()[0]

    def close(self) -> None:
        self._conn.close()
