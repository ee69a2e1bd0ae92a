"""What a person reads: a run's `summary.json` and `report.md`, a bench's `bench.md` and `pareto.png`, and the live
progress line. Rendering only: the numbers come from `metrics.py`, the runs from `runner.py` and `bench.py`."""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

# The run metrics shown in tables, in order, with their column titles.
RUN_COLUMNS = {
    "accuracy": "accuracy", "tokens_per_second": "tokens/s (per request, mean)", "throughput": "throughput (tokens/s)",
    "nfe": "NFE (mean)", "tokens": "tokens (mean)", "tokens_per_forward": "tokens per forward",
    "remasked": "re-masked (mean)", "kv_fraction": "K/V computed vs no cache", "latency_p50_s": "latency p50 (s)", "latency_p95_s": "latency p95 (s)", "generation_seconds": "generation (s)",
    "wall_seconds": "wall (s)", "peak_gpu_memory_gib": "peak GPU memory (GiB)",
}
BENCH_COLUMNS = {"speedup": "speed-up", "throughput": "throughput (tok/s)", "tokens_per_second": "tok/s per request",
                 "nfe": "NFE", "tokens_per_forward": "TPF", "remasked": "re-masked", "kv_fraction": "K/V vs no cache",
                 "latency_p50_s": "p50 (s)",
                 "latency_p95_s": "p95 (s)"}
_FRACTIONS = ("accuracy", "strict_accuracy", "flexible_accuracy")


def fmt(name: str, value) -> str:
    if value is None:
        return "-"
    if isinstance(value, (bool, int)):
        return str(value)
    if isinstance(value, float):
        if name in _FRACTIONS or name.startswith("pass@"):
            return f"{100 * value:.1f}%"
        if name == "speedup":
            return f"{value:.2f}x"
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def metrics_table(summary) -> str:
    m = summary.metrics
    names = [summary.primary_metric] + [k for k in m if k not in RUN_COLUMNS and k != summary.primary_metric
                                        and k not in ("num_samples", "num_docs", "total_tokens", "num_skipped")]
    names += [k for k in RUN_COLUMNS if k != summary.primary_metric]
    rows = [[RUN_COLUMNS.get(k, k) + (" (primary)" if k == summary.primary_metric else ""), fmt(k, m.get(k))]
            for k in names]
    if "num_docs" in m:
        rows += [["docs / samples", f"{m['num_docs']} / {m['num_samples']}"], ["total tokens", str(m["total_tokens"])]]
    rows += [["skipped (prompt does not fit)", str(m.get("num_skipped", 0))]]
    return table(["metric", "value"], rows)


def skipped_markdown(summary) -> str:
    """The skipped samples (prompt longer than the model takes), the first 20 with their reason."""
    if not summary.skipped:
        return ""
    lines = [f"- `{s['doc_id']}` (sample {s['sample']}): {s['reason']}" for s in summary.skipped[:20]]
    more = f"\n- ... and {len(summary.skipped) - 20} more (summary.json)" if len(summary.skipped) > 20 else ""
    return (f"## Skipped: {len(summary.skipped)} sample(s), not in the metrics\n\n" + "\n".join(lines) + more + "\n\n")


def notice(text: str) -> None:
    """One line for the person running an eval (stderr, beside the progress bar; shown with --no-progress too)."""
    print(text, file=sys.stderr, flush=True)


def run_markdown(summary) -> str:
    s = summary.setting
    setting_rows = [[k, json.dumps(v)] for k, v in s.items() if k not in ("sampling", "task_options")]
    setting_rows += [[f"sampling.{k}", json.dumps(v)] for k, v in s["sampling"].items()]
    setting_rows += [[f"task_options.{k}", json.dumps(v)] for k, v in s["task_options"].items()]
    env_rows = [[k, str(v)] for k, v in summary.environment.items()]
    definitions = "\n".join(f"- **{k}**: {v}" for k, v in summary.definitions.items())
    return (f"# {s['task']} on {s['model']}\n\n{metrics_table(summary)}\n\n"
            f"Limit: {summary.limit if summary.limit is not None else 'none (all docs)'}; "
            f"records: `{Path(summary.output_dir) / 'samples.jsonl'}`.\n\n"
            f"{skipped_markdown(summary)}## Setting\n\n{table(['option', 'value'], setting_rows)}\n\n"
            f"## Environment (latest session)\n\n{table(['', ''], env_rows)}\n\n## Definitions\n\n{definitions}\n")


