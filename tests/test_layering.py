"""Dependencies point one way: core <- converters (weights_tools) <- hub <- tooling and command lines.

The core is what a reader of the paper reads, and what a user's own script needs: the networks, the schedule
and samplers, the model container, the weight format and the pipelines. It must never import the hub, the
converters, the command line or the teaching and training tools, nor anything that needs a network or a
reference implementation. These tests read every import statement of every module (those inside functions
too), so a lazy import breaks the rule as surely as one at the top.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = ["autoencoder", "unet", "bert", "conditioning", "fast", "tokenizer", "schedule", "samplers",
        "ksamplers", "model", "loading", "pipeline", "tiling"]  # fmt: skip
TOOLING = ["hub", "__main__", "verify", "viz", "shapes", "train", "exercises", "distributed"]
OUTSIDE = ["weights_tools", "huggingface_hub", "diffusers", "transformers", "matplotlib", "yaml"]


def imports(path: Path) -> set[str]:
    """Every module a file imports, as absolute dotted names (relative imports resolved in ldm_mini)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + [base]
                ).strip(".")
            found |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return found


def test_every_module_of_the_package_is_in_one_layer():
    modules = {p.stem for p in (ROOT / "ldm_mini").glob("*.py")} - {"__init__"}
    assert modules == set(CORE) | set(TOOLING), "add a new module to CORE or TOOLING above"


@pytest.mark.parametrize("name", CORE)
def test_core_imports_no_tooling_converter_or_hub(name):
    bad = {f"ldm_mini.{t}" for t in TOOLING} | set(OUTSIDE)
    found = {m for m in imports(ROOT / "ldm_mini" / f"{name}.py") if m in bad or m.split(".")[0] in OUTSIDE}
    assert not found, f"the core module ldm_mini/{name}.py imports {sorted(found)}"


@pytest.mark.parametrize("path", sorted((ROOT / "weights_tools").glob("*.py")), ids=lambda p: p.stem)
def test_converters_import_only_the_core(path):
    allowed = {f"ldm_mini.{c}" for c in CORE} | {"ldm_mini"}
    if path.stem == "download":  # the command line of ldm_mini.hub
        allowed.add("ldm_mini.hub")
    found = {m for m in imports(path) if m.split(".")[0] == "ldm_mini" and m not in allowed}
    # "from ldm_mini.loading import DTYPES" lists ldm_mini.loading.DTYPES too: keep only module names
    found = {m for m in found if not any(m.startswith(f"{a}.") for a in allowed)}
    assert not found, f"weights_tools/{path.name} imports {sorted(found)}"


def test_importing_the_api_loads_no_network_or_reference_code():
    code = ("import sys, ldm_mini; ldm_mini.load(); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & set(sys.argv[1:])))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code, *OUTSIDE], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_no_module_shadows_the_standard_library():
    names = {p.stem for p in (ROOT / "ldm_mini").glob("*.py")} | {
        p.stem for p in (ROOT / "weights_tools").glob("*.py")
    }
    assert not (names - {"__init__", "__main__"}) & set(sys.stdlib_module_names)
