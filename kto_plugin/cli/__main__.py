"""``python -m kto_plugin.cli ...`` (e.g. under ``torchrun``): the `kto-plugin` command."""

from . import main

raise SystemExit(main())
