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
service_app = typer.Typer(
    help="This PC's node as an OS service: started at boot, restarted after a crash "
    "(systemd on Linux, the Windows service TiktrueWorkerService).",
    no_args_is_help=True,
)
app.add_typer(service_app, name="service")
admin_app = typer.Typer(
    help="Back up the admin PC's state (network CA, configs, accounts, conversations) and "
    "restore it on another PC.",
    no_args_is_help=True,
)
app.add_typer(admin_app, name="admin")
tasks_app = typer.Typer(
    help="Whitelisted tasks on the nodes of this admin's networks, and their log lines.",
    no_args_is_help=True,
)
app.add_typer(tasks_app, name="tasks")
ops_app = typer.Typer(help="Operations: Prometheus set-up, alert thresholds.", no_args_is_help=True)
app.add_typer(ops_app, name="ops")


def err(message: str) -> None:
    typer.echo(message, err=True)


def fail(message: str, code: int = 1) -> None:
    err(f"error: {message}")
    raise typer.Exit(code)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(__version__)
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False,
        "--version",
        help="Print the version and exit.",
        is_eager=True,  # before Click asks for the missing command
        callback=_print_version,
    ),
) -> None:
    """TikTrue: one language model across the PCs of your LAN."""


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


@models_app.command("defaults")
def models_defaults(
    model_id: str,
    temperature: float = typer.Option(None, "--temperature", help="0 = greedy."),
    top_k: int = typer.Option(None, "--top-k", help="0 = off."),
    top_p: float = typer.Option(None, "--top-p", help="1 = off."),
    min_p: float = typer.Option(None, "--min-p", help="0 = off."),
    repetition_penalty: float = typer.Option(None, "--repetition-penalty", help="1 = off."),
    reset: bool = typer.Option(False, "--reset", help="Back to the model's own settings."),
    as_json: bool = typer.Option(False, "--json", help="Print them as JSON."),
) -> None:
    """The sampling settings a request, the web chat or the terminal chat get when they leave
    them out: the model's own (its generation_config.json, a GGUF's metadata, else llama.cpp's
    defaults) unless set here for this PC's gateway. With options: set those (the rest stay)."""
    from tiktrue.model.errors import StoreError

    store = _open_store(model_id)
    given = {
        "temperature": temperature,
        "top_k": top_k,
        "top_p": top_p,
        "min_p": min_p,
        "repetition_penalty": repetition_penalty,
    }
    given = {k: v for k, v in given.items() if v is not None}
    try:
        if reset:
            store.set_admin_sampling(None)
        if given:
            store.set_admin_sampling({**store.admin_sampling(), **given})
    except StoreError as exc:
        fail(str(exc))
    defaults, chosen = store.sampling_defaults(), store.admin_sampling()
    if as_json:
        typer.echo(json.dumps({**defaults.model_dump(), "set_here": sorted(chosen)}, indent=2))
        return
    own = store.model_sampling()
    for name, value in defaults.model_dump().items():
        source = "set here" if name in chosen else "the model's" if name in own else "default"
        typer.echo(f"{name:<20} {value:<8g} ({source})")


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
        None, "--temperature", help="0 = greedy (default: the model's, see models defaults)."
    ),
    top_k: int = typer.Option(None, "--top-k", help="0 = off."),
    top_p: float = typer.Option(None, "--top-p"),
    min_p: float = typer.Option(None, "--min-p", help="0 = off."),
    repetition_penalty: float = typer.Option(None, "--repetition-penalty"),
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

    store = _open_store(model)
    try:  # what is not given comes from the model
        params = store.sampling_defaults().params(
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            repetition_penalty=repetition_penalty,
            seed=seed,
            stop=stop,
            max_tokens=max_tokens,
        )
    except ValidationError as exc:
        fail(f"bad generation settings: {exc.errors()[0]['loc'][0]}: {exc.errors()[0]['msg']}")
    try:
        _stream_local(store, prompt, params, raw=raw, spans=spans, threads=threads, stats=stats)
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


