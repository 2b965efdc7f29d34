"""The router's OpenAI-compatible HTTP API, driven by the official `openai` Python package.

Run by `tests/tests/openai_sdk.rs`, which starts the cluster and sets:
  TESSERA_BASE_URL   the router's HTTP API, e.g. http://127.0.0.1:8080/v1
  TESSERA_API_KEY    a key from the router's --api-key-file
  TESSERA_MODEL      the served model id
  TESSERA_DEAD_URL   the /v1 URL of a router with no reachable worker (for 503)
  TESSERA_MAX_IN_FLIGHT, TESSERA_MAX_BODY_BYTES  the router's limits (for 429 and 413)
Every client is made with max_retries=0 so each error reaches the test as the SDK raises it.
"""

import json
import os
import time
import urllib.request

import openai
import pydantic
import pytest

BASE = os.environ["TESSERA_BASE_URL"]
KEY = os.environ["TESSERA_API_KEY"]
MODEL = os.environ["TESSERA_MODEL"]
DEAD = os.environ["TESSERA_DEAD_URL"]
MAX_IN_FLIGHT = int(os.environ["TESSERA_MAX_IN_FLIGHT"])
MAX_BODY = int(os.environ["TESSERA_MAX_BODY_BYTES"])


@pytest.fixture(scope="module")
def client():
    return openai.OpenAI(base_url=BASE, api_key=KEY, max_retries=0, timeout=120)


def user(text):
    return [{"role": "user", "content": text}]


def http_post(path, body):
    """POSTs JSON to the router's HTTP port (outside /v1) and returns the decoded reply."""
    root = BASE.rsplit("/v1", 1)[0]
    req = urllib.request.Request(root + path, data=json.dumps(body).encode(), method="POST")
    req.add_header("Content-Type", "application/json")
    req.add_header("Authorization", f"Bearer {KEY}")
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def metric(name):
    root = BASE.rsplit("/v1", 1)[0]
    with urllib.request.urlopen(root + "/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
    return 0.0


def test_models_list_and_retrieve(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_streamed_text_equals_unary_text_at_temperature_0(client):
    messages = user("Write one sentence about the sea.")
    whole = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=24)
    choice = whole.choices[0]
    assert whole.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length") and choice.message.content

    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=messages,
            temperature=0,
            max_tokens=24,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [choice.finish_reason]
    # include_usage: a last chunk with no choices carries the usage; the others have none.
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_content_parts_developer_role_and_stop_sequences(client):
    plain = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": "Be brief."}] + user("Describe the sea in two sentences."),
        temperature=0,
        max_tokens=40,
    )
    parts = client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
            {"role": "user", "content": [{"type": "text", "text": "Describe the sea "}, {"type": "text", "text": "in two sentences."}]},
        ],
        temperature=0,
        max_tokens=40,
    )
    # Text parts are joined, and developer is the system role: the same prompt, the same answer.
    assert parts.usage.prompt_tokens == plain.usage.prompt_tokens
    assert parts.choices[0].message.content == plain.choices[0].message.content
    text = plain.choices[0].message.content
    assert "." in text, text
    stopped = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": "Be brief."}] + user("Describe the sea in two sentences."),
        temperature=0,
        max_tokens=40,
        stop=["."],
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == text.split(".")[0]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}],
        )


def test_usage_counts_equal_the_tokenizers(client):
    messages = [{"role": "system", "content": "You answer briefly."}] + user("Name three colours.")
    counted = http_post("/tokenize", {"model": MODEL, "messages": messages})
    r = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=10, logprobs=True)
    assert r.usage.prompt_tokens == counted["count"] == len(counted["tokens"])
    assert r.usage.completion_tokens == len(r.choices[0].logprobs.content)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    text = http_post("/tokenize", {"model": MODEL, "prompt": "Hello, world!"})
    assert text["count"] == len(text["tokens"]) > 0


def test_a_repeated_long_prompt_is_served_from_the_prefix_cache(client):
    system = "You are the support assistant of a cluster scheduler. " * 30
    messages = [{"role": "system", "content": system}] + user("How do I drain a node?")
    first = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=4)
    second = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=4)
    assert first.usage.prompt_tokens > 300
    assert second.usage.prompt_tokens_details.cached_tokens > 0
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 32


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}


