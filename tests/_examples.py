"""Importing a script of examples/ as a module, for the tests of the examples."""
import contextlib
import importlib.util
import pathlib
import sys

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


@contextlib.contextmanager
def example_module(name: str):
    """examples/<name>.py as the module ``name`` (registered in sys.modules while in use: dataclasses
    look their module up there)."""
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(name, None)
