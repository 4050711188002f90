"""The cyclic garbage collector's settings for the long-running services.

Python's defaults (a young-generation collection every 700 allocations, a full one
after 100 of those) are tuned for small scripts. A service under load allocates
thousands of objects a request, and the ones still in flight (128 open requests'
frames, scopes, futures) survive the young collections and get promoted, so full
collections come often, and each walks every object the service holds: the app, its
routes and schemas, SQLAlchemy's mappers. In the gateway at 500 jobs/s that was a
quarter of its CPU, 130 ms a full collection (`gpumarket bench scheduling`,
BENCHMARKS.md).
"""

import gc

# Allocations between young collections, then young collections per middle one, and
# middle ones per full one. Most objects die long before a young collection now.
THRESHOLDS = (50_000, 20, 20)


def settle_after_startup() -> None:
    """Call once the service is set up: what it built to run (modules, the app, the
    mappers) moves out of the collector's sight for good, and collections grow rarer.

    Startup's own garbage is collected first, so it is not kept forever."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)
