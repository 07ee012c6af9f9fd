"""Options shared by the commands that open an engine (`run`, `agent`, `adapters`) or serve the
HTTP API (`run --serve`, `agent`): who may call it, its limits, and the engine's own knobs."""

from __future__ import annotations

import click

from ..errors import UsageError


def engine_options(f):
    """``--threads``, ``--max-concurrent``, ``--no-spinning``, ``--skip-health-checks``, ``--prompt-cache-mb``."""
    for opt in reversed([
        click.option("--threads", type=click.IntRange(1, 256), default=None,
                     help="Inference threads. [default: the bundle target's]"),
        click.option("--max-concurrent", type=click.IntRange(1, 64), default=None,
                     help="Requests decoding at once, in one batch where the bundle allows; each holds one "
                          "key/value cache of the bundle's context (more wait for a free one). [default: the bundle target's, 4 unless it says otherwise]"),
        click.option("--no-spinning", is_flag=True,
                     help="Let inference threads sleep between kernels: slower decode, less power."),
        click.option("--skip-health-checks", is_flag=True,
                     help="Open the bundle without running its own signed health checks (they run on first open)."),
        click.option("--prompt-cache-mb", type=click.FloatRange(0, 65536), default=16.0, show_default=True,
                     help="Key/values of recent prompts kept per adapter, so a prompt that starts like an earlier "
                          "one (a system prompt) prefills only the rest; 0 keeps none."),
    ]):
        f = opt(f)
    return f


def engine_kwargs(threads, max_concurrent, no_spinning, skip_health_checks, prompt_cache_mb) -> dict:
    return {"threads": threads, "max_concurrent": max_concurrent, "spinning": not no_spinning,
            "health_checks": not skip_health_checks, "prompt_cache_mb": prompt_cache_mb}


def http_options(f):
    """``--allow-origin``, ``--allow-host``, ``--expose``, ``--max-connections``, ``--timeout``."""
    for opt in reversed([
        click.option("--allow-origin", "allow_origin", multiple=True, metavar="ORIGIN",
                     help="Accept browser requests from this web origin (e.g. http://localhost:3000); repeatable. "
                          "[default: none: requests carrying an Origin are refused]"),
        click.option("--allow-host", "allow_host", multiple=True, metavar="NAME",
                     help="Another name clients use in the Host header (e.g. device.local); repeatable. "
                          "[default: the listening address and loopback names]"),
        click.option("--expose", is_flag=True,
                     help="Allow listening on an address other machines can reach (0.0.0.0, a LAN address); "
                          "put a firewall and TLS in front of it."),
        click.option("--max-connections", type=click.IntRange(1, 1024), default=16, show_default=True,
                     help="Connections served at once; more are answered 429."),
        click.option("--timeout", "io_timeout", type=click.FloatRange(0.5, 3600), default=30.0, show_default=True,
                     help="Seconds a request may take to arrive, and a client may leave an answer unread."),
    ]):
        f = opt(f)
    return f


def server_kwargs(host: str, allow_origin, allow_host, expose, max_connections, io_timeout) -> dict:
    """EngineServer options from the CLI's; refuses a non-loopback address without --expose."""
    from ..runtime.http import Limits, is_loopback

    if not is_loopback(host) and not expose:
        raise UsageError(f"{host} is reachable from other machines",
                         hint="pass --expose as well (with a firewall), or listen on 127.0.0.1")
    limits = Limits(max_connections=max_connections, request_timeout=io_timeout, write_timeout=io_timeout)
    return {"allowed_origins": tuple(allow_origin), "allowed_hosts": tuple(allow_host), "expose": expose,
            "limits": limits}


def exposed_warning(host: str) -> str:
    return (f"WARNING: serving on {host}, beyond this device: anyone who reaches it with the token can use the "
            "model; put a firewall and TLS in front of it")


def serve_until_interrupted(server, *then) -> None:
    """Serve ``server`` until Ctrl-C, then close it and call each of ``then`` (the engine's close): what every
    serving verb does when it stops."""
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        for close in then:
            close()
