"""Multiple-choice benchmarks (C-Eval, CMMLU, MMLU) scored by log-likelihood: accuracy per subject and benchmark.

    # C-Eval val, zero-shot, plain text prompt (for pretraining checkpoints)
    python -m utils.mc_eval --model_path results/pt --data data/eval/ceval/val
    # 5-shot from the dev split, prompt wrapped in the chat template (for SFT / DPO checkpoints)
    python -m utils.mc_eval --model_path results/sft --data data/eval/ceval/val --dev data/eval/ceval/dev \\
        --shots 5 --chat-template --output results/sft/mc_eval
    # several benchmarks in one report (--dev pairs with --data by position), a quick look at two subjects
    python -m utils.mc_eval --model_path results/sft --data data/eval/ceval/val data/eval/mmlu/val \\
        --dev data/eval/ceval/dev data/eval/mmlu/dev --shots 5 --subjects computer_network,abstract_algebra --limit 20
    # reference scoring: the summed log-likelihood of each option's text instead of its letter
    python -m utils.mc_eval --model_path results/pt --data data/eval/mmlu/val --score full

Published scores of one model differ by up to 17 points across protocols, so a number from this harness is only
comparable with numbers made by exactly this protocol:

Data. One CSV per subject; subject = the file name without `.csv` and without a split suffix `_dev`, `_val` or
`_test` (computer_network_val.csv -> computer_network). Header style, from the first row:
  ceval: `id,question,A,B,C,D,answer[,explanation...]`   cmmlu: `,Question,A,B,C,D,Answer`   (language zh)
  mmlu:  no header, every row is question,A,B,C,D,answer                                     (language en)
Question and option texts are stripped of surrounding whitespace; the answer must be one of A, B, C, D and no
option may be empty, else loading fails with file:line and the reason. `--limit N` keeps the first N questions.
The subject's display name comes from a LLaMA-Factory `mapping.json` ({subject: {"name": ...}}) in the data
folder or its parent (C-Eval: 计算机网络), else the subject with `_` -> space (MMLU: abstract algebra).

Prompt (k-shot, default k = 0; the shots are the first k rows of the same subject's CSV in the dev split):
  zh: "以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\\n\\n"
  en: "The following are multiple choice questions (with answers) about {subject}.\\n\\n"
then each of the k shots, then the question:
  zh: "{question}\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\n答案：" + for a shot "{answer}\\n\\n"
  en: "{question}\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\nAnswer:" + for a shot " {answer}\\n\\n"
(C-Eval's official prompt, and MMLU's original one). With --chat-template the whole prompt is the single user
message of the project's chat template, with the generation prompt added:
  "<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n"
and the answer is the assistant's first token. No system message.

Scoring (--score letter, the default). One forward pass over the prompt; the prediction is the letter whose token
has the highest log-probability at the prompt's last position. The scored continuation of the prompt is the
letter as the shots write their answers, or as a reply starts:
  plain zh: "A" (after "答案："), plain en: " A" (after "Answer:", with the space), chat template, zh and en:
  "A" (the first token of the assistant's reply, straight after "assistant\n"), and likewise B, C, D.
Each is one token of the Qwen2.5 vocabulary, and tokenizing prompt + continuation gives exactly the prompt's tokens
followed by that token; the harness checks both for every question and stops if not, rather than compare log-probs
that the model would never see in that form. ("Answer:A" would merge ":A" into one token: hence " A" in English.)
--score full: the sum of the log-probabilities of each option's text tokens, tokenized on their own (after the
same separator: " " in plain en, nothing otherwise) and appended to the prompt's tokens; not length-normalised,
so it favours short options: for reference only. Ties go to the earlier letter.

Report: accuracy per subject; per benchmark (the data folder's name, or its parent's for a split folder such as
ceval/val -> ceval), per language when several benchmarks share one, and over all subjects when there are several
benchmarks: the macro average (mean of the subjects' accuracies, the headline number) and the micro average
(correct / questions), with the number of questions and the chance level (25%) beside each. Printed as Markdown;
--output DIR also writes DIR/report.md and DIR/report.json (which holds every prediction and its four scores).
"""

