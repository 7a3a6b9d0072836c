"""Stand-ins that pickle exactly like ruamel.yaml's round-trip scalars (the value, then its
formatting state) under ruamel's module paths, so tests can write checkpoints whose `args`
hold them without ruamel installed.

    with monkeypatch.context() as patch:
        scalars = install(patch)
        torch.save({"args": argparse.Namespace(lr=scalars.ScalarFloat(1e-4))}, path)
    # ruamel is gone again: loading must not need it
"""

import sys
import types


def _scalar(base, name, module):
    def __new__(cls, value, **formatting):  # noqa: N807 - ruamel keeps formatting attributes
        obj = base.__new__(cls, value)
        for key, item in formatting.items():
            setattr(obj, f"_{key}", item)
        return obj

    cls = type(name, (base,), {"__new__": __new__, "__module__": module})
    cls.__qualname__ = name
    return cls


def install(monkeypatch) -> types.SimpleNamespace:
    """Puts ruamel, ruamel.yaml and its scalar modules into sys.modules (undone by the patch)."""
    classes = {
        "ruamel.yaml.scalarfloat": [("ScalarFloat", float)],
        "ruamel.yaml.scalarint": [("ScalarInt", int), ("HexInt", int)],
        "ruamel.yaml.scalarbool": [("ScalarBoolean", int)],
        "ruamel.yaml.scalarstring": [("DoubleQuotedScalarString", str)],
    }
    made = {}
    for package in ("ruamel", "ruamel.yaml"):
        monkeypatch.setitem(sys.modules, package, types.ModuleType(package))
    for module_name, entries in classes.items():
        module = types.ModuleType(module_name)
        for name, base in entries:
            made[name] = _scalar(base, name, module_name)
            setattr(module, name, made[name])
        monkeypatch.setitem(sys.modules, module_name, module)
    return types.SimpleNamespace(**made)
