"""Device target profiles (``targets/*.toml``): what a device can run and how updates reach it.

A profile is read once, validated where it enters (every problem names the
file, the field and what is wrong), and then passed around as a frozen
dataclass. ``edgepeft build`` checks a bundle against it; the runtime takes its
provider order and thread count from it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import SpecError
from . import tomlfile
from .fields import Fields, check_choice

TARGET_SCHEMA_VERSION = 1
DEVICE_CLASSES = ("phone", "jetson", "sbc", "gateway", "serial-gateway")
ARCHES = ("aarch64", "x86_64", "armv7l")
WEIGHT_QUANTS = ("int4", "int8", "nf4", "fp16", "fp32")
ADAPTER_DTYPES = ("fp32", "fp16", "int8", "int4")
GGUF_MODES = ("keep", "layers", "requantize")
LORA_B_TYPES = ("auto", "int8", "fp32")
ZERO_POINTS = ("all", "auto", "none")  # int4 zero points: every weight, the measured smaller mix, none
LINKS = ("network", "serial")
KNOWN_PROVIDERS = (
    "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider",
    "XnnpackExecutionProvider", "NnapiExecutionProvider", "CoreMLExecutionProvider",
    "QNNExecutionProvider", "OpenVINOExecutionProvider", "DmlExecutionProvider",
)
STANDARD_BAUDS = (9600, 19200, 38400, 57600, 115200, 230400, 460800, 921600, 1000000, 1500000, 2000000, 3000000)


@dataclass(frozen=True)
class QuantSpec:
    """How base weights and adapter payloads are stored for a target."""

    weights: str = "int4"
    block_size: int = 32
    adapter_dtype: str = "fp32"
    gguf: str = "keep"  # a GGUF base's blocks in int4/int8: "keep", "layers" (embedding re-quantized), "requantize"
    lora_b: str = "auto"  # decoder LoRA B slots: "fp32", "int8" (smaller in memory; never batched), "auto" (resolve_lora_b)
    zero_points: str = "all"  # int4 re-quantized from float weights: "all", "auto" (smaller) or "none"


@dataclass(frozen=True)
class Budgets:
    """What the device grants the runtime; ``build`` refuses bundles that exceed it."""

    memory_mib: int
    storage_mib: int
    max_adapter_rank: int = 64
    max_context: int = 2048
    max_concurrent: int = 4  # requests decoding at once, each with its own key/value cache


@dataclass(frozen=True)
class UpdateLink:
    """How updates reach the device: the network (HTTP) or a serial line at ``baud``."""

    link: str = "network"
    baud: int | None = None
    max_chunk_bytes: int = 65536


@dataclass(frozen=True)
class TargetProfile:
    """One device class. Build it with :func:`load_target` or :meth:`from_dict`."""

    name: str
    device_class: str
    arch: str
    providers: tuple[str, ...]
    threads: int
    quant: QuantSpec
    budgets: Budgets
    update: UpdateLink
    description: str = ""
    source: str = field(default="", compare=False)
    schema_version: int = TARGET_SCHEMA_VERSION

    @classmethod
    def from_dict(cls, data: dict, source: str = "<target>") -> TargetProfile:
        """Validate ``data`` (a parsed TOML/JSON profile); raises :class:`SpecError`."""
        f = Fields(data, source)
        version = f.int("schema_version", TARGET_SCHEMA_VERSION, min=1)
        if version > TARGET_SCHEMA_VERSION:
            raise f.error("schema_version", f"{version} is newer than this edgepeft understands "
                          f"({TARGET_SCHEMA_VERSION})", hint="upgrade edgepeft")
        name = f.str("name")
        description = f.str("description", None) or ""
        device_class = f.str("device_class", choices=DEVICE_CLASSES)
        arch = f.str("arch", choices=ARCHES)
        providers = tuple(f.str_list("providers", nonempty=True))
        for i, p in enumerate(providers):
            check_choice(p, KNOWN_PROVIDERS, "ONNX Runtime execution provider",
                         error=lambda message, hint, i=i: f.error(f"providers[{i}]", message, hint))
        if providers[-1] != "CPUExecutionProvider":
            raise f.error("providers", "must end with CPUExecutionProvider, the fallback every device has")
        threads = f.int("threads", min=1, max=64)

        q = f.table("quantization", {})
        quant = QuantSpec(
            weights=q.str("weights", "int4", choices=WEIGHT_QUANTS),
            block_size=q.int("block_size", 32, min=16, max=256),
            adapter_dtype=q.str("adapter_dtype", "fp32", choices=ADAPTER_DTYPES),
            gguf=q.str("gguf", "keep", choices=GGUF_MODES),
            lora_b=q.str("lora_b", "auto", choices=LORA_B_TYPES),
            zero_points=q.str("zero_points", "all", choices=ZERO_POINTS),
        )
        if quant.block_size & (quant.block_size - 1):
            raise q.error("block_size", f"must be a power of two, got {quant.block_size}")
        q.reject_unknown()

        b = f.table("budgets")
        budgets = Budgets(
            memory_mib=b.int("memory_mib", min=16),
            storage_mib=b.int("storage_mib", min=16),
            max_adapter_rank=b.int("max_adapter_rank", 64, min=1, max=1024),
            max_context=b.int("max_context", 2048, min=16),
            max_concurrent=b.int("max_concurrent", 4, min=1, max=64),
        )
        b.reject_unknown()

        u = f.table("update", {})
        link = u.str("link", "network", choices=LINKS)
        baud = u.int("baud", None, min=300)
        if link == "serial" and baud is None:
            raise u.error("baud", "is required when link = \"serial\"", hint="e.g. baud = 115200")
        if link == "serial":
            check_choice(baud, STANDARD_BAUDS, "standard UART rate",
                         error=lambda message, hint: u.error("baud", message, hint))
        if link == "network" and baud is not None:
            raise u.error("baud", "only applies to link = \"serial\"")
        update = UpdateLink(link=link, baud=baud, max_chunk_bytes=u.int("max_chunk_bytes", 65536, min=64))
        u.reject_unknown()
        f.reject_unknown()
        return cls(name=name, device_class=device_class, arch=arch, providers=providers, threads=threads,
                   quant=quant, budgets=budgets, update=update, description=description, source=source,
                   schema_version=version)

    def to_dict(self) -> dict:
        """Plain data in the layout of the TOML file (round-trips through :meth:`from_dict`)."""
        return {
            "schema_version": self.schema_version,
            "name": self.name,
            "description": self.description or None,
            "device_class": self.device_class,
            "arch": self.arch,
            "providers": list(self.providers),
            "threads": self.threads,
            "quantization": asdict(self.quant),
            "budgets": asdict(self.budgets),
            "update": {k: v for k, v in asdict(self.update).items() if v is not None},
        }

    def to_toml(self) -> str:
        return tomlfile.dumps(self.to_dict())

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in self.to_dict().items() if v is not None}, indent=2)


def resolve_lora_b(lora_b: str, profile: TargetProfile, weights: str) -> str:
    """The LoRA B slot type a build asked for, with "auto" made concrete for ``profile``: fp32 B exists so
    that concurrent requests decode in one batch; a target that serves one request at a time
    (``budgets.max_concurrent = 1``, the phone profile) never batches, so its quantized builds (int4, int8,
    nf4 ``weights``) get int8 B, a quarter of B's bytes per served adapter (docs/quantization.md)."""
    if lora_b != "auto":
        return lora_b
    return "int8" if profile.budgets.max_concurrent == 1 and weights in ("int4", "int8", "nf4") else "fp32"