import argparse
import csv
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch


from utils.config import repo_path
from utils.data import DataError
from utils.errors import ConfigError, MissingInputError, run_main

LETTERS = ("A", "B", "C", "D")
CHANCE = 1 / len(LETTERS)
SPLIT_SUFFIXES = ("_dev", "_val", "_test")
SPLIT_FOLDERS = {"dev", "val", "validation", "test"}
STYLE_LANGUAGE = {"ceval": "zh", "cmmlu": "zh", "mmlu": "en"}
HEADERS = {
    "zh": "以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n",
    "en": "The following are multiple choice questions (with answers) about {subject}.\n\n",
}
ANSWER_CUES = {"zh": "答案：", "en": "Answer:"}
# What separates the answer cue from the answer in the shots, and so from the scored continuation.
PLAIN_SEPARATORS = {"zh": "", "en": " "}

# (token ids, n) -> log-probabilities [n, vocab] of the token that follows each of the last n positions of the ids.
LogProbs = Callable[[Sequence[int], int], torch.Tensor]
# (prompt text, question, language) -> one score per option, higher is more likely; the argmax is the prediction.
ChoiceScorer = Callable[[str, "Question", str], Sequence[float]]


@dataclass(frozen=True)
class Question:
    question: str
    options: tuple[str, str, str, str]
    answer: str
    source: str  # "file:line" of the row, for error messages and the per-prediction record


@dataclass
class SubjectFile:
    subject: str
    path: Path
    style: str  # ceval | cmmlu | mmlu
    questions: list[Question]


@dataclass
class Benchmark:
    name: str
    folder: Path
    language: str
    subjects: dict[str, SubjectFile]
    display_names: dict[str, str]

    def display_name(self, subject: str) -> str:
        return self.display_names.get(subject, subject.replace("_", " "))


@dataclass
class SubjectResult:
    benchmark: str
    subject: str
    language: str
    predictions: list[dict] = field(default_factory=list)

    @property
    def questions(self) -> int:
        return len(self.predictions)

    @property
    def correct(self) -> int:
        return sum(p["prediction"] == p["answer"] for p in self.predictions)

    @property
    def accuracy(self) -> float:
        return self.correct / self.questions if self.questions else 0.0


# ---------------------------------------------------------------------------------------------------------- data


def subject_of(path: Path) -> str:
    stem = path.stem
    for suffix in SPLIT_SUFFIXES:
        if stem.endswith(suffix):
            return stem[: -len(suffix)]
    return stem


def detect_style(first_row: list[str]) -> str:
    cells = [cell.strip().lower() for cell in first_row]
    if cells[1:7] == ["question", "a", "b", "c", "d", "answer"]:
        if cells[0] == "id":
            return "ceval"
        if cells[0] == "":  # CMMLU's header names no index column: pandas wrote it
            return "cmmlu"
    if len(cells) == 6:
        return "mmlu"
    raise DataError(f"unrecognised header {first_row!r}: expected id,question,A,B,C,D,answer[,...] (C-Eval), "
                     f",Question,A,B,C,D,Answer (CMMLU) or six columns without a header (MMLU)")


