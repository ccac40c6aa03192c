"""Download the real data and model files of the full mini_qwen recipe from ModelScope (`bash prepare.sh` runs this).

    python -m tools.download --dry-run                  # the plan: every item, source, target and size; no network
    python -m tools.download                            # the recipe's parts: pt sft dpo model eval grpo (~50 GB)
    python -m tools.download --only sft,dpo --only eval # some parts (repeatable, comma-separated)
    python -m tools.download --only teacher [--teacher Qwen/Qwen2.5-7B-Instruct]   # the distillation teacher

Paths are relative to the current folder (prepare.sh runs from the repository root). The demo configs
(configs/demo_*.yaml) use mini_data/ and need nothing from here. Python packages for a GPU machine without
internet: `python -m tools.deps wheels DIR`.

Resumable: an item whose files all arrived and were checked gets a `.prepare_done` marker in its target folder and
is skipped next time; rerun after an interruption and modelscope resumes partial files. Checked means: every file
the hub lists for the item (modelscope's HubApi file listing) is there with the listed size and, where the listing
gives one (`Sha256`), the listed sha256. Before any download the free disk space is checked (--force skips that).
"""

import argparse
import fnmatch
import hashlib
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from utils.errors import ConfigError, UserError, run_main

MARKER = ".prepare_done"
DISK_MARGIN, DISK_MARGIN_MB = 0.10, 1000   # free space needed: what is left to download + 10% + 1 GB


@dataclass(frozen=True)
class Item:
    part: str
    name: str
    repo: str
    repo_type: str               # "model" or "dataset"
    patterns: tuple[str, ...]    # globs over repository paths, matched as modelscope does; () = the whole repository
    local_dir: str               # modelscope's local_dir: repository paths are kept below it
    approx_mb: int               # estimate for the plan and the disk check; 0 = unknown
    subdir: str = ""             # the item's own folder below local_dir (where its marker goes)
    first_n: int = 0             # > 0: only the first N matching files, sorted by name

    @property
    def target(self) -> str:
        return str(Path(self.local_dir, self.subdir))

    @property
    def marker(self) -> Path:
        return Path(self.target) / MARKER


# Pretraining (configs/pt.yaml): IndustryCorpus2, high-quality tier, 10 industries x {chinese, english}. Approximate
# whole-folder sizes in MB (chinese, english), from the original mini_qwen README.
PT_SIZES_MB = {
    "accommodation_catering_hotel": (371, 718), "artificial_intelligence_machine_learning": (267, 1600),
    "computer_communication": (5100, 13000), "computer_programming_code": (273, 512),
    "film_entertainment": (2200, 8900), "literature_emotion": (4500, 12000), "news_media": (319, 3100),
    "tourism_geography": (1900, 3100), "current_affairs_government_administration": (8700, 35000),
    "mathematics_statistics": (172, 42000),
}
# The five largest English folders (8.9 to 42 GB) are too big to take whole: only their first PT_FIRST_N files
# (sorted by name) are fetched, as the original mini_qwen did (~16B tokens in all). A high-tier file is ~0.5 GB.
PT_FIRST_N, PT_MB_PER_FILE = 3, 520
PT_FIRST_N_ONLY = {f"{industry}/english" for industry in ("mathematics_statistics", "literature_emotion",
                   "current_affairs_government_administration", "computer_communication", "film_entertainment")}


def pt_item(industry: str, language: str, mb: int) -> Item:
    folder = f"{industry}/{language}/high"
    if f"{industry}/{language}" not in PT_FIRST_N_ONLY:
        return Item("pt", f"pretraining {folder}", "BAAI/IndustryCorpus2", "dataset", (f"{folder}/*.parquet",),
                    "data/pt", mb, folder)
    return Item("pt", f"pretraining {folder}", "BAAI/IndustryCorpus2", "dataset", (f"{folder}/rank_*.parquet",),
                "data/pt", min(mb, PT_FIRST_N * PT_MB_PER_FILE), folder, PT_FIRST_N)


