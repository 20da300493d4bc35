"""Request and response bodies of the OpenAI-compatible API (pydantic).

Requests validate types and ranges here (a wrong type or an out-of-range value becomes a 400 in
OpenAI's error shape, see errors.py). Unknown fields are accepted and ignored, as OpenAI's own
clients send extras (`user`, `metadata`, `store`, ...); fields moonlet cannot honour (tools, images,
`best_of`, ...) are listed in UNSUPPORTED and refused by the route with a 400 naming the parameter.
Responses are plain dicts built in app.py; their models here exist for the OpenAPI document.
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_N = 16  # choices per request (each is a running sequence in the batch)
MAX_STOP = 4  # stop strings per request, as OpenAI


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(description="model id from GET /v1/models")
    max_tokens: int | None = Field(None, ge=1, description="tokens to generate (default: the rest of the context)")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, description=f"choices to generate (at most {MAX_N})")
    stream: bool = False
    stop: str | list[str] | None = Field(None, description=f"up to {MAX_STOP} strings; the text ends before them")
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1, description="sampler seed (choice i uses seed + i)")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    stream_options: "StreamOptions | None" = None
    # extensions (as in vLLM): not in OpenAI's API, harmless to clients that never send them
    top_k: int = Field(0, ge=0, description="extension: keep the k most likely tokens (0 = off)")
    min_p: float = Field(0.0, ge=0.0, le=1.0, description="extension: min-p filtering")
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0, description="extension: CTRL-style penalty")
    ignore_eos: bool = Field(False, description="extension: keep generating past end-of-sequence")

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        v = [v] if isinstance(v, str) else list(v)
        if len(v) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences are allowed, got {len(v)}")
        if any(s == "" for s in v):
            raise ValueError("stop sequences must not be empty strings")
        return v


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str = Field(description="system | developer (as system) | user | assistant")
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(description="the conversation so far, oldest first")
    max_completion_tokens: int | None = Field(None, ge=1, description="same as max_tokens (newer name)")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class CompletionRequest(_Request):
    prompt: Union[str, list[str], list[int], list[list[int]]] = Field(
        description="text, texts, token ids, or lists of token ids")
    logprobs: int | None = Field(None, ge=0, le=20, description="top alternatives per token to return")
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    max_tokens: int | None = Field(16, ge=1, description="tokens to generate (OpenAI's default: 16)")


ChatCompletionRequest.model_rebuild()
CompletionRequest.model_rebuild()

# parameter -> why it is refused (only when the client actually sets it to something non-default)
UNSUPPORTED: dict[str, str] = {
    "tools": "tool calling is not supported",
    "tool_choice": "tool calling is not supported",
    "functions": "function calling is not supported",
    "function_call": "function calling is not supported",
    "parallel_tool_calls": "tool calling is not supported",
    "response_format": "structured output (response_format) is not supported",
    "logit_bias": "logit_bias is not supported",
    "audio": "audio output is not supported",
    "modalities": "only text output is supported",
    "prediction": "predicted outputs are not supported",
    "web_search_options": "web search is not supported",
    "reasoning_effort": "reasoning_effort is not supported",
}
# values of unsupported parameters that mean "not used"
UNSUPPORTED_OK: dict[str, tuple[Any, ...]] = {
    "tool_choice": (None, "none"), "response_format": (None, {"type": "text"}), "logit_bias": (None, {}),
    "modalities": (None, ["text"]), "tools": (None, []), "functions": (None, []),
    "parallel_tool_calls": (None, False, True),
}


# ---- responses (documentation only) -------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class ChatChoice(BaseModel):
    index: int
    message: dict[str, Any]
    logprobs: dict[str, Any] | None = None
    finish_reason: Literal["stop", "length"] | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: dict[str, Any] | None = None
    finish_reason: Literal["stop", "length"] | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "moonlet"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
