"""End-to-end: the exchange process over a damaged or torn journal, and its new flags."""

from __future__ import annotations

import signal
from pathlib import Path

from journal import PREALLOC_CHUNK, journal_dir, list_segments, read_segment
from tests.stack import logged_in, running_exchange, stop_process
from tests.test_exchange_process import exchange_to_exit, trade_once
from tests.test_recovery_support import final_hash, recovered_line


async def trade_and_stop(data_dir: Path, sig: int = signal.SIGTERM) -> str:
    """A few trades, then a clean stop (returns the final state hash it logged) or a
    SIGKILL (no final snapshot: recovery reads the whole journal)."""
    async with running_exchange(data_dir, "--snapshot-every", "0") as exchange:
        await trade_once(exchange.uris["gateway"], "r1")
        await trade_once(exchange.uris["gateway"], "r2")
        code = await stop_process(exchange.proc, sig)
    if sig == signal.SIGKILL:
        assert code == -signal.SIGKILL
        return ""
    assert code == 0
    return final_hash(exchange.stderr_text)


def first_segment(data_dir: Path) -> Path:
    return list_segments(journal_dir(data_dir))[0][1]


async def test_help_lists_the_journal_flags() -> None:
    code, out, _ = await exchange_to_exit("--help")
    assert code == 0
    for flag in ("--journal-flush", "--snapshot-every", "--no-journal", "--data-dir"):
        assert flag in out


async def test_a_restart_continues_from_the_journal(tmp_path: Path) -> None:
    final = await trade_and_stop(tmp_path)
    async with running_exchange(tmp_path) as exchange:
        inputs, seq, recovered = recovered_line(exchange.stderr_text)
        assert recovered == final and inputs > 0 and seq > 0
        async with logged_in(exchange.uris["gateway"], "alice") as alice:
            await alice.send({"type": "get_position"})
            position = await alice.recv_type("position")
        assert position["position"] == -6  # sold 3 twice before the restart


async def test_a_corrupt_record_in_the_middle_stops_the_start_naming_where(
        tmp_path: Path) -> None:
    await trade_and_stop(tmp_path, signal.SIGKILL)
    path = first_segment(tmp_path)
    offset, _ = read_segment(path, last=True, first_hint=1).records[3]  # input #4
    data = bytearray(path.read_bytes())
    data[offset + 12] ^= 0x40
    path.write_bytes(bytes(data))
    code, out, err = await exchange_to_exit("--port", "0", "--events-port", "0",
                                       "--data-dir", str(tmp_path))
    assert code == 3 and "READY" not in out
    assert str(path) in err and f"byte offset {offset}" in err and "input #4" in err


async def test_a_killed_exchange_leaves_zeros_that_a_restart_reads_as_the_clean_end(
        tmp_path: Path) -> None:
    await trade_and_stop(tmp_path, signal.SIGKILL)
    path = first_segment(tmp_path)
    end = read_segment(path, last=True, first_hint=1).valid_end
    assert path.stat().st_size == PREALLOC_CHUNK > end  # the live segment's zeros
    async with running_exchange(tmp_path, "--snapshot-every", "0") as exchange:
        inputs, _, _ = recovered_line(exchange.stderr_text)
        assert inputs > 0 and "torn" not in exchange.stderr_text
        await trade_once(exchange.uris["gateway"], "r3")
        assert await stop_process(exchange.proc, signal.SIGTERM) == 0
    # the restart appended after the last record; the clean stop (a snapshot, then a new
    # segment) trimmed both segments
    segments = [p for _, p in list_segments(journal_dir(tmp_path))]
    assert segments[0] == path and len(segments) == 2
    for each in segments:
        assert each.stat().st_size == read_segment(each, False, 1).valid_end
    assert len(read_segment(path, last=False, first_hint=1).records) > inputs


async def test_a_torn_last_record_is_dropped_with_a_warning(tmp_path: Path) -> None:
    final = await trade_and_stop(tmp_path)
    path = list_segments(journal_dir(tmp_path))[-1][1]
    with open(path, "ab") as f:
        f.write(b"\x30\x00\x00\x00\x12\x34\x56\x78[\"N\",1")  # a write cut short
    async with running_exchange(tmp_path) as exchange:
        _, _, recovered = recovered_line(exchange.stderr_text)
        assert "dropped a torn last record" in exchange.stderr_text
        assert recovered == final
    # the tail was cut before anything new was appended: the next start is clean
    async with running_exchange(tmp_path) as exchange:
        assert "torn" not in exchange.stderr_text


async def test_no_journal_refuses_a_data_dir_that_has_one(tmp_path: Path) -> None:
    await trade_and_stop(tmp_path)
    code, out, err = await exchange_to_exit("--port", "0", "--events-port", "0",
                                       "--data-dir", str(tmp_path), "--no-journal")
    assert code == 2 and "has a journal" in err and "READY" not in out
