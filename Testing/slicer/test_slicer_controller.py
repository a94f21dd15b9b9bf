"""The panel's run policy (BiomedParseSlicerLib.controller) headless, as the panel drives it inside Slicer: real
slicer-core scenes, the real local server process (`textseg serve`), a real worker thread, and a main thread that
keeps the GIL between timer ticks the way Slicer's event loop does (PythonQt's thread support is off)."""

from __future__ import annotations

import ctypes
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT

slicer_core = pytest.importorskip("slicer_core",
                                  reason="needs the real Slicer core: pip install slicer-core (test extra)")
from BiomedParseSlicerLib import checks, controller, environment, headless, mrml, runner  # noqa: E402
from BiomedParseSlicerLib.controller import Inputs, PanelController  # noqa: E402
from BiomedParseSlicerLib.logic import BiomedParseSlicerLogic  # noqa: E402

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="the GIL-holding main loop uses libc's usleep")

# A C function that does not release the GIL (ctypes.PyDLL keeps it): between two timer ticks the main thread
# sits in Qt's event loop holding the GIL, exactly as Slicer's GUI thread does.
_LIBC = ctypes.PyDLL(None)
_LIBC.usleep.argtypes = [ctypes.c_uint]


def gui_loop(ctl: PanelController, inputs: Inputs, max_ticks: int = 3000):
    """Slicer's event loop with the panel's QTimer: hold the GIL for one interval, then poll; until idle."""
    views = []
    for _ in range(max_ticks):
        _LIBC.usleep(controller.POLL_INTERVAL_MS * 1000)
        views.append(ctl.poll(inputs))
        if not views[-1].polling:
            return views
    raise AssertionError(f"still running after {max_ticks} timer ticks")


@pytest.fixture(scope="module")
def local_server(tmp_path_factory):
    """The real local inference server (one for the module), showing the test-only synthetic model."""
    pytest.importorskip("fastapi", reason="the engine's server needs the server extra")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TEXTSEG_SHOW_TEST_MODELS", "1")
        server = runner.LocalServer(device="cpu", log_path=tmp_path_factory.mktemp("server") / "server.log")
        server.start(timeout=120)
    yield server
    server.stop()


@pytest.fixture
def app(monkeypatch):
    monkeypatch.setenv("TEXTSEG_SHOW_TEST_MODELS", "1")
    return headless.create()


@pytest.fixture
def ctl(app, local_server):
    questions = []
    c = PanelController(BiomedParseSlicerLogic(scene=app.scene), confirm=lambda text: questions.append(text) or True,
                        ask=lambda text: questions.append(text) or True,
                        server_factory=lambda device: local_server)
    c.questions = questions
    yield c
    if c.view(Inputs()).polling:  # a test that failed mid-run: end its task (the module's server stays)
        c.cancel(Inputs())
        gui_loop(c, Inputs())


def phantom_inputs(app, **kw) -> Inputs:
    node = mrml.volume_node_from_volume(app.scene, checks.phantom(), "phantom")
    values = dict(volume=node, model="synthetic-3d", modality="CT", site="abdomen", prompts="bone left\nbone",
                  device="cpu")
    values.update(kw)
    return Inputs(**values)


def test_apply_runs_through_the_local_server_while_the_gui_thread_keeps_the_gil(app, ctl):
    """Apply -> running (Cancel, no Stop server, no Install) -> the real local server segments in the worker thread
    while the main thread keeps the GIL between ticks -> the segments equal the engine's own masks; idle again."""
    inputs = phantom_inputs(app, history="liver")
    view = ctl.apply(inputs)
    assert view.error is None, view.error
    assert (view.state, view.apply_text, view.apply_enabled, view.polling) == ("running", "Cancel", True, True)
    assert not view.stop_server_enabled and not view.install_enabled and not view.segment_everything_enabled
    assert view.history == "bone left\nbone\nliver" and view.clear_log
    views = gui_loop(ctl, inputs)
    last = views[-1]
    assert last.error is None and (last.state, last.apply_text, last.polling) == ("idle", "Apply", False)
    seg = last.output_segmentation
    assert seg is not None and last.background_volume is inputs.volume
    expected = checks.engine_masks(checks.phantom(), ["bone left", "bone"])
    names = {seg.GetSegmentation().GetSegment(s).GetName(): s for s in mrml.segment_ids(seg)}
    assert sorted(names) == ["bone", "bone left"]
    for name, mask in expected.items():
        assert mask.any()
        np.testing.assert_array_equal(mrml.segment_mask(seg, names[name], inputs.volume), mask)
    log = [line for v in views for line in v.log]
    assert "Done: 2 segment(s)." in log and [v.progress for v in views] == sorted(v.progress for v in views)
    assert last.stop_server_enabled  # idle with a running server
    assert seg.GetSegmentation().ContainsRepresentation("Closed surface")  # shown in 3D


