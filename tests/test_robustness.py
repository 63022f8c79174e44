"""Bad input and faults: one clear line and exit 2, never a traceback, never lost work."""

from __future__ import annotations

import gzip
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import RNMT, ROOT, TINY_MODEL, run_rnmt
from rnmt.checkpoint import load_checkpoint

NASTY_LINES = [
    "four hundred twenty-one",
    "",
    "   \t  ",
    "nine " * 2500,  # 12,500 characters
    "\x01\x02\x03\x7f",
    "seven hundred five\r",  # a \r\n ending
    "\ufeffthree",  # a stray BOM inside the text
]


def _assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    err = result.stderr.decode()
    assert result.returncode == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("rnmt: error:"), err
    for needle in needles:
        assert needle in lines[0], err


def test_translate_keeps_line_count_on_nasty_lines(trained_checkpoint):
    text = "\n".join(NASTY_LINES)  # and no final newline
    result = run_rnmt("translate", "-m", str(trained_checkpoint), "--beam", "2",
                      "--max-len-a", "0.1", "--max-len-b", "5", stdin=b"\xef\xbb\xbf" + text.encode())
    assert result.returncode == 0, result.stderr.decode()
    out = result.stdout.decode().split("\n")
    assert out[-1] == "" and len(out) - 1 == len(NASTY_LINES)
    assert out[1] == "" and out[2] == ""
    assert len(out[3].split()) <= 5 + 2  # bounded by --max-len-a/b, whatever the input


def test_translate_replaces_invalid_utf8_by_default(trained_checkpoint):
    result = run_rnmt("translate", "-m", str(trained_checkpoint), "--beam", "1",
                      stdin=b"nine\nni\xffne\nten\n")
    assert result.returncode == 0
    assert len(result.stdout.decode().splitlines()) == 3


@pytest.mark.parametrize("case", ["missing", "empty", "truncated-gz", "directory"])
def test_preprocess_reports_bad_files_in_one_line(tmp_path, case):
    (tmp_path / "c.en").write_text("one\ntwo\n")
    if case == "missing":
        target = "c.de"
    elif case == "empty":
        (tmp_path / "c.de").write_text("")
        (tmp_path / "c.en").write_text("")
        target = "c.en"
    elif case == "truncated-gz":
        (tmp_path / "c.de.gz").write_bytes(gzip.compress(b"eins\nzwei\n" * 500)[:30])
        target = "c.de.gz"
    else:
        (tmp_path / "c.de").mkdir()
        target = "c.de"
    result = run_rnmt("preprocess", "-s", "en", "-t", "de", "--train", str(tmp_path / "c"),
                      "--out", str(tmp_path / "bin"))
    _assert_one_line_error(result, target)


def test_preprocess_strict_utf8_names_the_line(tmp_path):
    (tmp_path / "c.en").write_bytes(b"one\ntwo\nthr\xe9e\n")
    (tmp_path / "c.de").write_text("eins\nzwei\ndrei\n")
    result = run_rnmt("preprocess", "-s", "en", "-t", "de", "--train", str(tmp_path / "c"),
                      "--out", str(tmp_path / "bin"), "--errors", "strict")
    _assert_one_line_error(result, "c.en", "line 3")


@pytest.mark.parametrize("damage", ["truncated", "not-a-checkpoint", "foreign-torch-file"])
def test_translate_refuses_damaged_checkpoints(trained_checkpoint, tmp_path, damage):
    path = tmp_path / "model.pt"
    data = trained_checkpoint.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 3])
    elif damage == "not-a-checkpoint":
        path.write_text("hello\n")
    else:
        import torch

        torch.save({"state_dict": {"w": torch.zeros(1)}}, path)
    result = run_rnmt("translate", "-m", str(path), stdin="nine\n")
    _assert_one_line_error(result, "model.pt")


def test_a_malicious_checkpoint_runs_no_code(tmp_path):
    victim = tmp_path / "created-by-pickle"
    evil = tmp_path / "evil.pt"
    code = (
        "import os, torch\n"
        "class E:\n"
        "    def __reduce__(self):\n"
        f"        return (os.system, ('touch {victim}',))\n"
        f"torch.save({{'format': 'rnmt', 'version': 1, 'model': E()}}, r'{evil}')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    result = run_rnmt("translate", "-m", str(evil), stdin="nine\n")
    assert result.returncode == 2 and not victim.exists()


def _train_process(bin_dir, save_dir, *extra: str) -> subprocess.Popen:
    sizes = [f"--{k.replace('_', '-')}={v}" for k, v in TINY_MODEL.items()]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(
        RNMT + ["train", str(bin_dir), "--save-dir", str(save_dir), "--device", "cpu",
                "--max-tokens", "400", "--log-every", "1", *sizes, *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT,
    )


def _wait_for_step(proc: subprocess.Popen, step: int) -> None:
    deadline = time.time() + 120
    assert proc.stderr is not None
    for line in iter(proc.stderr.readline, b""):
        if f"step {step:6d}".encode() in line or time.time() > deadline:
            return


def test_ctrl_c_saves_last_checkpoint_and_resume_finishes(bin_dir, tmp_path):
    proc = _train_process(bin_dir, tmp_path, "--max-steps", "100000")
    _wait_for_step(proc, 5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err.decode()
    assert b"--resume" in err and b"Traceback" not in err
    saved = load_checkpoint(tmp_path / "last.pt")
    assert saved["training"]["state"]["step"] >= 5
    proc = _train_process(bin_dir, tmp_path, "--resume", "--max-steps",
                          str(saved["training"]["state"]["step"] + 3))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()
    assert load_checkpoint(tmp_path / "last.pt")["step"] == saved["training"]["state"]["step"] + 3
