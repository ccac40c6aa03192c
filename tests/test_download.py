"""tools/download.py (what `bash prepare.sh` runs), with no network and no modelscope: a fake hub stands in for the
two functions that touch it (`list_remote_files`, `fetch`)."""

import fnmatch
import hashlib
import re
import subprocess
from collections import namedtuple
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from tools import download
from utils.errors import ConfigError, UserError

DiskUsage = namedtuple("DiskUsage", "total used free")


class FakeHub:
    """A hub whose repositories hold what the downloader asks for: four rank_*.parquet files (listed out of name
    order) in any folder, and at the top one file per pattern of the repository's items plus a README. A file's
    content is its path; `damage` spoils the first file a fetch writes."""

    def __init__(self):
        self.listed, self.fetched, self.damage = [], [], None

    def list_remote_files(self, repo, repo_type, root):
        self.listed.append((repo, root))
        if root:
            paths = [f"{root}/rank_{i}.parquet" for i in (10, 2, 0, 1)]
        else:
            items = download.ITEMS + [download.teacher_item(repo)]
            paths = [p.replace("*", "x") for item in items if item.repo == repo for p in item.patterns] + ["README.md"]
        return [download.RemoteFile(p, len(p), hashlib.sha256(p.encode()).hexdigest()) for p in paths]

    def fetch(self, item, patterns):
        self.fetched.append((item.repo, tuple(patterns)))
        if self.damage == "raises":
            raise ConnectionError("connection reset by peer")
        chosen = [f.path for f in self.list_remote_files(item.repo, item.repo_type, download.listing_root(item.patterns))
                  if not patterns or any(fnmatch.fnmatch(f.path, p) for p in patterns)]
        for index, path in enumerate(sorted(chosen)):
            content = path.encode()
            if index == 0 and self.damage == "missing":
                continue
            if index == 0 and self.damage in ("truncated", "corrupt"):
                content = content[:-1] if self.damage == "truncated" else content.swapcase()
            (Path(item.local_dir) / path).parent.mkdir(parents=True, exist_ok=True)
            (Path(item.local_dir) / path).write_bytes(content)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)   # the downloader's paths are relative to the current folder
    fake = FakeHub()
    monkeypatch.setattr(download, "list_remote_files", fake.list_remote_files)
    monkeypatch.setattr(download, "fetch", fake.fetch)
    monkeypatch.setattr(download.shutil, "disk_usage", lambda path: DiskUsage(10**13, 0, 10**13))
    return fake


def planned_parts(stdout):
    return {line[1:line.index("]")] for line in stdout.splitlines() if re.match(r"\[\w+\] ", line)}


@pytest.mark.parametrize("args, parts", [
    ([], set(download.PARTS) - {"teacher"}),
    (["--only", "sft"], {"sft"}),
    (["--only", "dpo,model", "--only=eval"], {"dpo", "model", "eval"}),
    (["--only", "teacher"], {"teacher"}),
    (["--only", "all"], set(download.PARTS)),
])
def test_only_selects_parts_and_the_default_is_all_but_the_teacher(hub, capsys, args, parts):
    download.main(["--dry-run", *args])
    assert planned_parts(capsys.readouterr().out) == parts


def test_dry_run_names_every_item_and_the_total_and_touches_nothing(hub, tmp_path, capsys):
    download.main(["--dry-run", "--only", "all"])
    out = capsys.readouterr().out
    items = download.plan(list(download.PARTS))
    for item in items:
        assert f"source:  {item.repo_type} {item.repo}" in out and f"target:  {item.target}/" in out, item
        assert all(pattern in out for pattern in item.patterns), item
    total_mb = sum(item.approx_mb for item in items)
    assert re.search(rf"^total: {len(items)} items, ~{total_mb / 1000:.1f} GB \(approximate\); 0 already done", out,
                     re.M), out[-300:]
    assert out.count("[pending]") == len(items) and "dry run: nothing was downloaded" in out
    assert hub.listed == hub.fetched == [] and list(tmp_path.iterdir()) == []


def test_the_five_largest_english_pt_folders_take_their_first_files_by_name(hub):
    download.main(["--only", "pt"])
    largest_english = sorted(download.PT_SIZES_MB, key=lambda industry: download.PT_SIZES_MB[industry][1])[-5:]
    limited = {item.subdir for item in download.plan(["pt"]) if item.first_n}
    assert limited == {f"{industry}/english/high" for industry in largest_english}
    for item in download.plan(["pt"]):
        assert (item.repo, item.subdir) in hub.listed   # each folder is listed alone, not the whole corpus
        names = sorted(path.name for path in Path(item.target).glob("*.parquet"))
        if item.first_n:   # name order: rank_10 sorts before rank_2
            assert names == ["rank_0.parquet", "rank_1.parquet", "rank_10.parquet"][:item.first_n], item.subdir
            assert (item.repo, tuple(f"{item.subdir}/{name}" for name in names)) in hub.fetched
        else:
            assert len(names) == 4 and (item.repo, item.patterns) in hub.fetched, item.subdir
        assert item.marker.is_file()


def test_a_marker_makes_the_next_run_skip(hub, capsys):
    download.main(["--only", "grpo,model"])
    items = download.plan(["grpo", "model"])
    assert len(hub.fetched) == len(items) and all(item.marker.is_file() for item in items)
    assert not list(Path().rglob("*.partial"))
    hub.listed.clear()
    hub.fetched.clear()
    capsys.readouterr()
    download.main(["--only", "grpo,model"])
    assert "nothing to do" in capsys.readouterr().out and hub.listed == hub.fetched == []
    download.main(["--dry-run", "--only", "grpo,model"])
    assert f"{len(items)} already done, ~0 MB left" in capsys.readouterr().out


