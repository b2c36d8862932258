"""The kit that tests, benchmarks and load tests share: one copy of each helper they all need.

    from testkit.net import Relay, free_port         # a free loopback port; one TCP fault relay
    from testkit.stats import median, percentile     # latency summaries
    from testkit.exports import synthetic_export     # an export of random blocks, no training
    from testkit.keys import signing_key, trust      # the test operator's key; a device pinning it

The local cluster (Redis, N shards, ingest, publish) is the product's own launcher,
services/bank_server/cluster.py (`run_local_cluster`); the kit does not wrap it. Nothing in
membank/, services/ or training/ imports the kit.
"""
