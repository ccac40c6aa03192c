"""Benchmarks through EleutherAI's lm-evaluation-harness (`lm_eval`, a library here): C-Eval, CMMLU, MMLU and GSM8K
on local files, by lm-eval's own protocol. The entry point is `python mini_qwen_eval.py --benchmarks ...`.

Protocol: lm-eval's `ceval-valid`, `cmmlu`, `mmlu` and `gsm8k` tasks as its installed YAMLs define them (prompt,
target, few-shot split and sampler, metrics, group aggregation), copied into utils/lm_eval_tasks/ with one change:
the data come from local files (local_data.py there) instead of the hub. For a multiple-choice question the model
scores " A" .. " D" after "答案：" / "Answer:" (the continuation starts with lm-eval's target delimiter, a space),
k shots come first (the first k rows of the subject's dev file, answered "答案： C"), and a benchmark's score is the
micro average over its questions (lm-eval's group score, weighted by subject size). GSM8K: greedy generation after
"Question: ...\\nAnswer:", exact match of the `#### <number>` (strict-match) or of the last number in the reply
(flexible-extract), 5-shot from the train file by default.

For each benchmark this module writes, under <output>/tasks/, a YAML per subject that includes the template above
with the subject's description (lm-eval's own, read from its installed YAML) and its files, and a group YAML; every
file is read and checked first (a bad row stops the run with file:line before any model loads). Then per
checkpoint: `lm_eval.simple_evaluate` with `HFLM` and `TaskManager(include_path=<output>/tasks)`, which writes
lm-eval's results JSON (results -> task -> "acc,none") and per-sample logs (samples_<task>_<date>.jsonl, what
`--log_samples` writes) to <output>/<checkpoint>/; and report.md / report.json beside them, with the checkpoints
side by side and the `python -m lm_eval` command that gives the same numbers.
"""

import json
import os
import shlex
import sys
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import yaml

from utils.config import repo_path
from utils.errors import ConfigError, MissingInputError
from utils.files import DataError
from utils.lm_eval_tasks.local_data import LocalDataError, read_csv, read_gsm8k, subject_of

TEMPLATES = Path(__file__).parent / "lm_eval_tasks"


@dataclass(frozen=True)
class Benchmark:
    template: str  # in utils/lm_eval_tasks/
    task: str  # our group (or task, for gsm8k) name; subjects are <task>_<subject>
    default_data: str  # the evaluated split's folder, as prepare.sh lays it out (or a file, for gsm8k)
    metrics: tuple[str, ...]  # lm-eval's result keys shown in the report
    upstream_group: str | None = None  # lm-eval's group YAML: how subjects aggregate
    upstream_subject: str | None = None  # lm-eval's per-subject YAML: the description

    @property
    def multiple_choice(self) -> bool:
        return self.upstream_subject is not None


BENCHMARKS = {
    "ceval": Benchmark("_ceval_yaml", "local-ceval-valid", "data/eval/ceval/val", ("acc,none",),
                       "ceval/_ceval-valid.yaml", "ceval/ceval-valid_{}.yaml"),
    "cmmlu": Benchmark("_cmmlu_yaml", "local-cmmlu", "data/eval/cmmlu/test", ("acc,none",),
                       "cmmlu/_cmmlu.yaml", "cmmlu/cmmlu_{}.yaml"),
    "mmlu": Benchmark("_mmlu_yaml", "local-mmlu", "data/eval/mmlu/test", ("acc,none",),
                      "mmlu/default/_mmlu.yaml", "mmlu/default/mmlu_{}.yaml"),
    "gsm8k": Benchmark("_gsm8k_yaml", "local-gsm8k", "data/grpo/gsm8k/main",
                       ("exact_match,strict-match", "exact_match,flexible-extract")),
}
GSM8K_SUFFIXES = (".jsonl", ".json", ".parquet")


def offline() -> None:
    """Nothing here may reach a hub: the checkpoint and the data are local."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def upstream_tasks() -> Path:
    import lm_eval  # cheap: its heavy imports are lazy

    return Path(lm_eval.__file__).parent / "tasks"


def parse_benchmarks(spec: str) -> dict[str, Path]:
    """'ceval,mmlu=path/to/mmlu/val' -> {name: data path}; a name alone takes prepare.sh's folder."""
    chosen = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, path = item.partition("=")
        if name not in BENCHMARKS:
            raise ConfigError(f"unknown benchmark {name!r}: one of {', '.join(BENCHMARKS)} (NAME or NAME=PATH)")
        chosen[name] = Path(repo_path(path or BENCHMARKS[name].default_data))
    if not chosen:
        raise ConfigError("--benchmarks is empty: e.g. ceval,cmmlu,mmlu,gsm8k")
    return chosen


def checked(read, path: Path):
    try:
        return read(path)
    except LocalDataError as error:
        raise DataError(str(error)) from None


