"""The Faust stream worker: counter reports in, running totals and dead letters out."""
