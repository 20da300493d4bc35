"""`moonlet chat CHECKPOINT`: an interactive chat through the tokenizer's chat template.

/reset clears the history, /exit (or Ctrl-D) quits; Ctrl-C stops the reply being generated.
"""

from __future__ import annotations

import contextlib
import sys

from .generate import add_sampling_args, load_engine, sampling_params


def register(subparsers) -> None:
    p = subparsers.add_parser("chat", help="interactive chat with a checkpoint (/reset, /exit)",
                              description=__doc__)
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint dir or training run dir (newest checkpoint)")
    p.add_argument("--system", help="system message")
    add_sampling_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    eng = load_engine(args)
    tok = eng.tokenizer
    if tok is None:
        raise ValueError(f"{args.checkpoint} has no tokenizer.json; chat needs a tokenizer with a chat template")
    if getattr(tok, "chat_template", None) is None:
        raise ValueError(f"the tokenizer of {args.checkpoint} has no chat template")
    params = sampling_params(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    print("moonlet chat: /reset clears the history, /exit quits, Ctrl-C stops a reply", file=sys.stderr)
    while True:
        try:
            line = input("you> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        cmd = line.strip()
        if cmd in ("/exit", "/quit"):
            return 0
        if cmd == "/reset":
            history = []
            print("(history cleared)", file=sys.stderr)
            continue
        if not cmd:
            continue
        history.append({"role": "user", "content": line})
        ids = tok.apply_chat_template(system + history, add_generation_prompt=True)
        reply: list[str] = []
        # Engine.stream admits the request at the first next(): a conversation that outgrew the context
        # raises ValueError there, before any token. closing() frees its scheduler and KV cache at once
        # when Ctrl-C leaves the loop early (the stream has no explicit abort).
        try:
            with contextlib.closing(eng.stream(ids, params)) as events:
                for ev in events:
                    if not reply:
                        sys.stdout.write("assistant> ")
                    reply.append(ev.text_delta)
                    sys.stdout.write(ev.text_delta)
                    sys.stdout.flush()
        except ValueError as e:
            if reply:
                raise
            history.pop()
            print(f"error: {e}; /reset to start over", file=sys.stderr)
            continue
        except KeyboardInterrupt:
            sys.stdout.write(("" if reply else "assistant> ") + " [stopped]")
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(reply)})
