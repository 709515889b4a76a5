"""A small two-style task for the KTO family's tests, built in code (no download).

Each prompt asks about a topic and ends with a kind word, ``please`` or ``hey``; each can be answered in two
styles, ``" yes indeed <topic>."`` or ``" no way <topic>!"``. A tiny Llama is first taught both styles equally for
every prompt (plain SFT), so it prefers neither; KTO data then labels the style that matches the kind word
desirable (``please`` -> the first style, ``hey`` -> the second) and the other undesirable, or the reverse with
``swap=True``. The held-out preference is the mean over held-out topics' prompts of
``log pi(desirable style | x) - log pi(other style | x)``.

The kind word is the prompt's last token, so the taught model's state at the first completion token already
tells the kinds apart; with it in the middle of the prompt, the pre-taught model learns to ignore it, and the
preference signal of a KTO step is second-order (measured: minibatch runs then moved either way).
"""

from __future__ import annotations

import torch

from kto_plugin.demo import build_tiny_model, build_tokenizer

TOPICS = ("apple", "river", "stone", "cloud", "tiger", "piano", "bread", "snow", "lamp", "ship", "moon", "grass",
          "chair", "horse", "glass", "road", "fish", "tree", "door", "bird", "cake", "rock", "wind", "star")
HELD_OUT = TOPICS[:6]
TRAIN = TOPICS[6:]
KINDS = {"please": 0, "hey": 1}  # kind word -> index of the style it prefers
STYLES = (" yes indeed {topic}.", " no way {topic}!")
# the family's variants beyond `kto` (docs/losses.md), as KTOConfig settings
VARIANTS = {
    "bco": {"loss_type": "bco"},
    "humanline": {"loss_type": "humanline"},
    "kto_length_normalized": {"length_normalize": True},
    "bco_length_normalized": {"loss_type": "bco", "length_normalize": True},
    "sft_term": {"sft_weight": 0.1},
    "positive_mean": {"reference_point": "positive_mean"},
    "ema": {"reference_point": "ema"},
}


def prompt(topic: str, kind: str) -> str:
    return f"tell me about the {topic}, {kind}"


def kto_rows(topics=TRAIN, swap: bool = False) -> list[dict]:
    """Every (prompt, style) of `topics`, labelled desirable when the style matches the kind word (`swap`: the
    reverse)."""
    return [
        {"prompt": prompt(topic, kind), "completion": style.format(topic=topic), "label": (s == preferred) != swap}
        for topic in topics
        for kind, preferred in KINDS.items()
        for s, style in enumerate(STYLES)
    ]


def build_task_tokenizer():
    return build_tokenizer([r["prompt"] + r["completion"] for r in kto_rows(TOPICS)], vocab_size=320)


def pre_taught_model(tokenizer, seed: int = 1, steps: int = 100):
    """A tiny Llama taught every (prompt, style) of every topic equally: full-batch SFT on the completions."""
    model = build_tiny_model(len(tokenizer), hidden_size=64, num_layers=2, num_heads=4, seed=seed)
    rows = kto_rows(TOPICS)
    full = [tokenizer(r["prompt"] + r["completion"])["input_ids"] for r in rows]
    prompt_lengths = [len(tokenizer(r["prompt"])["input_ids"]) for r in rows]
    width = max(map(len, full))
    ids = torch.full((len(full), width), tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (row, start) in enumerate(zip(full, prompt_lengths)):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
        labels[i, start : len(row)] = torch.tensor(row[start:])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


@torch.no_grad()
def preference(model, tokenizer, topics=HELD_OUT) -> float:
    """Mean over `topics` x kinds of log pi(preferred style | x) - log pi(other style | x) (summed completion
    log-probs, full-vocabulary log-softmax)."""
    was_training = model.training
    model.eval()
    differences = []
    for topic in topics:
        for kind, preferred in KINDS.items():
            logps = []
            for style in (STYLES[preferred], STYLES[1 - preferred]):
                start = len(tokenizer(prompt(topic, kind))["input_ids"])
                ids = torch.tensor([tokenizer(prompt(topic, kind) + style.format(topic=topic))["input_ids"]])
                log_probs = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
                token_logps = log_probs.gather(-1, ids[0, 1:, None])[:, 0]
                logps.append(token_logps[start - 1 :].sum())
            differences.append(logps[0] - logps[1])
    model.train(was_training)
    return torch.stack(differences).mean().item()
