"""The panel's Qt-dependent parts with a real Qt (PyQt5 from PyPI, offscreen): the real .ui loads with Slicer's
widget classes mapped to their Qt bases (Testing/slicer_qt.py), object names are unique, the binding
(BiomedParseSlicerLib.panel) shows the controller's views and reads the widgets, and the dialogs answer as the
user clicked."""

from __future__ import annotations

import ast
import re
import xml.etree.ElementTree as ET

import pytest
from conftest import ROOT

pytest.importorskip("PyQt5.QtWidgets", reason="needs PyQt5 (test extra): the panel's Qt tests")
import slicer_qt  # noqa: E402
from slicer_qt import QtCore, QtWidgets, qt  # noqa: E402

from BiomedParseSlicerLib import panel  # noqa: E402
from BiomedParseSlicerLib.controller import Inputs, PanelController, View  # noqa: E402

MODULE_PY = ROOT / "BiomedParseSlicer" / "BiomedParseSlicer.py"


def click_in_next_dialog(button_text: str):
    """Click a button of the modal dialog that is about to open (as the user would)."""

    def click():
        dialog = QtWidgets.QApplication.activeModalWidget()
        if dialog is None:
            QtCore.QTimer.singleShot(10, click)
            return
        for button in dialog.findChildren(QtWidgets.QAbstractButton):
            if button.text().replace("&", "") == button_text:
                button.click()
                return
        raise AssertionError(f"no '{button_text}' button in {dialog}")

    QtCore.QTimer.singleShot(0, click)


def test_ui_loads_in_qt_with_unique_names():
    """Every object name the .ui declares is unique (slicer.util.childWidgetVariables maps names to widgets:
    a duplicate makes one of them unreachable, e.g. the package list landing in its row's caption), and Qt loads
    the .ui with exactly those names; every property the .ui sets exists on the real class (uic calls its setter)."""
    tree = ET.parse(slicer_qt.UI)
    declared = [e.get("name") for e in tree.iter() if e.tag in ("widget", "layout") and e.get("name")]
    duplicates = sorted({n for n in declared if declared.count(n) > 1})
    assert not duplicates, f"object names used twice in the .ui: {duplicates}"
    widget, ui = slicer_qt.load_panel()
    loaded = [o.objectName() for o in [widget] + widget.findChildren(QtCore.QObject)
              if o.objectName() and not o.objectName().startswith("qt_")]
    assert sorted(loaded) == sorted(declared)
    used = set(re.findall(r"\bui\.(\w+)",
                          MODULE_PY.read_text()
                          + (ROOT / "BiomedParseSlicer" / "BiomedParseSlicerLib" / "panel.py").read_text()))
    assert used <= set(declared), f"widgets the code uses but the .ui lacks: {sorted(used - set(declared))}"
    widget.setMRMLScene("the scene")  # the .ui's connections give every node selector the scene
    selectors = widget.findChildren(slicer_qt.qMRMLNodeComboBox)
    assert len(selectors) == 4 and all(s.scene == "the scene" for s in selectors)


def test_panel_shows_views_and_reads_the_widgets():
    """The binding on the real widgets: enabled states, texts, progress, log, package list in its own label (the
    caption stays), guessed modality selected; and the widgets read back into Inputs."""
    widget, ui = slicer_qt.load_panel()
    for combo, items in ((ui.modalityComboBox, ["CT", "MRI"]), (ui.siteComboBox, ["abdomen", "lung"]),
                         (ui.deviceComboBox, ["auto", "cpu"])):
        combo.addItems(items)  # the parameter node's Choice fills these inside Slicer
    panel.fill_models(ui, [("deepbet", "✓ deepbet"), ("segvol", "(download needed) SegVol")], keep="segvol")
    assert ui.modelComboBox.currentText() == "(download needed) SegVol"
    panel.fill_history(ui, "liver\nspleen\n")
    assert [ui.historyComboBox.itemText(i) for i in range(ui.historyComboBox.count())] == ["liver", "spleen"]
    ui.promptsEdit.setPlainText("liver\nleft kidney")
    ui.serverUrlLineEdit.setText("https://gpu:8000")
    ui.remoteRadioButton.setChecked(True)
    ui.inputVolumeSelector.setCurrentNode("volume node")
    inputs = panel.read_inputs(ui, history="liver", statistics_table="table")
    assert inputs == Inputs(volume="volume node", model="segvol", modality="CT", site="abdomen",
                            prompts="liver\nleft kidney", history="liver", remote=True, device="auto",
                            server_url="https://gpu:8000", statistics_table="table")
    timer = qt.QTimer()
    panel.show(ui, View(state="running", apply_text="Cancel", apply_enabled=True, roi_enabled=True, polling=True,
                        progress=42, progress_text="segmenting", elapsed_text="3 s",
                        packages_text="numpy: 2.0\nslicerio: missing",
                        log=("one", "two"), clear_log=True, modality="MRI", install_enabled=False), timer)
    assert ui.applyButton.text() == "Cancel" and ui.applyButton.isEnabled() and not ui.installButton.isEnabled()
    assert ui.roiSelector.isEnabled() and not ui.pointsSelector.isEnabled() and not ui.stopServerButton.isEnabled()
    assert (ui.progressBar.value(), ui.progressBar.format(), ui.elapsedLabel.text()) == (42, "segmenting %p%", "3 s")
    assert ui.dependencyStatusText.text() == "numpy: 2.0\nslicerio: missing"
    assert ui.dependencyStatusLabel.text() == "Python packages:"
    assert ui.logEdit.toPlainText() == "one\ntwo" and ui.modalityComboBox.currentText() == "MRI"
    assert timer.isActive() and timer.interval() == View().poll_interval_ms
    panel.show(ui, View(log=("three",), remote_checked=None), timer)
    assert ui.logEdit.toPlainText() == "one\ntwo\nthree" and not timer.isActive()


