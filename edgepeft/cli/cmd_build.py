"""``edgepeft build``: export, quantize, convert adapters and sign a device bundle."""

from __future__ import annotations

import json
import time

import click

from ..contracts.methods import describe_size  # torch-free
from ..models.base import BASE_HELP  # torch-free


@click.command("build")
@click.option("--base", default=None, help=f"{BASE_HELP} [default: smollm2-135m-instruct; all-minilm-l6-v2 for "
              "classification adapters].")
@click.option("--adapter", "adapters", multiple=True, metavar="NAME=DIR",
              help="An adapter directory to ship as a swappable adapter (repeatable): PEFT LoRA, prefix or "
                   "prompt tuning, or an edgepeft bottleneck adapter; families may be mixed.")
@click.option("--target", required=True, help="Target profile name (see `edgepeft targets`) or path to a .toml.")
@click.option("--quant", type=click.Choice(["int4", "int8", "nf4", "fp16", "fp32"]), default=None,
              help="Base weight quantization [default: the target's]. nf4: the 4-bit base a QLoRA adapter was "
                   "trained on, quantized by bitsandbytes (MatMulBnb4; exact but slow on CPUs).")
@click.option("--zero-points", type=click.Choice(["all", "auto", "none"]), default=None,
              help="int4 weights quantized from floats: zero points on every block (default), or 'auto' "
                   "(a smaller mix at a higher perplexity: docs/measured-defaults.md) [default: the target's].")
@click.option("--gguf", type=click.Choice(["keep", "layers", "requantize"]), default=None,
              help="A GGUF base's quantized blocks in an int4/int8 bundle: keep them all as they are (the weights "
                   "adapters were trained on; GGUF-sized), keep the layers' and re-quantize the embedding to int4 "
                   "(smaller, a little lower quality), or re-quantize all (fastest decode, lowest quality) [default: the "
                   "target's, keep].")
@click.option("--adapter-dtype", type=click.Choice(["fp32", "fp16", "int8", "int4"]), default=None,
              help="Adapter payload type [default: the target's].")
@click.option("--merge", default=None, metavar="NAME", help="Merge this adapter into the base: a single-task bundle, no slots.")
@click.option("--slot-rank", type=int, default=None, help="Rank of the adapter slots [default: the largest adapter rank].")
@click.option("--task", type=click.Choice(["causal-lm", "classification"]), default=None,
              help="Task of a bundle built without adapters [default: from the adapters, else causal-lm].")
@click.option("--bottleneck-slots", type=click.Choice(["houlsby", "pfeiffer", "none"]), default=None,
              help="Bottleneck adapter slots for adapters that arrive later as updates: houlsby (after attention "
                   "and MLP) or pfeiffer (after the MLP) [default: where this build's bottleneck adapters sit].")
@click.option("--bottleneck-activation", type=click.Choice(["relu", "silu", "gelu"]), default=None,
              help="Non-linearity of the bottleneck slots [default: the bottleneck adapters', else relu].")
@click.option("--health-check", "health_checks", type=click.Path(exists=True, dir_okay=False), default=None,
              help="JSON Lines of {input, expect: {contains|equals|label}, adapter} run on the device after installs.")
@click.option("--key", required=True, type=click.Path(dir_okay=False), help="Private signing key from `edgepeft keygen`.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Bundle directory to create (OUT.epb is written beside it).")
@click.option("--force", is_flag=True, help="Replace an existing --out.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary for scripts.")
def command(base, adapters, target, quant, zero_points, gguf, adapter_dtype, merge, slot_rank, task, bottleneck_slots,
            bottleneck_activation, health_checks, key, out, force, as_json):
    """Export the base once to ONNX with adapter slots, quantize it for a target, turn adapters into
    small swappable files (or merge one), and sign it all into a device bundle."""
    from ..bundle.adapters_in import parse_adapter_arg
    from ..bundle.build import build_bundle

    start = time.monotonic()

    def progress(msg: str) -> None:
        click.echo(f"[{time.monotonic() - start:6.1f}s] {msg}", err=True)

    result = build_bundle(base=base, adapters=[parse_adapter_arg(a) for a in adapters], target=target, key=key,
                          out=out, quant=quant, merge=merge, adapter_dtype=adapter_dtype, slot_rank=slot_rank,
                          health_checks=health_checks, task=task, force=force, bottleneck_slots=bottleneck_slots,
                          bottleneck_activation=bottleneck_activation, gguf=gguf, zero_points=zero_points, progress=progress)
    summary = result.summary()
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    mib = 1 << 20
    click.echo(f"bundle  {summary['bundle']}  ({sum(summary['files'].values()) / mib:.1f} MiB)")
    click.echo(f"archive {summary['archive']}  ({summary['archive_bytes'] / mib:.1f} MiB)")
    fit = summary["fit"]
    click.echo(f"target  {summary['target']}: estimated memory {fit['memory_mib']:.0f} MiB serving, "
               f"{fit['open_peak_mib']:.0f} MiB while opening (the graph's session "
               f"{fit['session_mib']:.0f} MiB{', measured' if fit.get('measured') else ''}; KV cache "
               f"{fit['kv_cache_mib']:.0f} MiB for {fit['concurrency']} request(s)), weights "
               f"{summary['quantization']['weights']}")
    for a in summary["adapters"]:
        click.echo(f"adapter {a['name']} v{a['version']}: {a['method']} {describe_size(a['method'], a)}, {a['dtype']}, "
                   f"{a['bytes'] / 1024:.0f} KiB")
