"""Sweeps: every setting of a grid through the same runner, each into its own subdirectory (so a bench resumes like
a run), then one table (`bench.md`, `bench.json`) and `pareto.png` (accuracy against throughput).

Grid syntax (`parse_grid`): items `NAME=V1,V2,...`, e.g.

    strategies=reference,threshold caches=none,prefix,dual thresholds=0.7,0.9 block-lengths=8,32

NAME is `strategy`, `cache`, `batch-size` or any `SamplingParams` field (`threshold`, `block-length`, `steps`,
`max-tokens`, `temperature`, ...), with `-` or `_`, singular or plural. The settings are the Cartesian product of
the axes, on top of the fixed options. A sampling option (swept or fixed) only reaches the strategies that read
it: `thresholds=0.7,0.9` gives the threshold strategy two settings and the reference strategy one, without a
threshold. Likewise a `--strategy-option` only reaches the strategies that have it (saber's `mu`). Combinations the runtime refuses (a cache the model's attention cannot use, `block_length` not
dividing `max_tokens`, ...) are skipped and listed with the runtime's reason. The baseline row is the
reference strategy (TiDAR models: `ar`, their own AR decoding) without a cache (the first value of every other axis);
it is added when the grid lacks it,
and `speedup` = a row's throughput / the baseline's.
"""
from __future__ import annotations

import dataclasses
import gc
import hashlib
import itertools
import json
import logging
import typing
from dataclasses import dataclass
from pathlib import Path

from dllm.errors import InvalidParameterError
from dllm.sampling_params import SamplingParams
from dllm.eval import metrics, report, runner
from dllm.eval.runner import EvalConfig, EvalError

logger = logging.getLogger(__name__)
ENGINE_AXES = ("strategy", "cache", "batch_size")
_NOT_SWEPT = ("seed", "stop_token_ids", "skip_special_tokens")
BASELINE_STRATEGY = {"tidar": "ar"}   # the family's baseline when it has no `reference` sampler (TiDAR: its AR half)
SAMPLING_AXES = {name: hint for name, hint in typing.get_type_hints(SamplingParams).items() if name not in _NOT_SWEPT}


@dataclass
class BenchResult:
    rows: list[dict]          # one per setting that ran: setting, dir, config, metrics, speedup, baseline, pareto
    refused: list[dict]       # setting, reason
    primary_metric: str
    output_dir: str


def axis_name(key: str) -> str:
    """The canonical axis for a grid NAME: `block-lengths` -> `block_length`, `strategies` -> `strategy`."""
    k = key.strip().lower().replace("-", "_")
    known = set(ENGINE_AXES) | set(SAMPLING_AXES)
    for candidate in (k, k[:-3] + "y" if k.endswith("ies") else None, k[:-1] if k.endswith("s") else None):
        if candidate in known:
            return candidate
    raise InvalidParameterError(f"unknown grid name {key!r}; use strategies, caches, batch-sizes or a sampling option "
                                "such as thresholds, block-lengths, steps, max-tokens, temperatures")


def _value(axis: str, text: str):
    hint = str(SAMPLING_AXES.get(axis, int if axis == "batch_size" else str))
    try:
        if "bool" in hint:
            if text.lower() not in ("true", "false"):
                raise ValueError
            return text.lower() == "true"
        return int(text) if "int" in hint else float(text) if "float" in hint else text
    except ValueError:
        kind = "true or false" if "bool" in hint else "an integer" if "int" in hint else "a number"
        raise InvalidParameterError(f"grid {axis}: {text!r} is not {kind}") from None


