"""The extension inside headless Blender (the bpy module), driven through its operators as a user would.

The add-on is the built zip installed into a local extension repository. Reconstructions go to a
real service (`tests/service_helpers.py`, whose default preset is the seconds-long `micro`); the
add-on starting its own backend is tested too (a few seconds). Every error path is checked for
its one-line report and the same line in the panel's state. The slow end-to-end test is in
test_addon_end_to_end.py.
"""

from __future__ import annotations

import json
import socket
import sys
import time
import venv
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from tests.service_helpers import small_bundle, start_service
from tests.test_blender_import import assert_principled_material

pytestmark = pytest.mark.blender

REPOSITORY = "lsrm_test"
MODULE = f"bl_ext.{REPOSITORY}.lsrm_reconstruct"


# ---------------------------------------------------------------------------------------------
# Fixtures: the installed extension, the enabled add-on, a service


def extension_repository(bpy, directory: Path):
    """The local extension repository in `directory` (made again after factory settings dropped it)."""
    repositories = bpy.context.preferences.extensions.repos
    found = next((repo for repo in repositories if repo.module == REPOSITORY), None)
    if found is None:
        found = repositories.new(name=REPOSITORY, module=REPOSITORY, custom_directory=str(directory), source="USER")
    return found


@pytest.fixture(scope="module")
def extension(tmp_path_factory) -> Path:
    """The built zip installed into a local repository; returns the installed extension's folder."""
    bpy = pytest.importorskip("bpy")
    import build_addon

    archive = build_addon.build(tmp_path_factory.mktemp("dist"))
    directory = tmp_path_factory.mktemp("extensions")
    extension_repository(bpy, directory)
    bpy.ops.extensions.package_install_files(repo=REPOSITORY, filepath=str(archive), enable_on_install=False)
    installed = directory / "lsrm_reconstruct"
    assert (installed / "blender_manifest.toml").is_file() and (installed / "backend" / "__main__.py").is_file()
    return installed


def enable(bpy, extension: Path):
    extension_repository(bpy, extension.parent)
    if MODULE not in bpy.context.preferences.addons:
        bpy.ops.preferences.addon_enable(module=MODULE)
    return sys.modules[MODULE]


@pytest.fixture
def addon(extension, tmp_path):
    """The enabled add-on's package on an empty scene; its backend Python is this one (it has PyTorch)."""
    import bpy

    bpy.ops.wm.read_homefile(use_empty=True)  # not factory settings: those disable extensions
    module = enable(bpy, extension)
    prefs = module.preferences.preferences()
    prefs.backend, prefs.python, prefs.device, prefs.default_preset = "LOCAL", sys.executable, "cpu", "SERVICE"
    prefs.output, prefs.url, prefs.token = str(tmp_path / "out"), "http://127.0.0.1:8765", ""
    yield module
    module.tasks.stop_all()
    module.local_backend.stop_all()
    module.session.reset()


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    service = start_service(tmp_path_factory.mktemp("service"), "--preset", "micro")
    yield service
    service.stop()


def connect(bpy, addon, url: str, token: str) -> None:
    prefs = addon.preferences.preferences()
    prefs.backend, prefs.url, prefs.token = "REMOTE", url, token
    bpy.ops.lsrm.connect()


def use_views(addon, folder: Path, source: str = "barrel") -> None:
    """Views prepared outside the add-on (capture has its own tests): the demo object, cut down."""
    count = len(json.loads((folder / "transforms.json").read_text())["frames"])
    addon.session.SESSION.views = addon.capture.Views(folder, source, count)


def refused(operator, *phrases: str) -> str:
    """Run an operator that must fail; returns its one-line report after checking the phrases in it."""
    with pytest.raises(RuntimeError) as caught:
        operator()
    message = str(caught.value).strip().removeprefix("Error: ")
    assert "\n" not in message and "Traceback" not in message, message
    for phrase in phrases:
        assert phrase in message, message
    return message


