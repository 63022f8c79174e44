"""Start-up: what `rnmt translate` and `rnmt score` import before doing their work.

Users pay start-up on every call of a pipeline, so these are claims about imports (a
measurable cause), never about seconds (benchmarks/ measure those).
"""

from __future__ import annotations

import subprocess
import sys

RUN_MAIN = """
import sys
from rnmt_cli.main import main

sys.argv = ["rnmt", *{args!r}]
try:
    main()
except SystemExit as exit:
    assert exit.code in (0, None), exit.code
print(" ".join(sorted(sys.modules)), file=sys.stderr)
"""


def _modules_after(args: list[str], stdin: str = "") -> set[str]:
    """The modules loaded by one `rnmt ARGS` run (in a fresh interpreter)."""
    result = subprocess.run([sys.executable, "-c", RUN_MAIN.format(args=args)], input=stdin,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return set(result.stderr.strip().splitlines()[-1].split())


def test_scoring_metrics_never_imports_torch(tmp_path):
    (tmp_path / "ref").write_text("a cat sat\non the mat\n", "utf-8")
    (tmp_path / "hyp").write_text("a cat sat\non a mat\n", "utf-8")
    modules = _modules_after(["score", "--ref", str(tmp_path / "ref"), str(tmp_path / "hyp"),
                              "--metrics", "bleu,chrf,ter"])
    assert "sacrebleu" in modules  # it did score
    assert not {"torch", "numpy"} & modules


def test_translate_imports_no_other_subcommand_nor_plotting(trained_checkpoint):
    modules = _modules_after(["translate", "-m", str(trained_checkpoint), "--beam", "2",
                              "--device", "cpu"], stdin="seven\n")
    assert "rnmt.translator" in modules  # it did translate
    unwanted = {"rnmt_cli.preprocess", "rnmt_cli.train", "rnmt_cli.score", "rnmt.training",
                "rnmt.evaluation", "sacrebleu", "matplotlib", "rich", "rnmt.models.ensemble"}
    assert not unwanted & modules
