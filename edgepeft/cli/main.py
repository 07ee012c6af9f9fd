"""Entry point of ``edgepeft``: a click group whose verbs are imported only when used.

``edgepeft --help`` must answer instantly on a device, so this module imports
click and nothing heavy; each verb lives in ``edgepeft.cli.cmd_<verb>`` and
exposes a click command named ``command``. Library errors
(:class:`~edgepeft.errors.EdgePeftError`), click's option errors and the operating
system's (an ``OSError``: the path, the reason, a hint; exit code 1) alike become
one ``error:`` line, an optional ``hint:`` line and the error's exit code, never
a traceback (set ``EDGEPEFT_DEBUG=1`` to see one). When ``--json`` is on the
command line, the error is one JSON object on stdout instead:
``{"error": {"type", "message", "hint", "exit_code"}}``.
"""

from __future__ import annotations

import errno
import importlib
import json
import os
import sys

import click

from .. import __version__
from ..errors import EdgePeftError

# verb -> one-line help; the module is edgepeft.cli.cmd_<verb>.
VERBS = {
    "train": "Fine-tune an adapter on your data: LoRA, QLoRA, prompt or prefix tuning, bottleneck (server).",
    "build": "Export, quantize and sign a device bundle for a target (server).",
    "keygen": "Create an Ed25519 key pair for signing bundles and updates.",
    "targets": "List or show the device target profiles.",
    "run": "Run a bundle on this device: one prompt, classification, or a local HTTP API.",
    "inspect": "Show what a bundle holds: target, base, signer, adapters and their metrics.",
    "verify": "Check a bundle (directory or .epb) or update package as a device would: signature and every hash.",
    "eval": "Score a bundle's adapter on labelled data on this device, beside its training figures.",
    "update": "Create or inspect a signed update package (a new adapter version or a new bundle).",
    "agent": "Run the device agent: inference plus signed updates over HTTP, serial or TUF pull.",
    "push": "Send a signed update to a device over HTTP or a serial line and wait for its health check.",
    "status": "Show what a device runs and what happened to its last updates.",
    "identity": "Print this device's public key (created on first use) to enroll in the fleet inventory.",
    "adapters": "List, install, roll back, unload or load adapters on a device (state folder or running agent).",
    "publish": "Publish signed update packages into a TUF repository for devices to pull.",
    "rollout": "Move a fleet to an update in waves, with abort thresholds and rollback.",
}


_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())  # click >= 8.2


class LazyGroup(click.Group):
    """Lists every verb from :data:`VERBS`; imports a verb's module only when it is invoked."""

    def list_commands(self, ctx):
        return list(VERBS)

    def get_command(self, ctx, name):
        if name not in VERBS:
            return None
        return importlib.import_module(f"edgepeft.cli.cmd_{name}").command

    def format_commands(self, ctx, formatter):
        # Help text comes from VERBS so `--help` imports no verb module.
        with formatter.section("Commands"):
            formatter.write_dl(list(VERBS.items()))


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgepeft")
def cli():
    """edgepeft: fine-tune adapters on a server, ship one base model and many small adapters to devices."""


def report(exc: EdgePeftError, as_json: bool = False) -> int:
    """Print an EdgePeftError as one or two lines on stderr (or one JSON object on stdout); return its exit code."""
    return _print_error(type(exc).__name__, exc.message, exc.hint, exc.exit_code, as_json)


def _print_error(kind: str, message: str, hint: str | None, code: int, as_json: bool) -> int:
    if as_json:
        click.echo(json.dumps({"error": {"type": kind, "message": message, "hint": hint, "exit_code": code}}))
        return code
    click.echo(f"error: {message}", err=True)
    if hint:
        click.echo(f"hint: {hint}", err=True)
    return code


# What to do about the operating system's most common refusals; anything else: check the path.
_OS_HINTS = {
    errno.ENOENT: "check that the path and its folder exist",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EACCES: "check the permissions, or choose a path you can write",
    errno.EPERM: "check the permissions, or choose a path you can write",
    errno.EROFS: "the file system is read-only: choose a writable path",
    errno.ENOSPC: "the disk is full: free space or choose another place",
    errno.EEXIST: "remove it or choose another path",
    errno.EISDIR: "name a file, not a folder",
}


def os_error(exc: OSError) -> tuple[str, str]:
    """An ``OSError`` as one line (the path, the reason) and a hint."""
    reason = exc.strerror or str(exc)
    paths = [str(p) for p in (exc.filename, exc.filename2) if p is not None]
    message = f"{' -> '.join(paths)}: {reason[:1].lower() + reason[1:]}" if paths else reason
    return message, _OS_HINTS.get(exc.errno, "check the path and try again")


def debug() -> bool:
    """Whether ``EDGEPEFT_DEBUG`` asks for tracebacks (1, true or yes; 0, false, no or empty do not)."""
    return os.environ.get("EDGEPEFT_DEBUG", "").strip().lower() in ("1", "true", "yes")


def click_error(exc: click.ClickException) -> tuple[str, str | None]:
    """click's own message as the project's one line, with a hint where click's usage block pointed."""
    guesses = getattr(exc, "possibilities", None)
    message = exc.message if guesses else exc.format_message()  # the guesses go to the hint
    message = message.rstrip(".")
    message = message[:1].lower() + message[1:]
    ctx = getattr(exc, "ctx", None)
    where = f"`{ctx.command_path} --help`" if ctx is not None else "`edgepeft --help`"
    if isinstance(exc, click.exceptions.NoSuchCommand):
        hint = (f"did you mean {' or '.join(guesses)}? " if guesses else "") + \
            f"commands: {', '.join(VERBS)} (see `edgepeft --help`)"
    elif guesses:
        hint = f"did you mean {' or '.join(guesses)}? (all options: {where})"
    else:
        hint = f"see {where}" if isinstance(exc, click.UsageError) else None
    return message, hint


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns (and, from the console script, exits with) the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    as_json = "--json" in args
    try:
        cli.main(args=args, prog_name="edgepeft", standalone_mode=False)
    except EdgePeftError as exc:
        if debug():
            raise
        return report(exc, as_json)
    except OSError as exc:
        if debug():
            raise
        message, hint = os_error(exc)
        return _print_error(type(exc).__name__, message, hint, 1, as_json)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except _NO_ARGS_IS_HELP as exc:
        click.echo(exc.ctx.get_help())
        return 0
    except click.ClickException as exc:
        message, hint = click_error(exc)
        return _print_error("UsageError" if isinstance(exc, click.UsageError) else type(exc).__name__,
                            message, hint, exc.exit_code, as_json)
    except (click.Abort, KeyboardInterrupt):
        click.echo("aborted", err=True)
        return 130
    return 0


def entry() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    entry()