def panel(addon) -> tuple[str, list]:
    """What the sidebar shows now (its draw() run against a recording layout): all text, and the widgets."""
    from scripts.panel_states import record_panels

    widgets = [widget for _, layout in record_panels(addon) for widget in layout.widgets()]
    return " ".join(widget.text for widget in widgets), widgets


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def pump_until_done(addon, task, timeout: float = 120.0) -> list[tuple[str, float]]:
    """Play Blender's timer (timers never fire in background mode); returns the (stage, progress) seen."""
    seen, deadline = [], time.monotonic() + timeout
    session = addon.session.SESSION
    while task.running():
        assert time.monotonic() < deadline, "the task did not finish"
        addon.tasks.pump()
        seen.append((session.stage, session.progress))
        time.sleep(0.02)
    assert addon.tasks.pump() is None  # nothing left: the timer would unregister itself
    return seen


# ---------------------------------------------------------------------------------------------
# Install, enable, disable, the local backend


def test_the_extension_starts_its_backend_and_disables_without_leftovers(addon, extension):
    import bpy

    session = addon.session.SESSION
    assert bpy.ops.lsrm.check_python() == {"FINISHED"}
    assert session.python_report.startswith(sys.executable) and "PyTorch" in session.python_report

    assert bpy.ops.lsrm.start_backend() == {"FINISHED"}
    assert session.backend == "READY" and session.health["device"] == "cpu"
    assert session.backend_message == "no GPU (cpu), no model (refinement only)"
    child = psutil.Process(session.local.process.pid)
    assert session.connection.url.startswith("http://127.0.0.1:") and child.is_running()

    # A task in flight, so that a timer is registered when the add-on goes.
    task = addon.tasks.start(addon.tasks.Task(lambda task: task.stop.wait(30), print, print))
    pump, classes = addon.tasks.pump, addon.CLASSES
    assert bpy.app.timers.is_registered(pump) and all(cls.is_registered for cls in classes)
    assert hasattr(bpy.types, "LSRM_PT_backend") and hasattr(bpy.ops.lsrm, "reconstruct")

    bpy.ops.preferences.addon_disable(module=MODULE)
    assert not any(cls.is_registered for cls in classes) and not hasattr(bpy.types, "LSRM_PT_backend")
    assert not hasattr(bpy.types.Scene, "lsrm") and not bpy.app.timers.is_registered(pump)
    assert not task._thread.is_alive() and session.local is None
    assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE

    enabled = enable(bpy, extension)  # and it comes back
    assert hasattr(bpy.types, "LSRM_PT_backend") and enabled.session.SESSION.backend == "STOPPED"


# ---------------------------------------------------------------------------------------------
# Errors: one line in the report, the same line in the panel


def test_backend_start_errors(addon, extension, tmp_path):
    import bpy

    session, prefs = addon.session.SESSION, addon.preferences.preferences()
    prefs.python = str(tmp_path / "nowhere" / "python")
    message = refused(bpy.ops.lsrm.start_backend, "does not exist", "preferences")
    assert session.backend == "ERROR" and session.backend_message == message and message in panel(addon)[0]

    venv.create(tmp_path / "bare", with_pip=False)  # a real Python without PyTorch
    bare = next(path for path in (tmp_path / "bare").rglob("python*") if path.name in ("python", "python.exe"))
    prefs.python = str(bare)
    message = refused(bpy.ops.lsrm.start_backend, "cannot run the backend", "No module named", "PyTorch")
    assert session.backend == "ERROR" and session.backend_message == message and session.local is None
    refused(bpy.ops.lsrm.check_python, "cannot run the backend", "No module named")
    assert "cannot run the backend" in session.python_report

    moved = extension / "backend.moved"
    (extension / "backend").rename(moved)
    try:
        message = refused(bpy.ops.lsrm.start_backend, "bundled backend was not found", "reinstall")
        assert session.backend_message == message
    finally:
        moved.rename(extension / "backend")


