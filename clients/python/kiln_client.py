#!/usr/bin/env python3
"""A small streaming client for `kiln serve`, built only from the stubs that grpcio-tools
generates from `proto/kiln/v1/kiln.proto` (see README.md).

    python kiln_client.py --addr 127.0.0.1:50051 "Once upon a time"
    python kiln_client.py --chat --temperature 0.7 --seed 1 "Name three rivers."
"""

import argparse
import sys

import grpc

from kiln.v1 import kiln_pb2, kiln_pb2_grpc


class Client:
    """One channel to a kiln server."""

    def __init__(self, target, max_send_bytes=-1):
        self.channel = grpc.insecure_channel(
            target, options=[("grpc.max_send_message_length", max_send_bytes)]
        )
        self.stub = kiln_pb2_grpc.GeneratorStub(self.channel)

    def generate(self, text="", token_ids=(), messages=(), max_tokens=None, timeout=None,
                 stop=(), ignore_eos=False, logprobs=False, top_logprobs=0, echo=False, speculative=None,
                 response_format=None, **sampling):
        """Starts a generation; returns the call: iterate it for GenerateResponse messages,
        call .cancel() to stop it. `sampling` takes SamplingParameters' fields; `speculative`
        SpeculativeParameters' (e.g. {"enabled": True, "drafter": "prompt_lookup"});
        `response_format` a kiln_pb2.ResponseFormat (constrained JSON output)."""
        request = kiln_pb2.GenerateRequest(
            text=text,
            token_ids=list(token_ids),
            messages=[kiln_pb2.ChatMessage(role=r, content=c) for r, c in messages],
            sampling=kiln_pb2.SamplingParameters(**sampling),
            stop=list(stop),
            ignore_eos=ignore_eos,
            logprobs=logprobs,
            top_logprobs=top_logprobs,
            echo=echo,
        )
        if speculative is not None:
            request.speculative.CopyFrom(kiln_pb2.SpeculativeParameters(**speculative))
        if response_format is not None:
            request.response_format.CopyFrom(response_format)
        if max_tokens is not None:
            request.max_tokens = max_tokens
        return self.stub.Generate(request, timeout=timeout)

    def complete(self, **kwargs):
        """Runs a generation to its end: (text, token ids, the Finished message)."""
        text, ids, finished = [], [], None
        for msg in self.generate(**kwargs):
            text.append(msg.text)
            ids.extend(t.id for t in msg.tokens)
            if msg.HasField("finished"):
                finished = msg.finished
        return "".join(text), ids, finished

    def model_info(self):
        return self.stub.ModelInfo(kiln_pb2.ModelInfoRequest())

    def tokenize(self, text, add_special_tokens=False):
        return self.stub.Tokenize(kiln_pb2.TokenizeRequest(text=text, add_special_tokens=add_special_tokens))

    def detokenize(self, token_ids, skip_special_tokens=True):
        return self.stub.Detokenize(
            kiln_pb2.DetokenizeRequest(token_ids=token_ids, skip_special_tokens=skip_special_tokens)
        )

    def close(self):
        self.channel.close()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt")
    p.add_argument("--addr", default="127.0.0.1:50051")
    p.add_argument("--chat", action="store_true", help="send the prompt as a user chat message")
    p.add_argument("-n", "--max-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    p.add_argument("--speculative", choices=["model", "prompt_lookup"], default=None,
                   help="speculative decoding with this drafter")
    a = p.parse_args()
    sampling = {k: v for k, v in [("temperature", a.temperature), ("top_p", a.top_p), ("seed", a.seed)] if v is not None}
    client = Client(a.addr)
    source = {"messages": [("user", a.prompt)]} if a.chat else {"text": a.prompt}
    speculative = {"enabled": True, "drafter": a.speculative} if a.speculative else None
    try:
        for msg in client.generate(max_tokens=a.max_tokens, timeout=a.timeout, speculative=speculative,
                                   **source, **sampling):
            sys.stdout.write(msg.text)
            sys.stdout.flush()
            if msg.HasField("finished"):
                f, reason = msg.finished, kiln_pb2.FinishReason.Name(msg.finished.reason)
                print(
                    f"\n[{reason}: {f.usage.prompt_tokens} prompt + {f.usage.completion_tokens} tokens, "
                    f"TTFT {f.timings.time_to_first_token_seconds * 1e3:.0f} ms, "
                    f"{f.timings.decode_tokens_per_second:.1f} tokens/s]",
                    file=sys.stderr,
                )
                if f.HasField("speculative"):
                    x = f.speculative
                    print(f"[speculative: {x.accepted_tokens} of {x.drafted_tokens} drafts accepted, "
                          f"{x.tokens_per_step:.2f} tokens per step]", file=sys.stderr)
    except grpc.RpcError as e:
        print(f"\nerror: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
