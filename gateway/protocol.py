"""Request and response bodies of the OpenAI API, as pydantic models.

Requests forbid unknown fields: a field the server does not implement is refused with a
400 that names it, never silently ignored. Types are strict, as OpenAI's are: "10" is not
an integer, 0 is not a boolean, true is not a token id; NaN and infinities are no numbers.
A null, which OpenAI accepts for every optional field, means the field was not given.
Every number is bounded here to what the engine can hold; what it means (a temperature's
range, a token id inside the vocabulary, a context that fits) is checked where that is
known (batching.sampling_params, the routes).
"""
from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag, model_validator

INT32_MAX = 2**31 - 1
# OpenAI takes up to four stop sequences; each is bounded too, as is every list a request carries.
MAX_STOP_STRINGS = 4
MAX_STOP_STRING_CHARS = 1024
MAX_STOP_TOKEN_IDS = 256
MAX_LOGIT_BIAS = 1024
MAX_CHOICES = 16

TokenId = Annotated[int, Field(ge=0, le=INT32_MAX)]  # inside the vocabulary is checked by the routes
StopString = Annotated[str, Field(max_length=MAX_STOP_STRING_CHARS)]


def at_most(n: int):
    """A length bound checked before the items are: a million bad entries must not cost a million errors."""
    def check(value: Any) -> Any:
        if isinstance(value, (list, dict)) and len(value) > n:
            raise ValueError(f"at most {n} entries, got {len(value)}")
        return value

    return BeforeValidator(check)


def List(item: Any, **bounds: Any) -> Any:
    """A list that stops at its first bad item (fail_fast), so a long bad list costs one error, not one per item."""
    return Annotated[list[item], Field(fail_fast=True, **bounds)]


def _prompt_form(value: Any) -> str:
    """Which of the prompt's forms a value is meant as, from its first item: one validation, not four."""
    if isinstance(value, list) and value:
        first = value[0]
        return "prompt-texts" if isinstance(first, str) else "prompt-batch" if isinstance(first, list) else "prompt-ids"
    return "prompt-ids" if isinstance(value, list) else "prompt-text"


Prompt = Annotated[
    Annotated[str, Tag("prompt-text")] | Annotated[List(str), Tag("prompt-texts")]
    | Annotated[List(TokenId), Tag("prompt-ids")] | Annotated[List(List(TokenId)), Tag("prompt-batch")],
    Discriminator(_prompt_form),
]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _null_is_not_given(cls, data: Any) -> Any:
        if isinstance(data, dict):
            fields = cls.model_fields
            return {k: v for k, v in data.items() if v is not None or k not in fields or fields[k].is_required()}
        return data


class StreamOptions(StrictModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class SamplingFields(StrictModel):
    """Fields the completions and chat endpoints share."""

    model: str
    max_tokens: int | None = Field(default=None, ge=1, le=INT32_MAX)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = Field(default=None, ge=-1, le=INT32_MAX)
    min_p: float | None = None
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)
    stop: StopString | Annotated[List(StopString), at_most(MAX_STOP_STRINGS)] | None = None
    stop_token_ids: Annotated[List(TokenId), at_most(MAX_STOP_TOKEN_IDS)] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: Annotated[dict[str, float], at_most(MAX_LOGIT_BIAS)] | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0, le=INT32_MAX)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None


class CompletionRequest(SamplingFields):
    prompt: Prompt
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    suffix: None = None
    best_of: int | None = Field(default=None, ge=1, le=1)


MAX_TOOLS = 128  # as OpenAI
MAX_METADATA = 16
# OpenAI's metadata: at most 16 pairs, keys of 64 characters and values of 512.
Metadata = Annotated[dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]],
                     at_most(MAX_METADATA)]
NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"  # a function's or a schema's name, as OpenAI takes them


class ContentPart(StrictModel):
    """One part of a message's content. Text parts are joined; a part of another kind is refused by the routes,
    by name, rather than by a validation error that does not say this server reads text only."""

    model_config = ConfigDict(extra="allow", strict=True)
    type: str
    text: str | None = None


class FunctionCall(StrictModel):
    name: str
    arguments: str  # JSON, as the model wrote it


