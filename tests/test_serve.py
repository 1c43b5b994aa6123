"""`thinkscale serve` as users meet it: a real server process on 127.0.0.1, driven by the official
`openai` client (and raw httpx for what the client will not send), checked against offline
`sample` + `select` with the same seeds."""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from reflect_util import bpe_tokenizer, favor_tokens, tiny_policy
from thinkscale.reflect import ReflectiveModel, sample
from thinkscale.reflect.select import select
from thinkscale.serve.text import split_reasoning

pytestmark = pytest.mark.slow
NAME = "tiny"
TEMPLATE = "{question}\n<think>\n"  # the built-in tasks' prompt format: the completion starts inside a think block
MAX_TOKENS = 24


def build_model(path, head_trained: bool = True):
    """The served model. Its head is random; its record says "trained" (so that the SPRM path is what the
    exactness tests check) unless `head_trained=False`."""
    tok = bpe_tokenizer(plain_think_tags=True)
    policy = favor_tokens(tiny_policy("llama", vocab_size=len(tok)), tok, texts=(".", "\n", " we", " is", "</think>"),
                          eos_scale=10.0, scale=80.0)
    rm = ReflectiveModel.from_pretrained(policy, step_delimiter="\n", prompt_template=TEMPLATE)
    rm.head_is_trained = head_trained
    rm.save_pretrained(path, tokenizer=tok)
    return rm, tok


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A `thinkscale serve` process on a free port, up once /health answers."""

    def __init__(self, model_dir, *extra: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "thinkscale", "serve", "--model", str(model_dir),
                                      "--name", NAME, "--port", str(self.port), "--shutdown-timeout", "20", *extra],
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stdout.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("server did not come up in 90 s")

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, **kw)

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=5).json()

    def stop(self, timeout: float = 30) -> str:
        """SIGTERM, and the server's log once it has exited after a graceful shutdown."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            output, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        # uvicorn re-raises the SIGTERM once it has shut down, the Unix convention for a stopped service
        assert self.proc.returncode in (0, -signal.SIGTERM), output
        assert "Application shutdown complete" in output, output
        return output


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("served")
    rm, tok = build_model(path)
    return path, ReflectiveModel.from_pretrained(str(path)).eval(), tok


@pytest.fixture(scope="module")
def server(model):
    s = Server(model[0], "--max-batch", "64")
    yield s
    s.stop()


def offline(model, question: str, k: int, seed: int, copies: int = 1, selection: str = "sprm", **kw):
    """What a seeded request must answer: offline sample + select with the same seed."""
    _, rm, tok = model
    prompt = rm.format_prompt(question, tok)
    groups = sample(rm, tok, [prompt] * copies, k=k, seed=seed, max_new_tokens=kw.get("max_tokens", MAX_TOKENS),
                    temperature=kw.get("temperature", 0.6), top_p=kw.get("top_p", 0.95))
    chosen = [g[0] if k == 1 else select(g, selection, think_end="</think>") for g in groups]
    return groups, chosen


def chat(client, question, **kw):
    return client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": question}],
                                          max_tokens=MAX_TOKENS, **kw)


# ----------------------------------------------------------------------------- answers


