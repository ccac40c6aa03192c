"""Shared test fixtures: paths to the real data in ../shared, the real tokenizer, and tiny trained checkpoints
(PT -> SFT) made once per session through the real stage code."""

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = Path(os.environ.get("MINI_QWEN_SHARED", REPO.parent / "shared"))
REFERENCE = SHARED / "reference" / "mini_qwen"
REFERENCE_TOKENIZER = REFERENCE / "models" / "Qwen2.5-0.5B-Instruct"
TINY_CONFIG = REPO / "models" / "mini_qwen_tiny"


def cpu_flags(output_dir, cache_dir) -> list[str]:
    """Flags every tiny test run shares: CPU, fp32, no reporting, quiet."""
    return ["--output_dir", str(output_dir), "--cache_dir", str(cache_dir), "--use_cpu", "true", "--bf16", "false",
            "--report_to", "none", "--disable_tqdm", "true", "--dataloader_num_workers", "0", "--logging_steps", "1"]


@pytest.fixture(scope="session")
def tokenizer():
    from utils.tokenizer import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="session")
def pt_checkpoint(tmp_path_factory):
    """A tiny model pretrained for a few steps on the original's real IndustryCorpus2 sample."""
    from mini_qwen_pt import main

    root = tmp_path_factory.mktemp("pt")
    main(["--config", str(REPO / "configs" / "demo_pt.yaml"), *cpu_flags(root / "out", root / "cache"),
          "--data_files", str(REFERENCE / "mini_data" / "pt"), "--block_size", "64",
          "--per_device_train_batch_size", "4", "--max_steps", "20", "--save_strategy", "no"])
    return root / "out"


@pytest.fixture(scope="session")
def sft_checkpoint(tmp_path_factory, pt_checkpoint):
    """A tiny model fine-tuned for a few steps on the original's real Infinity-Instruct sample (7M + Gen)."""
    from mini_qwen_sft import main

    root = tmp_path_factory.mktemp("sft")
    main(["--config", str(REPO / "configs" / "demo_sft.yaml"), *cpu_flags(root / "out", root / "cache"),
          "--init_from", str(pt_checkpoint), "--data_files", str(REFERENCE / "mini_data" / "sft"),
          "--per_device_train_batch_size", "4", "--max_steps", "8", "--save_strategy", "no"])
    return root / "out"
