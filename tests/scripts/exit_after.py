"""Run a script as ``__main__`` (under torchrun), then end the process without the interpreter's teardown.

After a two-process gloo run has finished its work (and the script has destroyed its process group), a C++ thread
torch leaves behind sometimes aborts the process during static destruction ("terminate called without an active
exception", SIGABRT), more often on a loaded machine: the launch would fail after every check of the script has
passed. An exception raised by the script still propagates (exit status 1), so a real failure is never hidden.

    python -m torch.distributed.run --nproc_per_node 2 tests/scripts/exit_after.py SCRIPT [ARGS...]
"""

import atexit
import os
import runpy
import sys

if __name__ == "__main__":
    script, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
    atexit._run_exitfuncs()  # what Python runs at exit, but not the C++ static destruction
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
