"""The HTTP edge: FastAPI routes in the OpenAI shape over the scheduler and `select()`.

    app = create_app(Served.load("runs/demo/grpo"), ServeOptions())
    uvicorn.run(app, host="127.0.0.1", port=8000)

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health, GET /metrics
(Prometheus, `serve.metrics`). A request is
checked (`protocol`), its n x k candidate rows go to the scheduler with their seeds, and each answer is
the candidate `select()` keeps among its k. The app holds no model logic: decoding, scoring and selection
all live in `reflect`.
"""
from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from thinkscale.reflect.answer import AnswerRequest, Decoded, choose
from thinkscale.reflect.generate import encode_prompt, eos_token_ids, pad_token_id
from thinkscale.reflect.search import SearchConfig
from thinkscale.reflect.select import HEAD_FALLBACK, HEAD_STRATEGIES, parse_strategy

from . import protocol
from .metrics import MetricsMiddleware, ServeMetrics
from .protocol import Answer, ApiError, Generation, ServeOptions, Settings
from .scheduler import Job, QueueFull, Scheduler, ShuttingDown
from .text import DeltaStream, opens_think, split_reasoning, token_bytes

logger = logging.getLogger(__name__)


@dataclass
class Served:
    """The model a server answers with: policy + head, its tokenizer and the name clients ask for."""

    rm: Any
    tokenizer: Any
    name: str

    @classmethod
    def load(cls, model: str | Path, head: str | None = None, device: str = "cpu", name: str | None = None,
             gguf_file: str | None = None, step_delimiter: str | None = None, force_head: bool = False,
             instruction: str | None = None) -> "Served":
        """A `--model` value (`reflect.loading`: a model folder, "smollm2", a fitted-head folder), or a GGUF
        file inside a folder."""
        from thinkscale.reflect.loading import load_model

        rm, tokenizer = load_model(model, head=head, step_delimiter=step_delimiter, force_head=force_head,
                                   device=device, gguf_file=gguf_file, instruction=instruction)
        default = Path(gguf_file).stem if gguf_file is not None else Path(model).resolve().name
        return cls(rm, tokenizer, name or default)

    @property
    def context(self) -> int | None:
        return getattr(self.rm.policy.config, "max_position_embeddings", None)

    @property
    def think_tags(self) -> tuple[str, str] | None:
        return self.rm.config.think_tags

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """The prompt text of a conversation. A model trained with a prompt template (the built-in tasks'),
        or with no chat template, gets the built-in one: earlier turns as "role: text" lines, then the last
        user message in the model's own prompt format; otherwise the tokenizer's chat template. The model's
        instruction line (if any) follows the last user message either way, as it followed every question
        the head was fitted on."""
        if self.rm.config.prompt_template is None and getattr(self.tokenizer, "chat_template", None) is not None:
            *history, last = messages
            if last["role"] == "user":
                messages = [*history, {**last, "content": self.rm.with_instruction(last["content"])}]
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        *history, last = messages
        if last["role"] != "user":
            raise ApiError(400, "the last message must be the user's (this model's prompt format has no "
                                "assistant prefill)", param="messages", code="invalid_value")
        turns = "".join(f"{m['role']}: {m['content']}\n" for m in history)
        return turns + self.rm.format_prompt(last["content"], self.tokenizer)