def test_connection_errors(addon, service):
    import bpy

    session = addon.session.SESSION
    message = refused(lambda: connect(bpy, addon, f"http://127.0.0.1:{free_port()}", "x"), "cannot reach the backend")
    assert session.backend == "ERROR" and session.backend_message == message
    message = refused(lambda: connect(bpy, addon, service.url, "wrong-token-0123456789"), "refused the token")
    assert session.backend_message == message
    assert not bpy.app.online_access  # the bpy module's default: other machines are off limits
    refused(lambda: connect(bpy, addon, "http://192.0.2.10:8765", service.token), "online access is off")
    refused(lambda: connect(bpy, addon, "ftp://example", ""), "is not a backend URL")

    connect(bpy, addon, service.url + "/v1/", service.token)
    assert session.backend == "READY" and session.connection.url == service.url
    assert session.health["default_preset"] == "micro"


def test_reconstruct_errors(addon, service, tmp_path):
    import bpy

    session = addon.session.SESSION
    message = refused(bpy.ops.lsrm.reconstruct, "backend is not ready")
    assert session.job == "FAILED" and session.job_message == message
    connect(bpy, addon, service.url, service.token)
    refused(bpy.ops.lsrm.reconstruct, "there are no views yet")

    use_views(addon, small_bundle(tmp_path / "barrel"))
    bpy.context.scene.lsrm.engine = "feedforward"
    message = refused(bpy.ops.lsrm.reconstruct, "the backend refused the request", "needs the feed-forward model")
    assert session.job == "FAILED" and session.job_message == message

    bpy.context.scene.lsrm.engine = "PRESET"
    far = small_bundle(tmp_path / "far")
    meta = json.loads((far / "transforms.json").read_text())
    meta["aabb"] = [[100.0, 100.0, 100.0], [101.0, 101.0, 101.0]]  # valid, but no camera looks there
    (far / "transforms.json").write_text(json.dumps(meta))
    use_views(addon, far)
    message = refused(bpy.ops.lsrm.reconstruct, "the reconstruction failed", "cameras look at the region")
    assert session.job == "FAILED" and session.job_message == message and message in panel(addon)[0]
    assert not bpy.data.objects  # nothing imported


def test_a_missing_or_broken_result_is_one_line_and_nothing_is_left_half_imported(addon, service, tmp_path):
    import bpy

    client = addon.client
    connection = client.Connection(service.url, service.token)
    archive = client.zip_bundle(small_bundle(tmp_path / "barrel"), tmp_path / "barrel.zip")
    job = client.submit(connection, archive, {})
    while client.job_status(connection, job)["state"] != "done":
        time.sleep(0.1)
    (service.work_dir / "jobs" / job / "result.glb").unlink()
    with pytest.raises(client.BackendError, match=f"the result of job {job} is missing .*; reconstruct again"):
        client.download_result(connection, job, tmp_path / "result.glb")
    assert not (tmp_path / "result.glb").exists()

    broken = tmp_path / "broken.glb"
    broken.write_bytes(b"glTF" + bytes(64))
    before = {kind: len(getattr(bpy.data, kind)) for kind in ("objects", "meshes", "materials", "images")}
    with pytest.raises(client.BackendError, match=r"'broken\.glb' cannot be imported .*; reconstruct again"):
        addon.results.import_result(broken, "broken")
    assert before == {kind: len(getattr(bpy.data, kind)) for kind in before}


def test_input_errors(addon):
    import bpy

    message = refused(bpy.ops.lsrm.capture_selected, "Select the object to capture")
    assert addon.session.SESSION.views_message == message and message in panel(addon)[0]
    empty = bpy.data.collections.new("Empty")
    bpy.context.scene.collection.children.link(empty)
    bpy.context.scene.lsrm.camera_collection = empty
    refused(bpy.ops.lsrm.use_collection, "holds no cameras")


# ---------------------------------------------------------------------------------------------
# Reconstruct: the synchronous path, the worker-thread path, cancelling


def world_box(obj) -> np.ndarray:
    corners = np.array([obj.matrix_world @ v.co for v in obj.data.vertices])
    return np.stack([corners.min(axis=0), corners.max(axis=0)])


