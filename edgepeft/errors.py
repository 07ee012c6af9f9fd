"""Typed errors: library code raises these, the CLI turns them into one line.

Every error carries a ``hint`` that tells the user what to do next. The CLI
prints ``error: <message>`` and, when present, ``hint: <hint>``, and exits with
the error's ``exit_code``; it never shows a traceback for an ``EdgePeftError``.
"""

from __future__ import annotations


class EdgePeftError(Exception):
    """Base of every error edgepeft raises on purpose."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class UsageError(EdgePeftError):
    """A bad option or argument, found before any work started."""

    exit_code = 2


class MissingExtraError(EdgePeftError):
    """An optional dependency group (``edgepeft[train]`` ...) is not installed."""

    exit_code = 4


class SpecError(EdgePeftError):
    """A target profile, manifest or update file is malformed.

    ``source`` names the file, ``field`` the dotted field path.
    """

    def __init__(self, source: str, field: str, problem: str, *, hint: str | None = None):
        where = f"{source}: {field}" if field else source
        super().__init__(f"{where}: {problem}", hint=hint)
        self.source, self.field, self.problem = source, field, problem


class DataError(EdgePeftError):
    """Training or evaluation data that cannot be used as given."""


class ModelError(EdgePeftError):
    """A base model that cannot be found, loaded or used."""


class TrainError(EdgePeftError):
    """Training failed or was given options that cannot work."""


class BuildError(EdgePeftError):
    """``edgepeft build`` cannot produce a bundle from its inputs."""


class AdapterError(EdgePeftError):
    """An adapter that does not fit the base, the bundle or the request."""


class UnknownAdapterError(AdapterError):
    """A name that no served adapter has (an HTTP API answers 404)."""


class AdapterInUseError(AdapterError):
    """An adapter that running requests still use, so it cannot be taken out of service now (409)."""


class TargetFitError(BuildError):
    """The bundle does not fit its target's budgets."""


class BundleError(EdgePeftError):
    """A bundle or update that is malformed, incomplete or not trusted."""


class SignatureError(BundleError):
    """A signature that is missing, malformed or made with an untrusted key."""


class IntegrityError(BundleError):
    """A file whose size or SHA-256 does not match its manifest entry."""


class EngineError(EdgePeftError):
    """The device runtime refused a request; what it served before still stands."""


class StoreError(EdgePeftError):
    """The on-device adapter store could not install, switch or roll back."""


class TransportError(EdgePeftError):
    """An update could not be sent or received over a link."""


class RolloutError(EdgePeftError):
    """A fleet rollout stopped or could not start."""
