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
        self.console.print(
            f"[bold]model[/bold] {c['arch']} ({', '.join(what)}): "
            f"{info['parameters']:,} parameters on {info['device']} "
            f"({info['threads']} threads); {info['train_pairs']:,} training "
            f"{'sentences' if c['arch'] == 'lm' else 'pairs'}, "
            f"{info['batches_per_epoch']} batches/epoch"
            + (f"; resumed at step {info['resumed_at']}" if info["resumed_at"] else "")
        )

    def progress(self, s: dict[str, Any]) -> None:
        self.console.print(
            f"epoch {s['epoch']:3d} | step {s['step']:6d} | loss {s['loss']:.3f} | "
            f"ppl {s['ppl']:8.2f} | {s['tokens_per_s']:7.0f} tgt tok/s | "
            f"{_clock(s['elapsed'])}"
        )

    def validation(self, s: dict[str, Any]) -> None:
        best = " [green](best)[/green]" if s.get("best") else ""
        self.console.print(
            f"[bold]valid[/bold] epoch {s['epoch']} step {s['step']}: "
            f"loss {s['valid_loss']:.3f} ppl {s['valid_ppl']:.2f}{best}"
        )

    def finish(self, s: dict[str, Any]) -> None:
        self.console.print(
            f"done: {s['reason']} after {s['step']} steps, {_clock(s['elapsed'])}; "
            f"best valid ppl {s['best_valid_ppl']:.2f} → {s['best']}"
        )


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h:d}:{m:02d}:{s:02d}"


def train(
    data: Annotated[Path, typer.Argument(help="Directory written by rnmt preprocess.")],
    save_dir: Annotated[Path, typer.Option(help="Where checkpoints (best.pt, last.pt) go.")],
    arch: Annotated[str, typer.Option(help="attention (Bahdanau/Luong), seq2seq (Sutskever, no attention) or lm (RNN language model).")] = "attention",
    cell: Annotated[str, typer.Option(help="Recurrent cell: lstm, gru or rnn.")] = "lstm",
    cell_impl: Annotated[str, typer.Option(help="fused (torch/cuDNN kernels) or reference (the readable cells of rnmt.nn.cells: same results, slower).")] = "fused",
    attention: Annotated[str, typer.Option(help="Attention score: bahdanau, dot, general, concat.")] = "bahdanau",
    input_feeding: Annotated[bool, typer.Option("--input-feeding", help="Luong input feeding: h̃_{t-1} joins the decoder input (dot/general/concat attention).")] = False,
    reverse_source: Annotated[bool, typer.Option("--reverse-source", help="Read each source sentence backwards, </s> last (Sutskever et al. 2014).")] = False,
    tie_embeddings: Annotated[bool, typer.Option("--tie-embeddings", help="Use the target embedding as the output projection (Press & Wolf 2017).")] = False,
    share_embeddings: Annotated[bool, typer.Option("--share-embeddings", help="One embedding for source and target; needs data preprocessed with --joined-dictionary.")] = False,
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
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 1e-3,
    clip_norm: Annotated[float, typer.Option(help="Clip the gradient norm to this.")] = 5.0,
    max_epochs: Annotated[int, typer.Option(help="Stop after this many epochs.")] = 30,
    max_steps: Annotated[Optional[int], typer.Option(help="Stop after this many updates.")] = None,
    max_time: Annotated[Optional[float], typer.Option(help="Stop after this many minutes.")] = None,
    valid_every: Annotated[Optional[int], typer.Option(help="Also validate every N updates.")] = None,
    log_every: Annotated[int, typer.Option(help="Print progress every N updates.")] = 20,
    seed: Annotated[int, typer.Option(help="Random seed (initialisation, dropout, batch order).")] = 1,
    device: Annotated[str, typer.Option(help="auto (CUDA if present), cpu or cuda.")] = "auto",
    threads: Annotated[int, typer.Option(help="CPU threads; 0 = torch's default.")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue from SAVE_DIR/last.pt.")] = False,
) -> None:
    """Train an encoder-decoder or a language model on a preprocessed corpus."""
    from rnmt.training import TrainConfig, Trainer, TrainingInterrupted

    if layers is not None:
        enc_layers = dec_layers = layers
    model_config = dict(
        arch=arch, cell=cell, cell_impl=cell_impl, attention=attention, emb_dim=emb_dim,
        hidden_dim=hidden_dim, dec_hidden_dim=dec_hidden_dim, enc_layers=enc_layers,
        dec_layers=dec_layers, bidirectional=bidirectional, attn_dim=attn_dim,
        output_dim=output_dim, dropout=dropout, input_feeding=input_feeding,
        reverse_source=reverse_source, tie_embeddings=tie_embeddings,
        share_embeddings=share_embeddings,
    )
    config = TrainConfig(
        save_dir=save_dir, max_tokens=max_tokens, max_sentences=max_sentences, lr=lr,
        clip_norm=clip_norm, max_epochs=max_epochs, max_steps=max_steps, max_time=max_time,
        valid_every=valid_every, log_every=log_every, seed=seed, device=device,
        threads=threads or None, resume=resume,
    )
    reporter = RichReporter()
    try:
        Trainer(data, model_config, config, reporter).train()
    except TrainingInterrupted as stop:
        reporter.console.print(
            f"rnmt: interrupted at step {stop.step}; saved {stop.checkpoint}. "
            f"Continue with: rnmt train {data} --save-dir {save_dir} --resume"
        )
        sys.exit(130)
