"""Synthetic chest phantoms: CT volumes in HU with real geometry and radiograph-like 2D images.

Each phantom is drawn from its own random stream, ``numpy.random.SeedSequence([seed, split, index])``,
so a phantom is fully determined by (base seed, split, index) and the train / val / test splits
never share one. Anatomy: body outline, two lungs, heart, liver and spine, jittered per phantom.
Findings (0-2 per phantom, distinct kinds): nodule, mass, calcification (in a lung lobe),
cyst (in the liver) and pleural effusion (right or left). Contrast and sizes are chosen so that a
small model can see them at the demo input size ([32, 64, 64] for CT, 64x64 for 2D).

Array conventions follow :mod:`medmvl_core.imaging`: CT arrays are [k, j, i] = [slice, row, column]
with identity direction, so +i is the patient's left, +j posterior and +k superior (LPS). Boxes are
voxel boxes ``(k1, j1, i1, k2, j2, i2)`` (3D) or pixel boxes ``(j1, i1, j2, i2)`` (2D),
inclusive-exclusive.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medmvl_core.errors import DataError

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
_SPLIT_CODE = {"train": 11, "val": 23, "test": 37}
FINDING_KINDS = ("nodule", "mass", "calcification", "cyst", "effusion")
LUNG_KINDS = ("nodule", "mass", "calcification")
LOBES = ("right upper lobe", "right middle lobe", "right lower lobe", "left upper lobe", "left lower lobe")
LOCATIONS = LOBES + ("liver", "right pleural space", "left pleural space")

CT_SHAPE = (64, 96, 96)            # [k, j, i]
CT_SPACING = (3.5, 3.5, 5.0)       # (i, j, k) mm
XR_SHAPE = (128, 128)              # [j, i]
XR_SPACING = (2.6, 2.6)            # (i, j) mm

# Sizes (diameter, mm) are drawn from small sets so the report text is templated.
SIZES_MM = {"nodule": (20, 25, 30), "mass": (45, 55, 65), "calcification": (15, 20),
            "cyst": (25, 35, 45)}
EFFUSION_GRADES = ("small", "moderate", "large")
HU = {"air": -1000.0, "tissue": 40.0, "lung": -850.0, "heart": 45.0, "liver": 150.0, "bone": 700.0,
      "nodule": 60.0, "mass": 40.0, "calcification": 1000.0, "cyst": 0.0, "effusion": 15.0}


@dataclass
class Finding:
    """One finding. ``box`` is a voxel (3D) or pixel (2D) box, inclusive-exclusive."""

    kind: str
    location: str
    size_mm: int | None = None      # diameter; None for effusion
    grade: str | None = None        # effusion: small / moderate / large
    box: tuple[int, ...] = ()

    def to_dict(self) -> dict:
        return {"kind": self.kind, "location": self.location, "size_mm": self.size_mm,
                "grade": self.grade, "box": [int(v) for v in self.box]}


@dataclass
class Phantom:
    """A CT (array [k, j, i] in HU, float32) or a radiograph (array [j, i], uint8)."""

    id: str
    split: str
    index: int
    modality: str                   # "CT" | "XR"
    array: np.ndarray
    spacing: tuple[float, ...]      # (i, j, k) or (i, j), mm
    origin: tuple[float, ...]
    direction: tuple[float, ...]    # row-major 3x3 (CT) or 2x2
    findings: list[Finding] = field(default_factory=list)
    normal_box: tuple[int, ...] = ()  # a box of normal lung, for "what is in this box" negatives
    normal_location: str = ""         # the lobe that box lies in

    def truth(self) -> dict:
        """JSON-serialisable ground truth (no voxels)."""
        return {"id": self.id, "split": self.split, "index": self.index, "modality": self.modality,
                "shape": list(self.array.shape), "spacing": list(self.spacing),
                "findings": [f.to_dict() for f in self.findings],
                "normal_box": [int(v) for v in self.normal_box], "normal_location": self.normal_location}


def phantom_rng(seed: int, split: str, index: int, kind: str = "ct") -> np.random.Generator:
    """The random stream of phantom ``index`` of ``split`` (independent across splits and kinds)."""
    if split not in _SPLIT_CODE:
        raise DataError(f"unknown split {split!r}; use one of {list(SPLITS)}")
    if seed < 0 or index < 0:
        raise DataError(f"seed and index must be >= 0 (got seed={seed}, index={index})")
    kind_code = {"ct": 1, "xray": 2}[kind]
    return np.random.default_rng(np.random.SeedSequence([int(seed), _SPLIT_CODE[split], int(index), kind_code]))


def _choose_findings(rng: np.random.Generator, allowed: tuple[str, ...]) -> list[str]:
    count = int(rng.choice([0, 1, 2], p=[0.25, 0.5, 0.25]))
    return [str(k) for k in rng.choice(allowed, size=count, replace=False)]


# ----------------------------------------------------------------------------------------- CT
class _CTAnatomy:
    """Per-phantom anatomy in voxel coordinates (jittered), with the masks it needs."""

    def __init__(self, rng: np.random.Generator):
        d, h, w = CT_SHAPE
        self.k, self.j, self.i = np.meshgrid(np.arange(d, dtype=np.float32), np.arange(h, dtype=np.float32),
                                             np.arange(w, dtype=np.float32), indexing="ij")
        s = 1.0 + rng.uniform(-0.06, 0.06)
        cj, ci = h / 2 + rng.uniform(-2, 2), w / 2 + rng.uniform(-2, 2)
        self.body = self._ell2(cj, ci, 30 * s, 43 * s)
        self.lung_k = (22 + rng.uniform(-2, 2), 61 + rng.uniform(-1, 1))   # inferior, superior
        kc, kr = sum(self.lung_k) / 2, (self.lung_k[1] - self.lung_k[0]) / 2
        self.lung_center = {"right": (kc, cj - 2, ci - 18 * s), "left": (kc, cj - 2, ci + 18 * s)}
        self.lung_radii = (kr, 21 * s, 14 * s)
        heart = self._ell3((29 + rng.uniform(-2, 2), cj - 8, ci + 6 * s), (9, 11 * s, 12 * s))
        self.spine = ((self.j - (cj + 22 * s)) ** 2 + (self.i - ci) ** 2) <= (6 * s) ** 2
        self.lungs = {side: self._ell3(c, self.lung_radii) & ~heart for side, c in self.lung_center.items()}
        self.liver_center = (11 + rng.uniform(-1, 1), cj + 1, ci - 10 * s)
        self.liver_radii = (12.0, 20 * s, 26 * s)
        self.liver = self._ell3(self.liver_center, self.liver_radii) & self.body & ~self.spine
        self.heart = heart
        self.s = s

    def _ell2(self, cj, ci, rj, ri):
        return ((self.j - cj) / rj) ** 2 + ((self.i - ci) / ri) ** 2 <= 1.0

    def _ell3(self, c, r):
        return (((self.k - c[0]) / r[0]) ** 2 + ((self.j - c[1]) / r[1]) ** 2
                + ((self.i - c[2]) / r[2]) ** 2) <= 1.0

    def lobe_mask(self, lobe: str) -> np.ndarray:
        side = lobe.split()[0]
        k0, k1 = self.lung_k
        frac = (self.k - k0) / (k1 - k0)        # 0 inferior .. 1 superior
        level = lobe.split()[1]
        if side == "right":
            band = {"lower": frac < 0.4, "middle": (frac >= 0.4) & (frac < 0.65), "upper": frac >= 0.65}[level]
        else:
            band = {"lower": frac < 0.5, "upper": frac >= 0.5}[level]
        return self.lungs[side] & band


def _box_of(mask: np.ndarray) -> tuple[int, ...]:
    idx = np.nonzero(mask)
    return tuple(int(a.min()) for a in idx) + tuple(int(a.max()) + 1 for a in idx)


def _place_sphere(rng, an: _CTAnatomy, region: np.ndarray, container: np.ndarray, radius_mm: float,
                  tries: int = 60) -> np.ndarray | None:
    """A spherical mask (in mm, anisotropic voxels) centred in ``region``, mostly inside ``container``."""
    cand = np.argwhere(region)
    if len(cand) == 0:
        return None
    sx, sy, sz = CT_SPACING
    for _ in range(tries):
        k, j, i = cand[rng.integers(len(cand))]
        m = (((an.k - k) * sz) ** 2 + ((an.j - j) * sy) ** 2 + ((an.i - i) * sx) ** 2) <= radius_mm ** 2
        inside = (m & container).sum() / max(int(m.sum()), 1)
        if inside >= 0.97:
            return m
    return None


def make_ct_phantom(seed: int, split: str, index: int) -> Phantom:
    """Render CT phantom ``index`` of ``split``: float32 HU array [64, 96, 96] with findings."""
    rng = phantom_rng(seed, split, index)
    an = _CTAnatomy(rng)
    vol = np.full(CT_SHAPE, HU["air"], dtype=np.float32)
    vol[an.body] = HU["tissue"]
    vol[an.liver] = HU["liver"]
    for side in ("right", "left"):
        vol[an.lungs[side]] = HU["lung"]
    vol[an.heart & an.body] = HU["heart"]
    vol[an.spine & an.body] = HU["bone"]
    lung_all = an.lungs["right"] | an.lungs["left"]
    findings: list[Finding] = []
    kinds = _choose_findings(rng, FINDING_KINDS)
    # Effusion first so lung lesions are placed in the remaining aerated lung.
    kinds.sort(key=lambda k: k != "effusion")
    aerated = lung_all.copy()
    used_lobes: set[str] = set()
    for kind in kinds:
        if kind == "effusion":
            side = str(rng.choice(["right", "left"]))
            grade = str(rng.choice(EFFUSION_GRADES))
            kfrac, jfrac = {"small": (0.28, 0.1), "moderate": (0.42, -0.25), "large": (0.58, -0.55)}[grade]
            k0, k1 = an.lung_k
            cj = an.lung_center[side][1]
            region = an.lungs[side] & (an.k <= k0 + kfrac * (k1 - k0)) & (an.j >= cj + jfrac * an.lung_radii[1])
            vol[region] = HU["effusion"]
            aerated &= ~region
            findings.append(Finding("effusion", f"{side} pleural space", grade=grade, box=_box_of(region)))
            continue
        size = int(rng.choice(SIZES_MM[kind]))
        if kind == "cyst":
            shrunk = an._ell3(an.liver_center, tuple(r * 0.55 for r in an.liver_radii)) & an.liver
            m = _place_sphere(rng, an, shrunk, an.liver, size / 2)
            loc = "liver"
        else:
            m, loc = None, ""
            for lobe in [str(x) for x in rng.permutation(LOBES)]:
                if lobe in used_lobes:
                    continue
                m = _place_sphere(rng, an, an.lobe_mask(lobe) & aerated, aerated, size / 2)
                if m is not None:
                    loc = lobe
                    break
        if m is None:
            logger.debug("could not place a %s in phantom %s-%d; skipped", kind, split, index)
            continue
        used_lobes.add(loc)
        vol[m] = HU[kind]
        aerated &= ~m
        findings.append(Finding(kind, loc, size_mm=size, box=_box_of(m)))
    vol += rng.normal(0.0, 12.0, size=vol.shape).astype(np.float32) * an.body
    findings.sort(key=lambda f: LOCATIONS.index(f.location))
    normal_lobe = str(rng.choice(LOBES))
    normal_box = _normal_box(rng, an.lobe_mask(normal_lobe) & aerated, radius=(2, 4, 4))
    origin = (-CT_SPACING[0] * CT_SHAPE[2] / 2 + rng.uniform(-20, 20),
              -CT_SPACING[1] * CT_SHAPE[1] / 2 + rng.uniform(-20, 20), -900.0 + rng.uniform(-50, 50))
    return Phantom(id=f"ct-{split}-{index:05d}", split=split, index=index, modality="CT", array=vol,
                   spacing=CT_SPACING, origin=tuple(float(o) for o in origin),
                   direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0), findings=findings,
                   normal_box=normal_box, normal_location=normal_lobe)


def _normal_box(rng, mask: np.ndarray, radius: tuple[int, ...]) -> tuple[int, ...]:
    """A small box centred on a random voxel of ``mask`` (clipped to the array)."""
    cand = np.argwhere(mask)
    if len(cand) == 0:
        cand = np.argwhere(np.ones_like(mask))
    c = cand[rng.integers(len(cand))]
    lo = [max(0, int(v) - r) for v, r in zip(c, radius)]
    hi = [min(n, int(v) + r + 1) for v, r, n in zip(c, radius, mask.shape)]
    return tuple(lo) + tuple(hi)


# ----------------------------------------------------------------------------------------- 2D
def make_xray_phantom(seed: int, split: str, index: int) -> Phantom:
    """Render a frontal radiograph-like phantom: uint8 array [128, 128] (patient's right at low i)."""
    rng = phantom_rng(seed, split, index, "xray")
    h, w = XR_SHAPE
    j, i = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32), indexing="ij")
    s = 1.0 + rng.uniform(-0.06, 0.06)
    cj, ci = h / 2 + rng.uniform(-3, 3), w / 2 + rng.uniform(-3, 3)

    def ell(c0, c1, r0, r1):
        return ((j - c0) / r0) ** 2 + ((i - c1) / r1) ** 2 <= 1.0

    img = np.zeros(XR_SHAPE, dtype=np.float32)
    body = ell(cj + 4, ci, 62 * s, 56 * s)
    img[body] = 0.55
    lung_c = {"right": (cj - 10, ci - 24 * s), "left": (cj - 10, ci + 24 * s)}
    lung_r = (40 * s, 17 * s)
    heart = ell(cj + 16, ci + 8 * s, 18 * s, 22 * s)
    lungs = {sd: ell(*c, *lung_r) & ~heart for sd, c in lung_c.items()}
    for m in lungs.values():
        img[m] = 0.15
    img[heart] = 0.6
    liver = ell(cj + 44, ci - 14 * s, 14 * s, 34 * s) & body & ~lungs["right"] & ~heart
    img[liver] = 0.68
    spine = (np.abs(i - ci) <= 5 * s) & body
    img[spine] = np.maximum(img[spine], 0.78)
    lung_top, lung_bot = cj - 10 - lung_r[0], cj - 10 + lung_r[0]
    frac = (lung_bot - j) / (lung_bot - lung_top)     # 0 inferior .. 1 superior

    def lobe_mask(lobe: str) -> np.ndarray:
        side, level = lobe.split()[:2]
        if side == "right":
            band = {"lower": frac < 0.4, "middle": (frac >= 0.4) & (frac < 0.65), "upper": frac >= 0.65}[level]
        else:
            band = {"lower": frac < 0.5, "upper": frac >= 0.5}[level]
        return lungs[side] & band

    aerated = lungs["right"] | lungs["left"]
    findings: list[Finding] = []
    kinds = _choose_findings(rng, FINDING_KINDS)
    kinds.sort(key=lambda k: k != "effusion")
    used: set[str] = set()
    px = XR_SPACING[0]
    for kind in kinds:
        if kind == "effusion":
            side = str(rng.choice(["right", "left"]))
            grade = str(rng.choice(EFFUSION_GRADES))
            level = {"small": 0.18, "moderate": 0.32, "large": 0.48}[grade]
            lateral = (i - ci) * (1 if side == "left" else -1)
            # Meniscus: the fluid line rises toward the lateral chest wall.
            surface = lung_bot - level * (lung_bot - lung_top) - 0.25 * np.maximum(lateral - 12 * s, 0)
            region = lungs[side] & (j >= surface)
            img[region] = 0.55
            aerated &= ~region
            findings.append(Finding("effusion", f"{side} pleural space", grade=grade, box=_box_of(region)))
            continue
        size = int(rng.choice(SIZES_MM[kind]))
        r = size / 2 / px
        if kind == "cyst":
            liver_core = liver & ell(cj + 46, ci - 18 * s, 6 * s, 18 * s)
            container, cand_lobes = liver, ["liver"]
        else:
            cand_lobes = [str(x) for x in rng.permutation(LOBES) if x not in used]
            container = aerated
        m = None
        for lobe in cand_lobes:
            region = liver_core if lobe == "liver" else lobe_mask(lobe) & aerated
            cand = np.argwhere(region)
            for _ in range(60 if len(cand) else 0):
                c = cand[rng.integers(len(cand))]
                mm = (j - c[0]) ** 2 + (i - c[1]) ** 2 <= r ** 2
                if (mm & container).sum() >= 0.97 * mm.sum():
                    m, loc = mm, lobe
                    break
            if m is not None:
                break
        if m is None:
            continue
        used.add(loc)
        img[m] = {"nodule": 0.62, "mass": 0.6, "calcification": 0.97, "cyst": 0.4}[kind]
        aerated &= ~m
        findings.append(Finding(kind, loc, size_mm=size, box=_box_of(m)))
    img = _blur2d(img) + rng.normal(0, 0.02, size=img.shape).astype(np.float32)
    findings.sort(key=lambda f: LOCATIONS.index(f.location))
    normal_lobe = str(rng.choice(LOBES))
    normal_box = _normal_box(rng, lobe_mask(normal_lobe) & aerated, radius=(5, 5))
    arr = np.clip(img * 255.0, 0, 255).astype(np.uint8)
    return Phantom(id=f"xr-{split}-{index:05d}", split=split, index=index, modality="XR", array=arr,
                   spacing=XR_SPACING, origin=(0.0, 0.0), direction=(1.0, 0.0, 0.0, 1.0),
                   findings=findings, normal_box=normal_box, normal_location=normal_lobe)


