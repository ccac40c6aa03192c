"""The ablation command runs the real PT stage per variant and tabulates what it measured."""

import json

from conftest import REFERENCE, REPO


def test_ablation_runs_variants_and_writes_table_and_overlay(tmp_path):
    from tools.ablation import main

    # The original's logged curves are drawn beside ours where the reference data is there (CI; not a plain clone).
    original_logs = REFERENCE / "logs" / "loss_curves_extracted.csv"
    main(["--data_root", str(REPO / "mini_data" / "pt"), "--runs", "pt1", "pt4", "--max_steps", "2",
          "--output_dir", str(tmp_path), "--cache_dir", str(tmp_path / "cache"), "--use_cpu", "true",
          "--disable_tqdm", "true", "--logging_steps", "1",
          *(["--original_logs", str(original_logs)] if original_logs.is_file() else [])])
    rows = json.loads((tmp_path / "ablation.json").read_text())
    assert [(r["run"], r["data"], r["packing"], r["steps"]) for r in rows] == [
        ("pt1", "zh", "none", 2), ("pt4", "zh+en", "document", 2)]
    for row in rows:
        report = json.loads((tmp_path / row["run"] / "data_report.json").read_text())
        assert row["padding_fraction"] == report["packing"]["padding_fraction"]
        assert row["tokens_processed"] == 2 * 8 * 128  # 2 steps x batch 8 x block 128 (demo recipe)
        logged_losses = [entry["loss"] for entry in json.loads((tmp_path / row["run"] / "trainer_state.json")
                                                               .read_text())["log_history"] if "loss" in entry]
        assert row["final_loss"] == logged_losses[-1]
        stage_report = json.loads((tmp_path / row["run"] / "report.json").read_text())
        assert row["heldout_bits_per_byte"] == stage_report["heldout_bits_per_byte"] is not None
    # One document per sample keeps its first block only (these documents are long); packing keeps all but the
    # last partial block.
    pt1, pt4 = (json.loads((tmp_path / run / "data_report.json").read_text())["packing"] for run in ("pt1", "pt4"))
    assert pt1["samples"] == pt1["documents"] and pt1["tokens_dropped"] > pt1["tokens_in"] / 2
    assert pt4["samples"] > pt4["documents"] and pt4["tokens_dropped"] < 128
    # pt1 trains on the Chinese file only, pt4 on both languages.
    assert json.loads((tmp_path / "pt1" / "data_report.json").read_text())["records"]["kept"] == 60
    assert json.loads((tmp_path / "pt4" / "data_report.json").read_text())["records"]["kept"] == 120
    table = (tmp_path / "ablation.md").read_text().splitlines()
    assert table[0].startswith("| run | data | packing | steps") and len(table) == 4
    assert (tmp_path / "ablation_loss.png").stat().st_size > 10_000
    assert (tmp_path / "original_loss.png").is_file() == original_logs.is_file()
