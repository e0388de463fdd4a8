"""A durable content-addressed cache (SQLite) for model calls: student losses, teacher replies.

Values are written as each chunk of work finishes, so a run killed half-way keeps what it computed,
and a rerun asks the model only for what is missing.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def content_key(*parts: Any) -> str:
    """A stable key for any JSON-serializable parts (model id, messages, parameters, token ids)."""
    payload = json.dumps(parts, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


UNREADABLE = ("SQLITE_NOTADB", "SQLITE_CORRUPT")  # not a database at all, or a damaged one


class CacheFileError(sqlite3.DatabaseError):
    """The cache file is not a (sound) SQLite database; the message names it and what to do."""


class SqliteCache:
    """Key → JSON value, one table per namespace; safe to share between threads of one process and
    between processes (SQLite's own locking, WAL journal)."""

    def __init__(self, path: str | Path, namespace: str):
        if not namespace.isidentifier():
            raise ValueError(f"namespace must be an identifier, got {namespace!r}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.table = namespace
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(self.path, timeout=60, check_same_thread=False)
        try:
            with self._lock, self._readable(), self._conn:
                self._conn.execute("PRAGMA journal_mode=WAL")
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