def test_each_poll_gives_the_worker_thread_the_gil(app, ctl, local_server):
    """Slicer's GUI thread never releases the GIL in its event loop, so the worker thread advances only while a
    poll runs. A request to the server needs the GIL many times (connect, send, each read): a poll must hand the
    GIL over for long enough that the whole request completes within it, not one GIL hand-over per 50 ms tick."""
    inputs = Inputs(model="synthetic-3d", remote=True, server_url=local_server.url)
    ticks = []
    for _ in range(8):
        view = ctl.test_connection(inputs)
        assert view.state == "running"
        views = gui_loop(ctl, inputs)
        assert views[-1].error is None and any(line.startswith("Connected to") for line in views[-1].log)
        ticks.append(len(views))
    # A poll that hands the GIL over only at its own Python bytecode needs 1-7 ticks per request (3.5 on average,
    # measured); with the slice nearly every request ends within its first tick.
    assert sum(ticks) <= 12, f"timer ticks per connection test: {ticks}: the worker thread starves between polls"


def test_error_while_applying_results_is_shown_and_the_panel_is_idle_again(app, ctl, monkeypatch):
    """Results that cannot go into the scene (output segmentation under another transform; an unexpected
    failure) end in an error message and idle: Apply reads "Apply" and starts a new run."""
    inputs = phantom_inputs(app, prompts="bone")
    other = app.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    inputs.segmentation = app.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "elsewhere")
    inputs.segmentation.SetAndObserveTransformNodeID(other.GetID())
    assert ctl.apply(inputs).state == "running"
    last = gui_loop(ctl, inputs)[-1]
    assert "different transforms" in (last.error or "") and any("different transforms" in line for line in last.log)
    assert (last.state, last.apply_text, last.apply_enabled, last.polling) == ("idle", "Apply", True, False)

    inputs.segmentation = None
    monkeypatch.setattr(ctl.logic, "addResults", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("vtk said no")))
    assert ctl.apply(inputs).state == "running"  # the button starts a new run, it does not cancel a dead one
    last = gui_loop(ctl, inputs)[-1]
    assert last.error.startswith("Unexpected error (RuntimeError: vtk said no)") and last.state == "idle"
    assert ctl.apply(inputs).state == "running"
    gui_loop(ctl, inputs)


def test_cancel_and_what_is_enabled_meanwhile(app, ctl, local_server):
    """Cancel -> cancelling (button disabled) -> idle; Stop server is refused while a run may be using it."""
    inputs = phantom_inputs(app)
    ctl.apply(inputs)
    refused = ctl.stop_server(inputs)
    assert "Cancel the current run" in refused.error and local_server.running
    view = ctl.apply(inputs)  # the same button cancels
    assert (view.state, view.apply_text, view.apply_enabled) == ("cancelling", "Cancelling...", False)
    assert "Cancelling..." in view.log
    last = gui_loop(ctl, inputs)[-1]
    assert last.state == "idle" and last.apply_text == "Apply" and last.error is None


def test_shutdown_stops_polling_the_task_and_the_server(app, tmp_path, monkeypatch):
    """Module cleanup (or Slicer quitting) during a run: the task is cancelled, the panel's timer stops (the view
    says not polling) and the server process tree is gone."""
    monkeypatch.setenv("TEXTSEG_SHOW_TEST_MODELS", "1")
    made = []

    def factory(device):
        made.append(runner.LocalServer(device=device, log_path=tmp_path / "s.log"))
        return made[-1]

    ctl = PanelController(BiomedParseSlicerLogic(scene=app.scene), server_factory=factory)
    inputs = phantom_inputs(app)
    assert ctl.apply(inputs).polling
    for _ in range(3000):  # until the worker thread has started the server process
        if made[0].process is not None:
            break
        ctl.poll(inputs)
    process = made[0].process
    view = ctl.shutdown()
    assert not view.polling and view.state == "idle" and not made[0].running
    assert process.poll() is not None and ctl.poll(inputs).polling is False


