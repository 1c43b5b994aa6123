"""The OpenAI wire format: request bodies checked and turned into a `Generation`, results turned into
response bodies. Pure functions of JSON values; the model enters only through `encode` and `render`.

Every problem with a request is an `ApiError` carrying the HTTP status and the OpenAI error object
(`{"error": {"message", "type", "param", "code"}}`), so no bad request reaches the model.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from thinkscale.reflect.answer import AnswerRequest
from thinkscale.reflect.engine import MAX_TOP_LOGPROBS, SAMPLING
from thinkscale.reflect.search import SearchConfig
from thinkscale.reflect.select import EFFORT_K, HEAD_FALLBACK, HEAD_STRATEGIES, parse_strategy

# reasoning_effort -> candidates per answer; "none" and "minimal" are a single sample
EFFORTS: dict[str, int] = {"none": 1, "minimal": 1, **EFFORT_K}
CHAT_ROLES = ("system", "developer", "user", "assistant")
MAX_STOP = 4  # the OpenAI API's limit on stop strings


class ApiError(Exception):
    """A request the server refuses: HTTP status + the OpenAI error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or {404: "not_found_error", 413: "invalid_request_error", 429: "rate_limit_error",
                             503: "server_error"}.get(status, "invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class ServeOptions:
    """Everything `thinkscale serve` sets besides the model (see its --help): the one home of its defaults."""

    default_effort: str = "medium"
    default_selection: str = "sprm"
    default_search: str = "best_of_n"  # how low/medium/high spend their k rows (reflect.search)
    temperature: float = SAMPLING.temperature
    top_p: float = SAMPLING.top_p
    max_tokens: int = 512  # when a request gives none (capped by the context)
    max_candidates: int = 64  # n * k of one request
    max_batch: int = 32
    max_queue: int = 64
    max_body_bytes: int = 1 << 20
    pack: bool = True  # False: one request at a time (either scheduler)
    scheduler: str = "continuous"  # or "static" (serve.scheduler)
    max_kv_tokens: int | None = None  # bound on the running rows' prompt + max_tokens, summed
    grade_timeout_s: float = 5.0


DEFAULTS = ServeOptions()


@dataclass(frozen=True)
class Settings:
    """Server-wide defaults and limits a request is checked against (the request-facing part of
    ServeOptions, with the model's name and context)."""

    model_name: str
    default_effort: str = DEFAULTS.default_effort
    default_selection: str = DEFAULTS.default_selection
    default_search: str = DEFAULTS.default_search
    temperature: float = DEFAULTS.temperature
    top_p: float = DEFAULTS.top_p
    max_tokens: int = DEFAULTS.max_tokens
    max_candidates: int = DEFAULTS.max_candidates
    context: int | None = None  # the model's positions; None = unknown
    head_trained: bool = True  # what the SPRM head's saved record says: False refuses sprm/weighted asked for

    @classmethod
    def from_options(cls, model_name: str, options: ServeOptions, context: int | None = None,
                     head_trained: bool = True) -> "Settings":
        return cls(model_name, options.default_effort, options.default_selection, options.default_search,
                   options.temperature, options.top_p, options.max_tokens, options.max_candidates, context,
                   head_trained)

    def __post_init__(self) -> None:
        if self.default_effort not in EFFORTS:
            raise ValueError(f"default effort must be one of {', '.join(EFFORTS)}, got {self.default_effort!r}")
        parse_strategy(self.default_selection)
        SearchConfig.parse(self.default_search, 32)
        if self.max_candidates < 1 or self.max_tokens < 1:
            raise ValueError("max_candidates and max_tokens must be >= 1")


@dataclass
class Generation:
    """One checked request: prompts as token ids, each answered `n` times by the best of `k` samples."""

    kind: str  # "chat" or "completion"
    prompts: list[list[int]]
    prompt_texts: list[str]
    n: int
    k: int
    effort: str
    selection: str
    search: str  # "best_of_n" (k independent samples) or a reflect.search spec, e.g. "prune:signal=confidence"
    temperature: float
    top_p: float
    max_tokens: int
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    logprobs: bool = False  # return the chosen candidate's token log-probs
    top_logprobs: int = 0  # and its this many most likely tokens at each position
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def rows(self) -> int:
        return len(self.prompts) * self.n * self.k

    def answer_request(self) -> AnswerRequest:
        """What reflect answers for this request (fan-out, search, selection and stops live there)."""
        return AnswerRequest(self.prompts, self.n, self.k, self.max_tokens, self.temperature, self.top_p, self.seed,
                             self.stop, self.search, self.selection, self.top_logprobs if self.logprobs else 0)


# ----------------------------------------------------------------------------- field checks

def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _bad(param: str, message: str) -> ApiError:
    return ApiError(400, f"'{param}': {message}", param=param, code="invalid_value")


def _optional(body: dict, key: str, check: Callable[[Any], bool], expected: str) -> Any:
    value = body.get(key)
    if value is not None and not check(value):
        raise _bad(key, f"expected {expected}, got {type(value).__name__} {_short(value)}")
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def clean_text(text: str) -> str:
    """Text as the tokenizer can take it: lone surrogates (JSON escapes of half a character) become U+FFFD."""
    return "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in text)


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOP:
        raise _bad("stop", f"expected a non-empty string or a list of at most {MAX_STOP} non-empty strings")
    return tuple(clean_text(s) for s in stops)


def _unsupported(body: dict, kind: str) -> None:
    if body.get("tools") or body.get("functions") or body.get("tool_choice") not in (None, "none"):
        raise ApiError(400, "tool calls are not supported by this server", param="tools", code="unsupported")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise ApiError(400, "only response_format {\"type\": \"text\"} is supported", param="response_format",
                       code="unsupported")
    if kind == "completion" and body.get("echo"):
        raise ApiError(400, "echo is not supported by this server", param="echo", code="unsupported")
    if kind == "completion" and body.get("best_of") not in (None, 1):
        raise ApiError(400, "best_of is not supported; ask for best-of-k with reasoning_effort (low/medium/high)",
                       param="best_of", code="unsupported")
    if kind == "completion" and body.get("suffix") is not None:
        raise ApiError(400, "suffix is not supported by this server", param="suffix", code="unsupported")


def check_model(body: dict, settings: Settings) -> None:
    model = body.get("model")
    if model is None:
        raise ApiError(400, "'model' is required (GET /v1/models lists it)", param="model", code="missing_required_parameter")
    if not isinstance(model, str):
        raise _bad("model", f"expected a string, got {type(model).__name__}")
    if model != settings.model_name:
        raise ApiError(404, f"the model {model!r} does not exist; this server serves {settings.model_name!r}",
                       param="model", code="model_not_found")


def _content_text(content: Any, index: int) -> str:
    """A message's content: a string, or a list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return clean_text(content)
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                                         for p in content):
        return clean_text("".join(p["text"] for p in content))
    raise _bad(f"messages[{index}].content", "expected a string or a list of text parts (only text is supported)")


def chat_messages(body: dict) -> list[dict[str, str]]:
    messages = body.get("messages")
    if messages is None:
        raise ApiError(400, "'messages' is required", param="messages", code="missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "expected a non-empty list of messages")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _bad(f"messages[{i}]", f"expected an object with role and content, got {type(message).__name__}")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise _bad(f"messages[{i}].role", f"expected one of {', '.join(CHAT_ROLES)}, got {_short(role)}")
        checked.append({"role": role, "content": _content_text(message.get("content"), i)})
    return checked


def completion_prompts(body: dict) -> list[str | list[int]]:
    """`prompt`: a string, a list of strings, a list of token ids, or a list of token-id lists."""
    prompt = body.get("prompt")
    if prompt is None:
        raise ApiError(400, "'prompt' is required", param="prompt", code="missing_required_parameter")
    if isinstance(prompt, str):
        return [clean_text(prompt)]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return [clean_text(p) for p in prompt]
        if all(_is_int(t) for t in prompt):
            return [list(prompt)]
        if all(isinstance(p, list) and p and all(_is_int(t) for t in p) for p in prompt):
            return [list(p) for p in prompt]
    raise _bad("prompt", "expected a string, a list of strings, or token ids (a list of ints or of int lists)")


# ----------------------------------------------------------------------------- the whole request

def parse_generation(body: Any, kind: str, settings: Settings, prompts: list[list[int]], prompt_texts: list[str],
                     vocab_size: int | None = None) -> Generation:
    """Check the sampling fields of a request whose prompts are already encoded."""
    _unsupported(body, kind)
    effort = _optional(body, "reasoning_effort", lambda v: isinstance(v, str), "a string")
    effort = settings.default_effort if effort is None else effort
    if effort not in EFFORTS:
        raise ApiError(400, f"'reasoning_effort': unknown value {effort!r}; valid: {', '.join(EFFORTS)}",
                       param="reasoning_effort", code="invalid_value")
    asked = _optional(body, "selection", lambda v: isinstance(v, str), "a strategy name such as 'sprm'")
    selection = settings.default_selection if asked is None else asked
    try:
        name, _ = parse_strategy(selection)
    except ValueError as error:
        raise _bad("selection", str(error)) from None
    if name == "oracle":
        raise _bad("selection", "'oracle' needs the right answer, which a server does not have")
    if name in HEAD_STRATEGIES and asked is not None and not settings.head_trained:
        raise _bad("selection", f"{name!r} ranks by the SPRM head's scores, and this server's head is untrained "
                                f"(its saved record says so); ask for {HEAD_FALLBACK}, confidence, deepconf, "
                                "self_certainty or majority")

    search = _optional(body, "search", lambda v: isinstance(v, str), "a search spec such as 'prune:signal=sprm'")
    search = settings.default_search if search is None else search
    try:  # one sample has nothing to search (the field is then ignored), but a malformed spec is refused
        config = SearchConfig.parse(search, EFFORTS[effort] if EFFORTS[effort] > 1 else EFFORT_K["high"])
    except ValueError as error:
        raise _bad("search", str(error)) from None
    if config.ranks_by_head and not settings.head_trained and EFFORTS[effort] > 1:
        raise _bad("search", f"{search!r} ranks rows by the SPRM head's scores, and this server's head is untrained "
                             "(its saved record says so); ask for best_of_n or prune:signal=confidence")
    n = _optional(body, "n", lambda v: _is_int(v) and v >= 1, "an integer >= 1")
    n = 1 if n is None else n
    k = EFFORTS[effort]
    if len(prompts) * n * k > settings.max_candidates:
        raise ApiError(400, f"'n': {len(prompts)} prompt(s) x n={n} x k={k} (reasoning_effort {effort!r}) = "
                            f"{len(prompts) * n * k} candidates, over this server's limit of {settings.max_candidates}",
                       param="n", code="too_many_candidates")
    temperature = _optional(body, "temperature", lambda v: _is_number(v) and 0 <= v <= 2, "a number in [0, 2]")
    top_p = _optional(body, "top_p", lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]")
    seed = _optional(body, "seed", _is_int, "an integer")
    stream = _optional(body, "stream", lambda v: isinstance(v, bool), "true or false")
    options = _optional(body, "stream_options", lambda v: isinstance(v, dict), "an object")
    include_usage = bool((options or {}).get("include_usage", False))

    logprobs, top_logprobs = _logprobs(body, kind)
    limit = _max_tokens(body, settings, max(len(p) for p in prompts))
    if vocab_size is not None:
        for i, ids in enumerate(prompts):
            if any(not 0 <= t < vocab_size for t in ids):
                raise _bad("prompt", f"prompt {i} has token ids outside the vocabulary [0, {vocab_size})")
    return Generation(kind, prompts, prompt_texts, n, k, effort, selection, search if k > 1 else "best_of_n",
                      settings.temperature if temperature is None else float(temperature),
                      settings.top_p if top_p is None else float(top_p), limit, seed, _stop(body),
                      bool(stream), include_usage, logprobs, top_logprobs)


def _logprobs(body: dict, kind: str) -> tuple[bool, int]:
    """(return log-probs, how many top tokens each): chat's `logprobs` (bool) + `top_logprobs` (0-20);
    the legacy completions' `logprobs` (an integer 0-5: the top tokens; given at all: on)."""
    if kind == "chat":
        on = _optional(body, "logprobs", lambda v: isinstance(v, bool), "true or false")
        top = _optional(body, "top_logprobs", lambda v: _is_int(v) and 0 <= v <= MAX_TOP_LOGPROBS,
                        f"an integer in [0, {MAX_TOP_LOGPROBS}]")
        if top is not None and not on:
            raise _bad("top_logprobs", "needs 'logprobs': true")
        return bool(on), top or 0
    if body.get("logprobs") is False:  # what clients of the old `logprobs: bool` send
        return False, 0
    top = _optional(body, "logprobs", lambda v: _is_int(v) and 0 <= v <= 5, "an integer in [0, 5]")
    return top is not None, top or 0


def _max_tokens(body: dict, settings: Settings, prompt_tokens: int) -> int:
    given = {key: _optional(body, key, lambda v: _is_int(v) and v >= 1, "an integer >= 1")
             for key in ("max_completion_tokens", "max_tokens")}
    given = {key: value for key, value in given.items() if value is not None}
    if len(set(given.values())) > 1:
        raise _bad("max_tokens", "max_tokens and max_completion_tokens differ; give one")
    room = None if settings.context is None else settings.context - prompt_tokens
    if room is not None and room < 1:
        raise ApiError(400, f"the prompt has {prompt_tokens} tokens, the model's context is {settings.context}: "
                            "no room to generate", param="messages", code="context_length_exceeded")
    if given:
        key, value = next(iter(given.items()))
        if room is not None and value > room:
            raise ApiError(400, f"the prompt ({prompt_tokens} tokens) + {key}={value} exceeds the model's context "
                                f"of {settings.context} tokens", param=key, code="context_length_exceeded")
        return value
    return settings.max_tokens if room is None else min(settings.max_tokens, room)


# ----------------------------------------------------------------------------- responses

@dataclass
class Answer:
    """One choice: the chosen candidate's text as the client sees it, and how it was chosen."""

    text: str
    reasoning: str | None
    content: str
    finish_reason: str  # "stop" or "length"
    selected: dict[str, Any]
    logprobs: dict[str, Any] | None = None  # the choice's `logprobs` object, when asked for


def usage(prompt_tokens: int, completion_tokens: int, answer_tokens: int) -> dict[str, Any]:
    """Token counts over every candidate decoded; reasoning tokens are all but the returned answers'."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens_details": {"reasoning_tokens": max(0, completion_tokens - answer_tokens)}}


def response_body(gen: Generation, settings: Settings, answers: list[Answer], usage_body: dict) -> dict[str, Any]:
    if gen.kind == "chat":
        # the think part twice: `reasoning_content` (DeepSeek's name) and `reasoning` (newer vLLM clients')
        choices = [{"index": i, "message": {"role": "assistant", "content": a.content, "reasoning_content": a.reasoning,
                                            "reasoning": a.reasoning},
                    "finish_reason": a.finish_reason, "logprobs": a.logprobs, "selected": a.selected}
                   for i, a in enumerate(answers)]
        return {"id": f"chatcmpl-{gen.id}", "object": "chat.completion", "created": gen.created,
                "model": settings.model_name, "choices": choices, "usage": usage_body}
    choices = [{"index": i, "text": a.text, "finish_reason": a.finish_reason, "logprobs": a.logprobs,
                "selected": a.selected} for i, a in enumerate(answers)]
    return {"id": f"cmpl-{gen.id}", "object": "text_completion", "created": gen.created,
            "model": settings.model_name, "choices": choices, "usage": usage_body}


def chunk_body(gen: Generation, settings: Settings, index: int, reasoning: str = "", content: str = "",
               finish_reason: str | None = None, selected: dict | None = None, first: bool = False,
               logprobs: dict | None = None) -> dict[str, Any]:
    """One server-sent event of a streamed response (`logprobs`: the choice's logprobs object, sent whole
    with its last chunk)."""
    if gen.kind == "chat":
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if reasoning:
            delta["reasoning_content"] = delta["reasoning"] = reasoning
        if content or (first and not reasoning):
            delta["content"] = content
        choice: dict[str, Any] = {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": logprobs}
        obj, prefix = "chat.completion.chunk", "chatcmpl"
    else:
        choice = {"index": index, "text": reasoning + content, "finish_reason": finish_reason, "logprobs": logprobs}
        obj, prefix = "text_completion", "cmpl"
    if selected is not None:
        choice["selected"] = selected
    return {"id": f"{prefix}-{gen.id}", "object": obj, "created": gen.created, "model": settings.model_name,
            "choices": [choice]}


def usage_chunk(gen: Generation, settings: Settings, usage_body: dict) -> dict[str, Any]:
    obj, prefix = ("chat.completion.chunk", "chatcmpl") if gen.kind == "chat" else ("text_completion", "cmpl")
    return {"id": f"{prefix}-{gen.id}", "object": obj, "created": gen.created, "model": settings.model_name,
            "choices": [], "usage": usage_body}
