"""Prometheus metrics of the server, named as vLLM names them (`vllm:` → `speckv:`).

Each app has its own `CollectorRegistry`, so several apps in one process (tests) never collide
on the global registry. prometheus-client appends `_total` to counter names when it exposes
them, as vLLM's counters read too (`speckv:spec_decode_num_drafts_total`).

Every series carries vLLM's `model_name` label (the served model's id), so dashboards built for
vLLM's metrics read ours.

Speculative counters count what the target verified: `num_draft_tokens` is the verified drafted
tokens (γ per step), so accepted / draft tokens is the acceptance rate; tokens a controller
drafted but did not send to the target are counted separately.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, disable_created_metrics, generate_latest
from prometheus_client import Counter as _Counter
from prometheus_client import Gauge as _Gauge
from prometheus_client import Histogram as _Histogram

from speckv.records import StepRecord

# Seconds; first tokens include reading the prompt, so they reach further than per-token times.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
LATENCY_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0)
GAMMA_BUCKETS = (0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 16, 20, 24, 32, 48, 64)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
PASS_TOKEN_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256, 512)


class _Labelled:
    """A metric with more labels than `model_name`, that one filled in."""

    def __init__(self, metric, model_name: str):
        self.metric, self.model_name = metric, model_name

    def labels(self, **labels):
        return self.metric.labels(**labels, model_name=self.model_name)


class ServerMetrics:
    """Every metric the server exports, in its own registry, labelled with `model_name`."""

    def __init__(self, model_name: str = "speckv") -> None:
        # No `*_created` series next to every counter (as vLLM does): a process-wide switch of
        # prometheus-client, harmless in a server process, where nothing else reads them.
        disable_created_metrics()
        self.registry = CollectorRegistry()
        self.model_name = model_name
        r = self.registry
        Counter, Gauge, Histogram = (self._named(kind) for kind in (_Counter, _Gauge, _Histogram))
        self.num_drafts = Counter(
            "speckv:spec_decode_num_drafts", "Steps in which the target verified drafted tokens", registry=r
        )
        self.num_draft_tokens = Counter(
            "speckv:spec_decode_num_draft_tokens", "Drafted tokens the target verified", registry=r
        )
        self.num_accepted_tokens = Counter(
            "speckv:spec_decode_num_accepted_tokens", "Drafted tokens the target accepted", registry=r
        )
        self.accepted_per_pos = Counter(
            "speckv:spec_decode_num_accepted_tokens_per_pos",
            "Accepted drafted tokens by position in their step (0 = first drafted token)",
            ["position"],
            registry=r,
        )
        self.unverified_draft_tokens = Counter(
            "speckv:spec_decode_num_unverified_draft_tokens",
            "Drafted tokens the controller kept from the target (verify_count)",
            registry=r,
        )
        self.gamma = Histogram(
            "speckv:spec_decode_gamma",
            "γ per step: drafted tokens sent to the target",
            buckets=GAMMA_BUCKETS,
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "speckv:time_to_first_token_seconds",
            "Seconds from arrival (queueing included) to the first generated tokens",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.time_per_output_token = Histogram(
            "speckv:time_per_output_token_seconds",
            "Seconds per output token after the first step (a step's time shared by its tokens)",
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        self.e2e_latency = Histogram(
            "speckv:e2e_request_latency_seconds",
            "Seconds from arrival to the last token of finished requests",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "speckv:batch_size",
            "Sequences per target pass (stepping or reading their prompt)",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.verify_tokens = Histogram(
            "speckv:verify_tokens_per_pass",
            "Tokens a target pass scored for the sequences that stepped (drafted + 1 each)",
            buckets=PASS_TOKEN_BUCKETS,
            registry=r,
        )
        self.running = Gauge("speckv:num_requests_running", "Sequences being decoded", registry=r)
        self.waiting = Gauge("speckv:num_requests_waiting", "Requests queued for a decoding slot", registry=r)
        self.success = Counter(
            "speckv:request_success", "Finished requests by finish reason", ["finished_reason"], registry=r
        )
        self.failure = Counter(
            "speckv:request_failure",
            "Requests that did not finish: abort (client gone), shutdown, error, queue_full (rejected)",
            ["reason"],
            registry=r,
        )
        self.prompt_tokens = Counter("speckv:prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter("speckv:generation_tokens", "Generated tokens", registry=r)

    def _named(self, kind):
        """`kind` (Counter, Gauge, Histogram) made with a `model_name` label after any others,
        and handed out with it filled in."""

        def make(name, documentation, labelnames=(), **kwargs):
            metric = kind(name, documentation, [*labelnames, "model_name"], **kwargs)
            if labelnames:
                return _Labelled(metric, self.model_name)
            return metric.labels(model_name=self.model_name)

        return make

    def observe_step(self, record: StepRecord) -> None:
        """One speculative step's counters (a plain target step has γ = 0 and drafts nothing)."""
        self.gamma.observe(record.gamma)
        if record.drafted > record.gamma:
            self.unverified_draft_tokens.inc(record.drafted - record.gamma)
        if record.gamma == 0:
            return
        self.num_drafts.inc()
        self.num_draft_tokens.inc(record.gamma)
        self.num_accepted_tokens.inc(record.accepted)
        for position in range(record.accepted):
            self.accepted_per_pos.labels(position=str(position)).inc()

    def observe_pass(self, sequences: int, verify_tokens: int) -> None:
        """One batched target pass: how many sequences it served, how many tokens it verified."""
        self.batch_size.observe(sequences)
        self.verify_tokens.observe(verify_tokens)

    def set_queue(self, running: int, waiting: int) -> None:
        self.running.set(running)
        self.waiting.set(waiting)

    def render(self) -> bytes:
        return generate_latest(self.registry)
