#!/usr/bin/env python3
"""Checks the OpenAI-compatible HTTP API of a running `kiln serve --http-addr` with the
official `openai` package, raw HTTP (the SSE framing and every error status), and the gRPC
service of the same process for comparison.

Usage: test_openai.py HTTP_URL GRPC_ADDR METRICS_URL EXPECTED_JSON
EXPECTED_JSON: {"model": name, "prompts": [{"prompt", "ids", "max_tokens", "text",
"token_ids"}], "chat": {"content", "max_tokens", "text", "token_ids"}}: `kiln generate`'s
greedy output for each. Run by tests/serve.rs with a server at --accuracy-level 1 (exact f32
products, so a batched row equals the same request alone), stubs on PYTHONPATH.
"""

import http.client
import json
import sys
import threading
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai

from kiln.v1 import kiln_pb2
from kiln_client import Client


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    print(f"ok: {what}")


def metrics(url):
    out = {}
    for line in urllib.request.urlopen(url, timeout=5).read().decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def wait_metric(url, name, value, seconds=20.0):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if metrics(url)[name] == value:
            return True
        time.sleep(0.05)
    return False


class Raw:
    """Plain HTTP/1.1 requests (http.client), to see statuses, headers and bytes as sent."""

    def __init__(self, base):
        u = urllib.parse.urlsplit(base)
        self.host, self.port = u.hostname, u.port

    def request(self, method, path, body=None, headers=None):
        conn = http.client.HTTPConnection(self.host, self.port, timeout=120)
        if isinstance(body, (dict, list)):
            body = json.dumps(body)
        conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        r = conn.getresponse()
        data = r.read()
        conn.close()
        return r.status, dict(r.getheaders()), data

    def error(self, path, body, status, param=None, what=""):
        got, headers, data = self.request("POST", path, body)
        err = json.loads(data).get("error", {})
        check(
            got == status and err.get("message") and err.get("type") and err.get("param") == param,
            f"{what or str(body)[:60]} -> {status} param={param} ({err.get('message')})",
        )
        return err


def grpc_run(client, **kwargs):
    """A gRPC generation to its end: text, token ids, per-token (logprob, top) and finished."""
    text, ids, lps, finished = [], [], [], None
    for msg in client.generate(**kwargs):
        text.append(msg.text)
        for t in msg.tokens:
            ids.append(t.id)
            lps.append((t.logprob, [(x.id, x.logprob) for x in t.top_logprobs]))
        if msg.HasField("finished"):
            finished = msg.finished
    return "".join(text), ids, lps, finished


def close(a, b, tol=1e-4):
    return abs(a - b) <= tol


