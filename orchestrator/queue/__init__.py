"""Jobs: the Redis/RQ queues (``jobs``), the worker processes and their supervisor
(``worker``), retries, backpressure for uploads, the reconciler and dead letters."""
