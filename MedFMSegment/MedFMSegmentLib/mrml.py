"""MRML layer: the one place where Slicer nodes are turned into numpy arrays and back.

The ``mrml*`` modules are the only ones that import ``slicer`` and ``vtk``. It uses only the MRML, VTK and
segmentation-core classes, so it runs both inside the Slicer application and headless with the
``slicer-core`` PyPI package (no Qt, no ``slicer.app``, no ``slicer.mrmlScene``: every function takes
its nodes or its scene explicitly).

Frames: everything returned here is in *world* RAS, i.e. with parent transforms applied. Linear
parent transforms are hardened into the returned matrices; a non-linear transform under a volume
or a segmentation is refused with an :class:`InputError` (harden it first). Volumes are returned as
``array_kji`` plus a 4x4 ``ijk_to_ras`` matrix (see :mod:`geometry`).

Segment writes (:func:`write_mask_to_segment`) work on the volume's voxel grid. They touch only the
bounding box of the voxels that change, keep every other segment intact, and return a
:class:`SegmentUndoState` that :func:`restore_segment` uses to give back exactly the previous voxels.

One module per concern; this module re-exports every public name, so ``from MedFMSegmentLib import mrml``
keeps working:

- :mod:`mrml_volumes`: world matrices, voxel lattices, scalar volumes as arrays;
- :mod:`mrml_markups`: control points and ROIs as prompts (sign convention);
- :mod:`mrml_labelmaps`: low-level segment labelmap reads and box writes;
- :mod:`mrml_segments`: :func:`write_mask_to_segment`, :func:`segment_to_mask`, undo states;
- :mod:`mrml_editor`: the Segment Editor's masking settings;
- :mod:`mrml_files`: load and save nodes;
- :mod:`mrml_prompts`: the Segment Editor effect's prompts in the scene (segment tags for prompts and
  adapters, prompt markers and their events, slice writes under the editor's masking).
"""

from __future__ import annotations

import logging

import numpy as np  # noqa: F401  (names of the former single module stay importable)
import slicer  # noqa: F401
import vtk  # noqa: F401
from vtk.util import numpy_support  # noqa: F401

from . import geometry  # noqa: F401
from .errors import InputError, MedFMError  # noqa: F401
from .mrml_editor import _editor_value, _visible_segment_ids, editor_settings, editor_settings_for_volume  # noqa: F401
from .mrml_files import _file_name_for, _read_into, _storage_messages, load_segmentation, load_volume, save_node  # noqa: F401
from .mrml_labelmaps import (_apply_box, _binary_labelmap_name, _box_slices, _check_segmentation_node,  # noqa: F401
                             _extent_is_empty, _find_segment_id, _is_segmentation_empty, _labelmap, _labelmap_array,
                             _labelmap_to_local, _oriented_image, _read_segment_box, _require_segment_id,
                             _segment_names, _source_representation, _write_lattice, ensure_segmentation_converters)
from .mrml_markups import (_FALSE_WORDS, POSITIVE_ATTRIBUTE, _node_is_positive, markups_to_points_ras,  # noqa: F401
                           roi_corners_world, roi_to_box_ijk, roi_to_corners_ras)
from .mrml_prompts import (ACCEPTED_TAG, ADAPTER_TAG, PromptMarkers, accepted_slices, segment_adapter,  # noqa: F401
                           segment_tag, set_accepted_slices, set_segment_adapter, set_segment_tag,
                           slice_mask_from_segment, store_prompts, stored_prompts, write_slices)
from .mrml_segments import (MODES, SegmentUndoState, _check_color, _check_mask, _combine, _prepare_segment,  # noqa: F401
                            _reference_geometry_parameter, _resolve_overwrite, _restore, _SegmentChange,
                            _set_reference_geometry, _take_voxels, labelmap_from_node, restore_segment,
                            segment_to_mask, write_mask_to_segment)
from .mrml_volumes import (_DIRECTION_TOLERANCE, _ORIGIN_TOLERANCE, _check_scalar_volume, _checked_matrix,  # noqa: F401
                           _describe, _lattice_offset, _node_to_world, _to_numpy_matrix, _to_vtk_matrix,
                           make_ellipsoid_volume, volume_geometry, volume_to_array)

logger = logging.getLogger(__name__)

