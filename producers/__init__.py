"""Node producers: collectors that read proxy counters, and the publisher that sends reports to Kafka."""
