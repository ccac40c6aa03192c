"""A learning-rate sweep on a small proxy model (lr x schedule x optimizer), to pick a learning rate before renting
GPUs, and to find where training starts to diverge.

    # CPU, tiny model on mini_data: about 6 minutes here (docs/BENCHMARKS.md has the table it measured)
    python -m tools.sweep --config configs/demo_pt.yaml --lrs 1e-3 3e-3 1e-2 3e-2 \\
        --schedules cosine_with_min_lr warmup_stable_decay --optimizers adamw muon --max_steps 40 \\
        --model_config models/mini_qwen_tiny --output_dir results/sweep \\
        --per_device_train_batch_size 2 --logging_steps 2
    # GPU, the 1B model, a few hundred steps of the real recipe before a long run
    python -m tools.sweep --config configs/pt.yaml --lrs 1e-4 3e-4 1e-3 --max_steps 300 --output_dir results/sweep_1b

Every run is the real PT stage (mini_qwen_pt.py, as a subprocess) with the same recipe, data, seed and steps; only
learning_rate, lr_scheduler_type (with its kwargs, SCHEDULES) and --use_muon differ (under Muon, utils/muon.py says
which parameter groups learning_rate drives). Flags the sweep does not know go to every run (e.g.
--per_device_train_batch_size 4 --logging_steps 2). Each run's folder is <output_dir>/lr<lr>_<schedule>_<optimizer>;
a run that already finished with the same flags (its sweep_run.json) is skipped on a rerun unless --force, so an
interrupted sweep continues where it stopped.

Written to output_dir: sweep.md, a table (final train loss = mean of the last --final_window logged losses, held-out
bits per byte from the run's report.json, diverged, wall time of the stage process), the best row (lowest final
loss among the runs that did not diverge) in bold; sweep.png, final loss against lr per (schedule, optimizer) and
each pair's loss curves; sweep.json, the same numbers unrounded. A run diverged when the anomaly guard stopped it
(utils/callbacks.py; the stage then exits non-zero, which the sweep records instead of stopping), when a logged loss
or gradient norm is not finite, or when its final loss is above its first logged loss.
"""

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

from utils.config import repo_path, run_stage
from utils.errors import ConfigError, run_main
from utils.plots import plt, read_log_history, series  # pyplot as utils.plots sets it up (no display)

# Both end at 10% of the peak, as configs/pt.yaml's cosine and its commented warmup-stable-decay do, so the two
# differ in shape only: cosine decays all along, WSD holds the peak and decays in the last 20% of the steps.
SCHEDULES = {
    "cosine_with_min_lr": {"min_lr_rate": 0.1},
    "warmup_stable_decay": {"decay_fraction": 0.2, "min_lr_ratio": 0.1},
}
OPTIMIZERS = {"adamw": "false", "muon": "true"}  # the value of the stage's --use_muon
SWEPT = ("--learning_rate", "--lr_scheduler_type", "--lr_scheduler_kwargs", "--use_muon")
MARKER = "sweep_run.json"


def run_name(lr: float, schedule: str, optimizer: str) -> str:
    return f"lr{lr:g}_{schedule}_{optimizer}"


def absolute(path: str) -> str:
    # The same spelling whatever exists yet and wherever the sweep is started: the flags are compared on a rerun.
    return str(Path(repo_path(path)).resolve())


def run_one(lr: float, schedule: str, optimizer: str, args) -> Path:
    """One PT run, unless it already finished with these flags; its marker records them and the process's wall
    time."""
    run_dir = Path(absolute(args.output_dir)) / run_name(lr, schedule, optimizer)
    flags = ["--config", absolute(args.config), "--output_dir", str(run_dir), "--learning_rate", str(lr),
             "--lr_scheduler_type", schedule, "--lr_scheduler_kwargs", json.dumps(SCHEDULES[schedule]),
             "--use_muon", OPTIMIZERS[optimizer], "--save_strategy", "no", "--resume_from_checkpoint", "",
             "--report_to", "none"]
    if args.max_steps:
        flags += ["--max_steps", str(args.max_steps)]
    if args.model_config:
        flags += ["--model_config", absolute(args.model_config)]
    flags += args.extra
    marker = run_dir / MARKER
    if marker.is_file() and not args.force:
        if json.loads(marker.read_text())["flags"] == flags:
            print(f"sweep: {run_dir.name} already ran, skipped (--force reruns it)", flush=True)
            return run_dir
        print(f"sweep: {run_dir.name} ran with other flags (steps, batch, model...): running it again", flush=True)
    shutil.rmtree(run_dir, ignore_errors=True)  # nothing of an earlier or interrupted run may be read as this one's
    started = time.monotonic()
    try:
        run_stage("pt", flags)
    except SystemExit:
        # Only the anomaly guard's stop is a result; any other failure (a bad flag, missing data) ends the sweep.
        if not (run_dir / "anomaly.json").is_file():
            raise
    marker.write_text(json.dumps({"lr": lr, "schedule": schedule, "optimizer": optimizer,
                                  "wall_seconds": time.monotonic() - started, "flags": flags}, indent=2) + "\n")
    return run_dir


