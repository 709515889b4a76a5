"""Data: preference formats in, KTO token ids out, and the KTO batch.

``_sources`` (data from files, folders and the Hub), ``_formats`` (which formats, row validation),
``_encoding`` (fast exact tokenisation), ``_prepare`` (`KTOPlugin.prepare_dataset`'s work), ``_report`` (what was
dropped or cut, and the label balance), ``_truncation`` (the one rule for `max_length`), ``_pairing`` (the one KL
pairing rule), ``_collator`` (the KTO batch) and ``_vision`` (rows with images).
"""

from ._collator import KTOCollator, KTOLabels
from ._report import DataReport
from ._sources import load_preference_data
from ._vision import VisionKTOCollator

__all__ = ["DataReport", "KTOCollator", "KTOLabels", "VisionKTOCollator", "load_preference_data"]
