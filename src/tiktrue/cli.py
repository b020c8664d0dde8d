"""The ``tiktrue`` command line (Typer)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from pathlib import Path

import typer

from tiktrue import __version__, limits

app = typer.Typer(
    help="TikTrue: one language model across the PCs of your LAN.", no_args_is_help=True
)
models_app = typer.Typer(
    help="Import, list, show and verify model block stores.", no_args_is_help=True
)
app.add_typer(models_app, name="models")
network_app = typer.Typer(
    help="Create, join, plan and apply networks of PCs.", no_args_is_help=True
)
app.add_typer(network_app, name="network")
users_app = typer.Typer(
    help="Accounts of the people who use this node's gateway (the first one is admin).",
    no_args_is_help=True,
)
app.add_typer(users_app, name="users")
keys_app = typer.Typer(
    help="API keys for the OpenAI API and /ws (shown once, stored hashed).", no_args_is_help=True
)
app.add_typer(keys_app, name="keys")
gateway_app = typer.Typer(help="Who may use this node's gateway.", no_args_is_help=True)
app.add_typer(gateway_app, name="gateway")


def err(message: str) -> None:
    typer.echo(message, err=True)


def fail(message: str, code: int = 1) -> None:
    err(f"error: {message}")
    raise typer.Exit(code)


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", help="Print the version and exit."),
) -> None:
    if version:
        typer.echo(__version__)
        raise typer.Exit()


# --- models ---------------------------------------------------------------------------------


@models_app.command("import")
def models_import(
    path: Path = typer.Argument(..., help="A Hugging Face model folder or a .gguf file."),
    model_id: str = typer.Option(..., "--id", help="Name of the model in TikTrue."),
    dtype: str = typer.Option(
        None,
        help="Weight format: fp32, fp16, bf16, int8 or int4 (default: a Hugging Face folder's "
        "own float dtype; a GGUF's quantized weights kept: Q4_0/Q4_1 as int4, Q8_0 as int8).",
    ),
    force: bool = typer.Option(False, "--force", help="Replace a model with the same id."),
) -> None:
    """Split a model into blocks (embed, layer_i, head) with a verified manifest."""
    from tiktrue.model.errors import ModelError
    from tiktrue.model.importer import import_model
    from tiktrue.paths import models_dir

    try:
        store = import_model(path, model_id, models_dir(), dtype=dtype, overwrite=force)
    except ModelError as exc:
        fail(str(exc))
    m = store.manifest
    weights = store.weight_format
    if weights != m.dtype:
        weights = f"{weights} weights, {m.dtype} activations"
    typer.echo(
        f"imported {m.model_id}: {m.architecture}, {m.num_layers} layers, {weights}, "
        f"{len(m.blocks)} blocks, {m.total_bytes / 1e6:.1f} MB -> {store.root}"
    )


@models_app.command("list")
def models_list() -> None:
    """The models in this node's block store."""
    from tiktrue.model.store import list_stores
    from tiktrue.paths import models_dir

    found = list_stores(models_dir())
    if not found:
        typer.echo(
            f"no models in {models_dir()} (add one with: tiktrue models import PATH --id ID)"
        )
    for item in found:
        if isinstance(item, Exception):
            typer.echo(f"(broken) {item}")
            continue
        m = item.manifest
        typer.echo(
            f"{m.model_id:<24} {m.architecture:<8} {m.num_layers:>3} layers  "
            f"{item.weight_format:<9} "
            f"{m.total_bytes / 1e6:>9.1f} MB  {m.total_parameters / 1e6:>8.1f} M params"
        )


def _open_store(model_id: str):
    from tiktrue.model.errors import StoreError
    from tiktrue.model.store import BlockStore
    from tiktrue.paths import data_dir, models_dir
    from tiktrue.security.node_tls import block_keyring

    try:  # with this node's block keys: a worker's blocks may be sealed at rest
        return BlockStore(models_dir() / model_id, keyring=block_keyring(data_dir()))
    except StoreError as exc:
        fail(str(exc))


@models_app.command("download")
def models_download(
    model_id: str,
    source: str = typer.Option(..., "--from", help="Model repository URL, e.g. http://pc:8765"),
) -> None:
    """Download a model from a model repository (resumable, every chunk verified)."""
    from tiktrue.control.model_downloader import download_model_blocks
    from tiktrue.model.errors import ModelError
    from tiktrue.paths import models_dir
    from tiktrue.ui.progress import progress_printer

    progress = progress_printer(
        err,
        lambda p: f"  {p.done_bytes / 1e6:8.1f} / {p.total_bytes / 1e6:.1f} MB  {p.file}",
        steps=20,
    )

    try:
        store = download_model_blocks(
            model_id, source, dest_root=models_dir(), progress_callback=progress
        )
    except ModelError as exc:
        fail(str(exc))
    typer.echo(f"downloaded {model_id}: {store.manifest.total_bytes / 1e6:.1f} MB verified")


