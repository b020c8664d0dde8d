"""The node's Prometheus metrics (``/metrics``): names under ``tiktrue_``, with their units, in
the manner of vLLM (``vllm:time_to_first_token_seconds``, ``vllm:num_requests_running``) and
llama.cpp's server (``llamacpp:tokens_predicted_total``).

Two kinds of figures, so that nothing is added to the per-token path:

- **per answer**, from the gateway's ``GenerationResult`` once an answer ends
  (:meth:`NodeMetrics.record_answer`): requests, prompt and generated tokens, time to first
  token, inter-token latency (each decode step's round trip), end-to-end latency, each node's
  compute per step and the step's time in transit between nodes;
- **read at scrape time** by a collector (:class:`FiguresCollector`) from what the node
  already keeps: its resources, each span's step scheduler, KV pages, link round trips and
  damaged blocks, the gateways' sessions, and (on an admin) the heartbeat state of every node.

Events of the node's event log count too (``tiktrue_events_total``), and a failover's pause is
the time from the node's first ``node_suspect`` (or ``node_dead``) to the ``failover`` event.

One registry per node (``NodeMetrics.registry``), never the process-global one: several node
services may share a process in tests.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tiktrue import __version__

log = logging.getLogger("tiktrue.metrics")

PREFIX = "tiktrue"
# seconds; TTFT covers a long prompt's prefill on a slow CPU chain, ITL a fast local decode
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)
HOP_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)
PAUSE_BUCKETS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0, 300.0)
SUSPECT_EVENTS = ("node_suspect", "node_dead")

Figures = Callable[[], dict]


class NodeMetrics:
    """Every metric of one node; ``render`` gives the Prometheus or OpenMetrics text."""

    def __init__(self, node_id: str, figures: Figures | None = None) -> None:
        self.node_id = node_id
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        per_model = ["network", "model"]
        self.requests = Counter(
            f"{PREFIX}_requests",
            "Answers ended, by how they ended (stop, length, cancelled, error).",
            [*per_model, "finish_reason"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            f"{PREFIX}_prompt_tokens", "Prompt tokens run through the chain.", per_model, registry=r
        )
        self.generation_tokens = Counter(
            f"{PREFIX}_generation_tokens",
            "Tokens generated (sampled by the head and given to the caller).",
            per_model,
            registry=r,
        )
        self.ttft = Histogram(
            f"{PREFIX}_time_to_first_token_seconds",
            "From the request reaching the chain to its first token.",
            per_model,
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            f"{PREFIX}_inter_token_latency_seconds",
            "Each decode step's round trip through the chain.",
            per_model,
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            f"{PREFIX}_e2e_request_latency_seconds",
            "From the request reaching the chain to its last token.",
            per_model,
            buckets=E2E_BUCKETS,
            registry=r,
        )
        self.node_compute = Histogram(
            f"{PREFIX}_node_compute_seconds",
            "A node's own compute in one decode step (per node of the chain).",
            ["network", "node"],
            buckets=HOP_BUCKETS,
            registry=r,
        )
        self.transit = Histogram(
            f"{PREFIX}_step_transit_seconds",
            "A decode step's time between nodes (network, TLS, framing, queues), all hops.",
            ["network"],
            buckets=HOP_BUCKETS,
            registry=r,
        )
        self.events = Counter(
            f"{PREFIX}_events", "Events of the node's event log.", ["event", "level"], registry=r
        )
        self.failovers = Counter(
            f"{PREFIX}_failovers",
            "Spans taken over after a node was lost.",
            ["network"],
            registry=r,
        )
        self.failover_pause = Histogram(
            f"{PREFIX}_failover_pause_seconds",
            "From a node's first missed beat (suspect or dead) to the failover that replaced it.",
            ["network"],
            buckets=PAUSE_BUCKETS,
            registry=r,
        )
        self.tasks = Counter(
            f"{PREFIX}_tasks", "Whitelisted tasks run on this node.", ["task", "status"], registry=r
        )
        self.alerts = Gauge(
            f"{PREFIX}_alerts_active",
            "Threshold alerts raised and not yet cleared (1 while raised).",
            ["network", "node", "alert"],
            registry=r,
        )
        info = Gauge(
            f"{PREFIX}_build_info", "This node's software version.", ["version", "node"], registry=r
        )
        info.labels(__version__, node_id).set(1)
        self._suspected: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()
        if figures is not None:
            r.register(FiguresCollector(figures))

    # --- per answer ------------------------------------------------------------------------

    def record_answer(self, network_id: str, model_id: str, result: Any, error: bool) -> None:
        """One answer ended (``result``: its ``GenerationResult``; ``error``: it failed)."""
        labels = (network_id, model_id)
        finish = "error" if error else str(result.finish_reason or "stop")
        self.requests.labels(*labels, finish).inc()
        self.prompt_tokens.labels(*labels).inc(max(0, int(result.prompt_tokens)))
        self.generation_tokens.labels(*labels).inc(len(result.token_ids))
        if not result.token_ids and error:
            return  # no first token: no latency to speak of
        self.ttft.labels(*labels).observe(result.time_to_first_token)
        self.e2e.labels(*labels).observe(result.time_to_first_token + result.decode_seconds)
        itl, transit = self.itl.labels(*labels), self.transit.labels(network_id)
        compute: dict[str, Any] = {}  # node -> its histogram (a label lookup costs)
        for timing in result.step_timings:
            itl.observe(timing.round_trip_ms / 1000)
            transit.observe(max(0.0, timing.transit_ms()) / 1000)
            for node in timing.nodes:
                ms = node.get("compute_ms")
                if ms is None:
                    continue
                name = str(node.get("node", "?"))
                child = compute.get(name)
                if child is None:
                    child = compute[name] = self.node_compute.labels(network_id, name)
                child.observe(ms / 1000)

    # --- events ------------------------------------------------------------------------------

    def on_event(self, record: dict) -> None:
        """An event of the node's log (``EventLog`` listener)."""
        event, network = str(record.get("event")), record.get("network_id")
        self.events.labels(event, str(record.get("level"))).inc()
        key = (str(network), str(record.get("node_id")))
        with self._lock:
            if event in SUSPECT_EVENTS:
                self._suspected.setdefault(key, float(record.get("time") or time.time()))
            elif event == "node_online":
                self._suspected.pop(key, None)
            elif event == "failover":
                self.failovers.labels(str(network)).inc()
                began = self._suspected.pop(key, None)
                if began is not None:
                    pause = float(record.get("time") or time.time()) - began
                    self.failover_pause.labels(str(network)).observe(max(0.0, pause))

    # --- exposition ------------------------------------------------------------------------

    def render(self, accept: str | None = None, network_id: str | None = None) -> tuple[bytes, str]:
        """The metrics as the scraper asked (``Accept``: OpenMetrics or Prometheus text);
        ``network_id``: only that network's series and the node's own (a member of one
        network reads nothing of the node's other networks)."""
        encoder, content_type = choose_encoder(accept or "")
        registry = self.registry if network_id is None else _OneNetwork(self.registry, network_id)
        return encoder(registry), content_type


