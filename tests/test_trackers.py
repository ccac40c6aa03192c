"""wandb and swanlab by `--report_to`: a real tiny pretraining writes an offline run inside output_dir that holds
the logged losses, and a tracker that is not installed is a one-line ConfigError."""

import importlib.util
import json
import os
import struct
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import REPO, cpu_flags
from utils.errors import ConfigError
from utils.trackers import TRACKER_ENV, TrackerArguments, configure_trackers

# Both run files are LevelDB-log journals: a 7-byte file header, then 32 KiB blocks of chunks, each with a
# 7-byte header (crc32, length, type: 1 whole record, 2 first part, 3 middle, 4 last).
JOURNAL_BLOCK = 32768
CHUNK_HEADER = 7


def journal_records(path: Path, ident: bytes):
    data = path.read_bytes()
    assert data[:4] == ident, f"{path} is not a run journal"
    position, record = CHUNK_HEADER, b""
    while position + CHUNK_HEADER <= len(data):
        if JOURNAL_BLOCK - position % JOURNAL_BLOCK < CHUNK_HEADER:  # a block's zero padding
            position += JOURNAL_BLOCK - position % JOURNAL_BLOCK
            continue
        _, length, kind = struct.unpack_from("<IHB", data, position)
        record += data[position + CHUNK_HEADER:position + CHUNK_HEADER + length]
        position += CHUNK_HEADER + length
        if kind in (1, 4):
            yield record
            record = b""


@pytest.fixture
def tracker_env(monkeypatch):
    """No WANDB_* / SWANLAB_* from the machine; what configure_trackers sets is undone afterwards."""
    for name in list(os.environ):
        if name.startswith(("WANDB_", "SWANLAB_")):
            monkeypatch.delenv(name)
    for names in TRACKER_ENV.values():
        for name in names:
            monkeypatch.delenv(name, raising=False)


def pretrain(tmp_path, tracker: str) -> Path:
    from mini_qwen_pt import main

    output_dir = tmp_path / "pt"
    main(["--config", str(REPO / "configs" / "demo_pt.yaml"), *cpu_flags(output_dir, tmp_path / "cache"),
          "--data_files", str(REPO / "mini_data" / "pt"), "--block_size", "32", "--per_device_train_batch_size", "2",
          "--max_steps", "2", "--save_strategy", "no", "--report_to", tracker])
    return output_dir


def trainer_losses(output_dir: Path) -> dict[int, float]:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return {entry["step"]: entry["loss"] for entry in state["log_history"] if "loss" in entry}


def wandb_record(data: bytes) -> tuple[tuple[str, str] | None, tuple[int, float] | None]:
    from wandb.proto.wandb_internal_pb2 import Record

    record = Record()
    record.ParseFromString(data)
    items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
    return ((record.run.project, record.run.display_name) if record.HasField("run") else None,
            (items["train/global_step"], items["train/loss"]) if "train/loss" in items else None)


def swanlab_record(data: bytes) -> tuple[tuple[str, str] | None, tuple[int, float] | None]:
    from swanlab.proto.swanlab.record.v1.record_pb2 import Record

    record = Record()
    record.ParseFromString(data)
    is_loss = record.HasField("scalar") and record.scalar.key == "train/loss"
    return ((record.start.project, record.start.name) if record.HasField("start") else None,
            (record.scalar.step, record.scalar.value.number) if is_loss else None)


# tracker: (its run folder inside output_dir, the run file in it, the journal's magic, one record's fields)
RUN_FILES = {"wandb": ("wandb/offline-run-*", "run-*.wandb", b":W&B", wandb_record),
             "swanlab": ("swanlog/run-*", "run-*.swanlab", b":SWL", swanlab_record)}


def read_run(output_dir: Path, tracker: str) -> tuple[tuple[str, str], dict[int, float]]:
    """((project, run name), {step: logged train/loss}) from the tracker's offline run file."""
    folder, file, magic, fields = RUN_FILES[tracker]
    runs = list(output_dir.glob(folder))
    assert len(runs) == 1, list(output_dir.iterdir())
    names, history = None, {}
    for data in journal_records(next(runs[0].glob(file)), magic):
        run_names, loss = fields(data)
        names = run_names or names
        if loss:
            history[loss[0]] = loss[1]
    return names, history


def finish(tracker: str) -> None:
    """The Trainer leaves the run open until the process exits. wandb's teardown, unlike finish(), waits for its
    service to have written the whole run file."""
    if tracker == "wandb":
        import wandb

        wandb.teardown()
    else:
        import swanlab

        swanlab.finish()


@pytest.mark.parametrize("tracker", list(RUN_FILES))
def test_a_tracker_writes_an_offline_run_with_the_loss_inside_output_dir(tmp_path, tracker_env, tracker):
    try:
        output_dir = pretrain(tmp_path, tracker)
    finally:
        finish(tracker)
    names, history = read_run(output_dir, tracker)
    assert names == ("mini_qwen", "pt")
    losses = trainer_losses(output_dir)
    assert len(losses) == 2 and history == pytest.approx(losses)


@pytest.mark.parametrize("tracker", ["wandb", "swanlab"])
def test_a_tracker_that_is_not_installed_is_a_one_line_config_error(tmp_path, tracker_env, monkeypatch, tracker):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == tracker else real_find_spec(name, *args))
    with pytest.raises(ConfigError) as error:
        pretrain(tmp_path, tracker)
    assert f"pip install {tracker}" in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "pt").exists()  # stopped at start-up, before any data or model


def test_users_settings_win_and_a_second_stage_gets_its_own_defaults(tmp_path, tracker_env, monkeypatch):
    monkeypatch.setenv("WANDB_PROJECT", "my_project")
    configure_trackers(SimpleNamespace(output_dir=str(tmp_path / "pt"), report_to=["wandb"], run_name=None),
                       TrackerArguments())
    assert (os.environ["WANDB_PROJECT"], os.environ["WANDB_DIR"]) == ("my_project", str(tmp_path / "pt"))
    assert (os.environ["WANDB_NAME"], os.environ["WANDB_MODE"]) == ("pt", "offline")
    assert "SWANLAB_MODE" not in os.environ  # only the trackers report_to names
    # The same process runs the next stage, online: the defaults this module set follow it, the user's stays.
    configure_trackers(SimpleNamespace(output_dir=str(tmp_path / "sft"), report_to=["wandb"], run_name=None),
                       TrackerArguments(tracker_offline=False))
    assert (os.environ["WANDB_PROJECT"], os.environ["WANDB_DIR"]) == ("my_project", str(tmp_path / "sft"))
    assert (os.environ["WANDB_NAME"], os.environ["WANDB_MODE"]) == ("sft", "online")