def test_cleanup_stops_the_poll_timer():
    """The module's cleanup shows the controller's shutdown view: the panel's timer stops (it kept firing)."""
    widget, ui = slicer_qt.load_panel()
    timer = qt.QTimer()
    panel.show(ui, View(polling=True), timer)
    assert timer.isActive()
    panel.show(ui, PanelController(logic=None).shutdown(), timer)
    assert not timer.isActive()
    source = MODULE_PY.read_text()
    widget_class = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef)
                        and n.name == "BiomedParseSlicerWidget")
    cleanup = next(f for f in widget_class.body if isinstance(f, ast.FunctionDef) and f.name == "cleanup")
    assert "self._show(self.controller.shutdown())" in ast.get_source_segment(source, cleanup)


def test_which_file_dialog_cancel_returns_nothing():
    """Import > "Which file of X is this?": Cancel must import nothing. Qt's QInputDialog.getItem returns the
    current item on Cancel too (its ok flag, which PythonQt cannot return, is the only difference); the panel's
    dialog returns None on Cancel and the chosen item on OK."""
    slicer_qt.application()
    click_in_next_dialog("Cancel")
    text, ok = QtWidgets.QInputDialog.getItem(None, "Import weight file", "Which file?", ["a.bin", "b.bin"], 0, False)
    assert (text, ok) == ("a.bin", False)  # what PythonQt hands back as just "a.bin": imported anyway
    click_in_next_dialog("Cancel")
    assert panel.choose_item(qt, None, "Import weight file", "Which file?", ["a.bin", "b.bin"]) is None

    def choose_second():
        dialog = QtWidgets.QApplication.activeModalWidget()
        if dialog is None:
            QtCore.QTimer.singleShot(10, choose_second)
            return
        dialog.findChild(QtWidgets.QComboBox).setCurrentIndex(1)
        click_in_next_dialog("OK")

    QtCore.QTimer.singleShot(0, choose_second)
    assert panel.choose_item(qt, None, "Import weight file", "Which file?", ["a.bin", "b.bin"]) == "b.bin"


@pytest.mark.parametrize("button, answer", [("Yes", True), ("No", False), ("Cancel", None)])
def test_replace_question_answers(button, answer):
    slicer_qt.application()
    click_in_next_dialog(button)
    assert panel.ask_yes_no_cancel(qt, None, "Replace segments?", "Replace those segments?") is answer


def test_completer_offers_the_vocabulary_case_insensitively():
    widget, ui = slicer_qt.load_panel()
    panel.set_completer(qt, ui.addTargetLineEdit, ["Liver", "left kidney"])
    completer = ui.addTargetLineEdit.completer()
    completer.setCompletionPrefix("LE")
    assert completer.currentCompletion() == "left kidney"


def test_review_section_shows_without_signals_and_reads_back():
    """Review on the real widgets: the segment list and the slider change without emitting signals (a refill or
    the slider moved back must not re-threshold), the threshold label follows, the inputs read back, and the
    section starts collapsed with 'Keep model output for review' on."""
    widget, ui = slicer_qt.load_panel()
    assert ui.reviewCollapsibleButton.collapsed and ui.keepModelOutputCheckBox.isChecked()
    emitted = []
    ui.reviewSegmentComboBox.currentIndexChanged.connect(lambda i: emitted.append(("segment", i)))
    ui.reviewThresholdSlider.valueChanged.connect(lambda v: emitted.append(("slider", v)))
    panel.show(ui, View(review_enabled=True, export_training_enabled=True,
                        review_rows=[("S_1", "liver"), ("S_2", "spleen")], review_segment="S_2",
                        review_confidence="existence 0.97, mean probability 0.88.", review_threshold=0.35))
    assert emitted == []
    assert ui.reviewSegmentComboBox.currentText() == "spleen" and ui.reviewThresholdSlider.value() == 35
    assert ui.reviewThresholdValue.text() == "0.35" and ui.reviewConfidenceText.text().startswith("existence 0.97")
    assert ui.compareButton.isEnabled() and ui.exportTrainingButton.isEnabled()
    ui.trainingDatasetNameLineEdit.setText("Reviewed")
    inputs = panel.read_inputs(ui)
    assert (inputs.review_segment, inputs.review_threshold, inputs.keep_model_output) == ("S_2", 0.35, True)
    assert (inputs.dataset_id, inputs.dataset_name) == (501, "Reviewed")
    panel.show(ui, View())  # a view without review fields leaves them as they are
    assert ui.reviewConfidenceText.text().startswith("existence") and not ui.compareButton.isEnabled()


@pytest.mark.parametrize("button, answer", [("Replace my edits", True), ("Keep my edits", False)])
def test_replace_my_edits_question(button, answer):
    slicer_qt.application()
    click_in_next_dialog(button)
    assert panel.ask_replace_edits(qt, None, "Segment 'liver' was edited by hand.") is answer
