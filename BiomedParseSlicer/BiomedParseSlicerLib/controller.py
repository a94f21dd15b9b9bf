"""The panel's run policy without Qt: what a click does, where inference runs, the task's state, what the
user is told and which controls are enabled. The Widget (BiomedParseSlicer.py) only reads its widgets into
``Inputs``, calls the controller, and shows the ``View`` it returns; questions to the user go through the
functions it passes in (Qt dialogs inside Slicer, plain functions in tests).

Task states: ``idle`` -> ``running`` (Apply, Segment everything, a download, an import or a connection test in
a worker thread) -> ``cancelling`` (Cancel pressed) -> ``applying`` (results go into the scene on the GUI
thread) -> ``idle``. Every error, also one while applying results, ends in ``idle`` with one message for the
user; nothing escapes to Qt.

Slicer's GUI thread holds Python's GIL even while its event loop is idle (PythonQt's thread support is off
and CTK/Slicer never release it), so a Python worker thread runs only while the GUI thread runs Python.
``poll`` therefore gives the GIL away for a short slice on every tick of the panel's timer (docs: the
benchmark in benchmarks/bench_panel_poll.py).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from textseg.errors import Cancelled, TextsegError, UsageError

from . import environment, runner

IDLE, RUNNING, CANCELLING, APPLYING = "idle", "running", "cancelling", "applying"

# The panel's timer interval, and how long each poll lets the worker thread have the GIL: with the GIL held between
# polls, 50 ms / 10 ms runs as fast as a GIL-free main thread, 100 ms / none took 4x as long
# (benchmarks/bench_panel_poll.py, dev-notes/slicer-module-audit.md). The GUI thread is busy at most the slice.
POLL_INTERVAL_MS = 50
GIL_SLICE_S = 0.01

APPLY_TEXT = {IDLE: "Apply", RUNNING: "Cancel", CANCELLING: "Cancelling...", APPLYING: "Adding segments..."}


@dataclass
class Inputs:
    """What the panel's widgets hold (and a few settings), read by the Widget before each call."""

    volume: Any = None  # vtkMRMLScalarVolumeNode / vtkMRMLVectorVolumeNode
    segmentation: Any = None  # output vtkMRMLSegmentationNode, None: a new one
    roi: Any = None
    points: Any = None
    model: str = ""
    modality: str = ""
    site: str = ""
    prompts: str = ""
    history: str = ""  # newline-separated, most recent first
    remote: bool = False
    device: str = "auto"
    server_url: str = ""
    api_key: str = ""
    client_only: bool = False
    hf_token: str = ""
    statistics_table: Any = None
    keep_model_output: bool = True  # keep each AI segment's probability map for review (Logic.keepModelOutput)
    review_segment: str = ""  # segment ID chosen in Review
    review_threshold: float = 0.5  # the Review slider
    dataset_id: int = 501  # Export for training: nnU-Net dataset id and name
    dataset_name: str = ""


@dataclass
class View:
    """What the panel shows. ``log`` holds the lines new since the last view; the fields after it are
    one-time requests (None / empty: leave the panel as it is)."""

    state: str = IDLE
    apply_text: str = "Apply"
    apply_enabled: bool = False
    segment_everything_enabled: bool = False
    roi_enabled: bool = False
    points_enabled: bool = False
    site_enabled: bool = True
    local_enabled: bool = True
    device_enabled: bool = True
    remote_enabled: bool = False
    test_connection_enabled: bool = False
    stop_server_enabled: bool = False
    download_enabled: bool = False
    import_enabled: bool = False
    install_enabled: bool = True
    polling: bool = False
    poll_interval_ms: int = POLL_INTERVAL_MS
    progress: int = 0
    progress_text: str = ""
    elapsed_text: str = ""
    packages_text: str = ""
    model_info: str = ""
    log: tuple[str, ...] = ()
    clear_log: bool = False
    remote_checked: Optional[bool] = None  # client-only mode: select "Remote server"
    error: Optional[str] = None  # for an error dialog
    history: Optional[str] = None  # the new prompt history, for the parameter node
    modality: Optional[str] = None  # guessed: select it
    site: Optional[str] = None
    output_segmentation: Any = None  # select it as the output
    background_volume: Any = None  # show it in the slice views
    table: Any = None  # show it in the layout
    # keep it as the statistics table (the parameter node's statisticsTable, which the next Statistics refills): only
    # Statistics' own table, never another one shown (a comparison would be overwritten by the next Statistics)
    statistics_table: Any = None
    models_changed: bool = False  # refill the model list (a model became ready)
    review_enabled: bool = False  # threshold slider, uncertain voxels, compare
    export_training_enabled: bool = False
    review_rows: Optional[list[tuple[str, str]]] = None  # refill Review's segment list: (segment ID, label)
    review_segment: Optional[str] = None  # select this segment in Review
    review_confidence: Optional[str] = None  # Review's confidence line
    review_threshold: Optional[float] = None  # move the slider here (without re-thresholding)


