"""The layout reads as the architecture: trainer/ in packages by concern whose imports point one
way (no cycle, counting imports inside functions; the layers of .importlinter hold), no two
modules share a name, the command line starts without torch, and every shipped config plans
for the world its own command line names."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO
from trainer.config.schema import load_config

PACKAGES = ("trainer", "launch")
# The start-up comment a function-level import of a project module carries (the only reason one stays).
LIGHT_START = re.compile(r"#.*(start|light|torch)", re.IGNORECASE)


def project_modules(root: Path) -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (root / package).rglob("*.py"):
            name = ".".join(path.relative_to(root).with_suffix("").parts)
            modules[name.removesuffix(".__init__")] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, ast.stmt, bool]]:
    """(imported project module, statement, inside a function) for every import in `path`,
    relative ones resolved; `from package import module` counts as importing the module."""
    tree = ast.parse(path.read_text())
    inside = {id(node) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
              for node in ast.walk(fn)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".")[: len(name.split(".")) - node.level + (path.name == "__init__.py")]
                base = ".".join(parts + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.append((target, node, id(node) in inside))
                break
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    modules = project_modules(root)
    return {name: {target for target, _, _ in imports_of(name, path, modules)} for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_module_imports_itself_back_even_from_inside_a_function():
    assert cycles(import_graph(REPO)) == []


def test_the_cycle_check_finds_a_cycle_through_a_function_level_import(tmp_path):
    """The check above can fail: a planted import inside a function closes a loop."""
    (tmp_path / "launch").mkdir()
    (tmp_path / "launch" / "__init__.py").write_text("")
    package = tmp_path / "trainer"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "plan.py").write_text("from trainer.parallel import registry\n")
    (package / "parallel").mkdir()
    (package / "parallel" / "__init__.py").write_text("")
    (package / "parallel" / "registry.py").write_text("def problems():\n    from ..plan import x\n")
    assert cycles(import_graph(tmp_path)) == [["trainer.parallel.registry", "trainer.plan"]]


def test_the_layers_declared_for_import_linter_hold():
    lint = Path(sys.executable).parent / "lint-imports"
    proc = subprocess.run([str(lint) if lint.exists() else shutil.which("lint-imports") or "lint-imports",
                           "--config", str(REPO / ".importlinter"), "--no-cache"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def test_function_level_project_imports_only_keep_the_command_line_light():
    """The command line imports the heavy parts of a command when it runs (torch is not loaded to
    print help); everywhere else a project import is at the top of its module."""
    modules = project_modules(REPO)
    misplaced = []
    for name, path in modules.items():
        lines = path.read_text().splitlines()
        for target, node, in_function in imports_of(name, path, modules):
            if not in_function:
                continue
            # the comment above the block of imports this one belongs to
            above = node.lineno - 2
            while above > 0 and re.match(r"\s*(from \S+ )?import |\s*$", lines[above]):
                above -= 1
            if not (name.startswith("launch.") or name == "trainer.rank") or not LIGHT_START.search(lines[above]):
                misplaced.append(f"{path.relative_to(REPO)}:{node.lineno} imports {target}")
    assert misplaced == []


def test_the_command_line_loads_neither_torch_nor_transformers():
    code = "import sys, launch.cli; print(sorted({'torch', 'transformers', 'deepspeed', 'peft'} & set(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_few_modules_at_the_top_and_no_two_modules_share_a_name():
    top = sorted(p.name for p in (REPO / "trainer").glob("*.py"))
    assert len(top) <= 8, top
    names: dict[str, list[str]] = {}
    for name in project_modules(REPO):
        if not name.endswith("__main__") and "." in name:
            names.setdefault(name.rpartition(".")[2], []).append(name)
    shared = {short: full for short, full in names.items() if len(full) > 1 and short != "__init__"}
    assert shared == {}


# ------------------------------------------------------------------ shipped configs

# The device each recipe is written for: the 8B recipes are GPU jobs, the others run on a CPU too.
RECIPE_DEVICE = {"debug-tiny": "cpu", "smollm2-demo": "cpu", "smollm2-dpo": "cpu", "minilm-polarity": "cpu",
                 "llama3-8b-full-fsdp": "cuda", "llama3-8b-lora": "cuda", "llama3-8b-long-context": "cuda",
                 "llama3-8b-multinode": "cuda", "llama3-8b-zero3-offload": "cuda"}
# Llama-3.1-8B's config.json: all a hub cache holds of the 8B recipes' model for `finetrain check`.
LLAMA31_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
              "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
              "num_key_value_heads": 8, "max_position_embeddings": 131072, "rope_theta": 500000.0,
              "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
COMMAND = re.compile(r"finetrain (?:train|submit) configs/\S+((?: --?[\w-]+(?: \d+)?)*)")


def named_worlds(text: str) -> list[tuple[int, int]]:
    """(nodes, ranks per node) of each `finetrain train|submit` command in a config's header comment."""
    worlds = []
    for flags in COMMAND.findall(text):
        nproc = re.search(r"--nproc (\d+)", flags)
        nodes, gpus = re.search(r"--nodes (\d+)", flags), re.search(r"--gpus-per-node (\d+)", flags)
        worlds.append((1, int(nproc.group(1))) if nproc else (int(nodes.group(1)), int(gpus.group(1))) if nodes and gpus
                      else (1, 1))
    return worlds or [(1, 1)]


