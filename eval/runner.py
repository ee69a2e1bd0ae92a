"""The evaluation runner: one setting (model, task, cache, strategy, sampling options) over a task's docs, through
the public `LLM` API, into an output directory that makes the run resumable.

    summary = evaluate("arith", model="tiny-llada", limit=16, strategy="threshold",
                       sampling=SamplingParams(max_tokens=128, threshold=0.9), output_dir="runs/arith")
    print(summary.metrics["accuracy"], summary.metrics["throughput"])

The output directory holds `config.json` (the setting), `samples.jsonl` (one record per generated sample, written
as soon as its batch is scored), `summary.json` and `report.md` (recomputed over every record at the end of each
call). Calling again with the same setting skips the (doc_id, sample) pairs already recorded (and says how many)
and appends the rest; a half-written last line (a kill mid-write) is dropped. Another setting in the same directory
is refused unless `overwrite=True`. The setting is compared in canonical form (`canonical.py`: defaults written
out), so spelling a default does not make another run. A document whose prompt the model cannot take (longer
than its context with `max_tokens`) is recorded as skipped with the reason and left out of the metrics, which
count it (`num_skipped`); when no prompt fits, the run is refused. A refused run leaves no directory behind. `limit` is not part of the setting: a larger limit extends a run, and the summary covers
the docs the call selects. The runner knows tasks only through the `EvalTask` interface (`harness_tasks.py`) and
the model only through `LLM.generate` / `LLM.chat`; metric definitions live in `metrics.py`, rendering in
`report.py`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import time
import uuid
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from dllm.errors import DllmError, InvalidParameterError
from dllm.sampling_params import SamplingParams
from dllm.zoo import DEFAULT_MODEL
from dllm.eval import metrics, report
from dllm.eval.store import EvalError, RunStore

SCORING_THREADS = 8


@dataclass
class EvalConfig:
    """The setting of a run: everything that changes its outputs or its speed. Saved as `config.json`; a run
    directory only ever holds records of one setting."""

    task: str
    model: str = DEFAULT_MODEL
    task_options: dict = field(default_factory=dict)   # get_eval_task options: data_file, num_fewshot, ...
    chat: bool | None = None                           # None: the task's default
    num_samples: int = 1                               # samples per doc (pass@k); > 1 needs temperature > 0
    batch_size: int = 32                               # samples per engine batch
    cache: str = "auto"                                # "auto": the family's default (dllm/defaults.py)
    strategy: str = "auto"
    cache_options: dict = field(default_factory=dict)      # LLM(cache_options=...)
    strategy_options: dict = field(default_factory=dict)   # LLM(strategy_options=...), e.g. a guide model
    sampling: dict = field(default_factory=dict)       # SamplingParams fields other than their defaults, no seed
    seed: int = 0                                      # sample j of doc d is decoded with sample_seed(seed, d, j)
    device: str = "auto"
    dtype: str = "auto"
    revision: str | None = None
    trust_remote_code: bool = False
    tensor_parallel_size: int = 1                      # engine settings: they change the speed, not the tokens
    enforce_eager: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.sampling, SamplingParams):
            self.sampling = sampling_dict(self.sampling) if self.sampling.seed is None else {"seed": self.sampling.seed}
        if "seed" in self.sampling:
            raise EvalError("give the run's seed as seed=N, not in the sampling options: every sample gets its own "
                            "seed derived from it")
        unknown = sorted(set(self.sampling) - set(SamplingParams.__dataclass_fields__))
        if unknown:
            raise EvalError(f"unknown sampling option {unknown[0]!r}; use SamplingParams fields")
        for name, low in (("num_samples", 1), ("batch_size", 1), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise EvalError(f"{name} must be an integer >= {low}, got {value!r}")
        self.params()  # SamplingParams validates its fields now, not at the first batch

    def params(self) -> SamplingParams:
        return SamplingParams(**self.sampling)

    def setting(self) -> dict:
        """JSON-normal form (what `config.json` holds and what resuming compares); engine settings at their
        defaults are left out, so runs recorded before they existed still resume."""
        fields = dataclasses.asdict(self)
        for name in _ENGINE_DEFAULTS:
            if fields[name] == _ENGINE_DEFAULTS[name]:
                del fields[name]
        return json.loads(json.dumps(fields, sort_keys=True))


_ENGINE_DEFAULTS = {"tensor_parallel_size": 1, "enforce_eager": False}


@dataclass
class Summary:
    """What a run measured: its setting, where and with what it ran, and the metrics (see `metrics.py`)."""

    setting: dict
    environment: dict
    metrics: dict
    primary_metric: str
    limit: int | None
    output_dir: str
    skipped: list = field(default_factory=list)        # {doc_id, sample, reason} of prompts the model cannot take
    definitions: dict = field(default_factory=lambda: dict(metrics.DEFINITIONS))

    @property
    def primary(self) -> float | None:
        return self.metrics.get(self.primary_metric)


def sampling_dict(params: SamplingParams) -> dict:
    """The fields of `params` that differ from SamplingParams' defaults, without the seed (the runner seeds
    every sample itself)."""
    defaults = dataclasses.asdict(SamplingParams())
    return {k: v for k, v in dataclasses.asdict(params).items() if k != "seed" and v != defaults[k]}


def sample_seed(seed: int, doc_id: str, sample: int) -> int:
    """The seed of one sample: a function of the run seed, the doc and the sample index only, so a resumed or
    re-batched run decodes every sample exactly as before."""
    return (seed * 1_000_003 + zlib.crc32(f"{doc_id}#{sample}".encode())) % 2 ** 31


def truncate(text: str, stops: list[str]) -> tuple[str, bool]:
    """`text` cut before the first occurrence of any stop string, and whether it was cut."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def default_output_dir(config: EvalConfig) -> Path:
    """runs/eval/<model>-<task>-<hash of the canonical setting>: the same command resumes (however its defaults are
    spelled), another setting gets its own."""
    digest = hashlib.sha1(json.dumps(resolved(config).setting(), sort_keys=True).encode()).hexdigest()[:8]
    return Path("runs") / "eval" / f"{Path(config.model).name}-{config.task}-{digest}"