def divergence(history: list[dict], final_loss: float | None, bits: float | None) -> str | None:
    """Why a finished run counts as diverged, or None."""
    for entry in history:
        for key in ("loss", "grad_norm"):
            if key in entry and not math.isfinite(entry[key]):
                return f"{key} {entry[key]} at step {entry['step']}"
    losses = series(history, "loss")[1]
    if final_loss is not None and final_loss > losses[0]:
        return f"final loss {final_loss:.3g} above the first logged {losses[0]:.3g}"
    if bits is not None and not math.isfinite(bits):
        return f"held-out bits per byte {bits}"
    return None


def read_run(run_dir: Path, final_window: int) -> dict:
    """A table row from the run's own files: sweep_run.json, then trainer_state.json and report.json when the stage
    finished, or anomaly.json when the guard stopped it (the stage then writes neither of the others)."""
    row = {key: value for key, value in json.loads((run_dir / MARKER).read_text()).items() if key != "flags"}
    row["run"] = run_dir.name
    anomaly = run_dir / "anomaly.json"
    if anomaly.is_file():
        stop = json.loads(anomaly.read_text())
        return row | {"final_loss": None, "start_loss": None, "heldout_bits_per_byte": None, "steps": stop["step"],
                      "tokens_seen": None, "diverged": f"stopped at step {stop['step']}: {stop['problem']}"}
    history = read_log_history(run_dir)
    report = json.loads((run_dir / "report.json").read_text())
    losses = series(history, "loss")[1]
    final_loss = sum(losses[-final_window:]) / len(losses[-final_window:]) if losses else None
    return row | {"final_loss": final_loss, "start_loss": losses[0] if losses else None,
                  "heldout_bits_per_byte": report["heldout_bits_per_byte"], "steps": report["steps"],
                  "tokens_seen": report["tokens_seen"],
                  "diverged": divergence(history, final_loss, report["heldout_bits_per_byte"])}


def best_run(rows: list[dict]) -> dict | None:
    candidates = [row for row in rows if not row["diverged"] and row["final_loss"] is not None]
    return min(candidates, key=lambda row: row["final_loss"]) if candidates else None


def markdown_table(rows: list[dict], best: dict | None, final_window: int) -> list[str]:
    def number(value, digits=4):
        return "—" if value is None else f"{value:.{digits}g}"

    table = [f"| lr | schedule | optimizer | final loss (mean of last {final_window} logged) | held-out bits/byte | "
             "diverged | wall time |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        cells = [f"{row['lr']:g}", row["schedule"], row["optimizer"], number(row["final_loss"]),
                 number(row["heldout_bits_per_byte"]), f"yes: {row['diverged']}" if row["diverged"] else "no",
                 f"{row['wall_seconds']:.0f} s"]
        if row is best:
            cells = [f"**{cell}**" for cell in cells]
        table.append("| " + " | ".join(cells) + " |")
    return table


