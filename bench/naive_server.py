"""The naive baseline for the server benchmark: a minimal FastAPI app that calls transformers'
`generate` once per request (no batching), answering TGI's /generate shape.

    python -m bench.naive_server --checkpoint DIR --port 8001 [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch
import transformers
import uvicorn
from fastapi import FastAPI


def build(checkpoint: str) -> FastAPI:
    model = transformers.GPT2LMHeadModel.from_pretrained(checkpoint).eval()
    tok = transformers.AutoTokenizer.from_pretrained(checkpoint)
    app = FastAPI()

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/generate")
    def generate(body: dict[str, Any]) -> dict[str, Any]:  # a sync route: FastAPI's thread pool
        n = int(body.get("parameters", {}).get("max_new_tokens", 20))
        ids = tok(body["inputs"], return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 pad_token_id=tok.eos_token_id)
        new = out[0, ids["input_ids"].shape[1]:]
        return {"generated_text": tok.decode(new), "details": {"finish_reason": "length",
                                                                "generated_tokens": int(new.shape[0])}}

    return app


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    uvicorn.run(build(args.checkpoint), host="127.0.0.1", port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
