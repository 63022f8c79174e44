"""Preprocessing: learn (or reuse) sentencepiece, build vocabularies, binarise every split.

Output directory layout:

    meta.json                      languages, vocab sizes, split sizes, what was filtered
    spm.model | spm.<lang>.model   the sentencepiece model(s)
    vocab.<lang>.json              the pieces of each side, in rnmt id order
    <split>.<lang>.ids.npy         flat int32 ids of a split's side
    <split>.<lang>.offsets.npy     sentence boundaries (n + 1 int64)

A monolingual corpus (`mono=True`, for a language model) has one language: meta.json says
`"mono": true`, `src_lang == tgt_lang == lang`, one vocabulary and one file pair per split.

`vocab_from` reuses the sentencepiece model(s) and vocabularies of an earlier output
directory, language by language, instead of learning them from this corpus (fairseq's
`--srcdict`/`--tgtdict`, OpenNMT-py's `-src_vocab`/`-tgt_vocab`). The new corpus then
shares that corpus's id space, so that models trained on either ensemble (`translate -m a
-m b`), as for a student trained on its teachers' translations (sequence-level knowledge
distillation) or on back-translated data. Pieces the reused vocabulary lacks encode to
`<unk>`; each split reports how many.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from rnmt.data import ParallelData, TokenArray, TokenArrayWriter
from rnmt.device import MAX_THREADS
from rnmt.errors import DataError
from rnmt.text import TextLines, check_error_policy, corpus_path
from rnmt.vocab import UNK, Vocabulary, check_vocab_size, train_sentencepiece

META = "meta.json"
CHUNK_LINES = 50_000  # lines encoded and written at a time: memory for a chunk, not a corpus


@dataclass
class PreprocessConfig:
    src_lang: str
    tgt_lang: str
    out: Path
    train: str
    valid: str | None = None
    test: str | None = None
    vocab_size: int = 8000
    model_type: str = "unigram"
    separate_vocab: bool = False
    joined_dictionary: bool = False
    spm_model: Path | None = None
    max_len: int = 250
    errors: str = "replace"
    threads: int = 2
    mono: bool = False  # one language (src_lang == tgt_lang): a language model's corpus
    vocab_from: Path | None = None  # an output directory whose vocabularies are reused


@dataclass
class SplitReport:
    """Counts of one split: kept pairs and the pairs dropped, by reason."""

    name: str
    total: int
    kept: int
    empty: int = 0
    too_long: int = 0
    invalid_utf8_lines: int = 0
    unknown_pieces: int = 0  # pieces of the kept lines, both sides, encoded to <unk>


@dataclass
class PreprocessReport:
    splits: list[SplitReport] = field(default_factory=list)
    vocab_sizes: dict[str, int] = field(default_factory=dict)


def preprocess(config: PreprocessConfig) -> PreprocessReport:
    """Read all splits, learn the vocabularies on train, write the binarised corpus.

    The text is streamed: one pass checks every file (readable, UTF-8 under the policy,
    equal line counts) before anything is learnt or written, the vocabularies take one
    more pass over train (two when sentencepiece is trained here), and binarisation one
    over each split, chunk by chunk, so a corpus larger than memory can be preprocessed.
    """
    try:
        return _preprocess(config)
    except OSError as err:
        # Reading the corpus reports its own DataErrors: this is --out's disk (full, gone,
        # read-only). meta.json is written last, so what is there is no corpus to train on.
        where = err.filename or f"--out {config.out}"
        raise DataError(f"{where}: cannot write ({err.strerror or err}); "
                        f"{config.out} holds no usable corpus") from None


def _preprocess(c: PreprocessConfig) -> PreprocessReport:
    # Checked before the (long) passes over the text; each was a traceback (sentencepiece's
    # RuntimeError, FileExistsError from mkdir) after them.
    check_vocab_size(c.vocab_size)
    if c.max_len < 1 or c.threads < 1:
        raise DataError("--max-len and --threads must be at least 1")
    if c.threads > MAX_THREADS:
        raise DataError(f"--threads must be at most {MAX_THREADS}")
    check_error_policy(c.errors)
    if Path(c.out).exists() and not Path(c.out).is_dir():
        raise DataError(f"--out {c.out}: exists and is not a directory")
    if c.model_type not in ("unigram", "bpe"):
        raise DataError(f"unknown --model-type {c.model_type!r}; choose unigram or bpe")
    if c.vocab_from is not None and c.spm_model is not None:
        raise DataError("--vocab-from brings its own sentencepiece model: drop --spm-model")
    if c.mono:
        return _preprocess_mono(c)
    if c.src_lang == c.tgt_lang:
        raise DataError(f"source and target language are both {c.src_lang!r}")
    texts = {}
    for name, prefix in {"train": c.train, "valid": c.valid, "test": c.test}.items():
        if prefix is None:
            continue
        src, tgt = (TextLines(corpus_path(prefix, lang), c.errors)
                    for lang in (c.src_lang, c.tgt_lang))
        n_src, n_tgt = src.count(), tgt.count()
        if n_src != n_tgt:
            raise DataError(f"parallel files differ in length: {src.path} has {n_src} lines, "
                            f"{tgt.path} has {n_tgt}")
        if name != "test" and n_src == 0:
            # an empty valid split gave loss 0 and ppl 1 at every validation: best.pt
            # and early stopping chosen on nothing
            raise DataError(f"{src.path}: {'training' if name == 'train' else 'validation'} "
                            "data is empty")
        texts[name] = (src, tgt)

    if c.vocab_from is not None:
        reused = _reused_vocabularies(c.vocab_from, (c.src_lang, c.tgt_lang))
        src_vocab, tgt_vocab = (reused[lang][0] for lang in (c.src_lang, c.tgt_lang))
        if c.joined_dictionary and src_vocab is not tgt_vocab:
            raise DataError(f"--joined-dictionary: the vocabularies of --vocab-from "
                            f"{c.vocab_from} are not joined")
        spm_names = {lang: name for lang, (_, name) in reused.items()}
    else:
        src_vocab, tgt_vocab = _vocabularies(c, *texts["train"])
        spm_names = {lang: _spm_name(c, lang) for lang in (c.src_lang, c.tgt_lang)}

    c.out.mkdir(parents=True, exist_ok=True)
    (c.out / META).unlink(missing_ok=True)  # written last: a failed run leaves no corpus
    sides = ((c.src_lang, src_vocab), (c.tgt_lang, tgt_vocab))
    # one file when both sides share a sentencepiece model
    for filename, proto in {spm_names[lang]: v.spm_proto for lang, v in sides}.items():
        (c.out / filename).write_bytes(proto)
    for lang, vocab in sides:
        (c.out / f"vocab.{lang}.json").write_text(
            json.dumps(vocab.pieces, ensure_ascii=False), encoding="utf-8"
        )

    report = PreprocessReport(vocab_sizes={c.src_lang: len(src_vocab), c.tgt_lang: len(tgt_vocab)})
    for name, (src_text, tgt_text) in texts.items():
        report.splits.append(_binarise(c, name, [
            (src_text, src_vocab, c.out / f"{name}.{c.src_lang}"),
            (tgt_text, tgt_vocab, c.out / f"{name}.{c.tgt_lang}"),
        ]))

    meta = {
        "format": "rnmt-data",
        "version": 1,
        "src_lang": c.src_lang,
        "tgt_lang": c.tgt_lang,
        "joined_dictionary": src_vocab is tgt_vocab,
        "spm": spm_names,
        "vocab_sizes": report.vocab_sizes,
        "splits": {s.name: asdict(s) for s in report.splits},
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(c).items()},
    }
    (c.out / META).write_text(json.dumps(meta, indent=2, ensure_ascii=False), encoding="utf-8")
    return report


def _preprocess_mono(c: PreprocessConfig) -> PreprocessReport:
    """One language: learn sentencepiece and the vocabulary on train, binarise each split."""
    if c.src_lang != c.tgt_lang:
        raise DataError(f"a monolingual corpus has one language, got {c.src_lang!r} and {c.tgt_lang!r}")
    if c.spm_model is None and c.separate_vocab:
        raise DataError("--separate-vocab needs two languages; a monolingual corpus has one")
    lang = c.src_lang
    texts = {}
    for name, prefix in {"train": c.train, "valid": c.valid, "test": c.test}.items():
        if prefix is not None:
            texts[name] = TextLines(corpus_path(prefix, lang), c.errors)
            texts[name].count()
    if texts["train"].lines == 0:
        raise DataError(f"{texts['train'].path}: training data is empty")
    if "valid" in texts and texts["valid"].lines == 0:
        raise DataError(f"{texts['valid'].path}: validation data is empty")

    train = texts["train"]
    if c.vocab_from is not None:
        vocab = _reused_vocabularies(c.vocab_from, (lang,))[lang][0]
    elif c.spm_model is not None:
        vocab = Vocabulary.build(_read_spm(c.spm_model), train, c.threads)
    else:
        vocab = Vocabulary.build(
            train_sentencepiece(train, c.vocab_size, c.model_type, threads=c.threads),
            train, c.threads)

    c.out.mkdir(parents=True, exist_ok=True)
    (c.out / META).unlink(missing_ok=True)
    (c.out / "spm.model").write_bytes(vocab.spm_proto)
    (c.out / f"vocab.{lang}.json").write_text(json.dumps(vocab.pieces, ensure_ascii=False),
                                             encoding="utf-8")
    report = PreprocessReport(vocab_sizes={lang: len(vocab)})
    for name, text in texts.items():
        report.splits.append(_binarise(c, name, [(text, vocab, c.out / f"{name}.{lang}")]))

    meta = {
        "format": "rnmt-data",
        "version": 1,
        "mono": True,
        "lang": lang,
        "src_lang": lang,
        "tgt_lang": lang,
        "joined_dictionary": True,
        "spm": {lang: "spm.model"},
        "vocab_sizes": report.vocab_sizes,
        "splits": {s.name: asdict(s) for s in report.splits},
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(c).items()},
    }
    (c.out / META).write_text(json.dumps(meta, indent=2, ensure_ascii=False), encoding="utf-8")
    return report


def _binarise(c: PreprocessConfig, name: str,
              sides: list[tuple[TextLines, Vocabulary, Path]]) -> SplitReport:
    """Encode one split (one side, or two in parallel) chunk by chunk and write it.

    Only train is filtered: a pair with an empty side, or a side longer than `max_len`
    pieces, is dropped (valid and test keep every line: every line gets scored)."""
    split = SplitReport(name, 0, 0)
    with ExitStack() as stack:
        writers = [stack.enter_context(TokenArrayWriter(prefix)) for _, _, prefix in sides]
        rows = zip(*(text for text, _, _ in sides))
        while chunk := list(itertools.islice(rows, CHUNK_LINES)):
            ids = [vocab.encode([row[k] for row in chunk], threads=c.threads)
                   for k, (_, vocab, _) in enumerate(sides)]
            split.total += len(chunk)
            if name == "train":
                keep = []
                for i, row_ids in enumerate(zip(*ids)):
                    if any(len(s) == 0 for s in row_ids):
                        split.empty += 1
                    elif any(len(s) > c.max_len for s in row_ids):
                        split.too_long += 1
                    else:
                        keep.append(i)
                ids = [[side[i] for i in keep] for side in ids]
            for writer, side_ids in zip(writers, ids):
                writer.append(side_ids)
                if side_ids:
                    split.unknown_pieces += int(np.count_nonzero(np.concatenate(side_ids) == UNK))
        split.kept = writers[0].sentences
        if name == "train" and split.kept == 0:
            unit = "pair" if len(sides) == 2 else "line"
            raise DataError(f"no training {unit} is left after filtering")
    split.invalid_utf8_lines = sum(text.invalid_lines for text, _, _ in sides)
    return split


def _spm_name(c: PreprocessConfig, lang: str) -> str:
    return f"spm.{lang}.model" if c.separate_vocab and c.spm_model is None else "spm.model"


def _vocabularies(
    c: PreprocessConfig, src_train: Iterable[str], tgt_train: Iterable[str]
) -> tuple[Vocabulary, Vocabulary]:
    """The two sides' vocabularies (one object if joined), each holding its sentencepiece
    model.

    The training text is iterated (streamed), once per model learnt and once per vocabulary.
    """
    if c.spm_model is not None:
        proto = _read_spm(c.spm_model)
        src_proto = tgt_proto = proto
    elif c.separate_vocab:
        src_proto = train_sentencepiece(src_train, c.vocab_size, c.model_type, threads=c.threads)
        tgt_proto = train_sentencepiece(tgt_train, c.vocab_size, c.model_type, threads=c.threads)
    else:
        src_proto = tgt_proto = train_sentencepiece(
            itertools.chain(src_train, tgt_train), c.vocab_size, c.model_type, threads=c.threads
        )
    if c.joined_dictionary:
        if src_proto != tgt_proto:
            raise DataError("--joined-dictionary needs one sentencepiece model for both sides")
        joint = Vocabulary.build(src_proto, itertools.chain(src_train, tgt_train), c.threads)
        return joint, joint
    return (
        Vocabulary.build(src_proto, src_train, c.threads),
        Vocabulary.build(tgt_proto, tgt_train, c.threads),
    )


def _reused_vocabularies(directory: Path, langs: tuple[str, ...]
                         ) -> dict[str, tuple[Vocabulary, str]]:
    """Per language, the vocabulary of an earlier output directory and the name of its
    sentencepiece file there (one object for both languages where that corpus joined them)."""
    meta = load_meta(directory)
    have = [meta["src_lang"], meta["tgt_lang"]]
    for lang in langs:
        if lang not in have:
            raise DataError(f"--vocab-from {directory}: has no {lang} vocabulary (its "
                            f"languages: {', '.join(dict.fromkeys(have))})")
    vocabs = dict(zip(have, load_vocabularies(directory, meta)))
    return {lang: (vocabs[lang], meta["spm"][lang]) for lang in langs}


def _read_spm(path: Path) -> bytes:
    """A sentencepiece model given with --spm-model, checked to load."""
    try:
        proto = Path(path).read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read sentencepiece model ({err.strerror})") from None
    _check_spm(proto, path)
    return proto


def _check_spm(proto: bytes, path: Path) -> None:
    from rnmt.vocab import load_sentencepiece

    try:
        load_sentencepiece(proto)
    except (RuntimeError, OSError):
        raise DataError(f"{path}: not a sentencepiece model") from None


def load_data(directory: Path, split: str) -> tuple[dict, ParallelData]:
    """The meta description of a preprocessed corpus and one of its splits (read from disk
    as training needs it, see `TokenArray`).

    A monolingual split is its one side twice (the same arrays): source and target.
    """
    meta = load_meta(directory)
    splits = meta.get("splits")
    if isinstance(splits, dict) and split not in splits:
        # e.g. training validates after every epoch, and preprocess was given no --valid
        raise DataError(f"{directory}: no {split} split; run rnmt preprocess with "
                        f"--{split} PREFIX")
    if meta.get("mono"):
        text = TokenArray.load(directory / f"{split}.{meta['lang']}")
        return meta, ParallelData(text, text)
    src = TokenArray.load(directory / f"{split}.{meta['src_lang']}")
    tgt = TokenArray.load(directory / f"{split}.{meta['tgt_lang']}")
    if len(src) != len(tgt):
        raise DataError(f"{directory}: split {split!r} has unequal sides")
    return meta, ParallelData(src, tgt)


def load_meta(directory: Path) -> dict:
    path = Path(directory) / META
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError):
        # NotADirectoryError: DATA is a file (a text corpus given instead of the output of
        # rnmt preprocess), which is the same mistake as a directory without meta.json.
        raise DataError(f"{directory}: not a preprocessed corpus (no {META}; run rnmt preprocess)") from None
    except PermissionError:
        raise DataError(f"{path}: permission denied") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DataError(f"{path}: corrupt meta file") from None
    if not isinstance(meta, dict) or meta.get("format") != "rnmt-data":
        raise DataError(f"{path}: not an rnmt data description")
    return meta


def check_ids(directory: Path, split: str, data: ParallelData, src_vocab: Vocabulary,
              tgt_vocab: Vocabulary, meta: dict) -> None:
    """Every id of a split within its side's vocabulary, checked before training starts: a
    stray id (damaged data, or vocabulary files from another preprocess run) would
    otherwise fail an embedding lookup mid-run. One pass over the ids on disk."""
    sides = [(data.src, meta["src_lang"], src_vocab)]
    if data.tgt is not data.src:  # a monolingual split is one array twice: read it once
        sides.append((data.tgt, meta["tgt_lang"], tgt_vocab))
    for array, lang, vocab in sides:
        low, high = array.id_range()
        if low < 0 or high >= len(vocab):
            bad = low if low < 0 else high
            raise DataError(f"{Path(directory) / f'{split}.{lang}.ids.npy'}: holds piece id "
                            f"{bad}, outside its {len(vocab)}-piece vocabulary (damaged data, "
                            "or vocabulary files of another preprocess run)")


def load_vocabularies(directory: Path, meta: dict) -> tuple[Vocabulary, Vocabulary]:
    """Source and target vocabularies of a preprocessed corpus (the same object if joined)."""
    directory = Path(directory)
    vocabs = []
    for lang in (meta["src_lang"], meta["tgt_lang"]):
        try:
            proto = (directory / meta["spm"][lang]).read_bytes()
            pieces = json.loads((directory / f"vocab.{lang}.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
            raise DataError(f"{directory}: cannot read the {lang} vocabulary ({err})") from None
        try:
            vocabs.append(Vocabulary(proto, pieces))
        except (RuntimeError, ValueError, TypeError, KeyError) as err:  # sentencepiece's own
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise DataError(f"{directory}: corrupt {lang} vocabulary ({first_line})") from None
    if meta.get("joined_dictionary"):
        return vocabs[0], vocabs[0]
    return vocabs[0], vocabs[1]
