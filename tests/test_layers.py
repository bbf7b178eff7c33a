"""The layered design of the README's Layout section, read from the README itself: no module imports a package
of a higher layer (imports inside functions and `importlib.import_module("...")` strings included), every
Python file belongs to a layer, and a `DistillerContext` is built only by the distiller factory."""
import ast
import os
import re
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYER_LINE = re.compile(r"^(\d)\. \*\*[^*]+\*\*: (.*)$")


def readme_layers(text):
    """{top-level name: layer number} from the numbered list of the README's Layout section."""
    section = text.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    layers = {}
    for line in section.splitlines():
        match = LAYER_LINE.match(line)
        if match:
            head = match[2].split(". ", 1)[0]  # the names come first, before the description
            for name in re.findall(r"`([\w.]+)/?`", head):
                layers[name[:-3] if name.endswith(".py") else name] = int(match[1])
    return layers


def python_files():
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py"], cwd=REPO,
                            capture_output=True, text=True, check=True)
    return [p for p in listed.stdout.split() if os.path.isfile(os.path.join(REPO, p))]


def owner(path):
    """The top-level name a file belongs to: its first folder, or its own name for a top-level module."""
    first = path.split("/", 1)[0]
    return first[:-3] if first.endswith(".py") else first


def imported_names(source, path):
    """Every module name `source` imports: import statements anywhere (function bodies too), relative ones
    resolved against the file's package, and string literals passed to importlib.import_module."""
    package = path.split("/")[:-1]
    names = []
    for node in ast.walk(ast.parse(source, filename=path)):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                names.append(".".join(base + ([node.module] if node.module else [])))
            else:
                names.append(node.module)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module":
            if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                names.append(node.args[0].value)
    return names


def upward_imports(path, source, layers):
    """(imported package, its layer) for each import of a layer above the file's own."""
    own = layers[owner(path)]
    found = []
    for name in imported_names(source, path):
        top = name.split(".", 1)[0]
        if top in layers and layers[top] > own:
            found.append((name, layers[top]))
    return found


@pytest.fixture(scope="module")
def layers():
    with open(os.path.join(REPO, "README.md")) as f:
        return readme_layers(f.read())


def test_readme_lists_the_five_layers(layers):
    assert layers["kdcore"] == layers["custom_forward"] == 1 and layers["custom_model"] == 2
    assert layers["distillers"] == 3 and layers["engine"] == 4
    assert layers["train"] == layers["validate"] == layers["tools"] == layers["tests"] == 5


def test_the_check_finds_an_upward_import_in_a_function_body_and_an_import_module_string(layers):
    body = "def f():\n    from engine.run import build_run\n"
    assert upward_imports("kdcore/example.py", body, layers) == [("engine.run", 4)]
    assert upward_imports("distillers/x.py", "import importlib\nimportlib.import_module('tools.cka')\n",
                          layers) == [("tools.cka", 5)]
    assert upward_imports("custom_model/x.py", "from .y import z\nfrom kdcore import io\n", layers) == []


def test_no_module_imports_a_layer_above_its_own(layers):
    unlisted, violations = [], []
    for path in python_files():
        if owner(path) not in layers:
            unlisted.append(path)
            continue
        with open(os.path.join(REPO, path)) as f:
            violations += [f"{path} (layer {layers[owner(path)]}) imports {name} (layer {layer})"
                           for name, layer in upward_imports(path, f.read(), layers)]
    assert not unlisted, f"files in no layer of the README's Layout section: {unlisted}"
    assert not violations, "\n".join(violations)


def test_richkd_imports_nothing_from_the_engine_or_the_tools(layers):
    with open(os.path.join(REPO, "distillers", "richkd.py")) as f:
        names = imported_names(f.read(), "distillers/richkd.py")
    assert not [n for n in names if layers.get(n.split(".", 1)[0], 0) >= 4], names


def test_a_distiller_context_is_built_only_by_the_factory():
    builders = []
    for path in python_files():
        with open(os.path.join(REPO, path)) as f:
            tree = ast.parse(f.read(), filename=path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) == \
                    "DistillerContext":
                builders.append(path)
    assert builders == ["distillers/factory.py"], builders
