"""The module's Logic: MRML glue between Slicer's scene and the ``textseg`` engine, with no Qt.

Usable from Slicer's Python console, scripts and tests (also with the PyPI ``slicer-core`` wheel)::

    from BiomedParseSlicerLib.logic import BiomedParseSlicerLogic   # also BiomedParseSlicer.BiomedParseSlicerLogic
    logic = BiomedParseSlicerLogic()
    seg = logic.segment(volumeNode, ["liver", "spleen"], "biomedparse-v1", modality="CT", site="abdomen")
    table = logic.statistics(seg, volumeNode, csvPath="stats.csv")

Review (the model's answer is kept with each AI segment of a run, saved with the scene; see ``answers``)::

    logic.rethreshold(seg, segmentId, 0.35)          # refused if the segment was edited by hand, unless replace=True
    logic.compareWithModelOutput(seg)                # Dice, HD95, ASD, mL added/removed, slices: table node
    logic.addUncertainSegment(seg, segmentId)        # voxels near the threshold, for review
    logic.exportForTraining(volumeNode, seg, "out", 501, "LiverCorrected")   # nnU-Net v2 raw dataset
"""

from __future__ import annotations

import json
import re
import weakref
from collections.abc import Sequence
from typing import Optional

import numpy as np
import slicer

from textseg.errors import Cancelled, TextsegError, UsageError
from textseg.formats.segments import segments_from_results
from textseg.presets import guess_modality, normalize_modality
from textseg.prompts import Prompt, parse_prompts
from textseg.runcontrol import sub_progress

from . import answers, mrml, runner, stats

