"""The small data tools: sampling a mini set from full data, viewing normalised records, plotting runs."""

import json

import pyarrow.parquet as pq

from conftest import REPO
from utils.formats import load_records


def test_save_mini_data_samples_rows_and_keeps_the_schema(tmp_path):
    from tools.save_mini_data import main

    source = REPO / "mini_data" / "sft" / "7M"
    main(["--source", str(source), "--target", str(tmp_path / "7M"), "--rows", "10", "--seed", "1"])
    written = pq.read_table(tmp_path / "7M" / "train-00000-of-00001.parquet")
    original = pq.read_table(next(source.glob("*.parquet")))
    assert written.num_rows == 10 and written.schema.equals(original.schema, check_metadata=False)
    assert set(written.column("id").to_pylist()) <= set(original.column("id").to_pylist())
    records, counts = load_records(str(tmp_path / "7M"), "sft")
    assert len(records) == 10 and counts.kept == 10


def test_demo_view_data_prints_records_and_counts(capsys):
    from tools.demo_view_data import main

    main([str(REPO / "mini_data" / "dpo"), "--kind", "dpo", "-n", "1"])
    out = capsys.readouterr().out
    pairs = len(load_records(str(REPO / "mini_data" / "dpo"), "dpo")[0])
    assert '"chosen"' in out and f"dpo data (2 files): kept {pairs} records, skipped 0" in out


def test_plot_loss_overlays_runs(tmp_path, capsys):
    from tools.plot_loss import main

    for name, losses in (("a", [3.0, 2.0, 1.5]), ("b", [3.2, 2.5, 2.2])):
        (tmp_path / name).mkdir()
        history = [{"step": i + 1, "loss": loss, "num_input_tokens_seen": 100 * (i + 1)} for i, loss in enumerate(losses)]
        (tmp_path / name / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    main([str(tmp_path / "a"), str(tmp_path / "b"), "--x", "tokens", "--out", str(tmp_path / "both.png")])
    assert (tmp_path / "both.png").stat().st_size > 10_000 and "wrote" in capsys.readouterr().out
