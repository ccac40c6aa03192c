"""Report cards: <output_dir>/report.md at the end of each stage, and one for the whole pipeline.

    python -m utils.report pipeline results/demo    # -> results/demo/report.md, linking the stage and eval reports

A stage's card (written on rank 0 after the final save, utils.training.save_and_report) holds what it takes to
judge and repeat the run: the command line; the resolved config beside the recipe's, each value that differs shown
in bold with where it came from (the command line, or start-up: bf16 falling back to fp16, the SFT stage turning
TRL's assistant_only_loss off for its own labels); the git commit, library versions and hardware; what the data
step kept and skipped (<output_dir>/data_report.json); steps, tokens, wall time, tokens/s and MFU
(ThroughputCallback's logs in trainer_state.json); the loss at start, lowest and end, the curves (loss.png); and the
stage's metrics: held-out bits per byte on mini_data/heldout/heldout.txt, DPO's reward accuracy and margin at start
and end, GRPO's mean reward and each reward function's, a reward model's accuracy on its held-out pairs. report.json beside it holds the same numbers for the pipeline card.
"""

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
from collections import Counter
from dataclasses import MISSING, fields
from importlib import metadata
from pathlib import Path

import yaml

from utils.compat import locked_versions, normalise
from utils.config import REPO_ROOT, repo_path
from utils.errors import run_main
from utils.metrics import heldout_metrics
from utils.throughput import human_count, human_duration

HELDOUT_TEXT = "mini_data/heldout/heldout.txt"
STAGES = ("pt", "sft", "dpo")
EXTRA_STAGES = ("grpo", "distill")  # listed in the pipeline card only when run (`bash run.sh grpo`, mini_qwen_distill.py)
LIBRARIES = ("torch", "transformers", "trl", "accelerate", "deepspeed", "datasets", "peft", "flash-attn",
             "liger-kernel", "torchao", "tiktoken")


def split_command_line(argv: list[str]) -> tuple[str | None, dict[str, str]]:
    """The recipe (`--config`) and the other flags of a stage's command line, each value as typed."""
    flags, key = {}, None
    for token in argv:
        if token.startswith("--"):
            key, _, value = token[2:].partition("=")
            flags[key] = [value] if value else []
        elif key:
            flags[key].append(token)
    recipe = flags.pop("config", [None])
    return recipe[0] if recipe else None, {key: " ".join(values) or "true" for key, values in flags.items()}


def _shown(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _same(recipe_value, value) -> bool:
    if isinstance(recipe_value, list) and isinstance(value, str):
        value = value.split()  # a list flag as typed: --data_files a b
    # A relative path in the recipe is taken from the repository root (utils.config.repo_path).
    return _shown(recipe_value) == _shown(value) or (isinstance(recipe_value, str) and repo_path(recipe_value) == value)


def _field_defaults(training_args) -> dict:
    return {f.name: f.default if f.default is not MISSING else f.default_factory()
            for f in fields(training_args) if f.default is not MISSING or f.default_factory is not MISSING}


def config_rows(recipe: dict, flags: dict[str, str], training_args) -> list[tuple[str, str, str, str]]:
    """(key, recipe value, this run's value, where it came from if it differs from the recipe's) for every key of
    the recipe and of the command line. This run's value is the trainer's resolved one for its own fields, else the
    flag's or the recipe's; a key the recipe leaves out has the field's default there (unknown for the stage's own
    arguments)."""
    resolved, defaults = training_args.to_dict(), _field_defaults(training_args)
    rows = []
    for key in [*recipe, *(key for key in flags if key not in recipe)]:
        in_recipe = recipe[key] if key in recipe else defaults.get(key, "(default)")
        run_value = resolved[key] if key in resolved else flags.get(key, in_recipe)
        changed = not (_same(in_recipe, run_value) or key in flags and _same(in_recipe, flags[key]))
        source = ("command line" if key in flags else "start-up") if changed else ""
        rows.append((key, _shown(in_recipe), _shown(run_value), source))
    return rows


def git_commit() -> str:
    def git(*args):
        return subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=30)

    try:
        commit = git("rev-parse", "HEAD")
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (no git)"
    if commit.returncode:
        return "not a git repository"
    changed = git("status", "--porcelain", "--untracked-files=no").stdout.splitlines()
    return commit.stdout.strip() + (f" plus uncommitted changes to {len(changed)} file(s)" if changed else "")


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    locked = locked_versions()
    for name in LIBRARIES:
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        tested = locked.get(normalise(name))
        versions[name] = version if tested in (None, version) else f"{version} (locked: {tested})"
    return versions


