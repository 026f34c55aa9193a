"""`prefloop merge`: the merge methods on hand-worked tensors, and whole model directories."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from prefloop.cli import main
from prefloop.errors import PrefloopError
from prefloop.merge import (
    MergeConfig,
    ShardWriter,
    dare,
    merge_models,
    task_arithmetic,
    ties,
    trim_to_density,
)


def f64(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# ---------------------------------------------------------------- the methods on tensors


def test_ties_trim_sign_election_and_disjoint_mean_by_hand():
    d1 = f64(0.5, -0.1, 0.4, -0.6, 0.2)
    d2 = f64(-0.3, 0.35, 0.25, -0.15, 0.05)
    # trim, density 0.6 of 5 entries → keep ⌊3.0⌋ = 3 largest |δ| per model:
    #   δ̃1 = [0.5, 0, 0.4, -0.6, 0]       (|0.6|, |0.5|, |0.4| kept)
    #   δ̃2 = [-0.3, 0.35, 0.25, 0, 0]     (|0.35|, |0.3|, |0.25| kept)
    assert trim_to_density(d1, 0.6).tolist() == [0.5, 0.0, 0.4, -0.6, 0.0]
    assert trim_to_density(d2, 0.6).tolist() == [-0.3, 0.35, 0.25, 0.0, 0.0]
    # weights w = (1, 2): u1 = δ̃1, u2 = 2·δ̃2 = [-0.6, 0.7, 0.5, 0, 0]
    # Σu = [-0.1, 0.7, 0.9, -0.6, 0] → elected sign s = [-, +, +, -, +] (0 counts as +)
    # disjoint mean Σ a_k u_k / Σ a_k w_k over the entries agreeing with s:
    #   0: only u2 = -0.6 agrees (u1's +0.5 is outvoted) → -0.6 / 2 = -0.3
    #   1: only u2 = 0.7                                  →  0.7 / 2 = 0.35
    #   2: both, 0.4 + 0.5                                →  0.9 / 3 = 0.3
    #   3: only u1 = -0.6                                 → -0.6 / 1 = -0.6
    #   4: no entry survived the trim                     →  0
    # scaled by λ = 0.5 → [-0.15, 0.175, 0.15, -0.3, 0]
    merged = ties([d1, d2], weights=[1.0, 2.0], densities=[0.6, 0.6], scale=0.5)
    torch.testing.assert_close(merged, f64(-0.15, 0.175, 0.15, -0.3, 0.0), rtol=0, atol=1e-15)


def test_ties_trim_keeps_exactly_floor_density_times_n_per_tensor():
    delta = torch.randn(7, 13, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for density, kept in ((0.1, 9), (0.5, 45), (1.0, 91), (0.005, 0)):
        trimmed = trim_to_density(delta, density)
        assert int((trimmed != 0).sum()) == kept
        if kept:  # the survivors are the largest magnitudes, unchanged
            threshold = delta.abs().flatten().sort(descending=True).values[kept - 1]
            assert torch.equal(trimmed != 0, delta.abs() >= threshold)
            assert torch.equal(trimmed[trimmed != 0], delta[trimmed != 0])


def test_task_arithmetic_by_hand():
    # 0.5 · (1·[1, -2] + (-0.5)·[4, 2]) = 0.5 · [-1, -3] = [-0.5, -1.5]
    merged = task_arithmetic([f64(1, -2), f64(4, 2)], weights=[1.0, -0.5], scale=0.5)
    assert merged.tolist() == [-0.5, -1.5]


def test_dare_keeps_about_density_rescales_exactly_and_is_reproducible():
    delta = torch.randn(200_000, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(1)) + 3.0  # no zeros
    p = 0.7  # drop probability; density ρ = 1 − p
    out = dare(delta, 1 - p, torch.Generator().manual_seed(5))
    kept = out != 0
    assert abs(kept.double().mean().item() - (1 - p)) < 0.005  # binomial sd ≈ 0.001
    assert torch.equal(out[kept], delta[kept] / (1 - p))
    assert torch.equal(out, dare(delta, 1 - p, torch.Generator().manual_seed(5)))
    assert not torch.equal(out, dare(delta, 1 - p, torch.Generator().manual_seed(6)))


# ---------------------------------------------------------------- whole models


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer):
    """base, two fine-tunes of it (different random weights), and a sparse delta of the base."""
    from prefloop.tiny import build_causal_lm, save_pretrained_pair

    d = tmp_path_factory.mktemp("merge")
    base = build_causal_lm("llama", tokenizer, "nano", seed=0)
    save_pretrained_pair(base, tokenizer, d / "base")
    for name, seed in (("a", 1), ("b", 2)):
        save_pretrained_pair(build_causal_lm("llama", tokenizer, "nano", seed=seed), tokenizer,
                             d / name)
    save_pretrained_pair(build_causal_lm("llama", tokenizer, "micro"), tokenizer, d / "micro")
    return d


def state(path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).state_dict()


def test_task_arithmetic_at_weight_one_returns_the_model_unchanged(models, tmp_path):
    # δ = θ_a − θ_base, θ_base + 1·δ = θ_a bit for bit (float64 arithmetic)
    merge_models(MergeConfig(base=str(models / "base"), models=[str(models / "a")],
                             output_dir=str(tmp_path / "out")))
    # the model merged with itself: δ = 0
    merge_models(MergeConfig(base=str(models / "a"), models=[str(models / "a")],
                             output_dir=str(tmp_path / "self")))
    expected = state(models / "a")
    for out in ("out", "self"):
        got = state(tmp_path / out)
        assert got.keys() == expected.keys()
        for name, tensor in expected.items():
            assert torch.equal(got[name], tensor), (out, name)


def test_sparse_delta_sparsity_is_reported_and_cli_output_loads(models, tmp_path, capsys,
                                                                monkeypatch, tokenizer):
    from transformers import AutoModelForCausalLM

    from prefloop.tiny import save_pretrained_pair

    # a fine-tune that changed 100 entries by 0.5 and 50 more by 5e-9 (≤ the 1e-8 tolerance)
    model = AutoModelForCausalLM.from_pretrained(models / "base")
    with torch.no_grad():
        emb = model.get_input_embeddings().weight.view(-1)
        emb[100:150] = 1e-6  # in the base too, where 1e-6 + 5e-9 is representable
        save_pretrained_pair(model, tokenizer, tmp_path / "base")
        emb[:100] += 0.5
        emb[100:150] += 5e-9
    save_pretrained_pair(model, tokenizer, tmp_path / "sparse")
    total = sum(p.numel() for p in model.parameters())

    monkeypatch.setenv("COLUMNS", "250")
    out = tmp_path / "merged"
    assert main(["merge", "--base", str(tmp_path / "base"), "--models", str(tmp_path / "sparse"),
                 str(models / "a"), "--method", "ties", "--weights", "0.5", "0.5",
                 "--density", "0.2", "--out", str(out), "-q"]) == 0
    printed = capsys.readouterr().out
    exact, near = (total - 150) / total, (total - 100) / total
    assert f"{exact:.2%} / {near:.2%}" in printed
    summary = json.loads((out / "merge_summary.json").read_text())
    assert summary["deltas"][0]["exact_zero"] == pytest.approx(exact, abs=1e-12)
    assert summary["deltas"][0]["near_zero"] == pytest.approx(near, abs=1e-12)
    assert summary["method"] == "ties" and summary["density"] == [0.2, 0.2]
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded(torch.tensor([[1, 2, 3]])).logits.shape[-1] == len(tokenizer)
    assert (out / "tokenizer.json").is_file()
    assert not list(tmp_path.glob(".*partial"))


def test_dare_merge_is_reproducible_by_seed(models, tmp_path):
    def run(name: str, seed: int) -> bytes:
        cfg = MergeConfig(base=str(models / "base"), models=[str(models / "a"), str(models / "b")],
                          method="dare_ties", density=0.3, seed=seed,
                          output_dir=str(tmp_path / name))
        result = merge_models(cfg)
        assert result.merged.zero_share > 0.3  # two 30% masks leave about half of δ at 0
        return (tmp_path / name / "model.safetensors").read_bytes()

    assert run("one", 3) == run("two", 3)
    assert run("one", 3) != run("three", 4)


def test_sharded_weights_are_read_and_written(models, tmp_path):
    from prefloop.merge import CONFIG_FILES, TOKENIZER_FILES, SafetensorsWeights

    # re-save model a in shards of ~20 kB, with an index
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    writer = ShardWriter(sharded, 20_000)
    from contextlib import ExitStack

    with ExitStack() as stack:
        a = SafetensorsWeights(models / "a", stack)
        for name in a.names:
            writer.add(name, a.get(name))
    files = writer.close()
    assert len(files) > 1 and (sharded / "model.safetensors.index.json").is_file()
    for name in (*CONFIG_FILES, *TOKENIZER_FILES):
        if (models / "a" / name).is_file():
            (sharded / name).write_bytes((models / "a" / name).read_bytes())
    merge_models(MergeConfig(base=str(models / "base"), models=[str(sharded)],
                             output_dir=str(tmp_path / "out")))
    expected, got = state(models / "a"), state(tmp_path / "out")
    assert all(torch.equal(got[k], v) for k, v in expected.items())
    assert all(torch.equal(state(sharded)[k], v) for k, v in expected.items())


# ---------------------------------------------------------------- errors


def test_mismatched_shapes_name_the_file_and_tensor(models, tmp_path):
    with pytest.raises(PrefloopError, match=r"micro/model\.safetensors: tensor "
                                            r"model\.embed_tokens\.weight has shape"):
        merge_models(MergeConfig(base=str(models / "base"), models=[str(models / "micro")],
                                 output_dir=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".*"))


def test_missing_tensor_and_pickle_weights_are_refused(models, tmp_path):
    from safetensors.torch import load_file, save_file

    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text((models / "a" / "config.json").read_text())
    tensors = load_file(models / "a" / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, partial / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(PrefloopError, match=r"partial: missing tensor model\.norm\.weight"):
        merge_models(MergeConfig(base=str(models / "base"), models=[str(partial)],
                                 output_dir=str(tmp_path / "out")))

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((models / "a" / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(PrefloopError, match=r"pickled: no safetensors weights \(found "
                                            r"pytorch_model\.bin"):
        merge_models(MergeConfig(base=str(models / "base"), models=[str(pickled)],
                                 output_dir=str(tmp_path / "out")))
    # one list of pickle suffixes for every loader: merge missed .pickle
    (pickled / "pytorch_model.bin").rename(pickled / "weights.pickle")
    with pytest.raises(PrefloopError, match=r"\(found weights\.pickle; prefloop reads no"):
        merge_models(MergeConfig(base=str(models / "base"), models=[str(pickled)],
                                 output_dir=str(tmp_path / "out")))


@pytest.mark.parametrize("overrides, message", [
    ({"weights": [1.0]}, "weights: 1 values for 2 model"),
    ({"method": "ties"}, "density: required by ties"),
    ({"method": "ties", "density": [0.2, 0.3, 0.4]}, "density: 3 values for 2 model"),
    ({"method": "dare_linear", "density": 1.5}, r"density: every value must be in \(0, 1\]"),
    ({"method": "dare_ties", "density": 0.0}, r"density: every value must be in \(0, 1\]"),
    ({"density": 0.2}, "density: task_arithmetic keeps every entry"),
    ({"method": "ties", "density": 0.2, "weights": [1.0, -1.0]}, "ties needs positive weights"),
    ({"method": "sum"}, "method: 'sum' is not one of"),
    ({"output_dir": "A"}, "output_dir: A is also an input model"),
])
def test_bad_options_are_refused(overrides, message):
    from prefloop.config import from_dict

    cfg = from_dict(MergeConfig, {"base": "B", "models": ["A", "C"], **overrides})
    with pytest.raises(PrefloopError, match=message):
        cfg.validate()


def test_cli_error_is_one_line_and_exit_2(models, tmp_path, capsys):
    assert main(["merge", "--base", str(models / "base"), "--models", str(models / "a"),
                 "--method", "ties", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("prefloop: error: density: required") and "\n" not in err
    assert not Path(tmp_path / "out").exists()
