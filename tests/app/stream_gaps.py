"""`python -m tests.app.stream_gaps URL [WORKERS]`: clients streaming /generate_stream back to back
until a line arrives on stdin, then one JSON line on stdout: the gaps between consecutive tokens of
each stream (s) and the number of tokens. A separate process, so the test's own big requests (JSON
of megabytes, in its interpreter) do not delay these clients."""

from __future__ import annotations

import json
import sys
import threading
import time

import httpx


def stream(url: str, i: int, stop: threading.Event, gaps: list[float], tokens: list[int]) -> None:
    body = {"inputs": f"Stream {i} says", "parameters": {"max_new_tokens": 100}}
    with httpx.Client(base_url=url, timeout=60) as client:
        while not stop.is_set():
            last = None
            with client.stream("POST", "/generate_stream", json=body) as r:
                if r.status_code != 200:
                    raise RuntimeError(f"status {r.status_code}: {r.read()[:300]!r}")
                for line in r.iter_lines():
                    if line.startswith("data:"):
                        now = time.monotonic()
                        if last is not None:
                            gaps.append(now - last)
                        last = now
                        tokens[0] += 1


def main() -> int:
    url, workers = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 2
    stop, gaps, tokens = threading.Event(), [], [0]
    threads = [threading.Thread(target=stream, args=(url, i, stop, gaps, tokens), daemon=True) for i in range(workers)]
    for t in threads:
        t.start()
    sys.stdout.write("started\n")
    sys.stdout.flush()
    sys.stdin.readline()
    stop.set()
    for t in threads:
        t.join(60)
    sys.stdout.write(json.dumps({"gaps": gaps, "tokens": tokens[0]}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
