"""A tiny generated text corpus and a character tokenizer, so the example runs offline.

Client k writes sentences about its own topics (non-IID): the same grammar, different
vocabularies. Characters map to ids 1..len(ALPHABET); 0 pads.
"""

from __future__ import annotations

import random

import torch
from torch import Tensor

ALPHABET = "abcdefghijklmnopqrstuvwxyz .,"
VOCAB = len(ALPHABET) + 1
SEQ = 48

_SUBJECTS = (
    ("the cat", "a kitten", "my dog", "the old horse"),
    ("the server", "a client", "the router", "my laptop"),
    ("the chef", "a baker", "the waiter", "my aunt"),
)
_VERBS = (
    ("sleeps on", "chases", "watches", "sits near"),
    ("sends", "receives", "drops", "forwards"),
    ("bakes", "slices", "serves", "tastes"),
)
_OBJECTS = (
    ("the mat", "a ball", "the window", "some yarn"),
    ("a packet", "the update", "an adapter", "the weights"),
    ("the bread", "a cake", "some soup", "the pie"),
)


def sentences(partition: int, n: int, *, seed: int = 0) -> list[str]:
    """``n`` sentences in partition ``partition``'s topic (topics cycle over 3)."""
    rng = random.Random(1000 * seed + partition)
    topic = partition % len(_SUBJECTS)
    return [
        f"{rng.choice(_SUBJECTS[topic])} {rng.choice(_VERBS[topic])} {rng.choice(_OBJECTS[topic])}."
        for _ in range(n)
    ]


def encode(texts: list[str]) -> Tensor:
    """Token ids (len(texts), SEQ), right-padded with 0."""
    out = torch.zeros(len(texts), SEQ, dtype=torch.long)
    for i, text in enumerate(texts):
        ids = [ALPHABET.index(c) + 1 for c in text[:SEQ]]
        out[i, : len(ids)] = torch.tensor(ids)
    return out


def client_data(partition: int, *, n: int = 64, train: bool = True) -> Tensor:
    """Partition ``partition``'s token ids (train and test sets use different seeds)."""
    return encode(sentences(partition, n, seed=0 if train else 1))
