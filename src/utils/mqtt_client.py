"""A paho-mqtt 2 client set up from a `BrokerConnection` (protocol,
persistent session, credentials, TLS), shared by the backends and `ivy
fleet`, so that both log in to a broker the same way."""

from __future__ import annotations

import ssl
from typing import Literal

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from src.types.config import BrokerConnection

# MQTT 5: how long the broker keeps a session (queued messages) while offline
SESSION_EXPIRY_SECONDS = 30 * 24 * 3600


def new_mqtt_client(
    settings: BrokerConnection, client_id: str | None = None, persistent: bool = True
) -> mqtt.Client:
    """A client for `client_id` (default: the settings' own) with a
    persistent session (or a clean one), logging in with the settings'
    credentials and TLS. Not connected yet: see `connect_arguments`."""
    v5 = settings.mqtt_protocol == "5"
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id or settings.mqtt_client_id,
        protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
        clean_session=None if v5 else not persistent,
    )
    if settings.mqtt_username is not None or settings.mqtt_password is not None:
        client.username_pw_set(
            settings.mqtt_username or "",
            settings.mqtt_password.get_secret_value() if settings.mqtt_password else None,
        )
    if settings.tls is not None:
        client.tls_set(
            ca_certs=settings.tls.ca_file,
            certfile=settings.tls.client_cert_file,
            keyfile=settings.tls.client_key_file,
            cert_reqs=ssl.CERT_REQUIRED,
            tls_version=ssl.PROTOCOL_TLS_CLIENT,
        )
        client.tls_insecure_set(not settings.tls.check_hostname)
    return client


def connect_arguments(
    settings: BrokerConnection, persistent: bool = True
) -> tuple[bool | Literal[3], Properties | None]:
    """(clean_start, properties) for `connect`/`connect_async`: a persistent
    session is kept by the broker for a month (MQTT 5; 3.1.1 keeps it
    through `clean_session=False`)."""
    if settings.mqtt_protocol != "5":
        return mqtt.MQTT_CLEAN_START_FIRST_ONLY, None  # ignored by 3.1.1
    if not persistent:
        return True, None
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.SessionExpiryInterval = SESSION_EXPIRY_SECONDS
    return False, properties
