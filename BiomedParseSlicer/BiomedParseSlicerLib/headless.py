"""A real MRML scene without the Slicer application, for scripts and tests with the PyPI
``slicer-core`` wheel: scene + application logic + the module logics the BiomedParseSlicer
logic relies on (Colors, Volumes, Segmentations, Tables, Markups). Nothing here replaces ``slicer``."""

from __future__ import annotations

from dataclasses import dataclass, field

import slicer
from vtkmodules.vtkCommonCore import vtkCollection, vtkStringArray


@dataclass
class HeadlessScene:
    scene: object
    app_logic: object
    logics: dict[str, object] = field(default_factory=dict)

    def load_volume(self, path, name: str = ""):
        """A vtkMRMLScalarVolumeNode read by Slicer's own archetype reader (LPS->RAS handled)."""
        from pathlib import Path

        name = name or Path(path).name.split(".")[0]
        node = self.logics["Volumes"].AddArchetypeVolume(str(path), name, 4, vtkStringArray())  # 4: single file
        if node is None:
            raise OSError(f"Slicer could not read {path}")
        return node


def create(terminologies_dir=None) -> HeadlessScene:
    """The scene and logics. ``terminologies_dir``: a folder with Slicer's ``*.term.json`` files
    (not in the slicer-core wheel) to enable the terminology logic (``result.logics["Terminologies"]``)."""
    import tempfile

    scene = slicer.vtkMRMLScene()
    # Reading a scene bundle (.mrb) unpacks it into the cache manager's folder, as in Slicer's own scene.
    cache = slicer.vtkCacheManager()
    cache.SetRemoteCacheDirectory(tempfile.mkdtemp(prefix="textseg-mrml-cache-"))
    io_manager = slicer.vtkDataIOManager()
    io_manager.SetCacheManager(cache)
    scene.SetCacheManager(cache)
    scene.SetDataIOManager(io_manager)
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    colors = app.GetColorLogic()
    colors.SetMRMLScene(scene)
    colors.AddDefaultColorNodes()
    app.SetSliceLogics(vtkCollection())
    app.SetViewLogics(vtkCollection())
    result = HeadlessScene(scene, app, {"Colors": colors})
    app.SetModuleLogic("Colors", colors)
    for name, logic in (("Volumes", slicer.vtkSlicerVolumesLogic()),
                        ("Segmentations", slicer.vtkSlicerSegmentationsModuleLogic()),  # registers converters
                        ("Tables", slicer.vtkSlicerTablesLogic()),
                        ("Markups", slicer.vtkSlicerMarkupsLogic())):
        logic.SetMRMLScene(scene)
        logic.SetMRMLApplicationLogic(app)
        app.SetModuleLogic(name, logic)
        result.logics[name] = logic
    if terminologies_dir:
        terminologies = slicer.vtkSlicerTerminologiesModuleLogic()
        terminologies.SetModuleShareDirectory(str(terminologies_dir))  # before SetMRMLScene: loads the files
        terminologies.SetMRMLScene(scene)
        terminologies.SetMRMLApplicationLogic(app)
        app.SetModuleLogic("Terminologies", terminologies)
        result.logics["Terminologies"] = terminologies
    return result