def parse_grid(items: list[str]) -> dict[str, list]:
    """`["caches=none,dual", "thresholds=0.7,0.9"]` -> `{"cache": ["none", "dual"], "threshold": [0.7, 0.9]}`,
    each name and value checked (unknown names, caches or strategies, values SamplingParams refuses)."""
    from dllm.cache import cache_class
    from dllm.decoding import check_strategy_name
    axes: dict[str, list] = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key.strip() or not values.strip():
            raise InvalidParameterError(f"grid item {item!r} is not NAME=V1,V2,... (e.g. thresholds=0.7,0.9)")
        axis = axis_name(key)
        if axis in axes:
            raise InvalidParameterError(f"grid names {axis!r} twice; give all its values in one item")
        parsed = [_value(axis, v.strip()) for v in values.split(",") if v.strip()]
        if len(set(map(str, parsed))) != len(parsed):
            raise InvalidParameterError(f"grid {axis} repeats a value: {values}")
        for v in parsed:
            {"cache": cache_class, "strategy": check_strategy_name}.get(axis, lambda _: None)(v)
            if axis in SAMPLING_AXES:
                SamplingParams(**{axis: v})
            elif axis == "batch_size" and v < 1:
                raise InvalidParameterError(f"grid batch_size values must be >= 1, got {v}")
        axes[axis] = parsed
    return axes


def model_family(config: EvalConfig) -> str:
    """The model's family from its config.json alone (no weights loaded)."""
    from dllm.models.loader import read_json, resolve_path
    from dllm.models.registry import adapter_for
    path = resolve_path(config.model, config.revision)
    return adapter_for(read_json(path / "config.json"), where=str(path)).family


def reads(strategy: str, family: str, option: str) -> bool:
    """Whether `strategy` on `family` models reads the SamplingParams field `option` (every strategy reads the
    shared ones: max_tokens, block_length, temperature, ...)."""
    from dllm.decoding.base import ALL_OPTIONS, PROPOSAL_OPTIONS
    cls = _strategy(strategy, family)
    if option not in ALL_OPTIONS or cls is None:
        return True
    return option in cls.options or option in PROPOSAL_OPTIONS.get(family, ())


def _strategy(strategy: str, family: str):
    """The strategy class, or None when there is no such strategy for this family (options are then kept and the
    runtime refuses the setting)."""
    from dllm.decoding import strategy_class
    try:
        return strategy_class(strategy, family)
    except InvalidParameterError:
        return None


def _setting(base: EvalConfig, values: dict, family: str) -> EvalConfig:
    engine = {k: v for k, v in values.items() if k in ENGINE_AXES}
    strategy = engine.get("strategy", base.strategy)
    sampling = {**base.sampling, **{k: v for k, v in values.items() if k in SAMPLING_AXES}}
    sampling = {k: v for k, v in sampling.items() if reads(strategy, family, k)}
    options = {k: v for k, v in (base.strategy_options or {}).items() if takes(strategy, family, k)}
    return dataclasses.replace(base, **engine, sampling=sampling, strategy_options=options)


def takes(strategy: str, family: str, option: str) -> bool:
    """Whether `strategy` on `family` models has the engine-level option `option` (`--strategy-option`), so that
    e.g. saber's `mu` reaches saber and not the reference baseline of the same bench."""
    cls = _strategy(strategy, family)
    return cls is None or option in cls.engine_options


def label(config: EvalConfig, axes: dict) -> str:
    swept = [f"{k}={config.sampling[k]}" for k in axes if k in config.sampling]
    swept += [f"batch_size={config.batch_size}"] if "batch_size" in axes else []
    return " ".join([f"{config.strategy}/{config.cache}"] + swept)


def expand(base: EvalConfig, axes: dict, family: str) -> list[tuple[str, EvalConfig]]:
    """(label, config) of every distinct setting, the baseline first."""
    first = {k: v[0] for k, v in axes.items()}
    baseline = _setting(base, {**first, "strategy": BASELINE_STRATEGY.get(family, "reference"), "cache": "none"}, family)
    plan = [baseline] + [_setting(base, dict(zip(axes, combo)), family) for combo in itertools.product(*axes.values())]
    unique: dict[str, EvalConfig] = {}
    for config in plan:
        unique.setdefault(json.dumps(config.setting(), sort_keys=True), config)
    return [(label(c, axes), c) for c in unique.values()]


class _LLMSlot:
    """One LLM alive at a time: settings with the same engine settings share it; another engine setting frees it
    before loading (two copies of an 8B model need not fit)."""

    def __init__(self):
        self.key, self.llm = None, None

    def get(self, config: EvalConfig):
        key = json.dumps(runner.llm_options(config), sort_keys=True)
        if key != self.key:
            self.key, self.llm = None, None
            gc.collect()
            import torch
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self.llm, self.key = runner.build_llm(config), key
        return self.llm


