"""Node producers: collectors reading proxy counters, and the publisher sending reports."""
