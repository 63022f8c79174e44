"""`rnmt train`: train an encoder-decoder (attentive or vanilla) or a language model."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console


class RichReporter:
    """Training progress on stderr: one line per log interval and per validation."""

    def __init__(self) -> None:
        self.console = Console(stderr=True, highlight=False, soft_wrap=True)

    def start(self, info: dict[str, Any]) -> None:
        c = info["model_config"]
        what = [c["cell"]] + ([f"attention {c['attention']}"] if c["arch"] == "attention" else [])
        what += [flag.replace("_", "-") for flag in ("input_feeding", "reverse_source",
                                                     "tie_embeddings", "share_embeddings")
                 if c.get(flag)]
        if c.get("cell_impl", "fused") != "fused":
            what.append(f"{c['cell_impl']} cells")
        where = (f"{info['ranks']} processes (DDP), rank 0 on {info['device']}"
                 if info.get("ranks", 1) > 1 else info["device"])
        precision = info.get("precision", "fp32")
        self.console.print(
            f"[bold]model[/bold] {c['arch']} ({', '.join(what)}): "
            f"{info['parameters']:,} parameters on {where} "
            f"({info['threads']} threads{'' if precision == 'fp32' else ', ' + precision}); "
            f"{info['train_pairs']:,} training "
            f"{'sentences' if c['arch'] == 'lm' else 'pairs'}, "
            f"{info['batches_per_epoch']} batches/epoch"
            + (" per process" if info.get("ranks", 1) > 1 else "")
            + (f"; resumed at step {info['resumed_at']}" if info["resumed_at"] else "")
        )
        start = info.get("warm_start")
        if start is not None:
            kept = ", ".join(f"{'source' if side == 'src' else 'target'} {n:,} of {total:,}"
                             for side, (n, total) in sorted(start.pieces.items()))
            self.console.print(f"weights from {start.path} (step {start.step:,}); pieces "
                               f"found in its vocabularies: {kept}", markup=False)

    def progress(self, s: dict[str, Any]) -> None:
        self.console.print(
            f"epoch {s['epoch']:3d} | step {s['step']:6d} | loss {s['loss']:.3f} | "
            f"ppl {s['ppl']:8.2f} | lr {s['lr']:.2e} | {s['tokens_per_s']:7.0f} tgt tok/s | "
            f"{_clock(s['elapsed'])}"
            + (f" | {s['skipped_updates']} skipped" if s.get("skipped_updates") else "")
        )

    def validation(self, s: dict[str, Any]) -> None:
        best = " [green](best)[/green]" if s.get("best") else ""
        scores = (f" BLEU {s['bleu']:.2f} chrF {s['chrf']:.2f}" if "bleu" in s else "")
        self.console.print(
            f"[bold]valid[/bold] epoch {s['epoch']} step {s['step']}: "
            f"loss {s['valid_loss']:.3f} ppl {s['valid_ppl']:.2f}{scores} "
            f"lr {s['lr']:.3g}{best}"
        )
        for sample in s.get("samples") or []:
            self.console.print(f"  src: {sample['source']}", markup=False)
            self.console.print(f"  ref: {sample['reference']}", markup=False)
            self.console.print(f"  hyp: {sample['hypothesis']}", markup=False)

    def warning(self, message: str) -> None:
        self.console.print(f"[yellow]warning:[/yellow] {message}")

    def finish(self, s: dict[str, Any]) -> None:
        self.console.print(
            f"done: {s['reason']} after {s['step']} steps, {_clock(s['elapsed'])}; "
            f"best valid ppl {s['best_valid_ppl']:.2f}"
            + (f", BLEU {s['best_bleu']:.2f}" if s.get("best_bleu") is not None else "")
            + f" → {s['best']}"
        )


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h:d}:{m:02d}:{s:02d}"


MODEL_OPTIONS = (
    "arch", "cell", "cell_impl", "attention", "emb_dim", "hidden_dim", "dec_hidden_dim",
    "enc_layers", "dec_layers", "bidirectional", "attn_dim", "output_dim", "dropout",
    "input_feeding", "reverse_source", "tie_embeddings", "share_embeddings",
)


def _refuse_attention_without_attention(ctx: typer.Context, merged: dict[str, Any],
                                        explicit: set[str]) -> None:
    """`--arch seq2seq --attention dot` is a ConfigError, not a model without attention
    trained in silence. Only a score set on the command line or in --config to another
    value than the default counts, so a seq2seq run's own config.json (which holds every
    option) stays a valid --config. Unused sizes (`--attn-dim` for seq2seq) are let be: a
    config shared by several architectures holds them."""
    from rnmt.errors import ConfigError

    default = next(p.default for p in ctx.command.params if p.name == "attention")
    if (merged["arch"] != "attention" and "attention" in explicit
            and merged["attention"] != default):
        raise ConfigError(f"--attention {merged['attention']}: --arch {merged['arch']} has no "
                          "attention; use --arch attention, or drop --attention")


def _resolve(ctx: typer.Context, given: dict[str, Any], config_file: Path | None
             ) -> dict[str, Any]:
    """Command line > --config file > the resumed run's options (--resume) > defaults; the
    files' values converted to the options' types (so `lr: 1e-3`, a string to PyYAML, is a
    float)."""
    import typing

    from rnmt.run_config import coerce, load_run_config, merge_options
    from rnmt_cli.main import given_on_command_line

    explicit = {name for name in given if given_on_command_line(ctx, name)}
    init_from_given = "init_from" in explicit
    hints = typing.get_type_hints(train)
    merged = dict(given)
    if config_file is not None:
        from_file = load_run_config(config_file)
        merged = merge_options(given, explicit, from_file, str(config_file))
        for name in set(from_file) - explicit:
            merged[name] = coerce(merged[name], hints[name], name, str(config_file))
        explicit |= set(from_file)
    _refuse_attention_without_attention(ctx, merged, explicit)
    if merged["init_from"] is not None:
        _take_the_checkpoints_model(merged, explicit, init_from_given)
    if merged["resume"] and merged["save_dir"] is not None:
        # `--resume` continues the run as it was: its saved options (batch size, rate,
        # threads, limits ...) are the defaults, and only what is given again overrides
        # them ("--max-steps 40" raises the limit). The SIGINT handler prints exactly
        # `rnmt train DATA --save-dir D --resume`, which must not fall back to defaults.
        from rnmt.run_dir import saved_run_options

        path, saved = saved_run_options(Path(merged["save_dir"]))
        _refuse_a_new_model(merged, explicit, saved, path)
        for name, value in saved.items():
            if name in explicit or name not in hints or name in ("resume", "overwrite",
                                                                  "save_dir", "config"):
                continue
            if value is None and type(None) not in typing.get_args(hints[name]):
                continue  # threads=None is the run's "torch's default": keep the option's 0
            merged[name] = coerce(value, hints[name], name, str(path))
    return merged


def _take_the_checkpoints_model(merged: dict[str, Any], explicit: set[str],
                                on_command_line: bool) -> None:
    """`--init-from CKPT` trains CKPT's model: its options replace the defaults (one given
    that differs is refused by the Trainer, `rnmt.warm_start.check_same_model`).
    `--resume --init-from` is refused: a resumed run was warm-started already (its
    config.json, read back with --config, names the checkpoint it started from)."""
    from rnmt.errors import ConfigError
    from rnmt.warm_start import model_options

    if merged["resume"]:
        if on_command_line:
            raise ConfigError("--init-from starts a new run from a checkpoint's weights and "
                              "--resume continues a run: give one of them")
        return  # the run's saved options name the checkpoint it started from
    _, saved = model_options(Path(merged["init_from"]))
    for name in MODEL_OPTIONS:
        if name not in explicit:
            merged[name] = saved[name]


def _refuse_a_new_model(merged: dict[str, Any], explicit: set[str], saved: dict[str, Any],
                        path: Path) -> None:
    """A resumed run keeps its model (its weights have its shapes): a model option given
    with --resume that differs from the run's is a ConfigError, not silently ignored."""
    from rnmt.errors import ConfigError
    from rnmt.models.config import changed_options

    saved = dict(saved)
    if saved.get("layers") is None and saved.get("enc_layers") == saved.get("dec_layers"):
        saved["layers"] = saved.get("enc_layers")  # `--layers N` sets both
    changed = changed_options(merged, saved, [name for name in (*MODEL_OPTIONS, "layers")
                                              if name in explicit], "the run's")
    if changed:
        raise ConfigError(f"--resume continues the model of {path}; it cannot change "
                          f"{', '.join(changed)}: drop them, or start a new run")