def _blur2d(img: np.ndarray) -> np.ndarray:
    """3x3 binomial blur (edges replicated) to soften drawn outlines."""
    p = np.pad(img, 1, mode="edge")
    k = np.array([1.0, 2.0, 1.0], dtype=np.float32) / 4
    rows = k[0] * p[:-2] + k[1] * p[1:-1] + k[2] * p[2:]
    return k[0] * rows[:, :-2] + k[1] * rows[:, 1:-1] + k[2] * rows[:, 2:]


def make_phantom(kind: str, seed: int, split: str, index: int) -> Phantom:
    """``kind`` "ct" or "xray"."""
    if kind == "ct":
        return make_ct_phantom(seed, split, index)
    if kind == "xray":
        return make_xray_phantom(seed, split, index)
    raise DataError(f"unknown phantom kind {kind!r}; use 'ct' or 'xray'")


# -------------------------------------------------------------------------------------- writing
def write_phantom(ph: Phantom, out_dir: Path, dicom: bool = False) -> str:
    """Write the image under ``out_dir``; returns its file name (relative to ``out_dir``).

    CT: ``<id>.nii.gz`` (int16 HU, spacing/origin/direction set) and, with ``dicom``, a series in
    ``<id>_dicom/``. Radiograph: ``<id>.png`` (8-bit grey).
    """
    import SimpleITK as sitk

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if ph.modality == "XR":
        from PIL import Image

        name = f"{ph.id}.png"
        Image.fromarray(ph.array, mode="L").save(out_dir / name)
        return name
    img = sitk.GetImageFromArray(np.round(ph.array).astype(np.int16))
    img.SetSpacing(ph.spacing)
    img.SetOrigin(ph.origin)
    img.SetDirection(ph.direction)
    name = f"{ph.id}.nii.gz"
    sitk.WriteImage(img, str(out_dir / name))
    if dicom:
        write_dicom_series(img, out_dir / f"{ph.id}_dicom", series_description=ph.id)
    return name


