"""Glue between ComfyUI's PromptServer and the cluster (the only module that imports ComfyUI).

``install()`` runs when ComfyUI loads the node pack.  It starts nothing by itself: it registers

* an on-prompt handler (leader): a prompt using cluster nodes is rewritten for SPMD execution
  (comfy_nodes.server.prompts) — users queue as always, with the Queue button or ``POST /prompt``;
* ``POST /cluster/queue`` (leader): the same, forced, returning the prompt id;
* ``GET /cluster/status`` (for the browser, like ``/cluster/queue``: ComfyUI's own trust model;
  it shows the key's fingerprint, never the key);
* ``GET /cluster/panel`` (the cluster panel's first view; then it listens to the websocket),
  ``POST /cluster/interrupt`` and ``POST /cluster/free`` (leader: on every rank), all for the
  browser (comfy_nodes.server.panel);
* the rank's control endpoint (comfy_nodes.server.carrier): membership, interrupt propagation
  and the panel's reports between ranks travel there as sealed UDP datagrams, checked against
  one table (comfy_nodes.server.messages), never over ComfyUI's HTTP server, which has no
  authentication of its own;
* the nodes' runtime (comfy_nodes.server.node_runtime), installed for the whole process;
* an aiohttp start-up hook that opens the control endpoint, joins the cluster in a background
  thread, and on followers runs the control thread that takes over each prompt the leader hands
  out; and starts the panel's heartbeat thread.

Per-prompt fan-out weights (the panel's, from the browser's settings) come with a prompt as
``extra_data.cluster_weights`` (``"3,1"``) and fill every ``weights`` input the workflow left
empty, before the prompt is handed to the followers; a node's own weights still win.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any

from comfy_nodes import cluster
from comfy_nodes.nodes import NODE_CLASS_MAPPINGS
from comfy_nodes.nodes_base import _ClusterNode
from comfy_nodes.partition import parse_weights
from comfy_nodes.server import prompts
from comfy_nodes.server.carrier import Address, UdpCarrier
from comfy_nodes.server.carrier_mailbox import MAILBOX_ADDRESS, with_mailbox
from comfy_nodes.server.control import Delivery, Verdict, hand_over, take_over
from comfy_nodes.server.handoffs import Handoffs
from comfy_nodes.server.membership import Membership
from comfy_nodes.server.messages import FOLLOWER, dispatch, role
from comfy_nodes.server.node_runtime import ServerRuntime
from comfy_nodes.server.panel import Panel
from comfy_nodes.server.peers import Peers
from comfy_nodes.server.seal import Envelope, Seal
from comfy_nodes.server.settings import CONTROL_PORT_ENV, Settings

if TYPE_CHECKING:
    from collectives import Communicator

log = logging.getLogger("comfy_cluster")

COLLECTIVE_CLASSES = frozenset(
    name
    for name, cls in NODE_CLASS_MAPPINGS.items()
    if issubclass(cls, _ClusterNode) and name != prompts.SYNC_CLASS
)


@functools.cache
def weighted_classes() -> frozenset[str]:
    """The pack's nodes with a ``weights`` input (asked once, when a prompt first needs it: some
    nodes' INPUT_TYPES list ComfyUI's folders)."""
    return frozenset(
        name
        for name, cls in NODE_CLASS_MAPPINGS.items()
        if "weights" in cls.INPUT_TYPES().get("optional", {})
    )


_installed: Membership | None = None
_panel: Panel | None = None


def install(server: Any) -> Membership | None:
    """Wire the cluster into a running ComfyUI ``PromptServer``; idempotent."""
    global _installed, _panel
    if _installed is not None:
        return _installed
    settings = Settings.from_env()
    _register_routes(server, settings)
    if settings is None:
        return None  # a single instance: cluster nodes are identities, nothing to wire
    from comfy.cli_args import args  # type: ignore[import-not-found,unused-ignore]

    # The browser routes are served wherever ComfyUI listens, not only on the advertised host.
    settings.check_listen(args.listen)
    _init_mpi_early(settings.backend)
    control: Address = (settings.advertise_host, settings.control_port or int(args.port))
    fingerprint = settings.key.fingerprint() if settings.key is not None else None
    book = {0: settings.leader_control} if settings.leader_control is not None else {}
    if settings.stun_mailbox and not book and not settings.is_leader:
        book = {0: MAILBOX_ADDRESS}  # no leader address: its mailbox still reaches it
    peers = Peers(settings.rank, book, fingerprint=fingerprint)
    membership = Membership(
        settings, f"http://{settings.advertise_host}:{args.port}", peers, control
    )
    _installed = membership
    _panel = panel = Panel(server, membership)
    _observe_progress(server, panel)
    import comfy.utils  # type: ignore[import-not-found,unused-ignore]

    handoffs = None if settings.is_leader else Handoffs(settings.rank)
    runtime = ServerRuntime(
        membership,
        progress_bar=comfy.utils.ProgressBar,
        interrupted=_interrupt_pressed,
        queue=(lambda prompt: _queue_on_leader(server, prompt)) if settings.is_leader else None,
        deliver=(lambda pid, p: _deliver(membership, pid, p)) if settings.is_leader else None,
        handoffs=handoffs,
    )
    cluster.install(runtime)
    _propagate_interrupts(membership, runtime)
    if settings.is_leader:
        server.add_on_prompt_handler(_on_prompt)
    else:
        assert handoffs is not None
        membership.on_ready(
            lambda comm, epoch: _start_follower(server, membership, handoffs, comm, epoch)
        )

    def on_request(envelope: Envelope, source: Address) -> dict[str, Any]:
        reply = dispatch(membership, panel, envelope.sender, envelope.kind, envelope.body)
        # A follower's authentic, accepted message says where its endpoint is (a restarted one
        # included).  Not a refused one: that proves nothing about where the follower is.
        sender = envelope.sender
        # One through the mailbox says only that the follower is reachable there: it never
        # replaces a known UDP endpoint.
        mailbox_only = source == MAILBOX_ADDRESS and peers.address(sender) is not None
        if reply.get("ok") and settings.is_leader and role(sender) == FOLLOWER and not mailbox_only:
            peers.learn(sender, source)
        return reply

    async def join_on_startup(app: Any) -> None:
        bind = (_bind_host(settings.advertise_host, args.listen), control[1])
        seal = Seal(settings.key)  # one seal: a nonce opened on one path is a replay on the other
        udp = UdpCarrier(settings.rank, bind, seal, on_request, port_env=CONTROL_PORT_ENV)
        peers.carrier = udp
        if settings.stun_mailbox:
            peers.carrier = with_mailbox(udp, settings.rank, seal, on_request, key=settings.key)
        membership.start()
        panel.start()

    server.app.on_startup.append(join_on_startup)
    return membership


# -- leader ---------------------------------------------------------------------------------------
def _on_prompt(json_data: dict[str, Any]) -> dict[str, Any]:
    prompt = json_data.get("prompt")
    if not prompts.is_cluster_prompt(prompt, NODE_CLASS_MAPPINGS):
        return json_data
    return _prepared(json_data)


def _init_mpi_early(backend: str | None) -> None:
    """Under mpirun, initialise MPI now, on the main thread, before the server runs.

    ``MPI_Init`` waits for every rank of the job and mpi4py holds the GIL meanwhile: done later,
    on the join thread, it would freeze this server's event loop while a follower that asks the
    leader's HTTP server for the current epoch before joining never gets an answer (deadlock).
    Every rank loads this node pack at start-up, so here they all meet at once.
    """
    from collectives.rendezvous.env import detect_mpi_launcher

    if backend not in (None, "mpi") or not detect_mpi_launcher():
        return
    try:
        from mpi4py import MPI
    except ImportError:
        return  # no mpi4py: the backend chosen later says so
    log.info("MPI initialised (thread level %s) before the server starts", MPI.Query_thread())


def _prepared(json_data: dict[str, Any]) -> dict[str, Any]:
    prompt_id = str(json_data.get("prompt_id") or uuid.uuid4())
    cp = prompts.prepare(json_data["prompt"], COLLECTIVE_CLASSES, prompt_id)
    extra = json_data.get("extra_data")
    weights = extra.get("cluster_weights") if isinstance(extra, dict) else None
    prompt = with_weights(cp.prompt, weights) if isinstance(weights, str) else cp.prompt
    return {**json_data, "prompt": prompt, "prompt_id": prompt_id}


def with_weights(prompt: dict[str, Any], weights: str) -> dict[str, Any]:
    """``prompt`` with ``weights`` in every ``weights`` input left empty (the prompt is already
    a copy: prompts.prepare).  Invalid weights are written too: the node that reads them fails
    with its own message, on every rank alike (POST /cluster/queue refuses them up front)."""
    if not weights.strip():
        return prompt
    for node in prompt.values():
        if isinstance(node, dict) and node.get("class_type") in weighted_classes():
            inputs = node.setdefault("inputs", {})
            if not str(inputs.get("weights") or "").strip():
                inputs["weights"] = weights.strip()
    return prompt


def _deliver(membership: Membership, prompt_id: str, prompt: dict[str, Any]) -> Communicator:
    from collectives import CollectivesError

    comm = membership.wait_ready()
    extra = {"leader_prompt_id": prompt_id}
    try:
        hand_over(
            comm,
            Delivery(prompt_id, prompt, prompts.TAIL_ID, extra),
            timeout=membership.settings.op_timeout,
        )
    except CollectivesError as err:  # a follower is gone: this world is over (a refusal is not)
        membership.fail(f"handing prompt {prompt_id} over: {type(err).__name__}: {err}")
        raise
    return comm


def _queue_on_leader(server: Any, prompt: dict[str, Any]) -> str:
    """Queue a prompt on the leader as POST /prompt would (nodes that queue workflows use it)."""
    data = _prepared({"prompt": prompts.strip(prompt)})
    future = asyncio.run_coroutine_threadsafe(_validate_and_queue(server, data), server.loop)
    result = future.result(timeout=60)
    if "error" in result:
        raise RuntimeError(f"the cluster refused the workflow: {result['error']}")
    return str(result["prompt_id"])


async def _validate_and_queue(server: Any, data: dict[str, Any]) -> dict[str, Any]:
    import execution  # type: ignore[import-not-found,unused-ignore]

    prompt_id = data["prompt_id"]
    valid = await execution.validate_prompt(prompt_id, data["prompt"], None)
    if not valid[0]:
        return {"error": valid[1], "node_errors": valid[3]}
    number = server.number
    server.number += 1
    extra = dict(data.get("extra_data") or {})
    if "client_id" in data:
        extra["client_id"] = data["client_id"]
    extra["create_time"] = int(time.time() * 1000)
    server.prompt_queue.put((number, prompt_id, data["prompt"], extra, valid[2], {}))
    return {"prompt_id": prompt_id, "number": number, "node_errors": valid[3]}


# -- follower -------------------------------------------------------------------------------------
def _start_follower(
    server: Any, membership: Membership, handoffs: Handoffs, comm: Communicator, epoch: int
) -> None:
    thread = threading.Thread(
        target=_follower_loop,
        args=(server, membership, handoffs, comm, epoch),
        name=f"cluster-control-e{epoch}",
        daemon=True,
    )
    thread.start()


def _follower_loop(
    server: Any, membership: Membership, handoffs: Handoffs, comm: Communicator, epoch: int
) -> None:
    last: str | None = None
    # This thread validates each handed-over prompt on a loop of its own: the hand-over waits for
    # every follower's verdict, and a hop to the server's loop thread and back costs a few ms
    # where ranks share cores.  ComfyUI's validation needs no particular loop (its executor
    # runs nodes on a loop of its own, in the prompt worker thread).
    loop = asyncio.new_event_loop()
    try:
        while membership.epoch == epoch:
            if last is not None:
                # The next hand-over is a collective: this rank may only join it once its
                # executor is past the previous prompt's collectives, or the two would interleave.
                ended = functools.partial(_ended, server, membership, epoch, last)
                handoffs.wait_finished(last, ended)
            try:
                got = take_over(
                    comm,
                    lambda d: _validate(loop, d),
                    lambda d, ticket: _enqueue(server, handoffs, comm, d, ticket),
                    idle_timeout=membership.settings.idle_timeout,
                    timeout=membership.settings.op_timeout,
                )
            except Exception as err:
                if membership.epoch == epoch:
                    membership.fail(f"control channel: {type(err).__name__}: {err}")
                return
            if got is not None:
                last = got.prompt_id
    finally:
        loop.close()


def _ended(server: Any, membership: Membership, epoch: int, prompt_id: str) -> bool:
    """The prompt's history is written (it failed before its tail), or the world is gone."""
    return membership.epoch != epoch or bool(server.prompt_queue.get_history(prompt_id=prompt_id))


