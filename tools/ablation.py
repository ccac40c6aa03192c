"""The original's pretraining experiments, repeatable: pt1-pt3 as it ran them, plus pt4.

    bash run.sh ablation                                   # mini_data, tiny model, CPU: a few minutes
    python -m tools.ablation --data_root data/pt --config configs/pt.yaml --max_steps 2000 --output_dir results/ablation

| run | data | packing | what it tests |
|---|---|---|---|
| pt1 | zh | none: one document per sample, padded | the original's "regular method" |
| pt2 | zh | concat | packing vs. padding (the original's pt2) |
| pt3 | zh + en | none | adding English (the original's pt3) |
| pt4 | zh + en | document: packed, attention kept inside each document | ours |

Every run is the real PT stage (mini_qwen_pt.py, as a subprocess) with the same recipe and only data/packing
changed. The result is an overlay of the loss curves against tokens processed (ablation_loss.png), beside the
original's own logged pt1-pt3 curves when its logs are given, and a table (ablation.md): final loss and held-out
bits per byte (from each run's own report.json, utils.report), tokens processed and padding fraction.
"""

import argparse
import csv
import json
import sys
from pathlib import Path

from utils.config import repo_path, run_stage
from utils.errors import MissingInputError, run_main
from utils.plots import plot_runs, read_log_history

RUNS = {
    "pt1": ("zh", "none"),
    "pt2": ("zh", "concat"),
    "pt3": ("zh+en", "none"),
    "pt4": ("zh+en", "document"),
}
LANGUAGE_FOLDERS = {"zh": ["chinese"], "zh+en": ["chinese", "english"]}


def data_folders(data_root: str, languages: str) -> list[str]:
    root = Path(repo_path(data_root))
    folders = sorted(str(p) for lang in LANGUAGE_FOLDERS[languages] for p in root.glob(f"*/{lang}/high"))
    if not folders:
        raise MissingInputError(f"no <industry>/<language>/high folders under {root}")
    return folders


def run_one(name: str, args) -> Path:
    languages, packing = RUNS[name]
    output_dir = Path(repo_path(args.output_dir)) / name
    flags = ["--config", repo_path(args.config), "--output_dir", str(output_dir), "--packing", packing,
             "--data_files", *data_folders(args.data_root, languages), "--save_strategy", "no",
             "--resume_from_checkpoint", "", "--report_to", "none", *args.extra]
    if args.max_steps:
        flags += ["--max_steps", str(args.max_steps)]
    run_stage("pt", flags)
    return output_dir


def original_curves(csv_path: str) -> dict[str, list[dict]]:
    """The original's logged pt1-pt3 losses (step = 20 x index; 6 GPUs x 12 x 16 x 1024 tokens per step)."""
    runs: dict[str, list[dict]] = {}
    with open(csv_path, newline="") as handle:
        for row in csv.DictReader(handle):
            if row["run"] in ("pt1", "pt2", "pt3"):
                step = int(float(row["step"]))
                runs.setdefault(f"original {row['run']}", []).append(
                    {"step": step, "loss": float(row["loss"]), "num_input_tokens_seen": step * 6 * 12 * 16 * 1024})
    return runs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_root", default="mini_data/pt", help="folder of <industry>/<language>/high folders")
    parser.add_argument("--config", default="configs/demo_pt.yaml", help="the PT recipe every run shares")
    parser.add_argument("--output_dir", default="results/ablation")
    parser.add_argument("--max_steps", type=int, default=None, help="the same step budget for every run")
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--original_logs", default=None,
                        help="loss_curves_extracted.csv of the original's logs, drawn in a second panel")
    args, args.extra = parser.parse_known_args(argv)

    output_dir = Path(repo_path(args.output_dir))
    rows, histories = [], {}
    for name in args.runs:
        run_dir = run_one(name, args)
        languages, packing = RUNS[name]
        histories[f"{name} ({languages}, {packing})"] = read_log_history(run_dir)
        report = json.loads((run_dir / "report.json").read_text())
        rows.append({"run": name, "data": languages, "packing": packing, "final_loss": report["loss"]["end"],
                     "heldout_bits_per_byte": report["heldout_bits_per_byte"],
                     "tokens_processed": report["tokens_seen"], "steps": report["steps"],
                     "padding_fraction": json.loads((run_dir / "data_report.json").read_text())["packing"][
                         "padding_fraction"]})
    figure = plot_runs(histories, output_dir / "ablation_loss.png", ("loss",), x="tokens",
                       title="pretraining ablation: loss vs tokens processed")
    if args.original_logs:
        plot_runs(original_curves(args.original_logs), output_dir / "original_loss.png", ("loss",), x="tokens",
                  title="the original's logged pt1-pt3 (6 GPUs)")
    table = ["| run | data | packing | steps | tokens processed | padding | final loss | held-out bits/byte |",
             "|---|---|---|---|---|---|---|---|"]
    table += [f"| {r['run']} | {r['data']} | {r['packing']} | {r['steps']} | {r['tokens_processed']:,} | "
              f"{r['padding_fraction']:.1%} | {r['final_loss']:.3f} | {r['heldout_bits_per_byte']:.3f} |" for r in rows]
    (output_dir / "ablation.md").write_text("\n".join(table) + "\n")
    (output_dir / "ablation.json").write_text(json.dumps(rows, indent=2))
    print("\n".join(table))
    print(f"curves: {figure}")


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
