"""Ray nodes on 127.0.0.1: a head (with the dashboard, which serves the Jobs API) and worker nodes,
each with its own raylet and object store, as `ray start` starts them on separate machines.

    python cluster/ray_nodes.py NODES --port GCS_PORT --dashboard-port PORT [--cpus-per-node N] [--temp-dir DIR]
                                [--describe FILE]

With --describe, FILE gets a JSON list of the nodes: node id, head or not, the raylet's pid (what
tests/test_faults.py kills to take a node down the hard way).

Serves until SIGTERM (or SIGINT), then shuts every node down through its own handles.

Why not `ray start` once per node: on one machine a worker node cannot join 127.0.0.1. Ray lets
`ray start --address` join only where multi-node clusters are enabled, and there it replaces a
loopback address with the machine's outward one. Ray's own `cluster_utils.Cluster` starts the same
processes (GCS, raylets, dashboard) and keeps them on 127.0.0.1 when RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0.
Token authentication is on when RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH name it.

With --temp-dir, everything Ray writes stays in DIR: `Cluster` also writes the head's address into
`<Ray's default temp folder>/ray_current_cluster` (/tmp/ray/ unless RAY_TMPDIR says otherwise), a
folder that exists only where an earlier Ray run made it; RAY_TMPDIR=DIR points it into DIR/ray/.
"""

import argparse
import json
import os
import signal
import threading
from pathlib import Path

from ray.cluster_utils import Cluster


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("nodes", type=int, help="nodes in all, the head included")
    parser.add_argument("--port", type=int, required=True, help="the head's GCS port")
    parser.add_argument("--dashboard-port", type=int, required=True)
    parser.add_argument("--cpus-per-node", type=int, default=1)
    parser.add_argument("--temp-dir", help="Ray's session folders (default: Ray's, /tmp/ray)")
    parser.add_argument("--describe", help="write the nodes (id, head, raylet pid) to this JSON file")
    args = parser.parse_args()

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    where = {}
    if args.temp_dir:
        where = {"temp_dir": args.temp_dir}
        os.environ["RAY_TMPDIR"] = args.temp_dir  # read when Cluster writes ray_current_cluster
        Path(args.temp_dir, "ray").mkdir(parents=True, exist_ok=True)
    # The head's job agent on a port of its own choosing (None), as the workers' are: at Ray's fixed
    # default (52365) it cannot start beside any other Ray instance on the machine (a search running
    # locally), and the dashboard then refuses every job ("No available agent to submit job").
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": args.cpus_per_node, "gcs_server_port": args.port, "include_dashboard": True,
        "dashboard_host": "127.0.0.1", "dashboard_port": args.dashboard_port, "dashboard_agent_listen_port": None,
        **where,
    })
    try:
        for _ in range(args.nodes - 1):
            cluster.add_node(num_cpus=args.cpus_per_node, **where)
        cluster.wait_for_nodes()
        if args.describe:
            nodes = [cluster.head_node, *cluster.worker_nodes]
            with open(args.describe, "w") as file:
                json.dump([{"node_id": node.node_id, "head": node is cluster.head_node,
                            "raylet_pid": node.all_processes["raylet"][0].process.pid} for node in nodes], file)
        print(f"{args.nodes} Ray nodes, head at {cluster.address}", flush=True)
        stop.wait()
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main()
