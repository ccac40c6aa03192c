"""Rebuild a mini data set by sampling rows from the full datasets that prepare.sh downloads, keeping each
source file's schema (so the demo keeps exercising the real loading code).

    python -m tools.save_mini_data --source data/sft/7M --target my_mini_data/sft/7M --rows 100
    python -m tools.save_mini_data --source data/pt/news_media/chinese/high --target my_mini_data/pt/news_media/chinese/high

Rows are drawn uniformly (seeded) across all parquet files of --source and written to one parquet file.
"""

import argparse
import random
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from utils.errors import MissingInputError, run_main


def sample_rows(source: str, rows: int, seed: int) -> pa.Table:
    files = sorted(Path(source).rglob("*.parquet")) if Path(source).is_dir() else [Path(source)]
    if not files:
        raise MissingInputError(f"no parquet files under {source}")
    counts = [pq.ParquetFile(f).metadata.num_rows for f in files]
    total = sum(counts)
    picked = sorted(random.Random(seed).sample(range(total), min(rows, total)))
    tables, offset = [], 0
    for path, count in zip(files, counts):
        local = [i - offset for i in picked if offset <= i < offset + count]
        if local:
            tables.append(pq.read_table(path).take(local))
        offset += count
    return pa.concat_tables(tables)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, help="a downloaded dataset folder or parquet file")
    parser.add_argument("--target", required=True, help="folder to write train-00000-of-00001.parquet into")
    parser.add_argument("--rows", type=int, default=100)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    table = sample_rows(args.source, args.rows, args.seed)
    target = Path(args.target)
    target.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, target / "train-00000-of-00001.parquet")
    print(f"wrote {table.num_rows} rows ({', '.join(table.column_names)}) to {target}")


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
