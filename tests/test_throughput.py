"""Throughput logging: the FLOPs per token of the real 1B config by hand, the callback's arithmetic, real tokens of
every stage's batches, and a real tiny PT run (its logs, tensorboard's copy, its report card)."""

import json
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, TrainerControl, TrainerState

from conftest import REPO, TINY_CONFIG, cpu_flags
from utils.callbacks import ThroughputCallback
from utils.throughput import batch_token_counts, flops_per_token, human_duration, peak_flops

THROUGHPUT_KEYS = {"tokens_per_second", "tokens_per_second_per_device", "eta_seconds", "tokens_seen"}


@pytest.mark.parametrize("seq", [64, 512])
def test_flops_per_token_match_what_torch_counts_in_a_forward_and_backward(seq):
    """flops_per_token against torch's own FLOP counter over a real training forward and backward: matrix
    multiplies, attention included (norms, activations and biases, which the counter skips, are under 1% here).
    The tiny config with a 256-token vocabulary puts attention at a tenth of the FLOPs at 512 tokens, so dropping
    or doubling its term, or counting the tied embedding twice, moves the result far outside the tolerance."""
    from torch.utils.flop_counter import FlopCounterMode

    # eager: the counter does not see the CPU sdpa kernel; eager's matmuls do the same attention FLOPs
    config = AutoConfig.from_pretrained(TINY_CONFIG, vocab_size=256, pad_token_id=0, attn_implementation="eager")
    model = AutoModelForCausalLM.from_config(config).train()
    parameters = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, 256, (2, seq))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, labels=ids).loss.backward()
    per_token = counter.get_total_flops() / ids.numel()
    assert flops_per_token(config, parameters, seq) == pytest.approx(per_token, rel=0.01)
    # DPO's frozen reference adds one forward: a third of a training step
    assert flops_per_token(config, parameters, seq, reference_forward=True) == pytest.approx(4 / 3 * per_token, rel=0.01)


def test_peak_table_picks_the_most_specific_name():
    # Each pair shares a prefix: the longer, more specific entry must win (a PCIe H100 is slower than an SXM one,
    # and "NVIDIA A10" is a prefix of every A100's name).
    assert peak_flops("NVIDIA H100 PCIe") < peak_flops("NVIDIA H100 80GB HBM3")
    assert peak_flops("NVIDIA A100-SXM4-80GB") > peak_flops("NVIDIA A10")
    assert peak_flops("AMD EPYC") is None


def test_human_duration():
    assert [human_duration(s) for s in (45, 725, 3725, 183_600)] == ["45s", "12m05s", "1h02m", "2d03h"]


def test_callback_counts_training_forwards_and_its_mfu_matches_a_hand_computation():
    # The tiny model with a 256-token vocabulary: attention is a tenth of its FLOPs at these lengths, not 0.01%.
    config = AutoConfig.from_pretrained(TINY_CONFIG, vocab_size=256, pad_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).train()
    parameters = sum(p.numel() for p in model.parameters())
    args = SimpleNamespace(device=torch.device("cpu"), world_size=2)  # this process stands in for both ranks
    state, control = TrainerState(max_steps=10, global_step=4), TrainerControl()
    state.stateful_callbacks = {"ThroughputCallback": {"attributes": {"tokens_seen": 1000}}}  # resumed at step 4
    callback = ThroughputCallback(peak_tflops=1e-6)  # a tiny peak: MFU in the tens, its 4-decimal rounding negligible
    callback.on_train_begin(args, state, control, model=model)

    ids = torch.randint(0, 256, (2, 48))
    model(input_ids=ids, attention_mask=(torch.arange(48) < torch.tensor([[30], [48]])).long())  # 30 + 48 tokens
    with torch.no_grad():  # DPO's reference forward
        model(input_ids=ids)
    model.eval()
    model(input_ids=ids)  # evaluation
    model.train()
    callback.on_step_end(args, state, control)
    positions = torch.cat([torch.arange(20), torch.arange(30)])[None]  # one packed row: documents of 20 and 30
    model(input_ids=torch.randint(0, 256, (1, 50)), position_ids=positions)
    callback.on_step_end(args, state, control)
    time.sleep(1)  # a window of over a second: the ETA, whole seconds, tells 2 steps in it from 1
    state.global_step = 6
    state.log_history.append({"loss": 1.0, "step": 6})
    logs = {"loss": 1.0}
    callback.on_log(args, state, control, logs=logs)

    tokens = 30 + 48 + 20 + 30
    assert logs["tokens_seen"] == 1000 + tokens and state.log_history[-1] == {"step": 6, **logs}
    assert logs["tokens_per_second_per_device"] == pytest.approx(logs["tokens_per_second"] / 2, abs=0.1)
    window_seconds = tokens / logs["tokens_per_second"]
    assert abs(logs["eta_seconds"] - 4 * window_seconds / 2) <= 0.5  # 4 steps left at this window's 2 steps
    effective_length = (30**2 + 48**2 + 20**2 + 30**2) / tokens
    by_hand = 6 * parameters + 12 * 2 * 64 * effective_length
    assert logs["mfu"] == pytest.approx(logs["tokens_per_second_per_device"] * by_hand / 1e6, rel=1e-4)
    assert "peak_gpu_memory_gib" not in logs  # CPU

    model(input_ids=ids[:, :3])  # a step after the last log: the checkpoint's count includes it
    callback.on_step_end(args, state, control)
    state.global_step = 7
    summary = {"train_runtime": 1.0}
    callback.on_log(args, state, control, logs=summary)  # the end-of-training summary: not a logging window
    assert summary == {"train_runtime": 1.0}
    assert callback.state()["attributes"]["tokens_seen"] == 1000 + tokens + 6
    callback.on_train_end(args, state, control)
    model(input_ids=ids)
    callback.on_step_end(args, state, control)
    assert callback.state()["attributes"]["tokens_seen"] == 1000 + tokens + 6  # the hook is gone


