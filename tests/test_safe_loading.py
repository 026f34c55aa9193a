"""Safe loading: remote code only when the config sets it, weights only as safetensors,
`module:function` rewards only from an explicit config value, and no pickle anywhere.

The source checks walk `src/prefloop` with `ast`, so a new call site is held to the same rules.
"""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest

from prefloop.errors import PrefloopError

SRC = Path(__file__).resolve().parents[1] / "src" / "prefloop"
PICKLING_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve",
                    "marshal"}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def sources() -> list[tuple[str, ast.Module]]:
    """(path relative to src/prefloop, tree) of every module, sub-packages (cli/) included."""
    return [(p.relative_to(SRC).as_posix(), ast.parse(p.read_text(), filename=str(p)))
            for p in sorted(SRC.rglob("*.py"))]


def calls(tree: ast.AST):
    return (node for node in ast.walk(tree) if isinstance(node, ast.Call))


def dotted(node: ast.AST) -> str:
    """`a.b.c` for a Name/Attribute chain, '' otherwise."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        head = dotted(node.value)
        return f"{head}.{node.attr}" if head else ""
    return ""


def keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def test_the_source_walk_finds_the_loaders():
    found = [name for name, tree in sources() for c in calls(tree)
             if isinstance(c.func, ast.Attribute) and c.func.attr == "from_pretrained"]
    assert {"models.py", "rewards.py", "reward_training.py"} <= set(found)


def test_from_pretrained_takes_trust_remote_code_from_the_config_and_safetensors_only():
    for name, tree in sources():
        for c in calls(tree):
            if not (isinstance(c.func, ast.Attribute) and c.func.attr == "from_pretrained"):
                continue
            where = f"{name}:{c.lineno}"
            assert not any(k.arg is None for k in c.keywords), f"{where}: **kwargs hides options"
            trust = keyword(c, "trust_remote_code")
            assert trust is not None, f"{where}: trust_remote_code must be passed explicitly"
            assert not isinstance(trust, ast.Constant), f"{where}: trust_remote_code is a literal"
            assert dotted(trust).endswith("trust_remote_code"), f"{where}: {ast.unparse(trust)}"
            if dotted(c.func.value).startswith("AutoModel"):
                safe = keyword(c, "use_safetensors")
                assert isinstance(safe, ast.Constant) and safe.value is True, \
                    f"{where}: model weights must be loaded with use_safetensors=True"


def test_trust_remote_code_is_never_switched_on_in_the_source():
    """No `trust_remote_code=True` anywhere, and every parameter of that name defaults to False."""
    for name, tree in sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.keyword) and node.arg == "trust_remote_code":
                assert not (isinstance(node.value, ast.Constant) and node.value.value), name
        for fn in ast.walk(tree):
            if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                args = fn.args.args + fn.args.kwonlyargs
                defaults = [None] * (len(fn.args.args) - len(fn.args.defaults)) + \
                    list(fn.args.defaults) + list(fn.args.kw_defaults)
                for arg, default in zip(args, defaults, strict=True):
                    if arg.arg == "trust_remote_code" and default is not None:
                        assert isinstance(default, ast.Constant) and default.value is False, \
                            f"{name}:{fn.name}"


def test_no_pickle_no_unsafe_torch_load_no_dynamic_code():
    for name, tree in sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    assert alias.name.split(".")[0] not in PICKLING_MODULES, (name, alias.name)
            if isinstance(node, ast.ImportFrom):
                assert (node.module or "").split(".")[0] not in PICKLING_MODULES, name
        for c in calls(tree):
            func = dotted(c.func)
            assert func not in ("eval", "exec", "__import__", "compile"), f"{name}:{c.lineno}"
            if func.endswith(("torch.load", "torch.serialization.load")):
                safe = keyword(c, "weights_only")
                assert isinstance(safe, ast.Constant) and safe.value is True, \
                    f"{name}:{c.lineno}: torch.load without weights_only=True"
            assert not func.endswith(("numpy.load", "np.load")) or (
                isinstance(keyword(c, "allow_pickle"), ast.Constant)
                and keyword(c, "allow_pickle").value is False), f"{name}:{c.lineno}"


def test_reward_modules_are_imported_only_from_an_explicit_config_value():
    def enclosing(node: ast.AST, parents: dict) -> ast.FunctionDef | None:
        while node in parents:
            node = parents[node]
            if isinstance(node, ast.FunctionDef):
                return node
        return None

    importers = []
    for name, tree in sources():
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for c in calls(tree):
            func = dotted(c.func)
            if func.endswith("import_module"):
                importers.append(f"{name}:{enclosing(c, parents).name}")
            if func.split(".")[-1] in ("import_function", "FunctionScorer"):
                arg = c.args[0]
                fn = enclosing(c, parents)
                params = {a.arg for a in fn.args.args} if fn else set()
                # a config field (`cfg.eval.gold`, `config.function`) or the parameter that
                # carries one through (`FunctionScorer.__init__(self, spec)`)
                ok = (isinstance(arg, ast.Attribute) and arg.attr in ("function", "gold")) or (
                    isinstance(arg, ast.Name) and arg.id in params)
                assert ok, f"{name}:{c.lineno}: {ast.unparse(arg)}"
    assert importers == ["rewards.py:import_function"]


def test_a_function_option_that_would_not_be_used_is_refused():
    from prefloop.config import RewardConfig

    with pytest.raises(PrefloopError, match=r"reward\.function: only used when reward\.type is"):
        RewardConfig(type="model", model="m", function="os:system").validate()


# ---------------------------------------------------------------- behaviour


@pytest.fixture(scope="module")
def custom_code_model(model_dir, tmp_path_factory) -> tuple[Path, Path]:
    """A model directory whose architecture exists only in its own `custom.py`, which leaves
    a marker file when it is executed."""
    d = tmp_path_factory.mktemp("custom") / "model"
    shutil.copytree(model_dir("llama", "nano"), d)
    config = json.loads((d / "config.json").read_text())
    config.update(model_type="prefloop_custom", auto_map={
        "AutoConfig": "custom.CustomConfig", "AutoModelForCausalLM": "custom.CustomModel"})
    (d / "config.json").write_text(json.dumps(config))
    marker = d.parent / "EXECUTED"
    (d / "custom.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n\n\n"
        "class CustomConfig(LlamaConfig):\n    model_type = 'prefloop_custom'\n\n\n"
        "class CustomModel(LlamaForCausalLM):\n    config_class = CustomConfig\n"
    )
    return d, marker


def test_remote_code_runs_only_when_the_config_sets_it(custom_code_model, tmp_path, capsys):
    from prefloop.cli import main
    from prefloop.models import load_causal_lm

    path, marker = custom_code_model
    data = tmp_path / "prefs.jsonl"
    data.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n")
    assert main(["train", f"model={path}", f"data.path={data}", f"output_dir={tmp_path / 'o'}",
                 "training.max_steps=1", "-q"]) == 2
    err = capsys.readouterr().err
    assert "contains custom code" in err and "set trust_remote_code: true" in err
    assert not marker.exists() and not (tmp_path / "o").exists()
    load_causal_lm(str(path), trust_remote_code=True)
    assert marker.exists()


@pytest.fixture(scope="module")
def pickled_model(model_dir, tmp_path_factory) -> Path:
    import torch
    from safetensors.torch import load_file

    d = tmp_path_factory.mktemp("pickled") / "model"
    shutil.copytree(model_dir("llama", "nano"), d)
    torch.save(load_file(d / "model.safetensors"), d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    return d


def test_pickle_weights_are_refused_by_every_loader(pickled_model):
    from prefloop.models import load_causal_lm, load_tokenizer
    from prefloop.reward_training import load_reward_backbone
    from prefloop.rewards import RewardModelScorer

    loaders = [lambda p: load_causal_lm(p), lambda p: load_tokenizer(p),
               lambda p: load_reward_backbone(p, 0), lambda p: RewardModelScorer(p)]
    for load in loaders:
        with pytest.raises(PrefloopError, match=r"only from safetensors.*pytorch_model\.bin"):
            load(str(pickled_model))


def test_safetensors_next_to_a_training_args_bin_load(model_dir, tmp_path):
    from prefloop.models import load_causal_lm

    d = tmp_path / "model"
    shutil.copytree(model_dir("llama", "nano"), d)
    (d / "training_args.bin").write_bytes(b"not read")
    assert load_causal_lm(str(d)) is not None