# Sizes of the SFT/DPO sets: the original README's; the rest are rough guesses. The eval ids are the ones OpenCompass
# lists as its ModelScope sources (file layout not checked here: if one has moved, fix the id). GRPO: English GSM8K
# (EvalScope's id; main subset only) and a Chinese GSM8K in one JSON of both splits (a GRPO loader reads question_zh
# and answer_only, configs/grpo.yaml); neither layout was checked against the hub from here.
ITEMS = [
    *(pt_item(industry, language, mb) for industry, sizes in PT_SIZES_MB.items()
      for language, mb in zip(("chinese", "english"), sizes)),
    Item("sft", "SFT subset 7M", "BAAI/Infinity-Instruct", "dataset", ("7M/*.parquet",), "data/sft", 5700, "7M"),
    Item("sft", "SFT subset Gen", "BAAI/Infinity-Instruct", "dataset", ("Gen/*.parquet",), "data/sft", 2700, "Gen"),
    Item("dpo", "preference pairs (train + test)", "BAAI/Infinity-Preference", "dataset", ("*.parquet",), "data/dpo",
         210),
    # The base model's tokenizer and configs, no weights: mini_qwen trains from scratch.
    Item("model", "base model configs + tokenizer (no weights)", "Qwen/Qwen2.5-0.5B-Instruct", "model",
         ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json",
          "merges.txt"), "models/Qwen2.5-0.5B-Instruct", 12),
    Item("eval", "benchmark ceval", "opencompass/ceval-exam", "dataset", (), "data/eval/ceval", 20),
    Item("eval", "benchmark cmmlu", "opencompass/cmmlu", "dataset", (), "data/eval/cmmlu", 20),
    Item("eval", "benchmark mmlu", "opencompass/mmlu", "dataset", (), "data/eval/mmlu", 250),
    Item("grpo", "math word problems gsm8k", "AI-ModelScope/gsm8k", "dataset", ("main/*.parquet",), "data/grpo/gsm8k",
         3),
    Item("grpo", "math word problems gsm8k_zh", "testUser/GSM8K_zh", "dataset", ("GSM8K_zh.json",),
         "data/grpo/gsm8k_zh", 15),
]

# configs/distill.yaml's teacher_path is models/Qwen2.5-1.5B-Instruct: the default teacher lands exactly there. Any
# Qwen2.5 model shares our tokenizer id for id, so any can teach (another one needs --teacher_path).
DEFAULT_TEACHER = "Qwen/Qwen2.5-1.5B-Instruct"


def teacher_item(repo: str) -> Item:
    # bf16 weights: 2 bytes per parameter, the count read from the name ("...-7B-...": Qwen2.5's 7B has 7.6B, hence
    # 2.1 GB per named billion); unknown otherwise.
    billions = re.search(r"(\d+(?:\.\d+)?)B\b", repo.split("/")[-1])
    return Item("teacher", f"distillation teacher {repo} (weights)", repo, "model",
                ("*.safetensors", "*.json", "merges.txt"),   # the weights (and their index), configs, tokenizer
                f"models/{repo.split('/')[-1]}", round(float(billions.group(1)) * 2100) if billions else 0)


PARTS = {
    "pt": "BAAI/IndustryCorpus2, high tier, 10 industries x chinese/english -> data/pt/<industry>/<language>/high/\n"
          f"           (the five largest English folders: their first {PT_FIRST_N} files only)",
    "sft": "BAAI/Infinity-Instruct subsets 7M and Gen -> data/sft/{7M,Gen}/",
    "dpo": "BAAI/Infinity-Preference train and test -> data/dpo/",
    "model": "Qwen/Qwen2.5-0.5B-Instruct configs and tokenizer, no weights -> models/Qwen2.5-0.5B-Instruct/",
    "eval": "C-Eval, CMMLU, MMLU (benchmark sets, whole repositories) -> data/eval/{ceval,cmmlu,mmlu}/",
    "grpo": "GSM8K (AI-ModelScope/gsm8k, main) and GSM8K_zh (testUser/GSM8K_zh) -> data/grpo/{gsm8k,gsm8k_zh}/",
    "teacher": f"{DEFAULT_TEACHER} (or --teacher REPO_ID), whole weights, for distillation -> models/<name>/",
}
DEFAULT_PARTS = [part for part in PARTS if part != "teacher"]
TEACHER_WHY = ("The teacher is not in the default set: its weights are large (~3 GB for 1.5B, ~15 GB for 7B) and\n"
               "only the distillation stage (mini_qwen_distill.py) needs them. Ask for it: --only teacher (or all).")


def plan(parts: list[str], teacher: str = DEFAULT_TEACHER) -> list[Item]:
    return [item for item in ITEMS if item.part in parts] + ([teacher_item(teacher)] if "teacher" in parts else [])


# The hub: the only two functions that touch the network (tests replace them). modelscope is imported in them, so
# that --dry-run, a run with nothing left to do, and the tests need neither it nor a network.
@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int | None
    sha256: str | None


def _modelscope():
    try:
        import modelscope
    except ImportError:
        raise UserError("modelscope is not installed: pip install -r requirements.txt -c constraints.txt") from None
    return modelscope


