"""Make the extension catalog picture Resources/Screenshots/brain-extraction.png from REAL output.

The embedded deepbet model segments 'brain' in the MNI152 T1 head through the module's Logic
(BiomedParseSlicerLogic.segment) on the real Slicer core from PyPI (``slicer-core``: Slicer's own
volume reader, segmentation node and closed-surface conversion). The result is drawn offscreen:
axial, coronal and sagittal slices through the volume with the segment overlaid as Slicer draws it
(filled at 50 % opacity plus a full-opacity outline, radiological convention: patient right on the
screen's left), and the segment's closed surface rendered with VTK offscreen (EGL/OSMesa). It is an
honest rendering of the engine's output, not a screenshot of the Slicer application window.

    python Utilities/make_screenshot.py [--t1 MNI152_T1.nii.gz] [--out brain-extraction.png] [--device cpu]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "BiomedParseSlicer"))

PANEL = 330  # pixels per panel side
BG = (0, 0, 0)


def segment_mni(t1: Path, device: str):
    """Run deepbet through the module's Logic on slicer-core; return what the picture needs."""
    from BiomedParseSlicerLib import headless, mrml
    from BiomedParseSlicerLib.logic import BiomedParseSlicerLogic
    from textseg.predictor import Predictor

    app = headless.create()
    node = app.load_volume(t1)
    logic = BiomedParseSlicerLogic(scene=app.scene)
    start = time.time()
    seg = logic.segment(node, ["brain"], "deepbet", modality="MRI", predictor=Predictor("deepbet", device=device))
    seconds = time.time() - start
    sid = logic.lastSegmentIDs[0]
    segment = seg.GetSegmentation().GetSegment(sid)
    volume = logic.volumeFromNode(node)  # array (k, j, i) with the node's world geometry
    mask = volume.with_array(mrml.segment_mask(seg, sid, node))
    seg.CreateClosedSurfaceRepresentation()  # Slicer's own labelmap -> surface conversion
    surface = seg.GetClosedSurfaceInternalRepresentation(sid)
    return {"volume": volume.canonical(), "mask": mask.canonical(), "surface": surface,
            "color": tuple(segment.GetColor()), "name": segment.GetName(), "seconds": seconds,
            "voxels": int(mask.array.sum())}


