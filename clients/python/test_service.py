#!/usr/bin/env python3
"""Checks a running `kiln serve` from Python with stubs generated from proto/ alone.

Usage: test_service.py ADDR METRICS_URL EXPECTED_JSON
EXPECTED_JSON: {"prompt": ..., "max_tokens": N, "text": the CLI's greedy output}.
Run by tests/serve.rs, which starts the server and generates the stubs onto PYTHONPATH.
"""

import json
import sys
import time
import urllib.request

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kiln.v1 import kiln_pb2
from kiln_client import Client


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    print(f"ok: {what}")


def metric(url, name):
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} missing from {url}")


def wait_idle(client, seconds=10.0):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if client.model_info().active_sequences == 0:
            return True
        time.sleep(0.02)
    return False


def main(addr, metrics_url, expected_path):
    expected = json.load(open(expected_path))
    client = Client(addr)

    health = health_pb2_grpc.HealthStub(client.channel)
    for service in ["", "kiln.v1.Generator"]:
        status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
        check(status == health_pb2.HealthCheckResponse.SERVING, f"health of {service!r} is SERVING")

    # Streaming: the greedy text arrives in pieces and adds up to the CLI's output.
    call = client.generate(text=expected["prompt"], max_tokens=expected["max_tokens"])
    text, ids, finished, messages = [], [], None, 0
    for msg in call:
        messages += 1
        text.append(msg.text)
        ids.extend(t.id for t in msg.tokens)
        if msg.HasField("finished"):
            finished = msg.finished
    check(messages > 1, f"the text came in {messages} messages")
    check("".join(text) == expected["text"], "the streamed text equals `kiln generate`'s greedy output")
    check(finished is not None and len(ids) == finished.usage.completion_tokens, "token ids match the usage count")
    check(finished.timings.time_to_first_token_seconds > 0, "timings are reported")

    # The first delta arrives while the sequence still runs (2000 tokens cannot be done by
    # then on any machine), and cancellation from Python frees the slot.
    cancelled_before = metric(metrics_url, 'kiln_requests_total{protocol="grpc",finish_reason="cancelled"}')
    call = client.generate(text="Tell me a long story.", max_tokens=2000, ignore_eos=True)
    running_at_first = None
    for i, msg in enumerate(call):
        if running_at_first is None and msg.text:
            running_at_first = client.model_info().active_sequences
        if i == 3:
            break
    check(running_at_first == 1, "the first text delta arrived while the request was still generating")
    check(client.model_info().active_sequences == 1, "the long request holds a slot")
    call.cancel()
    check(wait_idle(client), "after cancel() the slot is free (ModelInfo.active_sequences == 0)")
    check(metric(metrics_url, "kiln_kv_slots_in_use") == 0, "metrics show no KV slot in use")
    check(
        metric(metrics_url, 'kiln_requests_total{protocol="grpc",finish_reason="cancelled"}') == cancelled_before + 1,
        "metrics count the cancelled request",
    )

    # A bad parameter is INVALID_ARGUMENT naming the field.
    try:
        client.complete(text="x", top_p=1.5)
        check(False, "top_p = 1.5 is refused")
    except grpc.RpcError as e:
        check(e.code() == grpc.StatusCode.INVALID_ARGUMENT, f"top_p = 1.5 gives INVALID_ARGUMENT ({e.details()})")
        check(e.details().startswith("sampling.top_p"), "the message names sampling.top_p")

    # Speculative decoding by prompt lookup: the same greedy text, with its figures.
    text, _, finished = client.complete(text=expected["prompt"], max_tokens=expected["max_tokens"],
                                        speculative={"enabled": True, "drafter": "prompt_lookup", "draft_tokens": 4})
    check(text == expected["text"], "speculative (prompt lookup) greedy text equals the plain one")
    check(finished.speculative.steps > 0, f"speculative figures are reported ({finished.speculative.tokens_per_step:.2f} tokens per step)")
    check(metric(metrics_url, "kiln_speculative_steps_total") == finished.speculative.steps,
          "metrics count the speculative steps")

    info = client.model_info()
    check(info.context_length > 0 and info.vocab_size > 0 and info.execution_provider == "cpu", "ModelInfo answers")
    ids = client.tokenize("Hello world").token_ids
    check(client.detokenize(ids).text == "Hello world", "tokenize and detokenize round-trip")
    client.close()
    print("all checks passed")


if __name__ == "__main__":
    main(*sys.argv[1:])
