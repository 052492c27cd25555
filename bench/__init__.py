"""LionMQ's benchmark: `python -m bench` (see `python -m bench --help`)."""
