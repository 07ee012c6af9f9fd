"""Health checks: a few inputs with expected outputs, run against an adapter before it serves.

Checks travel signed (in a bundle's manifest or an update package); the
updater runs them on a prepared adapter before it goes into service, and
reports each failure with what was expected and what came back.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import AdapterError, EngineError


def shorten(text, limit: int) -> str:
    """``repr`` of ``text`` cut to about ``limit`` characters, with an ellipsis where it was cut: a message
    never passes a cut answer off as the whole one."""
    text = str(text)
    return repr(text) if len(text) <= limit else repr(text[:limit]) + "…"


def _field(check, name, default=None):
    return check.get(name, default) if isinstance(check, dict) else getattr(check, name, default)


def checks_for(checks: Sequence, name: str | None) -> list:
    """The checks that concern adapter ``name`` (those naming it, or naming no adapter)."""
    return [c for c in checks if _field(c, "adapter") in (None, name)]


def run_health_checks(engine, checks: Sequence, adapter) -> list[str]:
    """Run ``checks`` with ``adapter`` (a name, a prepared LoadedAdapter or None); return one
    message per failure (empty when all pass). Generation is greedy, so results are repeatable."""
    failures = []
    for i, c in enumerate(checks):
        text, expect = _field(c, "input"), dict(_field(c, "expect") or {})
        try:
            if "label" in expect:
                got = engine.classify([text], adapter=adapter)[0].label
                ok = got == expect["label"]
                want = f"label {expect['label']!r}"
            else:
                kw = {"messages": [{"role": "user", "content": text}]} if engine.codec.chat_template else {"prompt": text}
                got = engine.generate(**kw, adapter=adapter, temperature=0.0,
                                      max_new_tokens=int(_field(c, "max_new_tokens", 32) or 32)).text
                if "equals" in expect:
                    ok, want = got.strip() == expect["equals"].strip(), f"exactly {expect['equals']!r}"
                else:
                    ok, want = expect.get("contains", "") in got, f"text containing {expect.get('contains')!r}"
        except (EngineError, AdapterError) as exc:
            ok, got, want = False, f"error: {exc.message}", "an answer"
        if not ok:
            failures.append(f"check #{i} ({shorten(text, 40)}): expected {want}, got {shorten(got, 80)}")
    return failures


def run_bundle_checks(engine, checks: Sequence) -> list[str]:
    """Run a bundle's checks, each with the adapter it names (or the bare base); one message per
    failure, prefixed with that adapter's name ("base" for none)."""
    failures = []
    for name in sorted({_field(c, "adapter") for c in checks}, key=lambda x: x or ""):
        mine = [c for c in checks if _field(c, "adapter") == name]
        failures += [f"{name or 'base'}: {f}" for f in run_health_checks(engine, mine, name)]
    return failures