@pytest.mark.parametrize("damage, message", [
    ("raises", r"download of Qwen/Qwen2.5-0.5B-Instruct .* failed: ConnectionError: connection reset by peer; no "
               r"network\? rerun prepare.sh"),
    ("missing", r"ended, but models/Qwen2.5-0.5B-Instruct/config.json is missing"),
    ("truncated", r"models/Qwen2.5-0.5B-Instruct/config.json: 10 bytes, the hub lists 11"),
    ("corrupt", r"models/Qwen2.5-0.5B-Instruct/config.json: sha256 does not match"),
    ("no such files", r"nothing matching 'config.json' in model Qwen/Qwen2.5-0.5B-Instruct"),
])
def test_a_failed_or_bad_download_names_the_problem_and_leaves_no_marker(hub, monkeypatch, damage, message):
    hub.damage = damage
    if damage == "no such files":   # the repository no longer holds what the recipe asks for
        monkeypatch.setattr(download, "list_remote_files", lambda *args: [])
    with pytest.raises(UserError, match=message):
        download.main(["--only", "model"])
    assert not download.plan(["model"])[0].marker.exists()
    assert len(hub.fetched) == (0 if damage == "no such files" else 1)


@pytest.mark.parametrize("force", [False, True])
def test_too_little_disk_stops_before_any_download_unless_forced(hub, monkeypatch, force):
    monkeypatch.setattr(download.shutil, "disk_usage", lambda path: DiskUsage(10**12, 10**12 - 10**6, 10**6))
    if force:
        download.main(["--only", "sft", "--force"])
        assert len(hub.fetched) == 2
    else:
        with pytest.raises(UserError, match=r"not enough free disk space .* have 1 MB; .*--force"):
            download.main(["--only", "sft"])
        assert hub.listed == hub.fetched == []


def test_the_teacher_part_fetches_whole_weights_where_distillation_reads_them(hub, capsys):
    recipe = yaml.safe_load((REPO / "configs" / "distill.yaml").read_text())
    assert download.teacher_item(download.DEFAULT_TEACHER).target == recipe["teacher_path"]
    download.main(["--only", "teacher", "--teacher", "Qwen/Qwen2.5-7B-Instruct"])
    assert [repo for repo, _ in hub.fetched] == ["Qwen/Qwen2.5-7B-Instruct"]
    target = Path("models/Qwen2.5-7B-Instruct")
    assert list(target.glob("*.safetensors")) and (target / download.MARKER).is_file()
    assert "--teacher_path models/Qwen2.5-7B-Instruct" in capsys.readouterr().out
    # The base model part stays weightless; a bigger teacher is planned bigger.
    base, = download.plan(["model"])
    assert not any(fnmatch.fnmatch("model.safetensors", pattern) for pattern in base.patterns)
    assert download.teacher_item("Qwen/Qwen2.5-7B-Instruct").approx_mb > download.teacher_item(
        download.DEFAULT_TEACHER).approx_mb > 0
    with pytest.raises(ConfigError, match="add --only teacher"):
        download.main(["--only", "sft", "--teacher", "Qwen/Qwen2.5-7B-Instruct"])


def test_the_hub_adapters_call_modelscope_as_expected(monkeypatch, tmp_path):
    modelscope = pytest.importorskip("modelscope")
    hub_api = pytest.importorskip("modelscope_hub.api")
    calls = []

    class Legacy:
        def list_repo_files(self, **kwargs):
            calls.append(kwargs)
            return [{"Path": "/7M", "Type": "tree"}, {"Path": "/7M/a.parquet", "Size": 3, "Sha256": "ab"},
                    {"Path": "7M/b.parquet", "Size": 4}, {"Path": "7Mx/c.parquet", "Size": 1}]

    monkeypatch.setattr(hub_api, "HubApi", lambda: type("Hub", (), {"legacy": Legacy()})())
    assert download.list_remote_files("BAAI/Infinity-Instruct", "dataset", "7M") == [
        download.RemoteFile("7M/a.parquet", 3, "ab"), download.RemoteFile("7M/b.parquet", 4, None)]
    assert calls == [{"repo_id": "BAAI/Infinity-Instruct", "repo_type": "dataset", "recursive": True, "root": "7M"}]
    monkeypatch.setattr(modelscope, "snapshot_download", lambda **kwargs: calls.append(kwargs))
    item = download.plan(["sft"])[0]
    download.fetch(item, list(item.patterns))
    assert calls[-1] == {"repo_id": item.repo, "repo_type": "dataset", "allow_patterns": list(item.patterns),
                         "local_dir": item.local_dir}


@pytest.mark.parametrize("args, returncode, expected", [
    (["--dry-run"], 0, r"^total: \d+ items, ~[\d.]+ GB .*\ndry run: nothing was downloaded$"),
    (["--help"], 0, r"teacher is not in the default set"),
    (["--dry-run", "--only", "bogus"], 2, r"\Aerror: unknown --only value 'bogus' \(choose from: .*\)\n\Z"),
])
def test_prepare_sh_runs_the_downloader_from_its_own_folder(tmp_path, args, returncode, expected):
    result = subprocess.run(["bash", str(REPO / "prepare.sh"), *args], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == returncode, result.stderr
    assert re.search(expected, result.stdout if returncode == 0 else result.stderr, re.M), result.stdout[-500:]
    assert list(tmp_path.iterdir()) == []
