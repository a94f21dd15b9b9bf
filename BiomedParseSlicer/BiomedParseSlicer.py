"""BiomedParseSlicer: text-prompted segmentation in 3D Slicer.

Template order: Module, parameter node, Widget (UI only), Logic (MRML glue only), Test. Models,
HTTP and torch live in the ``textseg`` engine beside this file; Qt-free helpers in
``BiomedParseSlicerLib``. The Logic also runs without Slicer's GUI, with the PyPI ``slicer-core``
wheel (no Qt): the GUI imports below are guarded, ``slicer`` itself is never replaced.
"""

import json
import logging
from typing import Annotated, List, Optional, Sequence

import slicer

from BiomedParseSlicerLib import environment, mrml, runner, stats
from textseg.errors import Cancelled, TextsegError, UsageError
from textseg.presets import CT_WINDOWS, MODALITIES, guess_modality, normalize_modality
from textseg.prompts import Prompt, parse_prompts
from textseg.writers import segments_from_results

try:  # 3D Slicer application (Qt); absent from the slicer-core wheel
    import ctk
    import qt
    from slicer.i18n import tr as _
    from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
    from slicer.ScriptedLoadableModule import (
        ScriptedLoadableModule,
        ScriptedLoadableModuleLogic,
        ScriptedLoadableModuleTest,
        ScriptedLoadableModuleWidget,
    )
    from slicer.util import VTKObservationMixin

    HAVE_GUI = True
except ImportError:  # headless (slicer-core): only the Logic is usable
    HAVE_GUI = False
    ctk = qt = parameterNodeWrapper = Choice = None

    def _(text):
        return text

    class ScriptedLoadableModule:  # never instantiated headless
        pass

    class ScriptedLoadableModuleWidget:
        pass

    class ScriptedLoadableModuleTest:
        pass

    class VTKObservationMixin:
        pass

    class ScriptedLoadableModuleLogic:
        """Headless base: the Logic uses nothing of Slicer's GUI base class but this."""

        def __init__(self, parent=None):
            self.parent = parent


