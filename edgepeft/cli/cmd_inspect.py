"""``edgepeft inspect BUNDLE``: what a bundle holds, from its manifest (a directory or a ``.epb``).

Without a trusted key it shows the manifest as found and says the signature was
not checked; with ``--trusted-key`` (or ``$EDGEPEFT_TRUSTED_KEYS``) it verifies the
signature and every file's SHA-256 first, and refuses a bundle that fails.
Torch-free: it runs on a device as well as on the server.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from ..contracts.methods import describe_size  # torch-free
from ..errors import BundleError


def load(bundle: Path, trusted_keys: list[str]) -> tuple[dict, bool]:
    """The manifest dict of ``bundle`` (directory or .epb), and whether it was verified. Parsed as a
    device parses it (a duplicate key or NaN is refused): raises :class:`SpecError` or :class:`BundleError`."""
    from ..contracts.archive import read_archive_manifest, verify_archive_files
    from ..contracts.manifest import MANIFEST_NAME, Manifest, parse_manifest, read_manifest_dict
    from ..contracts.verify import verify_bundle, verify_signature

    if bundle.is_dir():
        if trusted_keys:
            return verify_bundle(bundle, trusted_keys).to_dict(), True
        path = bundle / MANIFEST_NAME
        if not path.is_file():
            raise BundleError(f"{bundle} has no {MANIFEST_NAME}", hint="pass a bundle directory or .epb from `edgepeft build`")
        data, source = read_manifest_dict(path), str(path)
    else:
        source = f"{bundle}:{MANIFEST_NAME}"
        data = parse_manifest(read_archive_manifest(bundle), source)  # the device's strict parser
    if trusted_keys:
        verify_signature(data, trusted_keys, source)
    manifest = Manifest.from_dict(data, source)  # validated either way, so what is shown is well-formed
    if trusted_keys:
        verify_archive_files(bundle, {f.path: (f.size, f.sha256) for f in manifest.files})
    return manifest.to_dict(), bool(trusted_keys)


def summary(bundle: Path, m: dict, verified: bool) -> dict:
    """What `inspect --json` prints: the manifest's facts without its file list, metric values only."""
    from ..contracts.metrics import manifest_metrics

    sizes = {f["path"]: f["size"] for f in m["files"]}
    target = m["target"]
    adapters = []
    for a in m["adapters"]:
        adapters.append({k: a.get(k) for k in ("name", "version", "method", "task", "rank", "alpha", "dtype",
                                               "target_modules", "labels", "review_threshold", "virtual_tokens",
                                               "bottleneck_size", "activation")}
                        | {"bytes": sizes.get(a["file"]), "metrics": manifest_metrics(a.get("metrics"))})
    merged = (m["model"].get("merged") or None)
    if merged:
        merged = {k: v for k, v in merged.items() if k != "metrics"} | {"metrics": manifest_metrics(merged.get("metrics"))}
    sig = m.get("signature") or {}
    return {
        "bundle": str(bundle), "format": "directory" if bundle.is_dir() else "archive",
        "verified": verified, "signer": {"key_id": sig.get("key_id"), "algorithm": sig.get("algorithm")},
        "created": m["created"], "edgepeft_version": m["edgepeft_version"],
        "target": {k: target.get(k) for k in ("name", "device_class", "arch", "providers", "description")},
        "base": {k: m["base"].get(k) for k in ("name", "architecture", "task", "fingerprint")},
        "quantization": m["quantization"], "generation": m["generation"],
        "files": len(sizes), "bytes": sum(sizes.values()), "adapters": adapters, "merged_adapter": merged,
        "health_checks": len(m.get("health_checks") or []),
    }


