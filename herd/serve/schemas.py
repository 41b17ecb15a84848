"""The OpenAI API's shapes as pydantic models (requests: what herd accepts; responses: for the OpenAPI document,
handlers build the same shapes as dicts), the request limits, and APIError, OpenAI's error shape. No engine here."""
from __future__ import annotations

from contextvars import ContextVar
from typing import Annotated, Any, Literal, Union

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator
from pydantic_core import PydanticCustomError

from .limits import LimitError, check_body, current as current_limits

# Limits that no flag changes (the others: limits.Limits)
MAX_N = 8                      # choices per request
MAX_TOP_LOGPROBS = 20          # chat top_logprobs
MAX_COMPLETION_LOGPROBS = 20   # completions logprobs (OpenAI's legacy limit is 5; vLLM's default 20, lm-eval's 1)
MAX_PROMPTS = 32               # prompts in one /v1/completions request
COMPLETIONS_DEFAULT_MAX_TOKENS = 16   # OpenAI's default for /v1/completions


# ---- errors -------------------------------------------------------------------------------------------------------
class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers         # e.g. Retry-After on a 429, Allow on a 405

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# ---- request schemas (OpenAI's, plus a few herd / vLLM extensions) ------------------------------------------------
class _In(BaseModel):
    # extra: OpenAI fields herd does not use (user, metadata, ...) pass. strict: JSON types as the schema says them,
    # no coercion ("stream": "yes" is not true, a prompt of [[false]] is not token 0)
    model_config = ConfigDict(extra="ignore", strict=True)


# False when the gate saw no surrogate in the raw body in any spelling (a \ud... escape, or raw bytes ED A0-BF,
# which json.loads also lets through): then there is nothing to walk for
maybe_surrogates: ContextVar[bool] = ContextVar("maybe_surrogates", default=True)


def valid_unicode(body):
    """A request body's text must be Unicode: JSON can spell a lone UTF-16 surrogate ("\\ud800"), which no tokenizer
    takes (it was a TypeError and a 500). For a top-level request model: model_validator(mode="before")."""
    if maybe_surrogates.get() and _has_lone_surrogate(body):
        raise ValueError(f"{lone_surrogate(body)} holds a lone UTF-16 surrogate, which is not text: send the "
                         "character itself or its full surrogate pair")
    return body


def _has_lone_surrogate(value) -> bool:
    """The quick walk (its own stack: JSON nested 900 deep must not run out of Python's recursion); ASCII text,
    nearly all of it, is a flag test."""
    todo = [value]
    while todo:
        value = todo.pop()
        if isinstance(value, str):
            if not value.isascii():
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    return True
        elif isinstance(value, dict):
            todo.extend(value)
            todo.extend(value.values())
        elif isinstance(value, list):
            todo.extend(value)
    return False


def lone_surrogate(value, where: str = "") -> str | None:
    """Where in value (text, or lists and dicts of it) a lone surrogate is, as a path (messages[0].content), or
    None. The slow walk, for the error message."""
    todo = [(value, where)]
    while todo:
        value, where = todo.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                return f"{where} (character {e.start})"
        elif isinstance(value, dict):
            todo += [(k, f"{where} (a key)") for k in value]
            todo += [(v, f"{where}.{k}" if where else str(k)) for k, v in value.items()]
        elif isinstance(value, list):
            todo += [(v, f"{where}[{i}]") for i, v in enumerate(value)]
    return None


class TextPart(_In):
    type: Literal["text"]
    text: str


class ImageURL(_In):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_In):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class FunctionCall(BaseModel):
    model_config = ConfigDict(strict=True)
    name: str
    arguments: str       # JSON text


class ToolCallIn(_In):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_In):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None


class ToolMessage(ChatMessage):
    """A tool's result answers one call: OpenAI requires both content and tool_call_id (a template renders neither
    as nothing), and so does the schema."""
    role: Literal["tool"]
    content: str | list[ContentPart]
    tool_call_id: str = Field(min_length=1)


