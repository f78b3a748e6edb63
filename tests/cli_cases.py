"""Run one fmgen command several times in one process: ``python tests/cli_cases.py MODULE CASES``.

MODULE is a command module (``fmgen.cli.evaluate``) and CASES a JSON file holding a list of argv
lists. Under torchrun every process runs the cases in the same order in one process group, which
is closed once, after the last. A test that compares several runs of a command pays the
interpreter's start and imports (~6 s with diffusers, per process) once instead of per case.
Exits with the first non-zero status, after running every case.
"""

from __future__ import annotations

import importlib
import json
import sys

import fmgen.cli


def main() -> int:
    module, cases = sys.argv[1], json.loads(open(sys.argv[2], encoding="utf-8").read())
    command = importlib.import_module(module).main
    leave = fmgen.cli._leave_process_group
    fmgen.cli._leave_process_group = lambda: None  # the group serves every case
    codes = [command(argv) for argv in cases]
    leave()
    return next((c for c in codes if c), 0)


if __name__ == "__main__":
    raise SystemExit(main())