VALIDATE_TIMEOUT_S = 120.0


def _validate(loop: asyncio.AbstractEventLoop, delivery: Delivery) -> tuple[Verdict, Any]:
    import execution  # type: ignore[import-not-found,unused-ignore]

    coro = execution.validate_prompt(delivery.prompt_id, delivery.prompt, [delivery.tail_id])
    valid = loop.run_until_complete(asyncio.wait_for(coro, VALIDATE_TIMEOUT_S))
    if not valid[0]:
        error = valid[1]
        text = error.get("message", str(error)) if isinstance(error, dict) else str(error)
        return Verdict(False, text, valid[3]), None
    return Verdict(True), valid[2]


def _enqueue(
    server: Any, handoffs: Handoffs, comm: Communicator, delivery: Delivery, outputs: Any
) -> None:
    handoffs.handed(delivery.prompt_id, comm)  # before the executor can reach its head
    number = server.number
    server.number += 1
    extra = {"create_time": int(time.time() * 1000), **delivery.extra}
    server.prompt_queue.put((number, delivery.prompt_id, delivery.prompt, extra, outputs, {}))


# -- interrupts -----------------------------------------------------------------------------------
def _interrupt_pressed() -> bool:
    import comfy.model_management as mm  # type: ignore[import-not-found,unused-ignore]

    return bool(mm.processing_interrupted())