@models_app.command("show")
def models_show(
    model_id: str,
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
) -> None:
    """A model's manifest: architecture, dtype and every block."""
    store = _open_store(model_id)
    m = store.manifest
    if as_json:
        typer.echo(json.dumps(m.model_dump(), indent=2))
        return
    typer.echo(f"model      {m.model_id}\narchitecture {m.architecture}\ndtype      {m.dtype}")
    typer.echo(f"weights    {store.weight_format}")
    typer.echo(f"layers     {m.num_layers} (hidden {m.hidden_size}, vocab {m.vocab_size})")
    typer.echo(f"size       {m.total_bytes / 1e6:.1f} MB, {m.total_parameters / 1e6:.1f} M params")
    typer.echo(f"tokenizer  {'yes' if m.has_tokenizer else 'no'}\nsource     {m.source}")
    typer.echo(f"{'block':<10} {'MB':>9} {'params':>11} {'format':<9}  sha256")
    for name in m.model_chain_order:
        b = m.blocks[name]
        fmt = b.format or m.dtype
        typer.echo(f"{name:<10} {b.bytes / 1e6:>9.2f} {b.parameters:>11} {fmt:<9}  {b.sha256[:16]}")


@models_app.command("verify")
def models_verify(model_id: str) -> None:
    """Re-hash every block this PC holds (sealed ones opened with the network's key); name
    each one that does not match the manifest, and why."""
    store = _open_store(model_id)
    order = store.manifest.model_chain_order
    held = [name for name in order if store.has_block(name)]
    problems = {name: problem for name in held if (problem := store.check_block(name))}
    for name, problem in problems.items():
        err(f"{name}: {problem}")
    if problems:
        fail(f"{len(problems)} corrupted block(s) in {model_id}: {', '.join(problems)}")
    absent = f" ({len(order) - len(held)} more not on this PC)" if len(held) < len(order) else ""
    typer.echo(f"{model_id}: all {len(held)} blocks verified{absent}")


@models_app.command("serve")
def models_serve(
    directory: Path = typer.Argument(
        ..., help="A models directory (e.g. <data>/models) or one block store."
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (LAN: 0.0.0.0)."),
    port: int = typer.Option(8765, "--port"),
) -> None:
    """Serve block stores over HTTP (with Range) as a model repository for downloads."""
    from tiktrue.control.model_repository import list_repository_models, serve_repository
    from tiktrue.model.errors import StoreError

    if not directory.is_dir():
        fail(f"{directory} is not a directory")
    models = list_repository_models(directory)
    typer.echo(f"model repository: http://{host}:{port}/ (models: {', '.join(models) or 'none'})")
    sys.stdout.flush()
    try:
        serve_repository(directory, host, port)
    except StoreError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        pass


# --- generation ------------------------------------------------------------------------------


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="The question, or raw text with --raw."),
    model: str = typer.Option(..., "--model", "-m", help="Model id (see: tiktrue models list)."),
    raw: bool = typer.Option(
        False, "--raw", help="Continue the text as is, without chat template."
    ),
    max_tokens: int = typer.Option(limits.DEFAULT_MAX_TOKENS, "--max-tokens"),
    temperature: float = typer.Option(
        limits.DEFAULT_TEMPERATURE, "--temperature", help="0 = greedy."
    ),
    top_k: int = typer.Option(0, "--top-k"),
    top_p: float = typer.Option(1.0, "--top-p"),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty"),
    seed: int = typer.Option(None, "--seed"),
    stop: list[str] = typer.Option([], "--stop", help="Stop before this text (repeatable)."),
    spans: int = typer.Option(3, "--spans", help="Split the model into this many spans."),
    threads: int = typer.Option(None, "--threads", help="CPU threads (default: all cores)."),
    stats: bool = typer.Option(
        False, "--stats", help="Print prompt and decode speed and time to first token (stderr)."
    ),
) -> None:
    """Stream an answer through a chain of spans in this process; only the text goes to stdout."""
    from pydantic import ValidationError

    from tiktrue.model.errors import ModelError
    from tiktrue.model.sampling import SamplingParams

    try:
        params = SamplingParams(
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
            seed=seed,
            stop=stop,
            max_tokens=max_tokens,
        )
    except ValidationError as exc:
        fail(f"bad generation settings: {exc.errors()[0]['loc'][0]}: {exc.errors()[0]['msg']}")
    try:
        _stream_local(
            _open_store(model), prompt, params, raw=raw, spans=spans, threads=threads, stats=stats
        )
    except ModelError as exc:
        fail(str(exc))