def test_reconstruct_imports_the_result_in_both_paths(addon, service, tmp_path):
    import bpy

    session = addon.session.SESSION
    connect(bpy, addon, service.url, service.token)
    use_views(addon, small_bundle(tmp_path / "barrel"))

    assert bpy.ops.lsrm.reconstruct() == {"FINISHED"}  # execute: inline
    result = bpy.data.objects["barrel_lsrm"]
    assert [c.name for c in result.users_collection] == ["LSRM Results"]
    assert session.job == "DONE" and session.job_message == "imported 'barrel_lsrm' into 'LSRM Results'"
    assert session.result.is_file() and session.task is None
    assert_principled_material(result)
    text, widgets = panel(addon)
    assert "imported 'barrel_lsrm' into 'LSRM Results'" in text
    assert next(w for w in widgets if w.text == "Reconstruct").enabled
    meta = json.loads((session.views.folder / "transforms.json").read_text())
    aabb = np.array(meta["aabb"])  # the demo's region: the result sits over its source
    box = world_box(result)
    assert (np.minimum(box[1], aabb[1]) > np.maximum(box[0], aabb[0])).all()

    task = addon.tasks.start(addon.operators.reconstruct_task(bpy.context))  # invoke: worker thread + timer
    assert bpy.app.timers.is_registered(addon.tasks.pump) and session.job == "RUNNING"
    seen = pump_until_done(addon, task)
    progress = [fraction for _, fraction in seen]
    # Which engine stage a 0.5 s poll catches depends on timing; that some service stage reaches the panel does not.
    stages = {stage for stage, _ in seen}
    assert progress == sorted(progress) and "upload" in stages and stages - {"", "upload", "download"}
    assert task.outcome == ("INFO", "imported 'barrel_lsrm.001' into 'LSRM Results'") and session.job == "DONE"


def test_cancel_stops_the_job_on_the_service_and_imports_nothing(addon, service, tmp_path):
    import bpy

    session = addon.session.SESSION
    connect(bpy, addon, service.url, service.token)
    use_views(addon, small_bundle(tmp_path / "barrel"))
    bpy.context.scene.lsrm.preset = "cpu"  # a minute: long enough to cancel
    task = addon.tasks.start(addon.operators.reconstruct_task(bpy.context))
    while session.stage in ("upload", "starting", "load"):
        addon.tasks.pump()
        time.sleep(0.02)
    _, widgets = panel(addon)  # Reconstruct has become Cancel, over a progress bar with the stage
    buttons = [widget.text for widget in widgets if widget.kind == "button"]
    assert "Cancel" in buttons and "Reconstruct" not in buttons
    assert any(w.kind == "progress" and w.text.startswith(session.stage) for w in widgets)
    assert bpy.ops.lsrm.cancel() == {"FINISHED"}
    pump_until_done(addon, task, timeout=60)
    assert session.job == "CANCELLED" and task.outcome == ("INFO", "reconstruction cancelled")
    assert not bpy.data.objects and not (session.views.folder.parent / "barrel_lsrm.glb").exists()
    with service.client() as http:
        assert http.get("/v1/health").json()["running"] is None


# ---------------------------------------------------------------------------------------------
# Input: capture of a selected object, a collection of photo cameras


def textured_box(bpy, name: str, location, size):
    """A box with a procedural checker texture (colour and roughness vary over it)."""
    bpy.ops.mesh.primitive_cube_add(size=1.0, location=location)
    box = bpy.context.active_object
    box.name, box.scale = name, size
    material = bpy.data.materials.new(name)
    nodes, links = material.node_tree.nodes, material.node_tree.links
    checker = nodes.new("ShaderNodeTexChecker")
    checker.inputs["Scale"].default_value = 6.0
    principled = next(node for node in nodes if node.bl_idname == "ShaderNodeBsdfPrincipled")
    links.new(checker.outputs["Color"], principled.inputs["Base Color"])
    links.new(checker.outputs["Fac"], principled.inputs["Roughness"])
    box.data.materials.append(material)
    return box


