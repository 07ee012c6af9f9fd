"""The device engine: one verified bundle, one ONNX Runtime session, many adapters.

``Engine(bundle_dir, trusted_keys)`` checks the manifest signature and every
file's hash before anything is loaded, opens one session with the target's
providers and threads, and memory-maps the bundle's adapters (plus newer ones
from the on-device adapter store). Requests name their adapter; requests with
different adapters run concurrently on the same session. A refused request
(bad input, unknown adapter, ...) raises and leaves the engine as it was.
"""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Iterable, Sequence

from ..errors import AdapterError, BundleError, EdgePeftError, EngineError, SpecError
from .audit import AuditLog, text_digest
from .detok import IncrementalDetokenizer, StopMatcher
from .registry import AdapterRegistry, parse_slots
from .results import Classification, GenerationResult, Stream
from .sampling import Sampler, SamplingParams
from .session import open_session
from .store import AdapterStore, version_key


class Engine:
    """A loaded bundle. Thread-safe.

    - ``trusted_keys``: the device's trusted Ed25519 public keys (PEM paths or bytes).
    - ``providers`` / ``threads``: override the bundle target's provider order and thread count.
    - ``store``: an :class:`AdapterStore` (or its folder) with adapters installed on the device.
    - ``audit``: an :class:`AuditLog` (or a path) recording which adapter version answered.

    Raises :class:`BundleError` (incl. ``SignatureError``/``IntegrityError``) for a bundle
    that is malformed, tampered with or signed by an untrusted key.
    """

    def __init__(self, bundle_dir: str | Path, trusted_keys: Iterable = (), *, providers: Sequence[str] | None = None,
                 threads: int | None = None, store: AdapterStore | str | Path | None = None,
                 audit: AuditLog | str | Path | None = None, review_threshold: float = 0.6,
                 max_concurrent: int = 4, spinning: bool = True):
        from concurrent.futures import ThreadPoolExecutor

        from ..spec.verify import verify_bundle, verify_files

        t0 = time.perf_counter()
        self.bundle_dir = Path(bundle_dir)
        try:
            # signature and schema first; file hashes below, the graph's before onnxruntime parses it
            self.manifest = verify_bundle(self.bundle_dir, list(trusted_keys), check_files=False)
        except SpecError as exc:
            raise BundleError(f"bundle manifest is invalid: {exc.message}", hint=exc.hint or "rebuild the bundle") from exc
        m = self.manifest
        graph = m.model.get("graph", "model.onnx")
        verify_files(self.bundle_dir, m, [graph])
        with ThreadPoolExecutor(1, thread_name_prefix="edgepeft-verify") as pool:
            # hash the other files (adapters, tokenizer) on another core while the session is built;
            # nothing reads them before this check has passed
            rest = pool.submit(verify_files, self.bundle_dir, m, [f.path for f in m.files if f.path != graph])
            try:
                self._open(m, graph, providers, threads, spinning, review_threshold, max_concurrent)
            finally:
                rest.result()
        self._load_adapters(m, store)
        self.audit = AuditLog(audit) if isinstance(audit, (str, Path)) else audit
        self.open_seconds = time.perf_counter() - t0

    def _open(self, m, graph, providers, threads, spinning, review_threshold, max_concurrent) -> None:
        self.model_info = dict(m.model)
        self.task = m.base.get("task", self.model_info.get("task", "causal-lm"))
        self.base_fingerprint = m.base["fingerprint"]
        target = m.target or {}
        self.providers = list(providers or target.get("providers") or ["CPUExecutionProvider"])
        self.threads = int(threads or target.get("threads") or 1)
        self.session = open_session(self.bundle_dir / graph, providers=self.providers, threads=self.threads,
                                    spinning=spinning)
        overridable = {i.name: (tuple(i.shape), i.type) for i in self.session.get_overridable_initializers()}
        slots = parse_slots(self.model_info, overridable)
        self.registry = AdapterRegistry(slots, self.base_fingerprint, self.model_info.get("slot_rank") or None,
                                        task=self.task, mode="bind" if self.task == "causal-lm" else "runoptions")
        gen = dict(m.generation or {})
        self.generation_defaults = gen
        self.max_context = int(min(x for x in (gen.get("max_context"), self.model_info.get("max_context")) if x))
        self.review_threshold = float(review_threshold)
        self.runner = None
        if self.task == "causal-lm":
            from .decoder import DecoderRunner

            mi = self.model_info
            if not (mi.get("io") or {}).get("past_present_share_buffer", True):
                raise BundleError("this decoder graph cannot share past/present key-value buffers",
                                  hint="rebuild the bundle with edgepeft build (GroupQueryAttention graphs)")
            self.runner = DecoderRunner(self.session, num_layers=mi["num_layers"], num_kv_heads=mi["num_kv_heads"],
                                        head_dim=mi["head_dim"], vocab_size=mi["vocab_size"],
                                        max_context=self.max_context, max_contexts=max_concurrent)
        self.warnings: list[str] = []
        self._cache: Path | None = None
        self._install_lock = threading.Lock()

    def _load_adapters(self, m, store) -> None:
        from .text import TextCodec

        self.codec = TextCodec(self.bundle_dir, m.tokenizer)
        for entry in m.adapters:
            meta = entry.to_dict() | {"sha256": "sha256:" + m.file(entry.file).sha256}
            self.registry.load(self._fp32(self.bundle_dir / entry.file), meta, name=entry.name)
        self.store = AdapterStore(store) if isinstance(store, (str, Path)) else store
        if self.store is not None:
            self._load_from_store()

    # -- adapters -------------------------------------------------------------------------
    def _fp32(self, path: Path) -> Path:
        """Bundle adapters shipped as fp16/int8 are expanded once into a private cache folder."""
        from .adapter_file import read_header
        from .health import compact_payload, expand_payload

        if not compact_payload(read_header(path)):
            return path
        if self._cache is None:
            import tempfile

            self._cache = Path(tempfile.mkdtemp(prefix="edgepeft-adapters-"))
        return expand_payload(path, self._cache / path.name)

    def _load_from_store(self) -> None:
        for stored in self.store.list():
            loaded = self.registry.names()
            if stored.name in loaded:
                current = self.registry.get(stored.name).version
                if version_key(stored.version) <= version_key(current):
                    continue
            try:
                self.registry.load(stored.path, stored.meta, name=stored.name, replace=True)
            except EdgePeftError as exc:
                self.warnings.append(f"stored adapter {stored.name} {stored.version} skipped: {exc.message}")

    def adapters(self) -> list[dict]:
        """Loaded adapters: name, version, rank, task, bytes, labels, in-use count."""
        return self.registry.describe()

    def load_adapter(self, path: str | Path, meta: dict | None = None, *, name: str | None = None) -> dict:
        """Check and memory-map an adapter file. ``meta`` is its manifest entry (base fingerprint,
        version, rank, labels...); without it, ``<file>.json`` beside the file is read.
        Raises :class:`AdapterError` (another base, wrong slots or rank, name taken)."""
        path = Path(path)
        if meta is None:
            sidecar = path.with_name(path.name + ".json")
            if not sidecar.is_file():
                raise AdapterError(f"no metadata for adapter {path.name}",
                                   hint=f"pass meta= (its manifest entry) or put it in {sidecar.name}")
            import json

            try:
                meta = json.loads(sidecar.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise AdapterError(f"{sidecar.name} is not readable JSON: {exc}", hint="rewrite it") from exc
        return self.registry.load(path, meta, name=name).describe()

    def unload_adapter(self, name: str) -> None:
        """Unload ``name``; raises :class:`AdapterError` while a request uses it."""
        gone = self.registry.unload(name)
        if self.runner is not None:
            self.runner.drop_adapter(gone.key)

    # -- generation -----------------------------------------------------------------------
    def _require(self, task: str) -> None:
        if self.task != task:
            verb = "generate" if task == "causal-lm" else "classify"
            raise EngineError(f"this bundle is a {self.task} model; it cannot {verb}",
                              hint="use classify() for classification bundles and generate() for causal-lm ones")

    def encode_prompt(self, prompt=None, messages=None) -> list[int]:
        """Token ids of a raw prompt or of chat messages (rendered with the bundle's template)."""
        if isinstance(prompt, (list, tuple)) and messages is None:
            prompt, messages = None, prompt
        if messages is not None:
            text = self.codec.render(messages)
            if not any(str(m.get("content", "")).strip() for m in messages):
                raise EngineError("the messages are empty", hint="send at least one message with text")
        else:
            if not isinstance(prompt, str):
                raise EngineError("prompt must be a string (or pass messages=)", hint="e.g. generate('Hello')")
            if not prompt.strip():
                raise EngineError("the prompt is empty", hint="send some text")
            text = prompt
        # as training encodes (edgepeft.train.encode): a raw prompt gets the tokenizer's own specials (Gemma's
        # and Llama's BOS), a rendered chat already holds what its template put there
        ids = self.codec.encode(text, add_special_tokens=messages is None)
        if not ids:
            raise EngineError("the prompt encodes to no tokens", hint="send some text")
        if len(ids) >= self.max_context:
            raise EngineError(f"the prompt is {len(ids)} tokens, longer than the context of {self.max_context}",
                              hint=f"shorten it to under {self.max_context - 1} tokens")
        return ids

    def generate(self, prompt=None, *, messages=None, adapter: str | Sequence[str] | None = None,
                 max_new_tokens: int | None = None, temperature: float | None = None, top_p: float | None = None,
                 stop: str | Sequence[str] | None = None, stream: bool = False, seed: int | None = None):
        """Generate text for ``prompt`` (a string) or ``messages`` (chat, [{role, content}]).

        Returns a :class:`GenerationResult`, or with ``stream=True`` a :class:`Stream` of text
        pieces. Raises :class:`EngineError` (empty or too long prompt, bad parameters) or
        :class:`AdapterError` (unknown or overlapping adapters) before anything runs.
        """
        self._require("causal-lm")
        ids = self.encode_prompt(prompt, messages)
        g = self.generation_defaults
        n_new = int(g.get("max_new_tokens", 128) if max_new_tokens is None else max_new_tokens)
        if n_new < 1:
            raise EngineError(f"max_new_tokens must be at least 1, got {n_new}", hint="e.g. max_new_tokens=64")
        params = SamplingParams(float(g.get("temperature", 0.0) if temperature is None else temperature),
                                float(g.get("top_p", 1.0) if top_p is None else top_p), seed)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if not all(isinstance(s, str) for s in stops):
            raise EngineError("stop must be a string or a list of strings", hint='e.g. stop=["\\n\\n"]')
        names = [adapter] if isinstance(adapter, str) else list(adapter or [])
        for n in names:
            self.registry.get(n)  # unknown names fail here, before anything runs
        out = Stream(iter(()))
        pieces = self._pieces(ids, names, n_new, params, stops, out, text_digest(str(prompt or messages)))
        out._pieces = pieces
        if stream:
            return out
        for _ in pieces:
            pass
        return out.result

    def _pieces(self, ids, names, n_new, params, stops, out: Stream, digest: str):
        request_id = uuid.uuid4().hex[:12]
        t0 = time.perf_counter()
        first = None
        status = "error"
        text, gen_ids, finish = [], [], "length"
        eos = set(self.codec.eos_ids)
        with self.registry.activate(names) as (_, chosen):
            values = (v for a in chosen for v in a.values)  # read only when a context first binds them
            key = tuple(a.key for a in chosen)
            detok, stopper = IncrementalDetokenizer(self.codec.decode), StopMatcher(stops)
            inner = self.runner.generate(ids, pick=Sampler(params), max_new_tokens=n_new, adapter_key=key,
                                         adapter_values=values)
            try:
                for tok in inner:
                    if tok in eos:
                        finish = "stop"
                        break
                    gen_ids.append(tok)
                    piece = stopper.feed(detok.add(tok))
                    if piece:
                        first = first or time.perf_counter() - t0
                        text.append(piece)
                        yield piece
                    if stopper.stopped:
                        finish = "stop"
                        break
                tail = "" if stopper.stopped else stopper.feed(detok.flush()) + stopper.flush()
                if stopper.stopped:
                    finish = "stop"
                if tail:
                    text.append(tail)
                    yield tail
                status = "ok"
            except GeneratorExit:
                status = "cancelled"
                raise
            finally:
                inner.close()
                out.result = GenerationResult(
                    text="".join(text), token_ids=gen_ids, finish_reason=finish if status == "ok" else status,
                    prompt_tokens=len(ids), adapter="+".join(x.name for x in chosen) or None,
                    adapter_version="+".join(x.version for x in chosen) or None, request_id=request_id,
                    seconds=time.perf_counter() - t0, first_token_seconds=first)
                self._audit("generate", out.result.request_id, chosen, status, digest,
                            prompt_tokens=len(ids), completion_tokens=len(gen_ids),
                            finish_reason=out.result.finish_reason, ms=round(out.result.seconds * 1000, 2))

    # -- classification -------------------------------------------------------------------
    def classify(self, texts: str | Sequence[str], *, adapter: str | None = None) -> list[Classification]:
        """Label each text. Every result carries all label probabilities and ``needs_review``
        (confidence under the adapter's ``review_threshold``). Raises :class:`EngineError`
        (empty or too long text) or :class:`AdapterError` (unknown adapter, no head)."""
        from .classify import classify_batch

        self._require("classification")
        return classify_batch(self, texts, adapter)

    # -- audit ----------------------------------------------------------------------------
    def _audit(self, kind: str, request_id: str, chosen, status: str, digest: str, **extra) -> None:
        if self.audit is None:
            return
        self.audit.record(request_id=request_id, kind=kind, status=status, base=self.manifest.base.get("name"),
                          base_fingerprint=self.base_fingerprint,
                          adapters=[{"name": a.name, "version": a.version, "sha256": a.meta.get("sha256")}
                                    for a in chosen], input_sha256=digest, **extra)

    # -- updates --------------------------------------------------------------------------
    def install_adapter(self, path: str | Path, entry, *, health_checks: Sequence = (), sha256: str | None = None):
        """Install a new adapter version into the store, switch to it, run its health checks.

        ``entry`` is the update's :class:`~edgepeft.spec.AdapterEntry` (or its dict). On a failed
        check the store rolls back, the engine keeps serving the previous version, and
        :class:`~edgepeft.errors.StoreError` says why. Raises :class:`AdapterError` before
        writing anything if the adapter does not fit this base.
        """
        from .health import install_with_checks

        return install_with_checks(self, Path(path), entry, health_checks, sha256)

    def rollback_adapter(self, name: str, reason: str = "requested"):
        """Switch ``name`` back to its previous stored version (and serve it)."""
        from .health import rollback

        return rollback(self, name, reason)

    def info(self) -> dict:
        return {"base": self.manifest.base, "task": self.task, "providers": self.session.get_providers(),
                "threads": self.threads, "max_context": self.max_context, "adapters": self.adapters(),
                "open_seconds": round(self.open_seconds, 4)}

