"""The device engine: one verified bundle, one ONNX Runtime session, many adapters.

``Engine(bundle_dir, trusted_keys)`` checks the manifest signature and every
file's hash before anything is loaded, and opens one session with the target's
providers and threads. The bundle's adapters serve from the start but are read
when first used (hashed again then, and loaded from the very bytes hashed), so
opening costs the same with 1 or 10 of them. Requests name their adapter;
requests with different adapters run concurrently on the same session, decoding together in one run
per step where the graph allows it (:mod:`.batching`); a classify or embed call may name an adapter per
text, and its texts then run together (:mod:`.classify`). A refused request (bad input, unknown
adapter, ...) raises and leaves the engine as it was.

Newer adapter versions arrive as signed update packages through
:mod:`edgepeft.update`, which uses the small public interface at the end of
this class (prepare, serve, health-check) and never the engine's internals.
"""

from __future__ import annotations

import functools
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..errors import (
    AdapterError,
    BundleError,
    EdgePeftError,
    EngineError,
    SpecError,
    UnknownAdapterError,
    UsageError,
)
from .audit import AuditLog
from .decoder import check_room
from .detok import IncrementalDetokenizer, StopMatcher
from .prompt_cache import DEFAULT_MIB
from .registry import AdapterRegistry, DeferredAdapter, LoadedAdapter
from .results import Classification, GenerationResult, Stream
from .sampling import Sampler, SamplingParams
from .session import check_runtime, open_session, return_freed_heap
from .slots import GraphFacts, parse_slots