def create_app(served: Served, options: ServeOptions = ServeOptions()) -> FastAPI:
    head_trained = bool(served.rm.head_is_trained)
    settings = Settings.from_options(served.name, options, served.context, head_trained)
    eos_ids = eos_token_ids(served.rm, served.tokenizer)
    vocab = served.rm.policy.get_output_embeddings().weight.shape[0]
    state: dict[str, Scheduler] = {}

    @asynccontextmanager
    async def lifespan(_app) -> AsyncIterator[None]:
        state["scheduler"] = Scheduler(served.rm, served.tokenizer, eos_ids, pad_token_id(served.tokenizer, eos_ids),
                                       options.max_batch, options.max_queue, options.pack, options.scheduler,
                                       options.max_kv_tokens)
        logger.info("serving %s (context %s, max batch %d rows, %s scheduler)", served.name, served.context,
                    options.max_batch, options.scheduler)
        if not head_trained and parse_strategy(options.default_selection)[0] in HEAD_STRATEGIES:
            logger.warning("the SPRM head is untrained (its saved record says so): requests that name no selection "
                           "are chosen by %s, not by the default %s; asking for %s explicitly is refused",
                           HEAD_FALLBACK, options.default_selection, " or ".join(HEAD_STRATEGIES))
        if not head_trained and SearchConfig.parse(options.default_search, 2).ranks_by_head:
            logger.warning("the default search %s ranks by the untrained SPRM head: requests that name no search "
                           "get 400 at low/medium/high effort; pass --search best_of_n or prune:signal=confidence",
                           options.default_search)
        try:
            yield
        finally:
            await asyncio.to_thread(state["scheduler"].close)

    app = FastAPI(title="thinkscale", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    metrics = ServeMetrics(lambda: state["scheduler"].stats(), options.max_batch)
    app.add_middleware(MetricsMiddleware, metrics=metrics,
                       endpoints={"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics"})

    @app.exception_handler(ApiError)
    async def api_error(_request, error: ApiError):
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(HTTPException)
    async def http_error(_request, error: HTTPException):
        return JSONResponse(ApiError(error.status_code, str(error.detail)).body(), status_code=error.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request, error: RequestValidationError):
        return JSONResponse(ApiError(400, str(error)).body(), status_code=400)

    @app.exception_handler(Exception)
    async def server_error(_request, error: Exception):
        logger.exception("internal error")
        return JSONResponse(ApiError(500, f"internal error: {type(error).__name__}: {error}").body(), status_code=500)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": served.name, **state["scheduler"].stats()}

    @app.get("/metrics")
    async def prometheus() -> Response:
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": 0,
                                            "owned_by": "thinkscale"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await _read_json(request, options.max_body_bytes)
        protocol.check_model(body, settings)
        text = served.render_chat(protocol.chat_messages(body))
        ids = encode_prompt(served.tokenizer, text)
        gen = protocol.parse_generation(body, "chat", settings, [ids], [text])
        request.state.effort = gen.effort
        return await _answer(request, gen)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _read_json(request, options.max_body_bytes)
        protocol.check_model(body, settings)
        prompts = protocol.completion_prompts(body)
        ids = [encode_prompt(served.tokenizer, p) for p in prompts]
        if any(not p for p in ids):
            raise ApiError(400, "'prompt': a prompt is empty after tokenization", param="prompt", code="invalid_value")
        texts = [p if isinstance(p, str) else served.tokenizer.decode(p) for p in prompts]
        gen = protocol.parse_generation(body, "completion", settings, ids, texts, vocab)
        request.state.effort = gen.effort
        return await _answer(request, gen)

    # -- answering -------------------------------------------------------------------------------
    def _job(gen: Generation, request: AnswerRequest, listener=None) -> Job:
        seed = gen.seed if gen.seed is not None else random.SystemRandom().randrange(2**62)
        rows = request.rows(seed)  # a search makes rows like these as it goes: all are checked here
        try:
            state["scheduler"].check_fits(rows)
        except ValueError as error:  # a candidate larger than the server's whole KV budget
            raise ApiError(400, str(error), param="max_tokens", code="context_length_exceeded") from None
        if request.search_config is not None:  # one search call on the engine, for all the request's answers
            return Job([], gen.stop, call=lambda cancelled, run_rows: request.run_search(
                served.rm, served.tokenizer, seed, cancelled, run_rows))
        return Job(rows, gen.stop, listener)

    def _answer_request(gen: Generation) -> AnswerRequest:
        try:
            return gen.answer_request()
        except ValueError as error:  # protocol checked every field; this is the last line of defence
            raise ApiError(400, str(error), code="invalid_value") from None

    def _submit(job: Job) -> asyncio.Future:
        try:
            return asyncio.wrap_future(state["scheduler"].submit(job))
        except QueueFull as error:
            raise ApiError(429, f"the server is busy: {error}; retry later", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        except ShuttingDown as error:
            raise ApiError(503, str(error), code="shutting_down") from None

    def _answers(gen: Generation, request: AnswerRequest, result) -> tuple[list[Answer], dict]:
        """The chosen answer of each group of candidates (reflect.answer.choose), in the wire's terms, and
        the usage: the prompts once (their candidates share one prefill), every token decoded."""
        decoded = result if isinstance(result, Decoded) else Decoded.of_candidates(request, result)
        think_end = served.think_tags[1] if served.think_tags is not None else None
        choices = choose(request, decoded, head_trained, think_end, options.grade_timeout_s)
        answers, answer_tokens = [], 0
        for q, choice in enumerate(choices):
            in_think = opens_think(gen.prompt_texts[q // gen.n], served.think_tags)
            tags = served.think_tags if gen.kind == "chat" else None
            reasoning, content = split_reasoning(choice.text, tags, in_think)
            answer_tokens += len(served.tokenizer.encode(content, add_special_tokens=False)) if content else 0
            chosen = choice.candidate
            selected = {"strategy": choice.strategy, "k": gen.k, "search": gen.search,
                        "candidate": chosen.sample_index, "score": chosen.score, "step_scores": chosen.step_scores,
                        "candidate_scores": [c.score for c in choice.group]}
            finish = "stop" if choice.finished else "length"
            logprobs = token_logprobs(chosen, choice.text, gen, served.tokenizer, eos_ids) if gen.logprobs else None
            answers.append(Answer(choice.text, reasoning, content, finish, selected, logprobs))
        prompt_tokens = sum(len(p) for p in gen.prompts)
        metrics.prompt_tokens.inc(prompt_tokens)
        metrics.generated_tokens.inc(decoded.generated_tokens)
        if request.search_config is not None:
            metrics.search_stopped_rows.inc(decoded.stopped_rows)
            budget = request.answers * request.k * request.max_new_tokens
            metrics.search_unspent_tokens.inc(max(0, budget - decoded.generated_tokens))
        return answers, protocol.usage(prompt_tokens, decoded.generated_tokens, answer_tokens)

    async def _answer(request, gen: Generation):
        if gen.stream:
            events = _stream(gen, request.state.started)
            return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        answer_request = _answer_request(gen)
        job = _job(gen, answer_request)
        future = _submit(job)
        try:
            while True:  # wait, and give up the rows if the client goes away
                done, _ = await asyncio.wait({future}, timeout=0.25)
                if done:
                    break
                if await request.is_disconnected():
                    job.cancel()
                    raise ApiError(499, "the client closed the connection", code="client_closed")
            result = _result(future)
        finally:
            if not future.done():
                job.cancel()
        answers, usage = await asyncio.to_thread(_answers, gen, answer_request, result)
        return protocol.response_body(gen, settings, answers, usage)

    def _result(future: asyncio.Future) -> list:
        try:
            return future.result()
        except ShuttingDown as error:
            raise ApiError(503, f"the request was not completed: {error}", code="shutting_down") from None

    async def _stream(gen: Generation, start: float) -> AsyncIterator[str]:
        first = True
        async for event, carries_text in _stream_events(gen):
            if first and carries_text:
                metrics.first_token.observe(time.perf_counter() - start)
                first = False
            yield event

    async def _stream_events(gen: Generation) -> AsyncIterator[tuple[str, bool]]:
        """The stream's server-sent events, each with whether it carries answer text."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        listener = None
        if gen.k == 1:  # one sample per answer: its tokens go out as they come
            listener = lambda i, tokens, ended: loop.call_soon_threadsafe(events.put_nowait, (i, tokens, ended))
        try:
            answer_request = _answer_request(gen)
            job = _job(gen, answer_request, listener)
            future = _submit(job)
        except ApiError as error:
            yield _sse(error.body()), False
            yield "data: [DONE]\n\n", False
            return
        try:
            streams = {q: DeltaStream(served.think_tags if gen.kind == "chat" else None,
                                      gen.kind == "chat" and opens_think(gen.prompt_texts[q // gen.n], served.think_tags),
                                      gen.stop) for q in range(len(gen.prompts) * gen.n)}
            started: set[int] = set()
            if listener is not None:
                ended = 0
                while ended < len(streams):
                    if future.done() and events.empty():
                        break  # the job failed before all its rows ended; its error follows
                    getter = asyncio.ensure_future(events.get())
                    await asyncio.wait({getter, future}, return_when=asyncio.FIRST_COMPLETED)
                    if not getter.done():
                        getter.cancel()
                        continue
                    q, tokens, last = getter.result()
                    text = served.tokenizer.decode(tokens, skip_special_tokens=True)
                    reasoning, content = streams[q].feed(text, final=last)
                    if reasoning or content or q not in started:
                        chunk = protocol.chunk_body(gen, settings, q, reasoning, content, first=q not in started)
                        yield _sse(chunk), bool(reasoning or content)
                        started.add(q)
                    ended += last
            try:
                await asyncio.wait({future})
                result = _result(future)
            except ApiError as error:
                yield _sse(error.body()), False
                yield "data: [DONE]\n\n", False
                return
            answers, usage = await asyncio.to_thread(_answers, gen, answer_request, result)
            for q, answer in enumerate(answers):
                if listener is None:  # best of k: the chosen candidate goes out once it is chosen
                    text = answer.text
                    if gen.kind == "chat":
                        reasoning, content = answer.reasoning or "", answer.content
                    else:
                        reasoning, content = "", text
                    chunk = protocol.chunk_body(gen, settings, q, reasoning, content, first=True)
                    yield _sse(chunk), bool(reasoning or content)
                yield _sse(protocol.chunk_body(gen, settings, q, finish_reason=answer.finish_reason,
                                               selected=answer.selected, logprobs=answer.logprobs)), False
            if gen.include_usage:
                yield _sse(protocol.usage_chunk(gen, settings, usage)), False
            yield "data: [DONE]\n\n", False
        finally:
            job.cancel()  # a no-op when done; frees the rows when the client went away mid-stream

    return app


def token_logprobs(chosen, text: str, gen: Generation, tokenizer, eos_ids: set[int]) -> dict:
    """The choice's `logprobs` object: every generated token of the chosen candidate up to its returned
    text (a stop string cut, EOS left out), with its log-prob under the model (before temperature and
    top-p) and, with `top_logprobs`, the most likely tokens at its position. The reasoning part is
    included: these are the tokens the model generated, in order."""
    ids = chosen.token_ids
    count = len(ids) - (1 if ids and chosen.finished and ids[-1] in eos_ids else 0)
    while count and len(tokenizer.decode(ids[:count - 1], skip_special_tokens=True)) >= len(text):
        count -= 1  # tokens wholly after a stop-string cut
    raw = token_bytes(tokenizer, ids[:count])  # a piece of a character keeps its own bytes
    pieces = [b.decode("utf-8", errors="replace") for b in raw]
    values = chosen.token_logprobs[:count]
    tops = [list(zip(token_bytes(tokenizer, top_ids), lps)) for top_ids, lps in chosen.extra.get("top_logprobs", [])]
    if gen.kind == "chat":
        def entry(data: bytes, lp: float) -> dict:
            return {"token": data.decode("utf-8", errors="replace"), "logprob": lp, "bytes": list(data)}
        content = [{**entry(data, lp), "top_logprobs": [entry(*t) for t in (tops[i] if i < len(tops) else [])]}
                   for i, (data, lp) in enumerate(zip(raw, values))]
        return {"content": content, "refusal": None}
    offsets, at = [], 0
    for piece in pieces:
        offsets.append(at)
        at += len(piece)
    top = ([{data.decode("utf-8", errors="replace"): lp for data, lp in tops[i]} if i < len(tops) else None
            for i in range(len(pieces))] if gen.top_logprobs else None)
    return {"tokens": pieces, "token_logprobs": list(values), "top_logprobs": top, "text_offset": offsets}


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _read_json(request, limit: int) -> dict:
    """The request body as a JSON object; 413 past `limit` bytes, 400 when it is not UTF-8 JSON."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ApiError(413, f"the request body is {length} bytes; the limit is {limit}", code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the request body is over the limit of {limit} bytes", code="body_too_large")
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        body = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise ApiError(400, f"the request body is not UTF-8 (byte {error.start})", code="invalid_json") from None
    except json.JSONDecodeError as error:
        raise ApiError(400, f"the request body is not valid JSON: {error.msg} at line {error.lineno} "
                            f"column {error.colno}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    return body