def plot_sweep(rows: list[dict], run_dirs: dict[str, Path], out: Path) -> Path:
    """Left: final loss against lr, a line per (schedule, optimizer), diverged runs as crosses along the top.
    Then a panel per (schedule, optimizer) with its loss curves, one per lr."""
    pairs = list(dict.fromkeys((row["schedule"], row["optimizer"]) for row in rows))
    lrs = sorted({row["lr"] for row in rows})
    colours = {lr: plt.cm.viridis(i / max(len(lrs) - 1, 1)) for i, lr in enumerate(lrs)}
    columns = min(3, len(pairs) + 1)
    rows_of_panels = math.ceil((len(pairs) + 1) / columns)
    fig, axes = plt.subplots(rows_of_panels, columns, figsize=(5 * columns, 3.8 * rows_of_panels), squeeze=False)
    panels = axes.flatten()
    for panel in panels[len(pairs) + 1:]:
        panel.set_visible(False)

    # y range from the runs that did not diverge, so that one blown-up run does not flatten every other curve
    healthy = [row for row in rows if not row["diverged"] and row["final_loss"] is not None]
    top = max((row["start_loss"] for row in healthy), default=None)
    summary = panels[0]
    for schedule, optimizer in pairs:
        mine = sorted((row for row in rows if (row["schedule"], row["optimizer"]) == (schedule, optimizer)),
                      key=lambda row: row["lr"])
        good = [row for row in mine if row in healthy]
        line, = summary.plot([row["lr"] for row in good], [row["final_loss"] for row in good], marker="o",
                             label=f"{schedule}, {optimizer}")
        bad = [row["lr"] for row in mine if row not in healthy]
        if bad and top is not None:
            summary.plot(bad, [top] * len(bad), linestyle="none", marker="x", markersize=9, color=line.get_color())
    summary.set_xscale("log")
    summary.set_xlabel("peak learning rate")
    summary.set_ylabel("final train loss")
    summary.set_title("final loss vs lr (x: diverged)")
    summary.grid(alpha=0.3)
    summary.legend(fontsize=8)

    for panel, (schedule, optimizer) in zip(panels[1:], pairs):
        for row in rows:
            if (row["schedule"], row["optimizer"]) != (schedule, optimizer) or row["final_loss"] is None:
                continue
            steps, losses = series(read_log_history(run_dirs[row["run"]]), "loss")
            panel.plot(steps, losses, color=colours[row["lr"]], linewidth=1.2,
                       linestyle="--" if row["diverged"] else "-", label=f"lr {row['lr']:g}")
        if top is not None:
            panel.set_ylim(top=top + 0.1)
        panel.set_title(f"{schedule}, {optimizer}")
        panel.set_xlabel("optimizer step")
        panel.set_ylabel("train loss")
        panel.grid(alpha=0.3)
        if panel.get_legend_handles_labels()[0]:
            panel.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)  # a forwarded stage flag must never match a sweep flag
    parser.add_argument("--config", default="configs/demo_pt.yaml", help="the PT recipe every run shares")
    parser.add_argument("--output_dir", default="results/sweep")
    parser.add_argument("--lrs", nargs="+", type=float, default=[1e-4, 3e-4, 1e-3, 3e-3], help="peak learning "
                        "rates (default: from configs/pt.yaml's 1e-4 past the ~1e-3 DeepSeek's fit gives the 1B)")
    parser.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=list(SCHEDULES))
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=list(OPTIMIZERS))
    parser.add_argument("--max_steps", type=int, default=None, help="the same step budget for every run")
    parser.add_argument("--model_config", default=None, help="model config of every run (default: the recipe's), "
                        "e.g. models/mini_qwen_tiny or models/mini_qwen_proxy_43m")
    parser.add_argument("--final_window", type=int, default=5, help="logged losses averaged into the final loss")
    parser.add_argument("--force", action="store_true", help="rerun runs that already finished")
    args, args.extra = parser.parse_known_args(argv)
    clash = [flag for flag in args.extra if flag.split("=", 1)[0] in SWEPT]
    if clash:
        raise ConfigError(f"{', '.join(clash)}: the sweep sets this for each run (use --lrs, --schedules, "
                          "--optimizers)")

    output_dir = Path(absolute(args.output_dir))
    grid = [(lr, schedule, optimizer) for schedule in args.schedules for optimizer in args.optimizers
            for lr in sorted(set(args.lrs))]
    run_dirs = {run_name(*point): run_one(*point, args) for point in grid}
    rows = [read_run(run_dir, args.final_window) for run_dir in run_dirs.values()]
    best = best_run(rows)
    table = markdown_table(rows, best, args.final_window)
    figure = plot_sweep(rows, run_dirs, output_dir / "sweep.png")
    (output_dir / "sweep.md").write_text("\n".join(table) + "\n")
    (output_dir / "sweep.json").write_text(json.dumps({"best": best["run"] if best else None, "runs": rows},
                                                      indent=2) + "\n")
    print("\n".join(table))
    print(f"best: {best['run'] if best else 'none (every run diverged)'}; curves: {figure}")


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
