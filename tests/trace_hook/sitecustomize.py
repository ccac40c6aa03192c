"""Test-only hook, on PYTHONPATH only for the multi-process tests: when MINI_QWEN_TRACE_DIR is set, every batch
the pretraining collator builds is recorded (the first tokens of each sample) in trace-rank<RANK>.jsonl, so a test
can see which samples each rank trained on. Python imports this module at start-up in every process."""

import json
import os
import sys
from pathlib import Path

if os.environ.get("MINI_QWEN_TRACE_DIR"):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from utils import packing

    collate = packing.PretrainCollator.__call__

    def traced(self, samples):
        trace = Path(os.environ["MINI_QWEN_TRACE_DIR"]) / f"trace-rank{os.environ.get('RANK', '0')}.jsonl"
        with trace.open("a") as handle:
            handle.write(json.dumps([sample["input_ids"][:16] for sample in samples]) + "\n")
        return collate(self, samples)

    packing.PretrainCollator.__call__ = traced