def _writer():
    """The writer of this PC's network configs: the running node service's (its one queue
    per network), or, when no service runs from this data dir, a direct one (said so)."""
    from tiktrue.control.config_writer import writer_for
    from tiktrue.paths import data_dir

    writer = writer_for(data_dir())
    if writer.direct:
        err(f"no node service runs from {data_dir()}: writing the network's config directly")
    return writer


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
    from tiktrue.control.local_service import poke_local_service
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
    from tiktrue.control.join import new_token
    from tiktrue.paths import data_dir

    service = _local_service()
    token = _run(new_token(data_dir(), network_id, ttl=hours * 3600, writer=_writer()))
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
    from tiktrue.control.join import list_join_requests
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
    """Approve (or reject) a join request (in the running node service, which writes the
    network's config)."""
    from tiktrue.control.join import decide
    from tiktrue.paths import data_dir

    state = _run(decide(data_dir(), network_id, request_id, not reject, writer=_writer()))
    typer.echo(f"{state} {request_id}")


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
        "(default: as much as the nodes' RAM allows, up to the model's own, at least "
        f"{limits.MIN_AUTO_CONTEXT_TOKENS}; a chosen one is kept by later plans).",
    ),
) -> None:
    """Measure every node and show the best split of the model (changes nothing)."""
    from tiktrue.control.plans import make_plan
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
    from tiktrue.control.plans import apply_network
    from tiktrue.paths import data_dir
    from tiktrue.ui.progress import progress_printer

    network_id = _one_network(network_id)
    progress = progress_printer(
        err,
        lambda p: f"  -> {p.node_id}: {p.sent_bytes / 1e6:.1f}/{p.total_bytes / 1e6:.1f} MB",
        done="sent_bytes",
        per="node_id",
    )
    config = _run(
        apply_network(
            data_dir(),
            network_id,
            writer=_writer(),
            overrides=_overrides(override),
            context_tokens=context,
            planned=lambda plan: err(plan.describe()),
            step=_replanning(err),
            progress=progress,
        )
    )
    typer.echo(f"network {network_id} now runs config v{config.version}")


def _replanning(say):
    """``apply_network``'s steps worth a line: a plan made again because the network moved."""

    def step(text: str, **params) -> None:
        if "planning again" in text:
            say(text.format(**params))

    return step


@network_app.command("rebalance")
def network_rebalance(
    network_id: str = typer.Argument(None),
    since: str = typer.Option(
        "24h", "--since", help="The history to read: how long ago (30m, 1h, 7d) or a date."
    ),
    apply: bool = typer.Option(
        False, "--apply", help="Apply the proposed plan (push blocks, switch the chain)."
    ),
) -> None:
    """Which PC slows the chain (per hop: compute, queue, link, from the metrics history of
    the current plan) and a faster plan from the measured speeds, with its expected gain.
    Changes nothing without --apply."""
    import time

    from tiktrue.control.resource_optimizer import (
        NotEnoughHistory,
        apply_rebalance,
        rebalance_report,
    )
    from tiktrue.monitoring.reports import parse_since
    from tiktrue.paths import data_dir
    from tiktrue.ui.progress import progress_printer

    network_id = _one_network(network_id)
    try:
        start = parse_since(since, time.time())
    except ValueError as exc:
        fail(str(exc))

    async def go():
        try:
            rebalance = await rebalance_report(data_dir(), network_id, since=start)
        except NotEnoughHistory as exc:
            fail(str(exc))
        typer.echo(rebalance.describe())
        if not apply:
            if rebalance.worth_it:
                typer.echo(f"apply it with: tiktrue network rebalance {network_id} --apply")
            return
        if not rebalance.worth_it:
            fail("nothing to apply: " + rebalance.verdict())
        progress = progress_printer(
            err,
            lambda p: f"  -> {p.node_id}: {p.sent_bytes / 1e6:.1f}/{p.total_bytes / 1e6:.1f} MB",
            done="sent_bytes",
            per="node_id",
        )
        config = await apply_rebalance(data_dir(), network_id, rebalance, progress=progress)
        typer.echo(f"network {network_id} now runs config v{config.version}")

    _run(go())


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
    from tiktrue.control.plans import remove_node
    from tiktrue.paths import data_dir

    config = _run(
        remove_node(data_dir(), network_id, node_id, revoke=True, reason=reason, writer=_writer())
    )
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


PRIORITY_HELP = (
    "Default class of its requests: quick, normal or deep (a request may name its own; "
    "quick ones go first on every PC under load)."
)


