"""Training throughput of the reference model: real (non-pad) target tokens per second.

Runs `--warmup` updates, then `--batches` timed updates of full training steps (forward,
backward, clip, Adam) on batches of a preprocessed corpus, and prints the median and
quartiles of per-batch target tokens/s plus peak resident memory. `--precision bf16|fp16`
runs the forward pass under autocast as `rnmt train --precision` does (fp16 with loss
scaling); on CUDA, batches go through pinned memory as in training.

Usage: python benchmarks/train_speed.py DATA_DIR [--threads 2] [--batches 30] [--max-tokens 3000]
                                                 [--device cpu|cuda] [--precision fp32|bf16|fp16]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from pathlib import Path

import torch

from rnmt.data import TokenBatchSampler, collate
from rnmt.errors import ConfigError
from rnmt.heap import keep_freed_memory
from rnmt.models import ModelConfig, build_model
from rnmt.nn.rnn import compact_rnn_weights
from rnmt.optim import build_optimizer
from rnmt.preprocess import load_data, load_vocabularies
from rnmt.precision import PRECISIONS, check_precision
from rnmt.training import precision_context, token_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=3000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=list(PRECISIONS))
    args = parser.parse_args()
    device = torch.device(args.device)
    try:
        warning = check_precision(args.precision, device)
    except ConfigError as err:
        parser.error(str(err))
    if warning:
        print(f"warning: {warning}")
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as rnmt train does
    torch.manual_seed(1)
    meta, data = load_data(args.data, "train")
    src_vocab, tgt_vocab = load_vocabularies(args.data, meta)
    model = build_model(ModelConfig(src_vocab_size=len(src_vocab),
                                    tgt_vocab_size=len(tgt_vocab))).to(args.device).train()
    compact_rnn_weights(model)  # as rnmt train does
    optimizer = build_optimizer("adam", model.parameters(), lr=1e-3)  # as rnmt train builds it
    scaler = torch.amp.GradScaler(device.type) if args.precision == "fp16" else None
    sampler = TokenBatchSampler(data.src.lengths, data.tgt.lengths, args.max_tokens, seed=1)
    batches = sampler.batches(0)[: args.warmup + args.batches]
    rates = []
    total_tokens, total_seconds = 0, 0.0
    for i, indices in enumerate(batches):
        start = time.perf_counter()
        batch = collate(data, indices).to(device)
        with precision_context(args.precision, device):
            loss, n_tokens = token_loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss = loss / n_tokens
        (loss if scaler is None else scaler.scale(loss)).backward()
        if scaler is not None:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)
            scaler.update()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        if i >= args.warmup:
            seconds = time.perf_counter() - start
            rates.append(n_tokens / seconds)
            total_tokens += n_tokens
            total_seconds += seconds
    q1, median, q3 = statistics.quantiles(rates, n=4)
    params = sum(p.numel() for p in model.parameters())
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"reference model, {params:,} parameters, {args.threads} threads, {args.device}, "
          f"{args.precision}")
    print(f"target tokens/s over {len(rates)} batches: median {median:,.0f} "
          f"(quartiles {q1:,.0f}-{q3:,.0f}); all batches together {total_tokens / total_seconds:,.0f} "
          f"(what a training log's window reports); peak RSS {rss_mb:,.0f} MB")


if __name__ == "__main__":
    main()