def write_run(summary, path: Path) -> None:
    (path / "summary.json").write_text(json.dumps(dataclasses.asdict(summary), indent=1) + "\n")
    (path / "report.md").write_text(run_markdown(summary))


def bench_markdown(rows: list[dict], refused: list[dict], primary: str) -> str:
    header = ["setting", primary] + list(BENCH_COLUMNS.values()) + ["Pareto"]
    body = [[r["setting"] + (" (baseline)" if r["baseline"] else ""), fmt(primary, r["metrics"].get(primary))]
            + [fmt(k, r["speedup"] if k == "speedup" else r["metrics"].get(k)) for k in BENCH_COLUMNS]
            + ["yes" if r["pareto"] else ""] for r in rows]
    text = table(header, body)
    if refused:
        text += "\n\nRefused by the runtime (skipped):\n\n" + "\n".join(f"- {r['setting']}: {r['reason']}" for r in refused)
    return text + "\n"


def plot_pareto(rows: list[dict], primary: str, path: Path) -> bool:
    """Accuracy against throughput, one numbered point per setting (the key beside the plot), the Pareto front
    drawn and highlighted; a log throughput axis when the speeds span more than 10x. False (and no file) when
    matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    points = [(r["metrics"]["throughput"] or 0.0, r["metrics"].get(primary) or 0.0, r) for r in rows]
    fig, ax = plt.subplots(figsize=(10, 4.8))
    fig.subplots_adjust(left=0.08, right=0.62, bottom=0.12, top=0.95)
    for on_front, style in ((False, {"color": "tab:gray", "label": "dominated"}),
                            (True, {"color": "tab:red", "label": "Pareto front", "zorder": 3})):
        chosen = [(x, y) for x, y, r in points if r["pareto"] == on_front]
        if chosen:
            ax.scatter(*zip(*chosen), **style)
    front = sorted((x, y) for x, y, r in points if r["pareto"])
    ax.plot([x for x, _ in front], [y for _, y in front], "-", color="tab:red", alpha=0.6)
    for i, (x, y, _) in enumerate(points, start=1):
        ax.annotate(str(i), (x, y), textcoords="offset points", xytext=(4, 4 + 7 * (i % 3)), fontsize=8)
    speeds = [x for x, _, _ in points if x > 0]
    if speeds and max(speeds) > 10 * min(speeds):
        from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.margins(x=0.1, y=0.15)
    ax.set_xlabel("throughput (generated tokens / generation second)")
    ax.set_ylabel(primary)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    key = "\n".join(f"{i}  {r['setting']}" + (" (baseline)" if r["baseline"] else "")
                    for i, (_, _, r) in enumerate(points, start=1))
    fig.text(0.64, 0.95, key, va="top", fontsize=8, family="monospace")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


class Progress:
    """A progress bar on stderr with live accuracy and tokens/s: tqdm when installed, else a plain line."""

    def __init__(self, total: int, done: int, enabled: bool = True, desc: str = "eval"):
        self.total, self.done, self.enabled, self.desc = total, done, enabled, desc
        try:
            from tqdm import tqdm
        except ImportError:
            tqdm = None
        self.bar = None if tqdm is None else tqdm(total=total, initial=done, desc=desc, unit="sample",
                                                  file=sys.stderr, disable=None if enabled else True)

    def update(self, n: int, accuracy: float, tokens_per_second: float) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.set_postfix(acc=f"{100 * accuracy:.1f}%", tok_s=f"{tokens_per_second:.1f}", refresh=False)
            self.bar.update(n)
        elif self.enabled:
            print(f"\r{self.desc}: {self.done}/{self.total} acc {100 * accuracy:.1f}% {tokens_per_second:.1f} tok/s",
                  end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            print(file=sys.stderr)
