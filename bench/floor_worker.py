"""The framework's floor: a Faust agent on the raw messages that does (almost) nothing.

    python bench/floor_worker.py TOPIC consume|consume+produce [--record-bytes N]

Same Faust settings as the real worker (`faust_app`, the garbage collector kept
quiet as `run_worker` does), the same acknowledgement pattern (`stream.noack()`,
then the messages handled since the last checkpoint acknowledged in order, every
`checkpoint_interval_s` or `CHECKPOINT_MESSAGES` messages), but nothing decoded:

- `consume` iterates the events and acknowledges each;
- `consume+produce` also sends one record of `--record-bytes` bytes per message
  straight to aiokafka's producer, as the real worker sends its records, on
  `<prefix>.floor` (which must exist).

So that a window of any length can be measured on a backlog the real worker
drains in a minute, the agent reads TOPIC in laps: after a partition's last
message it seeks back to its first. From the second lap on, Faust refuses the
acknowledgement of an offset below the one it has committed after a dict lookup,
so the laps leave out Faust's per-acknowledgement bookkeeping and its commits
(once a second).

Every second it prints `floor t=<monotonic s> cpu=<process CPU s>
at=<partition>:<laps done>:<last offset of this lap, -1 before its first>,...`
(read by `bench/steady.py`).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import faust
from faust.types import TP

from quotaflow.core.settings import Settings
from quotaflow.streams.app import CHECKPOINT_MESSAGES, _quiet_gc, faust_app

VARIANTS = ("consume", "consume+produce")


def create_floor_app(settings: Settings, topic: str, variant: str, record_bytes: int
                     ) -> faust.App:
    """A Faust app reading `topic` in laps as `variant` says."""
    app = faust_app(settings, f"{settings.topic_prefix}-floor-{variant.replace('+', '-')}")
    # from the second lap on nothing is committed: no warning about it every few seconds
    app.conf.broker_commit_livelock_soft_timeout = 24 * 3600.0
    raw = app.topic(topic, partitions=settings.partitions)
    out_topic = f"{settings.topic_prefix}.floor"
    record = b"x" * record_bytes
    produce = variant == "consume+produce"
    ends: dict[int, int] = {}  # partition -> its end offset (the backlog is published before)
    laps: dict[int, int] = {}
    last: dict[int, int] = {}
    pending: list[tuple[Any, Any]] = []
    checkpointed = [time.monotonic()]

    def producer() -> Any:
        faust_producer: Any = app.producer
        return faust_producer._ensure_producer()  # aiokafka's producer (private)

    async def acknowledge() -> None:
        handled = pending[:]
        del pending[:]
        checkpointed[0] = time.monotonic()
        for stream, event in handled:
            await stream.ack(event)

    def due() -> bool:
        return bool(pending) and (
            len(pending) >= CHECKPOINT_MESSAGES
            or time.monotonic() - checkpointed[0] >= settings.checkpoint_interval_s)

    @app.agent(raw)
    async def floor(stream: Any) -> None:
        acks = stream.noack()
        async for event in acks.events():
            message = event.message
            partition, offset = message.partition, message.offset
            if produce:
                await producer().send(out_topic, record, key=message.key or b"floor",
                                      partition=partition)
            pending.append((acks, event))
            last[partition] = offset
            if partition not in ends:
                ends[partition] = (await app.consumer.highwaters(message.tp))[message.tp]
            if offset + 1 >= ends[partition]:  # its last message: the next lap
                laps[partition] = laps.get(partition, 0) + 1
                last[partition] = -1
                await app.consumer.seek_wait({TP(topic, partition): 0})
            if due():
                await acknowledge()

    @app.timer(interval=settings.checkpoint_interval_s / 4)  # type: ignore[untyped-decorator]
    async def _acknowledge() -> None:
        if due():
            await acknowledge()

    @app.timer(interval=1.0)  # type: ignore[untyped-decorator]
    async def _status() -> None:
        at = ",".join(f"{p}:{laps.get(p, 0)}:{o}" for p, o in sorted(last.items()))
        print(f"floor t={time.monotonic():.3f} cpu={time.process_time():.3f} at={at}",
              flush=True)

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("topic")
    parser.add_argument("variant", choices=VARIANTS)
    parser.add_argument("--record-bytes", type=int, default=0)
    args = parser.parse_args()
    _quiet_gc()
    app = create_floor_app(Settings(), args.topic, args.variant, args.record_bytes)
    worker = faust.Worker(app, loglevel="INFO", quiet=True)
    worker.execute_from_commandline()


if __name__ == "__main__":
    main()
