"""A run directory: `config.json` (the setting, written once), `samples.jsonl` (the records) and the summary files
the runner writes; a directory only ever holds records of one setting (see `runner.py`)."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from dllm.errors import DllmError


class EvalError(DllmError):
    """A bad evaluation input: unknown task, missing data file, impossible sampling setting, a run directory that
    holds another setting."""


class RunStore:
    """A run directory: `config.json` (the setting, written once) and `samples.jsonl` (records, appended a batch
    at a time with one write, flushed and synced). Every record line ends with a newline, so a kill mid-write
    leaves whole lines and at most one unterminated tail, which is dropped when the directory is reopened."""

    OUTPUTS = ("config.json", "samples.jsonl", "summary.json", "report.md")

    def __init__(self, path: Path, setting: dict, overwrite: bool = False):
        self.path, self.samples = path, path / "samples.jsonl"
        path.mkdir(parents=True, exist_ok=True)
        if overwrite:
            for name in self.OUTPUTS:
                (path / name).unlink(missing_ok=True)
        self._claim(setting)
        self.records = self._read()
        self.done = {(r["doc_id"], r["sample"]) for r in self.records}
        self._prompts = {r["prompt_sha1"] for r in self.records if "prompt" in r}

    def _claim(self, setting: dict) -> None:
        config = self.path / "config.json"
        if not config.is_file():
            config.write_text(json.dumps(setting, indent=1, sort_keys=True) + "\n")
            return
        try:
            saved = json.loads(config.read_text())
        except json.JSONDecodeError:
            raise EvalError(f"{config} is not valid JSON; delete the directory or pass --overwrite") from None
        if saved != setting:
            raise EvalError(f"{self.path} holds a run with another setting ({_differences(saved, setting)}); "
                            "choose another --output directory or pass --overwrite to replace it")

    def _read(self) -> list[dict]:
        if not self.samples.is_file():
            return []
        data = self.samples.read_bytes()
        complete, newline, tail = data.rpartition(b"\n")
        if tail:  # an unterminated last line: the write of a batch was cut short
            with open(self.samples, "r+b") as f:
                f.truncate(len(complete) + len(newline))
        records = []
        for number, line in enumerate(complete.split(b"\n") if complete else [], start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise EvalError(f"{self.samples} line {number} is not valid JSON; delete that line or pass --overwrite") from None
        return records

    def append(self, records: list[dict]) -> None:
        with open(self.samples, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
            f.flush()
            os.fsync(f.fileno())
        self.records += records
        self.done |= {(r["doc_id"], r["sample"]) for r in records}

    def prompt_fields(self, prompt: str) -> dict:
        """`prompt_sha1`, plus the prompt text the first time this directory's records see it."""
        digest = hashlib.sha1(prompt.encode()).hexdigest()[:16]
        if digest in self._prompts:
            return {"prompt_sha1": digest}
        self._prompts.add(digest)
        return {"prompt_sha1": digest, "prompt": prompt}

    def accuracy(self) -> float:
        scored = [r for r in self.records if not r.get("skipped")]
        return sum(bool(r["correct"]) for r in scored) / len(scored) if scored else 0.0

    def discard(self) -> None:
        """Remove the directory this store created (a refused run: config.json and nothing decoded)."""
        for name in self.OUTPUTS:
            (self.path / name).unlink(missing_ok=True)
        if self.path.is_dir() and not any(self.path.iterdir()):
            self.path.rmdir()

    def previous_environment(self) -> dict:
        summary = self.path / "summary.json"
        try:
            return json.loads(summary.read_text()).get("environment", {}) if summary.is_file() else {}
        except json.JSONDecodeError:
            return {}


def _differences(saved: dict, new: dict, prefix: str = "") -> str:
    keys = sorted(set(saved) | set(new))
    parts = []
    for k in keys:
        a, b = saved.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            inner = _differences(a, b, f"{prefix}{k}.")
            parts += [inner] if inner else []
        elif a != b:
            parts.append(f"{prefix}{k} {a!r} there, {b!r} now")
    return "; ".join(parts)