def test_volume_without_voxels_is_one_log_line(app, ctl):
    """Selecting a volume node that has no voxels (no image data, or image data without scalars) gives one line
    in the log and no modality change, not a traceback."""
    from vtkmodules.vtkCommonDataModel import vtkImageData

    empty = app.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    view = ctl.volume_selected(Inputs(volume=empty, model="synthetic-3d"))
    assert view.modality is None and view.error is None
    assert view.log == ("Volume 'empty' has no voxels. Load an image (File > Add Data) and select it.",)
    hollow = app.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "hollow")
    hollow.SetAndObserveImageData(vtkImageData())
    view = ctl.volume_selected(Inputs(volume=hollow, model="synthetic-3d"))
    assert view.modality is None and view.log == ("Volume 'hollow' has no voxels. Load an image (File > Add Data) and "
                                                  "select it.",)
    ct = mrml.volume_node_from_volume(app.scene, checks.phantom(), "ct")
    view = ctl.volume_selected(Inputs(volume=ct, model="synthetic-3d"))
    assert view.modality == "CT" and view.log[0].startswith("Modality guessed: CT")
    assert ctl.volume_selected(Inputs(volume=ct), guess=False).modality is None  # a scene being restored


def test_missing_packages_refused_before_the_run(app, ctl, monkeypatch):
    """Client-only mode in a Slicer where Setup > Install was never pressed: refused with one line naming the
    packages, before anything is sent (applying the results would need them), and nothing is left running."""
    bundled = {"numpy": "2.0.2", "scipy": "1.14.1", "SimpleITK": "2.4.1", "requests": "2.32.3"}  # Slicer 5.10's
    monkeypatch.setattr(environment, "installed_version", bundled.get)
    inputs = phantom_inputs(app, client_only=True, remote=True, server_url="http://127.0.0.1:9")
    view = ctl.apply(inputs)
    assert view.state == "idle" and not view.polling
    assert view.error.startswith("Client-only mode needs Python packages that are missing or too old: slicerio>=")
    assert "pynrrd>=" in view.error and "Setup > Install missing packages" in view.error
    assert "torch" not in view.error and "numpy" not in view.error
    view = ctl.segment_everything(phantom_inputs(app, model="synthetic-3d"))
    assert "Local inference needs" in view.error and "torch>=" in view.error and not view.polling