def test_models_and_health(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == [NAME]
    assert server.health()["status"] == "ok"


@pytest.mark.parametrize("effort,k", [("none", 1), ("minimal", 1), ("low", 2), ("medium", 8), ("high", 32)])
def test_each_effort_answers_as_offline_sample_and_select(server, model, effort, k):
    question = "First we add the numbers."
    out = chat(server.client(), question, reasoning_effort=effort, seed=11)
    groups, chosen = offline(model, question, k, seed=11)
    choice = out.choices[0]
    reasoning, content = split_reasoning(chosen[0].text, ("<think>", "</think>"), True)
    assert choice.message.content == content
    assert getattr(choice.message, "reasoning_content", None) == reasoning
    assert getattr(choice.message, "reasoning", None) == reasoning  # the name newer vLLM clients read
    assert choice.finish_reason == ("stop" if chosen[0].finished else "length")
    selected = choice.selected
    assert selected["k"] == k and selected["candidate"] == chosen[0].sample_index
    assert selected["score"] == pytest.approx(chosen[0].score, abs=1e-4)
    assert selected["step_scores"] == pytest.approx(chosen[0].step_scores, abs=1e-4)
    assert out.usage.completion_tokens == sum(c.num_generated_tokens for c in groups[0])
    assert out.usage.prompt_tokens == groups[0][0].num_prompt_tokens  # once: the k candidates share its prefill
    assert 0 <= out.usage.completion_tokens_details.reasoning_tokens <= out.usage.completion_tokens
    assert out.model == NAME and out.object == "chat.completion"


def test_completions_with_n_and_several_prompts(server, model):
    _, rm, tok = model
    prompts = ["Two", "Compute 3 times 5"]
    # the client's completions.create has no reasoning_effort parameter: it goes in extra_body
    out = server.client().completions.create(model=NAME, prompt=prompts, n=2, seed=5, max_tokens=MAX_TOKENS,
                                             extra_body={"selection": "majority", "reasoning_effort": "low"})
    assert len(out.choices) == 4
    groups = sample(rm, tok, [p for p in prompts for _ in range(2)], k=2, seed=5, max_new_tokens=MAX_TOKENS)
    expected = [select(g, "majority", think_end="</think>").text for g in groups]
    assert [c.text for c in out.choices] == expected
    assert all(c.selected["strategy"] == "majority" for c in out.choices)


def test_streaming_equals_the_non_streamed_answer(server):
    client = server.client()
    for effort in ("none", "low"):
        full = chat(client, "Two", reasoning_effort=effort, seed=3)
        stream = chat(client, "Two", reasoning_effort=effort, seed=3, stream=True, stream_options={"include_usage": True})
        reasoning, content, finish, usage, chunks = "", "", None, None, 0
        for chunk in stream:
            chunks += 1
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                reasoning += getattr(choice.delta, "reasoning_content", None) or ""
                content += choice.delta.content or ""
                finish = choice.finish_reason or finish
        assert content == full.choices[0].message.content
        assert reasoning == (getattr(full.choices[0].message, "reasoning_content", None) or "")
        assert finish == full.choices[0].finish_reason
        assert usage.completion_tokens == full.usage.completion_tokens
        if effort == "none":
            assert chunks > 5  # token by token, not one block


def test_stop_strings_cut_the_answer(server, model):
    question = "First we add the numbers."
    _, chosen = offline(model, question, 1, seed=21)
    text = chosen[0].text
    stop = "</think>"
    assert stop in text[1:], "the tiny model should close its think block within the budget"
    out = server.client().completions.create(model=NAME, prompt=model[1].format_prompt(question, model[2]),
                                             seed=21, max_tokens=MAX_TOKENS, stop=[stop],
                                             extra_body={"reasoning_effort": "none"})
    assert out.choices[0].text == text[:text.index(stop)] and out.choices[0].finish_reason == "stop"


def test_concurrent_requests_are_batched_and_exact(server, model):
    before = server.health()["decode_steps"]

    async def main():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        calls = [client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": f"Two {i}"}],
                                                reasoning_effort="low", seed=100 + i, max_tokens=MAX_TOKENS)
                 for i in range(16)]
        return await asyncio.gather(*calls)

    outs = asyncio.run(main())
    steps = server.health()["decode_steps"] - before
    # one at a time would take 16 requests x their length; together, about one request's length
    assert steps < 3 * MAX_TOKENS, f"16 concurrent requests took {steps} decode steps: they did not share the batch"
    for i, out in enumerate(outs):
        _, chosen = offline(model, f"Two {i}", 2, seed=100 + i)
        assert out.choices[0].selected["candidate"] == chosen[0].sample_index
        assert out.choices[0].message.content == split_reasoning(chosen[0].text, ("<think>", "</think>"), True)[1]


def test_odd_text_is_handled(server):
    client = server.client()
    for text in ["nul \x00 bell \x07 escape \x1b[31m", "emoji \U0001f600 日本"]:
        out = chat(client, text, reasoning_effort="none", seed=1)
        assert isinstance(out.choices[0].message.content, str)
    # half a character as a JSON escape (the client cannot even encode it; raw bytes can)
    body = b'{"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": "lone \\ud800 surrogate"}]}'
    response = httpx.post(server.url + "/v1/chat/completions", content=body, timeout=30)
    assert response.status_code == 200 and isinstance(response.json()["choices"][0]["message"]["content"], str)


