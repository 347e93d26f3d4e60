"""The add-on's operators. Those that talk to the backend have two paths to the same work:

- `invoke` (a click in the UI): the work runs in a worker thread (`tasks.py`); its outcome reaches
  the panel and Blender's report line through a timer, so the UI never waits on the network;
- `execute` (scripts, background mode, tests): the same work runs inline and the operator reports.

Every failure is one line, in the report and in the panel (`session.py`).
"""

from __future__ import annotations

from pathlib import Path

import bpy
from bpy.props import EnumProperty, StringProperty

from . import capture, client, local_backend, tasks
from .client import BackendError, Connection
from .preferences import output_folder, preferences
from .results import import_result
from .session import (
    CANCELLED,
    DONE,
    FAILED,
    READY,
    RUNNING,
    SESSION,
    STARTING,
)
from .tasks import Task


class _BackgroundWork:
    """Mix-in: subclasses set `make_task` (context -> Task; raises BackendError when the work cannot begin)
    and `refused` (message -> None: shows such a failure in the panel), both as static methods.
    (No annotations here: Blender reads a class's annotations as its properties.)"""

    def execute(self, context):
        try:
            task = self.make_task(context)
        except BackendError as error:
            return self._fail(str(error))
        kind, line = task.run_here()
        if kind == "ERROR":
            self.report({"ERROR"}, line)
            return {"CANCELLED"}
        if line:
            self.report({"INFO"}, line)
        return {"FINISHED"}

    def invoke(self, context, event):
        if bpy.app.background:
            return self.execute(context)
        try:
            task = self.make_task(context)
        except BackendError as error:
            return self._fail(str(error))
        task.on_finish = report_later
        tasks.start(task)
        return {"FINISHED"}

    def _fail(self, message: str):
        self.refused(message)
        self.report({"ERROR"}, message)
        tasks.redraw()
        return {"CANCELLED"}


def report_later(kind: str, line: str) -> None:
    """A line in Blender's report from a timer, where no operator is running: through LSRM_OT_report."""
    if not line:
        return
    try:
        bpy.ops.lsrm.report(kind=kind, message=line)
    except RuntimeError:  # an ERROR report also raises here, in the caller; the report itself is made
        pass


class LSRM_OT_report(bpy.types.Operator):
    bl_idname = "lsrm.report"
    bl_label = "Report"
    bl_options = {"INTERNAL"}

    kind: EnumProperty(items=[(name, name, "") for name in ("INFO", "WARNING", "ERROR")])
    message: StringProperty()

    def execute(self, context):
        self.report({self.kind}, self.message)
        return {"FINISHED"}


# ---------------------------------------------------------------------------------------------
# Backend


def check_python_task(context) -> Task:
    root = local_backend.backend_root()
    chosen = configured_python(context)
    SESSION.python_report = "checking..."

    def work(task: Task) -> tuple[Path, dict]:
        if chosen is None:
            return local_backend.find_python(root)
        return chosen, local_backend.check_python(chosen, root)

    def done(found: tuple[Path, dict]) -> str:
        SESSION.python_report = describe_python(*found)
        return SESSION.python_report

    return Task(work, done, python_failed)


def python_failed(message: str) -> None:
    SESSION.python_report = message


def start_task(context) -> Task:
    prefs = preferences(context)
    root = local_backend.backend_root()
    local = local_backend.LocalBackend(
        configured_python(context), root, output_folder(context) / "service", prefs.device
    )
    SESSION.backend, SESSION.backend_message, SESSION.local = STARTING, "starting the backend...", local

    def work(task: Task) -> tuple[Connection, dict]:
        if local.python is None:
            local.python, _ = local_backend.find_python(root)
        connection = local.start()
        return connection, client.health(connection)

    def done(started: tuple[Connection, dict]) -> str:
        SESSION.backend_ready(*started)
        return f"backend ready: {SESSION.backend_message}"

    def failed(message: str) -> None:
        if SESSION.local is local:  # not stopped by the user meanwhile
            local.stop()
            SESSION.backend_failed(message)

    return Task(work, done, failed)


