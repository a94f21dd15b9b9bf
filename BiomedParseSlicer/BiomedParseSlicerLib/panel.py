"""The panel's widgets <-> the controller: read the widgets into ``controller.Inputs``, show a ``controller.View``,
fill the combo boxes, and the dialogs. The only Qt code of the Lib; it imports no Qt module itself (the Widget
passes ``qt`` where a class is needed) and calls only API that PythonQt (inside Slicer) and PyQt5 share:
setters and slots as methods, Qt property getters through ``QObject.property`` (PythonQt makes them attributes,
PyQt5 methods), other getters as methods (QInputDialog.textValue is no property), ``exec_()``.
Testing/slicer/test_slicer_qt.py runs it on the real .ui with PyQt5.

``ui``: the panel's named widgets as attributes (slicer.util.childWidgetVariables of the loaded .ui).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

from .controller import Inputs, View


def read_inputs(ui, history: str = "", statistics_table=None) -> Inputs:
    """What the widgets hold now (``history`` and ``statistics_table`` live in the parameter node)."""
    return Inputs(
        volume=ui.inputVolumeSelector.currentNode(),
        segmentation=ui.outputSegmentationSelector.currentNode(),
        roi=ui.roiSelector.currentNode(),
        points=ui.pointsSelector.currentNode(),
        model=ui.modelComboBox.property("currentData") or "",
        modality=ui.modalityComboBox.property("currentText") or "",
        site=ui.siteComboBox.property("currentText") or "",
        prompts=ui.promptsEdit.property("plainText") or "",
        history=history,
        remote=bool(ui.remoteRadioButton.property("checked")),
        device=ui.deviceComboBox.property("currentText") or "auto",
        server_url=ui.serverUrlLineEdit.property("text") or "",
        api_key=ui.apiKeyLineEdit.property("text") or "",
        client_only=bool(ui.clientOnlyCheckBox.property("checked")),
        hf_token=ui.hfTokenLineEdit.property("text") or "",
        statistics_table=statistics_table,
        keep_model_output=bool(ui.keepModelOutputCheckBox.property("checked")),
        review_segment=ui.reviewSegmentComboBox.property("currentData") or "",
        review_threshold=int(ui.reviewThresholdSlider.property("value")) / 100.0,
        dataset_id=int(ui.trainingDatasetIdSpinBox.property("value")),
        dataset_name=ui.trainingDatasetNameLineEdit.property("text") or "",
    )


def show(ui, view: View, timer=None) -> None:
    """Make the widgets show ``view``; ``timer`` (the poll QTimer) runs exactly while the view says polling."""
    ui.applyButton.setText(view.apply_text)
    for name, enabled in (
        ("applyButton", view.apply_enabled), ("segmentEverythingButton", view.segment_everything_enabled),
        ("roiSelector", view.roi_enabled), ("pointsSelector", view.points_enabled),
        ("siteComboBox", view.site_enabled), ("localRadioButton", view.local_enabled),
        ("deviceComboBox", view.device_enabled), ("serverUrlLineEdit", view.remote_enabled),
        ("apiKeyLineEdit", view.remote_enabled), ("testConnectionButton", view.test_connection_enabled),
        ("stopServerButton", view.stop_server_enabled), ("downloadButton", view.download_enabled),
        ("importButton", view.import_enabled), ("installButton", view.install_enabled),
        ("reviewThresholdSlider", view.review_enabled), ("uncertainButton", view.review_enabled),
        ("compareButton", view.review_enabled), ("exportTrainingButton", view.export_training_enabled),
    ):
        getattr(ui, name).setEnabled(enabled)
    ui.progressBar.setValue(view.progress)
    ui.progressBar.setFormat(f"{view.progress_text} %p%" if view.progress_text else "%p%")
    ui.elapsedLabel.setText(view.elapsed_text)
    ui.modelInfoLabel.setText(view.model_info)
    if view.packages_text:
        ui.dependencyStatusText.setText(view.packages_text)
    if view.clear_log:
        ui.logEdit.clear()
    for line in view.log:
        ui.logEdit.appendPlainText(line)
    if view.remote_checked:
        ui.remoteRadioButton.setChecked(True)
    if view.modality:
        ui.modalityComboBox.setCurrentText(view.modality)
    if view.site:
        ui.siteComboBox.setCurrentText(view.site)
    if view.output_segmentation is not None:
        ui.outputSegmentationSelector.setCurrentNode(view.output_segmentation)
    show_review(ui, view)
    if timer is not None:
        timer.setInterval(view.poll_interval_ms)
        if not view.polling:
            timer.stop()
        elif not timer.isActive():
            timer.start()


def show_review(ui, view: View) -> None:
    """Review's segment list, confidence line and slider, changed without emitting signals (a refill or a slider
    moved back must not re-threshold)."""
    combo = ui.reviewSegmentComboBox
    if view.review_rows is not None:
        was_blocked = combo.blockSignals(True)
        combo.clear()
        for segment_id, name in view.review_rows:
            combo.addItem(name, segment_id)
        combo.blockSignals(was_blocked)
    if view.review_segment is not None:
        was_blocked = combo.blockSignals(True)
        combo.setCurrentIndex(max(0, combo.findData(view.review_segment)) if view.review_segment else -1)
        combo.blockSignals(was_blocked)
    if view.review_confidence is not None:
        ui.reviewConfidenceText.setText(view.review_confidence)
    if view.review_threshold is not None:
        slider = ui.reviewThresholdSlider
        was_blocked = slider.blockSignals(True)
        slider.setValue(int(round(view.review_threshold * 100)))
        slider.blockSignals(was_blocked)
        show_threshold(ui)


def show_threshold(ui) -> None:
    """The slider's value as a threshold beside it."""
    ui.reviewThresholdValue.setText(f"{int(ui.reviewThresholdSlider.property('value')) / 100:.2f}")


