"""The exchange's write-ahead journal and snapshots: its storage format, nothing else.

Everything lives in ``DATA_DIR/journal/``:

- ``wal-<first>.log`` segments. A segment is the 8-byte magic ``OMSWAL1\\n`` followed by
  records; a record is ``u32 length | u32 crc32(payload) | payload`` (little endian),
  the payload one JSON array. A segment's first record is its header
  ``["H", {...}]`` (not an input); every other record is one input, numbered from 1
  across segments (``<first>`` in the file name is the number of its first input):

  - ``[code, seq, ts, *fields]`` for an engine command: ``N`` new order, ``C`` cancel,
    ``A`` amend, ``X`` cancel all (user or disconnect), ``M`` set market open; the
    fields are the command's dataclass fields in order, enums as their values;
  - ``["L", seq, ts]`` a leaderboard (it spends a ``seq``), ``["P", seq, ts]`` a
    performance snapshot (it writes performance.csv rows).

  ``seq`` is the exchange's last event number *before* the input, so a replay can check
  it reproduces the same numbering.
- ``snapshot-<n>.pkl``: the state after input ``n`` (the pickled Engine plus the
  exchange's seq, clock and telemetry file sizes), as ``OMSSNAP1 | u32 crc32 | u64
  length | pickle``, written to a temp file, fsynced and renamed, so it is whole or
  absent.

The live segment is zero-filled ahead of its last record (``PREALLOC_CHUNK`` at a time),
so an fdatasync after a record only writes data, not the file's size; a closed segment
is trimmed to its last record. Zeros from a record boundary to the end of a segment are
its clean end. A bad record (short, impossible length, CRC mismatch) that nothing valid
follows in the last segment is a torn write: it is dropped with a warning. Anything
else bad is a ``JournalCorrupt`` naming the file, byte offset and input number.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from operator import attrgetter
from pathlib import Path
from typing import Any

import orjson

from models import (
    FIELD_NAMES,
    AmendOrder,
    CancelAll,
    CancelOrder,
    CancelReason,
    Command,
    NewOrder,
    OrderType,
    SetMarketOpen,
    Side,
    StpMode,
    TimeInForce,
)

log = logging.getLogger("journal")

JOURNAL_DIR = "journal"
FORMAT_VERSION = 1
SEGMENT_MAGIC = b"OMSWAL1\n"
SNAPSHOT_MAGIC = b"OMSSNAP1"
_RECORD_HEAD = struct.Struct("<II")
_pack_head = _RECORD_HEAD.pack
_dumps = orjson.dumps
_SNAPSHOT_HEAD = struct.Struct("<IQ")
MAX_RECORD = 1 << 20  # no input comes near this; a bigger length is damage
_BINARY = getattr(os, "O_BINARY", 0)  # Windows would translate newlines otherwise
_datasync = getattr(os, "fdatasync", os.fsync)  # macOS and Windows have only fsync
SNAPSHOTS_KEPT = 2  # the newest is enough; the one before covers a damaged newest
# Zeros written ahead of the live segment's end at a time. A record written into them
# changes no file size, so its fdatasync skips ext4's metadata commit (p50 0.17 ms instead
# of 0.25 here). The commit after an extension writes the chunk out: measured 2.0 ms for
# 1 MiB, 2.9 for 2 MiB, 5.9 for 4 MiB, so 1 MiB keeps that rare ack within ~2 ms
# (every ~11,000 inputs) for little more disk time per byte. Real zeros, not ftruncate or
# fallocate: those leave extent work for every later write.
PREALLOC_CHUNK = 1 << 20
_ZERO_WRITE = 256 << 10  # a 4 MiB write() of zeros took 8-17 ms here, 16 of these 1.3 ms

HEADER = "H"
LEADERBOARD = "L"
PERFORMANCE = "P"

COMMAND_CODES: dict[type, str] = {NewOrder: "N", CancelOrder: "C", AmendOrder: "A",
                                  CancelAll: "X", SetMarketOpen: "M"}
COMMANDS_BY_CODE = {code: cls for cls, code in COMMAND_CODES.items()}
_ENUM_FIELDS: dict[str, type[Enum]] = {"side": Side, "order_type": OrderType,
                                       "tif": TimeInForce, "stp": StpMode,
                                       "reason": CancelReason}
_FIELDS = {cls: FIELD_NAMES[cls] for cls in COMMAND_CODES}
_GETTERS = {cls: attrgetter(*names) for cls, names in _FIELDS.items()}
_ONE_FIELD = frozenset(cls for cls, names in _FIELDS.items() if len(names) == 1)
_ENUMS_AT = {cls: [(i, _ENUM_FIELDS[name]) for i, name in enumerate(names)
                   if name in _ENUM_FIELDS] for cls, names in _FIELDS.items()}

# The modules whose classes a snapshot pickles: a snapshot written by other code is
# not trusted (its objects may lack attributes the new code expects).
_CORE_MODULES = ("engine", "orderbook", "positions", "models", "config", "risk_manager",
                 "margin_risk_manager")


class JournalError(Exception):
    """The journal cannot be used as it is; the message says where and why."""


class JournalCorrupt(JournalError):
    def __init__(self, path: Path, offset: int, number: int | None, problem: str) -> None:
        where = f"input #{number}" if number is not None else "segment header"
        super().__init__(f"{path}: corrupt record at byte offset {offset} ({where}): "
                         f"{problem}; recovery stops here rather than lose what follows")
        self.path = path
        self.offset = offset
        self.number = number


# ===================================================================== records


def frame(payload: bytes) -> bytes:
    return _RECORD_HEAD.pack(len(payload), zlib.crc32(payload)) + payload


def command_record(command: Command, seq: int, ts: int) -> bytes:
    """The framed record of one engine command applied after event ``seq`` at ``ts``
    (on the hot path: one tuple, one dumps, one CRC)."""
    cls = type(command)
    fields = _GETTERS[cls](command)
    if cls in _ONE_FIELD:  # attrgetter of one name returns the value, not a tuple
        fields = (fields,)
    payload = _dumps((COMMAND_CODES[cls], seq, ts, *fields))
    return _pack_head(len(payload), zlib.crc32(payload)) + payload


def tick_record(kind: str, seq: int, ts: int) -> bytes:
    """A timer-driven input: ``LEADERBOARD`` or ``PERFORMANCE``."""
    return frame(orjson.dumps([kind, seq, ts]))


@dataclass(slots=True)
class Entry:
    """One journaled input, and where it was read (for error messages)."""

    number: int
    kind: str  # a command code, LEADERBOARD or PERFORMANCE
    seq: int
    ts: int
    command: Command | None
    path: Path
    offset: int

    def where(self) -> str:
        return f"{self.path}: input #{self.number} at byte offset {self.offset}"


def decode_command(code: str, fields: list[Any]) -> Command:
    cls = COMMANDS_BY_CODE[code]
    for index, enum in _ENUMS_AT[cls]:
        if fields[index] is not None:
            fields[index] = enum(fields[index])
    return cls(*fields)


def decode_entry(payload: bytes, number: int, path: Path, offset: int) -> Entry:
    try:
        values = orjson.loads(payload)
        kind, seq, ts = values[0], values[1], values[2]
        if type(seq) is not int or type(ts) is not int:
            raise TypeError("seq and ts must be integers")
        command = None
        if kind in COMMANDS_BY_CODE:
            command = decode_command(kind, values[3:])
        elif kind not in (LEADERBOARD, PERFORMANCE) or len(values) != 3:
            raise ValueError(f"unknown record kind {kind!r}")
    except (orjson.JSONDecodeError, LookupError, TypeError, ValueError) as exc:
        # the CRC matched, so these are the bytes that were written: another version
        raise JournalCorrupt(path, offset, number, f"undecodable input: {exc}") from None
    return Entry(number, kind, seq, ts, command, path, offset)


# ===================================================================== segments


def journal_dir(data_dir: Path) -> Path:
    return data_dir / JOURNAL_DIR


def segment_name(first: int) -> str:
    return f"wal-{first:012d}.log"


def snapshot_name(number: int) -> str:
    return f"snapshot-{number:012d}.pkl"


def _numbered(directory: Path, prefix: str, suffix: str) -> list[tuple[int, Path]]:
    found = []
    for path in directory.glob(f"{prefix}*{suffix}"):
        digits = path.name[len(prefix):-len(suffix)]
        if digits.isdigit():
            found.append((int(digits), path))
    return sorted(found)


def list_segments(directory: Path) -> list[tuple[int, Path]]:
    """``(first input number, path)`` of every segment, oldest first."""
    return _numbered(directory, "wal-", ".log")


def list_snapshots(directory: Path) -> list[tuple[int, Path]]:
    """``(input number covered, path)`` of every snapshot, oldest first."""
    return _numbered(directory, "snapshot-", ".pkl")


def _valid_record_at(data: bytes, pos: int) -> bool:
    if len(data) - pos < _RECORD_HEAD.size:
        return False
    length, crc = _RECORD_HEAD.unpack_from(data, pos)
    end = pos + _RECORD_HEAD.size + length
    return 0 < length <= MAX_RECORD and end <= len(data) and \
        zlib.crc32(data[pos + _RECORD_HEAD.size:end]) == crc


def _bad_record(data: bytes, pos: int) -> str | None:
    """Why the record at ``pos`` is unusable, or ``None`` if it is fine."""
    if len(data) - pos < _RECORD_HEAD.size:
        return f"only {len(data) - pos} bytes of a record header"
    length, crc = _RECORD_HEAD.unpack_from(data, pos)
    if not 0 < length <= MAX_RECORD:
        return f"impossible record length {length}"
    end = pos + _RECORD_HEAD.size + length
    if end > len(data):
        return f"record of {length} bytes runs {end - len(data)} bytes past the end of the file"
    if zlib.crc32(data[pos + _RECORD_HEAD.size:end]) != crc:
        return "CRC mismatch"
    return None


@dataclass
class Segment:
    """One segment read and checked: its header, its records' payloads and offsets, and
    where its valid data ends (``torn`` says what was dropped after that, if anything)."""

    path: Path
    header: dict[str, Any] | None
    records: list[tuple[int, bytes]]  # (offset, payload) of each input
    valid_end: int
    torn: str | None

    @property
    def first(self) -> int:
        assert self.header is not None
        return int(self.header["first"])


def read_segment(path: Path, last: bool, first_hint: int) -> Segment:
    """Read and check a whole segment. Only the ``last`` segment may end torn; any
    segment may end in zeros (the live one's preallocated space, or a closed one whose
    trim a crash prevented: the next segment's first input number still shows a gap)."""
    data = path.read_bytes()
    # a valid record's length is not zero, so none starts at or after `used`
    used = len(data.rstrip(b"\0"))
    if data[:len(SEGMENT_MAGIC)] != SEGMENT_MAGIC:
        if last and SEGMENT_MAGIC.startswith(data[:used]):
            return Segment(path, None, [], 0, f"segment of {len(data)} bytes without a header")
        raise JournalCorrupt(path, 0, None, "not a journal segment (bad magic)")
    records: list[tuple[int, bytes]] = []
    header: dict[str, Any] | None = None
    pos = len(SEGMENT_MAGIC)
    head = _RECORD_HEAD.size
    while pos < used:  # at a record boundary, only zeros to the end: the clean end
        problem = _bad_record(data, pos)
        if problem is not None:
            number = None if header is None else first_hint + len(records)
            if not last or any(_valid_record_at(data, p) for p in range(pos + 1, used)):
                raise JournalCorrupt(path, pos, number, problem)
            return Segment(path, header, records, pos,
                           f"{problem} at byte offset {pos} ({used - pos} bytes)")
        length = _RECORD_HEAD.unpack_from(data, pos)[0]
        payload = data[pos + head:pos + head + length]
        if header is None:
            header = _decode_header(path, payload)
        else:
            records.append((pos, payload))
        pos += head + length
    return Segment(path, header, records, pos, None)


def peek_header(path: Path) -> dict[str, Any] | None:
    """A segment's header without reading the rest; ``None`` if the file ends before
    its header does (a segment the crash interrupted while it was being created)."""
    with open(path, "rb") as f:
        head = f.read(len(SEGMENT_MAGIC) + _RECORD_HEAD.size)
        magic = head[:len(SEGMENT_MAGIC)]
        if magic != SEGMENT_MAGIC[:len(magic)]:
            raise JournalCorrupt(path, 0, None, "not a journal segment (bad magic)")
        if len(head) < len(SEGMENT_MAGIC) + _RECORD_HEAD.size:
            return None
        length, crc = _RECORD_HEAD.unpack_from(head, len(SEGMENT_MAGIC))
        payload = f.read(min(length, MAX_RECORD))
    if len(payload) < length:
        return None
    if zlib.crc32(payload) != crc:
        raise JournalCorrupt(path, len(SEGMENT_MAGIC), None, "bad segment header: CRC mismatch")
    return _decode_header(path, payload)


def _decode_header(path: Path, payload: bytes) -> dict[str, Any]:
    try:
        kind, header = orjson.loads(payload)
        if kind != HEADER or not isinstance(header, dict) or \
                header.get("version") != FORMAT_VERSION:
            raise ValueError(f"not a version-{FORMAT_VERSION} segment header")
        int(header["first"])
    except (orjson.JSONDecodeError, LookupError, TypeError, ValueError) as exc:
        raise JournalCorrupt(path, len(SEGMENT_MAGIC), None,
                             f"bad segment header: {exc}") from None
    return header


class JournalReader:
    """Reads the inputs of a journal directory in order, checking continuity.

    After ``entries()`` is exhausted, ``last_number`` is the last input read,
    ``last_segment`` the segment new inputs go to (``None`` if there is none usable) and
    ``valid_end`` where its valid data ends; ``torn`` describes a dropped torn tail.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.segments = list_segments(directory)
        self.last_number = 0
        self.last_segment: Segment | None = None
        self.valid_end = 0
        self.torn: str | None = None
        self.dropped_empty: Path | None = None  # a last segment that never got its header

    def first_header(self) -> dict[str, Any]:
        """The header of the oldest segment (the journal's start)."""
        if not self.segments:
            raise JournalError(f"{self.directory}: no journal segments")
        path = self.segments[0][1]
        header = peek_header(path)
        if header is None:
            raise JournalError(f"{path}: the journal's first segment has no header")
        return header

    def entries(self, after: int = 0) -> Iterator[Entry]:
        """Every input numbered above ``after``, in order."""
        segments = self.segments
        start = 0
        for i, (first, _) in enumerate(segments):
            if first <= after + 1:
                start = i
        if segments and segments[start][0] > after + 1:
            raise JournalError(f"{self.directory}: inputs {after + 1}..{segments[0][0] - 1} "
                               "are not in the journal (segments were removed)")
        expected = segments[start][0] if segments else 1
        for i in range(start, len(segments)):
            first, path = segments[i]
            last = i == len(segments) - 1
            segment = read_segment(path, last, first)
            if segment.header is None:  # created, then the crash: it holds nothing
                self.dropped_empty = path
                self.torn = segment.torn
                break
            if segment.first != first or first != expected:
                raise JournalError(f"{path}: starts at input #{segment.first} (name says "
                                   f"{first}), expected #{expected}: the journal has a gap")
            for index, (offset, payload) in enumerate(segment.records):
                number = first + index
                if number > after:
                    yield decode_entry(payload, number, path, offset)
            expected = first + len(segment.records)
            self.last_number = expected - 1
            self.last_segment, self.valid_end, self.torn = segment, segment.valid_end, \
                segment.torn


# ===================================================================== writing


def fsync_dir(directory: Path) -> None:
    """Make a file's creation or rename durable (POSIX; Windows cannot open a directory
    and its metadata writes need no such step)."""
    if os.name == "nt":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class JournalWriter:
    """Appends framed input records to the current segment.

    ``append`` only buffers; ``write`` hands the buffer to the OS (enough to survive the
    process being killed); ``sync`` makes it durable (fdatasync). The caller decides
    when, and releases an input's effects only after the write (and sync) that covers it.

    Records are written at the segment's logical end, inside zeros written ahead of it
    (``PREALLOC_CHUNK`` at a time, by the ``write`` that needs them and made durable by
    the ``sync`` after it), so most syncs change no file size; ``close`` trims the zeros.
    """

    def __init__(self, directory: Path, path: Path, next_number: int, end: int) -> None:
        """Continue ``path`` at byte ``end``: its last whole record ends there and only
        zeros follow it."""
        self.directory = directory
        self.path = path
        self.next_number = next_number  # of the next input appended
        self.written_number = next_number - 1  # last input handed to the OS
        # not O_APPEND: records go before the zeros (seek + write, as on every platform)
        self._fd = os.open(path, os.O_WRONLY | _BINARY)
        self._end = end  # where the next record goes
        self._zeroed = os.fstat(self._fd).st_size  # zeros from _end up to here
        os.lseek(self._fd, end, os.SEEK_SET)
        self._buffer: list[bytes] = []

    @classmethod
    def create(cls, directory: Path, first: int, header: dict[str, Any]) -> JournalWriter:
        """A new segment whose first input will be ``first``, durable before it is used."""
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / segment_name(first)
        body = SEGMENT_MAGIC + frame(orjson.dumps(
            [HEADER, {"version": FORMAT_VERSION, "first": first, **header}]))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _BINARY, 0o644)
        try:
            if os.write(fd, body) != len(body):
                raise OSError(f"{path}: short write of the segment header")
            os.fsync(fd)
            fsync_dir(directory)
        except OSError:
            # a half-made segment after the current one would read as a gap later
            path.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)
        return cls(directory, path, first, len(body))

    @classmethod
    def reopen(cls, directory: Path, segment: Segment, next_number: int) -> JournalWriter:
        """Continue the last segment, cutting off a torn tail first (the bytes after its
        last whole record), so new records never follow garbage."""
        if segment.torn is not None:
            with open(segment.path, "r+b") as f:
                f.truncate(segment.valid_end)
                f.flush()
                os.fsync(f.fileno())
        return cls(directory, segment.path, next_number, segment.valid_end)

    @property
    def pending(self) -> int:
        """Inputs appended but not yet handed to the OS."""
        return self.next_number - 1 - self.written_number

    def append(self, record: bytes) -> None:
        self._buffer.append(record)
        self.next_number += 1

    def write(self) -> int:
        """Hand the buffered records to the OS in one write; returns how many."""
        count = self.pending
        if count:
            data = b"".join(self._buffer)
            self._buffer.clear()
            end = self._end + len(data)
            if end > self._zeroed:
                self._extend(end)
            _write_all(self._fd, data)
            self._end = end
            self.written_number = self.next_number - 1
        return count

    def _extend(self, end: int) -> None:
        """Zero-fill the file up to the chunk boundary at or after ``end``. Before the
        records that need it, so a crash in between leaves zeros after the last record."""
        size = -(-end // PREALLOC_CHUNK) * PREALLOC_CHUNK
        os.lseek(self._fd, self._zeroed, os.SEEK_SET)
        zeros = memoryview(bytes(min(_ZERO_WRITE, size - self._zeroed)))
        while self._zeroed < size:
            self._zeroed += os.write(self._fd, zeros[:size - self._zeroed])
        os.lseek(self._fd, self._end, os.SEEK_SET)

    def sync(self) -> None:
        _datasync(self._fd)

    def close(self) -> None:
        """Trim the zeros after the last record (durably: a closed segment is never
        written again) and close the file."""
        if self._fd < 0:
            return
        try:
            if self._zeroed > self._end:
                os.ftruncate(self._fd, self._end)
                _datasync(self._fd)
                self._zeroed = self._end
        finally:
            os.close(self._fd)
            self._fd = -1


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


# ===================================================================== snapshots


def core_fingerprint() -> str:
    """A hash of the source of the modules a snapshot's objects come from."""
    import importlib

    digest = hashlib.sha256()
    for name in _CORE_MODULES:
        module = importlib.import_module(name)
        digest.update(Path(module.__file__ or "").read_bytes())
    return digest.hexdigest()


def write_snapshot(directory: Path, number: int, state: dict[str, Any]) -> Path:
    """Write the state after input ``number`` atomically; keep the newest few."""
    data = pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)
    path = directory / snapshot_name(number)
    temp = directory / f".{path.name}.tmp"
    with open(temp, "wb") as f:
        f.write(SNAPSHOT_MAGIC + _SNAPSHOT_HEAD.pack(zlib.crc32(data), len(data)))
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, path)
    fsync_dir(directory)
    for _, old in list_snapshots(directory)[:-SNAPSHOTS_KEPT]:
        old.unlink(missing_ok=True)
    return path