def hardware(world_size: int) -> dict[str, str]:
    import torch

    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").is_file():
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    gpus = Counter(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    return {"cpu": f"{cpu}, {os.cpu_count()} cores",
            "gpu": ", ".join(f"{count} x {name}" for name, count in gpus.items()) or "none",
            "processes": str(world_size)}


def _logged(log_history: list[dict], key: str) -> list[tuple[int, float]]:
    return [(entry["step"], entry[key]) for entry in log_history if key in entry]


def _start_min_end(points: list[tuple[int, float]]) -> dict | None:
    if not points:
        return None
    lowest = min(points, key=lambda point: point[1])
    return {"start": points[0][1], "start_step": points[0][0], "min": lowest[1], "min_step": lowest[0],
            "end": points[-1][1], "end_step": points[-1][0]}


def _mean_last(points: list[tuple[int, float]]) -> dict | None:
    values = [value for _, value in points]
    return {"mean": sum(values) / len(values), "last": values[-1], "windows": len(values)} if values else None


def stage_summary(state: dict, stage: str, heldout_bits_per_byte: float | None) -> dict:
    """The numbers of a finished stage, from its trainer_state.json."""
    history = state["log_history"]
    tokens = _logged(history, "tokens_seen")
    runtime = _logged(history, "train_runtime")
    memory = _logged(history, "peak_gpu_memory_gib")
    summary = {"stage": stage, "steps": state["global_step"], "max_steps": state["max_steps"],
               "epoch": state.get("epoch"), "tokens_seen": tokens[-1][1] if tokens else None,
               "wall_seconds": runtime[-1][1] if runtime else None,
               "tokens_per_second": _mean_last(_logged(history, "tokens_per_second")),
               "tokens_per_second_per_device": _mean_last(_logged(history, "tokens_per_second_per_device")),
               "mfu": _mean_last(_logged(history, "mfu")),
               "peak_gpu_memory_gib": max(value for _, value in memory) if memory else None,
               "loss": _start_min_end(_logged(history, "loss")), "heldout_bits_per_byte": heldout_bits_per_byte}
    if stage == "dpo":
        summary["rewards"] = {key: _start_min_end(_logged(history, key))
                              for key in ("rewards/accuracies", "rewards/margins")}
    if stage == "rm":  # evaluated before and after training
        summary["heldout_accuracy"] = _start_min_end(_logged(history, "eval_accuracy"))
    if stage == "grpo":  # the weighted sum, then each reward function's mean
        logged_keys = dict.fromkeys(key for entry in history for key in entry)
        summary["rewards"] = {key: _start_min_end(_logged(history, key)) for key in logged_keys
                              if key == "reward" or (key.startswith("rewards/") and key.endswith("/mean"))}
    return summary


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _number(value, digits: int = 4) -> str:
    """`digits` significant digits below 10^digits, else whole numbers with thousands separators."""
    if value is None:
        return "—"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return f"{value:.{digits}g}" if isinstance(value, float) and abs(value) < 10**digits else f"{value:,.0f}"


def _data_lines(data_report: dict) -> list[str]:
    """data_report.json as Markdown: record counts (kept, skipped by reason), then each other part on a line."""
    lines = []
    for part, content in data_report.items():
        if isinstance(content, dict) and {"kept", "skipped"} <= set(content):
            skipped = sum(content["skipped"].values())
            lines.append(f"- {part}: kept {content['kept']:,}, skipped {skipped:,}")
            for reason, count in sorted(content["skipped"].items(), key=lambda item: -item[1]):
                first = content.get("first_seen", {}).get(reason, "")
                lines.append(f"  - {count:,} {reason}" + (f" (first at `{first}`)" if first else ""))
        elif isinstance(content, dict):
            lines.append(f"- {part}: " + (", ".join(f"{key} {_number(value)}" for key, value in content.items())
                                          or "—"))
        else:
            lines.append(f"- {part}: {_number(content)}")
    return lines


def stage_markdown(summary: dict, command_line: list[str], rows, versions: dict, machine: dict, commit: str,
                   data_report: dict | None, resolved_args: dict, has_plot: bool) -> str:
    stage = summary["stage"]
    loss, throughput, mfu = summary["loss"], summary["tokens_per_second"], summary["mfu"]
    lines = [f"# mini_qwen {stage} report", "", "## Command line", "", "```", shlex.join(["python", *command_line]),
             "```", ""]
    if int(machine["processes"]) > 1:
        lines += [f"(rank 0 of {machine['processes']} processes)", ""]
    lines += ["## Configuration", "", "Bold: differs from the recipe.", "", "| key | recipe | this run | from |",
              "|---|---|---|---|"]
    for key, recipe_value, run_value, source in rows:
        bold = "**" if source else ""
        lines.append(f"| {bold}{key}{bold} | `{_cell(recipe_value)}` | {bold}`{_cell(run_value)}`{bold} | {source} |")
    lines += ["", "<details><summary>every resolved trainer argument</summary>", "", "```json",
              json.dumps(resolved_args, indent=1, ensure_ascii=False, default=str), "```", "", "</details>", "",
              "## Code, libraries, hardware", "", f"- git commit: {commit}",
              "- libraries: " + ", ".join(f"{name} {version}" for name, version in versions.items()),
              f"- CPU: {machine['cpu']}", f"- GPU: {machine['gpu']}", f"- processes: {machine['processes']}", "",
              "## Data", ""]
    lines += _data_lines(data_report) if data_report else ["no data_report.json"]
    wall = summary["wall_seconds"]
    lines += ["", "## Training", "", f"- steps: {summary['steps']:,} of {summary['max_steps']:,} "
              f"(epoch {_number(summary['epoch'], 3)})",
              f"- tokens seen: {_number(summary['tokens_seen'])}"
              + (f" ({human_count(summary['tokens_seen'])})" if (summary["tokens_seen"] or 0) >= 1000 else ""),
              f"- wall time of training: {human_duration(wall) + f' ({wall:.1f} s)' if wall else '—'}"]
    if throughput:
        per_device = summary["tokens_per_second_per_device"]
        lines.append(f"- tokens/s: mean {_number(throughput['mean'])}, last {_number(throughput['last'])} over "
                     f"{throughput['windows']} logging windows; per device mean {_number(per_device['mean'])}, last "
                     f"{_number(per_device['last'])}")
    lines.append(f"- MFU: mean {mfu['mean']:.1%}, last {mfu['last']:.1%}" if mfu else "- MFU: — (no GPU peak known)")
    if summary["peak_gpu_memory_gib"] is not None:
        lines.append(f"- peak GPU memory: {summary['peak_gpu_memory_gib']} GiB")
    if loss:
        lines.append(f"- loss: start {_number(loss['start'])} (step {loss['start_step']}), lowest "
                     f"{_number(loss['min'])} (step {loss['min_step']}), end {_number(loss['end'])} "
                     f"(step {loss['end_step']})")
    if has_plot:
        lines += ["", "![loss curves](loss.png)"]
    bits = summary["heldout_bits_per_byte"]
    lines += ["", "## Metrics", "", f"- held-out bits per byte (`{HELDOUT_TEXT}`): "
              + (f"{bits:.4f}" if bits is not None else "not measured")]
    accuracy = summary.get("heldout_accuracy")
    if accuracy:
        lines.append(f"- accuracy on held-out pairs (chosen scored above rejected): start {accuracy['start']:.1%}, "
                     f"end {accuracy['end']:.1%}")
    for key, points in summary.get("rewards", {}).items():
        lines.append(f"- {key}: start {_number(points['start'])} (step {points['start_step']}), end "
                     f"{_number(points['end'])} (step {points['end_step']})" if points else f"- {key}: —")
    return "\n".join(lines) + "\n"


def write_stage_report(output_dir: str, stage: str, training_args, model=None, tokenizer=None) -> Path:
    """<output_dir>/report.md and report.json of a finished stage, from the files it wrote and sys.argv. With
    `model` and `tokenizer` it scores the model on the held-out text (utils.metrics.heldout_metrics); without them
    that metric reads "not measured"."""
    output = Path(output_dir)
    state = json.loads((output / "trainer_state.json").read_text())
    bits = None
    if model is not None:
        model.eval()
        bits = heldout_metrics(model, tokenizer, repo_path(HELDOUT_TEXT))["bits_per_byte"]
    summary = stage_summary(state, stage, bits)
    recipe_path, flags = split_command_line(sys.argv[1:])
    recipe = yaml.safe_load(Path(repo_path(recipe_path)).read_text()) if recipe_path else {}
    data_file = output / "data_report.json"
    markdown = stage_markdown(summary, sys.argv, config_rows(recipe, flags, training_args), library_versions(),
                              hardware(training_args.world_size), git_commit(),
                              json.loads(data_file.read_text()) if data_file.is_file() else None,
                              training_args.to_dict(), (output / "loss.png").is_file())
    (output / "report.md").write_text(markdown)
    (output / "report.json").write_text(json.dumps(summary, indent=2) + "\n")
    return output / "report.md"


def pipeline_report(results_dir: str) -> Path:
    """<results_dir>/report.md: a row per stage (pt, sft, dpo) linking its report, the evaluation's report, and the
    benchmark scores of each checkpoint when they were run."""
    results = Path(results_dir)
    lines = [f"# mini_qwen pipeline report: {results_dir}", "",
             "| stage | report | steps | tokens seen | final loss | held-out bits/byte | tokens/s (mean) | "
             "MFU (mean) |",
             "|---|---|---|---|---|---|---|---|"]
    for stage in STAGES + tuple(s for s in EXTRA_STAGES if (results / s / "report.json").is_file()):
        summary_file = results / stage / "report.json"
        if not summary_file.is_file():
            lines.append(f"| {stage} | not run | | | | | | |")
            continue
        summary = json.loads(summary_file.read_text())
        bits, mfu, loss, throughput = (summary[key] for key in ("heldout_bits_per_byte", "mfu", "loss",
                                                                "tokens_per_second"))
        cells = [f"[{stage}/report.md]({stage}/report.md)", f"{summary['steps']:,}",
                 human_count(summary["tokens_seen"]) if summary["tokens_seen"] else "—",
                 _number(loss["end"]) if loss else "—", f"{bits:.4f}" if bits is not None else "—",
                 _number(throughput["mean"]) if throughput else "—", f"{mfu['mean']:.1%}" if mfu else "—"]
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    evaluation = results / "eval" / "report.md"
    lines += ["", "Evaluation: " + ("[eval/report.md](eval/report.md)" if evaluation.is_file() else "not run")]
    benchmarks = results / "eval" / "benchmarks" / "report.json"
    if benchmarks.is_file():  # mini_qwen_eval.py --benchmarks: the checkpoints side by side
        from utils.eval_harness import score_table

        lines += ["", "Benchmarks, by lm-evaluation-harness's protocol "
                  "([eval/benchmarks/report.md](eval/benchmarks/report.md)):", "",
                  *score_table(json.loads(benchmarks.read_text(encoding="utf-8")))]
    (results / "report.md").write_text("\n".join(lines) + "\n")
    return results / "report.md"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    pipeline = sub.add_parser("pipeline", help="results_dir/report.md from the stage and eval reports in it")
    pipeline.add_argument("results_dir", help="the folder holding pt/, sft/, dpo/ and eval/, e.g. results/demo")
    args = parser.parse_args(argv)
    print(f"wrote {pipeline_report(repo_path(args.results_dir))}")


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