def connect_task(context) -> Task:
    prefs = preferences(context)
    connection = Connection(client.normalised_url(prefs.url), prefs.token.strip())
    check_online(connection.url)
    SESSION.backend, SESSION.backend_message, SESSION.local = STARTING, f"connecting to {connection.url}...", None

    def work(task: Task) -> dict:
        report = client.health(connection)
        client.check_token(connection)
        return report

    def done(report: dict) -> str:
        SESSION.backend_ready(connection, report)
        return f"connected to {connection.url}: {SESSION.backend_message}"

    return Task(work, done, SESSION.backend_failed)


class LSRM_OT_check_python(_BackgroundWork, bpy.types.Operator):
    """Check that the backend's Python runs the backend, and show the device and GPU it sees"""

    bl_idname = "lsrm.check_python"
    bl_label = "Check Python"
    make_task = staticmethod(check_python_task)
    refused = staticmethod(python_failed)


class LSRM_OT_start_backend(_BackgroundWork, bpy.types.Operator):
    """Start the bundled backend with the configured Python (it stops when Blender closes)"""

    bl_idname = "lsrm.start_backend"
    bl_label = "Start"
    make_task = staticmethod(start_task)
    refused = staticmethod(SESSION.backend_failed)

    @classmethod
    def poll(cls, context):
        return SESSION.local is None


class LSRM_OT_stop_backend(bpy.types.Operator):
    """Stop the bundled backend (a running reconstruction is lost)"""

    bl_idname = "lsrm.stop_backend"
    bl_label = "Stop"

    @classmethod
    def poll(cls, context):
        return SESSION.local is not None

    def execute(self, context):
        if SESSION.task is not None:
            SESSION.task.stop.set()
        SESSION.local.stop()
        SESSION.backend_stopped()
        tasks.redraw()
        return {"FINISHED"}


class LSRM_OT_connect(_BackgroundWork, bpy.types.Operator):
    """Connect to the backend service at the URL in the preferences"""

    bl_idname = "lsrm.connect"
    bl_label = "Connect"
    make_task = staticmethod(connect_task)
    refused = staticmethod(SESSION.backend_failed)


def configured_python(context) -> Path | None:
    chosen = preferences(context).python.strip()
    return Path(bpy.path.abspath(chosen)) if chosen else None


def describe_python(python: Path, report: dict) -> str:
    device = report.get("gpu") or report.get("device", "cpu")
    return f"{python}: PyTorch {report.get('torch', '?')}, {device}"


def check_online(url: str) -> None:
    """Blender's rule for extensions: no address beyond this machine unless online access is allowed."""
    if not client.is_loopback(url) and not bpy.app.online_access:
        raise BackendError(
            f"{url} is on another machine and Blender's online access is off; allow it in Preferences > System > "
            "Network, or use a local backend."
        )


# ---------------------------------------------------------------------------------------------
# Input


class LSRM_OT_capture_selected(bpy.types.Operator):
    """Place cameras around the selected object and render its views with Cycles"""

    bl_idname = "lsrm.capture_selected"
    bl_label = "Capture Selected Object"
    bl_options = {"REGISTER", "UNDO"}

    @classmethod
    def poll(cls, context):
        return context.mode == "OBJECT" and SESSION.job != RUNNING

    def execute(self, context):
        settings = context.scene.lsrm
        low, high = sorted((settings.elevation_low, settings.elevation_high))
        name = (context.active_object or context.scene).name
        folder = output_folder(context) / client.safe_name(name) / "views"
        try:
            views = capture.capture_selected(
                context, folder, settings.view_count, (low, high), settings.resolution, settings.samples,
                settings.use_world,
            )  # fmt: skip
        except ValueError as error:
            return views_failed(self, str(error))
        return views_ready(self, views)


