"""A multi-node Ray cluster on 127.0.0.1 for tests, run in a process of its own:

    python -m tests.ray_cluster NODES      prints the address, then serves until stdin closes

`ray.cluster_utils.Cluster` starts every node's processes; running it here, not inside pytest,
keeps Ray's cached configuration (token mode, loopback) from leaking into the test process.
Closing stdin shuts the nodes down by their own handles.
"""

import sys

from ray.cluster_utils import Cluster


def main() -> None:
    nodes = int(sys.argv[1])
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        for _ in range(nodes - 1):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        print(cluster.address, flush=True)
        sys.stdin.read()  # serve until the test closes our stdin
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main()
