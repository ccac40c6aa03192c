"""Data preparation as a step of its own: files → work units → worker processes → one cache that every training
rank memory-maps.

    python mini_qwen_pt.py --config configs/pt.yaml --prepare_only [--data_workers 16]

Each stage names what its rows depend on (the cache key) and how one normalised record becomes one row (`shape`,
raising SkipRecord to count a record out); this module does the rest for all three stages:
- the files are split into work units (utils.files.plan_units: parquet row groups, line ranges of large jsonl/txt);
- worker processes (default: every core) each read, normalise and shape whole units, writing each unit's rows to a
  temporary Arrow shard; memory per worker is one batch of rows;
- the main process takes the shards back in data order, passes them through the stage's `assemble` (pretraining
  packs blocks there, so the remainder carries across shard boundaries exactly as in one pass) and appends them to
  the cache file. The plan never depends on the worker count, so 1 and 16 workers write the same bytes.

Under a launcher (several ranks) a missing cache is never built: the run stops at start-up with the command that
builds it. Nothing therefore runs while the other ranks wait in a collective, which NCCL's watchdog would kill
after `ddp_timeout` (a 16B-token corpus takes hours to prepare).
"""

import errno
import fcntl
import hashlib
import json
import logging
import multiprocessing
import os
import re
import shlex
import shutil
import signal
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
from datasets import Dataset, Features
from datasets.arrow_writer import ArrowWriter

from utils.disk import human_bytes
from utils.errors import ConfigError
from utils.files import DataError, SkipCounter, WorkUnit, plan_units
from utils.formats import iter_normalized

logger = logging.getLogger("mini_qwen")

# The modules on the path from files to rows: editing any of them changes every cache key, so a cache built by
# other code is never reused. (The stage script that shapes the rows is added by each stage.)
ROW_BUILDING_MODULES = ("utils/files.py", "utils/formats.py", "utils/prepare.py", "utils/packing.py", "utils/chat.py",
                        "utils/tokenizer.py")
REPO_ROOT = Path(__file__).resolve().parent.parent
# Disk a preparation needs, as a multiple of its input files' size. A token is ~4.7 bytes of JSON lines text and takes
# 4 as int32: the cache is 0.85x mini_data's PT text as jsonl, 0.6x as its compressed parquet (0.8x for SFT, ids and
# labels); while it is written, the workers' unit shards (the same tokens) may all exist at once.
SPACE_FACTOR = 2.0


@dataclass
class DataArguments:
    """What every stage's data step takes; each stage's script arguments extend it."""

    data_files: list[str] = field(default_factory=list, metadata={"help": "data files, folders or globs"})
    cache_dir: str = field(default="cache", metadata={"help": "where prepared data is kept for reuse"})
    data_workers: int | None = field(default=None, metadata={
        "help": "processes that prepare the data (default: every core of this machine)"})
    prepare_only: bool = field(default=False, metadata={
        "help": "prepare the data into cache_dir and exit: run it before a multi-GPU launch, or on a CPU machine"})
    min_kept_fraction: float = field(default=0.5, metadata={
        "help": "stop before training when fewer than this share of the records could be used (0 disables)"})


class PrepareFirstError(DataError):
    """A launched run found no prepared data: it stops instead of preparing while the other ranks wait."""


def code_fingerprint(*modules: str) -> str:
    """A hash of the source files that build the rows."""
    digest = hashlib.sha256()
    for module in (*ROW_BUILDING_MODULES, *modules):
        digest.update(module.encode())
        digest.update((REPO_ROOT / module).read_bytes())
    return digest.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer) -> str:
    """The tokenizer's content (vocabulary, merges, added tokens, normaliser) and chat template, not its path: the
    rebuilt tokenizer, the downloaded one and the copy saved in a checkpoint share their caches."""
    digest = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode())
    digest.update(str(tokenizer.chat_template).encode())
    digest.update(f"{tokenizer.eos_token_id}/{tokenizer.pad_token_id}".encode())
    return digest.hexdigest()[:16]


