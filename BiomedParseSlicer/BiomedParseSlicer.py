"""BiomedParseSlicer: text-prompted segmentation in 3D Slicer (3D Slicer 5.10 or newer).

Slicer's template order: Module, parameter node, Widget, Test. The Widget only binds the panel's widgets
(BiomedParseSlicerLib.panel) to the Qt-free controller that holds the run policy
(BiomedParseSlicerLib.controller); the Logic (BiomedParseSlicerLib.logic, also imported here for scripts and
slicer.util.getModuleLogic) is the MRML glue. Models, HTTP and torch live in the ``textseg`` engine.
"""

import logging
from typing import Annotated, Optional, Union

import qt
import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

import BiomedParseSlicerLib
from BiomedParseSlicerLib import environment, mrml, panel
from BiomedParseSlicerLib.controller import PanelController
from BiomedParseSlicerLib.logic import BiomedParseSlicerLogic
from textseg.presets import CT_WINDOWS, MODALITIES

DEVICES = ("auto", "cuda", "cpu", "mps")


#
# BiomedParseSlicer
#
class BiomedParseSlicer(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("BiomedParse")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["BiomedParseSlicer contributors"]
        self.parent.helpText = _(
            "Segment images from text prompts (one target per line), e.g. 'liver', with BiomedParse, SegVol, "
            "SAT or deepbet, locally or on a remote GPU server. Results are ordinary, editable segments. "
            "See <a href='https://github.com/biomedparseslicer/SlicerBiomedParse'>the documentation</a>."
        )
        self.parent.acknowledgementText = _(
            "Model weights have their own licences (BiomedParse: CC-BY-NC-SA 4.0, research use only); "
            "see the Setup section. Not for clinical use."
        )


#
# BiomedParseSlicerParameterNode
#
@parameterNodeWrapper
class BiomedParseSlicerParameterNode:
    """Saved with the scene: what to segment, with which model, where it runs. The API key is
    not saved in scenes (they get shared); it stays in the application settings."""

    # Both classes the selector shows (RGB/vector images: pathology, fundus, endoscopy, dermoscopy): the
    # parameterNodeWrapper sets the selector's nodeTypes from this annotation.
    inputVolume: Optional[Union[slicer.vtkMRMLScalarVolumeNode, slicer.vtkMRMLVectorVolumeNode]]
    outputSegmentation: slicer.vtkMRMLSegmentationNode
    statisticsTable: slicer.vtkMRMLTableNode
    prompts: str = ""
    promptHistory: str = ""  # newline-separated, most recent first
    model: str = "deepbet"
    modality: Annotated[str, Choice(list(MODALITIES))] = "CT"
    site: Annotated[str, Choice(list(CT_WINDOWS))] = "abdomen"
    where: str = "local"  # local | remote
    device: Annotated[str, Choice(list(DEVICES))] = "auto"
    serverUrl: str = ""


#
# BiomedParseSlicerWidget
#
class BiomedParseSlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: binds the widgets to BiomedParseSlicerLib.controller.PanelController. Every handler reads the
    widgets (panel.read_inputs), calls the controller and shows the View it returns (``_show``)."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.controller = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._restoring = False

    # ---- construction -----------------------------------------------------------------------
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/BiomedParseSlicer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = BiomedParseSlicerLogic()
        window = slicer.util.mainWindow()
        self.controller = PanelController(
            self.logic,
            confirm=slicer.util.confirmYesNoDisplay,
            ask=lambda text: panel.ask_yes_no_cancel(qt, window, _("Replace segments?"), text),
            choose=lambda title, label, items: panel.choose_item(qt, window, title, label, items),
            replace_edits=lambda text: panel.ask_replace_edits(qt, window, text))
        self.logic.watchScene()  # kept model output goes with its segment
        self._timer = qt.QTimer()
        self._timer.timeout.connect(self.onPoll)
        # The Review slider re-thresholds once it rests: 300 ms after the last move.
        self._reviewTimer = qt.QTimer()
        self._reviewTimer.setSingleShot(True)
        self._reviewTimer.setInterval(300)
        self._reviewTimer.timeout.connect(lambda: self._show(self.controller.review_threshold_changed(self._inputs())))
        settings = qt.QSettings()
        self.ui.apiKeyLineEdit.setText(settings.value("BiomedParseSlicer/apiKey", ""))
        self.ui.hfTokenLineEdit.setText(settings.value("BiomedParseSlicer/hfToken", ""))
        self.ui.clientOnlyCheckBox.setChecked(str(settings.value("BiomedParseSlicer/clientOnly",
                                                                 "false")).lower() == "true")
        self.ui.keepModelOutputCheckBox.setChecked(str(settings.value("BiomedParseSlicer/keepModelOutput",
                                                                      "true")).lower() == "true")
        self._connect()
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode()
        self._show(self.controller.refresh_setup(self._inputs()))

    def _connect(self):
        ui = self.ui

        def call(name):  # a button that only asks the controller
            return lambda *_args: self._show(getattr(self.controller, name)(self._inputs()))

        ui.applyButton.clicked.connect(self.onApply)
        for button, name in ((ui.segmentEverythingButton, "segment_everything"),
                             (ui.testConnectionButton, "test_connection"),
                             (ui.downloadButton, "download"), (ui.stopServerButton, "stop_server"),
                             (ui.statisticsButton, "statistics"), (ui.uncertainButton, "review_uncertain"),
                             (ui.compareButton, "compare_with_ai")):
            button.clicked.connect(call(name))
        ui.outputSegmentationSelector.currentNodeChanged.connect(call("review_refresh"))
        ui.reviewSegmentComboBox.currentIndexChanged.connect(call("review_refresh"))
        ui.reviewThresholdSlider.valueChanged.connect(self.onReviewThresholdMoved)
        ui.exportTrainingButton.clicked.connect(self.onExportTraining)
        ui.keepModelOutputCheckBox.toggled.connect(
            lambda checked: qt.QSettings().setValue("BiomedParseSlicer/keepModelOutput", bool(checked)))
        for widget in (ui.roiSelector, ui.pointsSelector, ui.outputSegmentationSelector):
            widget.currentNodeChanged.connect(self.updateView)
        ui.modalityComboBox.currentTextChanged.connect(self.updateView)
        ui.inputVolumeSelector.currentNodeChanged.connect(self.onVolumeChanged)
        ui.modelComboBox.currentIndexChanged.connect(self.onModelChanged)
        ui.promptsEdit.textChanged.connect(self.onPromptsEdited)
        ui.addTargetLineEdit.returnPressed.connect(self.onAddTarget)
        ui.historyComboBox.connect("activated(int)", self.onHistoryChosen)
        ui.localRadioButton.toggled.connect(self.onWhereChanged)
        ui.apiKeyLineEdit.editingFinished.connect(lambda: qt.QSettings().setValue("BiomedParseSlicer/apiKey",
                                                                                  ui.apiKeyLineEdit.text))
        ui.hfTokenLineEdit.editingFinished.connect(lambda: qt.QSettings().setValue("BiomedParseSlicer/hfToken",
                                                                                   ui.hfTokenLineEdit.text))
        ui.clientOnlyCheckBox.toggled.connect(self.onClientOnlyChanged)
        ui.segmentEditorButton.clicked.connect(self.onOpenSegmentEditor)
        ui.exportCsvButton.clicked.connect(self.onExportCsv)
        ui.installButton.clicked.connect(self.onInstall)
        ui.importButton.clicked.connect(self.onImport)
        self._shortcuts = []
        for seq in ("Ctrl+Return", "Ctrl+Enter"):  # Ctrl+Enter in the targets box runs
            shortcut = qt.QShortcut(qt.QKeySequence(seq), ui.promptsEdit)
            shortcut.setContext(qt.Qt.WidgetShortcut)
            shortcut.connect("activated()", self.onApply)
            self._shortcuts.append(shortcut)

    def cleanup(self):
        self.removeObservers()
        self.logic.cleanup()  # the Logic's scene and segmentation observers (a reloaded module makes a new Logic)
        self._reviewTimer.stop()
        self._show(self.controller.shutdown())

    def onReload(self):
        BiomedParseSlicerLib.reload()  # Slicer's Reload re-imports only this file
        ScriptedLoadableModuleWidget.onReload(self)

    # ---- the controller's view ----------------------------------------------------------------
    def _inputs(self):
        p = self._parameterNode
        return panel.read_inputs(self.ui, p.promptHistory if p else "", p.statisticsTable if p else None)

    def _show(self, view):
        panel.show(self.ui, view, self._timer)
        if view.history is not None and self._parameterNode:
            self._parameterNode.promptHistory = view.history
            panel.fill_history(self.ui, view.history)
        if view.models_changed:
            self._fillModels()
        if view.statistics_table is not None and self._parameterNode:
            self._parameterNode.statisticsTable = view.statistics_table
        if view.table is not None:
            self._showTable(view.table)
        if view.background_volume is not None:
            slicer.util.setSliceViewerLayers(background=view.background_volume)
        if view.error:
            slicer.util.errorDisplay(view.error)

    def updateView(self, *_args):
        if self.controller is not None:
            self._show(self.controller.view(self._inputs()))

    def onPoll(self):
        self._show(self.controller.poll(self._inputs()))

    # ---- parameter node -----------------------------------------------------------------------
    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def onSceneStartClose(self, caller, event):
        self._show(self.controller.scene_closing(self._inputs()))
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(BiomedParseSlicerParameterNode(self.logic.getParameterNode()))
        if not self._parameterNode.inputVolume:
            self._parameterNode.inputVolume = self.logic.defaultInputVolume()

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._restoring = True  # a saved scene keeps its modality: no guess while its volume is restored
            try:
                self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
                p = self._parameterNode
                self.ui.promptsEdit.setPlainText(p.prompts)
                remote = p.where == "remote" or self.ui.clientOnlyCheckBox.checked  # client only: never local
                self.ui.remoteRadioButton.setChecked(remote)
                self.ui.localRadioButton.setChecked(not remote)
                self._fillModels()  # selects p.model
                panel.fill_history(self.ui, p.promptHistory)
            finally:
                self._restoring = False

    # ---- widget changes -----------------------------------------------------------------------
    def _fillModels(self):
        keep = self._parameterNode.model if self._parameterNode else self.ui.modelComboBox.currentData
        panel.fill_models(self.ui, self.controller.model_rows(), keep)
        self.onModelChanged()

    def onModelChanged(self, _index=None):
        inputs = self._inputs()
        if self._parameterNode and inputs.model:
            self._parameterNode.model = inputs.model
        panel.set_completer(qt, self.ui.addTargetLineEdit, self.controller.completion_words(inputs))
        self._show(self.controller.view(inputs))

    def onVolumeChanged(self, _node):
        self._show(self.controller.volume_selected(self._inputs(), guess=not self._restoring))

    def onPromptsEdited(self):
        if self._parameterNode:
            self._parameterNode.prompts = self.ui.promptsEdit.toPlainText()
        self.updateView()

    def onAddTarget(self):
        text = self.ui.addTargetLineEdit.text.strip()
        if text:
            self.ui.promptsEdit.appendPlainText(text)
            self.ui.addTargetLineEdit.clear()

    def onHistoryChosen(self, index):
        self.ui.promptsEdit.appendPlainText(self.ui.historyComboBox.itemText(index))

    def onWhereChanged(self, _checked=None):
        if self._parameterNode:
            self._parameterNode.where = "local" if self.ui.localRadioButton.checked else "remote"
        self.updateView()

    def onClientOnlyChanged(self, checked):
        """Client only: inference on a remote server, no torch or models needed in this Slicer."""
        qt.QSettings().setValue("BiomedParseSlicer/clientOnly", bool(checked))
        self._show(self.controller.refresh_setup(self._inputs()))

    # ---- buttons ------------------------------------------------------------------------------
    def onApply(self):
        self._show(self.controller.apply(self._inputs()))

    def onInstall(self):
        with slicer.util.tryWithErrorDisplay(_("Installation failed."), waitCursor=True):
            view = self.controller.install(self._inputs(), slicer.util.pip_install, environment.torch_installer())
        self._show(view)

    def onImport(self):
        title = _("Import weight file for {m}").format(m=self.ui.modelComboBox.currentText)
        path = qt.QFileDialog.getOpenFileName(None, title)
        if path:
            self._show(self.controller.import_file(self._inputs(), path))

    def onExportCsv(self):
        path = qt.QFileDialog.getSaveFileName(None, _("Export statistics"), "statistics.csv", "CSV (*.csv)")
        if path:  # the dialog already asked before replacing a file
            self._show(self.controller.statistics(self._inputs(), csv_path=path))

    def onReviewThresholdMoved(self, _value):
        panel.show_threshold(self.ui)
        self.controller.review_threshold_moved(self._inputs())
        self._reviewTimer.start()  # restarts: re-threshold once the slider rests

    def onExportTraining(self):
        path = qt.QFileDialog.getExistingDirectory(None, _("Export for training: nnU-Net raw data folder"))
        if path:
            self._show(self.controller.export_training(self._inputs(), path))

    def onOpenSegmentEditor(self):
        inputs = self._inputs()
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.SegmentEditorWidget.editor
        editor.setSegmentationNode(inputs.segmentation)
        editor.setSourceVolumeNode(inputs.volume)

    def _showTable(self, table):
        """A table (statistics, comparison) in a layout with a table view, as Segment Statistics shows its own."""
        layoutManager = slicer.app.layoutManager()
        layoutManager.setLayout(slicer.modules.tables.logic().GetLayoutWithTable(layoutManager.layout))
        slicer.app.applicationLogic().GetSelectionNode().SetActiveTableID(table.GetID())
        slicer.app.applicationLogic().PropagateTableSelection()


#
# BiomedParseSlicerTest
#
class BiomedParseSlicerTest(ScriptedLoadableModuleTest):
    """Inside Slicer: the checks Testing/slicer/test_slicer_logic.py runs headless (BiomedParseSlicerLib.checks) on an
    oblique, flipped phantom made here (no downloads, the test-only synthetic model), Slicer's own Segment
    Statistics, and the panel's parameter node across leaving and entering the module."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_panel_keeps_its_choices_across_exit_and_enter()
        self.test_segment_geometry_and_statistics()
        self.test_statistics_use_segment_statistics()
        self.setUp()
        self.test_review_keeps_the_model_output_with_the_scene()

    def _engineMissing(self):
        if environment.installed_version("torch") is None:  # the engine's Predictor needs torch
            self.delayDisplay("Skipped: the engine is not installed (BiomedParse > Setup > Install).")
            return True
        return False

    def test_panel_keeps_its_choices_across_exit_and_enter(self):
        """Modality, CT site and device (Choice combo boxes) survive leaving and re-entering the module (on Slicer
        5.8 the parameterNodeWrapper's stale GUI connections reset them: 5.10 is required)."""
        widget = slicer.util.getModuleWidget("BiomedParseSlicer")
        widget.enter()
        p = widget._parameterNode
        p.modality, p.site, p.device = "MRI", "lung", "cpu"
        for _round in range(2):
            widget.exit()
            widget.enter()
        self.assertEqual((p.modality, p.site, p.device), ("MRI", "lung", "cpu"))
        self.assertEqual(widget.ui.modalityComboBox.currentText, "MRI")
        self.assertIn("vtkMRMLVectorVolumeNode", widget.ui.inputVolumeSelector.nodeTypes)
        logging.info("BiomedParse panel: choices kept across exit/enter")

    def test_segment_geometry_and_statistics(self):
        import tempfile

        from BiomedParseSlicerLib import checks

        if self._engineMissing():
            return
        self.delayDisplay("Segmenting an oblique, flipped phantom with the test-only synthetic model")
        with tempfile.TemporaryDirectory() as folder:
            checks.run_phantom_checks(BiomedParseSlicerLogic(), slicer.mrmlScene, folder)
        self.delayDisplay("Test passed")

    def test_statistics_use_segment_statistics(self):
        """Inside Slicer, statistics come from Slicer's SegmentStatistics (absent from slicer-core, so
        only this test exercises that branch): same columns, titles, units and values as the table
        SegmentStatistics exports itself, the engine's fallback numbers agree with it, and the Segment Statistics
        module's own parameter node is left as it was."""
        from BiomedParseSlicerLib import checks

        if self._engineMissing():
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

    def test_review_keeps_the_model_output_with_the_scene(self):
        """Review: the model output kept hidden with the segmentation, a hand edit never overwritten by a
        re-threshold, compare with AI output, and everything identical after saving and reopening a scene bundle."""
        import tempfile

        from BiomedParseSlicerLib import checks

        if self._engineMissing():
            return
        self.delayDisplay("Review on the phantom: kept output, hand edit, compare, .mrb round trip")
        with tempfile.TemporaryDirectory() as folder:
            checks.run_review_checks(BiomedParseSlicerLogic(), slicer.mrmlScene, folder)
        self.delayDisplay("Test passed")
