"""Settings from environment variables (DESIGN §5), one pydantic-settings class.

Built by `get_settings()`, never at import, so tests and tools can set the environment first.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEMO_DIR = Path(__file__).resolve().parents[2] / "model" / "demo"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    model_path: Path = Field(DEMO_DIR / "lm", description="generation checkpoint folder (HF GPT-2 format)")
    classifier_path: Path | None = Field(DEMO_DIR / "classifier",
                                         description="sequence-classification checkpoint folder; empty disables")
    backend: Literal["auto", "onnxruntime", "torch"] = "auto"
    device: Literal["auto", "cuda", "cpu"] = "auto"
    precision: Literal["auto", "fp32", "fp16", "int8", "int4"] = Field(
        "auto", description="auto: fp16 on CUDA, fp32 on CPU (as TGI and vLLM); int8 / int4: quantized weights for "
                            "CPU, the kernel measured for this CPU (QUANT_KERNEL); an explicit value is obeyed")
    # export.kernels.KERNELS' names (a test keeps the two equal; the config does not import the exporter)
    quant_kernel: Literal["auto", "nbits8-b32", "nbits8-b128", "nbits8-b256", "dynamic8", "nbits4-b32-zp",
                          "nbits4-b128-zp", "nbits4-b256-zp", "nbits4-b32"] = Field(
        "auto", description="int8 / int4: auto measures the candidate kernels on this CPU at export and serves the "
                            "fastest that passes the accuracy gates; a name forces that kernel")
    onnx_cache_dir: Path = Field(Path(".onnx_cache"), description="exports are made once and reused from here")
    retry_failed_export: bool = Field(False, description="re-run an export that already failed with the same "
                                                         "checkpoint, options and exporter version")
    export_lock_stale_seconds: float = Field(30.0, gt=0, description="an export lock in ONNX_CACHE_DIR whose holder "
                                                                      "has not touched it for this long is taken over")
    host: str = "0.0.0.0"
    port: int = Field(8000, ge=1, le=65535)
    max_input_tokens: int = Field(512, ge=1)
    max_total_tokens: int = Field(1024, ge=2)
    max_batch_size: int = Field(32, ge=1)
    max_batch_total_tokens: int = Field(32768, ge=2)
    max_concurrent_requests: int = Field(128, ge=1, description="candidates in flight (a request counts its "
                                                                "prompts x best_of); more get 429")
    max_request_candidates: int = Field(64, ge=1, description="prompts x best_of in one request (at most "
                                                              "MAX_CONCURRENT_REQUESTS); more is a 400")
    max_batch_prefill_tokens: int = Field(4096, ge=1, description="padded prompt tokens per prefill call when "
                                                                  "nothing is decoding; longer prompts are chunked")
    prefill_chunk_tokens: int = Field(64, ge=1, description="prompt tokens prefilled per decode step while other "
                                                            "streams run: bounds their inter-token latency")
    waiting_served_ratio: float = Field(1.2, ge=0, description="with this many waiting prompts per decoding row, "
                                                               "prefill them at once instead of in chunks (TGI)")
    max_best_of: int = Field(8, ge=1, description="candidates per prompt: TGI's best_of, OpenAI's n and best_of")
    chat_template: str | None = Field(None, description="a Jinja chat template file (or the template text) for "
                                                        "/v1/chat/completions; default: the checkpoint's")
    chat_template_timeout_seconds: float = Field(5.0, gt=0, description="longest render of one request's chat "
                                                                        "template (in a worker process); then 400")
    chat_template_max_chars: int = Field(4 * 1024 * 1024, ge=1024, description="longest rendered chat prompt, in "
                                                                               "characters; then 400")
    chat_template_workers: int = Field(2, ge=1, description="worker processes that render chat templates")
    prefix_caching: bool = Field(True, description="keep prompts' KV after their request (blocks of 4 tokens, "
                                                   "least recently used evicted) and prefill only what a later "
                                                   "prompt adds to a cached prefix")
    prefix_cache_mb: int = Field(512, ge=0, description="the prefix cache's budget in MiB (host memory on CPU, "
                                                        "GPU memory on CUDA); 0 turns it off")
    embedding_pooling: Literal["last", "mean", "off"] = Field(
        "last", description="/v1/embeddings: the final hidden state of the last token (vLLM's default for a "
                            "causal LM) or the mean over the tokens, unit L2 norm; off: no embedding graph "
                            "(not exported, not loaded)")
    speculation: Literal["off", "ngram", "draft"] = Field(
        "off", description="speculative decoding: ngram proposes the tokens that followed the last occurrence of "
                           "a row's latest n-gram in its prompt and output; draft: DRAFT_MODEL_PATH's model proposes "
                           "them; verified in the decode step (exact; the GroupQueryAttention runners)")
    draft_model_path: Path | None = Field(None, description="SPECULATION=draft: a smaller GPT-2 checkpoint with the "
                                                            "served model's tokenizer, exported and served alike")
    speculation_max_tokens: int = Field(4, ge=1, le=16, description="most tokens proposed per row and step")
    speculation_ngram: int = Field(3, ge=1, le=16, description="longest n-gram looked up (down to 1)")
    speculation_max_batch: int = Field(8, ge=1, description="speculate only while the batch has at most this "
                                                            "many rows (vLLM's disable_by_batch_size): each row "
                                                            "with proposals costs the step one more model call")
    num_threads: int | None = Field(None, ge=1, description="intra-op threads; default: the runtime's choice")
    cuda_graphs: Literal["auto", "on", "off"] = Field(
        "auto", description="CUDA fp16: capture decode steps as CUDA graphs per batch bucket, checked against "
                            "eager steps at start (auto: eager with a reason in /info when that fails; on: "
                            "refuse to start)")
    log_level: str = "INFO"
    model_id: str | None = Field(None, description="name in /info and /v1/models; default: the checkpoint folder")
    strict_model_name: bool = Field(False, description="/v1 requests naming another model get 404 model_not_found "
                                                       "(vLLM); default: served by the one model, named in the "
                                                       "response (TGI, llama.cpp)")
    api_key: str | None = Field(None, description="when set, every route but /health and /metrics needs it")
    max_body_bytes: int = Field(2 * 1024 * 1024, ge=1024)
    # Connections (issue 20): bounds on what a client can hold before its request is whole.
    max_header_bytes: int = Field(64 * 1024, ge=1024, description="request line + headers; more is 431, closed")
    header_timeout_seconds: float = Field(10.0, gt=0, description="the whole request head must arrive within this; "
                                                                  "then 408 (or a plain close if nothing came)")
    body_timeout_seconds: float = Field(10.0, gt=0, description="longest pause between two reads of a request "
                                                                "body; then 408 and close")
    body_total_timeout_seconds: float = Field(30.0, gt=0, description="the whole request body must arrive within "
                                                                      "this, counted from when the app starts "
                                                                      "reading it; then 408 and close")
    max_connections: int = Field(2048, ge=1, description="open connections; more get 503 at once. Lowered to fit "
                                                         "the open-file limit")
    max_pending_body_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="bytes held in request bodies not yet "
                                                                               "whole, all connections together; "
                                                                               "past it 503")
    shutdown_grace_seconds: float = Field(30.0, ge=0, description="how long SIGTERM waits for in-flight requests")

    @field_validator("classifier_path", "api_key", "model_id", "chat_template", mode="before")
    @classmethod
    def _empty_is_none(cls, v: object) -> object:
        return None if isinstance(v, str) and not v.strip() else v

    @property
    def prefix_cache_bytes(self) -> int:
        """The prefix cache's budget; 0 when PREFIX_CACHING=false."""
        return self.prefix_cache_mb << 20 if self.prefix_caching else 0

    @model_validator(mode="after")
    def _limits(self) -> Settings:
        if self.max_input_tokens >= self.max_total_tokens:
            raise ValueError(f"MAX_INPUT_TOKENS ({self.max_input_tokens}) must be < MAX_TOTAL_TOKENS "
                             f"({self.max_total_tokens})")
        if self.quant_kernel != "auto" and not self.quant_kernel.startswith(
                {"int8": "nbits8-", "int4": "nbits4-"}.get(self.precision, "-")) and not (
                self.precision == "int8" and self.quant_kernel == "dynamic8"):
            raise ValueError(f"QUANT_KERNEL={self.quant_kernel} does not apply to PRECISION={self.precision}; it "
                             f"names an {'int8' if '8' in self.quant_kernel else 'int4'} kernel")
        if self.max_pending_body_bytes < self.max_body_bytes:
            raise ValueError(f"MAX_PENDING_BODY_BYTES ({self.max_pending_body_bytes}) must be >= MAX_BODY_BYTES "
                             f"({self.max_body_bytes})")
        return self


@lru_cache
def get_settings() -> Settings:
    return Settings()
