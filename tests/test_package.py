"""Package layout (the product's design): one top-level import name, sub-packages mapped in and found
automatically (setup.py), so the wheel holds every package of the tree."""
import importlib.util
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _setup_module():
    spec = importlib.util.spec_from_file_location("spml_fast_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)           # setup() runs only under __main__
    return module


def test_only_spml_fast_is_installed_top_level():
    setup = _setup_module()
    assert all(p == "spml_fast" or p.startswith("spml_fast.") for p in setup.discover())
    assert setup.PACKAGE_ROOTS["spml_fast.triton_kernels"] == "triton_kernels"
    assert setup.PACKAGE_ROOTS["spml_fast.export"] == "export"


def test_every_package_folder_of_the_tree_is_discovered():
    """A folder with an __init__.py under a design folder is a package of the wheel (the bug this guards
    against: spml_fast.losses missing from a hand-written list)."""
    setup = _setup_module()
    expected = set()
    for name, folder in setup.PACKAGE_ROOTS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder).parts
            expected.add(".".join((name, *relative)))
    assert "spml_fast.losses" in expected
    assert expected == set(setup.discover())


def test_subpackages_import_from_their_folders():
    import spml_fast.export
    import spml_fast.triton_kernels.utils
    assert pathlib.Path(spml_fast.triton_kernels.utils.__file__).parent == ROOT / "triton_kernels"
    assert pathlib.Path(spml_fast.export.__file__).parent == ROOT / "export"
    assert callable(spml_fast.pixel_segment_loss)


def _module_imports() -> dict:
    """module -> the package modules it imports at module level (relative or spml_fast.*), from the source."""
    import ast
    graph = {}
    for folder, package in (("spml_fast", "spml_fast"), ("export", "spml_fast.export"),
                            ("triton_kernels", "spml_fast.triton_kernels"), ("benchmarks", "spml_fast.benchmarks")):
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            name = ".".join((package, *parts))
            is_package = path.name == "__init__.py"
            name = name[: -len(".__init__")] if is_package else name
            here = name if is_package else name.rsplit(".", 1)[0]
            imports = set()
            for node in ast.parse(path.read_text()).body:            # module level only: lazy imports do not cycle
                if isinstance(node, ast.ImportFrom):
                    if node.level:
                        base = ".".join(here.split(".")[: len(here.split(".")) - node.level + 1])
                        target = f"{base}.{node.module}" if node.module else base
                        names = [f"{target}.{alias.name}" for alias in node.names] if not node.module else [target]
                        imports.update(names)
                    elif node.module and node.module.startswith("spml_fast"):
                        imports.add(node.module)
            graph[name] = imports
    return {name: {i for i in imports if i in graph and i != name} for name, imports in graph.items()}


def test_no_import_cycle_in_the_package():
    """The predictor once closed run -> inference -> bank -> run; no module may import itself back."""
    graph = _module_imports()
    assert {"spml_fast.run", "spml_fast.predictor", "spml_fast.bank"} <= set(graph)
    state = {}

    def visit(name, path):
        state[name] = "open"
        for child in sorted(graph[name]):
            if state.get(child) == "open":
                raise AssertionError("import cycle: " + " -> ".join(path + [child]))
            if child not in state:
                visit(child, path + [child])
        state[name] = "done"
    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    run_source = (ROOT / "spml_fast" / "run.py").read_text()
    assert "from .inference" not in run_source and "from .bank" not in run_source


def test_cli_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "spml_fast", "--help"], capture_output=True, text=True, check=True)
    for command in ("bench", "demo", "bank", "export", "predict", "train-classifier"):
        assert command in out.stdout
