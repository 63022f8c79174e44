"""From checkpoints and lines of text to translations, in input order.

    lines ──Vocabulary.encode──▶ ids ──sorted by length, batched──▶ search ──▶ hypotheses
          ──Vocabulary.decode──▶ Translations (original order restored) ──format──▶ lines

Input is consumed `buffer_size` lines at a time, so a long stream never sits in memory
and output starts before the input ends. A language-model checkpoint (arch "lm")
continues each line instead of translating it (`--sample` or `--beam 1`).

Numerics at load time (checkpoints are always fp32): `precision` bf16/fp16 casts the whole
model (the step's log-softmax is computed in fp32 all the same, `step_log_probs`), and
`quantize="int8"` swaps the decoder's per-step layers for int8 ones (`rnmt.quantize`, CPU
only). The two do not combine: the int8 kernels take and give fp32, so a bf16 model around
them would only add casts. In fp32 on a CPU the per-step layers run on oneDNN with weights
packed once (`rnmt.step_layers`): the same numbers up to rounding, faster.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from rnmt.alignment import WORD_START, hard_alignment, pharaoh
from rnmt.checkpoint import load_checkpoint
from rnmt.data import pad_sentences
from rnmt.device import resolve_device
from rnmt.errors import CheckpointError, ConfigError, VocabularyMismatch
from rnmt.models import ModelConfig, build_model
from rnmt.nn.attention import Attention
from rnmt.nn.rnn import compact_rnn_weights
from rnmt.precision import PRECISIONS, check_precision, check_precision_name
from rnmt.quantize import check_quantize, quantize_for_inference
from rnmt.search import Hypothesis, SearchConfig, search_nbest
from rnmt.step_layers import can_pack, pack_for_cpu
from rnmt.vocab import EOS, Vocabulary

OUTPUT_FORMATS = ("text", "json")
# Source pieces (padding included) per search batch. Search memory grows with batch ×
# longest source × beam (encoder states and attention keys per beam row), so a few
# sentences far longer than any in training must not share one batch with 63 others.
DEFAULT_MAX_TOKENS = 16000


def length_batches(order: Sequence[int], lengths: Sequence[int], batch_size: int,
                   max_tokens: int) -> list[list[int]]:
    """Cut `order` (sorted shortest first; `lengths[j]` is the padded source length of
    `order[j]`, `</s>` included) into batches of at most `batch_size` sentences whose padded
    size, sentences × longest length, stays within `max_tokens`. A sentence longer than
    `max_tokens` goes alone: it is translated, never refused."""
    batches: list[list[int]] = []
    current: list[int] = []
    for index, length in zip(order, lengths):
        # Sorted input: the newest sentence is the longest, so it sets the padded width.
        if current and (len(current) == batch_size or (len(current) + 1) * length > max_tokens):
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


@dataclass
class LoadedModel:
    model: nn.Module
    src_vocab: Vocabulary
    tgt_vocab: Vocabulary
    is_language_model: bool = False


def resolve_numerics(device: str, precision: str = "fp32", quantize: str = "none"
                     ) -> tuple[torch.device, str | None]:
    """The device to translate on, and a warning when it runs `precision` slowly (bf16 on a
    CPU without bf16 matrix units). What cannot run is a ConfigError, raised before any
    checkpoint is read; int8 on a GPU is refused from the device's name alone, and with
    `auto` int8 picks the CPU (its kernels are CPU kernels)."""
    check_precision_name(precision)
    if quantize == "int8" and device == "auto":
        device = "cpu"
    check_quantize(quantize, device)
    if quantize == "int8" and precision != "fp32":
        raise ConfigError(f"--quantize int8 computes in fp32 around its int8 matrix products; "
                          f"drop --precision {precision} (or --quantize)")
    dev = resolve_device(device)
    warning = check_precision(precision, dev)
    return dev, warning and warning + "; --quantize int8 is the fast CPU path"


def load_model(path: str | Path, device: torch.device) -> LoadedModel:
    """Rebuild a model from a checkpoint alone: no flags about its architecture needed."""
    payload = load_checkpoint(path, mmap=True)
    try:
        config = ModelConfig.from_dict(payload["model_config"])
        model = build_model(config)
        model.load_state_dict(payload["model"])
        src_vocab = Vocabulary.from_state_dict(payload["src_vocab"])
        tgt_vocab = Vocabulary.from_state_dict(payload["tgt_vocab"])
    except (RuntimeError, TypeError, KeyError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0]
        raise CheckpointError(f"{path}: checkpoint does not match its model ({first_line})") from None
    if len(src_vocab) != config.src_vocab_size or len(tgt_vocab) != config.tgt_vocab_size:
        raise CheckpointError(f"{path}: vocabulary sizes do not match the model")
    compact_rnn_weights(model.to(device).eval())
    return LoadedModel(model, src_vocab, tgt_vocab, config.arch == "lm")


def prepare_model(model: nn.Module, precision: str = "fp32", quantize: str = "none",
                  pack: bool = True) -> nn.Module:
    """The loaded fp32 model in the numerics asked for (see `resolve_numerics`). On a CPU,
    with `pack`, its per-step layers run on oneDNN (`rnmt.step_layers.pack_for_cpu`),
    multiplying in fp32, or in bf16 for bf16 while everything else stays fp32; elsewhere
    (a GPU, or `pack=False`) bf16 and fp16 cast the whole model."""
    if quantize == "int8":
        return quantize_for_inference(model)
    if precision == "fp32":
        return pack_for_cpu(model) if pack else model
    dtype = PRECISIONS[precision]
    if pack and can_pack(model, dtype):  # a CPU: bf16 products, fp32 around them
        return pack_for_cpu(model, dtype)
    return compact_rnn_weights(model.to(dtype))


def load_models(paths: Sequence[str | Path], device: torch.device) -> LoadedModel:
    """One checkpoint, or several as an ensemble; members must share both vocabularies."""
    if not paths:
        raise CheckpointError("no checkpoint given")
    loaded = [load_model(p, device) for p in paths]
    if len(loaded) == 1:
        return loaded[0]
    from rnmt.models.ensemble import Ensemble

    first = loaded[0]
    for path, other in zip(paths[1:], loaded[1:]):
        for side in ("src_vocab", "tgt_vocab"):
            if getattr(other, side) != getattr(first, side):
                raise VocabularyMismatch(
                    f"{path}: its {side[:3]} vocabulary differs from {paths[0]}'s; "
                    "ensemble members must share vocabularies"
                )
        if other.is_language_model != first.is_language_model:
            raise VocabularyMismatch(f"{path}: cannot ensemble a language model with a "
                                     "translation model")
    return LoadedModel(Ensemble([m.model for m in loaded]), first.src_vocab, first.tgt_vocab,
                       first.is_language_model)


@dataclass
class Translation:
    """One output for one input line. `score` ranks outputs (raw / lp, see rnmt.search);
    `attention` (len(pieces) + 1, len(source_pieces) + 1) counts `</s>` on both sides."""

    text: str
    score: float
    raw_score: float
    pieces: list[str]
    source_pieces: list[str]
    attention: Tensor | None = field(default=None, repr=False)

    def alignment(self) -> list[tuple[int, int]]:
        if self.attention is None:
            return []
        return hard_alignment(self.source_pieces, self.pieces, self.attention)

    def to_json(self, index: int) -> dict:
        return {
            "index": index,
            "translation": self.text,
            "score": self.score,
            "raw_score": self.raw_score,
            "pieces": self.pieces,
            "source_pieces": self.source_pieces,
            "attention": None if self.attention is None
            else [[round(x, 6) for x in row] for row in self.attention.tolist()],
        }


def format_translations(index: int, translations: list[Translation], fmt: str = "text",
                        nbest: bool = False, alignment: bool = False) -> list[str]:
    """The output lines of one input line.

    text: the translation; with `nbest`, `index<TAB>score<TAB>text` per hypothesis;
    `alignment` appends `<TAB>` and Pharaoh pairs. json: one object per hypothesis.
    """
    lines = []
    for t in translations:
        if fmt == "json":
            obj = t.to_json(index)
            if alignment:
                obj["alignment"] = pharaoh(t.alignment())
            lines.append(json.dumps(obj, ensure_ascii=False))
            continue
        line = f"{index}\t{t.score:.6f}\t{t.text}" if nbest else t.text
        if alignment:
            line += "\t" + pharaoh(t.alignment())
        lines.append(line)
    return lines


class Translator:
    """Translates lines with one model or an ensemble. Blank lines give empty lines (a
    language model instead generates from scratch for them). `warnings`: what the user
    should hear about the set-up (one line each)."""

    def __init__(
        self,
        loaded: LoadedModel,
        config: SearchConfig,
        device: torch.device,
        batch_size: int = 64,
        buffer_size: int = 2000,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        warnings: Sequence[str] = (),
        workers: int = 1,
    ) -> None:
        if workers < 1:
            raise ConfigError("--workers must be at least 1")
        if workers > 1 and device.type != "cpu":
            raise ConfigError("--workers runs several CPU batches at once; on a GPU use a "
                              "larger --batch-size")
        self.workers = workers
        self.model = loaded.model
        self.src_vocab = loaded.src_vocab
        self.tgt_vocab = loaded.tgt_vocab
        self.is_language_model = loaded.is_language_model
        self.config = config
        self.device = device
        self.batch_size = batch_size
        self.buffer_size = max(1, buffer_size)
        self.max_tokens = max(1, max_tokens)
        self.warnings = list(warnings)

    @classmethod
    def load(cls, paths: str | Path | Sequence[str | Path], config: SearchConfig,
             device: str = "auto", batch_size: int = 64, buffer_size: int = 2000,
             max_tokens: int = DEFAULT_MAX_TOKENS, precision: str = "fp32",
             quantize: str = "none", workers: int = 1, pack: bool = True) -> "Translator":
        """Load checkpoint(s) for translation in `precision` (fp32, bf16, fp16) or with
        `quantize="int8"` layers (CPU); `workers` batches searched at once (CPU). `pack`
        False keeps fp32 CPU layers on torch's own kernels (see `prepare_model`)."""
        dev, warning = resolve_numerics(device, precision, quantize)
        if isinstance(paths, (str, Path)):
            paths = [paths]
        loaded = load_models(list(paths), dev)
        loaded.model = prepare_model(loaded.model, precision, quantize, pack)
        return cls(loaded, config, dev, batch_size, buffer_size, max_tokens,
                   [warning] if warning else [], workers)

    @property
    def attends(self) -> bool:
        """Whether the model attends over the source: whether there are attention weights
        to align words with or to plot (not for `--arch seq2seq` or a language model)."""
        return any(isinstance(m, Attention) for m in self.model.modules())

    # --- lines in, lines out --------------------------------------------------------------

    def translate_lines(self, lines: Iterable[str]) -> Iterator[str]:
        """The best translation of every line, in input order."""
        for chunk in self.translate_chunks(lines):
            for translations in chunk:
                yield translations[0].text

    def translate_chunks(self, lines: Iterable[str]) -> Iterator[list[list[Translation]]]:
        """Reads `buffer_size` lines at a time and yields their n-best lists, in order."""
        buffer: list[str] = []
        for line in lines:
            buffer.append(line.rstrip("\r\n"))
            if len(buffer) == self.buffer_size:
                yield self.nbest(buffer)
                buffer = []
        if buffer:
            yield self.nbest(buffer)

    def translate_batch(self, lines: list[str]) -> list[str]:
        return [translations[0].text for translations in self.nbest(lines)]

    # --- the core ---------------------------------------------------------------------------

    def nbest(self, lines: list[str]) -> list[list[Translation]]:
        """Up to `config.nbest` translations per line, best first, in input order."""
        vocab = self.tgt_vocab if self.is_language_model else self.src_vocab
        ids = vocab.encode(lines)
        hyps = self._search(lines, ids)
        out: list[list[Translation]] = []
        for line, line_ids, line_hyps in zip(lines, ids, hyps):
            source_pieces = vocab.to_pieces(line_ids.tolist())
            if line_hyps is None:
                out.append([Translation("", 0.0, 0.0, [], source_pieces, None)])
                continue
            out.append([self._translation(line, source_pieces, h) for h in line_hyps])
        return out

    def hypotheses(self, lines: list[str]) -> list[Hypothesis | None]:
        """The best hypothesis per line (None for a blank line), in input order."""
        vocab = self.tgt_vocab if self.is_language_model else self.src_vocab
        return [h[0] if h else None for h in self._search(lines, vocab.encode(lines))]

    def _search(self, lines: list[str], ids: list) -> list[list[Hypothesis] | None]:
        results: list[list[Hypothesis] | None] = [None] * len(lines)
        if self.is_language_model:
            todo = list(range(len(lines)))  # a blank line: generate from scratch
        else:
            todo = [i for i, line in enumerate(lines) if line.strip() and len(ids[i])]
        todo.sort(key=lambda i: len(ids[i]))  # similar lengths share a batch: little padding
        chunks = length_batches(todo, [len(ids[i]) + 1 for i in todo], self.batch_size,
                                self.max_tokens)

        def run(chunk: list[int]) -> list[list[Hypothesis]]:
            src, lengths = pad_sentences([ids[i] for i in chunk], suffix=EOS)
            prefix = prefix_lengths = None
            if self.is_language_model:
                prefix, prefix_lengths = pad_sentences([ids[i] for i in chunk])
            return search_nbest(self.model, src.to(self.device), lengths, self.config,
                                prefix, prefix_lengths)

        if self.workers > 1 and len(chunks) > 1:
            # Batches are independent, so W threads search W of them at once (torch ops
            # release the GIL), each on 1/W of torch's threads. On a CPU this uses the
            # cores better than one batch does: a search step's matrix products have too
            # few rows for MKL to spread over two threads (README, "Faster translation").
            threads = torch.get_num_threads()
            torch.set_num_threads(max(1, threads // self.workers))
            try:
                with ThreadPoolExecutor(self.workers) as pool:
                    found_all = list(pool.map(run, chunks))
            finally:
                torch.set_num_threads(threads)
        else:
            found_all = [run(chunk) for chunk in chunks]
        for chunk, found in zip(chunks, found_all):
            for i, hyps in zip(chunk, found):
                results[i] = hyps
        return results

    def _translation(self, line: str, source_pieces: list[str], hyp: Hypothesis) -> Translation:
        pieces = self.tgt_vocab.to_pieces(hyp.tokens)
        text = self.tgt_vocab.decode(hyp.tokens)
        if self.is_language_model:
            # The input text, untouched, then the continuation (spm drops a leading space).
            space = " " if line and pieces and pieces[0].startswith(WORD_START) else ""
            text = line + space + text
        # On the host, in fp32 whatever the model's device and precision: alignments and
        # plots read it there.
        attention = None if hyp.attention is None else hyp.attention.float().cpu()
        return Translation(text, hyp.normalized, hyp.score, pieces, source_pieces, attention)
