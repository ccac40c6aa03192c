"""Loss curves as PNG from the Trainer's log_history: the stages draw their own at the end of a run, and
`python -m tools.plot_loss` draws one run or overlays several."""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on training machines
import matplotlib.pyplot as plt  # noqa: E402

from utils.errors import MissingInputError  # noqa: E402


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
