"""kto_plugin.trainer._ledger: every change recorded, undone in reverse, exactly; wrapped signatures checked."""

from __future__ import annotations

import pickle

import pytest
import transformers

from kto_plugin.trainer import Ledger, SignatureMismatch
from kto_plugin.trainer._ledger import NOTSET


class Target:
    inherited = "class value"

    def __init__(self):
        self.own = "own value"
        self._prop = "property value"

    @property
    def prop(self):
        return self._prop

    @prop.setter
    def prop(self, value):
        self._prop = value

    def method(self, epoch_iterator, num_batches, device):
        return ("original", epoch_iterator, num_batches, device)


class Wrapper:
    PARAMETERS = ("epoch_iterator", "num_batches", "device")

    def __init__(self, original, tag):
        self.original, self.tag = original, tag

    def __call__(self, *args):
        return (self.tag, self.original(*args))


class Undo:
    def __init__(self):
        self.calls = []

    def note(self, *args):
        self.calls.append(args)


def test_an_instance_attribute_gets_its_old_value_back():
    t, ledger = Target(), Ledger()
    ledger.setattr(t, "own", "changed")
    ledger.setattr(t, "own", "changed twice")
    assert t.own == "changed twice"
    ledger.undo()
    assert t.own == "own value" and len(ledger) == 0


def test_an_inherited_attribute_leaves_no_shadow_behind():
    t, ledger = Target(), Ledger()
    ledger.setattr(t, "inherited", "instance value")
    ledger.setattr(t, "brand_new", 1)
    assert vars(t)["inherited"] == "instance value"
    ledger.undo()
    assert "inherited" not in vars(t) and "brand_new" not in vars(t)
    assert t.inherited == "class value"


def test_a_property_is_set_back_through_its_setter():
    t, ledger = Target(), Ledger()
    ledger.setattr(t, "prop", "changed")
    assert t._prop == "changed"
    ledger.undo()
    assert t.prop == "property value"


def test_inserted_items_are_removed_by_identity_and_undo_runs_in_reverse():
    items, ledger, undo = ["a", "b"], Ledger(), Undo()
    first, second = object(), object()
    ledger.insert(items, 0, first)
    ledger.on_undo(undo, "note", "first")
    ledger.insert(items, None, second)
    ledger.on_undo(undo, "note", "second")
    assert items == [first, "a", "b", second]
    items.insert(1, "user's")  # the user's own change in between is kept
    ledger.undo()
    assert items == ["user's", "a", "b"]
    assert undo.calls == [("second",), ("first",)]


def test_wrap_checks_the_signature_and_undo_restores_the_method():
    t, ledger = Target(), Ledger()
    ledger.wrap(t, "method", Wrapper, "tag")
    assert t.method(1, 2, 3) == ("tag", ("original", 1, 2, 3))
    ledger.undo()
    assert "method" not in vars(t) and t.method(1, 2, 3) == ("original", 1, 2, 3)


def test_a_changed_signature_is_refused_naming_the_transformers_version():
    class Renamed(Target):
        def method(self, iterator, num_batches, device):  # a parameter renamed by a new release
            return None

    t, ledger = Renamed(), Ledger()
    with pytest.raises(SignatureMismatch, match=rf"transformers {transformers.__version__} has Trainer.method"):
        ledger.wrap(t, "method", Wrapper, "tag")
    assert "method" not in vars(t) and len(ledger) == 0


def test_undo_finishes_every_step_when_one_fails_then_raises():
    t, ledger, undo = Target(), Ledger(), Undo()
    ledger.setattr(t, "own", "changed")
    ledger.on_undo(undo, "missing_method")  # fails at undo
    ledger.on_undo(undo, "note", "ran")
    with pytest.raises(AttributeError):
        ledger.undo()
    assert undo.calls == [("ran",)] and t.own == "own value" and len(ledger) == 0


def test_a_ledger_pickles_with_its_records():
    t, ledger = Target(), Ledger()
    ledger.setattr(t, "brand_new", 1)
    ledger.setattr(t, "own", 2)
    t2, ledger2 = pickle.loads(pickle.dumps((t, ledger)))
    assert ledger2.describe() == ["Target.brand_new set", "Target.own set"]
    ledger2.undo()
    assert t2.own == "own value" and "brand_new" not in vars(t2)
    assert pickle.loads(pickle.dumps(NOTSET)) is NOTSET
