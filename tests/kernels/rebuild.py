"""Running a check in a fresh process whose kernels are built with extra compiler flags
(the portable branches of the C files, built without the vector instructions)."""

import os
import shutil
import subprocess
import sys


def run_with_flags(tmp_path, flags: str, script: str) -> subprocess.CompletedProcess:
    """``python -c script`` with the kernels compiled by the usual compiler plus ``flags``
    into a cache of its own under ``tmp_path``."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")  # the one that built the kernels
    cc = tmp_path / "cc-with-flags"
    cc.write_text(f'#!/bin/sh\nexec "{compiler}" "$@" {flags}\n')
    cc.chmod(0o755)
    env = dict(os.environ, CC=str(cc), MOEKIT_CACHE_DIR=str(tmp_path / "cache"))
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
