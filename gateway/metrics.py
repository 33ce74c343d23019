"""Prometheus metrics with vLLM's meanings, under the `strata:` prefix, in the text exposition format."""
from __future__ import annotations

import bisect
from collections import defaultdict

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
# The OpenTelemetry GenAI semantic conventions' bucket boundaries for the gen_ai.server.* metrics.
GENAI_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
GENAI_TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
GENAI_DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0)


class Histogram:
    __slots__ = ("buckets", "counts", "sum", "count")

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, v)] += 1
        self.sum += v
        self.count += 1


class Metrics:
    def __init__(self, model_name: str) -> None:
        self.labels = f'model_name="{model_name}"'
        self.model_name = model_name
        self.num_running = 0
        self.num_waiting = 0
        self.kv_cache_usage = 0.0
        self.num_preemptions = 0
        self.prefix_queries = 0
        self.prefix_hits = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.success: dict[str, int] = defaultdict(int)
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.e2e = Histogram(LATENCY_BUCKETS)
        self.queue_time = Histogram(LATENCY_BUCKETS)
        self.rejected = 0
        self.errors: dict[int, int] = {}  # HTTP status -> requests answered with it (an OpenAI error)
        self.stages: tuple = ()  # engine.stats.StageLoad per stage
        self.spans_dropped: dict[str, int] = {}  # per process
        self.expert_tokens = ()  # a mixture of experts' [layer, expert] token counts (engine.stats.EngineStats)
        # gen_ai.server.* histograms by operation (chat, text_completion)
        self.genai: dict[str, dict[str, Histogram]] = defaultdict(lambda: {
            "time_to_first_token": Histogram(GENAI_TTFT_BUCKETS),
            "time_per_output_token": Histogram(GENAI_TPOT_BUCKETS),
            "request_duration": Histogram(GENAI_DURATION_BUCKETS),
        })

    def render(self) -> str:
        lines: list[str] = []
        L = self.labels

        def scalar(name: str, kind: str, help_: str, value) -> None:
            lines.extend([f"# HELP strata:{name} {help_}", f"# TYPE strata:{name} {kind}", f"strata:{name}{{{L}}} {value}"])

        scalar("num_requests_running", "gauge", "Requests in the running batch.", self.num_running)
        scalar("num_requests_waiting", "gauge", "Requests waiting to be scheduled.", self.num_waiting)
        scalar("kv_cache_usage_perc", "gauge", "Fraction of KV-cache blocks in use (1 = full).", round(self.kv_cache_usage, 6))
        scalar("num_preemptions_total", "counter", "Sequences preempted for lack of KV blocks.", self.num_preemptions)
        scalar("prefix_cache_queries_total", "counter", "Prompt tokens looked up in the prefix cache.",
               self.prefix_queries)
        scalar("prefix_cache_hits_total", "counter", "Prompt tokens found in the prefix cache.", self.prefix_hits)
        scalar("prompt_tokens_total", "counter", "Prompt tokens of finished and running requests.", self.prompt_tokens)
        scalar("generation_tokens_total", "counter", "Generated tokens.", self.generation_tokens)
        scalar("request_rejected_total", "counter", "Requests refused by admission control (429).", self.rejected)
        lines += ["# HELP strata:trace_spans_dropped_total Spans lost to a full export queue or a failed export, "
                  "per process.", "# TYPE strata:trace_spans_dropped_total counter"]
        for process, n in sorted((self.spans_dropped or {"server": 0}).items()):
            lines.append(f'strata:trace_spans_dropped_total{{{L},process="{process}"}} {n}')
        for name, help_, field in (
                ("stage_busy_seconds_total", "Seconds each pipeline stage spent computing steps (its rate is the "
                 "stage's busy fraction).", "busy_s"),
                ("stage_steps_total", "Steps each pipeline stage computed (busy seconds over steps: its step time).",
                 "steps"),
                ("stage_sequences_total", "Sequences over each stage's steps (over steps: its batch size).", "seqs")):
            lines += [f"# HELP strata:{name} {help_}", f"# TYPE strata:{name} counter"]
            lines.extend(f'strata:{name}{{{L},stage="{k}"}} {getattr(s, field)}' for k, s in enumerate(self.stages))
        lines += ["# HELP strata:request_errors_total Requests answered with an error, by HTTP status.",
                  "# TYPE strata:request_errors_total counter"]
        for status, n in sorted(self.errors.items()):
            lines.append(f'strata:request_errors_total{{{L},status="{status}"}} {n}')
        # Declared for every model, so that a dashboard's query names a metric the server exports; series where a
        # mixture of experts has routed tokens.
        lines += ["# HELP strata:expert_tokens_total Tokens routed to each expert of each mixture-of-experts layer.",
                  "# TYPE strata:expert_tokens_total counter"]
        if any(any(row) for row in self.expert_tokens):
            for layer, row in enumerate(self.expert_tokens.tolist()):
                if any(row):
                    lines.extend(f'strata:expert_tokens_total{{{L},layer="{layer}",expert="{e}"}} {n}'
                                 for e, n in enumerate(row))
        lines += ["# HELP strata:request_success_total Finished requests by finish reason.",
                  "# TYPE strata:request_success_total counter"]
        for reason in ("stop", "length", "abort"):
            lines.append(f'strata:request_success_total{{{L},finished_reason="{reason}"}} {self.success.get(reason, 0)}')
        for name, help_, h in (
            ("time_to_first_token_seconds", "Time to first token.", self.ttft),
            ("inter_token_latency_seconds", "Time between consecutive output tokens.", self.itl),
            ("e2e_request_latency_seconds", "End-to-end request latency.", self.e2e),
            ("request_queue_time_seconds", "Time a request waited before its first step.", self.queue_time),
        ):
            lines += [f"# HELP strata:{name} {help_}", f"# TYPE strata:{name} histogram"]
            _histogram(lines, f"strata:{name}", L, h)
        for name, help_ in (
            ("time_to_first_token", "Time to generate the first token (gen_ai.server.time_to_first_token)."),
            ("time_per_output_token", "Time per output token after the first (gen_ai.server.time_per_output_token)."),
            ("request_duration", "Time from the request's arrival to its last token (gen_ai.server.request.duration)."),
        ):
            metric = f"gen_ai_server_{name}_seconds"
            lines += [f"# HELP {metric} {help_}", f"# TYPE {metric} histogram"]
            for operation, hists in sorted(self.genai.items()):
                labels = (f'gen_ai_operation_name="{operation}",gen_ai_provider_name="strata",'
                          f'gen_ai_request_model="{self.model_name}"')
                _histogram(lines, metric, labels, hists[name])
        return "\n".join(lines) + "\n"


def _histogram(lines: list[str], name: str, labels: str, h: Histogram) -> None:
    cum = 0
    for bound, c in zip(h.buckets, h.counts):
        cum += c
        lines.append(f'{name}_bucket{{{labels},le="{bound}"}} {cum}')
    lines.append(f'{name}_bucket{{{labels},le="+Inf"}} {h.count}')
    lines.append(f"{name}_sum{{{labels}}} {h.sum}")
    lines.append(f"{name}_count{{{labels}}} {h.count}")
