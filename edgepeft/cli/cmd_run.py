"""``edgepeft run BUNDLE``: try a bundle on this device, or serve it on a local HTTP port.

Thin over :class:`edgepeft.runtime.Engine`; library errors propagate to the CLI group,
which prints them as one line with a hint (or as JSON under ``--json``).
"""

from __future__ import annotations

import errno
import json

import click

from ..errors import EngineError, UsageError
from .keys import trusted_keys
from .serve_options import (
    engine_kwargs,
    engine_options,
    exposed_warning,
    http_options,
    serve_until_interrupted,
    server_kwargs,
)


@click.command("run")
@click.argument("bundle", type=click.Path(exists=True))
@click.option("--trusted-key", "trusted_key", multiple=True, type=click.Path(dir_okay=False),
              help="Ed25519 public key (.pub) the device trusts; repeatable. [default: $EDGEPEFT_TRUSTED_KEYS, "
                   "paths separated by ':']")
@click.option("--prompt", help="Text to answer (chat-formatted when the bundle has a chat template).")
@click.option("--system", help="System message sent before --prompt (chat bundles). [default: none]")
@click.option("--raw", is_flag=True, help="Send --prompt as is, without the chat template.")
@click.option("--classify", "texts", multiple=True, help="Text to classify (classification bundles); repeatable.")
@click.option("--adapter", help="Adapter to use. [default: none, the bare base]")
@click.option("--max-new-tokens", type=click.IntRange(1, 100000), default=None,
              help="Most tokens to generate; a cut answer says so. [default: the bundle's, 128 in bundles from "
                   "`edgepeft build`]")
@click.option("--temperature", type=click.FloatRange(0.0, 10.0), default=None,
              help="Sampling temperature; 0 picks the likeliest token (greedy). [default: the bundle's, 0]")
@click.option("--top-p", type=click.FloatRange(0.0, 1.0, min_open=True), default=None,
              help="Nucleus sampling: keep the likeliest tokens up to this probability mass. [default: the bundle's, 1]")
@click.option("--top-k", type=click.IntRange(0, 1 << 20), default=None,
              help="Sample only among the K likeliest tokens (0: off). [default: the bundle's, 0]")
@click.option("--repetition-penalty", type=click.FloatRange(0.01, 10.0), default=None,
              help="Divide the scores of tokens already in the prompt or answer (1: off; 1.1-1.3 stops small "
                   "models from looping). [default: the bundle's, 1]")
@click.option("--seed", type=click.IntRange(0, (1 << 63) - 1), default=None,
              help="Seed for sampling: the same seed gives the same answer. [default: random]")
@click.option("--review-threshold", type=click.FloatRange(0.0, 1.0), default=None,
              help="Classification: flag a result for review when its probability is under this. "
                   "[default: the adapter's own, 0.6 unless it was built with another]")
@engine_options
@click.option("--state", type=click.Path(file_okay=False), default=None,
              help="The state folder of `edgepeft agent`: serve the adapter versions it installed (read only). "
                   "[default: none, only the bundle's adapters]")
@click.option("--audit", type=click.Path(dir_okay=False), default=None,
              help="Append one JSON line per request (adapter version, input hash, timing) to this file. "
                   "[default: no audit log]")
@click.option("--no-stream", is_flag=True, help="Print the answer at the end instead of as it is generated.")
@click.option("--serve", is_flag=True, help="Serve an OpenAI-style HTTP API instead of answering once.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind with --serve (another than loopback needs --expose).")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True,
              help="Port to bind with --serve (0 picks a free one).")
@click.option("--token-file", type=click.Path(dir_okay=False), default=None,
              help="With --serve: the API token's file, created (mode 0600) with a new token when missing. "
                   "[default: $EDGEPEFT_API_TOKEN, else a new token printed at start]")
@click.option("--no-token", is_flag=True,
              help="With --serve on loopback: no token (any local program may call the API).")
@http_options
@click.option("--json", "as_json", is_flag=True,
              help="Print the result as JSON (with --serve: one line with the URL once listening).")
