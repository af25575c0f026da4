"""The journal's storage format: records, segments, torn tails, corruption, snapshots."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from journal import (
    LEADERBOARD,
    PERFORMANCE,
    PREALLOC_CHUNK,
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


def record_end(path: Path) -> int:
    """Where the segment's last whole record ends (its zeros start there)."""
    return read_segment(path, last=True, first_hint=1).valid_end


def abandon(writer: JournalWriter) -> None:
    """Let go of the segment as a killed process would: no trim of its zeros."""
    os.close(writer._fd)
    writer._fd = -1


def zero_range(path: Path, start: int, end: int) -> None:
    """What a disk shows of bytes a crash never wrote into preallocated space."""
    with open(path, "r+b") as f:
        f.seek(start)
        f.write(bytes(end - start))


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


def test_the_live_segment_is_zero_filled_ahead_and_its_zeros_are_the_clean_end(
        tmp_path: Path) -> None:
    writer = write_journal(tmp_path, 3)  # live: not closed
    path = tmp_path / "wal-000000000001.log"
    end = record_end(path)
    assert path.stat().st_size == PREALLOC_CHUNK > end
    assert path.read_bytes()[end:] == bytes(PREALLOC_CHUNK - end)
    reader = JournalReader(tmp_path)
    assert [e.number for e in reader.entries()] == [1, 2, 3]
    assert reader.torn is None and reader.valid_end == end
    writer.close()


def test_zeros_after_a_closed_segment_are_the_clean_end_too(tmp_path: Path) -> None:
    write_journal(tmp_path, 3).close()
    path = tmp_path / "wal-000000000001.log"
    end = path.stat().st_size
    with open(path, "ab") as f:
        f.write(b"\0" * 5)  # shorter than a record header: still only zeros
    reader = JournalReader(tmp_path)
    assert [e.number for e in reader.entries()] == [1, 2, 3]
    assert reader.torn is None and reader.valid_end == end


@pytest.mark.parametrize("kept", [0, 4, 8, 20])  # bytes of the last record that reached disk
def test_a_torn_record_followed_by_zeros_is_dropped_and_overwritten(
        tmp_path: Path, kept: int) -> None:
    writer = write_journal(tmp_path, 5)
    abandon(writer)  # killed: the zeros stay
    path = tmp_path / "wal-000000000001.log"
    last, end = record_offsets(path)[-1], record_end(path)
    zero_range(path, last + kept, end)  # the rest of its page never reached the disk
    reader = JournalReader(tmp_path)
    assert [e.number for e in reader.entries()] == [1, 2, 3, 4]
    assert reader.valid_end == last
    assert (reader.torn is not None) == (kept > 0)  # nothing of it written: a clean end
    assert reader.last_segment is not None
    writer = JournalWriter.reopen(tmp_path, reader.last_segment, 5)
    writer.append(command_record(CancelAll("t"), 5, 2_000))
    writer.write()
    abandon(writer)
    reader = JournalReader(tmp_path)
    entries = list(reader.entries())
    assert [e.number for e in entries] == [1, 2, 3, 4, 5]
    assert entries[-1].command == CancelAll("t") and reader.torn is None


def test_a_record_whose_header_never_reached_the_disk_is_torn_not_a_clean_end(
        tmp_path: Path) -> None:
    """A page written out of order: the last record's length is zeros, its payload not."""
    writer = write_journal(tmp_path, 4)
    abandon(writer)
    path = tmp_path / "wal-000000000001.log"
    last = record_offsets(path)[-1]
    zero_range(path, last, last + 8)
    reader = JournalReader(tmp_path)
    assert [e.number for e in reader.entries()] == [1, 2, 3]
    assert reader.torn is not None and "impossible record length 0" in reader.torn
    assert reader.valid_end == last


def test_a_valid_record_after_a_zero_hole_is_corruption(tmp_path: Path) -> None:
    writer = write_journal(tmp_path, 6)
    abandon(writer)
    path = tmp_path / "wal-000000000001.log"
    offsets = record_offsets(path)
    zero_range(path, offsets[2], offsets[3])  # input #3 lost, #4..#6 intact after it
    with pytest.raises(JournalCorrupt) as info:
        numbers(tmp_path)
    assert (info.value.path, info.value.offset, info.value.number) == (path, offsets[2], 3)
    assert "impossible record length 0" in str(info.value)


