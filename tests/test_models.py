"""The wire parser and the event encoder: what a client may send, and how events look."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from models import (
    EVENT_TYPE_NAMES,
    AmendOrder,
    AmendRejected,
    BookAction,
    BookChanged,
    CancelAll,
    CancelOrder,
    CancelReason,
    CancelRejected,
    Event,
    GetOpenOrders,
    GetPosition,
    Login,
    MarketStatusChanged,
    NewOrder,
    OrderAccepted,
    OrderAmended,
    OrderCanceled,
    OrderRejected,
    OrderTriggered,
    OrderType,
    Ping,
    PositionChanged,
    ProtocolError,
    RejectCode,
    Side,
    StpMode,
    TimeInForce,
    Trade,
    TraderStatus,
    TraderStatusChanged,
    event_from_dict,
    event_to_dict,
    parse_new_order,
    parse_request,
)

TRADER = "alice"


def order_msg(**fields: Any) -> dict[str, Any]:
    """A valid limit order message, with fields replaced (a ``None`` value drops the key)."""
    msg: dict[str, Any] = {"type": "new_order", "client_order_id": "c1", "symbol": "SIM",
                           "side": "buy", "order_type": "limit", "price": 10050, "qty": 3}
    msg.update(fields)
    return {key: value for key, value in msg.items() if value is not None}


def parse_error(msg: Any, trader_id: str | None = TRADER,
                default_symbol: str | None = None) -> ProtocolError:
    with pytest.raises(ProtocolError) as caught:
        parse_request(msg, trader_id, default_symbol)
    return caught.value


# ------------------------------------------------------------------ framing and session


@pytest.mark.parametrize("msg", [[], ["new_order"], "new_order", 42, 1.5, None, True])
def test_reject_request_when_message_is_not_an_object(msg: Any) -> None:
    assert parse_error(msg).code is RejectCode.BAD_JSON


@pytest.mark.parametrize("msg", [{"type": "fly"}, {"type": "NEW_ORDER"}, {"type": ""}])
def test_reject_request_when_type_is_unknown(msg: dict[str, Any]) -> None:
    error = parse_error(msg)
    assert error.code is RejectCode.UNKNOWN_TYPE
    assert repr(msg["type"]) in error.message


@pytest.mark.parametrize("msg", [{}, {"type": None}, {"type": 7}, {"type": ["ping"]}])
def test_reject_request_when_type_is_missing_or_not_a_string(msg: dict[str, Any]) -> None:
    assert parse_error(msg).code is RejectCode.UNKNOWN_TYPE


@pytest.mark.parametrize("msg", [
    order_msg(),
    {"type": "cancel_order", "order_id": 1},
    {"type": "amend_order", "order_id": 1, "qty": 2},
    {"type": "cancel_all"},
    {"type": "get_position"},
    {"type": "get_open_orders"},
])
def test_reject_request_when_not_logged_in(msg: dict[str, Any]) -> None:
    error = parse_error(msg, trader_id=None)
    assert error.code is RejectCode.NOT_LOGGED_IN
    assert error.ref == msg.get("client_order_id")


def test_reject_unknown_type_before_login_when_type_is_unknown() -> None:
    # an unknown type is named as such even before login, so a client sees its real mistake
    assert parse_error({"type": "fly"}, trader_id=None).code is RejectCode.UNKNOWN_TYPE


def test_answer_ping_when_not_logged_in() -> None:
    assert parse_request({"type": "ping"}, None) == Ping()


@pytest.mark.parametrize("trader_id", ["a", "Bot_7-x", "x" * 32])
def test_accept_login_when_trader_id_is_valid(trader_id: str) -> None:
    assert parse_request({"type": "login", "trader_id": trader_id}, None) == Login(trader_id)


def test_accept_login_token_when_one_is_sent() -> None:
    msg = {"type": "login", "trader_id": "bob", "token": "s3cret"}
    assert parse_request(msg, None) == Login("bob", "s3cret")


@pytest.mark.parametrize("trader_id", ["", "x" * 33, "has space", "semi;colon", "é", 5, None,
                                       True])
def test_reject_login_when_trader_id_is_malformed(trader_id: Any) -> None:
    msg = {"type": "login", "trader_id": trader_id}
    error = parse_error({k: v for k, v in msg.items() if v is not None}, trader_id=None)
    assert error.code is RejectCode.INVALID_FIELD
    assert "'trader_id'" in error.message


def test_reject_login_when_already_logged_in() -> None:
    error = parse_error({"type": "login", "trader_id": "bob"}, trader_id=TRADER)
    assert error.code is RejectCode.ALREADY_LOGGED_IN


# ------------------------------------------------------------------ new_order


def test_parse_limit_order_when_every_field_is_valid() -> None:
    msg = order_msg(tif="ioc", stp="decrement")
    assert parse_request(msg, TRADER) == NewOrder(
        TRADER, "c1", "SIM", Side.BUY, OrderType.LIMIT, 3, 10050, None, TimeInForce.IOC,
        False, StpMode.DECREMENT)


def test_apply_defaults_when_optional_fields_are_omitted() -> None:
    msg = order_msg(order_type=None)
    assert parse_request(msg, TRADER) == NewOrder(
        TRADER, "c1", "SIM", Side.BUY, OrderType.LIMIT, 3, 10050, None, TimeInForce.GTC,
        False, StpMode.CANCEL_RESTING)


@pytest.mark.parametrize("field", ["qty", "price"])
@pytest.mark.parametrize("value", [1.5, 10.0, True, False, "10", -1, 0, [3], {"v": 3}])
def test_reject_new_order_when_quantity_or_price_is_not_a_positive_integer(
        field: str, value: Any) -> None:
    error = parse_error(order_msg(**{field: value}))
    assert error.code is RejectCode.INVALID_FIELD
    assert f"'{field}'" in error.message
    assert error.ref == "c1"


@pytest.mark.parametrize("value", [99.5, True, "9900", -9900, 0])
def test_reject_stop_order_when_stop_price_is_not_a_positive_integer(value: Any) -> None:
    error = parse_error(order_msg(order_type="stop", price=None, stop_price=value))
    assert error.code is RejectCode.INVALID_FIELD
    assert "'stop_price'" in error.message


@pytest.mark.parametrize(("msg", "field"), [
    (order_msg(client_order_id=None), "client_order_id"),
    (order_msg(side=None), "side"),
    (order_msg(qty=None), "qty"),
    (order_msg(price=None), "price"),
    (order_msg(order_type="stop", price=None), "stop_price"),
    (order_msg(order_type="stop_limit"), "stop_price"),
    (order_msg(order_type="stop_limit", price=None, stop_price=9900), "price"),
])
def test_reject_new_order_when_a_required_field_is_missing(msg: dict[str, Any],
                                                           field: str) -> None:
    error = parse_error(msg)
    assert error.code is RejectCode.INVALID_FIELD
    assert f"'{field}'" in error.message
    assert "required" in error.message


@pytest.mark.parametrize("value", ["", "x" * 65, 17, ["c1"]])
def test_reject_new_order_when_client_order_id_is_malformed(value: Any) -> None:
    error = parse_error(order_msg(client_order_id=value))
    assert error.code is RejectCode.INVALID_FIELD
    assert "'client_order_id'" in error.message


def test_accept_client_order_id_when_it_is_64_characters() -> None:
    request = parse_request(order_msg(client_order_id="x" * 64), TRADER)
    assert isinstance(request, NewOrder) and request.client_order_id == "x" * 64


@pytest.mark.parametrize(("field", "value"), [
    ("side", "BUY"), ("side", "long"), ("side", 1),
    ("order_type", "iceberg"), ("order_type", "LIMIT"),
    ("tif", "day"), ("tif", "GTC"),
    ("stp", "none"), ("stp", "cancel"),
])
def test_reject_new_order_when_an_enum_value_is_unknown(field: str, value: Any) -> None:
    error = parse_error(order_msg(**{field: value}))
    assert error.code is RejectCode.INVALID_FIELD
    assert f"'{field}'" in error.message


@pytest.mark.parametrize("side", list(Side))
@pytest.mark.parametrize("tif", list(TimeInForce))
@pytest.mark.parametrize("stp", list(StpMode))
def test_parse_enum_values_when_each_valid_value_is_sent(side: Side, tif: TimeInForce,
                                                         stp: StpMode) -> None:
    request = parse_request(order_msg(side=side.value, tif=tif.value, stp=stp.value), TRADER)
    assert isinstance(request, NewOrder)
    assert (request.side, request.tif, request.stp) == (side, tif, stp)


@pytest.mark.parametrize("order_type", ["market", "stop"])
def test_default_to_ioc_when_a_market_like_order_omits_tif(order_type: str) -> None:
    stop_price = 9900 if order_type == "stop" else None
    request = parse_request(order_msg(order_type=order_type, price=None, stop_price=stop_price),
                            TRADER)
    assert isinstance(request, NewOrder)
    assert request.tif is TimeInForce.IOC
    assert request.price is None and request.stop_price == stop_price


@pytest.mark.parametrize("tif", ["ioc", "fok"])
def test_accept_market_order_when_tif_is_immediate(tif: str) -> None:
    request = parse_request(order_msg(order_type="market", price=None, tif=tif), TRADER)
    assert isinstance(request, NewOrder) and request.tif is TimeInForce(tif)


@pytest.mark.parametrize("order_type", ["market", "stop"])
def test_reject_market_like_order_when_tif_is_gtc(order_type: str) -> None:
    stop_price = 9900 if order_type == "stop" else None
    error = parse_error(order_msg(order_type=order_type, price=None, stop_price=stop_price,
                                  tif="gtc"))
    assert error.code is RejectCode.INVALID_FIELD
    assert "'tif'" in error.message


@pytest.mark.parametrize("order_type", ["market", "stop"])
def test_reject_market_like_order_when_price_is_given(order_type: str) -> None:
    stop_price = 9900 if order_type == "stop" else None
    error = parse_error(order_msg(order_type=order_type, stop_price=stop_price))
    assert error.code is RejectCode.INVALID_FIELD
    assert "'price'" in error.message
    assert "not allowed" in error.message


@pytest.mark.parametrize("order_type", ["limit", "market"])
def test_reject_order_when_stop_price_is_given_without_a_stop_type(order_type: str) -> None:
    price = 10050 if order_type == "limit" else None
    error = parse_error(order_msg(order_type=order_type, price=price, stop_price=9900))
    assert error.code is RejectCode.INVALID_FIELD
    assert "'stop_price'" in error.message


def test_parse_stop_limit_when_price_and_stop_price_are_given() -> None:
    msg = order_msg(order_type="stop_limit", side="sell", price=9850, stop_price=9900)
    assert parse_request(msg, TRADER) == NewOrder(
        TRADER, "c1", "SIM", Side.SELL, OrderType.STOP_LIMIT, 3, 9850, 9900)


def test_accept_post_only_when_order_is_a_gtc_limit() -> None:
    request = parse_request(order_msg(post_only=True), TRADER)
    assert isinstance(request, NewOrder) and request.post_only is True


@pytest.mark.parametrize("changes", [
    {"tif": "ioc"},
    {"tif": "fok"},
    {"order_type": "market", "price": None},
    {"order_type": "stop_limit", "stop_price": 9900},
])
def test_reject_post_only_when_order_is_not_a_gtc_limit(changes: dict[str, Any]) -> None:
    error = parse_error(order_msg(post_only=True, **changes))
    assert error.code is RejectCode.INVALID_FIELD
    assert "'post_only'" in error.message


@pytest.mark.parametrize("value", ["true", 1, 0, None])
def test_reject_post_only_when_it_is_not_a_bool(value: Any) -> None:
    msg = order_msg()
    msg["post_only"] = value  # kept even when None: an explicit null is not a bool either
    error = parse_error(msg)
    assert error.code is RejectCode.INVALID_FIELD
    assert "'post_only'" in error.message


def test_use_default_symbol_when_symbol_is_omitted_on_a_one_symbol_exchange() -> None:
    request = parse_request(order_msg(symbol=None), TRADER, default_symbol="SIM")
    assert isinstance(request, NewOrder) and request.symbol == "SIM"


def test_reject_new_order_when_symbol_is_omitted_on_a_several_symbol_exchange() -> None:
    error = parse_error(order_msg(symbol=None), default_symbol=None)
    assert error.code is RejectCode.INVALID_FIELD
    assert "'symbol'" in error.message


@pytest.mark.parametrize("value", ["", 5, "S" * 33])
def test_reject_new_order_when_symbol_is_malformed(value: Any) -> None:
    error = parse_error(order_msg(symbol=value))
    assert error.code is RejectCode.INVALID_FIELD
    assert "'symbol'" in error.message


def test_parse_new_order_directly_when_called_by_the_gateway() -> None:
    assert parse_new_order(order_msg(symbol=None), "bob", "SIM") == NewOrder(
        "bob", "c1", "SIM", Side.BUY, OrderType.LIMIT, 3, 10050)


# ------------------------------------------------------------------ cancel and amend


@pytest.mark.parametrize(("msg", "expected"), [
    ({"order_id": 7}, CancelOrder(TRADER, 7, None)),
    ({"client_order_id": "c1"}, CancelOrder(TRADER, None, "c1")),
    ({"order_id": 7, "client_order_id": "c1"}, CancelOrder(TRADER, 7, "c1")),
])
def test_parse_cancel_when_either_id_is_given(msg: dict[str, Any],
                                              expected: CancelOrder) -> None:
    assert parse_request({"type": "cancel_order", **msg}, TRADER) == expected


@pytest.mark.parametrize("kind", ["cancel_order", "amend_order"])
def test_reject_cancel_or_amend_when_no_id_is_given(kind: str) -> None:
    error = parse_error({"type": kind, "qty": 2})
    assert error.code is RejectCode.INVALID_FIELD
    assert "'order_id'" in error.message and "'client_order_id'" in error.message


@pytest.mark.parametrize("value", [0, -3, 2.0, "7", True])
def test_reject_cancel_when_order_id_is_not_a_positive_integer(value: Any) -> None:
    error = parse_error({"type": "cancel_order", "order_id": value})
    assert error.code is RejectCode.INVALID_FIELD
    assert "'order_id'" in error.message


def test_reject_cancel_when_client_order_id_is_empty() -> None:
    error = parse_error({"type": "cancel_order", "client_order_id": ""})
    assert error.code is RejectCode.INVALID_FIELD
    assert "'client_order_id'" in error.message


def test_parse_amend_when_price_and_qty_are_given() -> None:
    msg = {"type": "amend_order", "client_order_id": "c1", "price": 10040, "qty": 5}
    assert parse_request(msg, TRADER) == AmendOrder(TRADER, None, "c1", 10040, 5)


def test_reject_amend_when_neither_price_nor_qty_is_given() -> None:
    error = parse_error({"type": "amend_order", "order_id": 4})
    assert error.code is RejectCode.INVALID_FIELD
    assert error.ref == 4


@pytest.mark.parametrize("field", ["price", "qty"])
@pytest.mark.parametrize("value", [0, -1, 1.5, "5", False])
def test_reject_amend_when_price_or_qty_is_not_a_positive_integer(field: str,
                                                                  value: Any) -> None:
    error = parse_error({"type": "amend_order", "client_order_id": "c9", field: value})
    assert error.code is RejectCode.INVALID_FIELD
    assert f"'{field}'" in error.message
    assert error.ref == "c9"


@pytest.mark.parametrize(("msg", "expected"), [
    ({"type": "cancel_all"}, CancelAll(TRADER, None)),
    ({"type": "cancel_all", "symbol": "ALT"}, CancelAll(TRADER, "ALT")),
    ({"type": "get_position"}, GetPosition(None)),
    ({"type": "get_position", "symbol": "SIM"}, GetPosition("SIM")),
    ({"type": "get_open_orders", "symbol": "SIM"}, GetOpenOrders("SIM")),
    ({"type": "ping"}, Ping()),
])
def test_parse_session_request_when_symbol_is_optional(msg: dict[str, Any],
                                                      expected: object) -> None:
    assert parse_request(msg, TRADER) == expected


def test_keep_default_cancel_reason_when_a_trader_cancels_all() -> None:
    request = parse_request({"type": "cancel_all"}, TRADER)
    assert isinstance(request, CancelAll) and request.reason is CancelReason.USER


# ------------------------------------------------------------------ events on the wire

SAMPLE_EVENTS: list[Event] = [
    OrderAccepted(11, 1, "a", "c1", "SIM", Side.BUY, OrderType.STOP_LIMIT, 10010, 10020, 5,
                  TimeInForce.GTC, False, False),
    OrderAccepted(12, 2, "a", "~liq-2", "SIM", Side.SELL, OrderType.MARKET, None, None, 5,
                  TimeInForce.IOC, False, True),
    OrderRejected(13, "a", "c2", RejectCode.RISK_PRICE_BAND, "outside the band"),
    CancelRejected(14, "a", 9, None, RejectCode.UNKNOWN_ORDER, "no such order"),
    AmendRejected(15, "a", None, "c3", RejectCode.INVALID_FIELD, "bad qty"),
    Trade(16, 4, "SIM", 10000, 3, Side.SELL, 1, 2, "a", "b", "c1", "d1", 2, 0, -150, 300,
          True),
    OrderCanceled(17, 1, "a", "c1", "SIM", Side.BUY, 2, CancelReason.SELF_TRADE),
    OrderAmended(18, 1, "a", "c1", "SIM", Side.BUY, 10005, 7, 4, False),
    OrderAmended(18, 5, "a", "c5", "SIM", Side.SELL, None, 2, 2, True),
    OrderTriggered(19, 1, "a", "c1", "SIM"),
    BookChanged("SIM", BookAction.EXECUTE, 1, Side.SELL, 10000, 0, 12),
    PositionChanged(20, "a", "SIM", -3, -30000, 10_030_000, -1_500, 1_500),
    TraderStatusChanged(21, "a", TraderStatus.MARGIN_CALL),
    MarketStatusChanged(22, "SIM", False),
]


def test_cover_every_event_type_when_sampling_round_trips() -> None:
    assert {type(event) for event in SAMPLE_EVENTS} == set(EVENT_TYPE_NAMES)


@pytest.mark.parametrize("event", SAMPLE_EVENTS, ids=lambda e: type(e).__name__)
def test_round_trip_event_when_encoded_to_json_and_back(event: Event) -> None:
    message = event_to_dict(event, seq=42)
    assert list(message)[:2] == ["type", "seq"]
    assert message["type"] == EVENT_TYPE_NAMES[type(event)]
    assert message["seq"] == 42
    # on the wire enums are their plain string values and the payload is strict JSON
    decoded = orjson.loads(orjson.dumps(message))
    assert decoded == message
    assert all(type(value) in (str, int, bool, type(None)) for value in decoded.values())
    assert event_from_dict(decoded) == event


def test_encode_event_fields_in_declaration_order_when_seq_is_omitted() -> None:
    event = OrderCanceled(17, 1, "a", "c1", "SIM", Side.BUY, 2, CancelReason.IOC)
    assert event_to_dict(event) == {
        "type": "order_canceled", "ts": 17, "order_id": 1, "trader_id": "a",
        "client_order_id": "c1", "symbol": "SIM", "side": "buy", "canceled_qty": 2,
        "reason": "ioc"}
    assert list(event_to_dict(event))[1] == "ts"


def test_flip_side_when_asking_for_the_opposite() -> None:
    assert Side.BUY.opposite is Side.SELL
    assert Side.SELL.opposite is Side.BUY
    assert str(Side.BUY) == "buy"