def _bind_host(advertised: str, comfy_listen: str | None) -> str:
    """Where the control endpoint listens: only on an address the user gave.
    ``COMFY_CLUSTER_LISTEN_ADDRESS`` when set (as for the udp backend); else the advertised host
    when it is one of this machine's addresses; else the first address ComfyUI was told to
    ``--listen`` on (an advertised host behind a NAT or a proxy is not bindable here)."""
    import os
    import socket

    from collectives.backends.udp_peers import LISTEN_ENV

    explicit = os.environ.get(LISTEN_ENV, "").strip()
    if explicit:
        return explicit
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind((advertised, 0))
        return advertised
    except OSError:
        pass
    first = (comfy_listen or "").split(",")[0].strip()
    return first or "127.0.0.1"


def _propagate_interrupts(membership: Membership, runtime: ServerRuntime) -> None:
    # ComfyUI's interrupt (the UI button, POST /interrupt) only sets a flag that this rank's
    # executor checks between nodes; the other ranks would sit in their collective until the
    # timeout.  So while a cluster prompt runs, an interrupt here aborts the world everywhere.
    import nodes as comfy_nodes_module  # type: ignore[import-not-found,unused-ignore]

    original = comfy_nodes_module.interrupt_processing

    def interrupt_processing(value: bool = True) -> None:
        original(value)
        if value and runtime.current_prompt is not None:
            membership.abort_everywhere(f"interrupted on rank {membership.settings.rank}")

    comfy_nodes_module.interrupt_processing = interrupt_processing

    # A node failing on one rank (a sampler error, a missing file) leaves the others waiting in
    # their next collective; tell them now, naming the rank and the node.
    import execution  # type: ignore[import-not-found,unused-ignore]

    executor_class = execution.PromptExecutor
    original_error = executor_class.handle_execution_error

    def handle_execution_error(  # noqa: PLR0917  (ComfyUI's signature)
        self: Any, prompt_id: Any, prompt: Any, current: Any, executed: Any, error: Any, ex: Any
    ) -> Any:
        if runtime.current_prompt is not None and runtime.current_prompt == prompt_id:
            runtime.current_prompt = None
            node = error.get("node_id") if isinstance(error, dict) else None
            kind = prompt.get(node, {}).get("class_type", "?") if isinstance(prompt, dict) else "?"
            why = error.get("exception_message", "") if isinstance(error, dict) else str(error)
            # With the prompt's communicator: if the cluster has moved to a new world since,
            # only the old one is aborted.
            membership.abort_everywhere(
                f"rank {membership.settings.rank} failed at node {node} ({kind}): {why.strip()}",
                runtime.peek(),
            )
        # A failed prompt never reaches its tail: forget it here, with what it left running.
        runtime.end_prompt()
        return original_error(self, prompt_id, prompt, current, executed, error, ex)

    executor_class.handle_execution_error = handle_execution_error