def write_dicom_series(img, folder: Path, series_description: str = "phantom") -> None:
    """Write a SimpleITK int16 CT volume as one DICOM file per slice (synthetic UIDs, no patient data)."""
    import SimpleITK as sitk

    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    root = "1.2.826.0.1.3680043.2.1125"
    uid = int(hashlib.sha256(series_description.encode()).hexdigest()[:12], 16)
    direction = img.GetDirection()
    tags = [("0008|0060", "CT"), ("0008|103e", series_description), ("0010|0010", "PHANTOM^SYNTHETIC"),
            ("0010|0020", "PHANTOM"), ("0020|000d", f"{root}.1.{uid}"), ("0020|000e", f"{root}.2.{uid}"),
            ("0020|0037", "\\".join(f"{v:.6f}" for v in direction[0::3] + direction[1::3])),
            ("0028|1052", "0"), ("0028|1053", "1")]
    for z in range(img.GetDepth()):
        sl = img[:, :, z]
        for tag, val in tags:
            sl.SetMetaData(tag, val)
        pos = img.TransformIndexToPhysicalPoint((0, 0, z))
        sl.SetMetaData("0020|0032", "\\".join(f"{p:.4f}" for p in pos))
        sl.SetMetaData("0020|0013", str(z + 1))
        sl.SetMetaData("0008|0018", f"{root}.3.{uid}.{z + 1}")
        sl.SetMetaData("0018|0050", f"{img.GetSpacing()[2]:.4f}")
        writer.SetFileName(str(folder / f"slice_{z:04d}.dcm"))
        writer.Execute(sl)