@dataclass
class _Task:
    task: runner.BackgroundTask
    kind: str  # segment | recognize | connection | download
    context: dict[str, Any] = field(default_factory=dict)


def _import_client() -> None:
    """Import the HTTP client on the GUI thread before a worker needs it: importing is pure Python, which the
    worker thread could only do during polls (hundreds of milliseconds become seconds), and it is quick here."""
    import requests  # noqa: F401

    import textseg.remote.client  # noqa: F401


def _error_text(exc: BaseException) -> str:
    """One line for the user: the engine's own message, else the exception's type and text."""
    if isinstance(exc, TextsegError):
        return str(exc)
    return f"Unexpected error ({type(exc).__name__}: {exc}). Details are in Slicer's Python console / log."


class PanelController:
    """The panel's policy, driven by plain calls.

    ``logic``: BiomedParseSlicerLogic. ``confirm(text) -> bool`` asks Yes/No (OK/Cancel);
    ``ask(text) -> True | False | None`` asks Yes/No/Cancel; ``choose(title, label, items) -> item | None``
    offers a list (None: cancelled). ``server_factory(device=...)`` makes the local server (runner.LocalServer).
    ``replace_edits(text) -> bool`` asks whether a re-threshold may replace a segment's hand edits.
    """

    def __init__(self, logic, confirm: Callable[[str], bool] = lambda text: False,
                 ask: Callable[[str], Optional[bool]] = lambda text: None,
                 choose: Callable[[str, str, Sequence[str]], Optional[str]] = lambda title, label, items: None,
                 server_factory: Callable[..., runner.LocalServer] = runner.LocalServer,
                 replace_edits: Callable[[str], bool] = lambda text: False) -> None:
        self.logic = logic
        self.confirm, self.ask, self.choose = confirm, ask, choose
        self.replace_edits = replace_edits  # "Replace my edits" (True) or "Keep my edits" (False)
        self.server_factory = server_factory
        self.server: Optional[runner.LocalServer] = None
        self._task: Optional[_Task] = None
        self._state = IDLE
        self._log: list[str] = []
        self._clear_log = False
        self._progress = (0.0, "", 0.0)
        self._specs: dict[str, Any] = {}
        self._packages_text = ""
        self._review_moved: Optional[tuple[Any, str]] = None  # (segmentation, segment ID) the slider was moved for

    # ---- models and setup ---------------------------------------------------------------------
    def model_rows(self) -> list[tuple[str, str]]:
        """(model id, label) for the model selector; ready models are marked with a check mark."""
        rows = []
        self._specs = {}
        for row in environment.model_rows():
            spec = row["spec"]
            self._specs[spec.id] = spec
            rows.append((spec.id, f"{'✓ ' if row['ready'] else '(download needed) '}{spec.title}"))
        return rows

    def spec(self, model_id: str):
        if not self._specs:
            self.model_rows()
        return self._specs.get(model_id)

    def completion_words(self, inputs: Inputs) -> list[str]:
        spec = self.spec(inputs.model)
        return self.logic.completionWords(spec.id, self._history(inputs)) if spec else []

    @staticmethod
    def _history(inputs: Inputs) -> list[str]:
        return [h for h in inputs.history.split("\n") if h]

    def refresh_setup(self, inputs: Inputs) -> View:
        """Re-read the installed packages (after an install) for Setup's list."""
        status = environment.status(not inputs.client_only)
        self._packages_text = "\n".join(f"{name}: {version or 'missing'}" for name, version in status.items())
        view = self.view(inputs)
        view.models_changed = True
        return view

    def _missing_packages(self, inputs: Inputs) -> list[str]:
        """Requirements this Slicer does not meet for the run the inputs ask for (client: the engine's own
        packages; local: also the model packages and torch), each missing or older than declared. Slicer bundles
        numpy, scipy, SimpleITK and requests, not the rest."""
        local = not (inputs.remote or inputs.client_only)
        unmet = environment.unmet_requirements(local)
        return unmet + ([environment.TORCH_REQUIREMENT] if environment.torch_needed(local) else [])

    def install(self, inputs: Inputs, pip_install: Callable[[list[str]], None],
                install_torch: Optional[Callable[[], bool]] = None) -> View:
        """Setup > Install missing packages (asks first, through ``confirm``)."""
        if self._state != IDLE:
            return self._refuse(inputs, "Wait for the current run to finish (or cancel it) before installing.")
        try:
            done = environment.install(not inputs.client_only, self.confirm, pip_install, install_torch)
            self._log.append(f"Installed: {', '.join(done)}" if done else "Installed: nothing needed")
        except Exception as exc:  # noqa: BLE001 - pip and the PyTorch extension fail in many ways
            logging.exception("BiomedParse: installation failed")
            view = self.refresh_setup(inputs)
            view.error = f"Installation failed: {exc}"
            return view
        return self.refresh_setup(inputs)

    # ---- what the panel shows ----------------------------------------------------------------
    def view(self, inputs: Inputs) -> View:
        spec = self.spec(inputs.model)
        idle, state = self._state == IDLE, self._state
        kinds = spec.prompt_kinds if spec else ()
        markups = ("box" in kinds and inputs.roi is not None) or ("point" in kinds and inputs.points is not None)
        ready = bool(inputs.volume is not None and spec is not None and (inputs.prompts.strip() or markups))
        remote = inputs.remote or inputs.client_only
        fraction, stage, elapsed = self._progress
        log, self._log = tuple(self._log), []
        for line in log:
            logging.info("BiomedParse: %s", line)
        clear, self._clear_log = self._clear_log, False
        return View(
            state=state,
            apply_text=APPLY_TEXT[state],
            apply_enabled=(idle and ready) or state == RUNNING,
            segment_everything_enabled=idle and inputs.volume is not None and bool(spec and spec.recognition),
            roi_enabled="box" in kinds,
            points_enabled="point" in kinds,
            site_enabled=inputs.modality == "CT",
            local_enabled=not inputs.client_only,
            device_enabled=not remote,
            remote_enabled=remote,
            test_connection_enabled=remote and idle,
            stop_server_enabled=idle and self.server is not None and self.server.running,
            download_enabled=idle and not inputs.client_only and spec is not None,
            import_enabled=idle and not inputs.client_only and spec is not None,
            install_enabled=idle,
            polling=self._task is not None,
            progress=int(round(100 * fraction)),
            progress_text=stage,
            elapsed_text=f"{elapsed:.0f} s" if self._task is not None or elapsed else "",
            packages_text=self._packages_text,
            model_info=f"{spec.description} Licence: {spec.license or '?'}" if spec else "",
            log=log,
            clear_log=clear,
            remote_checked=True if inputs.client_only and not inputs.remote else None,
            review_enabled=idle and inputs.segmentation is not None and bool(inputs.review_segment),
            export_training_enabled=idle and inputs.volume is not None and inputs.segmentation is not None,
        )

    def _refuse(self, inputs: Inputs, message: str) -> View:
        self._log.append(message)
        view = self.view(inputs)
        view.error = message
        return view

    # ---- input changes ------------------------------------------------------------------------
    def volume_selected(self, inputs: Inputs, guess: bool = True) -> View:
        """A new input volume: guess its modality (not when a saved scene is being restored)."""
        view_fields = {}
        if inputs.volume is not None and guess:
            try:
                modality, site, reason = self.logic.guessModality(inputs.volume)
            except TextsegError as exc:
                self._log.append(str(exc))
            except Exception as exc:  # noqa: BLE001 - an odd node must not break the panel
                logging.exception("BiomedParse: modality guess failed")
                self._log.append(f"Could not guess the modality of '{inputs.volume.GetName()}' ({exc}); choose it.")
            else:
                if modality:
                    view_fields = {"modality": modality, "site": site}
                    self._log.append(f"Modality guessed: {modality} ({reason}). Change it if wrong.")
        view = self.view(inputs)
        view.modality, view.site = view_fields.get("modality"), view_fields.get("site")
        return view

    # ---- runs ---------------------------------------------------------------------------------
    def apply(self, inputs: Inputs) -> View:
        """Apply: segment the prompts; while a task runs, the same button cancels it."""
        if self._state == RUNNING:
            return self.cancel(inputs)
        if self._state != IDLE:
            return self.view(inputs)
        try:
            return self._start_segmentation(inputs)
        except TextsegError as exc:
            return self._refuse(inputs, str(exc))

    def cancel(self, inputs: Inputs) -> View:
        if self._task is not None and self._state == RUNNING:
            self._task.task.cancel()
            self._state = CANCELLING
            self._log.append("Cancelling...")
        return self.view(inputs)

    def _check_run(self, inputs: Inputs):
        """The model spec of a run, after the checks every run needs (refused with one clear line)."""
        spec = self.spec(inputs.model)
        if inputs.volume is None:
            raise UsageError("Select an input volume first.")
        if spec is None:
            raise UsageError("Select a model first.")
        missing = self._missing_packages(inputs)
        if missing:
            where = "client-only mode" if inputs.client_only else ("remote inference" if inputs.remote
                                                                   else "local inference")
            raise UsageError(f"{where.capitalize()} needs Python packages that are missing or too old: "
                             f"{', '.join(missing)}. Press Setup > Install missing packages, then try again.")
        return spec

    def _start_segmentation(self, inputs: Inputs) -> View:
        spec = self._check_run(inputs)
        roi = inputs.roi if "box" in spec.prompt_kinds else None
        points = inputs.points if "point" in spec.prompt_kinds else None
        prompts = self.logic.markupPrompts(inputs.prompts.splitlines(), spec.id, roi, points)
        replace = False
        if inputs.segmentation is not None and self.logic.existingSegmentsFor(inputs.segmentation, prompts):
            answer = self.ask("Some prompts were segmented before in this segmentation. Replace those segments? "
                              "(No: add new segments beside them.)")
            if answer is None:
                return self.view(inputs)
            replace = bool(answer)
        volume = self.logic.volumeFromNode(inputs.volume)  # GUI thread: reads MRML
        modality, site = self._modality(inputs)
        make_predictor = self._predictor_factory(inputs, spec)

        def work(progress, cancel):
            predictor = make_predictor(progress, cancel)
            return self.logic.predict(volume, prompts, spec.id, modality, site, predictor, progress, cancel)

        history = self.logic.updatedHistory(inputs.history, [p.text for p in prompts if p.text])
        view = self._start(inputs, work, "segment", {"volume": inputs.volume, "segmentation": inputs.segmentation,
                                                       "replace": replace, "keep": inputs.keep_model_output})
        view.history = history
        return view

    def segment_everything(self, inputs: Inputs) -> View:
        """Segment everything (models with recognition): the targets' replace question comes with the results."""
        if self._state != IDLE:
            return self.view(inputs)
        try:
            spec = self._check_run(inputs)
            if not spec.recognition:
                raise UsageError(f"{spec.title} cannot segment everything; type the targets instead.")
            volume = self.logic.volumeFromNode(inputs.volume)
            modality, site = self._modality(inputs)
            make_predictor = self._predictor_factory(inputs, spec)
        except TextsegError as exc:
            return self._refuse(inputs, str(exc))

        def work(progress, cancel):
            predictor = make_predictor(progress, cancel)
            return self.logic.recognizeVolume(volume, spec.id, modality, site, predictor, progress, cancel)

        return self._start(inputs, work, "recognize", {"volume": inputs.volume, "segmentation": inputs.segmentation,
                                                        "replace": None, "keep": inputs.keep_model_output})

    @staticmethod
    def _modality(inputs: Inputs) -> tuple[str, Optional[str]]:
        if not inputs.modality:
            raise UsageError("Choose the modality first.")
        return inputs.modality, (inputs.site or None) if inputs.modality == "CT" else None

    def _predictor_factory(self, inputs: Inputs, spec) -> Callable:
        """A function (progress, cancel) -> predictor, run in the worker thread: the remote server's client, the
        local server's (started on first use; restarted when the device changes)."""
        _import_client()
        probabilities = "uint8" if inputs.keep_model_output else "none"  # the maps Review keeps, quantized
        if inputs.remote or inputs.client_only:
            url, key = inputs.server_url.strip(), inputs.api_key
            if not url:
                raise UsageError("Enter the inference server's URL (e.g. https://gpu-server:8000) first, or run on "
                                 "this computer.")
            return lambda progress, cancel: runner.make_predictor(spec.id, "remote", url=url, api_key=key,
                                                                  probabilities=probabilities)
        device = inputs.device or "auto"
        if self.server is not None and self.server.device != device:
            self.server.stop()  # restarted below with the new device
            self.server = None
        if self.server is None:
            self.server = self.server_factory(device=device)
        server = self.server

        def start(progress, cancel):
            if not server.running:
                progress(0.0, "starting the local inference server")
            server.start(cancel=cancel)
            return runner.make_predictor(spec.id, server=server, probabilities=probabilities)

        return start

    def test_connection(self, inputs: Inputs) -> View:
        if self._state != IDLE:
            return self.view(inputs)
        url, key = inputs.server_url.strip(), inputs.api_key
        _import_client()
        return self._start(inputs, lambda progress, cancel: runner.check_server(url, key), "connection")

    def download(self, inputs: Inputs) -> View:
        spec = self.spec(inputs.model)
        if self._state != IDLE or spec is None:
            return self.view(inputs)
        if spec.license.startswith("CC-BY-NC") and not self.confirm(
                f"{spec.title} weights are licensed {spec.license} (non-commercial research use). Continue?"):
            return self.view(inputs)
        token = inputs.hf_token or None
        return self._start(inputs, lambda progress,
                           cancel: environment.download_model(spec.id, progress, cancel, token),
                           "download")

    def import_file(self, inputs: Inputs, path: str) -> View:
        """Import a weight file the user picked; asks which file of the model it is when its name does not say."""
        spec = self.spec(inputs.model)
        if self._state != IDLE or spec is None or not path:
            return self.view(inputs)
        try:
            name, names = None, environment.import_candidates(spec.id, path)
        except TextsegError as exc:
            return self._refuse(inputs, str(exc))
        if names:  # a multi-file model and a renamed file
            name = self.choose("Import weight file", f"Which file of {spec.title} is this?", names)
            if name is None:
                self._log.append("Import cancelled: nothing was imported.")
                return self.view(inputs)
        # copying and checking a multi-GB file takes a while: in the background, with progress
        return self._start(inputs, lambda progress,
                           cancel: environment.import_model_file(spec.id, path, name, progress, cancel),
                           "download")

    def _start(self, inputs: Inputs, work, kind: str, context: Optional[dict[str, Any]] = None) -> View:
        self._task = _Task(runner.BackgroundTask(work).start(), kind, context or {})
        self._state = RUNNING
        self._progress = (0.0, "starting", 0.0)
        self._clear_log = True
        return self.view(inputs)

    # ---- the timer ----------------------------------------------------------------------------
    def poll(self, inputs: Inputs) -> View:
        """The panel timer's tick: let the worker run, show its progress, and apply its results when it is done.
        Never raises: an error while applying results ends the task with an error message."""
        current = self._task
        if current is None or self._state == APPLYING:  # re-entered from a dialog shown while applying
            return self.view(inputs)
        # Slicer's GUI thread keeps the GIL between timer ticks; waiting here (Event.wait releases the GIL, and
        # returns at once when the task ends) is when the worker thread gets to run.
        current.task.wait(GIL_SLICE_S)
        snap = current.task.poll()
        self._log.extend(snap.log)
        self._progress = (snap.fraction, snap.stage, snap.elapsed)
        if not snap.done:
            return self.view(inputs)
        self._state = APPLYING
        fields: dict[str, Any] = {}
        try:
            fields = self._finish(current, inputs)
        except Exception as exc:  # noqa: BLE001 - results that cannot be applied: say so, back to idle
            logging.exception("BiomedParse: applying the results failed")
            fields = {"error": _error_text(exc)}
            self._log.append(fields["error"])
        finally:
            self._task = None
            self._state = IDLE
        view = self.view(inputs)
        for key, value in fields.items():
            setattr(view, key, value)
        return view

    def _finish(self, current: _Task, inputs: Inputs) -> dict[str, Any]:
        task = current.task
        if isinstance(task.error, Cancelled):
            self._log.append(str(task.error) if "nothing added" in str(task.error) else "Cancelled.")
            return {}
        if task.error is not None:
            if not isinstance(task.error, TextsegError):
                logging.error("BiomedParse: the run failed", exc_info=task.error)
            message = _error_text(task.error)
            self._log.append(message)
            return {"error": message}
        if current.kind in ("segment", "recognize"):
            return self._add_results(current.context, task.result)
        if current.kind == "connection":
            self._log.append(str(task.result))
            return {}
        if current.kind == "export":
            return self._export_done(task.result)
        self._log.append("Model ready.")  # download / import
        return {"models_changed": True}

    def _add_results(self, context: dict[str, Any], results) -> dict[str, Any]:
        volume, segmentation = context["volume"], context["segmentation"]
        if volume.GetScene() is None:
            self._log.append("The input volume was removed from the scene meanwhile: results discarded.")
            return {}
        for r in results:
            if r.message:
                self._log.append(r.message)
        if segmentation is not None and segmentation.GetScene() is None:
            self._log.append("The output segmentation was removed meanwhile: the results go to a new segmentation.")
            segmentation = None
        replace = context["replace"]
        if replace is None:  # "Segment everything": the targets are known only now
            earlier = segmentation is not None and self.logic.existingSegmentsFor(segmentation,
                                                                                  [r.prompt for r in results])
            replace = bool(earlier) and self.confirm(
                "Some of the targets found were segmented before in this segmentation. Replace those segments? "
                "(No: add new segments beside them.)")
        seg = self.logic.addResults(volume, results, segmentation, replace, context.get("keep", True))
        seg.CreateClosedSurfaceRepresentation()
        self._log.extend(self.logic.lastMessages)
        self._log.append(f"Done: {len(results)} segment(s).")
        ids = self.logic.lastSegmentIDs
        return {"output_segmentation": seg, "background_volume": volume,
                **self._review_fields(seg, ids[0] if ids else "")}

    # ---- results ------------------------------------------------------------------------------
    def statistics(self, inputs: Inputs, csv_path: Optional[str] = None) -> View:
        """Statistics of every segment into the table (and a CSV file the save dialog already agreed to replace)."""
        if inputs.segmentation is None or inputs.volume is None:
            return self._refuse(inputs, "Select the input volume and the output segmentation first.")
        try:
            table = self.logic.statistics(inputs.segmentation, inputs.volume, inputs.statistics_table, csv_path,
                                          overwrite=csv_path is not None)
        except Exception as exc:  # noqa: BLE001 - one message, never a traceback in the user's face
            if not isinstance(exc, TextsegError):
                logging.exception("BiomedParse: statistics failed")
            return self._refuse(inputs, f"Statistics failed: {_error_text(exc)}")
        table.SetUseColumnTitleAsColumnHeader(True)  # as Segment Statistics shows its table
        if csv_path:
            self._log.append(f"Statistics written to {csv_path}")
        view = self.view(inputs)
        view.table = view.statistics_table = table
        return view

    # ---- Review: the kept model output --------------------------------------------------------
    def _review_fields(self, segmentation, select: str = "") -> dict[str, Any]:
        """Review's segment list, the selected segment, its confidence line and current threshold."""
        ids = self.logic.reviewSegmentIds(segmentation)
        seg = segmentation.GetSegmentation() if segmentation is not None else None
        rows = [(sid, seg.GetSegment(sid).GetName()) for sid in ids]
        sid = select if select in ids else (ids[0] if ids else "")
        if not sid:
            text = ("No AI segment with kept model output in this segmentation." if segmentation is not None
                    else "Select the output segmentation.")
            return {"review_rows": rows, "review_segment": "", "review_confidence": text}
        return {"review_rows": rows, "review_segment": sid, **self._confidence_fields(segmentation, sid)}

    def _confidence_fields(self, segmentation, sid: str) -> dict[str, Any]:
        conf = self.logic.segmentConfidence(segmentation, sid)
        edited = self.logic.editedSinceModel(segmentation, sid)
        return {"review_confidence": confidence_text(conf, edited), "review_threshold": conf["threshold"]}

    def _review(self, inputs: Inputs, action: Callable[[], dict[str, Any]], quiet: bool = False) -> View:
        """Run a Review action on the GUI thread: refused while a task runs (``quiet``: without a message, for
        refreshes that follow a selection); errors become one message."""
        if self._state != IDLE:
            return self.view(inputs) if quiet else self._refuse(
                inputs, "Wait for the current run to finish (or cancel it) first.")
        try:
            fields = action()
        except Exception as exc:  # noqa: BLE001 - one message, never a traceback in the user's face
            if not isinstance(exc, TextsegError):
                logging.exception("BiomedParse: review failed")
            return self._refuse(inputs, _error_text(exc))
        view = self.view(inputs)
        for key, value in fields.items():
            setattr(view, key, value)
        return view

    def review_refresh(self, inputs: Inputs) -> View:
        """The output segmentation or Review's segment changed: its list, confidence and threshold. A slider move
        not yet applied was made for the segment shown before: it is dropped (the slider now shows this one's)."""
        self._review_moved = None
        return self._review(inputs, lambda: self._review_fields(inputs.segmentation, inputs.review_segment),
                            quiet=True)

    def review_threshold_moved(self, inputs: Inputs) -> None:
        """The threshold slider moved (the Widget calls ``review_threshold_changed`` once it rests): remember the
        segment it was moved for."""
        seg, sid = inputs.segmentation, inputs.review_segment
        self._review_moved = (seg, sid) if seg is not None and sid else None

    def review_threshold_changed(self, inputs: Inputs) -> View:
        """The threshold slider rested (the Widget debounces it): re-threshold the segment it was moved for from
        its kept map, once; nothing when another segment was chosen meanwhile. A segment edited by hand is
        re-thresholded only when the user chooses 'Replace my edits'."""
        moved, self._review_moved = self._review_moved, None

        def action():
            seg, sid, t = inputs.segmentation, inputs.review_segment, inputs.review_threshold
            if seg is None or not sid or moved is None or moved[0] is not seg or moved[1] != sid:
                return {}
            segment = seg.GetSegmentation().GetSegment(sid)
            if segment is None:  # deleted (Segment Editor) while Review still listed it
                self._log.append("The segment chosen in Review no longer exists: nothing re-thresholded.")
                return self._review_fields(seg)
            name = segment.GetName()
            if self.logic.editedSinceModel(seg, sid):
                if not self.replace_edits(f"Segment '{name}' was edited by hand since the model made it. "
                                          f"Re-thresholding it at {t:g} replaces those edits with the model's mask."):
                    self._log.append(f"Kept your edits of '{name}': not re-thresholded.")
                    return self._confidence_fields(seg, sid)  # the slider goes back to the segment's threshold
            # checked just above on this (the GUI) thread, nothing edits in between: the Logic need not check again
            # (the check reads the whole mask: ~0.3 s for a 512x512x200 CT)
            conf = self.logic.rethreshold(seg, sid, t, replace=True)
            self._log.append(f"'{name}' re-thresholded at {t:g}: {conf['voxel_count']} voxels.")
            return {"review_confidence": confidence_text(conf, False)}

        return self._review(inputs, action)

    def review_uncertain(self, inputs: Inputs) -> View:
        """'Show uncertain voxels': a review segment with the voxels near the threshold."""

        def action():
            self.logic.addUncertainSegment(inputs.segmentation, inputs.review_segment)
            self._log.append("Added the uncertain voxels (probability within 0.1 of the threshold) as a segment.")
            return {}

        return self._review(inputs, action)

    def compare_with_ai(self, inputs: Inputs) -> View:
        """'Compare with AI output': the table of Dice, distances and volume changes per AI segment."""

        def action():
            table = self.logic.compareWithModelOutput(inputs.segmentation)
            table.SetUseColumnTitleAsColumnHeader(True)
            return {"table": table}

        return self._review(inputs, action)

    def export_training(self, inputs: Inputs, out_dir: str) -> View:
        """'Export for training' into ``out_dir`` (chosen in a dialog): the case is read from the scene here, the
        files are written in the background with progress and cancel."""
        if self._state != IDLE or not out_dir:
            return self.view(inputs)
        try:
            case = self.logic.trainingCase(inputs.volume, inputs.segmentation)
            name = inputs.dataset_name.strip() or "Corrected"
            channel = self.logic.trainingChannelName(case) if not inputs.modality else inputs.modality
        except TextsegError as exc:
            return self._refuse(inputs, str(exc))

        def work(progress, cancel):
            return self.logic.exportTrainingCase(case, out_dir, inputs.dataset_id, name, channelName=channel,
                                                 progress=progress, cancel=cancel)

        return self._start(inputs, work, "export")

    def _export_done(self, result) -> dict[str, Any]:
        if result.cancelled:
            self._log.append(f"Export cancelled: the complete cases stay in {result.dataset_dir}.")
        else:
            done = "written" if result.written else "already there, verified"
            self._log.append(f"Exported for training ({done}): {result.dataset_dir}")
        return {}

    # ---- the local server and the panel's life --------------------------------------------------
    def stop_server(self, inputs: Inputs) -> View:
        """Stop local server: refused while a task may be starting or using it."""
        if self._state != IDLE:
            return self._refuse(inputs, "Cancel the current run (or wait for it to finish) before stopping the server.")
        if self.server is not None:
            self.server.stop()
            self._log.append("Local inference server stopped: its memory (and GPU memory) is free.")
        return self.view(inputs)

    def scene_closing(self, inputs: Inputs) -> View:
        """The scene closes: a running task's results would have nowhere to go."""
        if self._task is not None and self._state == RUNNING:
            self._task.task.cancel()
            self._state = CANCELLING
        return self.view(inputs)

    def shutdown(self) -> View:
        """The panel goes away (module cleanup, Slicer quits): cancel the task, stop the server, stop polling."""
        current, self._task = self._task, None
        if current is not None:
            current.task.cancel()
        if self.server is not None:
            self.server.stop()  # also ends a request the worker thread is waiting on
        self._state = IDLE
        return self.view(Inputs())


def confidence_text(conf: dict[str, Any], edited: bool) -> str:
    """Review's confidence line for a ``textseg.analysis.confidence.confidence`` dict."""
    if not conf.get("voxel_count"):
        return f"Empty at threshold {conf['threshold']:g}."
    existence = conf.get("existence")
    parts = [f"existence {existence:.2f}" if existence is not None else "no existence score",
             f"mean probability {conf['mean']:.2f}",
             f"{conf['near_threshold']:.0%} of {conf['voxel_count']} voxels within {conf['band']:g} of the "
             f"threshold {conf['threshold']:g}"]
    return ", ".join(parts) + (" (edited by hand)" if edited else "") + "."