def load_task(config: EvalConfig):
    """The task, its data read (before any model loads). The task layer raises DllmErrors for unknown names,
    options and missing data; a bad option value it did not foresee becomes one line too."""
    from dllm.eval.harness_tasks import get_eval_task
    try:
        return get_eval_task(config.task, **config.task_options)
    except DllmError:
        raise
    except (ValueError, TypeError, OSError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise EvalError(f"task {config.task!r} with options {config.task_options}: {reason}") from None


def resolved(config: EvalConfig, task=None) -> EvalConfig:
    """`config` in canonical form (see `canonical.py`); a setting the runtime cannot run is an EvalError here."""
    from dllm.eval.canonical import canonical
    return canonical(config, task or load_task(config))


def llm_options(config: EvalConfig) -> dict:
    """The `LLM` arguments of `config`: settings with equal options can share one LLM."""
    return {"model": config.model, "cache": config.cache, "strategy": config.strategy, "dtype": config.dtype,
            "device": config.device, "revision": config.revision, "trust_remote_code": config.trust_remote_code,
            "max_batch_size": config.batch_size, "cache_options": config.cache_options,
            "strategy_options": config.strategy_options, "tensor_parallel_size": config.tensor_parallel_size,
            "enforce_eager": config.enforce_eager}


def build_llm(config: EvalConfig):
    from dllm.api import LLM
    return LLM(**llm_options(config))


def evaluate(task: str, model: str = DEFAULT_MODEL, *, output_dir: str | Path | None = None, limit: int | None = None,
             overwrite: bool = False, progress: bool = True, warmup: bool = True, **setting) -> Summary:
    """Evaluate `model` on `task`; `setting` holds the other `EvalConfig` fields (`sampling` may be a
    SamplingParams). The output directory defaults to `default_output_dir`."""
    config = EvalConfig(task=task, model=str(model), **setting)
    return run(config, output_dir or default_output_dir(config), limit=limit, overwrite=overwrite,
               progress=progress, warmup=warmup)


def run(config: EvalConfig, output_dir: str | Path, *, limit: int | None = None, overwrite: bool = False,
        progress: bool = True, warmup: bool = True, label: str = "eval",
        llm_factory: Callable[[EvalConfig], object] = build_llm, data_parallel_size: int = 1) -> Summary:
    """Run (or resume) `config` into `output_dir`; see the module docstring. `label` names the progress bar;
    `llm_factory` builds the LLM (only when something is left to decode); `data_parallel_size` > 1 decodes on
    that many engine processes (`data_parallel.py`) into the same records."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise EvalError(f"limit must be a positive integer, got {limit!r}")
    if isinstance(data_parallel_size, bool) or not isinstance(data_parallel_size, int) or data_parallel_size < 1:
        raise EvalError(f"data_parallel_size must be a positive integer, got {data_parallel_size!r}")
    start = time.perf_counter()
    task = load_task(config)
    config = resolved(config, task)
    path = Path(output_dir)
    existed = path.exists()
    store = RunStore(path, config.setting(), overwrite=overwrite)
    units = [(doc, j) for doc in task.docs(limit=limit) for j in range(config.num_samples)]
    pending = [(doc, j) for doc, j in units if (doc.doc_id, j) not in store.done]
    if len(pending) < len(units):
        report.notice(f"resuming {path}: {len(units) - len(pending)} of {len(units)} samples already recorded, "
                      f"{len(pending)} to decode")
    try:
        environment = _decode(config, task, store, pending, len(units), start, llm_factory, progress, warmup, label,
                              data_parallel_size)
    except DllmError:
        if not existed:
            store.discard()   # a refused setting leaves nothing behind
        raise
    summary = _summary(config, task, store, units, environment, limit, path)
    report.write_run(summary, path)
    return summary


def _decode(config, task, store, pending, total, start, llm_factory, progress, warmup, label,
            data_parallel_size=1) -> dict:
    if not pending:
        return store.previous_environment()
    if data_parallel_size > 1:
        from dllm.eval import data_parallel
        return data_parallel.decode(config, task, store, pending, total, data_parallel_size, progress, warmup, label)
    session = _Session(config, task, store, llm_factory(config), start)
    return session.run(pending, total=total, progress=progress, warmup=warmup, label=label)


def _summary(config: EvalConfig, task, store: RunStore, units: list, environment: dict, limit, path: Path) -> Summary:
    selected = {(doc.doc_id, j) for doc, j in units}
    records = [r for r in store.records if (r["doc_id"], r["sample"]) in selected]
    scored = [r for r in records if not r.get("skipped")]
    skipped = [{"doc_id": r["doc_id"], "sample": r["sample"], "reason": r["reason"]} for r in records if r.get("skipped")]
    task_metrics = task.aggregate(scored) if scored else {}
    measured = {**metrics.summarize(scored, task_metrics), "num_skipped": len(skipped)} if scored else {"num_skipped": len(skipped)}
    if getattr(task, "uses_sandbox", False):  # which isolation layer held the generated programs
        from dllm.eval.sandbox import isolation
        environment = {**environment, "sandbox": isolation()}
    return Summary(config.setting(), environment, measured, task.primary_metric, limit, str(path), skipped=skipped)


class _Session:
    """One call's generation: batches of pending samples through the LLM, each batch scored and appended."""

    def __init__(self, config: EvalConfig, task, store: RunStore, llm, start: float):
        self.config, self.task, self.store, self.llm = config, task, store, llm
        self.id, self.start, self.num_batches = uuid.uuid4().hex[:8], start, 0
        self.params = config.params()
        temperature = self.params.temperature
        if temperature is None:
            temperature = llm.spec.defaults.get("temperature") or 0.0
        if config.num_samples > 1 and temperature == 0:
            raise EvalError(f"num_samples {config.num_samples} needs temperature > 0 (at temperature 0 every sample "
                            "is the same); pass --temperature, e.g. 0.8")
        self.stops = list(task.stop_sequences(config.chat))
        self.device = llm.engine.device
        if self.device.type == "cuda":
            import torch
            torch.cuda.reset_peak_memory_stats(self.device)

    def run(self, pending: list, total: int, progress: bool, warmup: bool, label: str) -> dict:
        pending, skipped = self._fitting(pending)
        if skipped:
            self.store.append(skipped)
            report.notice(f"skipped {len(skipped)} sample(s) whose prompt does not fit, e.g. {skipped[0]['doc_id']}: "
                          f"{skipped[0]['reason']} (listed in summary.json)")
        bar = report.Progress(total=total, done=total - len(pending), enabled=progress, desc=label)
        if warmup and pending:  # the first batch would otherwise pay for lazy initialisation (kernels, allocator)
            self._generate(pending[:1])
        total_tokens, total_seconds = 0, 0.0
        for i in range(0, len(pending), self.config.batch_size):
            batch = pending[i:i + self.config.batch_size]
            outputs, seconds = self._generate(batch)
            self.store.append(self._records(batch, outputs, seconds))
            total_tokens += sum(o.metrics.num_tokens for o in outputs)
            total_seconds += seconds
            bar.update(len(batch), accuracy=self.store.accuracy(), tokens_per_second=total_tokens / total_seconds)
        bar.close()
        return self.environment()

    def _fitting(self, pending: list) -> tuple[list, list[dict]]:
        """(the units whose prompt the model can take, skip records of the others). Nothing fitting is an error."""
        fits, skipped = [], []
        for doc, j in pending:
            try:
                self.llm.check_prompt(self.task.prompt(doc, self.config.chat), self.params)
                fits.append((doc, j))
            except InvalidParameterError as exc:
                reason = f"{exc}{getattr(self.task, 'fit_hint', '')}"
                skipped.append({"doc_id": doc.doc_id, "sample": j, "skipped": True, "reason": reason,
                                "correct": False, "session": self.id, "time": time.time()})
        if skipped and not fits:
            raise InvalidParameterError(f"no prompt of the {len(pending)} to decode fits, e.g. {skipped[0]['doc_id']}: "
                                        f"{skipped[0]['reason']}")
        return fits, skipped

    def _generate(self, batch: list) -> tuple[list, float]:
        prompts = [self.task.prompt(doc, self.config.chat) for doc, _ in batch]
        params = [dataclasses.replace(self.params, seed=sample_seed(self.config.seed, doc.doc_id, j)) for doc, j in batch]
        generate = self.llm.chat if isinstance(prompts[0], list) else self.llm.generate
        start = time.perf_counter()
        outputs = generate(prompts, params)
        return outputs, time.perf_counter() - start

    def _records(self, batch: list, outputs: list, seconds: float) -> list[dict]:
        cut = [truncate(o.text, self.stops) for o in outputs]
        with ThreadPoolExecutor(max_workers=min(SCORING_THREADS, len(batch))) as pool:
            scores = list(pool.map(self.task.score, [doc for doc, _ in batch], [text for text, _ in cut]))
        batch_id, self.num_batches = f"{self.id}/{self.num_batches}", self.num_batches + 1
        memory = self._peak_memory()
        records = []
        for (doc, j), out, (text, stopped), score in zip(batch, outputs, cut, scores):
            m = out.metrics
            records.append({
                "doc_id": doc.doc_id, "sample": j, **self.store.prompt_fields(out.prompt or ""),
                "generation": text, "cut_at_stop_string": stopped, **score, "correct": bool(score["correct"]),
                "tokens": m.num_tokens, "nfe": m.nfe, "seconds": m.latency_s, "finish_reason": out.finish_reason,
                "kv_computations": m.kv_computations, "kv_fraction": m.kv_fraction, "remasked": m.num_remasked,
                "seed": sample_seed(self.config.seed, doc.doc_id, j), "batch": batch_id, "batch_seconds": seconds,
                "session": self.id, "session_seconds": time.perf_counter() - self.start,
                "peak_memory_bytes": memory, "time": time.time()})
        return records

    def _peak_memory(self) -> int | None:
        if self.device.type != "cuda":
            return None
        import torch
        return torch.cuda.max_memory_allocated(self.device)

    def environment(self) -> dict:
        import torch

        import dllm
        gpu = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None
        return {"device": str(self.device), "dtype": str(self.llm.engine.dtype).removeprefix("torch."), "gpu": gpu,
                "cpu_threads": torch.get_num_threads(), "torch": torch.__version__, "dllm": dllm.__version__,
                "python": platform.python_version(), "platform": platform.platform(),
                "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "session": self.id}
