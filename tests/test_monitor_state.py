"""monitor_client.FeedState: the monitor's feed logic, without a terminal."""

from __future__ import annotations

from monitor_client import FeedState, format_text


def snapshot(symbol: str = "SIM", seq: int = 10) -> dict:
    return {"type": "book_snapshot", "symbol": symbol, "seq": seq,
            "bids": [[9999, 5], [9998, 7]], "asks": [[10001, 3], [10003, 4]]}


def test_snapshot_then_updates_give_the_book_best_first() -> None:
    state = FeedState()
    state.apply(snapshot(), 0.0)
    state.apply({"type": "book_update", "symbol": "SIM", "seq": 11,
                 "bids": [[10000, 2], [9998, 0]], "asks": [[10002, 9]]}, 0.0)
    assert state.depth("SIM", "bids") == [[10000, 2], [9999, 5]]
    assert state.depth("SIM", "asks") == [[10001, 3], [10002, 9], [10003, 4]]
    assert state.depth("SIM", "asks", 2) == [[10001, 3], [10002, 9]]
    assert state.books["SIM"]["seq"] == 11


def test_updates_already_in_the_snapshot_or_without_one_are_ignored() -> None:
    state = FeedState()
    state.apply({"type": "book_update", "symbol": "SIM", "seq": 5, "bids": [[1, 1]],
                 "asks": []}, 0.0)
    assert state.books == {}
    state.apply(snapshot(seq=10), 0.0)
    state.apply({"type": "book_update", "symbol": "SIM", "seq": 10, "bids": [[9999, 0]],
                 "asks": []}, 0.0)
    assert state.depth("SIM", "bids")[0] == [9999, 5]
    state.apply(snapshot(seq=20) | {"bids": [[9000, 1]]}, 0.0)  # a resync replaces the book
    assert state.depth("SIM", "bids") == [[9000, 1]]


def test_batch_frames_trades_leaderboard_status_errors_and_pongs() -> None:
    state = FeedState(max_trades=3)
    trades = [{"type": "trade", "symbol": "SIM", "seq": i, "trade_id": i, "price": 10000 + i,
               "qty": 1, "aggressor": "buy", "buy_trader": "a", "sell_trader": "b", "ts": i}
              for i in range(5)]
    board = {"type": "leaderboard", "seq": 9, "ts": 1, "rows": [
        {"trader_id": "a", "position": 1, "cash": 1.5, "realized_pnl": 0.0, "equity": 2.5}]}
    state.apply_frame([{"type": "status", "exchange": "online"}, snapshot(), *trades, board],
                      0.0)
    state.apply_frame({"type": "error", "code": "UNKNOWN_TYPE", "message": "x"}, 0.0)
    state.apply_frame({"type": "pong"}, 0.0)
    assert state.status == "online"
    assert [t["trade_id"] for t in state.trades] == [2, 3, 4]  # the newest, newest last
    assert state.leaderboard == board
    assert state.last_error is not None and state.last_error["code"] == "UNKNOWN_TYPE"
    assert state.pongs == 1 and state.messages == 2 + 5 + 1 + 2
    state.apply_frame({"type": "status", "exchange": "offline"}, 0.0)
    assert state.status == "offline"


def test_message_rate_over_a_sliding_window() -> None:
    state = FeedState()
    for i in range(50):
        state.apply({"type": "pong"}, 100.0 + i / 100)
    for i in range(100):
        state.apply({"type": "pong"}, 101.0 + i / 200)
    assert state.rate(101.9) == 150 / 5
    assert state.rate(105.5) == 100 / 5  # second 100 has left the 5 s window
    assert state.rate(107.0) == 0


def test_to_json_and_text_rendering() -> None:
    state = FeedState()
    state.apply_frame([{"type": "status", "exchange": "online"}, snapshot("SIM"),
                       snapshot("ALT", 12)], 0.0)
    assert state.to_json() == {
        "status": "online",
        "books": {s: {"seq": seq, "bids": [[9999, 5], [9998, 7]],
                      "asks": [[10001, 3], [10003, 4]]} for s, seq in (("ALT", 12), ("SIM", 10))},
        "trades": [], "leaderboard": None, "closed_markets": []}
    text = format_text(state, 10)
    assert "exchange: online" in text and "9999" in text and "10003" in text
    assert "CLOSED" not in text


def test_a_halted_symbol_is_shown_until_it_reopens() -> None:
    state = FeedState()
    state.apply_frame([snapshot("SIM"), snapshot("ALT", 12),
                       {"type": "market_status", "symbol": "SIM", "seq": 13, "is_open": False}],
                      0.0)
    assert state.to_json()["closed_markets"] == ["SIM"]
    text = format_text(state, 10)
    assert "SIM" in text and text.count("CLOSED") == 1
    state.apply({"type": "market_status", "symbol": "SIM", "seq": 14, "is_open": True}, 0.0)
    assert state.closed == set() and "CLOSED" not in format_text(state, 10)


def test_a_malformed_message_is_counted_and_skipped() -> None:
    state = FeedState()
    state.apply_frame([{"type": "status"}, "junk", snapshot(), {"type": "book_update"}], 0.0)
    assert state.malformed == 3
    assert state.depth("SIM", "bids") == [[9999, 5], [9998, 7]]
