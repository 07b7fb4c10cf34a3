"""The serving path alone: a runner that costs nothing behind the real scheduler, sampling,
detokenizer, HTTP server and SSE encoding, driven by the real httpx client.

    python -m bench.overhead --streams 32 --json     # {"streams": 32, "tok_s": ..., "itl_p50_ms": ..., ...}
    python -m bench.overhead --streams 1 --json
    python -m bench.overhead --streams 1,32 --repeats 3 --update-md [--server-repo DIR --label before]

The server is `app.main.create_app` under uvicorn, as `python -m app` runs it, in its own process;
only the model is replaced: `ZeroCostRunner` returns a fixed selection at once (the top alternatives
and their log-probabilities that the graph computes where the logits are; its first is one ordinary
word, so greedy decoding never meets EOS). Everything a token passes through after the model is
real: choosing from the runner's top-N, the incremental detokenizer, stop checks, the asyncio hand-
over, metrics, JSON, SSE and the socket. `--streams N` workers send `/generate_stream` requests (a
--prompt-tokens prompt, --new-tokens tokens) back to back for --duration seconds; tokens and gaps
are counted inside that window. Values are medians over --repeats server starts. The client shares
the machine's cores with the server, as a co-located load balancer or client would.

`--server-repo DIR` runs the server from another checkout (e.g. `git worktree add /tmp/before
<commit>`), for before/after numbers from the same harness; `--profile` wraps the server in
py-spy (in the `bench` extra) and writes a flame graph SVG next to the JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

HERE = Path(__file__).resolve()
REPO = HERE.parents[1]
WORD = " the"  # one GPT-2 token; the fixed logits make it the argmax


# ---- the server side (runs in the server's process, importing `app` from --server-repo) -------
def _zero_cost_runner(vocab: int, n_positions: int, token_id: int, max_rows: int) -> Any:
    import numpy as np

    from app.engine.runner import GenerationRunner, ModelInfo, PendingPrefill, Selected, Want

    class ZeroCostRunner(GenerationRunner):
        """Benchmark only: the GenerationRunner contract with no model behind it. Its selection
        (what the graph computes where the logits are) is fixed: `token_id` first."""

        backend = "zero-cost"
        device = "cpu"

        def __init__(self) -> None:
            self.info = ModelInfo(1, 1, 1, vocab, n_positions)
            self.logits = np.zeros((max_rows + 1, vocab), np.float32)
            self.logits[:, token_id] = 10.0
            self.ids = np.tile(np.arange(64, dtype=np.int64), (max_rows + 1, 1))
            self.ids[:, 0], self.ids[:, token_id % 64] = token_id, 0
            self.lps = np.full((max_rows + 1, 64), -10.0, np.float32)
            self.lps[:, 0] = -0.01
            self.rows = 0

        @property
        def num_rows(self) -> int:
            return self.rows

        def _sel(self, n: int, want: Want | None) -> Selected:
            k = (want or Want()).top_n
            return Selected(self.ids[:n, :k], self.lps[:n, :k], self.logits[:n])

        def add(self, prompts: Sequence[Sequence[int]], want: Want | None = None) -> Selected:
            self.rows += len(prompts)
            return self._sel(len(prompts), want)

        def step(self, tokens: Sequence[int], want: Want | None = None) -> Selected:
            return self._sel(self.rows, want)

        def drop(self, rows: Sequence[int]) -> np.ndarray:
            keep = np.setdiff1d(np.arange(self.rows), np.asarray(rows, dtype=np.int64))
            self.rows = int(keep.size)
            return keep

        def advance(self, pending: PendingPrefill, n_tokens: int, want: Want | None = None) -> Selected | None:
            pending.done = min(len(pending.prompt), pending.done + max(1, n_tokens))
            if pending.remaining:
                return None
            self.rows += 1
            return self._sel(1, want)

    return ZeroCostRunner()


def serve(port: int, max_rows: int, loop: str = "auto", http: str = "auto") -> None:
    """Run the real app with the zero-cost runner on 127.0.0.1:`port` until SIGTERM. `loop` and
    `http` are uvicorn's: "auto" serves as `python -m app` does (uvloop where installed, and
    httptools with the app's connection limits); "asyncio" / "h11" measure the pure-Python ones."""
    import threading

    import uvicorn

    import app.main as app_main
    from app.core.config import Settings
    from app.engine.engine import Engine
    from app.engine.runner import Loaded
    from model.tokenizer import GPT2Tokenizer

    settings = Settings(classifier_path=None, host="127.0.0.1", port=port, max_batch_size=max_rows,
                        max_concurrent_requests=4 * max_rows + 16, log_level="WARNING")
    tok = GPT2Tokenizer.from_dir(settings.model_path)
    (token_id,) = tok.encode(WORD)

    def load_zero_cost(s: Settings, cancel: threading.Event) -> Engine:
        runner = _zero_cost_runner(tok.vocab_size, 1024, token_id, max_rows)
        loaded = Loaded(runner, "generate", "zero-cost", "cpu", "fp32", s.model_path)
        engine = Engine(loaded, None, s.max_batch_size, s.max_batch_total_tokens, s.max_input_tokens,
                        s.max_total_tokens, s.prefill_chunk_tokens, s.max_batch_prefill_tokens,
                        s.waiting_served_ratio)
        engine.start()
        return engine

    app_main._load_engine = load_zero_cost  # the one swap: the model, nothing on the serving path
    app = app_main.create_app(settings)
    try:  # what `python -m app` serves: its connection limits on httptools (issue 20)
        from app.__main__ import server_config
    except ImportError:  # a checkout from before it (--server-repo)
        server_config = None
    if server_config is not None and http == "auto":
        config = server_config(app, settings, log_level="warning", loop=loop)
    else:
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False, loop=loop,
                                http=http)
    uvicorn.Server(config).run()


