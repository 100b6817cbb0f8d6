"""comfycluster-stun: the rendezvous server of ComfyUI Cluster (HTTP API plus a STUN/relay port).

Run it as ``comfycluster-stun`` or ``python -m stun``; build it in code with
:func:`create_app`.  The wire contract is docs/rendezvous-protocol.md; deployment is
docs/rendezvous-server.md.  Installed, this package is ``comfyui_cluster.stun`` (the name
``stun`` belongs to another PyPI project), so its modules import each other relatively.
"""

from __future__ import annotations

from .app import create_app
from .settings import Settings

__all__ = ["Settings", "create_app"]
