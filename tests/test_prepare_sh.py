"""Tests of prepare.sh (the real-data downloader) that need no network and no modelscope.

The script is run with --dry-run, or from a copy in a temporary folder with a PATH that holds only basic
tools plus fake `modelscope`, `curl`, `df` and Python stand-ins, so that nothing is ever downloaded.
"""

import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "prepare.sh"
BASH = shutil.which("bash") or "/bin/bash"

INDUSTRIES = [
    "accommodation_catering_hotel",
    "artificial_intelligence_machine_learning",
    "computer_communication",
    "computer_programming_code",
    "film_entertainment",
    "literature_emotion",
    "news_media",
    "tourism_geography",
    "current_affairs_government_administration",
    "mathematics_statistics",
]
PT_FOLDERS = [f"{industry}/{lang}/high" for industry in INDUSTRIES for lang in ("chinese", "english")]
# The English folders that prepare.sh's PT_FIRST_N_FILES_ONLY limits to their first 3 files.
FIRST_3_ONLY = [
    "mathematics_statistics/english/high",
    "current_affairs_government_administration/english/high",
    "computer_communication/english/high",
    "literature_emotion/english/high",
    "film_entertainment/english/high",
]
# The GRPO math sets: target folder -> (ModelScope dataset id, include pattern).
GRPO_ITEMS = {
    "data/grpo/gsm8k": ("AI-ModelScope/gsm8k", "main/*.parquet"),
    "data/grpo/gsm8k_zh": ("testUser/GSM8K_zh", "GSM8K_zh.json"),
}
# Basic tools the script (and the fakes below) may call; modelscope, curl and python are left out on purpose.
BASIC_TOOLS = ["bash", "cat", "date", "dirname", "basename", "mkdir", "du", "df", "find", "timeout", "env",
               "touch", "printf", "head", "sort"]


def run(args, cwd=REPO_ROOT, script=SCRIPT, env=None):
    return subprocess.run([BASH, str(script), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=60)


def plan_blocks(stdout):
    """Map each planned item's target folder to the text of its block in the plan."""
    blocks, current = {}, []
    for line in stdout.splitlines():
        if line.startswith("["):
            current = [line]
        elif current:
            current.append(line)
            match = re.match(r"\s+target:\s+(\S+?)/?$", line)
            if match:
                blocks[match.group(1)] = "\n".join(current)
                current = []
    return blocks


def make_exe(path, text):
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def sandbox(tmp_path, fakes=None):
    """A copy of prepare.sh in an empty folder and an environment whose PATH holds only BASIC_TOOLS and fakes."""
    work = tmp_path / "repo"
    work.mkdir()
    shutil.copy(SCRIPT, work / "prepare.sh")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in BASIC_TOOLS:
        found = shutil.which(tool)
        if found and not (fakes and tool in fakes):
            (bin_dir / tool).symlink_to(found)
    for name, text in (fakes or {}).items():
        make_exe(bin_dir / name, text)
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path), "LC_ALL": "C"}
    return work, env