def test_zeros_hiding_the_end_of_an_older_segment_show_as_a_gap(tmp_path: Path) -> None:
    """A closed segment may keep its zeros (a crash before its trim); records it lost to
    zeros cannot pass for a clean end: the next segment does not continue it."""
    write_journal(tmp_path, 3).close()
    write_journal(tmp_path, 2, first=4).close()
    path = tmp_path / "wal-000000000001.log"
    zero_range(path, record_offsets(path)[-1], path.stat().st_size)
    with pytest.raises(JournalError, match="gap"):
        numbers(tmp_path)


def test_an_older_segment_a_crash_left_untrimmed_reads_whole(tmp_path: Path) -> None:
    abandon(write_journal(tmp_path, 3))  # rotation's new segment made, old one not trimmed
    write_journal(tmp_path, 2, first=4).close()
    assert (tmp_path / "wal-000000000001.log").stat().st_size == PREALLOC_CHUNK
    assert numbers(tmp_path) == [1, 2, 3, 4, 5]


def test_reopening_after_a_crash_appends_after_the_last_record_and_reads_back_whole(
        tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    write_journal(straight, 5).close()
    crashed = tmp_path / "crashed"
    abandon(write_journal(crashed, 3))
    reader = JournalReader(crashed)
    assert numbers(crashed) == [1, 2, 3]
    list(reader.entries())
    assert reader.last_segment is not None and reader.torn is None
    writer = JournalWriter.reopen(crashed, reader.last_segment, 4)
    for number in (4, 5):
        writer.append(command_record(
            NewOrder("t", f"o{number}", "SIM", Side.BUY, OrderType.LIMIT, 1, 10_000),
            number, 1_000 + number))
    writer.write()
    writer.close()
    assert numbers(crashed) == [1, 2, 3, 4, 5]
    # the same inputs give the same bytes, crash and restart or not
    name = "wal-000000000001.log"
    assert (crashed / name).read_bytes() == (straight / name).read_bytes()


def test_a_closed_segment_is_trimmed_to_its_last_record(tmp_path: Path) -> None:
    writer = write_journal(tmp_path, 4)
    path = tmp_path / "wal-000000000001.log"
    end = record_end(path)
    writer.sync()
    writer.close()
    writer.close()  # twice is harmless
    assert path.stat().st_size == end
    assert read_segment(path, last=False, first_hint=1).valid_end == end


def test_records_past_a_chunk_extend_the_zeros_a_chunk_at_a_time(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("journal.PREALLOC_CHUNK", 4096)
    writer = JournalWriter.create(tmp_path, 1, {"seq": 0, "ts": 0})
    path = tmp_path / "wal-000000000001.log"
    sizes, ends = [], []
    for number in range(1, 121):
        writer.append(command_record(
            NewOrder("t", f"o{number}", "SIM", Side.BUY, OrderType.LIMIT, 1, 10_000),
            number, 1_000 + number))
        # groups of a few records, then one bigger than a chunk, then single records
        if (number <= 49 and number % 7 == 0) or number >= 110:
            writer.write()
            sizes.append(path.stat().st_size)
            ends.append(record_end(path))
            assert sizes[-1] % 4096 == 0 and sizes[-1] >= ends[-1]
    assert ends[-11] - ends[-12] > 4096  # the big group: more than a chunk at once
    assert sorted(set(sizes)) == [4096, 8192, 12288]  # extended twice, a chunk at a time
    assert numbers(tmp_path) == list(range(1, 121))
    abandon(writer)
    with open(path, "r+b") as f:  # killed while extending: part of a chunk written
        f.truncate(record_end(path) + 100)
    reader = JournalReader(tmp_path)
    list(reader.entries())
    assert reader.last_segment is not None and reader.torn is None
    writer = JournalWriter.reopen(tmp_path, reader.last_segment, 121)
    for number in range(121, 126):  # more than the 100 zeros left: extended again
        writer.append(command_record(CancelAll("t"), number, 2_000))
    writer.write()
    assert path.stat().st_size % 4096 == 0
    writer.close()
    assert numbers(tmp_path) == list(range(1, 126))


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


@pytest.mark.parametrize("zeros", [0, 4096])  # what some filesystems show after a crash
def test_a_last_segment_without_its_header_holds_nothing(tmp_path: Path, zeros: int) -> None:
    write_journal(tmp_path, 2).close()
    (tmp_path / "wal-000000000003.log").write_bytes(
        SEGMENT_MAGIC[:5] + bytes(zeros))  # crash at creation
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
