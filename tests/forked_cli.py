"""Many `python train.py ...` launches at the cost of one interpreter start.

`run_all` starts one Python process that imports what train.py imports (torch above all, most of a
launch's 2.5 s), then forks once per command; each child runs train.py as `__main__` with the
command's arguments, its own stdout and stderr, and exits with the CLI's own exit code. Each child
is the real CLI (Hydra's entry point, the checks, `sys.exit`) in a fresh process that differs from
`python train.py` only by having its modules already imported. Used for the corpus of refused
starts (tests/test_bad_inputs.py), whose fresh launches were the suite's largest single cost.
"""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_all(commands: list[list[str]], env: dict[str, str], parallel: int = 2, timeout: float = 600) -> list[subprocess.CompletedProcess]:
    """Each command's arguments (after `python train.py`), run from the project root; their results in order."""
    server = subprocess.run([sys.executable, __file__, str(parallel)], cwd=ROOT, input=json.dumps(commands), capture_output=True,
                            text=True, timeout=timeout, env=env)
    if server.returncode != 0:
        raise RuntimeError(f"the forking launcher failed (exit {server.returncode}):\n{server.stderr[-3000:]}")
    return [subprocess.CompletedProcess(["python", "train.py", *command], code, out, err)
            for command, (code, out, err) in zip(commands, json.loads(server.stdout), strict=True)]


def _child(arguments: list[str], output: Path) -> None:
    """Runs in the forked child: train.py as the command line `python train.py ARGUMENTS`; never returns."""
    for fd, name in ((1, "stdout"), (2, "stderr")):
        os.dup2(os.open(output / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    sys.argv = ["train.py", *arguments]
    code = 0
    try:
        runpy.run_path("train.py", run_name="__main__")
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except BaseException:  # as the interpreter would: the traceback, exit 1
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _serve(commands: list[list[str]], parallel: int) -> list[tuple[int, str, str]]:
    import train  # noqa: F401  (the imports every child then shares)

    results: dict[int, tuple[int, str, str]] = {}
    running: dict[int, tuple[int, Path]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        pending = list(enumerate(commands))
        while pending or running:
            while pending and len(running) < parallel:
                index, arguments = pending.pop(0)
                output = Path(scratch) / str(index)
                output.mkdir()
                pid = os.fork()
                if pid == 0:
                    try:
                        _child(arguments, output)
                    finally:  # never back into this loop: a child that failed before running train.py still exits
                        os._exit(1)
                running[pid] = (index, output)
            pid, status = os.wait()
            index, output = running.pop(pid)
            results[index] = (os.waitstatus_to_exitcode(status), (output / "stdout").read_text(), (output / "stderr").read_text())
    return [results[index] for index in range(len(commands))]


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    print(json.dumps(_serve(json.load(sys.stdin), int(sys.argv[1]))))