def read_subject_csv(path: str | Path) -> SubjectFile:
    """One subject's questions. Every bad row fails with file:line (the row's first line) and the reason."""
    path = Path(path)
    with path.open(encoding="utf-8-sig", newline="") as handle:  # -sig: CSVs saved by Excel start with a BOM
        reader = csv.reader(handle)
        rows, start = [], 1
        for row in reader:
            rows.append((start, row))
            start = reader.line_num + 1  # a quoted cell may span lines: the next row starts after this one ends
    if not rows:
        raise DataError(f"{path}: empty file")
    try:
        style = detect_style(rows[0][1])
    except ValueError as error:
        raise DataError(f"{path}:1: {error}") from None
    body = rows if style == "mmlu" else rows[1:]
    first_column = 0 if style == "mmlu" else 1  # ceval/cmmlu rows begin with an id
    questions = []
    for line, row in body:
        where = f"{path}:{line}"
        if not any(cell.strip() for cell in row):
            continue  # a blank line, e.g. at the end of a hand-edited file
        cells = row[first_column: first_column + 6]
        if len(cells) < 6:
            raise DataError(f"{where}: {len(row)} columns, expected {first_column + 6} "
                             f"({'id, ' if first_column else ''}question, A-D, answer)")
        question, options, answer = cells[0].strip(), tuple(c.strip() for c in cells[1:5]), cells[5].strip()
        if not question:
            raise DataError(f"{where}: empty question")
        for letter, option in zip(LETTERS, options):
            if not option:
                raise DataError(f"{where}: option {letter} is missing")
        if answer not in LETTERS:
            raise DataError(f"{where}: answer {answer!r} is not one of A, B, C, D")
        questions.append(Question(question, options, answer, where))
    if not questions:
        raise DataError(f"{path}: no questions")
    return SubjectFile(subject_of(path), path, style, questions)


def benchmark_name(folder: Path) -> str:
    return folder.parent.name if folder.name.lower() in SPLIT_FOLDERS else folder.name


def read_display_names(folder: Path) -> dict[str, str]:
    for candidate in (folder / "mapping.json", folder.parent / "mapping.json"):
        if candidate.is_file():
            return {subject: entry["name"] for subject, entry in json.loads(candidate.read_text("utf-8")).items()}
    return {}


def load_benchmark(folder: str | Path, language: str | None = None) -> Benchmark:
    """Every *.csv of a folder, one subject each. `language` None: from the header style (C-Eval/CMMLU zh, MMLU en)."""
    folder = Path(folder)
    files = sorted(folder.glob("*.csv"))
    if not files:
        raise MissingInputError(f"{folder}: no CSV files there")
    subjects = {}
    for path in files:
        subject_file = read_subject_csv(path)
        if subject_file.subject in subjects:
            raise DataError(f"{path}: subject {subject_file.subject} also in {subjects[subject_file.subject].path}")
        subjects[subject_file.subject] = subject_file
    if language is None:
        languages = {STYLE_LANGUAGE[s.style] for s in subjects.values()}
        if len(languages) > 1:
            raise DataError(f"{folder}: files with and without a header mix languages; pass --language")
        language = languages.pop()
    return Benchmark(benchmark_name(folder), folder, language, subjects, read_display_names(folder))


# -------------------------------------------------------------------------------------------------------- prompts


def format_question(question: Question, language: str, with_answer: bool) -> str:
    text = question.question + "".join(f"\n{letter}. {option}" for letter, option in zip(LETTERS, question.options))
    text += "\n" + ANSWER_CUES[language]
    if with_answer:
        text += PLAIN_SEPARATORS[language] + question.answer + "\n\n"
    return text


def build_prompt(question: Question, shots: Sequence[Question], language: str, subject_name: str) -> str:
    """The prompt text before any chat template: header, shots with their answers, the question up to its cue."""
    return (HEADERS[language].format(subject=subject_name)
            + "".join(format_question(shot, language, with_answer=True) for shot in shots)
            + format_question(question, language, with_answer=False))


def answer_separator(language: str, chat_template: bool) -> str:
    """Text between the prompt and the answer: the assistant's reply starts straight after its header."""
    return "" if chat_template else PLAIN_SEPARATORS[language]


# -------------------------------------------------------------------------------------------------------- scoring


