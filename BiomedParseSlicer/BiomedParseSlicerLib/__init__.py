"""The BiomedParseSlicer module's code, imported by BiomedParseSlicer.py. No Qt module is imported here:

- ``logic``: BiomedParseSlicerLogic, the MRML glue (volume nodes <-> the engine, segments, statistics);
- ``controller``: the panel's run policy (what runs where, task states, messages, what is enabled);
- ``panel``: binds the panel's widgets to the controller (Qt calls through the objects it is given);
- ``answers``: the model's answer (uint8 map, original mask) kept in the scene per AI segment;
- ``mrml``, ``stats``, ``runner`` (worker thread, local server), ``environment`` (packages, models),
  ``checks`` (shared by the pytest suite and the module's self-test), ``headless`` (a slicer-core scene).

Everything but ``panel`` works both inside 3D Slicer and with the PyPI ``slicer-core`` wheel (no Qt)."""

# In import order: each module only imports modules listed before it.
MODULES = ("environment", "runner", "mrml", "stats", "answers", "checks", "headless", "logic", "controller", "panel")


def reload() -> None:
    """Re-import the modules already imported (Slicer's Reload button re-imports only the module file)."""
    import importlib
    import sys

    for name in MODULES:
        module = sys.modules.get(f"{__name__}.{name}")
        if module is not None:
            importlib.reload(module)
