"""What the tests share that is not a test: no test files here, and no fixtures or hooks
(those are in tests/conftest.py).

- ``helpers``: plain helpers (backend names and URLs, the shared server pool, coordinators,
  the tests' time limits).
- ``servers``: private, throwaway servers on free loopback ports that a test can kill,
  pause or restart.
- ``clusters``: private three-node clusters and the network faults of the failover scenarios.
- ``proxy``: a TCP proxy that delays every chunk (a real but slow path to a server).
- ``procs``: the one wrapper for worker processes; ``worker``: the script they run
  (``python tests/support/worker.py COMMAND ...``), one command a cross-process role.
- ``rwmix``: readers and a writer of one RWLock logging to a shared file, and its check.
- ``checker``: the failover scenarios' history of critical sections, fenced store and checker.
"""
