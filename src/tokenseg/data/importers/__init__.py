"""``tokenseg data import``: the label formats labelling tools write -> the folder layout of
``data.format=folder`` (:mod:`tokenseg.data.folder`)::

    DST/images/<id>.<ext>    the images (hard links by default, see LINK_MODES)
    DST/masks/<id>.png       rasterised polygons/masks: palette PNG, 0 background, c + 1 class c, 255 ignore
    DST/labels.csv           image,labels[,split]   image-level labels (every object's class)
    DST/classes.txt          the class order

Sources (``--from``):

* ``yolo`` -- Ultralytics/YOLO: ``images/[<split>/]*.jpg`` with ``labels/[<split>/]*.txt`` (or Roboflow's
  ``<split>/images`` + ``<split>/labels``); one object per line, ``class x1 y1 x2 y2 ...`` (a normalised
  polygon: YOLO-seg, also OBB's 4 corners) or ``class cx cy w h`` (a box). Class names from
  ``--classes``, else ``data.yaml`` (any ``*.yaml`` with ``names``), ``classes.txt`` or ``obj.names``.
  Boxes give image labels only: an image with a box gets no mask (a mask without that object would
  call it background); a folder of boxes only gives labels and no masks at all. An image without a
  label file, or with an empty one, is background only (Ultralytics' rule).
* ``coco`` -- COCO instances JSON (any tool's export): a ``.json`` file, or a folder with
  ``annotations/instances_<split>.json`` (+ ``<split>/`` image folders) or Roboflow's
  ``<split>/_annotations.coco.json``. Parsed and rasterised by :mod:`tokenseg.data.coco` (pycocotools
  when installed); crowd regions become 255 (ignore) where no instance covers them; images without
  annotations are left out as in the COCO reader (``--keep-empty`` keeps them as background).
* ``labelme`` -- LabelMe ``*.json`` files (any depth): ``polygon``, ``rectangle``, ``circle`` and
  ``mask`` shapes are painted; ``line``/``point`` shapes give image labels only (no mask for that
  image). ``_background_``/``background`` shapes paint background (holes), ``__ignore__`` paints 255.
  The image is ``imagePath`` (relative to the JSON), or the embedded ``imageData``.

Overlaps are painted largest first, so small objects stay visible on top (the COCO reader's rule);
pixels are inside a polygon when their centre is (pycocotools' convention).

Nothing is written into the source. Every file is written atomically, and the command resumes: a
destination that holds an earlier import of the same source with the same options is completed
(files already there are kept); any other non-empty destination is refused without ``--overwrite``.
"""
from __future__ import annotations

from .coco_json import read_coco
from .common import IMPORT_FORMATS, LINK_MODES, Item, Shape, Source
from .labelme import read_labelme
from .write import format_summary, import_dataset
from .yolo import read_yolo

__all__ = ["IMPORT_FORMATS", "LINK_MODES", "Item", "Shape", "Source", "format_summary", "import_dataset", "read_coco",
           "read_labelme", "read_yolo"]
