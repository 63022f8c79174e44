"""The training loop: teacher-forced cross-entropy, Adam, clipping, validation, checkpoints.

    loss = − Σ_t log p(y_t | y_<t, x) / (number of real target pieces)   (padding ignored)

Batches come from `TokenBatchSampler` (token budget, length buckets, shuffled by seed).
Validation perplexity exp(loss) runs after every epoch and every `valid_every` updates;
`best.pt` keeps the best validation loss, `last.pt` the latest state, from which `--resume`
continues. SIGINT/SIGTERM finish the current update, save `last.pt` and stop.

A language model (`arch="lm"`) trains the same way: its batches' `tgt_in = <s> y` and
`tgt_out = y </s>` come from the one side of a monolingual corpus (`preprocess --mono`) or
the target side of a parallel one; it ignores `src`. Its checkpoint holds the language's
vocabulary as both `src_vocab` and `tgt_vocab`.
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from rnmt.checkpoint import load_checkpoint, save_checkpoint
from rnmt.data import ParallelData, TokenBatchSampler, collate
from rnmt.errors import CheckpointError, ConfigError
from rnmt.models import Model, ModelConfig, build_model
from rnmt.preprocess import load_data, load_vocabularies
from rnmt.translator import resolve_device
from rnmt.vocab import PAD, Vocabulary


@dataclass
class TrainConfig:
    """How to train (the model's own shape lives in `ModelConfig`)."""

    save_dir: Path
    max_tokens: int = 3000
    max_sentences: int | None = None
    lr: float = 1e-3
    clip_norm: float = 5.0
    max_epochs: int = 30
    max_steps: int | None = None
    max_time: float | None = None  # minutes
    valid_every: int | None = None
    log_every: int = 20
    seed: int = 1
    device: str = "auto"
    threads: int | None = None
    resume: bool = False

    def to_dict(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


class TrainingInterrupted(Exception):
    """Raised after SIGINT/SIGTERM once `last.pt` is safely written."""

    def __init__(self, checkpoint: Path, step: int) -> None:
        super().__init__(f"interrupted at step {step}; saved {checkpoint}")
        self.checkpoint = checkpoint
        self.step = step


class Reporter(Protocol):
    """How the loop tells the outside world what it does (the CLI draws it with rich)."""

    def start(self, info: dict[str, Any]) -> None: ...
    def progress(self, stats: dict[str, Any]) -> None: ...
    def validation(self, stats: dict[str, Any]) -> None: ...
    def finish(self, summary: dict[str, Any]) -> None: ...


class SilentReporter:
    def start(self, info: dict[str, Any]) -> None: ...
    def progress(self, stats: dict[str, Any]) -> None: ...
    def validation(self, stats: dict[str, Any]) -> None: ...
    def finish(self, summary: dict[str, Any]) -> None: ...


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    best_valid_loss: float = math.inf
    elapsed: float = 0.0  # seconds of training before this process (resume)
    history: list[dict] = field(default_factory=list)


def token_loss(model: Model, batch) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over real target pieces, and their number."""
    logits = model(batch.src, batch.src_lengths, batch.tgt_in)
    loss = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), batch.tgt_out.reshape(-1),
        ignore_index=PAD, reduction="sum",
    )
    return loss, int((batch.tgt_out != PAD).sum())


@torch.no_grad()
def evaluate_loss(model: Model, data: ParallelData, max_tokens: int,
                  device: torch.device) -> float:
    """Mean per-piece negative log-likelihood of a split (perplexity = exp of it)."""
    was_training = model.training
    model.eval()
    sampler = TokenBatchSampler(data.src.lengths, data.tgt.lengths, max_tokens, shuffle=False)
    total, tokens = 0.0, 0
    for indices in sampler.batches(0):
        loss, n = token_loss(model, collate(data, indices).to(device))
        total += float(loss)
        tokens += n
    model.train(was_training)
    return total / max(tokens, 1)


class Trainer:
    def __init__(self, data_dir: Path, model_config: dict[str, Any], config: TrainConfig,
                 reporter: Reporter | None = None) -> None:
        self.config = config
        self.reporter = reporter or SilentReporter()
        if config.threads:
            torch.set_num_threads(config.threads)
        self.device = resolve_device(config.device)
        self.meta, self.train_data = load_data(data_dir, "train")
        _, self.valid_data = load_data(data_dir, "valid")
        self.src_vocab, self.tgt_vocab = load_vocabularies(data_dir, self.meta)
        self.state = TrainState()
        self.last_path = config.save_dir / "last.pt"
        self.best_path = config.save_dir / "best.pt"

        torch.manual_seed(config.seed)
        resumed = self._load_resume() if config.resume else None
        options = resumed["model_config"] if resumed is not None else model_config
        self._check_data_fits(data_dir, options)
        if options.get("arch") == "lm":
            self.src_vocab = self.tgt_vocab  # one language: the LM's (only) vocabulary
        if resumed is not None:
            self.model_config = ModelConfig.from_dict(resumed["model_config"])
        else:
            self.model_config = ModelConfig(
                src_vocab_size=len(self.src_vocab), tgt_vocab_size=len(self.tgt_vocab),
                **model_config,
            )
        self.model = build_model(self.model_config).to(self.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr)
        self.sampler = TokenBatchSampler(
            self.train_data.src.lengths, self.train_data.tgt.lengths, config.max_tokens,
            config.max_sentences, seed=config.seed,
        )
        if resumed is not None:
            self._restore(resumed)
        self._stop_signal: int | None = None

    def _check_data_fits(self, data_dir: Path, options: dict[str, Any]) -> None:
        """Model options that the data cannot serve are a ConfigError, before any training."""
        if self.meta.get("mono") and options.get("arch") != "lm":
            raise ConfigError(
                f"{data_dir}: a monolingual corpus (preprocess --mono) trains only --arch lm"
            )
        if options.get("share_embeddings") and not self.meta.get("joined_dictionary"):
            raise ConfigError(
                f"--share-embeddings needs one vocabulary for both sides, but {data_dir} was "
                "preprocessed without --joined-dictionary"
            )

    # --- checkpoints --------------------------------------------------------------------

    def _payload(self, with_training: bool) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "model_config": self.model_config.to_dict(),
            "model": self.model.state_dict(),
            "src_vocab": self.src_vocab.state_dict(),
            "tgt_vocab": self.tgt_vocab.state_dict(),
            "train_config": self.config.to_dict(),
            "step": self.state.step,
        }
        if with_training:
            payload["training"] = {
                "optimizer": self.optimizer.state_dict(),
                "sampler": self.sampler.state_dict(),
                "rng": torch.get_rng_state(),
                "state": asdict(self.state),
            }
        return payload

    def _load_resume(self) -> dict | None:
        if not self.last_path.exists():
            raise CheckpointError(f"--resume: {self.last_path} does not exist")
        payload = load_checkpoint(self.last_path)
        if "training" not in payload:
            raise CheckpointError(f"{self.last_path}: holds no training state to resume")
        if Vocabulary.from_state_dict(payload["tgt_vocab"]) != self.tgt_vocab:
            raise ConfigError(f"{self.last_path}: trained on another vocabulary than this data")
        return payload

    def _restore(self, payload: dict) -> None:
        self.model.load_state_dict(payload["model"])
        training = payload["training"]
        self.optimizer.load_state_dict(training["optimizer"])
        self.sampler.load_state_dict(training["sampler"])
        torch.set_rng_state(training["rng"])
        self.state = TrainState(**training["state"])

    def save(self) -> None:
        save_checkpoint(self._payload(with_training=True), self.last_path)

    # --- the loop -----------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._stop_signal = signum

    def _limits_reached(self, started: float) -> str | None:
        c = self.config
        if c.max_steps is not None and self.state.step >= c.max_steps:
            return f"reached --max-steps {c.max_steps}"
        if c.max_time is not None and self.state.elapsed + time.time() - started >= c.max_time * 60:
            return f"reached --max-time {c.max_time:g} min"
        if self.state.epoch >= c.max_epochs:
            return f"reached --max-epochs {c.max_epochs}"
        return None

    def validate(self) -> dict[str, Any]:
        loss = evaluate_loss(self.model, self.valid_data, self.config.max_tokens, self.device)
        stats = {"step": self.state.step, "epoch": self.state.epoch, "valid_loss": loss,
                 "valid_ppl": math.exp(min(loss, 50.0))}
        if loss < self.state.best_valid_loss:
            self.state.best_valid_loss = loss
            stats["best"] = True
            save_checkpoint(self._payload(with_training=False), self.best_path)
        self.state.history.append(stats)
        self.reporter.validation(stats)
        return stats

    def train(self) -> dict[str, Any]:
        c = self.config
        c.save_dir.mkdir(parents=True, exist_ok=True)
        n_params = sum(p.numel() for p in self.model.parameters())
        self.reporter.start({
            "parameters": n_params, "device": str(self.device),
            "threads": torch.get_num_threads(), "train_pairs": len(self.train_data),
            "batches_per_epoch": len(self.sampler.batches(self.state.epoch)),
            "model_config": self.model_config.to_dict(), "resumed_at": self.state.step,
        })
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        started = time.time()
        window_tokens, window_loss, window_start = 0, 0.0, time.time()
        reason = self._limits_reached(started)
        try:
            self.model.train()
            while reason is None:
                for indices in self.sampler:
                    batch = collate(self.train_data, indices).to(self.device)
                    loss, n_tokens = token_loss(self.model, batch)
                    self.optimizer.zero_grad(set_to_none=True)
                    (loss / n_tokens).backward()
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.clip_norm)
                    self.optimizer.step()
                    self.state.step += 1
                    window_tokens += n_tokens
                    window_loss += loss.item()
                    if self.state.step % c.log_every == 0:
                        now = time.time()
                        mean = window_loss / max(window_tokens, 1)
                        self.reporter.progress({
                            "step": self.state.step, "epoch": self.state.epoch + 1,
                            "loss": mean, "ppl": math.exp(min(mean, 50.0)),
                            "tokens_per_s": window_tokens / max(now - window_start, 1e-9),
                            "elapsed": self.state.elapsed + now - started,
                        })
                        window_tokens, window_loss, window_start = 0, 0.0, now
                    if self._stop_signal is not None:
                        break
                    if c.valid_every and self.state.step % c.valid_every == 0:
                        self.validate()
                    reason = self._limits_reached(started)
                    if reason is not None:
                        break
                if self._stop_signal is not None:
                    self.state.elapsed += time.time() - started
                    self.save()
                    raise TrainingInterrupted(self.last_path, self.state.step)
                if self.sampler.position == 0:  # the epoch ran to its end
                    self.state.epoch = self.sampler.epoch
                    self.validate()
                    reason = reason or self._limits_reached(started)
            if not self.state.history or self.state.history[-1]["step"] != self.state.step:
                self.validate()
            self.state.elapsed += time.time() - started
            self.save()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        summary = {"reason": reason, "step": self.state.step, "epoch": self.state.epoch,
                   "best_valid_loss": self.state.best_valid_loss,
                   "best_valid_ppl": math.exp(min(self.state.best_valid_loss, 50.0)),
                   "elapsed": self.state.elapsed, "best": str(self.best_path),
                   "last": str(self.last_path)}
        self.reporter.finish(summary)
        return summary
