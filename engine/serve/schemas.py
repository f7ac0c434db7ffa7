"""The server's request and response bodies. They are the OpenAPI document, and their checks
answer 422 before any work starts. Strict: "5" is not an int, 1 is not a bool."""
from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from ragrt.decoding.sampling import MAX_STOP_STRINGS
from ragrt.options import MAX_K, MAX_TURNS, MODES, PASSAGE_KV_MODES, RETRIEVALS

# Bounds on what one request may make the server hold; the engine checks the bundle's own limits.
MAX_TEXT = 100_000
MAX_EMBED = 256
# The engine refuses a question with nothing visible in it (empty, blank, control characters only).
VISIBLE = r"[^\s\x00-\x1f\x7f]"
PASSAGE_KV_HELP = ('reuse each retrieved passage\'s keys and values: "on", "off", or "auto", the bundle\'s '
                   'measured default (`ragrt info`); "on" where the bundle has no passage KV is a 422')
RETRIEVAL_HELP = ('"dense" (embeddings), "bm25" (words) or "hybrid" (both, fused by reciprocal rank); default: the '
                  'bundle\'s (`ragrt info`); "bm25" or "hybrid" where the bundle has no BM25 index is a 422')
PASSAGE_KV_COUNTS = 'passage KV blocks {"reused", "computed"}, when it was on'
MODE_HELP = ('how passages become the answer: "concat", "token", "sequence" (generated), or "extract" (the '
             "passages' sentences that best answer, no generator); default: the bundle's (`ragrt info`)")


def _integral(value):
    """JSON Schema counts 5.0 as an integer, and some clients send one; "5" and true stay refused."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def Int(ge: int, le: int | None = None):
    """A strict integer in [ge, le]; the bounds sit inside the type so the schema keeps them."""
    return Annotated[int, Field(ge=ge, le=le), BeforeValidator(_integral)]


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class Turn(Strict):
    role: Literal["user", "assistant"]
    content: str = Field(max_length=MAX_TEXT)


MAX_STOP_CHARS = 256
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
Stop = Union[StopString, list[StopString]]


class Decoding(BaseModel):
    """How each next token is chosen; what is not sent comes from the bundle's manifest."""
    temperature: Optional[float] = Field(None, ge=0, le=2, allow_inf_nan=False,
                                         description="0: greedy; above 0: sampling")
    top_p: Optional[float] = Field(None, gt=0, le=1, allow_inf_nan=False,
                                   description="sample among the likeliest tokens holding this probability")
    top_k: Optional[Int(0)] = Field(None, description="sample among the k likeliest tokens (0: all)")
    seed: Optional[Int(0)] = Field(None, description="seed of the sampling, for answers that repeat")
    repetition_penalty: Optional[float] = Field(None, ge=1, le=10, allow_inf_nan=False,
                                                description="above 1: tokens already in the answer become less likely")
    repetition_window: Optional[Int(1)] = Field(None, description="the answer's latest tokens the penalty sees")
    no_repeat_ngram_size: Optional[Int(0, 16)] = Field(None, description="n > 0: no n tokens repeat in the answer")
    stop: Optional[Stop] = Field(None, description=f"end the answer before this text (at most {MAX_STOP_STRINGS})")
    min_new_tokens: Optional[Int(0)] = Field(None, description="no end of answer before this many tokens")
    copy_bias: Optional[float] = Field(None, ge=0, le=20, allow_inf_nan=False,
                                       description="above 0: favour continuing a run the answer copies from its passages")

    def decoding_options(self) -> dict:
        return {name: getattr(self, name) for name in Decoding.model_fields}


