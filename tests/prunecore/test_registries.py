"""The registry helper (:class:`prunecore.Registry`) and one contract per registry that every
registered entry must pass (sklearn's ``parametrize_with_checks`` idea): FoPru families, dLLM
families, shard selection steps, RAG adapters. A new entry is checked here without a new test."""

from __future__ import annotations

import dataclasses
import doctest
import json
import sys
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest

import prunecore.registry
from pipelines import rag
from pipelines.cli import build_parser
from pipelines.rag.core import ProvenceAdapter, ProvenceSettings, settings_values
from pipelines.shards import STEPS, Step, default_steps, register_step
from pipelines.shards.steps import build_step, cli_flags, method_choices, normalize_steps
from pipelines.vllm_plugin import FAMILIES as VLLM_FAMILIES
from prunecore import Registry
from prunecore.cluster import Clustering, kmeans
from tokenprune.localleap.models import FAMILIES, DLLMConfig, NativeDLLM, family_for

# --------------------------------------------------------------------------- the helper


def test_registry_docstring_examples_run():
    assert doctest.testmod(prunecore.registry).failed == 0


def test_register_refuses_a_taken_name_and_files_nothing_then():
    reg = Registry("widget")

    @reg.register("a", "b")
    class A:
        pass

    class B:
        pass

    with pytest.raises(ValueError, match=r"widget 'b' is already registered to .*A; register B under another name"):
        reg.register("c", "b")(B)
    assert "c" not in reg  # every name is checked before any is filed
    assert reg.register("a")(A) is A  # the same entry again: a no-op
    assert reg.available() == ["a", "b"] and reg["b"] is A and len(reg) == 2
    with pytest.raises(ValueError, match="at least one widget name"):
        reg.register()
    with pytest.raises(TypeError, match="non-empty string"):
        reg.register("")(B)


def test_a_reloaded_class_replaces_its_earlier_copy():
    reg = Registry("widget")
    first = reg.register("a")(type("Same", (), {"__module__": "pkg.mod"}))
    second = reg.register("a")(type("Same", (), {"__module__": "pkg.mod"}))
    assert first is not second and reg["a"] is second


def test_lookup_names_the_unknown_entry_and_the_choices():
    reg = Registry("gadget")
    reg.register("x")(int)
    assert reg.lookup("x") is int
    with pytest.raises(ValueError, match=r"unknown gadget 'y'; choose from \['x'\] see the docs"):
        reg.lookup("y", hint="see the docs")
    with pytest.raises(ValueError, match="unknown gadget None"):
        reg.lookup(None)
    assert reg.get("y") is None and None not in reg


def test_fold_case_matches_any_spelling_and_lists_the_registered_one():
    reg = Registry("family", fold_case=True)
    reg.register("Dream")(dict)
    assert "dream" in reg and "DREAM" in reg and reg["dream"] is dict
    assert reg.available() == ["Dream"]
    with pytest.raises(ValueError, match="already registered"):
        reg.register("DREAM")(list)