def command(bundle, trusted_key, prompt, system, raw, texts, adapter, max_new_tokens, temperature, top_p, top_k,
            repetition_penalty, seed, review_threshold, threads, max_concurrent, no_spinning, skip_health_checks,
            prompt_cache_mb, state, audit, no_stream, serve, host, port, token_file, no_token, allow_origin, allow_host, expose,
            max_connections, io_timeout, as_json):
    """Run BUNDLE (a bundle directory, or the .epb archive read in place; verified first): answer
    --prompt, --classify texts, or --serve an HTTP API."""
    if not serve and prompt is None and not texts:
        raise UsageError("nothing to do", hint="pass --prompt TEXT, --classify TEXT, or --serve")
    if prompt is not None and texts:
        raise UsageError("--prompt and --classify were both given", hint="a bundle either generates or classifies")
    if system is not None and raw:
        raise UsageError("--system needs the chat template, which --raw turns off", hint="drop one of them")
    if (token_file or no_token) and not serve:
        raise UsageError("--token-file and --no-token go with --serve", hint="add --serve, or drop them")
    if token_file and no_token:
        raise UsageError("--token-file and --no-token were both given", hint="drop one of them")
    server_opts = server_kwargs(host, allow_origin, allow_host, expose, max_connections, io_timeout) if serve else {}
    token = _api_token(token_file, no_token) if serve else None  # before loading: an app may wait for the file
    from ..runtime.engine import Engine

    engine = Engine(bundle, trusted_keys(trusted_key), audit=audit,
                    **engine_kwargs(threads, max_concurrent, no_spinning, skip_health_checks, prompt_cache_mb))
    if state is not None:
        from ..update.installer import Updater

        Updater(engine, state, read_only=True)
    for note in engine.warnings:
        click.echo(f"warning: {note}", err=True)
    if serve:
        return _serve(engine, host, port, as_json, token, server_opts)
    if texts:
        if engine.task != "classification":
            raise UsageError("this bundle generates text; it cannot classify",
                             hint="pass --prompt TEXT instead of --classify")
        results = engine.classify(list(texts), adapter=adapter, review_threshold=review_threshold)
        _print_classes(texts, results, as_json)
        return
    if engine.task != "causal-lm":
        raise UsageError("this bundle is a classifier; it cannot answer a prompt",
                         hint="pass --classify TEXT (repeatable) instead of --prompt")
    if system is not None and not engine.codec.chat_template:
        raise UsageError("--system needs a chat template, and this bundle's tokenizer has none",
                         hint="put the instructions into --prompt instead")
    if engine.codec.chat_template and not raw:
        messages = ([{"role": "system", "content": system}] if system is not None else []) + \
            [{"role": "user", "content": prompt}]
        kw = {"messages": messages}
    else:
        kw = {"prompt": prompt}
    args = dict(adapter=adapter, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                repetition_penalty=repetition_penalty, seed=seed)
    if as_json or no_stream:
        result = engine.generate(**kw, **args)
        if as_json:
            click.echo(json.dumps(result.to_dict() | {"truncated": result.finish_reason == "length"}, indent=2))
            return
        click.echo(result.text)
    else:
        stream = engine.generate(**kw, **args, stream=True)
        for piece in stream:
            click.echo(piece, nl=False)
        click.echo()
        result = stream.result
    if result.finish_reason == "length":
        click.echo(_cut_notice(engine, result), err=True)


def _cut_notice(engine, result) -> str:
    """Why an answer stopped before the model ended it, and what to change."""
    n = result.completion_tokens
    if result.prompt_tokens + n >= engine.max_context:
        return f"[answer cut: the context of {engine.max_context} tokens is full; send a shorter prompt]"
    return f"[answer cut at the limit of {n} new tokens; pass --max-new-tokens {2 * n} for more]"


def _print_classes(texts, results, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps([{"text": t} | r.to_dict() for t, r in zip(texts, results)], indent=2))
        return
    rows = [("label", "probability", "review", "text")]
    rows += [(r.label, f"{r.score:.3f}", "yes" if r.needs_review else "no", t) for t, r in zip(texts, results)]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row[:3], widths)) + "  " + row[3])


def _api_token(token_file: str | None, no_token: bool) -> tuple[str | None, str]:
    """(token, where it is): "" for none; from --token-file (created when missing), the environment,
    or a new one (printed at start)."""
    import os

    if no_token:
        return "", "nowhere (--no-token)"
    if token_file:
        from pathlib import Path

        from ..update.agent import load_token

        path = Path(token_file)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            load_token(path.parent, None, name=path.name)  # creates it, mode 0600
        token, _ = load_token(path.parent, path)
        return token, str(path)
    env = os.environ.get("EDGEPEFT_API_TOKEN")
    if env:
        return env, "$EDGEPEFT_API_TOKEN"
    return None, "the line printed at start"


def _serve(engine, host: str, port: int, as_json: bool, token: tuple, options: dict) -> None:
    from ..runtime.http import EngineServer, is_loopback

    value, source = token
    try:
        server = EngineServer(engine, host, port, token=value, token_source=source, **options)
    except OSError as exc:
        raise EngineError(f"cannot listen on {host}:{port}: {exc.strerror or exc}", hint=_bind_hint(exc, host)) from exc
    adapters = [a["name"] for a in engine.adapters()]
    shown = server.token if value is None else None  # a new token is shown once; a file's stays in its file
    if not is_loopback(host):
        click.echo(exposed_warning(host), err=True)
    if value == "":
        click.echo("warning: no API token: any program on this device may call it", err=True)
    if as_json:
        click.echo(json.dumps({"url": server.url, "base": engine.manifest.base.get("name"), "task": engine.task,
                               "adapters": adapters, "token_file": source if value else None, "token": shown}),
                   nl=True)
    else:
        where = f"token: {shown}" if shown else f"token in {source}" if value else "no token"
        click.echo(f"serving {engine.manifest.base.get('name')} ({engine.task}) on {server.url} "
                   f"(adapters: {', '.join(adapters) or 'none'}; {where}); Ctrl-C stops", err=True)
    serve_until_interrupted(server, engine.close)


def _bind_hint(exc: OSError, host: str) -> str:
    if exc.errno == errno.EADDRINUSE:
        return "another program uses that port: pass --port N (or --port 0 for a free one), or stop the other server"
    if exc.errno == errno.EACCES:
        return "ports under 1024 need privileges: pass --port 8080 or another port above 1023"
    if exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
        return f"{host} is not an address of this machine: use --host 127.0.0.1 (or 0.0.0.0 --expose to expose it)"
    return "check --host and --port"
