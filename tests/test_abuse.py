"""tools/abuse.py's cases: every command against a folder of broken inputs fails cleanly -- exit status not 0,
no traceback, a message naming the file or key, nothing of the user's deleted or half-written.

The cases run in this process (``speechssl.cli.main``, with a timeout), which is fast; one case goes
through ``python -m speechssl`` too, as the tool runs them all (``python tools/abuse.py``).
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

import abuse  # noqa: E402


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("abuse")
    bad, good = abuse.make_inputs(root)
    return root, bad, good


@pytest.mark.parametrize("case", abuse.CASES, ids=[c.name for c in abuse.CASES])
def test_command_fails_cleanly(inputs, case):
    root, bad, good = inputs
    res = abuse.check_case(case, root, bad, good, abuse.run_inprocess, timeout=120)
    assert not res.problems, f"{'; '.join(res.problems)}\n--- output ---\n{res.output[-3000:]}"


def test_through_the_real_entry_point(inputs):
    root, bad, good = inputs
    case = next(c for c in abuse.CASES if c.name == "evaluate: fairseq checkpoint")
    res = abuse.check_case(case, root, bad, good, abuse.run_subprocess, timeout=120)
    assert not res.problems, f"{'; '.join(res.problems)}\n--- output ---\n{res.output[-3000:]}"
