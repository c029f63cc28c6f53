"""The merge spec: plain data saying which parameter axis belongs to which merge point.

A :class:`MergeSpec` is what :func:`autoalign.find_merge_points` discovers and what
every other part of the library consumes. It is a table in the spirit of
git-re-basin's "permutation spec", but generated, not written by hand:

* a list of :class:`MergePoint` — groups of feature coordinates that must share one
  transform, each with a dimension ``dim``, the most general transform ``kind`` it
  admits (``linear``, ``orthogonal``, ``permutation``, ``rotary`` — rotations of
  coordinate pairs, with the pairs in ``pairs`` — or ``frozen``; see
  :func:`kind_meet`), and the reason when that kind is restricted;
* a list of :class:`AxisRole` — for every parameter/buffer axis that indexes
  feature coordinates, which merge point (and which coordinate of it) each position
  of the axis holds, and the role of the axis (how a transform moves it);
* a list of :class:`FoldedNorm` — BatchNorm layers that fold exactly into the
  producer before them, so their merge point keeps the ``linear`` kind.

Roles
-----
``output``
    rows of a producer, ``W <- M W`` (also biases).
``input``
    columns of a consumer, ``W <- W U`` where ``U`` is the unmerge matrix.
``channel``
    per-channel vectors (BatchNorm/LayerNorm affine and statistics, depthwise
    filters, layer scale): ``v <- M v``; only valid when ``M`` is a permutation.
``additive``
    vectors added to the feature stream (class tokens, position embeddings):
    ``v <- M v``, exact under any linear map.
``folded``
    BatchNorm vectors folded into their producer: reset to the identity
    normalisation when merged; never transformed.
"""

from ..vocab import FEATURES, KINDS, ROLES
from .merge_spec import SPEC_FORMAT_VERSION, MergeSpec
from .parts import AxisRole, FoldedNorm, MergePoint, Site, kind_meet, kind_rank, replica_index

__all__ = [
    "KINDS",
    "ROLES",
    "FEATURES",
    "SPEC_FORMAT_VERSION",
    "MergePoint",
    "Site",
    "AxisRole",
    "FoldedNorm",
    "MergeSpec",
    "kind_rank",
    "kind_meet",
    "replica_index",
]
