"""A NaN loss stops training, names the last good checkpoint and the samples since it, and a resume that skips
those samples finishes."""

import json

import pytest
import torch

import mini_qwen_pt
from conftest import REPO, cpu_flags
from utils.callbacks import AnomalyGuard
from utils.crash_safety import CrashSafetyArguments, parse_ranges
from utils.formats import load_records
from utils.modeling import build_model


def poisoning_build_model(poison_id: int):
    """build_model whose logits turn NaN for any batch holding `poison_id`: a corrupt shard, reproducibly."""

    def build(*args, **kwargs):
        model = build_model(*args, **kwargs)
        state = {"poisoned": False}

        def remember_batch(module, args, kwargs):
            state["poisoned"] = bool((kwargs["input_ids"] == poison_id).any())

        def poison_logits(module, inputs, output):
            return output * float("nan") if state["poisoned"] else output

        model.register_forward_pre_hook(remember_batch, with_kwargs=True)
        model.lm_head.register_forward_hook(poison_logits)
        return model

    return build


def test_nan_guard_stops_and_skip_samples_resume_finishes(tmp_path, monkeypatch, tokenizer):
    texts = [r["text"][:200] for r in load_records(str(REPO / "mini_data" / "pt"), "pt")[0][:8]]
    poison = "☠☠☠"
    poison_id = tokenizer(poison).input_ids[0]
    assert not any(poison_id in tokenizer(t).input_ids for t in texts)
    data = tmp_path / "corpus.jsonl"
    data.write_text("\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in texts[:4] + [poison] + texts[4:]))
    monkeypatch.setattr(mini_qwen_pt, "build_model", poisoning_build_model(poison_id))
    flags = ["--config", str(REPO / "configs" / "demo_pt.yaml"), *cpu_flags(tmp_path / "out", tmp_path / "cache"),
             "--data_files", str(data), "--block_size", "32", "--per_device_train_batch_size", "2",
             "--num_train_epochs", "1", "--save_strategy", "steps", "--save_steps", "3", "--anomaly_min_history", "1000"]

    with pytest.raises(SystemExit, match="training stopped at step"):
        mini_qwen_pt.main(flags)
    anomaly = json.loads((tmp_path / "out" / "anomaly.json").read_text())
    assert anomaly["problem"] in ("loss is nan", "gradient norm is nan")
    step = anomaly["step"]
    last_good = (step - 1) // 3 * 3
    assert anomaly["last_good_checkpoint"] == (str(tmp_path / "out" / f"checkpoint-{last_good}") if last_good else None)
    assert anomaly["skip_samples"] == f"{last_good * 2}:{step * 2}"
    assert not (tmp_path / "out" / "model.safetensors").exists()  # the bad weights were not saved

    mini_qwen_pt.main(flags + ["--resume_from_checkpoint", "auto", "--skip_samples", anomaly["skip_samples"]])
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    assert state["global_step"] > step and all(torch.isfinite(torch.tensor(e["loss"]))
                                               for e in state["log_history"] if "loss" in e)


def test_spike_over_factor_times_running_median_trips_the_guard():
    from types import SimpleNamespace

    guard = AnomalyGuard(CrashSafetyArguments(anomaly_factor=3.0, anomaly_min_history=3))
    args = SimpleNamespace(output_dir="/nonexistent", per_device_train_batch_size=4, gradient_accumulation_steps=2,
                           world_size=1)
    state = SimpleNamespace(global_step=0, is_world_process_zero=False)
    control = SimpleNamespace(should_training_stop=False, should_save=False)
    for step, loss in enumerate([4.0, 3.9, 3.8, 3.7, 12.0], start=1):
        state.global_step = step
        guard.on_log(args, state, control, logs={"loss": loss})
        assert control.should_training_stop == (loss == 12.0)
    assert guard.tripped["skip_samples"] == "0:40" and "running median" in guard.tripped["problem"]

    around_zero = AnomalyGuard(CrashSafetyArguments(anomaly_factor=3.0, anomaly_min_history=3))
    control.should_training_stop = False
    for step, loss in enumerate([-2e-9, 1e-9, -5e-9, 3e-9, 0.02, float("nan")], start=1):  # GRPO-like losses
        state.global_step = step
        around_zero.on_log(args, state, control, logs={"loss": loss})
        assert control.should_training_stop == (step == 6)  # no ratio rule around 0; NaN still stops


def test_skip_ranges_are_validated():
    assert parse_ranges(["10:20", "0:4"]) == [(10, 20), (0, 4)]
    for bad in ("20:10", "x:y", "5"):
        with pytest.raises(ValueError, match="--skip_samples"):
            parse_ranges([bad])


def test_skip_samples_counts_every_micro_batch_of_gradient_accumulation():
    """With 2 micro-batches of 2 samples per optimizer step, samples 6-7 are the second micro-batch of step 1: only
    that one contributes a zero loss."""
    from types import SimpleNamespace

    from utils.crash_safety import SkipSamplesMixin

    class Counting:
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return torch.tensor(1.0)

    class Trainer(SkipSamplesMixin, Counting):
        pass

    trainer = Trainer(skip_samples=["6:8"])
    trainer.args = SimpleNamespace(per_device_train_batch_size=2, world_size=1, gradient_accumulation_steps=2)
    trainer.state = SimpleNamespace(global_step=0)
    model = torch.nn.Linear(2, 1).train()
    losses = []
    for step in range(3):
        trainer.state.global_step = step
        losses += [trainer.compute_loss(model, {}).item() for _ in range(2)]
    assert losses == [1.0, 1.0, 1.0, 0.0, 1.0, 1.0]


def test_resume_auto_skips_a_checkpoint_whose_save_did_not_finish(tmp_path):
    from utils.checkpoint import COMPLETE_MARKER, resolve_resume

    for step in (4, 8, 12):
        (tmp_path / f"checkpoint-{step}").mkdir()
    for step in (4, 8):
        (tmp_path / f"checkpoint-{step}" / COMPLETE_MARKER).write_text("{}")
    # checkpoint-12 has no marker: the process died while writing it
    assert resolve_resume("auto", str(tmp_path)) == str(tmp_path / "checkpoint-8")