# ----------------------------------------------------------------------------- bad input


def _error(response: httpx.Response, status: int, param=None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param
    return error


def test_bad_requests_get_openai_errors_and_the_server_stays_up(server, model):
    url = server.url + "/v1/chat/completions"
    ok = {"model": NAME, "messages": [{"role": "user", "content": "Two"}], "max_tokens": 4}
    post = lambda body, **kw: httpx.post(url, json=body, timeout=30, **kw)
    assert "xhigh" in _error(post({**ok, "reasoning_effort": "xhigh"}), 400, "reasoning_effort")["message"]
    _error(post({**ok, "temperature": "hot"}), 400, "temperature")
    _error(post({**ok, "temperature": 3}), 400, "temperature")
    _error(post({**ok, "n": True}), 400, "n")
    _error(post({**ok, "n": 3, "reasoning_effort": "high"}), 400, "n")  # 96 candidates > 64
    _error(post({**ok, "messages": []}), 400, "messages")
    _error(post({**ok, "messages": [{"role": "wizard", "content": "x"}]}), 400, "messages[0].role")
    _error(post({**ok, "messages": [{"role": "user", "content": 5}]}), 400, "messages[0].content")
    _error(post({k: v for k, v in ok.items() if k != "messages"}), 400, "messages")
    _error(post({**ok, "selection": "nonsense"}), 400, "selection")
    _error(post({**ok, "selection": "oracle"}), 400, "selection")
    _error(post({**ok, "stop": [""]}), 400, "stop")
    _error(post({**ok, "max_tokens": 0}), 400, "max_tokens")
    _error(post({**ok, "top_logprobs": 2}), 400, "top_logprobs")  # needs logprobs: true
    _error(post({**ok, "logprobs": True, "top_logprobs": 21}), 400, "top_logprobs")
    long_question = " we" * 300  # > 256 positions
    assert _error(post({**ok, "messages": [{"role": "user", "content": long_question}]}), 400)["code"] == \
        "context_length_exceeded"
    _error(post({**ok, "max_tokens": 300}), 400, "max_tokens")
    assert _error(post({**ok, "model": "gpt-9"}), 404, "model")["code"] == "model_not_found"
    _error(post({**ok, "model": None}), 400, "model")
    _error(httpx.post(url, content=b'{"model": "tiny", "messages": [', timeout=10,
                      headers={"content-type": "application/json"}), 400)
    _error(httpx.post(url, content=b'{"model": "\xff\xfe"}', timeout=10), 400)
    _error(httpx.post(url, content=b"[1, 2]", timeout=10), 400)
    _error(httpx.post(url, content=b"x" * (2 << 20), timeout=30), 413)
    completions = server.url + "/v1/completions"
    _error(httpx.post(completions, json={"model": NAME, "prompt": [[1, 2], "x"]}, timeout=10), 400, "prompt")
    _error(httpx.post(completions, json={"model": NAME, "prompt": [10**9]}, timeout=10), 400, "prompt")
    _error(httpx.post(completions, json={"model": NAME, "prompt": "x", "best_of": 4}), 400, "best_of")
    _error(httpx.get(server.url + "/v1/nothing", timeout=10), 404)
    _error(httpx.get(url, timeout=10), 405)
    # the official client sees the same errors as exceptions
    with pytest.raises(openai.BadRequestError, match="reasoning_effort"):
        chat(server.client(), "Two", reasoning_effort="extreme")
    with pytest.raises(openai.NotFoundError):
        server.client().chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert server.health()["status"] == "ok"
    assert chat(server.client(), "Two", reasoning_effort="none").choices[0].message.content is not None


def test_a_client_that_goes_away_frees_its_rows(server):
    before = server.health()["cancelled_rows"]
    body = {"model": NAME, "messages": [{"role": "user", "content": "Two"}], "max_tokens": 200,
            "reasoning_effort": "none", "stream": True, "seed": 1, "temperature": 1.0}
    # a long stream: read one chunk, then hang up
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as response:
        assert response.status_code == 200
        next(response.iter_lines())
    deadline = time.monotonic() + 20
    while server.health()["cancelled_rows"] == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.health()["cancelled_rows"] > before



def test_a_client_that_stops_waiting_for_an_answer_frees_its_rows(server):
    before = server.health()["cancelled_rows"]
    body = {"model": NAME, "messages": [{"role": "user", "content": "Two"}], "max_tokens": 230, "n": 2,
            "reasoning_effort": "high", "seed": 2, "temperature": 1.5}
    start = time.monotonic()
    with pytest.raises(httpx.TimeoutException):  # the client gives up long before 2 x best of 32 are decoded
        httpx.post(server.url + "/v1/chat/completions", json=body, timeout=0.3)
    # the same request, waited for, takes this long: the server had seconds to notice the hang-up
    answered = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert answered.status_code == 200 and time.monotonic() - start > 1.0
    deadline = time.monotonic() + 20
    while server.health()["cancelled_rows"] == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.health()["cancelled_rows"] > before



# ----------------------------------------------------------------------------- queue and shutdown


def test_a_full_queue_says_429_and_sigterm_answers_or_refuses_in_flight_requests(model):
    server = Server(model[0], "--max-batch", "1", "--max-queue", "1", "--no-batching")
    results: list = []

    def ask(i):
        try:
            r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                           json={"model": NAME, "messages": [{"role": "user", "content": "Two"}], "seed": i,
                                 "max_tokens": 120, "reasoning_effort": "medium", "temperature": 1.0})
            results.append((r.status_code, r.headers.get("retry-after"), r.json()))
        except httpx.TransportError as error:  # refused once the server stopped listening
            results.append((None, None, repr(error)))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    started = time.monotonic()
    server.stop(timeout=60)
    for t in threads:
        t.join(60)
        assert not t.is_alive(), "a request hung through shutdown"
    assert time.monotonic() - started < 45
    statuses = [status for status, _, _ in results]
    assert len(results) == 6 and 429 in statuses and 200 in statuses, statuses
    for status, retry_after, body in results:
        assert status in (200, 429, 503, None), (status, body)
        if status == 429:
            assert retry_after is not None and body["error"]["code"] == "queue_full"
        if status == 200:
            assert body["choices"][0]["message"]["content"] is not None