def _stream_local(store, prompt, params, *, raw=False, spans=3, threads=None, stats=False) -> None:
    import torch

    from tiktrue.model.engine import BlockEngine, split_evenly
    from tiktrue.model.generation import GenerationResult, LocalChain, stream_tokens
    from tiktrue.model.tokenizer import load_tokenizer, prompt_ids, stop_token_ids

    if threads:
        torch.set_num_threads(threads)
    began = time.perf_counter()
    tokenizer = load_tokenizer(store)
    chain = LocalChain(
        [BlockEngine(store, s) for s in split_evenly(store.manifest.model_chain_order, spans)]
    )
    load_seconds = time.perf_counter() - began
    ids = prompt_ids(tokenizer, prompt, raw=raw)
    result = GenerationResult()
    chain.open("cli")

    async def run() -> None:
        async for event in stream_tokens(
            chain,
            ids,
            params,
            tokenizer=tokenizer,
            stop_ids=stop_token_ids(store, tokenizer),
            session_id="cli",
            result=result,
        ):
            sys.stdout.write(event.text)
            sys.stdout.flush()

    asyncio.run(run())
    sys.stdout.write("\n")
    sys.stdout.flush()
    err(
        f"[{len(result.token_ids)} tokens, {result.finish_reason}; first token "
        f"{result.time_to_first_token * 1000:.0f} ms, {result.decode_tokens_per_second:.1f} tok/s]"
    )
    if stats:
        for line in result.timings(load_seconds):
            err(line)


# --- networks ------------------------------------------------------------------------------


def _run(coro):
    """Run a control-plane coroutine; its refusals become clear one-line errors."""
    from tiktrue.control.network_admin import REFUSALS

    try:
        return asyncio.run(coro)
    except REFUSALS as exc:
        fail(str(exc))


def _local_service() -> dict:
    from tiktrue.paths import data_dir, run_file

    path = run_file(data_dir())
    if not path.is_file():
        fail("the node service is not running from this data dir; start it with: tiktrue node")
    return json.loads(path.read_text("utf-8"))


@network_app.command("create")
def network_create(
    name: str,
    model: str = typer.Option(..., "--model", "-m", help="A model in this node's store."),
    host: str = typer.Option(None, "--host", help="This PC's LAN address (default: the node's)."),
    port: int = typer.Option(None, "--port", help="Block server port (default: any free)."),
    network_id: str = typer.Option(None, "--id", help="Network id (default: generated)."),
    manual_plan: bool = typer.Option(
        False, "--manual-plan", help="Do not re-plan by itself when PCs join (use apply)."
    ),
    backups: int = typer.Option(
        0,
        "--backups",
        min=0,
        max=16,
        help="PCs the planner holds back as backups, each with a replica of spans it can "
        "take over at once when a PC is lost (when the others can hold the model).",
    ),
    encrypt_at_rest: bool = typer.Option(
        False,
        "--encrypt-at-rest",
        help="Workers keep their blocks encrypted on disk (AES-256-GCM, the network's key).",
    ),
) -> None:
    """Create a network administered by this node (it holds the model and serves all of it)."""
    from tiktrue.control.network_admin import poke_local_service
    from tiktrue.control.network_manager import create_network
    from tiktrue.node.resources import free_ports
    from tiktrue.paths import data_dir

    service = _local_service()
    host = host or service["control"].rsplit(":", 1)[0]
    control_port = int(service["control"].rsplit(":", 1)[1])
    config = create_network(
        data_dir(),
        name,
        _open_store(model),
        host=host,
        port=port or free_ports(1, host)[0],
        control_port=control_port,
        network_id=network_id,
        auto_plan=not manual_plan,
        backup_nodes=backups,
        encrypt_at_rest=encrypt_at_rest,
    )
    _run(poke_local_service(data_dir()))
    typer.echo(f"created network {config.network_id} ({name}) serving {config.model_id}")
    typer.echo(f"invite a PC: tiktrue network token {config.network_id}")


