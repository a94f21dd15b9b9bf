"""The module's Logic: MRML glue between Slicer's scene and the ``textseg`` engine, with no Qt.

Usable from Slicer's Python console, scripts and tests (also with the PyPI ``slicer-core`` wheel)::

    from BiomedParseSlicerLib.logic import BiomedParseSlicerLogic   # also BiomedParseSlicer.BiomedParseSlicerLogic
    logic = BiomedParseSlicerLogic()
    seg = logic.segment(volumeNode, ["liver", "spleen"], "biomedparse-v1", modality="CT", site="abdomen")
    table = logic.statistics(seg, volumeNode, csvPath="stats.csv")
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Optional

import slicer

from textseg.errors import Cancelled, TextsegError, UsageError
from textseg.formats.segments import segments_from_results
from textseg.presets import guess_modality, normalize_modality
from textseg.prompts import Prompt, parse_prompts
from textseg.runcontrol import sub_progress

from . import mrml, runner, stats


def application_terminology_logic():
    """Slicer's Terminologies module logic inside the application; None with slicer-core (no slicer.modules)."""
    terminologies = getattr(getattr(slicer, "modules", None), "terminologies", None)
    return terminologies.logic() if terminologies is not None else None


class BiomedParseSlicerLogic:
    """MRML glue for the panel, Slicer's Python console, scripts and tests (see the module's docstring).
    ``scene``: the MRML scene (default slicer.mrmlScene); ``terminologyLogic``: Slicer's Terminologies logic
    (default: the application's, where there is one)."""

    moduleName = "BiomedParseSlicer"

    def __init__(self, scene=None, terminologyLogic=None):
        self.scene = scene if scene is not None else getattr(slicer, "mrmlScene", None)
        self.terminologyLogic = terminologyLogic if terminologyLogic is not None else application_terminology_logic()
        self._predictors = {}
        self.lastSegmentIDs: list[str] = []

    def getParameterNode(self):
        """The module's parameter node (a vtkMRMLScriptedModuleNode, one per scene), found or added as Slicer's
        ScriptedLoadableModuleLogic.getParameterNode does it for a singleton node; the panel wraps it in its
        parameterNodeWrapper class."""
        node = self.scene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
        if node is None:
            node = self.scene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
            node.UnRegister(None)  # owned by the Python variable, as Slicer does it
            node.SetSingletonTag(self.moduleName)
            node.SetName(self.scene.GenerateUniqueName(self.moduleName))
            node = self.scene.AddNode(node)
        if node.GetAttribute("ModuleName") != self.moduleName:  # a scene close may have removed it
            node.SetAttribute("ModuleName", self.moduleName)
        return node

    def defaultInputVolume(self):
        """The first volume the panel's input selector offers (a scalar or vector volume; not a label map)."""
        for node in self.scene.GetNodesByClass("vtkMRMLScalarVolumeNode"):
            if node.GetClassName() in ("vtkMRMLScalarVolumeNode", "vtkMRMLVectorVolumeNode"):
                return node
        return None

    # ---- engine side (no MRML: safe in a worker thread) ----------------------------------------
    def localPredictor(self, model: str, device: str = "auto"):
        """An in-process predictor, kept so the model loads once per session."""
        key = (model, device)
        if key not in self._predictors:
            self._predictors[key] = runner.make_predictor(model, "local", device)
        return self._predictors[key]

    def predict(self, volume, prompts, model: str, modality=None, site=None, predictor=None, progress=None,
                cancel=None):
        """Engine results for an engine Volume (set_image, then predict). Cancel keeps finished prompts."""
        predictor = predictor or self.localPredictor(model)
        plist = parse_prompts(prompts)
        predictor.set_image(volume, modality or None, site or None, progress=self._part(progress, 0.0, 0.5),
                            cancel=cancel)
        return predictor.predict(plist, progress=self._part(progress, 0.5, 1.0), cancel=cancel)

    def recognizeVolume(self, volume, model: str, modality=None, site=None, predictor=None, progress=None, cancel=None,
                        **options):
        """Engine results of "Segment everything" (models with recognition): one per target found,
        named after it, with detection boxes (``result.objects``). Cancel keeps the slices done; with none
        found, Cancelled (cancelled before any) or UsageError (nothing recognized) is raised."""
        predictor = predictor or self.localPredictor(model)
        predictor.set_image(volume, modality or None, site or None, progress=self._part(progress, 0.0, 0.3),
                            cancel=cancel)
        results = predictor.recognize(progress=self._part(progress, 0.3, 1.0), cancel=cancel, **options)
        if not results and cancel is not None and cancel.cancelled:
            raise Cancelled("Cancelled before any target was found: nothing added.")
        if not results:
            raise UsageError(f"Model '{model}' recognized none of its targets in this volume. Check the modality "
                             f"({modality or 'unset'}) and CT site ({site or 'unset'}), or segment with prompts "
                             f"instead.")
        return results

    @staticmethod
    def _part(progress, lo, hi):
        return sub_progress(progress, lo, hi)

    # ---- MRML side (GUI thread) ---------------------------------------------------------------
    def volumeFromNode(self, volumeNode):
        return mrml.volume_from_node(volumeNode)

    def guessModality(self, volumeNode):
        """(modality, CT site or None, reason): the DICOM Modality tag when the volume came from
        DICOM (inside Slicer), else textseg.presets.guess_modality from the intensities."""
        if volumeNode is None:
            raise UsageError("Select an input volume first.")
        modality = self._dicomModality(volumeNode)
        if modality:
            return modality, ("abdomen" if modality == "CT" else None), "DICOM Modality tag"
        return guess_modality(mrml.volume_from_node(volumeNode))

    @staticmethod
    def _dicomModality(volumeNode) -> Optional[str]:
        uids = (volumeNode.GetAttribute("DICOM.instanceUIDs") or "").split() if volumeNode else []
        database = getattr(slicer, "dicomDatabase", None)
        if not uids or database is None:
            return None
        try:
            return normalize_modality(database.fileValue(database.fileForInstance(uids[0]), "0008,0060"))
        except TextsegError:  # a modality no model knows (e.g. SEG): fall back to intensities
            return None

    def markupPrompts(self, texts, model: str, roiNode=None, pointsNode=None) -> list[Prompt]:
        """One prompt per non-empty line of ``texts`` (a box-/point-only prompt when there is no text),
        each with the ROI's world bounding box and the point list's world positions, in LPS mm as the
        engine expects. Refused with a message when ``model`` does not take boxes or points."""
        from textseg.catalog import get_model
        from textseg.predictor import check_prompts

        if isinstance(texts, str):
            texts = texts.splitlines()
        box = mrml.roi_box_lps(roiNode)
        points = mrml.fiducial_points_lps(pointsNode)
        lines = [t for t in texts if t.strip()] or [""]
        return check_prompts(get_model(model), [Prompt(t, box, points) for t in lines])

    @staticmethod
    def completionWords(model: str, history: Sequence[str] = ()) -> list[str]:
        """What 'Add target' autocompletes: the model's vocabulary (its known targets), then earlier
        prompts, each once (case-insensitive)."""
        from textseg.catalog import get_model

        seen, out = set(), []
        for word in list(get_model(model).vocabulary) + list(history):
            if word.strip() and word.lower() not in seen:
                seen.add(word.lower())
                out.append(word)
        return out

    @staticmethod
    def updatedHistory(history: str, prompts: Sequence[str], limit: int = 30) -> str:
        """The prompt history (newline-separated, most recent first) after a run with ``prompts``:
        each prompt once (case and spacing as typed last), at most ``limit`` entries."""
        seen, out = set(), []
        for p in list(prompts) + history.split("\n"):
            p = " ".join(p.split())
            if p and p.lower() not in seen:
                seen.add(p.lower())
                out.append(p)
        return "\n".join(out[:limit])

    def existingSegmentsFor(self, segmentationNode, prompts) -> list[str]:
        """Segments an earlier run made for these prompts (the GUI asks before replacing them)."""
        tags = [json.dumps(p.to_dict()) for p in parse_prompts(prompts)]
        return mrml.segments_for_prompts(segmentationNode, tags)

    def addResults(self, volumeNode, results, segmentationNode=None, replace=False):
        """One segment per result on the volume's exact grid; returns the segmentation node."""
        segments = segments_from_results(results)
        segNode = mrml.prepare_segmentation_node(self.scene, volumeNode, segmentationNode)
        self.lastSegmentIDs = mrml.add_segments(segNode, segments, volumeNode, replace, self.terminologyLogic)
        return segNode

    def segment(self, volumeNode, prompts, model: str, modality=None, site=None, segmentationNode=None,
                predictor=None, replace: bool = False, progress=None, cancel=None):
        """Segment ``prompts`` (list or one per line) in ``volumeNode`` with ``model``.

        ``predictor``: textseg.predictor.Predictor or textseg.remote.client.RemotePredictor (default: a
        local one). ``replace``: overwrite segments an earlier run made for the same prompt;
        otherwise new segments are added. Other segments are never touched."""
        modality, site = self._modality(volumeNode, modality, site)
        results = self.predict(self.volumeFromNode(volumeNode), prompts, model, modality, site, predictor, progress,
                               cancel)
        return self.addResults(volumeNode, results, segmentationNode, replace)

    def recognize(self, volumeNode, model: str, modality=None, site=None, segmentationNode=None, predictor=None,
                  replace: bool = False, progress=None, cancel=None, **options):
        """"Segment everything": one segment per target ``model`` finds in ``volumeNode`` (models with
        recognition, e.g. biomedparse-v1/-v2), named after the target, with its detection boxes and centroids
        (LPS mm) in the segment's ``textseg.objects`` tag. ``replace``: overwrite the segments an earlier
        run made for the same targets; other segments are never touched. ``options``: the model's
        recognition options (textseg.predictor.Predictor.recognize)."""
        modality, site = self._modality(volumeNode, modality, site)
        results = self.recognizeVolume(self.volumeFromNode(volumeNode), model, modality, site, predictor, progress,
                                       cancel, **options)
        return self.addResults(volumeNode, results, segmentationNode, replace)

    def _modality(self, volumeNode, modality, site):
        if modality is None:
            modality, guessed_site, reason = self.guessModality(volumeNode)
            if modality is None:
                raise UsageError(f"Cannot tell the modality of this volume ({reason}): pass modality=.")
            site = site or guessed_site
        return modality, site

    def statistics(self, segmentationNode, volumeNode, tableNode=None, csvPath=None, overwrite=False):
        """Statistics of every segment (after any edits) into a table node, optionally a CSV file."""
        if segmentationNode is None or volumeNode is None:
            raise UsageError("Statistics need a segmentation and the volume it was made from.")
        rows = stats.slicer_statistics(segmentationNode, volumeNode)
        if rows is None:
            rows = stats.engine_statistics(segmentationNode, volumeNode)
        if tableNode is None:
            tableNode = self.scene.AddNewNodeByClass("vtkMRMLTableNode", f"{segmentationNode.GetName()} statistics")
        unit = stats.intensity_unit(volumeNode)
        stats.fill_table(tableNode, rows, unit)
        if csvPath:
            stats.write_csv(csvPath, rows, overwrite)
        return tableNode
