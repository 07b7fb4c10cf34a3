"""Session fixtures: tiny random GPT-2 checkpoints in HF format, built with `transformers`
from a `GPT2Config` (never downloaded), with the real GPT-2 BPE files beside them."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest
import torch

from model.tokenizer import default_bpe_files

VOCAB = 50257  # the real GPT-2 vocabulary, so the real tokenizer drives the tiny models


def copy_bpe_files(folder: Path) -> None:
    vocab, merges = default_bpe_files()
    shutil.copyfile(vocab, folder / "vocab.json")
    shutil.copyfile(merges, folder / "merges.txt")


def make_hf_checkpoint(folder: Path, task: str = "generate", seed: int = 0, **config) -> Path:
    """Save a random `transformers` GPT-2 (LM or sequence classifier) as a checkpoint folder."""
    import transformers

    torch.manual_seed(seed)
    defaults = dict(vocab_size=VOCAB, n_positions=128, n_embd=32, n_layer=2, n_head=4)
    cfg = transformers.GPT2Config(**(defaults | config))
    if task == "classify":
        cfg.pad_token_id = cfg.eos_token_id
        cfg.id2label = {0: "negative", 1: "neutral", 2: "positive"}
        cfg.label2id = {v: k for k, v in cfg.id2label.items()}
        hf = transformers.GPT2ForSequenceClassification(cfg)
    else:
        hf = transformers.GPT2LMHeadModel(cfg)
    with torch.no_grad():  # HF's init gives LayerNorm weight 1 / bias 0; random ones test more
        for name, p in hf.named_parameters():
            if ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    folder.mkdir(parents=True, exist_ok=True)
    hf.eval().save_pretrained(folder)
    copy_bpe_files(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 32-dim, 4-head GPT-2 LM with the real vocabulary."""
    return make_hf_checkpoint(tmp_path_factory.mktemp("tiny_lm"), "generate", seed=0)


@pytest.fixture(scope="session")
def tiny_classifier_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer GPT-2 sequence classifier with labels negative/neutral/positive, pad = eos."""
    return make_hf_checkpoint(tmp_path_factory.mktemp("tiny_cls"), "classify", seed=1)


def run_root(tmp_path_factory: pytest.TempPathFactory, config: pytest.Config) -> Path:
    """The run's base temporary directory: under pytest-xdist, the one above each worker's own,
    shared by all workers and removed with them."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if _is_worker(config) else base


