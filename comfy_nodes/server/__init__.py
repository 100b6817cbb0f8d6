"""Server side of the node pack: SPMD prompt distribution inside a running ComfyUI.

Nothing here runs at import time.  :func:`comfy_nodes.server.integration.install` is called by
the package entry point when ComfyUI's ``PromptServer`` exists; it registers an on-prompt
handler, the ``/cluster/*`` routes and a start-up hook that joins the cluster in a thread.
"""
