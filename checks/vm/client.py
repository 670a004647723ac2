"""The official `openai` client against llmhop, for the VM checks: one call per run, JSON out.

    client.py [--base-url URL] [--token T] chat MODEL [--prompt P] [--stream] [--hold]
    client.py [--base-url URL] [--token T] models
    client.py [--base-url URL] [--token T] error MODEL    the API error a chat call meets

`--hold` asks a fake engine (fake_engine.py) to hold the stream after its first token until it
is released. Exit status 1 when the call fails (for `error`: when it does not).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import openai


def chat(client: openai.OpenAI, args: argparse.Namespace) -> dict[str, Any]:
    messages: Any = [{"role": "user", "content": args.prompt}]
    extra_body = {"fake_hold": True} if args.hold else None
    if not args.stream:
        reply = client.chat.completions.create(
            model=args.model, messages=messages, extra_body=extra_body
        )
        choice = reply.choices[0]
        return {
            "model": reply.model,
            "content": choice.message.content,
            "finish_reason": choice.finish_reason,
        }
    content, chunks, model, finish = "", 0, None, None
    for event in client.chat.completions.create(
        model=args.model, messages=messages, stream=True, extra_body=extra_body
    ):
        chunks += 1
        model = event.model
        for streamed in event.choices:
            content += streamed.delta.content or ""
            finish = streamed.finish_reason or finish
    return {"model": model, "content": content, "chunks": chunks, "finish_reason": finish}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="llmhop-vm-client")
    parser.add_argument("--base-url", default="http://127.0.0.1:8080/v1")
    parser.add_argument("--token", default="no-token")
    commands = parser.add_subparsers(dest="command", required=True)
    chat_parser = commands.add_parser("chat")
    chat_parser.add_argument("model")
    chat_parser.add_argument("--prompt", default="hello")
    chat_parser.add_argument("--stream", action="store_true")
    chat_parser.add_argument("--hold", action="store_true")
    commands.add_parser("models")
    commands.add_parser("error").add_argument("model")
    args = parser.parse_args(argv)

    # No retries: a failure must show, not be papered over.
    client = openai.OpenAI(base_url=args.base_url, api_key=args.token, max_retries=0, timeout=180)
    if args.command == "models":
        result: dict[str, Any] = {"ids": [model.id for model in client.models.list()]}
    elif args.command == "chat":
        result = chat(client, args)
    else:
        try:
            client.chat.completions.create(
                model=args.model, messages=[{"role": "user", "content": "hello"}]
            )
        except openai.APIStatusError as exc:
            print(json.dumps({"status": exc.status_code, "code": exc.code, "body": exc.body}))
            return 0
        print("llmhop-vm-client: the call succeeded", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
