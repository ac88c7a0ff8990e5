"""``medmvl preprocess``: write the exact model-input tensor of an image and print its geometry."""

from __future__ import annotations

import argparse

NAME = "preprocess"
HELP = "preprocess an image or volume exactly as the model sees it (.npy out, geometry JSON on stdout)"
EXAMPLES = ("medmvl preprocess phantoms/images/ct-test-00000.nii.gz --checkpoint Resources/demo_model --out ct.npy",)
DOCS = "docs/images.md"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="image file (DICOM, NIfTI, NRRD, MHA, NPY, PNG/JPEG/BMP/TIFF) "
                                      "or a DICOM series folder")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="DIR",
                     help="checkpoint folder: its config.json's preprocessing spec is used")
    src.add_argument("--preset", metavar="NAME", help="named preset spec (see --list-presets)")
    parser.add_argument("--kind", choices=["image3d", "image"], default=None,
                        help="which of the checkpoint's specs to use (default: image for 2D inputs, image3d otherwise)")
    parser.add_argument("--out", required=True, metavar="OUT.npy", help="where to write the float32 tensor")
    parser.add_argument("--roi", metavar="z1,y1,x1,z2,y2,x2", default=None,
                        help="preprocess only this voxel box of the source array (half-open)")
    parser.add_argument("--margin", type=int, default=0, help="voxels added around --roi")
    parser.add_argument("--series-uid", default=None, help="DICOM series to read from a folder of several")


def run(args: argparse.Namespace) -> int:
    import json
    import sys

    import numpy as np

    from medmvl_core.errors import RoiError
    from medmvl_core.imaging import get_preset, preprocess, read_image, spec_from_checkpoint

    roi = None
    if args.roi:
        try:
            roi = [int(v) for v in args.roi.replace(" ", "").split(",")]
        except ValueError as exc:
            raise RoiError(f"--roi must be six integers z1,y1,x1,z2,y2,x2, got {args.roi!r}") from exc
    vol = read_image(args.input, series_uid=args.series_uid)
    if args.checkpoint:
        kind = args.kind or ("image" if vol.is_2d else "image3d")
        spec = spec_from_checkpoint(args.checkpoint, kind)
    else:
        spec = get_preset(args.preset)
    tensor, geom = preprocess(vol, spec, roi=roi, margin=args.margin)
    np.save(args.out, tensor)
    record = {"tensor": {"path": str(args.out), "shape": list(tensor.shape), "dtype": str(tensor.dtype)},
              "spec": spec, "input": vol.geometry_dict(), "geometry": geom.to_dict()}
    sys.stdout.write(json.dumps(record, indent=2) + "\n")
    return 0
