"""What aiokafka's producer costs per record and per byte, on the local Kafka.

    python bench/producer_cost.py [--records 100000] [--sizes 60 600 6000]

Sends records of each size to a new topic of 4 partitions, with the worker's
producer settings that matter here (acks=all, a 5 ms linger, large batches),
one `send()` each as the worker does, and prints the producer process's CPU per
record and per byte over the sends and the final flush (a warm-up of 2,000
records first). With the worker's records per reading and bytes per reading,
it says what producing costs the worker at the least.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from aiokafka import AIOKafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic
from workload import on_servers

WARMUP = 2_000


async def cpu_per_record(bootstrap: str, topic: str, records: int, size: int) -> float:
    """CPU µs per record for `records` sends of `size` bytes, keyed, round the partitions."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks=-1, linger_ms=5,
                                max_batch_size=1_000_000, max_request_size=4_000_000)
    await producer.start()
    try:
        value = b"x" * size
        for i in range(WARMUP):
            await producer.send(topic, value, key=b"w%d" % i, partition=i % 4)
        await producer.flush()
        start = time.process_time()
        for i in range(records):
            await producer.send(topic, value, key=b"k%d" % i, partition=i % 4)
        await producer.flush()
        return (time.process_time() - start) / records * 1e6
    finally:
        await producer.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--sizes", type=int, nargs="+", default=[60, 600, 6000])
    args = parser.parse_args()

    def run(bootstrap: str, _influx: str) -> None:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap)
        try:
            print("| bytes per record | CPU µs per record | CPU ns per byte |\n|---:|---:|---:|")
            for size in args.sizes:
                topic = f"producer-cost-{size}-{time.time_ns()}"
                admin.create_topics([NewTopic(topic, 4, 1)])
                time.sleep(1)  # the topic's leaders elected
                us = asyncio.run(cpu_per_record(bootstrap, topic, args.records, size))
                print(f"| {size:,} | {us:.1f} | {us / size * 1000:.1f} |", flush=True)
        finally:
            admin.close()

    on_servers(run)


if __name__ == "__main__":
    main()
