"""Where a run stops: --max-epochs and --max-time, and what --resume does with them."""

from __future__ import annotations

from conftest import TINY_MODEL
from rnmt.training import TrainConfig, Trainer


def _trainer(bin_dir, save_dir, **options) -> Trainer:
    options = {"max_tokens": 800, "device": "cpu", "plot": False, **options}
    return Trainer(bin_dir, TINY_MODEL, TrainConfig(save_dir=save_dir, **options))


def test_max_epochs_stops_after_that_many_passes_and_resume_may_raise_it(bin_dir, tmp_path):
    trainer = _trainer(bin_dir, tmp_path, max_epochs=2)
    ends = [len(trainer.sampler.batches(0))]
    ends.append(ends[0] + len(trainer.sampler.batches(1)))
    summary = trainer.train()
    assert summary["reason"] == "reached --max-epochs 2"
    assert (summary["step"], summary["epoch"]) == (ends[1], 2)
    assert [h["step"] for h in trainer.state.history] == ends  # each epoch's end validated
    resumed = _trainer(bin_dir, tmp_path, max_epochs=3, resume=True)
    third = len(resumed.sampler.batches(2))
    summary = resumed.train()
    assert summary["reason"] == "reached --max-epochs 3"
    assert (summary["step"], summary["epoch"]) == (ends[1] + third, 3)


def test_max_time_stops_the_run_and_resume_counts_the_time_already_used(bin_dir, tmp_path):
    # 1e-5 min = 0.6 ms, less than one update takes: the run stops after its first few.
    first = _trainer(bin_dir, tmp_path, max_time=1e-5)
    per_epoch = len(first.sampler.batches(0))
    summary = first.train()
    assert summary["reason"] == "reached --max-time 1e-05 min"
    assert 1 <= summary["step"] <= 3 < per_epoch
    assert summary["elapsed"] >= 1e-5 * 60
    # Resumed with the same limit, the run has no time left: no update.
    again = _trainer(bin_dir, tmp_path, max_time=1e-5, resume=True).train()
    assert again["reason"] == summary["reason"] and again["step"] == summary["step"]
    # A raised limit continues the run (here up to a step limit).
    longer = _trainer(bin_dir, tmp_path, max_time=60.0, max_steps=summary["step"] + 3,
                      resume=True).train()
    assert longer["reason"].startswith("reached --max-steps")
    assert longer["step"] == summary["step"] + 3
    assert longer["elapsed"] > again["elapsed"]
