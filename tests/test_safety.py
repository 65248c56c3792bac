"""Nothing is unpickled or evaluated: a scan of the source that fails on any way to run data as code.

Weights travel and rest as safetensors or our CRC-checked frames. Flagged anywhere in ``src/`` and
``bench/``: ``pickle``/``dill``/``marshal``/``shelve`` loading, ``torch.load`` without
``weights_only=True``, ``np.load(..., allow_pickle=True)``, ``yaml.load`` and builtin ``eval``/``exec``.
The one reader of a pickle format is CIFAR-10's official "python version", through an unpickler
whose ``find_class`` admits numpy array reconstruction only; the scan admits exactly that class
(``tests/data/test_sources.py`` checks that it refuses a pickle that would run code).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UNSAFE_MODULES = {"pickle", "cPickle", "dill", "marshal", "shelve", "joblib", "cloudpickle"}
ALLOWED_UNPICKLERS = {("src/feddiff/data/sources.py", "_NumpyOnlyUnpickler")}


def _kw(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def scan(source: str, where: str) -> list[str]:
    """Findings in one file's source: 'file:line: what'."""
    found = []
    tree = ast.parse(source)
    restricted = {name for w, name in ALLOWED_UNPICKLERS if w == where}
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            bases = {ast.unparse(b) for b in node.bases}
            if bases & {"pickle.Unpickler", "Unpickler"}:
                has_guard = any(isinstance(f, ast.FunctionDef) and f.name == "find_class" for f in node.body)
                if node.name not in restricted or not has_guard:
                    found.append(f"{where}:{node.lineno}: unpickler {node.name} (not the allowed restricted one)")
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        name = ast.unparse(f)
        if isinstance(f, ast.Name) and f.id in ("eval", "exec", "__import__"):
            found.append(f"{where}:{node.lineno}: builtin {f.id}()")
        elif isinstance(f, ast.Attribute):
            owner = ast.unparse(f.value)
            if owner in UNSAFE_MODULES and f.attr in ("load", "loads", "Unpickler", "open"):
                found.append(f"{where}:{node.lineno}: {name}()")
            elif name == "torch.load" and not _is_true(_kw(node, "weights_only")):
                found.append(f"{where}:{node.lineno}: torch.load without weights_only=True")
            elif name in ("np.load", "numpy.load") and _is_true(_kw(node, "allow_pickle")):
                found.append(f"{where}:{node.lineno}: {name}(allow_pickle=True)")
            elif name == "yaml.load":
                found.append(f"{where}:{node.lineno}: yaml.load")
            elif f.attr == "Unpickler" or (f.attr == "load" and isinstance(f.value, ast.Call)
                                             and ast.unparse(f.value.func).endswith("Unpickler")
                                             and ast.unparse(f.value.func) not in restricted):
                found.append(f"{where}:{node.lineno}: {name}()")
    return found


def sources() -> list[Path]:
    return sorted([*(ROOT / "src").rglob("*.py"), *(ROOT / "bench").rglob("*.py")])


def test_no_code_runs_from_data_in_the_source():
    files = sources()
    assert len(files) > 50  # the scan sees the package
    findings = [f for p in files for f in scan(p.read_text(), p.relative_to(ROOT).as_posix())]
    assert findings == []


@pytest.mark.parametrize("snippet, what", [
    ("import pickle\npickle.loads(b)", "pickle.loads()"),
    ("import pickle\nwith open(p, 'rb') as f:\n    pickle.load(f)", "pickle.load()"),
    ("import torch\ntorch.load(p)", "torch.load without weights_only=True"),
    ("import torch\ntorch.load(p, weights_only=False)", "torch.load without weights_only=True"),
    ("import numpy as np\nnp.load(p, allow_pickle=True)", "np.load(allow_pickle=True)"),
    ("eval(text)", "builtin eval()"),
    ("exec(code)", "builtin exec()"),
    ("import pickle\nclass U(pickle.Unpickler):\n    pass", "unpickler U"),
    ("import marshal\nmarshal.loads(b)", "marshal.loads()"),
    ("import pickle\npickle.Unpickler(f).load()", "pickle.Unpickler"),
    ("class _NumpyOnlyUnpickler:\n    pass\n_NumpyOnlyUnpickler(f).load()", "_NumpyOnlyUnpickler(f).load()"),
])
def test_the_scan_catches_each_way(snippet, what):
    findings = scan(snippet, "x.py")
    assert findings and any(what in f for f in findings)


def test_the_scan_lets_safe_calls_pass():
    ok = "import torch, numpy as np\ntorch.load(p, map_location='cpu', weights_only=True)\nnp.load(p)\nmodel.eval()\n"
    assert scan(ok, "x.py") == []
