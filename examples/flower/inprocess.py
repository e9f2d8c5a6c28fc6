"""Flower's Message API in one process, without ray: a Grid that calls a ClientApp directly.

``InProcessGrid(client_app, num_nodes)`` gives every node a ``Context`` with
``node_config = {"partition-id": k, "num-partitions": n}`` and a ``state`` that persists across
rounds, as a SuperNode's does. ``send_and_receive`` deep-copies each message to its node (the
wire would), runs the ClientApp, and returns the replies (an exception becomes an error reply,
as on a SuperNode). Deterministic and quick: the tests run every method through the real
``ServerApp`` strategy and ``ClientApp`` with it. Use ``with serving():`` around
``strategy.start(grid=...)``: Flower's messages need a run and node identity.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

__all__ = ["InProcessGrid", "serving"]

RUN_ID = 1
SERVER_NODE = 0


@contextmanager
def serving() -> Iterator[None]:
    """Set Flower's process-wide run/node identity for the ServerApp side, then restore it."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = RUN_ID, SERVER_NODE, 1
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


class InProcessGrid(Grid):
    """A Grid whose nodes are ``num_nodes`` in-process contexts of ``client_app``."""

    def __init__(
        self, client_app: ClientApp, num_nodes: int, run_config: dict[str, Any] | None = None
    ) -> None:
        self.client_app = client_app
        self.contexts = {
            node: Context(
                run_id=RUN_ID,
                node_id=node,
                node_config={"partition-id": k, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config=dict(run_config or {}),
            )
            for k, node in enumerate(range(101, 101 + num_nodes))
        }
        self._ids = itertools.count()
        self._pending: dict[str, Message] = {}
        self.delivered: list[Message] = []
        """Every message delivered to a node, in order (copies, as the nodes received them)."""

    def set_run(self, run: Any) -> None:
        self._run = run

    @property
    def run(self) -> Any:
        return getattr(self, "_run", None)

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(
            content=content,
            dst_node_id=dst_node_id,
            message_type=message_type,
            group_id=group_id,
            ttl=ttl,
        )

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            sent = copy.deepcopy(msg)
            message_id = f"m{next(self._ids)}"
            sent.metadata.__dict__["_message_id"] = message_id  # the SuperLink sets it
            self._pending[message_id] = sent
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._deliver(self._pending.pop(i)) for i in message_ids]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return list(self.pull_messages(list(self.push_messages(messages))))

    def _deliver(self, msg: Message) -> Message:
        context = self.contexts[msg.metadata.dst_node_id]
        self.delivered.append(msg)
        try:
            reply = self.client_app(msg, context)
        except Exception as error:  # the SuperNode turns a ClientApp exception into an error
            return Message(Error(code=1, reason=f"{type(error).__name__}: {error}"), reply_to=msg)
        return copy.deepcopy(reply)
