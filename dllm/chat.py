"""`dllm chat`: an interactive conversation on a terminal. Each turn sends the whole conversation through the
checkpoint's chat template, and the reply streams as blocks become final.

Keys: Ctrl-C during a reply cancels that reply (the turn is forgotten, the conversation goes on); Ctrl-C at the
prompt discards the line; Ctrl-D or /exit leaves; /reset starts a new conversation (the --system message stays).
A turn the model refuses (the conversation no longer fits its context) prints the one-line error and is dropped.
"""
from __future__ import annotations

import signal
import sys

from dllm.errors import DllmError

HELP = "dllm chat: type a message; /reset starts a new conversation, Ctrl-C cancels a reply, /exit or Ctrl-D leaves."


class Chat:
    """The conversation: its messages and one turn at a time through `llm.stream_chat`."""

    def __init__(self, llm, params, system: str | None = None):
        self.llm, self.params, self.system = llm, params, system
        self.messages = self._start()

    def _start(self) -> list[dict]:
        return [{"role": "system", "content": self.system}] if self.system else []

    def reset(self) -> str:
        self.messages = self._start()
        return "[new conversation" + (": the system message is kept]" if self.system else "]")

    def turn(self, text: str):
        """Stream the reply to `text`, writing it to stdout; return its RequestOutput, or None when cancelled."""
        conversation = self.messages + [{"role": "user", "content": text}]
        reply = None
        try:
            for event in self.llm.stream_chat(conversation, self.params):
                sys.stdout.write(event.delta_text)
                sys.stdout.flush()
                reply = event.output or reply
        except KeyboardInterrupt:   # the reply, not the session: the turn is dropped from the conversation
            print()
            return None
        print()
        self.messages = conversation + [{"role": "assistant", "content": reply.text}]
        return reply


def stats(reply) -> str:
    m = reply.metrics
    line = f"[{m.num_tokens} tokens, {m.nfe} forwards, {m.tokens_per_second:.1f} tokens/s]"
    if not reply.text.strip():
        line += (" [the reply is empty: the model stopped at once; /reset starts a new conversation (the bundled zoo "
                 "models were trained on one question per conversation)]")
    return line


def run(llm, params, system: str | None = None) -> None:
    """The read-reply loop on stdin/stdout (status lines on stderr)."""
    chat = Chat(llm, params, system)
    # Ctrl-C is one of chat's keys, so it must raise KeyboardInterrupt even when this process was started with SIGINT
    # ignored (a non-interactive shell's background job inherits SIG_IGN, and Python then leaves it ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    print(HELP, file=sys.stderr)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            print(file=sys.stderr)
            return
        except KeyboardInterrupt:
            print("\n[line discarded; /exit or Ctrl-D leaves]", file=sys.stderr)
            continue
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            print(chat.reset(), file=sys.stderr)
        elif line:
            try:
                reply = chat.turn(line)
            except DllmError as exc:   # e.g. the conversation outgrew the context: this turn fails, not the session
                print(f"error: {exc}", file=sys.stderr)
                continue
            print("[cancelled]" if reply is None else stats(reply), file=sys.stderr)
