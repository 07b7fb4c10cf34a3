"""`load_engine`: load (and export, on a cache miss) the models and build the `Engine` over them.

It lives here rather than on `Engine` so that the engine never imports the loader.
"""

from __future__ import annotations

import threading
from pathlib import Path

from app.engine.engine import Engine
from app.loading import memory_fit
from app.loading.loader import load


def load_engine(model_path: Path | None, classifier_path: Path | None = None, backend: str = "auto",
                device: str = "auto", precision: str = "auto", cache_dir: Path = Path(".onnx_cache"),
                num_threads: int | None = None, max_batch_size: int = 32, max_batch_total_tokens: int = 32768,
                max_input_tokens: int | None = None, max_total_tokens: int | None = None,
                cancel: threading.Event | None = None, prefill_chunk_tokens: int = 64,
                max_batch_prefill_tokens: int = 4096, waiting_served_ratio: float = 1.2,
                score_chunk_tokens: int = 128, cuda_graphs: str = "auto", retry_failed_export: bool = False,
                export_lock_stale_s: float = 30.0, prefix_cache_bytes: int = 0,
                embedding_pooling: str | None = None, speculation: str = "off", speculation_max_tokens: int = 4,
                speculation_ngram: int = 3, draft_model_path: Path | None = None,
                quant_kernel: str = "auto", speculation_max_batch: int = 8) -> Engine:
    """Load (and export, on a cache miss) the models; blocking. Setting `cancel` aborts an export.
    `prefix_cache_bytes`: the generation runner's prefix cache budget (0: off). `embedding_pooling`
    ("last" or "mean"): also load the embedding graph of `model_path` (`/v1/embeddings`); None: not.
    `quant_kernel`: int8 / int4's kernel (QUANT_KERNEL)."""
    kw = dict(backend=backend, device=device, precision=precision, cache_dir=cache_dir, num_threads=num_threads,
              cancel=cancel, max_batch_size=max_batch_size, cuda_graphs=cuda_graphs,
              retry_failed_export=retry_failed_export, lock_stale_s=export_lock_stale_s, quant_kernel=quant_kernel)
    gen = load("generate", model_path, prefix_cache_bytes=prefix_cache_bytes, **kw) if model_path else None
    clf = load("classify", classifier_path, **kw) if classifier_path else None
    emb = load("embed", model_path, **kw) if model_path and embedding_pooling else None
    draft = None
    if speculation == "draft" and model_path:
        check_draft(model_path, draft_model_path)
        # beside the models loaded above (MemAvailable now counts them): one line if it cannot fit
        memory_fit.check(draft_model_path, memory_fit.serve_need(draft_model_path), "serving it as the draft model")
        # a row per stream it proposes for, no prefix cache. Its threads do not spin between its
        # calls: they would take the cores from the served model's calls in between (measured on
        # the demo pair: the served model's one-row step went from 0.85 to 1.19 ms)
        draft = load("generate", draft_model_path, **(kw | {"max_batch_size": speculation_max_batch}),
                     session_config={"session.intra_op.allow_spinning": "0"})
    return Engine(gen, clf, max_batch_size, max_batch_total_tokens, max_input_tokens, max_total_tokens,
                  prefill_chunk_tokens, max_batch_prefill_tokens, waiting_served_ratio, score_chunk_tokens,
                  embedding=emb, embedding_pooling=embedding_pooling or "last", speculation=speculation,
                  speculation_max_tokens=speculation_max_tokens, speculation_ngram=speculation_ngram, draft=draft,
                  speculation_max_batch=speculation_max_batch)


def check_draft(model_path: Path, draft_path: Path | None) -> None:
    """A draft model must exist and tokenize as the served model does (the same vocab.json and
    merges.txt): its proposals are token ids of the served model's vocabulary."""
    if draft_path is None:
        raise ValueError("SPECULATION=draft needs DRAFT_MODEL_PATH: a smaller GPT-2 checkpoint with the same tokenizer")
    for name in ("vocab.json", "merges.txt"):
        mine, theirs = Path(model_path) / name, Path(draft_path) / name
        if not theirs.is_file():
            raise ValueError(f"DRAFT_MODEL_PATH {draft_path} has no {name}")
        if mine.is_file() and mine.read_bytes() != theirs.read_bytes():
            raise ValueError(f"DRAFT_MODEL_PATH {draft_path}: its {name} differs from MODEL_PATH's; a draft model "
                             "must use the served model's tokenizer")