def test_tool_call_round_trip(client):
    messages = user("What is the weather in Paris?")
    r = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=0,
        max_tokens=120,
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.id and call.function.name == "get_weather"
    args = json.loads(call.function.arguments)
    assert isinstance(args["city"], str) and set(args) == {"city"}

    # The tool's answer goes back; the model answers in text.
    messages.append(choice.message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature_c": 21})})
    final = client.chat.completions.create(
        model=MODEL, messages=messages, tools=[WEATHER_TOOL], tool_choice="none", temperature=0, max_tokens=16
    )
    assert final.choices[0].message.content and not final.choices[0].message.tool_calls
    assert final.choices[0].finish_reason in ("stop", "length")


def test_required_tool_choice_streams_the_call_as_a_delta(client):
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=user("Weather in Oslo?"),
            tools=[WEATHER_TOOL],
            tool_choice="required",
            parallel_tool_calls=False,
            temperature=0,
            max_tokens=120,
            stream=True,
        )
    )
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].index == 0 and calls[0].id
    assert calls[0].function.name == "get_weather"
    assert "city" in json.loads(calls[0].function.arguments)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


class Person(pydantic.BaseModel):
    name: str
    age: int


def test_json_schema_output_parses_into_the_schema(client):
    parse = getattr(client.chat.completions, "parse", None) or client.beta.chat.completions.parse
    r = parse(
        model=MODEL,
        messages=user("Give me a person as JSON."),
        response_format=Person,
        temperature=0,
        max_tokens=60,
    )
    person = r.choices[0].message.parsed
    assert isinstance(person, Person)
    # json_object mode: the output is held to a JSON object from its first character (this
    # model nests objects for a long time, so only the start is checked here; the worker's
    # structured-output tests cover complete objects).
    r = client.chat.completions.create(
        model=MODEL,
        messages=user("Say hello."),
        response_format={"type": "json_object"},
        temperature=0,
        max_tokens=8,
    )
    assert r.choices[0].message.content.lstrip().startswith("{"), r.choices[0].message.content


def test_n_samples_with_a_seed_are_reproducible(client):
    def sample():
        r = client.chat.completions.create(
            model=MODEL, messages=user("Tell me a story."), n=3, seed=1234, temperature=1.0, max_tokens=12
        )
        assert [c.index for c in r.choices] == [0, 1, 2]
        assert 0 < r.usage.completion_tokens <= 3 * 12
        return [c.message.content for c in r.choices]

    first = sample()
    assert first == sample()
    assert len(set(first)) > 1, f"three samples at temperature 1 were identical: {first}"


def test_logprobs_and_top_logprobs(client):
    r = client.chat.completions.create(
        model=MODEL, messages=user("Count to five."), temperature=0, max_tokens=8, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        # Greedy: the chosen token is the most likely one.
        assert t.top_logprobs[0].logprob == pytest.approx(t.logprob, abs=1e-4)
        assert t.bytes == list(t.token.encode())


def test_completions_api(client):
    r = client.completions.create(model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=6)
    assert r.object == "text_completion" and r.choices[0].text
    echoed = client.completions.create(
        model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=6, echo=True
    )
    assert echoed.choices[0].text == "The capital of France is" + r.choices[0].text

    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=6, stream=True
        )
    )
    assert streamed == r.choices[0].text

    many = client.completions.create(model=MODEL, prompt=["One", "Two"], n=2, temperature=0, max_tokens=3)
    assert sorted(c.index for c in many.choices) == [0, 1, 2, 3]

    tokens = http_post("/tokenize", {"model": MODEL, "prompt": "The capital of France is"})["tokens"]
    by_ids = client.completions.create(model=MODEL, prompt=tokens, temperature=0, max_tokens=6)
    assert by_ids.choices[0].text == r.choices[0].text

    lp = client.completions.create(model=MODEL, prompt="Hello", temperature=0, max_tokens=4, logprobs=2)
    assert len(lp.choices[0].logprobs.tokens) == 4
    assert all(len(alts) == 2 for alts in lp.choices[0].logprobs.top_logprobs)