class Engine:
    """A loaded bundle. Thread-safe.

    - ``trusted_keys``: the device's trusted Ed25519 public keys (PEM paths or bytes); they
      also verify the update packages this engine is given.
    - ``providers`` / ``threads``: override the bundle target's provider order and thread count.
    - ``audit``: an :class:`AuditLog` (or a path) recording which adapter version answered.
    - ``max_concurrent``: requests decoding at once (each holds one key/value context of the
      bundle's context length, a row of one batch where the graph batches; more wait; default: the bundle
      target's ``max_concurrent``, else 4);
      ``spinning``: worker threads spin between kernels (faster decode, more power).
    - ``batching``: concurrent requests decode together, one run per step, whatever adapters they name
      (:mod:`.batching`), where the graph has row masks (bundles built before them decode one request
      per run); False decodes each request alone, as before.
    - ``prompt_cache_mb``: the key/values of recent prompts kept per adapter setting, so a prompt that starts
      like an earlier one (a system prompt, instructions) prefills only the rest (:mod:`.prompt_cache`;
      batching graphs only; default 16 MiB, which the build's fit check counts); 0 keeps none.
    - ``health_checks``: run the bundle's own signed health checks before the engine is
      returned (a bundle that is broken on this device is refused here, not found by a user).
    - ``lazy_adapters``: the bundle's adapters are loaded by the first request that names them
      (their files are still hashed at open, so a tampered bundle is refused here, and hashed
      again when loaded); False loads them all before the engine is returned.

    Use it as a context manager, or call :meth:`close`, to release the session and adapters.

    Raises :class:`BundleError` (incl. ``SignatureError``/``IntegrityError``) for a bundle
    that is malformed, tampered with, signed by an untrusted key, or fails its health checks.
    """

    def __init__(self, bundle_dir: str | Path, trusted_keys: Iterable = (), *, providers: Sequence[str] | None = None,
                 threads: int | None = None, audit: AuditLog | str | Path | None = None,
                 review_threshold: float = 0.6,
                 max_concurrent: int | None = None, spinning: bool = True, health_checks: bool = True,
                 lazy_adapters: bool = True, batching: bool = True, prompt_cache_mb: float = DEFAULT_MIB):
        import threading
        from concurrent.futures import ThreadPoolExecutor

        from ..contracts.verify import BundleFiles, load_public_key, verify_bundle

        t0 = time.perf_counter()
        if max_concurrent is not None and (isinstance(max_concurrent, bool) or not isinstance(max_concurrent, int)
                                           or not 1 <= max_concurrent <= 256):
            raise EngineError(f"max_concurrent must be a whole number from 1 to 256, got {max_concurrent!r}",
                              hint="e.g. max_concurrent=2 on a small device")
        prompt_cache_mb = _megabytes("prompt_cache_mb", prompt_cache_mb)
        self._cond = threading.Condition()
        self._running = 0
        self._closed = False
        self.bundle_dir = Path(bundle_dir)  # a directory, or the .epb archive read in place
        self.trusted_keys = [load_public_key(k) for k in trusted_keys]
        self._files = BundleFiles(self.bundle_dir)
        try:
            # signature and schema first; file hashes below, the graph's before onnxruntime parses it
            self.manifest = verify_bundle(self._files, self.trusted_keys, check_files=False)
        except SpecError as exc:
            raise BundleError(f"bundle manifest is invalid: {exc.message}", hint=exc.hint or "rebuild the bundle") from exc
        m = self.manifest
        graph = m.model.get("graph", "model.onnx")
        # every file the engine uses is read once and loaded from what was hashed (the graph as a sealed
        # in-memory file onnxruntime opens by path: one copy in memory instead of two)
        model_file = self._files.open_verified(m.file(graph))
        tok_name = m.tokenizer.get("file", "tokenizer.json")
        data_name = graph + ".data"  # a graph over 2 GiB keeps its weights beside it, as ONNX external data
        has_data = any(f.path == data_name for f in m.files)
        with ThreadPoolExecutor(1, thread_name_prefix="edgepeft-verify") as pool:
            # on another core while the session is built: the tokenizer, then every other listed file (lazy
            # adapters included: a tampered bundle is refused at open, and they are hashed again when loaded)
            codec = pool.submit(self._codec, m.file(tok_name), m.tokenizer)
            loaded_now = {graph, tok_name, data_name} | (set() if lazy_adapters else {a.file for a in m.adapters})
            rest = pool.submit(self._files.check, m, [f.path for f in m.files if f.path not in loaded_now])
            try:
                weights = self._external_weights(model_file, m.file(data_name), data_name) if has_data else None
                self._open(m, model_file.source, providers, threads, spinning, review_threshold, max_concurrent,
                           batching, weights, prompt_cache_mb)
            finally:
                model_file.close()
                rest.result()
                self.codec = codec.result()
        self._serve_bundled(m, lazy_adapters)
        self.audit = AuditLog(audit) if isinstance(audit, (str, Path)) else audit
        if health_checks and m.health_checks:
            self._check_bundle()
        return_freed_heap()  # what parsing, folding and pre-packing the graph freed (tens of MiB)
        self.open_seconds = time.perf_counter() - t0

    def _check_bundle(self) -> None:
        from .health import run_bundle_checks

        failures = run_bundle_checks(self, self.manifest.health_checks)
        if failures:
            self.close()
            raise BundleError(f"the bundle's own health checks fail on this device: {'; '.join(failures)}",
                              hint="the build machine ran these checks and they passed, so this device computes "
                                   "other answers (another onnxruntime or CPU?); rebuild for this target, or open it "
                                   "with the checks turned off to investigate (--skip-health-checks on the command "
                                   "line, Engine(..., health_checks=False) in Python)")

    # -- lifecycle ------------------------------------------------------------------------
    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self, timeout: float = 30.0) -> None:
        """Refuse new requests, wait up to ``timeout`` seconds for running ones, then release the
        session, the decode contexts and every adapter. Idempotent. Raises :class:`EngineError`
        when requests are still running after ``timeout`` (nothing is released then)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._closed = True
            while self._running:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise EngineError(f"{self._running} request(s) still run after {timeout} s",
                                      hint="stop their streams (Stream.close()) first, or wait longer")
                self._cond.wait(left)
        for name in self.registry.names():
            self.registry.unload(name)
        if self.runner is not None and self.runner.batcher is not None:
            self.runner.batcher.close()
        self.runner = None
        self.session = None

    @property
    def closed(self) -> bool:
        return self._closed

    def stats(self) -> dict:
        """Requests running now and how many may decode at once (the rest wait); for a decoder that batches
        (:mod:`.batching`) also ``batch``: rows decoding and waiting, steps run, steps with several rows and
        the most rows one step had, and ``prompt_cache``: its entries, bytes, hits and tokens reused."""
        runner = self.runner
        batcher = runner.batcher if runner is not None else None
        with self._cond:
            out = {"running": self._running, "max_concurrent": self.max_concurrent, "closed": self._closed}
        if batcher is not None:
            out["batch"] = batcher.stats()
            if batcher.cache is not None:
                out["prompt_cache"] = batcher.cache.stats()
        return out

    def add_warning(self, message: str) -> None:
        """Record something users of this engine should see (e.g. an installed adapter that was not
        served); the CLI prints these and ``/v1/models`` lists them."""
        if message not in self.warnings:
            self.warnings.append(message)

    def _request(self):
        """Counts one running request (refused once the engine is closed)."""
        from contextlib import contextmanager

        @contextmanager
        def running():
            with self._cond:
                if self._closed:
                    raise EngineError("this engine is closed", hint="open the bundle again")
                self._running += 1
            try:
                yield
            finally:
                with self._cond:
                    self._running -= 1
                    self._cond.notify_all()

        return running()

    def _external_weights(self, model_file, entry, name: str) -> tuple[list[str], list]:
        """The graph's external weights as OrtValues over a verified in-memory copy of ``name`` (sealed
        where the system allows), kept by the engine for its session's life: ONNX Runtime never reads
        the data file, so one swapped after the check is never used. Raises :class:`IntegrityError`
        (the file does not match the manifest) or :class:`BundleError`."""
        from .external_data import external_tensors, initializers_from

        tensors = external_tensors(model_file.view(), name)
        data = self._files.open_verified(entry)
        try:
            self._weights_memory = data.view()  # stays valid after close(); freed with the engine
        finally:
            data.close()
        return initializers_from(tensors, self._weights_memory)

    def _open(self, m, model, providers, threads, spinning, review_threshold, max_concurrent,
              batching: bool, weights: tuple[list[str], list] | None = None, prompt_cache_mb: float = 0) -> None:
        self.model_info = dict(m.model)
        self.task = m.base.get("task", self.model_info.get("task", "causal-lm"))
        self.base_fingerprint = m.base["fingerprint"]
        target = m.target or {}
        budgets = target.get("budgets") if isinstance(target.get("budgets"), dict) else {}
        self.max_concurrent = int(max_concurrent or budgets.get("max_concurrent") or 4)
        max_concurrent = self.max_concurrent
        self.providers = list(providers or target.get("providers") or ["CPUExecutionProvider"])
        self.threads = int(threads or target.get("threads") or 1)
        check_runtime(m.quantization or {})
        graph = m.model.get("graph", "model.onnx")
        self.session = open_session(model, providers=self.providers, threads=self.threads,
                                    spinning=spinning, name=graph, initializers=weights)
        overridable = {i.name: (tuple(i.shape), i.type) for i in self.session.get_overridable_initializers()}
        slots = parse_slots(self.model_info, overridable)
        gen = dict(m.generation or {})
        self.generation_defaults = gen
        self.max_context = int(min(x for x in (gen.get("max_context"), self.model_info.get("max_context")) if x))
        self.registry = AdapterRegistry(slots, self.base_fingerprint, self.model_info.get("slot_rank") or None,
                                        task=self.task, facts=GraphFacts.from_model(self.model_info, self.max_context))
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
            from .batching import Batcher

            cache = int(prompt_cache_mb * 2**20)
            self.runner.batcher = Batcher.for_graph(self.runner, mi, max_concurrent, cache) if batching else None
        self.warnings: list[str] = []

    def _codec(self, entry, info: dict):
        from .text import TextCodec

        return TextCodec(self._files.read(entry), info)

    def _serve_bundled(self, m, lazy: bool) -> None:
        """Put the bundle's adapters in service: deferred (read, hashed and loaded by the first request
        that names one) or, with ``lazy`` False, loaded now."""
        for entry in m.adapters:
            if not lazy:
                self.registry.put(self.bundled_adapter(entry.name))
                continue
            meta = entry.to_dict() | {"sha256": m.file(entry.file).sha256}
            self.registry.put(DeferredAdapter(entry.name, int(entry.version), meta,
                                              load=functools.partial(self._load_bundled, entry.name)))

    def _load_bundled(self, name: str) -> LoadedAdapter:
        """A deferred bundled adapter's first load; a failure is also kept as a warning (``/v1/models``)."""
        try:
            return self.bundled_adapter(name)
        except EdgePeftError as exc:
            self.add_warning(f"bundled adapter {name!r} cannot be served: {exc.message}")
            raise

    # -- adapters -------------------------------------------------------------------------
    def adapters(self) -> list[dict]:
        """Adapters in service: name, version, rank, task, bytes, labels, in-use count."""
        return self.registry.describe()

    def bundled_adapter(self, name: str) -> LoadedAdapter:
        """The version of ``name`` this bundle carries, read and hashed again from the bundle and
        prepared (not served). Raises :class:`UnknownAdapterError` if the bundle carries no such adapter,
        :class:`IntegrityError` if its file no longer matches the manifest."""
        try:
            entry = self.manifest.adapter(name)
        except SpecError as exc:
            raise UnknownAdapterError(f"this bundle carries no adapter {name!r}", hint=exc.hint) from exc
        f = self.manifest.file(entry.file)
        verified = self._files.open_verified(f)
        try:
            data = verified.view()  # the tensors are views of it; its memory goes when the adapter does
        finally:
            verified.close()
        return self.registry.prepare(data, entry.to_dict() | {"sha256": f.sha256}, name=entry.name)

    def load_adapter(self, package, *, name: str | None = None) -> dict:
        """Verify a signed adapter update package (``.epu`` path or bytes) with this engine's trusted
        keys and serve it until the engine closes (nothing is stored: :mod:`edgepeft.update` installs
        durably). ``name`` serves it under another name. Raises :class:`SignatureError`,
        :class:`IntegrityError` or :class:`AdapterError` (another base, slots or rank; name taken)."""
        from ..contracts.update import read_update

        data = package if isinstance(package, (bytes, bytearray, memoryview)) else Path(package).read_bytes()
        envelope, payload = read_update(data, self.trusted_keys, source=str(package)[:200]
                                        if not isinstance(package, (bytes, bytearray, memoryview)) else "update")
        loaded = self.prepare_adapter(envelope, payload, name=name)
        self.registry.put(loaded, replace=False)
        return loaded.describe()

    def unload_adapter(self, name: str) -> None:
        """Take ``name`` out of service; raises :class:`UnknownAdapterError`, or :class:`AdapterInUseError`
        while a request uses it."""
        gone = self.registry.unload(name)
        if self.runner is not None:
            self.runner.drop_adapter(gone.key)

    # -- what the updater uses (edgepeft.update) -------------------------------------------
    def prepare_adapter(self, envelope, payload, *, name: str | None = None) -> LoadedAdapter:
        """Check a verified update's adapter against this graph and make it ready, without serving it.

        ``envelope`` is a verified :class:`~edgepeft.contracts.update.Envelope` of type "adapter" and
        ``payload`` its verified bytes; the tensors are views over those bytes. Raises
        :class:`AdapterError` (another base, task, slots or rank) or :class:`BundleError`.
        """
        meta = envelope.meta
        if meta.type != "adapter" or meta.adapter is None:
            raise BundleError(f"update {meta.name} is a {meta.type} update, not an adapter",
                              hint="bundle updates are installed by the device agent")
        entry = meta.adapter.to_dict() | {"sha256": meta.payload_sha256}
        loaded = self.registry.prepare(payload, entry, name=name or meta.adapter.name)
        slots = set(meta.slots)
        if slots and not set(loaded.params) <= slots:
            raise AdapterError(f"update {meta.name} v{meta.version} sets tensors its signed slot list does not name",
                               hint="recreate the update with `edgepeft update create`")
        return loaded

    def serve_adapter(self, adapter: LoadedAdapter) -> LoadedAdapter | None:
        """Put a prepared adapter into service under its name. Requests already running finish on
        the version they started with; returns that replaced version (or None)."""
        old = self.registry.put(adapter)
        if old is not None and old is not adapter and self.runner is not None:
            self.runner.drop_adapter(old.key)
        return old

    def health_check(self, checks: Sequence, adapter: LoadedAdapter | str | None = None) -> list[str]:
        """Run health checks (spec ``HealthCheck`` objects or dicts: input, expect, max_new_tokens)
        with ``adapter`` (served or only prepared); return one message per failure, [] when all pass."""
        from .health import run_health_checks

        return run_health_checks(self, checks, adapter)

    # -- generation -----------------------------------------------------------------------
    def _require(self, task: str) -> None:
        if self.task != task:
            if self.task == "classification":
                raise EngineError("this bundle is a classification model; it cannot generate text",
                                  hint="classify texts with it instead: `edgepeft run --classify TEXT`, "
                                       "POST /v1/classify, or Engine.classify")
            raise EngineError("this bundle is a causal-lm model; it cannot classify",
                              hint="generate text with it instead: `edgepeft run --prompt TEXT`, "
                                   "POST /v1/chat/completions, or Engine.generate")

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
                raise EngineError("the prompt must be a string (or chat messages)", hint="send the prompt as text")
            if not prompt.strip():
                raise EngineError("the prompt is empty", hint="send some text")
            text = prompt
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:  # a lone surrogate: the tokenizer would fail with a TypeError
                raise EngineError(f"the prompt holds a lone UTF-16 surrogate (\\u{ord(text[exc.start]):04x})",
                                  hint="send text that is valid UTF-8") from None
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
                 stop: str | Sequence[str] | None = None, stream: bool = False, seed: int | None = None,
                 top_k: int | None = None, repetition_penalty: float | None = None,
                 frequency_penalty: float | None = None, presence_penalty: float | None = None,
                 logprobs: int | None = None):
        """Generate text for ``prompt`` (a string) or ``messages`` (chat, [{role, content}]).

        Sampling (see :class:`SamplingParams`): ``temperature`` (0: greedy), ``top_k``, ``top_p``,
        ``repetition_penalty`` (prompt and answer, transformers' convention), ``frequency_penalty`` /
        ``presence_penalty`` (answer only, OpenAI's), ``seed`` (same seed, same answer) and
        ``logprobs`` (None, or how many alternatives to report per token: the result's ``logprobs``).
        Unset values come from the bundle's generation defaults.

        Returns a :class:`GenerationResult`, or with ``stream=True`` a :class:`Stream` of text
        pieces. Raises :class:`EngineError` (empty or too long prompt, bad parameters) or
        :class:`AdapterError` (unknown or overlapping adapters) before anything runs.
        """
        self._require("causal-lm")
        if self._closed:
            raise EngineError("this engine is closed", hint="open the bundle again")
        ids = self.encode_prompt(prompt, messages)
        g = self.generation_defaults
        n_new = _count("max_new_tokens", g.get("max_new_tokens", 128) if max_new_tokens is None else max_new_tokens)

        def pick(value, key, default):
            return g.get(key, default) if value is None else value

        params = SamplingParams(pick(temperature, "temperature", 0.0), pick(top_p, "top_p", 1.0), seed,
                                top_k=pick(top_k, "top_k", 0),
                                repetition_penalty=pick(repetition_penalty, "repetition_penalty", 1.0),
                                frequency_penalty=pick(frequency_penalty, "frequency_penalty", 0.0),
                                presence_penalty=pick(presence_penalty, "presence_penalty", 0.0), logprobs=logprobs)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if not all(isinstance(s, str) and s for s in stops):
            raise EngineError("stop must be a non-empty string or a list of them", hint='e.g. stop=["\\n\\n"]')
        names = [adapter] if isinstance(adapter, (str, LoadedAdapter)) else list(adapter or [])
        chosen = [n if isinstance(n, LoadedAdapter) else self.registry.get(n) for n in names]  # unknown names fail
        prefix = max((a.prefix_len for a in chosen), default=0)  # here, before anything runs; so does a prompt
        check_room(len(ids), prefix, self.max_context)  # with no room after an adapter's prefix
        sampler = Sampler(params, ids)
        out = Stream(request_id=uuid.uuid4().hex[:12], sampler=sampler,
                     token_text=self._token_text if logprobs is not None else None)
        out.attach(self._pieces(ids, names, n_new, sampler, stops, out, self.digest(str(prompt or messages))))
        if stream:
            return out
        for _ in out:
            pass
        return out.result

    def _token_text(self, token_id: int) -> str:
        return self.codec.tok.decode([int(token_id)], skip_special_tokens=False)

    def _pieces(self, ids, names, n_new, sampler, stops, out: Stream, digest: str):
        request_id = out.request_id
        t0 = time.perf_counter()
        first = None
        status = "error"
        text, gen_ids, finish = [], [], "length"
        eos = set(self.codec.eos_ids)
        with self._request(), self.registry.activate(names) as chosen:
            values = (v for a in chosen for v in a.values)  # read only when a context first binds them
            key = tuple(a.key for a in chosen)
            detok, stopper = IncrementalDetokenizer(self.codec.decode), StopMatcher(stops)
            inner = self.runner.generate(ids, pick=sampler, max_new_tokens=n_new, adapter_key=key,
                                         adapter_values=values, prefix=self.registry.prefix_of(chosen),
                                         adapters=chosen)
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
                    adapter_version=_versions(chosen), request_id=request_id,
                    seconds=time.perf_counter() - t0, first_token_seconds=first,
                    logprobs=out.logprobs_of(gen_ids) if sampler.params.logprobs is not None else None)
                self.audit_request("generate", out.result.request_id, chosen, status, digest,
                            prompt_tokens=len(ids), completion_tokens=len(gen_ids),
                            finish_reason=out.result.finish_reason, ms=round(out.result.seconds * 1000, 2))

    def token_logprobs(self, ids: Sequence[int], *, adapter: str | Sequence[str] | None = None) -> list[float]:
        """Log-probability of each token of ``ids`` after the ones before it (``len(ids) - 1`` values),
        from one prefill with ``adapter``: held-out loss and perplexity on the device itself.

        Raises :class:`EngineError` (not a decoder bundle, empty or too long sequence) or
        :class:`AdapterError` (unknown adapter).
        """
        import numpy as np

        self._require("causal-lm")
        ids = [int(i) for i in ids]
        with self._request(), self.registry.activate(adapter) as chosen:
            values = (v for a in chosen for v in a.values)
            logits = self.runner.prefill_logits(ids, adapter_key=tuple(a.key for a in chosen), adapter_values=values,
                                                prefix=self.registry.prefix_of(chosen))
        z = logits[:-1].astype(np.float64)
        z -= z.max(axis=1, keepdims=True)
        logz = np.log(np.exp(z).sum(axis=1))
        return (z[np.arange(len(ids) - 1), ids[1:]] - logz).tolist()

    # -- classification -------------------------------------------------------------------
    def classify(self, texts: str | Sequence[str], *, adapter: str | Sequence[str | None] | None = None,
                 review_threshold: float | None = None) -> list[Classification]:
        """Label each text. Every result carries all label probabilities and ``needs_review``
        (confidence under ``review_threshold`` when given, else the adapter's own threshold,
        else the engine's).

        ``adapter``: one adapter for every text, or a list with one adapter name (or None) per text:
        the texts then run together, each with its own adapter, and each result carries its own
        adapter, version, labels and threshold; a text's answer is the one it gets alone (rows of
        different adapters share a run only where that holds: :mod:`.classify`).

        Raises :class:`EngineError` (empty or too long text, a threshold outside [0, 1], an adapter
        list of another length than the texts) or :class:`AdapterError` (unknown adapter, no head)."""
        from .classify import classify_batch

        self._require("classification")
        if review_threshold is not None and not 0.0 <= float(review_threshold) <= 1.0:
            raise EngineError(f"review threshold {review_threshold} is not a probability",
                              hint="use a value from 0 (never review) to 1 (review everything)")
        with self._request():
            return classify_batch(self, texts, adapter, review_threshold)

    def embed(self, texts: str | Sequence[str], *, adapter: str | Sequence[str | None] | None = None,
              normalize: bool = True):
        """One vector per text from an encoder bundle (the pooled output before the classification
        head, with ``adapter``'s weights when named), L2-normalized unless ``normalize`` is False.
        ``adapter`` may be a list, one adapter name (or None) per text, as for :meth:`classify`; the
        result's ``adapter`` and ``adapter_version`` are then lists, one entry per text.

        Returns an :class:`Embeddings`. Raises :class:`EngineError` (not an encoder bundle, a graph
        built without an embeddings output, empty or too long text, an adapter list of another length)
        or :class:`AdapterError`.
        """
        from .classify import embed_batch

        if self.task != "classification":
            raise EngineError("embeddings come from encoder bundles; this one is a causal-lm model",
                              hint="build a bundle of an encoder base (e.g. all-MiniLM-L6-v2) for embeddings")
        with self._request():
            return embed_batch(self, texts, adapter, normalize)

    # -- audit ----------------------------------------------------------------------------
    def digest(self, text: str) -> str | None:
        """The audit log's keyed digest of request text (None without an audit log)."""
        return self.audit.digest(text) if self.audit is not None else None

    on_request = None  # called (kind, status, chosen adapters, extra) after each request: the agent's event log

    def audit_request(self, kind: str, request_id: str, chosen, status: str, digest: str | None, **extra) -> None:
        """Record one request in the audit log (nothing without one): ``kind`` ("generate", "classify",
        "embed"), the adapters ``chosen`` with their versions and hashes, ``status`` and the input's
        ``digest`` (:meth:`digest`); tells :attr:`on_request` too. Raises :class:`EngineError` when the log
        cannot be written."""
        if self.on_request is not None:
            self.on_request(kind, status, chosen, extra)
        if self.audit is None:
            return
        self.audit.record(request_id=request_id, kind=kind, status=status, base=self.manifest.base.get("name"),
                          base_fingerprint=self.base_fingerprint,
                          adapters=[{"name": a.name, "version": a.version, "sha256": a.meta.get("sha256")}
                                    for a in chosen], input_digest=digest, **extra)

    def info(self) -> dict:
        return {"base": self.manifest.base, "task": self.task,
                "providers": self.session.get_providers() if self.session is not None else [],
                "threads": self.threads, "max_context": self.max_context, "adapters": self.adapters(),
                "max_concurrent": self.max_concurrent, "warnings": list(self.warnings),
                "batching": self.runner is not None and self.runner.batcher is not None,
                "open_seconds": round(self.open_seconds, 4)}


def _megabytes(name: str, value) -> float:
    """A size in MiB from the caller: a finite number >= 0; raises :class:`UsageError`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 2**20:
        raise UsageError(f"{name} must be a number of MiB from 0 up, not {value!r}",
                         hint=f"e.g. {name}=32; 0 turns it off")
    return float(value)


def _count(name: str, value) -> int:
    """A whole number >= 1 from a request (JSON gives floats such as 1e400 too); raises :class:`EngineError`."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise EngineError(f"{name} must be a whole number of at least 1, got {value!r}",
                          hint="ask for 1 or more new tokens")
    return value


def _versions(chosen):
    """The answering adapter's version (an int), a list of them for several adapters, or None."""
    if not chosen:
        return None
    return chosen[0].version if len(chosen) == 1 else [a.version for a in chosen]
