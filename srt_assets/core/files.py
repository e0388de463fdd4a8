"""Writing pipeline outputs atomically and without following planted symlinks, and reading Parquet
files with an error that names the file.

Every output is written to a fresh temporary sibling (created with ``O_EXCL``, so never through an
existing file or link) and renamed over the target: a reader never sees half a file, and a symlink
at the target (say a ``.srt_fingerprint`` shipped in a downloaded model folder that points at
``~/.bashrc``) is replaced, not written through. Temporaries of killed writers are removed by the
next write of the same file.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO

import polars as pl
import pyarrow.parquet as pq

STALE_AFTER_S = 3600.0  # a temporary this old is a leftover even if its PID now names a live process
_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:24] or "host"


class UnreadableFileError(RuntimeError):
    """A stored file that cannot be parsed (truncated by a full disk or a copy, or corrupt)."""


def _temp_prefix(path: Path) -> str:
    return f".{path.name}."


def _owner_tag() -> str:
    """PID and host in a temporary's name: the host keeps a writer on shared storage from taking a
    live writer on another machine, whose PID it cannot check, for a dead one."""
    return f"{os.getpid()}-{_HOST}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # gone, or a number no process can have
        return False
    except PermissionError:  # it exists, as another user's process
        pass
    return True


def _is_stale(entry: os.DirEntry, prefix: str) -> bool:
    """Whether ``entry`` is a temporary of the target that no live writer owns: its writer's PID
    (``.<name>.<pid>[-<host>][.<random>].tmp``, on this host) is gone, or it is over an hour old."""
    owner = entry.name[len(prefix) : -len(".tmp")].split(".", 1)[0]
    pid_text, _, host = owner.partition("-")
    try:
        if time.time() - entry.stat(follow_symlinks=False).st_mtime > STALE_AFTER_S:
            return True
    except OSError:
        return False
    return pid_text.isdigit() and host in ("", _HOST) and not _pid_alive(int(pid_text))


def remove_stale_temps(path: Path) -> list[Path]:
    """Remove the temporaries that killed writes of ``path`` left beside it; returns what went.
    Best effort: tidying up never fails the write that asked for it."""
    prefix = _temp_prefix(path)
    removed = []
    with suppress(OSError), os.scandir(path.parent) as entries:
        for entry in entries:
            if entry.name.startswith(prefix) and entry.name.endswith(".tmp") and _is_stale(entry, prefix):
                with suppress(OSError):
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
    return removed


def _create_temp(path: Path) -> tuple[int, Path]:
    """A new, empty temporary beside ``path``, opened for writing; ``O_EXCL`` refuses any existing
    name (a planted link included); mode 0666 less the umask, as a plain write would give."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = path.with_name(f"{_temp_prefix(path)}{_owner_tag()}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file beside {path}")


@contextmanager
def _replacing(path: Path) -> Iterator[tuple[BinaryIO, Path]]:
    """The temporary, open for writing, and its path; it replaces ``path`` when the block ends and
    is removed if the block raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    fd, tmp = _create_temp(path)
    handle = os.fdopen(fd, "wb")
    try:
        yield handle, tmp
        handle.close()
        os.replace(tmp, path)  # replaces a symlink at ``path`` itself, never the file it points at
    except BaseException:
        with suppress(OSError):
            handle.close()
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path to write ``path``'s new content to (for writers that take a path, such as
    ``DataFrame.write_parquet``); it becomes ``path`` when the block ends, and is removed if the
    block raises. Write it at once: one untouched for an hour counts as a killed write's leftover."""
    with _replacing(path) as (handle, tmp):
        handle.close()
        yield tmp


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, replacing (not following) a symlink there."""
    with _replacing(path) as (handle, _):
        handle.write(data)


def atomic_write_text(path: Path, text: str, encoding: str = "utf-8") -> None:
    """``atomic_write_bytes`` for text (no newline translation, like ``Path.write_text`` on POSIX)."""
    atomic_write_bytes(path, text.encode(encoding))


def write_parquet_atomic(frame: pl.DataFrame, path: Path) -> None:
    """``frame.write_parquet(path)``, atomically: a killed run never leaves half a Parquet file."""
    with atomic_path(path) as tmp:
        frame.write_parquet(tmp)


def read_parquet_file(source: str | Path | IO[bytes], where: object, remedy: str) -> pl.DataFrame:
    """``pl.read_parquet(source)``; a file polars cannot parse raises ``UnreadableFileError`` naming
    ``where`` (its path) and ``remedy`` (what the reader should do), instead of polars' bare
    "File out of specification"."""
    try:
        return pl.read_parquet(source)
    except pl.exceptions.PolarsError as exc:
        raise _unreadable(where, exc, remedy) from exc


def scan_parquet_file(path: Path, remedy: str) -> pl.LazyFrame:
    """``pl.scan_parquet(path)``, its footer read at once, so a truncated file fails here with
    ``UnreadableFileError`` (as ``read_parquet_file``) rather than later, inside a reader's query."""
    try:
        pl.read_parquet_schema(path)
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise _unreadable(path, exc, remedy) from exc
    return pl.scan_parquet(path)


