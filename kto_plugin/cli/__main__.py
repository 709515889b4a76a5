"""``python -m kto_plugin.cli ...`` (e.g. under ``torchrun``): the `kto-plugin` command.

Under a distributed launch the process ends without the interpreter's teardown once the command has returned (its
exit status kept, output flushed, the process group destroyed): after a gloo run, a C++ thread torch leaves behind
sometimes aborts the process during static destruction ("terminate called without an active exception"), which
would turn a finished run into a failed launch.
"""

import os
import sys

from . import main

code = main()
if "torch.distributed" in sys.modules:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code or 0)
raise SystemExit(code)
