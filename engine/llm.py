"""The offline API: `LLM(model_dir).generate(prompts, sampling_params)`."""
from __future__ import annotations

import weakref
from collections.abc import Sequence as Seq
from pathlib import Path

from batching.sampling_params import SamplingParams
from engine.llm_engine import EngineConfig, LLMEngine
from engine.outputs import CompletionOutput

Prompt = str | list[int]


class LLM:
    """The offline engine. Use it as a context manager or call close(); one left open closes when it is collected
    or the interpreter exits, so its stage processes always leave as told, never on a broken link."""

    def __init__(self, model: str, **engine_options) -> None:
        self.engine = LLMEngine(EngineConfig(model=str(model), **engine_options))
        self._close = weakref.finalize(self, self.engine.shutdown)
        self.tokenizer = self.engine.tokenizer
        self.model_name = Path(model).name

    def generate(
        self,
        prompts: Prompt | Seq[Prompt],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
    ) -> list[CompletionOutput]:
        """Run every prompt to completion, batched together; results in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        params = sampling_params or SamplingParams()
        params_list = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(params_list) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params_list)} sampling params")
        results: dict[int, CompletionOutput] = {}
        order = []
        spans = {}
        for prompt, p in zip(prompts, params_list):
            ids = self._token_ids(prompt)
            span = self.request_span(p)
            seq_id = self.engine.add_request(ids, p, sampled_ids(span))
            order.append(seq_id)
            results[seq_id] = CompletionOutput("", [], None, [] if p.logprobs is not None else None, ids)
            spans[seq_id] = span
        while self.engine.has_unfinished():
            for d in self.engine.step():
                r = results[d.seq_id]
                r.text += d.text
                r.token_ids.extend(d.token_ids)
                if d.logprobs is not None and r.logprobs is not None:
                    r.logprobs.extend(d.logprobs)
                if d.finished:
                    r.finish_reason = d.finish_reason
                    r.num_cached_tokens = d.num_cached_tokens
                    r.error = d.error
                    if (span := spans.pop(d.seq_id)) is not None:
                        span.set_attribute("gen_ai.response.finish_reasons", [d.finish_reason])
                        span.set_attribute("gen_ai.usage.input_tokens", len(r.prompt_token_ids))
                        span.set_attribute("gen_ai.usage.output_tokens", len(r.token_ids))
                        span.end()
        return [results[s] for s in order]

    def request_span(self, p: SamplingParams):
        """With tracing on, each prompt is a GenAI request span, as an HTTP request's would be."""
        tracing = self.engine.tracing
        if tracing is None:
            return None
        attrs = {"gen_ai.operation.name": "text_completion", "gen_ai.provider.name": "strata",
                 "gen_ai.request.model": self.model_name, "gen_ai.request.temperature": p.temperature,
                 "gen_ai.request.top_p": p.top_p, "gen_ai.request.stream": False, "gen_ai.request.choice.count": 1}
        if p.max_tokens is not None:
            attrs["gen_ai.request.max_tokens"] = p.max_tokens
        if p.seed is not None:
            attrs["gen_ai.request.seed"] = p.seed
        return tracing.tracer.start_span(f"text_completion {self.model_name}", attributes=attrs)

    def _token_ids(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer, and this checkpoint has no tokenizer.json")
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def close(self) -> None:
        self._close()  # once: later calls do nothing

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def sampled_ids(span) -> tuple[int, int] | None:
    if span is None:
        return None
    ctx = span.get_span_context()
    return (ctx.trace_id, ctx.span_id) if ctx.trace_flags.sampled else None