def cache_key(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class UnitStats:
    """What a stage's `shape` adds up besides the skip counts: tokens (for progress) and named counts (e.g. how
    conversations were fitted)."""

    tokens: int = 0
    counts: Counter = field(default_factory=Counter)


@dataclass
class Preparation:
    """One stage's data step. `shape(record, stats)` turns a normalised record into a row of `shard_schema` (it
    runs in the workers); `assemble(tables)` turns the shards' tables, in data order, into tables of the cache's
    `features` (default: as they are); `extra_rows(report)` may add rows made in the main process at the end."""

    name: str
    files: list[str]
    key: dict
    shape: Callable[[dict, UnitStats], dict]
    shard_schema: pa.Schema
    features: Features
    assemble: Callable[[Iterator[pa.Table], dict], Iterator[pa.Table]] | None = None
    extra_rows: Callable[[dict], Iterator[dict]] | None = None
    unit_bytes: int = 64 << 20  # line-range size for large jsonl/txt files (parquet splits by row group)


# The preparation the workers run: set before the pool forks, so they inherit the tokenizer and the stage's closures
# instead of pickling them (a spawned worker would re-import transformers and rebuild the tokenizer).
_ACTIVE: Preparation | None = None


def _prepare_unit(task: tuple[int, WorkUnit, str]) -> tuple[int, dict, UnitStats, int]:
    index, unit, work_dir = task
    preparation = _ACTIVE
    counter, stats = SkipCounter(), UnitStats()
    rows, written = [], 0
    with pa.OSFile(str(Path(work_dir) / f"unit-{index:07d}.arrow"), "wb") as sink, \
            pa.ipc.new_stream(sink, preparation.shard_schema) as writer:
        for row in iter_normalized([unit], preparation.name, counter, lambda r: preparation.shape(r, stats)):
            rows.append(row)
            if len(rows) == 1000:
                writer.write_table(pa.Table.from_pylist(rows, preparation.shard_schema))
                written, rows = written + len(rows), []
        if rows:
            writer.write_table(pa.Table.from_pylist(rows, preparation.shard_schema))
            written += len(rows)
    return index, counter.to_dict(), stats, written


def _shard_tables(work_dir: Path, index: int) -> Iterator[pa.Table]:
    path = work_dir / f"unit-{index:07d}.arrow"
    with pa.OSFile(str(path), "rb") as source:
        for batch in pa.ipc.open_stream(source):
            yield pa.Table.from_batches([batch])
    path.unlink()


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _unit_results(units: list[WorkUnit], work_dir: Path, workers: int):
    tasks = [(index, unit, str(work_dir)) for index, unit in enumerate(units)]
    if workers == 1:
        yield from map(_prepare_unit, tasks)
        return
    # fork: the workers inherit the tokenizer (see _ACTIVE); imap keeps data order whatever finishes first.
    pool = multiprocessing.get_context("fork").Pool(workers, initializer=_worker_start)
    try:
        yield from pool.imap(_prepare_unit, tasks)
        # The normal end: the workers leave on the pool's sentinel. Pool's `with` would SIGTERM them instead, and a
        # worker still starting (its inherited handler not yet reset by _worker_start) swallowed the signal once
        # and left the pool waiting for it forever.
        pool.close()
        pool.join()
    finally:
        pool.terminate()


def _worker_start() -> None:
    # A forked worker inherits the parent's Python signal handlers: with a training run's SIGTERM handler
    # (utils.callbacks.SigtermCallback) it would ignore the SIGTERM that Pool uses to end it, and the pool would
    # wait for it forever.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _merge_counts(total: SkipCounter, part: dict) -> None:
    total.kept += part["kept"]
    for reason, count in part["skipped"].items():
        total.skipped[reason] += count
        total.first_seen.setdefault(reason, part["first_seen"][reason])  # units arrive in data order


def _files_phrase(preparation: Preparation) -> str:
    files = preparation.files
    return ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")


def _no_records_message(preparation: Preparation) -> str:
    return (f"{_files_phrase(preparation)}: no {preparation.name} records at all (empty, or blank lines only): check "
            "--data_files")


def _no_rows_message(preparation: Preparation, report: dict) -> str:
    records = SkipCounter.from_dict(report["records"])
    if not records.kept and not records.skipped:
        return _no_records_message(preparation)
    files = _files_phrase(preparation)
    reasons = "; ".join(f"{count} {reason} (first at {records.first_seen[reason]})"
                        for reason, count in records.skipped.most_common(3))
    detail = report.get("no_rows_hint", "")
    return (f"{files}: no {preparation.name} samples: {records.kept} records kept, "
            f"{sum(records.skipped.values())} skipped{': ' + reasons if reasons else ''}. {detail}").strip()


def build(preparation: Preparation, folder: Path, workers: int) -> dict:
    """Prepare into `folder` (data.arrow, report.json); return the report."""
    global _ACTIVE
    units = plan_units(preparation.files, preparation.unit_bytes)
    work_dir = folder / "units"
    work_dir.mkdir(parents=True)
    records, stats = SkipCounter(), UnitStats()
    report: dict = {}
    rows = 0
    started = time.perf_counter()
    _ACTIVE = preparation
    from tqdm.auto import tqdm

    progress = tqdm(total=len(units), desc=f"prepare {preparation.name} ({workers} worker{'s' * (workers > 1)})",
                    unit="unit", mininterval=2, file=sys.stdout)

    def shard_tables() -> Iterator[pa.Table]:
        for index, counts, unit_stats, _ in _unit_results(units, work_dir, workers):
            _merge_counts(records, counts)
            stats.tokens += unit_stats.tokens
            stats.counts.update(unit_stats.counts)
            seconds = time.perf_counter() - started
            progress.set_postfix(records=records.kept, tokens=stats.tokens,
                                 tokens_per_s=f"{stats.tokens / seconds:,.0f}", refresh=False)
            progress.update()
            yield from _shard_tables(work_dir, index)

    try:
        with ArrowWriter(path=str(folder / "data.arrow"), features=preparation.features,
                         writer_batch_size=1000) as writer:
            tables = preparation.assemble(shard_tables(), report) if preparation.assemble else shard_tables()
            for table in tables:
                writer.write_table(table)
                rows += table.num_rows
            report.update(records=records.to_dict(), tokens=stats.tokens, counts=dict(stats.counts))
            if preparation.extra_rows:
                for row in preparation.extra_rows(report):
                    writer.write(row)
                    rows += 1
            if rows:
                writer.finalize()
    finally:
        _ACTIVE = None
        progress.close()
    shutil.rmtree(work_dir, ignore_errors=True)
    if rows == 0:
        raise DataError(_no_rows_message(preparation, report))
    seconds = time.perf_counter() - started
    report["preparation"] = {"workers": workers, "units": len(units), "rows": rows, "seconds": round(seconds, 2),
                             "tokens_per_second": round(stats.tokens / seconds) if seconds else None}
    logger.info("prepared %s data: %d units, %d records, %d tokens, %d rows in %.1f s (%s tokens/s, %d workers)",
                preparation.name, len(units), records.kept, stats.tokens, rows, seconds,
                f"{stats.tokens / seconds:,.0f}" if seconds else "-", workers)
    return report


def prepare_command(extra: str = "--prepare_only") -> str:
    """This run's own command line as one plain-`python` process, with `extra` appended."""
    return shlex.join(["python", sys.argv[0], *sys.argv[1:], extra])


def check_kept_fraction(preparation: Preparation, report: dict, min_kept_fraction: float) -> None:
    """A run whose data is mostly skipped stops: training on what is left (say, only the identity set) would look
    like success."""
    records = SkipCounter.from_dict(report["records"])
    total = records.kept + sum(records.skipped.values())
    if not total:
        raise DataError(_no_records_message(preparation))
    if records.kept < min_kept_fraction * total:
        reasons = "; ".join(f"{count} {reason} (first at {records.first_seen[reason]})"
                            for reason, count in records.skipped.most_common(3))
        raise DataError(f"{_files_phrase(preparation)}: only "
                        f"{records.kept} of {total} {preparation.name} records are usable ({records.kept / total:.0%}, "
                        f"below min_kept_fraction {min_kept_fraction}): skipped {reasons}. Fix the data, or lower "
                        "--min_kept_fraction if that is really what you want.")


def prepare_or_load(preparation: Preparation, cache_dir: str, workers: int | None, world_size: int,
                    min_kept_fraction: float = 0.5) -> tuple[Dataset, dict]:
    """The cached dataset for `preparation.key`, building it first (with `workers` processes, default every core)
    when this is a single process. Several ranks never build: they stop with the command that does (see the module
    docstring). Either way a dataset with too few usable records stops here (check_kept_fraction).

    One preparer per key at a time (preparer_lock): a second one waits for the first and reuses its result. Before
    building, the partial folders of this key that dead preparers left are removed, and the disk must have room."""
    cache_root = Path(cache_dir)
    final = cache_root / f"{preparation.name}-{cache_key(preparation.key)}"
    if (final / "report.json").exists():
        return _load(preparation, final, min_kept_fraction, "reusing prepared")
    if world_size > 1:
        raise PrepareFirstError(
            f"{final}: no prepared {preparation.name} data for this configuration, and a launch with {world_size} "
            f"processes does not prepare it (the other ranks would wait in a collective that times out). "
            f"Prepare it first, with every core, then launch again:\n  {prepare_command()}")
    cache_root.mkdir(parents=True, exist_ok=True)
    with preparer_lock(final.with_name(f"{final.name}.lock")):
        if (final / "report.json").exists():  # the preparer we waited for built it
            return _load(preparation, final, min_kept_fraction, "reusing just prepared")
        remove_dead_partials(final)
        check_free_space(preparation, cache_root)
        # Named with its owner, so that remove_dead_partials knows whether it is still being written.
        partial = final.with_name(f"{final.name}.partial-{os.getpid()}@{socket.gethostname()}")
        shutil.rmtree(partial, ignore_errors=True)
        try:
            report = build(preparation, partial, workers or default_workers())
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        (partial / "key.json").write_text(json.dumps(preparation.key, indent=2, default=str, ensure_ascii=False))
        (partial / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
        try:
            partial.rename(final)
        except OSError:
            if not final.is_dir():
                raise
            # Built meanwhile by a preparer the lock did not hold back (no flock, or another node): keep theirs.
            shutil.rmtree(partial, ignore_errors=True)
    logger.info("[cache] prepared %s data written to %s", preparation.name, final)
    return _load(preparation, final, min_kept_fraction)


def _load(preparation: Preparation, final: Path, min_kept_fraction: float,
          reuse: str | None = None) -> tuple[Dataset, dict]:
    if reuse:
        logger.info("[cache] %s %s data from %s (no tokenization needed)", reuse, preparation.name, final)
    report = json.loads((final / "report.json").read_text())
    check_kept_fraction(preparation, report, min_kept_fraction)
    return Dataset.from_file(str(final / "data.arrow")), report


@contextmanager
def preparer_lock(path: Path) -> Iterator[None]:
    """An exclusive `flock` on `path` (<cache_dir>/<name>-<key>.lock) while the data for that key is prepared: a
    second preparer of the same key (a second terminal, a job array) waits here, saying for whom (the holder writes
    its pid and host into the file), instead of tokenizing the same data again. The kernel releases the lock when
    its holder dies, however it dies; the file itself stays (removing it would let a third preparer lock a new file
    while the second holds the old one).

    A filesystem without flock support (NFS mounted without locking, some FUSE mounts) fails it with ENOLCK or
    EOPNOTSUPP: preparation then goes on unlocked, with a warning. Two preparers of one key then both tokenize,
    each into its own partial folder, and the later one keeps the earlier one's result."""
    with open(path, "a+") as handle:
        if _take_lock(handle, path):
            handle.truncate(0)
            handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
            handle.flush()
        yield


def _take_lock(handle, path: Path) -> bool:
    """Lock `handle`, waiting for its holder if there is one; False where the filesystem has no flock."""
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            logger.info("[cache] waiting for %s, which is preparing the same data (lock %s)", holder, path)
            fcntl.flock(handle, fcntl.LOCK_EX)
    except OSError as err:
        if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP):
            raise
        logger.warning("[cache] %s: this filesystem does not support flock (%s): preparing without the lock; a "
                       "second preparer of the same data would repeat the work", path, err.strerror)
        return False
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_dead_partials(final: Path) -> None:
    """Remove the partial folders of this key that a preparer left when it died (killed, out of memory): each is
    named with its owner's pid and host, and is removed when that host is this one and the pid is gone. A partial
    from another node (a shared cache_dir) may be in use by a process that no pid here says anything about, and
    stays, as do partials named by pid alone (made before the names held the host)."""
    host = socket.gethostname()
    for folder in final.parent.glob(f"{final.name}.partial-*"):
        owner = re.fullmatch(r"(\d+)@(.+)", folder.name.split(".partial-", 1)[1])
        if not owner or owner[2] != host or _alive(int(owner[1])):
            continue
        freed = sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
        shutil.rmtree(folder, ignore_errors=True)
        logger.info("[cache] removed %s, left by pid %s which is gone: %s freed", folder, owner[1], human_bytes(freed))


def check_free_space(preparation: Preparation, cache_root: Path) -> None:
    """Refuse to start a preparation that would fill the disk hours later (SPACE_FACTOR x the input size)."""
    input_bytes = sum(os.path.getsize(path) for path in preparation.files if os.path.isfile(path))
    needed, free = SPACE_FACTOR * input_bytes, shutil.disk_usage(cache_root).free
    if needed > free:
        raise ConfigError(
            f"{cache_root}: {human_bytes(free)} free, and preparing {len(preparation.files)} {preparation.name} file(s) of "
            f"{human_bytes(input_bytes)} needs about {human_bytes(needed)} ({SPACE_FACTOR:g} x the input: "
            "tokens as int32, plus the unit shards while they are merged). Free some space, or point --cache_dir "
            "at a disk that has it")