def score_letters(logprobs: LogProbs, prompt_ids: Sequence[int], letter_ids: Sequence[int]) -> list[float]:
    """Log-probabilities of the letter tokens at the prompt's last position (one forward pass)."""
    last = logprobs(prompt_ids, 1)[0]
    return [last[token].item() for token in letter_ids]


def score_continuations(logprobs: LogProbs, prompt_ids: Sequence[int],
                        continuations: Sequence[Sequence[int]]) -> list[float]:
    """Summed log-probability of each continuation's tokens after the prompt (one forward pass each)."""
    scores = []
    for continuation in continuations:
        # The last n positions of prompt + continuation[:-1] are the ones that predict the n continuation tokens.
        rows = logprobs(list(prompt_ids) + list(continuation[:-1]), len(continuation))
        scores.append(sum(rows[i, token].item() for i, token in enumerate(continuation)))
    return scores


def model_logprobs(model) -> LogProbs:
    """A LogProbs over a causal LM, computing logits for the last n positions only: a full [length, 151,936] float
    matrix per 5-shot prompt would cost gigabytes for the four numbers that letter scoring reads."""

    @torch.no_grad()
    def logprobs(ids: Sequence[int], positions: int) -> torch.Tensor:
        input_ids = torch.tensor([list(ids)], device=model.device)
        logits = model(input_ids=input_ids, logits_to_keep=positions, use_cache=False).logits[0]
        return torch.log_softmax(logits.float(), dim=-1)

    return logprobs


class LikelihoodScorer:
    """Scores a question's options with a tokenizer and a LogProbs by the protocol in the module docstring."""

    def __init__(self, tokenizer, logprobs: LogProbs, chat_template: bool = False, method: str = "letter"):
        if method not in ("letter", "full"):
            raise ConfigError(f"unknown scoring method {method!r}: letter or full")
        self.tokenizer, self.logprobs, self.chat_template, self.method = tokenizer, logprobs, chat_template, method

    def render(self, prompt: str) -> str:
        """The text the model reads: the prompt, or the prompt as the user turn followed by the assistant header."""
        if not self.chat_template:
            return prompt
        return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                  add_generation_prompt=True)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def letter_ids(self, rendered: str, prompt_ids: list[int], language: str) -> list[int]:
        separator = answer_separator(language, self.chat_template)
        letter_ids = []
        for letter in LETTERS:
            continuation = self.encode(separator + letter)
            if len(continuation) != 1 or self.encode(rendered + separator + letter) != prompt_ids + continuation:
                raise ConfigError(f"{separator + letter!r} is not one token after the prompt ending "
                                 f"{rendered[-20:]!r}: the letters cannot be compared at one position")
            letter_ids.append(continuation[0])
        return letter_ids

    def __call__(self, prompt: str, question: Question, language: str) -> list[float]:
        rendered = self.render(prompt)
        prompt_ids = self.encode(rendered)
        if self.method == "letter":
            return score_letters(self.logprobs, prompt_ids, self.letter_ids(rendered, prompt_ids, language))
        separator = answer_separator(language, self.chat_template)
        return score_continuations(self.logprobs, prompt_ids,
                                   [self.encode(separator + option) for option in question.options])


# ----------------------------------------------------------------------------------------------------- evaluation


def evaluate(benchmark: Benchmark, score_choices: ChoiceScorer, shots: int = 0, dev: Benchmark | None = None,
             limit: int | None = None, subjects: Sequence[str] | None = None,
             progress: Callable[[SubjectResult], None] | None = None) -> list[SubjectResult]:
    """Predict every question of the chosen subjects (all by default; the first `limit` of each)."""
    results = []
    for subject, subject_file in benchmark.subjects.items():
        if subjects is not None and subject not in subjects:
            continue
        examples = few_shot_examples(dev, subject, shots, benchmark.name)
        result = SubjectResult(benchmark.name, subject, benchmark.language)
        for question in subject_file.questions[:limit]:
            prompt = build_prompt(question, examples, benchmark.language, benchmark.display_name(subject))
            scores = list(score_choices(prompt, question, benchmark.language))
            prediction = LETTERS[max(range(len(LETTERS)), key=lambda i: scores[i])]  # first of equal maxima
            result.predictions.append({"source": question.source, "answer": question.answer,
                                       "prediction": prediction, "scores": scores})
        results.append(result)
        if progress:
            progress(result)
    return results