Message = Annotated[Union[ChatMessage, ToolMessage], Field(discriminator="role")]


class FunctionDef(_In):
    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_.\-]{0,63}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_In):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(_In):
    name: str


class NamedToolChoice(_In):
    type: Literal["function"]
    function: FunctionName


class JSONSchemaFormat(_In):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str = "response"
    description: str | None = None
    json_schema: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(_In):
    model_config = ConfigDict(populate_by_name=True)
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None
    # json_object with a schema, as instructor's JSON_SCHEMA mode sends it (Together's and Anyscale's spelling)
    object_schema: dict[str, Any] | None = Field(None, alias="schema")


class StreamOptions(_In):
    include_usage: bool = False


TokenIdKey = Annotated[str, Field(pattern=r"^[0-9]{1,9}$")]


class SamplingFields(_In):
    @model_validator(mode="before")
    @classmethod
    def _check_raw(cls, body):
        """On the raw JSON, before anything is built from it: counts and sizes (limits.check_body, with the serving
        app's limits), then Unicode."""
        try:
            check_body(body, current_limits.get())
        except LimitError as e:
            raise PydanticCustomError("limit_exceeded", str(e), {"param": e.param}) from None
        return valid_unicode(body)
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = Field(None, ge=-(2 ** 63), lt=2 ** 63)
    # token id (as a JSON key: text) -> bias added to its logit; the ids are checked against the model's vocabulary
    logit_bias: dict[TokenIdKey, Annotated[float, Field(ge=-100, le=100)]] | None = None
    # extensions (vLLM spells them the same way)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, ge=0.01, le=100)   # bounded: 1e-300 would turn logits to inf
    ignore_eos: bool = False


class ChatCompletionRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = True
    response_format: ResponseFormat | None = None
    echo: bool | None = None       # a /v1/completions field: refused here with a 400 that says so


def _prompt_form(prompt) -> str:
    """Which form a prompt takes, from its first item: validating every form in turn cost 6.8 s for 4M token ids
    (each failed form collects an error per item)."""
    if isinstance(prompt, str):
        return "text"
    first = prompt[0] if isinstance(prompt, list) and prompt else None
    return "ids" if isinstance(first, int) else "id lists" if isinstance(first, list) else "texts"


class CompletionRequest(SamplingFields):
    # a string ("" too: the start of a document), token ids, or a list of either; no empty list
    prompt: Annotated[Union[Annotated[str, Tag("text")], Annotated[list[str], Field(min_length=1), Tag("texts")],
                            Annotated[list[int], Field(min_length=1), Tag("ids")],
                            Annotated[list[list[int]], Field(min_length=1), Tag("id lists")]],
                      Discriminator(_prompt_form)]
    max_tokens: int | None = Field(None, ge=0)    # 0: with echo, score the prompt and generate nothing
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: bool = False             # the prompt before the completion; with logprobs, the prompt tokens' logprobs
    suffix: str | None = None


class TokenizeRequest(_In):
    """POST /tokenize, as vLLM serves it and lm-eval's remote tokenizer calls it."""
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True    # the model's BOS, where its tokenizer adds one
    return_token_strs: bool = False


class DetokenizeRequest(_In):
    model: str | None = None
    tokens: list[int]


# ---- response schemas (for the OpenAPI document; handlers build the same shapes as dicts) -------------------------
class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"]
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None = None
    tool_calls: list[ToolCallOut] | None = None


FinishReason = Literal["stop", "length", "tool_calls", "cancelled"]


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None = None    # None for an echoed prompt's first token
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int
    vision: bool = False       # herd's field: whether the model reads images


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfo(BaseModel):
    """GET /tokenizer_info: what lm-eval's remote tokenizer reads (eos_token is required, the others optional)."""
    model_config = ConfigDict(extra="allow")
    tokenizer_class: str
    eos_token: str | None
    bos_token: str | None
    pad_token: str | None
    chat_template: str | None
    model_max_length: int
    vocab_size: int