def main(http_url, grpc_addr, metrics_url, expected_path):
    expected = json.load(open(expected_path))
    model = expected["model"]
    api = openai.OpenAI(base_url=http_url + "/v1", api_key="unused", max_retries=0, timeout=300)
    raw = Raw(http_url)
    grpc = Client(grpc_addr)
    detok = lambda ids: [grpc.detokenize([i], skip_special_tokens=False).text for i in ids]

    # Models.
    listed = api.models.list().data
    check([m.id for m in listed] == [model] and listed[0].owned_by == "kiln", f"GET /v1/models lists {model}")
    check(api.models.retrieve(model).id == model, "GET /v1/models/{model}")

    # Greedy completions equal `kiln generate` and the gRPC service, token for token.
    for case in expected["prompts"]:
        want, n = case["text"], case["max_tokens"]
        r = api.completions.create(model=model, prompt=case["prompt"], max_tokens=n, temperature=0, logprobs=2)
        c = r.choices[0]
        check(c.text == want, f"completion of {case['prompt'][:24]!r} equals kiln generate")
        check(c.logprobs.tokens == detok(case["token_ids"]), "  its tokens are kiln generate's")
        check(
            r.usage.completion_tokens == len(case["token_ids"])
            and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens,
            f"  usage {r.usage.prompt_tokens}+{r.usage.completion_tokens}",
        )
        reason = "length" if len(case["token_ids"]) == n else "stop"
        check(c.finish_reason == reason, f"  finish_reason {reason}")
        text, ids, lps, _ = grpc_run(grpc, text=case["prompt"], max_tokens=n, logprobs=True, top_logprobs=2)
        check(ids == case["token_ids"] and text == want, "  gRPC gives the same tokens")
        check(
            all(close(a, b[0]) for a, b in zip(c.logprobs.token_logprobs, lps))
            and len(c.logprobs.token_logprobs) == len(lps),
            "  logprobs equal gRPC's",
        )
        tops = [sorted(t.values(), reverse=True) for t in c.logprobs.top_logprobs]
        check(
            all(all(close(x, y[1]) for x, y in zip(t, b[1])) for t, b in zip(tops, lps)),
            "  top_logprobs equal gRPC's",
        )
        # Streamed: the same text in pieces, then the finish chunk, then usage.
        chunks = list(
            api.completions.create(
                model=model, prompt=case["prompt"], max_tokens=n, temperature=0, stream=True,
                stream_options={"include_usage": True},
            )
        )
        pieces = [ch.choices[0].text for ch in chunks if ch.choices]
        finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
        check("".join(pieces) == want and len(pieces) > 2, f"  streamed in {len(pieces)} chunks, same text")
        check(finish == [reason], "  one finish chunk")
        check(
            chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(case["token_ids"])
            and all(ch.usage is None for ch in chunks[:-1]),
            "  include_usage: usage in the final chunk only",
        )

    # A token-id prompt is the same prompt.
    case = expected["prompts"][0]
    r = api.completions.create(model=model, prompt=case["ids"], max_tokens=case["max_tokens"], temperature=0)
    check(r.choices[0].text == case["text"], "a token-id prompt gives the same completion")
    r = api.completions.create(model=model, prompt=case["prompt"], max_tokens=4, temperature=0, echo=True)
    check(r.choices[0].text.startswith(case["prompt"]) and len(r.choices[0].text) > len(case["prompt"]), "echo")

    # Chat: through the chat template, equal to `kiln generate --chat` and gRPC messages.
    chat = expected["chat"]
    messages = [{"role": "user", "content": chat["content"]}]
    r = api.chat.completions.create(
        model=model, messages=messages, max_tokens=chat["max_tokens"], temperature=0, logprobs=True, top_logprobs=3
    )
    m = r.choices[0]
    check(m.message.role == "assistant" and m.message.content == chat["text"], "chat equals kiln generate --chat")
    check([t.token for t in m.logprobs.content] == detok(chat["token_ids"]), "  its tokens are kiln generate's")
    text, ids, lps, _ = grpc_run(
        grpc, messages=[("user", chat["content"])], max_tokens=chat["max_tokens"], logprobs=True, top_logprobs=3
    )
    check(ids == chat["token_ids"], "  gRPC messages give the same tokens")
    check(
        all(close(t.logprob, b[0]) and [x.token for x in t.top_logprobs] == detok([i for i, _ in b[1]])
            and all(close(x.logprob, y[1]) for x, y in zip(t.top_logprobs, b[1]))
            for t, b in zip(m.logprobs.content, lps)),
        "  logprobs and top_logprobs equal gRPC's",
    )
    chunks = list(
        api.chat.completions.create(
            model=model, messages=messages, max_completion_tokens=chat["max_tokens"], temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )
    check(chunks[0].choices[0].delta.role == "assistant", "streamed chat starts with the role")
    content = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    check(content == chat["text"], "streamed chat (max_completion_tokens) has the same text")
    check(chunks[-1].usage.completion_tokens == len(chat["token_ids"]), "  usage in the final chunk")

    # Stop strings end the output and are not in it, whole or streamed.
    case = expected["prompts"][0]
    stop = case["text"][len(case["text"]) // 2:][:6]
    cut = case["text"][: case["text"].index(stop)]
    r = api.completions.create(model=model, prompt=case["prompt"], max_tokens=48, temperature=0, stop=[stop, "@@@"])
    check(r.choices[0].text == cut and r.choices[0].finish_reason == "stop", f"stop {stop!r} ends it, not leaked")
    streamed = "".join(
        ch.choices[0].text
        for ch in api.completions.create(
            model=model, prompt=case["prompt"], max_tokens=48, temperature=0, stop=stop, stream=True
        )
        if ch.choices
    )
    check(streamed == cut, "  streamed, the stop string is not leaked either")

    # A seed reproduces a sampled output; another seed gives another one.
    sample = lambda seed: api.chat.completions.create(
        model=model, messages=messages, max_tokens=32, temperature=1.0, top_p=0.95, seed=seed
    ).choices[0].message.content
    a, b, c = sample(1234), sample(1234), sample(99)
    check(a == b and a != c, "seed reproduces a sampled output")
    # OpenAI's default temperature is 1: without one, the output is sampled.
    outs = {api.completions.create(model=model, prompt="Once upon a time", max_tokens=16).choices[0].text
            for _ in range(4)}
    check(len(outs) > 1, "no temperature: sampled at 1, as OpenAI does")

    # Constrained output: 20 samples at temperature 1 parse and validate.
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 24},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "role": {"enum": ["admin", "user", "guest"]},
            "score": {"type": "number"},
            "active": {"type": "boolean"},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
            "address": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 20}, "zip": {"type": "string", "maxLength": 8}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
        "required": ["name", "age", "role", "score", "active", "tags", "address"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}
    ask = [{"role": "user", "content": "Describe a user of our website as JSON."}]

    def constrained(seed):
        r = api.chat.completions.create(
            model=model, messages=ask, max_tokens=300, temperature=1.0, seed=seed, response_format=fmt
        )
        return r.choices[0]

    with ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(constrained, range(20)))
    valid = 0
    for o in outs:
        doc = json.loads(o.message.content)
        jsonschema.validate(doc, schema)
        valid += o.finish_reason == "stop"
    check(valid == 20, "20 json_schema samples at temperature 1.0 parse, validate and end with stop")
    check(len({o.message.content for o in outs}) > 10, "  and differ from each other")
    r = api.chat.completions.create(
        model=model, messages=ask, max_tokens=200, temperature=1.0, seed=5, response_format={"type": "json_object"}
    )
    check(isinstance(json.loads(r.choices[0].message.content), dict), "json_object output is a JSON object")
    _, _, _, f = grpc_run(
        grpc, messages=[("user", "A user as JSON.")], max_tokens=300,
        response_format=kiln_pb2.ResponseFormat(json_schema=json.dumps(schema)), temperature=1.0, seed=3,
    )
    check(f.reason == kiln_pb2.FINISH_REASON_EOS, "gRPC response_format ends at the JSON's end")

    # Raw SSE framing: text/event-stream, `data: {json}` events, `data: [DONE]` last.
    status, headers, data = raw.request(
        "POST", "/v1/chat/completions",
        {"model": model, "messages": messages, "max_tokens": 8, "temperature": 0, "stream": True},
    )
    events = data.decode().split("\n\n")
    check(status == 200 and headers.get("content-type", "").startswith("text/event-stream"), "SSE content type")
    check(events[-1] == "" and events[-2] == "data: [DONE]", "the stream ends with data: [DONE]")
    payloads = [e for e in events[:-2] if not e.startswith(":")]
    check(all(e.startswith("data: ") and "\n" not in e for e in payloads), "every event is one data line")
    parsed = [json.loads(e[6:]) for e in payloads]
    check(all(p["object"] == "chat.completion.chunk" and p["id"] == parsed[0]["id"] for p in parsed), "chunk objects")

    # Errors: OpenAI's error object, the status, and the field as `param`.
    chat_body = lambda **kw: {"model": model, "messages": messages, "max_tokens": 4, **kw}
    comp_body = lambda **kw: {"model": model, "prompt": "Hello", "max_tokens": 4, **kw}
    status, _, data = raw.request("POST", "/v1/chat/completions", '{"model": "x", "messages": [')
    check(status == 400 and "not valid JSON" in json.loads(data)["error"]["message"], "malformed JSON -> 400")
    status, _, data = raw.request("POST", "/v1/completions", '{"prompt": "a", "temperature": NaN}')
    check(status == 400 and json.loads(data)["error"]["type"] == "invalid_request_error", "NaN literal -> 400")
    status, _, data = raw.request("POST", "/v1/completions", "[1, 2]")
    check(status == 400, "a body that is not an object -> 400")
    big = json.dumps({"model": model, "prompt": "a" * (100 << 20)})
    status, _, data = raw.request("POST", "/v1/completions", big)
    check(status == 413 and json.loads(data)["error"]["code"] == "request_too_large", "a 100 MB body -> 413")
    raw.error("/v1/completions", comp_body(max_tokens="ten"), 400, "max_tokens")
    raw.error("/v1/completions", comp_body(max_tokens=-5), 400, "max_tokens")
    raw.error("/v1/completions", comp_body(max_tokens=0), 400, "max_tokens")
    raw.error("/v1/chat/completions", chat_body(max_completion_tokens=10**9), 400, "max_completion_tokens")
    raw.error("/v1/completions", comp_body(temperature="NaN"), 400, "temperature")
    raw.error("/v1/completions", comp_body(temperature=-1), 400, "temperature")
    raw.error("/v1/completions", comp_body(top_p=1.5), 400, "top_p")
    raw.error("/v1/completions", comp_body(prompt=""), 400, "prompt")
    raw.error("/v1/completions", comp_body(prompt=[10**12]), 400, "prompt")
    raw.error("/v1/completions", comp_body(stop=[3]), 400, "stop")
    raw.error("/v1/chat/completions", chat_body(messages=[]), 400, "messages")
    raw.error("/v1/chat/completions", chat_body(messages=[{"role": "wizard", "content": "hi"}]), 400, "messages")
    raw.error("/v1/chat/completions", chat_body(messages="hi"), 400, "messages")
    raw.error("/v1/chat/completions", chat_body(n=2), 400, "n")
    raw.error("/v1/completions", comp_body(best_of=3), 400, "best_of")
    raw.error("/v1/completions", comp_body(suffix="!"), 400, "suffix")
    tool = {"type": "function", "function": {"name": "f", "parameters": {}}}
    raw.error("/v1/chat/completions", chat_body(tools=[tool]), 400, "tools")
    raw.error("/v1/chat/completions", chat_body(logit_bias={"5": 10}), 400, "logit_bias")
    raw.error("/v1/chat/completions", chat_body(frobnicate=1), 400, "frobnicate")
    raw.error("/v1/chat/completions", chat_body(stream_options={"include_usage": True}), 400, "stream_options")
    raw.error("/v1/chat/completions", chat_body(top_k=-1), 400, "top_k")
    raw.error("/v1/chat/completions", chat_body(speculative={"drafter": "oracle"}), 400, "speculative")
    unsupported = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}}}
    err = raw.error("/v1/chat/completions", chat_body(response_format=unsupported), 400, "response_format")
    check("uniqueItems" in err["message"], "  an unsupported schema keyword is named")
    raw.error("/v1/chat/completions", chat_body(response_format={"type": "yaml"}), 400, "response_format")
    raw.error(
        "/v1/chat/completions", chat_body(response_format={"type": "json_object"}, ignore_eos=True), 400, "ignore_eos"
    )
    status, _, data = raw.request("POST", "/v1/chat/completions", chat_body(model="gpt-4o"))
    err = json.loads(data)["error"]
    check(status == 404 and err["code"] == "model_not_found" and err["param"] == "model", "unknown model -> 404")
    status, _, data = raw.request("GET", "/v1/models/gpt-4o")
    check(status == 404, "GET of an unknown model -> 404")
    status, _, data = raw.request("GET", "/v1/engines")
    check(status == 404 and "error" in json.loads(data), "unknown path -> 404 error object")
    status, _, _ = raw.request("GET", "/v1/chat/completions")
    check(status == 405, "GET on a POST path -> 405")
    try:
        api.chat.completions.create(model=model, messages=messages, n=3)
        check(False, "the SDK raises on n=3")
    except openai.BadRequestError as e:
        check(e.status_code == 400 and e.body["param"] == "n", "the SDK sees a BadRequestError naming n")
    status, _, data = raw.request("POST", "/v1/chat/completions", chat_body(user="u-1", metadata={"k": "v"}))
    check(status == 200, "bookkeeping fields (user, metadata) are accepted")

    # 16 streaming HTTP clients and 16 gRPC clients at once: each output equals it alone.
    prompts = ["Once upon a time", "The capital of France is", "def fibonacci(n):", "Water boils at",
               "My favourite food is", "In 1905, Einstein", "The best way to learn", "Dear diary,"]
    jobs = [(p, 12 + 3 * i) for i, p in enumerate(prompts)] * 2

    def http_stream(job):
        p, n = job
        s = api.completions.create(model=model, prompt=p, max_tokens=n, temperature=0, stream=True)
        return "".join(ch.choices[0].text for ch in s if ch.choices)

    def grpc_stream(job):
        p, n = job
        return grpc_run(Client(grpc_addr), text=p, max_tokens=n)[0]

    alone = {job: http_stream(job) for job in jobs[:8]}
    with ThreadPoolExecutor(32) as pool:
        h = [pool.submit(http_stream, j) for j in jobs]
        g = [pool.submit(grpc_stream, j) for j in jobs]
        together = [(j, f.result()) for j, f in zip(jobs + jobs, h + g)]
    check(all(alone[j] == t for j, t in together), "16 HTTP + 16 gRPC streams at once each equal it alone")

    # 30 clients that go away mid-stream leave no sequence behind.
    before = metrics(metrics_url)
    cancelled_key = 'kiln_requests_total{protocol="http",finish_reason="cancelled"}'

    def disconnect(i):
        conn = http.client.HTTPConnection(raw.host, raw.port, timeout=120)
        body = {"model": model, "prompt": f"Story {i}:", "max_tokens": 1500, "ignore_eos": True, "stream": True}
        conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        r.fp.readline()  # The first event line: the request is admitted (or queued) and streaming.
        conn.sock.close()
        conn.close()

    with ThreadPoolExecutor(30) as pool:
        list(pool.map(disconnect, range(30)))
    check(wait_metric(metrics_url, "kiln_active_sequences", 0) and metrics(metrics_url)["kiln_queued_requests"] == 0,
          "30 disconnected streams leave kiln_active_sequences at 0")
    after = metrics(metrics_url)
    check(after[cancelled_key] - before[cancelled_key] == 30, "  and count as 30 cancelled HTTP requests")
    http_done = sum(v for k, v in after.items() if k.startswith('kiln_requests_total{protocol="http"'))
    grpc_done = sum(v for k, v in after.items() if k.startswith('kiln_requests_total{protocol="grpc"'))
    check(http_done > 50 and grpc_done > 16, f"metrics count both protocols ({http_done:.0f} HTTP, {grpc_done:.0f} gRPC)")
    check(after['kiln_requests_rejected_total{protocol="http"}'] >= 25, "  HTTP refusals are counted")
    print("all checks passed")


if __name__ == "__main__":
    main(*sys.argv[1:])