def test_vllm_sampling_extensions(client):
    messages = user("Tell me a story.")
    greedy = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=12)
    # top_k=1 leaves one candidate, so any seed at temperature 1 gives the greedy text.
    top1 = client.chat.completions.create(
        model=MODEL, messages=messages, temperature=1.0, seed=7, max_tokens=12, extra_body={"top_k": 1}
    )
    assert top1.choices[0].message.content == greedy.choices[0].message.content
    # ignore_eos runs to max_tokens whatever the model would say.
    long = client.completions.create(
        model=MODEL, prompt="Hi", temperature=0, max_tokens=40, extra_body={"ignore_eos": True}
    )
    assert long.usage.completion_tokens == 40 and long.choices[0].finish_reason == "length"
    # A stop token id ends the text at the first greedy token.
    first_id = http_post("/tokenize", {"model": MODEL, "prompt": greedy.choices[0].message.content})["tokens"][0]
    stopped = client.chat.completions.create(
        model=MODEL, messages=messages, temperature=0, max_tokens=12, extra_body={"stop_token_ids": [first_id]}
    )
    assert stopped.choices[0].finish_reason == "stop" and stopped.usage.completion_tokens <= 1
    for bad, param in [({"top_k": -2}, "top_k"), ({"min_p": 1.5}, "min_p"), ({"min_tokens": 9}, "min_tokens")]:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, extra_body=bad)
        assert param in (e.value.body.get("param") or ""), e.value.body


def test_bad_requests_raise_bad_request_error(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=user("Hi"), temperature=5)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=user("Hi"), extra_body={"best_of_everything": 1})
    assert "best_of_everything" in e.value.message
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "robot", "content": "beep"}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model=MODEL,
            messages=user("Hi"),
            tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "no-such-type"}}}],
        )
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=user("Hi"), max_tokens=10_000_000)


def test_auth_errors_raise_authentication_error():
    bad = openai.OpenAI(base_url=BASE, api_key="not-the-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    req = urllib.request.Request(BASE + "/models")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 401


def test_unknown_model_raises_not_found_error(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-model", messages=user("Hi"))
    assert e.value.status_code == 404


def test_an_oversized_body_gets_413(client):
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model=MODEL, messages=user("x" * (MAX_BODY + 1)))
    assert e.value.status_code == 413
    assert e.value.body["code"] == "request_too_large"


def test_no_healthy_worker_raises_internal_server_error():
    dead = openai.OpenAI(base_url=DEAD, api_key=KEY, max_retries=0)
    with pytest.raises(openai.InternalServerError) as e:
        dead.chat.completions.create(model=MODEL, messages=user("Hi"))
    assert e.value.status_code == 503


CANCELLED = 'tessera_router_requests_total{code="Cancelled",method="openai.ChatCompletions"}'


def test_overload_raises_rate_limit_error_and_a_disconnect_aborts_the_request(client):
    cancelled_before = metric(CANCELLED)
    # Fill every in-flight slot with long streams that are opened but not read.
    streams = [
        client.chat.completions.create(
            model=MODEL,
            messages=user(f"Story {i}"),
            max_tokens=1000,
            stream=True,
            # Without it a story can end (and free its slot) before the extra request is sent.
            extra_body={"ignore_eos": True},
        )
        for i in range(MAX_IN_FLIGHT)
    ]
    try:
        with pytest.raises(openai.RateLimitError) as e:
            client.chat.completions.create(model=MODEL, messages=user("One more"), max_tokens=4)
        assert e.value.response.headers.get("retry-after") == "1"
    finally:
        for s in streams:
            s.close()
    # Closing the streams cancels their requests on the workers, promptly.
    deadline = time.time() + 10
    while time.time() < deadline:
        cancelled = metric(CANCELLED)
        if cancelled - cancelled_before >= MAX_IN_FLIGHT:
            break
        time.sleep(0.1)
    assert cancelled - cancelled_before >= MAX_IN_FLIGHT
    # And the slots are free again.
    r = client.chat.completions.create(model=MODEL, messages=user("Hi"), max_tokens=2)
    assert r.choices[0].message.content is not None
