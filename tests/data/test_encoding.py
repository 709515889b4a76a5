"""encoding.encode: spliced encodings equal full encodings, and only eligible tokenizers are spliced."""

from __future__ import annotations

import copy

import pytest
from tokenizers import normalizers, pre_tokenizers

from kto_plugin.data._formats import extract_prompt
from kto_plugin.demo import load_hh_pairs
from kto_plugin.data._encoding import can_splice, encode, split_point

TRICKY = [
    ("Héllo wörld, naïve café", [" über alles</s>", "!  spaced   out</s>"]),
    ("x", [" y</s>", "z</s>"]),
    ("Numbers 12 34 and a b", [" c d</s>", "5 6</s>"]),
    ("日本語 テキスト です", [" はい</s>", "いいえ</s>"]),
    ("it's a dog's life don't", [" you think</s>", "'t it</s>"]),
    ("tabs\there and\nnew lines word", [" more\n\n text</s>", "\tend</s>"]),
]


def groups(n):
    out = []
    for pair in load_hh_pairs(n):
        prompt, good, bad = extract_prompt(pair["chosen"], pair["rejected"])
        out.append((prompt, [prompt + good + "</s>", prompt + bad + "</s>"]))
    return out + [(p, [p + c for c in cs]) for p, cs in TRICKY]


@pytest.mark.parametrize("special", [True, False])
def test_spliced_equals_full_encoding(tokenizer, special):
    data = groups(300)
    prompts, fulls = [p for p, _ in data], [f for _, f in data]
    assert can_splice(tokenizer)
    assert sum(split_point(p, f) > 0 for p, f in data) > 290  # the fast path is taken
    fast = encode(tokenizer, prompts, fulls, special, splice=True)
    slow = encode(tokenizer, prompts, fulls, special, splice=False)
    assert fast[:2] == slow[:2]
    assert slow[1][0] == tokenizer(fulls[0][0], add_special_tokens=special)["input_ids"]
    full_prompts = [p for p, group in zip(slow[0], fulls) for _ in group]
    for n, p, f in zip(fast[2], full_prompts, slow[1]):  # the common prefix the splice reports
        if n is not None:
            assert p[:n] == f[:n] and (n == min(len(p), len(f)) or p[n] != f[n])


def test_ineligible_tokenizers_are_encoded_in_full(tokenizer):
    with_normalizer = copy.deepcopy(tokenizer)
    with_normalizer.backend_tokenizer.normalizer = normalizers.Lowercase()
    metaspace = copy.deepcopy(tokenizer)
    metaspace.backend_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    for tok in (with_normalizer, metaspace):
        assert not can_splice(tok)
        data = groups(5)
        prompts, fulls = [p for p, _ in data], [f for _, f in data]
        ids = encode(tok, prompts, fulls, True, splice=False)
        assert ids[2] == [None] * len(ids[1])
        assert ids[1] == [tok(f)["input_ids"] for group in fulls for f in group]


def test_split_point_needs_letters_on_both_sides():
    assert split_point("ab cd ef", ["ab cd efgh"]) == 5
    assert split_point("ab cd", ["ab cX"]) == 2  # shared up to "c": the space before it is usable
    assert split_point("ab cd", ["ab Xd"]) == 0  # the full text diverges right after the only space
    assert split_point("1 2 3", ["1 2 34"]) == 0


def test_a_wrong_split_falls_back_to_full_encoding(tokenizer, monkeypatch):
    import kto_plugin.data._encoding as enc

    data = groups(3)
    prompts, fulls = [p for p, _ in data], [f for _, f in data]
    slow = encode(tokenizer, prompts, fulls, True, splice=False)
    monkeypatch.setattr(enc, "split_point", lambda prompt, group: 3)  # "\n\nH" + "uman: ...": not a boundary
    calls = []
    real = enc.encode
    monkeypatch.setattr(enc, "encode", lambda *a, **k: calls.append(k.get("splice", a[-1:])) or real(*a, **k))
    assert real(tokenizer, prompts, fulls, True, splice=True)[:2] == slow[:2]
    assert calls == [False]  # the check on the first row sent the batch to full encoding


def test_spliced_rows_after_an_easy_first_row_equal_full_encoding(tokenizer, monkeypatch):
    """Only the first spliced text of a batch is checked against full encoding: every later row, adversarial
    ones included, must be exact on its own (no fallback hides a wrong splice here)."""
    import random

    import kto_plugin.data._encoding as enc
    from tokenizers import AddedToken, processors

    rng = random.Random(1)
    pieces = list("abXY  \n\t'sé日😀12.,!-")
    pieces += ["\u0301", "</s>", "<s>", "'ll", " \u00a0", "ß", "\u200b", "\r\n", "wor"]
    text = lambda n: "".join(rng.choice(pieces) for _ in range(n))  # noqa: E731
    prompts, fulls = ["Hello world and friends"], [["Hello world and friends fine</s>"]]
    for _ in range(400):
        p = text(rng.randint(1, 30))
        prompts.append(p)
        fulls.append([p + text(rng.randint(0, 8)) + "</s>" for _ in range(rng.randint(1, 3))])
    no_bos = copy.deepcopy(tokenizer)
    no_bos.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
    added = copy.deepcopy(tokenizer)
    added.add_tokens(["world", AddedToken("dog", single_word=True)])
    monkeypatch.setattr(enc, "encode", lambda *a, **k: pytest.fail("fell back to full encoding"))
    for tok in (tokenizer, no_bos, added):
        assert can_splice(tok)
        fast = encode(tok, prompts, fulls, True, splice=True)
        assert sum(n is not None for n in fast[2]) > 50  # many rows spliced
        assert fast[0] == tok(prompts)["input_ids"]
        assert fast[1] == tok([f for group in fulls for f in group])["input_ids"]


def test_a_full_text_sharing_no_start_with_its_prompt_is_not_spliced(tokenizer):
    # a chat template may render the full text differently from its first character on: nothing is shared
    assert split_point("hello there friend", ["Xhello there friend and more"]) == 0
    prompts = ["Hello world and friends", "hello there my friend"]  # an easy first row: the batch check passes
    fulls = [["Hello world and friends fine</s>"], ["Zhello there my friend again</s>"]]
    fast = encode(tokenizer, prompts, fulls, False, splice=True)
    assert fast[1] == tokenizer([f for group in fulls for f in group], add_special_tokens=False)["input_ids"]