# ---- the client side ------------------------------------------------------------------------
def _launch(server_repo: Path, port: int, max_rows: int, log: Path, loop: str = "auto",
            http: str = "auto", server_env: dict[str, str] | None = None) -> subprocess.Popen:
    """This file's `--serve` on `port`, its `app` from `server_repo`; healthy on return."""
    from bench.server_bench import _start

    cmd = [sys.executable, str(HERE), "--serve", "--port", str(port), "--max-rows", str(max_rows),
           "--uvicorn-loop", loop, "--uvicorn-http", http]
    env = {"PYTHONPATH": str(server_repo), "LOG_LEVEL": "WARNING", **(server_env or {})}
    return _start(cmd, env, f"http://127.0.0.1:{port}", log, timeout=120, cwd=server_repo)


def measure(args: argparse.Namespace, streams: int) -> dict[str, Any]:
    """One server start: a warm-up, then `streams` closed-loop workers for --duration s."""
    from bench.server_bench import _stop
    from bench.targets import _closed_loop, _run, free_port, prompt_text
    from model.tokenizer import GPT2Tokenizer

    tok = GPT2Tokenizer.from_dir(REPO / "model" / "demo" / "lm")
    texts = [prompt_text(tok, args.prompt_tokens, i) for i in range(streams)]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    results = Path(args.out).parent
    profile = results / f"overhead_{streams}{'_' + args.label if args.label else ''}.svg" if args.profile else None
    proc = _launch(args.server_repo, port, max(32, streams), results / f"overhead_server_{streams}.log",
                   args.uvicorn_loop, args.uvicorn_http, dict(args.server_env))
    spy = None
    try:
        _run(lambda c: _closed_loop(c, texts, args.new_tokens, 1.0), url, streams)  # warm-up
        if profile is not None:  # py-spy (the bench extra) samples the server for the measured window
            exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
            spy = subprocess.Popen([exe, "record", "--pid", str(proc.pid), "--threads", "--nonblocking", "-r", "200",
                                    "--duration", str(max(1, round(args.duration))), "-o", str(profile)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        res = _run(lambda c: _closed_loop(c, texts, args.new_tokens, args.duration), url, streams)
        if spy is not None:
            spy.wait(60)
    finally:
        _stop(proc)
    if res["short"]:
        raise RuntimeError(f"{res['short']} streams ended early: the fixed logits should never stop")
    return {"streams": streams, "tok_s": res["tok_s"], "itl_p50_ms": 1000 * res["itl"]["p50_s"],
            "itl_p99_ms": 1000 * res["itl"]["p99_s"], "requests": res["requests"]}


def _order(rec: dict[str, Any]) -> tuple[int, str]:
    """before, then earlier steps (`step-*`), then the current code (no label), then levers alone."""
    label = rec.get("label") or ""
    rank = 0 if label == "before" else 1 if label.startswith("step") else 2 if not label else 3
    return rank, label


def update_md(md: Path, results_dir: Path) -> None:
    """The `overhead` section of BENCHMARKS.md from every saved overhead_*.json record."""
    from bench.common import machine_info
    from bench.report import replace_section

    records = sorted((json.loads(p.read_text()) for p in results_dir.glob("overhead*.json")), key=_order)
    lines = ["### Serving overhead: a zero-cost model behind the real serving path",
             "", "Command: `python -m bench.overhead --streams 1,32 --repeats 5 --update-md` (another commit: "
             "`... --server-repo <worktree> --label <name>`; each record's own command is in its JSON). A runner "
             "that returns fixed logits at once, behind the real scheduler, sampling, detokenizer, HTTP and SSE, "
             f"with the httpx client on the same machine ({machine_info()['cpu']}, {os.cpu_count()} cores). "
             "Medians over server starts (runs: each start's tok/s).", "",
             "| server | commit | uvicorn, server env | streams | tok/s | runs | gap p50 (ms) | gap p99 (ms) "
             "| target |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    targets = {1: 5000, 32: 10000}
    for rec in records:
        st = rec.get("settings", {})
        how = " ".join(x for x in (st.get("uvicorn", "loop=auto http=auto"), st.get("server_env")) if x)
        for r in rec["results"]:
            t = targets.get(r["streams"])
            mark = "—" if t is None else f">= {t:,} tok/s: {'pass' if r['tok_s'] >= t else '**FAIL**'}"
            runs = ", ".join(f"{x['tok_s']:,.0f}" for x in r.get("runs", []))
            lines.append(f"| {rec.get('label') or 'after'} | `{rec.get('commit')}` | {how} | {r['streams']} | "
                         f"{r['tok_s']:,.0f} | {runs} | {r['itl_p50_ms']:.3g} | {r['itl_p99_ms']:.3g} | {mark} |")
    replace_section(md, "overhead", "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    from bench.targets import _commit, _env_pair

    p = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", default="32", help="comma-separated stream counts, each its own measurement")
    p.add_argument("--duration", type=float, default=10.0, help="closed-loop seconds per measurement")
    p.add_argument("--repeats", type=int, default=1, help="server starts per stream count; medians over them")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--json", action="store_true", help="print one JSON object per stream count")
    p.add_argument("--server-repo", type=Path, default=REPO, help="checkout whose `app` serves")
    p.add_argument("--label", default=None, help="save as overhead_<label>.json (e.g. before)")
    p.add_argument("--out", type=Path, default=None, help="default: bench/results/overhead[_<label>].json")
    p.add_argument("--update-md", action="store_true", help="write the overhead section of BENCHMARKS.md")
    p.add_argument("--profile", action="store_true", help="record the server with py-spy (flame graph SVG)")
    p.add_argument("--uvicorn-loop", default="auto", choices=["auto", "asyncio", "uvloop"],
                   help="the server's event loop (auto, as `python -m app`: uvloop when installed)")
    p.add_argument("--uvicorn-http", default="auto", choices=["auto", "h11", "httptools"],
                   help="the server's HTTP parser (auto, as `python -m app`: httptools when installed)")
    p.add_argument("--server-env", action="append", default=[], type=_env_pair, metavar="KEY=VALUE",
                   help="a setting for the server process (e.g. PREFILL_CHUNK_TOKENS=32); repeatable")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--max-rows", type=int, default=32, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        serve(args.port, args.max_rows, args.uvicorn_loop, args.uvicorn_http)
        return 0
    logging.basicConfig(level=logging.INFO, format="[bench.overhead] %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    results_dir = REPO / "bench" / "results"
    args.out = args.out or results_dir / f"overhead{'_' + args.label if args.label else ''}.json"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    out = []
    for n in (int(s) for s in args.streams.split(",")):
        runs = [measure(args, n) for _ in range(args.repeats)]
        logger.info("streams %d: %s", n, runs)
        med = {k: statistics.median(r[k] for r in runs) for k in ("tok_s", "itl_p50_ms", "itl_p99_ms")}
        row = {"streams": n, **{k: round(v, 3) for k, v in med.items()}, "runs": runs}
        out.append(row)
        if args.json:
            sys.stdout.write(json.dumps({k: row[k] for k in ("streams", "tok_s", "itl_p50_ms", "itl_p99_ms")}) + "\n")
    record = {"label": args.label, "commit": _commit(args.server_repo), "server_repo": str(args.server_repo),
              "command": "python -m bench.overhead " + " ".join(argv if argv is not None else sys.argv[1:]),
              "settings": {"duration_s": args.duration, "prompt_tokens": args.prompt_tokens,
                           "new_tokens": args.new_tokens, "repeats": args.repeats,
                           "uvicorn": f"loop={args.uvicorn_loop} http={args.uvicorn_http}",
                           "server_env": " ".join(f"{k}={v}" for k, v in args.server_env)}, "results": out}
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    if args.update_md:
        update_md(REPO / "BENCHMARKS.md", args.out.parent)
    return 0


if __name__ == "__main__":  # also run by path as the server process, `app` coming from PYTHONPATH
    sys.exit(main())