@network_app.command("discover")
def network_discover(
    timeout: float = typer.Option(3.0, "--timeout", help="Seconds to listen."),
    manual: list[str] = typer.Option(
        [], "--manual", help="host:port of a node's control channel (LANs without multicast)."
    ),
    interface: list[str] = typer.Option([], "--interface", help="Listen on this address only."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """The TikTrue nodes on the LAN and the networks they serve."""
    from tiktrue.control.discovery import discover_networks, summarize_networks
    from tiktrue.control.network_admin import probe_announcement

    nodes = discover_networks(
        timeout, interfaces=interface or None, manual=manual, probe=probe_announcement
    )
    if as_json:
        typer.echo(json.dumps([n.model_dump() for n in nodes], indent=2))
        return
    if not nodes:
        typer.echo("no TikTrue node found (is multicast blocked? try --manual host:port)")
    for node in nodes:
        networks = ", ".join(f"{i} ({n.role})" for i, n in node.networks.items()) or "no network"
        typer.echo(f"{node.node_id}  {node.name:<20} {node.host}:{node.control_port}  {networks}")
    for network in summarize_networks(nodes):
        count = len(network.nodes)
        typer.echo(
            f"network {network.network_id}: {network.name}, {count} node{'s' * (count != 1)}"
        )


@network_app.command("caps")
def network_caps(
    network_id: str,
    node_id: str,
    ram_gb: float = typer.Option(None, "--ram-gb", help="RAM for blocks and KV cache."),
    threads: int = typer.Option(None, "--threads", help="CPU threads for compute."),
    disk_gb: float = typer.Option(None, "--disk-gb", help="Disk for stored blocks."),
) -> None:
    """Cap what one node gives to the network (the node enforces it)."""
    from tiktrue.control.network_admin import set_caps
    from tiktrue.paths import data_dir

    caps = {
        "ram_bytes": int(ram_gb * 1e9) if ram_gb else None,
        "threads": threads,
        "disk_bytes": int(disk_gb * 1e9) if disk_gb else None,
    }
    typer.echo(json.dumps(_run(set_caps(data_dir(), network_id, node_id, caps))))


@network_app.command("token")
def network_token(
    network_id: str, hours: float = typer.Option(24, "--hours", help="Valid for this long.")
) -> None:
    """A one-time join token for one more PC."""
    from tiktrue.control.network_manager import JoinError, create_join_token
    from tiktrue.paths import data_dir

    try:
        token = create_join_token(data_dir(), network_id, ttl=hours * 3600)
    except JoinError as exc:
        fail(str(exc))
    service = _local_service()
    typer.echo(token)
    err(f"on the other PC: tiktrue network join {service['control']} --token {token}")


@network_app.command("join")
def network_join(
    admin: str = typer.Argument(..., help="The admin node's control address, host:port."),
    token: str = typer.Option(None, "--token", help="A join token (else: wait for approval)."),
    network_id: str = typer.Option(None, "--network", help="Network id (with approval)."),
    admin_node: str = typer.Option(None, "--admin-node", help="Admin node id (with approval)."),
    block_port: int = typer.Option(None, "--block-port", help="Block server port."),
    wait: float = typer.Option(600, "--wait", help="Seconds to wait for approval."),
) -> None:
    """Join a network: by token at once, or ask the admin and wait for approval."""
    from tiktrue.control.join import join_network
    from tiktrue.paths import data_dir

    service = _local_service()
    config = _run(
        join_network(
            data_dir(),
            admin,
            token=token,
            network_id=network_id,
            admin_node_id=admin_node,
            service=service,
            block_port=block_port,
            wait=wait,
            log=err,
        )
    )
    typer.echo(f"joined network {config.network_id} ({config.name}), model {config.model_id}")


@network_app.command("pending")
def network_pending(network_id: str) -> None:
    """Join requests waiting for approval."""
    from tiktrue.control.network_manager import list_join_requests
    from tiktrue.paths import data_dir

    for request_id, item in list_join_requests(data_dir(), network_id).items():
        request = item["request"]
        typer.echo(
            f"{request_id}  {item['state']:<9} node {item['node_id']} "
            f"{request.get('name', '')} {request.get('host')}"
        )


@network_app.command("approve")
def network_approve(
    network_id: str, request_id: str, reject: bool = typer.Option(False, "--reject")
) -> None:
    """Approve (or reject) a join request."""
    from tiktrue.control.network_manager import JoinError, approve_join_request
    from tiktrue.paths import data_dir

    try:
        approve_join_request(data_dir(), network_id, request_id, approve=not reject)
    except JoinError as exc:
        fail(str(exc))
    typer.echo(f"{'rejected' if reject else 'approved'} {request_id}")


@network_app.command("list")
def network_list() -> None:
    """The networks this node belongs to."""
    from tiktrue.control.network_manager import list_joined_networks
    from tiktrue.paths import data_dir
    from tiktrue.security.node_tls import node_identity

    me = node_identity(data_dir()).node_id
    configs = list_joined_networks(data_dir())
    if not configs:
        typer.echo("this node is in no network yet (tiktrue network create | join)")
    for config in configs:
        entry = config.node(me)
        span = f"{entry.blocks[0]}..{entry.blocks[-1]}" if entry.blocks else "no blocks"
        typer.echo(
            f"{config.network_id:<16} {config.name:<20} {config.model_id:<16} {entry.role:<7} "
            f"{span} (v{config.version}, {len(config.nodes)} nodes)"
        )


@network_app.command("status")
def network_status_cmd(
    network_id: str = typer.Argument(None, help="Default: the only network of this node."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Every node of the network: address, role, state, health (online/suspect/dead, from the
    running admin's heartbeats), last beat, heartbeat RTT, blocks, resources, RSS."""
    from tiktrue.control.network_admin import network_status
    from tiktrue.paths import data_dir

    status = _run(network_status(data_dir(), _one_network(network_id)))
    if as_json:
        typer.echo(json.dumps(status, indent=2))
        return
    typer.echo(
        f"{status['network_id']} {status['name']}: {status['model_id']}, v{status['version']}"
    )
    for node in status["nodes"]:
        span = f"{node['blocks'][0]}..{node['blocks'][-1]}" if node["blocks"] else "-"
        res = node.get("resources") or {}
        ram = (
            f"{res.get('ram_free_bytes', 0) / 1e9:.1f}/{res.get('ram_total_bytes', 0) / 1e9:.1f} GB"
        )
        rss = f"{(node.get('rss_bytes') or 0) / 1e6:.0f} MB"
        typer.echo(
            f"  {node['node_id']} {node['role']:<6} {node['address']:<21} {node['state']:<8} "
            f"{_beat_text(node):<30} {span:<20} cores {res.get('cpu_cores_logical', '?')} "
            f"RAM free {ram} RSS {rss}"
        )
    if not status.get("monitored"):
        typer.echo("  (the admin's monitor did not answer: states from a direct probe)")


def _beat_text(node: dict) -> str:
    """``online, beat 0.4 s ago, RTT 1.2 ms``: the admin's heartbeat view of one node."""
    parts = [node.get("health") or "unknown"]
    if node.get("last_beat_s") is not None:
        parts.append(f"beat {node['last_beat_s']:.1f} s ago")
    if node.get("rtt_ms") is not None:
        parts.append(f"RTT {node['rtt_ms']:.1f} ms")
    return ", ".join(parts)


@network_app.command("events")
def network_events_cmd(
    network_id: str = typer.Argument(None, help="Default: every network of this node."),
    limit: int = typer.Option(50, "--limit", min=1, help="How many of the latest events."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per line."),
) -> None:
    """The event log (<data>/logs/events.jsonl): nodes suspected, dead, back online."""
    from tiktrue.monitoring.monitoring_system import events_path, recent_events
    from tiktrue.paths import data_dir

    for event in recent_events(events_path(data_dir()), limit, network_id):
        if as_json:
            typer.echo(json.dumps(event))
            continue
        known = {"ts", "time", "event", "level", "network_id", "node_id"}
        details = " ".join(f"{k}={v}" for k, v in event.items() if k not in known)
        typer.echo(
            f"{event.get('ts', '?')} {event.get('level', '?'):<7} {event.get('network_id') or '-'} "
            f"{event.get('node_id') or '-'} {event.get('event', '?')} {details}"
        )


def _one_network(network_id: str | None) -> str:
    from tiktrue.control.network_manager import list_joined_networks
    from tiktrue.paths import data_dir

    if network_id:
        return network_id
    configs = list_joined_networks(data_dir())
    if len(configs) != 1:
        fail("name the network (this node is in " + str(len(configs)) + " networks)")
    return configs[0].network_id


def _overrides(items: list[str]) -> dict[str, int] | None:
    out = {}
    for item in items:
        node_id, _, count = item.partition("=")
        if not count.isdigit():
            fail(f"--override takes NODE=BLOCKS, got {item!r}")
        out[node_id] = int(count)
    return out or None


@network_app.command("plan")
def network_plan(
    network_id: str = typer.Argument(None),
    override: list[str] = typer.Option([], "--override", help="NODE=BLOCKS (repeatable)."),
    context: int = typer.Option(
        None,
        "--context",
        min=limits.MIN_CONTEXT_TOKENS,
        max=limits.MAX_CONTEXT_TOKENS,
        help="Tokens of KV cache every node reserves: the network's context length "
        f"(default: the network's, {limits.DEFAULT_CONTEXT_TOKENS} when new).",
    ),
) -> None:
    """Measure every node and show the best split of the model (changes nothing)."""
    from tiktrue.control.network_admin import make_plan
    from tiktrue.paths import data_dir

    plan, _ = _run(
        make_plan(
            data_dir(),
            _one_network(network_id),
            overrides=_overrides(override),
            context_tokens=context,
        )
    )
    typer.echo(plan.describe())


@network_app.command("apply")
def network_apply(
    network_id: str = typer.Argument(None),
    override: list[str] = typer.Option([], "--override", help="NODE=BLOCKS (repeatable)."),
    context: int = typer.Option(
        None,
        "--context",
        min=limits.MIN_CONTEXT_TOKENS,
        max=limits.MAX_CONTEXT_TOKENS,
        help="As for plan; applying records it in the network's config.",
    ),
) -> None:
    """Plan, push each node its blocks (encrypted, verified, resumable), switch the chain."""
    from tiktrue.control.network_admin import apply_plan, make_plan
    from tiktrue.paths import data_dir
    from tiktrue.ui.progress import progress_printer

    network_id = _one_network(network_id)

    async def go():
        plan, _ = await make_plan(
            data_dir(), network_id, overrides=_overrides(override), context_tokens=context
        )
        err(plan.describe())
        progress = progress_printer(
            err,
            lambda p: f"  -> {p.node_id}: {p.sent_bytes / 1e6:.1f}/{p.total_bytes / 1e6:.1f} MB",
            done="sent_bytes",
            per="node_id",
        )

        return await apply_plan(data_dir(), network_id, plan, progress=progress)

    config = _run(go())
    typer.echo(f"network {network_id} now runs config v{config.version}")


@network_app.command("leave")
def network_leave(network_id: str) -> None:
    """Leave a network: the admin moves this PC's blocks to the others first."""
    from tiktrue.control.network_admin import leave_gracefully
    from tiktrue.paths import data_dir

    _run(leave_gracefully(data_dir(), network_id))
    typer.echo(f"left network {network_id}")


@network_app.command("remove")
def network_remove(
    network_id: str,
    node_id: str,
    reason: str = typer.Option("", "--reason", help="Noted in the revocation list."),
) -> None:
    """Remove a PC from the network and revoke its certificate (admin): its blocks move to
    the others first; every node then refuses it at once, on open connections too."""
    from tiktrue.control.network_admin import remove_node
    from tiktrue.paths import data_dir

    config = _run(remove_node(data_dir(), network_id, node_id, revoke=True, reason=reason))
    typer.echo(
        f"removed node {node_id} from {network_id} and revoked its certificate "
        f"(config v{config.version})"
    )


# --- people ---------------------------------------------------------------------------------


def _users():
    from tiktrue.paths import data_dir
    from tiktrue.security.users import UserStore

    return UserStore(data_dir())


@contextlib.contextmanager
def _refusals():
    """Accounts and keys: a refusal becomes a clear one-line error."""
    from tiktrue.security.users import UserError

    try:
        yield
    except UserError as exc:
        fail(exc.message)


def _password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    return typer.prompt("password", hide_input=True, confirmation_prompt=True)


def _limit(value: int | None) -> str:
    return "-" if value is None else str(value)


@users_app.command("add")
def users_add(
    name: str,
    role: str = typer.Option(None, "--role", help="admin or user (the first account: admin)."),
    password_stdin: bool = typer.Option(
        False, "--password-stdin", help="Read the password from stdin instead of asking."
    ),
    rpm: int = typer.Option(None, "--rpm", help="Requests per minute (default: no limit)."),
    rpd: int = typer.Option(None, "--rpd", help="Requests per day (default: no limit)."),
) -> None:
    """Add an account."""
    with _refusals():
        user = _users().add_user(name, _password(password_stdin), role, rpm=rpm, rpd=rpd)
    typer.echo(f"added {user.name} ({user.role})")


@users_app.command("list")
def users_list() -> None:
    """The accounts, their roles and limits."""
    users = _users().list_users()
    if not users:
        typer.echo("no accounts yet (tiktrue users add NAME: the first one is admin)")
    for user in users:
        typer.echo(
            f"{user.name:<24} {user.role:<6} rpm {_limit(user.rpm):>6}  rpd {_limit(user.rpd):>8}"
        )


@users_app.command("remove")
def users_remove(name: str) -> None:
    """Remove an account and its API keys (its logins stop working at once)."""
    with _refusals():
        _users().remove_user(name)
    typer.echo(f"removed {name}")


@users_app.command("passwd")
def users_passwd(
    name: str,
    password_stdin: bool = typer.Option(False, "--password-stdin"),
) -> None:
    """Set an account's password (its earlier logins stop working)."""
    with _refusals():
        _users().set_password(name, _password(password_stdin))
    typer.echo(f"new password for {name}")


@users_app.command("limits")
def users_limits(
    name: str,
    rpm: int = typer.Option(None, "--rpm", help="Requests per minute (unset: no limit)."),
    rpd: int = typer.Option(None, "--rpd", help="Requests per day (unset: no limit)."),
) -> None:
    """Set an account's rate limits (all its keys together)."""
    with _refusals():
        user = _users().set_user_limits(name, rpm=rpm, rpd=rpd)
    typer.echo(f"{user.name}: rpm {_limit(user.rpm)}, rpd {_limit(user.rpd)}")


@keys_app.command("create")
def keys_create(
    user: str = typer.Option(..., "--user", "-u", help="The account that owns the key."),
    name: str = typer.Option(None, "--name", help="What the key is for (shown in lists)."),
    network: list[str] = typer.Option(
        [], "--network", "-n", help="Only for this network (repeatable; default: all)."
    ),
    days: float = typer.Option(None, "--days", help="Expires after this many days."),
    rpm: int = typer.Option(None, "--rpm", help="Requests per minute for this key."),
    rpd: int = typer.Option(None, "--rpd", help="Requests per day for this key."),
) -> None:
    """Make an API key; it is printed this once (only its hash is kept)."""
    with _refusals():
        record, key = _users().create_key(
            user,
            name=name,
            networks=network or None,
            expires_in_s=None if days is None else days * 86400,
            rpm=rpm,
            rpd=rpd,
        )
    typer.echo(key)
    err(f"key {record.id} for {record.user_name}: keep it now, it is not shown again")


@keys_app.command("list")
def keys_list(user: str = typer.Option(None, "--user", "-u")) -> None:
    """The API keys (their first characters, never the keys)."""
    import time

    with _refusals():
        keys = _users().list_keys(user)
    if not keys:
        typer.echo("no API keys (tiktrue keys create --user NAME)")
    for key in keys:
        networks = ",".join(key.networks) if key.networks else "all networks"
        typer.echo(
            f"{key.id:>4} {key.prefix}...  {key.user_name:<16} {key.state(time.time()):<8} "
            f"{networks:<20} rpm {_limit(key.rpm)} rpd {_limit(key.rpd)}  {key.name or ''}"
        )


@keys_app.command("revoke")
def keys_revoke(key_id: int) -> None:
    """Revoke an API key: it is refused from the next request on."""
    with _refusals():
        key = _users().revoke_key(key_id)
    typer.echo(f"revoked key {key.id} ({key.prefix}...) of {key.user_name}")


@gateway_app.command("allow-anonymous")
def gateway_allow_anonymous(
    state: str = typer.Argument(None, help="on or off (default: show the setting)."),
) -> None:
    """Whether callers without a key may use the gateway from the LAN (this PC always may)."""
    from tiktrue.gateway.auth import allow_anonymous, set_allow_anonymous
    from tiktrue.paths import data_dir

    if state is not None:
        if state not in ("on", "off"):
            fail(f"say on or off, not {state!r}")
        set_allow_anonymous(data_dir(), state == "on")
    shown = "on" if allow_anonymous(data_dir()) else "off"
    typer.echo(f"anonymous access from the LAN: {shown}")


# --- node, chat --------------------------------------------------------------------------


@app.command()
def node(
    host: str = typer.Option(
        "127.0.0.1", "--host", help="Address this node listens on and announces (its LAN IP)."
    ),
    control_port: int = typer.Option(7470, "--control-port", help="Control channel (0: any)."),
    api_port: int = typer.Option(
        None, "--api-port", help="Also serve the gateway (OpenAI API, /ws) on this port (0: any)."
    ),
    api_host: str = typer.Option("127.0.0.1", "--api-host"),
    web_ui: bool = typer.Option(
        True, "--ui/--no-ui", help="With --api-port: serve the web UI at / on the same port."
    ),
    kv_budget_mb: int = typer.Option(512, "--kv-budget-mb", help="KV cache budget per network."),
    threads: int = typer.Option(None, "--threads", help="CPU threads for compute."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
    session_idle_minutes: float = typer.Option(
        30.0,
        "--session-idle-minutes",
        help="Gateway: free a conversation's KV on the nodes after this long unused "
        "(its history is kept; the next turn rebuilds it).",
    ),
) -> None:
    """Run the node service: control channel, one block server per network, gateway."""
    import logging

    import torch

    from tiktrue.paths import data_dir
    from tiktrue.service.service_runner import serve_node

    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    logging.getLogger("tiktrue").setLevel(logging.INFO)
    if threads:
        torch.set_num_threads(threads)
    serve_node(
        data_dir(),
        host=host,
        control_port=control_port,
        api_host=api_host,
        api_port=api_port,
        kv_budget_mb=kv_budget_mb,
        session_idle_s=session_idle_minutes * 60.0,
        web_ui=web_ui,
    )


@app.command("app")
def app_window(
    port: int = typer.Option(8000, "--port", help="The UI's (and the gateway's) port."),
    host: str = typer.Option(
        "127.0.0.1", "--host", help="Address the UI listens on (this PC's LAN IP: the LAN too)."
    ),
    control_port: int = typer.Option(7470, "--control-port", help="Control channel (0: any)."),
    browser: bool = typer.Option(
        False, "--browser", help="Open the default browser even where a native window works."
    ),
) -> None:
    """This PC's TikTrue: the web UI in a window (first run: create or join a network)."""
    from tiktrue.paths import data_dir
    from tiktrue.service.app_runner import run_app

    try:
        run_app(
            data_dir(),
            native=False if browser else None,
            log=err,
            host=host,
            control_port=control_port,
            api_host=host,
            api_port=port,
        )
    except (OSError, TimeoutError) as exc:
        fail(f"cannot start this PC's node service: {exc}")


@app.command()
def chat(
    url: str = typer.Option(None, "--url", help="Gateway API, e.g. http://127.0.0.1:8000/v1"),
    model: str = typer.Option(None, "--model", "-m", help="Which model answers."),
    network: str = typer.Option(None, "--network", "-n", help="Which network answers."),
    system: str = typer.Option(None, "--system", help="System prompt."),
    temperature: float = typer.Option(limits.DEFAULT_TEMPERATURE, "--temperature"),
    max_tokens: int = typer.Option(limits.DEFAULT_MAX_TOKENS, "--max-tokens"),
    api_key: str = typer.Option(
        None, "--api-key", envvar="TIKTRUE_API_KEY", help="Needed from another PC of the LAN."
    ),
) -> None:
    """Chat in the terminal with streamed answers (the local node's gateway by default)."""
    from tiktrue.paths import data_dir
    from tiktrue.ui.terminal_chat import ChatError, local_api_url, run_chat

    url = url or local_api_url(data_dir())
    if not url:
        fail("no gateway running from this data dir; pass --url or start `tiktrue demo`")
    try:
        # the gateway takes a network id where OpenAI clients put the model
        run_chat(
            url,
            network or model,
            system,
            api_key=api_key,
            temperature=temperature,
            max_tokens=max_tokens,
        )
    except ChatError as exc:
        fail(str(exc))


# --- demo ------------------------------------------------------------------------------------


@app.command()
def demo(
    headless: bool = typer.Option(
        False, "--headless", help="Serve the API until SIGINT/SIGTERM instead of opening the chat."
    ),
    nodes: int = typer.Option(4, "--nodes", min=2, max=8),
) -> None:
    """The whole journey on this PC: repository, 4 nodes (the fourth a backup), create,
    discover, join, plan, download, distribute, then chat with SmolLM2-135M-Instruct."""
    import signal
    import time

    from tiktrue.demo import DEMO_ADMIN, demo_api_key, start_demo_network
    from tiktrue.model.errors import ModelError
    from tiktrue.paths import data_dir
    from tiktrue.ui.terminal_chat import ChatError, run_chat

    # A signal handler must not take a lock (threading.Event does): a second SIGTERM arriving
    # inside the first handler would wait on itself forever. Appending to a list takes none.
    stop: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, _: stop.append(signum))
    cluster = None
    try:
        cluster = _run(_as_coroutine(start_demo_network, data_dir(), nodes=nodes, log=err))
        typer.echo(f"OpenAI API: {cluster.api_url}", color=False)
        api_key, password = demo_api_key(data_dir())
        typer.echo(f"API key: {api_key}", color=False)
        if cluster.ui_url:
            typer.echo(f"Web UI: {cluster.ui_url}", color=False)
        typer.echo(f"Admin login: {DEMO_ADMIN} / {password}", color=False)
        sys.stdout.flush()
        err(f"status: TIKTRUE_HOME={data_dir()} tiktrue network status")
        if headless:
            with contextlib.suppress(KeyboardInterrupt):
                while not stop:
                    time.sleep(0.2)
        else:
            run_chat(cluster.api_url, api_key=api_key, temperature=0.3, max_tokens=300)
    except (ChatError, RuntimeError, TimeoutError, ModelError) as exc:
        fail(str(exc))
    finally:
        # stopping must not be cut short by another Ctrl-C or SIGTERM: no node is left behind
        interrupt = signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if cluster is not None:
            cluster.stop()
        signal.signal(signal.SIGINT, interrupt)
        signal.signal(signal.SIGTERM, previous)
        err("demo stopped; every node process has exited")


async def _as_coroutine(func, *args, **kwargs):
    """Run blocking setup code where ``_run`` expects a coroutine (for its error handling)."""
    return await asyncio.to_thread(func, *args, **kwargs)