class ToolCall(StrictModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(StrictModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | List(ContentPart) | None = None
    name: str | None = None
    tool_calls: Annotated[List(ToolCall), at_most(MAX_TOOLS)] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool's answer: to which call
    refusal: str | None = None


class FunctionDefinition(StrictModel):
    name: Annotated[str, Field(pattern=NAME_PATTERN)]
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; none: no arguments
    strict: bool | None = None


class Tool(StrictModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(StrictModel):
    name: str


class NamedToolChoice(StrictModel):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class JSONSchemaFormat(StrictModel):
    name: Annotated[str, Field(pattern=NAME_PATTERN)]
    description: str | None = None
    schema_: Annotated[dict[str, Any] | None, Field(alias="schema")] = None
    strict: bool | None = None
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, populate_by_name=True)


class TextFormat(StrictModel):
    type: Literal["text"]


class JSONObjectFormat(StrictModel):
    type: Literal["json_object"]


class JSONSchemaResponseFormat(StrictModel):
    type: Literal["json_schema"]
    json_schema: JSONSchemaFormat


ResponseFormat = Annotated[TextFormat | JSONObjectFormat | JSONSchemaResponseFormat, Field(discriminator="type")]


class OpenAIFields(StrictModel):
    """OpenAI's fields that change nothing this server does, or that it honours as they are, and those it knows but
    cannot honour: present here so that the routes refuse the latter by name (gateway.openai_routes.refuse_unhonoured)."""

    store: bool | None = None  # false: nothing is kept, which is what this server does
    metadata: Metadata | None = None
    service_tier: str | None = None  # auto and default: one tier here
    parallel_tool_calls: bool = True
    audio: Any = None
    modalities: Annotated[List(str), at_most(4)] | None = None
    prediction: Any = None
    web_search_options: Any = None


class ChatCompletionRequest(SamplingFields, OpenAIFields):
    messages: List(ChatMessage, min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=INT32_MAX)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    response_format: ResponseFormat | None = None
    tools: Annotated[List(Tool), at_most(MAX_TOOLS)] | None = None
    tool_choice: ToolChoice | None = None


# ---- the Responses API ------------------------------------------------------------------
MAX_INPUT_ITEMS = 4096


class InputPart(StrictModel):
    """A part of an input message's content: input_text (output_text in an assistant's earlier turn) is read; the
    others are refused by the route, by name."""

    model_config = ConfigDict(extra="allow", strict=True)
    type: str
    text: str | None = None


class InputMessage(StrictModel):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | List(InputPart)
    id: str | None = None
    status: str | None = None


class FunctionCallItem(StrictModel):
    """An earlier turn's call, as a response's output gave it."""

    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: str | None = None
    status: str | None = None


class FunctionCallOutputItem(StrictModel):
    type: Literal["function_call_output"]
    call_id: str
    output: str | List(InputPart)
    id: str | None = None
    status: str | None = None


class OtherInputItem(StrictModel):
    """An item of a kind this server does not take (reasoning, a web search's call, ...): refused by name."""

    model_config = ConfigDict(extra="allow", strict=True)
    type: str


def _item_kind(value: Any) -> str:
    kind = value.get("type", "message") if isinstance(value, dict) else "message"
    return kind if kind in ("message", "function_call", "function_call_output") else "other"


InputItem = Annotated[
    Annotated[InputMessage, Tag("message")] | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")] | Annotated[OtherInputItem, Tag("other")],
    Discriminator(_item_kind),
]


class FunctionTool(StrictModel):
    type: str  # "function"; a tool of another kind (web_search, file_search, ...) is refused by name
    name: Annotated[str, Field(pattern=NAME_PATTERN)] | None = None
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None
    model_config = ConfigDict(extra="allow", strict=True)


class FunctionToolChoice(StrictModel):
    type: Literal["function"]
    name: str


class TextJSONSchemaFormat(StrictModel):
    type: Literal["json_schema"]
    name: Annotated[str, Field(pattern=NAME_PATTERN)]
    schema_: Annotated[dict[str, Any], Field(alias="schema")]
    description: str | None = None
    strict: bool | None = None
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, populate_by_name=True)


class TextConfig(StrictModel):
    format: Annotated[TextFormat | JSONObjectFormat | TextJSONSchemaFormat, Field(discriminator="type")] | None = None
    verbosity: Literal["medium"] | None = None  # the only one a model without that training has


class ResponsesRequest(StrictModel):
    model: str
    input: str | Annotated[List(InputItem), at_most(MAX_INPUT_ITEMS)]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1, le=INT32_MAX)
    temperature: float | None = None
    top_p: float | None = None
    tools: Annotated[List(FunctionTool), at_most(MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | FunctionToolChoice | None = None
    parallel_tool_calls: bool = True
    text: TextConfig | None = None
    stream: bool = False
    user: str | None = None
    metadata: Metadata | None = None
    service_tier: str | None = None
    # Known, and refused by the route unless off: this server keeps no responses and runs none in the background.
    store: bool | None = None
    previous_response_id: str | None = None
    background: bool | None = None
    include: Annotated[List(str), at_most(16)] | None = None
    reasoning: Any = None


class TokenizeRequest(StrictModel):
    model: str | None = None
    prompt: str | None = None
    messages: List(ChatMessage) | None = None
    tools: Annotated[List(Tool), at_most(MAX_TOOLS)] | None = None  # rendered as the chat route renders them
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(StrictModel):
    model: str | None = None
    tokens: List(TokenId)


# ---- responses (built as dicts on the hot path; these document their shape) -------------
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: dict | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: dict | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None  # none where the answer is only tool calls
    tool_calls: list[ToolCall] | None = None
    refusal: None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatChoiceMessage
    logprobs: dict | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class ResponseOutputItem(BaseModel):
    """A message (type "message": role, content of output_text parts) or a call (type "function_call": call_id,
    name, arguments as JSON text)."""

    model_config = ConfigDict(extra="allow")
    id: str
    type: Literal["message", "function_call"]
    status: Literal["in_progress", "completed", "incomplete"]


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: dict
    output_tokens: int
    output_tokens_details: dict
    total_tokens: int


class ResponseObject(BaseModel):
    """A Response, as /v1/responses answers; streamed, the typed events (response.created, ... response.completed)
    carry it and its items as they form."""

    model_config = ConfigDict(extra="allow")
    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["completed", "incomplete", "in_progress", "failed"]
    model: str
    output: list[ResponseOutputItem]
    incomplete_details: dict | None = None
    usage: ResponseUsage | None = None


class WeightFormats(BaseModel):
    """What the model's matrix products run at: per decoder layer ("q4_k", "q4_k+q6_k" where its products differ,
    "bfloat16"), and the LM head."""

    layers: list[str]
    lm_head: str


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "strata"
    max_model_len: int
    weight_formats: WeightFormats


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    tokens: list[TokenId]
    count: int
    max_model_len: int


class DetokenizeResponse(BaseModel):
    prompt: str


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
