"""Loss curves as PNG: one run's trainer_state.json, or several runs overlaid on one chart (the original's
scaling-law figure).

    python -m utils.plot_loss results/pt                       # -> results/pt/loss.png
    python -m utils.plot_loss results/pt1 results/pt2 --x tokens --out results/pt_compare.png
"""

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on training machines
import matplotlib.pyplot as plt  # noqa: E402

from utils.errors import MissingInputError, run_main  # noqa: E402


def read_log_history(run: str | Path) -> list[dict]:
    """log_history of a run folder (its trainer_state.json, or that of its newest checkpoint) or of a json file."""
    run = Path(run)
    candidates = [run] if run.is_file() else [run / "trainer_state.json"] + sorted(
        run.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[-1]), reverse=True)
    for path in candidates:
        if path.is_file():
            return json.loads(path.read_text())["log_history"]
    raise MissingInputError(f"no trainer_state.json in {run}")


def series(log_history: list[dict], key: str, x: str = "step") -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for entry in log_history:
        if key in entry and x in ("step", "epoch") and x in entry:
            xs.append(entry[x]), ys.append(entry[key])
        elif key in entry and x == "tokens":
            # tokens_seen: the stages' own count (utils.throughput); num_input_tokens_seen: the Trainer's, in older
            # runs and the original's logs
            seen = entry.get("tokens_seen", entry.get("num_input_tokens_seen"))
            if seen is not None:
                xs.append(seen), ys.append(entry[key])
    return xs, ys


def plot_runs(runs: dict[str, list[dict]], out: str | Path, keys: tuple[str, ...] = ("loss",), x: str = "step",
              title: str = "") -> Path | None:
    """Draw every key that any run logged, one panel per key; returns the PNG path, or None if nothing to draw."""
    keys = [k for k in keys if any(series(h, k, x)[0] for h in runs.values())]
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 4), squeeze=False)
    for axis, key in zip(axes[0], keys):
        for name, history in runs.items():
            xs, ys = series(history, key, x)
            if xs:
                axis.plot(xs, ys, label=name, linewidth=1.2)
        axis.set_xlabel({"tokens": "tokens seen", "step": "optimizer step", "epoch": "epoch"}[x])
        axis.set_ylabel(key)
        axis.grid(alpha=0.3)
        if len(runs) > 1:
            axis.legend()
    fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders (or trainer_state.json files)")
    parser.add_argument("--keys", nargs="+", default=["loss"], help="logged values to draw, e.g. loss eval_loss")
    parser.add_argument("--x", choices=["step", "tokens", "epoch"], default="step")
    parser.add_argument("--out", help="PNG path (default: <run>/loss.png for one run)")
    args = parser.parse_args(argv)
    if not args.out and len(args.runs) > 1:
        parser.error("--out is required with several runs")
    out = args.out or str(Path(args.runs[0]) / "loss.png")
    runs = {Path(run).name: read_log_history(run) for run in args.runs}
    path = plot_runs(runs, out, tuple(args.keys), args.x)
    print(f"wrote {path}" if path else "nothing to plot")


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
