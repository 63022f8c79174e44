"""Data-parallel training: 2 CPU processes (gloo) under torchrun train like one process that
accumulates both ranks' batches (`--update-freq 2`), and only rank 0 writes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import RNMT, ROOT, TINY_MODEL, TINY_MODEL_FLAGS, run_rnmt
from rnmt.checkpoint import load_checkpoint
from rnmt.data import TokenBatchSampler
from rnmt.distributed import Distributed
from rnmt.errors import ConfigError
from rnmt.preprocess import load_data
from rnmt.training import TrainConfig, Trainer

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
# 17 batches an epoch at --max-tokens 800: 6 updates of 2 batches stay in the first epoch;
# validation (broadcast to rank 1) and a save (RNG states gathered) after update 3.
OPTIONS = ["--device", "cpu", "--max-tokens", "800", "--lr", "3e-3", "--log-every", "1",
           "--valid-every", "3", "--no-plot", *TINY_MODEL_FLAGS]


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    command = TORCHRUN + ["-m", "rnmt_cli.main", "train", *args]
    result = subprocess.run(command, capture_output=True, env=env, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    return result


def _records(save_dir: Path, kind: str) -> list[dict]:
    lines = (save_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def _max_difference(a: Path, b: Path) -> float:
    first, second = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    assert first.keys() == second.keys()  # no DDP `module.` prefix
    return max(float((first[k] - second[k]).abs().max()) for k in first)


@pytest.fixture(scope="module")
def single_run(bin_dir, tmp_path_factory) -> Path:
    """One process accumulating 2 batches per update: the reference."""
    save_dir = tmp_path_factory.mktemp("single")
    run_rnmt("train", str(bin_dir), "--save-dir", str(save_dir), "--update-freq", "2",
             "--max-steps", "6", *OPTIONS, check=True)
    return save_dir


@pytest.fixture(scope="module")
def ddp_run(bin_dir, tmp_path_factory) -> tuple[Path, str]:
    save_dir = tmp_path_factory.mktemp("ddp")
    result = _torchrun(str(bin_dir), "--save-dir", str(save_dir), "--max-steps", "6", *OPTIONS)
    return save_dir, result.stderr.decode()


def test_two_ranks_update_like_one_process_accumulating_both_batches(single_run, ddp_run):
    ddp_dir, _ = ddp_run
    assert load_checkpoint(ddp_dir / "last.pt")["step"] == 6
    assert _max_difference(single_run / "last.pt", ddp_dir / "last.pt") <= 1e-5
    # the logged loss is the global one: both ranks' pieces, as the single run saw them
    single, ddp = _records(single_run, "train"), _records(ddp_dir, "train")
    assert [r["step"] for r in ddp] == list(range(1, 7))
    for a, b in zip(single, ddp):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)


def test_validation_gives_the_single_process_numbers(single_run, ddp_run):
    ddp_dir, _ = ddp_run
    single, ddp = _records(single_run, "valid"), _records(ddp_dir, "valid")
    assert [r["step"] for r in ddp] == [r["step"] for r in single] == [3, 6]
    for a, b in zip(single, ddp):
        assert b["valid_ppl"] == pytest.approx(a["valid_ppl"], rel=1e-5)
    assert _max_difference(single_run / "best.pt", ddp_dir / "best.pt") <= 1e-5


def test_only_rank_zero_writes_files_and_logs(single_run, ddp_run):
    ddp_dir, stderr = ddp_run
    # both ranks appending to metrics.jsonl would double its lines
    assert len((ddp_dir / "metrics.jsonl").read_text().splitlines()) == \
        len((single_run / "metrics.jsonl").read_text().splitlines())
    assert sorted(p.name for p in ddp_dir.iterdir()) == \
        sorted(p.name for p in single_run.iterdir())
    assert stderr.count("parameters on 2 processes") == 1
    assert stderr.count("valid epoch") == 2 and stderr.count("step      6 |") == 1


@pytest.mark.slow
def test_resumed_two_rank_run_continues_exactly(bin_dir, single_run, tmp_path):
    _torchrun(str(bin_dir), "--save-dir", str(tmp_path), "--max-steps", "3", *OPTIONS)
    saved = load_checkpoint(tmp_path / "last.pt")["training"]
    assert saved["sampler"]["position"] == 6  # global batches: 3 updates × 2 ranks
    assert len(saved["rng"]["torch_ranks"]) == 2
    _torchrun(str(bin_dir), "--save-dir", str(tmp_path), "--max-steps", "6", "--resume",
              *OPTIONS)
    assert _max_difference(single_run / "last.pt", tmp_path / "last.pt") <= 1e-5


@pytest.mark.slow
def test_ctrl_c_under_torchrun_saves_once_and_every_rank_stops_after_the_same_update(
        bin_dir, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        TORCHRUN + ["-m", "rnmt_cli.main", "train", str(bin_dir), "--save-dir", str(tmp_path),
                    "--max-steps", "100000", *OPTIONS],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT,
        start_new_session=True)
    assert proc.stderr is not None
    seen = b""
    for line in iter(proc.stderr.readline, b""):
        seen += line
        if b"step      4 |" in line:
            break
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: every process
    _, rest = proc.communicate(timeout=120)
    err = (seen + rest).decode()
    assert err.count("rnmt: interrupted at step") == 1, err[-3000:]
    assert str(ROOT / "rnmt") not in err  # no traceback from a rank
    saved = load_checkpoint(tmp_path / "last.pt")
    step, sampler = saved["step"], saved["training"]["sampler"]
    assert f"interrupted at step {step};" in err and step >= 4
    # the sampler's position counts both ranks' batches of every update (tails dropped)
    _, data = load_data(bin_dir, "train")
    batches = TokenBatchSampler(data.src.lengths, data.tgt.lengths, 800, seed=1)
    done = sum(len(batches.batches(e)) // 2 * 2 for e in range(sampler["epoch"]))
    assert done + sampler["position"] == 2 * step


def test_too_few_batches_for_the_ranks_is_a_config_error(bin_dir, tmp_path):
    # checked before the process group is used, so a rank's place alone shows it
    with pytest.raises(ConfigError, match="too few for 2 ranks"):
        Trainer(bin_dir, TINY_MODEL, TrainConfig(save_dir=tmp_path, max_tokens=100_000,
                                                 device="cpu"),
                dist=Distributed(rank=0, world_size=2))


def test_without_torchrun_a_world_size_is_a_one_line_error(bin_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    env.update(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", OMP_NUM_THREADS="1")
    result = subprocess.run(RNMT + ["train", str(bin_dir), "--save-dir", str(tmp_path),
                                    "--device", "cpu"],
                            capture_output=True, env=env, cwd=ROOT, timeout=120)
    assert result.returncode == 2
    assert result.stderr.decode().strip().splitlines()[-1].startswith("rnmt: error: WORLD_SIZE=2")