def _figures(metrics: dict) -> list[str]:
    """One line per held-out figure: 'name: before -> after' when the record has a baseline."""
    ev, base = metrics.get("eval") or {}, metrics.get("baseline") or {}
    if not ev:
        return ["no held-out figures in the training record"]
    names = ["accuracy", "macro_f1", "loss"] if metrics.get("task") == "classification" else ["loss", "perplexity"]
    pairs = [(n, base.get(n), ev.get(n)) for n in names]
    am, bam = ev.get("answer_match") or {}, base.get("answer_match") or {}
    if am.get("overlap") is not None:
        pairs.append(("answer overlap", bam.get("overlap"), am["overlap"]))
    parts = [f"{n} {_num(b)} -> {_num(a)}" if b is not None else f"{n} {_num(a)}" for n, b, a in pairs if a is not None]
    line = f"held-out ({ev.get('examples')} examples): " + ", ".join(parts)
    slices = ev.get("slices") or {}
    out = [line]
    if slices:
        out.append("by slice: " + ", ".join(f"{k} {_num(v.get('accuracy'))}" for k, v in slices.items()))
    return out


def _num(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _mib(n: int | None) -> str:
    return "?" if n is None else (f"{n / (1 << 20):.1f} MiB" if n >= 1 << 20 else f"{n / 1024:.0f} KiB")


@click.command("inspect")
@click.argument("bundle", type=click.Path(exists=True))
@click.option("--trusted-key", "trusted_key", multiple=True, type=click.Path(dir_okay=False),
              help="Verify the signature and every file with this public key; repeatable. "
                   "[default: $EDGEPEFT_TRUSTED_KEYS, else show without verifying]")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def command(bundle: str, trusted_key: tuple[str, ...], as_json: bool) -> None:
    """Show what BUNDLE (a directory or .epb) holds: target, quantization, base and fingerprint,
    signer, adapters with versions, methods, ranks, labels and metric values."""
    path = Path(bundle)
    keys = list(trusted_key) or [k for k in os.environ.get("EDGEPEFT_TRUSTED_KEYS", "").split(os.pathsep) if k]
    m, verified = load(path, keys)
    info = summary(path, m, verified)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    t, b, q = info["target"], info["base"], info["quantization"]
    check = "verified (signature and every file)" if verified else "NOT verified (pass --trusted-key KEY.pub)"
    rows = [
        ("bundle", f"{info['bundle']} ({info['format']}, {info['files']} files, {_mib(info['bytes'])})"),
        ("signed", f"key id {info['signer']['key_id']} ({info['signer']['algorithm']}), {check}"),
        ("built", f"{info['created']} by edgepeft {info['edgepeft_version']}"),
        ("target", f"{t['name']} ({t['device_class']}, {t['arch']}; {' > '.join(_short(p) for p in t.get('providers') or [])})"),
        ("base", f"{b['name']} ({b['architecture']}, {b['task']})"),
        ("fingerprint", b["fingerprint"]),
        ("weights", f"{q.get('weights')} (block {q.get('block_size')}), adapter payloads {q.get('adapter_dtype')}"),
        ("health", f"{info['health_checks']} check(s) run after each adapter install"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"{k:<{width}}  {v}")
    merged = info["merged_adapter"]
    if merged:
        click.echo(f"merged adapter {merged['name']} v{merged['version']} (lora r={merged['rank']}), single-task")
        for line in _figures(merged.get("metrics") or {}):
            click.echo(f"  {line}")
    click.echo(f"adapters ({len(info['adapters'])})" + ("" if info["adapters"] else ": none"))
    for a in info["adapters"]:
        if a["method"] == "lora":
            size = f"r={a['rank']} alpha={_num(a['alpha'])}"
            where = f"; modules {', '.join(a['target_modules'] or [])}"
        else:
            size, where = describe_size(a["method"], a), ""
        click.echo(f"  {a['name']} v{a['version']}: {a['method']} {size}, {a['dtype']}, {_mib(a['bytes'])}{where}")
        if a.get("labels"):
            click.echo(f"    labels: {', '.join(a['labels'])}; review under {_num(a.get('review_threshold'))}")
        for line in _figures(a["metrics"]):
            click.echo(f"    {line}")


def _short(provider: str) -> str:
    return provider.replace("ExecutionProvider", "")