def test_real_tokens_of_each_stages_batches(tokenizer):
    from trl.trainer.dpo_trainer import DataCollatorForPreference
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from utils.packing import DocumentMaskCollator, PretrainCollator, pack_documents

    pad = tokenizer.pad_token_id
    # DPO: chosen and rejected rows of prompt + answer, padded
    dpo = DataCollatorForPreference(pad)([{"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6]},
                                          {"prompt_ids": [7, 8], "chosen_ids": [9], "rejected_ids": [10, 11, 12]}])
    lengths = [5, 3, 4, 5]
    assert dpo["input_ids"].numel() == 20
    assert [int(n) for n in batch_token_counts(dpo)] == [17, sum(n * n for n in lengths)]
    # SFT unpacked: TRL pads the pre-tokenized rows
    examples = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4, 5, 6, 7, 8], "labels": [4] * 5}]
    padded = DataCollatorForLanguageModeling(pad)(examples)
    assert padded["input_ids"].numel() == 10
    assert [int(n) for n in batch_token_counts(padded)] == [8, 9 + 25]
    # SFT padding-free: one flat row for flash-attention; on sdpa an ordinary padded batch; the same count
    collator = DataCollatorForLanguageModeling(pad, padding_free=True)
    flat = DocumentMaskCollator(collator, "flash_attention_2")(examples)
    assert flat["input_ids"].shape == (1, 8) and "attention_mask" not in flat
    assert [int(n) for n in batch_token_counts(flat)] == [8, 9 + 25]
    rows = DocumentMaskCollator(collator, "sdpa")(examples)
    assert rows["input_ids"].shape == (2, 5) and rows["attention_mask"].dim() == 2
    assert [int(n) for n in batch_token_counts(rows)] == [8, 9 + 25]
    # PT: concat blocks are all tokens; document blocks by their documents; `none` without its padding
    eos = tokenizer.eos_token_id
    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10, 11]]
    concat = PretrainCollator(pad, "sdpa")(pack_documents(docs, 5, "concat", eos))
    assert [int(n) for n in batch_token_counts(concat)] == [10, 2 * 25]
    document = PretrainCollator(pad, "sdpa")(pack_documents(docs, 5, "document", eos))  # [4, 1], [2, 3] tokens
    assert [int(n) for n in batch_token_counts(document)] == [10, 16 + 1 + 4 + 9]
    none = PretrainCollator(pad, "sdpa")(pack_documents(docs, 5, "none", eos))  # 4, 3 and 5 of 7 tokens
    assert none["input_ids"].numel() == 15
    assert [int(n) for n in batch_token_counts(none)] == [12, 16 + 9 + 25]


