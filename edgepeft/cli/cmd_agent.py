"""``edgepeft agent BUNDLE``: the device agent (inference + updates over HTTP, serial and pull)."""

from __future__ import annotations

import signal

import click

from ..errors import UsageError
from .keys import trusted_keys
from .serve_options import engine_kwargs, engine_options, http_options, server_kwargs


@click.command("agent")
@click.argument("bundle", type=click.Path(exists=True))
@click.option("--trusted-key", "trusted_key", multiple=True, type=click.Path(dir_okay=False),
              help="Ed25519 public key (.pub) updates must be signed with; repeatable. Default: $EDGEPEFT_TRUSTED_KEYS.")
@click.option("--state", required=True, type=click.Path(file_okay=False),
              help="Device state folder: installed versions, floors, partial uploads, the token.")
@click.option("--listen", default="127.0.0.1:8731", show_default=True,
              help="HOST:PORT of the HTTP API (inference + updates). Port 0 picks a free one; a host other "
                   "than loopback needs --expose.")
@click.option("--token-file", type=click.Path(dir_okay=False), default=None,
              help="File holding the device token [default: STATE/token, generated on first start].")
@click.option("--serial", "serial_port", default=None, help="Also take updates on this serial port (e.g. /dev/ttyS0).")
@click.option("--baud", type=int, default=115200, show_default=True, help="Serial line rate.")
@click.option("--pull", "pull_url", default=None, help="Also poll this TUF repository URL for updates (static hosting).")
@click.option("--interval", type=float, default=300.0, show_default=True, help="Seconds between polls with --pull.")
@click.option("--tuf-root", type=click.Path(dir_okay=False), default=None,
              help="The repository's trusted root.json [default: fetched once and accepted only if the trusted key signed it].")
@click.option("--mqtt", "mqtt_url", default=None,
              help="Take fleet jobs from this MQTT broker: mqtt://[user:pass@]HOST:1883 or mqtts://HOST:8883.")
@click.option("--device-id", default=None, help="This device's id in the fleet inventory (needed with --mqtt).")
@click.option("--mqtt-ca", type=click.Path(exists=True, dir_okay=False), default=None, help="CA certificate for mqtts://.")
@click.option("--mqtt-cert", type=click.Path(exists=True, dir_okay=False), default=None,
              help="This device's client certificate (per-device credentials over mqtts://).")
@click.option("--mqtt-key", type=click.Path(exists=True, dir_okay=False), default=None, help="Its private key.")
@click.option("--health-check", "local_checks", type=click.Path(exists=True, dir_okay=False), default=None,
              help="This device's own health checks (JSON lines, as in `edgepeft build --health-check`), run after "
                   "the signed ones on every install: a site acceptance test that can only refuse, never skip.")
@engine_options
@http_options
@click.option("--audit", type=click.Path(dir_okay=False), default=None, help="Audit log file (JSON lines).")
@click.option("--log-json", is_flag=True,
              help="Log each install, rejection, rollback and request on stderr as one JSON object per line "
                   "(for journald and log shippers) instead of text.")
def command(bundle, trusted_key, state, listen, token_file, serial_port, baud, pull_url, interval, tuf_root, mqtt_url,
            device_id, mqtt_ca, mqtt_cert, mqtt_key, local_checks, threads, max_concurrent, no_spinning,
            skip_health_checks, prompt_cache_mb, allow_origin, allow_host, expose, max_connections, io_timeout, audit, log_json):
    """Run the device agent on BUNDLE (a directory or the .epb the device was shipped): serve inference and
    install signed updates that arrive over HTTP, a serial line or a TUF pull repository."""
    from pathlib import Path

    from ..update.agent import Agent, load_token, parse_listen
    from ..update.device import Device

    host, port = parse_listen(listen)
    http = server_kwargs(host, allow_origin, allow_host, expose, max_connections, io_timeout)
    if mqtt_url and not device_id:
        raise UsageError("--mqtt needs --device-id (the id the fleet inventory uses)", hint="e.g. --device-id pi-001")
    if device_id:
        from ..contracts.names import check_name

        check_name(device_id, "--device-id", "ID")
    if interval <= 0:
        raise UsageError("--interval must be positive", hint="e.g. --interval 300")
    opts = {k: v for k, v in {"audit": audit}.items() if v is not None}
    opts |= engine_kwargs(threads, max_concurrent, no_spinning, skip_health_checks, prompt_cache_mb)
    keys = trusted_keys(trusted_key)
    Path(state).mkdir(parents=True, exist_ok=True)
    token, token_path = load_token(Path(state), token_file)  # first, so a client can read it while we load
    from ..contracts.identity import DeviceIdentity

    identity = DeviceIdentity.load_or_create(state)  # signs what this device reports (MQTT)
    for note in identity.notes:
        click.echo(f"warning: {note}", err=True)
    checks = []
    if local_checks:
        from ..contracts.checks import load_health_checks

        checks = load_health_checks(local_checks)
    from ..fsio import CRASH_ENV, io_from_env

    io = io_from_env()
    if type(io).__name__ != "FileIO":
        click.echo(f"WARNING: ${CRASH_ENV} is set: this agent kills itself at a chosen step (tests only)", err=True)
    from ..update.events import EventLog

    device = Device(bundle, keys, state, engine_options=opts, local_checks=checks, io=io,
                    events=EventLog(json_lines=log_json))
    serial = {"port": serial_port, "baud": baud} if serial_port else None
    pull = {"url": pull_url, "interval": interval, "root": tuf_root} if pull_url else None
    mqtt = {"url": mqtt_url, "device_id": device_id, "ca": mqtt_ca, "cert": mqtt_cert, "key": mqtt_key,
            "identity": identity} if mqtt_url else None
    agent = Agent(device, token=token, listen=(host, port), serial=serial, pull=pull, mqtt=mqtt, http=http).start()
    for note in device.status()["notes"]:
        click.echo(f"warning: {note}", err=True)
    links = [agent.url] + ([f"serial {serial_port} @ {baud}"] if serial else []) + \
        ([f"pull {pull_url}"] if pull else []) + ([f"mqtt {mqtt_url} as {device_id}"] if mqtt else [])
    click.echo(f"agent ready: {', '.join(links)}; base {device.engine.manifest.base.get('name')}; "
               f"token in {token_path}", err=True)
    click.echo(f"identity {identity.text} (key id {identity.key_id}; enroll it as this device's public_key in the "
               "fleet inventory)", err=True)
    click.echo(f"listening {agent.url}", err=False)

    def stop(signum, frame):
        agent.stop()

    signal.signal(signal.SIGTERM, stop)
    try:
        agent.wait()
    except KeyboardInterrupt:
        agent.stop()
