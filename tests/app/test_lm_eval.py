"""lm-evaluation-harness's `local-completions` model, unchanged and at its defaults (prompts sent as
token ids: `tokenized_requests=True`; the Hugging Face tokenizer read from the checkpoint folder),
run as its CLI against the real server on three small tasks that ship in `lm_eval_tasks/`:

- `gpt2serve_choice`, multiple choice: loglikelihood requests (`echo`, `logprobs: 1`, `max_tokens: 1`);
- `gpt2serve_perplexity`, loglikelihood_rolling: a text scored in windows of the model's context
  (one text is longer than a window);
- `gpt2serve_generate`, generate_until: greedy, cut at a newline.

Every loglikelihood equals the one computed from transformers' `GPT2LMHeadModel` on the same
tokens within 1e-4 (fp32), and every generation is transformers' greedy text. Nothing may reach
the network: the hub and datasets run offline, the data are local JSON files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch

from tests.app.conftest import Server

TASKS = Path(__file__).resolve().parent / "lm_eval_tasks"
NAMES = ("gpt2serve_choice", "gpt2serve_perplexity", "gpt2serve_generate")
CONTEXT = 128  # the tiny model's n_positions, given to lm-eval as max_length
EOS = 50256
TOL = 1e-4


@pytest.fixture(scope="module")
def run(scoring_server: Server, tiny_lm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("lm_eval")
    name = httpx.get(scoring_server.url + "/v1/models").json()["data"][0]["id"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HOME": str(out / "hf"), "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args",
           f"model={name},base_url={scoring_server.url}/v1/completions,tokenizer={tiny_lm_dir},max_length={CONTEXT}",
           "--tasks", ",".join(NAMES), "--include_path", str(TASKS), "--log_samples", "--output_path", str(out)]
    proc = subprocess.run(cmd, cwd=TASKS, env=env, capture_output=True, text=True, timeout=900)  # data paths: cwd
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    samples = {task: [json.loads(line) for line in next(out.rglob(f"samples_{task}_*.jsonl")).open()]
               for task in NAMES}
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]
    return {"samples": samples, "results": results, "log": proc.stderr}


def scored(hf, ids: list[int], n: int) -> tuple[float, bool]:
    """transformers' log-likelihood of the last `n` of `ids` given the ones before, and whether
    each of them is the most likely token there (lm-eval's is_greedy)."""
    with torch.no_grad():
        lp = torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), -1)
    rows, targets = lp[len(ids) - n - 1:-1], torch.tensor(ids[len(ids) - n:])
    return float(rows[torch.arange(n), targets].sum()), bool((rows.argmax(-1) == targets).all())


def test_multiple_choice_loglikelihoods_equal_transformers(run, tok, hf) -> None:
    docs = run["samples"]["gpt2serve_choice"]
    assert len(docs) == 4
    for doc in docs:
        for k, choice in enumerate(doc["doc"]["choices"]):
            context, continuation = doc["doc"]["question"], " " + choice  # lm-eval's target_delimiter
            assert doc["arguments"][f"gen_args_{k}"] == {"arg_0": context, "arg_1": continuation}
            spaces = len(context) - len(context.rstrip())  # lm-eval moves a context's trailing spaces over
            if spaces:
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            whole, ctx = tok.encode(context + continuation), tok.encode(context)
            want, greedy = scored(hf, whole, len(whole) - len(ctx))
            got, got_greedy = doc["resps"][k][0]
            assert abs(float(got) - want) < TOL, (doc["doc"], choice, got, want)
            assert got_greedy == str(greedy)
    assert 0 <= run["results"]["gpt2serve_choice"]["acc,none"] <= 1


def test_rolling_perplexity_equals_transformers_window_by_window(run, tok, hf) -> None:
    """loglikelihood_rolling: lm-eval scores the text's tokens T in windows of at most
    max_length - 2 = 126 predicted tokens, each given the 127 tokens before its end of
    [EOS] + T; the text's loglikelihood is their sum."""
    docs = run["samples"]["gpt2serve_perplexity"]
    lengths = []
    for doc in docs:
        text = doc["doc"]["text"]
        t = tok.encode(text)
        u = [EOS] + t
        lengths.append(len(t))
        want, start = 0.0, 0
        while start < len(t):
            end = min(len(t), start + CONTEXT - 2)
            window = u[max(0, end + 1 - (CONTEXT - 1)):end + 1]
            want += scored(hf, window, end - start)[0]
            start = end
        got = float(doc["resps"][0][0])
        assert abs(got - want) < TOL, (text[:30], got, want)
    assert max(lengths) > CONTEXT  # one text takes two windows
    assert run["results"]["gpt2serve_perplexity"]["word_perplexity,none"] > 1


def test_generate_until_is_transformers_greedy_text(run, tok, hf) -> None:
    for doc in run["samples"]["gpt2serve_generate"]:
        ids = tok.encode(doc["doc"]["prompt"])
        out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
        gen = out[:out.index(EOS)] if EOS in out else out  # the EOS ends it (lm-eval sends it as a stop)
        want = tok.decode(gen).split("\n")[0]
        assert doc["resps"][0][0] == want, (doc["doc"]["prompt"], doc["resps"], want)


def test_lm_eval_sent_only_fields_the_server_knows(run, scoring_server) -> None:
    assert "ignored fields" not in scoring_server.log_text()
    assert "API request failed" not in run["log"]  # no request was refused and retried