def few_shot_examples(dev: Benchmark | None, subject: str, shots: int, benchmark: str) -> list[Question]:
    if shots == 0:
        return []
    if dev is None:
        raise DataError(f"{benchmark}: {shots}-shot needs a dev split (--dev)")
    if subject not in dev.subjects:
        raise DataError(f"{benchmark}: no dev file for subject {subject} in {dev.folder}")
    examples = dev.subjects[subject].questions[:shots]
    if len(examples) < shots:
        raise DataError(f"{dev.subjects[subject].path}: {len(examples)} questions, fewer than {shots} shots")
    return examples


def group_row(name: str, language: str, results: Sequence[SubjectResult]) -> dict:
    questions = sum(r.questions for r in results)
    correct = sum(r.correct for r in results)
    return {"group": name, "language": language, "subjects": len(results), "questions": questions,
            "correct": correct, "macro_accuracy": sum(r.accuracy for r in results) / len(results),
            "micro_accuracy": correct / questions, "chance": CHANCE}


def summarise(results: Sequence[SubjectResult]) -> list[dict]:
    """Rows per benchmark; per language when several benchmarks share it; over everything when there are several."""
    benchmarks = list(dict.fromkeys(r.benchmark for r in results))
    rows = []
    for name in benchmarks:
        members = [r for r in results if r.benchmark == name]
        rows.append(group_row(name, members[0].language, members))
    for language in dict.fromkeys(r.language for r in results):
        members = [r for r in results if r.language == language]
        if len({r.benchmark for r in members}) > 1:
            rows.append(group_row(f"all {language}", language, members))
    if len(benchmarks) > 1:
        rows.append(group_row("all", "+".join(dict.fromkeys(r.language for r in results)), results))
    return rows


def build_report(results: Sequence[SubjectResult], settings: dict) -> dict:
    return {"settings": settings, "summary": summarise(results),
            "subjects": [{"benchmark": r.benchmark, "subject": r.subject, "language": r.language,
                          "questions": r.questions, "correct": r.correct, "accuracy": r.accuracy, "chance": CHANCE,
                          "predictions": r.predictions} for r in results]}


