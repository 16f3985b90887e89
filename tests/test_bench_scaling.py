"""bench/scaling.py and bench/scaling_distill.py: bad flags are one sentence and exit code 2 (the runs
themselves are measured, not tested: they take minutes; the 2-process machinery is tested elsewhere)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import scaling  # noqa: E402
import scaling_distill  # noqa: E402


@pytest.mark.parametrize("module, argv, message", [
    (scaling, ["--experts", "0"], "--experts must be at least 1"),
    (scaling, ["--repeats", "0"], "--repeats must be at least 1"),
    (scaling_distill, ["--iterations", "2"], "--iterations at least 3"),
    (scaling_distill, ["--shape", "imagenet"], "invalid choice"),
])
def test_bad_flags_exit_2_with_one_sentence(module, argv, message, capsys):
    assert module.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
