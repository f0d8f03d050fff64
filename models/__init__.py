"""build_model(name, **kwargs): the named networks with their presets; explicit kwargs override
preset entries. kwargs: in_channels, num_classes, and num_categories for pt_seg."""
from models import pct, point_transformer as pt

# name -> (network, preset)
MODELS = {
    "pt_seg": (pt.PointTransformerSeg, pt.SEG_PAPER),
    "pt_semseg": (pt.PointTransformerSeg, pt.SEG_PAPER),
    "pt_cls": (pt.PointTransformerCls, pt.CLS_PAPER),
    "pct_cls": (pct.PCTCls, pct.PAPER),
    "pt_seg_tiny": (pt.PointTransformerSeg, pt.SEG_TINY),
    "pt_semseg_tiny": (pt.PointTransformerSeg, pt.SEG_TINY),
    "pt_cls_tiny": (pt.PointTransformerCls, pt.CLS_TINY),
    "pct_cls_tiny": (pct.PCTCls, pct.TINY),
}
PART_SEGMENTATION = ("pt_seg", "pt_seg_tiny")  # the ones that take the shape category


def build_model(name, **kwargs):
    if name not in MODELS:
        raise ValueError(f"models: unknown model {name!r}; valid names: {', '.join(MODELS)}")
    if (kwargs.get("num_categories", 0) > 0) != (name in PART_SEGMENTATION):
        raise ValueError(f"models: {name}: num_categories > 0 is required by, and only "
                         f"accepted by, {' and '.join(PART_SEGMENTATION)}")
    network, preset = MODELS[name]
    return network(**{**preset, **kwargs})