class _OneNetwork:
    """A view of a registry without the series of other networks."""

    def __init__(self, registry: CollectorRegistry, network_id: str) -> None:
        self.registry, self.network_id = registry, network_id

    def collect(self) -> Iterable[Metric]:
        for metric in self.registry.collect():
            kept = [
                s
                for s in metric.samples
                if s.labels.get("network", self.network_id) == self.network_id
            ]
            if kept or not metric.samples:
                metric.samples = kept
                yield metric


def _gauge(name: str, doc: str, labels: list[str] | None = None) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=labels)


class FiguresCollector(Collector):
    """Gauges read at scrape time from ``figures()`` (see ``service.node_figures``):

    ``{"node": {cpu_percent, ram_total_bytes, ram_free_bytes, disk_total_bytes,
    disk_free_bytes, rss_bytes}, "networks": {id: {version, role, serving, sessions,
    kv_pages_used, kv_pages_total, steps: {steps, batched_steps, rounds, largest_batch},
    queued: {class: steps},
    link_rtt_ms: {link: ms}, block_faults: {block: why}}}, "gateways": {id: {model,
    running, healthy, sessions}}, "health": {id: {node: {state, rtt_ms}}}}``
    """

    STATES = ("online", "suspect", "dead", "unknown")

    def __init__(self, figures: Figures) -> None:
        self.figures = figures

    def describe(self) -> list:
        return []  # collected fresh each scrape; nothing to check at registration

    def collect(self) -> Iterable[Metric]:
        try:
            figures = self.figures()
        except Exception:  # a scrape must answer even when one reading fails
            log.exception("cannot read the node's figures for /metrics")
            figures = {}
        yield from _node_metrics(figures.get("node") or {})
        yield from _span_metrics(figures.get("networks") or {})
        yield from _gateway_metrics(figures.get("gateways") or {})
        yield from self._health_metrics(figures.get("health") or {})

    def _health_metrics(self, health: dict) -> Iterable[Metric]:
        state = _gauge(
            "node_state",
            "The admin's view of each node: 1 for the state it is in (heartbeats).",
            ["network", "node", "state"],
        )
        rtt = _gauge(
            "heartbeat_rtt_seconds",
            "Round trip of the admin's last heartbeat.",
            ["network", "node"],
        )
        for network_id, nodes in health.items():
            for node_id, node in nodes.items():
                for name in self.STATES:
                    state.add_metric([network_id, node_id, name], float(node.get("state") == name))
                if node.get("rtt_ms") is not None:
                    rtt.add_metric([network_id, node_id], node["rtt_ms"] / 1000)
        yield state
        yield rtt


