"""Multi-process cluster tests: node processes on loopback sharing one SQLite file.

`nodes` starts and breaks the processes, `proxy` is a TCP proxy a test can cut, `load` drives
producers and consumers over plain HTTP, and `ledger` keeps their books and judges them.
`bench/cluster.py` measures the issue's figures with the same parts.
"""
