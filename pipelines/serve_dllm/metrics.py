"""Server metrics in the Prometheus text exposition format (no client library needed).

Counters: ``dllm_requests_total{endpoint,status}``, ``dllm_requests_cancelled_total``,
``dllm_tokens_in_total``, ``dllm_tokens_out_total``, ``dllm_forward_passes_total`` (batched
passes), ``dllm_row_forward_passes_total`` (rows with masked tokens, summed over passes).
Gauges: ``dllm_batch_size`` (rows in the running batch), ``dllm_queue_length``.
Histograms: ``dllm_request_latency_seconds``, ``dllm_time_to_first_block_seconds``,
``dllm_forward_passes_per_token`` (per request: its passes / its output tokens),
``dllm_pass_batch_size`` (rows per forward pass).
"""

from __future__ import annotations

import bisect
import threading

__all__ = ["Histogram", "Metrics"]

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
RATIO_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 4.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Histogram:
    """Cumulative-bucket histogram: ``observe(v)``; ``lines(name)`` renders it."""

    def __init__(self, buckets):
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.buckets, value)
        if i < len(self.counts):
            self.counts[i] += 1
        self.total += 1
        self.sum += value

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for bound, n in zip(self.buckets, self.counts):
            running += n
            out.append(f'{name}_bucket{{le="{bound}"}} {running}')
        out += [f'{name}_bucket{{le="+Inf"}} {self.total}', f"{name}_sum {self.sum}", f"{name}_count {self.total}"]
        return out


class Metrics:
    """Thread-safe counters, gauges and histograms of the server (engine hooks + request ends)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.cancelled = 0
        self.tokens_in = 0
        self.tokens_out = 0
        self.passes = 0
        self.row_passes = 0
        self.batch_size = 0
        self.queue_length = 0
        self.latency = Histogram(LATENCY_BUCKETS)
        self.first_block = Histogram(LATENCY_BUCKETS)
        self.passes_per_token = Histogram(RATIO_BUCKETS)
        self.pass_batch = Histogram(BATCH_BUCKETS)

    # engine hooks (engine thread)
    def on_pass(self, rows: int, active_rows: int) -> None:
        with self._lock:
            self.passes += 1
            self.row_passes += active_rows
            self.pass_batch.observe(rows)

    def on_batch(self, rows: int) -> None:
        self.batch_size = rows

    def on_queue(self, waiting: int) -> None:
        self.queue_length = waiting

    # request hooks (server)
    def on_request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, status)] = self.requests.get((endpoint, status), 0) + 1

    def on_generation(self, *, tokens_in, tokens_out, forward_passes, latency_s, first_block_s, cancelled) -> None:
        with self._lock:
            self.tokens_in += tokens_in
            self.tokens_out += tokens_out
            self.cancelled += int(cancelled)
            self.latency.observe(latency_s)
            if first_block_s is not None:
                self.first_block.observe(first_block_s)
            if tokens_out:
                self.passes_per_token.observe(forward_passes / tokens_out)

    def render(self) -> str:
        """The Prometheus text exposition of every metric."""
        with self._lock:
            lines = [
                "# HELP dllm_requests_total HTTP requests by endpoint and status.",
                "# TYPE dllm_requests_total counter",
            ]
            for (endpoint, status), n in sorted(self.requests.items()):
                lines.append(f'dllm_requests_total{{endpoint="{endpoint}",status="{status}"}} {n}')
            scalars = [
                ("dllm_requests_cancelled_total", "counter", "generations dropped: client gone", self.cancelled),
                ("dllm_tokens_in_total", "counter", "prompt tokens of finished generations", self.tokens_in),
                ("dllm_tokens_out_total", "counter", "generated tokens returned", self.tokens_out),
                ("dllm_forward_passes_total", "counter", "batched forward passes", self.passes),
                ("dllm_row_forward_passes_total", "counter", "passes x rows with masked tokens", self.row_passes),
                ("dllm_batch_size", "gauge", "rows in the running batch", self.batch_size),
                ("dllm_queue_length", "gauge", "requests waiting to join the batch", self.queue_length),
            ]  # fmt: skip
            for name, kind, help_text, value in scalars:
                lines += [f"# HELP {name} {help_text}.", f"# TYPE {name} {kind}", f"{name} {value}"]
            hists = [
                ("dllm_request_latency_seconds", "submission to last token", self.latency),
                ("dllm_time_to_first_block_seconds", "submission to the first committed block", self.first_block),
                ("dllm_forward_passes_per_token", "per request: forward passes / output tokens", self.passes_per_token),
                ("dllm_pass_batch_size", "rows per forward pass", self.pass_batch),
            ]
            for name, help_text, hist in hists:
                lines += [f"# HELP {name} {help_text}.", f"# TYPE {name} histogram", *hist.lines(name)]
        return "\n".join(lines) + "\n"