#
# BiomedParseSlicer
#
class BiomedParseSlicer(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("BiomedParse")
        self.parent.categories = [_("Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["BiomedParseSlicer contributors"]
        self.parent.helpText = _(
            "Segment images from text prompts (one target per line), e.g. 'liver', with BiomedParse, SegVol, "
            "SAT or deepbet, locally or on a remote GPU server. Results are ordinary, editable segments. "
            "See <a href='https://github.com/biomedparseslicer/BiomedParseSlicer'>the documentation</a>."
        )
        self.parent.acknowledgementText = _(
            "Model weights have their own licences (BiomedParse: CC-BY-NC-SA 4.0, research use only); "
            "see the Setup section. Not for clinical use."
        )


#
# BiomedParseSlicerParameterNode
#
def _choice(values):
    """A str parameter shown in a QComboBox (parameterNodeWrapper needs the Choice annotation)."""
    return Annotated[str, Choice(list(values))] if Choice is not None else str


DEVICES = ("auto", "cuda", "cpu", "mps")


class BiomedParseSlicerParameterNode:
    """Saved with the scene: what to segment, with which model, where it runs. The API key is
    not saved in scenes (they get shared); it stays in the application settings."""

    inputVolume: slicer.vtkMRMLScalarVolumeNode
    outputSegmentation: slicer.vtkMRMLSegmentationNode
    statisticsTable: slicer.vtkMRMLTableNode
    prompts: str = ""
    promptHistory: str = ""  # newline-separated, most recent first
    model: str = "deepbet"
    modality: _choice(MODALITIES) = "CT"
    site: _choice(CT_WINDOWS) = "abdomen"
    where: str = "local"  # local | remote
    device: _choice(DEVICES) = "auto"
    serverUrl: str = ""


if parameterNodeWrapper is not None:
    BiomedParseSlicerParameterNode = parameterNodeWrapper(BiomedParseSlicerParameterNode)


#
# BiomedParseSlicerWidget
#
class BiomedParseSlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: UI only. Runs go through BiomedParseSlicerLogic; inference runs in a worker
    thread against the engine's local server process (or a remote one), polled by a QTimer."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._restoring = False
        self._task = None
        self._taskKind = ""
        self._localServer = None
        self._specs = {}

    # ---- construction -----------------------------------------------------------------------
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/BiomedParseSlicer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = BiomedParseSlicerLogic()
        self._timer = qt.QTimer()
        self._timer.setInterval(100)
        self._timer.timeout.connect(self.onPoll)
        self._fillChoices()
        self._connect()
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode()
        self.refreshSetup()

    def _fillChoices(self):
        # modality, site and device combo boxes are filled by the parameter node's Choice annotations
        self.ui.apiKeyLineEdit.text = qt.QSettings().value("BiomedParseSlicer/apiKey", "")
        self.ui.hfTokenLineEdit.text = qt.QSettings().value("BiomedParseSlicer/hfToken", "")
        self.ui.clientOnlyCheckBox.checked = str(qt.QSettings().value("BiomedParseSlicer/clientOnly", "false")).lower() == "true"
        self.fillModels()

    def _connect(self):
        ui = self.ui
        ui.applyButton.clicked.connect(self.onApply)
        ui.segmentEverythingButton.clicked.connect(self.onSegmentEverything)
        ui.inputVolumeSelector.currentNodeChanged.connect(self.onVolumeChanged)
        ui.modelComboBox.currentIndexChanged.connect(self.onModelChanged)
        ui.modalityComboBox.currentTextChanged.connect(self.onModalityChanged)
        ui.promptsEdit.textChanged.connect(self.onPromptsEdited)
        ui.addTargetLineEdit.returnPressed.connect(self.onAddTarget)
        ui.historyComboBox.connect("activated(int)", self.onHistoryChosen)
        ui.localRadioButton.toggled.connect(self.onWhereChanged)
        ui.testConnectionButton.clicked.connect(self.onTestConnection)
        ui.apiKeyLineEdit.editingFinished.connect(lambda: qt.QSettings().setValue("BiomedParseSlicer/apiKey", ui.apiKeyLineEdit.text))
        ui.hfTokenLineEdit.editingFinished.connect(lambda: qt.QSettings().setValue("BiomedParseSlicer/hfToken", ui.hfTokenLineEdit.text))
        ui.segmentEditorButton.clicked.connect(self.onOpenSegmentEditor)
        ui.statisticsButton.clicked.connect(self.onStatistics)
        ui.exportCsvButton.clicked.connect(self.onExportCsv)
        ui.installButton.clicked.connect(self.onInstall)
        ui.clientOnlyCheckBox.toggled.connect(self.onClientOnlyChanged)
        ui.downloadButton.clicked.connect(self.onDownload)
        ui.importButton.clicked.connect(self.onImport)
        ui.stopServerButton.clicked.connect(self.stopLocalServer)
        self._shortcuts = []
        for seq in ("Ctrl+Return", "Ctrl+Enter"):  # Ctrl+Enter in the targets box runs
            shortcut = qt.QShortcut(qt.QKeySequence(seq), ui.promptsEdit)
            shortcut.setContext(qt.Qt.WidgetShortcut)
            shortcut.connect("activated()", self.onApply)
            self._shortcuts.append(shortcut)

    def cleanup(self):
        self.removeObservers()
        if self._task is not None:
            self._task.cancel()
        self.stopLocalServer()

    # ---- parameter node -----------------------------------------------------------------------
    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def onSceneStartClose(self, caller, event):
        if self._task is not None:  # its results would have nowhere to go
            self._task.cancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            self._parameterNode.inputVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._restoring = True
            try:
                self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
                self._restoreFromParameterNode()
            finally:
                self._restoring = False

    def _restoreFromParameterNode(self):
        p = self._parameterNode
        self.ui.promptsEdit.setPlainText(p.prompts)
        remote = p.where == "remote" or self.ui.clientOnlyCheckBox.checked  # client only: never local
        self.ui.remoteRadioButton.checked = remote
        self.ui.localRadioButton.checked = not remote
        self.fillModels()  # selects p.model
        self._fillHistory()
        self.updateState()

    # ---- state --------------------------------------------------------------------------------
    def currentSpec(self):
        return self._specs.get(self.ui.modelComboBox.currentData)

    def updateState(self):
        ui, spec, running = self.ui, self.currentSpec(), self._task is not None
        ready = bool(ui.inputVolumeSelector.currentNode() and spec and ui.promptsEdit.toPlainText().strip())
        ui.applyButton.text = _("Cancel") if running else _("Apply")
        ui.applyButton.enabled = running or ready
        ui.segmentEverythingButton.enabled = not running and bool(spec and spec.recognition)
        kinds = spec.prompt_kinds if spec else ()
        ui.roiSelector.enabled = "box" in kinds
        ui.pointsSelector.enabled = "point" in kinds
        ui.siteComboBox.enabled = ui.modalityComboBox.currentText == "CT"
        ui.localRadioButton.enabled = not ui.clientOnlyCheckBox.checked  # client only: no local inference
        for w in (ui.downloadButton, ui.importButton):
            w.enabled = not running and not ui.clientOnlyCheckBox.checked and spec is not None
        remote = ui.remoteRadioButton.checked
        for w in (ui.serverUrlLineEdit, ui.apiKeyLineEdit, ui.testConnectionButton):
            w.enabled = remote
        ui.deviceComboBox.enabled = not remote
        ui.stopServerButton.enabled = self._localServer is not None and self._localServer.running

    def fillModels(self):
        """(Re)fill the model list, marking ready models, keeping the chosen model selected."""
        combo = self.ui.modelComboBox
        keep = self._parameterNode.model if self._parameterNode else combo.currentData
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        self._specs = {}
        for row in environment.model_rows():
            spec = row["spec"]
            self._specs[spec.id] = spec
            mark = "\u2713 " if row["ready"] else _("(download needed) ")
            combo.addItem(f"{mark}{spec.title}", spec.id)
        combo.currentIndex = max(0, combo.findData(keep))
        combo.blockSignals(wasBlocked)
        self.onModelChanged()

    def onModelChanged(self, _index=None):
        spec = self.currentSpec()
        if spec is None:
            return
        if self._parameterNode:
            self._parameterNode.model = spec.id
        completer = qt.QCompleter(self.logic.completionWords(spec.id, self._history()), self.ui.addTargetLineEdit)
        completer.setCaseSensitivity(qt.Qt.CaseInsensitive)
        self.ui.addTargetLineEdit.setCompleter(completer)
        self.ui.modelInfoLabel.text = f"{spec.description} {_('Licence')}: {spec.license or '?'}"
        self.updateState()

    def onModalityChanged(self, _text):
        self.updateState()

    def onVolumeChanged(self, node):
        if node is not None and not self._restoring:  # a saved scene keeps its modality
            modality, site, reason = self.logic.guessModality(node)
            if modality:
                self.ui.modalityComboBox.setCurrentText(modality)
                self.log(_("Modality guessed: {modality} ({reason}). Change it if wrong.").format(modality=modality, reason=reason))
            if site:
                self.ui.siteComboBox.setCurrentText(site)
        self.updateState()

    def onPromptsEdited(self):
        if self._parameterNode:
            self._parameterNode.prompts = self.ui.promptsEdit.toPlainText()
        self.updateState()

    def onAddTarget(self):
        text = self.ui.addTargetLineEdit.text.strip()
        if text:
            self.ui.promptsEdit.appendPlainText(text)
            self.ui.addTargetLineEdit.clear()

    def _history(self) -> List[str]:
        return [h for h in (self._parameterNode.promptHistory if self._parameterNode else "").split("\n") if h]

    def _fillHistory(self):
        self.ui.historyComboBox.clear()
        self.ui.historyComboBox.addItems(self._history())

    def onHistoryChosen(self, index):
        self.ui.promptsEdit.appendPlainText(self.ui.historyComboBox.itemText(index))

    def _remember(self, prompts: Sequence[str]):
        self._parameterNode.promptHistory = self.logic.updatedHistory(self._parameterNode.promptHistory, prompts)
        self._fillHistory()

    def onWhereChanged(self, _checked=None):
        if self._parameterNode:
            self._parameterNode.where = "local" if self.ui.localRadioButton.checked else "remote"
        self.updateState()

    def log(self, message: str):
        self.ui.logEdit.appendPlainText(message)
        logging.info(message)

    # ---- running ----------------------------------------------------------------------------
    def _prompts(self) -> List[Prompt]:
        texts = self.ui.promptsEdit.toPlainText().splitlines()
        roi = self.ui.roiSelector.currentNode() if self.ui.roiSelector.enabled else None
        points = self.ui.pointsSelector.currentNode() if self.ui.pointsSelector.enabled else None
        return self.logic.markupPrompts(texts, self.currentSpec().id, roi, points)

    def _predictorFactory(self):
        """A function (progress, cancel) -> predictor, run in the worker thread."""
        spec, where = self.currentSpec(), ("remote" if self.ui.remoteRadioButton.checked else "local")
        url, key, device = self.ui.serverUrlLineEdit.text.strip(), self.ui.apiKeyLineEdit.text, self.ui.deviceComboBox.currentText
        if where == "remote":
            return lambda progress, cancel: runner.make_predictor(spec.id, "remote", url=url, api_key=key)
        if not runner.has_client():  # engine without server: in-process predictor in the worker thread
            return lambda progress, cancel: self.logic.localPredictor(spec.id, device)
        if self._localServer is not None and self._localServer.device != device:
            self._localServer.stop()  # restarted below with the new device
            self._localServer = None
        if self._localServer is None:
            self._localServer = runner.LocalServer(device=device)

        def start(progress, cancel):
            progress(0.0, "starting the local inference server")
            self._localServer.start(cancel=cancel)
            return runner.make_predictor(spec.id, server=self._localServer)

        return start

    def onApply(self):
        if self._task is not None:
            self._task.cancel()
            self.log(_("Cancelling..."))
            return
        try:
            self._startSegmentation()
        except TextsegError as exc:
            slicer.util.errorDisplay(str(exc))

    def _startSegmentation(self):
        volumeNode, spec = self.ui.inputVolumeSelector.currentNode(), self.currentSpec()
        prompts = self._prompts()
        segNode = self.ui.outputSegmentationSelector.currentNode()
        replace = False
        if segNode is not None and self.logic.existingSegmentsFor(segNode, prompts):
            answer = qt.QMessageBox.question(
                slicer.util.mainWindow(), _("Replace segments?"),
                _("Some prompts were segmented before in this segmentation. Replace those segments? "
                  "(No: add new segments beside them.)"),
                qt.QMessageBox.Yes | qt.QMessageBox.No | qt.QMessageBox.Cancel)
            if answer == qt.QMessageBox.Cancel:
                return
            replace = answer == qt.QMessageBox.Yes
        volume = self.logic.volumeFromNode(volumeNode)  # GUI thread: reads MRML
        modality, site = self.ui.modalityComboBox.currentText, self.ui.siteComboBox.currentText
        site = site if modality == "CT" else None
        makePredictor = self._predictorFactory()

        def work(progress, cancel):
            predictor = makePredictor(progress, cancel)
            return self.logic.predict(volume, prompts, spec.id, modality, site, predictor, progress, cancel)

        self._remember([p.text for p in prompts if p.text])
        self._run(work, "segment", {"volumeNode": volumeNode, "segNode": segNode, "replace": replace})

    def onSegmentEverything(self):
        if self._task is not None:
            return
        try:
            volumeNode, spec = self.ui.inputVolumeSelector.currentNode(), self.currentSpec()
            volume = self.logic.volumeFromNode(volumeNode)  # GUI thread: reads MRML
            modality, site = self.ui.modalityComboBox.currentText, self.ui.siteComboBox.currentText
            site = site if modality == "CT" else None
            makePredictor = self._predictorFactory()
        except TextsegError as exc:
            slicer.util.errorDisplay(str(exc))
            return

        def work(progress, cancel):
            predictor = makePredictor(progress, cancel)
            return self.logic.recognizeVolume(volume, spec.id, modality, site, predictor, progress, cancel)

        segNode = self.ui.outputSegmentationSelector.currentNode()
        self._run(work, "recognize", {"volumeNode": volumeNode, "segNode": segNode, "replace": None})

    def _run(self, fn, kind, context=None):
        self._task, self._taskKind, self._taskContext = runner.BackgroundTask(fn).start(), kind, context or {}
        self.ui.progressBar.value = 0
        self.ui.logEdit.clear()
        self._timer.start()
        self.updateState()

    def onPoll(self):
        snap = self._task.poll()
        for line in snap.log:
            self.log(line)
        self.ui.progressBar.value = int(round(100 * snap.fraction))
        self.ui.progressBar.format = f"{snap.stage} %p%"
        self.ui.elapsedLabel.text = f"{snap.elapsed:.0f} s"
        if snap.done:
            self._timer.stop()
            task, self._task = self._task, None
            self._finish(task)
            self.updateState()

    def _finish(self, task):
        if isinstance(task.error, Cancelled):
            self.log(_("Cancelled."))
            return
        if task.error is not None:
            message = str(task.error) if isinstance(task.error, TextsegError) else repr(task.error)
            logging.error("BiomedParseSlicer run failed", exc_info=task.error)
            self.log(message)
            slicer.util.errorDisplay(message)
            return
        if self._taskKind in ("segment", "recognize"):
            self._showResults(task.result)
        elif self._taskKind == "connection":
            self.log(task.result)
        elif self._taskKind == "download":
            self.log(_("Model ready."))
            self.refreshSetup()

    def _showResults(self, results):
        c = self._taskContext
        if c["volumeNode"].GetScene() is None:
            self.log(_("The input volume was removed from the scene meanwhile: results discarded."))
            return
        for r in results:
            if r.message:
                self.log(r.message)
        replace = c["replace"]
        if c["segNode"] is not None and c["segNode"].GetScene() is None:
            self.log(_("The output segmentation was removed meanwhile: the results go to a new segmentation."))
            c["segNode"] = None
        if replace is None:  # "Segment everything": the targets are known only now
            earlier = c["segNode"] is not None and self.logic.existingSegmentsFor(c["segNode"], [r.prompt for r in results])
            replace = bool(earlier) and slicer.util.confirmYesNoDisplay(
                _("Some of the targets found were segmented before in this segmentation. Replace those segments? "
                  "(No: add new segments beside them.)"))
        segNode = self.logic.addResults(c["volumeNode"], results, c["segNode"], replace)
        self.ui.outputSegmentationSelector.setCurrentNode(segNode)
        segNode.CreateClosedSurfaceRepresentation()
        slicer.util.setSliceViewerLayers(background=c["volumeNode"])
        self.log(_("Done: {n} segment(s).").format(n=len(results)))

    def onTestConnection(self):
        url = self.ui.serverUrlLineEdit.text.strip()
        key = self.ui.apiKeyLineEdit.text

        def work(progress, cancel):
            return runner.check_server(url, key)

        self._run(work, "connection")

    # ---- results ------------------------------------------------------------------------------
    def onOpenSegmentEditor(self):
        segNode = self.ui.outputSegmentationSelector.currentNode()
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.SegmentEditorWidget.editor
        editor.setSegmentationNode(segNode)
        volumeNode = self.ui.inputVolumeSelector.currentNode()
        (editor.setSourceVolumeNode if hasattr(editor, "setSourceVolumeNode") else editor.setMasterVolumeNode)(volumeNode)

    def onStatistics(self):
        segNode, volumeNode = self.ui.outputSegmentationSelector.currentNode(), self.ui.inputVolumeSelector.currentNode()
        if segNode is None or volumeNode is None:
            slicer.util.errorDisplay(_("Select the input volume and the output segmentation first."))
            return
        with slicer.util.tryWithErrorDisplay(_("Statistics failed."), waitCursor=True):
            table = self.logic.statistics(segNode, volumeNode, self._parameterNode.statisticsTable)
            self._parameterNode.statisticsTable = table
            table.SetUseColumnTitleAsColumnHeader(True)  # as Segment Statistics shows its table
            layoutManager = slicer.app.layoutManager()  # a layout with a table view, as Segment Statistics does
            layoutManager.setLayout(slicer.modules.tables.logic().GetLayoutWithTable(layoutManager.layout))
            slicer.app.applicationLogic().GetSelectionNode().SetActiveTableID(table.GetID())
            slicer.app.applicationLogic().PropagateTableSelection()

    def onExportCsv(self):
        path = qt.QFileDialog.getSaveFileName(None, _("Export statistics"), "statistics.csv", "CSV (*.csv)")
        segNode, volumeNode = self.ui.outputSegmentationSelector.currentNode(), self.ui.inputVolumeSelector.currentNode()
        if path and segNode and volumeNode:  # the dialog already asked before overwriting
            with slicer.util.tryWithErrorDisplay(_("Export failed."), waitCursor=True):
                self.logic.statistics(segNode, volumeNode, self._parameterNode.statisticsTable, path, overwrite=True)

    # ---- setup --------------------------------------------------------------------------------
    def refreshSetup(self):
        local = not self.ui.clientOnlyCheckBox.checked
        lines = [f"{name}: {version or _('missing')}" for name, version in environment.status(local).items()]
        self.ui.dependencyStatusLabel.text = "\n".join(lines)
        self.fillModels()

    def onClientOnlyChanged(self, checked):
        """Client only: inference on a remote server, no torch or models needed in this Slicer."""
        qt.QSettings().setValue("BiomedParseSlicer/clientOnly", bool(checked))
        if checked:
            self.ui.remoteRadioButton.checked = True
        self.refreshSetup()
        self.updateState()

    def onInstall(self):
        local = not self.ui.clientOnlyCheckBox.checked
        with slicer.util.tryWithErrorDisplay(_("Installation failed."), waitCursor=True):
            done = environment.install(local, slicer.util.confirmOkCancelDisplay, slicer.util.pip_install,
                                       environment.torch_installer())
            self.log(_("Installed: {what}").format(what=", ".join(done) or _("nothing needed")))
        self.refreshSetup()

    def onDownload(self):
        spec = self.currentSpec()
        token = self.ui.hfTokenLineEdit.text or None
        if spec.license.startswith("CC-BY-NC") and not slicer.util.confirmOkCancelDisplay(
                _("{m} weights are licensed {lic} (non-commercial research use). Continue?").format(m=spec.title, lic=spec.license)):
            return
        self._run(lambda progress, cancel: environment.download_model(spec.id, progress, cancel, token), "download")

    def onImport(self):
        spec = self.currentSpec()
        path = qt.QFileDialog.getOpenFileName(None, _("Import weight file for {m}").format(m=spec.title))
        if not path:
            return
        name, names = None, environment.import_candidates(spec.id, path)
        if names:  # a multi-file model and a renamed file: ask which one it is
            name = qt.QInputDialog.getItem(slicer.util.mainWindow(), _("Import weight file"),
                                           _("Which file of {m} is this?").format(m=spec.title), names, 0, False)
            if not name:
                return
        # copying and checking a multi-GB file takes a while: in the background, with progress
        self._run(lambda progress, cancel: environment.import_model_file(spec.id, path, name, progress, cancel), "download")

    def stopLocalServer(self):
        if self._localServer is not None:
            self._localServer.stop()
        if hasattr(self, "ui"):
            self.updateState()


#
# BiomedParseSlicerLogic
#
class BiomedParseSlicerLogic(ScriptedLoadableModuleLogic):
    """MRML glue, usable from Slicer's Python console, scripts and tests (also with slicer-core):

        logic = BiomedParseSlicerLogic()
        seg = logic.segment(volumeNode, ["liver", "spleen"], "biomedparse-v1", modality="CT", site="abdomen")
        table = logic.statistics(seg, volumeNode, csvPath="stats.csv")
    """

    def __init__(self, scene=None, terminologyLogic=None):
        ScriptedLoadableModuleLogic.__init__(self)
        self.scene = scene if scene is not None else getattr(slicer, "mrmlScene", None)
        if terminologyLogic is None and HAVE_GUI and hasattr(slicer.modules, "terminologies"):
            terminologyLogic = slicer.modules.terminologies.logic()
        self.terminologyLogic = terminologyLogic
        self._predictors = {}
        self.lastSegmentIDs: List[str] = []

    def getParameterNode(self):
        return BiomedParseSlicerParameterNode(super().getParameterNode())

    # ---- engine side (no MRML: safe in a worker thread) ----------------------------------------
    def localPredictor(self, model: str, device: str = "auto"):
        """An in-process predictor, kept so the model loads once per session."""
        key = (model, device)
        if key not in self._predictors:
            self._predictors[key] = runner.make_predictor(model, "local", device)
        return self._predictors[key]

    def predict(self, volume, prompts, model: str, modality=None, site=None, predictor=None, progress=None, cancel=None):
        """Engine results for an engine Volume (set_image, then predict). Cancel keeps finished prompts."""
        predictor = predictor or self.localPredictor(model)
        plist = parse_prompts(prompts)
        predictor.set_image(volume, modality or None, site or None, progress=self._part(progress, 0.0, 0.5), cancel=cancel)
        return predictor.predict(plist, progress=self._part(progress, 0.5, 1.0), cancel=cancel)

    def recognizeVolume(self, volume, model: str, modality=None, site=None, predictor=None, progress=None, cancel=None,
                        **options):
        """Engine results of "Segment everything" (models with recognition): one per target found,
        named after it, with detection boxes (``result.objects``). Cancel keeps the slices done; with none
        found, Cancelled (cancelled before any) or UsageError (nothing recognized) is raised."""
        predictor = predictor or self.localPredictor(model)
        predictor.set_image(volume, modality or None, site or None, progress=self._part(progress, 0.0, 0.3), cancel=cancel)
        results = predictor.recognize(progress=self._part(progress, 0.3, 1.0), cancel=cancel, **options)
        if not results and cancel is not None and cancel.cancelled:
            raise Cancelled("Cancelled before any target was found: nothing added.")
        if not results:
            raise UsageError(f"Model '{model}' recognized none of its targets in this volume. Check the modality "
                             f"({modality or 'unset'}) and CT site ({site or 'unset'}), or segment with prompts instead.")
        return results

    @staticmethod
    def _part(progress, lo, hi):
        return (lambda f, stage="": progress(lo + (hi - lo) * f, stage)) if progress else None

    # ---- MRML side (GUI thread) ---------------------------------------------------------------
    def volumeFromNode(self, volumeNode):
        return mrml.volume_from_node(volumeNode)

    def guessModality(self, volumeNode):
        """(modality, CT site or None, reason): the DICOM Modality tag when the volume came from
        DICOM (inside Slicer), else textseg.presets.guess_modality from the intensities."""
        if volumeNode is None or volumeNode.GetImageData() is None:
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

    def markupPrompts(self, texts, model: str, roiNode=None, pointsNode=None) -> List[Prompt]:
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
    def completionWords(model: str, history: Sequence[str] = ()) -> List[str]:
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

    def existingSegmentsFor(self, segmentationNode, prompts) -> List[str]:
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

        ``predictor``: textseg.predictor.Predictor or textseg.client.RemotePredictor (default: a
        local one). ``replace``: overwrite segments an earlier run made for the same prompt;
        otherwise new segments are added. Other segments are never touched."""
        modality, site = self._modality(volumeNode, modality, site)
        results = self.predict(self.volumeFromNode(volumeNode), prompts, model, modality, site, predictor, progress, cancel)
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


#
# BiomedParseSlicerTest
#
class BiomedParseSlicerTest(ScriptedLoadableModuleTest):
    """Inside Slicer: the same checks as Testing/test_slicer_logic.py (BiomedParseSlicerLib.checks),
    on an oblique, flipped phantom made here (no downloads), with the test-only synthetic model."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_segment_geometry_and_statistics()
        self.test_statistics_use_segment_statistics()

    def test_segment_geometry_and_statistics(self):
        import tempfile

        from BiomedParseSlicerLib import checks

        if environment.installed_version("torch") is None:  # the engine's Predictor needs torch
            self.delayDisplay("Skipped: the engine is not installed (BiomedParse > Setup > Install).")
            return
        self.delayDisplay("Segmenting an oblique, flipped phantom with the test-only synthetic model")
        with tempfile.TemporaryDirectory() as folder:
            checks.run_phantom_checks(BiomedParseSlicerLogic(), slicer.mrmlScene, folder)
        self.delayDisplay("Test passed")

    def test_statistics_use_segment_statistics(self):
        """Inside Slicer, statistics come from Slicer's SegmentStatistics (absent from slicer-core, so
        only this test exercises that branch): same columns, titles, units and values as the table
        SegmentStatistics exports itself, and the engine's fallback numbers agree with it."""
        from BiomedParseSlicerLib import checks

        if environment.installed_version("torch") is None:
            self.delayDisplay("Skipped: the engine is not installed (BiomedParse > Setup > Install).")
            return
        self.delayDisplay("Statistics through Slicer's Segment Statistics on the phantom")
        logic = BiomedParseSlicerLogic()
        node = mrml.volume_node_from_volume(slicer.mrmlScene, checks.phantom(), "phantom")
        units = slicer.vtkCodedEntry()
        units.SetValueSchemeMeaning("[hnsf'U]", "UCUM", "Hounsfield unit")  # as Slicer's DICOM reader sets it
        node.SetVoxelValueUnits(units)
        seg = logic.segment(node, ["bone", "soft tissue"], "synthetic-3d", modality="CT")
        checks.check_segment_statistics_branch(logic, slicer.mrmlScene, seg, node)
        self.delayDisplay("Test passed")