def split_keys(folder: Path) -> tuple[str, dict]:
    """The evaluated split's name and the task keys that choose it: lm-eval scores a task's test split when it has
    one, else its validation split; so a `test` folder is a test split, any other (C-Eval's val, MMLU's val) `val`."""
    if folder.name == "test":
        return "test", {"test_split": "test", "validation_split": None}
    return "val", {"test_split": None, "validation_split": "val"}


def read_subject(path: Path, name: str) -> list[dict]:
    style, docs = checked(read_csv, path)
    if style != name:
        raise DataError(f"{path}:1: a {style} file in a {name} folder (header and column layout differ)")
    return docs


def mc_task_files(name: str, folder: Path, subjects: list[str] | None, shots: int | None) -> dict:
    """{subject: (YAML dict, questions)} for one multiple-choice benchmark; every file read and checked."""
    bench, upstream = BENCHMARKS[name], upstream_tasks()
    files = sorted(folder.glob("*.csv")) if folder.is_dir() else []
    if not files:
        raise MissingInputError(f"{folder}: no CSV files there ({name}: one CSV per subject; "
                                "`bash prepare.sh --only eval` fetches the sets)")
    dev = {subject_of(path): path for path in sorted((folder.parent / "dev").glob("*.csv"))}
    tasks = {}
    for path in files:
        subject = subject_of(path)
        if subjects is not None and subject not in subjects:
            continue
        docs = read_subject(path, name)
        upstream_yaml = upstream / bench.upstream_subject.format(subject)
        if not upstream_yaml.is_file():
            raise DataError(f"{path}: {subject} is not a {name} subject of lm-eval (no {upstream_yaml.name})")
        split, keys = split_keys(folder)
        data_files = {split: [str(path.resolve())]}
        if subject in dev:
            if len(read_subject(dev[subject], name)) < (shots or 0):
                raise DataError(f"{dev[subject]}: fewer questions than {shots} shots")
            data_files["dev"] = [str(dev[subject].resolve())]
        elif shots:
            raise MissingInputError(f"{name}: {shots}-shot needs {folder.parent / 'dev'}/{subject}*.csv")
        config = {"include": str(TEMPLATES / bench.template), "task": f"{bench.task}_{subject}",
                  "description": yaml.safe_load(upstream_yaml.read_text(encoding="utf-8"))["description"],
                  "dataset_kwargs": {"data_files": data_files}, **keys}
        if "dev" not in data_files:
            config["fewshot_split"] = None  # 0-shot without a dev folder: lm-eval would look the split up anyway
        tasks[subject] = (config, len(docs))
    return tasks


def gsm8k_task_file(path: Path, shots: int | None) -> tuple[dict, int]:
    """A file is the test split; a folder holds *test* and *train* files (prepare.sh: gsm8k/main/*.parquet)."""
    if path.is_file():
        test, train = [path], []
    else:
        files = sorted(p for p in path.glob("*") if p.suffix in GSM8K_SUFFIXES) if path.is_dir() else []
        test, train = [p for p in files if "test" in p.name], [p for p in files if "train" in p.name]
        if not test:
            raise MissingInputError(f"{path}: no test file there (*test*{'/'.join(GSM8K_SUFFIXES)}), or name one file")
    questions = sum(len(checked(read_gsm8k, p)) for p in test)
    for p in train:
        checked(read_gsm8k, p)
    shots = 5 if shots is None else shots  # lm-eval's gsm8k default
    if shots and not train:
        raise MissingInputError(f"{path}: gsm8k {shots}-shot takes its shots from a *train* file beside the test "
                                "file; none there (--shots 0, or a folder holding both)")
    data_files = {"test": [str(p.resolve()) for p in test]}
    if train:
        data_files["train"] = [str(p.resolve()) for p in train]
    config = {"include": str(TEMPLATES / BENCHMARKS["gsm8k"].template), "task": BENCHMARKS["gsm8k"].task,
              "dataset_kwargs": {"data_files": data_files}}
    if not train:  # 0-shot only (checked above): no split to sample shots from
        config.update(training_split=None, fewshot_split=None, num_fewshot=0)
    return config, questions


