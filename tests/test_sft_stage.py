"""The SFT stage end to end on the original's real samples: counts reported, loss falls, plain transformers chats."""

import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from utils.checkpoint import STAGE_FILE


def test_infinity_instruct_samples_train_with_fitting_counts(sft_checkpoint):
    import pyarrow.parquet as pq

    from conftest import REPO

    (report_file,) = sft_checkpoint.parent.glob("cache/sft-*/report.json")
    report = json.loads(report_file.read_text())
    records, fitting = report["records"], report["counts"]
    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in (REPO / "mini_data" / "sft").rglob("*.parquet"))
    assert records["kept"] + sum(records["skipped"].values()) == rows  # both files: int and str ids
    assert sum(fitting.values()) == records["kept"]
    assert fitting.get("dropped oldest turns", 0) + fitting.get("prompt shortened", 0) > 0  # long samples fitted
    assert set(records["skipped"]) <= {"answer alone is longer than max_length"}

    history = json.loads((sft_checkpoint / "trainer_state.json").read_text())["log_history"]
    curve = [entry["loss"] for entry in history if "loss" in entry]
    assert len(curve) == 6 and min(curve[-3:]) < curve[0]
    assert json.loads((sft_checkpoint / STAGE_FILE).read_text()) == {"stage": "sft"}


def test_checkpoint_chats_through_plain_transformers(sft_checkpoint):
    tokenizer = AutoTokenizer.from_pretrained(sft_checkpoint)
    model = AutoModelForCausalLM.from_pretrained(sft_checkpoint)
    messages = [{"role": "user", "content": "李白是谁？"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert tokenizer.decode(inputs["input_ids"][0]).endswith("<|im_start|>assistant\n")
    torch.manual_seed(0)
    output = model.generate(**inputs, max_new_tokens=8)
    assert output.shape[1] > inputs["input_ids"].shape[1]
    assert model.generation_config.eos_token_id == [151645, 151643]
