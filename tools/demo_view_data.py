"""Print a few normalised records of any dataset, with the skip counts: what a stage will actually see.

    python -m tools.demo_view_data mini_data/sft --kind sft
    python -m tools.demo_view_data data/pt/news_media/chinese/high --kind pt -n 2
"""

import argparse
import json
import sys

from utils.errors import run_main
from utils.files import SHAPES, SkipCounter, resolve_data_files
from utils.formats import iter_normalized


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="files, folders or globs")
    parser.add_argument("--kind", choices=sorted(SHAPES), required=True, help="which stage's shape to normalise to")
    parser.add_argument("-n", type=int, default=3, help="records to print")
    parser.add_argument("--chars", type=int, default=300, help="characters shown per text field")
    args = parser.parse_args(argv)

    files = resolve_data_files(args.paths)
    counter = SkipCounter()
    shown = 0
    for record in iter_normalized(files, args.kind, counter):
        if shown < args.n:
            text = json.dumps(record, ensure_ascii=False, indent=1)
            print(text if len(text) <= args.chars * 4 else text[: args.chars * 4] + " ...")
            shown += 1
    print(counter.report(f"{args.kind} data ({len(files)} files)"))


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