class LSRM_OT_use_collection(bpy.types.Operator):
    """Use the cameras of the chosen collection, each with its own photo (alpha is the mask)"""

    bl_idname = "lsrm.use_collection"
    bl_label = "Use Camera Collection"

    @classmethod
    def poll(cls, context):
        return context.scene.lsrm.camera_collection is not None and SESSION.job != RUNNING

    def execute(self, context):
        collection = context.scene.lsrm.camera_collection
        folder = output_folder(context) / client.safe_name(collection.name) / "views"
        try:
            views = capture.collection_views(context.scene, collection, folder)
        except ValueError as error:
            return views_failed(self, str(error))
        return views_ready(self, views)


def views_ready(operator, views: capture.Views):
    SESSION.views, SESSION.views_message = views, ""
    for warning in views.warnings:
        operator.report({"WARNING"}, warning)
    if views.count < 2:
        return views_failed(operator, f"only {views.count} usable view(s) of '{views.source}'; at least 2 are needed.")
    operator.report({"INFO"}, f"{views.count} views of '{views.source}' ready")
    tasks.redraw()
    return {"FINISHED"}


def views_failed(operator, message: str):
    message = message[0].upper() + message[1:] if message else message
    SESSION.views_message = message
    operator.report({"ERROR"}, message)
    tasks.redraw()
    return {"CANCELLED"}


# ---------------------------------------------------------------------------------------------
# Reconstruct


def reconstruct_task(context) -> Task:
    if SESSION.backend != READY:
        raise BackendError("the backend is not ready; start it or connect to one in the LSRM panel first.")
    views = SESSION.views
    if views is None or views.count < 2:
        raise BackendError("there are no views yet; capture the selected object or use a camera collection first.")
    connection = SESSION.connection
    check_online(connection.url)
    fields = context.scene.lsrm.job_fields(preferences(context).default_preset)
    name = f"{views.source}_lsrm"
    result = views.folder.parent / f"{client.safe_name(name)}.glb"
    SESSION.job, SESSION.stage, SESSION.progress, SESSION.job_message = RUNNING, "upload", 0.0, ""
    SESSION.result = None

    def work(task: Task) -> Path | None:
        return client.run_job(connection, views.folder, name, fields, result, task.progress, task.stop.is_set)

    def progress(stage: str, fraction: float, message: str) -> None:
        SESSION.stage, SESSION.progress, SESSION.job_message = stage, fraction, message

    def done(glb: Path | None) -> str:
        SESSION.task = None
        if glb is None:
            SESSION.job, SESSION.job_message = CANCELLED, "cancelled"
            return "reconstruction cancelled"
        imported = import_result(glb, name)  # a BackendError here goes to job_failed
        SESSION.job, SESSION.progress, SESSION.result = DONE, 1.0, glb
        SESSION.job_message = f"imported '{imported[0].name}' into '{imported[0].users_collection[0].name}'"
        return SESSION.job_message

    SESSION.task = Task(work, done, job_failed, progress)
    return SESSION.task


def job_failed(message: str) -> None:
    SESSION.task = None
    SESSION.job, SESSION.job_message = FAILED, message


class LSRM_OT_reconstruct(_BackgroundWork, bpy.types.Operator):
    """Send the views to the backend, and import the relightable result over its source"""

    bl_idname = "lsrm.reconstruct"
    bl_label = "Reconstruct"
    make_task = staticmethod(reconstruct_task)
    refused = staticmethod(job_failed)

    @classmethod
    def poll(cls, context):
        return SESSION.job != RUNNING


class LSRM_OT_cancel(bpy.types.Operator):
    """Cancel the running reconstruction"""

    bl_idname = "lsrm.cancel"
    bl_label = "Cancel"

    @classmethod
    def poll(cls, context):
        return SESSION.task is not None

    def execute(self, context):
        SESSION.task.stop.set()
        SESSION.job_message = "cancelling..."
        tasks.redraw()
        return {"FINISHED"}


CLASSES = (
    LSRM_OT_report,
    LSRM_OT_check_python,
    LSRM_OT_start_backend,
    LSRM_OT_stop_backend,
    LSRM_OT_connect,
    LSRM_OT_capture_selected,
    LSRM_OT_use_collection,
    LSRM_OT_reconstruct,
    LSRM_OT_cancel,
)
