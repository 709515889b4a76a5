"""The Trainer side: what `attach()` changes and how it is undone.

``_ledger`` (every change to a Trainer, recorded and undone in reverse: the only module that assigns a Trainer's
attributes), ``_attach`` (the changes, in order), ``_validation`` (the refusals made before any change),
``_callbacks`` (metrics logging, skipped updates), ``_resume`` (the plugin's state in checkpoints), ``_guidance``
(the paper's advice on settings) and ``_models`` (models named by path, PEFT wrapping).
"""

from ._ledger import Ledger, SignatureMismatch

__all__ = ["Ledger", "SignatureMismatch"]
