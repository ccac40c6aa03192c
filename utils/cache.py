"""Preprocess once, reuse everywhere: a dataset built from a generator is written to an Arrow file under a cache key.

The key holds everything the rows depend on (input files with size and mtime, tokenizer, lengths, options). A
rerun, a resumed run and the other ranks of a multi-GPU run memory-map the same file instead of preprocessing
again (the original re-tokenized for 64 minutes on each of its 6 ranks). Rows are streamed to disk as they are
made, so memory stays bounded whatever the corpus size. The folder appears atomically (written under a temporary
name, then renamed), so a crash mid-build never leaves a cache that a later run would trust.
"""

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from datasets import Dataset, Features
from datasets.arrow_writer import ArrowWriter


def cache_key(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def build_or_load(
    cache_root: str | Path, name: str, key: dict, generate: Callable[[dict], Iterator[dict]], log=print,
    features: Features | None = None,
) -> tuple[Dataset, dict]:
    """Return (dataset, report). `generate(report)` yields the rows and fills `report` (counts to print later);
    it only runs when no finished cache exists for `key`. `features` fixes the column types (else inferred)."""
    final = Path(cache_root) / f"{name}-{cache_key(key)}"
    if (final / "report.json").exists():
        log(f"[cache] reusing preprocessed {name} data from {final} (no tokenization needed)")
        return Dataset.from_file(str(final / "data.arrow")), json.loads((final / "report.json").read_text())
    partial = final.with_name(f"{final.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    report: dict = {}
    rows = 0
    with ArrowWriter(path=str(partial / "data.arrow"), features=features, writer_batch_size=1000) as writer:
        for row in generate(report):
            writer.write(row)
            rows += 1
        if rows:
            writer.finalize()
    if rows == 0:
        shutil.rmtree(partial, ignore_errors=True)
        raise ValueError(f"no usable {name} records: {json.dumps(report, ensure_ascii=False)}")
    (partial / "key.json").write_text(json.dumps(key, indent=2, default=str, ensure_ascii=False))
    (partial / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    if final.exists():  # built meanwhile by another process with the same key: keep theirs
        shutil.rmtree(partial, ignore_errors=True)
    else:
        partial.rename(final)
    log(f"[cache] preprocessed {name} data written to {final}")
    return Dataset.from_file(str(final / "data.arrow")), report