def _node_metrics(node: dict) -> Iterable[Metric]:
    pairs = [
        (
            "cpu_usage_ratio",
            "CPU load of the PC (0-1) since the last reading.",
            "cpu_percent",
            0.01,
        ),
        ("memory_total_bytes", "RAM of the PC.", "ram_total_bytes", 1),
        ("memory_available_bytes", "RAM available on the PC.", "ram_free_bytes", 1),
        ("disk_total_bytes", "Size of the disk holding the data dir.", "disk_total_bytes", 1),
        ("disk_free_bytes", "Free space on the disk holding the data dir.", "disk_free_bytes", 1),
        ("process_resident_memory_bytes", "Resident memory of the node process.", "rss_bytes", 1),
    ]
    for name, doc, key, scale in pairs:
        if node.get(key) is not None:
            gauge = _gauge(name, doc)
            gauge.add_metric([], float(node[key]) * scale)
            yield gauge


def _span_metrics(networks: dict) -> Iterable[Metric]:
    version = _gauge("config_version", "Version of the network config this node runs.", ["network"])
    serving = _gauge("span_serving", "1 while this node's span of the network serves.", ["network"])
    sessions = _gauge("kv_sessions", "Sessions held in this node's KV cache.", ["network"])
    used = _gauge("kv_pages_used", "KV cache pages in use.", ["network"])
    total = _gauge("kv_pages_capacity", "KV cache pages of the span's pool.", ["network"])
    usage = _gauge("kv_cache_usage_ratio", "KV cache pages in use (0-1).", ["network"])
    faults = _gauge("block_faults", "Block files of the span failing verification.", ["network"])
    rtt = _gauge("link_rtt_seconds", "Ping round trip of this node's links.", ["network", "link"])
    largest = _gauge("batch_size_max", "Largest batch of decode steps run at once.", ["network"])
    queued = _gauge(
        "span_queue_steps",
        "Steps waiting for this node's span worker, by priority class.",
        ["network", "class"],
    )
    counters = {
        "steps": _gauge_counter("span_steps", "Steps run by this node's span.", ["network"]),
        "batched_steps": _gauge_counter(
            "span_batched_steps", "Steps run in a batch of two or more.", ["network"]
        ),
        "rounds": _gauge_counter(
            "span_rounds", "Engine calls (one per batch or single step).", ["network"]
        ),
    }
    for network_id, net in networks.items():
        key = [network_id]
        if net.get("version") is not None:
            version.add_metric(key, net["version"])
        serving.add_metric(key, float(bool(net.get("serving"))))
        if net.get("sessions") is not None:
            sessions.add_metric(key, net["sessions"])
        if net.get("kv_pages_total"):
            used.add_metric(key, net.get("kv_pages_used") or 0)
            total.add_metric(key, net["kv_pages_total"])
            usage.add_metric(key, (net.get("kv_pages_used") or 0) / net["kv_pages_total"])
        faults.add_metric(key, len(net.get("block_faults") or {}))
        for link, ms in (net.get("link_rtt_ms") or {}).items():
            if ms is not None:
                rtt.add_metric([network_id, link], ms / 1000)
        steps = net.get("steps") or {}
        for name, family in counters.items():
            if steps.get(name) is not None:
                family.add_metric(key, steps[name])
        if steps.get("largest_batch") is not None:
            largest.add_metric(key, steps["largest_batch"])
        for name, count in (net.get("queued") or {}).items():
            queued.add_metric([network_id, name], count)
    yield from (version, serving, sessions, used, total, usage, faults, rtt, largest, queued)
    yield from counters.values()


def _gauge_counter(name: str, doc: str, labels: list[str]) -> CounterMetricFamily:
    return CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=labels)


def _gateway_metrics(gateways: dict) -> Iterable[Metric]:
    running = _gauge(
        "requests_running", "Answers in progress on this gateway.", ["network", "model"]
    )
    waiting = _gauge(
        "requests_waiting",
        "Answers in progress that wait for the network to heal (a node lost).",
        ["network", "model"],
    )
    healthy = _gauge("network_healthy", "1 while the gateway's chain is whole.", ["network"])
    open_ = _gauge("gateway_sessions", "Conversations held in the gateway's memory.", ["network"])
    for network_id, gateway in gateways.items():
        labels = [network_id, str(gateway.get("model"))]
        in_flight = gateway.get("running") or 0
        ok = bool(gateway.get("healthy", True))
        running.add_metric(labels, in_flight if ok else 0)
        waiting.add_metric(labels, 0 if ok else in_flight)
        healthy.add_metric([network_id], float(ok))
        open_.add_metric([network_id], gateway.get("sessions") or 0)
    yield from (running, waiting, healthy, open_)