def test_every_shipped_config_is_a_known_recipe():
    assert sorted(p.stem for p in (REPO / "configs").glob("*.yaml")) == sorted(RECIPE_DEVICE)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RECIPE_DEVICE))
def test_finetrain_check_plans_every_shipped_config_for_the_world_its_command_names(name, tmp_path, monkeypatch,
                                                                                    capsys):
    """`finetrain check` on each recipe, for each world its own header command names (GPU recipes as
    `--nodes N --gpus-per-node G`, the others as `--nproc N`), exits 0 and prints the plan. The 8B
    recipes name a hub id: the hub cache holds its config.json alone (what the plan and the estimate
    read) and their data files are stood in by one-row files (absolute paths as overrides)."""
    import json

    from huggingface_hub import constants

    from helpers import hub_cache_repo, write_jsonl
    from launch.cli import main

    path = REPO / "configs" / f"{name}.yaml"
    cfg = load_config(path, check_files=False)
    overrides = []
    if cfg.model.path and "/" in cfg.model.path and not cfg.model.path.startswith("builtin:"):
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
        hub_cache_repo(tmp_path / "hub", cfg.model.path, {"config.json": json.dumps(LLAMA31_8B)})
        for i, ds in enumerate(cfg.data.datasets):
            if not ds.path.startswith("builtin:"):
                stand_in = write_jsonl(tmp_path / "data" / Path(ds.path).name, [{"text": "a row"}])
                overrides.append(f"data.datasets.{i}.path={stand_in}")
    monkeypatch.chdir(tmp_path)
    for nodes, per_node in named_worlds(path.read_text()):
        world = ["--nodes", str(nodes), "--gpus-per-node", str(per_node)] if RECIPE_DEVICE[name] == "cuda" else \
            ["--nproc", str(per_node)]
        assert main(["check", str(path), *world, *overrides]) == 0, capsys.readouterr().err[-2000:]
        printed = capsys.readouterr().out
        lines = {line.split()[0] for line in printed.splitlines() if line and not line.startswith(" ")}
        assert {"strategy", "batch", "dtypes", "attention", "model", "data", "eval", "checkpoint", "memory"} <= lines
        assert f"{nodes * per_node} rank(s)" in printed or f"{nodes} node(s) x {per_node} GPU(s)" in printed
        assert f"strategy    {cfg.parallel.strategy if cfg.parallel.strategy != 'auto' else ''}" in printed


def test_no_test_module_imports_another():
    """What tests share is in tests/helpers.py; a test module imported as a library would run its
    tests' imports and fixtures twice, and hide where a helper lives."""
    tests = REPO / "tests"
    names = {path.stem for path in tests.rglob("test_*.py")} | {path.stem for path in (tests / "workers").glob("*.py")}
    found = []
    for path in tests.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            imported = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            found += [f"{path.relative_to(REPO)}:{node.lineno} imports {name}" for name in imported
                      if name.split(".")[0] in names]
    assert found == []


def test_the_readme_is_short_and_links_every_docs_page():
    """The README says what finetrain is and points to a page per topic: at most 250 lines, and every
    page of docs/ linked from it (a page nobody links is a page nobody finds)."""
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    linked = set(re.findall(r"\]\((docs/[\w-]+\.md)\)", readme))
    pages = {f"docs/{page.name}" for page in (REPO / "docs").glob("*.md")}
    assert pages and pages <= linked, sorted(pages - linked)
