"""Tokenizing prompts and prompt+completion texts, with each prompt's text encoded once.

`encode(tokenizer, prompts, fulls, special)` returns ``tokenizer(prompts)`` and ``tokenizer(full)`` for every
full text of every prompt: exactly the ids the tokenizer gives, which TRL 1.16 computes for every row.

Most of a KTO row's text is its prompt (a dialogue), and a paired row's prompt is shared by two full texts,
so re-encoding it dominates preparation. For GPT-2-style byte-level BPE tokenizers the encoding of a full text
is the prompt's own encoding up to a split point plus the encoding of the rest:

* the pre-tokenizer is `ByteLevel(use_regex=True)` (GPT-2's pattern: contractions, `` ?\\p{L}+``, `` ?\\p{N}+``,
  `` ?[^\\s\\p{L}\\p{N}]+``, whitespace runs), there is no normalizer, the model is BPE without dropout (each
  pre-token is encoded on its own), special tokens are only added in front, and no added token contains a
  space or strips the whitespace around it;
* the split point `s` is a space with a letter on each side, inside the text the prompt and the full text share.
  GPT-2's pattern has no look-behind, a piece that holds a letter never extends past a space, and the piece
  at `s` (" word") starts there whatever precedes it, so the pre-tokens of the text are those of ``text[:s]``
  followed by those of ``text[s:]``, in the prompt and the full text alike.

Then ``ids(full) = ids(prompt)[:j] + ids(full[s:], no special tokens)``, with `j` the tokens of the prompt that
end by `s`. Any other tokenizer, or a prompt without such a space, is encoded in full; and the first spliced
text of every batch is also encoded in full and compared, falling back to full encoding for the batch if the
two differ.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from typing import Any


def can_splice(tokenizer: Any) -> bool:
    """Whether `tokenizer` is of the kind the module docstring describes."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    try:
        pre = backend.pre_tokenizer
        if backend.normalizer is not None or type(pre).__name__ != "ByteLevel" or not pre.use_regex:
            return False
        if type(backend.model).__name__ != "BPE" or backend.model.dropout not in (None, 0.0):
            return False
        added = list(getattr(tokenizer, "added_tokens_decoder", {}).values())
        if any(any(ch.isspace() for ch in t.content) or t.lstrip or t.rstrip for t in added):
            return False
        if backend.truncation is not None or backend.padding is not None:
            return False
        plain = tokenizer("a b", add_special_tokens=False)["input_ids"]
        special = tokenizer("a b", add_special_tokens=True)["input_ids"]
        return special[len(special) - len(plain) :] == plain  # specials only in front
    except Exception:  # an unusual backend: encode in full
        return False


def common_prefix_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common prefix of two strings, token-id lists or message lists."""
    if b[: len(a)] == a:  # the usual case (a is a prefix of b), compared in C
        return len(a)
    if isinstance(a, str) and isinstance(b, str):
        lo, hi = 0, min(len(a), len(b))  # binary search on slice equality: the comparisons run in C
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if a[lo:mid] == b[lo:mid]:
                lo = mid
            else:
                hi = mid - 1
        return lo
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def split_point(prompt: str, fulls: Sequence[str]) -> int:
    """The last space of `prompt` with a letter on each side, inside the text shared with every full text; 0 if
    none."""
    limit = min(common_prefix_length(prompt, f) for f in fulls)
    if limit < 3:  # no room for letter, space, letter (and rfind would read a negative end from the right)
        return 0
    s = prompt.rfind(" ", 0, limit - 1)
    while s > 0:
        if prompt[s - 1].isalpha() and prompt[s + 1].isalpha():
            return s
        s = prompt.rfind(" ", 0, s)
    return 0


def encode(
    tokenizer: Any, prompts: Sequence[str], fulls: Sequence[Sequence[str]], special: bool, splice: bool
) -> tuple[list[list[int]], list[list[int]], list[int | None]]:
    """(ids of each prompt, ids of each full text, flattened in order, and for each full text the length of its
    common prefix with its prompt's ids where the splice already gives it, else None)."""
    if not splice:
        prompt_ids = tokenizer(list(prompts), add_special_tokens=special)["input_ids"]
        full_ids = tokenizer([f for group in fulls for f in group], add_special_tokens=special)["input_ids"]
        return prompt_ids, full_ids, [None] * len(full_ids)
    # the backend directly: the wrapper's per-encoding conversion costs as much as a third of the encoding
    backend = tokenizer.backend_tokenizer
    encoded = backend.encode_batch(list(prompts), add_special_tokens=special)
    points = [split_point(p, group) for p, group in zip(prompts, fulls)]
    tails, whole = [], []
    for s, group in zip(points, fulls):
        (tails if s else whole).extend(f[s:] if s else f for f in group)
    tail_ids = iter([e.ids for e in backend.encode_batch_fast(tails, add_special_tokens=False)] if tails else ())
    whole_ids = iter(tokenizer(whole, add_special_tokens=special)["input_ids"] if whole else ())
    prompt_ids, full_ids, prefix, checked = [], [], [], False
    for enc, s, group in zip(encoded, points, fulls):
        ids = enc.ids
        prompt_ids.append(ids)
        if not s:
            full_ids.extend(next(whole_ids) for _ in group)
            prefix.extend(None for _ in group)
            continue
        j = bisect_right([end for _, end in enc.offsets], s)
        rest = ids[j:]
        for text in group:
            tail = next(tail_ids)
            if not checked:
                checked = True
                if ids[:j] + tail != tokenizer(text, add_special_tokens=special)["input_ids"]:
                    return encode(tokenizer, prompts, fulls, special, splice=False)
            full_ids.append(ids[:j] + tail)
            n = 0
            for x, y in zip(rest, tail):
                if x != y:
                    break
                n += 1
            prefix.append(j + n)
    return prompt_ids, full_ids, prefix