def test_the_lib_loads_in_a_slicer_without_the_engines_packages(tmp_path):
    """A fresh Slicer has numpy, scipy, SimpleITK, requests, pydicom, pillow, packaging (Slicer v5.10
    SuperBuild/External_python-*.cmake), not the engine's other packages: the module's Lib must still load and
    the panel must say what to install instead of failing."""
    blocked = ["slicerio", "nrrd", "tqdm", "filelock", "huggingface_hub", "nibabel", "torch", "monai", "deepbet",
               "fastapi", "uvicorn", "transformers", "safetensors", "einops", "skimage", "highdicom", "ray", "httpx"]
    code = (
        f"import sys\nfor name in {blocked!r}: sys.modules[name] = None\n"
        f"sys.path[:0] = [{str(ROOT / 'BiomedParseSlicer')!r}]\n"
        "from BiomedParseSlicerLib import controller, environment, headless, logic, mrml, panel, stats, checks\n"
        "environment.installed_version = {'numpy': '2.0.2', 'scipy': '1.14.1', 'SimpleITK': '2.4.1', 'requests': "
        "'2.32.3'}.get\n"
        "app = headless.create()\n"
        "c = controller.PanelController(logic.BiomedParseSlicerLogic(scene=app.scene))\n"
        "node = mrml.volume_node_from_volume(app.scene, checks.phantom())\n"
        "i = controller.Inputs(volume=node, model='deepbet', modality='MRI', prompts='brain', client_only=True, "
        "remote=True, server_url='http://127.0.0.1:9')\n"
        "print(c.volume_selected(i).log[0]); v = c.apply(i); print(v.state, '|', v.error)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in " + repr(blocked) +
        " and sys.modules[m] is not None))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("Modality guessed: CT")
    assert lines[1].startswith("idle | Client-only mode needs Python packages that are missing or too old: slicerio>=")
    assert lines[2] == "[]"


def test_import_which_file_cancel_imports_nothing(app, textseg_home, tmp_path):
    """Setup > Import weight file with a renamed file of a multi-file model: the panel asks which file it is;
    Cancel imports nothing; a choice imports the file (checked against the catalog's SHA-256) in the background."""
    import hashlib

    from textseg import catalog
    from textseg.catalog import ModelSpec, WeightFile

    data = {"a.bin": b"weights A" * 1000, "b.bin": b"weights B" * 700}
    files = tuple(WeightFile(name=n, repo="test-org/two", filename=f"w/{n}", size=len(d),
                             sha256=hashlib.sha256(d).hexdigest()) for n, d in data.items())
    catalog.register(ModelSpec(id="t-panel-import", family="test", title="Two files", version="1", dims=3,
                               modalities=("CT",), adapter="x:y", files=files, hidden=True))
    (tmp_path / "download(1).bin").write_bytes(data["b.bin"])
    answers, asked = [None, "b.bin"], []
    ctl = PanelController(BiomedParseSlicerLogic(scene=app.scene),
                          choose=lambda title, label, items: asked.append((label, list(items))) or answers.pop(0))
    inputs = Inputs(model="t-panel-import")
    view = ctl.import_file(inputs, str(tmp_path / "download(1).bin"))
    assert asked == [("Which file of Two files is this?", ["a.bin", "b.bin"])]
    assert view.state == "idle" and not view.polling and view.log == ("Import cancelled: nothing was imported.",)
    assert not (textseg_home / "models").exists() or not any((textseg_home / "models").rglob("*.bin"))
    view = ctl.import_file(inputs, str(tmp_path / "download(1).bin"))
    assert view.polling
    last = gui_loop(ctl, inputs)[-1]
    assert last.error is None and "Model ready." in last.log and last.models_changed
    assert [p.read_bytes() for p in (textseg_home / "models").rglob("b.bin")] == [data["b.bin"]]


def test_views_follow_the_model_and_where_it_runs(app, ctl):
    """What is enabled for the chosen model and place: box/point selectors by the model's prompt kinds, the
    site only for CT, remote fields for remote/client-only, local choices off in client-only mode."""
    inputs = phantom_inputs(app)
    view = ctl.view(inputs)
    assert view.apply_enabled and view.roi_enabled and view.points_enabled and view.site_enabled
    assert view.device_enabled and not view.remote_enabled and view.local_enabled
    inputs.model, inputs.modality = "deepbet", "MRI"
    view = ctl.view(inputs)
    assert not view.roi_enabled and not view.points_enabled and not view.site_enabled and "MIT" in view.model_info
    inputs.prompts = ""
    assert not ctl.view(inputs).apply_enabled  # nothing to segment
    inputs.client_only = True
    view = ctl.view(inputs)
    assert view.remote_enabled and view.test_connection_enabled and not view.local_enabled and not view.device_enabled
    assert not view.download_enabled and not view.import_enabled
    inputs.volume = None
    assert not ctl.view(inputs).segment_everything_enabled


def test_setup_install_statistics_and_refusals(app, monkeypatch, tmp_path):
    """Setup lists packages (missing ones said so) and installs only after the user agreed; statistics fill the
    table Segment Statistics' way and write the CSV; runs a model cannot do are refused with one line."""
    from textseg.predictor import Predictor

    asked, installed = [], []
    ctl = PanelController(BiomedParseSlicerLogic(scene=app.scene), confirm=lambda text: asked.append(text) or False)
    declared = {environment.requirement_name(r): r.split(">=")[-1] for r in environment.CLIENT_REQUIREMENTS}
    monkeypatch.setattr(environment, "installed_version",
                        lambda name: None if name in ("pynrrd", "slicerio") else declared.get(name))
    view = ctl.refresh_setup(Inputs(client_only=True))
    assert "slicerio: missing" in view.packages_text and "numpy: 1.24" in view.packages_text and view.models_changed
    view = ctl.install(Inputs(client_only=True), installed.extend)
    assert installed == [] and "slicerio" in asked[0] and view.log == ("Installed: nothing needed",)  # declined
    ctl.confirm = lambda text: True
    ctl.install(Inputs(client_only=True), installed.extend)
    assert installed == ["slicerio>=1.1", "pynrrd>=1.0"]
    ctl.confirm = lambda text: asked.append(text) or False
    view = ctl.download(Inputs(model="biomedparse-v1"))
    assert "non-commercial" in asked[-1] and view.state == "idle" and not view.polling  # licence declined: no download
    monkeypatch.undo()

    inputs = phantom_inputs(app)
    assert ctl.statistics(inputs).error == "Select the input volume and the output segmentation first."
    inputs.segmentation = ctl.logic.segment(inputs.volume, ["bone", "soft tissue"], "synthetic-3d", modality="CT",
                                            predictor=Predictor("synthetic-3d", device="cpu"))
    view = ctl.statistics(inputs, csv_path=str(tmp_path / "stats.csv"))
    assert view.error is None and view.table.GetUseColumnTitleAsColumnHeader()
    checks.check_statistics(view.table, inputs.segmentation, inputs.volume)
    assert (tmp_path / "stats.csv").read_text().startswith("Segment,Voxel count,") and \
        view.log[-1].endswith("stats.csv")
    view = ctl.segment_everything(inputs)
    assert view.error.endswith("cannot segment everything; type the targets instead.") and not view.polling
    assert ctl.apply(phantom_inputs(app, remote=True,
                                    server_url="")).error.startswith("Enter the inference server's URL")
    assert ctl.apply(Inputs(model="synthetic-3d", prompts="bone")).error == "Select an input volume first."
