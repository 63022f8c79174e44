"""The training loop: teacher-forced cross-entropy, schedules, validation, exact resume.

    loss = − Σ_t log p(y_t | y_<t, x) / (number of real target pieces)   (padding ignored)

(label-smoothed with `label_smoothing` ε > 0, see `rnmt.nn.loss`, which also holds the
CPU's fused vocabulary layer and loss). One update sums the loss
of `update_freq` K batches and divides by their *total* target pieces, so it is the update
of one K-times larger batch (gradient accumulation).

Batches come from `TokenBatchSampler` (token budget, length buckets, shuffled by seed).
Validation runs after every epoch and every `valid_every` updates: loss and perplexity,
and BLEU/chrF of greedy or beam decoding when asked for (`valid_bleu`, or BLEU as the
best/early-stopping metric). `best.pt` keeps the best model by `best_metric`, `last.pt`
the whole run state (optimizer, schedule, RNG, sampler position), from which `--resume`
continues bit for bit: validation runs under a forked RNG, so it never shifts the random
stream of dropout. SIGINT/SIGTERM finish the current update, save `last.pt` and stop.
An update whose loss or gradient is not finite is skipped; `max_bad_updates` of them in a
row stop the run (`TrainingDiverged`) with the last good parameters in `last.pt`. So is a
batch the machine has no memory for, and as many of those in a row stop the run too. Any
other error between two updates (a failed allocation during validation, a bug) saves
`last.pt` before it ends the run: the work since the last save is not lost.

`init_from` starts a new run from a trained model's weights, with a fresh optimizer,
schedule and step count (fine-tuning, `rnmt.warm_start`).

Every log interval and validation becomes a JSON line in `save_dir/metrics.jsonl` (and a
TensorBoard event when tensorboard is installed); `save_dir/config.json` holds the resolved
configuration, which `rnmt train --config` reads back.

Data-parallel (`torchrun`, see `rnmt.distributed`): every rank draws the same batch order
from the seed, and of each update's W·K consecutive batches (W ranks, `update_freq` K) rank r
takes the r-th, (r+W)-th, … — batch i of the epoch goes to rank i mod W, and the tail of
fewer than W batches is dropped so every rank runs the same number of updates. Each rank's
loss is scaled by W / (target pieces of all W·K batches) and DDP averages the W gradients,
so an update equals that of one process with `update_freq` W·K over the same batches. Rank 0
alone validates (on the unwrapped model) and writes; what validation decides (best, plateau
rate, early stop) is broadcast, and stop requests (signals, `max_time`) are summed over the
ranks at every update, so all ranks stop after the same update.

Mixed precision (`precision` bf16/fp16): the forward pass runs under `torch.autocast`
(matrix products in 16 bits); parameters, gradients, the optimizer and checkpoints stay
fp32, and the loss and log-softmax run in fp32 (`rnmt.nn.loss.smoothed_token_loss`
casts). fp16 scales the loss (`GradScaler`): an update whose gradient overflows is skipped
and the scale halved. bf16 on a CPU with bf16 matrix units goes further than autocast: the
CPU training kernels multiply in bf16 and keep the rest fp32
(`rnmt.precision.cpu_training_products`).

A language model (`arch="lm"`) trains the same way: its batches' `tgt_in = <s> y` and
`tgt_out = y </s>` come from the one side of a monolingual corpus (`preprocess --mono`) or
the target side of a parallel one; it ignores `src`. Its checkpoint holds the language's
vocabulary as both `src_vocab` and `tgt_vocab`; its validation is perplexity only.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol

import numpy as np
import torch

from rnmt.checkpoint import load_checkpoint, save_checkpoint
from rnmt.data import Batch, ParallelData, TokenBatchSampler, collate, pad_sentences
from rnmt.device import check_threads, resolve_device
from rnmt.distributed import Distributed
from rnmt.errors import CheckpointError, ConfigError, RnmtError, is_out_of_memory, option_flag
from rnmt.heap import keep_freed_memory
from rnmt.models import Model, ModelConfig, build_model
from rnmt.nn.rnn import compact_rnn_weights
from rnmt.optim import LRSchedule, ScheduleConfig, build_optimizer
from rnmt.precision import (PRECISIONS, check_precision, check_precision_name,
                            cpu_has_bf16_units)
from rnmt.preprocess import check_ids, load_data, load_vocabularies
from rnmt.run_dir import (STEP_CHECKPOINT, MetricsLog, check_save_dir, clear_run,
                          plot_curves, run_lock)
from rnmt.search import SearchConfig, search
from rnmt.vocab import EOS, Vocabulary
from rnmt.warm_start import CHANGEABLE, WarmStart, check_same_model, model_options, warm_start

METRICS = ("ppl", "bleu")
# fp16 loss scaling: below this scale, an overflowing gradient is no longer the scaler's
# business but a diverging run (fairseq's --min-loss-scale).
MIN_LOSS_SCALE = 1e-4


@dataclass
class TrainConfig:
    """How to train (the model's own shape lives in `ModelConfig`). Field names are the
    `rnmt train` option names, so a saved config reads back as a config file."""

    save_dir: Path
    max_tokens: int = 3000
    max_sentences: int | None = None
    update_freq: int = 1
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    clip_norm: float = 5.0
    label_smoothing: float = 0.0
    lr_scheduler: str = "constant"
    warmup: int = 0
    lr_decay: float = 0.5
    lr_decay_steps: int = 10000
    patience: int = 5
    min_lr: float = 0.0
    max_epochs: int = 30
    max_steps: int | None = None
    max_time: float | None = None  # minutes
    valid_every: int | None = None
    valid_bleu: bool = False
    valid_beam: int = 1
    valid_samples: int = 3
    best_metric: str = "ppl"
    early_stop_metric: str | None = None  # None: the best metric
    early_stop_patience: int | None = None  # None: no early stopping
    save_every: int | None = None
    keep_last: int = 0
    max_bad_updates: int = 5
    log_every: int = 20
    plot: bool = True
    seed: int = 1
    device: str = "auto"
    precision: str = "fp32"
    threads: int | None = None
    resume: bool = False
    overwrite: bool = False  # a new run may replace the checkpoints of one in save_dir
    init_from: Path | None = None  # a new run starts from this checkpoint's weights

    def __post_init__(self) -> None:
        self.save_dir = Path(self.save_dir)
        if self.init_from is not None:
            self.init_from = Path(self.init_from)
        if self.resume and self.overwrite:
            raise ConfigError("--resume continues the run in --save-dir and --overwrite "
                              "deletes it: give one of them")
        check_threads(self.threads)
        for name in ("best_metric", "early_stop_metric"):
            value = getattr(self, name)
            if value is not None and value not in METRICS:
                raise ConfigError(f"unknown {option_flag(name)} {value!r}; "
                                  f"choose from {', '.join(METRICS)}")
        check_precision_name(self.precision)
        if self.update_freq < 1 or self.max_tokens < 1 or self.log_every < 1:
            raise ConfigError("--update-freq, --max-tokens and --log-every must be at least 1")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError("--label-smoothing must be in [0, 1)")
        if self.valid_beam < 1 or self.max_bad_updates < 1:
            raise ConfigError("--valid-beam and --max-bad-updates must be at least 1")
        if self.keep_last < 0 or self.valid_samples < 0:
            raise ConfigError("--keep-last and --valid-samples must not be negative")
        if not math.isfinite(self.clip_norm) or self.clip_norm < 0:
            raise ConfigError("--clip-norm must be a finite number ≥ 0 (0 = no clipping)")
        if self.seed < 0:  # numpy's generators (the batch order) take no negative seed
            raise ConfigError("--seed must not be negative")
        if self.max_time is not None and not self.max_time > 0:
            raise ConfigError("--max-time must be a positive number of minutes")
        for name in ("valid_every", "save_every", "early_stop_patience", "max_steps",
                     "max_sentences", "max_epochs"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{option_flag(name)} must be at least 1")

    @property
    def stop_metric(self) -> str:
        return self.early_stop_metric or self.best_metric

    @property
    def needs_bleu(self) -> bool:
        """Decode the validation set only when BLEU is asked for or steers the run."""
        return self.valid_bleu or "bleu" in (self.best_metric, self.stop_metric)

    def schedule(self) -> ScheduleConfig:
        return ScheduleConfig(self.lr_scheduler, self.lr, self.warmup, self.lr_decay,
                              self.lr_decay_steps, self.patience, self.min_lr)

    def to_dict(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


class TrainingInterrupted(Exception):
    """Raised after SIGINT/SIGTERM once `last.pt` is safely written."""

    def __init__(self, checkpoint: Path, step: int) -> None:
        super().__init__(f"interrupted at step {step}; saved {checkpoint}")
        self.checkpoint = checkpoint
        self.step = step


class TrainingDiverged(RnmtError):
    """`max_bad_updates` updates in a row had a non-finite loss or gradient."""


class Reporter(Protocol):
    """How the loop tells the outside world what it does (the CLI draws it with rich)."""

    def start(self, info: dict[str, Any]) -> None: ...
    def progress(self, stats: dict[str, Any]) -> None: ...
    def validation(self, stats: dict[str, Any]) -> None: ...
    def warning(self, message: str) -> None: ...
    def finish(self, summary: dict[str, Any]) -> None: ...


class SilentReporter:
    def start(self, info: dict[str, Any]) -> None: ...
    def progress(self, stats: dict[str, Any]) -> None: ...
    def validation(self, stats: dict[str, Any]) -> None: ...
    def warning(self, message: str) -> None: ...
    def finish(self, summary: dict[str, Any]) -> None: ...


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    best_valid_loss: float = math.inf
    best_bleu: float = -math.inf
    stale_validations: int = 0  # validations without improvement of the early-stop metric
    bad_updates: int = 0  # non-finite updates in a row
    skipped_updates: int = 0  # non-finite updates in all
    oom_batches: int = 0  # updates skipped because the device ran out of memory
    elapsed: float = 0.0  # seconds of training before this process (resume)
    history: list[dict] = field(default_factory=list)


@contextlib.contextmanager
def _onednn_off():
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


def precision_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The forward pass's precision: autocast to bf16/fp16 (matrix products in 16 bits,
    reductions and softmax kept in fp32 by autocast's op lists), or nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast(device.type, dtype=PRECISIONS[precision]))
    if device.type == "cpu" and not cpu_has_bf16_units():
        # oneDNN has no 16-bit LSTM kernel for such a CPU ("could not create a primitive
        # descriptor"); without oneDNN, torch's own recurrent kernels run, in fp32.
        stack.enter_context(_onednn_off())
    return stack


def gradient_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of all gradients together, as `clip_grad_norm_` computes it, without
    changing them."""
    if not grads:
        return torch.zeros(())
    if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6: foreach kernels
        return torch.nn.utils.get_total_norm(grads)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


def clip_gradients(grads: list[torch.Tensor], max_norm: float, norm: torch.Tensor,
                   norm_value: float) -> None:
    """Scale the gradients by max_norm / (norm + 1e-6) where that is below 1, as
    `clip_grad_norm_` does; `norm_value` is `norm` read on the host. Only then: the
    multiplication is a pass over every gradient, and after the first updates of the
    reference model the norm stays near 0.5 against a limit of 5."""
    if norm_value + 1e-6 > max_norm:
        coefficient = max_norm / (norm + 1e-6)
        for grad in grads:
            grad.mul_(coefficient.to(grad.device))


def batch_loss(model: Model, batch: Batch, label_smoothing: float = 0.0
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(training loss, NLL), both summed over the real target pieces of a batch.

    Only real positions reach the softmax layer (`positions=`): padding costs nothing there.
    """
    return model(batch.src, batch.src_lengths, batch.tgt_in, positions=batch.real,
                 targets=batch.real_targets(), label_smoothing=label_smoothing)


def token_loss(model: Model, batch: Batch) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over real target pieces, and their number."""
    loss, _ = batch_loss(model, batch)
    return loss, batch.num_tgt_tokens


@contextlib.contextmanager
def evaluation_mode(model: Model) -> Iterator[None]:
    """Dropout off while inside; the model's own mode back afterwards, even on an error
    (a caller that catches it must not go on training without dropout)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def evaluate_loss(model: Model, data: ParallelData, max_tokens: int,
                  device: torch.device) -> float:
    """Mean per-piece negative log-likelihood of a split (perplexity = exp of it)."""
    sampler = TokenBatchSampler(data.src.lengths, data.tgt.lengths, max_tokens, shuffle=False)
    total, tokens = 0.0, 0
    with evaluation_mode(model):
        for indices in sampler.batches(0):
            loss, n = token_loss(model, collate(data, indices).to(device))
            total += float(loss)
            tokens += n
    return total / max(tokens, 1)


@torch.no_grad()
def translate_split(model: Model, data: ParallelData, tgt_vocab: Vocabulary,
                    config: SearchConfig, device: torch.device, batch_size: int = 64
                    ) -> list[str]:
    """Detokenised best translation of every source sentence of a binarised split, in
    split order (sentences of similar length share a batch)."""
    order = np.argsort(data.src.lengths, kind="stable")
    out = [""] * len(data)
    with evaluation_mode(model):
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            src, lengths = pad_sentences([data.src[int(i)] for i in chunk], suffix=EOS)
            for i, hyp in zip(chunk, search(model, src.to(device), lengths, config)):
                out[int(i)] = tgt_vocab.decode(hyp.tokens)
    return out


class Trainer:
    """One training run. `dist` places this process in a data-parallel run (torchrun; see
    `rnmt.distributed.setup`); without it the run is a single process on `config.device`.
    Only rank 0 reports, writes files and validates."""

    def __init__(self, data_dir: Path, model_config: dict[str, Any], config: TrainConfig,
                 reporter: Reporter | None = None, dist: Distributed | None = None) -> None:
        self.config = config
        # before any data is read: the cheapest mistake to report
        check_save_dir(config.save_dir, config.resume, config.overwrite)
        self.data_dir = Path(data_dir)
        self.dist = dist or Distributed(device=resolve_device(config.device))
        self.reporter = (reporter or SilentReporter()) if self.dist.is_main else SilentReporter()
        if config.threads:
            torch.set_num_threads(config.threads)
        keep_freed_memory()  # every batch reuses the last one's pages (rnmt.heap)
        self.device = self.dist.device
        self.precision_warning = check_precision(config.precision, self.device)
        self.resume_warning: str | None = None  # set by _restore
        self.meta, self.train_data = load_data(data_dir, "train")
        _, self.valid_data = load_data(data_dir, "valid")
        self.src_vocab, self.tgt_vocab = load_vocabularies(data_dir, self.meta)
        for split, data in (("train", self.train_data), ("valid", self.valid_data)):
            check_ids(data_dir, split, data, self.src_vocab, self.tgt_vocab, self.meta)
        self.state = TrainState()
        self.last_path = config.save_dir / "last.pt"
        self.best_path = config.save_dir / "best.pt"

        torch.manual_seed(config.seed)
        resumed = self._load_resume() if config.resume else None
        # A resumed run was warm-started already: its own last.pt holds its weights.
        start = None
        if resumed is None and config.init_from is not None:
            start, saved_options = model_options(config.init_from)
            check_same_model(config.init_from, saved_options, model_config)
            model_config = {**saved_options, **{name: model_config[name] for name in CHANGEABLE
                                                if name in model_config}}
        options = resumed["model_config"] if resumed is not None else model_config
        self._check_data_fits(data_dir, options)
        if options.get("arch") == "lm":
            self.src_vocab = self.tgt_vocab  # one language: the LM's (only) vocabulary
            if config.needs_bleu:
                raise ConfigError("a language model is validated by perplexity only: "
                                  "--valid-bleu and the metric bleu need a translation model")
        if resumed is not None:
            self.model_config = ModelConfig.from_dict(resumed["model_config"])
            saved = resumed.get("train_config", {})
            self.model_options = {k: saved.get(k, v) for k, v in model_config.items()}
        else:
            self.model_config = ModelConfig(
                src_vocab_size=len(self.src_vocab), tgt_vocab_size=len(self.tgt_vocab),
                **model_config,
            )
            self.model_options = dict(model_config)
        self.model = compact_rnn_weights(build_model(self.model_config).to(self.device))
        self.warm_start: WarmStart | None = None
        if start is not None:
            vocabs = {"tgt": self.tgt_vocab}
            if self.model_config.arch != "lm":
                vocabs["src"] = self.src_vocab
            self.warm_start = warm_start(self.model, config.init_from, start, vocabs)
        if self.dist.rank > 0:
            # Same initialisation on every rank (DDP also broadcasts rank 0's), but each
            # rank its own dropout stream, as each batch of one process gets fresh masks.
            torch.manual_seed(config.seed + self.dist.rank)
        self.optimizer = build_optimizer(config.optimizer, self.model.parameters(), config.lr,
                                         config.weight_decay)
        self.schedule = LRSchedule(config.schedule(), self.optimizer)
        self.sampler = TokenBatchSampler(
            self.train_data.src.lengths, self.train_data.tgt.lengths, config.max_tokens,
            config.max_sentences, seed=config.seed,
        )
        self.scaler = (torch.amp.GradScaler(self.device.type)
                       if config.precision == "fp16" else None)
        if resumed is not None:
            self._restore(resumed)
        # What trains: the model itself, or its DDP wrapper, whose backward averages the
        # gradients over the ranks. Checkpoints and validation use the model itself.
        self.train_model: torch.nn.Module = self.model
        if self.dist.enabled:
            n_batches = len(self.sampler.batches(0))
            if n_batches < self.dist.world_size:
                raise ConfigError(
                    f"{data_dir}: the training data makes {n_batches} batch(es) of "
                    f"--max-tokens {config.max_tokens}, too few for {self.dist.world_size} "
                    "ranks; lower --max-tokens or start fewer processes")
            # device_ids=None: DDP leaves the inputs where they are. With the device listed
            # it would move the batch's CPU lengths to the GPU, and packing them (which
            # needs them on the host) would wait for the device at every batch.
            self.train_model = torch.nn.parallel.DistributedDataParallel(self.model,
                                                                         device_ids=None)
        self._stop_signal: int | None = None
        self._stopping = False  # a signal reached some rank: all stop after this update
        self._late = False  # --max-time passed on some rank, as agreed at the last update
        self._started: float | None = None
        self._updating = False  # inside an optimizer step (see `train_step`)
        self._oom_in_a_row = 0  # batches skipped for want of memory since the last update
        self.metrics: MetricsLog | None = None

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

    def resolved_config(self) -> dict[str, Any]:
        """Every option of this run, flat, under its `rnmt train` name. Not --resume and
        --overwrite: they say what one command does to the save directory, and config.json
        read back with --config must never delete or continue a run by itself."""
        options = {"data": str(self.data_dir), **self.model_options, **self.config.to_dict()}
        for action in ("resume", "overwrite"):
            options.pop(action)
        return options

    # --- checkpoints --------------------------------------------------------------------

    def _rng_state(self) -> dict[str, Any]:
        """This rank's RNG states; in a data-parallel run also every rank's, stacked
        (`torch_ranks`, `cuda_ranks`), so each rank resumes its own dropout stream.
        A collective: every rank calls it at the same point."""
        state: dict[str, Any] = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        if self.dist.enabled:
            for key in list(state):
                state[f"{key}_ranks"] = torch.stack(self.dist.all_gather(state[key]))
        return state

    def _payload(self, with_training: bool) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "model_config": self.model_config.to_dict(),
            "model": self.model.state_dict(),
            "src_vocab": self.src_vocab.state_dict(),
            "tgt_vocab": self.tgt_vocab.state_dict(),
            "train_config": self.resolved_config(),
            "step": self.state.step,
        }
        if with_training:
            payload["training"] = {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.schedule.state_dict(),
                "sampler": self.sampler.state_dict(),
                "rng": self._rng_state(),
                "state": asdict(self.state),
            }
            if self.scaler is not None:
                payload["training"]["grad_scaler"] = self.scaler.state_dict()
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
        if "scheduler" in training:
            self.schedule.load_state_dict(training["scheduler"])
        if not self.sampler.load_state_dict(training["sampler"]):
            saved = training["sampler"]
            self.resume_warning = (
                f"the training data or its batching changed since {self.last_path} was "
                f"saved ({saved['batching']}; now {self.sampler.fingerprint}): epoch "
                f"{saved['epoch'] + 1} starts over on the new batches instead of continuing "
                f"after batch {saved['position']}")
        if self.scaler is not None and "grad_scaler" in training:
            self.scaler.load_state_dict(training["grad_scaler"])
        rng = training["rng"]
        if isinstance(rng, torch.Tensor):  # checkpoints before the RNG dict
            rng = {"torch": rng}
        for key in ("torch", "cuda"):  # this rank's own stream when the run had as many
            ranks = rng.get(f"{key}_ranks")
            if ranks is not None and len(ranks) == self.dist.world_size:
                # a copy: set_rng_state crashes on a view at a storage offset (torch 2.13)
                rng[key] = ranks[self.dist.rank].clone()
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        self.state = TrainState(**training["state"])

    def save(self) -> None:
        """`last.pt`, written by rank 0 (every rank calls this: the RNG states are gathered)."""
        payload = self._payload(with_training=True)
        if self.dist.is_main:
            save_checkpoint(payload, self.last_path)

    def _save_step_checkpoint(self) -> None:
        """`checkpoint_<step>.pt` (resumable), keeping the `keep_last` newest."""
        keep = self.config.keep_last
        if keep <= 0:
            return
        payload = self._payload(with_training=True)
        if not self.dist.is_main:
            return
        save_checkpoint(payload, self.config.save_dir / f"checkpoint_{self.state.step}.pt")
        found = sorted((int(m.group(1)), p) for p in self.config.save_dir.iterdir()
                       if (m := STEP_CHECKPOINT.fullmatch(p.name)))
        for _, old in found[:-keep]:
            old.unlink(missing_ok=True)

    # --- one update -----------------------------------------------------------------------

    def train_step(self, batches: list[Batch], total_tokens: int | None = None
                   ) -> dict[str, Any]:
        """One update from the summed loss of `batches` (this rank's share of the update),
        divided by the target pieces of the whole update: the update of one batch holding
        them all. `total_tokens` counts the pieces of all ranks' batches (default: those of
        `batches`, the whole update of a single process).

            g = (1/W) Σ_r ∇(W/T · L_r) = ∇(Σ_r L_r) / T       (W ranks, T pieces in all)

        DDP's backward averages the W ranks' gradients; the first K−1 of K batches skip
        that all-reduce (`no_sync`) and the last reduces the accumulated sum once. A
        non-finite loss or gradient norm skips the update (parameters and optimizer state
        untouched). Returns nll (summed over all ranks' pieces, a float), tokens, updated,
        grad_norm. The update reads the device once (the skip decision needs the norm);
        nothing else here waits for it (the real target positions come indexed from the
        host, `Batch.real`).
        """
        c = self.config
        self.optimizer.zero_grad(set_to_none=True)
        if total_tokens is None:
            total_tokens = sum(b.num_tgt_tokens for b in batches)
        scale = self.dist.world_size / max(total_tokens, 1)
        nll_sum = torch.zeros((), device=self.device)
        try:
            for i, batch in enumerate(batches):
                last = i == len(batches) - 1
                with self._no_sync(unless=last):
                    with precision_context(c.precision, self.device):
                        loss, nll = batch_loss(self.train_model, batch, c.label_smoothing)
                    loss = loss * scale
                    (loss if self.scaler is None else self.scaler.scale(loss)).backward()
                nll_sum += nll
        except (MemoryError, RuntimeError) as err:  # torch.OutOfMemoryError is a RuntimeError
            if not is_out_of_memory(err):
                raise
            if self.dist.enabled:
                # The other ranks are already waiting for this rank's gradients: one rank
                # cannot skip a batch alone.
                raise ConfigError(
                    f"out of memory on rank {self.dist.rank} at step {self.state.step + 1} "
                    "(a batch cannot be skipped in data-parallel training); lower --max-tokens"
                ) from None
            # As fairseq does: drop this update, free what it held, and go on; one batch
            # too large for the device should not end a run of hours.
            self.optimizer.zero_grad(set_to_none=True)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.state.oom_batches += 1
            self._oom_in_a_row += 1
            if self._oom_in_a_row >= c.max_bad_updates:
                self._save_stopping()
                raise ConfigError(
                    f"out of memory on {self._oom_in_a_row} batches in a row (the last of "
                    f"{total_tokens} target pieces); stopped at step {self.state.step} with "
                    f"its state in {self.last_path}. Lower --max-tokens, then continue "
                    "with --resume") from None
            self.reporter.warning(
                f"out of memory on a batch of {total_tokens} target pieces at step "
                f"{self.state.step + 1}; skipped it ({self.state.oom_batches} so far; "
                "a smaller --max-tokens avoids this)"
            )
            return {"nll": 0.0, "tokens": 0, "updated": False, "grad_norm": math.nan}
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # clip and test the true gradient
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        norm = gradient_norm(grads)
        # The loss of all ranks, and their votes to stop (a signal, --max-time), summed
        # in one small all-reduce; read with the norm in the update's one host sync.
        shared = torch.stack([nll_sum, nll_sum.new_full((), float(self._stop_signal is not None)),
                              nll_sum.new_full((), float(self._clock_says_late()))])
        self.dist.all_reduce_sum(shared)
        nll_value, stop_votes, late_votes, norm_value = torch.cat(
            [shared, norm.detach().float().reshape(1).to(shared.device)]).tolist()
        self._stopping, self._late = stop_votes > 0, late_votes > 0
        if not (math.isfinite(nll_value) and math.isfinite(norm_value)):
            self.optimizer.zero_grad(set_to_none=True)
            # fp16: a finite loss with an overflowing gradient is the loss scale's fault;
            # the scaler halves it and the update is skipped without counting as bad.
            overflow = (self.scaler is not None and math.isfinite(nll_value)
                        and self.scaler.get_scale() >= MIN_LOSS_SCALE)
            if self.scaler is not None:
                self.scaler.update()
            self.state.skipped_updates += 1
            if not overflow:
                self.state.bad_updates += 1
            return {"nll": 0.0, "tokens": 0, "updated": False, "grad_norm": norm_value}
        self._oom_in_a_row = 0
        # From here until the step is counted, an error leaves parameters and optimizer
        # state half updated: nothing to save (see `_save_after_error`).
        self._updating = True
        if c.clip_norm > 0:
            clip_gradients(grads, c.clip_norm, norm, norm_value)
        self.schedule.before_update(self.state.step + 1)
        self.optimizer.step()  # the gradients are finite: GradScaler.step would only re-check
        if self.scaler is not None:
            self.scaler.update()
        self.state.step += 1
        self._updating = False
        self.state.bad_updates = 0
        return {"nll": nll_value, "tokens": total_tokens, "updated": True,
                "grad_norm": norm_value}

    def _no_sync(self, unless: bool) -> contextlib.AbstractContextManager:
        """DDP's no_sync (gradients accumulate locally, no all-reduce) unless `unless`."""
        if unless or not self.dist.enabled:
            return contextlib.nullcontext()
        return self.train_model.no_sync()

    def _clock_says_late(self) -> bool:
        """This process's clock is past --max-time (ranks' clocks differ: see `_late`)."""
        c = self.config
        return (c.max_time is not None and self._started is not None
                and self.state.elapsed + time.time() - self._started >= c.max_time * 60)

    def _update_groups(self):
        """The rest of the current epoch as updates: (this rank's batches, target pieces
        of the whole update). An update takes the next W·K batches of the epoch (W ranks,
        K = update_freq), rank r every W-th from the r-th; the last update of an epoch may
        be smaller, and a tail of fewer than W batches is dropped, so that every rank runs
        the same number of updates. The sampler's position counts all ranks' batches."""
        s, world = self.sampler, self.dist.world_size
        batches = s.batches(s.epoch)
        usable = s.position + (len(batches) - s.position) // world * world
        while s.position < usable:
            group = batches[s.position : min(s.position + world * self.config.update_freq,
                                             usable)]
            s.position += len(group)
            # Target pieces (y and </s>) of the whole update, from the sampler's lengths:
            # every rank counts them without collating the other ranks' batches.
            tokens = int(sum(s.tgt_lengths[indices].sum(dtype=np.int64) for indices in group))
            yield group[self.dist.rank :: world], tokens
        s.epoch += 1
        s.position = 0

    # --- validation -----------------------------------------------------------------------

    def validate(self) -> dict[str, Any]:
        """Validate, keep `best.pt`, and feed the schedule and early stopping. In a
        data-parallel run rank 0 measures (the whole set, on the unwrapped model: the
        numbers of a single process) and broadcasts the numbers, from which every rank
        takes the same decisions; the others wait meanwhile."""
        c = self.config
        measured: dict[str, Any] = {}
        if self.dist.is_main:
            devices = [self.device] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):  # the training RNG stream stays put
                measured["valid_loss"] = evaluate_loss(self.model, self.valid_data,
                                                       c.max_tokens, self.device)
                if c.needs_bleu:
                    measured.update(self._decode_valid())
        numbers = ("valid_loss", "bleu", "chrf") if c.needs_bleu else ("valid_loss",)
        shared = dict(zip(numbers, self.dist.broadcast_floats(
            [measured.get(key, math.nan) for key in numbers])))
        loss = shared.pop("valid_loss")
        # The epoch in progress, as the training lines count it: a validation in the middle
        # of epoch 2 (`valid_every`, or a limit reached) belongs to epoch 2, the one at its
        # end too.
        epoch = self.sampler.epoch + (1 if self.sampler.position > 0 else 0)
        stats: dict[str, Any] = {
            "step": self.state.step, "epoch": epoch, "valid_loss": loss,
            "valid_ppl": math.exp(min(loss, 50.0)), "lr": self.schedule.lr, **shared,
        }
        if "samples" in measured:
            stats["samples"] = measured["samples"]
        improved = {"ppl": loss < self.state.best_valid_loss,
                    "bleu": "bleu" in stats and stats["bleu"] > self.state.best_bleu}
        if improved["ppl"]:
            self.state.best_valid_loss = loss
        if improved["bleu"]:
            self.state.best_bleu = stats["bleu"]
        if improved[c.best_metric]:
            stats["best"] = True
            if self.dist.is_main:
                save_checkpoint(self._payload(with_training=False), self.best_path)
        self.state.stale_validations = (0 if improved[c.stop_metric]
                                        else self.state.stale_validations + 1)
        self.schedule.after_validation(
            stats["bleu"] if c.best_metric == "bleu" else loss, c.best_metric == "bleu")
        samples = stats.pop("samples", None)
        self.state.history.append(dict(stats))
        if self.metrics is not None:
            self.metrics.write("valid", stats)
        self.reporter.validation({**stats, "samples": samples} if samples else stats)
        return stats

    def _decode_valid(self) -> dict[str, Any]:
        from rnmt.evaluation import MetricOptions, corpus_scores

        search_config = SearchConfig(beam=self.config.valid_beam)
        hyps = translate_split(self.model, self.valid_data, self.tgt_vocab, search_config,
                               self.device)
        refs = [self.tgt_vocab.decode(self.valid_data.tgt[i].tolist())
                for i in range(len(self.valid_data))]
        scores = {r.key: r.score for r in corpus_scores(hyps, [refs], MetricOptions())}
        samples = [{"source": self.src_vocab.decode(self.valid_data.src[i].tolist()),
                    "reference": refs[i], "hypothesis": hyps[i]}
                   for i in range(min(self.config.valid_samples, len(hyps)))]
        return {"bleu": scores["bleu"], "chrf": scores["chrf"], "samples": samples}

    def _stop_after_validation(self) -> str | None:
        c = self.config
        if c.early_stop_patience and self.state.stale_validations >= c.early_stop_patience:
            return (f"early stopping: valid {c.stop_metric} did not improve in "
                    f"{c.early_stop_patience} validations")
        if self.schedule.below_minimum:
            return f"learning rate {self.schedule.lr:.3g} fell below --min-lr {c.min_lr:g}"
        return None

    # --- the loop -----------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._stop_signal = signum

    def _stop_requested(self) -> bool:
        """A signal arrived: stop after this update. In a data-parallel run, as agreed at
        the last update (a signal reaches the ranks at different moments)."""
        return self._stopping if self.dist.enabled else self._stop_signal is not None

    def _limits_reached(self) -> str | None:
        c = self.config
        if c.max_steps is not None and self.state.step >= c.max_steps:
            return f"reached --max-steps {c.max_steps}"
        # Ranks' clocks differ: in a data-parallel run the time is up when the last update
        # agreed it is (or the resumed run had used it all already).
        late = self._late if self.dist.enabled else self._clock_says_late()
        if c.max_time is not None and (late or self.state.elapsed >= c.max_time * 60):
            return f"reached --max-time {c.max_time:g} min"
        if self.state.epoch >= c.max_epochs:
            return f"reached --max-epochs {c.max_epochs}"
        if self.schedule.below_minimum:
            return f"learning rate {self.schedule.lr:.3g} fell below --min-lr {c.min_lr:g}"
        return None

    def _validated_now(self) -> bool:
        return bool(self.state.history) and self.state.history[-1]["step"] == self.state.step

    def train(self) -> dict[str, Any]:
        """Train until a limit, early stopping, a signal or divergence; the summary."""
        # Rank 0 alone writes the save directory, so it alone holds the run's lock.
        with run_lock(self.config.save_dir) if self.dist.is_main else contextlib.nullcontext():
            return self._train()

    def _train(self) -> dict[str, Any]:
        c = self.config
        main = self.dist.is_main
        if main:
            try:
                if c.overwrite:
                    clear_run(c.save_dir)
                (c.save_dir / "config.json").write_text(
                    json.dumps(self.resolved_config(), indent=2) + "\n", encoding="utf-8")
                self.metrics = MetricsLog(c.save_dir, append=c.resume,
                                          warn=self.reporter.warning)
            except OSError as err:  # read-only, no permission, a file in the way, full disk
                raise ConfigError(f"--save-dir {c.save_dir}: cannot write "
                                  f"({err.strerror or err})") from None
        n_params = sum(p.numel() for p in self.model.parameters())
        per_epoch = len(self.sampler.batches(self.state.epoch)) // self.dist.world_size
        self.reporter.start({
            "parameters": n_params, "device": str(self.device),
            "threads": torch.get_num_threads(), "train_pairs": len(self.train_data),
            "batches_per_epoch": per_epoch, "ranks": self.dist.world_size,
            "precision": c.precision,
            "model_config": self.model_config.to_dict(), "resumed_at": self.state.step,
            "warm_start": self.warm_start,
        })
        for warning in (self.precision_warning, self.resume_warning):
            if warning:
                self.reporter.warning(warning)
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        started = self._started = time.time()
        window_tokens, window_nll, window_start = 0, 0.0, time.time()
        reason = self._limits_reached()
        try:
            self.model.train()
            while reason is None:
                for shares, tokens in self._update_groups():
                    batches = [collate(self.train_data, ix).to(self.device) for ix in shares]
                    result = self.train_step(batches, tokens)
                    if self.state.bad_updates >= c.max_bad_updates:
                        self._diverged()
                    if not result["updated"]:
                        if self._stop_requested():
                            break
                        continue
                    window_tokens += result["tokens"]
                    window_nll += result["nll"]
                    step = self.state.step
                    if step % c.log_every == 0:
                        now = time.time()
                        mean = window_nll / max(window_tokens, 1)
                        stats = {
                            "step": step, "epoch": self.state.epoch + 1, "loss": mean,
                            "ppl": math.exp(min(mean, 50.0)), "lr": self.schedule.lr,
                            "tokens_per_s": window_tokens / max(now - window_start, 1e-9),
                            "elapsed": self.state.elapsed + now - started,
                            "skipped_updates": self.state.skipped_updates,
                        }
                        if self.scaler is not None:
                            stats["loss_scale"] = self.scaler.get_scale()
                        if self.metrics is not None:
                            self.metrics.write("train", stats)
                        self.reporter.progress(stats)
                        window_tokens, window_nll, window_start = 0, 0.0, now
                    if self._stop_requested():
                        break
                    if c.valid_every and step % c.valid_every == 0:
                        self.validate()
                        reason = self._stop_after_validation()
                        self.save()
                        self._save_step_checkpoint()
                    elif c.save_every and step % c.save_every == 0:
                        self.save()
                        self._save_step_checkpoint()
                    reason = reason or self._limits_reached()
                    if reason is not None:
                        break
                if self._stop_requested():
                    self._save_stopping()
                    raise TrainingInterrupted(self.last_path, self.state.step)
                if self.sampler.position == 0:  # the epoch ran to its end
                    self.state.epoch = self.sampler.epoch
                    if not self._validated_now():
                        self.validate()
                        reason = reason or self._stop_after_validation()
                        self.save()
                        self._save_step_checkpoint()
                    reason = reason or self._limits_reached()
            if not self._validated_now():
                self.validate()
            self._save_stopping()
        except Exception as err:
            # Ours (RnmtError, TrainingInterrupted) come after a save or from one.
            if not isinstance(err, (RnmtError, TrainingInterrupted)):
                self._save_after_error()
            raise
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            if self.metrics is not None:
                self.metrics.close()
        plot = (main and c.plot and not self.metrics.failed
                and plot_curves(self.metrics.path, c.save_dir / "training.png"))
        summary = {"reason": reason, "step": self.state.step, "epoch": self.state.epoch,
                   "best_valid_loss": self.state.best_valid_loss,
                   "best_valid_ppl": math.exp(min(self.state.best_valid_loss, 50.0)),
                   "best_bleu": (self.state.best_bleu if math.isfinite(self.state.best_bleu)
                                 else None),
                   "skipped_updates": self.state.skipped_updates,
                   "elapsed": self.state.elapsed, "best": str(self.best_path),
                   "last": str(self.last_path),
                   "plot": str(c.save_dir / "training.png") if plot else None}
        self.reporter.finish(summary)
        return summary

    def _save_stopping(self) -> None:
        """`last.pt` as the run stops, this process's training time counted in (a resumed
        `--max-time` run goes on from it)."""
        assert self._started is not None
        self.state.elapsed += time.time() - self._started
        self.save()

    def _save_after_error(self) -> None:
        """An unexpected error ends the run (a failed allocation in validation, a bug):
        keep the updates since the last save in `last.pt`, then let the error go on. Not
        from inside an optimizer step (its state is torn), and not in a data-parallel run
        (a save gathers every rank's RNG state, and the other ranks are not listening).
        The batch being trained when the error came is skipped by `--resume`."""
        if self.dist.enabled or self._updating:
            return
        try:
            self._save_stopping()
        except Exception as err:  # the disk, say; the error on its way out comes first
            self.reporter.warning(f"an error stopped training at step {self.state.step}, "
                                  f"and saving failed too: {err}")
            return
        self.reporter.warning(f"an error stopped training at step {self.state.step}; "
                              f"saved {self.last_path} (continue with --resume)")

    def _diverged(self) -> None:
        """Stop: the parameters are still the last good ones (bad updates were skipped)."""
        self._save_stopping()
        raise TrainingDiverged(
            f"{self.state.bad_updates} updates in a row had a non-finite loss or gradient "
            f"(--max-bad-updates {self.config.max_bad_updates}); stopped at step "
            f"{self.state.step} with the last good parameters in {self.last_path}. "
            "Try a lower --lr or --clip-norm, then continue with --resume"
        )
