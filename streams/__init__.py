"""The Faust stream worker: counter reports in, exact totals, dead letters and quota events out."""
