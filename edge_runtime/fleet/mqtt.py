"""The one way an MQTT client is made (paho-mqtt, an optional extra): the board's publisher (fleet/publisher.py),
the central collector and its takeovers (central/collector.py), rollouts (central/rollout.py).

Every client gets its id, the callback API of paho 2, the broker's user name and password, TLS with the
certificate checked (the system's CA, or the one given) and a reconnect backoff of 1 to 30 s; MQTT 5 where the
caller needs it (the collector: persistent sessions, shared subscriptions), 3.1.1 otherwise.
"""
from __future__ import annotations

import ssl
from dataclasses import dataclass, field

from edge_runtime.extras import need

RECONNECT_MIN_S, RECONNECT_MAX_S = 1, 30


@dataclass(frozen=True)
class BrokerSettings:
    """Where the broker is and how to log in (the password is never shown in a repr)."""
    host: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    ca: str | None = None           # CA certificate file for TLS (None: the system's)
    keepalive: int = 60             # seconds between pings on a quiet connection


def paho(needed_by: str = "mqtt", extra: str = "fleet"):
    """paho.mqtt.client, or MissingExtra naming what needs it and the extra that installs it."""
    return need("paho.mqtt.client", needed_by, "paho-mqtt", extra)


def new_client(broker: BrokerSettings, client_id: str, *, mqtt5: bool = False, needed_by: str = "mqtt",
               extra: str = "fleet", **options):
    """A paho client for `broker`, not yet connected (connect() does that). `options` go to paho's Client
    (clean_session, manual_ack, reconnect_on_failure)."""
    mqtt = paho(needed_by, extra)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=mqtt.MQTTv5 if mqtt5 else mqtt.MQTTv311, **options)
    if broker.username is not None:
        client.username_pw_set(broker.username, broker.password)
    if broker.tls:
        client.tls_set(ca_certs=broker.ca, cert_reqs=ssl.CERT_REQUIRED)
    client.reconnect_delay_set(min_delay=RECONNECT_MIN_S, max_delay=RECONNECT_MAX_S)
    return client


def connect(client, broker: BrokerSettings, *, wait: bool = False, **options) -> None:
    """Connect to `broker`: at once (wait=True; OSError when it cannot be reached), or in paho's network thread
    once loop_start() runs, retrying until it is up (a broker that is down at start-up stops nothing).
    `options`: paho's connect options (clean_start, properties for MQTT 5)."""
    (client.connect if wait else client.connect_async)(broker.host, broker.port, keepalive=broker.keepalive,
                                                       **options)
