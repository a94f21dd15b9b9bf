"""Generates BiomedParseSlicer/Resources/UI/BiomedParseSlicer.ui (run: python Utilities/make_ui.py OUT.ui); edit
either this or the .ui in Qt Designer."""
import re
import sys
from collections import Counter
from xml.dom import minidom

W = []
def prop(name, kind, value):
    return f'<property name="{name}"><{kind}>{value}</{kind}></property>'
def strlist(name, items):
    return f'<property name="{name}"><stringlist>' + "".join(f"<string>{i}</string>"
                                                             for i in items) + '</stringlist></property>'
def dyn(param):
    return f'<property name="SlicerParameterName" stdset="0"><string>{param}</string></property>'
def node_combo(name, types, none=False, add=False, param=None, tooltip="", none_text=None):
    p = [strlist("nodeTypes", types), prop("showChildNodeTypes", "bool", "false"),
         prop("noneEnabled", "bool", str(none).lower()),
         prop("addEnabled", "bool", str(add).lower()), prop("removeEnabled", "bool", "false"),
         prop("renameEnabled", "bool", "true")]
    if none_text:
        p.append(prop("noneDisplay", "string", none_text))
    if tooltip:
        p.append(prop("toolTip", "string", tooltip))
    if param:
        p.append(dyn(param))
    W.append(name)
    return f'<widget class="qMRMLNodeComboBox" name="{name}">' + "".join(p) + "</widget>"
def widget(cls, name, *props):
    return f'<widget class="{cls}" name="{name}">' + "".join(props) + "</widget>"
def form_rows(rows):
    return "".join(f'<item row="{i}" column="0"><widget class="QLabel" '
                   f'name="{n}Label">{prop("text","string",t)}</widget></item><item row="{i}" column="1">{w}</item>'
                   if n else f'<item row="{i}" column="0" colspan="2">{w}</item>' for i, (n, t, w) in enumerate(rows))
def collapsible(name, text, layout_rows, collapsed=False):
    return (f'<item><widget class="ctkCollapsibleButton" '
            f'name="{name}">{prop("text","string",text)}{prop("collapsed","bool",str(collapsed).lower())}'
            f'<layout class="QGridLayout" name="{name}Layout">{form_rows(layout_rows)}</layout></widget></item>')
def hbox(name, *ws):
    return f'<layout class="QHBoxLayout" name="{name}">' + "".join(f"<item>{w}</item>" for w in ws) + "</layout>"
def maxh(h):
    return f'<property name="maximumSize"><size><width>16777215</width><height>{h}</height></size></property>'