def list_remote_files(repo: str, repo_type: str, root: str | None) -> list[RemoteFile]:
    """Every file of `repo` (below the folder `root`, when given) with the size and sha256 the hub lists."""
    _modelscope()
    from modelscope_hub.api import HubApi   # what modelscope >= 1.40 is built on

    # The very listing that snapshot_download makes (HubApi.legacy is its downloader's client), so the files checked
    # are the files fetched. modelscope.hub.api.HubApi.get_model_files would drop the checksums. Listing only `root`
    # keeps IndustryCorpus2 (thousands of files) short; datasets are paged through.
    entries = HubApi().legacy.list_repo_files(repo_id=repo, repo_type=repo_type, recursive=True, root=root)
    files = []
    for entry in entries:
        path = str(entry.get("Path") or entry.get("path") or "").lstrip("/")
        size = entry.get("Size", entry.get("size"))
        if path and (entry.get("Type") or entry.get("type")) != "tree" and (not root or path.startswith(root + "/")):
            files.append(RemoteFile(path, None if size is None else int(size), entry.get("Sha256") or None))
    return files


def fetch(item: Item, patterns: list[str]) -> None:
    """Download the files of `item` that match `patterns` (all of them for []) into its local_dir."""
    _modelscope().snapshot_download(repo_id=item.repo, repo_type=item.repo_type, allow_patterns=patterns or None,
                                    local_dir=item.local_dir)


def size_text(mb: float) -> str:
    return f"~{mb / 1000:.1f} GB" if mb >= 1000 else f"~{mb:.0f} MB"


def print_plan(items: list[Item], parts: list[str], dry_run: bool) -> None:
    print(f"prepare plan{' (dry run: nothing is downloaded)' if dry_run else ''}; parts: {' '.join(parts)}")
    done = [item for item in items if item.marker.is_file()]
    for item in items:
        include = " ".join(item.patterns) or "(whole repository)"
        if item.first_n:
            include += f"  (first {item.first_n} files only, sorted by name)"
        status = f"[done: {MARKER} present, skipped]" if item in done else "[pending]"
        print(f"[{item.part}] {item.name}  {size_text(item.approx_mb) if item.approx_mb else 'size unknown'}  {status}")
        print(f"      source:  {item.repo_type} {item.repo}\n      include: {include}\n      target:  {item.target}/")
    total = sum(item.approx_mb for item in items)
    left = total - sum(item.approx_mb for item in done)
    print(f"total: {len(items)} items, {size_text(total)} (approximate); {len(done)} already done, "
          f"{size_text(left)} left to download")


def check_disk(pending: list[Item]) -> None:
    """Refuse to start when a filesystem lacks room for what is left to download (a partial download counts)."""
    needs: dict[int, list] = {}   # device -> [a folder on it, MB needed]
    for item in pending:
        probe = Path(item.target).absolute()
        while not probe.exists():
            probe = probe.parent
        have = sum(p.stat().st_size for p in Path(item.target).rglob("*") if p.is_file()) // 1_000_000
        needs.setdefault(os.stat(probe).st_dev, [probe, 0])[1] += max(0, item.approx_mb - have)
    for probe, mb in needs.values():
        want = mb * (1 + DISK_MARGIN) + DISK_MARGIN_MB
        free = shutil.disk_usage(probe).free / 1e6
        if free < want:
            raise UserError(f"not enough free disk space on the filesystem of {probe}: need {size_text(want)} "
                            f"({size_text(mb)} planned + {DISK_MARGIN:.0%} + {size_text(DISK_MARGIN_MB)} margin), "
                            f"have {size_text(free)[1:]}; free space, pick parts with --only, or pass --force to "
                            "skip this check")


def listing_root(patterns: tuple[str, ...]) -> str | None:
    """The literal folder that every pattern lies in: listing only it keeps IndustryCorpus2's listing short."""
    folders = [re.split(r"[*?[]", pattern)[0].rpartition("/")[0] for pattern in patterns]
    return (os.path.commonpath(folders) or None) if folders and all(folders) else None


def select_files(item: Item, listed: list[RemoteFile]) -> list[RemoteFile]:
    """The listed files the item takes; every pattern must match something, else the repository has changed."""
    for pattern in item.patterns or ("*",):
        if not any(fnmatch.fnmatch(file.path, pattern) for file in listed):
            raise UserError(f"nothing matching '{pattern}' in {item.repo_type} {item.repo} ({item.name}): has the "
                            f"repository changed? see https://www.modelscope.cn/{item.repo_type}s/{item.repo}")
    chosen = sorted((file for file in listed if any(fnmatch.fnmatch(file.path, p) for p in item.patterns or ("*",))),
                    key=lambda file: file.path)
    return chosen[:item.first_n] if item.first_n else chosen


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def verify(item: Item, expected: list[RemoteFile]) -> None:
    """Every expected file is on disk with the listed size and sha256; the first that is not is named."""
    rerun = "rerun prepare.sh: modelscope fetches a missing or mismatched file again"
    for file in expected:
        local = Path(item.local_dir) / file.path
        if not local.is_file():
            raise UserError(f"download of {item.repo} ({item.name}) ended, but {local} is missing; {rerun}")
        if file.size is not None and local.stat().st_size != file.size:
            raise UserError(f"{local}: {local.stat().st_size} bytes, the hub lists {file.size}; {rerun}")
        if file.sha256 and sha256_of(local) != file.sha256.lower():
            raise UserError(f"{local}: sha256 does not match the hub's ({file.sha256[:16]}...); {rerun}")