def window(array: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Grey levels 0..255 with a window from the image's 1st..99.5th percentile of non-zero voxels."""
    values = array[array > 0] if (array > 0).any() else array.ravel()
    lo, hi = np.percentile(values, [1, 99.5])
    return (np.clip((array - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.float32)


def outline(m: np.ndarray) -> np.ndarray:
    inner = m.copy()
    inner[1:-1, 1:-1] = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    return m & ~inner


def overlay(grey: np.ndarray, m: np.ndarray, color) -> np.ndarray:
    """Slicer's default 2D display: fill at 50 % opacity and a full-opacity outline."""
    rgb = np.repeat(grey[..., None], 3, axis=2)
    c = np.array(color, np.float32) * 255
    rgb[m] = 0.5 * rgb[m] + 0.5 * c
    rgb[outline(m)] = c
    return rgb.astype(np.uint8)


def slices(data):
    """(title, rgb, pixel aspect) of the three orthogonal views through the mask's centre. The
    canonical grid runs i -> patient left, j -> posterior, k -> superior."""
    vol, mask = data["volume"], data["mask"]
    grey = window(vol.array.astype(np.float32), mask.array)
    m = mask.array > 0
    k, j, i = np.round(np.argwhere(m).mean(0)).astype(int)
    si, sj, sk = vol.spacing
    return [
        ("Axial", overlay(grey[k], m[k], data["color"]), sj / si),  # rows anterior->posterior, cols R->L
        ("Coronal", overlay(grey[::-1, j, :], m[::-1, j, :], data["color"]), sk / si),  # rows S->I
        ("Sagittal", overlay(grey[::-1, :, i], m[::-1, :, i], data["color"]), sk / sj),  # cols A->P
    ]


def fit(rgb: np.ndarray, aspect: float):
    from PIL import Image

    h, w = rgb.shape[:2]
    img = Image.fromarray(rgb)
    scale = PANEL / max(w, h * aspect)
    img = img.resize((max(1, round(w * scale)), max(1, round(h * aspect * scale))), Image.BILINEAR)
    panel = Image.new("RGB", (PANEL, PANEL), BG)
    panel.paste(img, ((PANEL - img.width) // 2, (PANEL - img.height) // 2))
    return panel


def render_surface(surface, color) -> np.ndarray:
    """The segment's closed surface, rendered offscreen, seen from the front-left-above."""
    import vtkmodules.vtkRenderingOpenGL2  # registers the OpenGL render window (EGL/OSMesa offscreen)
    from vtkmodules.util.numpy_support import vtk_to_numpy
    from vtkmodules.vtkFiltersCore import vtkPolyDataNormals
    from vtkmodules.vtkRenderingCore import (
        vtkActor,
        vtkPolyDataMapper,
        vtkRenderer,
        vtkRenderWindow,
        vtkWindowToImageFilter,
    )

    normals = vtkPolyDataNormals()
    normals.SetInputData(surface)
    normals.SetFeatureAngle(60)
    mapper = vtkPolyDataMapper()
    mapper.SetInputConnection(normals.GetOutputPort())
    mapper.ScalarVisibilityOff()
    actor = vtkActor()
    actor.SetMapper(mapper)
    actor.GetProperty().SetColor(*color)
    prop = actor.GetProperty()
    prop.SetAmbient(0.15)
    prop.SetDiffuse(0.75)
    prop.SetSpecular(0.05)
    renderer = vtkRenderer()
    renderer.SetBackground(0.76, 0.76, 0.90)  # Slicer's default 3D background (light blue-grey)
    renderer.SetBackground2(0.45, 0.45, 0.60)
    renderer.GradientBackgroundOn()
    renderer.AddActor(actor)
    assert vtkmodules.vtkRenderingOpenGL2  # imported for its side effect
    rw = vtkRenderWindow()
    rw.SetOffScreenRendering(1)
    rw.SetSize(PANEL, PANEL)
    rw.AddRenderer(renderer)
    camera = renderer.GetActiveCamera()
    centre = np.array(actor.GetCenter())
    camera.SetFocalPoint(*centre)
    camera.SetPosition(*(centre + np.array([-1.0, 1.6, 0.8]) * 300))  # RAS: from patient left, anterior, above
    camera.SetViewUp(0, 0, 1)
    renderer.ResetCamera()
    camera.Zoom(1.25)
    rw.Render()
    grab = vtkWindowToImageFilter()
    grab.SetInput(rw)
    grab.Update()
    image = grab.GetOutput()
    w, h, _ = image.GetDimensions()
    rgb = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(h, w, -1)[::-1, :, :3]
    if rgb.max() == rgb.min():
        raise RuntimeError("offscreen rendering produced a blank image (no OpenGL/EGL/OSMesa?)")
    return np.ascontiguousarray(rgb)


def compose(data):
    """The 2x2 sheet (PIL image): axial, coronal / 3D, sagittal, and an honest caption."""
    from PIL import Image, ImageDraw, ImageFont

    panels = [(title, fit(rgb, aspect)) for title, rgb, aspect in slices(data)]
    panels.insert(2, ("3D", Image.fromarray(render_surface(data["surface"], data["color"]))))
    gap, footer = 4, 44
    sheet = Image.new("RGB", (2 * PANEL + gap, 2 * PANEL + gap + footer), (40, 40, 40))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=15)
    small = ImageFont.load_default(size=12)
    for n, (title, panel) in enumerate(panels):
        x, y = (n % 2) * (PANEL + gap), (n // 2) * (PANEL + gap)
        sheet.paste(panel, (x, y))
        draw.text((x + 6, y + 4), title, fill=(255, 255, 255), font=font)
        if title == "Axial" or title == "Coronal":
            draw.text((x + 6, y + PANEL // 2), "R", fill=(255, 220, 0), font=font)
            draw.text((x + PANEL - 16, y + PANEL // 2), "L", fill=(255, 220, 0), font=font)
    lines = (f"Segment '{data['name']}' from the prompt 'brain' (deepbet, CPU, {data['seconds']:.0f} s), MNI152 T1 1 "
             f"mm, {data['voxels']} voxels.",
             "Engine output via the module's Logic on slicer-core, rendered offscreen: not a screenshot of the Slicer "
             "window.")
    for n, line in enumerate(lines):
        draw.text((6, 2 * PANEL + gap + 6 + 17 * n), line, fill=(230, 230, 230), font=small)
    return sheet


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--t1", type=Path, default=Path("/work/shared/data/mni152/MNI152_T1.nii.gz"))
    parser.add_argument("--out", type=Path, default=ROOT / "Resources" / "Screenshots" / "brain-extraction.png")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    data = segment_mni(args.t1, args.device)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    compose(data).save(args.out, optimize=True)
    print(f"{args.out}: {args.out.stat().st_size // 1024} KB, {data['voxels']} brain voxels, {data['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