class AskRequest(Strict, Decoding):
    question: str = Field(max_length=MAX_TEXT, pattern=VISIBLE)
    k: Optional[Int(1, MAX_K)] = Field(None, description="passages to retrieve (default: the bundle's)")
    retrieval: Optional[Literal[RETRIEVALS]] = Field(None, description=RETRIEVAL_HELP)
    mode: Optional[Literal[MODES]] = Field(None, description=MODE_HELP)
    max_new_tokens: Optional[Int(1)] = Field(None, description="at most half the generator's context")
    prior_temperature: Optional[float] = Field(None, gt=0, allow_inf_nan=False,
                                               description="P(c|q) = softmax(score / T), in modes token and sequence")
    history: list[Turn] = Field(default_factory=list, max_length=MAX_TURNS,
                                description="earlier turns, oldest first; folded into retrieval and the prompt")
    task: str = Field("qa", max_length=64, description='"qa", or a task of the bundle\'s manifest ("summarize")')
    stream: bool = Field(False, description="answer as server-sent events: `token` events, then one `answer`")
    passage_kv: Literal[PASSAGE_KV_MODES] = Field("auto", description=PASSAGE_KV_HELP)


class QuoteOut(BaseModel):
    answer: list[int] = Field(description="[a0, a1): characters of the answer")
    passage: list[int] = Field(description="[p0, p1): characters of the source's text; answer[a0:a1] == text[p0:p1]")


class SourceOut(BaseModel):
    id: str
    title: str
    score: float
    prob: float
    text: str
    quotes: list[QuoteOut] = Field(description="the answer's runs of 4 or more words copied verbatim from this source")


GROUNDED_HELP = "share of the answer's words inside quotes of its sources"


class AskResponse(BaseModel):
    answer: str
    sources: list[SourceOut]
    grounded: float = Field(description=GROUNDED_HELP)
    new_tokens: int
    prompt_tokens: int
    timings_ms: dict[str, float]
    mode: str
    log_prob: Optional[float] = None
    warnings: list[str]
    finish_reason: Literal["stop", "length"]
    passage_kv: Optional[dict[str, int]] = Field(None, description=PASSAGE_KV_COUNTS)


class RetrieveRequest(Strict):
    query: str = Field(max_length=MAX_TEXT, pattern=VISIBLE)
    k: Optional[Int(1, MAX_K)] = None
    retrieval: Optional[Literal[RETRIEVALS]] = Field(None, description=RETRIEVAL_HELP)


class Passage(BaseModel):
    id: str
    title: str
    text: str
    score: float


class RetrieveResponse(BaseModel):
    passages: list[Passage]
    timings_ms: dict[str, float]


class EmbedRequest(Strict):
    texts: list[str] = Field(min_length=1, max_length=MAX_EMBED)


class EmbedResponse(BaseModel):
    embeddings: list[list[float]]
    dim: int


class ErrorBody(BaseModel):
    message: str
    type: str


class ErrorResponse(BaseModel):
    error: ErrorBody


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str = Field(max_length=MAX_TEXT)


class ChatMessage(BaseModel):
    # Clients send fields this server has no use for (name, tool_calls): they are ignored.
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None


class ChatRequest(Decoding):
    """OpenAI's chat completion request, with ragrt's decoding options (top_k, repetition_penalty, ...)
    and passage_kv and retrieval accepted as extra body fields. Fields OpenAI has and ragrt does not use (frequency_penalty, logit_bias,
    tools) are ignored."""
    model_config = ConfigDict(extra="ignore", strict=True)
    model: str = "ragrt"
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_TURNS)
    max_tokens: Optional[Int(1)] = None
    max_completion_tokens: Optional[Int(1)] = None
    stream: bool = False
    n: Optional[Literal[1]] = None
    passage_kv: Literal[PASSAGE_KV_MODES] = Field("auto", description="ragrt's extension: " + PASSAGE_KV_HELP)
    mode: Optional[Literal[MODES]] = Field(None, description="ragrt's extension: " + MODE_HELP)
    retrieval: Optional[Literal[RETRIEVALS]] = Field(None, description="ragrt's extension: " + RETRIEVAL_HELP)


class ChatChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatChoiceMessage
    finish_reason: Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    sources: list[SourceOut] = Field(description="ragrt's addition: the passages the answer drew on")
    grounded: float = Field(description="ragrt's addition: " + GROUNDED_HELP)
    passage_kv: Optional[dict[str, int]] = Field(None, description="ragrt's addition: " + PASSAGE_KV_COUNTS)
