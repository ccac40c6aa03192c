"""Tiny CPU demo of the reward-model stage: mini_qwen_rm.py with configs/demo_rm.yaml (extra --flags override it)."""

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from mini_qwen_rm import main  # noqa: E402
from utils.errors import run_main  # noqa: E402

if __name__ == "__main__":
    run_main(main, ["--config", str(REPO_ROOT / "configs" / "demo_rm.yaml"), *sys.argv[1:]])