def read_snapshot(path: Path) -> dict[str, Any]:
    """A snapshot's state; ``JournalError`` if it is damaged."""
    data = path.read_bytes()
    head = len(SNAPSHOT_MAGIC) + _SNAPSHOT_HEAD.size
    if data[:len(SNAPSHOT_MAGIC)] != SNAPSHOT_MAGIC or len(data) < head:
        raise JournalError(f"{path}: not a snapshot (bad magic)")
    crc, length = _SNAPSHOT_HEAD.unpack_from(data, len(SNAPSHOT_MAGIC))
    body = data[head:]
    if len(body) != length or zlib.crc32(body) != crc:
        raise JournalError(f"{path}: damaged snapshot (length or CRC mismatch)")
    try:
        state = pickle.loads(body)
    except Exception as exc:  # unpickling runs arbitrary constructors: report any failure
        raise JournalError(f"{path}: cannot load snapshot: {exc!r}") from None
    if not isinstance(state, dict) or state.get("version") != FORMAT_VERSION:
        raise JournalError(f"{path}: not a version-{FORMAT_VERSION} snapshot")
    return state


def remove_temp_files(directory: Path) -> None:
    """Temp files are snapshots a crash interrupted before their rename: never valid."""
    for temp in directory.glob(".*.tmp"):
        log.warning("removing %s: a snapshot interrupted by a crash", temp)
        temp.unlink(missing_ok=True)
