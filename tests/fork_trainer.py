"""Runs `fixmatch train` in forked children of one process that has already imported torch.

The kill-at-any-moment test starts and SIGKILLs a training eleven times; a fresh `python -m fixmatch train`
spends seconds importing torch each time, a fork of this warm process does not. Each child runs exactly
what `python -m fixmatch train` runs (fixmatch.cli.main) and is killed as a whole process. This process does
no tensor work itself, so forking it is safe.

Protocol, one JSON object per line: stdin {"argv": [...], "log": path, "env": {...}} starts a child;
stdout answers {"pid": N} at once, then {"pid": N, "exit": code} when it ends (-9 for SIGKILL).
"""
import json
import os
import sys
import traceback

import torch._dynamo  # noqa: F401  # imported by the optimiser's constructor: the slowest import
from torch.utils.tensorboard import SummaryWriter  # noqa: F401

try:  # drawn at the first evaluation (TensorBoard's augmentation grid); its import and font list cost about 1 s
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
    from matplotlib.figure import Figure  # noqa: F401
except ImportError:  # without matplotlib a run draws no grid
    pass

import fixmatch.cli


def _child(request: dict) -> int:
    fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.update(request.get("env", {}))
    try:
        return fixmatch.cli.main(request["argv"])
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
        return 1


def main() -> None:
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = _child(request)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"pid": pid, "exit": os.waitstatus_to_exitcode(status)}), flush=True)


if __name__ == "__main__":
    main()
