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


@click.command("run")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
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
@click.option("--review-threshold", type=click.FloatRange(0.0, 1.0), default=None,
              help="Classification: flag a result for review when its probability is under this. "
                   "[default: the adapter's own, 0.6 unless it was built with another]")
@click.option("--threads", type=click.IntRange(1, 256), default=None,
              help="Inference threads. [default: the bundle target's]")
@click.option("--state", type=click.Path(file_okay=False), default=None,
              help="The state folder of `edgepeft agent`: serve the adapter versions it installed (read only). "
                   "[default: none, only the bundle's adapters]")
@click.option("--audit", type=click.Path(dir_okay=False), default=None,
              help="Append one JSON line per request (adapter version, input hash, timing) to this file. "
                   "[default: no audit log]")
@click.option("--no-stream", is_flag=True, help="Print the answer at the end instead of as it is generated.")
@click.option("--serve", is_flag=True, help="Serve an OpenAI-style HTTP API instead of answering once.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind with --serve.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True,
              help="Port to bind with --serve (0 picks a free one).")
@click.option("--json", "as_json", is_flag=True,
              help="Print the result as JSON (with --serve: one line with the URL once listening).")
def command(bundle, trusted_key, prompt, system, raw, texts, adapter, max_new_tokens, temperature, top_p,
            review_threshold, threads, state, audit, no_stream, serve, host, port, as_json):
    """Run BUNDLE (a verified bundle directory): answer --prompt, --classify texts, or --serve."""
    if not serve and prompt is None and not texts:
        raise UsageError("nothing to do", hint="pass --prompt TEXT, --classify TEXT, or --serve")
    if prompt is not None and texts:
        raise UsageError("--prompt and --classify were both given", hint="a bundle either generates or classifies")
    if system is not None and raw:
        raise UsageError("--system needs the chat template, which --raw turns off", hint="drop one of them")
    from ..runtime.engine import Engine

    engine = Engine(bundle, trusted_keys(trusted_key), threads=threads, audit=audit)
    if state is not None:
        from ..update.installer import Updater

        for note in Updater(engine, state, read_only=True).notes:
            click.echo(f"warning: {note}", err=True)
    if serve:
        return _serve(engine, host, port, as_json)
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
    args = dict(adapter=adapter, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
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


def _serve(engine, host: str, port: int, as_json: bool) -> None:
    from ..runtime.server import EngineServer

    try:
        server = EngineServer(engine, host, port)
    except OSError as exc:
        raise EngineError(f"cannot listen on {host}:{port}: {exc.strerror or exc}", hint=_bind_hint(exc, host)) from exc
    adapters = [a["name"] for a in engine.adapters()]
    if as_json:
        click.echo(json.dumps({"url": server.url, "base": engine.manifest.base.get("name"), "task": engine.task,
                               "adapters": adapters}))
    else:
        click.echo(f"serving {engine.manifest.base.get('name')} ({engine.task}) on {server.url} "
                   f"(adapters: {', '.join(adapters) or 'none'}); Ctrl-C stops", err=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def _bind_hint(exc: OSError, host: str) -> str:
    if exc.errno == errno.EADDRINUSE:
        return "another program uses that port: pass --port N (or --port 0 for a free one), or stop the other server"
    if exc.errno == errno.EACCES:
        return "ports under 1024 need privileges: pass --port 8080 or another port above 1023"
    if exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
        return f"{host} is not an address of this machine: use --host 127.0.0.1 (or 0.0.0.0 to expose it)"
    return "check --host and --port"