def train(
    ctx: typer.Context,
    data: Annotated[Optional[Path], typer.Argument(help="Directory written by rnmt preprocess (or `data` in --config).", show_default=False)] = None,
    save_dir: Annotated[Optional[Path], typer.Option(help="Where checkpoints (best.pt, last.pt, checkpoint_<step>.pt), config.json and metrics.jsonl go.", show_default=False)] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="Options from a TOML, YAML (needs PyYAML) or JSON file, e.g. a run's config.json; options given on the command line win.", show_default=False)] = None,
    arch: Annotated[str, typer.Option(help="attention (Bahdanau/Luong), seq2seq (Sutskever, no attention) or lm (RNN language model).")] = "attention",
    cell: Annotated[str, typer.Option(help="Recurrent cell: lstm, gru or rnn.")] = "lstm",
    cell_impl: Annotated[str, typer.Option(help="fused (torch/cuDNN kernels) or reference (the readable cells of rnmt.nn.cells: same results, slower).")] = "fused",
    attention: Annotated[str, typer.Option(help="Attention score: bahdanau, dot, general, concat.")] = "bahdanau",
    input_feeding: Annotated[bool, typer.Option("--input-feeding/--no-input-feeding", help="Luong input feeding: h̃_{t-1} joins the decoder input (dot/general/concat attention).")] = False,
    reverse_source: Annotated[bool, typer.Option("--reverse-source/--no-reverse-source", help="Read each source sentence backwards, </s> last (Sutskever et al. 2014).")] = False,
    tie_embeddings: Annotated[bool, typer.Option("--tie-embeddings/--no-tie-embeddings", help="Use the target embedding as the output projection (Press & Wolf 2017).")] = False,
    share_embeddings: Annotated[bool, typer.Option("--share-embeddings/--no-share-embeddings", help="One embedding for source and target; needs data preprocessed with --joined-dictionary.")] = False,
    emb_dim: Annotated[int, typer.Option(help="Embedding size.")] = 256,
    hidden_dim: Annotated[int, typer.Option(help="Encoder hidden size per direction.")] = 256,
    dec_hidden_dim: Annotated[int, typer.Option(help="Decoder hidden size (a language model's hidden size).")] = 512,
    layers: Annotated[Optional[int], typer.Option(help="Layers of encoder and decoder (sets both --enc-layers and --dec-layers).")] = None,
    enc_layers: Annotated[int, typer.Option(help="Encoder layers.")] = 1,
    dec_layers: Annotated[int, typer.Option(help="Decoder layers (a language model's layers).")] = 1,
    bidirectional: Annotated[bool, typer.Option(help="Bidirectional encoder.")] = True,
    attn_dim: Annotated[int, typer.Option(help="Additive attention's hidden size.")] = 512,
    output_dim: Annotated[int, typer.Option(help="Size of the output layer before the softmax.")] = 512,
    dropout: Annotated[float, typer.Option(help="Dropout on embeddings, between layers and on outputs.")] = 0.2,
    max_tokens: Annotated[int, typer.Option(help="Token budget of a batch (padded, per side).")] = 3000,
    max_sentences: Annotated[Optional[int], typer.Option(help="At most this many sentences per batch.")] = None,
    update_freq: Annotated[int, typer.Option(help="Accumulate the gradients of K batches per update: the update of one K-times larger batch.")] = 1,
    optimizer: Annotated[str, typer.Option(help="adam, adamw (decoupled weight decay) or sgd.")] = "adam",
    lr: Annotated[float, typer.Option(help="Learning rate (the peak rate after --warmup).")] = 1e-3,
    weight_decay: Annotated[float, typer.Option(help="Weight decay (L2 for adam/sgd, decoupled for adamw).")] = 0.0,
    clip_norm: Annotated[float, typer.Option(help="Clip the gradient norm to this; 0 = no clipping.")] = 5.0,
    label_smoothing: Annotated[float, typer.Option(help="Label smoothing ε (0.1 is usual); reported loss and ppl stay the real NLL.")] = 0.0,
    lr_scheduler: Annotated[str, typer.Option(help="constant, plateau (× --lr-decay after --patience validations without improvement of --best-metric), inverse-sqrt or exponential (× --lr-decay every --lr-decay-steps).")] = "constant",
    warmup: Annotated[int, typer.Option(help="Raise the rate linearly from 0 to --lr over this many updates.")] = 0,
    lr_decay: Annotated[float, typer.Option(help="Factor of plateau and exponential decay (0.5 halves).")] = 0.5,
    lr_decay_steps: Annotated[int, typer.Option(help="Exponential schedule: updates per --lr-decay factor.")] = 10000,
    patience: Annotated[int, typer.Option(help="Plateau schedule: validations without improvement before the rate is cut.")] = 5,
    min_lr: Annotated[float, typer.Option(help="Stop once the learning rate falls below this; 0 = never.")] = 0.0,
    max_epochs: Annotated[int, typer.Option(help="Stop after this many epochs.")] = 30,
    max_steps: Annotated[Optional[int], typer.Option(help="Stop after this many updates (may be raised on --resume).")] = None,
    max_time: Annotated[Optional[float], typer.Option(help="Stop after this many minutes.")] = None,
    valid_every: Annotated[Optional[int], typer.Option(help="Also validate (and save last.pt) every N updates; validation always runs after each epoch.")] = None,
    valid_bleu: Annotated[bool, typer.Option("--valid-bleu/--no-valid-bleu", help="Also decode the validation set and report BLEU/chrF (sacrebleu, detokenised) with sample translations. On by itself when --best-metric or --early-stop-metric is bleu; off otherwise, as decoding costs time.")] = False,
    valid_beam: Annotated[int, typer.Option(help="Beam size of validation decoding; 1 = greedy.")] = 1,
    valid_samples: Annotated[int, typer.Option(help="Sample translations printed per BLEU validation.")] = 3,
    best_metric: Annotated[str, typer.Option(help="Metric that picks best.pt and steers the plateau schedule: ppl or bleu.")] = "ppl",
    early_stop_metric: Annotated[Optional[str], typer.Option(help="Metric of early stopping: ppl or bleu (default: --best-metric).", show_default=False)] = None,
    early_stop_patience: Annotated[Optional[int], typer.Option(help="Stop after this many validations without improvement of --early-stop-metric (default: never).", show_default=False)] = None,
    save_every: Annotated[Optional[int], typer.Option(help="Save last.pt (and a step checkpoint with --keep-last) every N updates.")] = None,
    keep_last: Annotated[int, typer.Option(help="Keep the N newest step checkpoints checkpoint_<step>.pt (written at validations and --save-every); 0 = none.")] = 0,
    max_bad_updates: Annotated[int, typer.Option(help="Stop (exit 2, last good state saved) after this many updates in a row with a nan/inf loss or gradient; each is skipped.")] = 5,
    log_every: Annotated[int, typer.Option(help="Print progress (and a metrics.jsonl line) every N updates.")] = 20,
    plot: Annotated[bool, typer.Option(help="Draw SAVE_DIR/training.png at the end (when matplotlib is installed).")] = True,
    seed: Annotated[int, typer.Option(help="Random seed (initialisation, dropout, batch order).")] = 1,
    device: Annotated[str, typer.Option(help="auto (CUDA if present), cpu or cuda. Under torchrun each process takes cuda:LOCAL_RANK.")] = "auto",
    precision: Annotated[str, typer.Option(help="fp32, bf16 or fp16: autocast of the forward pass (matrix products in 16 bits; weights, optimizer, loss and checkpoints stay fp32). fp16 needs CUDA and scales the loss; bf16 on a CPU pays only with AMX/AVX512-BF16.")] = "fp32",
    threads: Annotated[int, typer.Option(help="CPU threads; 0 = torch's default.")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue exactly from SAVE_DIR/last.pt (model, optimizer, schedule, RNG, batch position) with the run's saved options; options given again override them (e.g. a higher --max-steps).")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Start a new run in a SAVE_DIR that holds another run's checkpoints, deleting them (without it, such a SAVE_DIR is refused).")] = False,
    init_from: Annotated[Optional[Path], typer.Option(help="Start from this checkpoint's weights and model options (fine-tuning), with a new optimizer, schedule and step count; pieces are matched by their text when DATA's vocabularies differ. Only --dropout of the model may change.", show_default=False)] = None,
) -> None:
    """Train an encoder-decoder or a language model on a preprocessed corpus."""
    values = dict(locals())
    given = {p.name: values[p.name] for p in ctx.command.params if p.name != "config"}
    from rnmt.distributed import setup, teardown
    from rnmt.errors import ConfigError
    from rnmt.training import TrainConfig, Trainer, TrainingInterrupted

    o = _resolve(ctx, given, config)
    if o["data"] is None or o["save_dir"] is None:
        raise ConfigError("DATA and --save-dir are required (on the command line or in --config)")
    if o["layers"] is not None:
        o["enc_layers"] = o["dec_layers"] = o["layers"]
    model_config = {name: o[name] for name in MODEL_OPTIONS}
    train_fields = set(TrainConfig.__dataclass_fields__)
    train_config = TrainConfig(**{k: v for k, v in o.items() if k in train_fields})
    if not train_config.threads:
        train_config.threads = None
    reporter = RichReporter()
    dist = setup(train_config.device)  # one process, or this rank of a torchrun job
    try:
        Trainer(o["data"], model_config, train_config, reporter, dist).train()
    except TrainingInterrupted as stop:
        if dist.is_main:
            again = (f"rnmt train {o['data']} --save-dir {o['save_dir']} --resume"
                     if not dist.enabled else "the same torchrun command with --resume")
            reporter.console.print(
                f"rnmt: interrupted at step {stop.step}; saved {stop.checkpoint}. "
                f"Continue with: {again}"
            )
        sys.exit(130)
    finally:
        teardown(dist)
