"""`kiln chat [ENGINE_DIR]`: an interactive conversation in the terminal, tokens streamed."""

from __future__ import annotations

import argparse
import sys

from kiln.cli.main import add_engine_options, add_sampling_options, engine_options, sampling_params
from kiln.errors import RequestError


def register(sub) -> None:
    p = sub.add_parser("chat", help="chat with a model in the terminal",
                       description="Interactive chat. Type a message and press Enter; "
                                   "/reset starts over, /exit (or Ctrl-D) quits.")
    p.add_argument("engine_dir", nargs="?", default="default",
                   help="engine directory (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--system", help="system message")
    add_sampling_options(p, max_tokens=512)
    add_engine_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kiln.llm import LLM

    params = sampling_params(args)
    print("loading engine...", file=sys.stderr, flush=True)
    llm = LLM(args.engine_dir, **engine_options(args))
    base = [{"role": "system", "content": args.system}] if args.system else []
    history = list(base)
    interactive = sys.stdin.isatty()
    print(f"kiln chat on {llm.engine_dir.name}; /reset to start over, /exit to quit.",
          file=sys.stderr, flush=True)
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        line = line.strip()
        if not line:
            continue
        if line == "/exit":
            break
        if line == "/reset":
            history = list(base)
            continue
        history.append({"role": "user", "content": line})
        text = llm.tokenizer.apply_chat_template(history)
        ids = llm.tokenizer.encode(text, add_special_tokens=False)
        try:
            llm.add_request(ids, params)
        except RequestError as e:
            print(f"kiln: {e} (use /reset)", file=sys.stderr)
            history.pop()
            continue
        sys.stdout.write("assistant> " if interactive else "")
        reply = []
        for d in llm.stream():
            reply.append(d.text)
            sys.stdout.write(d.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(reply)})
    return 0
