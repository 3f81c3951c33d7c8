"""`python -m quotaflow` runs the command line."""

from quotaflow.cli import main

main()
