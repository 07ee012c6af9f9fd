"""An MQTT client (paho-mqtt 2.x) for both ends of the control plane: the device agent and the controller."""

from __future__ import annotations

import ssl
from urllib.parse import unquote, urlsplit

from ..errors import UsageError


def mqtt_client(url: str, client_id: str, *, ca: str | None = None, cert: str | None = None,
                key: str | None = None, max_packet: int | None = None):
    """A paho client for ``mqtt://[user:pass@]host:port`` or ``mqtts://...`` (TLS; ``ca`` and, for
    per-device certificates, ``cert``/``key``). Raises :class:`UsageError` for a bad URL.

    With ``max_packet`` the client speaks MQTT 5 and announces that Maximum Packet Size, so the broker
    drops anything larger instead of sending it (a device never holds a message it would refuse).
    Connect with :func:`connect_async`, which passes the session settings the protocol needs.
    """
    import paho.mqtt.client as mqtt

    u = urlsplit(url)
    if u.scheme not in ("mqtt", "mqtts") or not u.hostname:
        raise UsageError(f"{url!r} is not mqtt://HOST:PORT or mqtts://HOST:PORT",
                         hint="e.g. --mqtt mqtt://127.0.0.1:1883")
    if max_packet is None:
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
        connect: dict = {}
    else:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        props = Properties(PacketTypes.CONNECT)
        props.MaximumPacketSize = int(max_packet)
        props.SessionExpiryInterval = 0xFFFFFFFF  # a persistent session, as clean_session=False in MQTT 3.1.1
        connect = {"clean_start": False, "properties": props}
    if u.username:
        client.username_pw_set(unquote(u.username), unquote(u.password or ""))
    if u.scheme == "mqtts":
        client.tls_set(ca_certs=ca, certfile=cert, keyfile=key, cert_reqs=ssl.CERT_REQUIRED)
    client.user_data_set({"host": u.hostname, "port": u.port or (8883 if u.scheme == "mqtts" else 1883),
                          "connect": connect})
    return client


def connect_async(client, keepalive: int = 30) -> None:
    """Start connecting ``client`` (made by :func:`mqtt_client`) to its broker in the background."""
    ud = client.user_data_get()
    client.connect_async(ud["host"], ud["port"], keepalive=keepalive, **ud["connect"])
