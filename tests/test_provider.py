"""Packing rows into provider payloads, and reading config envelopes. Every
payload built here goes through the servers' rules (`tests.server_rules`)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from src.backend.provider import Provider, Publish, pack_rows, split_text
from src.backend.tenta_backend import TentaProvider
from src.backend.thingsboard_backend import ThingsBoardProvider
from src.types import Config, ConfigMessageBody, DataMessageBody, LogMessageBody
from src.utils.messaging_agent import QueueRow
from tests.conftest import template_config_dict
from tests.server_rules import check_payload, packet_bytes

pytestmark = pytest.mark.quick

SENSOR = "8c4f4b5e-2f36-4d3b-9c41-6a1f0e2b7d90"


def config(provider: str, max_payload_bytes: int = 64_000) -> Config:
    c = template_config_dict()
    c["general"]["system_identifier"] = SENSOR
    c["backend"] = {
        "provider": provider,
        "mqtt_host": "localhost",
        "mqtt_client_id": "c",
        "max_payload_bytes": max_payload_bytes,
    }
    return Config.model_validate(c)


def make_provider(name: str, max_payload_bytes: int = 64_000) -> Provider:
    cls = TentaProvider if name == "tenta" else ThingsBoardProvider
    return cls(config(name, max_payload_bytes))


def row_of(i: int, body: Any, timestamp: float = 1_700_000_000.0, revision: int = 2) -> QueueRow:
    encoded = body.model_dump_json() if hasattr(body, "model_dump_json") else json.dumps(body)
    variant = body.variant if hasattr(body, "variant") else "data"
    return QueueRow(i, timestamp + i, variant, revision, encoded)


def data_row(i: int, size: int = 1) -> QueueRow:
    return row_of(i, DataMessageBody(data={"x": float(i), "pad": "p" * size}))


def identifier(row_id: int) -> str:
    return f"abc-{row_id}"


def checked(publishes: list[Publish]) -> list[Publish]:
    for publish in publishes:
        check_payload(publish.topic, publish.payload())
    return publishes


def items_on(publishes: list[Publish], topic: str) -> list[dict[str, Any]]:
    return [item for p in publishes if p.topic == topic for item in json.loads(p.payload())]


# --- the checker itself can fail ----------------------------------------------------


@pytest.mark.parametrize(
    ("topic", "item", "problem"),
    [
        (f"measurements/{SENSOR}", {"value": {"a": 1}, "timestamp": 1, "identifier": "x"}, "extra"),
        (f"measurements/{SENSOR}", {"value": {"A": 1.0}, "timestamp": 1}, "pattern"),
        (f"measurements/{SENSOR}", {"value": {"a": True}, "timestamp": 1}, "number"),
        (f"measurements/{SENSOR}", {"value": {}, "timestamp": 1}, "at least 1"),
        (f"logs/{SENSOR}", {"message": "m", "severity": "debug", "timestamp": 1}, "severity"),
        (f"acknowledgments/{SENSOR}", {"success": True, "timestamp": 1}, "revision"),
        (f"acknowledgments/{SENSOR}", {"success": 1, "timestamp": 1, "revision": 0}, "bool"),
        ("measurements/station-1", {"value": {"a": 1}, "timestamp": 1}, "UUID"),
        ("v1/devices/me/telemetry", {"ts": 1, "values": {"a": 2**64}}, "big integer"),
        ("v1/devices/me/telemetry", {"ts": 1.5, "values": {"a": 1}}, "integer"),
    ],
)
def test_the_server_rules_refuse_what_the_servers_refuse(
    topic: str, item: dict[str, Any], problem: str
) -> None:
    with pytest.raises(ValueError, match=problem):
        check_payload(topic, json.dumps([item]).encode())


def test_the_server_rules_refuse_empty_arrays_nan_and_oversized_thingsboard_packets() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        check_payload(f"logs/{SENSOR}", b"[]")
    with pytest.raises(ValueError, match="NaN is not JSON"):
        check_payload(f"measurements/{SENSOR}", b'[{"value": {"a": NaN}, "timestamp": 1}]')
    big = json.dumps([{"ts": 1, "values": {"a": "x" * 65_536}}]).encode()
    with pytest.raises(ValueError, match="closes the connection"):
        check_payload("v1/devices/me/telemetry", big)


# --- Tenta ------------------------------------------------------------------------


def test_tenta_items_carry_exactly_tentas_keys() -> None:
    provider = make_provider("tenta")
    rows = [
        row_of(1, DataMessageBody(data={"co2": 412.5, "n": 3})),
        row_of(2, LogMessageBody(level="WARNING", subject="fan", body="slow")),
        row_of(
            3, ConfigMessageBody(status="accepted", config_revision=4, software_version="0.1.0")
        ),
        row_of(
            4,
            ConfigMessageBody(
                status="rejected", config_revision=5, software_version="0.1.0", reason="x: bad"
            ),
        ),
    ]
    publishes = checked(pack_rows(provider, rows, identifier))
    assert items_on(publishes, f"measurements/{SENSOR}") == [
        {"value": {"co2": 412.5, "n": 3}, "timestamp": 1_700_000_001.0, "revision": 2}
    ]
    assert items_on(publishes, f"acknowledgments/{SENSOR}") == [
        {"success": True, "timestamp": 1_700_000_003.0, "revision": 4},
        {"success": False, "timestamp": 1_700_000_004.0, "revision": 5},
    ]
    logs = items_on(publishes, f"logs/{SENSOR}")
    assert logs[0] == {
        "message": "fan\nslow",
        "severity": "warning",
        "timestamp": 1_700_000_002.0,
        "revision": 2,
    }
    assert logs[-1]["severity"] == "error" and "x: bad" in logs[-1]["message"]


def test_tenta_sends_good_values_as_measurements_and_names_the_rest() -> None:
    provider = make_provider("tenta")
    body = {"variant": "data", "data": {"co2": 1.5, "CO2": 2.0, "ok": True, "s": "A1", "n": 7}}
    rows = [row_of(1, body), row_of(2, {"variant": "data", "data": {"nan": float("nan")}})]
    publishes = checked(pack_rows(provider, rows, identifier))
    assert items_on(publishes, f"measurements/{SENSOR}") == [
        {"value": {"co2": 1.5, "n": 7}, "timestamp": 1_700_000_001.0, "revision": 2}
    ]
    logs = items_on(publishes, f"logs/{SENSOR}")
    assert {
        "message": "s: A1",
        "severity": "info",
        "timestamp": 1_700_000_001.0,
        "revision": 2,
    } in (logs)
    errors = [log["message"] for log in logs if log["severity"] == "error"]
    assert "'CO2' = 2.0 (key must match" in errors[0]
    assert "'ok' = true (bool is not a number)" in errors[0]
    assert "'nan' = NaN (not a finite number)" in errors[1]


def test_a_long_tenta_log_is_split_into_numbered_parts_never_cut() -> None:
    text = "".join(f"line {i} é\n" for i in range(5_000))  # about 45,000 characters
    row = row_of(1, LogMessageBody(level="ERROR", subject="s", body=text))
    publishes = checked(pack_rows(make_provider("tenta"), [row], identifier))
    messages = [item["message"] for item in items_on(publishes, f"logs/{SENSOR}")]
    assert len(messages) >= 3
    assert all(len(m) <= 16_384 for m in messages)
    assert messages[0].startswith(f"[part 1/{len(messages)}] ")
    rebuilt = "".join(m.split("] ", 1)[1] for m in messages)
    assert rebuilt == f"s\n{text}"


def test_revisions_outside_tentas_range_are_left_out_not_sent() -> None:
    row = row_of(1, DataMessageBody(data={"a": 1.0}), revision=2**40)
    publishes = checked(pack_rows(make_provider("tenta"), [row], identifier))
    assert items_on(publishes, f"measurements/{SENSOR}") == [
        {"value": {"a": 1.0}, "timestamp": 1_700_000_001.0}
    ]


# --- ThingsBoard --------------------------------------------------------------------


def test_thingsboard_payloads_never_exceed_its_packet_limit() -> None:
    provider = make_provider("thingsboard", max_payload_bytes=10_000_000)
    rows = [data_row(i, size=3_000) for i in range(1, 200)]
    rows.append(row_of(200, LogMessageBody(level="ERROR", subject="s", body="é" * 65_536)))
    publishes = checked(pack_rows(provider, rows, identifier))
    assert max(packet_bytes(p.topic, p.payload()) for p in publishes) <= 65_536
    parts = [
        item
        for item in items_on(publishes, "v1/devices/me/telemetry")
        if "log_body" in item["values"]
    ]
    assert len(parts) >= 3  # the long body went out in parts, each a millisecond apart
    assert [p["ts"] for p in parts] == [parts[0]["ts"] + i for i in range(len(parts))]
    rebuilt = "".join(p["values"]["log_body"].split("] ", 1)[1] for p in parts)
    assert rebuilt == "é" * 65_536


def test_thingsboard_startup_reports_the_software_and_drops_nulls() -> None:
    row = row_of(
        1, ConfigMessageBody(status="startup", config_revision=0, software_version="0.1.0")
    )
    publishes = checked(pack_rows(make_provider("thingsboard"), [row], identifier))
    (item,) = items_on(publishes, "v1/devices/me/telemetry")
    assert item["values"] == {
        "config_status": "startup",
        "config_revision": 0,
        "config_software_version": "0.1.0",
        "current_sw_title": "ivy",
        "current_sw_version": "0.1.0",
        "message_identifier": "abc-1",
    }


# --- both -------------------------------------------------------------------------

_keys = st.one_of(
    st.sampled_from(["co2", "t_in", "CO2", "a-b", "x" * 70, "ok"]),
    st.text(min_size=1, max_size=128),
)
_values = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=300),
)
_bodies = st.one_of(
    st.builds(DataMessageBody, data=st.dictionaries(_keys, _values, min_size=1, max_size=40)),
    st.builds(
        LogMessageBody,
        level=st.sampled_from(["DEBUG", "INFO", "WARNING", "ERROR", "EXCEPTION"]),
        subject=st.text(max_size=512),
        body=st.text(max_size=40_000),
    ),
    st.builds(
        ConfigMessageBody,
        status=st.sampled_from(["received", "accepted", "rejected", "startup"]),
        config_revision=st.one_of(st.none(), st.integers(0, 2**31 - 1)),
        software_version=st.one_of(st.none(), st.just("0.1.0")),
        reason=st.one_of(st.none(), st.text(max_size=30_000)),
    ),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    bodies=st.lists(_bodies, min_size=1, max_size=8),
    provider_name=st.sampled_from(["tenta", "thingsboard"]),
    max_payload_bytes=st.sampled_from([1_024, 4_000, 64_000, 10_000_000]),
)
def test_every_payload_of_every_message_passes_the_server_rules(
    bodies: list[Any], provider_name: str, max_payload_bytes: int
) -> None:
    rows = [row_of(i, body) for i, body in enumerate(bodies, start=1)]
    publishes = checked(
        pack_rows(make_provider(provider_name, max_payload_bytes), rows, identifier)
    )
    assert sorted({r for p in publishes for r in p.row_ids}) == [r.id for r in rows]


def test_payloads_are_bounded_ordered_and_remember_their_rows() -> None:
    rows = [data_row(i) for i in range(1, 201)]
    publishes = checked(pack_rows(make_provider("thingsboard", 2_000), rows, identifier))
    assert all(len(p.payload()) <= 2_000 for p in publishes)
    assert len(publishes) > 5
    items = items_on(publishes, "v1/devices/me/telemetry")
    assert [item["values"]["message_identifier"] for item in items] == [
        identifier(i) for i in range(1, 201)
    ]
    assert sorted(r for p in publishes for r in p.row_ids) == list(range(1, 201))


def test_solo_and_poisoned_rows_travel_alone_in_order() -> None:
    rows = [data_row(i) for i in range(1, 7)]
    publishes = checked(
        pack_rows(
            make_provider("thingsboard"),
            rows,
            identifier,
            solo_rows={3},
            poisoned_rows={5: "the broker refused it: Payload format invalid"},
        )
    )
    assert [p.row_ids for p in publishes] == [[1, 2], [3], [4], [5], [6]]
    (error,) = json.loads(publishes[3].payload())
    assert "Payload format invalid" in error["values"]["error"]
    assert rows[4].body in error["values"]["error"]


@pytest.mark.parametrize("provider_name", ["tenta", "thingsboard"])
def test_unreadable_rows_go_out_as_errors_and_do_not_block(provider_name: str) -> None:
    rows = [
        data_row(1),
        QueueRow(2, 1_700_000_002.0, "future", 2, '{"variant": "future", "x": 1}'),
        QueueRow(3, 1_700_000_003.0, "data", 2, "{not json"),
        QueueRow(4, 5e9, "data", 2, '{"variant": "data", "data": {"a": 1}}'),  # past 2038
        data_row(5),
    ]
    publishes = checked(pack_rows(make_provider(provider_name), rows, identifier))
    carried = sorted(r for p in publishes for r in p.row_ids)
    assert sorted(set(carried)) == [1, 2, 3, 4, 5]
    text = b"".join(p.payload() for p in publishes).decode()
    assert "unknown message variant 'future'" in text
    assert "JSONDecodeError" in text and "{not json" in text


def test_split_text_respects_characters_and_encoded_bytes() -> None:
    text = "a\u0001é😀" * 1_000
    parts = split_text(text, max_chars=500, max_bytes=700)
    assert "".join(parts) == text
    assert all(
        len(p) <= 500 and len(json.dumps(p, ensure_ascii=False).encode()) - 2 <= 700 for p in parts
    )


# --- received configs ----------------------------------------------------------------


def tenta_config_in(payload: Any) -> Any:
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return make_provider("tenta").config_in(f"configurations/{SENSOR}", raw)


def test_tenta_envelopes() -> None:
    good = tenta_config_in(
        {"revision": 9, "configuration": {"general": {"software_version": "0.1.0"}}}
    )
    # Tenta's revision is the config's once it is verified (the receiver sets it)
    assert good.error is None and good.server_revision == 9
    assert good.config == {"general": {"software_version": "0.1.0"}}
    assert "not valid JSON" in tenta_config_in(b"{oops").error
    assert "revision: expected an integer" in tenta_config_in({"configuration": {}}).error
    assert (
        "configuration: expected a JSON object"
        in tenta_config_in({"revision": 1, "configuration": [1]}).error
    )
    assert make_provider("tenta").config_in("configurations/other", b"{}") is None


def test_thingsboard_attributes() -> None:
    provider = make_provider("thingsboard")
    value = {"general": {"config_revision": 4}}
    pushed = provider.config_in(
        "v1/devices/me/attributes", json.dumps({"configuration": json.dumps(value)}).encode()
    )
    assert pushed is not None and pushed.config == value
    response = provider.config_in(
        "v1/devices/me/attributes/response/1",
        json.dumps({"shared": {"configuration": value}}).encode(),
    )
    assert response is not None and response.config == value
    assert provider.config_in("v1/devices/me/attributes", b'{"other": 1}') is None
    broken = provider.config_in("v1/devices/me/attributes", b'{"configuration": "{no"}')
    assert broken is not None and "attribute configuration: not valid JSON" in (broken.error or "")


@pytest.mark.parametrize("name", ["tenta", "thingsboard"])
def test_every_update_answer_is_a_payload_the_server_accepts(name: str) -> None:
    """The answers of a software update (each step, the switch, success,
    failure with a long reason) and a status from another version all pass
    the server's rules; ThingsBoard gets its OTA keys."""
    raw = template_config_dict()
    raw["general"]["software_version"] = "9.9.9"
    raw["general"]["config_revision"] = 12
    bodies = [
        ConfigMessageBody.about("received", raw, software_update="DOWNLOADING"),
        ConfigMessageBody.about(
            "progress", raw, step="download", step_seconds=0.25, software_update="DOWNLOADED"
        ),
        ConfigMessageBody.about("progress", raw, step="install", step_seconds=1.5),
        ConfigMessageBody.about("progress", raw, step="switch", software_update="UPDATING"),
        ConfigMessageBody.about("accepted", raw, software_update="UPDATED"),
        ConfigMessageBody.about(
            "rejected", raw, "failed at tests:\n" + "x" * 30_000, software_update="FAILED"
        ),
    ]
    rows = [row_of(i, body) for i, body in enumerate(bodies)]
    another = json.loads(bodies[0].model_dump_json()) | {
        "status": "paused-by-a-newer-version",
        "software_update": None,
    }
    rows.append(QueueRow(len(rows), 1_700_000_100.0, "config", 12, json.dumps(another)))
    publishes = checked(pack_rows(make_provider(name), rows, identifier))
    items = [item for p in publishes for item in json.loads(p.payload())]
    if name == "thingsboard":
        states = [i["values"].get("sw_state") for i in items if "config_status" in i["values"]]
        assert states == ["DOWNLOADING", "DOWNLOADED", None, "UPDATING", "UPDATED", "FAILED", None]
        assert items[1]["values"]["config_step"] == "download"
    else:
        messages = [i["message"] for i in items if "message" in i]
        assert "config revision 12: download done in 0.25 s (Ivy 9.9.9)" in messages
        assert any("paused-by-a-newer-version" in m for m in messages)
        acks = [i for i in items if "success" in i]
        assert [a["success"] for a in acks] == [True, False]