def test_capture_places_cameras_whose_bundle_projects_the_box_onto_its_silhouette(addon):
    import bpy

    from backend.bundle import load_bundle
    from backend.cameras import project
    from tests.blender_scene import set_world_environment, studio_world

    scene = bpy.context.scene
    set_world_environment(studio_world("forest"), rotation_z=0.5, strength=1.5)
    bpy.ops.mesh.primitive_uv_sphere_add(radius=0.3, location=(3.0, 0.0, 0.0))
    other = bpy.context.active_object
    box = textured_box(bpy, "Box", (0.3, -0.2, 0.5), (0.8, 0.5, 0.35))
    bpy.ops.object.select_all(action="DESELECT")
    box.select_set(True)
    bpy.context.view_layer.objects.active = box
    settings = scene.lsrm
    settings.view_count, settings.resolution, settings.samples = 6, 64, 4
    engine, size = scene.render.engine, (scene.render.resolution_x, scene.render.resolution_y)

    assert bpy.ops.lsrm.capture_selected() == {"FINISHED"}
    views = addon.session.SESSION.views
    assert views.count == 6 and views.source == "Box" and views.warnings == []
    cameras = [obj for obj in bpy.data.collections["LSRM Capture Box"].objects if obj.type == "CAMERA"]
    assert len(cameras) == 6 and len(list((views.folder / "images").glob("*.png"))) == 6
    assert scene.render.engine == engine and (scene.render.resolution_x, scene.render.resolution_y) == size
    assert not other.hide_render and scene.camera is None  # the user's scene is as it was

    meta = json.loads((views.folder / "transforms.json").read_text())
    assert meta["environment"] == {"file_path": "environment.exr", "rotation_z": 0.5, "strength": 1.5}
    bundle = load_bundle(views.folder)
    assert bundle.environment is not None and bundle.images.shape == (6, 64, 64, 3)
    assert bundle.masks[:, 0].max() < 0.5 and bundle.masks[:, -1].max() < 0.5  # the sphere is not in the views

    corners = torch.tensor(world_box(box), dtype=torch.float32)
    corners = torch.cartesian_prod(*corners.T)  # the 8 corners of the (axis-aligned) box
    uv, depth = project(bundle.cameras, corners)
    assert (depth > 0).all()
    for view in range(6):
        mask = bundle.masks[view] > 0.5
        rows, columns = mask.nonzero(as_tuple=True)
        silhouette = torch.tensor([[columns.min(), rows.min()], [columns.max() + 1, rows.max() + 1]])
        projected = torch.stack([uv[view].min(0).values, uv[view].max(0).values])
        assert (projected - silhouette).abs().max() < 1.0, (view, projected, silhouette)  # within a pixel
        for u, v in uv[view].floor().long().clamp(0, 63).tolist():  # every corner lands on the object
            assert mask[max(v - 1, 0) : v + 2, max(u - 1, 0) : u + 2].any()


def photo(bpy, name: str, size: int, alpha_inside: float, alpha_outside: float):
    """An RGBA image with a disc in the middle: alpha_inside on the disc, alpha_outside around it."""
    image = bpy.data.images.new(name, size, size, alpha=True)
    y, x = np.mgrid[0:size, 0:size] + 0.5
    disc = (x - size / 2) ** 2 + (y - size / 2) ** 2 < (size / 3) ** 2
    pixels = np.ones((size, size, 4), np.float32) * 0.5
    pixels[..., 3] = np.where(disc, alpha_inside, alpha_outside)
    image.pixels.foreach_set(pixels.ravel())
    return image


