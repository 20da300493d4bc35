"""`moonlet chat CHECKPOINT`: an interactive chat through the tokenizer's chat template.

/reset clears the history, /exit (or Ctrl-D) quits; Ctrl-C stops the reply being generated.
"""

from __future__ import annotations

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
        sched = eng.scheduler(max_batch=1)
        try:
            rid = sched.add(ids, params)
        except ValueError as e:  # the conversation outgrew the context
            history.pop()
            print(f"error: {e}; /reset to start over", file=sys.stderr)
            continue
        reply = []
        sys.stdout.write("assistant> ")
        try:
            while sched.has_work():
                for ev in sched.step():
                    reply.append(ev.text_delta)
                    sys.stdout.write(ev.text_delta)
                    sys.stdout.flush()
        except KeyboardInterrupt:
            sched.abort(rid)
            sys.stdout.write(" [stopped]")
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(reply)})
