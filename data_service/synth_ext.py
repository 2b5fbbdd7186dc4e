"""External phantom chest-CT generator: a second source, designed apart from ``data_service.synth``.

    python -m data_service.synth_ext --out DIR --n N [--seed S] [--valid-fraction 0.3] [--workers W]
        [--heldout-wording second|first] [--voxel-scale 1.0]

It writes the same CT-RATE layout as ``synth`` (volumes, ``segmentations/`` with 1 lung 2 heart
3 aorta 4 bone, reports / labels / metadata CSVs, ``train`` and ``valid``), so that
``python -m data_service.ingest --source ctrate`` reads it, and plants the same eight findings
(``synth.PLANTED``), each independently with ~35 % prevalence. Everything else differs the way
another hospital's patients and scanners would (docs/design.md, "External phantom generator"):

* patients: body habitus from lean to obese (fat thickness, chest width and depth), sex and age
  (breasts, bone density, aortic calibre), superellipse cross-sections with a deformed lung
  surface, diaphragm domes, a rotated heart sized by its cardiothoracic ratio, an aorta with
  arch, trachea and bronchi, lung vessels, vertebrae with discs, sloping ribs, sternum, scapulae;
* scanners: field of view, matrix and slice spacing (1.5-5 mm) per scan, slice-profile and
  kernel blur, a per-scan HU gain (0.97-1.03) and offset (+-15 HU), correlated noise that rises
  with body size, cupping (beam hardening) and low-frequency shading, a patient table, and three
  ways of storing the values (plain HU, raw + RescaleIntercept, header-scaled);
* findings drawn as radiology describes them, with sizes and places that vary (lobe, side,
  extent) and are measured into the report;
* reports: their own wording (no sentence in common with ``synth``'s banks), anatomical order,
  measurements, a Findings and an Impression. Held-out (valid) reports use a second bank here too.

Each case is a pure function of (seed, case index): anatomy, each finding, the scanner and the
report draw from their own generators, so toggling one finding leaves the rest of the case as it
was (the tests use that). One volume is in memory per worker.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

from common.labels import FINDINGS
from data_service.synth import (
    PLANTED,
    ctrate_row,
    generator_parser,
    parse_generator_args,
    run_cases,
    write_ctrate_tables,
)

ORIENTATIONS = ("LPS", "LPS", "LPI", "RAS", "LAS", "RPI", "PLS")
VENDORS = ("Helix Systems", "Aurora Medical", "Northwind Imaging")
MAX_VOXELS = 4_200_000          # per volume at voxel_scale 1: the slice spacing grows to stay under it
# tissue codes of the optional tissue map (tests; ``make_case(..., tissue=True)``)
AIR, FAT, SOFT, LUNG, BONE, FLUID, CALC, LESION, LAA, TABLE, GAS, HERNIA = range(12)


# --------------------------------------------------------------------------------- geometry
class _Grid:
    """World millimetres (RAS, origin at the volume centre) of a voxel grid."""

    def __init__(self, spacing, shape):
        self.spacing, self.shape = tuple(float(s) for s in spacing), tuple(int(n) for n in shape)
        self.ax = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(self.shape, self.spacing)]

    def box(self, lo, hi):
        """Slices of the voxels whose centres lie in [lo, hi] (mm), clipped; None if empty."""
        out = []
        for a, s, n, l_, h_ in zip(self.ax, self.spacing, self.shape, lo, hi):
            i0 = max(0, int(np.floor((l_ - a[0]) / s)))
            i1 = min(n, int(np.ceil((h_ - a[0]) / s)) + 1)
            if i1 <= i0:
                return None
            out.append(slice(i0, i1))
        return tuple(out)

    def coords(self, sl=None):
        sl = sl or (slice(None),) * 3
        x, y, z = (a[s] for a, s in zip(self.ax, sl))
        return x[:, None, None], y[None, :, None], z[None, None, :]


def _basis(direction):
    """Orthonormal frame whose first axis is ``direction``."""
    d1 = np.asarray(direction, float)
    d1 = d1 / np.linalg.norm(d1)
    ref = np.array([0.0, 0.0, 1.0]) if abs(d1[2]) < 0.9 else np.array([1.0, 0.0, 0.0])
    d2 = np.cross(ref, d1)
    d2 /= np.linalg.norm(d2)
    return np.stack([d1, d2, np.cross(d1, d2)])


def _superquadric(X, Y, Z, c, axes, frame, e):
    """sum_i |u_i / a_i|^e of the point in the body frame: < 1 inside (a superellipsoid)."""
    dx, dy, dz = X - c[0], Y - c[1], Z - c[2]
    f = 0.0
    for row, a in zip(frame, axes):
        f = f + np.abs((row[0] * dx + row[1] * dy + row[2] * dz) / a) ** e
    return f


def _segment_dist(X, Y, Z, p0, p1):
    d = np.asarray(p1, float) - np.asarray(p0, float)
    L2 = max(float(d @ d), 1e-9)
    t = np.clip(((X - p0[0]) * d[0] + (Y - p0[1]) * d[1] + (Z - p0[2]) * d[2]) / L2, 0.0, 1.0)
    return np.sqrt((X - p0[0] - t * d[0]) ** 2 + (Y - p0[1] - t * d[1]) ** 2 + (Z - p0[2] - t * d[2]) ** 2)


def _tree(rng, root, direction, r0, length, generations):
    """Branching tube segments (p0, p1, radius): vessels or bronchi from a hilum."""
    out, stack = [], [(np.asarray(root, float), np.asarray(direction, float), r0, length, generations)]
    while stack:
        p, d, r, L, g = stack.pop()
        d = d / np.linalg.norm(d)
        q = p + d * L
        out.append((p, q, r))
        if g > 1:
            fr = _basis(d)
            for sgn in (-1, 1):
                ang = np.deg2rad(rng.uniform(22, 42))
                roll = rng.uniform(0, 2 * np.pi)
                perp = np.cos(roll) * fr[1] + np.sin(roll) * fr[2]
                nd = np.cos(ang) * d + sgn * np.sin(ang) * perp
                stack.append((q, nd, r * 0.72, L * rng.uniform(0.65, 0.8), g - 1))
    return out


def _lowfreq(rng, shape, cell_vox):
    """A smooth random field of about unit SD, correlation length ~``cell_vox`` voxels."""
    cshape = [max(2, int(np.ceil(n / max(c, 1.0))) + 2) for n, c in zip(shape, cell_vox)]
    g = rng.standard_normal(cshape).astype(np.float32)
    out = ndimage.zoom(g, [n / c for n, c in zip(shape, cshape)], order=1)
    out = out[tuple(slice(0, n) for n in shape)]
    if out.shape != tuple(shape):
        out = np.pad(out, [(0, n - m) for n, m in zip(shape, out.shape)], mode="edge")
    return out


def _fine_noise(rng, shape, sigma):
    """Correlated (Gaussian-smoothed) noise of unit SD."""
    n = rng.standard_normal(shape, dtype=np.float32)
    ndimage.gaussian_filter(n, sigma, output=n, mode="nearest", truncate=3.0)
    n /= max(float(n.std()), 1e-6)
    return n


# ---------------------------------------------------------------------------------- patient
def draw_patient(rng: np.random.Generator, findings: dict[str, int], voxel_scale: float = 1.0) -> dict:
    """The patient's anatomy and the scanner's geometry (no voxels)."""
    P: dict = {}
    h = float(rng.beta(2.0, 2.0))                       # habitus: 0 lean .. 1 obese
    male = bool(rng.random() < 0.5)
    age = int(rng.integers(32, 88))
    emph = bool(findings["Emphysema"])
    W = 132 + 48 * h + (8 if male else 0) + rng.normal(0, 4)            # skin half-width (mm)
    ratio = rng.uniform(0.60, 0.74) + 0.06 * h + (0.05 if emph else 0.0)  # depth / width (barrel chest)
    D = W * ratio
    ant = rng.uniform(0.46, 0.52)
    fat = 4 + 34 * h ** 1.4 + rng.uniform(0, 4)
    m_lat, m_ant, m_post, rib_t = rng.uniform(9, 16), rng.uniform(8, 14), rng.uniform(38, 55), rng.uniform(6, 9)
    x0, y0 = rng.uniform(-12, 12), rng.uniform(-10, 20)                  # patient off the isocentre
    P.update(h=h, male=male, age=age, W=W, D_ant=2 * D * ant, D_post=2 * D * (1 - ant), p_skin=rng.uniform(2.1, 2.8),
             fat=fat, fat_var=rng.uniform(0.0, 0.35), rib_t=rib_t, x0=x0, y0=y0)
    top = y0 + P["D_ant"] - fat - m_ant - rib_t
    bot = y0 - P["D_post"] + 0.6 * fat + m_post
    P.update(Wc=W - fat - m_lat - rib_t, ycc=(top + bot) / 2, Dc=(top - bot) / 2, p_cav=rng.uniform(2.0, 2.5))
    P["xmed"] = x0 + rng.normal(0, 3)
    # heights: lung apex, domes (right higher), arch, carina
    H = 175 + 45 * rng.random() + (15 if male else 0) + (20 if emph else 0) - 15 * h
    m_top, m_bot = rng.uniform(5, 30), rng.uniform(55, 95)
    Lz = m_top + H + m_bot
    z_ap = Lz / 2 - m_top
    zR = z_ap - H
    zL = zR - rng.uniform(8, 22)
    dome = rng.uniform(25, 40) * (0.5 if emph else 1.0)
    P.update(H=H, Lz=Lz, z_ap=z_ap, zR=zR, zL=zL, dome=dome, apex_cap=rng.uniform(45, 70),
             w_top=rng.uniform(16, 24) + 5 * h, w_hil=rng.uniform(30, 40))
    # spine, airway, oesophagus
    r_vb = rng.uniform(14, 19) + (2 if male else 0)
    P.update(r_vb=r_vb, y_vb=P["ycc"] - P["Dc"] + r_vb * rng.uniform(0.4, 0.8), pitch=rng.uniform(25, 31),
             disc=float(np.clip(rng.uniform(4, 8) - 0.03 * (age - 50), 2.5, 8)), z_phase=rng.uniform(0, 30),
             canc=float(np.clip(330 - 3.2 * (age - 30) + rng.normal(0, 25), 110, 360)), cortex=rng.uniform(650, 950),
             rib_hu=rng.uniform(420, 720), rib_h=rng.uniform(8, 12), rib_drop=rng.uniform(45, 80),
             cart=rng.uniform(20, 30))
    P["y_tr"] = P["y_vb"] + r_vb + rng.uniform(14, 22)
    P["r_tr"] = rng.uniform(7, 9.5) + (1.5 if male else 0)
    P["x_oe"], P["r_oe"] = P["xmed"] + rng.uniform(2, 8), rng.uniform(7, 10)
    # heart: the cardiothoracic ratio is the finding; shape and tilt are the patient's
    P["ctr_target"] = rng.uniform(0.53, 0.68) if findings["Cardiomegaly"] else rng.uniform(0.39, 0.47)
    P.update(h_ratio=(rng.uniform(0.72, 0.86), rng.uniform(0.62, 0.75)), h_yaw=np.deg2rad(rng.uniform(28, 50)),
             h_pitch=np.deg2rad(rng.uniform(15, 35)), h_e=rng.uniform(2.0, 2.4), h_left=rng.uniform(0.2, 0.45),
             h_gap=rng.uniform(2, 12), h_sink=rng.uniform(0.8, 0.95), epi_fat=1.5 + 5 * h + rng.uniform(0, 1.5))
    # aorta (calibre grows with age)
    R_a = float(np.clip(rng.uniform(13, 16.5) + 0.06 * (age - 50), 12, 21))
    P.update(R_a=R_a, R_d=R_a * rng.uniform(0.72, 0.85), x_asc=P["xmed"] - rng.uniform(5, 15),
             y_asc=min(P["y_tr"] + rng.uniform(30, 42), P["ycc"] + P["Dc"] - R_a - 14), arch_drop=rng.uniform(50, 80),
             phi_top=np.deg2rad(rng.uniform(30, 50)), phi_bot=np.deg2rad(rng.uniform(70, 85)))
    # tissues
    P.update(fat_hu=rng.uniform(-115, -85), muscle_hu=rng.uniform(38, 55), medfat_hu=rng.uniform(-105, -75),
             blood_hu=rng.uniform(36, 50), lung_hu=rng.uniform(-875, -820) - (20 if emph else 0),
             lung_grad=rng.uniform(20, 70), liver_hu=rng.uniform(50, 65) if (h < 0.65 or rng.random() < 0.5)
             else rng.uniform(5, 40), table=bool(rng.random() < 0.85))
    P["steatosis"] = P["liver_hu"] < 45
    P["breasts"] = (not male) and rng.random() < 0.9
    P["breast_r"] = (rng.uniform(40, 60) + 20 * h, rng.uniform(18, 30) + 25 * h, rng.uniform(40, 55))
    # scanner
    P["vendor"] = str(rng.choice(VENDORS))
    P["kernel"] = "sharp" if rng.random() < 0.45 else "soft"
    fov = float(np.clip(2 * (W + 10) + rng.uniform(30, 80), 320, 500))
    N = int(round(int(rng.choice([128, 144, 160])) / voxel_scale))
    sxy = round(fov / N, 3)
    sz = float(rng.choice([1.5, 2.0, 2.5, 3.0, 4.0, 5.0], p=[0.1, 0.2, 0.2, 0.2, 0.15, 0.15])) * voxel_scale
    while N * N * Lz / sz > MAX_VOXELS / voxel_scale ** 3:
        sz += 0.5 * voxel_scale
    P.update(spacing=(sxy, sxy, sz), shape=(N, N, int(np.ceil(Lz / sz))), thickness=round(sz * rng.uniform(1.0, 1.5), 2),
             gain=rng.uniform(0.97, 1.03), offset=rng.uniform(-15, 15), cupping=rng.uniform(0, 25),
             shading=rng.uniform(2, 8), storage=str(rng.choice(["hu", "raw", "header"])),
             axcodes=str(rng.choice(ORIENTATIONS)), origin=(rng.uniform(-20, 20), rng.uniform(-220, -150),
                                                            rng.uniform(-700, -300)))
    soft = P["kernel"] == "soft"
    P["psf"] = rng.uniform(0.55, 0.8) if soft else rng.uniform(0.3, 0.45)
    P["noise_sd"] = float(min(30.0, (rng.uniform(8, 13) if soft else rng.uniform(15, 22)) * (W / 150) ** 1.5))
    P["noise_corr"] = rng.uniform(0.5, 0.9) if soft else rng.uniform(0.3, 0.5)
    return P


def _lobe_of(P, right, x, y, z):
    """CT lobe names of points of one lung (fissures: an oblique plane through the hilum rising
    posteriorly; on the right a horizontal one above the middle lobe)."""
    z_h, y_h = P["z_car"] - 25, P["y_tr"]
    lower = z < z_h + P["fissure"] * (y_h - y)
    if right:
        middle = ~lower & (z < z_h + 12) & (y > y_h - 15)
        return np.where(lower, "right lower lobe", np.where(middle, "right middle lobe", "right upper lobe"))
    lingula = ~lower & (z < z_h - 5) & (y > y_h)
    return np.where(lower, "left lower lobe", np.where(lingula, "lingula", "left upper lobe"))


_LOBE_IDS = ("right upper lobe", "right middle lobe", "right lower lobe", "left upper lobe", "lingula",
             "left lower lobe")


# --------------------------------------------------------------------------------- rendering
def make_case(seed: int, idx: int, findings: dict[str, int], voxel_scale: float = 1.0, tissue: bool = False):
    """One phantom: (hu float32 (i,j,k) in RAS voxel order, organ mask uint8, details dict[, tissue]).

    Anatomy, each finding, the scanner noise and the report have their own generators seeded by
    (seed, idx, stream), so switching one finding changes only what that finding draws."""
    rng = np.random.default_rng([seed, idx, 1])
    P = draw_patient(rng, findings, voxel_scale)
    frng = {f: np.random.default_rng([seed, idx, 10 + k]) for k, f in enumerate(PLANTED)}
    G = _Grid(P["spacing"], P["shape"])
    X, Y, Z = G.coords()
    x2, y2 = np.meshgrid(G.ax[0], G.ax[1], indexing="ij")
    z1 = Z[0, 0]
    shape = G.shape
    hu = np.full(shape, -1000.0, np.float32)
    tis = np.zeros(shape, np.uint8)
    org = np.zeros(shape, np.uint8)
    det: dict = {"spacing": G.spacing, "shape": shape, "thickness": P["thickness"], "kernel": P["kernel"],
                 "vendor": P["vendor"], "storage": P["storage"], "axcodes": P["axcodes"], "sex": "M" if P["male"] else "F",
                 "age": P["age"], "habitus": round(P["h"], 3), "steatosis": bool(P["steatosis"])}

    def put(sel, value, code, organ=None, sl=None):
        h_, t_, o_ = (hu, tis, org) if sl is None else (hu[sl], tis[sl], org[sl])
        h_[sel] = value if np.isscalar(value) else value[sel]
        t_[sel] = code
        if organ is not None:
            o_[sel] = organ

    # ---- skin, fat, muscle; cavity
    xs, ys = x2 - P["x0"], y2 - P["y0"]
    th = np.arctan2(ys, xs)
    rr = np.hypot(xs, ys)
    yd = np.where(ys >= 0, P["D_ant"], P["D_post"])
    rho_s = (np.abs(xs / P["W"]) ** P["p_skin"] + np.abs(ys / yd) ** P["p_skin"]) ** (1 / P["p_skin"])
    rho_s = rho_s * (1 + 0.015 * np.cos(3 * th + 1.0))
    taper = 1 + 0.05 * np.clip((z1 - (P["z_ap"] - 40)) / 60, 0, 1) + 0.05 * P["h"] * np.clip((P["zR"] - 20 - z1) / 60, 0, 1)
    body = rho_s[:, :, None] <= taper[None, None, :]
    if P["table"]:
        yt = P["y0"] - P["D_post"] - rng.uniform(3, 20)
        ty = yt + 0.0012 * x2 ** 2
        slab = (y2 < ty) & (y2 > ty - rng.uniform(5, 10)) & (np.abs(x2) < 210)
        tab = np.broadcast_to(slab[:, :, None], shape) & ~body
        put(tab, rng.uniform(100, 300), TABLE)
    put(body, P["fat_hu"], FAT)
    if P["breasts"]:
        for s in (-1, 1):
            c = (P["x0"] + s * 0.42 * P["W"], P["y0"] + P["D_ant"] - 0.3 * P["breast_r"][1],
                 P["zR"] + rng.uniform(40, 80))
            sl = G.box(np.subtract(c, P["breast_r"]), np.add(c, P["breast_r"]))
            if sl is not None:
                bx, by, bz = G.coords(sl)
                q = ((bx - c[0]) / P["breast_r"][0]) ** 2 + ((by - c[1]) / P["breast_r"][1]) ** 2 + ((bz - c[2]) / P["breast_r"][2]) ** 2
                put((q <= 1) & (by > c[1] - P["breast_r"][1] * 0.2), P["fat_hu"] + 5, FAT, sl=sl)
                put((q <= 0.35) & (by > c[1]), rng.uniform(0, 35), SOFT, sl=sl)
    d_in = rr * (1 / np.maximum(rho_s, 1e-6) - 1)                        # mm inside the skin, along the ray
    fat_local = P["fat"] * (1 + P["fat_var"] * np.sin(th))
    muscle2d = d_in > fat_local
    put(body & muscle2d[:, :, None], P["muscle_hu"], SOFT)
    xc, yc = x2 - P["xmed"], y2 - P["ycc"]
    rho_c = (np.abs(xc / P["Wc"]) ** P["p_cav"] + np.abs(yc / P["Dc"]) ** P["p_cav"]) ** (1 / P["p_cav"])
    rr_c = np.hypot(xc, yc)
    d_out = rr_c * (1 - 1 / np.maximum(rho_c, 1e-6))                      # mm outside the cavity contour
    th_c = np.arctan2(yc, xc)
    # diaphragm domes (right higher), emphysema flattens them (in P)
    dia = np.empty_like(x2)
    for right, zp in ((True, P["zR"]), (False, P["zL"])):
        xd = P["xmed"] + (-0.5 if right else 0.5) * P["Wc"]
        q = ((x2 - xd) / (0.75 * P["Wc"])) ** 2 + ((y2 - P["ycc"] - 0.15 * P["Dc"]) / (1.1 * P["Dc"])) ** 2
        surf = zp - P["dome"] * np.minimum(q, 1.6)
        side = x2 < P["xmed"] if right else x2 >= P["xmed"]
        dia[side] = surf[side]
    cavity2d = rho_c <= 1
    above = Z > dia[:, :, None]
    cav3 = np.broadcast_to(cavity2d[:, :, None], shape)
    put(cav3 & above, P["medfat_hu"], FAT)
    # upper abdomen: liver right, soft tissue left, stomach with its normal fundal gas
    abd = cav3 & ~above
    liver = abd & (X < P["xmed"] + 25 + 10 * np.sin(Y / 30))
    put(abd, rng.uniform(38, 48), SOFT)
    put(liver, P["liver_hu"], SOFT)
    cst = (P["xmed"] + 0.45 * P["Wc"], P["ycc"] + 0.1 * P["Dc"], P["zL"] - 35)
    rst = (rng.uniform(22, 34), rng.uniform(18, 28), rng.uniform(15, 22))
    sl = G.box(np.subtract(cst, rst), np.add(cst, rst))
    if sl is not None:
        sx_, sy_, sz_ = G.coords(sl)
        q = ((sx_ - cst[0]) / rst[0]) ** 2 + ((sy_ - cst[1]) / rst[1]) ** 2 + ((sz_ - cst[2]) / rst[2]) ** 2
        inside = (q <= 1) & abd[sl]
        put(inside, rng.uniform(5, 25), FLUID, sl=sl)
        put(inside & (sy_ > cst[1] + rst[1] * rng.uniform(0.3, 0.7)), -1000.0, GAS, sl=sl)

    # ---- heart geometry (sized to the cardiothoracic ratio), pericardium layers
    d1 = np.array([np.cos(P["h_pitch"]) * np.cos(P["h_yaw"]), np.cos(P["h_pitch"]) * np.sin(P["h_yaw"]),
                   -np.sin(P["h_pitch"])])
    frame = _basis(d1)
    ratios = np.array([1.0, *P["h_ratio"]])

    def heart_axes(a):    # an enlarging heart grows mostly across: its height stays near a normal one's
        a_cap = 0.47 * P["Wc"] / np.sqrt(((frame * ratios[:, None]) ** 2).sum(0))[0]
        return np.array([a, ratios[1] * a, ratios[2] * min(a, a_cap * 1.1)])

    a = P["ctr_target"] * P["Wc"] / np.sqrt(((frame * ratios[:, None]) ** 2).sum(0))[0]
    peri = findings["Pericardial effusion"]
    y_back = P["y_vb"] + P["r_vb"] + 2 * P["r_oe"] + 4        # the posterior mediastinum stays the heart's border
    pr = frng["Pericardial effusion"]
    t_eff = pr.uniform(4, 16) if peri else 0.0
    for it in range(3):                                                   # render, measure, rescale
        axes = heart_axes(a)
        e = np.sqrt(((frame * axes[:, None]) ** 2).sum(0))                # x, y, z half-extents
        hc = np.array([P["xmed"] + P["h_left"] * e[0], P["ycc"] + P["Dc"] - P["h_gap"] - e[1],
                       P["zL"] + P["h_sink"] * e[2]])
        outer = P["epi_fat"] + t_eff + 2.0
        sl_h = G.box(hc - e - outer - 2, hc + e + outer + 2)
        hx, hy, hz = G.coords(sl_h)
        floor = (hz > dia[sl_h[0], sl_h[1]][:, :, None] - 8) & (hy > y_back)
        heart = (_superquadric(hx, hy, hz, hc, axes, frame, P["h_e"]) <= 1) & floor
        cols = np.flatnonzero(heart.any(axis=(1, 2)))
        width = (cols.max() - cols.min() + 1) * G.spacing[0] if cols.size else 1.0
        ctr = width / (2 * P["Wc"])
        if abs(ctr - P["ctr_target"]) < 0.01 or it == 2:
            break
        a *= P["ctr_target"] / ctr
    det["ctr"] = round(float(ctr), 2)
    shift = np.array([0.0, -0.35, -0.25]) * t_eff                        # fluid gathers posteriorly, inferiorly
    sac_out = (_superquadric(hx, hy, hz, hc + shift, axes + outer, frame, P["h_e"]) <= 1) & floor
    heart_top = float(hc[2] + e[2])

    # ---- aorta: ascending, arch (a horizontal half-torus left of the trachea), descending
    P["z_arch"] = float(np.clip(max(P["z_ap"] - P["arch_drop"], heart_top + P["R_a"] + 5), None, P["z_ap"] - 30))
    P["z_car"] = P["z_arch"] - rng.uniform(15, 30)
    P["fissure"] = rng.uniform(0.7, 1.1)
    rad = P["r_vb"] + P["R_d"] + 7

    def desc_c(z):
        t = np.clip((P["z_arch"] - z) / max(P["z_arch"] - (P["zR"] - 40), 1.0), 0, 1)
        phi = P["phi_top"] + (P["phi_bot"] - P["phi_top"]) * t
        return P["xmed"] + rad * np.cos(phi), P["y_vb"] + rad * np.sin(phi)

    dcx, dcy = desc_c(z1)
    pa, pd = np.array([P["x_asc"], P["y_asc"]]), np.array([float(v) for v in desc_c(P["z_arch"])])
    tc = (pa + pd) / 2
    Rt = float(np.linalg.norm(pd - pa) / 2)
    nrm = np.array([(pd - pa)[1], -(pd - pa)[0]])
    nrm = nrm / np.linalg.norm(nrm) * (1 if nrm[0] > 0 else -1)           # the half on the patient's left
    r_arch = (P["R_a"] + P["R_d"]) / 2
    z_asc0 = hc[2] + 0.2 * e[2]
    desc = (np.hypot(X - dcx[None, None, :], Y - dcy[None, None, :]) <= P["R_d"]) & (Z < P["z_arch"])
    asc = ((X - pa[0]) ** 2 + (Y - pa[1]) ** 2 <= P["R_a"] ** 2) & (Z >= z_asc0) & (Z < P["z_arch"])
    sl_a = G.box((tc[0] - Rt - r_arch - 3, tc[1] - Rt - r_arch - 3, P["z_arch"] - r_arch - 3),
                 (tc[0] + Rt + r_arch + 3, tc[1] + Rt + r_arch + 3, P["z_arch"] + r_arch + 3))
    aorta = desc | asc
    if sl_a is not None:
        ax_, ay_, az_ = G.coords(sl_a)
        rho = np.hypot(ax_ - tc[0], ay_ - tc[1])
        torus = ((rho - Rt) ** 2 + (az_ - P["z_arch"]) ** 2 <= r_arch ** 2) & \
            ((ax_ - tc[0]) * nrm[0] + (ay_ - tc[1]) * nrm[1] >= -2)
        aorta[sl_a] |= torus
    aorta_dil = ndimage.binary_dilation(aorta, iterations=1)

    # ---- lungs
    lf = _lowfreq(rng, shape, [40 / s for s in G.spacing])
    rho3 = rho_c[:, :, None] + 0.03 * np.clip(lf, 0, None)
    lungs = (rho3 <= 1) & above
    lungs &= Z < P["z_ap"] + 5
    w_med = np.where(z1 > P["z_arch"] + P["R_a"], P["w_top"], np.where(z1 > heart_top - 10, P["w_hil"], 12.0))
    lungs &= np.abs(X - P["xmed"]) > w_med[None, None, :]
    lungs &= ~((np.abs(x2 - P["xmed"]) < P["r_vb"] + 6) & (y2 < P["y_vb"] + P["r_vb"] + 4))[:, :, None]
    lungs &= ~aorta_dil
    lungs &= ~((np.hypot(x2 - P["x_oe"], y2 - (P["y_vb"] + P["r_vb"] + 7)) < P["r_oe"] + 3))[:, :, None]
    lungs[sl_h] &= ~sac_out
    lung_side = {}
    for right in (True, False):
        cx = P["xmed"] + (-0.5 if right else 0.5) * P["Wc"]
        q2 = ((x2 - cx) / (0.5 * P["Wc"])) ** 2 + ((y2 - P["ycc"] + 0.1 * P["Dc"]) / (0.85 * P["Dc"])) ** 2
        zc0 = P["z_ap"] - P["apex_cap"]
        cap = np.sqrt(np.clip(1 - ((z1 - zc0) / P["apex_cap"]) ** 2, 0, 1))
        cap = np.where(z1 < zc0, 10.0, cap)
        side = (X < P["xmed"]) if right else (X >= P["xmed"])
        lung_side[right] = lungs & side & (q2[:, :, None] <= cap[None, None, :] ** 2)
    lungs = lung_side[True] | lung_side[False]
    grad = P["lung_grad"] * np.clip((P["ycc"] + P["Dc"] - y2[0]) / (2 * P["Dc"]), 0, 1) ** 1.5
    lung_val = np.broadcast_to((P["lung_hu"] + grad)[None, :, None], shape)
    put(lungs, lung_val, LUNG, organ=1)
    det["lung_hu"] = round(P["lung_hu"], 1)
    # hila and pulmonary trunk (soft tissue), carved from the lungs
    hila = []
    for s in (-1, 1):
        hcen = np.array([P["xmed"] + s * (P["w_hil"] + 4), P["y_tr"] - 2, P["z_car"] - 22])
        hila.append(hcen)
        hr = np.array([12.0, 16.0, 22.0])
        sl = G.box(hcen - hr, hcen + hr)
        if sl is not None:
            bx, by, bz = G.coords(sl)
            q = ((bx - hcen[0]) / hr[0]) ** 2 + ((by - hcen[1]) / hr[1]) ** 2 + ((bz - hcen[2]) / hr[2]) ** 2
            put(q <= 1, P["blood_hu"], SOFT, organ=0, sl=sl)
    lungs &= org == 1
    # vessel trees (in lung only) and bronchial trees (kept for air bronchograms)
    vessels, bronchi = [], []
    for s, hcen in zip((-1, 1), hila):
        for dz, dy in ((1.0, 0.1), (-0.2, 0.6), (-1.0, -0.3), (-0.6, -0.9)):
            d = np.array([s * 0.8, dy, dz]) + rng.normal(0, 0.15, 3)
            vessels += _tree(rng, hcen + [s * 8, 4, 0], d, rng.uniform(4.0, 5.5), rng.uniform(35, 50), 3)
            bronchi += _tree(rng, hcen + [s * 8, -4, 0], d + rng.normal(0, 0.1, 3), rng.uniform(3.5, 4.5),
                             rng.uniform(35, 50), 3)
    for p0, p1, r in vessels:
        sl = G.box(np.minimum(p0, p1) - r - 1, np.maximum(p0, p1) + r + 1)
        if sl is None:
            continue
        vx, vy, vz = G.coords(sl)
        tube = (_segment_dist(vx, vy, vz, p0, p1) <= r) & lungs[sl]
        put(tube, P["blood_hu"] - 5, SOFT, sl=sl)

    # ---- findings in and around the lungs
    fluid = np.zeros(shape, bool)
    if findings["Pleural effusion"]:
        fluid, det["pleural"] = _pleural(frng["Pleural effusion"], P, G, lung_side, dia)
        fluid &= lungs
        lungs &= ~fluid
    busy = np.zeros(shape, bool)                  # consolidated voxels: no nodule hides in them
    if findings["Emphysema"]:
        det["emphysema"] = _emphysema(frng["Emphysema"], P, G, lungs, hu, tis)
    if findings["Consolidation"]:
        det["consolidation"] = _consolidation(frng["Consolidation"], P, G, lung_side, lungs, fluid, bronchi, hu, tis, busy)
    if findings["Lung nodule"]:
        det["nodule"] = _nodules(frng["Lung nodule"], P, G, lungs, busy, hu, tis)
    if findings["Pleural effusion"]:
        put(fluid, np.float32(frng["Pleural effusion"].uniform(0, 20)), FLUID, organ=0)

    # ---- heart (outermost layer first): pericardium, fluid, epicardial fat, heart
    sub = [hu[sl_h], tis[sl_h], org[sl_h]]

    def put_h(sel, value, code, organ=None):
        sub[0][sel], sub[1][sel] = value, code
        if organ is not None:
            sub[2][sel] = organ

    put_h(sac_out, 28.0, SOFT, 0)
    if peri:
        put_h((_superquadric(hx, hy, hz, hc + shift, axes + outer - 2, frame, P["h_e"]) <= 1) & floor,
              pr.uniform(2, 20), FLUID, 0)
        det["pericardial"] = {"thickness": int(round(t_eff * 1.35))}
    put_h((_superquadric(hx, hy, hz, hc, axes + P["epi_fat"], frame, P["h_e"]) <= 1) & floor, P["fat_hu"] + 10, FAT, 0)
    put_h(heart, P["blood_hu"] + 4, SOFT, 2)

    # ---- hiatal hernia: a retrocardiac sac above the hiatus, anterior to the descending aorta; it
    # indents the back of the heart (drawn after it), the aorta stays in front of it (drawn after)
    if findings["Hiatal hernia"]:
        det["hernia"] = _hernia(frng["Hiatal hernia"], P, G, desc_c, hu, tis, org)

    # ---- great vessels, airway, oesophagus
    svc = ((X - (pa[0] - P["R_a"] - 10)) ** 2 + (Y - (pa[1] - 6)) ** 2 <= 81) & (Z > heart_top - 10)
    put(svc & ~aorta, P["blood_hu"], SOFT, organ=0)
    put(aorta, P["blood_hu"], SOFT, organ=3)
    det["aorta_mm"] = int(round(2 * P["R_a"]))
    if findings["Arterial wall calcification"]:
        det["calcification"] = _plaques(frng["Arterial wall calcification"], P, G, desc_c, pa, tc, Rt, nrm, r_arch,
                                        z_asc0, hu, tis)
    tr2 = np.hypot(x2 - P["xmed"], y2 - P["y_tr"])
    wall = (tr2 <= P["r_tr"] + 2)[:, :, None] & (Z > P["z_car"])
    put(wall & ~aorta, P["muscle_hu"], SOFT, organ=0)
    put((tr2 <= P["r_tr"])[:, :, None] & (Z > P["z_car"]), -1000.0, GAS, organ=0)
    car = np.array([P["xmed"], P["y_tr"], P["z_car"]])
    for s, drop, lat, rf in ((-1, 25, 32, 0.72), (1, 42, 45, 0.62)):
        p1 = car + [s * lat, -6, -drop]
        r = P["r_tr"] * rf
        sl = G.box(np.minimum(car, p1) - r - 3, np.maximum(car, p1) + r + 3)
        if sl is not None:
            bx, by, bz = G.coords(sl)
            dist = _segment_dist(bx, by, bz, car, p1)
            put((dist <= r + 1.5) & (tis[sl] != GAS), P["muscle_hu"], SOFT, organ=0, sl=sl)
            put(dist <= r, -1000.0, GAS, organ=0, sl=sl)
    oe = (np.hypot(x2 - P["x_oe"], y2 - (P["y_vb"] + P["r_vb"] + 7)) <= P["r_oe"])[:, :, None] & \
        (Z > dia.min() - 10) & (tis != GAS) & (tis != HERNIA) & (org != 2) & ~aorta
    put(oe, P["muscle_hu"] - 5, SOFT, organ=0)

    # ---- bones: vertebrae and discs, posterior elements, ribs, sternum, scapulae
    _bones(rng, P, G, x2, y2, z1, th_c, d_out, heart_top, hu, tis, org)

    # ---- scanner: slice profile + kernel blur, calibration, cupping and shading, correlated noise
    nrng = np.random.default_rng([seed, idx, 2])
    sig_z = P["thickness"] / 2.355 / G.spacing[2]
    ndimage.gaussian_filter(hu, (P["psf"], P["psf"], sig_z), output=hu, mode="nearest", truncate=3.0)
    hu *= np.float32(P["gain"])
    hu += np.float32(P["offset"])
    cup = (P["cupping"] * np.clip(1 - rho_s ** 2, 0, 1)).astype(np.float32)
    hu -= np.where(body, cup[:, :, None], np.float32(0))
    hu += np.float32(P["shading"]) * _lowfreq(nrng, shape, [100 / s for s in G.spacing])
    hu += np.float32(P["noise_sd"]) * _fine_noise(nrng, shape, (P["noise_corr"], P["noise_corr"], 0.3))
    det.update(gain=round(P["gain"], 3), offset=round(P["offset"], 1), noise_sd=round(P["noise_sd"], 1))
    return (hu, org, det, tis) if tissue else (hu, org, det)


def _pleural(r, P, G, lung_side, dia):
    """Dependent fluid in one or both pleural spaces: deeper at the bases, a meniscus climbing the
    lateral wall (supine: posterior is -y)."""
    X, Y, Z = G.coords()
    both = r.random() < 0.45
    main_right = bool(r.random() < 0.5)
    out = np.zeros(G.shape, bool)
    info = {}
    for right in (True, False):
        if not both and right != main_right:
            continue
        depth = float(r.choice([r.uniform(10, 20), r.uniform(20, 45), r.uniform(45, 75)], p=[0.35, 0.4, 0.25]))
        xc = X[:, 0, 0] - P["xmed"]
        ybot = P["ycc"] - P["Dc"] * np.clip(1 - np.abs(xc / P["Wc"]) ** P["p_cav"], 0, 1) ** (1 / P["p_cav"])
        lat = np.clip(np.abs(xc) / P["Wc"], 0, 1) ** 4
        base = np.clip(1 - (Z[0, 0] - P["zR"]) / max(P["H"], 1.0), 0, 1)
        lvl = ybot[:, None] + depth * (0.55 + 0.45 * base[None, :]) + depth * 1.2 * lat[:, None]
        sel = lung_side[right] & (Y < lvl[:, None, :])
        out |= sel
        side = "right" if right else "left"
        info[side] = int(round(depth))
    sides = sorted(info)
    info["sides"] = "bilateral" if len(sides) == 2 else sides[0]
    info["depth"] = max(v for k, v in info.items() if k in ("right", "left"))
    info["meniscus"] = True
    return out, info


def _emphysema(r, P, G, lungs, hu, tis):
    """Low-attenuation areas (-1000 .. -955 HU) of varying extent: centrilobular (small, upper-zone),
    paraseptal (subpleural, with bullae), panlobular (lower-zone, diffuse) or mixed."""
    kind = str(r.choice(["centrilobular", "paraseptal", "panlobular", "mixed"], p=[0.5, 0.2, 0.12, 0.18]))
    sev = str(r.choice(["mild", "moderate", "severe"], p=[0.4, 0.4, 0.2]))
    frac = {"mild": r.uniform(0.06, 0.12), "moderate": r.uniform(0.12, 0.25), "severe": r.uniform(0.25, 0.45)}[sev]
    sl = G.box((-1e4, -1e4, P["zL"] - P["dome"] * 1.7), (1e4, 1e4, P["z_ap"] + 6))
    L = lungs[sl]
    _, _, Zs = G.coords(sl)
    zrel = np.clip((Zs - P["zR"]) / max(P["H"], 1.0), 0, 1)
    sp = G.spacing
    if kind in ("centrilobular", "mixed"):
        score = _fine_noise(r, L.shape, [2.5 / s for s in sp]) + 1.2 * zrel
    elif kind == "panlobular":
        score = _lowfreq(r, L.shape, [12 / s for s in sp]) + 1.5 * (1 - zrel)
    else:
        near = ndimage.gaussian_filter(L.astype(np.float32), [5 / s for s in sp]) < 0.75
        score = 2.0 * near + 0.6 * _fine_noise(r, L.shape, [2.0 / s for s in sp]) + 0.6 * zrel
    if kind == "mixed":
        near = ndimage.gaussian_filter(L.astype(np.float32), [5 / s for s in sp]) < 0.75
        score = score + 1.0 * near
    vals = score[L]
    if vals.size == 0:
        return {"kind": kind, "severity": sev, "laa": 0}
    thr = np.quantile(vals, 1 - frac)
    laa = L & (score > thr)
    h_, t_ = hu[sl], tis[sl]
    h_[laa] = r.uniform(-995, -965) + 8 * r.standard_normal(int(laa.sum())).astype(np.float32)
    t_[laa] = LAA
    h_[L & ~laa] -= r.uniform(10, 30)                    # the rest of the lung is hyperlucent too
    bullae = 0
    if kind in ("paraseptal", "mixed"):
        idx = np.argwhere(L & (zrel > 0.6) & (score > thr))
        for _ in range(int(r.integers(0, 4)) if idx.size else 0):
            c = idx[r.integers(len(idx))]
            rad = r.uniform(8, 20)
            rv = [max(1, int(rad / s)) for s in sp]
            box = tuple(slice(max(0, ci - ri), min(n_, ci + ri + 1)) for ci, ri, n_ in zip(c, rv, L.shape))
            gx, gy, gz = np.ogrid[box[0], box[1], box[2]]
            ball = ((gx - c[0]) * sp[0]) ** 2 + ((gy - c[1]) * sp[1]) ** 2 + ((gz - c[2]) * sp[2]) ** 2 <= rad ** 2
            ball &= L[box]
            h_[box][ball] = -1000.0
            t_[box][ball] = LAA
            bullae += 1
    dist = {"centrilobular": "upper-lobe predominant", "paraseptal": "subpleural",
            "panlobular": "lower-lobe predominant", "mixed": "upper-lobe predominant"}[kind]
    return {"kind": kind, "severity": sev, "laa": int(round(100 * laa.sum() / max(L.sum(), 1))),
            "distribution": dist, "bullae": bullae}


def _consolidation(r, P, G, lung_side, lungs, fluid, bronchi, hu, tis, busy):
    """Lobar (most of one lobe) or patchy / multifocal (1-3 deformed blobs in any lobe, either
    side), a ground-glass margin, air bronchograms in most."""
    pattern = "lobar" if r.random() < 0.35 else str(r.choice(["patchy", "multifocal"]))
    cons_hu = r.uniform(15, 45)
    X, Y, Z = G.coords()
    dens = np.zeros(G.shape, np.float32)
    if pattern == "lobar":
        lobe = str(r.choice(_LOBE_IDS[:4] + _LOBE_IDS[5:], p=[0.18, 0.12, 0.28, 0.17, 0.25]))
        right = lobe.startswith("right")
        L = lung_side[right] & lungs
        ii = np.argwhere(L)
        pts = G.ax[0][ii[:, 0]], G.ax[1][ii[:, 1]], G.ax[2][ii[:, 2]]
        names = _lobe_of(P, right, *pts)
        inl = (names == lobe) | ((lobe == "left upper lobe") & (names == "lingula"))
        ii = ii[inl]
        if len(ii):
            lf = _lowfreq(r, G.shape, [20 / s for s in G.spacing])[ii[:, 0], ii[:, 1], ii[:, 2]]
            keep = lf > np.quantile(lf, 1 - r.uniform(0.7, 1.0))
            ii = ii[keep]
            dens[ii[:, 0], ii[:, 1], ii[:, 2]] = 1.0
        lobes = [lobe]
    else:
        k = 1 if pattern == "patchy" else int(r.integers(2, 4))
        cand = np.argwhere(lungs[::2, ::2, ::2]) * 2
        lobes = []
        for _ in range(k):
            c_i = cand[r.integers(len(cand))]
            c = np.array([G.ax[a][c_i[a]] for a in range(3)])
            rad = r.uniform(12, 35, 3)
            sl = G.box(c - rad * 1.5, c + rad * 1.5)
            bx, by, bz = G.coords(sl)
            q = ((bx - c[0]) / rad[0]) ** 2 + ((by - c[1]) / rad[1]) ** 2 + ((bz - c[2]) / rad[2]) ** 2
            shp = q.shape
            q = q + 0.35 * _lowfreq(r, shp, [8 / s for s in G.spacing])
            d = np.clip((1 - q) / 0.3, 0, 1).astype(np.float32)
            dens[sl] = np.maximum(dens[sl], d)
            right = c[0] < P["xmed"]
            lobes.append(str(_lobe_of(P, right, np.array(c[0]), np.array(c[1]), np.array(c[2]))))
    region = (dens > 0) & lungs & ~fluid
    hu[region] = hu[region] + dens[region] * (cons_hu - hu[region])
    tis[region & (dens > 0.5)] = LESION
    busy |= region
    air_b = bool(r.random() < 0.7)
    if air_b:
        lo, hi = np.array([a[0] for a in G.ax]), np.array([a[-1] for a in G.ax])
        core = region & (dens > 0.7)
        for p0, p1, rb in bronchi:
            sl = G.box(np.maximum(np.minimum(p0, p1) - rb - 1, lo), np.minimum(np.maximum(p0, p1) + rb + 1, hi))
            if sl is None or not core[sl].any():
                continue
            bx, by, bz = G.coords(sl)
            tube = (_segment_dist(bx, by, bz, p0, p1) <= max(rb * 0.6, 1.2)) & core[sl]
            hu[sl][tube] = r.uniform(-940, -880)
    vol = float(region.sum() * np.prod(G.spacing) / 1000.0)
    uniq = list(dict.fromkeys(lobes))
    return {"pattern": pattern, "lobes": uniq, "air_bronchograms": air_b, "volume_ml": round(vol, 1)}


def _nodules(r, P, G, lungs, busy, hu, tis):
    """One or two nodules 5-15 mm, solid (lobulated) or part-solid (ground-glass halo), at random
    lung positions, never inside consolidation or fluid."""
    n = 1 if r.random() < 0.75 else 2
    cand = np.argwhere(lungs[::2, ::2, ::2]) * 2
    out = []
    for _ in range(n):
        d = r.uniform(5, 15)
        kind = "solid" if r.random() < 0.7 else "part-solid"
        rad = d / 2
        for _try in range(80):
            c_i = cand[r.integers(len(cand))]
            c = np.array([G.ax[a][c_i[a]] for a in range(3)]) + r.uniform(-1, 1, 3)
            sl = G.box(c - rad - 2, c + rad + 2)
            if sl is None:
                continue
            bx, by, bz = G.coords(sl)
            dist = np.sqrt((bx - c[0]) ** 2 + (by - c[1]) ** 2 + (bz - c[2]) ** 2)
            ball = dist <= max(rad, 0.6 * max(G.spacing))
            if not ball.any() or not (lungs[sl] | ~(dist <= rad + 2)).all() or busy[sl][ball].any():
                continue
            h_, t_ = hu[sl], tis[sl]
            lob = np.zeros_like(ball)
            for _k in range(2):                            # lobulation: two satellite spheres
                off = r.normal(0, 1, 3)
                off = off / np.linalg.norm(off) * rad * 0.45
                lob |= np.sqrt((bx - c[0] - off[0]) ** 2 + (by - c[1] - off[1]) ** 2 + (bz - c[2] - off[2]) ** 2) \
                    <= rad * 0.6
            solid = (ball | lob) & lungs[sl]
            if kind == "part-solid":
                h_[solid] = r.uniform(-650, -450)
                core = (dist <= rad * r.uniform(0.3, 0.6)) | (dist <= 0.5 * max(G.spacing))
                solid = core & lungs[sl]
            h_[solid] = r.uniform(15, 60)
            t_[ball & lungs[sl]] = LESION
            busy[sl] |= ball
            right = c[0] < P["xmed"]
            out.append({"d": int(round(d)), "kind": kind,
                        "lobe": str(_lobe_of(P, right, np.array(c[0]), np.array(c[1]), np.array(c[2]))),
                        "pos": [round(float(v), 1) for v in c]})
            break
    if not out:
        return {"d": 0, "kind": "solid", "lobe": "right upper lobe", "count": 0}
    big = max(out, key=lambda o: o["d"])
    return {**big, "count": len(out), "all": out}


def _hernia(r, P, G, desc_c, hu, tis, org):
    """A sac of stomach through the hiatus: anterior to the aorta, behind the heart, straddling the
    left dome; with an air-fluid level (supine: air anterior) or collapsed with fluid."""
    size = str(r.choice(["small", "moderate", "large"], p=[0.4, 0.4, 0.2]))
    rx, ry, rz = {"small": (16, 13, 16), "moderate": (24, 19, 24), "large": (34, 26, 34)}[size] * r.uniform(0.85, 1.15, 3)
    zc = P["zL"] + rz * r.uniform(0.2, 0.6)
    ax, ay = desc_c(zc)
    c = np.array([P["xmed"] + r.uniform(-4, 8), max(float(ay) + P["R_d"], P["y_vb"] + P["r_vb"] + 4) + 0.8 * ry, zc])
    sl = G.box(c - [rx + 4, ry + 4, rz + 4], c + [rx + 4, ry + 4, rz + 4])
    bx, by, bz = G.coords(sl)
    q = ((bx - c[0]) / rx) ** 2 + ((by - c[1]) / ry) ** 2 + ((bz - c[2]) / rz) ** 2
    q = q + 0.2 * _lowfreq(r, q.shape, [10 / s for s in G.spacing])
    outer, inner = q <= (1 + 3 / min(rx, ry, rz)) ** 2, q <= 1
    h_, t_, o_ = hu[sl], tis[sl], org[sl]
    h_[outer], t_[outer], o_[outer] = P["muscle_hu"], HERNIA, 0
    h_[inner] = r.uniform(5, 30)
    afl = bool(r.random() < 0.6)
    if afl:
        level = c[1] + ry * r.uniform(-0.1, 0.5)
        gas = inner & (by > level)
        h_[gas] = -1000.0
    dia_mm = int(round(2 * max(rx, ry)))
    return {"size": size, "d": dia_mm, "air_fluid": afl}


def _plaques(r, P, G, desc_c, pa, tc, Rt, nrm, r_arch, z_asc0, hu, tis):
    """Calcified intimal plaques (300-900 HU, curved patches on the inner wall) of varying number,
    arc and length on the arch, the descending and sometimes the ascending aorta."""
    extent = str(r.choice(["a few", "scattered", "extensive"], p=[0.35, 0.4, 0.25]))
    n = {"a few": int(r.integers(2, 5)), "scattered": int(r.integers(5, 10)), "extensive": int(r.integers(10, 22))}[extent]
    sites = []
    X, Y, Z = G.coords()
    for _ in range(n):
        where = str(r.choice(["arch", "descending", "ascending"], p=[0.4, 0.48, 0.12]))
        th_ = r.uniform(2.0, 3.5)
        arc = np.deg2rad(r.uniform(30, 110))
        length = r.uniform(4, 14)
        val = r.uniform(300, 900)
        ang = r.uniform(-np.pi, np.pi)
        if where == "arch":
            psi0 = np.arctan2(nrm[1], nrm[0]) + r.uniform(-1.2, 1.2)
            cen = np.array([tc[0] + Rt * np.cos(psi0), tc[1] + Rt * np.sin(psi0), P["z_arch"]])
            R = r_arch
        elif where == "descending":
            z0 = r.uniform(P["zR"] - 20, P["z_arch"] - 10)
            cen = np.array([*[float(v) for v in desc_c(z0)], z0])
            R = P["R_d"]
        else:
            z0 = r.uniform(z_asc0 + 10, P["z_arch"] - 5)
            cen = np.array([pa[0], pa[1], z0])
            R = P["R_a"]
        half = R + th_ + length
        sl = G.box(cen - half, cen + half)
        if sl is None:
            continue
        bx, by, bz = G.coords(sl)
        if where == "arch":
            rho = np.hypot(bx - tc[0], by - tc[1])
            psi = np.arctan2(by - tc[1], bx - tc[0])
            dr, dz = rho - Rt, bz - P["z_arch"]
            along = np.angle(np.exp(1j * (psi - psi0))) * Rt
            rad = np.hypot(dr, dz)
            phi = np.arctan2(dz, dr)
        else:
            if where == "descending":
                cx_, cy_ = desc_c(bz)
            else:
                cx_, cy_ = pa[0], pa[1]
            dx, dy = bx - cx_, by - cy_
            rad = np.hypot(dx, dy)
            phi = np.arctan2(dy, dx)
            along = bz - cen[2]
        dphi = np.abs(np.angle(np.exp(1j * (phi - ang))))
        plaque = (rad >= R - th_) & (rad <= R + 0.5) & (dphi <= arc / 2) & (np.abs(along) <= length / 2)
        hu[sl][plaque] = val
        tis[sl][plaque] = CALC
        sites.append(where)
    order = [s for s in ("ascending", "arch", "descending") if s in sites]
    return {"extent": extent, "n": n, "sites": order}


def _bones(rng, P, G, x2, y2, z1, th_c, d_out, heart_top, hu, tis, org):
    shape = G.shape
    xm, yv, rv = P["xmed"], P["y_vb"], P["r_vb"]
    # vertebral levels: body (cortex + cancellous), disc, canal, arch, spinous and transverse processes
    ph = np.mod(z1 - P["z_phase"], P["pitch"])
    disc_z = ph < P["disc"]
    vb = (np.abs((x2 - xm) / (rv * 1.1)) ** 2.3 + np.abs((y2 - yv) / (rv * 0.92)) ** 2.3) <= 1
    vb_in = (np.abs((x2 - xm) / (rv * 1.1 - 2.5)) ** 2.3 + np.abs((y2 - yv) / (rv * 0.92 - 2.5)) ** 2.3) <= 1
    yc = yv - rv * 0.92 - 9
    canal = np.hypot(x2 - xm, y2 - yc) <= 8.5
    arch = (np.hypot(x2 - xm, y2 - yc) <= 14) & ~canal
    spin = (np.abs(x2 - xm) <= 3.5) & (y2 < yc) & (y2 > yc - 38)
    trans = (np.abs(y2 - (yc + 2) + 0.25 * np.abs(x2 - xm)) <= 4) & (np.abs(x2 - xm) >= 9) & \
        (np.abs(x2 - xm) <= rv + 20)
    post = (arch | spin | trans) & ~canal
    bone_z = ~disc_z
    sel_d = vb[:, :, None] & disc_z[None, None, :]
    hu[sel_d], tis[sel_d], org[sel_d] = rng.uniform(70, 100), SOFT, 0
    sel = vb[:, :, None] & bone_z[None, None, :]
    hu[sel], tis[sel], org[sel] = P["cortex"], BONE, 4
    sel = vb_in[:, :, None] & bone_z[None, None, :]
    hu[sel] = P["canc"]
    sel = post[:, :, None] & bone_z[None, None, :]
    hu[sel], tis[sel], org[sel] = 0.5 * (P["cortex"] + P["canc"]), BONE, 4
    sel = np.broadcast_to(canal[:, :, None], shape)
    hu[sel], tis[sel], org[sel] = rng.uniform(5, 25), SOFT, 0
    # ribs: a band just outside the cavity, sloping down anteriorly; costal cartilage at the front
    band = (d_out >= 1.0) & (d_out <= 1.0 + P["rib_t"])
    ant = np.abs(np.angle(np.exp(1j * (th_c - np.pi / 2)))) < np.deg2rad(P["cart"])
    bi, bj = np.nonzero(band)
    drop = P["rib_drop"] * (1 + np.sin(th_c[bi, bj])) / 2
    zz = z1[None, :] + drop[:, None] - P["z_phase"] - P["disc"]
    on = (np.mod(zz, P["pitch"]) < P["rib_h"]) & (z1[None, :] + drop[:, None] < P["z_ap"] + 15) & \
        (z1[None, :] > P["zR"] - 70)
    ii, kk = np.nonzero(on)
    cart = ant[bi[ii], bj[ii]]
    hu[bi[ii[cart]], bj[ii[cart]], kk[cart]] = rng.uniform(90, 130)
    tis[bi[ii[cart]], bj[ii[cart]], kk[cart]] = SOFT
    nc = ~cart
    hu[bi[ii[nc]], bj[ii[nc]], kk[nc]] = P["rib_hu"]
    tis[bi[ii[nc]], bj[ii[nc]], kk[nc]] = BONE
    org[bi[ii[nc]], bj[ii[nc]], kk[nc]] = 4
    # sternum: anterior midline, manubrium down to the xiphoid at mid-heart
    w_st = rng.uniform(12, 18)
    st2 = (np.abs(x2 - xm) <= w_st) & (d_out >= 0.0) & (d_out <= rng.uniform(9, 13)) & (y2 > P["ycc"])
    stz = (z1 <= P["z_ap"] + 10) & (z1 >= heart_top - rng.uniform(50, 80))
    sel = st2[:, :, None] & stz[None, None, :]
    hu[sel], tis[sel], org[sel] = rng.uniform(300, 480), BONE, 4
    # scapulae: posterolateral plates outside the ribs, upper chest
    sc2 = (d_out >= P["rib_t"] + 9) & (d_out <= P["rib_t"] + 14) & \
        ((np.abs(np.angle(np.exp(1j * (th_c + np.deg2rad(140))))) < 0.35) |
         (np.abs(np.angle(np.exp(1j * (th_c + np.deg2rad(40))))) < 0.35))
    scz = (z1 >= P["z_ap"] - rng.uniform(110, 140)) & (z1 <= P["z_ap"] + 20)
    sel = sc2[:, :, None] & scz[None, None, :]
    hu[sel], tis[sel], org[sel] = rng.uniform(380, 600), BONE, 4


# ------------------------------------------------------------------------------------ reports
# Two banks of wording of this source's own (``first``: training reports; ``second``: held-out).
# No sentence of either appears in ``data_service.synth``'s banks (tests/data_service/test_synth_ext.py).
_BANK = {
    "first": {
        "pos": {
            "Lung nodule": ["A {kind} nodule measuring {d} mm is seen in the {lobe}.",
                            "There is a {d} mm {kind} pulmonary nodule in the {lobe}.",
                            "{Kind} nodule in the {lobe}, {d} mm in greatest diameter."],
            "Arterial wall calcification": ["{Extent} calcified plaques are present along the wall of the {site}.",
                                            "The {site} shows atherosclerotic wall calcification ({extent}).",
                                            "Mural calcified atheroma involving the {site}."],
            "Consolidation": ["{Pattern} consolidation is seen in the {where}{ab}.",
                              "Areas of consolidation{ab} involve the {where}.",
                              "There are consolidative opacities in the {where}{ab}."],
            "Hiatal hernia": ["A {size} hiatal hernia is present, measuring {d} mm{afl}.",
                              "{Size} sliding hiatal hernia{afl2}.",
                              "Part of the stomach has herniated through the diaphragmatic hiatus ({d} mm)."],
            "Pericardial effusion": ["A {amount} pericardial effusion is present, up to {t} mm thick.",
                                     "Pericardial fluid collection with a maximal thickness of {t} mm.",
                                     "There is a {amount} pericardial effusion."],
            "Cardiomegaly": ["The heart is {degree}ly enlarged, with a cardiothoracic ratio of {ctr}.",
                             "{Degree} cardiomegaly, cardiothoracic ratio {ctr}.",
                             "Cardiac size is increased (cardiothoracic ratio {ctr})."],
            "Pleural effusion": ["{Sides} pleural {eff}, {size}, with a depth of {depth} mm.",
                                 "{Size} {sides} pleural fluid layers dependently with a meniscus.",
                                 "There is {size} {sides} pleural fluid, measuring up to {depth} mm in depth."],
            "Emphysema": ["{Severity} {kind} emphysema, {distribution}.",
                          "There are {severity} {kind} emphysematous changes, {distribution}.",
                          "Low-attenuation areas of {kind} emphysema occupy about {laa}% of the lung volume."],
        },
        "neg": {
            "Lung nodule": ["No suspicious pulmonary nodules are identified.", "The lung parenchyma is free of nodules.",
                            "No solid or subsolid nodules."],
            "Arterial wall calcification": ["No atherosclerotic calcification of the thoracic aorta.",
                                            "The thoracic aorta shows no mural calcification.",
                                            "No calcified plaque is seen in the aortic wall."],
            "Consolidation": ["No focal consolidation is present.", "There is no airspace consolidation.",
                              "No consolidative changes in either lung."],
            "Hiatal hernia": ["The oesophagogastric junction lies below the diaphragm.", "No hiatus hernia is seen.",
                              "There is no herniation of the stomach into the thorax."],
            "Pericardial effusion": ["No pericardial fluid.", "The pericardium is of normal thickness and contains no fluid.",
                                     "Pericardial thickness is normal without effusion."],
            "Cardiomegaly": ["Cardiac size is within normal limits.",
                             "The heart is normal in size, with a cardiothoracic ratio of {ctr}.", "Normal cardiac size."],
            "Pleural effusion": ["The pleural spaces are clear.", "No pleural fluid is seen.",
                                 "Both pleural spaces are free of fluid."],
            "Emphysema": ["No emphysematous lung destruction.", "Lung attenuation is normal, without emphysema.",
                          "There is no evidence of emphysema."],
        },
        "imp": {
            "Lung nodule": "{Kind} {d} mm nodule in the {lobe}.",
            "Arterial wall calcification": "{Grade} calcified aortic atherosclerosis.",
            "Consolidation": "{Pattern} consolidation of the {where}.",
            "Hiatal hernia": "{Size} hiatal hernia.",
            "Pericardial effusion": "{Amount} pericardial effusion.",
            "Cardiomegaly": "{Degree} cardiomegaly.",
            "Pleural effusion": "{Size} {sides} pleural {eff}.",
            "Emphysema": "{Severity} {kind} emphysema.",
        },
        "normal": ["No acute cardiopulmonary abnormality.", "Normal CT of the chest."],
        "fill": {
            "airway": ["The tracheobronchial tree is unobstructed.", "The central airways are of normal calibre."],
            "mediastinum": ["No enlarged mediastinal or hilar lymph nodes.", "Mediastinal fat planes are preserved."],
            "vessels": ["The ascending aorta measures {ao} mm in diameter.", "The pulmonary trunk is of normal calibre."],
            "abdomen": ["The imaged upper abdomen shows no abnormality.", "The adrenal glands are unremarkable."],
            "liver": ["Hepatic attenuation is reduced, suggesting fatty infiltration."],
            "bones": ["Vertebral body heights are maintained.", "No aggressive osseous lesion is seen."],
        },
    },
    "second": {
        "pos": {
            "Lung nodule": ["In the {lobe} there is a {kind} nodule of {d} mm.",
                            "{Kind} pulmonary nodule ({d} mm), {lobe}."],
            "Arterial wall calcification": ["Calcified atheroma is {spread} along the {site}.",
                                            "{Extent} foci of wall calcification in the {site}."],
            "Consolidation": ["Consolidated lung parenchyma in the {where}{ab}.",
                              "{Pattern} airspace consolidation affecting the {where}{ab}."],
            "Hiatal hernia": ["Hiatal herniation of the gastric fundus, {size}, {d} mm{afl}.",
                              "The stomach extends above the hiatus as a {size} hernia{afl2}."],
            "Pericardial effusion": ["{Amount} pericardial effusion ({t} mm).",
                                     "Fluid distends the pericardial sac to a depth of {t} mm."],
            "Cardiomegaly": ["Enlargement of the cardiac silhouette, cardiothoracic ratio {ctr}.",
                             "Cardiothoracic ratio of {ctr}, indicating {degree} cardiomegaly."],
            "Pleural effusion": ["{Sides} pleural fluid ({size}, {depth} mm in depth).",
                                 "Dependent {sides} pleural {eff}, {size}, with a meniscus along the lateral wall."],
            "Emphysema": ["{Kind} emphysema of {severity} extent, {distribution}.",
                          "Emphysema ({kind}, {severity}) with about {laa}% low-attenuation lung."],
        },
        "neg": {
            "Lung nodule": ["Pulmonary nodules are not identified.", "No nodular lesion is detected in either lung."],
            "Arterial wall calcification": ["No vascular wall calcification is seen in the aorta.",
                                            "The aortic wall is smooth without calcified plaques."],
            "Consolidation": ["No parenchymal consolidation.", "Both lungs are free of consolidation."],
            "Hiatal hernia": ["The stomach lies entirely below the diaphragm.",
                              "The hiatus is of normal width, without herniation."],
            "Pericardial effusion": ["The pericardial sac contains no fluid.", "No effusion in the pericardium."],
            "Cardiomegaly": ["The cardiothoracic ratio is {ctr}, within normal limits.",
                             "No enlargement of the cardiac chambers."],
            "Pleural effusion": ["No fluid within either pleural cavity.", "Pleural cavities are clear."],
            "Emphysema": ["The lung parenchyma shows no low-attenuation destruction.", "No features of emphysema."],
        },
        "imp": {
            "Lung nodule": "Pulmonary nodule, {kind}, {d} mm, {lobe}.",
            "Arterial wall calcification": "Aortic wall calcification, {grade}.",
            "Consolidation": "Consolidation, {where}.",
            "Hiatal hernia": "Hiatal hernia, {size}.",
            "Pericardial effusion": "Pericardial effusion, {amount}.",
            "Cardiomegaly": "Cardiomegaly, {degree}.",
            "Pleural effusion": "Pleural {eff}, {sides}, {size}.",
            "Emphysema": "Emphysema, {kind}, {severity}.",
        },
        "normal": ["No significant intrathoracic pathology.", "Chest CT within normal limits."],
        "fill": {
            "airway": ["Airway lumina are clear down to the lobar bronchi.", "Tracheal calibre is normal."],
            "mediastinum": ["Lymph nodes of the mediastinum are not enlarged.", "The thyroid is of normal size."],
            "vessels": ["Ascending aortic diameter {ao} mm.", "Pulmonary arteries are not dilated."],
            "abdomen": ["Included upper abdominal organs are normal.", "No upper abdominal abnormality."],
            "liver": ["Low hepatic density, in keeping with steatosis."],
            "bones": ["The osseous thorax is intact.", "Spinal alignment is preserved."],
        },
    },
}
# anatomical sections (each a list of findings) and the two orders reports are written in
_SECTIONS = {"airway": [], "lungs": ["Emphysema", "Lung nodule", "Consolidation"], "pleura": ["Pleural effusion"],
             "heart": ["Cardiomegaly", "Pericardial effusion"], "vessels": ["Arterial wall calcification"],
             "mediastinum": ["Hiatal hernia"], "abdomen": [], "bones": []}
_ORDERS = (("airway", "lungs", "pleura", "heart", "vessels", "mediastinum", "abdomen", "bones"),
           ("mediastinum", "heart", "vessels", "airway", "lungs", "pleura", "abdomen", "bones"))
_IMP_ORDER = ("Pleural effusion", "Consolidation", "Lung nodule", "Pericardial effusion", "Cardiomegaly",
              "Hiatal hernia", "Emphysema", "Arterial wall calcification")


_GRADE = {"a few": ("mild", "sparse"), "scattered": ("moderate", "scattered"),
          "extensive": ("extensive", "widespread")}


def _join(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def report_fields(det: dict) -> dict[str, dict]:
    """The template fields of each finding, from what was drawn and measured."""
    ctr = det.get("ctr", 0.45)
    f = {"Cardiomegaly": {"ctr": f"{ctr:.2f}", "degree": "mild" if ctr < 0.58 else "moderate" if ctr < 0.64 else "marked"}}
    n = det.get("nodule", {"d": 8, "kind": "solid", "lobe": "right upper lobe"})
    f["Lung nodule"] = {"d": n["d"], "kind": n["kind"], "lobe": n["lobe"]}
    c = det.get("calcification", {"extent": "scattered", "sites": ["arch"]})
    site = {"arch": "aortic arch", "descending": "descending thoracic aorta", "ascending": "ascending aorta"}
    f["Arterial wall calcification"] = {"extent": c["extent"], "grade": _GRADE[c["extent"]][0],
                                        "spread": _GRADE[c["extent"]][1], "site": _join([site[s] for s in c["sites"]] or ["aortic arch"])}
    k = det.get("consolidation", {"pattern": "patchy", "lobes": ["right lower lobe"], "air_bronchograms": False})
    f["Consolidation"] = {"pattern": k["pattern"], "where": _join(k["lobes"]),
                          "ab": " with air bronchograms" if k["air_bronchograms"] else ""}
    h = det.get("hernia", {"size": "small", "d": 30, "air_fluid": False})
    f["Hiatal hernia"] = {"size": h["size"], "d": h["d"], "afl": ", with an air-fluid level" if h["air_fluid"] else "",
                          "afl2": " containing an air-fluid level" if h["air_fluid"] else ""}
    t = det.get("pericardial", {"thickness": 10})["thickness"]
    f["Pericardial effusion"] = {"t": t, "amount": "small" if t < 10 else "moderate" if t < 20 else "large"}
    p = det.get("pleural", {"sides": "right", "depth": 20})
    f["Pleural effusion"] = {"sides": p["sides"], "depth": p["depth"], "eff": "effusions" if p["sides"] == "bilateral" else "effusion",
                             "size": "small" if p["depth"] < 20 else "moderate" if p["depth"] < 45 else "large"}
    e = det.get("emphysema", {"kind": "centrilobular", "severity": "mild", "laa": 8, "distribution": "upper-lobe predominant"})
    f["Emphysema"] = {"kind": e["kind"], "severity": e["severity"], "laa": e["laa"], "distribution": e["distribution"]}
    for v in f.values():
        v.update({k_[:1].upper() + k_[1:]: str(x)[:1].upper() + str(x)[1:] for k_, x in list(v.items())})
    return f


def make_report(rng: np.random.Generator, findings: dict[str, int], det: dict, bank: str = "first") -> tuple[str, str]:
    """(findings text in anatomical order, paragraph per section; impression)."""
    B = _BANK[bank]
    fields = report_fields(det)
    order = _ORDERS[int(rng.integers(len(_ORDERS)))]
    paras = []
    for sec in order:
        sent = []
        for f in _SECTIONS[sec]:
            pool = B["pos" if findings[f] else "neg"][f]
            sent.append(str(pool[int(rng.integers(len(pool)))]).format(**fields[f]))
        fill = B["fill"].get(sec, [])
        if sec == "abdomen" and det.get("steatosis"):
            sent.append(B["fill"]["liver"][0])
        if fill and (not sent or rng.random() < 0.5):
            sent.append(str(fill[int(rng.integers(len(fill)))]).format(ao=det.get("aorta_mm", 30)))
        if sent:
            paras.append(" ".join(sent))
    imp = [B["imp"][f].format(**fields[f]) for f in _IMP_ORDER if findings[f]]
    impression = " ".join(imp) if imp else str(B["normal"][int(rng.integers(len(B["normal"])))])
    return "\n".join(paras), impression


# ---------------------------------------------------------------------------------- writing
def _reorient(hu, mask, spacing, axcodes, origin):
    import nibabel as nib
    from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform

    aff = np.diag([*spacing, 1.0])
    aff[:3, 3] = -(np.array(hu.shape) - 1) / 2 * np.array(spacing) + np.array(origin)
    tr = ornt_transform(axcodes2ornt("RAS"), axcodes2ornt(tuple(axcodes)))
    new_aff = aff @ inv_ornt_aff(tr, hu.shape)
    assert "".join(nib.aff2axcodes(new_aff)) == axcodes
    return apply_orientation(hu, tr), apply_orientation(mask, tr), new_aff


def _case_findings(seed: int, idx: int, prevalence: float) -> dict[str, int]:
    r = np.random.default_rng([seed, idx, 0])
    return {f: int(r.random() < prevalence) for f in PLANTED}


def _write_case(job) -> tuple[str, dict]:
    import nibabel as nib

    out, seed, idx, split, prevalence, heldout_wording, voxel_scale = job
    findings = _case_findings(seed, idx, prevalence)
    hu, mask, det = make_case(seed, idx, findings, voxel_scale)
    hu_o, mask_o, affine = _reorient(hu, mask, det["spacing"], det["axcodes"],
                                     np.random.default_rng([seed, idx, 3]).uniform(-50, 50, 3) + [0, -180, -500])
    del hu, mask
    storage = det["storage"]
    shift = 0 if storage == "hu" else 1024
    stored = np.clip(np.rint(hu_o + shift), -1024 + shift, 3071 + shift).astype(np.int16)
    pid = f"{split}_{idx + 1}"
    name = f"{pid}_a_1.nii.gz"
    vdir = out / split / pid / f"{pid}_a"
    vdir.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(stored, affine)
    if storage == "hu":
        img.header.set_slope_inter(1.0, 0.0)
    elif storage == "header":
        img.header.set_slope_inter(1.0, -1024.0)
    nib.save(img, str(vdir / name))
    sdir = out / "segmentations" / split / pid / f"{pid}_a"
    sdir.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(mask_o.astype(np.uint8), affine), str(sdir / name))
    ftxt, imp = make_report(np.random.default_rng([seed, idx, 4]), findings, det,
                            heldout_wording if split == "valid" else "first")
    return split, {"name": name, "findings": ftxt, "impression": imp, "labels": {f: findings.get(f, 0) for f in FINDINGS},
                   "det": {k: det[k] for k in ("spacing", "shape", "thickness", "kernel", "vendor", "storage", "sex", "age")}}


def generate(out: str | Path, n: int, seed: int = 0, valid_fraction: float = 0.3, prevalence: float = 0.35,
             heldout_wording: str = "second", workers: int = 1, voxel_scale: float = 1.0) -> dict[str, int]:
    """``n`` phantoms; the last ``valid_fraction`` of them in ``valid`` (ingest moves a patient-hashed
    part of it to ``test``), their reports in the ``heldout_wording`` bank. ``voxel_scale`` > 1 makes
    coarser (smaller) volumes, for tests. The output does not depend on ``workers``."""
    if heldout_wording not in _BANK:
        raise ValueError(f"heldout_wording: {heldout_wording!r} is not one of {sorted(_BANK)}")
    out = Path(out)
    n_valid = max(1, int(round(n * valid_fraction))) if n > 1 else 0
    jobs = [(out, seed, i, "valid" if i >= n - n_valid else "train", prevalence, heldout_wording, voxel_scale)
            for i in range(n)]
    rows = run_cases(_write_case, jobs, workers, chunksize=4)
    write_ctrate_tables(out, {split: [_table_row(r) for r in rs] for split, rs in rows.items()})
    return {k: len(v) for k, v in rows.items()}


def _table_row(r: dict) -> dict:
    """A case's rows of the CT-RATE tables (``synth.write_ctrate_tables``)."""
    d = r["det"]
    tech = f"Non-contrast CT of the thorax, {d['thickness']:g} mm slices, {d['kernel']} kernel."
    return ctrate_row({**r, "spacing": d["spacing"], "shape": d["shape"]}, "External phantom study.", tech,
                      d["vendor"], 0 if d["storage"] == "hu" else -1024, d["sex"], d["age"], d["thickness"])


def main(argv: list[str] | None = None) -> int:
    p = generator_parser("python -m data_service.synth_ext", __doc__, _BANK)
    p.add_argument("--voxel-scale", type=float, default=1.0, help="> 1: coarser voxels, smaller volumes (tests)")
    a = parse_generator_args(p, argv)
    if a.voxel_scale <= 0:
        p.error(f"--voxel-scale must be > 0, got {a.voxel_scale}")
    counts = generate(a.out, a.n, a.seed, a.valid_fraction, heldout_wording=a.heldout_wording, workers=a.workers,
                      voxel_scale=a.voxel_scale)
    print(f"synth_ext: wrote {sum(counts.values())} external phantom volumes {counts} in CT-RATE layout -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
