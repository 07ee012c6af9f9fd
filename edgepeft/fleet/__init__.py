"""Server side: move a fleet to a version.

- :mod:`.plan`: the inventory and rollout plan files; :mod:`.gate`: the eval gate before a rollout starts;
- :mod:`.policy`: the rollout's decisions (waves, rates, timeouts, retries, abort), apart from links and clock;
- :mod:`.controller`: carries a plan out over the links, its state in SQLite (:mod:`.state`);
- :mod:`.reports`: which devices' signed reports count; :mod:`.simulator`: simulated devices for load tests;
- :mod:`.dashboard`: ``edgepeft rollout serve``, a read-only web page over the rollout database.
"""
