"""OpenAI's request and response shapes for the generation routes, apart from any socket.

What a request asks for (``n``, ``stop``, ``logprobs``, ``stream``) is checked here and turned into
the engine's arguments; results become OpenAI's choices, log-probabilities, streamed chunks and
usage, so existing client libraries read the device's answers unchanged. Every refusal is an
:class:`~edgepeft.runtime.http.guards.ApiError` (400/413) with a hint.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from .guards import ApiError, Limits

SAMPLING_KEYS = ("temperature", "top_p", "top_k", "repetition_penalty", "frequency_penalty", "presence_penalty",
                 "seed")


def model_of(data: dict, base_id: str) -> str | None:
    """The adapter a request names (None: the base). Raises :class:`ApiError` for a non-string."""
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(400, "'model' must be a string (an adapter's name, or the base's)",
                       hint="GET /v1/models lists the names this device serves")
    return None if model in (None, "", base_id) else model


def adapters_of(data: dict, base_id: str):
    """The adapter(s) a classify/embeddings request names: ``data["adapters"]``, one name (or null, or the
    base's id: no adapter) per input, else ``model`` (:func:`model_of`). Raises :class:`ApiError` (400) for
    an ``adapters`` that is not a list, or both fields naming adapters; the list's length and entries are the
    engine's check (:func:`edgepeft.runtime.classify.per_text`, a 400 too), an unknown name its
    :class:`UnknownAdapterError` (404)."""
    per = data.get("adapters")
    if per is None:
        return model_of(data, base_id)
    if not isinstance(per, list):
        raise ApiError(400, "'adapters' must be a list with one adapter name (or null) per input",
                       hint='e.g. "adapters": ["sentiment", null]')
    if model_of(data, base_id) is not None:
        raise ApiError(400, "name the adapters either with 'model' or per input with 'adapters', not both",
                       hint="leave 'model' out (or give the base's id) when sending 'adapters'")
    return [None if isinstance(a, str) and a in ("", base_id) else a for a in per]


def texts_of(data: dict, key: str, limits: Limits, example: str = '["great product", "never again"]') -> list[str]:
    """``data[key]``: a string or a non-empty list of them, at most ``max_inputs`` (413 beyond)."""
    texts = data.get(key)
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise ApiError(400, f"'{key}' must be a string or a non-empty list of strings", hint=f"e.g. {example}")
    lim = limits.max_inputs
    if len(texts) > lim:
        raise ApiError(413, f"{len(texts)} {key}s in one request; the limit is {lim}", "too_large",
                       f"send at most {lim} per request")
    return texts


def logprobs_of(data: dict, chat: bool) -> int | None:
    """How many alternatives per token the request asks for (None: no log-probabilities)."""
    lp = data.get("logprobs")
    if chat:
        if lp in (None, False):
            return None
        if lp is not True:
            raise ApiError(400, "'logprobs' must be true or false on /v1/chat/completions",
                           hint="send \"logprobs\": true with \"top_logprobs\": 0 to 20")
        top = data.get("top_logprobs", 0)
        if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= 20:
            raise ApiError(400, "'top_logprobs' must be a whole number from 0 to 20", hint="e.g. \"top_logprobs\": 3")
        return top
    if lp is None:
        return None
    if isinstance(lp, bool) or not isinstance(lp, int) or not 0 <= lp <= 5:
        raise ApiError(400, "'logprobs' must be a whole number from 0 to 5 on /v1/completions",
                       hint="e.g. \"logprobs\": 2")
    return lp


@dataclass
class GenerationRequest:
    """One checked generation request: ``jobs`` are (choice index, prompt kwargs, seed or None) in
    OpenAI's order (choices of prompt 0 first); ``kw`` the engine's other arguments."""

    chat: bool
    n: int
    jobs: list
    kw: dict
    top: int | None
    stream: bool
    meta: dict
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage

    @classmethod
    def parse(cls, data: dict, chat: bool, limits: Limits, base_id: str) -> GenerationRequest:
        """Raises :class:`ApiError` (400/413) naming the field that is wrong."""
        adapter = model_of(data, base_id)
        if chat:
            if not isinstance(data.get("messages"), list):
                raise ApiError(400, "'messages' must be a list", hint='e.g. [{"role": "user", "content": "hi"}]')
            prompts = [{"messages": data["messages"]}]
        else:
            prompts = [{"prompt": p} for p in texts_of(data, "prompt", limits, '"Once upon a time" or ["one", "two"]')]
        n = data.get("n", 1)
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= limits.max_n:
            raise ApiError(400, f"'n' must be a whole number from 1 to {limits.max_n}, got {n!r}",
                           hint=f"ask for 1 to {limits.max_n} choices per prompt")
        stop = data.get("stop")
        stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise ApiError(400, "'stop' must be a string or a list of strings", hint='e.g. "stop": ["\\n\\n"]')
        if len(stops) > limits.max_stops or any(len(s) > limits.max_stop_chars for s in stops):
            raise ApiError(400, f"at most {limits.max_stops} stop strings of up to {limits.max_stop_chars} characters",
                           hint="send fewer or shorter stop strings")
        top = logprobs_of(data, chat)
        stream = data.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError(400, "'stream' must be true or false", hint="send \"stream\": true for server-sent events")
        include_usage = unsupported_and_usage(data, stream)
        kw = {"adapter": adapter, "max_new_tokens": data.get("max_tokens", data.get("max_completion_tokens")),
              "stop": stops or None, "logprobs": top}
        for key in SAMPLING_KEYS:
            kw[key] = data.get(key)
        jobs = [(i * n + j, p, None if kw["seed"] is None or j == 0 else kw["seed"] + j)
                for i, p in enumerate(prompts) for j in range(n)]
        meta = {"model": data.get("model") or base_id, "created": int(time.time()),
                "object": "chat.completion" if chat else "text_completion"}
        return cls(chat, n, jobs, kw, top, stream, meta, include_usage)

    def engine_args(self, prompt: dict, seed: int | None) -> dict:
        """The keyword arguments of ``Engine.generate`` for one choice."""
        return prompt | self.kw | ({"seed": seed} if seed is not None else {})

    def id(self, request_id: str) -> str:
        return f"{'chatcmpl' if self.chat else 'cmpl'}-{request_id}"


def lp_chat(records: list) -> dict:
    """Chat's ``logprobs``: per token its text, log-probability, UTF-8 bytes and alternatives."""
    def one(r):
        return {"token": r["token"], "logprob": r["logprob"], "bytes": list(r["token"].encode("utf-8"))}

    return {"content": [one(r) | {"top_logprobs": [one(t) for t in r["top"]]} for r in records]}


def lp_text(records: list, offset: int = 0) -> dict:
    """Completions' ``logprobs``: parallel lists, ``text_offset`` counted from ``offset``."""
    offsets, at = [], offset
    for r in records:
        offsets.append(at)
        at += len(r["token"])
    return {"tokens": [r["token"] for r in records], "token_logprobs": [r["logprob"] for r in records],
            "top_logprobs": [{t["token"]: t["logprob"] for t in r["top"]} for r in records],
            "text_offset": offsets}


def logprobs_block(records: list, chat: bool, offset: int = 0) -> dict:
    return lp_chat(records) if chat else lp_text(records, offset)


def choice(index: int, result, chat: bool, top) -> dict:
    """One finished choice."""
    lp = None if top is None else logprobs_block(result.logprobs or [], chat)
    if chat:
        return {"index": index, "message": {"role": "assistant", "content": result.text}, "logprobs": lp,
                "finish_reason": result.finish_reason}
    return {"index": index, "text": result.text, "logprobs": lp, "finish_reason": result.finish_reason}


def usage(results: list, n: int) -> dict:
    """Token counts: each prompt once (its first choice's count), every choice's completion."""
    prompt = sum(r.prompt_tokens for r in results[::n])
    done = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}