def to_markdown(report: dict) -> str:
    settings = report["settings"]
    lines = [f"# Multiple-choice evaluation: `{settings['model_path']}`", "",
             f"{settings['shots']}-shot, {'chat template' if settings['chat_template'] else 'plain prompt'}, "
             f"scored by {settings['score']} log-likelihood"
             + (f", first {settings['limit']} questions per subject" if settings["limit"] else "")
             + " (protocol: utils/mc_eval.py docstring)", "",
             "| benchmark | language | subjects | questions | macro accuracy | micro accuracy | chance |",
             "|---|---|---|---|---|---|---|"]
    for row in report["summary"]:
        lines.append(f"| {row['group']} | {row['language']} | {row['subjects']} | {row['questions']} | "
                     f"{row['macro_accuracy']:.1%} | {row['micro_accuracy']:.1%} | {row['chance']:.0%} |")
    lines += ["", "| benchmark | subject | questions | correct | accuracy | chance |", "|---|---|---|---|---|---|"]
    for row in report["subjects"]:
        lines.append(f"| {row['benchmark']} | {row['subject']} | {row['questions']} | {row['correct']} | "
                     f"{row['accuracy']:.1%} | {row['chance']:.0%} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------------ CLI


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", required=True, help="checkpoint folder")
    parser.add_argument("--data", nargs="+", required=True, help="folder(s) of per-subject CSVs, e.g. ceval/val")
    parser.add_argument("--dev", nargs="+", default=None,
                        help="few-shot folder for each --data folder, in the same order (default: a `dev` folder "
                             "beside each --data folder)")
    parser.add_argument("--shots", type=int, default=0, help="few-shot examples per question (0 or e.g. 5)")
    parser.add_argument("--chat-template", "--chat_template", dest="chat_template", action="store_true",
                        help="the prompt is the user turn of the chat template; the answer is the reply's first token")
    parser.add_argument("--score", choices=["letter", "full"], default="letter",
                        help="letter: the option letter's log-prob (default); full: each option text's summed log-prob")
    parser.add_argument("--limit", type=int, default=None, help="the first N questions of each subject")
    parser.add_argument("--subjects", default=None, help="comma-separated subjects, e.g. computer_network,virology")
    parser.add_argument("--language", choices=sorted(HEADERS), default=None,
                        help="prompt language for every --data folder (default: from the CSV header style)")
    parser.add_argument("--output", default=None, help="folder for report.md and report.json")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    args = parser.parse_args(argv)
    if args.dev is not None and len(args.dev) != len(args.data):
        parser.error(f"--dev takes one folder per --data folder ({len(args.data)}), got {len(args.dev)}")
    if args.shots < 0 or (args.limit is not None and args.limit < 1):
        parser.error("--shots must be >= 0 and --limit >= 1")
    return args


def dev_folder(data_folder: Path, given: str | None) -> Path | None:
    """The few-shot folder: as given, else a `dev` folder beside a split folder (ceval/val -> ceval/dev)."""
    if given is not None:
        return Path(repo_path(given))
    beside = data_folder.parent / "dev"
    return beside if data_folder.name.lower() in SPLIT_FOLDERS and beside.is_dir() else None


def main(argv=None):
    args = parse_args(argv)
    benchmarks = [load_benchmark(repo_path(folder), args.language) for folder in args.data]
    devs = []
    for index, benchmark in enumerate(benchmarks):
        folder = dev_folder(benchmark.folder, args.dev[index] if args.dev else None) if args.shots else None
        devs.append(load_benchmark(folder, benchmark.language) if folder else None)
    subjects = args.subjects.split(",") if args.subjects else None
    if subjects:
        unknown = set(subjects) - {s for b in benchmarks for s in b.subjects}
        if unknown:
            raise ConfigError(f"unknown subjects: {', '.join(sorted(unknown))}")

    from utils.modeling import load_checkpoint  # after the data checks: loading a model takes a while

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    model, tokenizer = load_checkpoint(repo_path(args.model_path), device)
    scorer = LikelihoodScorer(tokenizer, model_logprobs(model), args.chat_template, args.score)

    def progress(result: SubjectResult) -> None:
        print(f"{result.benchmark}/{result.subject}: {result.accuracy:.1%} of {result.questions}",
              file=sys.stderr, flush=True)

    results = []
    for benchmark, dev in zip(benchmarks, devs):
        results += evaluate(benchmark, scorer, args.shots, dev, args.limit, subjects, progress)
    settings = {"model_path": args.model_path, "data": args.data, "dev": [str(d.folder) if d else None for d in devs],
                "shots": args.shots, "chat_template": args.chat_template, "score": args.score, "limit": args.limit,
                "letter_continuations": {b.language: [answer_separator(b.language, args.chat_template) + letter
                                                      for letter in LETTERS] for b in benchmarks}}
    report = build_report(results, settings)
    markdown = to_markdown(report)
    print(markdown)
    if args.output:
        output = Path(repo_path(args.output))
        output.mkdir(parents=True, exist_ok=True)
        (output / "report.md").write_text(markdown, encoding="utf-8")
        (output / "report.json").write_text(json.dumps(report, ensure_ascii=False, indent=1), encoding="utf-8")
        print(f"report written to {output / 'report.md'} and report.json", file=sys.stderr)
    return report


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