def test_tiny_pt_run_logs_throughput_everywhere_and_writes_its_report(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mini_qwen_pt import main

    out = tmp_path / "out"
    flags = ["--config", str(REPO / "configs" / "demo_pt.yaml"), *cpu_flags(out, tmp_path / "cache"),
             "--data_files", str(REPO / "mini_data" / "pt"), "--max_steps", "6", "--logging_steps", "2",
             "--block_size", "64", "--per_device_train_batch_size", "2", "--save_strategy", "no",
             "--report_to", "tensorboard", "--include_num_input_tokens_seen", "true"]  # the Trainer's count too
    monkeypatch.setattr(sys, "argv", ["mini_qwen_pt.py", *flags])
    started = time.perf_counter()
    main(flags)
    elapsed = time.perf_counter() - started

    state = json.loads((out / "trainer_state.json").read_text())
    logs = [entry for entry in state["log_history"] if "loss" in entry]
    assert [entry["step"] for entry in logs] == [2, 4, 6]
    for entry in logs:
        assert THROUGHPUT_KEYS <= set(entry) and "mfu" not in entry and "peak_gpu_memory_gib" not in entry
        assert entry["tokens_seen"] == entry["step"] * 2 * 64  # steps x batch x block, nothing padded
        assert entry["tokens_seen"] == entry["num_input_tokens_seen"]  # the Trainer's count agrees for concat
        assert entry["tokens_per_second_per_device"] == entry["tokens_per_second"] > 2 * 2 * 64 / elapsed
        window_seconds = 2 * 2 * 64 / entry["tokens_per_second"]
        assert abs(entry["eta_seconds"] - (6 - entry["step"]) * window_seconds / 2) <= 0.5
    # The reporting integrations get the numbers too (the callback runs before them).
    (events,) = out.glob("runs/*/events.out.tfevents.*")
    scalars = EventAccumulator(str(events)).Reload()
    assert [event.step for event in scalars.Scalars("train/tokens_per_second")] == [2, 4, 6]
    assert [event.value for event in scalars.Scalars("train/tokens_seen")] == [256, 512, 768]

    report = (out / "report.md").read_text()
    summary = json.loads((out / "report.json").read_text())
    assert summary["steps"] == state["global_step"] == 6 and summary["tokens_seen"] == 768
    assert summary["loss"]["end"] == logs[-1]["loss"] and summary["loss"]["start"] == logs[0]["loss"]
    assert summary["tokens_per_second"]["last"] == logs[-1]["tokens_per_second"]
    assert summary["tokens_per_second"]["mean"] == pytest.approx(sum(e["tokens_per_second"] for e in logs) / 3)
    assert "- steps: 6 of 6" in report and "- tokens seen: 768" in report
    assert f"end {logs[-1]['loss']:.4g} (step 6)" in report
    assert f"last {logs[-1]['tokens_per_second']:.4g} over 3 logging windows" in report
    assert "| **block_size** | `128` | **`64`** | command line |" in report  # the recipe says 128
    assert "![loss curves](loss.png)" in report and (out / "loss.png").is_file()
    assert "- records: kept 120, skipped 0" in report  # data_report.json: mini_data/pt's 120 documents


def test_mfu_counts_the_lm_head_only_where_trls_fused_head_projects():
    """SFT, DPO and GRPO call the model with fused_lm_head=True: the head projects only the labelled positions, so
    the head's 6·V·H FLOPs are counted for those alone; the rest of the model for every token."""
    from trl.trainer.utils import add_fused_lm_head

    config = AutoConfig.from_pretrained(TINY_CONFIG, vocab_size=256, pad_token_id=0)
    model = AutoModelForCausalLM.from_config(config).train()
    add_fused_lm_head(model)
    parameters = sum(p.numel() for p in model.parameters())
    args = SimpleNamespace(device=torch.device("cpu"), world_size=1)
    state, control = TrainerState(max_steps=10, global_step=0), TrainerControl()
    callback = ThroughputCallback(peak_tflops=1e-6)
    callback.on_train_begin(args, state, control, model=model)
    ids = torch.randint(1, 256, (2, 40))
    labels = ids.clone()
    labels[:, :30] = -100  # a prompt of 30 tokens, an answer of 10, in each row
    model(input_ids=ids, labels=labels, fused_lm_head=True)
    callback.on_step_end(args, state, control)
    state.global_step = 1
    state.log_history.append({"loss": 1.0, "step": 1})
    logs = {"loss": 1.0}
    callback.on_log(args, state, control, logs=logs)
    callback.on_train_end(args, state, control)

    head = 256 * 64
    by_hand = 6 * (parameters - head) + 6 * head * (20 / 80) + 12 * 2 * 64 * 40
    assert logs["mfu"] == pytest.approx(logs["tokens_per_second_per_device"] * by_hand / 1e6, rel=1e-4)
