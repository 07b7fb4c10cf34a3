"""OpenAI's embeddings protocol (`POST /v1/embeddings`) with vLLM's extra fields.

The request is OpenAI's (`input`, `model`, `encoding_format`, `dimensions`, `user`) plus vLLM's
`truncate_prompt_tokens`, `normalize` and `add_special_tokens`; as on the other /v1 routes, a
field in neither API is ignored and named in one WARNING line (`OpenAIModel.ignored_fields`).
`dimensions` is refused: GPT-2's vectors are not trained to be cut (no Matryoshka training), as
vLLM refuses it for such models. The response is OpenAI's list of `embedding` objects (vLLM adds
`id` and `created`); `encoding_format: "base64"` sends each vector as the base64 of its
little-endian float32 bytes, which the `openai` SDK asks for by default and decodes.
"""

from __future__ import annotations

import base64
import time
import uuid
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field, field_validator

from app.protocol.openai import OpenAIModel

MAX_INPUTS = 2048  # inputs in one request: OpenAI's limit


class EmbeddingRequest(OpenAIModel):
    input: str | list[str] | list[int] | list[list[int]] = Field(
        description="a text, a list of texts, a list of token ids or a list of lists of token ids")
    model: str | None = None
    encoding_format: Literal["float", "base64"] | None = Field(
        "float", description="float: a list of numbers; base64: little-endian float32 bytes in base64")
    dimensions: int | None = Field(None, description="not supported: only null (the model's n_embd is the length)")
    user: str | None = Field(None, description="accepted and ignored")
    # vLLM's extra fields
    truncate_prompt_tokens: int | None = Field(None, ge=-1, description="keep each input's last N tokens; -1: the "
                                                                         "model's context")
    normalize: bool | None = Field(None, description="vLLM: scale each vector to unit L2 norm (default true)")
    add_special_tokens: bool | None = Field(True, description="accepted; GPT-2's tokenizer adds no special tokens")

    @field_validator("input")
    @classmethod
    def _input(cls, v: Any) -> Any:
        items = [v] if isinstance(v, str) or v and isinstance(v[0], int) else v
        if not items:
            raise ValueError("must not be empty: a text, a list of texts, a list of token ids or a list of lists of "
                             "token ids")
        empty = next((i for i, item in enumerate(items) if len(item) == 0), None)
        if empty is not None:
            raise ValueError("must not be empty" if isinstance(v, str) else f"item {empty} is empty")
        if len(items) > MAX_INPUTS:
            raise ValueError(f"at most {MAX_INPUTS} inputs per request, not {len(items)}")
        return v

    @field_validator("dimensions")
    @classmethod
    def _dimensions(cls, v: int | None) -> int | None:
        if v is not None:
            raise ValueError("is not supported: this model's embeddings have a fixed length (no Matryoshka "
                             "training); send null or leave it out")
        return v

    def inputs(self) -> list[str | list[int]]:
        """The inputs as a list: a text or one list of token ids is one input."""
        v = self.input
        return [v] if isinstance(v, str) or isinstance(v[0], int) else list(v)

    def fields(self) -> list[str]:
        """How errors name each input: `input`, or `input[i]` for a list of several."""
        n = len(self.inputs())
        return ["input"] if n == 1 else [f"input[{i}]" for i in range(n)]


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[EmbeddingData]
    usage: EmbeddingUsage


def encode_vector(vector: np.ndarray, encoding_format: str | None) -> list[float] | str:
    """One vector as OpenAI sends it: a list of floats, or base64 of little-endian float32 bytes."""
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector.tolist()


def embedding_response(vectors: np.ndarray, encoding_format: str | None, model: str,
                       prompt_tokens: int) -> EmbeddingResponse:
    return EmbeddingResponse(
        id=f"embd-{uuid.uuid4().hex}", created=int(time.time()), model=model,
        data=[EmbeddingData(index=i, embedding=encode_vector(v, encoding_format)) for i, v in enumerate(vectors)],
        usage=EmbeddingUsage(prompt_tokens=prompt_tokens, total_tokens=prompt_tokens))
