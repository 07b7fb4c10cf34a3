"""The HTTP protocol, one module per API as vLLM splits it (DESIGN §4): `tgi` (TGI's `/generate`,
`/generate_stream`, `POST /`) and `openai` (`/v1/completions`, `/v1/chat/completions`,
`/v1/models`), each with its request/response models and its mapping to the engine's one
`GenerationRequest` / `SamplingParams`, so every API reaches the same engine path. `chat_template`
renders chat messages as Hugging Face's `apply_chat_template` does. What the other routes share
(errors, classify, tokenize, health) stays in `app.schemas`."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # not imported at run time: the chat template worker imports this package alone
    from app.engine.scheduler import Finish


def mean_logprob(finish: Finish) -> float:
    """How best_of candidates are ranked: the mean log-probability of their generated tokens
    (OpenAI's "highest log probability per token", TGI's rule too)."""
    return sum(t.logprob for t in finish.tokens) / len(finish.tokens) if finish.tokens else float("-inf")
