"""Pictures of the add-on's sidebar in each state, drawn off-screen from the panels' own draw() calls.

    python scripts/panel_states.py --out docs/addon [--python PYTHON]

The bpy module has no window, and Debian's Blender (3.4) is older than the extension's minimum
(4.2), so no real screenshot can be taken here. Instead this drives the add-on through a real
session (its own backend on this machine, a capture of a textured box, a cpu-preset reconstruction,
then a connection with a wrong token) and, at each state, runs the three panels' draw() against a recording stand-in
for Blender's UILayout; the recorded rows, columns, boxes, labels, properties (with their real
values and names), operators (greyed out where poll() says so) and progress bar are then drawn
with Pillow in the colours of Blender's default dark theme. Icons are not drawn. Each picture says
in its footer that it is such a drawing.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a plain script from a checkout

import build_addon  # noqa: E402

REPOSITORY = "lsrm_docs"
MODULE = f"bl_ext.{REPOSITORY}.lsrm_reconstruct"

# Blender's default dark theme, approximately.
REGION, PANEL, HEADER, BOX = (48, 48, 48), (61, 61, 61), (56, 56, 56), (52, 52, 52)
WIDGET, FIELD, SELECTED = (84, 84, 84), (34, 34, 34), (71, 114, 179)
TEXT, ALERT = (230, 230, 230), (255, 120, 110)
WIDTH, LINE, GAP, PAD = 320, 22, 3, 8


# ---------------------------------------------------------------------------------------------
# Recording what a panel draws


@dataclass
class Widget:
    kind: str  # label, button, field, toggle, checkbox, progress
    text: str = ""
    value: str = ""
    factor: float = 0.0
    selected: bool = False
    enabled: bool = True


@dataclass
class Recorder:
    """Stands in for bpy.types.UILayout: records the calls of a panel's draw()."""

    kind: str = "column"  # column, row, box
    items: list = field(default_factory=list)
    enabled: bool = True
    alert: bool = False
    use_property_split: bool = False

    def widgets(self):
        """Every widget recorded, depth first."""
        for item in self.items:
            yield from item.widgets() if isinstance(item, Recorder) else [item]

    def _child(self, kind: str) -> Recorder:
        child = Recorder(kind)
        self.items.append(child)
        return child

    def row(self, align: bool = False) -> Recorder:
        return self._child("row")

    def column(self, align: bool = False) -> Recorder:
        return self._child("column")

    def box(self) -> Recorder:
        return self._child("box")

    def separator(self) -> None:
        self.items.append(Widget("space"))

    def label(self, text: str = "", icon: str = "NONE") -> None:
        self.items.append(Widget("alert" if self.alert else "label", text))

    def progress(self, factor: float = 0.0, type: str = "BAR", text: str = "") -> None:
        self.items.append(Widget("progress", text, factor=factor))

    def operator(self, idname: str, text: str | None = None, icon: str = "NONE") -> None:
        import bpy

        group, name = idname.split(".")
        cls = getattr(bpy.types, f"{group.upper()}_OT_{name}")
        enabled = cls.poll(bpy.context) if hasattr(cls, "poll") else True
        self.items.append(Widget("button", text or cls.bl_label, enabled=enabled))

    def prop(self, data, name: str, expand: bool = False, text: str | None = None) -> None:
        rna = data.bl_rna.properties[name]
        label, value = text if text is not None else rna.name, getattr(data, name)
        if rna.type == "ENUM":
            items = list(rna.enum_items)
            if expand:
                row = self._child("row")
                row.items = [Widget("toggle", item.name, selected=item.identifier == value) for item in items]
                return
            shown = next(item.name for item in items if item.identifier == value)
            self.items.append(Widget("field", label, shown))
        elif rna.type == "BOOLEAN":
            self.items.append(Widget("checkbox", label, selected=bool(value)))
        elif rna.type in ("INT", "FLOAT"):
            self.items.append(Widget("number", label, f"{value:g}"))
        elif rna.type == "POINTER":
            self.items.append(Widget("field", label, value.name if value is not None else ""))
        else:
            self.items.append(Widget("field", label, str(value)))