PW = '<property name="echoMode"><enum>QLineEdit::Password</enum></property>'
inputs = [
    ("inputVolume", "Input volume:",
     node_combo("inputVolumeSelector", ["vtkMRMLScalarVolumeNode", "vtkMRMLVectorVolumeNode"], param="inputVolume",
                tooltip="The image to segment.")),
    ("modality", "Modality:",
     widget("QComboBox", "modalityComboBox",
            prop("toolTip", "string", "Guessed from DICOM tags / intensities when a volume is selected; check it."),
            dyn("modality"))),
    ("site", "CT site (window):",
     widget("QComboBox", "siteComboBox", prop("toolTip", "string", "CT intensity window used by BiomedParse."),
            dyn("site"))),
    ("model", "Model:",
     widget("QComboBox", "modelComboBox",
            prop("toolTip", "string", "\u2713 = weights present. Download or import others in Setup."))),
    ("", "", widget("QLabel", "modelInfoLabel", prop("wordWrap", "bool", "true"))),
]
prompts = [
    ("prompts", "Targets (one per line):",
     widget("QPlainTextEdit", "promptsEdit", prop("placeholderText", "string", "liver&#10;left kidney&#10;tumor"),
        prop("toolTip", "string", "One target per line. Ctrl+Enter runs."), maxh(110))),
    ("addTarget", "Add target:",
     widget("QLineEdit", "addTargetLineEdit", prop("placeholderText", "string", "type, pick a suggestion, Enter"))),
    ("history", "Recent:", widget("QComboBox", "historyComboBox")),
    ("roi", "Box (ROI):",
     node_combo("roiSelector", ["vtkMRMLMarkupsROINode"], none=True, add=True,
                tooltip="Optional box prompt, for models that take boxes.")),
    ("points", "Points:",
     node_combo("pointsSelector", ["vtkMRMLMarkupsFiducialNode"], none=True, add=True,
                tooltip="Optional point prompts, for models that take points.")),
]
where = [
    ("", "", hbox("whereLayout",
                  widget("QRadioButton", "localRadioButton", prop("text", "string", "This computer"),
                         prop("checked", "bool", "true")),
                  widget("QRadioButton", "remoteRadioButton", prop("text", "string", "Remote server")))),
    ("device", "Device:",
     widget("QComboBox", "deviceComboBox", prop("toolTip", "string", "auto: GPU if available, else CPU."),
            dyn("device"))),
    ("serverUrl", "Server URL:",
     widget("QLineEdit", "serverUrlLineEdit", prop("placeholderText", "string", "https://gpu-server.example.org:8000"),
            dyn("serverUrl"))),
    ("apiKey", "API key:",
     widget("QLineEdit", "apiKeyLineEdit", PW,
            prop("toolTip", "string", "Stored in Slicer's settings, never in scene files."))),
    ("", "", hbox("serverButtonsLayout",
                  widget("QPushButton", "testConnectionButton", prop("text", "string", "Test connection")),
                  widget("QPushButton", "stopServerButton", prop("text", "string", "Stop local server"),
                         prop("toolTip", "string", "Frees the memory (and GPU memory) the local engine holds.")))),
]
outputs = [
    ("outputSegmentation", "Output segmentation:",
     node_combo("outputSegmentationSelector", ["vtkMRMLSegmentationNode"], none=True, add=True,
                param="outputSegmentation", none_text="Create new segmentation")),
    ("", "", hbox("applyLayout",
                  widget("QPushButton", "applyButton", prop("text", "string", "Apply"),
                         prop("toolTip", "string",
                              "Segment the targets (Ctrl+Enter). Turns into Cancel while running.")),
                  widget("QPushButton", "segmentEverythingButton", prop("text", "string", "Segment everything"),
                         prop("toolTip", "string", "For models that recognise all structures they know.")))),
    ("", "", hbox("progressLayout", widget("QProgressBar", "progressBar", prop("value", "number", "0")),
                  widget("QLabel", "elapsedLabel", prop("text", "string", "")))),
    ("", "", widget("QPlainTextEdit", "logEdit", prop("readOnly", "bool", "true"), maxh(100))),
    ("", "", hbox("resultsLayout",
                  widget("QPushButton", "segmentEditorButton", prop("text", "string", "Open in Segment Editor")),
                  widget("QPushButton", "statisticsButton", prop("text", "string", "Statistics")),
                  widget("QPushButton", "exportCsvButton", prop("text", "string", "Export CSV...")))),
]
review = [
    ("", "", widget("QCheckBox", "keepModelOutputCheckBox",
                    prop("text", "string", "Keep model output for review"), prop("checked", "bool", "true"),
                    prop("toolTip", "string", "Keeps each AI segment's probability map (1 byte per voxel) with the "
                                              "scene, to re-threshold, show confidence and compare with edits."))),
    ("reviewSegment", "AI segment:", widget("QComboBox", "reviewSegmentComboBox")),
    ("reviewConfidence", "Confidence:", widget("QLabel", "reviewConfidenceText", prop("wordWrap", "bool", "true"))),
    ("reviewThreshold", "Threshold:",
     hbox("reviewThresholdLayout",
          widget("QSlider", "reviewThresholdSlider", prop("orientation", "enum", "Qt::Horizontal"),
                 prop("minimum", "number", "0"), prop("maximum", "number", "100"), prop("value", "number", "50"),
                 prop("toolTip", "string", "Re-thresholds the segment from the kept map (no new run).")),
          widget("QLabel", "reviewThresholdValue", prop("text", "string", "0.50")))),
    ("", "", hbox("reviewButtonsLayout",
                  widget("QPushButton", "uncertainButton", prop("text", "string", "Show uncertain voxels"),
                         prop("toolTip", "string", "A segment of the voxels within 0.1 of the threshold.")),
                  widget("QPushButton", "compareButton", prop("text", "string", "Compare with AI output"),
                         prop("toolTip", "string", "Dice, HD95, ASD, volume added/removed, slices touched.")))),
    ("trainingDataset", "Training dataset:",
     hbox("trainingDatasetLayout",
          widget("QSpinBox", "trainingDatasetIdSpinBox", prop("minimum", "number", "1"),
                 prop("maximum", "number", "999"), prop("value", "number", "501"),
                 prop("toolTip", "string", "nnU-Net dataset id: the folder is DatasetNNN_Name.")),
          widget("QLineEdit", "trainingDatasetNameLineEdit", prop("placeholderText", "string", "Corrected")))),
    ("", "", widget("QPushButton", "exportTrainingButton", prop("text", "string", "Export for training..."),
                    prop("toolTip", "string", "The volume and its corrected segments as an nnU-Net v2 case "
                                              "(+ MONAI datalist); resumable, never overwrites."))),
]
setup = [
    ("", "", widget("QCheckBox", "clientOnlyCheckBox",
                    prop("text", "string", "Client only (remote server; no torch needed)"))),
    ("dependencyStatus", "Python packages:",
     widget("QLabel", "dependencyStatusText", prop("wordWrap", "bool", "true"))),
    ("", "", widget("QPushButton", "installButton", prop("text", "string", "Install missing packages..."),
                    prop("toolTip", "string",
                         "Asks first. torch comes from the PyTorch extension; packages Slicer bundles are never "
                         "replaced."))),
    ("hfToken", "HuggingFace token:",
     widget("QLineEdit", "hfTokenLineEdit", PW,
            prop("toolTip", "string", "For gated weights (accept the licence on huggingface.co first)."))),
    ("", "", hbox("modelButtonsLayout",
                  widget("QPushButton", "downloadButton", prop("text", "string", "Download selected model")),
                  widget("QPushButton", "importButton", prop("text", "string", "Import weight file...")))),
]
body = (collapsible("inputsCollapsibleButton", "Inputs", inputs) + collapsible("promptsCollapsibleButton", "Prompts",
                                                                               prompts)
        + collapsible("whereCollapsibleButton", "Where it runs", where) + collapsible("outputsCollapsibleButton",
                                                                                      "Run and results", outputs)
        + collapsible("reviewCollapsibleButton", "Review", review, collapsed=True)
        + collapsible("setupCollapsibleButton", "Setup", setup, collapsed=True)
        + '<item><spacer name="verticalSpacer"><property '
          'name="orientation"><enum>Qt::Vertical</enum></property></spacer></item>')
