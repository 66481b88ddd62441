"""A deterministic synthetic city for visual place recognition, written as a datasets_vg tree.

Why synthetic: the pipeline must train, evaluate and be tested on machines without internet, so it
needs imagery with the properties that make VPR hard:

* perceptual aliasing: buildings come in a few shared facade styles (palette, window grid, door,
  ground floor, roof line), so different places look alike;
* distinctiveness that survives appearance change: each place still has its own arrangement of
  building widths, heights and styles, shop signs, awnings, trees and a distant skyline;
* viewpoint change: camera position (metres), lateral lane offset (scale), heading, pitch, roll and
  focal-length jitter, rendered physically through a plane-to-image homography;
* appearance change: the database is captured by day, queries by day, overcast, dusk, night, fog or
  rain (illumination, sky, cast shadows, lit windows, haze, rain streaks, sensor noise);
* moving distractors (vehicles, pedestrians) that differ between captures.

Geometry: each split owns a separate district (disjoint UTM areas, a kilometre apart), made of
straight streets lined with facades on both sides. A camera on the street looks sideways at one
facade (heading = street azimuth ± 90° plus jitter). The facade is a plane drawn as a texture in
metres and warped into the camera image; distractors are 3-D rectangles projected by the same camera.

Determinism: the city layout comes from RNGs seeded by (seed, split, street) and every image draws
from its own RNG seeded by (seed, split, role, index), so the files are byte-identical whatever the
number of worker processes.

Modules, in import order (each imports only from the ones before it):

* ``helpers``: keyed RNG streams and colour helpers;
* ``plan``: styles, buildings, signs, facades and streets of each split's district;
* ``conditions``: illumination and weather of a capture;
* ``captures``: pose, timestamp, camera UTM and file name of every image;
* ``render``: camera, shader and the facade texture warped into the image;
* ``distractors``: vehicles and pedestrians; ``weather``: rain, haze, exposure, noise;
* ``city``: per-capture rendering, JPEG encoding, the worker pool and ``generate_city``.
"""

from vpr.steps.synth.captures import Capture, camera_utm, plan_captures
from vpr.steps.synth.city import encode_jpeg, generate_city, render_capture
from vpr.steps.synth.conditions import Condition
from vpr.steps.synth.plan import Street, Style, make_styles, plan_city

__all__ = [
    "Capture",
    "Condition",
    "Street",
    "Style",
    "camera_utm",
    "encode_jpeg",
    "generate_city",
    "make_styles",
    "plan_captures",
    "plan_city",
    "render_capture",
]