@pytest.fixture(scope="session")
def onnx_cache(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> Path:
    """One export cache for the whole run, shared by the xdist workers: the first user of each
    checkpoint exports it (the export lock keeps two workers from exporting the same one at once;
    the tiny checkpoints are seeded, so every worker's copy hashes alike) and later ones hit it."""
    folder = run_root(tmp_path_factory, pytestconfig) / "onnx_cache"
    folder.mkdir(exist_ok=True)
    return folder


def _cuda_available() -> bool:
    try:
        import onnxruntime as ort

        if "CUDAExecutionProvider" in ort.get_available_providers():
            return True
    except ImportError:
        pass
    return torch.cuda.is_available()


def require(*commands: str, packages: str, paths: tuple[Path, ...] = ()) -> None:
    """Skip the running test when a system component it needs is missing, naming the Debian
    packages, or fail it under CI=true: `.ci/run` installs them, so a missing one there is a
    broken CI, not a reason to test less (issue 20). GPU tests are the exception (marker `cuda`)."""
    missing = [c for c in commands if shutil.which(c) is None] + [str(p) for p in paths if not Path(p).exists()]
    if not missing:
        return
    reason = f"needs {', '.join(missing)}: apt-get install {packages}"
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true and {reason} (.ci/run installs it)", pytrace=False)
    pytest.skip(reason)


def needs(*commands: str, packages: str, paths: tuple[Path, ...] = ()) -> pytest.MarkDecorator:
    """Mark a test (or a module, as `pytestmark`) that needs system components; see `require`."""
    return pytest.mark.needs(commands=commands, packages=packages, paths=paths)


def pytest_runtest_setup(item: pytest.Item) -> None:
    for mark in item.iter_markers("needs"):
        require(*mark.kwargs["commands"], packages=mark.kwargs["packages"], paths=mark.kwargs.get("paths", ()))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `cuda` need an NVIDIA GPU; they skip (with the reason) where there is none."""
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (CUDAExecutionProvider or torch.cuda)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


# ---- nothing left behind (issue 26) -------------------------------------------------------------
# pytest removes its base temporary directory when the run passes (tmp_path_retention_policy =
# "failed" in pyproject.toml); anything else a test leaves in the temporary directory (a server's
# files, an export, a venv made with tempfile) is caught here: the run fails past this growth.
TMP_GROWTH_LIMIT = 100 * 2**20
_TMP_BEFORE = pytest.StashKey[dict[str, int]]()


def _is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")  # a pytest-xdist worker; the controller checks for all


def _sizes(root: Path) -> dict[str, int]:
    """Bytes on disk under each entry of `root` (symlinks not followed, unreadable parts skipped)."""
    out: dict[str, int] = {}
    try:
        entries = list(os.scandir(root))
    except OSError:
        return out
    for entry in entries:
        total = 0
        try:
            total += entry.stat(follow_symlinks=False).st_blocks * 512
            if entry.is_dir(follow_symlinks=False):
                for folder, dirs, files in os.walk(entry.path, onerror=lambda e: None):
                    for name in dirs + files:
                        with contextlib.suppress(OSError):
                            total += os.lstat(os.path.join(folder, name)).st_blocks * 512
        except OSError:
            pass
        out[entry.name] = total
    return out


def pytest_sessionstart(session: pytest.Session) -> None:
    # Not in a pytest that a test runs (tests/test_needs.py): the other workers' files would count.
    if not _is_worker(session.config) and "PYTEST_CURRENT_TEST" not in os.environ:
        session.config.stash[_TMP_BEFORE] = _sizes(Path(tempfile.gettempdir()))


@pytest.hookimpl(trylast=True)  # after pytest's own clean-up of its base temporary directory
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _is_worker(session.config):
        session.config.workeroutput["fixture_times"] = json.dumps(session.config.stash.get(_FIXTURE_TIMES, {}))
        return
    before = session.config.stash.get(_TMP_BEFORE, None)
    if before is None:
        return
    after = _sizes(Path(tempfile.gettempdir()))
    grown = {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0) > 0}
    total = sum(after.values()) - sum(before.values())
    report = session.config.pluginmanager.get_plugin("terminalreporter")
    line = f"temporary directory {tempfile.gettempdir()}: {total / 2**20:+.1f} MB over the run"
    if total > TMP_GROWTH_LIMIT:
        top = sorted(grown.items(), key=lambda kv: -kv[1])[:10]
        line += (f", past the {TMP_GROWTH_LIMIT // 2**20} MB allowed; grew: "
                 + ", ".join(f"{k} {v / 2**20:+.1f} MB" for k, v in top))
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    if report is not None:
        report.write_line(line, red=total > TMP_GROWTH_LIMIT)


# ---- where the time goes (issue 26): `pytest --fixture-durations=N` ------------------------------
# Sums each fixture's set-up time (server starts, exports, checkpoints, client venvs) over the run,
# across pytest-xdist workers, and prints the N largest; `--durations` gives the per-test view.
_FIXTURE_TIMES = pytest.StashKey[dict[str, list[float]]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--fixture-durations", type=int, default=None, metavar="N",
                     help="print the N fixtures with the most set-up time, summed over the run")


class _FixtureTimer:
    """Registered as a plugin, not left as conftest hooks: a conftest's `pytest_fixture_setup` is
    not called for the session-scoped fixtures (their node is the session, above tests/)."""

    @pytest.hookimpl(hookwrapper=True)
    def pytest_fixture_setup(self, fixturedef: pytest.FixtureDef, request: pytest.FixtureRequest):  # noqa: ANN201
        t0 = time.perf_counter()
        yield
        times = request.config.stash.setdefault(_FIXTURE_TIMES, {})
        times.setdefault(f"{fixturedef.argname} ({fixturedef.scope})", []).append(time.perf_counter() - t0)


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--fixture-durations"):
        config.pluginmanager.register(_FixtureTimer(), "fixture-timer")


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:  # noqa: ANN001 - pytest-xdist's hook: a worker's sums
    got = getattr(node, "workeroutput", {}).get("fixture_times")
    if got:
        times = node.config.stash.setdefault(_FIXTURE_TIMES, {})
        for name, values in json.loads(got).items():
            times.setdefault(name, []).extend(values)


@pytest.hookimpl(tryfirst=True)
def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:  # noqa: ANN001
    n = config.getoption("--fixture-durations")
    times = config.stash.get(_FIXTURE_TIMES, {})
    if not n or not times:
        return
    terminalreporter.section(f"fixture set-up, summed over the run (top {n})")
    for name, values in sorted(times.items(), key=lambda kv: -sum(kv[1]))[:n]:
        terminalreporter.write_line(f"{sum(values):9.2f}s  {len(values):4d}x  {name}")
