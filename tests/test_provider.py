"""Packing rows into provider payloads, and reading config envelopes."""

from __future__ import annotations

import json
from typing import Any

import pytest

from src.backend.provider import pack_rows
from src.backend.tenta import TentaProvider
from src.backend.thingsboard import ThingsBoardProvider
from src.types import Config
from src.utils.messaging_agent import QueueRow
from tests.conftest import template_config_dict

pytestmark = pytest.mark.quick


def config(provider: str) -> Config:
    c = template_config_dict()
    c["general"]["system_identifier"] = "s1"
    c["backend"] = {"provider": provider, "mqtt_host": "localhost", "mqtt_client_id": "c"}
    return Config.model_validate(c)


def data_row(i: int, size: int = 1) -> QueueRow:
    body = json.dumps({"variant": "data", "data": {"x": float(i), "pad": "p" * size}})
    return QueueRow(i, 1_700_000_000.0 + i, "data", 2, body)


def identifier(row_id: int) -> str:
    return f"abc-{row_id}"


def test_payloads_are_bounded_ordered_and_remember_their_rows() -> None:
    rows = [data_row(i) for i in range(1, 201)]
    publishes = pack_rows(TentaProvider(config("tenta")), rows, identifier, 2_000)
    measurements = [p for p in publishes if p.topic == "measurements/s1"]
    logs = [p for p in publishes if p.topic == "logs/s1"]
    assert all(len(p.payload()) <= 2_000 for p in publishes)
    assert len(measurements) > 5
    items = [item for p in measurements for item in json.loads(p.payload())]
    assert [item["identifier"] for item in items] == [identifier(i) for i in range(1, 201)]
    # each row is carried by one measurement publish and one log publish (its string)
    assert sorted(r for p in measurements for r in p.row_ids) == list(range(1, 201))
    assert sorted(r for p in logs for r in p.row_ids) == list(range(1, 201))


def test_an_item_larger_than_the_bound_travels_alone() -> None:
    rows = [data_row(1), data_row(2, size=5_000), data_row(3)]
    publishes = pack_rows(ThingsBoardProvider(config("thingsboard")), rows, identifier, 2_000)
    assert [p.row_ids for p in publishes] == [[1], [2], [3]]


@pytest.mark.parametrize("provider_name", ["tenta", "thingsboard"])
def test_unreadable_rows_go_out_as_errors_and_do_not_block(provider_name: str) -> None:
    provider = (TentaProvider if provider_name == "tenta" else ThingsBoardProvider)(
        config(provider_name)
    )
    rows = [
        data_row(1),
        QueueRow(2, 1_700_000_002.0, "future", 2, '{"variant": "future", "x": 1}'),
        QueueRow(3, 1_700_000_003.0, "data", 2, "{not json"),
        data_row(4),
    ]
    publishes = pack_rows(provider, rows, identifier, 64_000)
    carried = sorted(r for p in publishes for r in p.row_ids)
    assert sorted(set(carried)) == [1, 2, 3, 4]
    text = b"".join(p.payload() for p in publishes).decode()
    assert "unknown message variant 'future'" in text
    assert "JSONDecodeError" in text and "{not json" in text


def tenta_config_in(payload: Any) -> Any:
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return TentaProvider(config("tenta")).config_in("configurations/s1", raw)


def test_tenta_envelopes() -> None:
    good = tenta_config_in(
        {"revision": 9, "configuration": {"general": {"software_version": "0.1.0"}}}
    )
    assert good.error is None and good.config["general"]["config_revision"] == 9
    assert "not valid JSON" in tenta_config_in(b"{oops").error
    assert "revision: expected an integer" in tenta_config_in({"configuration": {}}).error
    assert (
        "configuration: expected a JSON object"
        in tenta_config_in({"revision": 1, "configuration": [1]}).error
    )
    assert TentaProvider(config("tenta")).config_in("configurations/other", b"{}") is None


def test_thingsboard_attributes() -> None:
    provider = ThingsBoardProvider(config("thingsboard"))
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