def ask_replace_edits(qt, parent, text: str) -> bool:
    """'Replace my edits' (True) or 'Keep my edits' (False, also Esc)."""
    box = qt.QMessageBox(parent)
    box.setIcon(qt.QMessageBox.Warning)
    box.setWindowTitle("Segment edited by hand")
    box.setText(text)
    replace = box.addButton("Replace my edits", qt.QMessageBox.DestructiveRole)
    keep = box.addButton("Keep my edits", qt.QMessageBox.RejectRole)
    box.setDefaultButton(keep)
    box.setEscapeButton(keep)
    box.exec_()
    chosen = box.clickedButton() == replace
    box.deleteLater()
    return chosen


def fill_models(ui, rows: Sequence[tuple[str, str]], keep: str) -> None:
    """The model list (id as item data), keeping ``keep`` selected, without emitting change signals."""
    combo = ui.modelComboBox
    was_blocked = combo.blockSignals(True)
    combo.clear()
    for model_id, label in rows:
        combo.addItem(label, model_id)
    combo.setCurrentIndex(max(0, combo.findData(keep)))
    combo.blockSignals(was_blocked)


def fill_history(ui, history: str) -> None:
    ui.historyComboBox.clear()
    ui.historyComboBox.addItems([h for h in history.split("\n") if h])


def set_completer(qt, line_edit, words: Sequence[str]) -> None:
    completer = qt.QCompleter(list(words), line_edit)
    completer.setCaseSensitivity(qt.Qt.CaseInsensitive)
    line_edit.setCompleter(completer)


def choose_item(qt, parent, title: str, label: str, items: Sequence[str]) -> Optional[str]:
    """The chosen item, or None when the user cancels. (QInputDialog.getItem returns the current item on
    Cancel too, and PythonQt cannot return its ``ok`` flag: a dialog instance and its exec result instead.)"""
    dialog = qt.QInputDialog(parent)
    dialog.setWindowTitle(title)
    dialog.setLabelText(label)
    dialog.setComboBoxItems(list(items))
    dialog.setComboBoxEditable(False)
    dialog.setTextValue(items[0])
    accepted = dialog.exec_() == qt.QDialog.Accepted
    value = dialog.textValue()  # a method: QInputDialog declares no Qt properties
    dialog.deleteLater()
    return value if accepted else None


def ask_yes_no_cancel(qt, parent, title: str, text: str) -> Optional[bool]:
    """Yes: True, No: False, Cancel (or Esc): None."""
    answer = qt.QMessageBox.question(parent, title, text,
                                     qt.QMessageBox.Yes | qt.QMessageBox.No | qt.QMessageBox.Cancel,
                                     qt.QMessageBox.Cancel)
    if answer == qt.QMessageBox.Yes:
        return True
    return False if answer == qt.QMessageBox.No else None