def targets_dir() -> Path:
    """The folder of shipped profiles (``targets/`` in a checkout, packaged in a wheel)."""
    return Path(__file__).resolve().parent / "targets"


def list_targets() -> list[str]:
    """Names of the shipped profiles, sorted."""
    d = targets_dir()
    return sorted(p.stem for p in d.glob("*.toml")) if d.is_dir() else []


def load_target(name_or_path: str | os.PathLike) -> TargetProfile:
    """Load a profile by shipped name (``raspberry-pi-5``) or by path to a .toml/.json file.

    Raises :class:`SpecError` for an unknown name, an unreadable file or an invalid profile.
    """
    p = Path(name_or_path)
    if p.suffix not in (".toml", ".json"):
        p = targets_dir() / f"{name_or_path}.toml"
        if not p.is_file():
            raise SpecError(str(name_or_path), "", "is not a known target",
                            hint=f"use one of {', '.join(list_targets())} or a path to a .toml profile")
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(str(p), "", f"cannot be read: {exc.strerror or exc}") from exc
    try:
        data = json.loads(text) if p.suffix == ".json" else tomlfile.loads(text)
    except (ValueError, tomlfile.TOMLDecodeError) as exc:
        raise SpecError(str(p), "", f"is not valid {p.suffix[1:].upper()}: {exc}") from exc
    return TargetProfile.from_dict(data, source=str(p))