def test_a_camera_collection_with_photos_becomes_a_bundle_and_unusable_cameras_are_named(addon, tmp_path):
    import bpy

    scene = bpy.context.scene
    collection = bpy.data.collections.new("Photos")
    scene.collection.children.link(collection)
    cameras = addon.capture.sphere_cameras((0.0, 0.0, 0.0), 4.0, 6, name="Photo", collection=collection)
    on_disk = photo(bpy, "disk", 48, 1.0, 0.0)
    on_disk.filepath_raw, on_disk.file_format = str(tmp_path / "disk.png"), "PNG"
    on_disk.save()
    background = cameras[0].data.background_images.new()
    background.image = on_disk  # 0: its background image, a PNG file
    photo(bpy, "Photo.001", 48, 1.0, 0.0)  # 1: an image named after it, in memory only
    photo(bpy, "Photo.002", 48, 1.0, 1.0)  # 2: no transparent pixels
    photo(bpy, "Photo.003", 48, 0.0, 0.0)  # 3: sees nothing
    photo(bpy, "Photo.004", 32, 1.0, 0.0)  # 4: another size
    # 5: no photo at all
    scene.lsrm.camera_collection = collection

    assert bpy.ops.lsrm.use_collection() == {"FINISHED"}
    views = addon.session.SESSION.views
    assert views.count == 2 and views.source == "Photos"
    expected = ["'Photo.002' has no transparent pixels", "'Photo.003' does not see the object"]
    expected += ["'Photo.004' is skipped: its photo is 32x32, the first is 48x48", "'Photo.005' has no photo"]
    assert len(views.warnings) == 4
    for warning, phrase in zip(views.warnings, expected, strict=True):
        assert phrase in warning
    meta = json.loads((views.folder / "transforms.json").read_text())
    for frame, camera in zip(meta["frames"], cameras[:2], strict=True):
        assert frame == {"file_path": frame["file_path"], **addon.capture.camera_frame(camera, scene, size=(48, 48))}
    assert sorted(path.name for path in (views.folder / "images").iterdir()) == ["0000.png", "0001.png"]
    assert (views.folder / "images" / "0000.png").read_bytes() == (tmp_path / "disk.png").read_bytes()


# ---------------------------------------------------------------------------------------------
# End to end: the add-on's own backend, a capture, the cpu preset, import, relight


@pytest.mark.slow
def test_end_to_end_capture_reconstruct_import_and_relight(addon):
    import bpy

    from tests.blender_scene import add_camera_looking_at, set_world_environment, studio_world, use_cycles

    session, scene = addon.session.SESSION, bpy.context.scene
    set_world_environment(studio_world("forest"))
    source = textured_box(bpy, "Crate", (0.4, -0.3, 0.6), (0.6, 0.45, 0.4))
    scene.lsrm.view_count, scene.lsrm.resolution, scene.lsrm.samples = 10, 64, 16
    scene.lsrm.preset = "cpu"
    clock = time.perf_counter()
    assert bpy.ops.lsrm.capture_selected() == {"FINISHED"} and session.views.count == 10
    captured = time.perf_counter()
    assert bpy.ops.lsrm.start_backend() == {"FINISHED"} and session.backend == "READY"
    assert bpy.ops.lsrm.reconstruct() == {"FINISHED"}, session.job_message
    print(f"capture {captured - clock:.1f} s, backend start and reconstruction {time.perf_counter() - captured:.1f} s")

    result = bpy.data.objects["Crate_lsrm"]
    assert session.job == "DONE" and result.users_collection[0].name == "LSRM Results"
    assert_principled_material(result)
    mine, theirs = world_box(result), world_box(source)
    overlap = np.prod(np.clip(np.minimum(mine[1], theirs[1]) - np.maximum(mine[0], theirs[0]), 0.0, None))
    union = np.prod(mine[1] - mine[0]) + np.prod(theirs[1] - theirs[0]) - overlap
    assert overlap / union > 0.5, (mine, theirs)

    # Relit: the result alone under another studio world, from a camera the capture did not use.
    source.hide_render = True
    set_world_environment(studio_world("city"))
    use_cycles(160, 160, samples=32)
    scene.camera = add_camera_looking_at("Relight", (2.2, -2.6, 1.9), target=tuple(source.location), lens=50.0)
    artifact = Path(__file__).resolve().parents[1] / "out" / "addon" / "end_to_end_relit.png"
    artifact.parent.mkdir(parents=True, exist_ok=True)
    scene.render.image_settings.file_format, scene.render.image_settings.color_mode = "PNG", "RGBA"
    scene.render.filepath = str(artifact)
    bpy.ops.render.render(write_still=True)
    relit = bpy.data.images.load(str(artifact))
    pixels = np.empty(160 * 160 * 4, np.float32)
    relit.pixels.foreach_get(pixels)
    alpha = pixels.reshape(160, 160, 4)[..., 3]
    assert 0.02 < (alpha > 0.5).mean() < 0.9  # the object is there, and not everywhere
