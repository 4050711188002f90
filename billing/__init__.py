"""Money: credits, holds, per-second metering and settlement on a double-entry ledger.

No service of its own: the gateway calls it in process to place holds when jobs are
submitted and to answer billing questions; the scheduler calls it inside the
transaction that ends a job attempt, so a job's state and its money never disagree.
"""