def test_cli_errors_are_one_line(tmp_path, model):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = lambda *args: subprocess.run([sys.executable, "-m", "thinkscale", "serve", *args], cwd=tmp_path, env=env,
                                       capture_output=True, text=True, timeout=120)
    out = run()
    assert out.returncode == 2 and "thinkscale demo" in out.stderr and "Traceback" not in out.stderr
    out = run("--model", str(tmp_path))
    assert out.returncode == 2 and f"no model in {tmp_path}" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    out = run("--model", str(model[0]), "--selection", "bogus")
    assert out.returncode == 2 and "unknown selection strategy 'bogus'" in out.stderr and "Traceback" not in out.stderr


def test_an_untrained_head_selects_by_a_named_fallback(tmp_path):
    """Its record says untrained: requests naming no selection are chosen by logprob (and say so), sprm asked
    for explicitly is refused naming the fallbacks, and the start-up log says it once."""
    rm, tok = build_model(tmp_path, head_trained=False)
    rm = ReflectiveModel.from_pretrained(str(tmp_path)).eval()
    assert rm.head_is_trained is False
    untrained = Server(tmp_path)
    try:
        out = chat(untrained.client(), "Two", reasoning_effort="low", seed=3)
        groups, chosen = offline((tmp_path, rm, tok), "Two", 2, seed=3, selection="logprob")
        assert out.choices[0].selected["strategy"] == "logprob"
        assert out.choices[0].selected["candidate"] == chosen[0].sample_index
        bad = httpx.post(untrained.url + "/v1/chat/completions", timeout=10, json={
            "model": NAME, "messages": [{"role": "user", "content": "x"}], "reasoning_effort": "low",
            "selection": "sprm"})
        error = bad.json()["error"]
        assert bad.status_code == 400 and error["param"] == "selection"
        assert "untrained" in error["message"] and "logprob" in error["message"]
        majority = chat(untrained.client(), "Two", reasoning_effort="low", seed=3, extra_body={"selection": "majority"})
        assert majority.choices[0].selected["strategy"] == "majority"
        for search in ("beam:width=2", "prune:signal=sprm"):  # searches that rank by the head are refused too
            bad = httpx.post(untrained.url + "/v1/chat/completions", timeout=10, json={
                "model": NAME, "messages": [{"role": "user", "content": "x"}], "reasoning_effort": "low",
                "search": search})
            assert bad.status_code == 400 and bad.json()["error"]["param"] == "search"
            assert "untrained" in bad.json()["error"]["message"]
        searched = chat(untrained.client(), "Two", reasoning_effort="low", seed=3,
                        extra_body={"search": "prune:signal=confidence"})
        assert searched.choices[0].selected["search"] == "prune:signal=confidence"
    finally:
        log = untrained.stop()
    assert log.count("the SPRM head is untrained") == 1


