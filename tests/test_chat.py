"""`dllm chat` through the real entry point under a pseudo-terminal, as a person types: a second turn is answered
from the whole conversation (the same text as `LLM.chat` on that history), /reset confirms, and Ctrl-C cancels the
reply in progress while the session goes on."""
from __future__ import annotations

import os
import pty
import select
import shutil
import signal
import subprocess
import sys
import time

import pytest

from dllm import LLM, SamplingParams


class Terminal:
    """A process on a pseudo-terminal: type lines, send Ctrl-C, read what it printed (stdout and stderr)."""

    def __init__(self, args: list[str]):
        exe = shutil.which("dllm")
        cmd = [exe, *args] if exe else [sys.executable, "-m", "dllm.cli", *args]
        self.master, slave = pty.openpty()
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True)
        os.close(slave)
        self.text, self.pos = "", 0   # everything printed; how far read_until has consumed it

    def read_until(self, needle: str, timeout: float = 120) -> str:
        """What was printed from the last read point up to and including the next `needle` (waiting for it)."""
        deadline = time.time() + timeout
        while needle not in self.text[self.pos:]:
            if time.time() > deadline or self.proc.poll() is not None and not self._ready(0.2):
                raise AssertionError(f"{needle!r} not printed; got {self.text[self.pos:]!r}")
            if self._ready(0.1):
                self.text += self._read()
        end = self.text.index(needle, self.pos) + len(needle)
        segment, self.pos = self.text[self.pos:end], end
        return segment

    def _read(self) -> str:
        try:
            return os.read(self.master, 65536).decode(errors="replace").replace("\r", "")   # the terminal's \r\n
        except OSError:   # EIO: the process closed the terminal (it exited)
            return ""

    def _ready(self, timeout: float) -> bool:
        try:
            return bool(select.select([self.master], [], [], timeout)[0])
        except OSError:
            return False

    def type(self, line: str) -> None:
        os.write(self.master, (line + "\n").encode())

    def wait_for_output(self, timeout: float = 120) -> None:
        """Wait until something is printed past the last read point."""
        deadline = time.time() + timeout
        while len(self.text) == self.pos and time.time() < deadline:
            if self._ready(0.1):
                self.text += self._read()
        assert len(self.text) > self.pos, "nothing printed"

    def say(self, line: str) -> str:
        """Type `line` and return what is printed up to the next prompt."""
        self.type(line)
        return self.read_until("\n> ")

    def ctrl_c(self) -> None:
        os.killpg(self.proc.pid, signal.SIGINT)   # what the terminal does for the foreground job on Ctrl-C

    def close(self) -> int:
        try:
            return self.proc.wait(timeout=60)
        finally:
            os.close(self.master)


@pytest.fixture
def chat(tiny_llada):
    terminals = []

    def start(*options):
        t = Terminal(["chat", "--model", str(tiny_llada), "--device", "cpu", "--strategy", "reference", *options])
        terminals.append(t)
        t.read_until("> ")
        return t

    yield start
    for t in terminals:
        if t.proc.poll() is None:
            t.proc.kill()
            t.close()


def test_second_turn_answers_from_the_whole_conversation(chat, tiny_llada):
    params = SamplingParams(max_tokens=8, block_length=4)
    t = chat("--max-tokens", "8", "--block-length", "4")
    llm = LLM(str(tiny_llada), strategy="reference", device="cpu")
    first = llm.chat([{"role": "user", "content": "hello"}], params)[0].text
    history = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": first},
               {"role": "user", "content": "and then?"}]
    second = llm.chat(history, params)[0].text
    assert second != llm.chat(history[-1:], params)[0].text   # the history changes the answer
    assert first in t.say("hello")
    assert second in t.say("and then?")
    assert "[new conversation]" in t.say("/reset")
    assert llm.chat(history[-1:], params)[0].text in t.say("and then?")   # a fresh conversation: a first turn
    t.type("/exit")
    assert t.close() == 0


def test_ctrl_c_cancels_the_reply_not_the_session(chat):
    t = chat("--max-tokens", "400", "--block-length", "8", "--system", "be brief")   # hundreds of steps: time to interrupt
    assert "exceeds the model's context of 512 tokens" in t.say("x" * 200)       # a refused turn: the session goes on
    t.type("tell me a long story")
    t.read_until("tell me a long story\n")                      # the terminal's echo
    # The random model's reply is bytes that never form valid UTF-8, so the stream holds its text back to the end:
    # printed output cannot show that decoding is under way. Its ~300 one-token steps take seconds on any CPU, so
    # 0.3 s after the echo the reply is being decoded.
    time.sleep(0.3)
    t.ctrl_c()
    reply = t.read_until("\n> ")
    assert "[cancelled]" in reply and "forwards" not in reply     # cancelled, not finished
    assert "[new conversation: the system message is kept]" in t.say("/reset")
    t.ctrl_c()                                                    # at the prompt: the line is discarded, no exit
    assert "[line discarded; /exit or Ctrl-D leaves]" in t.read_until("\n> ")
    assert t.proc.poll() is None
    os.write(t.master, b"\x04")                                   # Ctrl-D leaves
    assert t.close() == 0
