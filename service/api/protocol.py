"""The HTTP protocol as msgspec Structs: every request body, response body and stream chunk (OpenAI's shapes).

Request schemas are closed (`forbid_unknown_fields`): a misspelt parameter is a 400 naming it, not silently
ignored. The fields OpenAI's clients send that we accept but do not act on (`user`) are declared.
Constraints live in the types (`Meta`), so the OpenAPI schema states them and msgspec enforces them.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta, Struct

MAX_N = 4
MAX_STOP = 4
MAX_TOP_LOGPROBS = 5

Temperature = Annotated[float, Meta(ge=0.0, le=2.0, description="0 is greedy")]
TopP = Annotated[float, Meta(gt=0.0, le=1.0)]
TopK = Annotated[int, Meta(ge=0, description="0 is off")]
MinP = Annotated[float, Meta(ge=0.0, le=1.0)]
Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]
RepetitionPenalty = Annotated[float, Meta(gt=0.0, le=10.0)]
MaxTokens = Annotated[int, Meta(ge=1)]
N = Annotated[int, Meta(ge=1, le=MAX_N)]
Seed = Annotated[int, Meta(description="any integer; the same seed gives the same sample")]
StopList = Annotated[list[str], Meta(max_length=MAX_STOP)]
TopLogprobs = Annotated[int, Meta(ge=0, le=MAX_TOP_LOGPROBS)]
ModelName = Annotated[str, Meta(max_length=256)]


class StreamOptions(Struct, forbid_unknown_fields=True):
    include_usage: bool = False


class _Sampling(Struct, forbid_unknown_fields=True, kw_only=True):
    model: ModelName
    max_tokens: MaxTokens | None = None
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    top_k: TopK = 0
    min_p: MinP = 0.0
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    repetition_penalty: RepetitionPenalty = 1.0
    n: N = 1
    stop: str | StopList | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: Seed | None = None
    # vLLM's extension: keep generating past the end-of-turn token (benchmarks want fixed lengths).
    ignore_eos: bool = False
    user: Annotated[str, Meta(max_length=256)] | None = None


class ChatMessage(Struct, forbid_unknown_fields=True):
    role: Literal["system", "user", "assistant"]
    content: Annotated[str, Meta(max_length=1_000_000)]
    name: Annotated[str, Meta(max_length=64)] | None = None


class ChatCompletionRequest(_Sampling, kw_only=True):
    messages: Annotated[list[ChatMessage], Meta(min_length=1, max_length=512)]
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool = False
    top_logprobs: TopLogprobs | None = None


class CompletionRequest(_Sampling, kw_only=True):
    prompt: Annotated[str, Meta(min_length=1, max_length=1_000_000)]
    # Completions API: the number of alternatives per token (0..5); null is off.
    logprobs: TopLogprobs | None = None
    echo: bool = False


class TokenizeRequest(Struct, forbid_unknown_fields=True, kw_only=True):
    model: ModelName | None = None
    prompt: Annotated[str, Meta(max_length=1_000_000)] | None = None
    # Rendered as the chat endpoint renders them (generation prompt included).
    messages: Annotated[list[ChatMessage], Meta(min_length=1, max_length=512)] | None = None


# --- responses ---------------------------------------------------------------------------------------------
class PromptTokensDetails(Struct):
    cached_tokens: int = 0


class Usage(Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class TopLogprob(Struct):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(Struct):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(Struct):
    content: list[TokenLogprob]


class AssistantMessage(Struct):
    content: str
    role: str = "assistant"


class ChatChoice(Struct):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    object: str = "chat.completion"
    system_fingerprint: str | None = None


class Delta(Struct, omit_defaults=True):
    role: str | None = None
    content: str | None = None


class ChatChunkChoice(Struct):
    index: int
    delta: Delta
    finish_reason: str | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChunkChoice]
    object: str = "chat.completion.chunk"
    usage: Usage | None = None


class CompletionLogprobs(Struct):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class CompletionChoice(Struct):
    index: int
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None


class Completion(Struct):
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    object: str = "text_completion"
    usage: Usage | None = None


class ModelCard(Struct):
    id: str
    created: int
    owned_by: str = "instructlm"
    object: str = "model"
    max_model_len: int | None = None


class ModelList(Struct):
    data: list[ModelCard]
    object: str = "list"


class TokenizeResponse(Struct):
    tokens: list[int]
    count: int
    max_model_len: int


class ErrorBody(Struct):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(Struct):
    error: ErrorBody


class Health(Struct):
    status: str
    ready: bool


def encode(obj: Struct) -> bytes:
    return msgspec.json.encode(obj)
