"""Loss curves as PNG: one run's trainer_state.json, or several runs overlaid on one chart (the original's
scaling-law figure).

    python -m tools.plot_loss results/pt                       # -> results/pt/loss.png
    python -m tools.plot_loss results/pt1 results/pt2 --x tokens --out results/pt_compare.png
"""

import argparse
import sys
from pathlib import Path

from utils.errors import run_main
from utils.plots import plot_runs, read_log_history


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
