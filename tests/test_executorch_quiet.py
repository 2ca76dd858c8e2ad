"""The ExecuTorch runtime's own log lines (``[cpuinfo_utils.cpp:..]``, ``[threadpool.cpp:..]``) stay out of the
user's console: they go to ``logging`` at DEBUG; anything else the runtime prints still reaches stderr."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

from pqv_lightning.export.executorch import runtime_logs_at_debug


def test_runtime_log_lines_go_to_debug_and_other_lines_pass(capfd, caplog):
    with caplog.at_level(logging.DEBUG, logger="pqv_lightning.export.executorch"), runtime_logs_at_debug():
        os.write(2, b"[threadpool.cpp:66] Resetting threadpool to 1 threads.\nsomething else went wrong\n")
    err = capfd.readouterr().err
    assert "threadpool.cpp" not in err and "something else went wrong" in err
    assert any("[threadpool.cpp:66] Resetting threadpool" in r.getMessage() for r in caplog.records)


def test_making_and_resetting_the_threadpool_prints_nothing():
    code = (
        "from pqv_lightning.export.executorch import set_threadpool\n"
        "assert set_threadpool(None) >= 1\nassert set_threadpool(1) == 1\nassert set_threadpool(2) == 2\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "cpuinfo_utils" not in done.stderr and "threadpool.cpp" not in done.stderr, done.stderr
