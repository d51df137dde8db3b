"""Concurrent requests into one model call.

One worker thread owns the model: every batch and every heatmap runs there, one at a time, so hooks and
threads never race. Requests that arrive while it is busy, or within ``window_ms`` of the first, share the next
batch (up to ``max_batch`` images): a CPU does 16 images in one call in much less time than 16 calls. Work whose
callers have gone (timed out, disconnected) by the time the model thread gets to it is skipped.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class MicroBatcher(Generic[T, R]):
    """``await submit(item)`` returns ``fn([..., item, ...])[i]`` for the batch the item landed in.

    Use as an async context manager (the loop task and the worker thread live inside it).

    Args:
        fn: maps a list of items to a list of results of the same length (runs in the worker thread).
        max_batch: most items per call.
        window_ms: how long the first item of a batch waits for company.
    """

    def __init__(self, fn: Callable[[list[T]], list[R]], max_batch: int = 16, window_ms: float = 5.0):
        self.fn, self.max_batch, self.window = fn, max(1, max_batch), max(0.0, window_ms) / 1000
        self._queue: asyncio.Queue[tuple[T, asyncio.Future]] | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self.batches = 0
        self.items = 0

    async def __aenter__(self) -> MicroBatcher[T, R]:
        self._queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cxr-model")
        self._task = asyncio.create_task(self._loop())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        self._task = self._executor = self._queue = None

    async def submit(self, item: T) -> R:
        """``fn``'s result for ``item``, computed in the next batch (skipped if this caller is cancelled first)."""
        if self._queue is None:
            raise RuntimeError("MicroBatcher.submit() outside its `async with` block")
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((item, future))
        return await future

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` in the model thread, between batches (for work that uses the model otherwise); skipped
        if the caller has been cancelled (timed out, disconnected) by the time the model thread gets to it."""
        if self._executor is None:
            raise RuntimeError("MicroBatcher.call() outside its `async with` block")
        future: asyncio.Future | None = None

        def unless_abandoned() -> Any:
            if future is not None and future.done():  # a read of its state: safe from the model thread
                return None
            return fn(*args)

        future = asyncio.get_running_loop().run_in_executor(self._executor, unless_abandoned)
        return await future

    async def _next_batch(self) -> list[tuple[T, asyncio.Future]]:
        assert self._queue is not None
        batch = [await self._queue.get()]
        deadline = asyncio.get_running_loop().time() + self.window
        while len(batch) < self.max_batch:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except asyncio.TimeoutError:
                break
        return [(item, future) for item, future in batch if not future.done()]  # timed-out callers are gone

    def _run_waited_for(self, batch: list[tuple[T, asyncio.Future]]) -> tuple[list[tuple[T, asyncio.Future]], list[R]]:
        """In the model thread: the items whose callers still wait, and ``fn`` over them (a batch that waited behind
        other work may have lost some or all of its callers)."""
        waited_for = [(item, future) for item, future in batch if not future.done()]  # a read: safe from a thread
        return waited_for, (self.fn([item for item, _ in waited_for]) if waited_for else [])

    async def _loop(self) -> None:
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            try:
                batch, results = await self.call(self._run_waited_for, batch)
            except Exception as err:  # noqa: BLE001 - handed to every caller of the batch, who reports it
                for _, future in batch:
                    if not future.done():
                        future.set_exception(err)
                continue
            if not batch:
                continue
            self.batches += 1
            self.items += len(batch)
            for (_, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)