def download_item(item: Item) -> None:
    print(f"\n==> [{item.part}] {item.name}: {item.repo_type} {item.repo} -> {item.target}/")
    try:
        expected = select_files(item, list_remote_files(item.repo, item.repo_type, listing_root(item.patterns)))
        # The first-N rule needs the exact names, so that modelscope fetches those files and no others.
        patterns = [file.path for file in expected] if item.first_n else list(item.patterns)
        if item.first_n:
            print(f"    first {item.first_n} files: {' '.join(patterns)}")
        Path(item.target).mkdir(parents=True, exist_ok=True)
        fetch(item, patterns)
    except UserError:
        raise
    except Exception as err:   # network, hub and modelscope errors alike: one line, and what to do
        raise UserError(f"download of {item.repo} ({item.name}) failed: {type(err).__name__}: {str(err)[:300]}; "
                        "no network? rerun prepare.sh to resume") from err
    print(f"    checking {len(expected)} files (size, and sha256 where the hub lists one)")
    verify(item, expected)
    # Written last and atomically: a marker always means a complete, checked item.
    partial = item.marker.with_name(MARKER + ".partial")
    partial.write_text(f"source: {item.repo_type} {item.repo}\ninclude: {' '.join(patterns) or '(whole repository)'}"
                       f"\nfiles: {len(expected)}\nfinished: {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n")
    partial.replace(item.marker)
    print(f"    done ({item.marker} written)")


def parse_parts(values: list[str] | None) -> list[str]:
    chosen = []
    for part in (part for value in values or [] for part in value.split(",") if part):
        if part != "all" and part not in PARTS:
            raise ConfigError(f"unknown --only value '{part}' (choose from: {', '.join(PARTS)}, all)")
        chosen += list(PARTS) if part == "all" else [part]
    return list(dict.fromkeys(chosen)) or DEFAULT_PARTS   # in the order given, once each


def main(argv=None):
    parts_help = "\n".join(f"  {name:<8} {text}" for name, text in PARTS.items())
    parser = argparse.ArgumentParser(
        prog="prepare.sh", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"parts:\n{parts_help}\nWithout --only: {' '.join(DEFAULT_PARTS)} (see --dry-run).\n{TEACHER_WHY}")
    parser.add_argument("--only", action="append", metavar="PART[,PART...]",
                        help=f"fetch only these parts ({', '.join(PARTS)}, or all: every part, teacher included); "
                             "repeatable")
    parser.add_argument("--teacher", metavar="REPO_ID", help=f"the model that --only teacher fetches (default "
                        f"{DEFAULT_TEACHER}); a Qwen2.5 model, so that it shares the student's tokenizer")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and a total, download nothing")
    parser.add_argument("--force", action="store_true", help="skip the free-disk-space check")
    args = parser.parse_args(argv)
    parts = parse_parts(args.only)
    if args.teacher is not None:
        if "teacher" not in parts:
            raise ConfigError("--teacher picks the model that the teacher part fetches: add --only teacher")
        if not re.fullmatch(r"[\w.-]+/[\w.-]+", args.teacher):
            raise ConfigError(f"--teacher {args.teacher!r}: expected a ModelScope model id such as {DEFAULT_TEACHER}")
    items = plan(parts, args.teacher or DEFAULT_TEACHER)
    print_plan(items, parts, args.dry_run)
    if args.teacher and args.teacher != DEFAULT_TEACHER:
        print(f"note: configs/distill.yaml reads {teacher_item(DEFAULT_TEACHER).target}; give mini_qwen_distill.py "
              f"--teacher_path {teacher_item(args.teacher).target}")
    if args.dry_run:
        print("dry run: nothing was downloaded")
        return
    pending = [item for item in items if not item.marker.is_file()]
    if not pending:
        print("nothing to do: every selected item is already done")
        return
    if args.force:
        print("--force: free-disk-space check skipped")
    else:
        check_disk(pending)
    for item in items:
        if item in pending:
            download_item(item)
        else:
            print(f"skip [{item.part}] {item.name}: already done")
    print(f"\nall selected items are done ({size_text(sum(item.approx_mb for item in pending))} approximately)")


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
