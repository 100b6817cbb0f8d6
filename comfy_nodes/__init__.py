"""ComfyUI Cluster node pack: one workflow spread over many ComfyUI instances (ranks).

Importing this package starts no thread and opens no socket, and works without ComfyUI and without
any cluster variable: the communicator is created when a cluster node first runs (a one-rank
world when no cluster is configured, where every cluster node is an identity).
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