def _priority_choice(value: str) -> str | None:
    """``quick``/``normal``/``deep``, or ``none`` (unset: the account's default, or normal)."""
    if value == "none":
        return None
    if value not in limits.PRIORITIES:
        fail(f"a class is one of {', '.join(limits.PRIORITIES)} or none, not {value!r}")
    return value


@users_app.command("add")
def users_add(
    name: str,
    role: str = typer.Option(None, "--role", help="admin or user (the first account: admin)."),
    password_stdin: bool = typer.Option(
        False, "--password-stdin", help="Read the password from stdin instead of asking."
    ),
    rpm: int = typer.Option(None, "--rpm", help="Requests per minute (default: no limit)."),
    rpd: int = typer.Option(None, "--rpd", help="Requests per day (default: no limit)."),
    tpd: int = typer.Option(
        None, "--tpd", help="Tokens per day, prompt and answer (default: no quota)."
    ),
    priority: str = typer.Option(None, "--priority", help=PRIORITY_HELP),
) -> None:
    """Add an account."""
    with _refusals():
        user = _users().add_user(
            name,
            _password(password_stdin),
            role,
            rpm=rpm,
            rpd=rpd,
            tpd=tpd,
            priority=priority and _priority_choice(priority),
        )
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
            f"  tokens/day {_limit(user.tpd):>9}  class {user.priority or 'normal'}"
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
    tpd: int = typer.Option(
        None, "--tpd", help="Tokens per day, prompt and answer (unset: no quota)."
    ),
) -> None:
    """Set an account's rate limits and token quota (all its keys together)."""
    with _refusals():
        user = _users().set_user_limits(name, rpm=rpm, rpd=rpd, tpd=tpd)
    typer.echo(
        f"{user.name}: rpm {_limit(user.rpm)}, rpd {_limit(user.rpd)}, "
        f"tokens/day {_limit(user.tpd)}"
    )


@users_app.command("priority")
def users_priority(
    name: str,
    priority: str = typer.Argument(..., help="quick, normal, deep, or none."),
) -> None:
    """Set the default class of an account's requests (its keys without a class of their
    own, and its chats): quick ones go first on every PC under load, deep ones wait."""
    with _refusals():
        user = _users().set_user_priority(name, _priority_choice(priority))
    typer.echo(f"{user.name}: class {user.priority or 'normal'}")


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
    tpd: int = typer.Option(None, "--tpd", help="Tokens per day for this key."),
    priority: str = typer.Option(None, "--priority", help=PRIORITY_HELP),
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
            tpd=tpd,
            priority=priority and _priority_choice(priority),
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
            f"{networks:<20} rpm {_limit(key.rpm)} rpd {_limit(key.rpd)} "
            f"tokens/day {_limit(key.tpd)} class {key.priority or '(account)'}  "
            f"{key.name or ''}"
        )


@keys_app.command("priority")
def keys_priority(
    key_id: int,
    priority: str = typer.Argument(..., help="quick, normal, deep, or none (its account's)."),
) -> None:
    """Set the default class of a key's requests (a request may still name its own)."""
    with _refusals():
        key = _users().set_key_priority(key_id, _priority_choice(priority))
    typer.echo(f"key {key.id} ({key.prefix}...): class {key.priority or 'of its account'}")


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


# --- admin backup ---------------------------------------------------------------------------