def write_tasks(chosen: dict[str, Path], out: Path, subjects: list[str] | None, shots: int | None,
                limit: int | None) -> dict[str, int]:
    """Check every file and write the task YAMLs to out; {group, task or subject task: questions scored}."""
    found, written, questions = set(), {}, {}
    for name, path in chosen.items():
        bench = BENCHMARKS[name]
        if not bench.multiple_choice:
            written[bench.task], count = gsm8k_task_file(path, shots)
            questions[bench.task] = min(count, limit or count)
            continue
        tasks = mc_task_files(name, path, subjects, shots)
        if not tasks:
            continue
        found |= set(tasks)
        group = yaml.safe_load((upstream_tasks() / bench.upstream_group).read_text(encoding="utf-8"))
        written[bench.task] = {"group": bench.task, "task": [config["task"] for config, _ in tasks.values()],
                               "aggregate_metric_list": group["aggregate_metric_list"], "metadata": group["metadata"]}
        for config, count in tasks.values():
            written[config["task"]] = config
            questions[config["task"]] = min(count, limit or count)
        questions[bench.task] = sum(questions[config["task"]] for config, _ in tasks.values())
    if subjects and set(subjects) - found:
        raise ConfigError(f"unknown subjects: {', '.join(sorted(set(subjects) - found))} (in none of the "
                          f"multiple-choice folders: {', '.join(str(p) for n, p in chosen.items() if n != 'gsm8k')})")
    if not questions:
        raise ConfigError("nothing to evaluate: no benchmark holds the chosen subjects")
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.yaml"):
        stale.unlink()  # an earlier run's subjects would join the index
    for task, config in written.items():
        (out / f"{task}.yaml").write_text(yaml.safe_dump(config, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return questions


@dataclass
class Settings:
    shots: int | None
    limit: int | None
    batch_size: str
    chat_template: bool
    device: str
    dtype: str
    max_gen_toks: int | None  # for generative tasks (gsm8k)

    def cli_command(self, model_path: str, tasks_dir: Path, tasks: list[str], output: Path) -> str:
        """The lm-eval command line that gives the same numbers and per-question predictions."""
        args = ["python", "-m", "lm_eval", "--model", "hf", "--model_args",
                f"pretrained={model_path},dtype={self.dtype}", "--device", self.device, "--batch_size", self.batch_size,
                "--include_path", str(tasks_dir), "--tasks", ",".join(tasks)]
        args += ["--num_fewshot", str(self.shots)] if self.shots is not None else []
        args += ["--limit", str(self.limit)] if self.limit else []
        args += ["--apply_chat_template"] if self.chat_template else []
        args += ["--gen_kwargs", f"max_gen_toks={self.max_gen_toks}"] if self.max_gen_toks else []
        return shlex.join(args + ["--log_samples", "--output_path", str(output)])


def run_checkpoint(model_path: str, tasks_dir: Path, tasks: list[str], settings: Settings, out: Path) -> dict:
    """One checkpoint through lm-eval; its results JSON and sample logs go to `out`."""
    offline()
    from lm_eval import simple_evaluate
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    batch_size = settings.batch_size if settings.batch_size == "auto" else int(settings.batch_size)
    model = HFLM(pretrained=model_path, device=settings.device, dtype=settings.dtype, batch_size=batch_size)
    # lm-eval ends a generation at max_length (prompt + max_gen_toks), but transformers lets a generation_config's
    # max_new_tokens (mini_qwen's checkpoints: 512) override that (lm-eval issue #2070): drop it.
    model.model.generation_config.max_new_tokens = None
    # A path ending in .json: lm-eval writes results_<date>.json and samples_<task>_<date>.jsonl right there.
    tracker = EvaluationTracker(output_path=str(out / "results.json"))
    start = time.perf_counter()
    results = simple_evaluate(
        model=model, model_args={"pretrained": model_path, "dtype": settings.dtype}, tasks=tasks,
        num_fewshot=settings.shots, limit=settings.limit, batch_size=batch_size, device=settings.device,
        log_samples=True, evaluation_tracker=tracker, apply_chat_template=settings.chat_template,
        fewshot_as_multiturn=settings.chat_template,  # as lm-eval's CLI does with --apply_chat_template
        gen_kwargs={"max_gen_toks": settings.max_gen_toks} if settings.max_gen_toks else None,
        task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False))
    seconds = time.perf_counter() - start
    samples = results.pop("samples")
    tracker.save_results_aggregated(results=results, samples=samples)
    for task in results["configs"]:
        tracker.save_results_samples(task_name=task, samples=samples[task])
    results_file = out / f"results_{tracker.date_id}.json"
    if not results_file.is_file():  # lm-eval logs a failed save as a warning only
        raise MissingInputError(f"lm-eval wrote no {results_file} (see its warning above)")
    questions = sum(results["n-samples"][task]["effective"] for task in results["configs"])
    return {"model": model_path, "results_file": str(results_file), "questions": questions, "seconds": seconds,
            "questions_per_second": questions / seconds, "results": results["results"],
            "lm_eval_command": settings.cli_command(model_path, tasks_dir, tasks, out / "lm_eval")}


def labels(model_paths: list[str]) -> list[str]:
    """Column and folder names: the checkpoint folders' names (pt, sft, ...), numbered if two share one."""
    names = [Path(path).name for path in model_paths]
    return names if len(set(names)) == len(names) else [f"{i}_{name}" for i, name in enumerate(names)]


def score(value: float | None, stderr: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.1%}" + (f" ± {stderr:.1%}" if isinstance(stderr, float) else "")


def score_table(report: dict, subjects: bool = False) -> list[str]:
    """Markdown rows: a benchmark (or, with subjects=True, a subject) and metric per row, a checkpoint per column."""
    runs = report["runs"]
    lines = ["| benchmark | metric | questions | " + " | ".join(run["label"] for run in runs) + " |",
             "|---|---|---|" + "---|" * len(runs)]
    for name, task in report["tasks"].items():
        bench = BENCHMARKS[name]
        rows = sorted(key for key in report["questions"] if key.startswith(task + "_")) if subjects else [task]
        for row in rows:
            for metric in bench.metrics:
                name_, filter_ = metric.split(",")
                cells = [score(run["results"].get(row, {}).get(metric),
                               run["results"].get(row, {}).get(f"{name_}_stderr,{filter_}")) for run in runs]
                lines.append(f"| {row} | {metric} | {report['questions'][row]} | " + " | ".join(cells) + " |")
    return lines


def to_markdown(report: dict) -> str:
    settings = report["settings"]
    shots = "each task's default (0-shot; gsm8k 5-shot)" if settings["shots"] is None else f"{settings['shots']}-shot"
    lines = ["# Benchmarks through lm-evaluation-harness", "",
             f"lm-eval {report['lm_eval_version']}, its tasks on local files (`utils/lm_eval_tasks`; generated "
             f"YAMLs in `{report['tasks_dir']}`): {shots}, "
             + ("chat template" if settings["chat_template"] else "plain prompt")
             + (f", first {settings['limit']} questions per subject" if settings["limit"] else "")
             + f", dtype {settings['dtype']}, batch size {settings['batch_size']}, device {settings['device']}. "
             "A benchmark's score is lm-eval's group score: the mean over its questions (± the standard error).", ""]
    lines += score_table(report)
    lines += ["", "| checkpoint | questions | seconds | questions/s | lm-eval results |", "|---|---|---|---|---|"]
    for run in report["runs"]:
        lines.append(f"| {run['label']}: `{run['model']}` | {run['questions']} | {run['seconds']:.1f} | "
                     f"{run['questions_per_second']:.2f} | `{run['results_file']}` |")
    lines += ["", "The same numbers and per-question predictions from lm-eval's own command line:", "", "```"]
    lines += [run["lm_eval_command"] for run in report["runs"]] + ["```", ""]
    if "gsm8k" in report["tasks"]:
        lines += ["(gsm8k: lm-eval's command line lets `max_new_tokens` in a checkpoint's generation_config.json "
                  "override max_gen_toks, lm-eval issue #2070; this run ignores it: delete it there for the same "
                  "generations.)", ""]
    if any(BENCHMARKS[name].multiple_choice for name in report["tasks"]):
        lines += ["<details><summary>per subject</summary>", ""] + score_table(report, subjects=True)
        lines += ["", "</details>"]
    return "\n".join(lines) + "\n"


def run(model_paths: list[str], benchmarks: str, output_dir: Path, subjects: list[str] | None,
        settings: Settings) -> dict:
    """Check the data, write the tasks, evaluate each checkpoint; report.md and report.json in output_dir."""
    offline()
    chosen = parse_benchmarks(benchmarks)
    if settings.limit is not None and settings.limit < 1 or settings.shots is not None and settings.shots < 0:
        raise ConfigError("--limit must be >= 1 and --shots >= 0")
    tasks_dir = output_dir / "tasks"
    questions = write_tasks(chosen, tasks_dir, subjects, settings.shots, settings.limit)
    if "gsm8k" not in chosen:
        settings.max_gen_toks = None  # only generation takes it: the report and the command line leave it out
    tasks = {name: BENCHMARKS[name].task for name in chosen if BENCHMARKS[name].task in questions}
    report = {"settings": vars(settings), "lm_eval_version": version("lm_eval"), "tasks_dir": str(tasks_dir),
              "tasks": tasks, "questions": questions, "runs": []}
    for label, path in zip(labels(model_paths), model_paths):
        result = run_checkpoint(path, tasks_dir, list(tasks.values()), settings, output_dir / label)
        report["runs"].append({"label": label, **result})
        print(f"{label}: " + ", ".join(f"{task} {result['results'][task][BENCHMARKS[name].metrics[0]]:.1%}"
                                       for name, task in tasks.items())
              + f" ({result['questions_per_second']:.2f} questions/s)", file=sys.stderr, flush=True)
    (output_dir / "report.json").write_text(json.dumps(report, ensure_ascii=False, indent=1), encoding="utf-8")
    (output_dir / "report.md").write_text(to_markdown(report), encoding="utf-8")
    return report