def test_a_search_request_answers_as_offline_search_and_select(server, model):
    from thinkscale.reflect.search import SearchConfig, search

    _, rm, tok = model
    spec = "prune:signal=confidence,warmup=2,keep=50,window=4"
    out = chat(server.client(), "Two", reasoning_effort="medium", seed=8, extra_body={"search": spec})
    result = search(rm, tok, [rm.format_prompt("Two", tok)], SearchConfig.parse(spec, 8), max_new_tokens=MAX_TOKENS,
                    seed=8)[0]
    chosen = select(result.complete, "sprm", think_end="</think>")
    selected = out.choices[0].selected
    assert selected["search"] == spec and selected["candidate"] == chosen.sample_index
    assert out.choices[0].message.content == split_reasoning(chosen.text, ("<think>", "</think>"), True)[1]
    assert out.usage.completion_tokens == result.generated_tokens
    for spec in ("beam:width=2", "dvts:width=4"):  # forks, made by the search's policy in the shared batch
        before = scrape(server)
        out = chat(server.client(), "Two", reasoning_effort="medium", seed=9, extra_body={"search": spec})
        after = scrape(server)
        result = search(rm, tok, [rm.format_prompt("Two", tok)], SearchConfig.parse(spec, 8),
                        max_new_tokens=MAX_TOKENS, seed=9)[0]
        chosen = select(result.complete, "sprm", think_end="</think>")
        assert out.choices[0].selected["candidate"] == chosen.sample_index
        assert out.usage.completion_tokens == result.generated_tokens

        def delta(name):
            return after[(name, ())] - before[(name, ())]

        assert result.stopped_rows > 0  # beams that lost: the counter is not trivially 0 here
        assert delta("thinkscale_search_stopped_rows_total") == result.stopped_rows
        assert delta("thinkscale_search_unspent_tokens_total") == 8 * MAX_TOKENS - result.generated_tokens
    bad = httpx.post(server.url + "/v1/chat/completions", timeout=10, json={
        "model": NAME, "messages": [{"role": "user", "content": "x"}], "reasoning_effort": "low", "search": "beam:width=3"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "search"


def scrape(server) -> dict[tuple, float]:
    """/metrics as {(sample name, sorted labels): value}, read with prometheus-client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    response = httpx.get(server.url + "/metrics", timeout=5)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def test_metrics_count_requests_tokens_and_first_tokens(server):
    before = scrape(server)
    out = chat(server.client(), "First we add the numbers.", reasoning_effort="low", seed=3)
    chunks = list(chat(server.client(), "First we add the numbers.", reasoning_effort="none", seed=3, stream=True))
    assert chunks
    with pytest.raises(openai.BadRequestError):
        chat(server.client(), "Hi", reasoning_effort="extreme")
    after = scrape(server)

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    chat_path = "/v1/chat/completions"
    assert delta("thinkscale_requests_total", endpoint=chat_path, status="200", effort="low") == 1
    assert delta("thinkscale_requests_total", endpoint=chat_path, status="200", effort="none") == 1
    assert delta("thinkscale_requests_total", endpoint=chat_path, status="400", effort="-") == 1
    # the low request's usage, plus the streamed one's (the same prompt, counted once per request)
    assert delta("thinkscale_prompt_tokens_total") == out.usage.prompt_tokens * 2
    # one prefill per request: the low request's 2 candidates share theirs
    assert delta("thinkscale_prefills_total") == 2
    assert delta("thinkscale_prefill_tokens_total") == out.usage.prompt_tokens * 2
    assert delta("thinkscale_decode_steps_total") >= out.usage.completion_tokens / 2
    assert delta("thinkscale_generated_tokens_total") >= out.usage.completion_tokens
    assert delta("thinkscale_time_to_first_token_seconds_count") == 1
    assert delta("thinkscale_request_seconds_count", endpoint=chat_path) == 3
    for gauge in ("thinkscale_queue_requests", "thinkscale_running_rows", "thinkscale_batch_occupancy"):
        assert after[(gauge, ())] == 0  # nothing in flight between requests
    assert after[("thinkscale_decoded_rows_total", ())] >= 3


def test_logprobs_are_the_chosen_candidates(server, model):
    _, rm, tok = model
    question = "First we add the numbers."
    out = chat(server.client(), question, reasoning_effort="low", seed=5, logprobs=True, top_logprobs=3)
    _, chosen = offline(model, question, k=2, seed=5)
    eos = tok.eos_token_id
    expected = [t for t in chosen[0].token_ids if t != eos]
    content = out.choices[0].logprobs.content
    assert [tok.decode([t]) for t in expected] == [c.token for c in content]
    assert [c.logprob for c in content] == chosen[0].token_logprobs[:len(expected)]
    for c in content:
        assert len(c.top_logprobs) == 3 and c.bytes == list(c.token.encode("utf-8"))
        values = [t.logprob for t in c.top_logprobs]
        assert values == sorted(values, reverse=True) and c.logprob <= values[0] + 1e-4
    # streamed: the same object, whole, with the choice's last chunk (k = 1 and best of 2)
    for effort, k in (("none", 1), ("low", 2)):
        whole = chat(server.client(), question, reasoning_effort=effort, seed=6, logprobs=True, top_logprobs=2)
        chunks = list(chat(server.client(), question, reasoning_effort=effort, seed=6, logprobs=True, top_logprobs=2,
                           stream=True))
        streamed = [c for chunk in chunks for choice in chunk.choices if choice.logprobs for c in choice.logprobs.content]
        assert [(c.token, c.logprob) for c in streamed] == [(c.token, c.logprob) for c in whole.choices[0].logprobs.content]
        assert [[t.token for t in c.top_logprobs] for c in streamed] == \
            [[t.token for t in c.top_logprobs] for c in whole.choices[0].logprobs.content]
    # searched: the chosen candidate of the offline search, with its top tokens
    from thinkscale.reflect.search import SearchConfig, search

    searched = chat(server.client(), question, reasoning_effort="medium", seed=7, logprobs=True, top_logprobs=2,
                    extra_body={"search": "beam:width=2"})
    result = search(rm, tok, [rm.format_prompt(question, tok)], SearchConfig.parse("beam:width=2", 8),
                    max_new_tokens=MAX_TOKENS, seed=7, top_logprobs=2)[0]
    best = select(result.complete, "sprm", think_end="</think>")
    expected = [t for t in best.token_ids if t != eos]
    content = searched.choices[0].logprobs.content
    assert [c.logprob for c in content] == best.token_logprobs[:len(expected)]
    assert [[t.logprob for t in c.top_logprobs] for c in content] == [lps for _, lps in best.extra["top_logprobs"][:len(expected)]]
    # greedy: each token is its position's most likely one
    greedy = chat(server.client(), question, reasoning_effort="none", temperature=0, logprobs=True, top_logprobs=1)
    assert all(c.token == c.top_logprobs[0].token for c in greedy.choices[0].logprobs.content)
    # legacy completions: tokens, their log-probs, the top tokens as a dict, offsets into the text
    done = server.client().completions.create(model=NAME, prompt=rm.format_prompt(question, tok), max_tokens=8,
                                              logprobs=2, seed=5, extra_body={"reasoning_effort": "none"})
    lp = done.choices[0].logprobs
    assert "".join(lp.tokens) == done.choices[0].text and len(lp.token_logprobs) == len(lp.tokens)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert all(len(top) == 2 for top in lp.top_logprobs)
