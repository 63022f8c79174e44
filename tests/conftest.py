"""Shared fixtures: a small demo corpus, its binarised form and a briefly trained model."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rnmt.errors import option_flag

ROOT = Path(__file__).resolve().parent.parent
RNMT = [sys.executable, "-m", "rnmt_cli.main"]

TINY_MODEL = dict(emb_dim=32, hidden_dim=32, dec_hidden_dim=64, attn_dim=32, output_dim=64,
                  dropout=0.0)
TINY_MODEL_FLAGS = [f"{option_flag(k)}={v}" for k, v in TINY_MODEL.items()]


def through_recurrence(product, xs, h0, weight):
    """h_t = tanh(product(x_t + h_{t-1})) over the steps of xs (steps, rows, size): the
    outputs (steps, rows, size) and the gradients of xs, h0 and weight of a fixed function
    of them (the tests of `RecurrentProduct`)."""
    import torch

    h, outs = h0, []
    for x in xs.unbind(0):
        h = torch.tanh(product(x + h))
        outs.append(h)
    out = torch.stack(outs)
    weights = torch.arange(float(out.size(-1)))
    return out, torch.autograd.grad((out * weights).sum(), [xs, h0, weight])


def load_script(path: Path):
    """A script (data/, benchmarks/) as a module, its folder on the path as when it runs
    (`python benchmarks/NAME.py` imports `common` from there)."""
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


def load_benchmark(name: str):
    return load_script(ROOT / "benchmarks" / f"{name}.py")


def load_demo_generator():
    return load_script(ROOT / "data" / "make_demo.py")


def write_corpus(directory: Path, n_train: int = 1500, n_valid: int = 60, n_test: int = 60,
                 seed: int = 3) -> Path:
    corpus = load_demo_generator().generate(
        seed=seed, n_train=n_train, n_valid=n_valid, n_test=n_test, max_number=999,
        template_prob=0.2,
    )
    directory.mkdir(parents=True, exist_ok=True)
    for split, pairs in corpus.items():
        (directory / f"{split}.en").write_text("".join(en + "\n" for en, _ in pairs), "utf-8")
        (directory / f"{split}.de").write_text("".join(de + "\n" for _, de in pairs), "utf-8")
    return directory


def run_rnmt(*args: str, stdin: str | bytes | None = None, check: bool = False,
             timeout: float = 300) -> subprocess.CompletedProcess:
    """Drive the CLI as a user would: a subprocess, text on stdin/stdout."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    data = stdin.encode("utf-8") if isinstance(stdin, str) else stdin
    result = subprocess.run(RNMT + list(args), input=data, capture_output=True, env=env,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"rnmt {' '.join(args)} failed:\n{result.stderr.decode()}")
    return result


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    """The CLI refused as promised: exit 2, one `rnmt: error:` line naming each needle, no
    traceback."""
    err = result.stderr.decode()
    assert result.returncode == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("rnmt: error:"), err
    for needle in needles:
        assert needle in lines[0], err


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def bin_dir(corpus_dir, tmp_path_factory) -> Path:
    from rnmt.preprocess import PreprocessConfig, preprocess

    out = tmp_path_factory.mktemp("bin")
    preprocess(PreprocessConfig(src_lang="en", tgt_lang="de", out=out,
                                train=str(corpus_dir / "train"), valid=str(corpus_dir / "valid"),
                                test=str(corpus_dir / "test"), vocab_size=300))
    return out


@pytest.fixture(scope="session")
def trained_checkpoint(bin_dir, tmp_path_factory) -> Path:
    """A tiny attention model after 300 updates (~25 s): it has learned most of the task."""
    from rnmt.training import TrainConfig, Trainer

    save_dir = tmp_path_factory.mktemp("run")
    config = TrainConfig(save_dir=save_dir, max_tokens=800, lr=5e-3, max_steps=300,
                         device="cpu", seed=1)
    Trainer(bin_dir, TINY_MODEL, config).train()
    return save_dir / "best.pt"
