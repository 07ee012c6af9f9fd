"""The fleet's inventory and a rollout plan: TOML files, validated where they enter.

Field names follow AWS IoT Jobs (in snake_case) so people who run fleets
recognise them: ``exponential_rate`` with ``base_rate_per_minute``,
``increment_factor`` and ``rate_increase_criteria``
(``number_of_notified_things`` / ``number_of_succeeded_things``),
``maximum_per_minute``, ``in_progress_timeout_minutes``, retry criteria, and
abort criteria (``failure_type`` FAILED | REJECTED | TIMED_OUT | ALL,
``min_number_of_executed_things``, ``threshold_percentage``). See
docs/fleet.md for every field. Errors name the file and the field.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..contracts.fields import Fields
from ..contracts.names import check_name
from ..contracts.tomlfile import TOMLDecodeError, loads
from ..errors import SpecError

FAILURE_TYPES = ("FAILED", "REJECTED", "TIMED_OUT", "ALL")


def _read_toml(path: Path) -> dict:
    try:
        return loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise SpecError(str(path), "", "does not exist", hint="check the path") from exc
    except (OSError, UnicodeDecodeError, TOMLDecodeError) as exc:
        raise SpecError(str(path), "", f"is not readable TOML: {exc}") from exc


@dataclass(frozen=True)
class Device:
    """One device of the inventory and how to reach it."""

    id: str
    address: str  # http://HOST:PORT | serial:///dev/X?baud=N | mqtt
    target: str | None = None
    group: str | None = None
    tags: tuple[str, ...] = ()
    token_file: str | None = None
    public_key: str | None = None  # "ed25519:<base64>": the device's own key, which signs what it reports

    @property
    def link(self) -> str:
        if self.address == "mqtt":
            return "mqtt"
        return "serial" if self.address.startswith("serial:") else "http"


def _enrolled_key(d: Fields, base: Path | None) -> str | None:
    """A device's ``public_key``: ``ed25519:<base64>`` (what `edgepeft identity` prints), a PEM public key,
    or the path of a file holding either (relative to the inventory). Raises :class:`SpecError`."""
    from ..contracts.identity import load_public_key_text, public_key_text
    from ..errors import SignatureError

    value = d.str("public_key", None)
    if value is None:
        return None
    text = value
    if not value.startswith(("ed25519:", "-----BEGIN")):
        path = Path(value) if base is None or os.path.isabs(value) else base / value
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise d.error("public_key", f"{path} cannot be read: {exc}",
                          hint='give the key itself: public_key = "ed25519:..." (edgepeft identity prints it)') \
                from exc
    try:
        return public_key_text(load_public_key_text(text, d.path("public_key")))
    except SignatureError as exc:
        raise d.error("public_key", exc.message, hint="`edgepeft identity --state STATE` on the device prints it") \
            from exc


@dataclass(frozen=True)
class Inventory:
    """The devices of a fleet, plus how MQTT devices are reached (broker) and fed (repository)."""

    devices: tuple[Device, ...]
    mqtt_url: str | None = None
    repository_url: str | None = None
    source: str = "inventory"
    mqtt_tls: dict = field(default_factory=dict)  # ca, cert, key for mqtts:// (the controller's own credentials)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Inventory:
        """Read an inventory TOML (relative paths in it are relative to it); raises :class:`SpecError`
        naming the file and field."""
        path = Path(os.path.abspath(path))
        return cls.from_dict(_read_toml(path), str(path), base=path.parent)

    @classmethod
    def from_dict(cls, data: dict, source: str = "inventory", base: Path | None = None) -> Inventory:
        f = Fields(data, source)
        mqtt = f.table("mqtt", {})
        mqtt_url = mqtt.str("url", None)
        tls = {}
        for k in ("ca", "cert", "key"):
            v = mqtt.str(k, None)
            if v is not None:
                tls[k] = str(base / v) if base is not None and not os.path.isabs(v) else v
        mqtt.reject_unknown()
        repo = f.table("repository", {})
        repo_url = repo.str("url", None)
        repo.reject_unknown()
        devices, seen = [], set()
        raw = f.raw("device", [])
        if not isinstance(raw, list) or not raw:
            raise f.error("device", "must list at least one [[device]]", hint='e.g. [[device]] id = "pi-001" ...')
        for i, item in enumerate(raw):
            d = Fields(item, source, f"device[{i}]")
            dev_id = check_name(d.str("id"), source, d.path("id"))
            if dev_id in seen:
                raise d.error("id", f"{dev_id!r} is listed twice")
            seen.add(dev_id)
            address = d.str("address")
            if address != "mqtt" and not address.startswith(("http://", "serial://")):
                raise d.error("address", f"{address!r} is not http://HOST:PORT, serial:///dev/X?baud=N or mqtt")
            token_file = d.str("token_file", None)
            if token_file and base is not None and not os.path.isabs(token_file):
                token_file = str(base / token_file)
            dev = Device(id=dev_id, address=address, target=d.str("target", None), group=d.str("group", None),
                         tags=tuple(d.str_list("tags", [])), token_file=token_file,
                         public_key=_enrolled_key(d, base))
            d.reject_unknown()
            if dev.link == "mqtt" and not (mqtt_url and repo_url):
                raise d.error("address", "an mqtt device needs [mqtt] url and [repository] url in the inventory",
                              hint="devices behind NAT get jobs from the broker and packages from the repository")
            devices.append(dev)
        f.reject_unknown()
        return cls(tuple(devices), mqtt_url, repo_url, source, tls)

    def select(self, groups=(), tags=(), ids=()) -> list[Device]:
        """Devices in any of ``groups`` (all when empty) that carry every tag in ``tags``."""
        out = []
        for d in self.devices:
            if ids and d.id not in ids:
                continue
            if groups and d.group not in groups:
                continue
            if not set(tags) <= set(d.tags):
                continue
            out.append(d)
        return out


@dataclass(frozen=True)
class AbortCriterion:
    failure_type: str
    threshold_percentage: float
    min_number_of_executed_things: int
    action: str = "CANCEL"


@dataclass(frozen=True)
class MetricFloor:
    """``metric`` (a key of the training record's eval metrics, e.g. "accuracy" or "macro_f1") must be
    at least ``min`` overall, or in ``slice`` ("*": every slice)."""

    metric: str
    min: float
    slice: str | None = None


@dataclass(frozen=True)
class RolloutPlan:
    """What to roll out, to whom, how fast, and when to stop. Build with :meth:`load`."""

    name: str
    inventory: Path
    packages: tuple[Path, ...]
    groups: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    device_ids: tuple[str, ...] = ()
    canary: int = 1
    base_rate_per_minute: float = 60.0
    increment_factor: float = 2.0
    number_of_notified_things: int | None = None
    number_of_succeeded_things: int | None = None
    maximum_per_minute: float = 1000.0
    max_concurrency: int = 50
    in_progress_timeout_minutes: float = 10.0
    retries: dict = field(default_factory=dict)  # failure type -> number of retries
    abort: tuple[AbortCriterion, ...] = ()
    rollback_on_abort: bool = False
    require_record: bool = False
    floors: tuple[MetricFloor, ...] = ()
    record: Path | None = None
    key: Path | None = None  # signs MQTT job documents
    source: str = "plan"

    @classmethod
    def load(cls, path: str | os.PathLike) -> RolloutPlan:
        """Read a plan TOML; relative paths are relative to the plan file. Raises :class:`SpecError`."""
        path = Path(path)
        return cls.from_dict(_read_toml(path), str(path), base=path.parent)

    @classmethod
    def from_dict(cls, data: dict, source: str = "plan", base: Path | None = None) -> RolloutPlan:
        base = base or Path(".")

        def rel(p):  # resolved once, against the file that names it: a stored plan keeps absolute paths
            return None if p is None else Path(os.path.abspath(os.path.join(base, p)))

        f = Fields(data, source)
        name = check_name(f.str("name"), source, "name")
        inventory = rel(f.str("inventory"))
        packages = tuple(rel(p) for p in f.str_list("packages", nonempty=True))
        for i, p in enumerate(packages):
            if not p.is_file():
                raise f.error(f"packages[{i}]", f"{p} does not exist", hint="create it with `edgepeft update create`")
        sel = f.table("select", {})
        groups, tags, ids = tuple(sel.str_list("groups", [])), tuple(sel.str_list("tags", [])), \
            tuple(sel.str_list("devices", []))
        sel.reject_unknown()
        r = f.table("rollout", {})
        canary = r.int("canary", 1, min=0)
        maximum = r.float("maximum_per_minute", 1000.0, min=0.001)
        concurrency = r.int("max_concurrency", 50, min=1, max=100000)
        er = r.table("exponential_rate", {})
        base_rate = er.float("base_rate_per_minute", 60.0, min=0.001)
        factor = er.float("increment_factor", 2.0, min=1.0, max=5.0)
        crit = er.table("rate_increase_criteria", {})
        notified = crit.int("number_of_notified_things", None, min=1)
        succeeded = crit.int("number_of_succeeded_things", None, min=1)
        if notified is not None and succeeded is not None:
            raise crit.error("", "give one of number_of_notified_things or number_of_succeeded_things")
        crit.reject_unknown()
        er.reject_unknown()
        r.reject_unknown()
        t = f.table("timeouts", {})
        timeout = t.float("in_progress_timeout_minutes", 10.0, min=0.001)
        t.reject_unknown()
        retries = {}
        rt = f.table("retry", {})
        for i, c in enumerate(rt.items("criteria", [])):
            cf = Fields(c, source, f"retry.criteria[{i}]")
            ft = cf.str("failure_type", choices=("FAILED", "TIMED_OUT", "ALL"))
            retries[ft] = cf.int("number_of_retries", min=0, max=10)
            cf.reject_unknown()
        rt.reject_unknown()
        ab = f.table("abort", {})
        criteria = []
        for i, c in enumerate(ab.items("criteria", [])):
            cf = Fields(c, source, f"abort.criteria[{i}]")
            criteria.append(AbortCriterion(failure_type=cf.str("failure_type", choices=FAILURE_TYPES),
                                           threshold_percentage=cf.float("threshold_percentage", min=0.0, max=100.0),
                                           min_number_of_executed_things=cf.int("min_number_of_executed_things", 1,
                                                                                min=1),
                                           action=cf.str("action", "CANCEL", choices=("CANCEL",))))
            cf.reject_unknown()
        rollback = ab.bool("rollback", False)
        ab.reject_unknown()
        g = f.table("eval_gate", {})
        require = g.bool("require_record", False)
        record = rel(g.str("record", None))
        floors = []
        for i, c in enumerate(g.items("floor", [])):
            cf = Fields(c, source, f"eval_gate.floor[{i}]")
            floors.append(MetricFloor(cf.str("metric"), cf.float("min"), cf.str("slice", None)))
            cf.reject_unknown()
        g.reject_unknown()
        key = rel(f.str("key", None))
        plan = cls(name=name, inventory=inventory, packages=packages, groups=groups, tags=tags, device_ids=ids,
                   canary=canary, base_rate_per_minute=base_rate, increment_factor=factor,
                   number_of_notified_things=notified, number_of_succeeded_things=succeeded,
                   maximum_per_minute=maximum, max_concurrency=concurrency, in_progress_timeout_minutes=timeout,
                   retries=retries, abort=tuple(criteria), rollback_on_abort=rollback, require_record=require,
                   floors=tuple(floors), record=record, key=key, source=source)
        f.reject_unknown()
        return plan

    def to_dict(self) -> dict:
        """The plan as stored with the rollout (paths as strings)."""
        return {"name": self.name, "inventory": str(self.inventory), "packages": [str(p) for p in self.packages],
                "select": {"groups": list(self.groups), "tags": list(self.tags), "devices": list(self.device_ids)},
                "rollout": {"canary": self.canary, "maximum_per_minute": self.maximum_per_minute,
                            "max_concurrency": self.max_concurrency,
                            "exponential_rate": {"base_rate_per_minute": self.base_rate_per_minute,
                                                 "increment_factor": self.increment_factor,
                                                 "rate_increase_criteria": {
                                                     k: v for k, v in (("number_of_notified_things",
                                                                        self.number_of_notified_things),
                                                                       ("number_of_succeeded_things",
                                                                        self.number_of_succeeded_things)) if v}}},
                "timeouts": {"in_progress_timeout_minutes": self.in_progress_timeout_minutes},
                "retry": {"criteria": [{"failure_type": k, "number_of_retries": v} for k, v in self.retries.items()]},
                "abort": {"rollback": self.rollback_on_abort,
                          "criteria": [c.__dict__ for c in self.abort]},
                "eval_gate": {"require_record": self.require_record,
                              "record": str(self.record) if self.record else None,
                              "floor": [{k: v for k, v in fl.__dict__.items() if v is not None} for fl in self.floors]},
                "key": str(self.key) if self.key else None}
