"""Fleet coordination on etcd: membership, capacity reservations, the drain budget.

Everything here is optional (the `fleet:` config section) and advisory to local
safety: the journal and reconcile never ask etcd anything. Without quorum the
fleet refuses new coordinated work with one reason; work under way finishes.
"""