conns = "".join(f'<connection><sender>BiomedParseSlicer</sender><signal>mrmlSceneChanged(vtkMRMLScene*)</signal>'
                f'<receiver>{w}</receiver><slot>setMRMLScene(vtkMRMLScene*)</slot></connection>' for w in W)
doc = f'''<ui version="4.0"><class>BiomedParseSlicer</class>
<widget class="qMRMLWidget" name="BiomedParseSlicer">\
<layout class="QVBoxLayout" name="verticalLayout">{body}</layout></widget>
<customwidgets>
<customwidget><class>ctkCollapsibleButton</class><extends>QWidget</extends><header>ctkCollapsibleButton.h</header><container>1</container></customwidget>
<customwidget><class>qMRMLNodeComboBox</class><extends>QWidget</extends><header>qMRMLNodeComboBox.h</header></customwidget>
<customwidget><class>qMRMLWidget</class><extends>QWidget</extends><header>qMRMLWidget.h</header><container>1</container></customwidget>
</customwidgets><resources/><connections>{conns}</connections></ui>
'''
twice = sorted(n for n, c in Counter(re.findall(r'<(?:widget|layout) class="[^"]*" name="([^"]+)"',
                                                doc)).items() if c > 1)
if twice:  # slicer.util.childWidgetVariables maps names to widgets: a duplicate hides one of them
    sys.exit(f"object names used twice: {twice}")

pretty = minidom.parseString(doc).toprettyxml(indent=" ")
pretty = pretty.replace('<?xml version="1.0" ?>', '<?xml version="1.0" encoding="UTF-8"?>')
open(sys.argv[1], "w").write("\n".join(line for line in pretty.splitlines() if line.strip()) + "\n")
