#!/usr/bin/env bash
# prepare.sh: download the real data and model files of the full mini_qwen recipe from ModelScope. A thin wrapper
# over the Python downloader, tools/download.py (the plan, the resumable .prepare_done markers, the disk-space and
# checksum checks all live there); every option passes through:
#
#   bash prepare.sh --dry-run                    the plan (items, sources, targets, approximate sizes); no network
#   bash prepare.sh [--only PART[,PART...]]      PART: pt sft dpo model eval grpo (the default), teacher, all
#   bash prepare.sh --only teacher [--teacher REPO_ID]   the distillation teacher (default Qwen/Qwen2.5-1.5B-Instruct)
#   bash prepare.sh --help
#
# Paths are relative to this script's folder. The demo (configs/demo_*.yaml) needs nothing from here.
set -euo pipefail
cd -- "$(dirname -- "${BASH_SOURCE[0]}")"
exec python -m tools.download "$@"