def _unreadable(where: object, exc: Exception, remedy: str) -> UnreadableFileError:
    return UnreadableFileError(f"{where} is not a readable Parquet file (truncated or corrupt: {exc}); {remedy}")


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# A query that reads one scan twice (the keys on one side of a join, the texts on the other) would
# have polars cache that scan whole (common-subplan elimination): block-wise queries turn it off.
STREAMED = pl.QueryOptFlags(comm_subplan_elim=False)


def blocks(query: pl.LazyFrame, rows: int) -> Iterator[pl.DataFrame]:
    """``query`` run by the streaming engine, ``rows`` at a time, with no scan held whole."""
    return iter(query.collect_batches(chunk_size=rows, optimizations=STREAMED))


def row_count(table: pl.DataFrame | pl.LazyFrame) -> int:
    """How many rows a table or a query has, without reading its columns."""
    return table.lazy().select(pl.len()).collect().item()


@dataclass(frozen=True)
class StagedParquet:
    """A finished Parquet file in a staging folder, waiting to be moved to its final place (by the
    IO manager): a table written a block at a time, never held whole."""

    path: Path
    rows: int
    schema: dict[str, pl.DataType]

    def scan(self) -> pl.LazyFrame:
        return pl.scan_parquet(self.path)

    def discard(self) -> None:
        """A staged table no output took (not selected, or the step failed before yielding it)."""
        self.path.unlink(missing_ok=True)


@contextmanager
def discarded_on_failure(*tables: StagedParquet) -> Iterator[None]:
    """A staged table is the step's until the IO manager moves it into place: when the step fails
    first (or a generator's consumer stops it), none outlives it."""
    try:
        yield
    except BaseException:
        for table in tables:
            table.discard()
        raise


class ParquetBlockWriter:
    """Writes a table block by block, each block a row group, to a temporary file (created as
    ``atomic_path``'s are, so a killed writer's leftover is removed by the next write of the same
    name); ``finish`` closes it as a ``StagedParquet``. Memory: one block, not the table."""

    def __init__(self, target: Path, schema: dict[str, pl.DataType]) -> None:
        self.schema = dict(schema)
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(target)
        fd, self.path = _create_temp(target)
        os.close(fd)
        self._arrow_schema = pl.DataFrame(schema=self.schema).to_arrow(compat_level=pl.CompatLevel.oldest()).schema
        self._writer = pq.ParquetWriter(self.path, self._arrow_schema, compression="zstd")
        self.rows = 0

    def write(self, block: pl.DataFrame) -> None:
        if block.height:
            frame = block.select(list(self.schema)).cast(self.schema)
            self._writer.write_table(frame.to_arrow(compat_level=pl.CompatLevel.oldest()).cast(self._arrow_schema))
            self.rows += block.height

    def finish(self) -> StagedParquet:
        self._writer.close()
        return StagedParquet(self.path, self.rows, self.schema)

    def write_query(
        self, query: pl.LazyFrame, block_rows: int, each: Callable[[pl.DataFrame], pl.DataFrame] | None = None
    ) -> StagedParquet:
        """Every block of ``query`` (made into what ``each`` returns), then ``finish``."""
        for block in blocks(query, block_rows):
            self.write(each(block) if each else block)
        return self.finish()

    def discard(self) -> None:
        with suppress(Exception):
            self._writer.close()
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> ParquetBlockWriter:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is not None:
            self.discard()


def move_into_place(staged: Path, path: Path) -> None:
    """Put a staged file at ``path`` atomically: renamed where both are on one filesystem, else
    copied to a temporary beside ``path`` and renamed (``atomic_path``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(staged, path)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        with atomic_path(path) as tmp:
            shutil.copyfile(staged, tmp)
        staged.unlink(missing_ok=True)