# -- the panel ------------------------------------------------------------------------------------
def _observe_progress(server: Any, panel: Panel) -> None:
    # ComfyUI reports a prompt's progress only as websocket events: the panel reads them on
    # their way out, so that the leader can show every rank's progress.
    original = server.send_sync

    def send_sync(event: Any, data: Any, sid: Any = None) -> Any:
        panel.progress.observe(str(event), data)
        return original(event, data, sid)

    server.send_sync = send_sync


# -- routes ---------------------------------------------------------------------------------------
def _register_routes(server: Any, settings: Settings | None) -> None:
    from aiohttp import web

    routes: Any = server.routes  # aiohttp's RouteTableDef: its decorators are untyped

    async def status(request: Any) -> Any:
        if _installed is None:
            return web.json_response({"rank": 0, "size": 1, "state": "single", "epoch": 0})
        return web.json_response(_installed.status())

    async def queue(request: Any) -> Any:
        try:
            data = await request.json()
        except ValueError:
            data = None
        if not isinstance(data, dict) or not isinstance(data.get("prompt"), dict):
            return web.json_response({"error": "body must be ComfyUI's /prompt body"}, status=400)
        if settings is not None and not settings.is_leader:
            return web.json_response(
                {"error": f"rank {settings.rank} is a follower: queue on the leader"}, status=400
            )
        try:
            extra = data.get("extra_data")
            weights = extra.get("cluster_weights") if isinstance(extra, dict) else None
            if weights is not None and settings is not None:
                if not isinstance(weights, str):
                    raise TypeError("extra_data.cluster_weights must be a string like '3,1'")
                if weights.strip():
                    parse_weights(weights, settings.size)
            prepared = _prepared(data) if prompts.HEAD_ID not in data["prompt"] else data
        except (ValueError, TypeError, KeyError) as err:
            return web.json_response({"error": f"{type(err).__name__}: {err}"}, status=400)
        result = await _validate_and_queue(server, prepared)
        return web.json_response(result, status=400 if "error" in result else 200)

    async def panel_view(request: Any) -> Any:
        if _panel is None:
            return web.json_response({"rank": 0, "size": 1, "is_leader": True, "rows": []})
        view = await asyncio.get_running_loop().run_in_executor(None, _panel.snapshot)
        return web.json_response(view)

    def everywhere(action: str) -> Any:
        async def handler(request: Any) -> Any:
            if _panel is None:
                return web.json_response({"error": "this ComfyUI is not a cluster"}, status=400)
            if not _panel.settings.is_leader:
                rank = _panel.settings.rank
                return web.json_response(
                    {"error": f"rank {rank} is a follower: use the leader's panel"}, status=400
                )
            done = await asyncio.get_running_loop().run_in_executor(None, _panel.everywhere, action)
            return web.json_response(done)

        return handler

    routes.get("/cluster/status")(status)
    routes.post("/cluster/queue")(queue)
    routes.get("/cluster/panel")(panel_view)
    routes.post("/cluster/interrupt")(everywhere("interrupt"))
    routes.post("/cluster/free")(everywhere("free"))