def default_output_dir(base: EvalConfig, axes: dict) -> Path:
    digest = hashlib.sha1(json.dumps([base.setting(), axes], sort_keys=True).encode()).hexdigest()[:8]
    return Path("runs") / "bench" / f"{Path(base.model).name}-{base.task}-{digest}"


def bench(base: EvalConfig, axes: dict, output_dir: str | Path | None = None, *, limit: int | None = None,
          overwrite: bool = False, progress: bool = True, warmup: bool = True,
          data_parallel_size: int = 1) -> BenchResult:
    """Run every setting of `axes` over `base` (see the module docstring) and write the bench files."""
    out = Path(output_dir or default_output_dir(base, axes))
    plan = expand(base, axes, model_family(base))
    slot, summaries, refused = _LLMSlot(), {}, []
    engine_order = list(dict.fromkeys((c.strategy, c.cache, c.batch_size) for _, c in plan))
    for name, config in sorted(plan, key=lambda p: engine_order.index((p[1].strategy, p[1].cache, p[1].batch_size))):
        sub = out / _slug(name)
        try:
            summaries[name] = runner.run(config, sub, limit=limit, overwrite=overwrite, progress=progress,
                                         warmup=warmup, label=name, llm_factory=slot.get,
                                         data_parallel_size=data_parallel_size)
        except InvalidParameterError as exc:
            refused.append({"setting": name, "reason": str(exc)})
            if sub.is_dir() and [p.name for p in sub.iterdir()] == ["config.json"]:
                (sub / "config.json").unlink()
                sub.rmdir()
    if not summaries:
        raise EvalError(f"the runtime refused every setting of the grid; the first: {refused[0]['setting']}: "
                        f"{refused[0]['reason']}")
    result = _result(plan, summaries, refused, out)
    _write(result, base, axes, limit)
    return result


def _result(plan: list, summaries: dict, refused: list, out: Path) -> BenchResult:
    primary = next(iter(summaries.values())).primary_metric  # bench() refuses a grid with no summary
    baseline = summaries.get(plan[0][0])
    base_speed = baseline.metrics["throughput"] if baseline else None
    rows = []
    for name, config in plan:
        if name in summaries:
            m = summaries[name].metrics
            speedup = m["throughput"] / base_speed if base_speed and m["throughput"] is not None else None
            rows.append({"setting": name, "dir": _slug(name), "baseline": name == plan[0][0],
                         "config": config.setting(), "metrics": m, "speedup": speedup})
    front = metrics.pareto_front([(r["metrics"]["throughput"], r["metrics"].get(primary)) for r in rows])
    for row, on_front in zip(rows, front):
        row["pareto"] = on_front
    order = [name for name, _ in plan]
    refused.sort(key=lambda r: order.index(r["setting"]))
    return BenchResult(rows, refused, primary, str(out))


def _write(result: BenchResult, base: EvalConfig, axes: dict, limit: int | None) -> None:
    out = Path(result.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"setting": base.setting(), "grid": axes, "limit": limit, **dataclasses.asdict(result),
           "definitions": {**metrics.DEFINITIONS, "speedup": "throughput / the baseline row's throughput"}}
    (out / "bench.json").write_text(json.dumps(doc, indent=1) + "\n")
    grid = " ".join(f"{k}={','.join(map(str, v))}" for k, v in axes.items())
    text = (f"# Bench: {base.task} on {base.model}\n\nGrid: `{grid}`; limit: {limit or 'none'}. Speed-up = "
            "throughput / the baseline's (reference strategy, no cache); throughput = generated tokens / "
            "generation seconds; Pareto: not beaten on both accuracy and throughput.\n\n"
            + report.bench_markdown(result.rows, result.refused, result.primary_metric))
    if not report.plot_pareto(result.rows, result.primary_metric, out / "pareto.png"):
        logger.warning("pareto.png not written: matplotlib is not installed (pip install 'dllm[eval]')")
        text += "\npareto.png: not written, matplotlib is not installed (pip install 'dllm[eval]').\n"
    (out / "bench.md").write_text(text)


def _slug(name: str) -> str:
    return name.replace("/", "-").replace(" ", "_")