def test_lazy_entries_import_on_first_lookup_only(tmp_path, monkeypatch):
    (tmp_path / "lazy_mod_xyz.py").write_text("class Thing:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = Registry("adapter")
    reg.register_lazy("thing", "lazy_mod_xyz:Thing")
    assert reg.available() == ["thing"] and reg.export_table() == {"Thing": "lazy_mod_xyz"}
    assert "lazy_mod_xyz" not in sys.modules
    thing = reg["thing"]
    assert thing.__name__ == "Thing" and "lazy_mod_xyz" in sys.modules
    assert reg.register("thing")(thing) is thing  # the resolved class is the same entry
    with pytest.raises(ValueError, match="already registered to lazy_mod_xyz:Thing"):
        reg.register_lazy("thing", "other_mod:Thing")
    with pytest.raises(ValueError, match="'package.module:attr'"):
        reg.register_lazy("bad", "no_colon")
    sys.modules.pop("lazy_mod_xyz")


def test_discover_imports_every_module_of_a_package(tmp_path, monkeypatch):
    pkg = tmp_path / "plugpkg_xyz"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from prunecore import Registry\nREG = Registry('plugin')\n")
    for name in ("one", "two", "_hidden", "base"):
        (pkg / f"{name}.py").write_text(f"from plugpkg_xyz import REG\n\n@REG.register({name!r})\nclass P:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import plugpkg_xyz

    try:
        imported = plugpkg_xyz.REG.discover("plugpkg_xyz", skip=("base",))
        assert imported == ["plugpkg_xyz.one", "plugpkg_xyz.two"]
        assert plugpkg_xyz.REG.available() == ["one", "two"]
    finally:
        for name in [m for m in sys.modules if m.startswith("plugpkg_xyz")]:
            sys.modules.pop(name)


def test_old_names_still_work_with_a_deprecation_warning():
    from pipelines.shards.run import check_step

    reg = Registry("widget")
    with pytest.warns(DeprecationWarning, match="register decorator"):
        reg["a"] = int  # the tables were dicts
    assert reg["a"] is int
    with pytest.warns(DeprecationWarning, match="build_step"), pytest.raises(ValueError, match="--balance"):
        check_step({"method": "dbp", "balance": 2})


def test_unregister_removes_an_entry():
    reg = Registry("widget")
    reg.register("a")(int)
    reg.unregister("a")
    assert "a" not in reg and reg.available() == []
    with pytest.raises(KeyError):
        reg.unregister("a")


# --------------------------------------------------------------------------- FoPru families


def fopru_families() -> list[str]:
    pytest.importorskip("transformers")
    from tokenprune.fopru.adapters import ADAPTERS

    return ADAPTERS.available()


@pytest.mark.parametrize("model_type", fopru_families())
def test_fopru_family_contract(model_type):
    from tokenprune.fopru.adapters import ADAPTERS, FoPruAdapter, supported_families

    cls = ADAPTERS[model_type]
    assert issubclass(cls, FoPruAdapter) and cls.family and model_type in cls.model_types
    assert cls.__module__.startswith("tokenprune.fopru.adapters.")
    for method in ("make_capture", "encode", "select"):  # what the base docstring says a family implements
        assert getattr(cls, method) is not getattr(FoPruAdapter, method), (model_type, method)
    assert f"({model_type}" in supported_families() or f", {model_type}" in supported_families()
    assert set(cls.video_keys).isdisjoint(cls.visual_keys)


# --------------------------------------------------------------------------- dLLM families


@pytest.mark.parametrize("model_type", FAMILIES.available())
def test_dllm_family_contract(model_type):
    cls = FAMILIES[model_type]
    assert issubclass(cls, NativeDLLM) and cls.model_type == model_type
    assert family_for(model_type.upper()) is cls and family_for(model_type.lower()) is cls
    for method in ("layers", "embed", "head"):
        assert getattr(cls, method) is not getattr(NativeDLLM, method), (model_type, method)
    config_class = cls.config_class
    assert issubclass(config_class, DLLMConfig)
    values = config_class(mask_token_id=5).to_dict()
    assert config_class.from_dict(values).to_dict() == values  # config.json round trip
    with pytest.raises(ValueError, match="mask_token_id"):
        config_class.from_dict({k: v for k, v in values.items() if k != "mask_token_id"})


def test_unknown_dllm_family_lists_the_registered_ones():
    with pytest.raises(ValueError, match=r"not a supported diffusion LLM; supported: \['Dream', 'llada'\]"):
        family_for("gpt2")


# --------------------------------------------------------------------------- selection steps


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((90, 8)).astype(np.float32)
    x[45:60] = x[:15] + 1e-3 * rng.standard_normal((15, 8)).astype(np.float32)  # near duplicates
    texts = (x + 0.5 * rng.standard_normal((90, 8))).astype(np.float32)
    return x, texts, kmeans(x, 4, seed=0, device="cpu")


def per_cluster_run(step: Step, rows: np.ndarray, clustering: Clustering):
    """What a distributed executor does for a per-cluster step: the step on each cluster's
    rows alone (one-cluster clustering, rows ascending), merged by the step."""
    keep = np.ones(rows.shape[0], dtype=bool)
    scores = np.full(rows.shape[0], np.nan, dtype=np.float32)
    for c in range(clustering.k):
        idx = np.flatnonzero(clustering.labels == c)
        if idx.size == 0:
            continue
        one = Clustering(
            centroids=np.zeros((1, rows.shape[1]), np.float32),
            labels=np.zeros(idx.size, np.int64),
            sim=clustering.sim[idx],
        )
        sel = step.run(rows[idx], one, None, device="cpu")
        keep[idx], scores[idx] = sel.keep, sel.scores
    return step.merge_clusters(clustering, keep, scores)


@pytest.mark.parametrize("method", STEPS.available())
def test_selection_step_contract(method, problem):
    rows, texts, clustering = problem
    cls = STEPS[method]
    assert issubclass(cls, Step) and cls.method == method and dataclasses.is_dataclass(cls)
    step = build_step({"method": method, **cls.example})
    as_dict = step.as_dict()
    assert normalize_steps([as_dict]) == [as_dict] and json.loads(json.dumps(as_dict)) == as_dict
    fields = cls.defaults()
    dests = {flag.dest for flag in cls.flags}
    assert set(cls.enabled_by) <= dests
    for flag in cls.flags:
        assert flag.param in fields, (method, flag.name)
        if flag.choices is not None:
            assert fields[flag.param] in flag.choices
            with pytest.raises(ValueError, match=f"{method} {flag.param} must be one of"):
                build_step({**as_dict, flag.param: "no-such-choice"})
    # every flag and (if offered) the method itself are on the command line
    parser = build_parser()
    filter_parser = parser._subparsers._group_actions[0].choices["filter"]
    options = {s for a in filter_parser._actions for s in a.option_strings}
    assert {flag.name for flag in cls.flags} <= options
    method_action = next(a for a in filter_parser._actions if "--method" in a.option_strings)
    assert (method in method_action.choices) == cls.method_choice
    # it runs, on (m, d) rows -> a Selection of m rows, the same twice
    texts = texts if cls.needs_texts else None  # a step that does not say it reads captions gets none
    sel = step.run(rows, clustering, texts, device="cpu")
    again = step.run(rows, clustering, texts, device="cpu")
    assert sel.n == rows.shape[0] and sel.keep.dtype == bool and 0 < sel.n_kept <= sel.n
    np.testing.assert_array_equal(sel.keep, again.keep)
    assert set(sel.reasons[~sel.keep]) and "" not in set(sel.reasons[~sel.keep])
    if step.runs_per_cluster:  # what it tells the executors must hold: per-cluster == whole
        merged = per_cluster_run(step, rows, clustering)
        np.testing.assert_array_equal(merged.keep, sel.keep)
        np.testing.assert_array_equal(merged.reasons, sel.reasons)
        np.testing.assert_allclose(merged.scores, sel.scores, rtol=0, atol=1e-6)
        assert merged.stats.keys() == sel.stats.keys()
        for name in sel.stats:
            assert merged.stats[name].equals(sel.stats[name]), name


@dataclass(frozen=True)
class EveryOtherStep(Step):
    """A step defined outside the package: keep rows 0, 2, 4... (registered inside one test)."""

    method: ClassVar[str] = "every_other_test"
    flags: ClassVar = ()
    offset: int = 0

    def run(self, rows, clustering, texts=None, *, device="auto", progress=False):
        from dataprune import Selection

        return Selection.from_mask(np.arange(rows.shape[0]) % 2 == self.offset, "odd")


def test_cli_method_choices_and_flags_come_from_the_registry():
    assert "every_other_test" not in method_choices()
    register_step(EveryOtherStep)
    try:
        assert method_choices()[-2:] == ["every_other_test", "semdedup"]
        args = build_parser().parse_args(["filter", "s.tar", "--out", "o", "--method", "every_other_test"])
        assert default_steps(method=args.method, seed=args.seed) == [{"method": "every_other_test"}]
        with pytest.raises(ValueError, match="already registered"):
            register_step(type("Clash", (EveryOtherStep,), {"__module__": __name__}))
    finally:
        STEPS.unregister(EveryOtherStep.method)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["filter", "s.tar", "--out", "o", "--method", "every_other_test"])
    with pytest.raises(ValueError, match="choose dbp, ssp, random, semdedup or none"):
        default_steps(method="every_other_test")


def test_shared_flags_are_declared_once_with_each_steps_default():
    helps = {flag.name: text for flag, text in cli_flags()}
    assert helps["--keep"].endswith("(default: dbp 0.3, ssp 0.5, random 0.5)")
    assert helps["--order"].startswith("which rows go first: hard = farthest from their centroid")
    assert helps["--order"].endswith("(default hard)")  # one default shared by SemDeDup, DBP and SSP
    assert list(helps)[:3] == ["--clip-score-min", "--clip-score-keep", "--dedup-eps"]


def test_steps_check_their_own_parameters_naming_the_flag():
    for step, message in [
        ({"method": "dbp", "temperature": 0}, "--temperature must be a number in (0.0, inf)"),
        ({"method": "dbp", "min_per_cluster": -1}, "dbp min_per_cluster must be an integer >= 0"),
        ({"method": "semdedup", "eps": 3}, "--dedup-eps must be a number in (0.0, 2.0)"),
        ({"method": "semdedup", "block_size": 0}, "semdedup block_size must be an integer >= 1"),
        ({"method": "clipscore", "min": 2}, "--clip-score-min must be a number in [-1.0, 1.0]"),
        ({"method": "ssp", "keep": 1.5}, "--keep of ssp: keep fraction 1.5 is outside"),
        ({"method": "ssp", "order": "random"}, "ssp order must be one of ('hard', 'easy')"),
        ({"method": "dbp", "order": "up"}, "dbp order must be one of ('hard', 'easy', 'random')"),
    ]:
        with pytest.raises(ValueError) as err:
            build_step(step)
        assert str(err.value).startswith(message), (step, str(err.value))


# --------------------------------------------------------------------------- RAG adapters


@pytest.mark.parametrize("framework", rag.ADAPTERS.available())
def test_rag_adapter_contract(framework):
    from tests.helpers.provence import keyword_pruner

    attr_of = {module.rsplit(".", 1)[-1]: attr for attr, module in rag.ADAPTERS.export_table().items()}
    target = attr_of[framework]
    pytest.importorskip({"langchain": "langchain_core", "llamaindex": "llama_index.core"}.get(framework, framework))
    cls = rag.ADAPTERS[framework]
    assert cls.__name__ == target and getattr(rag, target) is cls and target in rag.__all__
    assert issubclass(cls, ProvenceAdapter)
    pruner = keyword_pruner()
    defaults = {f.name: f.default for f in dataclasses.fields(ProvenceSettings)}
    # every shared setting, with the shared default, and each one taken from the constructor
    assert settings_values(cls(pruner=pruner).settings()) == defaults, framework
    changed = {"keep": 0.3, "threshold": 0.2, "top_k": 2, "reorder": not defaults["reorder"]}
    assert {k: getattr(cls(pruner=pruner, **changed).settings(), k) for k in changed} == changed, framework
    with pytest.raises(TypeError, match="unknown Provence setting"):
        cls(pruner=pruner, no_such_setting=1)


def vllm_class_bases(target: str) -> set[str]:
    """Base class names of the ``"module:Class"`` a vLLM family entry names, read from the
    plugin module's source (vLLM is not installed in this environment)."""
    import ast
    import importlib.util

    module, _, class_name = target.partition(":")
    assert module.startswith("pipelines.vllm_plugin."), target
    with open(importlib.util.find_spec(module).origin) as source:
        tree = ast.parse(source.read())
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    assert class_name in classes, target
    return {ast.unparse(base) for base in classes[class_name].bases}


@pytest.mark.parametrize("architecture", VLLM_FAMILIES.available())
def test_vllm_family_contract(architecture):
    """Each entry names a class of the plugin package that subclasses vLLM's class of the same
    architecture."""
    target = VLLM_FAMILIES[architecture]
    assert architecture in vllm_class_bases(target), target


# --------------------------------------------------------------------------- every registry is checked

# Each ``Registry`` instance of the library -> the contract test that every entry of it must pass.
CONTRACTS = {
    "tokenprune.fopru.adapters.registry:ADAPTERS": test_fopru_family_contract,
    "tokenprune.localleap.models.base:FAMILIES": test_dllm_family_contract,
    "pipelines.shards.steps:STEPS": test_selection_step_contract,
    "pipelines.rag:ADAPTERS": test_rag_adapter_contract,
    "pipelines.vllm_plugin:FAMILIES": test_vllm_family_contract,
}


def library_registries() -> list[str]:
    """``module:NAME`` of every module-level ``NAME = Registry(...)`` in the library (read from
    the source, nothing imported)."""
    import ast
    from pathlib import Path

    root = Path(prunecore.registry.__file__).resolve().parents[1]
    found = []
    for package in ("prunecore", "dataprune", "tokenprune", "pipelines"):
        for path in sorted((root / package).rglob("*.py")):
            for node in ast.parse(path.read_text()).body:
                value = node.value if isinstance(node, (ast.Assign, ast.AnnAssign)) else None
                if isinstance(value, ast.Call) and getattr(value.func, "id", None) == "Registry":
                    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                    module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
                    found += [f"{module}:{t.id}" for t in targets]
    return found


def test_every_registry_of_the_library_has_a_contract_test():
    """A new ``Registry`` is added to CONTRACTS with a parametrized test over its entries."""
    found = library_registries()
    assert found, "no Registry found: the scan is broken"
    assert sorted(found) == sorted(CONTRACTS), "a registry without a contract test (or a stale CONTRACTS entry)"
    for test in CONTRACTS.values():
        (marker,) = [m for m in test.pytestmark if m.name == "parametrize"]
        assert marker.args[1], f"{test.__name__} is parametrized over no entries"


@pytest.mark.parametrize("where", sorted(CONTRACTS))
def test_every_entry_is_found_under_each_of_its_names(where):
    import importlib

    module, name = where.split(":")
    registry = getattr(importlib.import_module(module), name)
    if where == "tokenprune.fopru.adapters.registry:ADAPTERS":
        pytest.importorskip("transformers")
    assert isinstance(registry, Registry) and len(registry) == len(registry.available()) > 0
    for key in registry.available():
        if where == "pipelines.rag:ADAPTERS":
            pytest.importorskip({"langchain": "langchain_core", "llamaindex": "llama_index.core"}.get(key, key))
        entry = registry[key]
        assert key in registry and registry.lookup(key) is entry and registry.get(key) is entry
        declared = {
            "tokenprune.fopru.adapters.registry:ADAPTERS": lambda e: set(e.model_types),
            "tokenprune.localleap.models.base:FAMILIES": lambda e: {e.model_type},
            "pipelines.shards.steps:STEPS": lambda e: {e.method},
            "pipelines.rag:ADAPTERS": lambda e: {e.__module__.rsplit(".", 1)[-1]},
            "pipelines.vllm_plugin:FAMILIES": vllm_class_bases,
        }[where](entry)
        assert key in declared, (where, key, declared)  # the entry is filed under a name it declares
