"""`pmod chat`: LLaVA's interactive chat about one image, keeping the conversation's cache between turns."""
from __future__ import annotations

import sys
from pathlib import Path

from pmod.tools import answer as _answer
from pmod.tools.answer import ContextError, add_model_args, load, messages

__all__ = ["add_parser", "cmd_chat"]


def _open_image(path: str):
    """The image at `path`, decoded (PIL), or ValueError / FileNotFoundError naming the problem."""
    from pmod.multimodal.images import load_image

    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"no image file at {p}")
    return load_image(p)


def cmd_chat(args) -> int:
    """LLaVA's chat: one image per conversation (`--image`, or `/image PATH`, which starts a new conversation).
    The conversation keeps its cache (pmod.conversation): a turn prefills only its new text; /reset drops it."""
    from pmod.conversation import Conversation

    model, processor = load(args)
    conversation = Conversation(model, processor)
    image = _open_image(args.image) if args.image else None
    history: list[dict[str, str]] = []
    say = lambda s: print(s, file=sys.stderr, flush=True)
    say("pmod chat — /image PATH starts a new conversation about that image, /reset starts one without, /quit exits")
    if image is not None:
        say(f"(a conversation about {args.image})")
    while True:
        try:
            line = input("USER: ").strip()
        except (EOFError, KeyboardInterrupt):  # Ctrl-D / Ctrl-C at the prompt: leave quietly
            print(file=sys.stderr)
            return 0
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            history, image = [], None
            conversation.reset()
            say("(new conversation, no image)")
            continue
        if line == "/image" or line.startswith("/image "):
            path = line[len("/image"):].strip()
            try:
                if not path:
                    raise ValueError("usage: /image PATH")
                new = _open_image(path)
            except (OSError, ValueError) as e:
                say(f"error: {e}; the conversation goes on as it was")
                continue
            history, image = [], new
            conversation.reset()
            say(f"(new conversation about {path}: one image per conversation, as in LLaVA's chat)")
            continue
        if line.startswith("/"):
            say(f"unknown command {line.split()[0]}: /image PATH, /reset or /quit")
            continue
        history.append({"role": "user", "content": line})
        print("ASSISTANT: ", end="", flush=True)
        try:
            answer, summary = _answer.answer(model, processor, messages(args, history), [image] if image else [], args,
                                      conversation=conversation)
        except ContextError as e:
            print()
            say(f"error: {e}; /reset starts a new conversation")
            history.pop()
            continue
        except ValueError as e:  # a template that cannot render this turn, ...: say so, keep the session
            print()
            say(f"error: {e}")
            history.pop()
            continue
        print(summary, file=sys.stderr)
        history.append({"role": "assistant", "content": answer})


def add_parser(sub) -> None:
    """Register `pmod chat`."""
    p = sub.add_parser("chat", help="interactive multi-turn chat about one image (LLaVA's CLI)")
    add_model_args(p)
    p.add_argument("--image", help="the conversation's image (/image PATH in the session starts a new one)")
    p.set_defaults(fn=cmd_chat)
