"""The journal's storage format: records, segments, torn tails, corruption, snapshots."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from journal import (
    LEADERBOARD,
    PERFORMANCE,
    SEGMENT_MAGIC,
    JournalCorrupt,
    JournalError,
    JournalReader,
    JournalWriter,
    command_record,
    decode_entry,
    list_snapshots,
    read_segment,
    read_snapshot,
    remove_temp_files,
    tick_record,
    write_snapshot,
)
from models import (
    AmendOrder,
    CancelAll,
    CancelOrder,
    CancelReason,
    NewOrder,
    OrderType,
    SetMarketOpen,
    Side,
    StpMode,
    TimeInForce,
)

COMMANDS = [
    NewOrder("alice", "a-1", "SIM", Side.BUY, OrderType.LIMIT, 5, 10010),
    NewOrder("bob", "b-1", "ALT", Side.SELL, OrderType.STOP_LIMIT, 2, 9990, 9995,
             TimeInForce.GTC, False, StpMode.DECREMENT),
    NewOrder("bob", "b-2", "SIM", Side.SELL, OrderType.MARKET, 1, None, None, TimeInForce.FOK,
             False, StpMode.CANCEL_BOTH),
    NewOrder("carol", "c-\u00e9", "SIM", Side.BUY, OrderType.LIMIT, 1, 10000, None,
             TimeInForce.GTC, True),
    CancelOrder("alice", 7),
    CancelOrder("alice", None, "a-1"),
    AmendOrder("alice", None, "a-1", 10011, None),
    AmendOrder("alice", 3, None, None, 9),
    CancelAll("bob"),
    CancelAll("bob", "SIM", CancelReason.DISCONNECT),
    SetMarketOpen(False, "SIM"),
    SetMarketOpen(True),
]


def write_journal(directory: Path, count: int, first: int = 1) -> JournalWriter:
    """A segment holding ``count`` new-order inputs, numbered from ``first``."""
    writer = JournalWriter.create(directory, first, {"seq": 0, "ts": 0})
    for i in range(count):
        number = first + i
        writer.append(command_record(
            NewOrder("t", f"o{number}", "SIM", Side.BUY, OrderType.LIMIT, 1, 10_000),
            number, 1_000 + number))
    writer.write()
    return writer


def numbers(directory: Path) -> list[int]:
    return [entry.number for entry in JournalReader(directory).entries()]


def record_offsets(path: Path) -> list[int]:
    segment = read_segment(path, last=True, first_hint=1)
    return [offset for offset, _ in segment.records]


def test_every_command_round_trips_through_a_record(tmp_path: Path) -> None:
    for i, command in enumerate(COMMANDS):
        record = command_record(command, 40 + i, 1_700_000_000_000_000 + i)
        entry = decode_entry(record[8:], i + 1, tmp_path, 0)
        assert entry.command == command
        assert type(entry.command) is type(command)
        assert (entry.seq, entry.ts) == (40 + i, 1_700_000_000_000_000 + i)
    for kind in (LEADERBOARD, PERFORMANCE):
        entry = decode_entry(tick_record(kind, 9, 77)[8:], 1, tmp_path, 0)
        assert (entry.kind, entry.seq, entry.ts, entry.command) == (kind, 9, 77, None)


def test_inputs_are_numbered_across_segments(tmp_path: Path) -> None:
    write_journal(tmp_path, 3).close()
    write_journal(tmp_path, 4, first=4).close()
    assert numbers(tmp_path) == list(range(1, 8))
    reader = JournalReader(tmp_path)
    assert [e.number for e in reader.entries(after=5)] == [6, 7]
    assert reader.last_number == 7 and reader.torn is None


def test_a_gap_between_segments_is_an_error(tmp_path: Path) -> None:
    write_journal(tmp_path, 3).close()
    write_journal(tmp_path, 2, first=5).close()  # input 4 is missing
    with pytest.raises(JournalError, match="gap"):
        numbers(tmp_path)


@pytest.mark.parametrize("cut", [1, 5, 8, 12])  # into the record header, then the payload
def test_a_torn_last_record_is_dropped_and_cut_before_appending(
        tmp_path: Path, cut: int, caplog: pytest.LogCaptureFixture) -> None:
    write_journal(tmp_path, 5).close()
    path = tmp_path / "wal-000000000001.log"
    last = record_offsets(path)[-1]
    with open(path, "r+b") as f:
        f.truncate(last + cut)
    reader = JournalReader(tmp_path)
    assert [e.number for e in reader.entries()] == [1, 2, 3, 4]
    assert reader.torn is not None and reader.valid_end == last
    assert reader.last_segment is not None
    writer = JournalWriter.reopen(tmp_path, reader.last_segment, 5)
    writer.append(command_record(CancelAll("t"), 5, 2_000))
    writer.write()
    writer.close()
    reader = JournalReader(tmp_path)
    entries = list(reader.entries())
    assert [e.number for e in entries] == [1, 2, 3, 4, 5]
    assert entries[-1].command == CancelAll("t") and reader.torn is None


def test_a_zero_filled_tail_is_a_torn_write(tmp_path: Path) -> None:
    write_journal(tmp_path, 3).close()
    path = tmp_path / "wal-000000000001.log"
    with open(path, "ab") as f:
        f.write(b"\0" * 4096)  # what a filesystem shows of pages a crash never wrote
    reader = JournalReader(tmp_path)
    assert [e.number for e in reader.entries()] == [1, 2, 3]
    assert reader.torn is not None and "impossible record length 0" in reader.torn


def test_a_corrupt_record_in_the_middle_stops_with_file_offset_and_number(
        tmp_path: Path) -> None:
    write_journal(tmp_path, 6).close()
    path = tmp_path / "wal-000000000001.log"
    offset = record_offsets(path)[2]  # input #3
    data = bytearray(path.read_bytes())
    data[offset + 20] ^= 0x01  # one bit in its payload
    path.write_bytes(bytes(data))
    with pytest.raises(JournalCorrupt) as info:
        numbers(tmp_path)
    assert (info.value.path, info.value.offset, info.value.number) == (path, offset, 3)
    message = str(info.value)
    assert str(path) in message and f"offset {offset}" in message and "#3" in message
    assert "CRC mismatch" in message


def test_a_damaged_length_in_the_middle_is_not_mistaken_for_a_torn_tail(
        tmp_path: Path) -> None:
    write_journal(tmp_path, 6).close()
    path = tmp_path / "wal-000000000001.log"
    offset = record_offsets(path)[1]  # input #2
    data = bytearray(path.read_bytes())
    data[offset + 3] = 0x7F  # a huge length: the record seems to run past the end
    path.write_bytes(bytes(data))
    with pytest.raises(JournalCorrupt, match="offset"):
        numbers(tmp_path)


def test_damage_at_the_end_of_an_older_segment_is_corruption(tmp_path: Path) -> None:
    write_journal(tmp_path, 3).close()
    write_journal(tmp_path, 2, first=4).close()
    path = tmp_path / "wal-000000000001.log"
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 3)  # only the last segment may end torn
    with pytest.raises(JournalCorrupt, match=r"wal-000000000001\.log"):
        numbers(tmp_path)


def test_a_file_that_is_not_a_segment_is_refused(tmp_path: Path) -> None:
    write_journal(tmp_path, 2).close()
    write_journal(tmp_path, 1, first=3).close()
    (tmp_path / "wal-000000000001.log").write_bytes(b"hello, world\n" * 10)
    with pytest.raises(JournalCorrupt, match="bad magic"):
        numbers(tmp_path)


def test_a_last_segment_without_its_header_holds_nothing(tmp_path: Path) -> None:
    write_journal(tmp_path, 2).close()
    (tmp_path / "wal-000000000003.log").write_bytes(SEGMENT_MAGIC[:5])  # crash at creation
    reader = JournalReader(tmp_path)
    assert [e.number for e in reader.entries()] == [1, 2]
    assert reader.dropped_empty == tmp_path / "wal-000000000003.log"
    assert reader.last_segment is not None and reader.last_segment.first == 1


def test_snapshots_are_whole_checked_and_the_newest_two_kept(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for number in (10, 20, 30):
        write_snapshot(tmp_path, number, {"version": 1, "number": number})
    assert [n for n, _ in list_snapshots(tmp_path)] == [20, 30]
    path = tmp_path / "snapshot-000000000030.pkl"
    assert read_snapshot(path) == {"version": 1, "number": 30}
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(JournalError, match="damaged snapshot"):
        read_snapshot(path)
    temp = tmp_path / ".snapshot-000000000040.pkl.tmp"  # a crash before the rename
    temp.write_bytes(b"partial")
    with caplog.at_level(logging.WARNING):
        remove_temp_files(tmp_path)
    assert not temp.exists() and "interrupted" in caplog.text