def completion(req: GenerationRequest, results: list) -> dict:
    """The whole (not streamed) answer."""
    return {"id": req.id(results[0].request_id), **req.meta,
            "choices": [choice(i, r, req.chat, req.top) for (i, _, _), r in zip(req.jobs, results)],
            "adapter_version": results[0].adapter_version, "usage": usage(results, req.n)}


def unsupported_and_usage(data: dict, stream: bool) -> bool:
    """Refuse (400) what this server would otherwise ignore: tools and function calling, and a
    ``response_format`` other than text; returns whether a stream should end with a usage chunk."""
    for key in ("tools", "tool_choice", "functions", "function_call"):
        if data.get(key) not in (None, [], "none"):
            raise ApiError(400, f"'{key}' is not supported: this server does not call tools",
                           hint="leave it out, and describe the answer you want in the messages")
    fmt = data.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise ApiError(400, "'response_format' other than {\"type\": \"text\"} is not supported: answers are not "
                       "constrained to JSON", hint="leave it out, ask for JSON in the messages and parse the answer")
    opts = data.get("stream_options")
    if opts is None:
        return False
    if not isinstance(opts, dict) or not isinstance(opts.get("include_usage", False), bool):
        raise ApiError(400, "'stream_options' must be an object like {\"include_usage\": true}",
                       hint='send "stream_options": {"include_usage": true}, or leave it out')
    if not stream:
        raise ApiError(400, "'stream_options' is only allowed with \"stream\": true", hint='add "stream": true')
    return bool(opts.get("include_usage"))


def usage_chunk(req: GenerationRequest, rid: str, results: list) -> dict:
    """The last streamed chunk of ``stream_options.include_usage``: no choices, the usage."""
    obj = f"{req.meta['object']}.chunk" if req.chat else req.meta["object"]
    return {"id": rid, "object": obj, "created": req.meta["created"], "model": req.meta["model"], "choices": [],
            "usage": usage(results, req.n)}


def chunk(req: GenerationRequest, rid: str, index: int, delta=None, finish=None, logprobs=None) -> dict:
    """One streamed event's payload (``rid``: the request's id, shared by all its chunks)."""
    if req.chat:
        c = {"index": index, "delta": delta or {}, "logprobs": logprobs, "finish_reason": finish}
        obj = f"{req.meta['object']}.chunk"
    else:
        c = {"index": index, "text": delta or "", "logprobs": logprobs, "finish_reason": finish}
        obj = req.meta["object"]
    return {"id": rid, "object": obj, "created": req.meta["created"], "model": req.meta["model"], "choices": [c]}
