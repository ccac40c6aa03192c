"""Data preparation takes turns per cache key, cleans up after preparers that died, and refuses to start without
the disk space it will need."""

import json
import logging
import multiprocessing
import os
import shutil
import socket
import subprocess
import time

import pyarrow as pa
import pytest
from datasets import Features, Value

from utils.errors import ConfigError
from utils.prepare import Preparation, cache_key, prepare_or_load


def counting_preparation(tmp_path, gate=None) -> Preparation:
    """A preparation of 3 records whose workers note each record they shape in shaped.txt, and first wait for
    `gate` (a file) to exist, when given."""
    data = tmp_path / "corpus.jsonl"
    data.write_text("".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(3)))

    def shape(record, stats):
        while gate is not None and not gate.exists():
            time.sleep(0.05)
        with open(tmp_path / "shaped.txt", "a") as handle:
            handle.write(f"{os.getpid()}\n")
        return {"n": len(record["text"])}

    return Preparation("pt", [str(data)], {"test": "lock"}, shape, pa.schema([("n", pa.int64())]),
                       Features({"n": Value("int64")}))


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_partials_of_dead_preparers_on_this_host_are_removed(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="mini_qwen")
    preparation = counting_preparation(tmp_path)
    cache = tmp_path / "cache"
    final = cache / f"pt-{cache_key(preparation.key)}"
    host = socket.gethostname()
    gone = dead_pid()
    dead = final.with_name(f"{final.name}.partial-{gone}@{host}")
    (dead / "units").mkdir(parents=True)
    (dead / "units" / "unit-0000000.arrow").write_bytes(b"\0" * 2_000_000)
    live_process = subprocess.Popen(["sleep", "60"])
    try:
        live = final.with_name(f"{final.name}.partial-{live_process.pid}@{host}")
        elsewhere = final.with_name(f"{final.name}.partial-{dead_pid()}@another-node")
        live.mkdir()
        elsewhere.mkdir()

        dataset, _ = prepare_or_load(preparation, str(cache), 1, world_size=1)
    finally:
        live_process.kill()
        live_process.wait()
    assert len(dataset) == 3
    assert not dead.exists() and live.is_dir() and elsewhere.is_dir()
    assert f"[cache] removed {dead}, left by pid {gone} which is gone: 2.0 MB freed" in caplog.text


def test_two_preparers_of_one_key_take_turns_and_the_second_reuses_the_first(tmp_path):
    """The first holds the lock and waits at `gate` until the second says it waits; then both finish, and the
    records were shaped once."""
    gate = tmp_path / "gate"
    preparation = counting_preparation(tmp_path, gate)
    cache = tmp_path / "cache"
    lock = cache / f"pt-{cache_key(preparation.key)}.lock"

    def prepare(name):
        handler = logging.FileHandler(tmp_path / f"{name}.log")
        logging.getLogger("mini_qwen").addHandler(handler)
        logging.getLogger("mini_qwen").setLevel(logging.INFO)
        dataset, _ = prepare_or_load(preparation, str(cache), 1, world_size=1)
        handler.close()
        os._exit(0 if len(dataset) == 3 else 1)

    def wait_for(condition, what):
        deadline = time.monotonic() + 60
        while not condition():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.05)

    fork = multiprocessing.get_context("fork")
    first = fork.Process(target=prepare, args=("first",))
    first.start()
    second = None
    try:
        wait_for(lambda: lock.is_file() and f"pid {first.pid} " in lock.read_text(), "the first to take the lock")
        second = fork.Process(target=prepare, args=("second",))
        second.start()
        wait_for(lambda: (tmp_path / "second.log").is_file() and "waiting" in (tmp_path / "second.log").read_text(),
                 "the second to wait")
        gate.touch()
        first.join(60)
        second.join(60)
    finally:
        for process in (first, second):
            if process is not None and process.is_alive():
                process.kill()
    assert first.exitcode == 0 and second.exitcode == 0
    assert (tmp_path / "shaped.txt").read_text().split() == [str(first.pid)] * 3  # tokenized once, by the first
    second_log = (tmp_path / "second.log").read_text()
    assert f"waiting for pid {first.pid} on {socket.gethostname()}, which is preparing the same data" in second_log
    assert "reusing just prepared pt data" in second_log
    assert "[cache] prepared pt data written" in (tmp_path / "first.log").read_text()


def test_a_disk_without_room_for_the_result_is_refused_before_preparing(tmp_path, monkeypatch):
    preparation = counting_preparation(tmp_path)
    input_bytes = (tmp_path / "corpus.jsonl").stat().st_size
    assert 500 < input_bytes < 1000  # needs 2x: more than the 1000 bytes free
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 1000, 1000))
    with pytest.raises(ConfigError, match=rf"1\.0 kB free, and preparing 1 pt file\(s\) of {input_bytes} bytes needs "
                                          rf"about {2 * input_bytes / 1e3:.1f} kB \(2 x the input"):
        prepare_or_load(preparation, str(tmp_path / "cache"), 1, world_size=1)
    assert not (tmp_path / "shaped.txt").exists()  # refused before any work