def test_bash_syntax():
    result = subprocess.run([BASH, "-n", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_help():
    result = run(["--help"])
    assert result.returncode == 0, result.stderr
    assert "Usage: bash prepare.sh" in result.stdout
    for flag in ("--only", "--dry-run", "--force"):
        assert flag in result.stdout
    assert re.search(r"^  grpo .*AI-ModelScope/gsm8k.*testUser/GSM8K_zh.*data/grpo/", result.stdout, re.M)
    assert "(pt, sft, dpo, model, eval, grpo)" in result.stdout


def test_dry_run_plans_the_full_recipe():
    result = run(["--dry-run"])
    assert result.returncode == 0, result.stderr
    out = result.stdout
    blocks = plan_blocks(out)
    for folder in PT_FOLDERS:
        block = blocks.get(f"data/pt/{folder}")
        assert block is not None, f"{folder} missing from the plan"
        assert "BAAI/IndustryCorpus2" in block and folder in block
        limited = "first 3 files only" in block
        assert limited == (folder in FIRST_3_ONLY), f"{folder}: 3-file rule is {limited}"
    for subset in ("7M", "Gen"):
        block = blocks.get(f"data/sft/{subset}")
        assert block is not None and "BAAI/Infinity-Instruct" in block and f"{subset}/" in block
    assert "BAAI/Infinity-Preference" in blocks.get("data/dpo", "")
    model = blocks.get("models/Qwen2.5-0.5B-Instruct", "")
    assert "Qwen/Qwen2.5-0.5B-Instruct" in model
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        assert name in model
    assert "safetensors" not in model
    for name in ("ceval", "cmmlu", "mmlu"):
        assert f"data/eval/{name}" in blocks
    for folder, (repo, include) in GRPO_ITEMS.items():
        assert repo in blocks.get(folder, "") and include in blocks[folder], folder
    assert re.search(r"^total: 29 items, ~\d+(\.\d)? GB", out, re.M), out[-500:]
    assert all(re.search(r"~\d+(\.\d)? [GM]B", block) for block in blocks.values())


def test_dry_run_only_sft():
    result = run(["--dry-run", "--only", "sft"])
    assert result.returncode == 0, result.stderr
    blocks = plan_blocks(result.stdout)
    assert set(blocks) == {"data/sft/7M", "data/sft/Gen"}
    assert "IndustryCorpus2" not in result.stdout and "[pt]" not in result.stdout


def test_dry_run_only_grpo():
    result = run(["--dry-run", "--only", "grpo"])
    assert result.returncode == 0, result.stderr
    blocks = plan_blocks(result.stdout)
    assert set(blocks) == set(GRPO_ITEMS)
    for folder, (repo, include) in GRPO_ITEMS.items():
        block = blocks[folder]
        assert block.startswith("[grpo] ") and f"source:  dataset {repo}" in block, block
        assert re.search(rf"include: {re.escape(include)}$", block, re.M), block
        assert re.search(r"~\d+ MB", block), block
    assert "total: 2 items" in result.stdout
    assert "[pt]" not in result.stdout and "[eval]" not in result.stdout


def test_only_is_repeatable_and_comma_separated():
    result = run(["--dry-run", "--only", "dpo,model", "--only=eval"])
    assert result.returncode == 0, result.stderr
    blocks = plan_blocks(result.stdout)
    assert set(blocks) == {"data/dpo", "models/Qwen2.5-0.5B-Instruct", "data/eval/ceval", "data/eval/cmmlu",
                           "data/eval/mmlu"}


@pytest.mark.parametrize("args", [["--only", "weights"], ["--only", "sft,bogus"], ["--only"], ["--frobnicate"],
                                  ["--wheels", "wheels"]])
def test_bad_arguments_fail_with_a_message(args):
    result = run(["--dry-run", *args])
    assert result.returncode != 0
    assert "prepare.sh:" in result.stderr
    if args[-1] not in ("--only",):
        assert args[-1].split(",")[-1] in result.stderr
    assert "[sft]" not in result.stdout


def test_dry_run_needs_no_modelscope_and_writes_nothing(tmp_path):
    work, env = sandbox(tmp_path)
    result = run(["--dry-run"], cwd=tmp_path, script=work / "prepare.sh", env=env)
    assert result.returncode == 0, result.stderr
    assert "total: 29 items" in result.stdout
    assert sorted(p.name for p in work.iterdir()) == ["prepare.sh"]


def test_missing_modelscope_fails_in_one_clear_line(tmp_path):
    work, env = sandbox(tmp_path)
    result = run(["--only", "dpo"], script=work / "prepare.sh", env=env)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "modelscope not installed" in lines[0] and "pip install" in lines[0], result.stderr


def test_items_with_a_marker_are_skipped(tmp_path):
    work, env = sandbox(tmp_path)
    (work / "data" / "dpo").mkdir(parents=True)
    (work / "data" / "dpo" / ".prepare_done").write_text("done\n")
    dry = run(["--dry-run", "--only", "dpo"], script=work / "prepare.sh", env=env)
    assert dry.returncode == 0 and "[done" in dry.stdout and "1 already done" in dry.stdout, dry.stdout
    # A real run with nothing left to do succeeds without modelscope (none is on this PATH).
    real = run(["--only", "dpo"], script=work / "prepare.sh", env=env)
    assert real.returncode == 0, real.stderr
    assert "nothing to do" in real.stdout


FAKE_MODELSCOPE = """#!{bash}
# Fake modelscope: logs its arguments; `download` creates the files that --include names (globs get one
# file), or a README for a whole repository.
echo "$*" >> "{log}"
[ "$1" = download ] || exit 9
if [ "$2" = --help ]; then echo "usage: modelscope download [--repo-type {{model,dataset}}] [--local-dir DIR] [--include P]"; exit 0; fi
shift
patterns=(); dir=""
while [ $# -gt 0 ]; do
    case "$1" in
        --repo-type) shift ;;
        --local-dir) dir=$2; shift ;;
        --include) shift; while [ $# -gt 0 ] && [ "${{1#--}}" = "$1" ]; do patterns+=("$1"); shift; done; continue ;;
    esac
    shift
done
[ ${{#patterns[@]}} -gt 0 ] || patterns=(README.md)
for p in "${{patterns[@]}}"; do
    f="$dir/${{p//\\*/fake}}"
    mkdir -p "$(dirname "$f")" && touch "$f"
done
"""

FAKE_PYTHON = """#!{bash}
# Fake python for prepare.sh's file listing: `-c ...` succeeds, `- REPO FOLDER GLOB N` prints N file names.
[ "$1" = -c ] && exit 0
for i in $(seq 0 $(( $5 - 1 ))); do echo "$3/rank_0000$i.parquet"; done
"""


def test_disk_check_stops_before_any_download(tmp_path):
    log = tmp_path / "calls.log"
    fakes = {
        "modelscope": FAKE_MODELSCOPE.format(bash=BASH, log=log),
        "curl": f"#!{BASH}\necho curl >> '{log}'\n",
        "df": f"#!{BASH}\necho 'Filesystem 1024-blocks Used Available Capacity Mounted on'\n"
              f"echo '/dev/fake 1000000 999000 1000 100% /'\n",
    }
    work, env = sandbox(tmp_path, fakes)
    result = run(["--only", "sft"], script=work / "prepare.sh", env=env)
    assert result.returncode != 0
    assert "not enough free disk space" in result.stderr and "--force" in result.stderr, result.stderr
    calls = log.read_text().splitlines() if log.exists() else []
    assert calls == ["download --help"], calls


def test_download_flow_with_fake_modelscope(tmp_path):
    log = tmp_path / "calls.log"
    fakes = {
        "modelscope": FAKE_MODELSCOPE.format(bash=BASH, log=log),
        "curl": f"#!{BASH}\nexit 0\n",
        "seq": f"#!{BASH}\ni=$1; while [ $i -le $2 ]; do echo $i; i=$((i+1)); done\n",
        "fakepython": FAKE_PYTHON.format(bash=BASH),
    }
    work, env = sandbox(tmp_path, fakes)
    env["PYTHON"] = "fakepython"
    result = run(["--only", "pt,model,dpo", "--force"], script=work / "prepare.sh", env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr
    for folder in PT_FOLDERS:
        assert (work / "data/pt" / folder / ".prepare_done").is_file(), folder
    assert (work / "data/dpo/.prepare_done").is_file()
    assert (work / "models/Qwen2.5-0.5B-Instruct/.prepare_done").is_file()
    assert (work / "models/Qwen2.5-0.5B-Instruct/tokenizer.json").is_file()
    calls = log.read_text().splitlines()
    folder = "mathematics_statistics/english/high"
    expected = " ".join(f"{folder}/rank_0000{i}.parquet" for i in range(3))
    assert f"download --repo-type dataset BAAI/IndustryCorpus2 --include {expected} --local-dir data/pt" in calls
    assert ("download --repo-type dataset BAAI/IndustryCorpus2 --include "
            "news_media/english/high/*.parquet --local-dir data/pt") in calls
    assert any(c.startswith("download --repo-type model Qwen/Qwen2.5-0.5B-Instruct --include config.json")
               for c in calls)
    # A second run finds every marker and downloads nothing.
    log.unlink()
    again = run(["--only", "pt,model,dpo"], script=work / "prepare.sh", env=env)
    assert again.returncode == 0 and "nothing to do" in again.stdout, again.stderr
    assert not log.exists()


def test_grpo_download_with_fake_modelscope(tmp_path):
    log = tmp_path / "calls.log"
    fakes = {"modelscope": FAKE_MODELSCOPE.format(bash=BASH, log=log), "curl": f"#!{BASH}\nexit 0\n"}
    work, env = sandbox(tmp_path, fakes)
    result = run(["--only", "grpo", "--force"], script=work / "prepare.sh", env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr
    calls = log.read_text().splitlines()
    assert calls == ["download --help",
                     "download --repo-type dataset AI-ModelScope/gsm8k --include main/*.parquet "
                     "--local-dir data/grpo/gsm8k",
                     "download --repo-type dataset testUser/GSM8K_zh --include GSM8K_zh.json "
                     "--local-dir data/grpo/gsm8k_zh"], calls
    assert (work / "data/grpo/gsm8k/main/fake.parquet").is_file()
    assert (work / "data/grpo/gsm8k_zh/GSM8K_zh.json").is_file()
    for folder, (repo, include) in GRPO_ITEMS.items():
        marker = (work / folder / ".prepare_done").read_text()
        assert f"source: dataset {repo}" in marker and f"include: {include}" in marker, marker
    assert sorted(p.name for p in (work / "data").iterdir()) == ["grpo"]  # nothing else was fetched
    # A second run finds both markers and downloads nothing.
    log.unlink()
    again = run(["--only", "grpo"], script=work / "prepare.sh", env=env)
    assert again.returncode == 0 and "nothing to do" in again.stdout, again.stderr
    assert not log.exists()


def test_grpo_download_stops_when_the_file_is_missing(tmp_path):
    # A modelscope that succeeds but leaves nothing behind (e.g. the repository layout changed).
    log = tmp_path / "calls.log"
    fake = (f"#!{BASH}\necho \"$*\" >> '{log}'\n"
            "if [ \"$2\" = --help ]; then echo 'usage: --repo-type --local-dir --include'; fi\nexit 0\n")
    work, env = sandbox(tmp_path, {"modelscope": fake, "curl": f"#!{BASH}\nexit 0\n"})
    result = run(["--only", "grpo", "--force"], script=work / "prepare.sh", env=env)
    assert result.returncode != 0
    assert "AI-ModelScope/gsm8k" in result.stderr and "main/*.parquet" in result.stderr, result.stderr
    assert not (work / "data/grpo/gsm8k/.prepare_done").exists()


