"""Code for a fresh interpreter that refuses every later import from the standard library,
as after a privilege drop to a user who cannot read the interpreter's own library (a Python
under /root). Tests put it, as text, into the scripts they run after what the server
imports before its drop; the lazy imports that come later must then need no new stdlib
module."""

REFUSE_LATER_STDLIB = """
import importlib.machinery, sys, sysconfig

_paths = sysconfig.get_paths()
_stdlib = (_paths["stdlib"], _paths["platstdlib"])


class Unreadable:
    def find_spec(self, name, path=None, target=None):
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        origin = spec.origin if spec is not None else None
        if origin and origin.startswith(_stdlib) and "site-packages" not in origin:
            raise ImportError(f"{name}: standard library imported after the drop")
        return None


sys.meta_path.insert(0, Unreadable())
"""