def _passphrase(from_stdin: bool, *, confirm: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    return typer.prompt("backup passphrase", hide_input=True, confirmation_prompt=confirm)


@admin_app.command("backup")
def admin_backup(
    file: Path = typer.Argument(..., help="The backup file to write."),
    passphrase_stdin: bool = typer.Option(
        False, "--passphrase-stdin", help="Read the passphrase from stdin instead of asking."
    ),
    force: bool = typer.Option(False, "--force", help="Replace FILE if it exists."),
) -> None:
    """Write this node's networks (their CA), configs, identity, accounts, API keys and
    conversations into FILE, encrypted with a passphrase (scrypt + AES-256-GCM). Models are
    not in it. Works while the node runs."""
    from tiktrue.paths import data_dir
    from tiktrue.service.admin_backup import BackupError, write_backup

    passphrase = _passphrase(passphrase_stdin, confirm=True)
    try:
        summary = write_backup(data_dir(), file, passphrase, force=force)
    except BackupError as exc:
        fail(str(exc))
    typer.echo(f"backed up {summary.describe()} -> {file}")
    err("keep the file and its passphrase apart: together they are this network's keys")


@admin_app.command("restore")
def admin_restore(
    file: Path = typer.Argument(..., help="A file made by tiktrue admin backup."),
    passphrase_stdin: bool = typer.Option(
        False, "--passphrase-stdin", help="Read the passphrase from stdin instead of asking."
    ),
    force: bool = typer.Option(
        False,
        "--force",
        help="Restore into a data dir in use: its networks, accounts and identity are moved "
        "to <data>/before-restore-<time>/ first.",
    ),
) -> None:
    """Make this PC the node the backup was taken of (stop its node service first). When the
    node starts here, it tells its networks its new address: the other PCs follow it without
    joining again, and conversations continue."""
    from tiktrue.paths import data_dir
    from tiktrue.service.admin_backup import (
        BackupError,
        missing_models,
        read_backup,
        restore_backup,
    )

    passphrase = _passphrase(passphrase_stdin, confirm=False)
    try:
        backup = read_backup(file, passphrase)
        aside = restore_backup(data_dir(), backup, force=force)
    except BackupError as exc:
        fail(str(exc))
    typer.echo(f"restored {backup.summary.describe()} into {data_dir()}")
    if aside is not None:
        err(f"what was there before is in {aside}")
    for model_id in missing_models(data_dir(), backup):
        err(
            f"this PC has no copy of model {model_id} yet: import it (tiktrue models import "
            f"PATH --id {model_id}) or download it (tiktrue models download {model_id} --from "
            "URL) before starting the node"
        )
    err("now start the node service here (tiktrue node, the service or the app)")


# --- node, chat --------------------------------------------------------------------------


HOST_HELP = (
    "Address this node listens on and announces (default: this PC's LAN address, the "
    "interface of the default route)."
)
LOCAL_HELP = "Listen on 127.0.0.1 only: no other PC can reach this node."


def _host(host: str | None, local: bool) -> str | None:
    if host and local:
        fail("say --host ADDRESS or --local, not both")
    return "127.0.0.1" if local else host


@app.command()
def node(
    host: str = typer.Option(None, "--host", help=HOST_HELP),
    local: bool = typer.Option(False, "--local", help=LOCAL_HELP),
    control_port: int = typer.Option(7470, "--control-port", help="Control channel (0: any)."),
    api_port: int = typer.Option(
        None,
        "--api-port",
        help="Also serve the gateway (web UI, OpenAI API, /ws) on this port (0: any): HTTPS "
        "on a LAN address, plain HTTP on 127.0.0.1.",
    ),
    api_host: str = typer.Option(
        None, "--api-host", help="The gateway's address (default: --host)."
    ),
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

    from tiktrue.monitoring.node_logging import setup_node_logging
    from tiktrue.paths import data_dir
    from tiktrue.service.service_runner import serve_node

    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    logging.getLogger("tiktrue").setLevel(logging.INFO)
    setup_node_logging(data_dir())  # <data>/logs/node.log, rotated: read by the admin too
    if threads:
        torch.set_num_threads(threads)
    serve_node(
        data_dir(),
        host=_host(host, local),
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
    host: str = typer.Option(None, "--host", help=HOST_HELP),
    local: bool = typer.Option(False, "--local", help=LOCAL_HELP),
    control_port: int = typer.Option(7470, "--control-port", help="Control channel (0: any)."),
    browser: bool = typer.Option(
        False, "--browser", help="Open the default browser even where a native window works."
    ),
) -> None:
    """This PC's TikTrue: the web UI in a window (first run: create or join a network). When
    the node runs as a service, the app opens its UI; else it runs a node of its own."""
    from tiktrue.paths import data_dir
    from tiktrue.service.app_runner import run_app
    from tiktrue.service.os_service import ServiceError

    host = _host(host, local)
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
    except ServiceError as exc:
        fail(str(exc))


@app.command()
def chat(
    url: str = typer.Option(None, "--url", help="Gateway API, e.g. http://127.0.0.1:8000/v1"),
    model: str = typer.Option(None, "--model", "-m", help="Which model answers."),
    network: str = typer.Option(None, "--network", "-n", help="Which network answers."),
    system: str = typer.Option(None, "--system", help="System prompt."),
    temperature: float = typer.Option(
        None, "--temperature", help="0 = greedy (default: the model's)."
    ),
    max_tokens: int = typer.Option(limits.DEFAULT_MAX_TOKENS, "--max-tokens"),
    api_key: str = typer.Option(
        None, "--api-key", envvar="TIKTRUE_API_KEY", help="Needed from another PC of the LAN."
    ),
    cacert: Path = typer.Option(
        None,
        "--cacert",
        help="For an https:// gateway: the CA certificate to trust (its /trust page offers "
        "it; default: the CAs of this PC's networks).",
    ),
    lang: str = typer.Option(
        None,
        "--lang",
        help="Language of the chat's own words: en or fa (default: TIKTRUE_LANG, else the locale).",
    ),
) -> None:
    """Chat in the terminal with streamed answers (the local node's gateway by default)."""
    from tiktrue.paths import data_dir
    from tiktrue.security.auth_manager import IdentityError
    from tiktrue.security.gateway_tls import client_context
    from tiktrue.ui.terminal_chat import ChatError, local_api_url, run_chat, terminal_language

    url = url or local_api_url(data_dir())
    if not url:
        fail("no gateway running from this data dir; pass --url or start `tiktrue demo`")
    verify = True
    if url.startswith("https://"):
        try:
            verify = client_context(data_dir(), cacert)
        except IdentityError as exc:
            fail(str(exc))
    try:
        # the gateway takes a network id where OpenAI clients put the model
        run_chat(
            url,
            network or model,
            system,
            api_key=api_key,
            language=terminal_language(lang),
            temperature=temperature,
            max_tokens=max_tokens,
            verify=verify,
        )
    except ChatError as exc:
        fail(str(exc))


# --- service --------------------------------------------------------------------------------

USER_SCOPE_HELP = "Linux: systemd's per-user instance (no root; starts at login, or at boot "
USER_SCOPE_HELP += "with `loginctl enable-linger`)."


def _service_manager(user_scope: bool):
    """The service manager asked for; without --user on Linux, the scope where the unit is."""
    from tiktrue.service.os_service import ServiceError, SystemdManager, service_manager

    try:
        manager = service_manager(user_scope=user_scope)
    except ServiceError as exc:
        fail(str(exc))
    if isinstance(manager, SystemdManager) and not user_scope:
        mine = SystemdManager(user_scope=True)
        if not manager.unit_path.is_file() and mine.unit_path.is_file():
            return mine
    return manager


@contextlib.contextmanager
def _service_errors():
    from tiktrue.service.os_service import ServiceError

    try:
        yield
    except ServiceError as exc:
        fail(str(exc))


@service_app.command("install")
def service_install(
    user: bool = typer.Option(False, "--user", help=USER_SCOPE_HELP),
    run_as: str = typer.Option(
        None,
        "--run-as",
        help="Linux, system-wide: the account the node runs as "
        "(default: the one who ran sudo, else this one).",
    ),
    data: Path = typer.Option(
        None, "--data-dir", help="The node's data dir (default: that account's)."
    ),
    host: str = typer.Option(None, "--host", help="As `tiktrue node --host`."),
    control_port: int = typer.Option(None, "--control-port", help="As `tiktrue node`."),
    api_host: str = typer.Option(None, "--api-host", help="As `tiktrue node`."),
    api_port: int = typer.Option(
        8000, "--api-port", help="The gateway and web UI (what `tiktrue app` opens)."
    ),
) -> None:
    """Install this PC's node as a service, start it now and at every boot."""
    from tiktrue.service.os_service import NodeOptions, default_spec, wait_until_serving

    manager = _service_manager(user)
    options = NodeOptions(host, control_port, api_host, api_port)
    with _service_errors():
        spec = default_spec(options, data_dir=data, run_as=run_as, user_scope=user)
        manager.install(spec)
    who = f" as {spec.run_as}" if spec.run_as else ""
    typer.echo(f"installed {manager.name}{who}: starts at boot, restarts after a crash")
    err("waiting for the node to start ...")
    with _service_errors():
        wait_until_serving(manager, timeout=START_WAIT_S)
    _print_status(manager.status())


START_WAIT_S = 180.0  # a first start imports torch and may load blocks: a minute on a slow PC


@service_app.command("uninstall")
def service_uninstall(user: bool = typer.Option(False, "--user", help=USER_SCOPE_HELP)) -> None:
    """Stop the node and remove the service (the data dir, with its networks, stays)."""
    manager = _service_manager(user)
    with _service_errors():
        data = manager.status().data_dir
        manager.uninstall()
    typer.echo(f"removed {manager.name}" + (f"; the data stays in {data}" if data else ""))


@service_app.command("start")
def service_start(user: bool = typer.Option(False, "--user", help=USER_SCOPE_HELP)) -> None:
    """Start the installed node service."""
    from tiktrue.service.os_service import wait_until_serving

    manager = _service_manager(user)
    with _service_errors():
        manager.start()
        wait_until_serving(manager, timeout=START_WAIT_S)
    _print_status(manager.status())


@service_app.command("stop")
def service_stop(user: bool = typer.Option(False, "--user", help=USER_SCOPE_HELP)) -> None:
    """Stop the node service (it starts again at the next boot)."""
    manager = _service_manager(user)
    with _service_errors():
        manager.stop()
    typer.echo(f"stopped {manager.name}")


@service_app.command("status")
def service_status(
    user: bool = typer.Option(False, "--user", help=USER_SCOPE_HELP),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """What runs (the service, its state, its command), where it listens, where its log is."""
    manager = _service_manager(user)
    with _service_errors():
        status = manager.status()
    if as_json:
        typer.echo(json.dumps(_status_dict(status), indent=2))
        return
    _print_status(status)
    if not status.installed:
        raise typer.Exit(3)  # as `systemctl status` says of a unit that is not there


def _status_dict(status) -> dict:
    from tiktrue.service.os_service import running_node

    node = running_node(status.data_dir) if status.data_dir else None
    return {
        "service": status.name,
        "manager": status.manager,
        "installed": status.installed,
        "state": status.state,
        "pid": status.pid,
        "starts_at_boot": status.at_boot,
        "command": status.command,
        "data_dir": str(status.data_dir) if status.data_dir else None,
        "node": node,
        "log": str(status.node_log()) if status.data_dir else None,
        "manager_log": status.manager_log,
    }


def _print_status(status) -> None:
    info = _status_dict(status)
    if not status.installed:
        typer.echo(f"{status.name} is not installed ({status.manager}): tiktrue service install")
        return
    boot = "starts at boot" if status.at_boot else "does not start at boot"
    pid = f", pid {status.pid}" if status.pid else ""
    typer.echo(f"service   {status.name} ({status.manager}): {status.state}{pid}, {boot}")
    typer.echo(f"command   {' '.join(status.command)}")
    typer.echo(f"data      {status.data_dir}")
    node = info["node"]
    if node:
        typer.echo(f"node      {node.get('node_id')}, control channel {node.get('control')}")
        if node.get("ui"):
            typer.echo(f"web UI    {node['ui']}")
        if node.get("api"):
            typer.echo(f"API       {node['api']}")
        for network, where in (node.get("networks") or {}).items():
            typer.echo(f"network   {network}: blocks {where['span']} on port {where['port']}")
    elif status.running:
        typer.echo("node      starting (not listening yet)")
    typer.echo(f"log       {info['log']}  (the service manager's: {status.manager_log})")


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
            run_chat(cluster.api_url, api_key=api_key, max_tokens=300)
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


# --- the bundle's executables ------------------------------------------------------------------


def bundle_main(command: str | None = None) -> None:
    """An executable of the PyInstaller bundle (deploy/pyinstaller): ``tiktrue`` (the whole
    command line) or one that runs one command: ``service_runner`` (``node``), ``main_app``
    (``app``). Started by Windows' service manager, ``service_runner`` hosts the service."""
    import os

    from tiktrue.service.os_service import WINDOWS_SERVICE_ARG

    for name in ("stdout", "stderr"):  # a windowed executable (main_app, the service) has none
        if getattr(sys, name) is None:
            setattr(sys, name, open(os.devnull, "w", encoding="utf-8"))  # noqa: SIM115
    if command == "node" and sys.argv[1:2] == [WINDOWS_SERVICE_ARG]:
        from tiktrue.service.windows_service import host_service

        host_service()
        return
    args = sys.argv[1:] if command is None else [command, *sys.argv[1:]]
    app(args, prog_name=Path(sys.argv[0]).stem)


# --- operations: Prometheus, reports, tasks --------------------------------------------------


@ops_app.command("prometheus")
def ops_prometheus(
    out: Path = typer.Option(..., "--out", help="Folder for prometheus.yml, targets and TLS."),
    interval: float = typer.Option(15.0, "--interval", help="Scrape interval in seconds."),
) -> None:
    """Write a Prometheus config that scrapes every node of this admin's networks (a
    read-only certificate per network; the running node keeps the targets current)."""
    from tiktrue.control.prometheus_setup import setup_prometheus
    from tiktrue.paths import data_dir

    try:
        done = setup_prometheus(data_dir(), out, interval)
    except (ValueError, OSError) as exc:
        fail(str(exc))
    typer.echo(f"wrote {done.config} (networks: {', '.join(done.networks)})")
    typer.echo(f"run: prometheus --config.file {done.config}")
    err(
        "the targets in "
        f"{done.folder / 'targets'} follow the network while this PC's node service runs; "
        "the key in tls/ is owner-only: Prometheus must run as this user (or chown it)"
    )


@app.command()
def report(
    since: str = typer.Option("24h", "--since", help="How long ago (30m, 1h, 7d) or a date."),
    until: str = typer.Option(None, "--until", help="The end (default: now), the same way."),
    format: str = typer.Option("text", "--format", help="text, html (with charts) or csv."),
    out: Path = typer.Option(None, "--out", help="Write to this file instead of stdout."),
) -> None:
    """This node's performance report: tokens and tokens/s per network and PC, time to first
    token, failovers and their pauses, uptime, usage per account and key, thumbs, busy hours."""
    import time

    from tiktrue.gateway.reporting import node_report
    from tiktrue.monitoring.reports import parse_since, render_csv, render_html, render_text
    from tiktrue.paths import data_dir

    renderers = {"text": render_text, "html": render_html, "csv": render_csv}
    if format not in renderers:
        fail(f"--format is text, html or csv, not {format!r}")
    now = time.time()
    try:
        start = parse_since(since, now)
        end = parse_since(until, now) if until else now
    except ValueError as exc:
        fail(str(exc))
    if end <= start:
        fail("--until must come after --since")
    text = renderers[format](node_report(data_dir(), start, end))
    if out is None:
        typer.echo(text, nl=not text.endswith("\n"))
    else:
        out.write_text(text, "utf-8")
        err(f"wrote {out}")


def _admin_network(network: str | None) -> str:
    """The network a command acts in: the one given, or the only one this node administers."""
    from tiktrue.control.prometheus_setup import administered
    from tiktrue.paths import data_dir

    mine = administered(data_dir())
    if network is not None:
        if network not in mine:
            fail(
                f"this node is not the admin of network {network} (it administers: "
                f"{', '.join(mine) or 'none'})"
            )
        return network
    if len(mine) != 1:
        fail(f"say which network (--network): this node administers {', '.join(mine) or 'none'}")
    return mine[0]


def _print_task(kept, output: bool = True) -> None:
    import datetime

    when = datetime.datetime.fromtimestamp(kept.started_at).strftime("%Y-%m-%d %H:%M:%S")
    args = " ".join(f"{k}={v}" for k, v in kept.args.items() if v is not None)
    typer.echo(
        f"{kept.id:>5} {when} {kept.status:<8} {kept.task:<14} {kept.node_id} "
        f"{kept.network_id} {args}".rstrip()
    )
    if kept.error:
        typer.echo(f"      error: {kept.error}")
    if output and kept.output:
        typer.echo(kept.output)


@tasks_app.command("run")
def tasks_run(
    node: str = typer.Argument(..., help="The node id (or its first characters)."),
    task: str = typer.Argument(..., help="A task of the whitelist (tiktrue tasks list -a)."),
    network: str = typer.Option(None, "--network", "-n", help="Default: the only one."),
    arg: list[str] = typer.Option([], "--arg", help="An argument as NAME=VALUE (repeatable)."),
) -> None:
    """Run a whitelisted task on a node and print its output (kept: tiktrue tasks show ID)."""
    from tiktrue.control.remote_tasks import TaskError, run_task
    from tiktrue.paths import data_dir

    args = {}
    for item in arg:
        name, sep, value = item.partition("=")
        if not sep:
            fail(f"--arg {item!r}: write NAME=VALUE")
        args[name] = int(value) if value.isdigit() else value
    try:
        kept = _run(
            run_task(
                data_dir(),
                _admin_network(network),
                node,
                task,
                args,
                on_update=lambda k: err(f"task {k.id}: {k.status} ..."),
            )
        )
    except TaskError as exc:
        fail(f"{exc} ({exc.code})")
    _print_task(kept)
    if kept.status != "done":
        raise typer.Exit(1)


@tasks_app.command("list")
def tasks_list(
    available: bool = typer.Option(False, "--available", "-a", help="The whitelist instead."),
    network: str = typer.Option(None, "--network", "-n"),
    limit: int = typer.Option(30, "--limit"),
) -> None:
    """The tasks sent from here, newest first (or, with -a, the tasks a node runs)."""
    from tiktrue.control.remote_tasks import TaskLog, available_tasks
    from tiktrue.paths import data_dir

    if available:
        for name, what in available_tasks().items():
            typer.echo(f"{name:<14} {what}")
        return
    log = TaskLog(data_dir())
    try:
        kept = log.recent(limit, network)
    finally:
        log.close()
    if not kept:
        typer.echo("no tasks sent yet (tiktrue tasks run NODE TASK)")
    for item in kept:
        _print_task(item, output=False)


@tasks_app.command("show")
def tasks_show(task_id: int) -> None:
    """A task sent from here: its status and output."""
    from tiktrue.control.remote_tasks import TaskLog
    from tiktrue.paths import data_dir

    log = TaskLog(data_dir())
    try:
        kept = log.get(task_id)
    finally:
        log.close()
    if kept is None:
        fail(f"no task {task_id} (tiktrue tasks list)")
    _print_task(kept)


@tasks_app.command("logs")
def tasks_logs(
    node: str = typer.Argument(..., help="The node id (or its first characters)."),
    network: str = typer.Option(None, "--network", "-n"),
    lines: int = typer.Option(100, "--lines"),
    level: str = typer.Option(None, "--level", help="WARNING: warnings and worse only."),
) -> None:
    """A node's recent log lines (<data>/logs/node.log there), over the control channel."""
    from tiktrue.control.remote_tasks import TaskError, node_log_lines
    from tiktrue.paths import data_dir

    try:
        found = _run(node_log_lines(data_dir(), _admin_network(network), node, lines, level))
    except TaskError as exc:
        fail(f"{exc} ({exc.code})")
    for line in found:
        typer.echo(line)


@ops_app.command("alerts")
def ops_alerts(
    set_: list[str] = typer.Option(
        [], "--set", help="NAME=VALUE (a share like 0.9 or 90%, a number, or off); repeatable."
    ),
) -> None:
    """The alert thresholds (RAM, disk, KV use, queue length, TTFT p95) and the latest alerts;
    with --set, change thresholds (the running node takes them within seconds)."""
    from tiktrue.monitoring.alerts import KINDS, check_threshold, describe, thresholds_of
    from tiktrue.monitoring.monitoring_system import events_path, recent_events
    from tiktrue.monitoring.prometheus_config import read_settings, update_settings
    from tiktrue.paths import data_dir

    settings = read_settings(data_dir())
    if set_:
        chosen = dict(settings.get("thresholds") or {})
        for item in set_:
            name, sep, value = item.partition("=")
            try:
                if not sep:
                    raise ValueError(f"--set {item!r}: write NAME=VALUE")
                chosen[name] = check_threshold(name, value)
            except ValueError as exc:
                fail(str(exc))
        settings = update_settings(data_dir(), thresholds=chosen)
    for name, limit in thresholds_of(settings).items():
        shown = "off" if limit is None else describe(name, limit)
        typer.echo(f"{name:<14} {shown:>8}  {KINDS[name].what}")
    alerts = [
        e
        for e in recent_events(events_path(data_dir()), 500)
        if e.get("event") in ("alert_raised", "alert_cleared")
    ][-10:]
    if alerts:
        typer.echo("\nlatest alerts:")
    for event in alerts:
        typer.echo(f"  {event['ts'][:19]} {event['event']:<14} {event.get('message', '')}")
