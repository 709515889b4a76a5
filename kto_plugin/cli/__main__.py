"""``python -m kto_plugin.cli ...`` (e.g. under ``torchrun``): the `kto-plugin` command.

Under a distributed launch the process ends without the interpreter's C++ teardown once the command has returned
(its exit status kept, Python's exit functions run, output flushed, the process group destroyed): after a gloo
run, a C++ thread torch leaves behind
sometimes aborts the process during static destruction ("terminate called without an active exception"), which
would turn a finished run into a failed launch.
"""

import atexit
import os
import sys

from . import main

code = main()
if "torch.distributed" in sys.modules:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        atexit._run_exitfuncs()  # what Python runs at exit (trackers finishing their runs, logging's flush) ...
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code or 0)  # ... but not the C++ static destruction
raise SystemExit(code)
