"""`/health`, `/info` and `/metrics`."""

from __future__ import annotations

from importlib import metadata
from typing import Any

from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.api.deps import StateDep
from app.api.routes.generate import ERRORS
from app.api.routing import api_router
from app.schemas import HealthResponse

router = api_router(tags=["service"])


def version() -> str:
    try:
        return metadata.version("gpt2-serve")
    except metadata.PackageNotFoundError:
        return "0+unknown"


@router.get("/health", response_model=HealthResponse, responses={503: ERRORS[503]})
async def health(state: StateDep) -> Any:
    """200 once the models are loaded and warmed up; 503 while loading or draining."""
    state.check_ready()
    return JSONResponse({"status": "ok"})


@router.get("/info")
async def info(state: StateDep) -> dict[str, Any]:
    """Models, the backend and device actually in use (with the fallback reason), limits, version."""
    s = state.settings
    engine = state.engine.info() if state.engine else {}
    return {
        "model_id": s.model_id or s.model_path.name,
        "version": version(),
        "ready": state.ready,
        "generation": engine.get("generation"),
        "classification": engine.get("classification"),
        "embeddings": engine.get("embeddings"),  # /v1/embeddings: available, pooling, dimensions, backend
        "labels": engine.get("labels", []),
        "context_length": engine.get("context_length"),
        "chat_template": state.chat_template.origin if state.chat_template else None,
        "limits": {  # what is enforced: the settings capped by the model's context
            **(state.engine.limits() if state.engine else {"max_input_tokens": s.max_input_tokens,
                                                           "max_total_tokens": s.max_total_tokens}),
            "max_best_of": s.max_best_of,
            "max_batch_size": s.max_batch_size, "max_batch_total_tokens": s.max_batch_total_tokens,
            "max_concurrent_requests": s.max_concurrent_requests, "max_body_bytes": s.max_body_bytes,
            "max_request_candidates": min(s.max_request_candidates, s.max_concurrent_requests),
            "chat_template_timeout_seconds": s.chat_template_timeout_seconds,
            "chat_template_max_chars": s.chat_template_max_chars,
            "max_stop_sequences": 4, "max_header_bytes": s.max_header_bytes,
            "header_timeout_seconds": s.header_timeout_seconds, "body_timeout_seconds": s.body_timeout_seconds,
            "body_total_timeout_seconds": s.body_total_timeout_seconds,
            "max_connections": state.max_connections or s.max_connections,
            "max_pending_body_bytes": s.max_pending_body_bytes,
        },
        "settings": {"backend": s.backend, "device": s.device, "precision": s.precision, "quant_kernel": s.quant_kernel,
                     "retry_failed_export": s.retry_failed_export, "cuda_graphs": s.cuda_graphs,
                     "max_input_tokens": s.max_input_tokens, "max_total_tokens": s.max_total_tokens,
                     "num_threads": s.num_threads, "auth": bool(s.api_key), "prefix_caching": s.prefix_caching,
                     "prefix_cache_mb": s.prefix_cache_mb, "embedding_pooling": s.embedding_pooling,
                     "speculation": s.speculation, "speculation_max_tokens": s.speculation_max_tokens,
                     "speculation_ngram": s.speculation_ngram, "speculation_max_batch": s.speculation_max_batch,
                     "draft_model_path": str(s.draft_model_path) if s.draft_model_path else None},
    }


@router.get("/metrics", response_class=Response)
async def metrics(state: StateDep) -> Response:
    """Prometheus text format."""
    if state.engine:
        state.metrics.queue.set(state.engine.scheduler.queue_size)
        state.metrics.batch.set(state.engine.scheduler.batch_size)
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
