"""AsyncM1Engine: single requests from many coroutines (VeRL's agent loop), batched by one engine thread.

`await generate(prompt_ids, sampling, request_id)` queues the request and returns when it finishes (`stream(...)`
yields its tokens as they come); a background
thread runs `M1Engine.step()` while there is work, so requests arriving mid-generation join the running batch
at the next step (continuous batching) instead of waiting for the batch to drain.
"""

import asyncio
import threading
from typing import NamedTuple

from .engine import M1Engine, RequestOutput
from .sampling import SamplingParams


class TokenEvent(NamedTuple):
    sample: int  # index among the request's n samples
    token: int
    logprob: float | None  # None unless the request asked for log-probs
    finish_reason: str | None  # set on a sample's last token


class AsyncM1Engine:
    def __init__(self, engine: M1Engine):
        self.engine = engine
        self._lock = threading.Lock()  # the engine's queues are touched by the event loop and the step thread
        self._work = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="m1-engine", daemon=True)
        self._thread.start()

    async def generate(self, prompt_ids: list[int], sampling: SamplingParams, request_id: str) -> RequestOutput:
        if self._error is not None:
            raise RuntimeError("the engine thread failed earlier") from self._error
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def on_done(output):
            loop.call_soon_threadsafe(lambda: done.done() or done.set_result(output))

        with self._lock:
            self.engine.add_request(prompt_ids, sampling, request_id, on_done=on_done)
        self._work.set()
        return await done

    async def stream(self, prompt_ids: list[int], sampling: SamplingParams, request_id: str):
        """Like `generate`, but yields `TokenEvent`s as the tokens are sampled (the n samples interleaved)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def put(item):
            loop.call_soon_threadsafe(events.put_nowait, item)

        with self._lock:
            self.engine.add_request(prompt_ids, sampling, request_id, on_done=put,
                                    on_token=lambda *event: put(TokenEvent(*event)))
        self._work.set()
        while not isinstance(item := await events.get(), RequestOutput):
            yield item
        if item.error:
            raise ValueError(f"request {request_id}: {item.error}")

    def _loop(self):
        while True:
            self._work.wait()
            with self._lock:
                if not self.engine.has_unfinished():
                    self._work.clear()
                    continue
                try:
                    self.engine.step()
                except BaseException as err:  # fail every waiting request instead of hanging it
                    self._error = err
                    self._fail_all(err)
                    raise

    def _fail_all(self, err):
        for seqs in [*self.engine.waiting, self.engine.running]:
            for seq in seqs:
                request = seq.request
                if request.pending and request.on_done:
                    request.pending = 0
                    request.on_done(RequestOutput(request.request_id, request.prompt, [], error=f"engine failed: {err!r}"))
        self.engine.waiting.clear()
        self.engine.running.clear()

    def abort(self, request_ids=None) -> int:
        """`M1Engine.abort`: the aborted requests' `generate` calls return their partial samples."""
        with self._lock:
            return self.engine.abort(request_ids)

    def sleep(self, offload_weights: bool = False):
        with self._lock:
            self.engine.sleep(offload_weights)

    def wake_up(self):
        with self._lock:
            self.engine.wake_up()

    def load_weights(self, named_tensors):
        with self._lock:
            self.engine.load_weights(named_tensors)