def record_panels(addon) -> list[tuple[str, Recorder]]:
    """Each sidebar panel's draw() run against a Recorder."""
    import bpy

    recorded = []
    for panel in addon.panels.CLASSES:
        stand_in = type("Panel", (), {"layout": Recorder()})()
        context = type("Context", (), {"scene": bpy.context.scene, "preferences": bpy.context.preferences})()
        context.region = type("Region", (), {"width": WIDTH - 2 * PAD})()
        panel.draw(stand_in, context)
        recorded.append((panel.bl_label, stand_in.layout))
    return recorded


# ---------------------------------------------------------------------------------------------
# Drawing the recording


def font(size: int = 12) -> ImageFont.ImageFont:
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        return ImageFont.load_default()


class Painter:
    def __init__(self, height: int) -> None:
        self.image = Image.new("RGB", (WIDTH, height), REGION)
        self.draw = ImageDraw.Draw(self.image)
        self.font = font()

    def height(self, node, width: int) -> int:
        if isinstance(node, Widget):
            return 8 if node.kind == "space" else LINE
        if node.kind == "row":
            return max((self.height(item, width) for item in node.items), default=0)
        inner = sum(self.height(item, width) + GAP for item in node.items) - GAP if node.items else 0
        return inner + (2 * PAD if node.kind == "box" else 0)

    def paint(self, node, x: int, y: int, width: int, enabled: bool = True) -> int:
        """Draw a node at (x, y); returns its height."""
        if isinstance(node, Widget):
            self.widget(node, x, y, width, enabled and node.enabled)
            return self.height(node, width)
        enabled = enabled and node.enabled
        height = self.height(node, width)
        if node.kind == "box":
            self.draw.rounded_rectangle((x, y, x + width, y + height), 5, fill=BOX, outline=(40, 40, 40))
            x, y, width = x + PAD, y + PAD, width - 2 * PAD
        if node.kind == "row":
            share = (width - GAP * (len(node.items) - 1)) / max(len(node.items), 1)
            for index, item in enumerate(node.items):
                self.paint(item, round(x + index * (share + GAP)), y, round(share), enabled)
            return height
        for item in node.items:
            y += self.paint(item, x, y, width, enabled) + GAP
        return height

    def text(self, x: int, y: int, text: str, colour, enabled: bool, anchor: str = "lm") -> None:
        colour = colour if enabled else tuple(c // 2 + 30 for c in colour)
        self.draw.text((x, y + LINE // 2), text, fill=colour, font=self.font, anchor=anchor)

    def widget(self, widget: Widget, x: int, y: int, width: int, enabled: bool) -> None:
        box = (x, y, x + width, y + LINE - 2)
        kind = widget.kind
        if kind in ("label", "alert"):
            self.text(x + 2, y, widget.text, ALERT if kind == "alert" else TEXT, enabled)
        elif kind in ("button", "toggle"):
            fill = SELECTED if widget.selected else WIDGET
            self.draw.rounded_rectangle(box, 4, fill=fill if enabled else (66, 66, 66))
            self.text(x + width // 2, y, widget.text, TEXT, enabled, "mm")
        elif kind == "checkbox":
            square = (x + 2, y + 4, x + 16, y + 18)
            self.draw.rounded_rectangle(square, 3, fill=SELECTED if widget.selected else WIDGET)
            if widget.selected:
                self.draw.line((x + 5, y + 11, x + 8, y + 14, x + 13, y + 7), fill=TEXT, width=2)
            self.text(x + 22, y, widget.text, TEXT, enabled)
        elif kind in ("number", "field"):
            self.draw.rounded_rectangle(box, 4, fill=WIDGET if kind == "number" else FIELD)
            self.text(x + 6, y, widget.text, TEXT, enabled)
            self.text(x + width - 6, y, widget.value, TEXT, enabled, "rm")
        elif kind == "progress":
            self.draw.rounded_rectangle(box, 4, fill=FIELD)
            filled = x + max(8, round(width * widget.factor))
            self.draw.rounded_rectangle((x, y, filled, y + LINE - 2), 4, fill=SELECTED)
            self.text(x + width // 2, y, widget.text, TEXT, enabled, "mm")


def picture(recorded: list[tuple[str, Recorder]], state: str) -> Image.Image:
    measure = Painter(1)
    inner = WIDTH - 2 * PAD
    heights = [measure.height(layout, inner - 2 * PAD) for _, layout in recorded]
    total = sum(LINE + 2 * PAD + height + PAD for height in heights) + 2 * LINE + PAD
    painter = Painter(total)
    y = PAD
    for (label, layout), height in zip(recorded, heights, strict=True):
        painter.draw.rectangle((PAD, y, WIDTH - PAD, y + LINE + PAD + height + PAD), fill=PANEL)
        painter.draw.rectangle((PAD, y, WIDTH - PAD, y + LINE), fill=HEADER)
        painter.text(PAD + 8, y, f"v  {label}", TEXT, True)
        painter.paint(layout, 2 * PAD, y + LINE + PAD, inner - 2 * PAD)
        y += LINE + PAD + height + PAD + PAD
    painter.text(PAD, y, f"LSRM tab: {state}", TEXT, True)
    note = "drawn off-screen from the panels' draw() calls"
    painter.draw.text((PAD, y + LINE + 4), note, fill=(160, 160, 160), font=font(10))
    return painter.image


# ---------------------------------------------------------------------------------------------
# A real session, pictured at each state


def enable_from_source(bpy, scratch: Path):
    """The add-on from this checkout's sources, through a local extension repository."""
    (scratch / "lsrm_reconstruct").mkdir(parents=True)
    build_addon.stage(scratch / "lsrm_reconstruct")
    bpy.context.preferences.extensions.repos.new(
        name=REPOSITORY, module=REPOSITORY, custom_directory=str(scratch), source="USER"
    )
    bpy.ops.preferences.addon_enable(module=MODULE)
    return sys.modules[MODULE]


def textured_box(bpy):
    bpy.ops.mesh.primitive_cube_add(size=1.0, location=(0.0, 0.0, 0.4))
    box = bpy.context.active_object
    box.name, box.scale = "Crate", (0.6, 0.45, 0.4)
    material = bpy.data.materials.new("Crate")
    nodes = material.node_tree.nodes
    checker = nodes.new("ShaderNodeTexChecker")
    principled = next(node for node in nodes if node.bl_idname == "ShaderNodeBsdfPrincipled")
    material.node_tree.links.new(checker.outputs["Color"], principled.inputs["Base Color"])
    box.data.materials.append(material)
    return box


def pump_until(addon, done, timeout: float = 900.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError("the session did not reach the next state")
        addon.tasks.pump()
        time.sleep(0.05)


def session_states(out: Path, python: str) -> list[Path]:
    import bpy

    from tests.blender_scene import set_world_environment, studio_world

    written: list[Path] = []

    def snap(name: str, state: str) -> None:
        path = out / f"panel_{name}.png"
        picture(record_panels(addon), state).quantize(colors=64).save(path, optimize=True)  # a few KiB each
        written.append(path)
        print(path, flush=True)

    with tempfile.TemporaryDirectory(prefix="lsrm-panels-") as scratch:
        scratch = Path(scratch)
        bpy.ops.wm.read_homefile(use_empty=True)
        addon = enable_from_source(bpy, scratch / "extensions")
        session = addon.session.SESSION
        prefs = addon.preferences.preferences()
        prefs.python, prefs.device, prefs.output = python, "cpu", str(scratch / "results")
        set_world_environment(studio_world("forest"))
        textured_box(bpy)
        settings = bpy.context.scene.lsrm
        settings.view_count, settings.resolution, settings.samples, settings.preset = 8, 64, 8, "cpu"
        snap("1_stopped", "backend stopped")

        task = addon.tasks.start(addon.operators.start_task(bpy.context))
        snap("2_starting", "backend starting")
        pump_until(addon, lambda: not task.running())
        bpy.ops.lsrm.capture_selected()
        snap("3_ready", "backend ready, views captured")

        task = addon.tasks.start(addon.operators.reconstruct_task(bpy.context))
        pump_until(addon, lambda: session.stage == "coarse" and session.progress > 0.15)
        snap("4_running", "reconstructing")
        pump_until(addon, lambda: not task.running())
        snap("5_done", "result imported")

        prefs.backend, prefs.url, prefs.token = "REMOTE", session.connection.url, "not-the-token-0123456789"
        try:
            bpy.ops.lsrm.connect()
        except RuntimeError:
            pass  # the operator's report; the panel shows the same line
        snap("6_error", "an error: a wrong token")
        bpy.ops.preferences.addon_disable(module=MODULE)  # stops the backend too
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the PNGs (e.g. docs/addon)")
    parser.add_argument("--python", default=sys.executable, help="the backend's Python (default: this one)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    session_states(args.out, args.python)


if __name__ == "__main__":
    main()
