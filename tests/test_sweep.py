"""The lr sweep runs the real PT stage per (lr, schedule, optimizer), tabulates each run's own numbers, records a
diverging run instead of stopping, and skips finished runs on a rerun."""

import json

import pytest

from conftest import REPO, TINY_CONFIG, cpu_flags


def logged_losses(run_dir) -> list[float]:
    return [entry["loss"] for entry in json.loads((run_dir / "trainer_state.json").read_text())["log_history"]
            if "loss" in entry]


def test_sweep_tabulates_every_run_marks_divergence_and_resumes(tmp_path, monkeypatch):
    import tools.sweep

    out = tmp_path / "sweep"
    argv = ["--config", str(REPO / "configs" / "demo_pt.yaml"), "--lrs", "1e-3", "10",
            "--schedules", "cosine_with_min_lr", "--optimizers", "adamw", "muon", "--max_steps", "4",
            "--model_config", str(TINY_CONFIG), "--final_window", "2", *cpu_flags(out, tmp_path / "cache"),
            "--data_files", str(REPO / "mini_data" / "pt"), "--block_size", "32", "--per_device_train_batch_size", "2",
            # lr 10's first update multiplies the loss ~100-fold: with one logged loss as history the anomaly guard
            # stops that run at once, which makes the stage exit non-zero, as a real divergence does
            "--anomaly_min_history", "1"]
    tools.sweep.main(argv)

    result = json.loads((out / "sweep.json").read_text())
    rows = result["runs"]
    assert sorted((row["lr"], row["optimizer"]) for row in rows) == [(1e-3, "adamw"), (1e-3, "muon"),
                                                                     (10.0, "adamw"), (10.0, "muon")]
    for row in rows:
        run_dir = out / row["run"]
        assert row["wall_seconds"] == json.loads((run_dir / "sweep_run.json").read_text())["wall_seconds"]
        if row["lr"] == 10.0:
            stop = json.loads((run_dir / "anomaly.json").read_text())
            assert row["diverged"] == f"stopped at step {stop['step']}: {stop['problem']}"
            assert not (run_dir / "report.json").exists()
        else:
            assert row["diverged"] is None
            assert row["final_loss"] == pytest.approx(sum(logged_losses(run_dir)[-2:]) / 2)
            assert row["heldout_bits_per_byte"] == json.loads((run_dir / "report.json").read_text())[
                "heldout_bits_per_byte"]
    finished = [row for row in rows if not row["diverged"]]
    best = min(finished, key=lambda row: row["final_loss"])
    assert result["best"] == best["run"]
    table = (out / "sweep.md").read_text().splitlines()
    assert len(table) == 2 + len(rows)
    bold = [[cell.strip().strip("*") for cell in line.strip("|").split("|")] for line in table if "**" in line]
    assert [cells[:3] for cells in bold] == [[f"{best['lr']:g}", best["schedule"], best["optimizer"]]]
    assert (out / "sweep.png").stat().st_size > 10_000

    def no_new_run(stage, argv):
        raise AssertionError(f"a finished run was started again: {argv}")

    monkeypatch.setattr(tools.sweep, "run_stage", no_new_run)
    tools.sweep.main(argv)
    assert (out / "sweep.md").read_text().splitlines() == table


def test_a_finished_run_whose_loss_ends_above_its_start_counts_as_diverged():
    from tools.sweep import divergence

    rising = [{"step": 1, "loss": 11.9, "grad_norm": 1.0}, {"step": 2, "loss": 40.0, "grad_norm": 9.0}]
    assert divergence(rising, final_loss=40.0, bits=30.0).startswith("final loss 40 above")
    falling = [{"step": 1, "loss": 11.9, "grad_norm": 1.0}, {"step": 2, "loss": 9.0, "grad_norm": 0.5}]
    assert divergence(falling, final_loss=9.0, bits=3.5) is None
    assert "grad_norm nan at step 2" in divergence(falling[:1] + [{"step": 2, "loss": 9.0, "grad_norm": float("nan")}],
                                                   final_loss=9.0, bits=3.5)
