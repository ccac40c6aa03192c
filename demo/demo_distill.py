"""Tiny CPU demo of distillation: mini_qwen_distill.py with configs/demo_distill.yaml (extra --flags override it).

Without a trained pair it makes one, no download: a tiny teacher with peaked random distributions and a tiny student,
both with the repo's tokenizer. After `python demo/demo_pt.py` and `python demo/demo_sft.py` the demo SFT model can
teach the demo PT model instead: `--teacher_path results/demo/sft --init_from results/demo/pt`."""

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from mini_qwen_distill import main, save_tiny_model  # noqa: E402
from utils.errors import run_main  # noqa: E402

TEACHER = REPO_ROOT / "results" / "demo" / "distill_teacher"
STUDENT = REPO_ROOT / "results" / "demo" / "distill_student"

if __name__ == "__main__":
    if not (TEACHER / "config.json").is_file():
        save_tiny_model(TEACHER, seed=1, initializer_range=0.5)
    if not (STUDENT / "config.json").is_file():
        save_tiny_model(STUDENT, seed=2)
    run_main(main, ["--config", str(REPO_ROOT / "configs" / "demo_distill.yaml"), *sys.argv[1:]])
