"""The fixes validation errors suggest work when a user follows them literally (`kto_plugin.data._hints`)."""

from __future__ import annotations

import re
import warnings

import pytest
from datasets import Dataset

from kto_plugin import DataError, KTOConfig, KTOPlugin, KTOPluginWarning


def _rows(labels):
    return [{"prompt": f"Question {i}?", "completion": f" Answer {i}.", "label": v} for i, v in enumerate(labels)]


def _follow(message: str, namespace: dict) -> None:
    """Run the code the message ends with (``dataset = ...`` or ``rows = ...``), as a user pasting it would."""
    code = re.search(r"((?:dataset|rows) = .*)$", message).group(1)
    exec(code, namespace)


def _prepare(kto, data):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", KTOPluginWarning)  # a one-label dataset after a filter
        return kto.prepare_dataset(data)


# (labels as a user's data holds them, the labels a user means); the old hint turned 'True'/'False' into all
# False (case) and left 1.0/0.0 floats (datasets' map keeps a float column's type)
CASES = [
    (["True", "False", "False", "True"], [True, False, False, True]),
    (["yes", "no", "no"], [True, False, False]),
    ([" Yes", "NO ", "no"], [True, False, False]),
    ([1.0, 0.0, 0.0], [True, False, False]),
    ([1, 0, 1], [True, False, True]),
    ([-1, 1, 1], [False, True, True]),
    (["good", "bad"], [True, False]),
    ([1, 2, 3, 4, 5], [False, False, True, True, True]),  # ratings: a threshold at the midpoint, 3
    ([0.9, 0.1, 0.5], [True, False, True]),
]


@pytest.mark.parametrize("given,meant", CASES, ids=[repr(c[0]) for c in CASES])
@pytest.mark.parametrize("container", ["dataset", "rows"])
def test_label_hint_works_when_followed(tokenizer, given, meant, container):
    kto = KTOPlugin(KTOConfig(), tokenizer=tokenizer)
    rows = _rows(given)
    data = Dataset.from_list(rows) if container == "dataset" else rows
    with pytest.raises(DataError, match=r"row 0: 'label' is .* it must be a bool") as err:
        kto.prepare_dataset(data)
    namespace = {"dataset": data, "rows": rows}
    _follow(str(err.value), namespace)
    assert _prepare(kto, namespace[container])["label"] == meant


def test_label_hint_of_a_list_passes_its_bools_through(tokenizer):
    rows = _rows([True, "no", False, "yes"])  # a list may mix bools with other values
    with pytest.raises(DataError, match=r"row 1: 'label' is 'no'") as err:
        KTOPlugin(KTOConfig(), tokenizer=tokenizer).prepare_dataset(rows)
    namespace = {"rows": rows}
    _follow(str(err.value), namespace)
    assert _prepare(KTOPlugin(KTOConfig(), tokenizer=tokenizer), namespace["rows"])["label"] == [True, False, False,
                                                                                                   True]


def test_label_hint_refuses_a_spelling_it_was_not_built_from(tokenizer):
    """Following the hint on data with a value it does not list fails loudly, never silently as False."""
    kto = KTOPlugin(KTOConfig(), tokenizer=tokenizer)
    with pytest.raises(DataError) as err:
        kto.prepare_dataset(Dataset.from_list(_rows(["True", "False"])))
    later = Dataset.from_list(_rows(["True", "ture"]))  # a typo further down the file
    with pytest.raises(KeyError, match="ture"):
        _follow(str(err.value), {"dataset": later})


@pytest.mark.parametrize("container", ["dataset", "rows"])
def test_missing_label_hint_drops_the_unlabelled_rows(tokenizer, container):
    kto = KTOPlugin(KTOConfig(), tokenizer=tokenizer)
    rows = _rows([True, None, False])
    data = Dataset.from_list(rows) if container == "dataset" else rows
    with pytest.raises(DataError, match=r"row 1: 'label' is None") as err:
        kto.prepare_dataset(data)
    namespace = {"dataset": data, "rows": rows}
    _follow(str(err.value), namespace)
    assert _prepare(kto, namespace[container])["completion_ids"] == _prepare(kto, [rows[0], rows[2]])["completion_ids"]


@pytest.mark.parametrize("columns", [("prompt", "label"), ("prompt", "label", "response_text_id"),
                                     ("completion", "label", "source")])
def test_missing_column_never_suggests_renaming_a_required_column(tokenizer, columns):
    """No 'completion' column used to suggest dataset.rename_column('prompt', 'completion')."""
    row = {c: True if c == "label" else "text" for c in columns}
    with pytest.raises(DataError) as err:
        KTOPlugin(KTOConfig(), tokenizer=tokenizer).prepare_dataset([row])
    message = str(err.value)
    assert re.match(r"train dataset has no '(completion|prompt)' column", message)
    for required in ("prompt", "completion", "label"):
        assert f"Did you mean {required!r}" not in message and f"rename_column({required!r}" not in message


@pytest.mark.parametrize("container", ["dataset", "rows"])
def test_rename_hint_works_when_followed(tokenizer, container):
    rows = [{"prompt": "Hi", "response": " Hello.", "label": True}, {"prompt": "Hi", "response": " Go.", "label": False}]
    data = Dataset.from_list(rows) if container == "dataset" else rows
    kto = KTOPlugin(KTOConfig(), tokenizer=tokenizer)
    with pytest.raises(DataError, match=r"no 'completion' column.*Did you mean 'response'\? Rename it") as err:
        kto.prepare_dataset(data)
    namespace = {"dataset": data, "rows": rows}
    _follow(str(err.value).split(" KTO rows are ")[0].rstrip("."), namespace)
    assert kto.prepare_dataset(namespace[container])["label"] == [True, False]


def test_data_error_pickles_with_its_parts():
    """datasets' map with num_proc > 1 sends a worker's error back pickled."""
    import pickle

    err = pickle.loads(pickle.dumps(DataError("row 3: 'label' is 'yes'.", "Python fix.", "File fix.")))
    assert (str(err), err.for_file()) == ("row 3: 'label' is 'yes'. Python fix.", "row 3: 'label' is 'yes'. File fix.")
