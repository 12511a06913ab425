"""The client library: what the CLI, the CSI driver and the volume plugin share.

Connecting to any node of a cluster (``connect``), volume and snapshot operations (``volumes``),
spawning and tracking mounts and their registry (``mounts``), tool sessions at a volume's
coordinator (``tools``). Nothing here prints: callers turn results and ``PxfsError``s into output.
"""
