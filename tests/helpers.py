"""Helpers shared by test files (imported as ``helpers``: pytest puts this folder on ``sys.path``)."""

import importlib.util
from pathlib import Path


def load_tool(name: str):
    """Import ``tools/<name>.py`` (a script folder, not a package) as a module."""
    path = Path(__file__).resolve().parents[1] / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def regional_twin(ref, *inputs):
    """A copy of ``ref`` with ``compile_blocks`` (dynamo + AOTAutograd, no code generation, graphs counted); runs
    forward and backward (sum of squares) of both on ``inputs``. Returns (twin, out_ref, out, compiled graphs,
    compiled blocks)."""
    import copy

    from torch._dynamo.testing import CompileCounterWithBackend

    twin = copy.deepcopy(ref)
    counter = CompileCounterWithBackend("aot_eager")
    n = twin.compile_blocks(backend=counter, dynamic=False)
    out_ref, out = ref(*inputs), twin(*inputs)
    out_ref.square().sum().backward()
    out.square().sum().backward()
    return twin, out_ref, out, counter, n
