"""``edgepeft run BUNDLE``: try a bundle on this device, or serve it on a local HTTP port.

Thin over :class:`edgepeft.runtime.Engine`; library errors propagate to the CLI group,
which prints them as one line with a hint.
"""

from __future__ import annotations

import click

from ..errors import UsageError
from .keys import trusted_keys


@click.command("run")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--trusted-key", "trusted_key", multiple=True, type=click.Path(dir_okay=False),
              help="Ed25519 public key (.pub) the device trusts; repeatable. Default: $EDGEPEFT_TRUSTED_KEYS.")
@click.option("--prompt", help="Text to answer (chat-formatted when the bundle has a chat template).")
@click.option("--raw", is_flag=True, help="Send --prompt as is, without the chat template.")
@click.option("--classify", "texts", multiple=True, help="Text to classify (classification bundles); repeatable.")
@click.option("--adapter", help="Adapter to use (default: the bare base).")
@click.option("--max-new-tokens", type=click.IntRange(1, 100000), default=None)
@click.option("--temperature", type=float, default=None)
@click.option("--top-p", type=float, default=None)
@click.option("--threads", type=click.IntRange(1, 256), default=None, help="Override the target's thread count.")
@click.option("--state", type=click.Path(file_okay=False), default=None,
              help="The device state folder of `edgepeft agent`: serve the adapter versions it installed.")
@click.option("--audit", type=click.Path(dir_okay=False), default=None, help="Audit log file (JSON lines).")
@click.option("--no-stream", is_flag=True, help="Print the answer at the end instead of as it is generated.")
@click.option("--serve", is_flag=True, help="Serve an OpenAI-style HTTP API instead of answering once.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind with --serve.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True)
def command(bundle, trusted_key, prompt, raw, texts, adapter, max_new_tokens, temperature, top_p, threads, state,
            audit, no_stream, serve, host, port):
    """Run BUNDLE (a verified bundle directory): answer --prompt, --classify texts, or --serve."""
    if not serve and prompt is None and not texts:
        raise UsageError("nothing to do", hint="pass --prompt TEXT, --classify TEXT, or --serve")
    from ..runtime.engine import Engine

    engine = Engine(bundle, trusted_keys(trusted_key), threads=threads, audit=audit)
    if state is not None:
        from ..update.installer import Updater

        for note in Updater(engine, state, read_only=True).notes:
            click.echo(f"warning: {note}", err=True)
    if serve:
        from ..runtime.server import EngineServer

        server = EngineServer(engine, host, port)
        click.echo(f"serving {engine.manifest.base.get('name')} ({engine.task}) on {server.url} "
                   f"(adapters: {', '.join(a['name'] for a in engine.adapters()) or 'none'}); Ctrl-C stops", err=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()
        return
    if texts:
        for t, r in zip(texts, engine.classify(list(texts), adapter=adapter)):
            flag = "  [needs review]" if r.needs_review else ""
            click.echo(f"{r.label}\t{r.score:.3f}{flag}\t{t}")
        return
    kw = {"messages": [{"role": "user", "content": prompt}]} if engine.codec.chat_template and not raw else \
        {"prompt": prompt}
    args = dict(adapter=adapter, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
    if no_stream:
        click.echo(engine.generate(**kw, **args).text)
        return
    stream = engine.generate(**kw, **args, stream=True)
    for piece in stream:
        click.echo(piece, nl=False)
    click.echo()
