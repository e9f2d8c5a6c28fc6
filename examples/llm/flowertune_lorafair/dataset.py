"""flowertune-lorafair: the dataset (FlowerTune's ``dataset.py`` shape, offline).

FlowerTune loads an instruction dataset with ``flwr_datasets.FederatedDataset`` and formats it
with a ``transformers`` tokenizer and ``trl``'s completion-only collator. Offline, this module
keeps the same three entry points over a generated corpus: client k writes sentences about its
own topics (non-IID: the same grammar, different vocabularies), tokenised by characters (ids
1..len(ALPHABET); 0 pads). ``replace_keys`` is FlowerTune's config helper; ``DictConfig`` is
omegaconf's when installed, else a minimal stand-in with the same attribute access.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from types import SimpleNamespace
from typing import Any

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


def formatting_prompts_func(example: Mapping[str, list[str]]) -> list[str]:
    """The training texts of a batch of examples (here: the sentences themselves)."""
    return list(example["text"])


def encode(texts: list[str]) -> Tensor:
    """Token ids (len(texts), SEQ), right-padded with 0."""
    out = torch.zeros(len(texts), SEQ, dtype=torch.long)
    for i, text in enumerate(texts):
        ids = [ALPHABET.index(c) + 1 for c in text[:SEQ]]
        out[i, : len(ids)] = torch.tensor(ids)
    return out


def get_tokenizer_and_data_collator_and_propt_formatting(
    model_name: str,
) -> tuple[Callable[[list[str]], Tensor], None, Callable[[Mapping[str, list[str]]], list[str]]]:
    """(tokenizer, data collator, prompt formatting), as FlowerTune's; no collator needed."""
    return encode, None, formatting_prompts_func


def sentences(partition: int, n: int, *, seed: int = 0) -> list[str]:
    """``n`` sentences in partition ``partition``'s topic (topics cycle over 3)."""
    rng = random.Random(1000 * seed + partition)
    topic = partition % len(_SUBJECTS)
    return [
        f"{rng.choice(_SUBJECTS[topic])} {rng.choice(_VERBS[topic])} {rng.choice(_OBJECTS[topic])}."
        for _ in range(n)
    ]


def load_data(
    partition_id: int, num_partitions: int, dataset_name: str, *, n: int = 64, train: bool = True
) -> dict[str, list[str]]:
    """Partition ``partition_id``'s examples (``{"text": [...]}``; test set: another seed)."""
    del num_partitions, dataset_name  # one generated corpus, partitioned by topic
    return {"text": sentences(partition_id, n, seed=0 if train else 1)}


def replace_keys(
    input_dict: Mapping[str, Any], match: str = "-", target: str = "_"
) -> dict[str, Any]:
    """Recursively replace ``match`` with ``target`` in the keys (FlowerTune's helper)."""
    return {
        key.replace(match, target): (
            replace_keys(value, match, target) if isinstance(value, Mapping) else value
        )
        for key, value in input_dict.items()
    }


def _namespace(values: Mapping[str, Any]) -> SimpleNamespace:
    return SimpleNamespace(
        **{k: _namespace(v) if isinstance(v, Mapping) else v for k, v in values.items()}
    )


try:
    from omegaconf import DictConfig
except ImportError:  # offline without omegaconf: the same attribute access (cfg.train.x)

    def DictConfig(values: Mapping[str, Any]) -> Any:  # type: ignore[no-redef]
        """``omegaconf.DictConfig``'s attribute access over nested dicts."""
        return _namespace(values)
