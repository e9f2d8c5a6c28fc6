"""flowertune-lorafair: the strategy (FlowerTune's ``strategy.py`` shape).

FlowerTune's ``FlowerTuneLlm`` is Flower's ``FedAvg`` plus a tracker of the megabytes sent and
received (its leaderboard caps the total at 200,000 MB). Here the same tracker sits on
:class:`lorafair.flower.LoRAStrategy`, so the aggregation is any lorafair method (LoRA-FAIR by
default) and nothing else changes.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO, WARNING
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.supercore import log

from lorafair.flower import LoRAStrategy

BUDGET_MB = 200_000.0


class FlowerTuneLlm(LoRAStrategy):
    """``LoRAStrategy(aggregator)`` that logs the communication used so far, in MB."""

    def __init__(self, aggregator: Any = "lora_fair", **kwargs: Any) -> None:
        super().__init__(aggregator, **kwargs)
        self.comm_tracker = CommunicationTracker()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.comm_tracker.track(messages)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        self.comm_tracker.track([m for m in replies if not m.has_error()])
        return super().aggregate_train(server_round, replies)


class CommunicationTracker:
    """The megabytes of every ``ArrayRecord`` sent or received so far."""

    def __init__(self) -> None:
        self.curr_comm_cost = 0.0

    def track(self, messages: list[Message]) -> None:
        size = sum(
            len(array.data)
            for msg in messages
            for record in msg.content.array_records.values()
            for array in record.values()
        )
        cost = size / 1024**2
        self.curr_comm_cost += cost
        log(
            INFO,
            "Communication budget: used %.2f MB (+%.2f MB this round) / %s MB",
            self.curr_comm_cost,
            cost,
            f"{BUDGET_MB:,.0f}",
        )
        if self.curr_comm_cost > BUDGET_MB:
            log(WARNING, "The communication used exceeds the FlowerTune leaderboard's budget.")