REVIEW_TAG = "textseg.review"  # "uncertain": a review segment made from a kept map (not an AI segment)
REVIEW_OF_TAG = "textseg.review_of"
# The model output of one run is kept while it fits this many MiB (uint8 maps: 1 byte per voxel per segment,
# 50 MiB for a 512x512x200 CT); the segments past it are made as usual, without a kept map, and the log says so.
KEEP_MODEL_OUTPUT_BUDGET_MB = 2048


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
        # Keep each AI segment's probability map and original mask with the scene (Review: re-threshold,
        # confidence, compare with AI output). On by default; the panel's "Keep model output for review".
        self.keepModelOutput = True
        self.keepModelOutputBudgetMB = KEEP_MODEL_OUTPUT_BUDGET_MB
        self.lastMessages: list[str] = []  # what the last addResults has to tell the user (maps not kept)
        # segmentation node -> observer tag (SegmentRemoved). The node's Python wrapper is held here, not weakly: VTK
        # drops a wrapper nobody holds while the node lives on (inside Slicer nodes reach Python as wrappers made on
        # demand), and a weak entry went with it, so the next run observed the node again. An entry goes when its
        # node leaves the scene (NodeRemovedEvent, also while the scene closes) and with cleanup().
        self._observed: dict = {}
        self._sceneObservers: list[int] = []
        self._pruning = False

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
        """The first volume the panel's input selector offers (a scalar or vector volume; not a label map, not
        hidden)."""
        for node in mrml.nodes_by_class(self.scene, "vtkMRMLScalarVolumeNode"):
            # not a hidden node (a kept model output), which the selector does not show either
            if node.GetClassName() in ("vtkMRMLScalarVolumeNode", "vtkMRMLVectorVolumeNode") \
                    and not node.GetHideFromEditors():
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

    def addResults(self, volumeNode, results, segmentationNode=None, replace=False, keepModelOutput=None):
        """One segment per result on the volume's exact grid; returns the segmentation node. With
        ``keepModelOutput`` (default: ``self.keepModelOutput``) each segment's model answer is kept in the scene
        (``answers``), within ``keepModelOutputBudgetMB`` for the run."""
        segments = segments_from_results(results)
        segNode = mrml.prepare_segmentation_node(self.scene, volumeNode, segmentationNode)
        self.lastSegmentIDs = mrml.add_segments(segNode, segments, volumeNode, replace, self.terminologyLogic)
        self.lastMessages = []
        keep = self.keepModelOutput if keepModelOutput is None else keepModelOutput
        for sid in self.lastSegmentIDs:  # a replaced segment's earlier answer is stale either way
            answers.remove_answer(segNode, sid)
        if keep:
            self._keepAnswers(segNode, volumeNode, results)
        return segNode

    def _keepAnswers(self, segNode, volumeNode, results) -> None:
        from textseg.analysis.confidence import ModelAnswer

        budget, skipped = self.keepModelOutputBudgetMB * 2**20, []
        for sid, result in zip(self.lastSegmentIDs, results):
            size = int(np.prod(result.mask.shape))
            if size > budget:
                skipped.append(result.name)
                continue
            try:
                answer = ModelAnswer.from_result(result)
            except (KeyError, TypeError, ValueError, TextsegError) as exc:  # a result without a usable map
                self.lastMessages.append(f"Model output of '{result.name}' not kept for review ({exc}).")
                continue
            budget -= answer.nbytes
            answers.add_answer_node(segNode, sid, answer, volumeNode)
            segment = segNode.GetSegmentation().GetSegment(sid)
            for key, value in answer.tags().items():
                segment.SetTag(key, value)
        if skipped:
            self.lastMessages.append(
                f"Model output not kept for review ({self.keepModelOutputBudgetMB} MiB per run used): "
                f"{', '.join(skipped)}. Segment fewer targets per run to review them all.")
        self.watchSegmentation(segNode)

    # ---- Review: the kept model output ----------------------------------------------------------
    def watchScene(self) -> None:
        """Remove kept maps with their segment or segmentation: observe the scene (node removed, scene imported)
        and every segmentation with kept maps (segment removed). The Widget calls it once; keeping a map too.
        The observers hold the Logic weakly (no reference cycle through the scene) and do nothing while the scene
        closes or imports."""
        if self._sceneObservers or self.scene is None:
            return
        ref = weakref.ref(self)

        def onNodeRemoved(_caller, _event):
            logic = ref()
            if logic is not None:
                logic._onNodeRemoved()

        def onImported(_caller, _event):
            logic = ref()
            if logic is not None:
                logic._onSceneImported()

        self._sceneObservers = [self.scene.AddObserver(self.scene.NodeRemovedEvent, onNodeRemoved),
                                self.scene.AddObserver(self.scene.EndImportEvent, onImported)]
        self._onSceneImported()

    def watchSegmentation(self, segmentationNode) -> None:
        self.watchScene()
        if segmentationNode in self._observed:
            return
        from slicer import vtkSegmentation

        ref = weakref.ref(self)

        def onSegmentRemoved(caller, _event):
            logic = ref()
            if logic is not None:
                logic._prune([caller])

        self._observed[segmentationNode] = segmentationNode.AddObserver(vtkSegmentation.SegmentRemoved,
                                                                        onSegmentRemoved)

    def _sceneIdle(self) -> bool:
        return self.scene is not None and not (self.scene.IsClosing() or self.scene.IsImporting()
                                               or self.scene.IsBatchProcessing())

    def _onNodeRemoved(self) -> None:
        for node, tag in list(self._observed.items()):
            if node.GetScene() is None:  # removed, or closed with the scene
                node.RemoveObserver(tag)
                del self._observed[node]
        self._prune()

    def cleanup(self) -> None:
        """Remove every observer watchScene and watchSegmentation added (the Widget's cleanup: module reload,
        application exit). Watching starts again with the next watchScene."""
        for node, tag in self._observed.items():
            node.RemoveObserver(tag)
        self._observed.clear()
        if self.scene is not None:
            for tag in self._sceneObservers:
                self.scene.RemoveObserver(tag)
        self._sceneObservers = []

    def _prune(self, segmentationNodes=None) -> None:
        """answers.prune while the scene is idle, once: the maps it removes raise NodeRemovedEvent again, and a
        nested sweep would only repeat the one running."""
        if self._pruning or not self._sceneIdle():
            return
        self._pruning = True
        try:
            answers.prune(self.scene, segmentationNodes)
        finally:
            self._pruning = False

    def _onSceneImported(self) -> None:
        for seg in mrml.nodes_by_class(self.scene, "vtkMRMLSegmentationNode"):
            if seg.GetNumberOfNodeReferences(answers.ROLE):
                self.watchSegmentation(seg)

    def reviewSegmentIds(self, segmentationNode) -> list[str]:
        """The segments whose model output is kept, in the segmentation's order."""
        if segmentationNode is None:
            return []
        kept = answers.answer_nodes(segmentationNode)
        return [sid for sid in mrml.segment_ids(segmentationNode) if sid in kept]

    def modelAnswer(self, segmentationNode, segmentId):
        """The kept ``ModelAnswer`` of a segment; UsageError with what to do when none is kept."""
        answer = answers.load_answer(segmentationNode, segmentId) if segmentationNode is not None else None
        if answer is None:
            name = self._segmentName(segmentationNode, segmentId)
            raise UsageError(f"No model output is kept for segment '{name}': only AI segments made with "
                             "'Keep model output for review' on have one. Run the model again for it.")
        return answer

    @staticmethod
    def _segmentName(segmentationNode, segmentId) -> str:
        segment = segmentationNode.GetSegmentation().GetSegment(segmentId) if segmentationNode else None
        return segment.GetName() if segment is not None else str(segmentId)

    def _currentMask(self, segmentationNode, segmentId):
        return mrml.segment_mask(segmentationNode, segmentId, answers.answer_node(segmentationNode, segmentId))

    def _currentThreshold(self, segment, answer) -> float:
        try:
            return float(json.loads(mrml.get_tag(segment, "textseg.threshold")))
        except (TypeError, ValueError):
            return answer.threshold

    def editedSinceModel(self, segmentationNode, segmentId) -> bool:
        """Whether a person changed the segment since the engine last wrote it (the run or a re-threshold)."""
        from textseg.analysis.confidence import MaskFingerprint, edited_since

        answer = self.modelAnswer(segmentationNode, segmentId)
        segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
        fingerprint = MaskFingerprint.from_tags({k: mrml.get_tag(segment, k)
                                                 for k in ("textseg.mask_sha256", "textseg.mask_voxels")})
        return edited_since(fingerprint or answer.fingerprint, self._currentMask(segmentationNode, segmentId))

    def rethreshold(self, segmentationNode, segmentId, threshold, replace: bool = False) -> dict:
        """Rebuild the segment from its kept map at ``threshold`` (0..1) without running the model. A segment
        edited by hand since the engine wrote it is refused (UsageError) unless ``replace``. Updates the tags
        (textseg.threshold, fingerprint, confidence); returns the new confidence dict."""
        from textseg.analysis.confidence import MaskFingerprint, check_threshold, confidence_tags

        t = check_threshold(threshold)
        answer = self.modelAnswer(segmentationNode, segmentId)
        name = self._segmentName(segmentationNode, segmentId)
        if not replace and self.editedSinceModel(segmentationNode, segmentId):
            raise UsageError(f"Segment '{name}' was edited by hand since the model made it: re-thresholding would "
                             "replace those edits. Choose 'Replace my edits' to discard them, or keep your edits.")
        mask = answer.mask_at(t)
        node = answers.answer_node(segmentationNode, segmentId)
        mrml.set_segment_mask(segmentationNode, segmentId, mask, node)
        conf = answer.confidence(mask, t)
        segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
        for key, value in {**confidence_tags(conf), **MaskFingerprint.of(mask).tags()}.items():
            segment.SetTag(key, value)
        return conf

    def segmentConfidence(self, segmentationNode, segmentId, band: Optional[float] = None) -> dict:
        """Confidence of the segment as it is now (edited or not): existence, mean probability inside,
        near-threshold fraction (textseg.analysis.confidence.confidence) at its current threshold."""
        from textseg.analysis.confidence import DEFAULT_BAND

        answer = self.modelAnswer(segmentationNode, segmentId)
        segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
        return answer.confidence(self._currentMask(segmentationNode, segmentId),
                                 self._currentThreshold(segment, answer), DEFAULT_BAND if band is None else band)

    def addUncertainSegment(self, segmentationNode, segmentId, band: Optional[float] = None,
                            threshold: Optional[float] = None) -> str:
        """A review segment of the voxels whose probability is within ``band`` (default 0.1) of the threshold
        (default: the segment's current one), in or out of the mask; replaces the one made earlier for the same
        segment. Returns its segment ID. Statistics and training exports leave review segments out."""
        from textseg.analysis.confidence import DEFAULT_BAND, uncertain_mask

        answer = self.modelAnswer(segmentationNode, segmentId)
        source = segmentationNode.GetSegmentation().GetSegment(segmentId)
        t = self._currentThreshold(source, answer) if threshold is None else float(threshold)
        b = DEFAULT_BAND if band is None else float(band)
        mask = uncertain_mask(answer.probability, t, b)
        seg = segmentationNode.GetSegmentation()
        uid = next((s for s in mrml.segment_ids(segmentationNode)
                    if mrml.get_tag(seg.GetSegment(s), REVIEW_OF_TAG) == segmentId), None)
        if uid is None:
            uid = seg.AddEmptySegment("", f"{source.GetName()} uncertain", (1.0, 0.85, 0.0))
        mrml.set_segment_mask(segmentationNode, uid, mask, answers.answer_node(segmentationNode, segmentId))
        review = seg.GetSegment(uid)
        review.SetName(f"{source.GetName()} uncertain ({t:g} ± {b:g})")
        review.SetTag(REVIEW_TAG, "uncertain")
        review.SetTag(REVIEW_OF_TAG, segmentId)
        review.SetTag("textseg.threshold", json.dumps(t))
        review.SetTag("textseg.confidence.band", json.dumps(b))
        return uid

    def isReviewSegment(self, segmentationNode, segmentId) -> bool:
        return bool(mrml.get_tag(segmentationNode.GetSegmentation().GetSegment(segmentId), REVIEW_TAG))

    def modelOutputComparison(self, segmentationNode, segmentIds=None) -> list[dict]:
        """One row per segment with a kept answer (or ``segmentIds``): the original AI mask (A) against the
        segment now (B), textseg.analysis.corrections.compare_masks (Dice, HD95/HD/ASD mm, mL added/removed,
        slices touched)."""
        from textseg.analysis.corrections import compare_masks

        ids = self.reviewSegmentIds(segmentationNode) if segmentIds is None else list(segmentIds)
        if not ids:
            raise UsageError("No segment of this segmentation has a kept model output to compare with. Segment with "
                             "'Keep model output for review' on first.")
        rows = []
        for sid in ids:
            answer = self.modelAnswer(segmentationNode, sid)
            node = answers.answer_node(segmentationNode, sid)
            spacing = node.GetSpacing()
            row = compare_masks(answer.original_mask(), self._currentMask(segmentationNode, sid), spacing).as_row()
            rows.append({"segment": self._segmentName(segmentationNode, sid), "segment_id": sid, **row})
        return rows

    def compareWithModelOutput(self, segmentationNode, segmentIds=None, tableNode=None):
        """'Compare with AI output': ``modelOutputComparison`` rows in a table node (a new one by default)."""
        rows = self.modelOutputComparison(segmentationNode, segmentIds)
        if tableNode is None:
            tableNode = self.scene.AddNewNodeByClass("vtkMRMLTableNode", self.scene.GenerateUniqueName(
                f"{segmentationNode.GetName()} compared with AI output"))  # one table per press, told apart
        stats.fill_table(tableNode, rows, "", stats.COMPARISON_COLUMNS)
        return tableNode

    def trainingSegments(self, segmentationNode, volumeNode, segmentIds=None) -> list:
        """The segments as they are now (corrected), on the volume's grid, review segments left out."""
        from textseg.formats.segments import Segment

        seg = segmentationNode.GetSegmentation()
        ids = [s for s in mrml.segment_ids(segmentationNode) if not self.isReviewSegment(segmentationNode, s)] \
            if segmentIds is None else list(segmentIds)
        out = []
        for sid in ids:
            segment = seg.GetSegment(sid)
            tags = {k: mrml.get_tag(segment, k) for k in ("textseg.prompt", "textseg.modality")}
            out.append(Segment(segment.GetName(), mrml.segment_mask(segmentationNode, sid, volumeNode),
                               tags={k: v for k, v in tags.items() if v}))
        return out

    def trainingCase(self, volumeNode, segmentationNode, segmentIds=None, caseId: Optional[str] = None):
        """A textseg.formats.training_sets.TrainingCase from the scene (GUI thread: reads MRML): the volume with
        its world geometry and the current segments; case id: the volume's name made nnU-Net-safe."""
        from textseg.formats.training_sets import TrainingCase

        if volumeNode is None or segmentationNode is None:
            raise UsageError("Export for training needs the input volume and its segmentation.")
        volume = mrml.volume_from_node(volumeNode)
        segments = self.trainingSegments(segmentationNode, volumeNode, segmentIds)
        if not segments:
            raise UsageError(f"Segmentation '{segmentationNode.GetName()}' has no segments to export.")
        cid = caseId or re.sub(r"[^A-Za-z0-9_-]+", "_", volumeNode.GetName()).strip("_") or "case"
        return TrainingCase(volume, (volume, segments), cid)

    @staticmethod
    def trainingChannelName(case) -> str:
        """nnU-Net's channel name: the segments' modality tag (CT selects nnU-Net's CT normalisation)."""
        modalities = {s.tags.get("textseg.modality") for s in case.segmentation[1]} - {None, ""}
        if len(modalities) == 1:
            return str(modalities.pop())
        raise UsageError("Cannot tell the image's modality from the segments: pass channelName (e.g. 'CT', 'MRI').")

    def exportForTraining(self, volumeNode, segmentationNode, outDir, datasetId: int, name: str, labels=None,
                          channelName: Optional[str] = None, segmentIds=None, caseId: Optional[str] = None,
                          fileEnding: str = ".nii.gz", overlap: str = "refuse", overwrite: bool = False,
                          progress=None, cancel=None):
        """'Export for training': the volume and its current (corrected) segments as a case of an nnU-Net v2 raw
        dataset ``outDir/Dataset<ID>_<name>`` plus a MONAI datalist (textseg.formats.training_sets.export_nnunet:
        resumable, never overwriting unless ``overwrite``). ``labels``: label order (default: the segment names
        in order). Returns the ExportResult."""
        case = self.trainingCase(volumeNode, segmentationNode, segmentIds, caseId)
        return self.exportTrainingCase(case, outDir, datasetId, name, labels, channelName, fileEnding, overlap,
                                       overwrite, progress, cancel)

    def exportTrainingCase(self, case, outDir, datasetId: int, name: str, labels=None,
                           channelName: Optional[str] = None, fileEnding: str = ".nii.gz", overlap: str = "refuse",
                           overwrite: bool = False, progress=None, cancel=None):
        """The export of a ``trainingCase`` (no MRML: safe in a worker thread)."""
        from textseg.formats.training_sets import export_nnunet

        labels = list(labels) if labels else [s.name for s in case.segmentation[1]]
        channel = channelName or self.trainingChannelName(case)
        return export_nnunet([case], outDir, int(datasetId), name, labels, channel, file_ending=fileEnding,
                             overlap=overlap, overwrite=overwrite, progress=progress, cancel=cancel)

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
        """Statistics of every segment (after any edits) into a table node, optionally a CSV file; review segments
        ("Show uncertain voxels") are left out."""
        if segmentationNode is None or volumeNode is None:
            raise UsageError("Statistics need a segmentation and the volume it was made from.")
        rows = stats.slicer_statistics(segmentationNode, volumeNode)
        if rows is None:
            rows = stats.engine_statistics(segmentationNode, volumeNode)
        # both back ends give one row per segment, in the segmentation's order (SegmentStatistics: all segments with
        # visibleSegmentsOnly False)
        ids_rows = [(sid, row) for sid, row in zip(mrml.segment_ids(segmentationNode), rows)
                    if not self.isReviewSegment(segmentationNode, sid)]
        rows = [row for _sid, row in ids_rows]
        columns = stats.COLUMNS
        kept = set(self.reviewSegmentIds(segmentationNode))
        if kept:  # the model's confidence, from the kept maps, for the segments as they are now
            from textseg.analysis.confidence import confidence_row

            columns = stats.COLUMNS + stats.CONFIDENCE_COLUMNS
            for sid, row in ids_rows:
                if sid in kept:
                    try:
                        row.update(confidence_row(self.segmentConfidence(segmentationNode, sid)))
                    except UsageError:  # its map was not saved with the scene: empty cells, as for a drawn one
                        continue
        if tableNode is None:
            name = self.scene.GenerateUniqueName(f"{segmentationNode.GetName()} statistics")
            tableNode = self.scene.AddNewNodeByClass("vtkMRMLTableNode", name)
        unit = stats.intensity_unit(volumeNode)
        stats.fill_table(tableNode, rows, unit, columns)
        if csvPath:
            stats.write_csv(csvPath, rows, overwrite, columns)
        return tableNode
