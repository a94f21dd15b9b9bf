"""Draw the icon (128x128): an axial slice with a coloured segment and a text-prompt bubble.

One icon serves both: Slicer shows the module's ``Resources/Icons/BiomedParseSlicer.png`` and the Extensions
catalog's ICONURL (CMakeLists.txt, .s4ext) points at the same file.

    python Utilities/make_icon.py [OUT.png]   (default: BiomedParseSlicer/Resources/Icons/BiomedParseSlicer.png)
"""
import sys
from pathlib import Path

from PIL import Image, ImageDraw

S = 4  # supersample
W = 128 * S
img = Image.new("RGBA", (W, W), (0, 0, 0, 0))
d = ImageDraw.Draw(img)
d.rounded_rectangle([4 * S, 4 * S, 124 * S, 124 * S], radius=22 * S, fill=(28, 38, 58, 255))
# body cross-section
d.ellipse([14 * S, 30 * S, 114 * S, 112 * S], fill=(120, 126, 136, 255))
d.ellipse([20 * S, 36 * S, 108 * S, 106 * S], fill=(86, 92, 104, 255))
# spine
d.ellipse([56 * S, 88 * S, 72 * S, 102 * S], fill=(235, 232, 220, 255))
# liver-like segment (Slicer's liver colour 221,130,101)
d.polygon([(24 * S, 58 * S), (40 * S, 46 * S), (62 * S, 48 * S), (66 * S, 62 * S), (56 * S, 80 * S), (34 * S, 86 * S),
           (24 * S, 74 * S)],
          fill=(221, 130, 101, 255))
# kidney-like segment
d.ellipse([76 * S, 70 * S, 94 * S, 92 * S], fill=(185, 102, 83, 255))
# prompt bubble with a text cursor
d.rounded_rectangle([60 * S, 8 * S, 120 * S, 38 * S], radius=9 * S, fill=(255, 255, 255, 255))
d.polygon([(74 * S, 36 * S), (70 * S, 48 * S), (84 * S, 36 * S)], fill=(255, 255, 255, 255))
for x0, x1 in ((67, 84), (88, 102)):
    d.rounded_rectangle([x0 * S, 20 * S, x1 * S, 26 * S], radius=3 * S, fill=(28, 38, 58, 255))
d.rectangle([107 * S, 14 * S, 109 * S, 32 * S], fill=(221, 130, 101, 255))
img = img.resize((128, 128), Image.LANCZOS)
out = sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "BiomedParseSlicer" / "Resources" \
    / "Icons" / "BiomedParseSlicer.png"
img.save(out, optimize=True)
