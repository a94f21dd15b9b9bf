"""A real Qt (PyQt5 from PyPI, Qt 5.15 as in Slicer 5.10) for the panel's Qt-dependent parts, headless
(QT_QPA_PLATFORM=offscreen).

Slicer's own widget classes used by the .ui are mapped to their Qt bases with exactly the Qt properties their
real headers declare, so loading the real .ui fails on a property the real class does not have (PyQt5's uic
calls each property's setter):
- ctkCollapsibleButton : QAbstractButton (CTK dd4caeae7e979cf441e44ee85d3b0780120d113d, the commit Slicer 5.10
  pins in SuperBuild/External_CTK.cmake: Libs/Widgets/ctkCollapsibleButton.h);
- qMRMLNodeComboBox : QWidget, with currentNode()/setCurrentNode()/setMRMLScene() and currentNodeChanged
  (Slicer v5.10.0 Libs/MRML/Widgets/qMRMLNodeComboBox.h); the node is any Python object (slicer-core nodes);
- qMRMLWidget : QWidget with mrmlSceneChanged/setMRMLScene (Libs/MRML/Widgets/qMRMLWidget.h).

``qt`` is PyQt5's QtCore, QtGui and QtWidgets in one namespace, as PythonQt's ``qt`` module is.
"""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
from PyQt5 import QtCore, QtGui, QtWidgets, uic  # noqa: E402

UI = Path(__file__).resolve().parents[1] / "BiomedParseSlicer" / "Resources" / "UI" / "BiomedParseSlicer.ui"

qt = types.SimpleNamespace(**{**vars(QtCore), **vars(QtGui), **vars(QtWidgets)})

# (name, Python type of the Qt property); enum-typed properties (QFrame::Shape, Qt::Alignment,
# QComboBox::SizeAdjustPolicy) are ints to Qt's property system.
CTK_COLLAPSIBLE_BUTTON = [("collapsed", bool), ("collapsedHeight", int), ("flat", bool), ("contentsFrameShape", int),
                          ("contentsFrameShadow", int), ("contentsLineWidth", int), ("contentsMidLineWidth", int),
                          ("buttonTextAlignment", int), ("indicatorAlignment", int)]
QMRML_NODE_COMBO_BOX = [("currentNodeID", str), ("nodeTypes", "QStringList"), ("showHidden", bool),
                        ("showChildNodeTypes", bool), ("hideChildNodeTypes", "QStringList"), ("baseName", str),
                        ("noneEnabled", bool), ("addEnabled", bool), ("removeEnabled", bool), ("editEnabled", bool),
                        ("renameEnabled", bool), ("interactionNodeSingletonTag", str), ("selectNodeUponCreation", bool),
                        ("noneDisplay", str), ("sizeAdjustPolicy", int)]
DEFAULTS = {bool: False, int: 0, str: "", "QStringList": []}


def _properties(spec):
    """Qt properties with their setters (setX), stored on the instance."""
    ns = {}
    for name, kind in spec:
        attr = "_" + name

        def getter(self, attr=attr, default=DEFAULTS[kind]):
            return getattr(self, attr, default)

        def setter(self, value, attr=attr):
            setattr(self, attr, value)

        ns[name] = QtCore.pyqtProperty(kind, getter, setter)
        ns["set" + name[0].upper() + name[1:]] = setter
    return ns


class ctkCollapsibleButton(QtWidgets.QAbstractButton):
    locals().update(_properties(CTK_COLLAPSIBLE_BUTTON))

    def paintEvent(self, event):  # QAbstractButton's is pure virtual
        pass


class qMRMLNodeComboBox(QtWidgets.QWidget):
    locals().update(_properties(QMRML_NODE_COMBO_BOX))
    currentNodeChanged = QtCore.pyqtSignal(object)
    _node = None
    scene = None

    def currentNode(self):
        return self._node

    def setCurrentNode(self, node):
        if node is not self._node:
            self._node = node
            self.currentNodeChanged.emit(node)

    def setMRMLScene(self, scene):
        self.scene = scene


class _SceneSignal:
    """qMRMLWidget::mrmlSceneChanged(vtkMRMLScene*): PyQt5 cannot declare a signal of an unregistered C++ type,
    and uic connects the .ui's connection as ``sender.mrmlSceneChanged["vtkMRMLScene*"].connect(slot)``."""

    def __init__(self):
        self.slots = []

    def __getitem__(self, signature):
        assert signature == "vtkMRMLScene*", signature
        return self

    def connect(self, slot):
        self.slots.append(slot)

    def emit(self, scene):
        for slot in self.slots:
            slot(scene)


class qMRMLWidget(QtWidgets.QWidget):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.mrmlSceneChanged = _SceneSignal()

    def setMRMLScene(self, scene):
        self.mrmlSceneChanged.emit(scene)


for _cls in (ctkCollapsibleButton, qMRMLNodeComboBox, qMRMLWidget):  # uic imports a custom class from its header
    _module = types.ModuleType(_cls.__name__)
    setattr(_module, _cls.__name__, _cls)
    sys.modules.setdefault(_cls.__name__, _module)


_APPLICATION = []


def application():
    if QtWidgets.QApplication.instance() is None:
        _APPLICATION.append(QtWidgets.QApplication(["test"]))
    return QtWidgets.QApplication.instance()


def load_panel():
    """The real .ui loaded by Qt, and its named children as attributes (slicer.util.childWidgetVariables)."""
    application()
    widget = uic.loadUi(str(UI))
    ui = types.SimpleNamespace()
    for child in widget.findChildren(QtCore.QObject):
        if child.objectName():
            setattr(ui, child.objectName(), child)
    return widget, ui


def named_objects(widget):
    """Every named object under ``widget`` (and itself), in document order, with duplicates."""
    return [widget.objectName()] + [c.objectName() for c in widget.findChildren(QtCore.QObject) if c.objectName()]
